"""One conformance suite for both DIMSE engines (``fast`` and ``pynetdicom``), through the ``Pacs``
interface the services use (docs/architecture.md, "DIMSE edge").

Peers: Orthanc and dcmqrscp loaded with the demo data (session fixtures), Orthanc with compressed
instances (the codecs of test_wado_compressed), Orthanc over DICOM TLS (test_dimse_tls's PKI), and
in-process pynetdicom SCPs for what real PACS do rarely: aborting or dropping the connection mid
C-GET, refusing every context, rejecting our AE title, never answering.

Every retrieved file is checked byte for byte: its Part-10 header is the one both engines write
(gateway.dimse.part10), and its data set is the source's bytes whenever the PACS sent it in the
source's transfer syntax; so both engines deliver identical files.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.dimse.pacs import PynetdicomPacs
from gateway.dimse.part10 import part10_header
from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    DimseTimeout,
    NodeUnreachable,
    PacsError,
)
from gateway.pacs import FindResult, NotRequested, RetrieveOutcome, RetrieveRequest, StoreItem
from gateway.settings import DIMSE_ENGINE_ENV, PacsNode, settings_from_dict

from .peers import HOST, DcmqrscpPeer, OrthancPeer, free_port
from .test_dimse_tls import orthanc_tls, pki, scp_port  # noqa: F401 - fixtures shared with the TLS suite
from .test_wado_compressed import CODECS, compressed  # noqa: F401 - the codec fixture
from .test_wado_compressed import ROOT as CODEC_ROOT

pytestmark = pytest.mark.integration

ENGINES = ["fast", "pynetdicom"]
CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
MR = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2206210031")
MF = next(s for s in DEMO_STUDIES if "OT" in s["modalities"])
CR = next(s for s in DEMO_STUDIES if s["modalities"] == ["CR"])
TIMEOUTS = {"connect": 3, "acse": 5, "dimse": 20, "network": 30}
GATEWAY_AE = "DICOMWEBGW"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
T = TypeVar("T")


# ----------------------------------------------------------------------------- helpers


def node(name: str, ae_title: str, port: int, engine: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": name, "ae_title": ae_title, "host": HOST, "port": port, "engine": engine,
                           "timeouts": dict(TIMEOUTS)}
    cfg.update(extra)
    return cfg


def with_pacs(cfg: dict[str, Any], work: Callable[[PynetdicomPacs, PacsNode], Awaitable[T]]) -> T:
    """``work(pacs, node)`` on a fresh PynetdicomPacs (both engines live behind it) in a fresh loop."""
    settings = settings_from_dict({"gateway": {"ae_title": GATEWAY_AE}, "nodes": [cfg]})

    async def main() -> T:
        pacs = PynetdicomPacs(settings)
        try:
            return await work(pacs, settings.nodes[0])
        finally:
            await pacs.close()

    return asyncio.run(main())


def find(cfg: dict[str, Any], **keys: Any) -> FindResult:
    ident = Dataset()
    for keyword, value in keys.items():
        setattr(ident, keyword, value)
    return with_pacs(cfg, lambda pacs, n: pacs.find(n, ident))


def get(cfg: dict[str, Any], request: RetrieveRequest, on_instance: Callable[..., None] | None = None,
        cancel: threading.Event | None = None) -> tuple[RetrieveOutcome, dict[str, tuple[bytes, str]]]:
    """C-GET; returns the outcome and {SOP Instance UID: (Part-10 bytes, transfer syntax)}."""
    files: dict[str, tuple[bytes, str]] = {}

    def store(data: bytes, sop: str, cls: str, ts: str) -> None:
        if on_instance is not None:
            on_instance(data, sop, cls, ts)
        files[sop] = (data, ts)

    outcome = with_pacs(cfg, lambda pacs, n: pacs.get(n, request, store, cancel or threading.Event()))
    return outcome, files


def data_set_of(part10: bytes) -> bytes:
    """The bytes after the File Meta Information (PS3.10 §7.1)."""
    assert part10[128:132] == b"DICM"
    (group_length,) = struct.unpack_from("<I", part10, 132 + 8)
    return part10[132 + 12 + group_length:]


def check_file(part10: bytes, ts: str, source: bytes) -> bool:
    """Header as both engines write it; data set byte-identical to the source's when sent in its
    syntax (returns whether the bytes were compared), else equal to it."""
    ds = dcmread(BytesIO(part10))
    header = part10_header(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts)
    assert header is not None and part10.startswith(header)
    source_ds = dcmread(BytesIO(source))
    if str(source_ds.file_meta.TransferSyntaxUID) == ts:
        assert data_set_of(part10) == data_set_of(source), f"{ds.SOPInstanceUID}: data set bytes differ"
        return True
    assert ds == source_ds or ds.PixelData == source_ds.PixelData
    return False


@pytest.fixture(scope="module")
def sources(demo_files: list[Path]) -> dict[str, bytes]:
    """SOP Instance UID -> the Part-10 bytes the peers were loaded with."""
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes() for p in demo_files}


def expect(error: type[PacsError], call: Callable[[], object], *words: str, within: float | None = None) -> PacsError:
    started = time.monotonic()
    with pytest.raises(error) as info:
        call()
    elapsed = time.monotonic() - started
    assert info.value.node == "p", info.value.detail
    for word in words:
        assert word in info.value.detail, info.value.detail
    if within is not None:
        assert elapsed < within, f"{elapsed:.1f} s"
    return info.value


# ----------------------------------------------------------------------------- settings


def test_engine_setting_defaults_to_fast_and_is_overridable(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"name": "p", "ae_title": "P", "host": HOST, "port": 104}
    monkeypatch.delenv(DIMSE_ENGINE_ENV, raising=False)
    assert settings_from_dict({"nodes": [base]}).nodes[0].engine == "fast"
    assert settings_from_dict({"gateway": {"dimse_engine": "pynetdicom"},
                               "nodes": [base, dict(base, name="q", engine="fast")]}).nodes[1].engine == "fast"
    monkeypatch.setenv(DIMSE_ENGINE_ENV, "pynetdicom")
    settings = settings_from_dict({"nodes": [base]})
    assert settings.nodes[0].engine == "pynetdicom" and settings.gateway.dimse_engine == "pynetdicom"
    monkeypatch.setenv(DIMSE_ENGINE_ENV, "slow")
    with pytest.raises(ValueError, match="GATEWAY_GATEWAY__DIMSE_ENGINE"):
        settings_from_dict({"nodes": [base]})


# ----------------------------------------------------------------------------- C-ECHO, C-FIND


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("peer_name", ["orthanc", "dcmqrscp"])
def test_echo_and_find_at_every_level(request: pytest.FixtureRequest, peer_name: str, engine: str) -> None:
    peer = request.getfixturevalue(peer_name)
    cfg = node("p", peer.ae_title, peer.dicom_port, engine)

    async def scenario(pacs: PynetdicomPacs, n: PacsNode) -> None:
        assert 0 < await pacs.echo(n) < 5
        study = Dataset()
        study.QueryRetrieveLevel, study.StudyInstanceUID, study.AccessionNumber = "STUDY", "", ""
        found = await pacs.find(n, study)
        assert {str(d.StudyInstanceUID) for d in found.datasets} >= {s["study_uid"] for s in DEMO_STUDIES}
        assert not found.truncated
        series = Dataset()
        series.QueryRetrieveLevel, series.StudyInstanceUID, series.SeriesInstanceUID = "SERIES", MR["study_uid"], ""
        series.Modality = ""
        found = await pacs.find(n, series)
        assert {str(d.SeriesInstanceUID) for d in found.datasets} == {s["series_uid"] for s in MR["series"]}
        image = Dataset()
        image.QueryRetrieveLevel, image.StudyInstanceUID = "IMAGE", CT["study_uid"]
        image.SeriesInstanceUID, image.SOPInstanceUID = CT["series"][1]["series_uid"], ""
        found = await pacs.find(n, image)
        assert sorted(str(d.SOPInstanceUID) for d in found.datasets) == sorted(CT["series"][1]["sop_instance_uids"])
        # one query association served all of it
        assert pacs.query_associations_opened(n) == 1

    with_pacs(cfg, scenario)


def test_find_results_are_equal_between_engines(orthanc: OrthancPeer) -> None:
    keys = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": MR["study_uid"], "SeriesInstanceUID": "",
            "SOPInstanceUID": "", "InstanceNumber": "", "PatientName": "", "Rows": None}
    mine = find(node("p", orthanc.ae_title, orthanc.dicom_port, "fast"), **keys)
    other = find(node("p", orthanc.ae_title, orthanc.dicom_port, "pynetdicom"), **keys)
    by_uid = {str(d.SOPInstanceUID): d for d in other.datasets}
    assert len(mine.datasets) == MR["num_instances"] == len(by_uid)
    for ds in mine.datasets:
        assert ds == by_uid[str(ds.SOPInstanceUID)]


@pytest.mark.parametrize("engine", ENGINES)
def test_find_cap_sends_one_c_cancel_and_truncates(engine: str) -> None:
    with DemoPacs(generate_demo_datasets(), ae_title="CAP", find_delay=0.05) as capped:
        cfg = node("p", "CAP", capped.port, engine, max_results=3)
        result = find(cfg, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
        assert len(result.datasets) == 3 and result.truncated
        assert capped.counters["cancel"] == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_find_cancelled_by_the_caller_sends_c_cancel(engine: str) -> None:
    with DemoPacs(generate_demo_datasets(), ae_title="SLOW", find_delay=0.5) as slow:
        cfg = node("p", "SLOW", slow.port, engine)

        async def scenario(pacs: PynetdicomPacs, n: PacsNode) -> None:
            ident = Dataset()
            ident.QueryRetrieveLevel, ident.StudyInstanceUID = "STUDY", ""
            task = asyncio.ensure_future(pacs.find(n, ident))
            await asyncio.sleep(0.8)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            slow.find_delay = 0
            again = await pacs.find(n, ident)   # the budget was given back
            assert len(again.datasets) == len(DEMO_STUDIES)

        with_pacs(cfg, scenario)
        assert slow.counters["cancel"] == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_reused_association_the_peer_closed_is_replaced(engine: str) -> None:
    with DemoPacs(generate_demo_datasets(), ae_title="PACS") as pacs_scp:
        cfg = node("p", "PACS", pacs_scp.port, engine)

        async def scenario(pacs: PynetdicomPacs, n: PacsNode) -> None:
            ident = Dataset()
            ident.QueryRetrieveLevel, ident.StudyInstanceUID = "STUDY", ""
            assert len((await pacs.find(n, ident)).datasets) == len(DEMO_STUDIES)
            for assoc in list(pacs_scp._server.active_associations if pacs_scp._server else []):
                assoc.abort()
            time.sleep(0.3)
            assert len((await pacs.find(n, ident)).datasets) == len(DEMO_STUDIES)
            assert pacs.query_associations_opened(n) == 2

        with_pacs(cfg, scenario)


# ----------------------------------------------------------------------------- C-GET


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("peer_name", ["orthanc", "dcmqrscp"])
@pytest.mark.parametrize("scope", ["study", "series", "instance"])
def test_c_get_delivers_the_source_bytes(request: pytest.FixtureRequest, sources: dict[str, bytes],
                                         peer_name: str, scope: str, engine: str) -> None:
    """The MR study: a native and an RLE Lossless series. dcmqrscp sends a C-GET sub-operation on the
    first context accepted for its SOP class and can neither decode nor encode RLE, so it is asked for
    the RLE series compressed first (what the gateway's retry does) and for a native study (CT)."""
    peer = request.getfixturevalue(peer_name)
    series = MR["series"][1]   # RLE Lossless
    first = peer_name == "dcmqrscp"
    study = CT if first else MR
    wanted = {"study": RetrieveRequest("STUDY", study["study_uid"]),
              "series": RetrieveRequest("SERIES", MR["study_uid"], series["series_uid"], compressed_first=first),
              "instance": RetrieveRequest("IMAGE", MR["study_uid"], series["series_uid"],
                                          sops=tuple(series["sop_instance_uids"][:3]), compressed_first=first),
              }[scope]
    expected = {"study": {u for s in study["series"] for u in s["sop_instance_uids"]},
                "series": set(series["sop_instance_uids"]),
                "instance": set(series["sop_instance_uids"][:3])}[scope]
    outcome, files = get(node("p", peer.ae_title, peer.dicom_port, engine), wanted)
    assert set(files) == expected
    assert outcome.received == len(expected) and outcome.failed == 0 and not outcome.cancelled
    assert all([check_file(data, ts, sources[sop]) for sop, (data, ts) in files.items()])


def test_c_get_files_are_identical_between_engines(orthanc: OrthancPeer, dcmqrscp: Any) -> None:
    for peer in (orthanc, dcmqrscp):
        wanted = RetrieveRequest("STUDY", CT["study_uid"])
        _, fast = get(node("p", peer.ae_title, peer.dicom_port, "fast"), wanted)
        _, reference = get(node("p", peer.ae_title, peer.dicom_port, "pynetdicom"), wanted)
        assert len(fast) == CT["num_instances"]
        assert fast == reference


@pytest.mark.parametrize("engine", ENGINES)
def test_c_get_of_a_multi_frame_instance(orthanc: OrthancPeer, sources: dict[str, bytes], engine: str) -> None:
    series = MF["series"][0]
    sop = series["sop_instance_uids"][0]
    outcome, files = get(node("p", orthanc.ae_title, orthanc.dicom_port, engine),
                         RetrieveRequest("IMAGE", MF["study_uid"], series["series_uid"], sops=(sop,)))
    (data, ts), = files.values()
    assert int(dcmread(BytesIO(data)).NumberOfFrames) > 1
    assert check_file(data, ts, sources[sop])


@pytest.fixture(scope="module")
def codecs_orthanc(compressed: dict[str, Path], tmp_path_factory: pytest.TempPathFactory  # noqa: F811
                   ) -> Iterator[OrthancPeer]:
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc-engines-codecs"), ae_title="CODECS", dicomweb=False)
    try:
        peer.start()
        peer.load(list(compressed.values()))
        yield peer
    finally:
        peer.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_c_get_of_compressed_syntaxes(codecs_orthanc: OrthancPeer, compressed: dict[str, Path],  # noqa: F811
                                      engine: str) -> None:
    """RLE, JPEG baseline/lossless, JPEG-LS, JPEG 2000 proposed first: the stored bytes, in the stored syntax."""
    outcome, files = get(node("p", "CODECS", codecs_orthanc.dicom_port, engine),
                         RetrieveRequest("STUDY", CODEC_ROOT + "1", sop_classes=(MR_IMAGE,), compressed_first=True))
    assert outcome.received == len(CODECS)
    for n, name in enumerate(CODECS, start=1):
        data, ts = files[f"{CODEC_ROOT}3.{n}"]
        assert ts == CODECS[name][2], name
        assert check_file(data, ts, compressed[name].read_bytes())


def test_c_get_of_compressed_data_native_first_ends_alike(codecs_orthanc: OrthancPeer) -> None:
    """Native syntaxes first: Orthanc transcodes what it can and fails at the first it cannot (JPEG 2000:
    'cannot transcode', a final C000 whose Failed SOP Instance UID List DCMTK appends to the command
    set). Both engines must see the same files and the same outcome or error."""
    def attempt(engine: str) -> tuple[str, dict[str, tuple[bytes, str]]]:
        files: dict[str, tuple[bytes, str]] = {}
        try:
            outcome, files = get(node("p", "CODECS", codecs_orthanc.dicom_port, engine),
                                 RetrieveRequest("STUDY", CODEC_ROOT + "1", sop_classes=(MR_IMAGE,)),
                                 lambda data, sop, cls, ts: files.__setitem__(sop, (data, ts)))
            return f"ok {outcome.received} {outcome.failed}", files
        except PacsError as exc:
            return f"{type(exc).__name__} {exc.detail}", files

    assert attempt("fast") == attempt("pynetdicom")


@pytest.mark.parametrize("engine", ENGINES)
def test_not_requested_and_failing_sub_operations_are_refused(orthanc: OrthancPeer, engine: str) -> None:
    series = CT["series"][1]
    refused = set(series["sop_instance_uids"][:2])
    broken = series["sop_instance_uids"][2]

    def on_instance(data: bytes, sop: str, cls: str, ts: str) -> None:
        if sop in refused:
            raise NotRequested(sop)
        if sop == broken:
            raise OSError("disk full")

    outcome, files = get(node("p", orthanc.ae_title, orthanc.dicom_port, engine),
                         RetrieveRequest("SERIES", CT["study_uid"], series["series_uid"]), on_instance)
    assert outcome.received == len(series["sop_instance_uids"]) - 3
    assert set(files) == set(series["sop_instance_uids"]) - refused - {broken}
    # The fast engine acknowledges each instance before it is spooled (the PACS keeps it; the
    # retrieval's completeness check retries what is missing, docs/architecture.md "Cache"): the PACS
    # counts them completed. pynetdicom's answers after on_instance: 0124 / A700, counted failed.
    assert outcome.failed == (0 if engine == "fast" else 3)


@pytest.mark.parametrize("engine", ENGINES)
def test_c_cancel_mid_c_get(demo_files: list[Path], engine: str) -> None:
    with DemoPacs(files=demo_files, ae_title="PACS") as scp:
        cancel = threading.Event()
        outcome, files = get(node("p", "PACS", scp.port, engine), RetrieveRequest("STUDY", MR["study_uid"]),
                             lambda *_: cancel.set(), cancel)
        assert outcome.cancelled
        assert 1 <= len(files) < MR["num_instances"] and outcome.received == len(files)
        assert scp.counters["cancel"] == 1


# ----------------------------------------------------------------------------- faults


class FaultyScp:
    """A pynetdicom Q/R SCP whose C-GET sends ``before`` instances and then does ``fault``."""

    def __init__(self, datasets: list[Dataset], fault: str, *, before: int = 2, delay: float = 0.0,
                 require_called_aet: bool = False, contexts: list[str] | None = None) -> None:
        self.datasets, self.fault, self.before, self.delay = datasets, fault, before, delay
        ae = AE("FAULTY")
        ae.require_called_aet = require_called_aet
        if contexts is None:
            ae.add_supported_context(Verification)
            ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
            for cx in StoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, scu_role=False, scp_role=True)
        else:
            for uid in contexts:
                ae.add_supported_context(uid)
        self.server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_GET, self._on_get)])
        self.port = int(self.server.server_address[1])

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        yield len(self.datasets)
        for n, ds in enumerate(self.datasets):
            if n == self.before:
                if self.fault == "abort":
                    event.assoc.abort()
                    return
                if self.fault == "drop":
                    event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)   # type: ignore[union-attr]
                    event.assoc.dul.socket.socket.close()   # type: ignore[union-attr]
                    return
                if self.fault == "stall":
                    time.sleep(self.delay)
            yield 0xFF00, ds
        yield 0x0000, None

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def mr_datasets() -> list[Dataset]:
    return [ds for ds in generate_demo_datasets() if ds.StudyInstanceUID == MR["study_uid"]][:6]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", ["abort", "drop"])
