"""pynetdicom's process-global settings (``pynetdicom._config``), applied once by the app's start-up.

Never at import: importing a gateway module must not change how other code in the process (a test,
``gateway.client``, a user's script) behaves.
"""

from __future__ import annotations

from pynetdicom import _config


def configure_pynetdicom() -> None:
    """Idempotent; right for the whole process that runs a gateway.

    * pynetdicom logs whole C-FIND/GET/MOVE identifiers (names, IDs: PHI) at INFO level: off.
    * ``send_c_store(path)`` streams the file's data set PDU by PDU instead of decoding it
      (``gateway.dimse.store`` sends STOW-RS instances by path; datasets passed as objects are
      unaffected).
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_SEND_CHUNKED_DATASET = True
