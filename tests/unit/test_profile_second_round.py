"""Safe while unknown, the second round (gateway/profile/second_round.py): which failures wait for
the profile, and when the request runs once more (docs/architecture.md, "PACS profiles")."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.errors import DimseFailure, DimseTimeout, ModelRefused, NodeUnreachable, NotFound, PacsError
from gateway.profile import second_round
from gateway.settings import PacsNode, settings_from_dict

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def node(name: str = "n", **extra: object) -> PacsNode:
    return settings_from_dict({"nodes": [{"name": name, "ae_title": "N", "host": "h", "port": 104,
                                         **extra}]}).nodes[0]


class Settles:
    """``NodeProfiles.settled`` as a function: the node as its profile will have it, and the calls."""

    def __init__(self, **learned: str) -> None:
        self.learned = learned
        self.asked: list[str] = []

    async def __call__(self, n: PacsNode) -> PacsNode:
        self.asked.append(n.name)
        return replace(n, **self.learned)   # type: ignore[arg-type]


async def test_an_open_setting_the_profile_changed_runs_once_more_with_the_settled_node():
    settles = Settles(query_model="patient")
    again = await second_round.relearned(node(), settles, second_round.QUERY)
    assert again is not None and again.query_model == "patient" and settles.asked == ["n"]
    # The settled node's value is learned (a plain string): a failure there stands, without waiting.
    assert await second_round.relearned(again, settles, second_round.QUERY) is None
    assert settles.asked == ["n"]


async def test_the_failure_stands_when_configured_unchanged_or_nothing_settles():
    assert await second_round.relearned(node(query_model="study"), Settles(query_model="patient"),
                                        second_round.QUERY) is None
    same = Settles(retrieve="get")   # learned what the safe default was: nothing to try
    assert await second_round.relearned(node(), same, second_round.RETRIEVE) is None and same.asked == ["n"]
    assert await second_round.relearned(node(), None, second_round.RETRIEVE) is None
    # retrieve is not what a refused C-FIND model can be about
    assert await second_round.relearned(node(), Settles(retrieve="move"), second_round.QUERY) is None


def test_which_failures_the_profile_may_explain():
    assert second_round.query_explained(ModelRefused("refused", node="n"))
    assert not second_round.query_explained(DimseFailure("A700", node="n", status=0xA700))
    assert second_round.retrieval_explained(ModelRefused("refused", node="n"))
    assert second_round.retrieval_explained(PacsError("3 of 5 instances not delivered", node="n"))
    for error in (DimseTimeout("slow", node="n"), NodeUnreachable("down", node="n"), NotFound("no study")):
        assert not second_round.retrieval_explained(error)


async def test_only_the_failed_node_is_replaced():
    nodes = [node("a"), node("b")]
    error = ModelRefused("refused", node="b")
    settles = Settles(retrieve="move")
    out = await second_round.relearned_nodes(nodes, second_round.failed_node(nodes, error), settles,
                                             second_round.RETRIEVE, second_round.retrieval_explained)
    assert out is not None and [n.retrieve for n in out] == ["get", "move"] and settles.asked == ["b"]
    assert out[0] is nodes[0]
    timeout = DimseTimeout("slow", node="b")
    assert await second_round.relearned_nodes(nodes, second_round.failed_node(nodes, timeout), settles,
                                              second_round.RETRIEVE, second_round.retrieval_explained) is None
