"""Process-wide settings the running gateway needs, applied by the app's start-up (never on import).

Importing ``gateway`` (or ``gateway.client``) changes nothing about the process; :func:`configure_process`
is called by :func:`gateway.app.create_app`'s lifespan and by the CLI commands that talk DIMSE;
:func:`configure_logging` only by the CLI commands that serve (an embedded gateway leaves its host's
logging alone).
"""

from __future__ import annotations

import logging
from typing import IO

from pydicom import config as pydicom_config

from gateway.dimse.process import configure_pynetdicom
from gateway.observability import JsonFormatter, RequestIdFilter, TextFormatter, masked_path
from gateway.settings import LoggingSection


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


def configure_logging(section: LoggingSection, stream: IO[str] | None = None) -> logging.Handler:
    """The process's one log handler, on ``stream`` (stderr), replacing the root logger's handlers.

    ``logging.format``: ``text`` (:class:`TextFormatter`: ``[req=<id>]`` while a request is served)
    or ``json`` (:class:`JsonFormatter`: one object per line with the request id,
    docs/architecture.md, "App"); ``logging.level`` for the root logger.
    uvicorn is then run without a log config of its own, so its lines (the access log, through
    :class:`NoQueryStrings`) come out of this handler in the same format.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if section.format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for previous in list(root.handlers):
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(section.level.upper())
    return handler


class NoQueryStrings(logging.Filter):
    """Drops the query string from uvicorn's access log lines (QIDO keys are patient data:
    ``PatientName=...&PatientBirthDate=...``) and masks path segments that are none of the API's
    words, UIDs, frame lists, tag paths or node names, so the operational log stays free of patient
    identifiers. UIDs stay: an operator needs them to trace a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, query = (args[2].split("?", 1) + [""])[:2]
            record.args = (*args[:2], masked_path(path) + ("?…" if query else ""), *args[3:])
        return True
