"""Reuse of query associations: one idle list per node, reaped after a few seconds.

A QIDO-RS search is often several C-FINDs in a row (studies, then series for counts, ...), and
opening an association costs a TCP handshake plus an A-ASSOCIATE round trip (PS3.8 §7.1), often more
than the C-FIND itself. So C-ECHO and C-FIND reuse an idle association to the node when there is
one (transfers do not: each C-GET/C-MOVE/C-STORE proposes its own contexts).

* How many associations a node sees at once is bounded by the query budget the caller holds
  (:class:`gateway.dimse.threads.Budgets`), not here: the pool only keeps what is idle.
* An idle association is reused only while established and younger than ``idle_seconds``; a PACS
  that closed it quietly is caught by the one retry of :func:`pooled_find`.
* Idle associations are closed after ``idle_seconds``: pynetdicom's threads poll every millisecond
  even when idle (~7 % of a core per idle association, measured in tests/bench).
* ``idle_seconds`` is the node's (:func:`idle_seconds_for`): less than its PACS keeps an idle
  association open when the PACS profile found it closes them sooner, 0 (no reuse) when that is
  under 0.2 s, 5 s otherwise; the engine sets it from the node of each operation, so a profile
  learned later applies to the next acquire (docs/architecture.md, "PACS profiles").
* An association that saw a cancel, an abort or a timeout is never put back.

Engine-agnostic: :class:`Pool` holds any association with ``is_established`` and is given how to
open and close one; :class:`AssociationPool` is the pynetdicom engine's, the fast engine builds a
``Pool`` over :func:`gateway.dimse.fast.association.request`.

Runs on worker threads (docs/architecture.md, "DIMSE edge").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from pynetdicom.association import Association

from gateway.dimse.association import close_association, open_association
from gateway.dimse.contexts import Context
from gateway.errors import AssociationAborted, GatewayError
from gateway.pacs import FindResult
from gateway.settings import DEFAULT_QUERY_IDLE_SECONDS, PacsNode


def idle_seconds_for(node: PacsNode) -> float:
    """How long the node's idle query associations are kept (its effective ``query_idle_seconds``;
    a raw node's unset value reads as the default)."""
    kept = node.query_idle_seconds
    return DEFAULT_QUERY_IDLE_SECONDS if kept is None else kept


class Reusable(Protocol):
    @property
    def is_established(self) -> bool: ...


A = TypeVar("A", bound=Reusable)


class Pool(Generic[A]):
    """Idle associations of one node; ``opener`` opens a new one (raising the error tree),
    ``closer`` releases one and never raises."""

    def __init__(self, node: PacsNode, opener: Callable[[], A], closer: Callable[[A], None],
                 idle_seconds: float = DEFAULT_QUERY_IDLE_SECONDS) -> None:
        self.node = node
        self._open = opener
        self._close = closer
        self.idle_seconds = idle_seconds
        self._idle: list[tuple[float, A]] = []
        self._lock = threading.Lock()
        self.opened = 0  # associations opened over the pool's life (reuse shows as opened < requests)
        self._in_use = 0  # handed out by acquire and not released yet
        self.stale = 0  # reused associations found closed by the PACS (skipped, or retried by pooled_find)

    @property
    def in_use(self) -> int:
        """Associations acquired and not released yet (/metrics, docs/architecture.md, "App")."""
        with self._lock:
            return self._in_use

    @property
    def idle(self) -> int:
        """Associations kept for reuse (some may be past ``idle_seconds``, awaiting the reaper)."""
        with self._lock:
            return len(self._idle)

    def acquire(self) -> tuple[A, bool]:
        """An established association and whether it was reused from the idle list."""
        now = time.monotonic()
        stale: list[A] = []
        chosen: A | None = None
        with self._lock:
            while self._idle:
                since, assoc = self._idle.pop()
                if assoc.is_established and now - since < self.idle_seconds and chosen is None:
                    chosen = assoc
                else:
                    self.stale += not assoc.is_established
                    stale.append(assoc)
            if chosen is not None:
                self._in_use += 1
        for old in stale:
            self._close(old)
        if chosen is not None:
            return chosen, True
        assoc = self._open()
        with self._lock:
            self.opened += 1
            self._in_use += 1
        return assoc, False

    def note_stale(self) -> None:
        """A reused association failed before any answer: the PACS had closed it while idle."""
        with self._lock:
            self.stale += 1

    def release(self, assoc: A, *, reusable: bool) -> None:
        """Give back what :meth:`acquire` handed out (exactly once per acquire)."""
        with self._lock:
            self._in_use -= 1
        if reusable and assoc.is_established and self.idle_seconds > 0:
            with self._lock:
                self._idle.append((time.monotonic(), assoc))
            timer = threading.Timer(self.idle_seconds + 0.05, self.reap)
            timer.daemon = True
            timer.start()
            return
        self._close(assoc)

    def reap(self) -> None:
        """Close idle associations older than ``idle_seconds``."""
        now = time.monotonic()
        with self._lock:
            stale = [a for since, a in self._idle if now - since >= self.idle_seconds]
            self._idle = [(since, a) for since, a in self._idle if now - since < self.idle_seconds]
        for assoc in stale:
            self._close(assoc)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, assoc in idle:
            self._close(assoc)


class FindStopped(Exception):
    """Raised by a C-FIND collector that stopped on purpose (the cap was reached or the caller left,
    a C-CANCEL sent): the results so far stand, the association is not reused."""


def pooled_find(pool: Pool[A], result: FindResult, cap: int, *, acquire: Callable[[], tuple[A, bool]],
                accepts: Callable[[A], bool], refused: Callable[[], GatewayError],
                collect: Callable[[A], None]) -> FindResult:
    """One C-FIND on a pooled association, the same for every engine: ``collect`` reads the
    responses into ``result``. A reused association that turns out stale (aborted before any result:
    the PACS closed it quietly while idle) is retried once on a fresh one; one that saw a stop, an
    abort or any failure is never put back; past ``cap`` the result is cut and marked truncated."""
    for try_no in (1, 2):
        assoc, reused = acquire()
        if not accepts(assoc):
            pool.release(assoc, reusable=True)
            raise refused()
        try:
            collect(assoc)
        except FindStopped:
            pool.release(assoc, reusable=False)
            if len(result.datasets) > cap:
                del result.datasets[cap:]
                result.truncated = True
            return result
        except AssociationAborted:
            pool.release(assoc, reusable=False)
            if reused and try_no == 1 and not result.datasets:
                pool.note_stale()
                continue
            raise
        except BaseException:
            pool.release(assoc, reusable=False)
            raise
        pool.release(assoc, reusable=True)
        return result
    raise AssertionError("unreachable")  # pragma: no cover


class AssociationPool(Pool[Association]):
    """The pynetdicom engine's query pool: associations proposing ``contexts``."""

    def __init__(self, node: PacsNode, calling_ae: str, contexts: Sequence[Context],
                 idle_seconds: float = DEFAULT_QUERY_IDLE_SECONDS) -> None:
        self.calling_ae = calling_ae
        self.contexts = list(contexts)
        super().__init__(node, lambda: open_association(calling_ae, node, self.contexts), close_association,
                         idle_seconds)
