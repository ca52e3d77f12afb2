"""gateway.stow.service.StowService with a fake Pacs, the real MemoryCache and a real Spool: what is
stored, which generations are bumped (cache/keys.py freshness rule), locations, per-instance failures,
the study of ``POST /studies/{study}``, and the temp files left behind (none)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid

from cache import keys
from cache.memory import MemoryCache
from cache.spool import Spool
from gateway.errors import BadRequest, NodeUnreachable, PayloadTooLarge
from gateway.pacs import StoreItem, StoreResult
from gateway.settings import settings_from_dict
from gateway.stow.receive import MemoryWindow
from gateway.stow.service import StowService
from translators import multipart as mp
from translators import stow as st
from translators import syntaxes
from translators.uids import StudyId

CT = "1.2.840.10008.5.1.4.1.1.2"
BOUNDARY = "stow-service-test"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"


# ----------------------------------------------------------------------------- fakes


class FakePacs:
    """Implements Pacs.store only: records each call (and that its files were there), answers
    ``statuses[SOP Instance UID]`` (default success), unconfirmed for ``unconfirmed`` UIDs. Items that
    come one by one are read as they come; ``log`` (shared with the body, when given) records each
    item's arrival as ``("stored", SOP Instance UID)``."""

    def __init__(self, statuses: dict[str, int] | None = None, *, unconfirmed: frozenset[str] = frozenset(),
                 short: int = 0, error: Exception | None = None, log: list | None = None) -> None:
        self.statuses = statuses or {}
        self.log = log if log is not None else []
        self.unconfirmed = unconfirmed
        self.short = short            # answer this many results fewer than items (a broken facade)
        self.error = error
        self.calls: list[tuple[str, list[StoreItem], Path]] = []
        self.files: dict[str, bytes] = {}   # SOP Instance UID -> the file as it was at store time

    async def store(self, node, items, workdir):
        received: list[StoreItem] = []
        self.calls.append((node.name, received, workdir))
        async for item in each(items):
            # A part on disk is in the request's work directory; one in memory is its received pieces.
            assert item.path.is_relative_to(workdir) if item.path is not None else item.pieces is not None
            self.files[item.sop_instance_uid] = _bytes_of(item)
            self.log.append(("stored", item.sop_instance_uid))
            received.append(item)
        items = received
        if self.error is not None:
            raise self.error
        results = [StoreResult(self.statuses.get(i.sop_instance_uid, 0x0000),
                               confirmed=i.sop_instance_uid not in self.unconfirmed, sent_syntax=i.transfer_syntax)
                   for i in items]
        return results[:len(results) - self.short]

    async def echo(self, node):
        raise NotImplementedError

    async def find(self, node, identifier, *, model=None, max_results=None):
        raise NotImplementedError

    async def get(self, node, request, on_instance, cancel):
        raise NotImplementedError

    async def move(self, node, request, *, destination, msg_id, cancel):
        raise NotImplementedError

    async def close(self):
        pass


async def each(items):
    if isinstance(items, list):
        for item in items:
            yield item
    else:
        async for item in items:
            yield item


class RecordingCache(MemoryCache):
    """The real in-process cache, recording which counters were incremented."""

    def __init__(self) -> None:
        super().__init__()
        self.incremented: list[str] = []

    async def incr(self, key: str) -> int:
        self.incremented.append(key)
        return await super().incr(key)


# ----------------------------------------------------------------------------- instances and bodies


def instance(study: str, series: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "STOW0001"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(8))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(syntaxes.EXPLICIT_VR_LE)
    return ds


def part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def body_of(parts: list[tuple[str, bytes]], *, close: bool = True,
            locations: list[str | None] | None = None) -> bytes:
    out = b""
    for i, (media, data) in enumerate(parts):
        location = locations[i] if locations else None
        out += mp.part_header(BOUNDARY, media, location=location, first=i == 0) + data
    return out + (mp.closing(BOUNDARY) if close else b"")


