"""Process-wide settings the running gateway needs, applied by the app's start-up (never on import).

Importing ``gateway`` (or ``gateway.client``) changes nothing about the process; :func:`configure_process`
is called by :func:`gateway.app.create_app`'s lifespan and by the CLI commands that talk DIMSE.
"""

from __future__ import annotations

import logging

from pydicom import config as pydicom_config

from gateway.dimse.process import configure_pynetdicom


def configure_process() -> None:
    """Idempotent.

    * pydicom reads and writes without validating values: PACS answer with whatever their
      decades-old databases hold (DA "2019.01.31", DS with spaces...), and the gateway passes such
      values on (normalising what viewers need) instead of warning, or failing, per element.
    * pynetdicom's process-global configuration (:func:`configure_pynetdicom`).
    * the HTTP access log without query strings (:class:`NoQueryStrings`).
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    configure_pynetdicom()
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, NoQueryStrings) for f in access.filters):
        access.addFilter(NoQueryStrings())


class NoQueryStrings(logging.Filter):
    """Drops the query string from uvicorn's access log lines: QIDO keys are patient data
    (``PatientName=...&PatientBirthDate=...``) and the operational log must stay free of it. Paths
    keep their UIDs (not patient identifiers), which an operator needs to trace a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path = args[2].split("?", 1)[0] + "?…"
            record.args = (*args[:2], path, *args[3:])
        return True
