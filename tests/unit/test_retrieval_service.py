"""The retrieval service's decisions, with an in-memory PACS behind the Pacs interface.

Identity (a node's data only for that node), freshness (manifests and metadata under the study
generation), pins (nothing evicted under a reader), single-flight, wrong-study 404, completeness;
first bytes before the manifest, one locate and one manifest C-FIND per burst, unlisted arrivals.
"""

from __future__ import annotations

import asyncio
from io import BytesIO

import orjson
import pytest
from pydicom import dcmread

from cache import keys
from cache.memory import MemoryCache
from cache.spool import Spool
from gateway.errors import NotFound, PacsError
from gateway.inflight import InFlight
from gateway.instances import InstanceReader
from gateway.retrieval.fetch import RetrievalFailed
from gateway.retrieval.service import RetrievalService
from gateway.settings import settings_from_dict
from tests.support.fake_pacs import FakePacs
from translators import media
from translators.uids import StudyId

pytestmark = pytest.mark.anyio
STUDY, SERIES = "1.2.3", "1.2.3.4"
ANY = media.Selection(True, "application/dicom", "*", True)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def sop(i: int) -> str:
    return f"1.2.3.4.{i}"


def make(tmp_path, pacs: FakePacs, *, spool_bytes: int = 1 << 30, series_for_frames: bool = True):
    nodes = [{"name": n, "ae_title": n.upper(), "host": "127.0.0.1", "port": 11112} for n in ("a", "b")]
    settings = settings_from_dict({"nodes": nodes, "retrieval": {"series_for_frames": series_for_frames}})
    cache = MemoryCache()
    spool = Spool(tmp_path / "spool", spool_bytes)
    reader = InstanceReader()
    service = RetrievalService(settings, pacs, cache, spool, reader, None)
    return settings, cache, spool, reader, service


async def collect(stream) -> list[bytes]:
    out = []
    try:
        async for part in stream:
            content = part.content if isinstance(part.content, bytes) else b"".join([c async for c in part.content])
            out.append(content)
    finally:
        await stream.aclose()
    return out


def marker(data: bytes) -> str:
    return str(dcmread(BytesIO(data)).SeriesDescription)


@pytest.fixture
def two_nodes_same_uids():
    pacs = FakePacs()
    for i in (1, 2, 3):
        pacs.add("a", STUDY, SERIES, sop(i), marker="from a")
        pacs.add("b", STUDY, SERIES, sop(i), marker="from b")
    return pacs


async def test_each_node_answers_with_its_own_objects_cold_and_warm(tmp_path, two_nodes_same_uids):
    settings, cache, spool, reader, service = make(tmp_path, two_nodes_same_uids)
    a, b = settings.node("a"), settings.node("b")
    for _ in range(2):                                   # cold, then warm (both spooled)
        got_a = await collect(await service.parts([a], STUDY, SERIES, None, ANY))
        got_b = await collect(await service.parts([b], STUDY, SERIES, None, ANY))
        assert [marker(d) for d in got_a] == ["from a"] * 3
        assert [marker(d) for d in got_b] == ["from b"] * 3
    assert two_nodes_same_uids.calls["get"] == 2, "each node retrieved once, then served from its spool"
    meta_a = await service.metadata([a], STUDY, SERIES, None)
    meta_b = await service.metadata([b], STUDY, SERIES, None)
    assert b"from a" in meta_a.json and b"from b" not in meta_a.json and meta_a.node is a
    assert b"from b" in meta_b.json and b"from a" not in meta_b.json
    reader.close()


async def test_a_node_that_is_down_is_an_error_even_with_another_nodes_copy_spooled(tmp_path, two_nodes_same_uids):
    settings, cache, spool, reader, service = make(tmp_path, two_nodes_same_uids)
    a, b = settings.node("a"), settings.node("b")
    await collect(await service.parts([a], STUDY, SERIES, None, ANY))
    await service.metadata([a], STUDY, SERIES, None)
    two_nodes_same_uids.down.add("b")
    with pytest.raises(PacsError) as err:
        await service.metadata([b], STUDY, SERIES, None)
    assert err.value.node == "b"
    with pytest.raises(PacsError):
        async with service.instance([b], STUDY, SERIES, sop(1)):
            pass
    with pytest.raises(PacsError):
        await service.parts([b], STUDY, SERIES, sop(1), ANY)
    reader.close()


