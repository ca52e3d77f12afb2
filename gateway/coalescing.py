"""Single-flight C-FINDs: identical concurrent C-FINDs cost the PACS one (docs/architecture.md, "Search").

:class:`CoalescingPacs` is the :class:`~gateway.pacs.Pacs` every service is given (the app wraps the
DIMSE implementation in it); ``find`` is coalesced, everything else passes through. So the
locate and manifest C-FINDs of waiting WADO requests, QIDO's C-FINDs (``no-cache`` ones included)
and the emulation look-ups all meet at this one choke point.

* **Same C-FIND**: same node, query model, normalised identifier and result cap
  (:func:`gateway.query_cache.identifier_digest`).
* **In this process**: one flight (a task) per key; callers join it and get the *same*
  :class:`~gateway.pacs.FindResult`, which they treat as read-only (the search service, which
  decorates its results, copies them). A completed flight is never reused: the next caller starts
  a new one, so a ``no-cache`` search gets an answer that was in flight when it asked, never an
  older one, and errors go only to the callers of the flight that failed (nothing is cached here).
* **Cancellation**: a caller that leaves (its client disconnected) stops waiting; the C-FIND goes
  on for the others. When the last caller leaves, the flight is cancelled (the DIMSE edge sends
  C-CANCEL, PS3.7 9.3.2.3) and that caller waits until it stopped, as ``Pacs.find`` promises.
* **Across replicas** (a shared cache and the cluster configured): a flight first takes
  ``lease:find:{node}:{digest}`` (``set_nx`` with its flight id, :data:`LEASE_TTL`, re-armed every
  third of it). The replica holding it runs the C-FIND and publishes the outcome (the result as
  DICOM JSON, or the error's JSON, or "gone" when its own clients all left) on
  ``flight:find:{flight id}``, a short-lived stream the others block on (``XREAD``: the wake-up and
  the value in one). A replica that finds the lease taken follows that flight instead of asking
  the PACS. When the lease disappears without an outcome (the holder died) or the holder gave up,
  the follower takes the lease itself; when the holder is still at it after :func:`wait_limit`,
  the follower runs its own C-FIND. Redis unreachable: the lease fails open and each replica asks
  the PACS itself (docs/architecture.md, "Cache").

``/metrics`` (given the app's registry): ``dwg_find_flights_total``, ``dwg_find_joined_total`` and
``dwg_find_followed_total`` by node (the attributes ``flights``, ``joined`` and ``followed`` are their
sums over the nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import orjson
from pydicom.dataset import Dataset

from cache import keys
from cache.base import Cache, StreamEntry
from gateway import errors
from gateway.observability import Registry
from gateway.pacs import (
    FindResult,
    OnInstance,
    Pacs,
    QueryModel,
    RetrieveOutcome,
    RetrieveRequest,
    StoreItems,
    StoreResult,
)
from gateway.query_cache import identifier_digest
from gateway.settings import PacsNode
from translators.dicom_json import dataset_to_json
from translators.dicom_json_decode import dataset_from_json

log = logging.getLogger(__name__)

LEASE_TTL = 5.0        # a dead holder is noticed within this (plus one POLL)
POLL = 1.0             # a follower blocks this long on the outcome between looks at the lease
OUTCOME_TTL = 10.0     # followers are blocked on the outcome when it lands: seconds are plenty
ACQUIRE_ATTEMPTS = 3   # lease taken, then gone before we could read it: retries before going alone


def wait_limit(node: PacsNode) -> float:
    """How long a follower waits for another replica's C-FIND on ``node`` before running its own:
    what that C-FIND may legitimately take (association set-up plus the network timeout)."""
    t = node.timeouts
    return t.connect + t.acse + t.network


@dataclass(eq=False)
class _Flight:
    task: asyncio.Future[FindResult]
    waiters: int = 0


class _Gone(Exception):
    """The flight we followed ended without an outcome (its holder died or its clients left)."""


class CoalescingPacs:
    def __init__(self, pacs: Pacs, cache: Cache | None = None, registry: Registry | None = None) -> None:
        """``cache``: shared by the replicas (then flights coalesce across them), or None.
        ``registry``: the app's metrics (``/metrics``), where the counters below are kept by node."""
        self.pacs = pacs
        self.cache = cache
        self._flights: dict[tuple[str, str], _Flight] = {}
        registry = registry or Registry()
        self._flights_total = registry.counter(
            "dwg_find_flights_total", "C-FINDs started by the single-flight (run here, or followed on "
            "another replica)", ("node",))
        self._joined_total = registry.counter(
            "dwg_find_joined_total", "C-FIND callers that joined an identical C-FIND in flight instead "
            "of starting one", ("node",))
        self._followed_total = registry.counter(
            "dwg_find_followed_total", "C-FINDs answered by the identical C-FIND of another replica",
            ("node",))
        self.flights = 0
        """Flights started in this process (each one C-FIND here or followed on another replica)."""
        self.joined = 0
        """Callers that joined a flight already in the air instead of starting one."""
        self.followed = 0
        """Flights answered by another replica's C-FIND."""

    # ------------------------------------------------------------------ coalesced

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult:
        model = model or node.query_model
        key = (node.name, identifier_digest(identifier, model, max_results))
        flight = self._flights.get(key)
        if flight is None or flight.task.done():
            # A copy: the caller may reuse its identifier while the flight still reads it.
            ident = copy.deepcopy(identifier)
            flight = _Flight(asyncio.ensure_future(self._fly(node, ident, model, max_results, key[1])))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda task: self._landed(key, flight))
            self.flights += 1
            self._flights_total.inc_values((node.name,))
        else:
            self.joined += 1
            self._joined_total.inc_values((node.name,))
        flight.waiters += 1
        try:
            result = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # The last caller left: cancel the C-FIND and wait for it to stop (the budget is
                # given back by then). A caller arriving now starts a new flight.
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.task.cancel()
                await asyncio.wait([flight.task])
            raise
        except errors.GatewayError as exc:
            flight.waiters -= 1
            # Each caller gets its own error object: callers amend them (e.g. "every node failed").
            raise copy.copy(exc) from exc.__cause__
        except BaseException:
            flight.waiters -= 1
            raise
        flight.waiters -= 1
        return result

    def _landed(self, key: tuple[str, str], flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.task.cancelled():
            flight.task.exception()     # retrieved: the waiters got it (or all of them left)

    async def _fly(self, node: PacsNode, ident: Dataset, model: QueryModel, max_results: int | None,
                   digest: str) -> FindResult:
        if self.cache is None:
            return await self.pacs.find(node, ident, model=model, max_results=max_results)
        return await self._fly_shared(self.cache, node, ident, model, max_results, digest)

    # ------------------------------------------------------------------ across replicas

    async def _fly_shared(self, cache: Cache, node: PacsNode, ident: Dataset, model: QueryModel,
                          max_results: int | None, digest: str) -> FindResult:
        loop = asyncio.get_running_loop()
        lease = keys.find_lease(node.name, digest)
        deadline = loop.time() + wait_limit(node)
        attempts = 0
        while loop.time() < deadline and attempts < ACQUIRE_ATTEMPTS:
            flight_id = secrets.token_hex(12)
            if await cache.set_nx(lease, flight_id.encode(), LEASE_TTL):
                return await self._lead(cache, node, ident, model, max_results, lease, flight_id)
            holder = await cache.get(lease)
            if holder is None:
                attempts += 1       # released meanwhile (or not ours to read): try to take it again
                continue
            try:
                result = await self._follow(cache, node, lease, holder, deadline)
            except _Gone:
                attempts = 0
                continue            # the holder died or gave up: take the lease, or follow the next
            self.followed += 1
            self._followed_total.inc_values((node.name,))
            return result
        log.info("C-FIND on node %s: the replica running the same query took too long; asking "
                 "the node directly", node.name)
        return await self.pacs.find(node, ident, model=model, max_results=max_results)

    async def _lead(self, cache: Cache, node: PacsNode, ident: Dataset, model: QueryModel,
                    max_results: int | None, lease: str, flight_id: str) -> FindResult:
        keeper = asyncio.ensure_future(_keep(cache, lease, flight_id.encode()))
        outcome: dict[bytes, bytes] = {b"gone": b"1"}   # unless a result or an error replaces it
        try:
            result = await self.pacs.find(node, ident, model=model, max_results=max_results)
            outcome = {b"result": _encode(result)}
            return result
        except errors.GatewayError as exc:
            outcome = {b"error": orjson.dumps(exc.to_json())}
            raise
        finally:
            keeper.cancel()
            # Published before the lease goes, so a follower that sees the lease gone finds it.
            # Shielded: a cancelled flight still tells its followers to go on without it.
            await asyncio.shield(self._finish(cache, lease, flight_id, outcome))

    @staticmethod
    async def _finish(cache: Cache, lease: str, flight_id: str, outcome: dict[bytes, bytes]) -> None:
        await cache.xadd(keys.find_flight(flight_id), outcome, OUTCOME_TTL, maxlen=1)
        await cache.delete_if(lease, flight_id.encode())

    async def _follow(self, cache: Cache, node: PacsNode, lease: str, holder: bytes,
                      deadline: float) -> FindResult:
        """The outcome of the flight ``holder`` runs on another replica; :class:`_Gone` when it
        ends without one, or when ``deadline`` passes (then the caller asks the node itself)."""
        loop = asyncio.get_running_loop()
        stream = keys.find_flight(holder.decode(errors="replace"))
        while True:
            wait = min(POLL, deadline - loop.time())
            if wait <= 0:
                raise _Gone()
            entries = await cache.xread_from(stream, b"0", int(wait * 1000))
            if entries:
                return _outcome(node, entries[0])
            if await cache.get(lease) != holder:
                # The lease is gone (or another's): one last look, the outcome may just have landed.
                entries = await cache.xread_from(stream, b"0", 0)
                if entries:
                    return _outcome(node, entries[0])
                raise _Gone()

    # ------------------------------------------------------------------ passed through

    async def echo(self, node: PacsNode) -> float:
        return await self.pacs.echo(node)

    async def get(self, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
                  cancel: threading.Event) -> RetrieveOutcome:
        return await self.pacs.get(node, request, on_instance, cancel)

    async def move(self, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
                   cancel: threading.Event) -> RetrieveOutcome:
        return await self.pacs.move(node, request, destination=destination, msg_id=msg_id, cancel=cancel)

    async def store(self, node: PacsNode, items: StoreItems, workdir: Path) -> list[StoreResult]:
        return await self.pacs.store(node, items, workdir)

    def query_associations_opened(self, node: PacsNode) -> int:
        return self.pacs.query_associations_opened(node)

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            flight.task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*(f.task for f in self._flights.values()), return_exceptions=True)
        await self.pacs.close()


