"""The cluster coordinator's decisions, two replicas in one process over one shared in-process cache.

A fake replica client copies straight from the other replica's spool (what the internal endpoint
serves); the PACS is a function that commits instances like the real fetcher does.
"""

from __future__ import annotations

import asyncio

import pytest

from cache.memory import MemoryCache
from cache.spool import Spool, SpoolEntry
from gateway.cluster.arrivals import Arrival
from gateway.cluster.coordinator import ClusterCoordinator
from gateway.errors import DimseTimeout
from gateway.retrieval.fetch import InstanceRef, Manifest, SeriesFetch
from translators.uids import SeriesId

pytestmark = pytest.mark.anyio
UIDS = [f"1.2.3.4.{i}" for i in range(1, 6)]
TS, CT = "1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def anyio_backend():
    return "asyncio"


class FakeReplicaClient:
    """Serves copies out of the holder's spool, as GET /internal/instances/{node}/{sop} does."""

    def __init__(self, spools: dict[str, Spool]) -> None:
        self.spools = spools
        self.copied: list[tuple[str, str]] = []

    async def copy(self, spool: Spool, url: str, arrival: Arrival, fetch: SeriesFetch) -> SpoolEntry | None:
        source = self.spools[url].get(fetch.manifest.node, arrival.sop)
        if source is None:
            return None
        self.copied.append((fetch.manifest.node, arrival.sop))
        return spool.write(source.path.read_bytes(), fetch.manifest.instance_id(arrival.sop),
                           sop_class_uid=arrival.sop_class, transfer_syntax=arrival.transfer_syntax, pin=True)

    async def close(self) -> None:
        pass


def replica(tmp_path, name: str, cache: MemoryCache, spools: dict[str, Spool]) -> ClusterCoordinator:
    spool = spools[name] = Spool(tmp_path / name, 1 << 30)
    coordinator = ClusterCoordinator(cache, spool, "secret", name)
    coordinator.client = FakeReplicaClient(spools)  # type: ignore[assignment]
    return coordinator


def manifest(node: str = "a") -> Manifest:
    return Manifest(SeriesId(node, "1.2.3", "1.2.3.4"), [InstanceRef(u, CT, i) for i, u in enumerate(UIDS)])


def pacs_for(coordinator: ClusterCoordinator, fetch: SeriesFetch, calls: list[str], delay: float = 0.01):
    async def from_pacs(missing: list[str]) -> None:
        calls.append(coordinator.url)
        for uid in missing:
            await asyncio.sleep(delay)
            entry = coordinator.spool.write(b"DICM" + uid.encode() + fetch.manifest.node.encode(),
                                            fetch.manifest.instance_id(uid), sop_class_uid=CT,
                                            transfer_syntax=TS, pin=True)
            fetch.arrive(uid, entry)
    return from_pacs


async def run_both(tmp_path, node_b: str = "a", fail: BaseException | None = None):
    cache, spools, calls = MemoryCache(), {}, []
    one, two = replica(tmp_path, "r1", cache, spools), replica(tmp_path, "r2", cache, spools)
    loop = asyncio.get_running_loop()
    f1, f2 = SeriesFetch(loop, manifest("a"), one.spool), SeriesFetch(loop, manifest(node_b), two.spool)
    f1.join()
    f2.join()
    pacs1 = pacs_for(one, f1, calls)
    if fail is not None:
        async def pacs1(missing: list[str]) -> None:      # noqa: F811 - the holder's PACS fails
            calls.append(one.url)
            await asyncio.sleep(0.2)                        # while the follower follows it live
            raise fail
    first = asyncio.ensure_future(one.run(f1, pacs1))
    await asyncio.sleep(0.005)                              # r1 takes the lease first
    second = asyncio.ensure_future(two.run(f2, pacs_for(two, f2, calls)))
    results = await asyncio.gather(first, second, return_exceptions=True)
    return calls, f1, f2, two, results


