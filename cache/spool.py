"""The on-disk instance store of one replica: atomic writes, LRU eviction by bytes, pins.

Every retrieved instance lands here as a Part-10 file in the transfer syntax it arrived in, written
to a temp file on the same filesystem and renamed into place (so a reader never sees half a file).
It is a cache, not an archive: every instance stays on its PACS, so the fast DIMSE engine acknowledges
a C-STORE before writing it here, and one it then fails to write is retrieved again by the
retrieval's completeness check (docs/architecture.md, "Cache": acknowledged, then spooled).

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
the entry, so it dies with the file. So are the bytes of a just-written instance, for its first
reader and within :data:`FRESH_BYTES` in all (:meth:`Spool.take_fresh`).

Thread-safety: ``commit`` runs on pynetdicom threads; everything takes one lock.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from translators.uids import InstanceId, is_uid

log = logging.getLogger(__name__)

SpoolKey = tuple[str, str]   # (node, SOP Instance UID)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
PREPARED_TEMP_FILES = 8
FRESH = "fresh"
FRESH_BYTES = 32 << 20
"""Bytes of just-written instances kept in memory for their first reader (:meth:`Spool.take_fresh`):
a cold retrieve streams each instance moments after it arrived, and reading it back from the file
cost a thread hop and a copy per instance. Bounded: the oldest are let go first."""
"""Empty temp files kept ready for incoming instances (see :meth:`Spool.temp_file`)."""


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
        # Instance temp files (temp_file), some created ahead: apart from uploads' work under tmp.
        self._ready = self.root / ".prepared"
        shutil.rmtree(self._ready, ignore_errors=True)
        self._ready.mkdir()
        self._tmp_prefix = f"{os.getpid()}-"
        self._tmp_names = itertools.count()   # next() on it is atomic under the GIL: any thread
        self._folders: set[str] = set()       # node folders known to exist
        self._prepared: deque[tuple[int, Path]] = deque()   # temp files created ahead (temp_file)
        self._retired: deque[Path] = deque()   # prepared names of files linked into place (commit)
        self._no_links = False                 # the filesystem refused a hard link: rename instead
        self._wanted = threading.Event()
        self._preparer: threading.Thread | None = None
        self._closed = False
        self._fresh: deque[tuple[SpoolEntry, int]] = deque()   # entries holding fresh bytes, oldest first
        self._fresh_bytes = 0
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
        """An open, empty file on the spool's filesystem (the caller writes, closes and commits or
        unlinks it).

        Taken from a few created ahead by a helper thread: creating a file is a directory update
        that costs 20-400 us of kernel time depending on the filesystem, on the ingest path, i.e.
        between an instance's last fragment and the association thread's next read (docs/
        architecture.md, "Cache")."""
        try:
            item = self._prepared.popleft()      # atomic: any thread
        except IndexError:
            item = self._create_temp()
        self._wanted.set()
        if self._preparer is None:
            self._start_preparer()
        return item

    def _create_temp(self) -> tuple[int, Path]:
        # A process-unique name (O_EXCL still guards it): cheaper than tempfile.mkstemp's random ones.
        while True:
            path = self._ready / f"{self._tmp_prefix}{next(self._tmp_names)}.part"
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600), path
            except FileExistsError:
                continue

    def _start_preparer(self) -> None:
        with self._lock:
            if self._preparer is not None or self._closed:
                return
            self._preparer = threading.Thread(target=self._prepare, name="spool-prepare", daemon=True)
            self._preparer.start()

    def _prepare(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            self._unlink_retired()
            while len(self._prepared) < PREPARED_TEMP_FILES and not self._closed:
                try:
                    item = self._create_temp()
                except OSError:
                    log.warning("cannot create spool temp files", exc_info=True)
                    break            # temp_file() creates its own (and raises) meanwhile
                self._prepared.append(item)
        self._drop_prepared()

    def _unlink_retired(self) -> None:
        while True:
            try:
                path = self._retired.popleft()
            except IndexError:
                return
            path.unlink(missing_ok=True)

    def _drop_prepared(self) -> None:
        self._unlink_retired()
        while True:
            try:
                fd, path = self._prepared.popleft()
            except IndexError:
                return
            os.close(fd)
            path.unlink(missing_ok=True)

    def write(self, data: bytes | memoryview, instance: InstanceId, *, sop_class_uid: str,
              transfer_syntax: str, pin: bool = False) -> SpoolEntry:
        """Write one Part-10 instance atomically and index it (see :meth:`commit`)."""
        fd, tmp = self.temp_file()
        view = memoryview(data).cast("B")
        try:
            try:
                done = 0
                while done < len(view):   # one write(2) for the whole instance, no buffered copy
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.commit(tmp, instance, sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax,
                           pin=pin, size=len(view), fresh=data if type(data) is bytes else None)

    def commit(self, tmp: Path, instance: InstanceId, *, sop_class_uid: str, transfer_syntax: str,
               pin: bool = False, size: int | None = None, fresh: bytes | None = None) -> SpoolEntry:
        """Rename a fully written temp file into place and index it; evicts past ``max_bytes``.

        ``pin``: the entry is returned pinned once for the caller (release with :meth:`unpin`).
        ``size``: the file's size when the caller knows it (else it is stat'ed).
        ``fresh``: the file's bytes, kept for its first reader (:meth:`take_fresh`).
        """
        if not (is_uid(instance.sop) and is_uid(instance.study) and is_uid(instance.series)) \
                or not instance.node.replace("-", "").replace("_", "").isalnum():
            tmp.unlink(missing_ok=True)
            raise ValueError("invalid instance identity")
        folder = self.root / instance.node
        final = folder / f"{instance.sop}.dcm"
        if size is None:
            size = tmp.stat().st_size
        entry = SpoolEntry(instance, sop_class_uid, transfer_syntax, final, size, pins=1 if pin else 0)
        key = (instance.node, instance.sop)
        if instance.node not in self._folders:
            folder.mkdir(exist_ok=True)
            self._folders.add(instance.node)     # atomic under the GIL; mkdir is idempotent
        with self._lock:   # the file in place and its entry indexed in one step, as one commit
            if not self._link_prepared(tmp, final):
                os.replace(tmp, final)
            old = self._entries.pop(key, None)
            if old is not None:
                # Replaced (a second retrieval of the same instance): its holders unpin the old
                # entry, which no longer counts; the file at the path is the new, same instance.
                self.total_bytes -= old.size
            self._entries[key] = entry
            self.total_bytes += size
            self._evict_locked()
            if fresh is not None and len(fresh) <= FRESH_BYTES:
                entry.derived[FRESH] = fresh
                self._fresh.append((entry, len(fresh)))
                self._fresh_bytes += len(fresh)
                while self._fresh_bytes > FRESH_BYTES:
                    stale, nbytes = self._fresh.popleft()
                    stale.derived.pop(FRESH, None)
                    self._fresh_bytes -= nbytes
        if self.on_commit is not None:
            try:
                self.on_commit(entry)
            except Exception:  # noqa: BLE001 - derived data is an optimisation; reads recompute it
                log.warning("post-commit processing of a spooled instance failed", exc_info=True)
        return entry

    def _link_prepared(self, tmp: Path, final: Path) -> bool:
        """Put a prepared temp file in place by ``link(2)``, leaving its prepared name for the
        preparer thread to unlink. Why not ``rename(2)``: a rename out of the prepared folder locks
        that folder, which the preparer holds while it creates the next files (on ext4 an inode
        allocation can take hundreds of microseconds): the association thread spun on that lock
        between two instances (7 % of the gateway's CPU in a cold C-GET, perf). A link locks only the
        node's folder. False (rename instead) for another temp file, an instance already in place
        (a second retrieval replaces it) or a filesystem without hard links."""
        if tmp.parent != self._ready or self._no_links:
            return False
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError:
            self._no_links = True
            return False
        self._retired.append(tmp)
        self._wanted.set()
        return True

    # ---------------------------------------------------------------- reading

    @staticmethod
    def take_fresh(entry: SpoolEntry) -> bytes | None:
        """The bytes of an instance written moments ago, once (then they are let go); None when
        they were taken already, aged out, or never kept: read the file then."""
        data = entry.derived.pop(FRESH, None)   # atomic under the GIL: one reader gets them
        return data if isinstance(data, bytes) else None

    @staticmethod
    def peek_fresh(entry: SpoolEntry) -> bytes | None:
        """The fresh bytes without taking them (the frame index at ingest reads the header)."""
        data = entry.derived.get(FRESH)
        return data if isinstance(data, bytes) else None

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
        self._closed = True
        self._wanted.set()
        if self._preparer is not None:
            self._preparer.join(timeout=5)
        self._drop_prepared()
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