async def chunks(data: bytes, size: int = 997) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def leaving(data: bytes) -> AsyncIterator[bytes]:
    """Half the body, then the client goes (what starlette's ClientDisconnect looks like here)."""
    yield data[:len(data) // 2]
    raise ConnectionResetError("client left")


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[tuple]:
    settings = settings_from_dict({"spool": {"path": str(tmp_path / "spool")},
                                   "nodes": [{"name": "n", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}]})
    spool = Spool(settings.spool.path, settings.spool.max_bytes)
    cache = RecordingCache()
    yield settings, spool, cache
    spool.close()


def run(env, pacs: FakePacs, body: bytes | AsyncIterator[bytes], *, study: str | None = None,
        root: str = DICOM) -> list[st.InstanceOutcome]:
    settings, spool, cache = env
    service = StowService(settings, pacs, cache, spool)
    stream = chunks(body) if isinstance(body, bytes) else body
    return asyncio.run(service.store(settings.nodes[0], root_type=root, boundary=BOUNDARY, body=stream,
                                     study=study))


def statuses(outcomes: list[st.InstanceOutcome]) -> dict[str | None, int]:
    return {o.sop_instance_uid: o.status for o in outcomes}


def generation(cache: MemoryCache, counter: str) -> int:
    return asyncio.run(cache.get_int(counter))


def locations(cache: MemoryCache, study: str) -> set[str]:
    return asyncio.run(cache.smembers(keys.study_locations(study)))


def incoming(env) -> list[Path]:
    return list(env[1].tmp.rglob("*"))


# ----------------------------------------------------------------------------- tests


def test_bumps_exactly_the_generations_of_studies_with_a_stored_instance(env):
    settings, spool, cache = env
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    sent = [instance(a), instance(a), instance(b), instance(b), instance(c)]
    failed = {sent[3].SOPInstanceUID: 0xA700, sent[4].SOPInstanceUID: 0xA700}   # study c: nothing stored
    pacs = FakePacs(failed)
    outcomes = run(env, pacs, body_of([(DICOM, part10(d)) for d in sent]))
    assert [o.sop_instance_uid for o in outcomes] == [d.SOPInstanceUID for d in sent]
    assert statuses(outcomes) == {d.SOPInstanceUID: failed.get(d.SOPInstanceUID, 0) for d in sent}
    assert [(o.study_uid, o.series_uid) for o in outcomes] == [
        (d.StudyInstanceUID, d.SeriesInstanceUID) for d in sent]
    assert sorted(cache.incremented) == sorted(keys.generations_changed_by_store("n", [a, b]))
    assert generation(cache, keys.node_generation("n")) == 1
    for study, expected in ((a, 1), (b, 1), (c, 0)):
        assert generation(cache, keys.study_generation(StudyId("n", study))) == expected
    assert locations(cache, a) == locations(cache, b) == {"n"} and locations(cache, c) == set()
    assert [len(items) for _, items, _ in pacs.calls] == [5]    # one store call for the request
    assert incoming(env) == []


def test_nothing_stored_bumps_nothing(env):
    settings, spool, cache = env
    sent = [instance(generate_uid()), instance(generate_uid())]
    pacs = FakePacs({d.SOPInstanceUID: 0xA700 for d in sent})
    outcomes = run(env, pacs, body_of([(DICOM, part10(d)) for d in sent]))
    assert statuses(outcomes) == {d.SOPInstanceUID: 0xA700 for d in sent}
    assert st.http_status(outcomes) == 409
    assert cache.incremented == []
    assert all(locations(cache, d.StudyInstanceUID) == set() for d in sent)


def test_nothing_sent_when_no_part_is_dicom(env):
    settings, spool, cache = env
    pacs = FakePacs()
    outcomes = run(env, pacs, body_of([(DICOM, b"not dicom"), ("text/plain", b"hello")]))
    assert [o.status for o in outcomes] == [st.NOT_DICOM, st.NOT_DICOM]
    assert pacs.calls == [] and cache.incremented == []


def test_pacs_failures_are_per_instance_and_never_success(env):
    settings, spool, cache = env
    study = generate_uid()
    ok, refused, warned, unanswered, claimed = sent = [instance(study) for _ in range(5)]
    pacs = FakePacs({refused.SOPInstanceUID: 0xA700, warned.SOPInstanceUID: 0xB000,
                     unanswered.SOPInstanceUID: st.PROCESSING_FAILURE},
                    unconfirmed=frozenset({unanswered.SOPInstanceUID, claimed.SOPInstanceUID}))
    outcomes = run(env, pacs, body_of([(DICOM, part10(d)) for d in sent]))
    assert statuses(outcomes) == {
        ok.SOPInstanceUID: 0x0000, refused.SOPInstanceUID: 0xA700, warned.SOPInstanceUID: 0xB000,
        unanswered.SOPInstanceUID: st.PROCESSING_FAILURE,
        claimed.SOPInstanceUID: st.PROCESSING_FAILURE,    # "success" the PACS never confirmed
    }
    assert st.http_status(outcomes) == 202
    assert sorted(cache.incremented) == sorted(keys.generations_changed_by_store("n", [study]))


def test_missing_results_are_processing_failures(env):
    sent = [instance(generate_uid()) for _ in range(3)]
    outcomes = run(env, FakePacs(short=2), body_of([(DICOM, part10(d)) for d in sent]))
    assert [o.status for o in outcomes] == [0x0000, st.PROCESSING_FAILURE, st.PROCESSING_FAILURE]


def test_study_mismatch_with_the_path_study(env):
    settings, spool, cache = env
    study, other = generate_uid(), generate_uid()
    good, foreign = instance(study), instance(other)
    pacs = FakePacs()
    outcomes = run(env, pacs, body_of([(DICOM, part10(good)), (DICOM, part10(foreign))]), study=study)
    assert statuses(outcomes) == {good.SOPInstanceUID: 0x0000, foreign.SOPInstanceUID: st.STUDY_UID_MISMATCH}
    assert [i.sop_instance_uid for _, items, _ in pacs.calls for i in items] == [good.SOPInstanceUID]
    assert sorted(cache.incremented) == sorted(keys.generations_changed_by_store("n", [study]))
    assert locations(cache, other) == set()


def test_only_foreign_instances_store_nothing(env):
    settings, spool, cache = env
    foreign = instance(generate_uid())
    pacs = FakePacs()
    outcomes = run(env, pacs, body_of([(DICOM, part10(foreign))]), study=generate_uid())
    assert statuses(outcomes) == {foreign.SOPInstanceUID: st.STUDY_UID_MISMATCH}
    assert st.http_status(outcomes) == 409
    assert pacs.calls == [] and cache.incremented == []


def test_temp_files_are_gone_after_success_and_after_a_pacs_error(env):
    sent = [instance(generate_uid()) for _ in range(2)]
    body = body_of([(DICOM, part10(d)) for d in sent])
    pacs = FakePacs()
    run(env, pacs, body)
    (_, items, workdir), = pacs.calls
    assert workdir.parent == env[1].tmp and not workdir.exists()
    assert all(not i.path.exists() if i.path is not None else i.pieces == [] for i in items)  # given back
    failing = FakePacs(error=NodeUnreachable("connection refused", node="n"))
    with pytest.raises(NodeUnreachable):
        run(env, failing, body)
    assert failing.calls and not failing.calls[0][2].exists()
    assert incoming(env) == []
    # Only the first request stored anything.
    assert sorted(env[2].incremented) == sorted(
        keys.generations_changed_by_store("n", [d.StudyInstanceUID for d in sent]))


def test_client_leaving_during_the_upload_stores_the_complete_parts(env):
    """The first half of the body holds the first part whole and the second cut off: the first is
    stored (and its study's generations bumped) before the client's exception propagates."""
    settings, spool, cache = env
    sent = [instance(generate_uid()) for _ in range(3)]
    pacs = FakePacs()
    with pytest.raises(ConnectionResetError):
        run(env, pacs, leaving(body_of([(DICOM, part10(d)) for d in sent])))
    assert set(pacs.files) == {sent[0].SOPInstanceUID}
    assert sorted(cache.incremented) == sorted(keys.generations_changed_by_store("n", [sent[0].StudyInstanceUID]))
    assert locations(cache, sent[0].StudyInstanceUID) == {"n"}
    assert incoming(env) == []


def test_client_leaving_before_any_part_is_complete_stores_nothing(env):
    settings, spool, cache = env
    data = part10(instance(generate_uid()))
    pacs = FakePacs()
    with pytest.raises(ConnectionResetError):
        run(env, pacs, leaving(body_of([(DICOM, data)])))
    assert pacs.calls == [] and cache.incremented == [] and incoming(env) == []


def test_truncated_body_keeps_the_complete_parts(env):
    study = generate_uid()
    sent = [instance(study) for _ in range(3)]
    data = [part10(d) for d in sent]
    body = body_of([(DICOM, d) for d in data], close=False)
    body = body[:body.index(data[2]) + len(data[2]) - 4]   # inside the third instance's pixel data
    pacs = FakePacs()
    outcomes = run(env, pacs, chunks(body, 7))
    assert statuses(outcomes) == {sent[0].SOPInstanceUID: 0, sent[1].SOPInstanceUID: 0,
                                  sent[2].SOPInstanceUID: st.TRUNCATED}
    assert pacs.files[sent[0].SOPInstanceUID] == data[0]   # byte for byte, through 7-byte chunks


def test_python_client_files_are_repaired_to_part10(env):
    """Without preamble/DICM (dcmwrite without enforce_file_format) and without any file meta."""
    no_preamble, bare = instance(generate_uid()), instance(generate_uid())
    first = BytesIO()
    pydicom.dcmwrite(first, no_preamble)
    bare.file_meta = FileMetaDataset()
    second = BytesIO()
    pydicom.dcmwrite(second, bare, implicit_vr=True, little_endian=True)
    pacs = FakePacs()
    outcomes = run(env, pacs, body_of([(DICOM, first.getvalue()), (DICOM, second.getvalue())]))
    assert [o.status for o in outcomes] == [0, 0]
    (_, items, _), = pacs.calls
    assert [i.transfer_syntax for i in items] == [syntaxes.EXPLICIT_VR_LE, syntaxes.IMPLICIT_VR_LE]
    for ds in (no_preamble, bare):
        data = pacs.files[ds.SOPInstanceUID]
        assert data[128:132] == b"DICM"
        assert pydicom.dcmread(BytesIO(data)).PixelData == ds.PixelData


def test_metadata_and_bulk_data_form(env):
    settings, spool, cache = env
    ds = instance(generate_uid())
    obj = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "")
    obj["7FE00010"] = {"vr": "OW", "BulkDataURI": "http://gateway/bulk/0"}
    body = body_of([(DICOM_JSON, json.dumps([obj]).encode()), ("application/octet-stream", ds.PixelData)],
                   locations=[None, "/bulk/0"])
    pacs = FakePacs()
    outcomes = run(env, pacs, body, root=DICOM_JSON)
    assert statuses(outcomes) == {ds.SOPInstanceUID: 0}
    assert pydicom.dcmread(BytesIO(pacs.files[ds.SOPInstanceUID])).PixelData == ds.PixelData
    assert locations(cache, ds.StudyInstanceUID) == {"n"}


