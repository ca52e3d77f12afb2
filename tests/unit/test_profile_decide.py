"""The pure decisions of PACS profiles (gateway/profile/decide.py): configured beats learned beats
safe, and what each fact implies (docs/architecture.md, "PACS profiles")."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.profile.decide import SAFE_LIMITS, SAFE_QUIRKS, SETTINGS, idle_keep, learned, resolve, safe_node
from gateway.profile.facts import Observation, PacsProfile
from gateway.settings import NodeQuirks, PacsNode, Unset, is_configured, settings_from_dict


def configured(**extra: object) -> PacsNode:
    return settings_from_dict({"nodes": [{"name": "n", "ae_title": "N", "host": "h", "port": 104,
                                         **extra}]}).nodes[0]


def profile(**values: object) -> PacsProfile:
    p = PacsProfile("n", probed_at=1.0)
    for fact, value in values.items():
        p.facts[fact] = Observation("test", "result", value)  # type: ignore[arg-type]
    return p


CAPABLE = dict(find_models="study patient", c_get=True, get_compressed_contexts=True, pn_case_insensitive=True,
               pn_wildcard=True, return_keys_study=True, modalities_in_study_matching=True,
               or_multiple_values=True, relational_queries=True, result_cap=True, idle_associations=True)


def test_nothing_known_and_nothing_configured_is_the_safe_behaviour():
    node = configured()
    assert isinstance(node.retrieve, Unset) and isinstance(node.query_model, Unset)
    assert node.quirks == NodeQuirks()   # every quirk None: not configured
    res = resolve(node, None)
    assert res.node.quirks == SAFE_QUIRKS
    assert res.node.query_model == "study" and res.node.retrieve == "get"
    assert [c.setting for c in res.choices] == list(SETTINGS)
    assert {c.source for c in res.choices} == {"safe default"}
    assert not any(c.overridden for c in res.choices)


def test_safe_quirks_are_the_ones_correct_on_every_pacs():
    assert SAFE_QUIRKS == NodeQuirks(case_sensitive_pn=True, compute_counts=True, compute_modalities=True,
                                     modalities_in_study_matching=False, or_multiple_modalities=False,
                                     relational_queries=False)


def test_a_capable_pacs_gets_the_cheap_behaviour():
    res = resolve(configured(), profile(**CAPABLE))
    q = res.node.quirks
    assert (q.case_sensitive_pn, q.modalities_in_study_matching, q.or_multiple_modalities,
            q.relational_queries, q.compute_counts, q.compute_modalities) == (False, True, True, True, True, True)
    assert res.node.query_model == "study" and res.node.retrieve == "get"
    assert {c.source for c in res.choices} == {"learned"}


@pytest.mark.parametrize("insensitive, wildcard, expected", [
    (True, True, False), (True, None, False), (True, False, True), (False, True, True), (None, True, None)])
def test_pn_is_matched_locally_unless_case_and_wildcards_both_work(insensitive, wildcard, expected):
    assert learned(profile(pn_case_insensitive=insensitive, pn_wildcard=wildcard))["case_sensitive_pn"] \
        is expected


def test_a_configured_value_wins_and_is_reported_with_what_was_learned():
    node = configured(quirks={"case_sensitive_pn": False}, retrieve="get")
    res = resolve(node, profile(**{**CAPABLE, "pn_case_insensitive": False, "c_get": False, "c_move": True}),
                  move_available=True)
    pn = res.choice("case_sensitive_pn")
    assert (pn.value, pn.source, pn.learned, pn.overridden) == (False, "configured", True, True)
    assert res.node.quirks.case_sensitive_pn is False
    get = res.choice("retrieve")
    assert (get.value, get.source, get.learned) == ("get", "configured", "move")
    assert res.node.retrieve == "get"


def test_patient_root_only():
    res = resolve(configured(), profile(find_models="patient"))
    assert res.node.query_model == "patient" and res.choice("query_model").source == "learned"
    assert resolve(configured(), profile(find_models=None)).node.query_model == "study"


@pytest.mark.parametrize("get, compressed, move, available, expected", [
    (True, True, True, True, "get"),
    (True, False, True, True, "move"),     # compressed data cannot come by C-GET, C-MOVE can
    (True, False, True, False, "get"),     # no storage SCP: C-MOVE is no option
    (False, None, True, True, "move"),
    (False, None, True, False, None),      # nothing that works: the default
    (False, None, False, True, None),
    (True, False, False, True, "get"),
])
def test_retrieve(get, compressed, move, available, expected):
    p = profile(c_get=get, get_compressed_contexts=compressed, c_move=move)
    assert learned(p, move_available=available)["retrieve"] == expected
    assert resolve(configured(), p, move_available=available).node.retrieve == (expected or "get")


def test_or_is_not_sent_to_a_pacs_that_ignores_the_key():
    p = profile(modalities_in_study_matching=False, or_multiple_values=True)
    assert learned(p)["or_multiple_modalities"] is False
    assert learned(profile(modalities_in_study_matching=True, or_multiple_values=None))[
        "or_multiple_modalities"] is None


def test_counts_are_computed_where_missing_once_keys_were_observed():
    assert learned(profile(return_keys_study=False))["compute_counts"] is True
    assert learned(profile())["compute_counts"] is None


def test_safe_node_leaves_effective_nodes_alone_and_fills_open_quirks():
    effective = resolve(configured(), profile(**CAPABLE)).node
    assert safe_node(effective) is effective
    partly = configured(quirks={"relational_queries": True})
    filled = safe_node(partly)
    assert filled.quirks == replace(SAFE_QUIRKS, relational_queries=True)


def test_unset_reads_as_its_default_and_is_not_configured():
    node = configured()
    assert node.retrieve == "get" and node.query_model == "study" and {"study": 1}[node.query_model] == 1
    assert not is_configured(node.retrieve) and is_configured(configured(retrieve="get").retrieve)
    assert not is_configured(configured(retrieve=None).retrieve)
    assert not is_configured(None) and is_configured(False)
    assert type(replace(node, port=1).retrieve) is Unset


def test_limits_are_safe_while_unknown():
    """No PACS cap assumed, and idle query associations reused for the pool's 5 s: the pool's one
    retry makes that correct on every PACS (a stale association is retried once on a fresh one)."""
    res = resolve(configured(), None)
    assert SAFE_LIMITS == {"result_cap": 0, "query_idle_seconds": 5.0}
    assert (res.node.result_cap, res.node.query_idle_seconds) == (0, 5.0)
    assert res.choice("result_cap").source == res.choice("query_idle_seconds").source == "safe default"


def test_a_learned_result_cap_needs_the_number_behind_it():
    capped = profile(result_cap=False)
    assert learned(capped)["result_cap"] is None, "capped, but at how many: nothing to act on"
    capped.result_cap = 5
    assert resolve(configured(), capped).node.result_cap == 5
    assert resolve(configured(), profile(result_cap=True)).node.result_cap == 0
    assert learned(profile(result_cap=None))["result_cap"] is None   # not tested beyond our own cap


@pytest.mark.parametrize("closed_after, keep", [(1.0, 0.5), (1.05, 0.5), (3.0, 1.5), (0.39, 0.0), (0.05, 0.0)])
def test_idle_associations_are_kept_for_less_than_the_pacs_keeps_them(closed_after, keep):
    assert idle_keep(closed_after) == keep and keep < closed_after
    dropped = profile(idle_associations=False)
    dropped.idle_kept_seconds = closed_after
    assert resolve(configured(), dropped).node.query_idle_seconds == keep
    kept = profile(idle_associations=True)
    kept.idle_kept_seconds = 5.5
    assert resolve(configured(), kept).node.query_idle_seconds == 5.0


def test_configured_limits_win_and_null_leaves_them_to_the_profile():
    dropped = profile(idle_associations=False, result_cap=False)
    dropped.idle_kept_seconds, dropped.result_cap = 1.0, 5
    res = resolve(configured(query_idle_seconds=0, result_cap=0), dropped)
    assert (res.node.query_idle_seconds, res.node.result_cap) == (0.0, 0)
    assert res.choice("query_idle_seconds").overridden and res.choice("query_idle_seconds").learned == 0.5
    assert res.choice("result_cap").learned == 5
    unset = configured(query_idle_seconds=None, result_cap=None)
    assert (unset.query_idle_seconds, unset.result_cap) == (None, None)
    assert safe_node(unset).query_idle_seconds == 5.0