def test_peer_ending_the_association_mid_c_get_is_a_502(mr_datasets: list[Dataset], fault: str,
                                                       engine: str) -> None:
    scp = FaultyScp(mr_datasets, fault)
    try:
        received: list[str] = []
        cfg = node("p", "FAULTY", scp.port, engine)
        expect(AssociationAborted, lambda: get(cfg, RetrieveRequest("STUDY", MR["study_uid"]),
                                               lambda _d, sop, *_: received.append(sop)),
               "association aborted during C-GET", within=10)
        assert len(received) == 2, "what arrived before the fault was delivered"
    finally:
        scp.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stalled_c_get_is_a_504(mr_datasets: list[Dataset], engine: str) -> None:
    scp = FaultyScp(mr_datasets, "stall", delay=3)
    try:
        cfg = node("p", "FAULTY", scp.port, engine, timeouts={**TIMEOUTS, "dimse": 1})
        err = expect(DimseTimeout, lambda: get(cfg, RetrieveRequest("STUDY", MR["study_uid"])),
                     "C-GET timed out", within=6)
        assert err.status_code == 504
    finally:
        scp.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pacs_refusing_every_context_is_a_clear_502(mr_datasets: list[Dataset], engine: str) -> None:
    scp = FaultyScp(mr_datasets, "none", contexts=[ModalityWorklistInformationFind])
    try:
        cfg = node("p", "FAULTY", scp.port, engine)
        err = expect(AssociationRejected, lambda: with_pacs(cfg, lambda pacs, n: pacs.echo(n)),
                     "accepted none of the 3 presentation contexts", within=5)
        assert err.status_code == 502
        expect(AssociationRejected, lambda: get(cfg, RetrieveRequest("STUDY", MR["study_uid"])),
               "accepted none of the")
    finally:
        scp.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_rejected_ae_title_is_a_502(mr_datasets: list[Dataset], engine: str) -> None:
    scp = FaultyScp(mr_datasets, "none", require_called_aet=True)
    try:
        cfg = node("p", "NOTFAULTY", scp.port, engine)
        err = expect(AssociationRejected, lambda: with_pacs(cfg, lambda pacs, n: pacs.echo(n)),
                     "rejected the association", "check AE titles", within=5)
        if engine == "fast":   # the fast engine reads the A-ASSOCIATE-RJ's reason (PS3.8 Table 9-21)
            assert "called AE title not recognised" in err.detail
    finally:
        scp.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pacs_that_never_answers_is_a_504(engine: str) -> None:
    """TCP accepted (the kernel's backlog) but no A-ASSOCIATE answer: the ARTIM timer (acse) fires."""
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(4)
        cfg = node("p", "SILENT", silent.getsockname()[1], engine, timeouts={**TIMEOUTS, "acse": 1})
        err = expect(DimseTimeout, lambda: with_pacs(cfg, lambda pacs, n: pacs.echo(n)),
                     "did not answer the association request in time", within=4)
        assert err.status_code == 504


