"""Cluster-wide single-flight and C-MOVE routing across replicas (architecture.md §3, §4).

Active when the cache is shared (Redis) and ``cluster.internal_port`` + ``cluster.shared_secret`` are
set; otherwise the in-process single-flight of :mod:`gateway.retrieval` works alone. Keys (after the
cache prefix; UIDs and random ids only, never patient data):

    ====================================  =========  ==============================================
    lease:series:{SeriesInstanceUID}      string     the retrieval id holding the series:
                                                     ``set_nx`` for ``LEASE_TTL``, re-armed with
                                                     ``extend_if`` every ``LEASE_TTL / 3``, freed
                                                     with ``delete_if``; expires if the holder dies
    arrivals:{retrieval id}               stream     one entry per instance that landed in a spool
                                                     (``sop``, ``cls``, ``ts``, ``holder`` replica
                                                     id, ``url`` of its internal endpoint), then one
                                                     ``end`` entry (``done`` | ``error``);
                                                     ``STREAM_TTL`` re-armed per entry
    retrieval:series:{SeriesInstanceUID}  string     the latest retrieval id of the series
                                                     (``STREAM_TTL``): who comes after the lease was
                                                     freed replays that stream instead of asking
                                                     the PACS again
    move:pending:{Message ID}             string     JSON of a C-MOVE in flight (study, series,
                                                     node, expected SOP UIDs, originator replica,
                                                     retrieval id); ``MOVE_TTL``, deleted after it
    move:msgid                            counter    C-MOVE Message IDs (``next_counter``)
    ====================================  =========  ==============================================

The replica that takes the lease (the *holder*) retrieves from the PACS and announces every instance
that lands in its spool. Any other replica wanting the series (a *follower*) reads the stream from
its start (pub/sub would lose what was announced before it subscribed), copies each instance it
wants from the holder's internal endpoint (``GET /internal/instances/{sop}``, bearer secret) into
its own spool, and hands it to its local :class:`~gateway.retrieval.SeriesFetch`: its HTTP streams
behave exactly as if it had retrieved the instance itself. When the lease goes without an ``end``
entry (the holder died), or the holder gave up because its own clients left, a follower takes the
lease and retrieves only what is still missing.

C-MOVE across replicas: all replicas share one AE title behind one Service, so the PACS may deliver
a sub-operation to a replica other than the originator. The originator registers the move under its
Message ID before issuing it; the receiving storage SCP finds it there (UIDs cross-checked, since
IDs wrap), spools the instance, announces it on the originator's stream and only then answers the
C-STORE, so the final C-MOVE response still proves that everything is announced.

Redis trouble degrades to the in-process behaviour: ``set_nx`` fails open, stream reads come back
empty, so each replica retrieves alone (duplicate work is the accepted cost).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from cache.base import Cache, StreamEntry, key
from cache.memory import MemoryCache
from cache.spool import Spool
from gateway.dimse.storage_scp import RemoteMove, StorageScp
from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    DimseFailure,
    DimseTimeout,
    GatewayError,
    NodeUnreachable,
    NotFound,
    PacsError,
)
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.retrieval import SeriesFetch
    from gateway.routes.internal import InternalServer

log = logging.getLogger(__name__)

LEASE_TTL = 10.0          # a GC pause or a slow Redis call must not cost the lease; a dead holder ~10 s
STREAM_TTL = 600.0        # how long a finished retrieval can be replayed (its holder's spool may evict)
MOVE_TTL = 3600.0         # bounds a pending-move record left by a crashed originator
POLL_MS = 1000            # XREAD BLOCK per poll; between polls a follower checks the lease is alive
COPY_CONCURRENCY = 4      # parallel copies per followed retrieval
ACQUIRE_PATIENCE = 2.0    # how long a retrieval waits out a Redis blip before going without the lease
MOVE_MEMO_TTL = 2.0       # a storage SCP reads one move record once per burst of sub-operations
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
# Errors a holder reports that followers re-raise as such (anything else becomes a PacsError).
_ERRORS: dict[str, type[GatewayError]] = {c.__name__: c for c in (
    PacsError, NodeUnreachable, AssociationRejected, AssociationAborted, DimseFailure, DimseTimeout,
    NotFound)}

Pacs = Callable[[list[str]], Awaitable[None]]


@dataclass
class _End:
    """How following one retrieval ended: its final entry, or ``gone`` (holder died, stream expired)."""

    error: GatewayError | None = None
    retry: bool = True     # False: the holder's verdict on the PACS stands for its followers too


@dataclass(frozen=True)
class _MoveRecord:
    study: str
    series: str
    node: str
    expected: frozenset[str]
    originator: str
    stream: str


def missing(fetch: SeriesFetch) -> list[str]:
    return [u for u in fetch.manifest.uids if not fetch.has(u)]


class Copies:
    """Copies announced instances of one fetch into the local spool, each at most once at a time."""

    def __init__(self, cluster: Cluster, fetch: SeriesFetch) -> None:
        self.cluster = cluster
        self.fetch = fetch
        self.wanted = set(fetch.manifest.uids)
        self.started: set[str] = set()
        self.dead: set[str] = set()         # holder URLs that refused a connection during this fetch
        self.last = b"0"                    # stream position while holding (remote C-MOVE arrivals)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(COPY_CONCURRENCY)

    def offer(self, fields: dict[bytes, bytes]) -> None:
        try:
            sop, cls, ts = (fields[b"sop"].decode(), fields[b"cls"].decode(), fields[b"ts"].decode())
            holder, url = fields[b"holder"].decode(), fields[b"url"].decode()
        except (KeyError, UnicodeDecodeError):
            return                           # not an arrival we wrote: ignore it
        if sop not in self.wanted or sop in self.started or self.fetch.has(sop) or not _UID.fullmatch(sop):
            return
        if self.cluster.spool.get(sop) is not None:
            self.fetch.arrive(sop)           # already here (an earlier retrieval, or it was ours)
            return
        if holder == self.cluster.replica_id or url in self.dead:
            return                           # ours but evicted, or its holder is gone: missing
        self.started.add(sop)
        task = asyncio.ensure_future(self._copy(sop, cls, ts, url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _copy(self, sop: str, cls: str, ts: str, url: str) -> None:
        ok = False
        try:
            async with self._slots:
                if self.fetch.has(sop) or self.fetch.cancel.is_set() or url in self.dead:
                    return
                ok = await self.cluster.copy_instance(url, sop, cls, ts, self.fetch)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            log.warning("replica at %s is unreachable; instances it announced will be retrieved again", url)
            self.dead.add(url)
        except Exception as exc:  # noqa: BLE001 - a failed copy is a missing instance, retrieved later
            log.warning("copying an instance from the replica at %s failed: %s", url, type(exc).__name__)
        finally:
            if ok:
                self.fetch.arrive(sop)
            else:
                self.started.discard(sop)    # another announcement (or our own retrieval) may bring it

    async def settle(self) -> None:
        """Wait for every copy started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.settle()


