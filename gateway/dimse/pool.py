"""Associations per node and purpose: a bounded, reusable pool.

Each node gets two pools (architecture.md §4): one for queries (C-FIND, C-ECHO) and one for
retrievals and stores, so a long C-GET never starves QIDO. The asyncio semaphore bounds how
many associations a node sees at once; idle associations are kept for reuse (PACS that close
idle links are detected before reuse) and closed after ``idle_seconds``. An association that
saw a cancel, an abort or a timeout is never put back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association

from gateway.dimse.outcomes import association_failure
from gateway.dimse.socket_tuning import close_association, guard_reactor, new_ae, on_connection_open
from gateway.settings import PacsNode

log = logging.getLogger(__name__)


class AssociationPool:
    def __init__(self, node: PacsNode, purpose: str, calling_ae: str, contexts: Iterable[Any],
                 max_size: int, idle_seconds: float = 5.0) -> None:
        self.node = node
        self.purpose = purpose
        self.max_size = max_size
        self.idle_seconds = idle_seconds
        ae = new_ae(calling_ae, node)
        for ctx in contexts:
            if isinstance(ctx, tuple):
                ae.add_requested_context(*ctx)
            else:
                ae.add_requested_context(ctx)
        self._ae = ae
        self._idle: list[tuple[float, Association]] = []
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self.opened = 0  # associations opened over the pool's life (reuse shows as opened < requests)

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_size)
        return self._slots

    # The methods below run in worker threads.

    def acquire(self) -> tuple[Association, bool]:
        """An established association and whether it was reused from the idle list."""
        now = time.monotonic()
        stale: list[Association] = []
        chosen: Association | None = None
        with self._lock:
            while self._idle:
                since, assoc = self._idle.pop()
                if assoc.is_established and now - since < self.idle_seconds and chosen is None:
                    chosen = assoc
                else:
                    stale.append(assoc)
        for assoc in stale:
            self._close(assoc)
        if chosen is not None:
            return chosen, True
        return self.open(), False

    def open(self) -> Association:
        connected = threading.Event()
        started = time.monotonic()

        def on_open(event: evt.Event) -> None:
            connected.set()
            on_connection_open(event)

        assoc = self._ae.associate(
            self.node.host, self.node.port, ae_title=self.node.ae_title, max_pdu=self.node.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
        )
        if not assoc.is_established:
            raise association_failure(assoc, self.node.name, connected=connected.is_set(),
                                      started=started, connect_timeout=self.node.timeouts.connect)
        self.opened += 1
        guard_reactor(assoc)
        return assoc

    def release(self, assoc: Association, *, reusable: bool) -> None:
        if reusable and assoc.is_established:
            with self._lock:
                self._idle.append((time.monotonic(), assoc))
            # pynetdicom's threads poll every millisecond even when idle (~7 % of a core per idle
            # association, measured in tests/bench): close what nobody reused within idle_seconds.
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

    @staticmethod
    def _close(assoc: Association) -> None:
        close_association(assoc)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, assoc in idle:
            self._close(assoc)

    def accepted(self, assoc: Association, abstract_syntax: str) -> bool:
        return any(cx.abstract_syntax == abstract_syntax for cx in assoc.accepted_contexts)
