"""Receiving a STOW-RS body: every multipart/related part kept apart, as it arrives.

The body is pushed chunk by chunk through :class:`translators.multipart.MultipartDecoder`; each part
is held on its own, so memory stays bounded whatever the upload size (PS3.18 §10.5.1;
docs/architecture.md, "STOW-RS"):

* an ``application/dicom`` part, while the process's :class:`MemoryWindow` has room: in memory as the
  pieces it arrived in (views of the received chunks, never copied but for small ones), given back as
  soon as the PACS interface is done with it (:attr:`gateway.pacs.StoreItem.done`). The fast engine
  sends the pieces as they are; a reader that needs a file gets an in-memory one (``memfd``, named by
  its ``/proc/self/fd`` path) written on demand (:meth:`Part.file`). The instances never touch the
  disk (creating and filling a file per instance cost as much CPU as sending it, and an in-memory
  file per part two copies of every byte, profiled in the STOW benchmark);
* other parts (read at the end), parts that find the window full (a PACS slower than the upload),
  or without ``memfd``: a temp file in the request's work directory (under the spool's
  ``.incoming``), as before. The body is never held back: reading it while the C-STOREs run costs
  them GIL and CPU time, so the sooner it is in, the sooner they run at full speed (waiting for room
  instead was measured slower).

Disk writes are small (one HTTP chunk) page-cache writes done on the event loop. Each part is
announced (``on_part``) the moment its closing delimiter arrives, so it can be stored while the rest
of the body is still coming.

A body that stops being valid multipart keeps the parts before the break (the one it broke off is
reported truncated) and is drained to its end, so that the client reads the answer.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gateway.errors import InsufficientStorage, PayloadTooLarge
from translators import multipart as mp
from translators import part10_scan

log = logging.getLogger(__name__)


MEMORY_WINDOW = 128 << 20
"""Bytes of STOW-RS parts the process holds in memory at most, all requests together (exceeded by at
most one HTTP chunk per request). A part that finds it full goes to disk; one that fills it while
it is being received is moved there, whatever its size."""

_HAS_MEMFD = hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir()


class MemoryWindow:
    """The bytes of parts held in memory, process-wide (thread-safe: the PACS interface gives bytes
    back from its worker thread)."""

    def __init__(self, limit: int = MEMORY_WINDOW) -> None:
        self.limit = limit if _HAS_MEMFD else 0
        self.used = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def has_room(self) -> bool:
        return self.used < self.limit

    def take(self, nbytes: int) -> None:
        with self._lock:
            self.used += nbytes

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


@dataclass(eq=False)
class Part:
    """One received part: its headers (lower-case names) and its body, in a file of its own on disk,
    or in memory as the pieces it arrived in (``pieces``, until :meth:`release`), written to an
    in-memory file (``memfd``) only for a reader that needs a file (:meth:`file`)."""

    headers: dict[str, str]
    _path: Path | None = None   # the file: on disk, or an in-memory part's once written (file())
    size: int = 0
    complete: bool = False   # False: the body ended inside this part
    index: int = 0           # its position in the request
    pieces: list[bytes | memoryview] | None = None
    window: MemoryWindow | None = None
    _fd: int | None = None   # the memfd an in-memory part was written to
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def media_type(self) -> str:
        return mp.parse_media_type(self.headers.get("content-type", ""))[0]

    @property
    def in_memory(self) -> bool:
        return self.pieces is not None

    def file(self) -> Path:
        """The body as a file (any thread). An in-memory part is written to a memfd at the first
        call, named by its ``/proc/self/fd`` path, valid until :meth:`release`."""
        with self._lock:
            if self._path is None:
                if self.pieces is None:
                    raise ValueError("the part was released")
                fd = os.memfd_create("stow-part", os.MFD_CLOEXEC)
                _write_all(fd, self.pieces)
                self._fd, self._path = fd, Path(f"/proc/self/fd/{fd}")
            return self._path

    def head(self, size: int) -> bytes:
        """The body's first ``size`` bytes (fewer when it is shorter)."""
        pieces = self.pieces
        if pieces is None:
            with self.file().open("rb") as fh:
                return fh.read(size)
        return part10_scan.head_of(pieces, size)

    def release(self) -> None:
        """Free an in-memory part (idempotent; any thread). Nothing may read it afterwards: the
        descriptor number its file's path names is reused."""
        with self._lock:
            pieces, fd, self.pieces, self._fd = self.pieces, self._fd, None, None
            if fd is not None:
                self._path = None
        if fd is not None:
            os.close(fd)
        if pieces is not None:
            pieces.clear()   # emptied in place: a store item still naming the list keeps nothing alive
            if self.window is not None:
                self.window.give_back(self.size)


def _write_all(fd: int, pieces: Iterable[bytes | memoryview]) -> None:
    for piece in pieces:
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view):]


_OWN_COPY = 16 << 10
"""A piece of an in-memory part shorter than this is copied: a view would keep the whole received
chunk it is part of (up to the HTTP chunk size) alive for a few bytes."""


@dataclass
class Received:
    parts: list[Part] = field(default_factory=list)
    truncated_headers: bool = False   # the body ended inside a part's header block

    def release(self) -> None:
        """Free every part still held in memory (once nothing reads the parts any more)."""
        for part in self.parts:
            part.release()