async def test_wrong_study_with_the_right_series_is_not_found_cold_and_warm(tmp_path, two_nodes_same_uids):
    settings, cache, spool, reader, service = make(tmp_path, two_nodes_same_uids)
    a = settings.node("a")
    wrong = "9.9.9"
    for warm in (False, True):
        if warm:
            await collect(await service.parts([a], STUDY, SERIES, None, ANY))
            await service.metadata([a], STUDY, SERIES, None)
        with pytest.raises(NotFound):
            await service.metadata([a], wrong, SERIES, None)
        with pytest.raises(NotFound):
            async with service.instance([a], wrong, SERIES, sop(1)):
                pass
        with pytest.raises(NotFound):
            await service.parts([a], wrong, SERIES, None, ANY)
    reader.close()


async def test_a_store_into_the_study_makes_manifest_and_metadata_fresh(tmp_path, two_nodes_same_uids):
    settings, cache, spool, reader, service = make(tmp_path, two_nodes_same_uids)
    a = settings.node("a")
    assert len(await collect(await service.parts([a], STUDY, SERIES, None, ANY))) == 3
    meta = await service.metadata([a], STUDY, SERIES, None)
    assert meta.json.count(b'"00080018"') == 3
    two_nodes_same_uids.add("a", STUDY, SERIES, sop(4), marker="new")
    # Without a generation bump, the memoised manifest and the cached metadata still stand.
    assert (await service.metadata([a], STUDY, SERIES, None)).json == meta.json
    for counter in keys.generations_changed_by_store("a", [STUDY]):
        await cache.incr(counter)
    assert (await service.metadata([a], STUDY, SERIES, None)).json.count(b'"00080018"') == 4
    assert len(await collect(await service.parts([a], STUDY, SERIES, None, ANY))) == 4
    reader.close()


async def test_another_studys_generation_leaves_the_series_cached(tmp_path, two_nodes_same_uids):
    settings, cache, spool, reader, service = make(tmp_path, two_nodes_same_uids)
    a = settings.node("a")
    await service.metadata([a], STUDY, SERIES, None)
    finds = two_nodes_same_uids.calls["find"]
    await cache.incr(keys.study_generation(StudyId("a", "7.7.7")))
    await cache.incr(keys.study_generation(StudyId("b", STUDY)))
    await service.metadata([a], STUDY, SERIES, None)
    assert two_nodes_same_uids.calls["find"] == finds, "exactly what changed is invalidated"
    reader.close()


async def test_concurrent_requests_share_one_retrieval(tmp_path, two_nodes_same_uids):
    settings, cache, spool, reader, service = make(tmp_path, two_nodes_same_uids)
    a = settings.node("a")
    two_nodes_same_uids.gate = asyncio.Event()
    streams = [asyncio.ensure_future(service.parts([a], STUDY, SERIES, None, ANY)) for _ in range(5)]
    await asyncio.sleep(0.05)
    two_nodes_same_uids.gate.set()
    results = [await collect(await s) for s in streams]
    assert all(len(r) == 3 for r in results)
    assert two_nodes_same_uids.calls["get"] == 1
    reader.close()


async def test_nothing_a_reader_holds_is_evicted_from_a_spool_smaller_than_the_work(tmp_path):
    pacs = FakePacs()
    for series in ("1.2.3.4", "1.2.3.5", "1.2.3.6"):
        for i in range(1, 6):
            pacs.add("a", STUDY, series, f"{series}.{i}", size=4000)
    settings, cache, spool, reader, service = make(tmp_path, pacs, spool_bytes=6000)
    a = settings.node("a")
    streams = [await service.parts([a], STUDY, s, None, ANY) for s in ("1.2.3.4", "1.2.3.5", "1.2.3.6")]
    # Every stream's instances stay readable while it is open, however full the spool.
    for stream in streams:
        assert len(await collect(stream)) == 5
    async with service.instance([a], STUDY, "1.2.3.5", "1.2.3.5.2") as entry:
        await collect(await service.parts([a], STUDY, "1.2.3.6", None, ANY))   # pressure while pinned
        assert entry.path.exists() and (await reader.metadata(entry))
    for _ in range(200):        # the rest of the series a frame request started keeps coming in the background
        if not service.fetcher._fetches:
            break
        await asyncio.sleep(0.01)
    put_pressure = await service.parts([a], STUDY, "1.2.3.4", None, ANY)
    await collect(put_pressure)
    assert spool.total_bytes <= 6000, "once released, the spool is back within its budget"
    reader.close()