class Cluster:
    def __init__(self, cache: Cache, spool: Spool, secret: str, url: str) -> None:
        self.cache = cache
        self.spool = spool
        self.url = url
        self.replica_id = secrets.token_hex(8)
        # trust_env=False: replica-to-replica traffic must never go through an HTTP(S)_PROXY.
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0), trust_env=False,
                                      headers={"Authorization": f"Bearer {secret}"})
        self._moves: dict[int, tuple[float, _MoveRecord | None]] = {}
        self._gave_up = False

    async def close(self) -> None:
        await self.http.aclose()

    def _new_id(self) -> bytes:
        return f"{self.replica_id}.{secrets.token_hex(8)}".encode()

    def _fields(self, sop: str, cls: str, ts: str) -> dict[bytes, bytes]:
        return {b"sop": sop.encode(), b"cls": cls.encode(), b"ts": ts.encode(),
                b"holder": self.replica_id.encode(), b"url": self.url.encode()}

    # ------------------------------------------------------------------ single-flight

    async def run(self, fetch: SeriesFetch, pacs: Pacs) -> None:
        """Bring every instance of ``fetch`` into the local spool: from another replica if one holds or
        held the series, else from the PACS (``pacs(missing uids)``) under the series lease."""
        series = fetch.manifest.series
        lease, latest = key("lease", "series", series), key("retrieval", "series", series)
        followed: set[bytes] = set()
        copies = fetch.remote = Copies(self, fetch)
        lost_races = 0
        try:
            while missing(fetch) and not fetch.cancel.is_set():
                rid = await self.cache.get(lease)
                live = rid is not None
                if rid is None:
                    rid = await self.cache.get(latest)
                if rid is not None and rid not in followed:
                    log.debug("replica %s follows retrieval %s (live: %s)", self.replica_id, rid, live)
                    followed.add(rid)
                    lost_races = 0
                    end = await self._follow(fetch, copies, rid, lease if live else None)
                    if end.error is not None and not end.retry and live and missing(fetch):
                        raise end.error
                    continue
                if await self._redis_unsure():
                    log.warning("Redis unavailable: retrieving a series without the cluster lease")
                    await self._hold(fetch, self._new_id(), None, pacs)
                    return
                rid = self._new_id()
                if await self.cache.set_nx(lease, rid, LEASE_TTL):
                    # set_nx fails open: after a timeout the lease may be someone else's after all,
                    # or not set at all. Look again once Redis answers (or go alone if it does not).
                    blip = getattr(self.cache, "degraded", False) and not await self._redis_unsure()
                    holder = await self.cache.get(lease)
                    if (holder is not None and holder != rid) or (blip and holder is None):
                        continue
                    log.debug("replica %s holds retrieval %s", self.replica_id, rid)
                    await self._hold(fetch, rid, lease, pacs)
                    return
                lost_races += 1
                if lost_races >= 3:
                    # Someone else's value under the lease key that we cannot read: go alone.
                    log.warning("cannot take or read the lease of a series; retrieving without it")
                    await self._hold(fetch, rid, None, pacs)
                    return
                await asyncio.sleep(0.05 * lost_races)
        finally:
            await copies.close()

    async def _redis_unsure(self) -> bool:
        """True when Redis stays unreachable for ``ACQUIRE_PATIENCE`` seconds.

        During an outage the cache answers at once with fail-open values (``set_nx`` -> True), which
        would make every replica retrieve. A blip (a burst of new connections, a starved event loop)
        is waited out instead; a real outage costs each new retrieval this wait, then it goes alone.
        """
        if not getattr(self.cache, "degraded", False):
            self._gave_up = False
            return False
        if self._gave_up:
            return True                      # this outage was waited for once already: no more waits
        deadline = time.monotonic() + ACQUIRE_PATIENCE
        while getattr(self.cache, "degraded", False):
            if time.monotonic() > deadline:
                self._gave_up = True
                return True
            await asyncio.sleep(0.1)
            await self.cache.ping()          # a probe: it ends the outage as soon as Redis answers
        return False

    async def _write(self, op: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """A write others wait for (announcement, end entry, lease release). The cache swallows
        failures, so a write that coincided with a Redis blip is repeated once Redis answers again;
        repeating is harmless (followers ignore duplicates; compare-and-delete is idempotent)."""
        await op(*args)
        if getattr(self.cache, "degraded", False) and not await self._redis_unsure():
            await op(*args)

    async def _follow(self, fetch: SeriesFetch, copies: Copies, rid: bytes, lease: str | None) -> _End:
        """Copy what retrieval ``rid`` announces until its end; ``lease`` None: it already finished."""
        stream = key("arrivals", rid.decode(errors="replace"))
        last = b"0"

        async def consume(entries: list[StreamEntry]) -> _End | None:
            nonlocal last
            for entry_id, fields in entries:
                last = entry_id
                if b"end" in fields:
                    await copies.settle()
                    return self._end(fields, fetch)
                copies.offer(fields)
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
            if lease is not None and not alive and getattr(self.cache, "degraded", False):
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
                return end or _End()
        return _End()

    @staticmethod
    def _end(fields: dict[bytes, bytes], fetch: SeriesFetch) -> _End:
        if fields.get(b"end") == b"done":
            return _End()
        name = fields.get(b"error", b"").decode(errors="replace")
        detail = fields.get(b"detail", b"").decode(errors="replace") or "retrieval failed"
        return _End(_ERRORS.get(name, PacsError)(detail, node=fetch.manifest.node),
                    retry=fields.get(b"retry") != b"0")

    async def _hold(self, fetch: SeriesFetch, rid: bytes, lease: str | None, pacs: Pacs) -> None:
        fetch.retrieval_id = rid.decode()
        stream = key("arrivals", fetch.retrieval_id)
        await self.cache.set(key("retrieval", "series", fetch.manifest.series), rid, STREAM_TTL)
        stop = asyncio.Event()
        keeper = asyncio.ensure_future(self._keep(lease, rid)) if lease else None
        announcer = asyncio.ensure_future(self._announce(fetch, stream, stop))
        error: BaseException | None = None
        try:
            await pacs(missing(fetch))
        except BaseException as exc:
            error = exc
            raise
        finally:
            stop.set()
            await asyncio.gather(announcer, return_exceptions=True)
            if keeper is not None:
                keeper.cancel()
            await self._write(self.cache.xadd, stream, self._end_fields(fetch, error), STREAM_TTL)
            if lease is not None:
                await self._write(self.cache.delete_if, lease, rid)
            fetch.retrieval_id = None

    @staticmethod
    def _end_fields(fetch: SeriesFetch, error: BaseException | None) -> dict[bytes, bytes]:
        still = missing(fetch)
        if not still and error is None:
            return {b"end": b"done"}
        if isinstance(error, GatewayError):
            name, detail, retry = type(error).__name__, error.detail, b"0"
        elif error is not None or fetch.cancel.is_set():
            # Not a verdict on the PACS (our clients left, shutdown, a bug): followers try themselves.
            name, detail, retry = "PacsError", "the replica retrieving the series gave up", b"1"
        else:
            m = fetch.manifest
            name, retry = "PacsError", b"0"
            detail = (f"node {m.node} did not deliver {len(still)} of {len(m.uids)} instances of "
                      f"series {m.series}")
        return {b"end": b"error", b"error": name.encode(), b"detail": detail.encode(), b"retry": retry}

    async def _keep(self, lease: str, rid: bytes) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL / 3)
            if not await self.cache.extend_if(lease, rid, LEASE_TTL):
                # Expired (we were stalled) or taken over: finish anyway; at worst work is duplicated.
                log.warning("lost the lease of a series retrieval; finishing it without the lease")
                return

    async def _announce(self, fetch: SeriesFetch, stream: str, stop: asyncio.Event) -> None:
        """Announce what lands in the local spool for ``fetch`` (also what was there before)."""
        i = 0
        while True:
            while i < len(fetch.arrived):
                sop = fetch.arrived[i]
                i += 1
                # Copies from another replica are announced too: if that replica dies, followers
                # still find a live source here.
                entry = self.spool.get(sop)
                if entry is None:
                    continue
                await self._write(self.cache.xadd, stream,
                                  self._fields(sop, entry.sop_class_uid, entry.transfer_syntax), STREAM_TTL)
            if stop.is_set():
                return
            changed = asyncio.ensure_future(fetch.changed())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stopped.cancel()

    # ------------------------------------------------------------------ copying

    async def copy_instance(self, url: str, sop: str, cls: str, ts: str, fetch: SeriesFetch) -> bool:
        """Stream one instance from another replica into the spool (temp file + atomic rename)."""
        m = fetch.manifest
        fd, tmp = self.spool.temp_file()
        committed = False
        try:
            with os.fdopen(fd, "wb") as fh:
                async with self.http.stream("GET", f"{url}/internal/instances/{sop}") as response:
                    if response.status_code != 200:
                        log.info("replica at %s answered %d for an announced instance", url,
                                 response.status_code)
                        return False
                    # Plain writes: a chunk goes to the page cache, cheaper than a thread hop.
                    async for chunk in response.aiter_raw():
                        fh.write(chunk)
            self.spool.commit(tmp, sop_instance_uid=sop, sop_class_uid=cls, transfer_syntax=ts,
                              study_uid=m.study, series_uid=m.series, node=m.node)
            committed = True
            return True
        finally:
            if not committed:
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ C-MOVE across replicas

    async def register_move(self, msg_id: int, fetch: SeriesFetch, expected: set[str]) -> bytes | None:
        """Publish a C-MOVE about to be issued, so whichever replica receives it can route it."""
        if fetch.retrieval_id is None:
            return None
        m = fetch.manifest
        record = json.dumps({"study": m.study, "series": m.series, "node": m.node,
                             "expected": sorted(expected), "originator": self.replica_id,
                             "stream": fetch.retrieval_id}).encode()
        await self.cache.set(key("move", "pending", str(msg_id)), record, MOVE_TTL)
        return record

    async def unregister_move(self, msg_id: int, record: bytes) -> None:
        await self.cache.delete_if(key("move", "pending", str(msg_id)), record)

    @asynccontextmanager
    async def remote_arrivals(self, fetch: SeriesFetch) -> AsyncIterator[None]:
        """While a C-MOVE runs: copy in what other replicas' storage SCPs announce on our stream."""
        copies, rid = fetch.remote, fetch.retrieval_id
        if copies is None or rid is None:
            yield
            return
        stream = key("arrivals", rid)

        async def read(block_ms: int) -> int:
            entries = await self.cache.xread_from(stream, copies.last, block_ms)
            for entry_id, fields in entries:
                copies.last = entry_id
                copies.offer(fields)
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

    async def lookup_move(self, msg_id: int, sop_uid: str) -> RemoteMove | None:
        """The storage SCP's question (asked from its thread): is this C-STORE for another replica?"""
        now = time.monotonic()
        memo = self._moves.get(msg_id)
        if memo is not None and memo[0] > now:
            record = memo[1]
        else:
            raw = await self.cache.get(key("move", "pending", str(msg_id)))
            if raw is None:
                return None
            record = _parse_move(raw)
            if len(self._moves) > 1024:
                self._moves = {k: v for k, v in self._moves.items() if v[0] > now}
            self._moves[msg_id] = (now + MOVE_MEMO_TTL, record)
        # Our own moves are routed locally; a Message ID that wrapped is caught by the UID check.
        if record is None or record.originator == self.replica_id or sop_uid not in record.expected:
            return None

        def write(data: bytes, sop: str, cls: str, ts: str) -> None:
            assert record is not None
            self.spool.write(data, sop_instance_uid=sop, sop_class_uid=cls, transfer_syntax=ts,
                             study_uid=record.study, series_uid=record.series, node=record.node)

        async def announce(sop: str, cls: str, ts: str) -> None:
            assert record is not None
            await self._write(self.cache.xadd, key("arrivals", record.stream), self._fields(sop, cls, ts),
                              STREAM_TTL)

        return RemoteMove(write=write, announce=announce)


