"""The two limits a PACS profile learns and what the gateway does with them: a PACS result cap
(one truncation rule for QIDO-RS, gateway/search.py ``cut_short``) and how long idle query
associations are kept (gateway/dimse/pool.py), docs/architecture.md "PACS profiles"."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from pydicom.dataset import Dataset

from cache.memory import MemoryCache
from gateway.dimse.pool import Pool, idle_seconds_for
from gateway.errors import AssociationAborted, GatewayError
from gateway.pacs import FindResult
from gateway.profile.decide import resolve
from gateway.search import SearchService, cut_short
from gateway.settings import settings_from_dict
from tests.support.fake_pacs import FakePacs
from translators import qido as q

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def node(**extra: object):
    return settings_from_dict({"nodes": [{"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": 11112,
                                          "max_results": 10, **extra}]}).nodes[0]


def found(n: int, *, truncated: bool = False) -> FindResult:
    return FindResult("a", [Dataset() for _ in range(n)], truncated=truncated)


# ------------------------------------------------------------------------------------ result cap


def test_one_rule_for_both_caps():
    capped = resolve(node(result_cap=4), None).node
    assert cut_short(capped, found(4)) == "its PACS's own result cap (4 matches per query)"
    assert cut_short(capped, found(3)) is None
    assert cut_short(capped, found(5)) is None, "more than the cap: the cap is not what ended it"
    assert cut_short(capped, found(10, truncated=True)) == "its result limit (10)"
    unknown = resolve(node(), None).node
    assert unknown.result_cap == 0 and cut_short(unknown, found(4)) is None


async def test_an_answer_the_pacs_cap_may_have_cut_gets_a_warning():
    pacs = FakePacs()
    for i in (1, 2):
        pacs.add("a", f"1.2.{i}", f"1.2.{i}.1", f"1.2.{i}.1.1")
    settings = settings_from_dict({"nodes": [{"name": "a", "ae_title": "A", "host": "127.0.0.1",
                                              "port": 11112, "result_cap": 2}]})
    service = SearchService(settings, pacs, MemoryCache())
    outcome = await service.search(q.parse_query("study", []), settings.nodes, "http://gw/dicom-web",
                                   use_cache=False)
    assert len(outcome.datasets) == 2
    assert any("node a has more matches than its PACS's own result cap (2 matches per query)" in w
               for w in outcome.warnings), outcome.warnings
    one = await service.search(q.parse_query("study", [("StudyInstanceUID", "1.2.1")]), settings.nodes,
                               "http://gw/dicom-web", use_cache=False)
    assert len(one.datasets) == 1 and not any("result cap" in w for w in one.warnings)


# ------------------------------------------------------------------------------------ idle associations


class Assoc:
    def __init__(self) -> None:
        self.is_established = True
        self.closed = False


def a_pool(idle: float) -> tuple[Pool[Assoc], list[Assoc]]:
    opened: list[Assoc] = []

    def opener() -> Assoc:
        opened.append(Assoc())
        return opened[-1]

    def closer(a: Assoc) -> None:
        a.closed = True

    return Pool(node(), opener, closer, idle_seconds=idle), opened


def test_idle_seconds_follow_the_effective_node():
    assert idle_seconds_for(node()) == 5.0, "a raw node: the pool's default"
    assert idle_seconds_for(resolve(node(query_idle_seconds=0.5), None).node) == 0.5
    assert idle_seconds_for(replace(node(), query_idle_seconds=0.0)) == 0.0


def test_no_reuse_closes_at_once():
    pool, opened = a_pool(0.0)
    first, reused = pool.acquire()
    pool.release(first, reusable=True)
    assert first.closed and pool.idle == 0
    second, reused = pool.acquire()
    assert not reused and second is not first and len(opened) == 2


def test_an_association_idle_longer_than_the_node_allows_is_not_handed_out():
    pool, opened = a_pool(5.0)
    first, _ = pool.acquire()
    pool.release(first, reusable=True)
    pool.idle_seconds = 0.05            # the profile learned that the PACS drops idle ones sooner
    time.sleep(0.1)
    second, reused = pool.acquire()
    assert not reused and first.closed and second is not first
    assert pool.stale == 0, "never found dead: it was closed before the PACS would have"


def test_a_dead_pooled_association_is_counted_and_retried_once():
    from gateway.dimse.pool import pooled_find

    pool, opened = a_pool(5.0)
    first, _ = pool.acquire()
    pool.release(first, reusable=True)
    attempts: list[Assoc] = []

    def collect(a: Assoc) -> None:
        attempts.append(a)
        if a is first:       # the PACS closed it while idle; the engine only learns so on use
            raise AssociationAborted("gone", node="a")

    result = pooled_find(pool, FindResult("a"), 10, acquire=pool.acquire, accepts=lambda a: True,
                         refused=lambda: GatewayError("refused"), collect=collect)
    assert result.datasets == [] and attempts == [first, opened[1]] and pool.stale == 1
