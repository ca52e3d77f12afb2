"""The on-disk instance store of one replica: atomic writes, LRU eviction by bytes, pins.

Every retrieved instance lands here as a Part-10 file in the transfer syntax it arrived in, written
to a temp file on the same filesystem and renamed into place (so a reader never sees half a file,
and the storage SCP can acknowledge a C-STORE only once the rename is done).

**Identity** (docs/architecture.md, "Identity"): an entry is owned by the node it came from. It is
keyed by (node, SOP Instance UID) and its file lives under ``<root>/<node>/``: a second node's copy
of the same UID is a different entry, never served for the first node.

**Pins**: an entry being streamed (or about to be) is pinned and never evicted; when the total
exceeds ``max_bytes`` the least recently used unpinned entries go first. A writer can commit an
entry already pinned (``pin=True``), so there is no moment between the rename and the reader's pin
in which a full spool could evict it. An instance larger than the whole spool still streams (it is
evicted as soon as it is unpinned).

Per-entry derived data (the frame index, built at commit through ``on_commit``; metadata JSON,
built on first request) is kept on
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

from translators.uids import InstanceId, is_uid

log = logging.getLogger(__name__)

SpoolKey = tuple[str, str]   # (node, SOP Instance UID)


@dataclass
class SpoolEntry:
    id: InstanceId
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int
    pins: int = 0
    derived: dict[str, Any] = field(default_factory=dict)   # frame index, metadata JSON, ...

    @property
    def node(self) -> str:
        return self.id.node

    @property
    def study_uid(self) -> str:
        return self.id.study

    @property
    def series_uid(self) -> str:
        return self.id.series

    @property
    def sop_instance_uid(self) -> str:
        return self.id.sop


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
        self._entries: OrderedDict[SpoolKey, SpoolEntry] = OrderedDict()
        self.total_bytes = 0
        self.reserved_bytes = 0     # uploads in progress (STOW-RS parts on their way to the PACS)
        self.evictions = 0
        # Called (on the writer's thread) with every committed entry: the gateway builds the frame
        # index there, at ingest, so a frame request is one bounded read.
        self.on_commit: Callable[[SpoolEntry], None] | None = None
        for stale in [*self.root.glob("*.dcm"), *self.root.glob("*/*.dcm")]:
            # The in-memory index died with the last process; files without it are unusable.
            stale.unlink(missing_ok=True)

    # ---------------------------------------------------------------- writing

    def temp_file(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        return fd, Path(name)

    def write(self, data: bytes | memoryview, instance: InstanceId, *, sop_class_uid: str,
              transfer_syntax: str, pin: bool = False) -> SpoolEntry:
        """Write one Part-10 instance atomically and index it (see :meth:`commit`)."""
        fd, tmp = self.temp_file()
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.commit(tmp, instance, sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax,
                           pin=pin)

    def commit(self, tmp: Path, instance: InstanceId, *, sop_class_uid: str, transfer_syntax: str,
               pin: bool = False) -> SpoolEntry:
        """Rename a fully written temp file into place and index it; evicts past ``max_bytes``.

        ``pin``: the entry is returned pinned once for the caller (release with :meth:`unpin`).
        """
        if not (is_uid(instance.sop) and is_uid(instance.study) and is_uid(instance.series)) \
                or not instance.node.replace("-", "").replace("_", "").isalnum():
            tmp.unlink(missing_ok=True)
            raise ValueError("invalid instance identity")
        folder = self.root / instance.node
        final = folder / f"{instance.sop}.dcm"
        size = tmp.stat().st_size
        entry = SpoolEntry(instance, sop_class_uid, transfer_syntax, final, size, pins=1 if pin else 0)
        key = (instance.node, instance.sop)
        with self._lock:
            folder.mkdir(exist_ok=True)
            os.replace(tmp, final)
            old = self._entries.pop(key, None)
            if old is not None:
                # Replaced (a second retrieval of the same instance): its holders unpin the old
                # entry, which no longer counts; the file at the path is the new, same instance.
                self.total_bytes -= old.size
            self._entries[key] = entry
            self.total_bytes += size
            self._evict_locked()
        if self.on_commit is not None:
            try:
                self.on_commit(entry)
            except Exception:  # noqa: BLE001 - derived data is an optimisation; reads recompute it
                log.warning("post-commit processing of a spooled instance failed", exc_info=True)
        return entry

    # ---------------------------------------------------------------- reading

    def get(self, node: str, sop_instance_uid: str) -> SpoolEntry | None:
        """The entry (marked recently used), unpinned: only for a look; read through :meth:`pin`."""
        with self._lock:
            entry = self._entries.get((node, sop_instance_uid))
            if entry is not None:
                self._entries.move_to_end((node, sop_instance_uid))
            return entry

    def pin(self, node: str, sop_instance_uid: str) -> SpoolEntry | None:
        """The entry, pinned once (never evicted until :meth:`unpin`); None when not held."""
        with self._lock:
            entry = self._entries.get((node, sop_instance_uid))
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end((node, sop_instance_uid))
            return entry

    def unpin(self, entry: SpoolEntry) -> None:
        with self._lock:
            entry.pins = max(0, entry.pins - 1)
            self._evict_locked()

    @contextmanager
    def pinned(self, node: str, sop_instance_uid: str) -> Iterator[SpoolEntry | None]:
        """Keep the entry on disk while the caller reads it."""
        entry = self.pin(node, sop_instance_uid)
        try:
            yield entry
        finally:
            if entry is not None:
                self.unpin(entry)

    # ---------------------------------------------------------------- uploads

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` of an upload being written under :attr:`tmp` against ``max_bytes``,
        evicting unpinned entries to make room; False (nothing reserved) when even that is not
        enough: the caller refuses the upload instead of filling the disk (507)."""
        with self._lock:
            self.reserved_bytes += nbytes
            self._evict_locked()
            if self.total_bytes + self.reserved_bytes > self.max_bytes:
                self.reserved_bytes -= nbytes
                return False
            return True

    def release(self, nbytes: int) -> None:
        """The upload's files are gone: its bytes no longer count."""
        with self._lock:
            self.reserved_bytes = max(0, self.reserved_bytes - nbytes)

    # ---------------------------------------------------------------- eviction

    def _evict_locked(self) -> None:
        if self.total_bytes + self.reserved_bytes <= self.max_bytes:
            return
        for key in list(self._entries):
            if self.total_bytes + self.reserved_bytes <= self.max_bytes:
                break
            entry = self._entries[key]
            if entry.pins > 0:
                continue
            del self._entries[key]
            self.total_bytes -= entry.size
            self.evictions += 1
            entry.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