async def test_an_instance_the_pacs_does_not_deliver_is_an_error_not_a_short_answer(tmp_path, two_nodes_same_uids):
    settings, cache, spool, reader, service = make(tmp_path, two_nodes_same_uids)
    a = settings.node("a")
    original = two_nodes_same_uids.get

    async def short_get(node, request, on_instance, cancel):
        def skip_last(data, uid, cls, ts):
            if uid != sop(3):
                on_instance(data, uid, cls, ts)
        return await original(node, request, skip_last, cancel)

    two_nodes_same_uids.get = short_get
    stream = await service.parts([a], STUDY, SERIES, None, ANY)
    with pytest.raises(RetrievalFailed):
        await collect(stream)
    reader.close()


async def test_federated_requests_take_the_first_node_holding_the_study(tmp_path):
    pacs = FakePacs()
    pacs.add("b", STUDY, SERIES, sop(1), marker="only b")
    settings, cache, spool, reader, service = make(tmp_path, pacs)
    nodes = list(settings.nodes)
    meta = await service.metadata(nodes, STUDY, SERIES, None)
    assert meta.node.name == "b" and b"only b" in meta.json
    assert await cache.smembers(keys.study_locations(STUDY)) == {"b"}
    reader.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_instance_syntax_rule(anyio_backend):
    ex, im, jpeg = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"
    assert media.instance_syntax(im, "*", explicit=True) == ex, "Implicit VR LE never goes to a web client"
    assert media.instance_syntax(jpeg, "*", explicit=True) == jpeg
    assert media.instance_syntax(jpeg, None, explicit=False) == jpeg, "lossy data is not decompressed unasked"
    assert media.instance_syntax(im, None, explicit=False) == ex
    assert media.instance_syntax(ex, jpeg, explicit=True) is None, "no lossy encoding on request (406)"
    assert media.instance_syntax(ex, jpeg, explicit=False) == ex


# ----------------------------------------------------------------------------- first bytes at once


async def test_the_first_part_is_in_hand_before_the_manifest_is_listed(tmp_path, two_nodes_same_uids):
    pacs = two_nodes_same_uids
    settings, cache, spool, reader, service = make(tmp_path, pacs)
    a = settings.node("a")
    pacs.manifest_gate = asyncio.Event()
    stream = await asyncio.wait_for(service.parts([a], STUDY, SERIES, None, ANY), 10)
    assert pacs.finds["IMAGE"] == 1 and not pacs.manifest_gate.is_set(), "the manifest is still being listed"
    assert [r.level for r in pacs.retrieves] == ["SERIES"], "the retrieval did not wait for it"
    collecting = asyncio.ensure_future(collect(stream))
    await asyncio.sleep(0.1)
    assert not collecting.done(), "the stream does not end before completeness is judged"
    pacs.manifest_gate.set()
    assert [marker(d) for d in await asyncio.wait_for(collecting, 10)] == ["from a"] * 3
    reader.close()


async def test_a_frame_storm_on_a_cold_series_asks_the_pacs_once(tmp_path):
    pacs = FakePacs(find_delay=0.1)
    for i in range(1, 41):
        pacs.add("a", STUDY, SERIES, sop(i), marker="from a")
    settings, cache, spool, reader, service = make(tmp_path, pacs)
    nodes = list(settings.nodes)  # federated: the study must be located first

    async def frame(i: int) -> str:
        async with service.instance(nodes, STUDY, SERIES, sop(i)) as entry:
            return entry.sop_instance_uid

    assert await asyncio.gather(*(frame(i) for i in range(1, 41))) == [sop(i) for i in range(1, 41)]
    assert pacs.finds == {"STUDY": 1, "IMAGE": 1}, "one locate and one manifest for 40 requests"
    assert service.retrievals_started == 1
    assert pacs.retrieves[0].level == "IMAGE" and len(pacs.retrieves) <= 2, "the first asked-for, then the rest"
    reader.close()