def test_a_body_without_parts_is_a_bad_request(env):
    with pytest.raises(BadRequest):
        run(env, FakePacs(), b"no delimiter anywhere")
    assert incoming(env) == []


def test_a_bulk_part_fills_at_most_one_element(tmp_path):
    """STOW amplification: 25 BulkDataURIs naming one 1 MB part would build 25 MB per instance."""
    from gateway.stow.prepare import _BulkParts
    from gateway.stow.receive import Part

    data = tmp_path / "bulk"
    data.write_bytes(b"\1" * (1 << 20))
    bulk = _BulkParts([Part({"content-location": "http://x/bulk/1", "content-type": "application/octet-stream"},
                            data, size=1 << 20, complete=True)])
    first = bulk("http://x/bulk/1")
    assert first is not None and len(first[0]) == 1 << 20
    assert bulk("http://x/bulk/1") is None and bulk("/bulk/1") is None, "a second reference gets nothing"


# ----------------------------------------------------------------------------- stored as the parts arrive


def part_chunks(data: list[bytes]) -> list[bytes]:
    """One chunk per part: its bytes and the delimiter that ends it (so the part is complete on arrival)."""
    headers = [mp.part_header(BOUNDARY, DICOM, first=i == 0) for i in range(len(data))]
    return [(headers[0] if i == 0 else b"") + d + (headers[i + 1] if i + 1 < len(data) else mp.closing(BOUNDARY))
            for i, d in enumerate(data)]


