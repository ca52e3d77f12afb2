"""PACS profiles: what each node can do, measured instead of configured (docs/architecture.md,
"PACS profiles").

* :mod:`~gateway.profile.facts`: the profile, a record of facts without patient data, and its JSON;
* :mod:`~gateway.profile.decide`: pure: profile + configuration -> the effective node the services
  use, and which facts were overridden; the safe values for what is not known yet;
* :mod:`~gateway.profile.queries`, :mod:`~gateway.profile.transfers`: the read-only probes, through
  the :class:`gateway.pacs.Pacs` interface (C-FIND, C-GET of one instance, C-MOVE of one instance,
  one association, C-ECHO);
* :mod:`~gateway.profile.probe`: runs them in order into one profile;
* :mod:`~gateway.profile.service`: per node: lazy probing at first contact, the interval, the
  implementation check, the shared cache, the published effective nodes and the /metrics series;
* :mod:`~gateway.profile.report`: the table (``dicomweb-gateway probe``) and the admin JSON;
* :mod:`~gateway.profile.second_round`: safe while unknown: a request the safe defaults failed
  waits for the probe and runs once more as the profile settled the node (search and retrieval).
"""