class _Receiver:
    """Applies decoder events: each part to a temp file of its own, as its bytes arrive."""

    def __init__(self, workdir: Path, received: Received, on_part: Callable[[Part], None],
                 max_parts: int, window: MemoryWindow | None, in_memory: Callable[[str], bool]) -> None:
        self.workdir = workdir
        self.received = received
        self.on_part = on_part
        self.max_parts = max_parts
        self.window = window if window is not None and window.enabled else None
        self.in_memory = in_memory
        self._fh: BinaryIO | None = None   # the file of the on-disk part being received
        self._receiving = False            # a part has started and not ended

    def apply(self, events: Iterable[mp.Event]) -> None:
        parts = self.received.parts
        for event in events:
            if isinstance(event, mp.PartData):
                part = parts[-1]
                data = event.data
                if part.pieces is not None:
                    assert part.window is not None
                    if part.window.has_room():
                        part.window.take(len(data))
                        # Views of the received chunks, which are immutable bytes (the decoder
                        # passes no view of its own buffer): kept as they are, nothing copied.
                        part.pieces.append(data if len(data) >= _OWN_COPY else bytes(data))
                        part.size += len(data)
                        continue
                    self._spill(part)   # a large part, or the window filled: the rest on disk
                assert self._fh is not None
                self._fh.write(data)
                part.size += len(data)
            elif isinstance(event, mp.PartStart):
                if len(parts) >= self.max_parts:   # before it is written, let alone stored
                    raise PayloadTooLarge(f"the STOW-RS body has more than {self.max_parts} parts "
                                          f"(limits.max_stow_parts)")
                parts.append(self._new_part(event.headers, len(parts)))
                self._receiving = True
            elif isinstance(event, mp.PartEnd):
                parts[-1].complete = True
                self.close()
                self.on_part(parts[-1])
            elif isinstance(event, mp.Truncated) and event.in_part and not self._receiving:
                self.received.truncated_headers = True

    def _new_part(self, headers: dict[str, str], index: int) -> Part:
        window = self.window
        if window is not None and window.has_room() and self.in_memory(
                mp.parse_media_type(headers.get("content-type", ""))[0]):
            return Part(headers, index=index, pieces=[], window=window)
        fd, name = tempfile.mkstemp(dir=self.workdir, suffix=".part")
        self._fh = open(fd, "wb")  # noqa: SIM115 - closed at PartEnd or by close()
        return Part(headers, Path(name), index=index)

    def _spill(self, part: Part) -> None:
        """Move the in-memory part being received to a temp file and go on writing there."""
        assert part.pieces is not None
        fd, name = tempfile.mkstemp(dir=self.workdir, suffix=".part")
        out = open(fd, "wb")  # noqa: SIM115 - becomes the part's writer, closed at PartEnd or by close()
        for piece in part.pieces:
            out.write(piece)
        part.release()   # gives its bytes back to the window
        part.window, part._path, self._fh = None, Path(name), out

    def close(self) -> None:
        self._receiving = False
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()


async def receive(body: AsyncIterator[bytes], boundary: str, workdir: Path, *, max_bytes: int,
                  max_parts: int, reserve: Callable[[int], bool] = lambda n: True,
                  on_part: Callable[[Part], None] = lambda part: None,
                  received: Received | None = None, window: MemoryWindow | None = None,
                  in_memory: Callable[[str], bool] = lambda media_type: False) -> Received:
    """Read ``body`` to its end; every part lands in a file under ``workdir``, and each complete one
    is passed to ``on_part`` (on the event loop, in request order) as soon as it ended.

    ``received`` (a new one by default) is filled as the body comes, so it tells what had arrived
    when this raises: an exception from ``body`` (the client left) propagates, the part it cut off
    left incomplete; the files written so far stay in ``workdir`` for the caller to remove with it.
    A body past ``max_bytes`` or with more than ``max_parts`` parts is :class:`PayloadTooLarge` as
    soon as that is known (nothing more is read). Every chunk is first ``reserve``d in the spool's
    budget (uploads count like spooled instances); when the spool cannot make room the upload is
    :class:`InsufficientStorage` (507). With a ``window``, the parts whose media type (its
    Content-Type, "" when absent) ``in_memory`` accepts are held in memory while it has room
    (module docstring); the caller calls :meth:`Received.release` once nothing reads them.
    """
    decoder = mp.MultipartDecoder(boundary)
    receiver = _Receiver(workdir, received if received is not None else Received(), on_part, max_parts,
                         window, in_memory)
    broken = False
    total = 0
    try:
        async for chunk in body:
            total += len(chunk)
            if chunk and not reserve(len(chunk)):
                total -= len(chunk)
                raise InsufficientStorage("the spool has no room for this upload now; retry later")
            if total > max_bytes:
                raise PayloadTooLarge(f"the STOW-RS body exceeds {max_bytes} bytes (limits.max_stow_bytes)")
            if broken or not chunk:
                continue   # drain the rest, so that the client reads our answer
            try:
                receiver.apply(decoder.feed(chunk))
            except mp.MultipartError as exc:
                # Past this point the body cannot be split into parts; the parts before it are kept
                # and the one it broke off is reported as truncated.
                log.info("STOW-RS body stops being valid multipart: %s", exc)
                receiver.apply(exc.events)
                receiver.apply(decoder.close())
                broken = True
        if not broken:
            receiver.apply(decoder.close())
    finally:
        receiver.close()
    return receiver.received
