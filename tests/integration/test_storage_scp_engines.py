"""Both storage SCP engines (``gateway.scp_engine``: the plain-socket acceptor and pynetdicom's) against
real senders: DCMTK ``storescu`` (plain and ``+tls``), pynetdicom's SCU, a raw upper-layer client
built from the fast engine's own codec (exact A-ASSOCIATE-RJ values, an abort mid-instance, silence),
and C-MOVE from Orthanc and dcmqrscp through the gateway (WADO-RS on a ``retrieve: move`` node).

Every test runs once per engine: the two must accept, refuse and spool alike (docs/architecture.md,
"C-MOVE"). Arrivals go through a real :class:`cache.spool.Spool`, so "nothing partial in the spool"
is checked on disk.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cache.spool import Spool
from gateway.demo_data import DEMO_STUDIES
from gateway.dimse.fast import commands as cmd
from gateway.dimse.fast import pdu
from gateway.dimse.fast.acceptor import FastStorageScp
from gateway.dimse.fast.pdu_reader import PduReader
from gateway.dimse.storage_scp import AnyStorageScp, StorageScp
from gateway.pacs import PendingMove, RemoteMove
from gateway.settings import DimseTls, settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.server import running_gateway
from translators.uids import InstanceId

from .peers import HOST, PeerError, dcmtk_tool
from .test_dimse_tls import Pki, pki  # noqa: F401 - the throw-away PKI fixture

pytestmark = pytest.mark.integration

ENGINES = ["fast", "pynetdicom"]
OUR_AE = "DICOMWEBGW"
SENDER_AE = "SENDER"
CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
CT_AXIAL = CT["series"][1]
MR = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2206210031")
MR_RLE = next(s for s in MR["series"] if s["transfer_syntax_uid"] == "1.2.840.10008.1.2.5")
MF = next(s for s in DEMO_STUDIES if "OT" in s["modalities"])
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def sources(demo_files: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in demo_files}


def _files(sources: dict[str, Path], series: dict) -> list[Path]:
    return [sources[uid] for uid in series["sop_instance_uids"]]


@pytest.fixture(scope="module")
def jpeg_files(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One CT slice re-encoded by DCMTK: JPEG Lossless SV1 and JPEG-LS lossless (new SOP UIDs, so they
    are told apart from the native slice)."""
    out = tmp_path_factory.mktemp("jpeg")
    source = _files(sources, CT_AXIAL)[0]
    made: dict[str, Path] = {}
    for tool, syntax in (("dcmcjpeg", JPEG_LOSSLESS_SV1), ("dcmcjpls", JPEG_LS_LOSSLESS)):
        target = out / f"{tool}.dcm"
        done = subprocess.run([dcmtk_tool(tool), str(source), str(target)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise PeerError(f"{tool} failed: {done.stderr[-500:]}")
        ds = dcmread(target)
        assert str(ds.file_meta.TransferSyntaxUID) == syntax
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.{len(made) + 7}"
        ds.save_as(target)
        made[syntax] = target
    return made


@dataclass
class Destination:
    """A started SCP of one engine, its spool, and what reached ``on_instance``."""

    scp: AnyStorageScp
    spool: Spool
    received: dict[str, tuple[bytes, str, str]] = field(default_factory=dict)   # sop -> (part10, cls, ts)

    @property
    def port(self) -> int:
        return self.scp.port

    def expect(self, msg_id: int, study: str, series: str | None, uids: set[str] | None) -> PendingMove:
        """Register a pending move that spools what it is given (as the retrieval's fetcher does)."""

        def on_instance(data: bytes, sop: str, cls: str, ts: str) -> None:
            self.spool.write(data, _instance_id(study, series, sop), sop_class_uid=cls, transfer_syntax=ts)
            self.received[sop] = (data, cls, ts)

        move = PendingMove(msg_id, study, series, uids, on_instance)
        self.scp.register(move)
        return move

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.rglob("*.dcm"))

    def partial(self) -> list[Path]:
        return sorted(p for p in self.spool.tmp.iterdir())


def _instance_id(study: str, series: str | None, sop: str) -> InstanceId:
    return InstanceId("n", study, series or "1.2.3", sop)


@contextmanager
def destination(engine: str, tmp_path: Path, **kwargs: object) -> Iterator[Destination]:
    kind = FastStorageScp if engine == "fast" else StorageScp
    options: dict = {"calling_ae_titles": (SENDER_AE,), **kwargs}
    scp = kind(OUR_AE, HOST, 0, **options)
    spool = Spool(tmp_path / f"spool-{engine}", 1 << 30)
    scp.start()
    try:
        yield Destination(scp, spool)
    finally:
        scp.stop()
        spool.close()


def _storescu(port: int, files: list[Path], *extra: str, calling: str = SENDER_AE,
              called: str = OUR_AE) -> subprocess.CompletedProcess[str]:
    argv = [dcmtk_tool("storescu"), "-aet", calling, "-aec", called, "-R", *extra, HOST, str(port),
            *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _dataset_bytes(path: Path, syntax: str) -> bytes:
    """The data set of ``path`` encoded in a native ``syntax`` (what an SCU sends for it)."""
    ds = dcmread(path)
    fp = DicomBytesIO()
    fp.is_implicit_VR = syntax == IMPLICIT
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


def _check_arrival(dest: Destination, sop: str, source: Path, syntax: str) -> None:
    """The spooled file is a valid Part-10 file: our header, the sender's data set, the context's syntax."""
    data, cls, ts = dest.received[sop]
    assert ts == syntax
    got, want = dcmread(BytesIO(data)), dcmread(source)
    assert str(got.file_meta.TransferSyntaxUID) == syntax
    assert str(got.file_meta.MediaStorageSOPInstanceUID) == sop == str(got.SOPInstanceUID)
    assert str(got.file_meta.MediaStorageSOPClassUID) == cls == str(want.SOPClassUID)
    assert got.PixelData == want.PixelData
    assert got.get("NumberOfFrames") == want.get("NumberOfFrames")
    path = dest.spool.get("n", sop)
    assert path is not None and path.path.read_bytes() == data


# ----------------------------------------------------------------------------- DCMTK storescu


def test_storescu_native_rle_and_multiframe(engine: str, tmp_path: Path, sources: dict[str, Path]) -> None:
    """storescu sends no Move Originator Message ID: the arrivals are routed by their expected UIDs."""
    native, rle, multi = _files(sources, CT_AXIAL)[:5], _files(sources, MR_RLE)[:4], _files(sources, MF["series"][0])
    with destination(engine, tmp_path) as dest:
        for msg_id, (series, files) in enumerate(((CT_AXIAL, native), (MR_RLE, rle), (MF["series"][0], multi))):
            uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
            dest.expect(msg_id + 1, "1.2.3.4", series["series_uid"], uids)
        done = _storescu(dest.port, native + multi)
        assert done.returncode == 0, done.stderr
        done = _storescu(dest.port, rle, "-xr")
        assert done.returncode == 0, done.stderr
        for path in native + multi:
            _check_arrival(dest, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), path, EXPLICIT)
        for path in rle:
            _check_arrival(dest, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), path, RLE)
        assert len(dest.spooled()) == len(native + rle + multi) and dest.partial() == []
        assert dest.scp.unexpected == 0


