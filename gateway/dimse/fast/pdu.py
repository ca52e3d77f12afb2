"""The DICOM upper layer protocol (PS3.8 §9.3): PDU encoding and decoding, for both roles.

Pure codecs, shared by the fast requestor (:mod:`gateway.dimse.fast`) and the
fast acceptor. Nothing here knows DIMSE; :mod:`gateway.dimse.fast.commands` does.

* A-ASSOCIATE-RQ/AC (§9.3.2, §9.3.3): application context, presentation contexts (with their result
  in the AC), user information: maximum length (§D.1), implementation class UID and version name
  (§D.3.3.2), asynchronous operations window (§D.3.3.3), SCP/SCU role selection (PS3.7 §D.3.3.4);
  any other user information sub-item (extended negotiation, user identity) is kept raw.
* A-ASSOCIATE-RJ (§9.3.4), A-RELEASE-RQ/RP (§9.3.6, §9.3.7), A-ABORT (§9.3.8).
* P-DATA-TF (§9.3.5): :func:`p_data_tf` fragments a message part to the peer's maximum PDU length,
  :func:`iter_pdvs` walks the PDVs of a received PDU without copying (Annex E: message control header).
* Reading PDUs off a socket is :mod:`gateway.dimse.fast.pdu_reader` (:class:`~gateway.dimse.fast.
  pdu_reader.PduReader`): this module is the pure codecs only.

Every length read from the wire is checked against what is left of its container and against a cap
before anything is allocated: malformed or oversized input raises :class:`ProtocolError`, never an
unbounded allocation or an IndexError.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

# --------------------------------------------------------------------------- constants

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"   # the DICOM Application Context Name (PS3.7 Annex A.2.1)
PROTOCOL_VERSION = 0x0001

# Item types (PS3.8 Table 9-12 and following).
_APP_CONTEXT_ITEM = 0x10
_PC_RQ_ITEM = 0x20
_PC_AC_ITEM = 0x21
_ABSTRACT_SYNTAX = 0x30
_TRANSFER_SYNTAX = 0x40
_USER_INFO_ITEM = 0x50
_MAX_LENGTH = 0x51
_IMPLEMENTATION_CLASS_UID = 0x52
_ASYNC_OPS_WINDOW = 0x53
_ROLE_SELECTION = 0x54
_IMPLEMENTATION_VERSION_NAME = 0x55

# Presentation context results (PS3.8 Table 9-18).
ACCEPTANCE = 0
USER_REJECTION = 1
NO_REASON = 2
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4
_CONTEXT_RESULTS = {
    ACCEPTANCE: "acceptance", USER_REJECTION: "user rejection", NO_REASON: "no reason (provider rejection)",
    ABSTRACT_SYNTAX_NOT_SUPPORTED: "abstract syntax not supported",
    TRANSFER_SYNTAXES_NOT_SUPPORTED: "transfer syntaxes not supported",
}

# A-ASSOCIATE-RJ (PS3.8 Table 9-21): result, source, reason.
REJECTED_PERMANENT = 1
REJECTED_TRANSIENT = 2
RJ_SERVICE_USER = 1
RJ_SERVICE_PROVIDER_ACSE = 2
RJ_SERVICE_PROVIDER_PRESENTATION = 3
_RJ_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}

# A-ABORT (PS3.8 Table 9-26): source and, for the service provider, the reason.
ABORT_SERVICE_USER = 0
ABORT_SERVICE_PROVIDER = 2
ABORT_NOT_SPECIFIED = 0
ABORT_UNRECOGNISED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_UNRECOGNISED_PARAMETER = 4
ABORT_UNEXPECTED_PARAMETER = 5
ABORT_INVALID_PARAMETER = 6
_ABORT_REASONS = {0: "reason not specified", 1: "unrecognised PDU", 2: "unexpected PDU",
                  4: "unrecognised PDU parameter", 5: "unexpected PDU parameter",
                  6: "invalid PDU parameter value"}

MAX_CONTEXTS = 128          # presentation context IDs are the odd numbers 1..255 (§9.3.2.2)
MAX_ASSOCIATION_PDU = 1 << 20
"""Cap on an A-ASSOCIATE-RQ/AC PDU: 128 contexts with a dozen syntaxes each are ~40 KiB."""
MAX_PDU_CAP = 64 << 20
"""Cap on any PDU when the advertised maximum is 0 (unlimited): nothing legitimate comes close."""
MIN_SEND_PDU = 8
"""The smallest maximum PDU length we can fragment for: a PDV header (6 bytes) and some data."""
DEFAULT_IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1082.100.1"   # the project's root (demo_data)
DEFAULT_IMPLEMENTATION_VERSION = "DWG_FAST_1"

PDU_HEADER = struct.Struct(">BBI")      # PDU type, reserved, length
_ITEM = struct.Struct(">BBH")        # item type, reserved, length
_PDV = struct.Struct(">IBB")         # PDV length, context ID, message control header


# --------------------------------------------------------------------------- errors


class UpperLayerError(Exception):
    """Anything that ends an association at the upper layer."""


class ProtocolError(UpperLayerError):
    """A malformed, oversized or unexpected PDU (the association should be aborted)."""


class ConnectionClosed(UpperLayerError):
    """The peer closed or reset the TCP connection."""


class ReadTimeout(UpperLayerError):
    """Nothing (or not enough) arrived within the read's timeout."""


