"""The search service's decisions with an in-memory PACS: federation, the query cache and its
freshness, the location index, the Patient Root PatientID rule."""

from __future__ import annotations

import pytest

from cache import keys
from cache.memory import MemoryCache
from gateway.errors import PacsError
from gateway.patients import PatientIds
from gateway.search import SearchService
from gateway.settings import settings_from_dict
from tests.support.fake_pacs import FakePacs
from translators import qido as q
from translators.uids import StudyId

pytestmark = pytest.mark.anyio
STUDY, SERIES = "1.2.3", "1.2.3.4"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make(pacs: FakePacs, **node_extra):
    nodes = [{"name": n, "ae_title": n.upper(), "host": "127.0.0.1", "port": 11112, **node_extra} for n in ("a", "b")]
    settings = settings_from_dict({"nodes": nodes})
    cache = MemoryCache()
    return settings, cache, SearchService(settings, pacs, cache)


def instances_query():
    return q.parse_query("instance", [], study_uid=STUDY, series_uid=SERIES)


async def test_a_failed_node_leaves_the_others_results_with_a_warning(tmp_path):
    pacs = FakePacs()
    pacs.add("a", STUDY, SERIES, "1.2.3.4.1")
    pacs.down.add("b")
    settings, cache, service = make(pacs)
    outcome = await service.search(q.parse_query("study", []), settings.nodes, "http://gw/dicom-web")
    assert [str(d.StudyInstanceUID) for d in outcome.datasets] == [STUDY]
    assert any("node b failed" in w for w in outcome.warnings)
    assert await cache.smembers(keys.study_locations(STUDY)) == {"a"}, "the answering node is remembered"
    pacs.down.add("a")
    with pytest.raises(PacsError) as err:
        await service.search(q.parse_query("study", []), settings.nodes, "http://gw/dicom-web", use_cache=False)
    assert err.value.node == "a, b"


async def test_cached_results_until_a_store_changes_the_study(tmp_path):
    pacs = FakePacs()
    pacs.add("a", STUDY, SERIES, "1.2.3.4.1")
    settings, cache, service = make(pacs)
    a = [settings.node("a")]
    first = await service.search(instances_query(), a, "http://gw/dicom-web")
    finds = pacs.calls["find"]
    again = await service.search(instances_query(), a, "http://gw/dicom-web")
    assert pacs.calls["find"] == finds and len(again.datasets) == len(first.datasets) == 1
    pacs.add("a", STUDY, SERIES, "1.2.3.4.2")
    for counter in keys.generations_changed_by_store("a", [STUDY]):
        await cache.incr(counter)
    fresh = await service.search(instances_query(), a, "http://gw/dicom-web")
    assert pacs.calls["find"] > finds and len(fresh.datasets) == 2


async def test_a_store_on_another_node_keeps_this_nodes_cache(tmp_path):
    pacs = FakePacs()
    pacs.add("a", STUDY, SERIES, "1.2.3.4.1")
    settings, cache, service = make(pacs)
    a = [settings.node("a")]
    await service.search(instances_query(), a, "http://gw/dicom-web")
    finds = pacs.calls["find"]
    for counter in keys.generations_changed_by_store("b", [STUDY]):
        await cache.incr(counter)
    await service.search(instances_query(), a, "http://gw/dicom-web")
    assert pacs.calls["find"] == finds


async def test_patient_ids_one_rule_cached_per_node(tmp_path):
    pacs = FakePacs()
    pacs.add("a", STUDY, SERIES, "1.2.3.4.1")
    pacs.add("b", STUDY, SERIES, "1.2.3.4.1")
    settings, cache, _ = make(pacs, query_model="patient")

    async def find(node, ident, model):
        return await pacs.find(node, ident, model=model)

    patients = PatientIds(find, cache, 60)
    assert await patients.for_study(settings.node("a"), STUDY) == "PID-a"
    assert await patients.for_study(settings.node("b"), STUDY) == "PID-b", "each node has its own answer"
    finds = pacs.calls["find"]
    assert await patients.for_study(settings.node("a"), STUDY) == "PID-a"
    assert pacs.calls["find"] == finds, "cached"
    assert await cache.get(keys.patient_id(StudyId("a", STUDY))) == b"PID-a"
    assert await patients.for_study(settings.node("a"), "9.9.9") is None
