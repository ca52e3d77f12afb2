"""Single-flight C-FINDs (gateway/coalescing.py) over a PACS that counts and can be held: joiners share
one C-FIND, errors and cancellation follow the flight, and two "replicas" (two wrappers over one
shared cache) coalesce through the lease and the published outcome."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from pydicom.dataset import Dataset

from cache import keys
from cache.memory import MemoryCache
from gateway import coalescing
from gateway.coalescing import CoalescingPacs
from gateway.errors import DimseFailure, NodeUnreachable
from gateway.observability import Registry
from gateway.pacs import FindResult, QueryModel
from gateway.query_cache import identifier_digest
from gateway.settings import PacsNode, settings_from_dict

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


NODE: PacsNode = settings_from_dict({"nodes": [{"name": "a", "ae_title": "A", "host": "127.0.0.1",
                                                "port": 11112}]}).nodes[0]


class HeldPacs:
    """find() counts, waits for ``release`` and answers one study per identifier (or fails)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.cancelled = 0
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.error: Exception | None = None

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult:
        self.calls[str(identifier.StudyInstanceUID)] += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            await asyncio.sleep(0.05)      # stopping takes a moment (C-CANCEL); callers wait for it
            raise
        if self.error is not None:
            raise self.error
        ds = Dataset()
        ds.StudyInstanceUID = identifier.StudyInstanceUID
        ds.PatientID = "P1"
        return FindResult(node.name, [ds], truncated=False)

    def query_associations_opened(self, node: PacsNode) -> int:
        return 0

    async def close(self) -> None:
        pass


def ident(study: str = "1.2.3") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    ds.PatientID = ""
    return ds


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_concurrent_identical_finds_share_one_c_find():
    pacs = HeldPacs()
    coalescer = CoalescingPacs(pacs)
    calls = [asyncio.ensure_future(coalescer.find(NODE, ident())) for _ in range(10)]
    other = asyncio.ensure_future(coalescer.find(NODE, ident("1.2.4")))
    capped = asyncio.ensure_future(coalescer.find(NODE, ident(), max_results=5))
    await until(lambda: sum(pacs.calls.values()) == 3)
    pacs.release.set()
    results = await asyncio.gather(*calls)
    assert pacs.calls == {"1.2.3": 2, "1.2.4": 1}, "one per identifier and cap"
    assert all(r is results[0] for r in results), "joiners get the same (read-only) result"
    assert str((await other).datasets[0].StudyInstanceUID) == "1.2.4"
    await capped
    assert coalescer.flights == 3 and coalescer.joined == 9


async def test_the_counters_are_exported_by_node():
    registry = Registry()
    pacs = HeldPacs()
    coalescer = CoalescingPacs(pacs, registry=registry)
    other: PacsNode = settings_from_dict({"nodes": [{"name": "b", "ae_title": "B", "host": "127.0.0.1",
                                                     "port": 11113}]}).nodes[0]
    calls = [asyncio.ensure_future(coalescer.find(NODE, ident())) for _ in range(4)]
    calls.append(asyncio.ensure_future(coalescer.find(other, ident())))
    await until(lambda: sum(pacs.calls.values()) == 2)
    pacs.release.set()
    await asyncio.gather(*calls)
    lines = registry.render().splitlines()
    assert "# HELP dwg_find_flights_total C-FINDs started by the single-flight (run here, or followed on " \
           "another replica)" in lines
    assert "# TYPE dwg_find_joined_total counter" in lines
    assert "# TYPE dwg_find_followed_total counter" in lines
    assert 'dwg_find_flights_total{node="a"} 1.0' in lines and 'dwg_find_flights_total{node="b"} 1.0' in lines
    assert 'dwg_find_joined_total{node="a"} 3.0' in lines
    assert not any(line.startswith(("dwg_find_joined_total{node=\"b\"", "dwg_find_followed_total{"))
                   for line in lines), "nothing counted, nothing shown"
    assert (coalescer.flights, coalescer.joined, coalescer.followed) == (2, 3, 0)   # the sums


async def test_a_completed_flight_is_never_reused():
    pacs = HeldPacs()
    pacs.release.set()
    coalescer = CoalescingPacs(pacs)
    await coalescer.find(NODE, ident())
    await coalescer.find(NODE, ident())
    assert pacs.calls["1.2.3"] == 2


async def test_an_error_goes_to_that_flights_callers_only_each_its_own_copy():
    pacs = HeldPacs()
    pacs.error = DimseFailure("node a answered A700", node="a", status=0xA700)
    coalescer = CoalescingPacs(pacs)
    calls = [asyncio.ensure_future(coalescer.find(NODE, ident())) for _ in range(3)]
    await until(lambda: pacs.calls["1.2.3"] == 1)
    pacs.release.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, DimseFailure) and o.status == 0xA700 and o.node == "a" for o in outcomes)
    assert len({id(o) for o in outcomes}) == 3, "callers amend errors: each gets its own"
    pacs.error = None
    assert (await coalescer.find(NODE, ident())).datasets, "the error was not kept"
    assert pacs.calls["1.2.3"] == 2


