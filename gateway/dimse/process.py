"""pynetdicom's process-global settings, set once at start-up (never per request)."""

from __future__ import annotations

from pynetdicom import _config


def quiet_pynetdicom_identifier_logging() -> None:
    """Stop pynetdicom logging whole C-FIND/GET/MOVE identifiers (names, IDs: PHI) at INFO level.

    The switches live in ``pynetdicom._config``, which is process-global; off is right for the whole
    process (the gateway must never log PHI), so this is idempotent.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