def test_storescu_jpeg_syntaxes_arrive_as_sent(engine: str, tmp_path: Path, jpeg_files: dict[str, Path]) -> None:
    with destination(engine, tmp_path) as dest:
        uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in jpeg_files.values()}
        dest.expect(1, "1.2.3.4", None, uids)
        for syntax, option in ((JPEG_LOSSLESS_SV1, "-xs"), (JPEG_LS_LOSSLESS, "-xt")):
            done = _storescu(dest.port, [jpeg_files[syntax]], option)
            assert done.returncode == 0, done.stderr
            sop = str(dcmread(jpeg_files[syntax], stop_before_pixels=True).SOPInstanceUID)
            _check_arrival(dest, sop, jpeg_files[syntax], syntax)


def test_storescu_with_wrong_called_or_unknown_calling_ae_is_rejected(engine: str, tmp_path: Path,
                                                                       sources: dict[str, Path]) -> None:
    files = _files(sources, CT_AXIAL)[:1]
    with destination(engine, tmp_path) as dest:
        dest.expect(1, "1.2.3.4", None, {str(dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)})
        wrong_called = _storescu(dest.port, files, called="SOMEONEELSE")
        assert wrong_called.returncode != 0
        assert "Called AE Title Not Recognized" in wrong_called.stderr, wrong_called.stderr
        stranger = _storescu(dest.port, files, calling="INTRUDER")
        assert stranger.returncode != 0
        assert "Calling AE Title Not Recognized" in stranger.stderr, stranger.stderr
        assert dest.received == {} and dest.spooled() == []


