"""Where a C-MOVE sub-operation goes: the one routing rule of both storage SCP engines.

The gateway's storage SCP exists twice (``gateway.scp_engine``): pynetdicom's
(:mod:`gateway.dimse.storage_scp`) and the plain-socket acceptor (:mod:`gateway.dimse.fast.acceptor`).
Each turns a received C-STORE into an :class:`Arrival` and asks :class:`ArrivalRouter` for the
status to answer with, so what may enter the spool is decided here only (docs/architecture.md,
"C-MOVE"):

* **Local move**: by Move Originator Message ID (PS3.7 9.3.1.1, Table 9.3-1) when the UID is one
  the move expects; else by the expected SOP Instance UIDs (PACS that omit the originator fields,
  or IDs that wrapped); else, for moves that expect no list, by study/series (the only route that
  needs the data set decoded, so it is asked for last and lazily).
* **Another replica's move** (:mod:`gateway.cluster`): all replicas share one AE title, so a
  sub-operation may reach a replica that did not issue the move. Its Message ID is looked up among
  the cluster's pending moves on the event loop (the UID cross-checked there), the instance is
  spooled here and announced to the originator, and only then answered.
* **Nothing matched**: refused (``0124`` with ``retrieval.reject_unexpected_stores``, else
  ``A700``) and counted; a second C-STORE of a received instance never replaces it; an instance the
  move's ``on_instance`` does not want (:class:`NotRequested`) is refused too.

**When a C-STORE is answered**: :meth:`ArrivalRouter.store` (pynetdicom's SCP) answers after
``on_instance`` returned, i.e. after the atomic rename into the spool. :meth:`ArrivalRouter.accept`
(the fast SCP) decides the route and refusals first, the SCP answers Success, and then it runs the
returned write: spooling (~0.35 ms an instance) overlaps the PACS's sending of the next instance
instead of sitting on its round trip. That is safe because the instance stays on the PACS and the
spool is a cache, not an archive (docs/architecture.md, "Cache"): an acknowledged instance the write
fails on, or ``on_instance`` does not want, is missing, logged, and the retrieval's completeness check
retries it. The final C-MOVE response, though, may then reach the C-MOVE SCU before the last write is
done: the move's issuer calls :func:`settle` with its Message ID before it reports the move over, so
completeness is judged only once every acknowledged write of the move was handed to the spool.

**Traces**: an arrival routed to a move issued for a traced request (``PendingMove.trace``, set by
gateway/tracing.py) gets a span from routing until answered and spooled (``write`` done), on either
engine; untraced, that costs one attribute read. Arrivals for another replica's move are not traced.

Thread-safety: :meth:`ArrivalRouter.store` runs on the SCP's association threads, ``register``
and friends on the event loop's; one lock guards the pending moves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.pacs import LookupMove, NotRequested, PendingMove, RemoteMove

log = logging.getLogger(__name__)

T = TypeVar("T")

SUCCESS = 0x0000
REFUSED_NOT_AUTHORISED = 0x0124
REFUSED_OUT_OF_RESOURCES = 0xA700
BRIDGE_TIMEOUT = 5.0
"""Seconds an association thread waits for the event loop (cluster lookup, announcement)."""


SETTLE_TIMEOUT = 30.0
"""Seconds :func:`settle` waits for a move's acknowledged writes (a stalled disk: then judged missing)."""


class _Writes:
    """Acknowledged writes still running, per Move Originator Message ID, in this process (the IDs
    are unique across the replicas' pending moves, gateway/retrieval/fetching.py)."""

    def __init__(self) -> None:
        self._running: dict[int, int] = {}
        self._changed = threading.Condition()

    def begin(self, msg_id: int) -> None:
        with self._changed:
            self._running[msg_id] = self._running.get(msg_id, 0) + 1

    def end(self, msg_id: int) -> None:
        with self._changed:
            left = self._running.get(msg_id, 1) - 1
            if left > 0:
                self._running[msg_id] = left
            else:
                self._running.pop(msg_id, None)
                self._changed.notify_all()

    def settle(self, msg_id: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: msg_id not in self._running, timeout)


_WRITES = _Writes()


