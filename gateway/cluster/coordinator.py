"""The single-flight across replicas: one replica retrieves a series, the others copy from it.

The replica that takes the series lease (the *holder*) retrieves from the PACS and announces every
instance that lands in its spool on the retrieval's arrivals stream. Any other replica wanting the
series (a *follower*) reads that stream from its start, copies each instance it wants into its own
spool and hands it to its local fetch. When the lease goes without an ``end`` entry (the holder
died), or the holder gave up because its own clients left, a follower takes the lease and retrieves
only what is still missing. Keys are per (node, study, series) (cache.keys): a series of node ``a``
is never followed for node ``b``.

Redis trouble degrades to the in-process behaviour: ``set_nx`` fails open, stream reads come back
empty, so each replica retrieves alone (duplicate work is the accepted cost).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cache import keys
from cache.base import Cache, StreamEntry
from cache.spool import Spool
from gateway.cluster.arrivals import (
    POLL_MS,
    STREAM_TTL,
    End,
    arrival_fields,
    end_fields,
    parse_arrival,
    parse_end,
)
from gateway.cluster.copies import Copies, ReplicaClient
from gateway.cluster.lease import LEASE_TTL, RedisPatience, keep
from gateway.cluster.moves import MoveRouting
from gateway.retrieval.coordinator import FromPacs
from gateway.retrieval.fetch import SeriesFetch

log = logging.getLogger(__name__)


class ClusterCoordinator:
    """Implements :class:`gateway.retrieval.coordinator.Coordinator` across replicas."""

    def __init__(self, cache: Cache, spool: Spool, secret: str, url: str) -> None:
        self.cache = cache
        self.spool = spool
        self.url = url
        self.replica_id = secrets.token_hex(8)
        self.secret = secret.encode()
        self.client = ReplicaClient(secret)
        self.patience = RedisPatience(cache)
        self.moves = MoveRouting(cache, spool, self.replica_id, self._announce_remote)
        self._copies: dict[int, Copies] = {}  # id(fetch) -> its copier, while the fetch runs

    async def close(self) -> None:
        await self.client.close()

    def _new_id(self) -> bytes:
        return f"{self.replica_id}.{secrets.token_hex(8)}".encode()

    # ------------------------------------------------------------------ single-flight

    async def run(self, fetch: SeriesFetch, from_pacs: FromPacs) -> None:
        """Bring every instance of ``fetch`` into the local spool: from another replica if one holds or
        held the series, else from the PACS under the series lease."""
        sid = fetch.manifest.id
        lease, latest = keys.series_lease(sid), keys.latest_retrieval(sid)
        followed: set[bytes] = set()
        copies = self._copies[id(fetch)] = Copies(self.client, self.spool, self.replica_id, fetch)
        lost_races = 0
        try:
            while fetch.missing and not fetch.cancel.is_set():
                rid = await self.cache.get(lease)
                if rid is None and self.cache.degraded:
                    # Not "no lease": Redis could not tell (an outage, or a read that timed out on
                    # a busy event loop). Wait the blip out and read again; only a real outage
                    # sends this replica its own way.
                    if await self.patience.unsure():
                        log.warning("Redis unavailable: retrieving a series without the cluster lease")
                        await self._hold(fetch, self._new_id(), None, from_pacs)
                        return
                    continue
                live = rid is not None
                if rid is None:
                    rid = await self.cache.get(latest)
                if rid is not None and rid not in followed:
                    log.debug("replica %s follows retrieval %s (live: %s)", self.replica_id, rid, live)
                    followed.add(rid)
                    lost_races = 0
                    end = await self._follow(fetch, copies, rid, lease if live else None)
                    if end.error is not None and not end.retry and live and fetch.missing:
                        raise end.error
                    continue
                if live and rid in followed:
                    # Still held by a retrieval this loop followed to an end: it is ending (its end
                    # entry is written, the lease is freed next, on a loop that may be busy) or the
                    # follow lost sight of it (a lease read that came back empty). Neither is a lost
                    # race, which would send this replica to the PACS alone: follow it again after
                    # a pause (arrivals already copied are skipped, an end is read at once).
                    await asyncio.sleep(0.05)
                    followed.discard(rid)
                    continue
                if await self.patience.unsure():
                    log.warning("Redis unavailable: retrieving a series without the cluster lease")
                    await self._hold(fetch, self._new_id(), None, from_pacs)
                    return
                rid = self._new_id()
                if await self.cache.set_nx(lease, rid, LEASE_TTL):
                    # set_nx fails open: after a timeout the lease may be someone else's after all,
                    # or not set at all. Look again once Redis answers (or go alone if it does not).
                    blip = self.cache.degraded and not await self.patience.unsure()
                    holder = await self.cache.get(lease)
                    if (holder is not None and holder != rid) or (blip and holder is None):
                        continue
                    log.debug("replica %s holds retrieval %s", self.replica_id, rid)
                    await self._hold(fetch, rid, lease, from_pacs)
                    return
                lost_races += 1
                if lost_races >= 3:
                    # Someone else's value under the lease key that we cannot read: go alone.
                    log.warning("cannot take or read the lease of a series; retrieving without it")
                    await self._hold(fetch, rid, None, from_pacs)
                    return
                await asyncio.sleep(0.05 * lost_races)
        finally:
            self._copies.pop(id(fetch), None)
            await copies.close()

    async def _follow(self, fetch: SeriesFetch, copies: Copies, rid: bytes, lease: str | None) -> End:
        """Copy what retrieval ``rid`` announces until its end; ``lease`` None: it already finished."""
        stream = keys.arrivals(rid.decode(errors="replace"))
        last = b"0"

        async def consume(entries: list[StreamEntry]) -> End | None:
            nonlocal last
            for entry_id, fields in entries:
                last = entry_id
                if b"end" in fields:
                    await copies.settle()
                    return parse_end(fields, fetch.manifest.node)
                arrival = parse_arrival(fields, secret=self.secret)
                if arrival is not None:
                    copies.offer(arrival)
            return None

        unsure_since: float | None = None
        while not fetch.cancel.is_set():
            entries = await self.cache.xread_from(stream, last, POLL_MS if lease else 0)
            end = await consume(entries)
            if end is not None:
                return end
            if entries:
                continue
            alive = lease is not None and await self.cache.get(lease) == rid
            if lease is not None and not alive and self.cache.degraded:
                # Redis cannot tell right now: a hiccup shorter than a lease must not start a second
                # retrieval; a longer outage ends the wait and every replica goes alone.
                unsure_since = unsure_since or time.monotonic()
                if time.monotonic() - unsure_since < LEASE_TTL:
                    continue
            elif alive:
                unsure_since = None
            if not alive:
                log.debug("retrieval %s lost its lease without an end entry", rid)
                # No end entry and no lease: the holder died (or the stream expired). One last read
                # catches an end entry written just before the lease was freed.
                end = await consume(await self.cache.xread_from(stream, last, 0))
                await copies.settle()
                return end or End()
        return End()

    async def _hold(self, fetch: SeriesFetch, rid: bytes, lease: str | None, from_pacs: FromPacs) -> None:
        fetch.retrieval_id = rid.decode()
        stream = keys.arrivals(fetch.retrieval_id)
        await self.cache.set(keys.latest_retrieval(fetch.manifest.id), rid, STREAM_TTL)
        stop = asyncio.Event()
        keeper = asyncio.ensure_future(keep(self.cache, lease, rid)) if lease else None
        announcer = asyncio.ensure_future(self._announce(fetch, stream, stop))
        error: BaseException | None = None
        try:
            await from_pacs(fetch.missing)
        except BaseException as exc:
            error = exc
            raise
        finally:
            stop.set()
            await asyncio.gather(announcer, return_exceptions=True)
            if keeper is not None:
                keeper.cancel()
            await self.patience.write(self.cache.xadd, stream, end_fields(fetch, error), STREAM_TTL)
            if lease is not None:
                await self.patience.write(self.cache.delete_if, lease, rid)
            fetch.retrieval_id = None

    async def _announce(self, fetch: SeriesFetch, stream: str, stop: asyncio.Event) -> None:
        """Announce what lands in the local spool for ``fetch`` (also what was there before)."""
        i = 0
        while True:
            while i < len(fetch.arrived):
                sop = fetch.arrived[i]
                i += 1
                # Copies from another replica are announced too: if that replica dies, followers
                # still find a live source here.
                if not fetch.has(sop):
                    continue
                entry = fetch.entry(sop)
                await self.patience.write(
                    self.cache.xadd,
                    stream,
                    arrival_fields(
                        sop, entry.sop_class_uid, entry.transfer_syntax, self.replica_id, self.url,
                        secret=self.secret,
                    ),
                    STREAM_TTL,
                )
            if stop.is_set():
                return
            changed = asyncio.ensure_future(fetch.changed())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stopped.cancel()

    # ------------------------------------------------------------------ C-MOVE across replicas

    async def _announce_remote(self, stream_id: str, sop: str, cls: str, ts: str) -> None:
        """Announce, on the originator's stream, an instance our storage SCP received for its move."""
        await self.patience.write(
            self.cache.xadd,
            keys.arrivals(stream_id),
            arrival_fields(sop, cls, ts, self.replica_id, self.url, secret=self.secret),
            STREAM_TTL,
        )

    @asynccontextmanager
    async def move_scope(self, msg_id: int, fetch: SeriesFetch, expected: set[str]) -> AsyncIterator[None]:
        """While a C-MOVE runs: publish it, and copy in what other replicas' storage SCPs announce on
        our stream for it."""
        record = await self.moves.register(msg_id, fetch, expected)
        copies, rid = self._copies.get(id(fetch)), fetch.retrieval_id
        try:
            if copies is None or rid is None:
                yield
                return
            stream = keys.arrivals(rid)

            async def read(block_ms: int) -> int:
                entries = await self.cache.xread_from(stream, copies.last, block_ms)
                for entry_id, fields in entries:
                    copies.last = entry_id
                    arrival = parse_arrival(fields, secret=self.secret)
                    if arrival is not None:
                        copies.offer(arrival)
                return len(entries)

            async def reader() -> None:
                while True:
                    await read(POLL_MS)

            task = asyncio.ensure_future(reader())
            try:
                yield
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                # The PACS has answered the C-MOVE, and every C-STORE was answered only after its
                # announcement: the stream holds all of them now.
                while await read(0):
                    pass
                await copies.settle()
        finally:
            if record is not None:
                await self.moves.unregister(msg_id, record)