# ----------------------------------------------------------------------------- pynetdicom SCU


def _pynetdicom_sender(port: int, calling: str = SENDER_AE):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.requested_contexts = StoragePresentationContexts[:126]
    ae.add_requested_context(Verification)
    ae.add_requested_context(MR_RLE["sop_class_uid"], [RLE])
    return ae.associate(HOST, port, ae_title=OUR_AE)


def test_pynetdicom_scu_echo_and_stores_routed_by_message_id(engine: str, tmp_path: Path,
                                                             sources: dict[str, Path]) -> None:
    files = _files(sources, CT_AXIAL)[:6] + _files(sources, MF["series"][0]) + _files(sources, MR_RLE)[:2]
    with destination(engine, tmp_path) as dest:
        # Expected list None: only the Move Originator Message ID routes these (no UID fallback).
        dest.expect(41, "1.9.9", None, None)
        assoc = _pynetdicom_sender(dest.port)
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0x0000
            for path in files:
                status = assoc.send_c_store(dcmread(path), originator_aet=OUR_AE, originator_id=41)
                assert status.Status == 0x0000
        finally:
            assoc.release()
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            _check_arrival(dest, str(ds.SOPInstanceUID), path, str(ds.file_meta.TransferSyntaxUID))


def test_open_move_is_matched_by_study_and_series(engine: str, tmp_path: Path, sources: dict[str, Path]) -> None:
    """A move expecting no list and a PACS sending no originator: the data set's study/series decide."""
    files = _files(sources, CT_AXIAL)[:2]
    other = _files(sources, MR_RLE)[:1]
    with destination(engine, tmp_path) as dest:
        dest.expect(5, CT["study_uid"], CT_AXIAL["series_uid"], None)
        assoc = _pynetdicom_sender(dest.port)
        try:
            assert [assoc.send_c_store(dcmread(p)).Status for p in files] == [0, 0]
            assert assoc.send_c_store(dcmread(other[0])).Status == 0x0124
        finally:
            assoc.release()
        assert set(dest.received) == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        assert dest.scp.unexpected == 1


def test_engines_spool_identical_bytes(tmp_path: Path, sources: dict[str, Path]) -> None:
    """The same C-STOREs into each engine give byte-identical Part-10 files."""
    files = _files(sources, CT_AXIAL)[:3] + _files(sources, MR_RLE)[:1] + _files(sources, MF["series"][0])
    got: dict[str, dict[str, bytes]] = {}
    for engine in ENGINES:
        with destination(engine, tmp_path) as dest:
            dest.expect(3, "1.9.9", None, None)
            assoc = _pynetdicom_sender(dest.port)
            try:
                for path in files:
                    assert assoc.send_c_store(dcmread(path), originator_id=3).Status == 0
            finally:
                assoc.release()
            got[engine] = {sop: data for sop, (data, _, _) in dest.received.items()}
    assert len(got["fast"]) == len(files)
    assert got["fast"] == got["pynetdicom"]


