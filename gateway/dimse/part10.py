"""The Part-10 header put before every instance a C-GET sub-operation delivers, for both engines.

A received C-STORE data set becomes a Part-10 file by prefixing the preamble, ``DICM`` and the File
Meta Information (PS3.10 §7.1). Building that with pydicom costs ~0.2-0.4 ms of GIL-held time per
instance on the association's critical path, so it is written here with ``struct``, byte for byte
what pynetdicom's ``Event.encoded_dataset(include_meta=True)`` writes (``create_file_meta`` +
``encode_file_meta``): both engines deliver identical files (docs/architecture.md, "DIMSE edge").
"""

from __future__ import annotations

import re
import struct

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta, encode_file_meta

_PLAIN_UID = re.compile(r"[0-9.]{1,64}")
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    # Group 0002, Explicit VR Little Endian, 2-byte length (UI, SH, UL).
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" * (len(value) % 2)


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes | None:
    """Preamble, ``DICM`` and the File Meta Information for an instance; ``None`` for values this
    fast path does not cover (not a plain UID): the caller then uses pydicom/pynetdicom's encoder."""
    uids = (sop_class, sop_instance, transfer_syntax)
    if not all(_PLAIN_UID.fullmatch(u) for u in uids):
        return None
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2), b"\x00\x01",   # FileMetaInformationVersion
        *(_meta_element(el, b"UI", _ui(uid)) for el, uid in ((0x0002, sop_class), (0x0003, sop_instance),
                                                            (0x0010, transfer_syntax),
                                                            (0x0012, PYNETDICOM_IMPLEMENTATION_UID))),
        _meta_element(0x0013, b"SH", version + b" " * (len(version) % 2)),
    ))
    return _PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def part10_prefix(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """What goes before the data set: :func:`part10_header`, else (a UID it does not cover) what
    pynetdicom writes, through its own encoder."""
    header = part10_header(sop_class, sop_instance, transfer_syntax)
    if header is not None:
        return header
    meta = create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                            transfer_syntax=UID(transfer_syntax))
    return _PREAMBLE + encode_file_meta(meta)