@pytest.mark.parametrize("engine", ENGINES)
def test_a_slow_c_find_is_a_504_and_nobody_listening_a_502(engine: str) -> None:
    with DemoPacs(generate_demo_datasets(), ae_title="SLOW", find_delay=2.5) as slow:
        cfg = node("p", "SLOW", slow.port, engine, timeouts={**TIMEOUTS, "dimse": 1})
        expect(DimseTimeout, lambda: find(cfg, QueryRetrieveLevel="STUDY", StudyInstanceUID=""),
               "C-FIND timed out", within=5)
    expect(NodeUnreachable, lambda: with_pacs(node("p", "NOBODY", free_port(), engine),
                                              lambda pacs, n: pacs.echo(n)), "unreachable", within=3)


# ----------------------------------------------------------------------------- C-MOVE


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("peer_name", ["orthanc", "dcmqrscp"])
def test_c_move_to_a_pynetdicom_storage_scp(request: pytest.FixtureRequest, gateway_scp_port: int,
                                            sources: dict[str, bytes], peer_name: str, engine: str) -> None:
    """The peers know GATEWAY_AE at gateway_scp_port as a move destination (conftest)."""
    peer = request.getfixturevalue(peer_name)
    arrived: dict[str, tuple[bytes, str, int | None]] = {}

    def on_store(event: evt.Event) -> int:
        originator = event.request.MoveOriginatorMessageID
        arrived[str(event.request.AffectedSOPInstanceUID)] = (
            event.encoded_dataset(), str(event.context.transfer_syntax[0]), originator)
        return 0x0000

    ae = AE(GATEWAY_AE)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2",
                                                      "1.2.840.10008.1.2.5"])
    server = ae.start_server((HOST, gateway_scp_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        series = MR["series"][1 if peer_name == "orthanc" else 0]   # dcmqrscp cannot convert RLE
        cfg = node("p", peer.ae_title, peer.dicom_port, engine, retrieve="move")
        outcome = with_pacs(cfg, lambda pacs, n: pacs.move(
            n, RetrieveRequest("SERIES", MR["study_uid"], series["series_uid"]), destination=GATEWAY_AE,
            msg_id=4711, cancel=threading.Event()))
    finally:
        server.shutdown()
    assert set(arrived) == set(series["sop_instance_uids"])
    assert outcome.completed == len(arrived) and outcome.failed == 0
    for sop, (data, ts, originator) in arrived.items():
        assert originator in (4711, None)
        source = sources[sop]
        if str(dcmread(BytesIO(source), stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts:
            assert data == data_set_of(source)


# ----------------------------------------------------------------------------- DICOM TLS


@pytest.mark.parametrize("engine", ENGINES)
def test_dicom_tls_echo_find_and_get(orthanc_tls: OrthancPeer, pki: Any, engine: str) -> None:  # noqa: F811
    ours = {"enabled": True, "ca_file": str(pki.ca), "cert_file": str(pki.gateway[0]),
            "key_file": str(pki.gateway[1])}
    cfg = node("p", orthanc_tls.ae_title, orthanc_tls.dicom_port, engine, tls=ours)

    async def scenario(pacs: PynetdicomPacs, n: PacsNode) -> RetrieveOutcome:
        await pacs.echo(n)
        ident = Dataset()
        ident.QueryRetrieveLevel, ident.StudyInstanceUID = "STUDY", CR["study_uid"]
        assert [str(d.StudyInstanceUID) for d in (await pacs.find(n, ident)).datasets] == [CR["study_uid"]]
        got: list[str] = []
        outcome = await pacs.get(n, RetrieveRequest("STUDY", CR["study_uid"]),
                                 lambda _d, sop, *_: got.append(sop), threading.Event())
        assert sorted(got) == sorted(u for s in CR["series"] for u in s["sop_instance_uids"])
        return outcome

    assert with_pacs(cfg, scenario).received == CR["num_instances"]
    wrong_ca = node("p", orthanc_tls.ae_title, orthanc_tls.dicom_port, engine,
                    tls={**ours, "ca_file": str(pki.other_ca)})
    expect(NodeUnreachable, lambda: with_pacs(wrong_ca, lambda pacs, n: pacs.echo(n)),
           "TLS", "certificate was not accepted", within=TIMEOUTS["connect"])
    no_cert = node("p", orthanc_tls.ae_title, orthanc_tls.dicom_port, engine,
                   tls={"enabled": True, "ca_file": str(pki.ca)})
    expect(NodeUnreachable, lambda: with_pacs(no_cert, lambda pacs, n: pacs.echo(n)), "TLS",
           within=TIMEOUTS["connect"])
    plain = node("p", orthanc_tls.ae_title, orthanc_tls.dicom_port, engine)
    expect(AssociationAborted, lambda: with_pacs(plain, lambda pacs, n: pacs.echo(n)), "nodes[p].tls",
           within=TIMEOUTS["connect"])


# ----------------------------------------------------------------------------- C-STORE


def _store_items(sources: list[Path], directory: Path) -> list[StoreItem]:
    """The files under fresh UIDs (one new study), as the STOW-RS service hands them over."""
    study = f"{CODEC_ROOT}9.{secrets.randbelow(9 * 10**8) + 10**8}"
    items = []
    for n, source in enumerate(sources):
        ds = dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, study + ".1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.1.{n + 1}"
        path = directory / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items.append(StoreItem(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                               str(ds.file_meta.TransferSyntaxUID)))
    return items


@pytest.fixture(scope="module")
def empty_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """A PACS of its own for the store tests: the session peers hold exactly the demo data, which
    other suites assert on."""
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc-store"), ae_title="STORETEST")
    try:
        peer.start()
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def empty_dcmqrscp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DcmqrscpPeer]:
    peer = DcmqrscpPeer(tmp_path_factory.mktemp("dcmqrscp-store"))
    try:
        peer.start()
        yield peer
    finally:
        peer.stop()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("peer_name", ["empty_orthanc", "empty_dcmqrscp"])
def test_c_store_scu(request: pytest.FixtureRequest, demo_files: list[Path], compressed: dict[str, Path],  # noqa: F811
                     tmp_path: Path, peer_name: str, engine: str) -> None:
    """Native, RLE and JPEG-LS instances of several classes; dcmqrscp takes no JPEG-LS, so that one is
    transcoded to Explicit VR LE. Then the PACS holds exactly these instances."""
    from gateway.dimse import store as pynetdicom_store
    from gateway.dimse.fast import store as fast_store

    peer = request.getfixturevalue(peer_name)
    picked = [p for p in demo_files if str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)
              in (MR["study_uid"], CR["study_uid"])][::5] + [compressed["jpeg-ls"]]
    items = _store_items(picked, tmp_path)
    settings = settings_from_dict({"nodes": [node("p", peer.ae_title, peer.dicom_port, engine)]})
    store_all = fast_store.store_all if engine == "fast" else pynetdicom_store.store_all
    results = store_all(GATEWAY_AE, settings.nodes[0], iter(items), tmp_path, threading.Event())
    assert [(r.status, r.confirmed) for r in results] == [(0, True)] * len(items)
    jpeg_ls = results[-1].sent_syntax
    assert jpeg_ls == ("1.2.840.10008.1.2.4.80" if peer_name == "empty_orthanc" else "1.2.840.10008.1.2.1")
    stored = find(node("p", peer.ae_title, peer.dicom_port, "pynetdicom"), QueryRetrieveLevel="IMAGE",
                  StudyInstanceUID=str(dcmread(items[0].path, stop_before_pixels=True).StudyInstanceUID),
                  SeriesInstanceUID="", SOPInstanceUID="")
    assert sorted(str(d.SOPInstanceUID) for d in stored.datasets) == sorted(i.sop_instance_uid for i in items)


def test_fast_c_store_scu_stops_at_a_lost_association(mr_datasets: list[Dataset], demo_files: list[Path],
                                                      tmp_path: Path) -> None:
    """A PACS that aborts on the second C-STORE: the first is confirmed, the rest are unconfirmed
    processing failures and never sent."""
    from gateway.dimse.fast import store as fast_store

    seen: list[str] = []

    def on_store(event: evt.Event) -> int:
        seen.append(str(event.request.AffectedSOPInstanceUID))
        if len(seen) == 2:
            event.assoc.abort()
        return 0x0000

    ae = AE("ABORTS")
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        picked = [p for p in demo_files
                  if str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) == CT["study_uid"]][:4]
        items = _store_items(picked, tmp_path)
        settings = settings_from_dict({"nodes": [node("p", "ABORTS", server.server_address[1], "fast")]})
        results = fast_store.store_all(GATEWAY_AE, settings.nodes[0], items, tmp_path, threading.Event())
    finally:
        server.shutdown()
    assert [r.confirmed for r in results] == [True, False, False, False]
    assert [r.status for r in results[1:]] == [0x0110] * 3
    assert len(seen) == 2
