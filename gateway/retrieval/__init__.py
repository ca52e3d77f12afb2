"""Retrieval: locate, list, fetch once, pin, stream (docs/architecture.md, "Retrieval").

``service``     the API the WADO routes call (parts, metadata, one pinned instance)
``locating``    which node holds a study; series manifests and their freshness
``fetching``    single-flight fetches from the PACS: priority, retries, completeness
``fetch``       the SeriesFetch every waiting request reads from, and its spool pins
``coordinator`` the interface through which the cluster shares fetches between replicas
``membership``  whether an arrival no manifest lists yet is the URL's study and series (its header)
"""