async def test_one_replica_retrieves_the_other_copies_from_it(tmp_path):
    calls, f1, f2, two, results = await run_both(tmp_path)
    assert results == [None, None]
    assert calls == ["r1"], "only the lease holder asked the PACS"
    assert f1.missing == [] and f2.missing == []
    assert sorted(u for _, u in two.client.copied) == sorted(UIDS)
    assert f2.entry(UIDS[0]).path.read_bytes() == b"DICM" + UIDS[0].encode() + b"a"


async def test_the_same_series_uid_on_another_node_is_never_followed(tmp_path):
    calls, f1, f2, two, results = await run_both(tmp_path, node_b="b")
    assert results == [None, None]
    assert sorted(calls) == ["r1", "r2"], "node b's series is its own retrieval"
    assert two.client.copied == []
    assert f2.entry(UIDS[0]).path.read_bytes().endswith(b"b")


async def test_the_holders_verdict_on_the_pacs_reaches_the_follower_as_the_same_error(tmp_path):
    timeout = DimseTimeout("node a: C-GET timed out after 30.0 s", node="a")
    calls, f1, f2, two, results = await run_both(tmp_path, fail=timeout)
    assert results[0] is timeout
    assert isinstance(results[1], DimseTimeout) and results[1].node == "a"
    assert calls == ["r1"], "the follower does not ask a PACS the holder found timing out"


async def test_forged_arrivals_are_never_followed(tmp_path):
    """Whoever can write to Redis cannot make a replica send the cluster secret to its URL."""
    from cache import keys
    from gateway.cluster.arrivals import arrival_fields

    cache, spools, calls = MemoryCache(), {}, []
    one = replica(tmp_path, "r1", cache, spools)
    spools["http://evil"] = Spool(tmp_path / "evil", 1 << 30)
    loop = asyncio.get_running_loop()
    fetch = SeriesFetch(loop, manifest("a"), one.spool)
    fetch.join()
    forged = arrival_fields(UIDS[0], CT, TS, "attacker", "http://evil", secret=b"not the secret")
    unsigned = {k: v for k, v in forged.items() if k != b"sig"}
    await cache.xadd(keys.arrivals("forged"), forged, 60)
    await cache.xadd(keys.arrivals("forged"), unsigned, 60)
    await cache.xadd(keys.arrivals("forged"), {b"end": b"done"}, 60)
    await cache.set(keys.latest_retrieval(fetch.manifest.id), b"forged", 60)
    await one.run(fetch, pacs_for(one, fetch, calls))
    assert one.client.copied == [], "no copy from an unsigned or badly signed announcement"
    assert calls == ["r1"] and fetch.missing == []


class BlippyCache(MemoryCache):
    """Reads of the lease time out (a miss, degraded) a few times, as on a starved event loop."""

    def __init__(self, blips: int) -> None:
        super().__init__()
        self.blips = blips
        self._blipping = False

    @property
    def degraded(self) -> bool:  # type: ignore[override]
        return self._blipping

    async def get(self, key: str) -> bytes | None:
        if key.startswith("lease:") and self.blips > 0:
            self.blips -= 1
            self._blipping = True
            return None
        return await super().get(key)

    async def ping(self) -> bool:
        self._blipping = False
        return True


async def test_lease_reads_that_time_out_do_not_start_a_second_retrieval(tmp_path):
    cache, spools, calls = BlippyCache(blips=0), {}, []
    one, two = replica(tmp_path, "r1", cache, spools), replica(tmp_path, "r2", cache, spools)
    loop = asyncio.get_running_loop()
    f1, f2 = SeriesFetch(loop, manifest("a"), one.spool), SeriesFetch(loop, manifest("a"), two.spool)
    f1.join()
    f2.join()

    async def slow_pacs(missing: list[str]) -> None:
        await asyncio.sleep(0.3)                  # the holder is busy while r2's reads time out
        await pacs_for(one, f1, calls)(missing)

    first = asyncio.ensure_future(one.run(f1, slow_pacs))
    await asyncio.sleep(0.02)                     # r1 holds the lease
    cache.blips = 6                               # r2's next lease reads all time out
    second = asyncio.ensure_future(two.run(f2, pacs_for(two, f2, calls)))
    assert await asyncio.gather(first, second) == [None, None]
    assert calls == ["r1"], "the follower waited the blips out and copied instead of retrieving again"
    assert f2.missing == []
