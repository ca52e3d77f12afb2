"""DIMSE command sets (PS3.7 §9.3, §E.1): group 0000, always Implicit VR Little Endian.

One value type, :class:`Command`, for every request and response of C-ECHO, C-FIND, C-GET, C-MOVE,
C-STORE and C-CANCEL (PS3.7 §9.3.1-9.3.5, Tables 9.3-1 and following): :func:`encode_command` writes
the elements that are set, in tag order, with the Command Group Length first; :func:`decode_command`
reads any command set, bounds-checked (a malformed one raises :class:`~gateway.dimse.fast.pdu.
ProtocolError`), keeping elements it does not know in ``extra``. Constructors for the messages the
gateway sends (``c_find_rq``, ``c_store_rsp``, ...) fill the mandatory fields.

Identifiers (C-FIND/C-GET/C-MOVE data sets) are encoded and decoded with pydicom in the transfer
syntax of the accepted context (:func:`encode_identifier`, :func:`decode_identifier`). C-STORE data
sets are never decoded: they are bytes passed through.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field, fields
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from gateway.dimse.fast.pdu import ProtocolError

# Command Field values (PS3.7 Table E.1-1 and §9.3).
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NAMES = {C_STORE_RQ: "C-STORE-RQ", C_STORE_RSP: "C-STORE-RSP", C_GET_RQ: "C-GET-RQ", C_GET_RSP: "C-GET-RSP",
         C_FIND_RQ: "C-FIND-RQ", C_FIND_RSP: "C-FIND-RSP", C_MOVE_RQ: "C-MOVE-RQ", C_MOVE_RSP: "C-MOVE-RSP",
         C_ECHO_RQ: "C-ECHO-RQ", C_ECHO_RSP: "C-ECHO-RSP", C_CANCEL_RQ: "C-CANCEL-RQ"}

NO_DATA_SET = 0x0101
"""Command Data Set Type (0000,0800): no data set follows; any other value: one follows."""
DATA_SET_PRESENT = 0x0001
PRIORITY_MEDIUM = 0x0000

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
IDENTIFIER_SYNTAXES = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE})

MAX_COMMAND_SET = 1 << 16
"""Cap on a received command set: the largest legitimate one (an error comment, AE titles) is < 1 KiB."""

MAX_IDENTIFIER = 16 << 20
"""Cap on an inflated (Deflated Explicit VR LE) identifier."""

_UI, _US, _AE, _LO, _UL, _AT = "UI", "US", "AE", "LO", "UL", "AT"

# (element, attribute, VR) in tag order: every group 0000 element of the C-services (PS3.7 Annex E).
_ELEMENTS: tuple[tuple[int, str, str], ...] = (
    (0x0002, "affected_sop_class", _UI),
    (0x0003, "requested_sop_class", _UI),
    (0x0100, "command_field", _US),
    (0x0110, "message_id", _US),
    (0x0120, "message_id_responded", _US),
    (0x0600, "move_destination", _AE),
    (0x0700, "priority", _US),
    (0x0800, "data_set_type", _US),
    (0x0900, "status", _US),
    (0x0901, "offending_element", _AT),
    (0x0902, "error_comment", _LO),
    (0x0903, "error_id", _US),
    (0x1000, "affected_sop_instance", _UI),
    (0x1001, "requested_sop_instance", _UI),
    (0x1020, "remaining", _US),
    (0x1021, "completed", _US),
    (0x1022, "failed", _US),
    (0x1023, "warning", _US),
    (0x1030, "move_originator_ae", _AE),
    (0x1031, "move_originator_id", _US),
)
_BY_ELEMENT = {el: (name, vr) for el, name, vr in _ELEMENTS}
_ELEMENT = struct.Struct("<HHI")


@dataclass
class Command:
    """A DIMSE command set; ``None`` fields are absent. ``data_set_type`` is set by the encoder from
    ``has_data_set`` unless given."""

    command_field: int
    message_id: int | None = None
    message_id_responded: int | None = None
    affected_sop_class: str | None = None
    requested_sop_class: str | None = None
    affected_sop_instance: str | None = None
    requested_sop_instance: str | None = None
    priority: int | None = None
    data_set_type: int | None = None
    status: int | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    move_destination: str | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    move_originator_ae: str | None = None
    move_originator_id: int | None = None
    extra: dict[int, bytes] = field(default_factory=dict)   # other elements of group 0000, raw values
    trailer: bytes = b""   # received elements of other groups after the command set (never encoded)

    @property
    def has_data_set(self) -> bool:
        return self.data_set_type is not None and self.data_set_type != NO_DATA_SET

    @property
    def name(self) -> str:
        return NAMES.get(self.command_field, f"command 0x{self.command_field:04X}")

    @property
    def is_response(self) -> bool:
        return bool(self.command_field & 0x8000)


# --------------------------------------------------------------------------- encoding


def _value(vr: str, value: object) -> bytes:
    if vr == _US:
        assert isinstance(value, int)
        return struct.pack("<H", value)
    if vr == _UL:
        assert isinstance(value, int)
        return struct.pack("<I", value)
    if vr == _AT:
        assert isinstance(value, tuple)
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in value)
    assert isinstance(value, str)
    raw = value.encode("ascii" if vr != _LO else "latin-1")
    if vr == _UI:
        return raw + b"\x00" * (len(raw) % 2)          # UIDs pad with NUL (PS3.5 §9.1)
    if vr == _AE:
        return raw.ljust(16) if len(raw) < 16 else raw  # AE titles: as DCMTK and pynetdicom send them
    return raw + b" " * (len(raw) % 2)


def encode_command(command: Command) -> bytes:
    """The command set as Implicit VR Little Endian, Command Group Length (0000,0000) first."""
    parts: list[bytes] = []
    extra = dict(command.extra)
    for element, name, vr in _ELEMENTS:
        if extra:   # elements we do not model, kept in tag order (most commands have none)
            for other in sorted(e for e in extra if e < element):
                parts.append(_ELEMENT.pack(0, other, len(extra[other])) + extra.pop(other))
        value = getattr(command, name)
        if name == "data_set_type" and value is None:
            value = NO_DATA_SET
        if value is None:
            continue
        raw = _value(vr, value)
        parts.append(_ELEMENT.pack(0, element, len(raw)) + raw)
    for other in sorted(extra):
        parts.append(_ELEMENT.pack(0, other, len(extra[other])) + extra[other])
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


# --------------------------------------------------------------------------- decoding


def _parse(vr: str, raw: bytes) -> object:
    if vr == _US:
        if len(raw) != 2:
            raise ProtocolError(f"US element of {len(raw)} bytes")
        return struct.unpack("<H", raw)[0]
    if vr == _AT:
        if len(raw) % 4:
            raise ProtocolError(f"AT element of {len(raw)} bytes")
        pairs = struct.unpack(f"<{len(raw) // 2}H", raw)
        return tuple((pairs[i] << 16) | pairs[i + 1] for i in range(0, len(pairs), 2))
    try:
        text = raw.decode("ascii" if vr != _LO else "latin-1")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{vr} element is not ASCII") from exc
    return text.rstrip("\x00 ").lstrip(" ") if vr != _UI else text.rstrip("\x00 ")


def decode_command(data: bytes | memoryview) -> Command:
    """A command set from its bytes (all fragments joined)."""
    view = memoryview(data).cast("B")
    if len(view) > MAX_COMMAND_SET:
        raise ProtocolError(f"command set of {len(view)} bytes")
    values: dict[str, object] = {}
    extra: dict[int, bytes] = {}
    trailer = b""
    i, end = 0, len(view)
    while i < end:
        if end - i < 8:
            raise ProtocolError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(view, i)
        if group != 0:
            # DCMTK (Orthanc) appends the Failed SOP Instance UID List (0008,0058) of a final C-GET-RSP
            # to the command set, with Command Data Set Type 0101: kept aside, as pynetdicom ignores it.
            trailer = bytes(view[i:])
            break
        if length > end - i - 8:
            raise ProtocolError(f"command element (0000,{element:04X}) overruns the command set")
        raw = bytes(view[i + 8:i + 8 + length])
        i += 8 + length
        if element == 0x0000:
            continue
        known = _BY_ELEMENT.get(element)
        if known is None:
            extra[element] = raw
        else:
            values[known[0]] = _parse(known[1], raw)
    if "command_field" not in values:
        raise ProtocolError("command set without a Command Field (0000,0100)")
    command = Command(command_field=int(values.pop("command_field")), extra=extra,   # type: ignore[call-overload]
                      trailer=trailer)
    for name, value in values.items():
        setattr(command, name, value)
    return command


# --------------------------------------------------------------------------- constructors


def c_echo_rq(msg_id: int) -> Command:
    return Command(C_ECHO_RQ, message_id=msg_id, affected_sop_class="1.2.840.10008.1.1")


def c_echo_rsp(msg_id: int, status: int = 0x0000) -> Command:
    return Command(C_ECHO_RSP, message_id_responded=msg_id, affected_sop_class="1.2.840.10008.1.1",
                   status=status)


def c_find_rq(msg_id: int, sop_class: str, priority: int = PRIORITY_MEDIUM) -> Command:
    return Command(C_FIND_RQ, message_id=msg_id, affected_sop_class=sop_class, priority=priority,
                   data_set_type=DATA_SET_PRESENT)


def c_get_rq(msg_id: int, sop_class: str, priority: int = PRIORITY_MEDIUM) -> Command:
    return Command(C_GET_RQ, message_id=msg_id, affected_sop_class=sop_class, priority=priority,
                   data_set_type=DATA_SET_PRESENT)


def c_move_rq(msg_id: int, sop_class: str, destination: str, priority: int = PRIORITY_MEDIUM) -> Command:
    return Command(C_MOVE_RQ, message_id=msg_id, affected_sop_class=sop_class, priority=priority,
                   move_destination=destination, data_set_type=DATA_SET_PRESENT)


def c_cancel_rq(msg_id_responded: int) -> Command:
    return Command(C_CANCEL_RQ, message_id_responded=msg_id_responded)


def c_store_rq(msg_id: int, sop_class: str, sop_instance: str, *, priority: int = PRIORITY_MEDIUM,
               move_originator_ae: str | None = None, move_originator_id: int | None = None) -> Command:
    return Command(C_STORE_RQ, message_id=msg_id, affected_sop_class=sop_class,
                   affected_sop_instance=sop_instance, priority=priority, data_set_type=DATA_SET_PRESENT,
                   move_originator_ae=move_originator_ae, move_originator_id=move_originator_id)


def c_store_rsp(request: Command, status: int) -> Command:
    """The response to a C-STORE-RQ (PS3.7 §9.3.1.2): its class, instance and Message ID echoed."""
    return Command(C_STORE_RSP, message_id_responded=request.message_id,
                   affected_sop_class=request.affected_sop_class,
                   affected_sop_instance=request.affected_sop_instance, status=status)


def c_find_rsp(msg_id: int, sop_class: str, status: int, *, has_identifier: bool) -> Command:
    return Command(C_FIND_RSP, message_id_responded=msg_id, affected_sop_class=sop_class, status=status,
                   data_set_type=DATA_SET_PRESENT if has_identifier else NO_DATA_SET)


def retrieve_rsp(command_field: int, msg_id: int, sop_class: str, status: int, *,
                 remaining: int | None = None, completed: int | None = None, failed: int | None = None,
                 warning: int | None = None,
                 has_identifier: bool = False) -> Command:
    """A C-GET-RSP or C-MOVE-RSP with its sub-operation counters (PS3.7 §9.3.3.2, §9.3.4.2)."""
    return Command(command_field, message_id_responded=msg_id, affected_sop_class=sop_class, status=status,
                   remaining=remaining, completed=completed, failed=failed, warning=warning,
                   data_set_type=DATA_SET_PRESENT if has_identifier else NO_DATA_SET)


def status_dataset(command: Command) -> Dataset:
    """The response's status elements as the pydicom Dataset :mod:`gateway.dimse.outcomes` reads (the
    one interpretation of statuses and sub-operation counters, shared with the pynetdicom engine)."""
    ds = Dataset()
    if command.status is not None:
        ds.Status = command.status
    for name, keyword in (("remaining", "NumberOfRemainingSuboperations"),
                          ("completed", "NumberOfCompletedSuboperations"),
                          ("failed", "NumberOfFailedSuboperations"),
                          ("warning", "NumberOfWarningSuboperations")):
        value = getattr(command, name)
        if value is not None:
            setattr(ds, keyword, value)
    return ds


# --------------------------------------------------------------------------- identifiers


def _syntax(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) for an identifier's transfer syntax."""
    if transfer_syntax not in IDENTIFIER_SYNTAXES:
        raise ValueError(f"identifiers in {transfer_syntax} are not supported")
    return (transfer_syntax == IMPLICIT_VR_LE, transfer_syntax != EXPLICIT_VR_BE,
            transfer_syntax == DEFLATED_EXPLICIT_VR_LE)


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    """A C-FIND/C-GET/C-MOVE identifier in the accepted context's transfer syntax."""
    implicit, little, deflated = _syntax(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = compressor.compress(raw) + compressor.flush()
        raw += b"\x00" * (len(raw) % 2)
    return raw


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """An identifier (a C-FIND match, a C-GET/C-MOVE response's failed UID list) as pydicom reads it:
    the same call pynetdicom makes, so both engines hand the services equal datasets."""
    implicit, little, deflated = _syntax(transfer_syntax)
    if deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data, MAX_IDENTIFIER)
        except zlib.error as exc:
            raise ProtocolError("malformed deflated identifier") from exc
        if inflater.unconsumed_tail or (len(data) >= MAX_IDENTIFIER and not inflater.eof):
            raise ProtocolError(f"deflated identifier inflates past {MAX_IDENTIFIER} bytes")
    try:
        return read_dataset(BytesIO(data), implicit, little)
    except Exception as exc:   # noqa: BLE001 - pydicom raises many types for a malformed data set
        raise ProtocolError(f"malformed identifier: {type(exc).__name__}") from exc


def field_names() -> tuple[str, ...]:
    """The Command attributes that map to elements (for tests)."""
    return tuple(f.name for f in fields(Command) if f.name not in ("command_field", "extra", "trailer"))
