"""C-MOVE across replicas: sub-operations that reach a replica other than the originator.

All replicas share one AE title behind one Service, so the PACS may deliver a sub-operation for a
C-MOVE another replica issued. The originator publishes the move under its Message ID before issuing
it (``move:pending:{id}``, cache.keys); the receiving storage SCP finds it there (UIDs cross-checked,
since IDs wrap), spools the instance under the move's (node, study, series) identity, announces it on
the originator's arrivals stream and only then answers the C-STORE, so the final C-MOVE response
still proves that everything is announced (docs/architecture.md, "C-MOVE").
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from cache import keys
from cache.base import Cache
from cache.spool import Spool
from gateway.pacs import RemoteMove
from gateway.retrieval.fetch import SeriesFetch
from translators.uids import InstanceId, is_uid

MOVE_TTL = 3600.0  # bounds a pending-move record left by a crashed originator
MOVE_MEMO_TTL = 2.0  # a storage SCP reads one move record once per burst of sub-operations

Announce = Callable[[str, str, str, str], Awaitable[None]]  # (stream id, sop, class, transfer syntax)


@dataclass(frozen=True)
class MoveRecord:
    study: str
    series: str
    node: str
    expected: frozenset[str]
    originator: str
    stream: str


def parse_move(raw: bytes) -> MoveRecord | None:
    try:
        d: Any = orjson.loads(raw)
        record = MoveRecord(
            str(d["study"]),
            str(d["series"]),
            str(d["node"]),
            frozenset(str(u) for u in d["expected"]),
            str(d["originator"]),
            str(d["stream"]),
        )
    except (ValueError, KeyError, TypeError):
        return None  # a foreign or corrupt value: the C-STORE is refused like any unexpected one
    return record if is_uid(record.series) and is_uid(record.study) else None


class MoveRouting:
    def __init__(self, cache: Cache, spool: Spool, replica_id: str, announce: Announce) -> None:
        self.cache = cache
        self.spool = spool
        self.replica_id = replica_id
        self.announce = announce
        self._memo: dict[int, tuple[float, MoveRecord | None]] = {}

    async def register(self, msg_id: int, fetch: SeriesFetch, expected: set[str]) -> bytes | None:
        """Publish a C-MOVE about to be issued, so whichever replica receives it can route it."""
        if fetch.retrieval_id is None:
            return None
        m = fetch.manifest
        record = orjson.dumps(
            {
                "study": m.study,
                "series": m.series,
                "node": m.node,
                "expected": sorted(expected),
                "originator": self.replica_id,
                "stream": fetch.retrieval_id,
            }
        )
        await self.cache.set(keys.pending_move(msg_id), record, MOVE_TTL)
        return record

    async def unregister(self, msg_id: int, record: bytes) -> None:
        await self.cache.delete_if(keys.pending_move(msg_id), record)

    async def lookup(self, msg_id: int, sop_uid: str) -> RemoteMove | None:
        """The storage SCP's question (asked from its thread): is this C-STORE for another replica?"""
        now = time.monotonic()
        memo = self._memo.get(msg_id)
        if memo is not None and memo[0] > now:
            record = memo[1]
        else:
            raw = await self.cache.get(keys.pending_move(msg_id))
            if raw is None:
                return None
            record = parse_move(raw)
            if len(self._memo) > 1024:
                self._memo = {k: v for k, v in self._memo.items() if v[0] > now}
            self._memo[msg_id] = (now + MOVE_MEMO_TTL, record)
        # Our own moves are routed locally; a Message ID that wrapped is caught by the UID check.
        if record is None or record.originator == self.replica_id or sop_uid not in record.expected:
            return None
        found = record

        def write(data: bytes, sop: str, cls: str, ts: str) -> None:
            self.spool.write(
                data,
                InstanceId(found.node, found.study, found.series, sop),
                sop_class_uid=cls,
                transfer_syntax=ts,
            )

        async def announce(sop: str, cls: str, ts: str) -> None:
            await self.announce(found.stream, sop, cls, ts)

        return RemoteMove(write=write, announce=announce)
