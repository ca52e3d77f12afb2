"""dicomweb-gateway: DICOMweb in front of DIMSE-only PACS (docs/architecture.md).

Importing the package changes no process-wide setting: the app's start-up applies them
(:func:`gateway.startup.configure_process`).
"""
