"""The fast storage SCP's acknowledge-then-spool split (ArrivalRouter.accept, arrivals_routing.settle)."""

from __future__ import annotations

import logging
import threading

import pytest

from gateway.dimse.arrivals_routing import REFUSED_NOT_AUTHORISED, SUCCESS, ArrivalRouter, settle
from gateway.pacs import PendingMove
from tests.unit.test_arrivals_routing import Sink, arrival


def test_accept_decides_before_and_writes_after() -> None:
    router = ArrivalRouter()
    sink = Sink()
    router.register(PendingMove(41, "1.1", "1.1.1", {"9.1"}, sink))
    status, write = router.accept(arrival("9.1", msg_id=41))
    assert status == SUCCESS and write is not None
    assert sink.got == [], "nothing is spooled before the answer is sent"
    assert router.accept(arrival("9.1", msg_id=41)) == (REFUSED_NOT_AUTHORISED, None), \
        "a second C-STORE while the first one's write is pending is a duplicate"
    assert not settle(41, timeout=0.05), "the move is not over while an acknowledged write is pending"
    write()
    assert sink.got == [(b"part10:9.1", "9.1")]
    assert settle(41, timeout=0)


def test_refusals_are_still_decided_before_the_answer() -> None:
    router = ArrivalRouter()
    router.register(PendingMove(42, "1.1", "1.1.1", {"9.1"}, Sink()))
    assert router.accept(arrival("9.7", msg_id=42)) == (REFUSED_NOT_AUTHORISED, None)   # not expected
    assert router.accept(arrival("9.8", msg_id=99, study="5.5")) == (REFUSED_NOT_AUTHORISED, None)   # no move
    assert router.unexpected == 2


def test_a_write_failing_after_the_ack_leaves_the_instance_missing_and_logs_it(
        caplog: pytest.LogCaptureFixture) -> None:
    router = ArrivalRouter()
    move = PendingMove(43, "1.1", "1.1.1", {"9.1", "9.2"}, Sink(fail=True))
    router.register(move)
    status, write = router.accept(arrival("9.1", msg_id=43))
    assert status == SUCCESS and write is not None
    with caplog.at_level(logging.WARNING, logger="gateway.dimse.arrivals_routing"):
        write()   # never raises
    assert "could not be spooled" in caplog.text
    assert "9.1" not in move.received, "not received: the retrieval's completeness check asks again"
    assert settle(43, timeout=0)


def test_settle_waits_for_writes_running_on_another_thread() -> None:
    router = ArrivalRouter()
    release = threading.Event()
    got: list[str] = []

    def slow(data: bytes, sop: str, cls: str, ts: str) -> None:
        release.wait(5)
        got.append(sop)

    router.register(PendingMove(44, "1.1", "1.1.1", {"9.1"}, slow))
    _, write = router.accept(arrival("9.1", msg_id=44))
    assert write is not None
    writer = threading.Thread(target=write)
    writer.start()
    assert not settle(44, timeout=0.05)
    release.set()
    assert settle(44, timeout=5) and got == ["9.1"]
    writer.join(5)