async def _keep(cache: Cache, lease: str, token: bytes) -> None:
    """Re-arm the lease while the C-FIND runs; stop quietly if it was lost (a stall: at worst
    another replica asks the same)."""
    while True:
        await asyncio.sleep(LEASE_TTL / 3)
        if not await cache.extend_if(lease, token, LEASE_TTL):
            return


def _encode(result: FindResult) -> bytes:
    return orjson.dumps({"t": result.truncated, "w": result.warnings,
                         "d": [dataset_to_json(ds) for ds in result.datasets]})


def _outcome(node: PacsNode, entry: StreamEntry) -> FindResult:
    """A published outcome -> the result, or the error raised again here; :class:`_Gone` for "gone"
    and for anything unreadable (then this replica asks for itself)."""
    fields = entry[1]
    try:
        if b"result" in fields:
            body = orjson.loads(fields[b"result"])
            return FindResult(node=node.name, datasets=[dataset_from_json(d) for d in body["d"]],
                              truncated=bool(body["t"]), warnings=[str(w) for w in body["w"]])
        if b"error" in fields:
            error = orjson.loads(fields[b"error"])
        else:
            raise _Gone()
    except _Gone:
        raise
    except Exception:  # noqa: BLE001 - a foreign or corrupt outcome: ask the PACS ourselves
        log.warning("ignoring an unreadable C-FIND outcome published by another replica")
        raise _Gone() from None
    raise errors.from_json(error if isinstance(error, dict) else {})