async def slow(chunks_: list[bytes], log: list, *, leave_after: int | None = None) -> AsyncIterator[bytes]:
    """A client sending one part at a time and waiting (bounded) until the PACS has the part before
    sending the next; ``leave_after``: it disconnects after that many parts, half-way into the next."""
    for i, chunk in enumerate(chunks_):
        if leave_after is not None and i == leave_after:
            yield chunk[:len(chunk) // 2]
            raise ConnectionResetError("client left")
        log.append(("sent", i))
        yield chunk
        for _ in range(1000):
            if sum(1 for e in log if e[0] == "stored") > i:
                break
            await asyncio.sleep(0.01)


def test_each_instance_reaches_the_pacs_before_the_next_part_is_sent(env):
    sent = [instance(generate_uid()) for _ in range(4)]
    log: list = []
    pacs = FakePacs(log=log)
    outcomes = run(env, pacs, slow(part_chunks([part10(d) for d in sent]), log))
    assert [o.status for o in outcomes] == [0] * 4
    for i, ds in enumerate(sent[:-1]):
        assert log.index(("stored", ds.SOPInstanceUID)) < log.index(("sent", i + 1))
    assert len(pacs.calls) == 1, "one store call, fed as the parts came"


def test_metadata_waits_for_bulk_data_sent_after_it(env):
    """application/dicom parts go at once; a metadata part is prepared at the end of the body, when the
    bulk data it names (sent later) is in. Outcomes stay in request order."""
    first, described = instance(generate_uid()), instance(generate_uid())
    obj = described.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "")
    obj["7FE00010"] = {"vr": "OW", "BulkDataURI": "/bulk/0"}
    body = body_of([(DICOM_JSON, json.dumps([obj]).encode()), (DICOM, part10(first)),
                    ("application/octet-stream", described.PixelData)], locations=[None, None, "/bulk/0"])
    log: list = []
    pacs = FakePacs(log=log)
    outcomes = run(env, pacs, body, root=DICOM_JSON)
    assert [o.sop_instance_uid for o in outcomes] == [described.SOPInstanceUID, first.SOPInstanceUID]
    assert [o.status for o in outcomes] == [0, 0]
    assert log == [("stored", first.SOPInstanceUID), ("stored", described.SOPInstanceUID)]
    assert pydicom.dcmread(BytesIO(pacs.files[described.SOPInstanceUID])).PixelData == described.PixelData