async def test_one_caller_leaving_does_not_cancel_the_others_the_last_one_does():
    pacs = HeldPacs()
    coalescer = CoalescingPacs(pacs)
    first, second = (asyncio.ensure_future(coalescer.find(NODE, ident())) for _ in range(2))
    await pacs.started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert pacs.cancelled == 0
    pacs.release.set()
    assert (await second).datasets
    assert pacs.calls["1.2.3"] == 1

    held = HeldPacs()
    coalescer = CoalescingPacs(held)
    waiters = [asyncio.ensure_future(coalescer.find(NODE, ident())) for _ in range(2)]
    await held.started.wait()
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert held.cancelled == 1, "the last caller leaving cancels the C-FIND, and waits for it to stop"
    # A caller arriving afterwards starts a new flight.
    held.release.set()
    assert (await coalescer.find(NODE, ident())).datasets
    assert held.calls["1.2.3"] == 2


async def test_the_identifier_is_the_flights_own():
    pacs = HeldPacs()
    coalescer = CoalescingPacs(pacs)
    mine = ident()
    call = asyncio.ensure_future(coalescer.find(NODE, mine))
    await asyncio.sleep(0)
    mine.StudyInstanceUID = "9.9.9"            # the caller reuses its data set
    pacs.release.set()
    assert str((await call).datasets[0].StudyInstanceUID) == "1.2.3"


# ------------------------------------------------------------------ two replicas, one shared cache


def replicas(registry_b: Registry | None = None) -> tuple[MemoryCache, HeldPacs, CoalescingPacs, HeldPacs,
                                                          CoalescingPacs]:
    cache = MemoryCache()
    a, b = HeldPacs(), HeldPacs()
    return cache, a, CoalescingPacs(a, cache), b, CoalescingPacs(b, cache, registry_b)


async def test_replicas_share_one_c_find_through_the_lease():
    registry = Registry()
    cache, pacs_a, a, pacs_b, b = replicas(registry)
    lead = asyncio.ensure_future(a.find(NODE, ident()))
    await pacs_a.started.wait()
    follow = [asyncio.ensure_future(b.find(NODE, ident())) for _ in range(3)]
    await asyncio.sleep(0.05)
    pacs_a.release.set()
    results = await asyncio.gather(lead, *follow)
    assert pacs_a.calls["1.2.3"] == 1 and not pacs_b.calls, "one C-FIND for both replicas"
    assert [str(r.datasets[0].StudyInstanceUID) for r in results] == ["1.2.3"] * 4
    assert str(results[1].datasets[0].PatientID) == "P1" and results[1].node == "a"
    assert b.followed == 1 and b.joined == 2
    exposition = registry.render()
    assert 'dwg_find_followed_total{node="a"} 1.0\n' in exposition     # /metrics, by node
    assert 'dwg_find_flights_total{node="a"} 1.0\n' in exposition
    assert 'dwg_find_joined_total{node="a"} 2.0\n' in exposition
    lease = keys.find_lease("a", identifier_digest(ident(), "study", None))
    assert await cache.get(lease) is None, "the lease is released"


async def test_a_followed_error_is_raised_on_the_other_replica():
    _, pacs_a, a, pacs_b, b = replicas()
    pacs_a.error = NodeUnreachable("node a is unreachable", node="a")
    lead = asyncio.ensure_future(a.find(NODE, ident()))
    await pacs_a.started.wait()
    follow = asyncio.ensure_future(b.find(NODE, ident()))
    await asyncio.sleep(0.05)
    pacs_a.release.set()
    for call in (lead, follow):
        with pytest.raises(NodeUnreachable) as err:
            await call
        assert err.value.node == "a"
    assert not pacs_b.calls


async def test_when_the_holders_clients_leave_the_follower_asks_itself():
    _, pacs_a, a, pacs_b, b = replicas()
    lead = asyncio.ensure_future(a.find(NODE, ident()))
    await pacs_a.started.wait()
    follow = asyncio.ensure_future(b.find(NODE, ident()))
    await asyncio.sleep(0.05)
    lead.cancel()
    await asyncio.gather(lead, return_exceptions=True)
    assert pacs_a.cancelled == 1
    await pacs_b.started.wait()
    pacs_b.release.set()
    assert (await asyncio.wait_for(follow, 2)).datasets
    assert pacs_b.calls["1.2.3"] == 1


async def test_a_dead_holder_is_taken_over_when_its_lease_expires(monkeypatch):
    monkeypatch.setattr(coalescing, "POLL", 0.05)
    cache, _, _, pacs_b, b = replicas()
    lease = keys.find_lease("a", identifier_digest(ident(), "study", None))
    await cache.set_nx(lease, b"dead-replica", 0.3)     # a holder that will never publish
    pacs_b.release.set()
    started = asyncio.get_running_loop().time()
    assert (await asyncio.wait_for(b.find(NODE, ident()), 3)).datasets
    assert asyncio.get_running_loop().time() - started >= 0.25, "it waited for the lease first"
    assert pacs_b.calls["1.2.3"] == 1 and b.followed == 0


async def test_a_holder_slower_than_the_wait_limit_is_not_waited_for(monkeypatch):
    monkeypatch.setattr(coalescing, "POLL", 0.05)
    monkeypatch.setattr(coalescing, "wait_limit", lambda node: 0.3)
    _, pacs_a, a, pacs_b, b = replicas()
    lead = asyncio.ensure_future(a.find(NODE, ident()))
    await pacs_a.started.wait()
    pacs_b.release.set()
    assert (await asyncio.wait_for(b.find(NODE, ident()), 3)).datasets
    assert pacs_b.calls["1.2.3"] == 1, "the follower asked the node itself"
    pacs_a.release.set()
    await lead