def _parse_move(raw: bytes) -> _MoveRecord | None:
    try:
        d: Any = json.loads(raw)
        record = _MoveRecord(str(d["study"]), str(d["series"]), str(d["node"]),
                             frozenset(str(u) for u in d["expected"]), str(d["originator"]), str(d["stream"]))
    except (ValueError, KeyError, TypeError):
        return None       # a foreign or corrupt value: the C-STORE is refused like any unexpected one
    return record if _UID.fullmatch(record.series) else None


# ---------------------------------------------------------------------- start-up


def advertised_url(host: str, port: int) -> str:
    """How other replicas reach this one: the bound address, or this host's address for a wildcard."""
    if host in ("", "0.0.0.0", "::"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_cluster(settings: Settings, cache: Cache, spool: Spool,
                        scp: StorageScp | None) -> tuple[Cluster | None, InternalServer | None]:
    """The cluster pieces for this replica, or (None, None) when it runs alone."""
    port, secret = settings.cluster.internal_port, settings.cluster.shared_secret
    if isinstance(cache, MemoryCache) or port is None:
        if not isinstance(cache, MemoryCache):
            log.info("cluster.internal_port is not set: replicas share the cache but not retrievals")
        return None, None
    if not secret:
        log.error("cluster.internal_port is set but cluster.shared_secret is not: refusing to start the "
                  "internal endpoint (it would serve instances to anyone); replicas will not share "
                  "retrievals until a shared secret is configured")
        return None, None
    from gateway.routes.internal import InternalServer

    server = InternalServer(spool, secret, settings.http.host, port)
    await server.start()
    cluster = Cluster(cache, spool, secret, advertised_url(settings.http.host, server.port))
    if scp is not None:
        scp.attach_cluster(asyncio.get_running_loop(), cluster.lookup_move)
    log.info("cluster: replica %s, internal endpoint %s", cluster.replica_id, cluster.url)
    return cluster, server


async def stop_cluster(cluster: Cluster | None, server: InternalServer | None) -> None:
    if server is not None:
        await server.stop()
    if cluster is not None:
        await cluster.close()