def settle(msg_id: int, timeout: float = SETTLE_TIMEOUT) -> bool:
    """Wait until every write the storage SCP acknowledged for the move ``msg_id`` was handed to the
    spool (and its arrival signalled); False when ``timeout`` passed first. Called by the move's
    issuer, on its thread, after the final C-MOVE response (module docstring)."""
    return _WRITES.settle(msg_id, timeout)


@dataclass(frozen=True)
class Arrival:
    """One received C-STORE, as both engines describe it (nothing here is decoded eagerly)."""

    sop_instance: str
    sop_class: str
    transfer_syntax: str              # of the presentation context it arrived on
    move_msg_id: int | None           # Move Originator Message ID, when the PACS sent one
    calling_ae: str
    part10: Callable[[], bytes]       # the instance as a Part-10 file, data set bytes as received
    study_series: Callable[[], tuple[str, str]]   # decodes the data set: the last-resort route only


class CompressedPreference:
    """Counted switch: while any retry asks for it, new associations accept compressed syntaxes first
    (``MoveDestination.prefer_compressed``)."""

    def __init__(self, apply: Callable[[bool], None]) -> None:
        self._apply = apply
        self._users = 0
        self._lock = threading.Lock()

    def set(self, on: bool) -> None:
        """Count one retry in (``on``) or out; ``apply(compressed first?)`` under the lock, so two
        switches never apply out of order."""
        with self._lock:
            self._users += 1 if on else -1
            self._apply(self._users > 0)