def test_client_leaving_after_some_parts_stores_exactly_the_complete_ones(env):
    settings, spool, cache = env
    study = generate_uid()
    sent = [instance(study) for _ in range(5)]
    log: list = []
    pacs = FakePacs(log=log)
    with pytest.raises(ConnectionResetError):
        run(env, pacs, slow(part_chunks([part10(d) for d in sent]), log, leave_after=3))
    assert list(pacs.files) == [d.SOPInstanceUID for d in sent[:3]]
    assert sorted(cache.incremented) == sorted(keys.generations_changed_by_store("n", [study]))
    assert incoming(env) == []


def test_a_limit_hit_after_stored_parts_is_413_naming_how_many_were_stored(tmp_path):
    settings = settings_from_dict({"spool": {"path": str(tmp_path / "spool")}, "limits": {"max_stow_parts": 2},
                                   "nodes": [{"name": "n", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}]})
    spool = Spool(settings.spool.path, settings.spool.max_bytes)
    cache = RecordingCache()
    study = generate_uid()
    sent = [instance(study) for _ in range(3)]
    pacs = FakePacs()
    try:
        with pytest.raises(PayloadTooLarge) as info:
            run((settings, spool, cache), pacs, body_of([(DICOM, part10(d)) for d in sent]))
        assert "2 instance(s) received before that were stored" in info.value.detail
        assert list(pacs.files) == [d.SOPInstanceUID for d in sent[:2]], "the third part is never stored"
        assert sorted(cache.incremented) == sorted(keys.generations_changed_by_store("n", [study]))
        assert list(spool.tmp.rglob("*")) == []
    finally:
        spool.close()


