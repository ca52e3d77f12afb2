"""The fast engine's codecs: PS3.8 PDUs, PS3.7 command sets, identifiers (no network but a socketpair).

Round trips (hypothesis over the value space), interoperability with pynetdicom's encoder/decoder
(the reference the engines must agree with), and malformed or oversized input rejected with
ProtocolError before anything is allocated.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_FIND_RQ, C_STORE_RQ
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC as PnAc
from pynetdicom.pdu import A_ASSOCIATE_RQ as PnRq

from gateway.dimse.fast import commands as c
from gateway.dimse.fast import pdu
from gateway.dimse.fast.pdu_reader import PduReader
from gateway.dimse.part10 import part10_header, part10_prefix

uids = st.lists(st.integers(0, 99999), min_size=2, max_size=10).map(lambda xs: "1." + ".".join(map(str, xs))) \
    .filter(lambda u: len(u) <= 64)
aes = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=16)
ushort = st.integers(0, 0xFFFF)


@st.composite
def user_information(draw: st.DrawFn) -> pdu.UserInformation:
    return pdu.UserInformation(
        max_pdu=draw(st.integers(0, 0xFFFFFFFF)), implementation_class_uid=draw(uids),
        implementation_version_name=draw(st.none() | st.text("ABCXYZ_0123", min_size=1, max_size=16)),
        roles=tuple(draw(st.lists(st.builds(pdu.RoleSelection, uids, st.booleans(), st.booleans()),
                                  max_size=4))),
        async_ops=draw(st.none() | st.tuples(ushort, ushort)),
        extra=tuple(draw(st.lists(st.tuples(st.sampled_from([0x56, 0x57, 0x58]), st.binary(max_size=40)),
                                  max_size=2))))


@st.composite
def associate_rqs(draw: st.DrawFn) -> pdu.AssociateRq:
    n = draw(st.integers(1, 12))
    contexts = tuple(pdu.PresentationContext(2 * i + 1, draw(uids), tuple(draw(st.lists(uids, min_size=1,
                                                                                          max_size=4))))
                     for i in range(n))
    return pdu.AssociateRq(draw(aes), draw(aes), contexts, draw(user_information()))


@st.composite
def associate_acs(draw: st.DrawFn) -> pdu.AssociateAc:
    results = []
    for i in range(draw(st.integers(0, 12))):
        result = draw(st.sampled_from([0, 1, 2, 3, 4]))
        results.append(pdu.ContextResult(2 * i + 1, result, draw(uids) if result == 0 else None))
    return pdu.AssociateAc(draw(aes), draw(aes), tuple(results), draw(user_information()))


def roundtrip(value: pdu.ControlPdu) -> pdu.ControlPdu:
    raw = pdu.encode(value)
    kind, _, length = struct.unpack(">BBI", raw[:6])
    assert length == len(raw) - 6
    return pdu.decode(kind, raw[6:])


# --------------------------------------------------------------------------- PDU round trips


@given(associate_rqs())
@settings(max_examples=150, deadline=None)
def test_associate_rq_round_trips(rq: pdu.AssociateRq) -> None:
    assert roundtrip(rq) == rq


@given(associate_acs())
@settings(max_examples=150, deadline=None)
def test_associate_ac_round_trips(ac: pdu.AssociateAc) -> None:
    assert roundtrip(ac) == ac


@given(st.integers(1, 2), st.integers(1, 3), st.integers(0, 7))
def test_small_pdus_round_trip(result: int, source: int, reason: int) -> None:
    rj = pdu.AssociateRj(result, source, reason)
    assert roundtrip(rj) == rj and rj.describe()
    abort = pdu.Abort(source if source != 1 else 2, reason)
    assert roundtrip(abort) == abort
    assert roundtrip(pdu.ReleaseRq()) == pdu.ReleaseRq()
    assert roundtrip(pdu.ReleaseRp()) == pdu.ReleaseRp()


def test_rejection_and_abort_are_described() -> None:
    assert pdu.AssociateRj(1, 1, 7).describe() == "permanent, service user: called AE title not recognised"
    assert "local limit" in pdu.AssociateRj(2, 3, 2).describe()
    assert pdu.Abort(2, 1).describe() == "service provider: unrecognised PDU"


@given(st.binary(max_size=20000), st.integers(8, 5000), st.booleans(), st.sampled_from([1, 3, 127, 255]))
@settings(max_examples=200, deadline=None)
def test_p_data_fragments_respect_the_peer_maximum_and_reassemble(data: bytes, max_pdu: int, command: bool,
                                                                  context: int) -> None:
    pdus = list(pdu.p_data_tf(context, data, command=command, max_pdu=max_pdu))
    joined = b""
    for n, raw in enumerate(pdus):
        kind, _, length = struct.unpack(">BBI", raw[:6])
        assert kind == pdu.P_DATA_TF and length == len(raw) - 6 and length <= max_pdu
        (pdv,) = list(pdu.iter_pdvs(memoryview(raw)[6:]))
        assert pdv.context_id == context and pdv.command == command
        assert pdv.last == (n == len(pdus) - 1)
        joined += bytes(pdv.data)
    assert joined == data


@given(st.binary(max_size=20000), st.integers(2, 5000), st.lists(st.integers(0, 20000), max_size=12),
       st.booleans())
@settings(max_examples=200, deadline=None)
def test_fragments_over_pieces_are_the_same_pdus_as_over_the_whole(data: bytes, step: int, cuts: list[int],
                                                                   last: bool) -> None:
    # Any split of the data set into pieces (empty ones too) frames into the bytes p_data_tf gives for
    # the whole, PDU for PDU; not ``last``: only the final fragment's last bit differs.
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [memoryview(data)[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    framed = b"".join(pdu.p_data_fragments(3, pieces, step, last=last))
    expected = bytearray(b"".join(pdu.p_data_tf(3, data, command=False, max_pdu=step + 6)))
    if not last:
        if not data:
            expected = bytearray()
        else:
            control = len(expected) - (len(data) % step or step) - 1   # the final PDV's control byte
            assert expected[control] == 0x02
            expected[control] = 0x00
    assert framed == bytes(expected)


def test_a_gathered_send_survives_partial_writes() -> None:
    from gateway.dimse.fast.association import _send_gathered

    a, b = _pair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        buffers: list[bytes | memoryview] = [bytes([n % 251]) * (n * 37 % 3000) for n in range(1200)]
        expected = b"".join(buffers)
        got = bytearray()

        def drain() -> None:
            while len(got) < len(expected):
                got.extend(b.recv(777))

        reader = threading.Thread(target=drain)
        reader.start()
        a.settimeout(10)
        _send_gathered(a, [memoryview(x) for x in buffers])   # more buffers than one call takes
        reader.join(10)
        assert bytes(got) == expected


def test_several_pdvs_in_one_pdu() -> None:
    body = (struct.pack(">IBB", 5, 1, 0x03) + b"abc" + struct.pack(">IBB", 2, 3, 0x02)
            + struct.pack(">IBB", 4, 5, 0x00) + b"xy")
    assert [(p.context_id, p.command, p.last, bytes(p.data)) for p in pdu.iter_pdvs(memoryview(body))] == [
        (1, True, True, b"abc"), (3, False, True, b""), (5, False, False, b"xy")]


# --------------------------------------------------------------------------- interoperability with pynetdicom


def test_our_associate_rq_decodes_in_pynetdicom_and_theirs_in_ours() -> None:
    rq = pdu.AssociateRq("ORTHANC", "DICOMWEBGW", (
        pdu.PresentationContext(1, "1.2.840.10008.5.1.4.1.2.2.3", ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")),
        pdu.PresentationContext(3, "1.2.840.10008.5.1.4.1.1.2", ("1.2.840.10008.1.2.1",))),
        pdu.UserInformation(max_pdu=0, roles=(pdu.RoleSelection("1.2.840.10008.5.1.4.1.1.2", False, True),),
                            async_ops=(1, 1)))
    raw = pdu.encode(rq)
    theirs = PnRq()
    theirs.decode(raw)
    assert theirs.called_ae_title == "ORTHANC" and theirs.calling_ae_title == "DICOMWEBGW"
    contexts = theirs.presentation_context
    assert [(cx.context_id, str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax]) for cx in contexts] == [
        (1, "1.2.840.10008.5.1.4.1.2.2.3", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]),
        (3, "1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
    assert pdu.decode(pdu.A_ASSOCIATE_RQ, theirs.encode()[6:]) == rq


def test_a_pynetdicom_associate_ac_decodes() -> None:
    from pynetdicom import AE, build_context
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        MaximumLengthNotification,
        SCP_SCU_RoleSelectionNegotiation,
    )

    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdu.APPLICATION_CONTEXT
    primitive.calling_ae_title, primitive.called_ae_title = "DWG", "PACS"
    primitive.result = 0x00
    accepted = build_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    accepted.context_id, accepted.result = 3, 0
    refused = build_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    refused.context_id, refused.result = 5, 3
    primitive.presentation_context_definition_results_list = [accepted, refused]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = "1.2.840.10008.5.1.4.1.1.2", False, True
    primitive.user_information = [length, role]
    theirs = PnAc()
    theirs.from_primitive(primitive)
    ac = pdu.decode(pdu.A_ASSOCIATE_AC, theirs.encode()[6:])
    assert isinstance(ac, pdu.AssociateAc)
    assert ac.results == (pdu.ContextResult(3, 0, "1.2.840.10008.1.2.1"), pdu.ContextResult(5, 3, None))
    assert ac.user.max_pdu == 16384 and ac.user.roles == (pdu.RoleSelection("1.2.840.10008.5.1.4.1.1.2",
                                                                             False, True),)
    del AE


def test_command_sets_match_pynetdicom_byte_for_byte() -> None:
    ours = c.encode_command(c.c_find_rq(7, "1.2.840.10008.5.1.4.1.2.2.1"))
    theirs = C_FIND_RQ()
    from pynetdicom.dimse_primitives import C_FIND

    primitive = C_FIND()
    primitive.MessageID, primitive.AffectedSOPClassUID, primitive.Priority = 7, "1.2.840.10008.5.1.4.1.2.2.1", 0
    primitive.Identifier = __import__("io").BytesIO(b"\x00")
    theirs.primitive_to_message(primitive)
    decoded = c.decode_command(encode(theirs.command_set, True, True) or b"")
    assert decoded.command_field == c.C_FIND_RQ and decoded.message_id == 7 and decoded.has_data_set
    assert c.decode_command(ours) == c.Command(c.C_FIND_RQ, message_id=7, priority=0,
                                               affected_sop_class="1.2.840.10008.5.1.4.1.2.2.1",
                                               data_set_type=c.DATA_SET_PRESENT)


def test_a_pynetdicom_c_store_rq_with_move_originator_decodes() -> None:
    from pynetdicom.dimse_primitives import C_STORE

    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 3, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45"
    primitive.MoveOriginatorApplicationEntityTitle, primitive.MoveOriginatorMessageID = "DICOMWEBGW", 4711
    primitive.DataSet = __import__("io").BytesIO(b"\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = c.decode_command(encode(message.command_set, True, True) or b"")
    assert (command.message_id, command.priority, command.affected_sop_instance) == (3, 2, "1.2.3.45")
    assert (command.move_originator_ae, command.move_originator_id) == ("DICOMWEBGW", 4711)
    rsp = c.decode_command(c.encode_command(c.c_store_rsp(command, 0xA700)))
    assert (rsp.command_field, rsp.message_id_responded, rsp.status, rsp.has_data_set) == (
        c.C_STORE_RSP, 3, 0xA700, False)
    assert rsp.affected_sop_instance == "1.2.3.45"


# --------------------------------------------------------------------------- command round trips


@st.composite
def commands(draw: st.DrawFn) -> c.Command:
    command = c.Command(draw(st.sampled_from(sorted(c.NAMES))))
    for name in c.field_names():
        if not draw(st.booleans()):
            continue
        if name in ("affected_sop_class", "requested_sop_class", "affected_sop_instance",
                    "requested_sop_instance"):
            value: object = draw(uids)
        elif name in ("move_destination", "move_originator_ae"):
            value = draw(aes)
        elif name == "error_comment":
            value = draw(st.text(alphabet="abc XYZ.-", max_size=64).map(str.strip))
        elif name == "offending_element":
            value = tuple(draw(st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=3)))
        else:
            value = draw(ushort)
        setattr(command, name, value)
    if command.data_set_type is None:
        command.data_set_type = c.NO_DATA_SET
    command.extra = draw(st.dictionaries(st.sampled_from([0x0005, 0x0850, 0x5000]),
                                         st.binary(max_size=8).map(lambda b: b + b"\0" * (len(b) % 2)),
                                         max_size=2))
    return command


@given(commands())
@settings(max_examples=300, deadline=None)
def test_commands_round_trip(command: c.Command) -> None:
    raw = c.encode_command(command)
    group_length = struct.unpack_from("<I", raw, 8)[0]
    assert group_length == len(raw) - 12
    assert c.decode_command(raw) == command


@pytest.mark.parametrize("syntax", sorted(c.IDENTIFIER_SYNTAXES))
def test_identifiers_round_trip_in_every_syntax(syntax: str) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = "1.2.3"
    ds.SOPInstanceUID = ["1.2.3.4", "1.2.3.5"]
    ds.PatientName = "Doe^J"
    ds.NumberOfStudyRelatedInstances = 12
    back = c.decode_identifier(c.encode_identifier(ds, syntax), syntax)
    assert back == ds
    reference = encode(ds, syntax == c.IMPLICIT_VR_LE, syntax != c.EXPLICIT_VR_BE,
                       syntax == c.DEFLATED_EXPLICIT_VR_LE)
    assert c.encode_identifier(ds, syntax) == reference


def test_part10_prefix_matches_pynetdicom_also_for_odd_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.config
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    # As the gateway runs (gateway.startup): odd values pass through without validation.
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)

    for sop in ("1.2.3.4", "1.2.3.45", "1.2.3.4 "):
        meta = encode_file_meta(create_file_meta(sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"),
                                                 sop_instance_uid=UID(sop),
                                                 transfer_syntax=UID("1.2.840.10008.1.2.1")))
        expected = b"\x00" * 128 + b"DICM" + meta
        assert part10_prefix("1.2.840.10008.5.1.4.1.1.2", sop, "1.2.840.10008.1.2.1") == expected
    assert part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4 ", "1.2.840.10008.1.2.1") is None


# --------------------------------------------------------------------------- malformed input


VALID_AC = pdu.encode(pdu.AssociateAc("A", "B", (pdu.ContextResult(1, 0, "1.2.840.10008.1.2"),)))


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_truncated_or_corrupted_associate_pdus_raise_protocol_error_only(data: st.DataObject) -> None:
    body = bytearray(VALID_AC[6:])
    cut = data.draw(st.integers(0, len(body)))
    mutated = body[:cut]
    for _ in range(data.draw(st.integers(0, 4))):
        if mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    try:
        pdu.decode(pdu.A_ASSOCIATE_AC, bytes(mutated))
    except pdu.ProtocolError:
        pass


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_escape_as_anything_but_protocol_error(raw: bytes) -> None:
    for kind in (pdu.A_ASSOCIATE_RQ, pdu.A_ASSOCIATE_AC, pdu.A_ABORT, pdu.A_ASSOCIATE_RJ):
        try:
            pdu.decode(kind, raw)
        except pdu.ProtocolError:
            pass
    try:
        list(pdu.iter_pdvs(memoryview(raw)))
    except pdu.ProtocolError:
        pass
    try:
        c.decode_command(raw)
    except pdu.ProtocolError:
        pass


@pytest.mark.parametrize("body, words", [
    (b"", "without a PDV"),
    (struct.pack(">IBB", 1, 1, 0), "PDV length 1"),
    (struct.pack(">IBB", 100, 1, 0) + b"xx", "PDV length 100"),
    (struct.pack(">IBB", 2, 2, 0), "even presentation context"),
    (b"\x00\x00\x00", "truncated PDV"),
])
def test_bad_pdvs(body: bytes, words: str) -> None:
    with pytest.raises(pdu.ProtocolError, match=words):
        list(pdu.iter_pdvs(memoryview(body)))


def test_associate_ac_without_user_information_or_accepted_syntax_is_refused() -> None:
    head = struct.pack(">HH", 1, 0) + b"A".ljust(16) + b"B".ljust(16) + b"\0" * 32
    app = struct.pack(">BBH", 0x10, 0, 21) + pdu.APPLICATION_CONTEXT.encode()
    with pytest.raises(pdu.ProtocolError, match="user information"):
        pdu.decode(pdu.A_ASSOCIATE_AC, head + app)
    accepted_without_syntax = struct.pack(">BBH", 0x21, 0, 4) + bytes((1, 0, 0, 0))
    with pytest.raises(pdu.ProtocolError, match="without a transfer syntax"):
        pdu.decode(pdu.A_ASSOCIATE_AC, head + app + accepted_without_syntax)


def test_command_set_problems() -> None:
    good = c.encode_command(c.c_echo_rq(1))
    with pytest.raises(pdu.ProtocolError, match="overruns"):
        c.decode_command(good[:-1])
    # DCMTK appends a final C-GET-RSP's Failed SOP Instance UID List to the command set: kept aside.
    failed_list = struct.pack("<HHI", 8, 0x58, 8) + b"1.2.3.4\0"
    assert c.decode_command(good + failed_list) == c.Command(c.C_ECHO_RQ, message_id=1, data_set_type=0x0101,
                                                             affected_sop_class="1.2.840.10008.1.1",
                                                             trailer=failed_list)
    with pytest.raises(pdu.ProtocolError, match="Command Field"):
        c.decode_command(struct.pack("<HHI", 0, 0x110, 2) + b"\x01\x00")
    with pytest.raises(pdu.ProtocolError, match="command set of"):
        c.decode_command(b"\0" * (c.MAX_COMMAND_SET + 1))
    with pytest.raises(pdu.ProtocolError, match="US element"):
        c.decode_command(struct.pack("<HHI", 0, 0x100, 3) + b"\x01\x00\x00")


def test_a_deflate_bomb_identifier_is_refused() -> None:
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(b"\0" * (c.MAX_IDENTIFIER + 10)) + compressor.flush()
    with pytest.raises(pdu.ProtocolError, match="inflates past"):
        c.decode_identifier(bomb, c.DEFLATED_EXPLICIT_VR_LE)


def test_encoder_refuses_what_the_standard_forbids() -> None:
    cx = pdu.PresentationContext(1, "1.2", ("1.2.840.10008.1.2",))
    with pytest.raises(ValueError, match="AE title"):
        pdu.encode(pdu.AssociateRq("A" * 17, "B", (cx,)))
    with pytest.raises(ValueError, match="presentation context"):
        pdu.encode(pdu.AssociateRq("A", "B", (pdu.PresentationContext(2, "1.2", ("1.2",)),)))
    with pytest.raises(ValueError, match="1..128"):
        pdu.encode(pdu.AssociateRq("A", "B", tuple(pdu.PresentationContext(1, "1.2", ("1.2",))
                                                   for _ in range(129))))
    with pytest.raises(ValueError, match="below"):
        list(pdu.p_data_tf(1, b"x", command=True, max_pdu=4))


# --------------------------------------------------------------------------- the reader


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def test_reader_reads_whole_pdus_across_partial_sends() -> None:
    a, b = _pair()
    with a, b:
        raw = b"".join(pdu.p_data_tf(1, b"z" * 70000, command=False, max_pdu=32768)) + pdu.encode(pdu.ReleaseRq())

        def trickle() -> None:
            for i in range(0, len(raw), 1000):
                b.sendall(raw[i:i + 1000])

        sender = threading.Thread(target=trickle)
        sender.start()
        reader = PduReader(a, max_length=32768, buffer_size=1024)
        got = b""
        for _ in range(3):
            kind, body = reader.read(5)
            assert kind == pdu.P_DATA_TF
            got += b"".join(bytes(p.data) for p in pdu.iter_pdvs(body))
        assert got == b"z" * 70000
        assert reader.read_control(5) == pdu.ReleaseRq()
        sender.join()


def test_reader_refuses_oversized_and_unknown_pdus_before_reading_them() -> None:
    a, b = _pair()
    with a, b:
        reader = PduReader(a, max_length=4096)
        b.sendall(struct.pack(">BBI", pdu.P_DATA_TF, 0, 4097))
        with pytest.raises(pdu.ProtocolError, match="exceeds the limit"):
            reader.read(1)
        b.sendall(struct.pack(">BBI", 0x09, 0, 4))
        with pytest.raises(pdu.ProtocolError, match="unknown PDU type"):
            reader.read(1)
    a, b = _pair()
    with a, b:
        reader = PduReader(a, max_length=0)   # unlimited: still the hard cap
        b.sendall(struct.pack(">BBI", pdu.P_DATA_TF, 0, 0xFFFFFFFF))
        with pytest.raises(pdu.ProtocolError, match="exceeds the limit"):
            reader.read(1)


def test_reader_timeouts_and_closed_connections() -> None:
    a, b = _pair()
    with a:
        reader = PduReader(a)
        assert reader.wait(0.05) is False
        with pytest.raises(pdu.ReadTimeout):
            reader.read(0.1)
        b.sendall(struct.pack(">BBI", pdu.A_RELEASE_RQ, 0, 4) + b"\0\0")   # 2 of 4 body bytes
        b.close()
        assert reader.wait(0.5) is True
        with pytest.raises(pdu.ConnectionClosed):
            reader.read(1)
    with pytest.raises(pdu.ProtocolError, match="unexpected P-DATA-TF"):
        a, b = _pair()
        with a, b:
            b.sendall(next(pdu.p_data_tf(1, b"x", command=True, max_pdu=0)))
            PduReader(a).read_control(1)


def test_reader_reads_ahead_and_sees_buffered_pdus_without_the_socket() -> None:
    """Read-ahead: one recv brings several PDUs; what is buffered counts as ready (no select),
    PDUs are returned whole and in order across buffer compaction and growth."""
    a, b = _pair()
    with a, b:
        pdus = [b"".join(pdu.p_data_tf(1, bytes([i]) * (1000 + 700 * i), command=False, max_pdu=0))
                for i in range(12)]
        b.sendall(b"".join(pdus) + pdu.encode(pdu.ReleaseRq()))
        reader = PduReader(a, max_length=0, buffer_size=4096)   # smaller than the later PDUs
        calls = 0
        real = a.recv_into

        class Counting:
            def __getattr__(self, name: str) -> object:
                return getattr(a, name)

            def recv_into(self, *args: object) -> int:
                nonlocal calls
                calls += 1
                return real(*args)   # type: ignore[arg-type]

        reader.sock = Counting()     # type: ignore[assignment]
        for i in range(12):
            kind, body = reader.read(5)
            assert kind == pdu.P_DATA_TF
            (pdv,) = pdu.iter_pdvs(body)
            assert bytes(pdv.data) == bytes([i]) * (1000 + 700 * i)
        assert reader.buffered() == 10 and reader.wait(0)       # the A-RELEASE-RQ, already here
        assert reader.read_control(5) == pdu.ReleaseRq()
        assert reader.buffered() == 0
        assert calls < 12, calls


def test_held_views_survive_later_reads() -> None:
    """PduReader.hold: the fragments of a data set stay views into what was received (no copy) and
    are never overwritten by later reads, however small the buffer; released, reading reuses it."""
    a, b = _pair()
    with a, b:
        chunks = [bytes([i]) * (3000 + 517 * i) for i in range(20)]
        b.sendall(b"".join(b"".join(pdu.p_data_tf(1, c, command=False, max_pdu=0)) for c in chunks)
                  + pdu.encode(pdu.ReleaseRq()))
        reader = PduReader(a, max_length=0, buffer_size=8192)
        reader.hold = True
        views = []
        for _ in chunks:
            _, body = reader.read(5)
            (pdv,) = pdu.iter_pdvs(body)
            views.append(pdv.data)
        assert [bytes(v) for v in views] == chunks
        reader.hold = False
        assert reader.read_control(5) == pdu.ReleaseRq()