class ArrivalRouter:
    """The pending C-MOVEs of this process, and the routing of every arrival to one of them."""

    def __init__(self, *, reject_unexpected: bool = True) -> None:
        self.reject_unexpected = reject_unexpected
        self._pending: dict[int, PendingMove] = {}
        self._lock = threading.Lock()
        self.unexpected = 0
        self.remote_stores = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lookup: LookupMove | None = None
        self.bridge_timeout = BRIDGE_TIMEOUT

    # ----------------------------------------------------------------- MoveDestination

    def register(self, move: PendingMove) -> None:
        with self._lock:
            self._pending[move.msg_id] = move

    def unregister(self, msg_id: int) -> None:
        with self._lock:
            self._pending.pop(msg_id, None)

    def is_pending(self, msg_id: int) -> bool:
        with self._lock:
            return msg_id in self._pending

    def attach_cluster(self, loop: asyncio.AbstractEventLoop, lookup: LookupMove) -> None:
        """Route C-STOREs for other replicas' moves through ``lookup`` (run on ``loop``)."""
        self._loop = loop
        self._lookup = lookup

    # ----------------------------------------------------------------- arrivals

    def store(self, arrival: Arrival) -> int:
        """Route, spool and count one C-STORE; returns the status to answer it with."""
        move = self._route(arrival)
        if move is None:
            return self._unrouted(arrival)
        if move.trace is None:
            return self._spool(move, arrival)
        span = move.trace.begin()
        status = self._spool(move, arrival)
        span.end(status, status == SUCCESS)
        return status

    def _spool(self, move: PendingMove, arrival: Arrival) -> int:
        sop_uid = arrival.sop_instance
        with self._lock:
            duplicate = sop_uid in move.received
            if duplicate:
                self.unexpected += 1      # a second C-STORE of a received instance never replaces it
        if duplicate:
            return REFUSED_NOT_AUTHORISED
        try:
            move.on_instance(arrival.part10(), sop_uid, arrival.sop_class, arrival.transfer_syntax)
        except NotRequested:
            with self._lock:
                self.unexpected += 1
            return REFUSED_NOT_AUTHORISED
        except Exception:  # noqa: BLE001 - the PACS learns it failed; the move reports it missing
            log.exception("storing a C-MOVE sub-operation failed")
            return REFUSED_OUT_OF_RESOURCES
        with self._lock:
            move.received.add(sop_uid)
        return SUCCESS

    def accept(self, arrival: Arrival) -> tuple[int, Callable[[], None] | None]:
        """:meth:`store` split at the acknowledgement (module docstring): the status to answer with
        and, when it is Success for a local move, the write to run once the answer is sent (it never
        raises). Another replica's move is stored before answering, as :meth:`store` does."""
        sop_uid = arrival.sop_instance
        move = self._route(arrival)
        if move is None:
            return self._unrouted(arrival), None   # refused, or another replica's: nothing deferred
        span = move.trace.begin() if move.trace is not None else None
        with self._lock:
            duplicate = sop_uid in move.received
            if duplicate:
                self.unexpected += 1
            else:
                move.received.add(sop_uid)     # a second C-STORE of it meanwhile is a duplicate
        if duplicate:
            if span is not None:
                span.end(REFUSED_NOT_AUTHORISED, False)
            return REFUSED_NOT_AUTHORISED, None
        _WRITES.begin(move.msg_id)

        def write() -> None:
            stored = False
            try:
                move.on_instance(arrival.part10(), sop_uid, arrival.sop_class, arrival.transfer_syntax)
                stored = True
            except NotRequested:
                with self._lock:
                    self.unexpected += 1
                    move.received.discard(sop_uid)
                log.debug("an acknowledged C-MOVE sub-operation was not wanted; not spooled")
            except Exception:  # noqa: BLE001 - acknowledged already: missing, retried by the move's owner
                with self._lock:
                    move.received.discard(sop_uid)
                log.warning("an acknowledged C-MOVE sub-operation could not be spooled; the retrieval "
                            "retries what is missing", exc_info=True)
            finally:
                _WRITES.end(move.msg_id)
                if span is not None:
                    span.end(SUCCESS, stored)

        return SUCCESS, write

    def _unrouted(self, arrival: Arrival) -> int:
        """An arrival no local move takes: another replica's (stored and announced), else refused."""
        remote = self._remote(arrival)
        if remote is not None:
            return self._store_remote(remote, arrival)
        with self._lock:
            self.unexpected += 1
        log.warning("C-STORE from %s matched no pending C-MOVE", arrival.calling_ae)
        return REFUSED_NOT_AUTHORISED if self.reject_unexpected else REFUSED_OUT_OF_RESOURCES

    def _route(self, arrival: Arrival) -> PendingMove | None:
        sop_uid, msg_id = arrival.sop_instance, arrival.move_msg_id
        with self._lock:
            if msg_id is not None and msg_id in self._pending:
                move = self._pending[msg_id]
                if move.expected is None or sop_uid in move.expected:
                    return move
            # Fallback for PACS that omit the originator fields (or IDs that wrapped): UIDs.
            candidates = [m for m in self._pending.values() if m.expected and sop_uid in m.expected
                          and sop_uid not in m.received]
            if candidates:
                return candidates[0]
            open_moves = [m for m in self._pending.values() if m.expected is None]
        if not open_moves:
            return None
        study, series = arrival.study_series()   # decode only when the cheap routes failed
        for move in open_moves:
            if move.study == study and (move.series is None or move.series == series):
                return move
        return None

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.bridge_timeout)
        except BaseException:
            future.cancel()
            raise

    def _remote(self, arrival: Arrival) -> RemoteMove | None:
        # The originator AE title is not checked: every replica has the same one, and pynetdicom's
        # C-MOVE SCP sends its own title there. The UID cross-check is what guards the spool.
        if self._lookup is None or arrival.move_msg_id is None:
            return None
        try:
            return self._on_loop(self._lookup(arrival.move_msg_id, arrival.sop_instance))
        except Exception:  # noqa: BLE001 - no answer in time: treated as matching nothing
            log.warning("looking up a C-MOVE of another replica failed", exc_info=True)
            return None

    def _store_remote(self, remote: RemoteMove, arrival: Arrival) -> int:
        sop, cls, ts = arrival.sop_instance, arrival.sop_class, arrival.transfer_syntax
        try:
            remote.write(arrival.part10(), sop, cls, ts)
            # Answer only once the originator can learn about it (same ordering as a local move).
            self._on_loop(remote.announce(sop, cls, ts))
        except Exception:  # noqa: BLE001 - the PACS learns it failed; the originator retries it
            log.exception("storing a C-MOVE sub-operation for another replica failed")
            return REFUSED_OUT_OF_RESOURCES
        with self._lock:
            self.remote_stores += 1
        return SUCCESS