def test_cancelled_request_stops_the_store_and_invalidates_what_was_handed_over(env):
    settings, spool, cache = env
    first = instance(generate_uid())
    log: list = []
    pacs = FakePacs(log=log)

    async def stalled() -> AsyncIterator[bytes]:
        yield part_chunks([part10(first), part10(instance(generate_uid()))])[0]
        await asyncio.Event().wait()   # the second part never comes

    async def main() -> None:
        service = StowService(settings, pacs, cache, spool)
        task = asyncio.create_task(service.store(settings.nodes[0], root_type=DICOM, boundary=BOUNDARY,
                                                 body=stalled()))
        for _ in range(1000):
            if log:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert log == [("stored", first.SOPInstanceUID)]
    assert sorted(cache.incremented) == sorted(keys.generations_changed_by_store("n", [first.StudyInstanceUID]))
    assert incoming(env) == []


# ----------------------------------------------------------------------------- parts held in memory


class DonePacs(FakePacs):
    """Gives each item back as an engine does once its C-STORE is answered (StoreItem.done), and
    records the memory window's use right after each."""

    def __init__(self, window: MemoryWindow) -> None:
        super().__init__()
        self.window = window
        self.used_after: list[int] = []
        self.paths: list[str] = []

    async def store(self, node, items, workdir):
        received = []
        async for item in each(items):
            self.paths.append("memory" if item.path is None else str(item.path))
            self.files[item.sop_instance_uid] = _bytes_of(item)
            received.append(item)
            assert item.done is not None
            item.done()
            self.used_after.append(self.window.used)
        return [StoreResult(0x0000, confirmed=True, sent_syntax=i.transfer_syntax) for i in received]


def _bytes_of(item: StoreItem) -> bytes:
    return b"".join(item.pieces) if item.pieces is not None else item.file().read_bytes()


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def test_dicom_parts_stay_in_memory_and_each_is_given_back_once_stored(env):
    settings, spool, cache = env
    service = StowService(settings, FakePacs(), cache, spool)
    pacs = DonePacs(service.window)
    service.pacs = pacs
    study = generate_uid()
    datasets = [instance(study) for _ in range(3)]
    body = body_of([(DICOM, part10(ds)) for ds in datasets])
    fds = open_fds()
    outcomes = asyncio.run(service.store(settings.nodes[0], root_type=DICOM, boundary=BOUNDARY,
                                         body=chunks(body), study=None))
    assert [o.status for o in outcomes] == [0, 0, 0]
    assert pacs.paths == ["memory"] * 3   # never on disk
    assert [pacs.files[ds.SOPInstanceUID] for ds in datasets] == [part10(ds) for ds in datasets]
    # Given back one by one as the PACS took them (not at the end of the request), all of it.
    assert pacs.used_after[-1] == 0 and pacs.used_after == sorted(pacs.used_after, reverse=True)
    assert service.window.used == 0 and open_fds() == fds and incoming(env) == []


