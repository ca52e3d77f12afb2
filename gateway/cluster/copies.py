"""Copying announced instances from the replica that holds them into this replica's spool.

The holder serves its spooled files on its internal endpoint (``GET /internal/instances/{node}/{sop}``,
bearer shared secret; :mod:`gateway.routes.internal`). A copy is streamed to a spool temp file,
committed under the same (node, study, series, SOP) identity, pinned for the local fetch, and handed
to it: the local HTTP streams behave exactly as if this replica had retrieved the instance itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import httpx
from pydicom.filereader import read_file_meta_info

from cache.spool import Spool, SpoolEntry
from gateway.cluster.arrivals import Arrival
from gateway.retrieval.fetch import SeriesFetch
from translators.uids import is_uid

log = logging.getLogger(__name__)

COPY_CONCURRENCY = 4  # parallel copies per followed retrieval


class ReplicaClient:
    """The HTTP client for other replicas' internal endpoints."""

    def __init__(self, secret: str) -> None:
        # trust_env=False: replica-to-replica traffic must never go through an HTTP(S)_PROXY.
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(60.0, connect=2.0),
            trust_env=False,
            headers={"Authorization": f"Bearer {secret}"},
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def copy(self, spool: Spool, url: str, arrival: Arrival, fetch: SeriesFetch) -> SpoolEntry | None:
        """Stream one instance from another replica into the spool (temp file + atomic rename);
        the entry comes back pinned for ``fetch``; None when the replica no longer has it."""
        m = fetch.manifest
        fd, tmp = spool.temp_file()
        committed = False
        try:
            with os.fdopen(fd, "wb") as fh:
                async with self.http.stream(
                    "GET", f"{url}/internal/instances/{m.node}/{arrival.sop}"
                ) as response:
                    if response.status_code != 200:
                        log.info(
                            "replica at %s answered %d for an announced instance", url, response.status_code
                        )
                        return None
                    # Plain writes: a chunk goes to the page cache, cheaper than a thread hop.
                    async for chunk in response.aiter_raw():
                        fh.write(chunk)
            if not _is_instance(tmp, arrival):
                log.warning("replica at %s sent a file that is not the announced instance", url)
                return None
            entry = spool.commit(
                tmp,
                m.instance_id(arrival.sop),
                sop_class_uid=arrival.sop_class,
                transfer_syntax=arrival.transfer_syntax,
                pin=True,
            )
            committed = True
            return entry
        finally:
            if not committed:
                tmp.unlink(missing_ok=True)


def _is_instance(path: Path, arrival: Arrival) -> bool:
    """The copied file's meta (PS3.10 §7.1) names the announced SOP instance, class and syntax."""
    try:
        meta = read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - not a Part-10 file at all
        return False
    return (str(meta.get("MediaStorageSOPInstanceUID", "")) == arrival.sop
            and str(meta.get("MediaStorageSOPClassUID", "")) == arrival.sop_class
            and str(meta.get("TransferSyntaxUID", "")) == arrival.transfer_syntax)


class Copies:
    """Copies the announced instances one fetch wants, each at most once at a time."""

    def __init__(self, client: ReplicaClient, spool: Spool, replica_id: str, fetch: SeriesFetch) -> None:
        self.client = client
        self.spool = spool
        self.replica_id = replica_id
        self.fetch = fetch
        self.wanted = set(fetch.manifest.uids)
        self.started: set[str] = set()
        self.dead: set[str] = set()  # holder URLs that refused a connection during this fetch
        self.last = b"0"  # stream position while holding (remote C-MOVE arrivals)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(COPY_CONCURRENCY)

    def offer(self, arrival: Arrival) -> None:
        sop = arrival.sop
        if sop not in self.wanted or sop in self.started or self.fetch.has(sop) or not is_uid(sop):
            return
        m = self.fetch.manifest
        entry = self.spool.pin(m.node, sop)
        if entry is not None:
            if (entry.study_uid, entry.series_uid) == (m.study, m.series):
                self.fetch.arrive(sop, entry)  # already here (an earlier retrieval, or it was ours)
                return
            self.spool.unpin(entry)
        if arrival.holder == self.replica_id or arrival.url in self.dead:
            return  # ours but evicted, or its holder is gone: missing
        self.started.add(sop)
        task = asyncio.ensure_future(self._copy(arrival))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _copy(self, arrival: Arrival) -> None:
        entry: SpoolEntry | None = None
        try:
            async with self._slots:
                if self.fetch.has(arrival.sop) or self.fetch.cancel.is_set() or arrival.url in self.dead:
                    return
                entry = await self.client.copy(self.spool, arrival.url, arrival, self.fetch)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            log.warning(
                "replica at %s is unreachable; instances it announced will be retrieved again", arrival.url
            )
            self.dead.add(arrival.url)
        except Exception as exc:  # noqa: BLE001 - a failed copy is a missing instance, retrieved later
            log.warning(
                "copying an instance from the replica at %s failed: %s", arrival.url, type(exc).__name__
            )
        finally:
            if entry is not None:
                self.fetch.arrive(arrival.sop, entry)
            else:
                self.started.discard(arrival.sop)  # another announcement (or our retrieval) may bring it

    async def settle(self) -> None:
        """Wait for every copy started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.settle()
