"""The arrivals stream of one cluster retrieval: what landed where, then how it ended.

``arrivals:{retrieval id}`` (cache.keys) holds one entry per instance that landed in a replica's
spool (``sop``, ``cls``, ``ts``, ``holder`` replica id, ``url`` of its internal endpoint), then one
``end`` entry (``done`` or ``error`` with the error's JSON and whether followers should retry). A
follower reads it from the start (pub/sub would lose what was announced before it subscribed).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import orjson

from gateway.errors import GatewayError, PacsError, from_json
from gateway.retrieval.fetch import SeriesFetch

STREAM_TTL = 600.0  # how long a finished retrieval can be replayed (its holder's spool may evict)
POLL_MS = 1000  # XREAD BLOCK per poll; between polls a follower checks the lease is alive


@dataclass(frozen=True)
class Arrival:
    sop: str
    sop_class: str
    transfer_syntax: str
    holder: str
    url: str


_SIGNED = (b"sop", b"cls", b"ts", b"holder", b"url")


def _signature(secret: bytes, fields: dict[bytes, bytes]) -> bytes:
    message = b"\0".join(fields[name] for name in _SIGNED)
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode()


def arrival_fields(
    sop: str, sop_class: str, transfer_syntax: str, holder: str, url: str, *, secret: bytes
) -> dict[bytes, bytes]:
    """An arrival entry, signed with the cluster's shared secret: a follower contacts only URLs a
    replica announced, never one anybody with write access to Redis put there (it would be handed
    the secret in the Authorization header)."""
    fields = {
        b"sop": sop.encode(),
        b"cls": sop_class.encode(),
        b"ts": transfer_syntax.encode(),
        b"holder": holder.encode(),
        b"url": url.encode(),
    }
    fields[b"sig"] = _signature(secret, fields)
    return fields


def parse_arrival(fields: dict[bytes, bytes], *, secret: bytes) -> Arrival | None:
    """The arrival, or None for an entry we did not write (unsigned, badly signed, malformed)."""
    try:
        if not hmac.compare_digest(fields[b"sig"], _signature(secret, fields)):
            return None
        return Arrival(
            fields[b"sop"].decode(),
            fields[b"cls"].decode(),
            fields[b"ts"].decode(),
            fields[b"holder"].decode(),
            fields[b"url"].decode(),
        )
    except (KeyError, UnicodeDecodeError):
        return None


@dataclass
class End:
    """How following one retrieval ended: its final entry, or ``gone`` (holder died, stream expired)."""

    error: GatewayError | None = None
    retry: bool = True  # False: the holder's verdict on the PACS stands for its followers too


def end_fields(fetch: SeriesFetch, error: BaseException | None) -> dict[bytes, bytes]:
    still = fetch.missing
    if not still and error is None:
        return {b"end": b"done"}
    if isinstance(error, GatewayError):
        verdict, retry = error, b"0"
    elif error is not None or fetch.cancel.is_set():
        # Not a verdict on the PACS (our clients left, shutdown, a bug): followers try themselves.
        verdict, retry = PacsError("the replica retrieving the series gave up"), b"1"
    else:
        m = fetch.manifest
        verdict, retry = (
            PacsError(
                f"node {m.node} did not deliver {len(still)} of {len(m.uids)} instances of series {m.series}",
                node=m.node,
            ),
            b"0",
        )
    return {b"end": b"error", b"error": orjson.dumps(verdict.to_json()), b"retry": retry}


def parse_end(fields: dict[bytes, bytes], node: str) -> End:
    if fields.get(b"end") == b"done":
        return End()
    try:
        body = orjson.loads(fields.get(b"error", b"{}"))
        error = from_json(body if isinstance(body, dict) else {})
    except orjson.JSONDecodeError:
        error = PacsError("retrieval failed")
    error.node = error.node or node
    return End(error, retry=fields.get(b"retry") != b"0")
