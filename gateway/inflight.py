"""One call in flight per key: concurrent callers that ask the same question share one answer.

Generic (asyncio only), so any layer may use it. The locate and manifest C-FINDs of a series
(gateway/retrieval/locating.py) and a study's PatientID lookup (gateway/patients.py) are asked by
every request that needs them; a storm of requests on a cold series (a viewer's frame requests)
must cause one query each, not one per request (docs/architecture.md, "Retrieval"). The call runs
as its own task, so one caller that leaves (its client disconnected) does not fail the others; it
is cancelled (C-CANCEL at the DIMSE edge) only when its last caller has left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Call(Generic[V]):
    def __init__(self, task: asyncio.Future[V]) -> None:
        self.task = task
        self.callers = 0


class InFlight(Generic[K, V]):
    """Loop-thread object: ``run(key, start)`` awaits the running call for ``key`` or starts one."""

    def __init__(self) -> None:
        self._calls: dict[K, _Call[V]] = {}

    def running(self, key: K) -> bool:
        return key in self._calls

    async def run(self, key: K, start: Callable[[], Awaitable[V]]) -> V:
        call = self._calls.get(key)
        if call is None:
            call = _Call(asyncio.ensure_future(start()))
            self._calls[key] = call
            done: _Call[V] = call
            call.task.add_done_callback(lambda _task: self._done(key, done))
        call.callers += 1
        try:
            return await asyncio.shield(call.task)
        except asyncio.CancelledError:
            if call.callers == 1 and not call.task.done():
                call.task.cancel()  # the last caller left: nobody wants the answer any more
                self._done(key, call)  # whoever asks next starts a new call, not this cancelled one
            raise
        finally:
            call.callers -= 1

    def _done(self, key: K, call: _Call[V]) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
