"""Cached QIDO answers (gateway/query_cache.py): the template and its per-request base, the normalised
request key, the versioned read of the in-process cache, and SearchService.respond over a fake PACS."""

from __future__ import annotations

import orjson
import pydicom.config
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from cache import keys
from cache.memory import MemoryCache
from gateway.query_cache import BASE_PLACEHOLDER, AnswerTemplate, Lookups, ResponseCache
from gateway.search import SearchService
from gateway.settings import settings_from_dict
from tests.support.fake_pacs import FakePacs
from translators import qido as q
from translators.dicom_json import datasets_to_json_bytes
from translators.uids import StudyId

STUDY, SERIES = "1.2.3", "1.2.3.4"


def study(uid: str, base: str, description: str = "CT") -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = uid
    ds.StudyDescription = description
    ds.add(DataElement(q.RETRIEVE_URL, "UR", f"{base}/studies/{uid}"))
    return ds


def test_the_answer_for_a_base_is_byte_for_byte_what_encoding_against_it_gives(monkeypatch):
    # A Host header is the client's to choose; the gateway reads and writes without validation.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    for base in ("http://gw:8080/dicom-web", "https://proxy.example/pacs/nodes/a/dicom-web",
                 'http://odd"host/dicom-web'):
        template = AnswerTemplate.render([study("1.2", BASE_PLACEHOLDER), study("1.3", BASE_PLACEHOLDER)],
                                         ["a warning"])
        assert template.substitutable
        answer = template.answer(base, ["parse warning"])
        assert answer.body == datasets_to_json_bytes([study("1.2", base), study("1.3", base)])
        assert orjson.loads(answer.body)[0]["00081190"]["Value"] == [f"{base}/studies/1.2"]
        assert answer.warnings == ["parse warning", "a warning"]


def test_placeholder_text_in_a_pacs_value_is_left_alone():
    sneaky = study("1.2", BASE_PLACEHOLDER, description=BASE_PLACEHOLDER + "/x")
    answer = AnswerTemplate.render([sneaky], []).answer("http://gw/dicom-web")
    body = orjson.loads(answer.body)[0]
    assert body["00081030"]["Value"] == [BASE_PLACEHOLDER + "/x"]
    assert body["00081190"]["Value"] == ["http://gw/dicom-web/studies/1.2"]


def test_stored_form_round_trips_and_foreign_values_are_misses():
    template = AnswerTemplate.render([study("1.2", BASE_PLACEHOLDER)], ["w1", "w\n2"])
    back = AnswerTemplate.decode(template.encode())
    assert back == template
    empty = AnswerTemplate.render([], ["nothing"])
    assert AnswerTemplate.decode(empty.encode()) == empty and empty.answer("http://x").body is None
    for foreign in (b"", b"[]", b"qido-answer/1\n{not json\n[]", b"qido-answer/1\n[1]\n[]", b"qido-answer/1"):
        assert AnswerTemplate.decode(foreign) is None


def test_the_request_key_holds_what_shapes_the_answer_and_nothing_else():
    settings = settings_from_dict({"nodes": [{"name": n, "ae_title": n.upper(), "host": "h", "port": 1}
                                             for n in ("a", "b")]})
    responses = ResponseCache(settings, MemoryCache(), Lookups())
    nodes = list(settings.nodes)

    def key(params, level="study", nodes=nodes, **kw):
        return responses.key(q.parse_query(level, params, **kw), nodes)

    base = key([("PatientID", "P1"), ("StudyDate", "20200101")])
    assert key([("StudyDate", "20200101"), ("PatientID", "P1"), ("unknown", "x"),
                ("fuzzymatching", "true")]) == base, "order, unknown parameters, fuzzymatching: same"
    assert key([("PatientID", "P1"), ("StudyDate", "20200101"), ("limit", "1")]) != base
    assert key([("PatientID", "P1"), ("StudyDate", "20200101"), ("offset", "1")]) != base
    assert key([("PatientID", "P1"), ("StudyDate", "20200101"), ("includefield", "00081030")]) != base
    assert key([("PatientID", "P1"), ("StudyDate", "20200101")], nodes=nodes[:1]) != base
    assert base.counters == (keys.node_generation("a"), keys.node_generation("b"))
    within = key([], level="series", study_uid=STUDY)
    assert within.counters == (keys.node_generation("a"), keys.study_generation(StudyId("a", STUDY)),
                               keys.node_generation("b"), keys.study_generation(StudyId("b", STUDY)))
    quirky = settings_from_dict({"nodes": [{"name": "a", "ae_title": "A", "host": "h", "port": 1,
                                            "quirks": {"compute_counts": False}}]})
    other = ResponseCache(quirky, MemoryCache(), Lookups())
    plain = key([("PatientID", "P1")], nodes=nodes[:1])
    assert other.key(q.parse_query("study", [("PatientID", "P1")]), quirky.nodes) != plain, \
        "another node configuration never shares answers"