def test_parts_that_find_the_memory_window_full_go_to_disk(env):
    settings, spool, cache = env
    pacs = FakePacs()   # gives nothing back before the request ends: the window stays full
    service = StowService(settings, pacs, cache, spool)
    service.window = MemoryWindow(limit=1)   # room for the first part only
    study = generate_uid()
    datasets = [instance(study) for _ in range(3)]
    fds = open_fds()
    outcomes = asyncio.run(service.store(settings.nodes[0], root_type=DICOM, boundary=BOUNDARY,
                                         body=chunks(body_of([(DICOM, part10(ds)) for ds in datasets])),
                                         study=None))
    assert [o.status for o in outcomes] == [0, 0, 0]
    (_, items, workdir), = pacs.calls
    assert items[0].path is None and items[0].pieces is not None
    assert all(item.path is not None and item.path.parent == workdir for item in items[1:])
    assert [pacs.files[ds.SOPInstanceUID] for ds in datasets] == [part10(ds) for ds in datasets]
    assert service.window.used == 0 and open_fds() == fds and incoming(env) == []


def test_only_application_dicom_parts_are_held_in_memory(env):
    settings, spool, cache = env
    pacs = FakePacs()
    service = StowService(settings, pacs, cache, spool)
    study = generate_uid()
    ds = instance(study)
    asyncio.run(service.store(settings.nodes[0], root_type=DICOM, boundary=BOUNDARY,
                              body=chunks(body_of([(DICOM, part10(ds)), ("text/plain", b"not DICOM")])),
                              study=None))
    # Only application/dicom parts are held in memory (the others wait for the end of the body).
    assert service.window.used == 0
    (_, items, _), = pacs.calls
    assert len(items) == 1 and items[0].path is None and items[0].pieces is not None


def test_the_store_loop_gives_every_item_back_once_its_c_store_is_over(tmp_path):
    import threading

    from gateway.dimse import store_loop

    node = settings_from_dict({"nodes": [{"name": "n", "ae_title": "PACS", "host": "127.0.0.1",
                                          "port": 1}]}).nodes[0]
    events: list[str] = []

    class Engine:
        def __init__(self) -> None:
            self.node = node

        def open(self, contexts):
            return "assoc"

        def reusable(self, assoc):
            return True

        def accepted_syntaxes(self, assoc, sop_class):
            return [syntaxes.EXPLICIT_VR_LE]

        def send(self, assoc, item, path, syntax, msg_id):
            events.append(f"sent {item.sop_instance_uid}")
            return StoreResult(0x0000, confirmed=True, sent_syntax=syntax)

        def is_established(self, assoc):
            return True

        def close(self, assoc):
            events.append("closed")

    cancel = threading.Event()
    items = [StoreItem(tmp_path / f"{n}.dcm", CT, f"1.2.{n}", syntaxes.EXPLICIT_VR_LE,
                       done=lambda n=n: events.append(f"done 1.2.{n}")) for n in range(3)]

    def feed():
        yield items[0]
        yield items[1]
        cancel.set()    # the request went away: the last item is not sent, and still given back
        yield items[2]

    results = store_loop.store_all(Engine(), feed(), tmp_path, cancel)
    assert [r.confirmed for r in results] == [True, True, False]
    assert events == ["sent 1.2.0", "done 1.2.0", "sent 1.2.1", "done 1.2.1", "done 1.2.2", "closed"]


