"""STOW-RS (PS3.18 §10.5): the work behind ``POST /studies[/{study}]`` (docs/architecture.md, "STOW-RS").

* :mod:`gateway.stow.receive`: the multipart body, streamed part by part to temp files;
* :mod:`gateway.stow.prepare`: those parts -> Part-10 instances ready for C-STORE (repairing files
  without preamble or file meta, building instances from DICOM JSON + bulk data), or a failure code;
* :mod:`gateway.stow.pipeline`: both as a pipeline, each instance handed to the PACS interface as
  soon as its part is complete, while later parts still arrive;
* :mod:`gateway.stow.service`: :class:`~gateway.stow.service.StowService`, which runs the pipeline,
  bumps the cache generations and records locations.

The route (:mod:`gateway.routes.stow`) only parses the request and renders the Annex I response.
"""
