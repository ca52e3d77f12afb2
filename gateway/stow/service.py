"""StowService: one STOW-RS request from body to per-instance outcomes (PS3.18 §10.5;
docs/architecture.md, "STOW-RS").

1. Receive: the multipart body, streamed part by part to temp files in a work directory of the
   request under the spool's ``.incoming`` (:mod:`gateway.stow.receive`).
2. Prepare, in a thread: Part-10 instances from the parts, repaired where needed, or a failure code
   for each part that cannot be stored (:mod:`gateway.stow.prepare`).
3. C-STORE what is left through :meth:`gateway.pacs.Pacs.store` (one association, holding one of
   the node's transfer slots); success only for what the PACS confirmed.
4. Freshness (docs/architecture.md, "Freshness"; :mod:`cache.keys`): bump exactly the generations
   :func:`cache.keys.generations_changed_by_store` names for the studies that got an instance, and
   record those studies' location (study -> node) for federated WADO.
5. The work directory goes, whatever happened (transcoded copies the PACS interface made included).

If the body raises (the HTTP client left during the upload) nothing is stored and the exception
propagates; so does a :class:`gateway.errors.PacsError` from the store (e.g. the node is unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from cache import keys
from cache.base import Cache
from cache.spool import Spool
from gateway.errors import BadRequest
from gateway.pacs import Pacs, StoreResult
from gateway.settings import PacsNode, Settings
from gateway.stow.prepare import ROOT_TYPES, Header, Prepared, prepare
from gateway.stow.receive import receive
from translators import stow as st
from translators.uids import is_uid

log = logging.getLogger(__name__)

_UNREAD = Header("", "", "", "", "")


class StowService:
    def __init__(self, settings: Settings, pacs: Pacs, cache: Cache, spool: Spool) -> None:
        self.settings = settings
        self.pacs = pacs
        self.cache = cache
        self.spool = spool

    async def store(self, node: PacsNode, *, root_type: str, boundary: str, body: AsyncIterator[bytes],
                    study: str | None = None) -> list[st.InstanceOutcome]:
        """Store every instance of a ``multipart/related`` body into ``node``.

        ``root_type``: the request's ``type`` parameter, one of :data:`gateway.stow.prepare.ROOT_TYPES`
        (the caller answers 415 for others); ``boundary``: its boundary; ``study``: the (valid) UID of
        ``POST /studies/{study}``, or None. Returns one outcome per instance, in request order.
        Raises :class:`~gateway.errors.BadRequest` when the body holds no part at all.
        """
        if root_type not in ROOT_TYPES:
            raise ValueError(f"unsupported STOW-RS root type {root_type!r}")
        workdir = Path(tempfile.mkdtemp(prefix="stow-", dir=self.spool.tmp))
        reserved = 0

        def reserve(nbytes: int) -> bool:
            nonlocal reserved
            if not self.spool.reserve(nbytes):
                return False
            reserved += nbytes
            return True

        try:
            limits = self.settings.limits
            received = await receive(body, boundary, workdir, max_bytes=limits.max_stow_bytes,
                                     max_parts=limits.max_stow_parts, reserve=reserve)
            if not received.parts and not received.truncated_headers:
                raise BadRequest(f"the body holds no part delimited by the boundary {boundary!r}")
            prepared = await asyncio.to_thread(prepare, received, root_type, study, workdir)
            items = prepared.items
            results = await self.pacs.store(node, items, workdir) if items else []
            outcomes = _outcomes(prepared, results)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            self.spool.release(reserved)
        await self._after_store(node, outcomes)
        stored = sum(1 for o in outcomes if st.is_stored(o.status))
        log.info("STOW-RS to %s: %d of %d instances stored", node.name, stored, len(outcomes))
        return outcomes

    async def _after_store(self, node: PacsNode, outcomes: Sequence[st.InstanceOutcome]) -> None:
        """Bump the generations the stored instances make stale and record the studies' location.

        The cache never raises (cache/base.py); an unreachable one means cached searches may stay
        stale until their TTL, which is logged, and the request still succeeds.
        """
        stored = [o for o in outcomes if st.is_stored(o.status)]
        if not stored:
            return
        # Keys hold UIDs only (cache/keys.py): a study UID that is not one cannot be searched for
        # through the gateway either, so it has no generation to bump.
        studies = sorted({o.study_uid for o in stored if o.study_uid and is_uid(o.study_uid)})
        bumped = [await self.cache.incr(counter)
                  for counter in keys.generations_changed_by_store(node.name, studies)]
        if any(value < 0 for value in bumped):
            log.warning("STOW-RS to %s: the cache did not take the generation bump; cached searches "
                        "may be stale until their TTL", node.name)
        ttl = self.settings.cache.ttl.location
        for study in studies:
            await self.cache.sadd(keys.study_locations(study), [node.name], ttl)


def _outcomes(prepared: Prepared, results: Sequence[StoreResult]) -> list[st.InstanceOutcome]:
    """One outcome per entry: its failure code, or the PACS's status for the item it stored.

    A result the PACS did not confirm is never a success, whatever its status says; an item without a
    result (the PACS interface returned too few) is a processing failure.
    """
    remaining = iter(results)
    outcomes: list[st.InstanceOutcome] = []
    for entry in prepared.entries:
        if entry.item is None:
            assert entry.status is not None
            status = entry.status
        else:
            result = next(remaining, None)
            if result is None or (st.is_stored(result.status) and not result.confirmed):
                status = st.PROCESSING_FAILURE
            else:
                status = result.status
        h = entry.header or _UNREAD
        outcomes.append(st.InstanceOutcome(h.sop_class or None, h.sop_instance or None, status,
                                           h.study or None, h.series or None))
    return outcomes
