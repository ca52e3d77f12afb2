"""The one routing rule of both storage SCP engines (gateway/dimse/arrivals_routing.py)."""

from __future__ import annotations

from gateway.dimse.arrivals_routing import (
    REFUSED_NOT_AUTHORISED,
    REFUSED_OUT_OF_RESOURCES,
    SUCCESS,
    Arrival,
    ArrivalRouter,
    CompressedPreference,
)
from gateway.pacs import NotRequested, PendingMove


def arrival(sop: str, msg_id: int | None = None, study: str = "1.1", series: str = "1.1.1",
            decoded: list[str] | None = None) -> Arrival:
    def study_series() -> tuple[str, str]:
        if decoded is not None:
            decoded.append(sop)
        return study, series

    return Arrival(sop_instance=sop, sop_class="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                   move_msg_id=msg_id, calling_ae="PACS", part10=lambda: b"part10:" + sop.encode(),
                   study_series=study_series)


class Sink:
    def __init__(self, refuse: set[str] = frozenset(), fail: bool = False) -> None:  # type: ignore[assignment]
        self.got: list[tuple[bytes, str]] = []
        self.refuse, self.fail = refuse, fail

    def __call__(self, data: bytes, sop: str, cls: str, ts: str) -> None:
        if sop in self.refuse:
            raise NotRequested(sop)
        if self.fail:
            raise OSError("disk full")
        self.got.append((data, sop))


def test_message_id_route_then_uid_fallback_then_study_series() -> None:
    router = ArrivalRouter()
    by_id, by_uid, by_study = Sink(), Sink(), Sink()
    router.register(PendingMove(1, "1.1", "1.1.1", {"9.1", "9.2"}, by_id))
    router.register(PendingMove(2, "1.1", "1.1.2", {"9.3"}, by_uid))
    router.register(PendingMove(3, "2.2", None, None, by_study))
    decoded: list[str] = []
    assert router.store(arrival("9.1", msg_id=1, decoded=decoded)) == SUCCESS
    assert router.store(arrival("9.3", msg_id=1, decoded=decoded)) == SUCCESS      # not move 1's: UIDs
    assert router.store(arrival("9.2", msg_id=None, decoded=decoded)) == SUCCESS   # no originator: UIDs
    assert router.store(arrival("9.4", study="2.2", decoded=decoded)) == SUCCESS   # open move: study
    assert [s for _, s in by_id.got] == ["9.1", "9.2"] and [s for _, s in by_uid.got] == ["9.3"]
    assert by_study.got == [(b"part10:9.4", "9.4")]
    assert decoded == ["9.4"], "the data set is decoded only when the cheap routes failed"
    assert router.unexpected == 0


def test_unexpected_duplicate_and_unwanted_are_refused_and_counted() -> None:
    router = ArrivalRouter()
    sink = Sink(refuse={"9.9"})
    router.register(PendingMove(1, "1.1", None, {"9.1", "9.9"}, sink))
    assert router.store(arrival("5.5", msg_id=7, study="3.3")) == REFUSED_NOT_AUTHORISED
    assert router.store(arrival("9.1", msg_id=1)) == SUCCESS
    assert router.store(arrival("9.1", msg_id=1)) == REFUSED_NOT_AUTHORISED   # never replaced
    assert router.store(arrival("9.9", msg_id=1)) == REFUSED_NOT_AUTHORISED   # NotRequested
    assert router.unexpected == 3 and len(sink.got) == 1
    lenient = ArrivalRouter(reject_unexpected=False)
    assert lenient.store(arrival("5.5")) == REFUSED_OUT_OF_RESOURCES


def test_a_failing_spool_is_out_of_resources_and_not_marked_received() -> None:
    router = ArrivalRouter()
    move = PendingMove(1, "1.1", None, {"9.1"}, Sink(fail=True))
    router.register(move)
    assert router.store(arrival("9.1", msg_id=1)) == REFUSED_OUT_OF_RESOURCES
    assert move.received == set()


def test_unregistered_moves_match_nothing() -> None:
    router = ArrivalRouter()
    router.register(PendingMove(1, "1.1", None, {"9.1"}, Sink()))
    assert router.is_pending(1)
    router.unregister(1)
    assert not router.is_pending(1)
    assert router.store(arrival("9.1", msg_id=1)) == REFUSED_NOT_AUTHORISED


def test_compressed_preference_is_counted() -> None:
    applied: list[bool] = []
    preference = CompressedPreference(applied.append)
    preference.set(True)
    preference.set(True)
    preference.set(False)
    preference.set(False)
    assert applied == [True, True, True, False]