# ------------------------------------------------------------------ the service

@pytest.fixture
def anyio_backend():
    return "asyncio"


def make(pacs: FakePacs):
    nodes = [{"name": n, "ae_title": n.upper(), "host": "127.0.0.1", "port": 11112} for n in ("a", "b")]
    settings = settings_from_dict({"nodes": nodes})
    cache = MemoryCache()
    return settings, cache, SearchService(settings, pacs, cache)


@pytest.mark.anyio
async def test_respond_serves_the_cached_answer_for_any_base_until_a_store():
    pacs = FakePacs()
    pacs.add("a", STUDY, SERIES, "1.2.3.4.1")
    settings, cache, service = make(pacs)
    query = q.parse_query("study", [("StudyInstanceUID", STUDY)])
    first = await service.respond(query, settings.nodes, "http://one/dicom-web")
    finds = pacs.calls["find"]
    again = await service.respond(query, settings.nodes, "http://two/nodes/a/dicom-web")
    assert pacs.calls["find"] == finds, "served from the cached answer"
    assert first.body == again.body.replace(b"http://two/nodes/a/dicom-web", b"http://one/dicom-web")
    assert orjson.loads(again.body)[0]["00081190"]["Value"] == [f"http://two/nodes/a/dicom-web/studies/{STUDY}"]
    assert service.finder.hits >= 1
    fresh = await service.respond(query, settings.nodes, "http://one/dicom-web", use_cache=False)
    assert pacs.calls["find"] > finds and fresh.body == first.body
    finds = pacs.calls["find"]
    for counter in keys.generations_changed_by_store("b", [STUDY]):
        await cache.incr(counter)
    await service.respond(query, settings.nodes, "http://one/dicom-web")
    assert pacs.calls["find"] > finds, "a store on any node asked makes the answer stale"


@pytest.mark.anyio
async def test_an_answer_with_a_failed_node_is_not_cached():
    pacs = FakePacs()
    pacs.add("a", STUDY, SERIES, "1.2.3.4.1")
    pacs.down.add("b")
    settings, _, service = make(pacs)
    query = q.parse_query("study", [])
    first = await service.respond(query, settings.nodes, "http://gw/dicom-web")
    assert any("node b failed" in w for w in first.warnings) and first.body
    pacs.down.clear()
    finds = pacs.calls["find"]
    second = await service.respond(query, settings.nodes, "http://gw/dicom-web")
    assert pacs.calls["find"] > finds and not any("failed" in w for w in second.warnings)
    # Node a's C-FIND result was cached on its own: only node b was asked again.
    assert pacs.calls["find"] == finds + 1


@pytest.mark.anyio
async def test_no_match_is_an_empty_answer_and_parse_warnings_come_per_request():
    pacs = FakePacs()
    settings, _, service = make(pacs)
    query = q.parse_query("study", [("PatientID", "nobody"), ("bogus", "1")])
    answer = await service.respond(query, settings.nodes, "http://gw/dicom-web")
    assert answer.body is None and any("bogus" in w for w in answer.warnings)
    plain = await service.respond(q.parse_query("study", [("PatientID", "nobody")]), settings.nodes, "http://gw")
    assert plain.body is None and not any("bogus" in w for w in plain.warnings)


@pytest.mark.anyio
async def test_the_in_process_cache_reads_counters_and_value_together():
    cache = MemoryCache()
    key = keys.qido_response(["a", "b"], STUDY, "d")
    first = await cache.get_versioned(key)
    assert first.value is None and first.key == key.at([0, 0, 0, 0])
    await cache.set(first.key, b"v", 60)
    assert (await cache.get_versioned(key)).value == b"v"
    await cache.incr(keys.study_generation(StudyId("b", STUDY)))
    bumped = await cache.get_versioned(key)
    assert bumped.value is None and bumped.key == key.at([0, 0, 0, 1])