async def test_a_wrong_study_is_not_found_on_a_pacs_that_ignores_the_study_key(tmp_path, two_nodes_same_uids):
    pacs = two_nodes_same_uids
    pacs.by_level_key_only = True   # as Orthanc: a SERIES-level C-GET by series UID, IMAGE-level by SOP UID
    settings, cache, spool, reader, service = make(tmp_path, pacs)
    a = settings.node("a")
    wrong = "9.9.9"
    for warm in (False, True):
        if warm:
            assert len(await collect(await service.parts([a], STUDY, SERIES, None, ANY))) == 3
        with pytest.raises(NotFound):
            await service.parts([a], wrong, SERIES, None, ANY)
        with pytest.raises(NotFound):
            async with service.instance([a], wrong, SERIES, sop(1)):
                pass
        with pytest.raises(NotFound):
            await service.metadata([a], wrong, SERIES, None)
        assert pacs.refused, "the PACS delivered the real series; its headers named another study"
        assert all(spool.get("a", sop(i)) is None or spool.get("a", sop(i)).study_uid == STUDY
                   for i in (1, 2, 3)), "nothing was filed under the wrong study"
    reader.close()


async def test_an_instance_the_manifest_does_not_list_is_served_after_the_listed_ones(tmp_path, two_nodes_same_uids):
    pacs = two_nodes_same_uids
    pacs.unlisted = {sop(2)}      # stored on the PACS after the C-FIND answered, before the C-GET
    settings, cache, spool, reader, service = make(tmp_path, pacs)
    a = settings.node("a")
    got = await collect(await service.parts([a], STUDY, SERIES, None, ANY))
    assert sorted(str(dcmread(BytesIO(d)).SOPInstanceUID) for d in got) == [sop(1), sop(2), sop(3)]
    meta = await service.metadata([a], STUDY, SERIES, None, use_cache=False)
    order = [item["00080018"]["Value"][0] for item in orjson.loads(meta.json)]
    assert order == [sop(1), sop(3), sop(2)], "manifest order, then what it did not list"
    reader.close()


async def test_frames_beside_a_cold_metadata_request_are_answered_as_their_instances_arrive(
        tmp_path, two_nodes_same_uids):
    pacs = two_nodes_same_uids
    settings, cache, spool, reader, service = make(tmp_path, pacs)
    a = settings.node("a")
    pacs.manifest_gate = asyncio.Event()
    metadata = asyncio.ensure_future(service.metadata([a], STUDY, SERIES, None))
    await asyncio.sleep(0.01)
    for i in (3, 1, 2):   # joined to the metadata request's fetch; none waits for it
        async with service.instance([a], STUDY, SERIES, sop(i)) as entry:
            assert entry.sop_instance_uid == sop(i)
    assert not metadata.done(), "metadata waits for the manifest (completeness), frames did not"
    pacs.manifest_gate.set()
    assert (await asyncio.wait_for(metadata, 10)).json.count(b'"00080018"') == 3
    assert pacs.calls["get"] == 1 and pacs.finds["IMAGE"] == 1
    reader.close()


async def test_one_call_in_flight_is_shared_and_cancelled_only_when_its_last_caller_leaves():
    calls: list[asyncio.Event] = []

    async def slow() -> int:
        done = asyncio.Event()
        calls.append(done)
        try:
            await asyncio.sleep(10)
        finally:
            done.set()
        return 1

    shared: InFlight[str, int] = InFlight()
    first = asyncio.ensure_future(shared.run("k", slow))
    second = asyncio.ensure_future(shared.run("k", slow))
    await asyncio.sleep(0.01)
    assert len(calls) == 1, "one call for two callers"
    first.cancel()
    await asyncio.sleep(0.01)
    assert not calls[0].is_set(), "the other caller still waits for it"
    second.cancel()
    await asyncio.sleep(0.01)
    assert calls[0].is_set(), "the last caller left: the call is cancelled"
    third = asyncio.ensure_future(shared.run("k", slow))
    await asyncio.sleep(0.01)
    assert len(calls) == 2, "a caller after that starts a new call"
    third.cancel()
