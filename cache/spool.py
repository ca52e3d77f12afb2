"""The on-disk instance store of one replica: atomic writes, LRU eviction by bytes, pins.

Every retrieved instance lands here as a Part-10 file in the transfer syntax it arrived in, written
to a temp file on the same filesystem and renamed into place (so a reader never sees half a file,
and the storage SCP can acknowledge a C-STORE only once the rename is done). Files are keyed by SOP
Instance UID (globally unique); the node, study and series are kept in the in-memory index.

Entries being streamed are *pinned* and never evicted; when the total exceeds ``max_bytes`` the
least recently used unpinned entries go first. An instance larger than the whole spool still
streams (it is evicted as soon as it is unpinned).

Per-entry derived data (frame index, metadata JSON) is computed lazily by the gateway and kept on
the entry, so it dies with the file.

Thread-safety: ``commit`` runs on pynetdicom threads; everything takes one lock.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class SpoolEntry:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    node: str
    path: Path
    size: int
    pins: int = 0
    derived: dict[str, Any] = field(default_factory=dict)   # frame index, metadata JSON, ...


class Spool:
    def __init__(self, root: str | Path | None, max_bytes: int) -> None:
        self._owned = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="dwg-spool-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / ".incoming"
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)   # leftovers of a crash are never complete
        self.tmp.mkdir()
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, SpoolEntry] = OrderedDict()
        self._by_series: dict[str, set[str]] = {}
        self.total_bytes = 0
        self.evictions = 0
        # Called (on the writer's thread) with every committed entry: the gateway builds the frame
        # index there, at ingest, so a frame request is one bounded read.
        self.on_commit: Callable[[SpoolEntry], None] | None = None
        for stale in self.root.glob("*.dcm"):
            # The in-memory index died with the last process; files without it are unusable.
            stale.unlink(missing_ok=True)

    # ---------------------------------------------------------------- writing

    def temp_file(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        return fd, Path(name)

    def write(self, data: bytes | memoryview, **meta: str) -> SpoolEntry:
        """Write one Part-10 instance atomically and index it (see :meth:`commit` for ``meta``)."""
        fd, tmp = self.temp_file()
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.commit(tmp, **meta)

    def commit(self, tmp: Path, *, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str,
               study_uid: str, series_uid: str, node: str) -> SpoolEntry:
        """Rename a fully written temp file into place and index it; evicts past ``max_bytes``."""
        if "/" in sop_instance_uid or sop_instance_uid.startswith("."):
            tmp.unlink(missing_ok=True)
            raise ValueError("invalid SOP Instance UID")
        final = self.root / f"{sop_instance_uid}.dcm"
        size = tmp.stat().st_size
        entry = SpoolEntry(sop_instance_uid, sop_class_uid, transfer_syntax, study_uid, series_uid, node,
                           final, size)
        with self._lock:
            os.replace(tmp, final)
            old = self._entries.pop(sop_instance_uid, None)
            if old is not None:
                self.total_bytes -= old.size
                entry.pins = old.pins
            self._entries[sop_instance_uid] = entry
            self._by_series.setdefault(series_uid, set()).add(sop_instance_uid)
            self.total_bytes += size
            self._evict_locked()
        if self.on_commit is not None:
            try:
                self.on_commit(entry)
            except Exception:  # noqa: BLE001 - derived data is an optimisation; reads recompute it
                log.warning("post-commit processing of a spooled instance failed", exc_info=True)
        return entry

    # ---------------------------------------------------------------- reading

    def get(self, sop_instance_uid: str) -> SpoolEntry | None:
        with self._lock:
            entry = self._entries.get(sop_instance_uid)
            if entry is not None:
                self._entries.move_to_end(sop_instance_uid)
            return entry

    def series(self, series_uid: str) -> list[SpoolEntry]:
        with self._lock:
            return [self._entries[u] for u in self._by_series.get(series_uid, ()) if u in self._entries]

    def has_all(self, sop_instance_uids: set[str]) -> bool:
        with self._lock:
            return all(u in self._entries for u in sop_instance_uids)

    @contextmanager
    def pinned(self, sop_instance_uid: str) -> Iterator[SpoolEntry | None]:
        """Keep the entry on disk while the caller reads it."""
        with self._lock:
            entry = self._entries.get(sop_instance_uid)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(sop_instance_uid)
        try:
            yield entry
        finally:
            if entry is not None:
                with self._lock:
                    entry.pins -= 1
                    self._evict_locked()

    # ---------------------------------------------------------------- eviction

    def _evict_locked(self) -> None:
        if self.total_bytes <= self.max_bytes:
            return
        for uid in list(self._entries):
            if self.total_bytes <= self.max_bytes:
                break
            entry = self._entries[uid]
            if entry.pins > 0:
                continue
            del self._entries[uid]
            series = self._by_series.get(entry.series_uid)
            if series is not None:
                series.discard(uid)
                if not series:
                    del self._by_series[entry.series_uid]
            self.total_bytes -= entry.size
            self.evictions += 1
            entry.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)