def test_unexpected_and_duplicate_stores_are_refused(engine: str, tmp_path: Path,
                                                     sources: dict[str, Path]) -> None:
    first, second = _files(sources, CT_AXIAL)[:2]
    first_uid = str(dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    with destination(engine, tmp_path) as dest:
        assoc = _pynetdicom_sender(dest.port)
        try:
            assert assoc.send_c_store(dcmread(first), originator_id=9).Status == 0x0124, "nothing pending"
            dest.expect(9, "1.9.9", None, {first_uid})
            assert assoc.send_c_store(dcmread(second), originator_id=9).Status == 0x0124, "not expected"
            assert assoc.send_c_store(dcmread(first), originator_id=9).Status == 0x0000
            assert assoc.send_c_store(dcmread(first), originator_id=9).Status == 0x0124, "no overwrite"
        finally:
            assoc.release()
        assert dest.scp.unexpected == 3
        assert [p.name for p in dest.spooled()] == [f"{first_uid}.dcm"]
    with destination(engine, tmp_path, reject_unexpected=False) as dest:
        assoc = _pynetdicom_sender(dest.port)
        try:
            assert assoc.send_c_store(dcmread(first)).Status == 0xA700
        finally:
            assoc.release()


def test_another_replicas_move_is_spooled_and_announced(engine: str, tmp_path: Path,
                                                        sources: dict[str, Path]) -> None:
    """No local move: the Message ID is looked up on the event loop (cluster), written, announced."""
    path = _files(sources, CT_AXIAL)[0]
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    written: list[tuple[int, str]] = []
    announced: list[str] = []
    asked: list[tuple[int, str]] = []

    async def announce(uid: str, cls: str, ts: str) -> None:
        announced.append(uid)

    async def lookup(msg_id: int, uid: str) -> RemoteMove | None:
        asked.append((msg_id, uid))
        if msg_id != 77:
            return None
        return RemoteMove(write=lambda data, uid, cls, ts: written.append((len(data), uid)), announce=announce)

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        with destination(engine, tmp_path) as dest:
            dest.scp.attach_cluster(loop, lookup)
            assoc = _pynetdicom_sender(dest.port)
            try:
                assert assoc.send_c_store(dcmread(path), originator_id=77).Status == 0x0000
                assert assoc.send_c_store(dcmread(path), originator_id=78).Status == 0x0124
            finally:
                assoc.release()
            assert dest.scp.remote_stores == 1 and dest.scp.unexpected == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
    assert asked == [(77, sop), (78, sop)]
    assert [uid for _, uid in written] == [sop] and written[0][0] > path.stat().st_size // 2
    assert announced == [sop]


# ----------------------------------------------------------------------------- raw upper layer


def _raw_rq(port: int, *, calling: str = SENDER_AE, called: str = OUR_AE,
            contexts: tuple[pdu.PresentationContext, ...] = (pdu.PresentationContext(1, CT_IMAGE, (EXPLICIT,)),),
            ) -> tuple[socket.socket, PduReader, pdu.ControlPdu]:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(pdu.encode(pdu.AssociateRq(called, calling, contexts, pdu.UserInformation(max_pdu=16384))))
    reader = PduReader(sock)
    return sock, reader, reader.read_control(10)


def test_rejections_carry_the_ps38_result_source_and_reason(engine: str, tmp_path: Path) -> None:
    with destination(engine, tmp_path) as dest:
        for kwargs, expected in (({"called": "NOTUS"}, (1, 1, 7)), ({"calling": "INTRUDER"}, (1, 1, 3))):
            sock, _, answer = _raw_rq(dest.port, **kwargs)
            sock.close()
            assert isinstance(answer, pdu.AssociateRj), answer
            assert (answer.result, answer.source, answer.reason) == expected


def test_context_negotiation_prefers_our_order(engine: str, tmp_path: Path) -> None:
    """Native first (Explicit before Implicit) unless a retry switched to compressed first; a class we
    do not store is result 3, a syntax we do not know result 4."""
    contexts = (pdu.PresentationContext(1, CT_IMAGE, (IMPLICIT, RLE, EXPLICIT)),
                pdu.PresentationContext(3, "1.2.3.4.5.6", (EXPLICIT,)),
                pdu.PresentationContext(5, CT_IMAGE, ("1.2.3.999",)),
                pdu.PresentationContext(7, "1.2.840.10008.1.1", (IMPLICIT,)))
    with destination(engine, tmp_path) as dest:
        sock, _, answer = _raw_rq(dest.port, contexts=contexts)
        sock.close()
        assert isinstance(answer, pdu.AssociateAc)
        got = {r.id: (r.result, r.transfer_syntax) for r in answer.results}
        assert got == {1: (0, EXPLICIT), 3: (3, None), 5: (4, None), 7: (0, IMPLICIT)}
        dest.scp.prefer_compressed(True)
        sock, _, answer = _raw_rq(dest.port, contexts=contexts)
        sock.close()
        dest.scp.prefer_compressed(False)
        assert isinstance(answer, pdu.AssociateAc)
        assert answer.results[0].transfer_syntax == RLE
        sock, _, answer = _raw_rq(dest.port, contexts=contexts)
        sock.close()
        assert isinstance(answer, pdu.AssociateAc) and answer.results[0].transfer_syntax == EXPLICIT


def test_peer_abort_mid_instance_leaves_nothing_in_the_spool(engine: str, tmp_path: Path,
                                                             sources: dict[str, Path]) -> None:
    path = _files(sources, CT_AXIAL)[0]
    ds = dcmread(path, stop_before_pixels=True)
    sop = str(ds.SOPInstanceUID)
    with destination(engine, tmp_path) as dest:
        dest.expect(12, "1.9.9", None, {sop})
        sock, _, answer = _raw_rq(dest.port)
        assert isinstance(answer, pdu.AssociateAc) and answer.results[0].accepted
        request = cmd.c_store_rq(1, CT_IMAGE, sop, move_originator_ae=OUR_AE, move_originator_id=12)
        for part in pdu.p_data_tf(1, cmd.encode_command(request), command=True, max_pdu=16384):
            sock.sendall(part)
        fragments = list(pdu.p_data_tf(1, _dataset_bytes(path, EXPLICIT), command=False, max_pdu=4096))
        assert len(fragments) > 4
        for part in fragments[: len(fragments) // 2]:
            sock.sendall(part)
        time.sleep(0.3)
        sock.sendall(pdu.encode(pdu.Abort()))
        sock.close()
        time.sleep(0.5)
        assert dest.received == {} and dest.spooled() == [] and dest.partial() == []
        # The SCP lives on: the whole instance, sent again, arrives.
        assoc = _pynetdicom_sender(dest.port)
        try:
            assert assoc.send_c_store(dcmread(path), originator_id=12).Status == 0x0000
        finally:
            assoc.release()
        assert [p.name for p in dest.spooled()] == [f"{sop}.dcm"]


def test_artim_closes_a_silent_connection(engine: str, tmp_path: Path) -> None:
    """Connect and send nothing: the ARTIM timer (acse_timeout) closes the connection (PS3.8 9.1.5)."""
    with destination(engine, tmp_path, acse_timeout=1.0) as dest:
        started = time.monotonic()
        with socket.create_connection((HOST, dest.port), timeout=10) as sock:
            try:
                data = sock.recv(64)
            except ConnectionResetError:
                data = b""
        elapsed = time.monotonic() - started
        assert data == b""
        assert 0.8 < elapsed < 5, f"closed after {elapsed:.1f} s"
        # And a real association afterwards still works.
        assoc = _pynetdicom_sender(dest.port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()


@pytest.mark.parametrize("bad", ["unaccepted context", "data set without command", "unserved command"])
def test_protocol_errors_are_answered_with_an_abort(bad: str, tmp_path: Path) -> None:
    """The fast engine's state machine (pynetdicom's reacts to these in its own ways)."""
    with destination("fast", tmp_path) as dest:
        sock, reader, answer = _raw_rq(dest.port)
        with sock:
            assert isinstance(answer, pdu.AssociateAc)
            if bad == "unaccepted context":
                message = pdu.p_data_tf(3, cmd.encode_command(cmd.c_echo_rq(1)), command=True, max_pdu=0)
            elif bad == "data set without command":
                message = pdu.p_data_tf(1, b"\x08\x00\x16\x00\x00\x00\x00\x00", command=False, max_pdu=0)
            else:
                message = pdu.p_data_tf(1, cmd.encode_command(cmd.c_find_rq(1, CT_IMAGE)), command=True, max_pdu=0)
            sock.sendall(b"".join(message))
            assert reader.read_control(10) == pdu.Abort(pdu.ABORT_SERVICE_PROVIDER, pdu.ABORT_INVALID_PARAMETER)
        assoc = _pynetdicom_sender(dest.port)
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()


def test_network_timeout_aborts_a_silent_association(engine: str, tmp_path: Path) -> None:
    with destination(engine, tmp_path, network_timeout=1.0) as dest:
        sock, reader, answer = _raw_rq(dest.port)
        with sock:
            assert isinstance(answer, pdu.AssociateAc)
            started = time.monotonic()
            try:
                last = reader.read_control(10)
            except pdu.ConnectionClosed:
                last = None
            elapsed = time.monotonic() - started
        assert last is None or isinstance(last, pdu.Abort), last
        assert 0.8 < elapsed < 5, f"aborted after {elapsed:.1f} s"


def test_association_limit_is_a_transient_rejection(engine: str, tmp_path: Path) -> None:
    with destination(engine, tmp_path, max_associations=1) as dest:
        first, _, answer = _raw_rq(dest.port)
        with first:
            assert isinstance(answer, pdu.AssociateAc)
            second, _, refused = _raw_rq(dest.port)
            second.close()
            assert refused == pdu.AssociateRj(2, 3, 2), "local limit exceeded"
            first.sendall(pdu.encode(pdu.ReleaseRq()))
            assert isinstance(PduReader(first).read_control(10), pdu.ReleaseRp)
        deadline = time.monotonic() + 5
        answer: pdu.ControlPdu | None = None
        while True:   # the slot is free again once the first association's thread has ended
            try:
                sock, _, answer = _raw_rq(dest.port)
                sock.close()
            except (pdu.ConnectionClosed, OSError):
                # Until the threads of the first two connections have ended, a third is past the
                # acceptor's flood guard (2 x max_associations connections): closed unanswered.
                answer = None
            if isinstance(answer, pdu.AssociateAc) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert isinstance(answer, pdu.AssociateAc)


# ----------------------------------------------------------------------------- TLS


def test_storescu_over_tls(engine: str, tmp_path: Path, pki: Pki, sources: dict[str, Path]) -> None:  # noqa: F811
    """``storescu +tls`` with a client certificate of the trusted CA gets in; plain TCP and a client
    without a certificate do not (require_client_cert)."""
    tls = DimseTls(enabled=True, cert_file=str(pki.gateway[0]), key_file=str(pki.gateway[1]),
                   ca_file=str(pki.ca), require_client_cert=True)
    files = _files(sources, CT_AXIAL)[:3]
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    with destination(engine, tmp_path, tls=tls) as dest:
        dest.expect(1, "1.9.9", None, uids)
        plain = _storescu(dest.port, files[:1])
        assert plain.returncode != 0
        anonymous = _storescu(dest.port, files[:1], "+tla", "+cf", str(pki.ca))
        assert anonymous.returncode != 0
        assert dest.received == {}
        secure = _storescu(dest.port, files, "+tls", str(pki.peer[1]), str(pki.peer[0]), "+cf", str(pki.ca))
        assert secure.returncode == 0, secure.stderr
        assert set(dest.received) == uids
        for path in files:
            _check_arrival(dest, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), path, EXPLICIT)


# ----------------------------------------------------------------------------- C-MOVE via the gateway


@pytest.mark.parametrize("peer_name", ["orthanc", "dcmqrscp"])
def test_c_move_through_the_gateway(engine: str, peer_name: str, request: pytest.FixtureRequest,
                                    gateway_scp_port: int, sources: dict[str, Path], tmp_path: Path) -> None:
    """WADO-RS on a ``retrieve: move`` node: the PACS's sub-operations arrive at the engine's SCP."""
    peer = request.getfixturevalue(peer_name)
    settings = settings_from_dict({
        "gateway": {"ae_title": OUR_AE, "dimse_port": gateway_scp_port, "dimse_host": HOST, "scp_engine": engine},
        "spool": {"path": str(tmp_path / "spool")},
        "nodes": [{"name": "pacs", "ae_title": peer.ae_title, "host": HOST, "port": peer.dicom_port,
                   "retrieve": "move", "timeouts": {"connect": 3, "acse": 5, "dimse": 30, "network": 60}}],
    })
    with running_gateway(settings) as url, httpx.Client(base_url=url + "/nodes/pacs/dicom-web", timeout=60) as gw:
        for study, series in ((CT, CT_AXIAL), (MR, MR_RLE), (MF, MF["series"][0])):
            r = gw.get(f"/studies/{study['study_uid']}/series/{series['series_uid']}",
                       headers={"Accept": DICOM_ANY})
            assert r.status_code == 200, r.text
            parts = parse_multipart(r.content, r.headers["content-type"])
            got = {}
            for _, body in parts:
                ds = dcmread(BytesIO(body))
                got[str(ds.SOPInstanceUID)] = ds
            assert set(got) == set(series["sop_instance_uids"])
            for sop, ds in got.items():
                want = dcmread(sources[sop])
                assert str(ds.file_meta.TransferSyntaxUID) == str(want.file_meta.TransferSyntaxUID)
                assert ds.PixelData == want.PixelData
        metrics = httpx.get(url + "/metrics").text
        assert "dwg_unexpected_stores_total 0\n" in metrics
        # The configured engine is the one listening (the fast acceptor's accept thread has a name).
        accepting = any(t.name == "dwg-scp-accept" for t in threading.enumerate())
        assert accepting == (engine == "fast")


def test_gateway_builds_the_configured_engine(engine: str, tmp_path: Path) -> None:
    from gateway.dimse.storage_scp import storage_scp

    settings = settings_from_dict({"gateway": {"scp_engine": engine, "dimse_port": 0},
                                   "nodes": [{"name": "p", "ae_title": "PACS", "host": HOST, "port": 104,
                                              "retrieve": "move"}]})
    scp = storage_scp(settings)
    assert isinstance(scp, FastStorageScp if engine == "fast" else StorageScp)
    # Left out, scp_engine follows gateway.dimse_engine (one switch for the whole DIMSE edge).
    other = "pynetdicom" if engine == "fast" else "fast"
    follows = settings_from_dict({"gateway": {"dimse_engine": other},
                                  "nodes": [{"name": "p", "ae_title": "PACS", "host": HOST, "port": 104}]})
    assert follows.gateway.scp_engine == other
    scp.start()
    try:
        ae = AE("PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate(HOST, scp.port, ae_title=OUR_AE)
        assert assoc.is_established, "the configured node's AE title is let in"
        assoc.release()
        assert _raw_rq(scp.port)[2] == pdu.AssociateRj(1, 1, 3), "others are not"
    finally:
        scp.stop()