def test_the_inline_header_read_answers_as_pydicom_does_or_leaves_it_to_pydicom(tmp_path):
    from gateway.stow import prepare
    from gateway.stow.receive import Part

    def part_of(data: bytes, name: str) -> Part:
        path = tmp_path / name
        path.write_bytes(data)
        return Part({}, path, size=len(data), complete=True)

    study = generate_uid()
    ds = instance(study)
    good = part_of(part10(ds), "good")
    inline = prepare.prepare_instance_inline(good, None)
    assert inline is not None and inline == prepare.prepare_instance(good, None, tmp_path)
    (entry,) = inline
    assert entry.header == prepare.Header(CT, ds.SOPInstanceUID, syntaxes.EXPLICIT_VR_LE, study,
                                          ds.SeriesInstanceUID)
    # Another study than the URL's: the same failure either way.
    assert prepare.prepare_instance_inline(good, "1.2.3") == prepare.prepare_instance(good, "1.2.3", tmp_path)
    (mismatch,) = prepare.prepare_instance_inline(good, "1.2.3") or []
    assert mismatch.status == st.STUDY_UID_MISMATCH
    # Not the common case: no preamble, a meta that contradicts the data set, several UID values.
    assert prepare.prepare_instance_inline(part_of(part10(ds)[128:], "no-preamble"), None) is None
    uid = ds.SOPInstanceUID.encode()
    wrong = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    data = part10(ds)
    contradicting = data.replace(uid, wrong, 1)   # the first one is the file meta's
    assert contradicting != data and contradicting.count(wrong) == 1
    assert prepare.prepare_instance_inline(part_of(contradicting, "inconsistent"), None) is None
    several = instance(study)
    several.SeriesInstanceUID = [generate_uid(), generate_uid()]
    assert prepare.prepare_instance_inline(part_of(part10(several), "several"), None) is None
    assert prepare.prepare_instance_inline(part_of(b"not DICOM at all", "junk"), None) is None


def test_a_part_that_fills_the_memory_window_moves_to_disk_whole(env):
    settings, spool, cache = env
    pacs = FakePacs()
    service = StowService(settings, pacs, cache, spool)
    service.window = MemoryWindow(limit=3000)   # less than the instance: it starts in memory
    study = generate_uid()
    ds = instance(study)
    ds.Rows = ds.Columns = 64
    ds.PixelData = bytes(range(256)) * 32       # 8 KiB, received in 997-byte chunks
    fds = open_fds()
    outcomes = asyncio.run(service.store(settings.nodes[0], root_type=DICOM, boundary=BOUNDARY,
                                         body=chunks(body_of([(DICOM, part10(ds))])), study=None))
    assert [o.status for o in outcomes] == [0]
    (_, (item,), workdir), = pacs.calls
    assert item.path is not None and item.path.parent == workdir   # moved to disk half-way
    assert pacs.files[ds.SOPInstanceUID] == part10(ds)       # every byte, in order
    assert service.window.used == 0 and open_fds() == fds and incoming(env) == []


def test_an_in_memory_part_is_a_file_only_when_a_reader_asks_and_until_it_is_released():
    from gateway.stow.receive import Part

    window = MemoryWindow(limit=1 << 20)
    data = bytes(range(256)) * 100
    pieces: list[bytes | memoryview] = [memoryview(data)[:1000], data[1000:1001], memoryview(data)[1001:]]
    window.take(len(data))
    part = Part({}, size=len(data), complete=True, pieces=pieces, window=window)
    fds = open_fds()
    assert part.head(1500) == data[:1500] and part.head(10 ** 6) == data and open_fds() == fds   # no file
    path = part.file()
    assert path.read_bytes() == data and part.file() == path and open_fds() == fds + 1          # made once
    part.release()
    assert open_fds() == fds and pieces == [] and window.used == 0   # emptied in place, window given back
    part.release()                                                   # idempotent
    assert window.used == 0
    with pytest.raises(ValueError):
        part.file()