class PeerAborted(UpperLayerError):
    """The peer sent an A-ABORT."""

    def __init__(self, abort: Abort) -> None:
        super().__init__(f"the peer aborted the association ({abort.describe()})")
        self.abort = abort


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class PresentationContext:
    """A proposed presentation context (A-ASSOCIATE-RQ)."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class ContextResult:
    """The acceptor's answer for one proposed context (A-ASSOCIATE-AC); ``transfer_syntax`` is the
    one chosen when accepted (PS3.8 §9.3.3.2: only meaningful then)."""

    id: int
    result: int
    transfer_syntax: str | None = None

    @property
    def accepted(self) -> bool:
        return self.result == ACCEPTANCE

    def describe(self) -> str:
        return _CONTEXT_RESULTS.get(self.result, f"result {self.result}")


@dataclass(frozen=True)
class RoleSelection:
    """SCP/SCU role selection for a SOP class (PS3.7 §D.3.3.4): proposed or, in the AC, granted."""

    sop_class: str
    scu: bool
    scp: bool


@dataclass(frozen=True)
class UserInformation:
    """The user information item (PS3.8 §9.3.2.3, Annex D)."""

    max_pdu: int = 0                                   # maximum PDU length we receive; 0 = unlimited
    implementation_class_uid: str = DEFAULT_IMPLEMENTATION_CLASS_UID
    implementation_version_name: str | None = DEFAULT_IMPLEMENTATION_VERSION
    roles: tuple[RoleSelection, ...] = ()
    async_ops: tuple[int, int] | None = None           # (max invoked, max performed), when negotiated
    extra: tuple[tuple[int, bytes], ...] = ()          # other sub-items (0x56.., user identity), raw


@dataclass(frozen=True)
class AssociateRq:
    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContext, ...]
    user: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class AssociateAc:
    called_ae: str       # PS3.8: reserved, but sent back with the RQ's values (checking them is not allowed)
    calling_ae: str
    results: tuple[ContextResult, ...]
    user: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class AssociateRj:
    result: int
    source: int
    reason: int

    def describe(self) -> str:
        kind = "permanent" if self.result == REJECTED_PERMANENT else "transient"
        who = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}
        why = _RJ_REASONS.get((self.source, self.reason), f"reason {self.reason}")
        return f"{kind}, {who.get(self.source, f'source {self.source}')}: {why}"


@dataclass(frozen=True)
class ReleaseRq:
    pass


@dataclass(frozen=True)
class ReleaseRp:
    pass


@dataclass(frozen=True)
class Abort:
    source: int = ABORT_SERVICE_USER
    reason: int = ABORT_NOT_SPECIFIED

    def describe(self) -> str:
        if self.source == ABORT_SERVICE_PROVIDER:
            return f"service provider: {_ABORT_REASONS.get(self.reason, f'reason {self.reason}')}"
        return "service user" if self.source == ABORT_SERVICE_USER else f"source {self.source}"


ControlPdu = AssociateRq | AssociateAc | AssociateRj | ReleaseRq | ReleaseRp | Abort
"""Every PDU but P-DATA-TF, which is handled as raw PDVs (:func:`iter_pdvs`)."""


class Pdv(NamedTuple):
    """One presentation data value of a P-DATA-TF (PS3.8 §9.3.5.1, Annex E.2)."""

    context_id: int
    command: bool        # bit 0 of the message control header: command (1) or data set (0)
    last: bool           # bit 1: the last fragment of this command or data set
    data: memoryview     # a view into the PDU: valid until the reader reads again


# --------------------------------------------------------------------------- encoding


def _item(kind: int, payload: bytes) -> bytes:
    if len(payload) > 0xFFFF:
        raise ValueError(f"item 0x{kind:02X} too long ({len(payload)} bytes)")
    return _ITEM.pack(kind, 0, len(payload)) + payload


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    if not raw or len(raw) > 64:
        raise ValueError(f"not a UID: {value!r}")
    return raw


def _ae(value: str) -> bytes:
    raw = value.encode("ascii")
    if not raw.strip() or len(raw) > 16:
        raise ValueError(f"AE title must be 1-16 ASCII characters, got {value!r}")
    return raw.ljust(16)


def _user_information(user: UserInformation) -> bytes:
    if not 0 <= user.max_pdu <= 0xFFFFFFFF:
        raise ValueError(f"max_pdu out of range: {user.max_pdu}")
    parts = [_item(_MAX_LENGTH, struct.pack(">I", user.max_pdu)),
             _item(_IMPLEMENTATION_CLASS_UID, _uid(user.implementation_class_uid))]
    if user.async_ops is not None:
        parts.append(_item(_ASYNC_OPS_WINDOW, struct.pack(">HH", *user.async_ops)))
    for role in user.roles:
        uid = _uid(role.sop_class)
        parts.append(_item(_ROLE_SELECTION, struct.pack(">H", len(uid)) + uid
                           + bytes((int(role.scu), int(role.scp)))))
    if user.implementation_version_name is not None:
        name = user.implementation_version_name.encode("ascii")
        if not 1 <= len(name) <= 16:
            raise ValueError(f"implementation version name must be 1-16 characters: {name!r}")
        parts.append(_item(_IMPLEMENTATION_VERSION_NAME, name))
    parts.extend(_item(kind, value) for kind, value in user.extra)
    return _item(_USER_INFO_ITEM, b"".join(parts))


def _association_body(called: str, calling: str, version: int, app_context: str, items: list[bytes],
                      user: UserInformation) -> bytes:
    return b"".join((struct.pack(">HH", version, 0), _ae(called), _ae(calling), b"\x00" * 32,
                     _item(_APP_CONTEXT_ITEM, _uid(app_context)), *items, _user_information(user)))


def _pdu(kind: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(kind, 0, len(body)) + body


def encode(pdu: ControlPdu) -> bytes:
    """The PDU on the wire (every type but P-DATA-TF: :func:`p_data_tf`)."""
    if isinstance(pdu, AssociateRq):
        if not 1 <= len(pdu.contexts) <= MAX_CONTEXTS:
            raise ValueError(f"1..{MAX_CONTEXTS} presentation contexts, got {len(pdu.contexts)}")
        items = []
        for cx in pdu.contexts:
            if not (1 <= cx.id <= 255 and cx.id % 2) or not cx.transfer_syntaxes:
                raise ValueError(f"bad presentation context {cx}")
            sub = _item(_ABSTRACT_SYNTAX, _uid(cx.abstract_syntax)) + b"".join(
                _item(_TRANSFER_SYNTAX, _uid(ts)) for ts in cx.transfer_syntaxes)
            items.append(_item(_PC_RQ_ITEM, bytes((cx.id, 0, 0, 0)) + sub))
        return _pdu(A_ASSOCIATE_RQ, _association_body(pdu.called_ae, pdu.calling_ae, pdu.protocol_version,
                                                      pdu.application_context, items, pdu.user))
    if isinstance(pdu, AssociateAc):
        items = []
        for r in pdu.results:
            # A rejected context still carries a transfer syntax sub-item, its value not significant.
            ts = _item(_TRANSFER_SYNTAX, _uid(r.transfer_syntax) if r.transfer_syntax else b"")
            items.append(_item(_PC_AC_ITEM, bytes((r.id, 0, r.result, 0)) + ts))
        return _pdu(A_ASSOCIATE_AC, _association_body(pdu.called_ae, pdu.calling_ae, pdu.protocol_version,
                                                      pdu.application_context, items, pdu.user))
    if isinstance(pdu, AssociateRj):
        return _pdu(A_ASSOCIATE_RJ, bytes((0, pdu.result, pdu.source, pdu.reason)))
    if isinstance(pdu, ReleaseRq):
        return _pdu(A_RELEASE_RQ, b"\x00" * 4)
    if isinstance(pdu, ReleaseRp):
        return _pdu(A_RELEASE_RP, b"\x00" * 4)
    if isinstance(pdu, Abort):
        return _pdu(A_ABORT, bytes((0, 0, pdu.source, pdu.reason)))
    raise TypeError(f"not a PDU: {pdu!r}")


def p_data_tf(context_id: int, data: bytes | memoryview, *, command: bool, max_pdu: int) -> Iterator[bytes]:
    """P-DATA-TF PDUs carrying ``data`` (a whole command set or data set) in one PDV each, fragmented
    so no PDU exceeds the peer's maximum PDU length ``max_pdu`` (0 = unlimited); the last fragment has
    bit 1 of the message control header set (PS3.8 Annex E.2). Empty data is one empty last PDV."""
    if not 1 <= context_id <= 255:
        raise ValueError(f"presentation context ID out of range: {context_id}")
    if max_pdu and max_pdu < MIN_SEND_PDU:
        raise ValueError(f"peer maximum PDU length {max_pdu} below {MIN_SEND_PDU}")
    view = memoryview(data).cast("B")
    size = len(view)
    step = max_pdu - 6 if max_pdu else MAX_PDU_CAP - 6   # PDV header: length (4), context, control
    start = 0
    while True:
        end = min(size, start + step)
        yield p_data_pdu(context_id, view[start:end], command=command, last=end >= size)
        if end >= size:
            return
        start = end


def p_data_pdu(context_id: int, chunk: bytes | memoryview, *, command: bool, last: bool) -> bytes:
    """One P-DATA-TF PDU with one PDV (the caller keeps it within the peer's maximum PDU length)."""
    return p_data_header(context_id, len(chunk), command=command, last=last) + chunk


def p_data_fragments(context_id: int, views: Sequence[memoryview], step: int, *,
                     last: bool) -> list[bytes | memoryview]:
    """A data set's bytes ``views`` (in order) as one-PDV P-DATA-TF PDUs of at most ``step`` bytes
    of fragment: their headers and slices of ``views`` in order, for one gathered write (nothing
    copied). A PDU may take its fragment from several views. ``last``: the final fragment ends the
    message (an empty ``views`` then gives one empty last fragment)."""
    remaining = sum(v.nbytes for v in views)
    if not remaining:
        return [p_data_header(context_id, 0, command=False, last=True)] if last else []
    out: list[bytes | memoryview] = []
    room = 0   # fragment bytes the current PDU still takes
    for view in views:
        pos, size = 0, view.nbytes
        while pos < size:
            if not room:
                room = min(step, remaining)
                remaining -= room
                out.append(p_data_header(context_id, room, command=False, last=last and not remaining))
            take = min(room, size - pos)
            out.append(view[pos:pos + take])
            pos += take
            room -= take
    return out


def p_data_header(context_id: int, size: int, *, command: bool, last: bool) -> bytes:
    """The 10 bytes before a PDV's ``size`` bytes of fragment in a one-PDV P-DATA-TF PDU (PS3.8
    9.3.5: PDU type and length, PDV item length, context ID, message control header)."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return PDU_HEADER.pack(P_DATA_TF, 0, size + 6) + _PDV.pack(size + 2, context_id, control)


# --------------------------------------------------------------------------- decoding


def _items(body: memoryview, start: int) -> Iterator[tuple[int, memoryview]]:
    """(item type, payload) for the items from ``start`` to the end of ``body``, bounds-checked."""
    i, end = start, len(body)
    while i < end:
        if end - i < 4:
            raise ProtocolError("truncated item header")
        kind, _, length = _ITEM.unpack_from(body, i)
        if i + 4 + length > end:
            raise ProtocolError(f"item 0x{kind:02X} of {length} bytes overruns its container")
        yield kind, body[i + 4:i + 4 + length]
        i += 4 + length


def _text(value: memoryview, what: str) -> str:
    try:
        # UIDs are not padded (PS3.8 Annex F) but some implementations pad with NUL or space.
        return bytes(value).decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not ASCII") from exc


def _decode_user(payload: memoryview) -> UserInformation:
    max_pdu, impl_uid, version, async_ops = 0, "", None, None
    roles: list[RoleSelection] = []
    extra: list[tuple[int, bytes]] = []
    seen_max = False
    for kind, value in _items(payload, 0):
        if kind == _MAX_LENGTH:
            if len(value) != 4:
                raise ProtocolError("maximum length sub-item must be 4 bytes")
            (max_pdu,), seen_max = struct.unpack(">I", value), True
        elif kind == _IMPLEMENTATION_CLASS_UID:
            impl_uid = _text(value, "implementation class UID")
        elif kind == _IMPLEMENTATION_VERSION_NAME:
            version = _text(value, "implementation version name")
        elif kind == _ASYNC_OPS_WINDOW:
            if len(value) != 4:
                raise ProtocolError("asynchronous operations window sub-item must be 4 bytes")
            invoked, performed = struct.unpack(">HH", value)
            async_ops = (invoked, performed)
        elif kind == _ROLE_SELECTION:
            if len(value) < 2:
                raise ProtocolError("truncated role selection sub-item")
            (uid_length,) = struct.unpack_from(">H", value, 0)
            if len(value) != 2 + uid_length + 2:
                raise ProtocolError("role selection sub-item length does not match its UID length")
            roles.append(RoleSelection(_text(value[2:2 + uid_length], "role selection SOP class"),
                                       scu=bool(value[2 + uid_length]), scp=bool(value[3 + uid_length])))
        else:
            extra.append((kind, bytes(value)))
    if not seen_max:
        raise ProtocolError("user information without a maximum length sub-item")
    return UserInformation(max_pdu=max_pdu, implementation_class_uid=impl_uid,
                           implementation_version_name=version, roles=tuple(roles), async_ops=async_ops,
                           extra=tuple(extra))


def _decode_association(kind: int, body: memoryview) -> AssociateRq | AssociateAc:
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE PDU shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    try:
        called = bytes(body[4:20]).decode("ascii").strip()
        calling = bytes(body[20:36]).decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ProtocolError("AE title is not ASCII") from exc
    app_context: str | None = None
    user: UserInformation | None = None
    proposed: list[PresentationContext] = []
    results: list[ContextResult] = []
    for item, payload in _items(body, 68):
        if item == _APP_CONTEXT_ITEM:
            app_context = _text(payload, "application context name")
        elif item == _PC_RQ_ITEM and kind == A_ASSOCIATE_RQ:
            if len(payload) < 4:
                raise ProtocolError("truncated presentation context item")
            abstract: str | None = None
            syntaxes: list[str] = []
            for sub, value in _items(payload, 4):
                if sub == _ABSTRACT_SYNTAX:
                    abstract = _text(value, "abstract syntax")
                elif sub == _TRANSFER_SYNTAX:
                    syntaxes.append(_text(value, "transfer syntax"))
                else:
                    raise ProtocolError(f"unexpected sub-item 0x{sub:02X} in a presentation context")
            if abstract is None or not syntaxes:
                raise ProtocolError(f"presentation context {payload[0]} without abstract or transfer syntax")
            proposed.append(PresentationContext(payload[0], abstract, tuple(syntaxes)))
        elif item == _PC_AC_ITEM and kind == A_ASSOCIATE_AC:
            if len(payload) < 4:
                raise ProtocolError("truncated presentation context item")
            chosen: str | None = None
            for sub, value in _items(payload, 4):
                if sub == _TRANSFER_SYNTAX:
                    chosen = _text(value, "transfer syntax") or None
            result = payload[2]
            if result == ACCEPTANCE and chosen is None:
                raise ProtocolError(f"presentation context {payload[0]} accepted without a transfer syntax")
            results.append(ContextResult(payload[0], result, chosen if result == ACCEPTANCE else None))
        elif item == _USER_INFO_ITEM:
            user = _decode_user(payload)
        else:
            raise ProtocolError(f"unexpected item 0x{item:02X} in an A-ASSOCIATE PDU")
    if app_context is None:
        raise ProtocolError("A-ASSOCIATE PDU without an application context")
    if user is None:
        raise ProtocolError("A-ASSOCIATE PDU without user information")
    if kind == A_ASSOCIATE_RQ:
        if not proposed or len(proposed) > MAX_CONTEXTS:
            raise ProtocolError(f"A-ASSOCIATE-RQ with {len(proposed)} presentation contexts")
        return AssociateRq(called, calling, tuple(proposed), user, app_context, version)
    return AssociateAc(called, calling, tuple(results), user, app_context, version)


def decode(kind: int, body: bytes | memoryview) -> ControlPdu:
    """The PDU of type ``kind`` from its body (the bytes after the 6-byte header); not P-DATA-TF."""
    view = memoryview(body).cast("B")
    if kind in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        return _decode_association(kind, view)
    if kind in (A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
        if len(view) != 4:
            raise ProtocolError(f"PDU type 0x{kind:02X} must have a 4-byte body, got {len(view)}")
        if kind == A_ASSOCIATE_RJ:
            return AssociateRj(view[1], view[2], view[3])
        if kind == A_ABORT:
            return Abort(view[2], view[3])
        return ReleaseRq() if kind == A_RELEASE_RQ else ReleaseRp()
    raise ProtocolError(f"cannot decode PDU type 0x{kind:02X} here")


def iter_pdvs(body: memoryview) -> Iterator[Pdv]:
    """The PDVs of a P-DATA-TF body, as views into it (no copy); at least one (PS3.8 §9.3.5)."""
    i, end = 0, len(body)
    if end == 0:
        raise ProtocolError("P-DATA-TF without a PDV")
    while i < end:
        if end - i < 6:
            raise ProtocolError("truncated PDV header")
        length, context_id, control = _PDV.unpack_from(body, i)
        if length < 2 or i + 4 + length > end:
            raise ProtocolError(f"PDV length {length} invalid for the {end - i} bytes left")
        if not context_id % 2:
            raise ProtocolError(f"PDV on even presentation context ID {context_id}")
        yield Pdv(context_id, bool(control & 0x01), bool(control & 0x02), body[i + 6:i + 4 + length])
        i += 4 + length
