"""What the gateway derives from a spooled instance: metadata JSON, frame index, frames, bytes.

Derived values are computed once, off the event loop, and kept on the spool entry (they die with the
file). Metadata JSON is stored with a placeholder base in its BulkDataURIs; each response
substitutes the externally visible base (docs/architecture.md, "HTTP edge"), so one stored value
serves every proxy path and no client can poison what others get.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from cache.spool import Spool, SpoolEntry
from translators import frame_transcode as ft
from translators import frames as fr
from translators.dicom_json import dataset_to_json
from translators.part10_scan import HEAD, Unscannable, index_native

PLACEHOLDER = "@@DWG_BASE@@"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
CHUNK = 1 << 20
INLINE_THRESHOLD = 4096
LOSSY = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                   "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.100",
                   "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103",
                   "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.106",
                   "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108", "1.2.840.10008.1.2.4.203"})


def _open_first(path: Path) -> tuple[BinaryIO | None, bytes]:
    """The file's first :data:`CHUNK` bytes, and the open file when there is more (else closed)."""
    fh = open(path, "rb")
    try:
        first = fh.read(CHUNK)
    except BaseException:
        fh.close()
        raise
    if len(first) < CHUNK:   # a regular file reads short only at its end
        fh.close()
        return None, first
    return fh, first


def _index(entry: SpoolEntry) -> fr.FrameIndex | None:
    """The frame index. Native pixel data: its header read without pydicom (~40 us instead of ~0.9 ms
    of GIL-held time per instance at ingest), from the bytes just written while the spool holds them;
    anything else through pydicom (:func:`translators.frames.index_part10`)."""
    fresh = Spool.peek_fresh(entry)
    if fresh is not None:
        try:
            return index_native(memoryview(fresh)[:HEAD], len(fresh))
        except Unscannable:
            pass
    with open(entry.path, "rb") as fh:
        try:
            return index_native(fh.read(HEAD), os.fstat(fh.fileno()).st_size)
        except Unscannable:
            fh.seek(0)
            return fr.index_part10(fh)


def instance_path(entry: SpoolEntry) -> str:
    return f"/studies/{entry.study_uid}/series/{entry.series_uid}/instances/{entry.sop_instance_uid}"


def with_base(data: bytes, base: str) -> bytes:
    return data.replace(PLACEHOLDER.encode(), base.encode())


class InstanceReader:
    def __init__(self, max_threads: int = 8) -> None:
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="spool-io")

    async def run(self, fn: Any, *args: Any) -> Any:
        """Blocking spool work (reads, decoding) on the reader's bounded pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---------------------------------------------------------------- metadata

    async def metadata(self, entry: SpoolEntry) -> bytes:
        """DICOM JSON of the instance (PS3.18 Annex F), BulkDataURIs against PLACEHOLDER."""
        cached = entry.derived.get("json")
        if cached is None:
            cached = await self.run(self._metadata_blocking, entry)
            entry.derived["json"] = cached
        return cached  # type: ignore[no-any-return]

    def _metadata_blocking(self, entry: SpoolEntry) -> bytes:
        with open(entry.path, "rb") as fh:
            ds = dcmread(fh, stop_before_pixels=True)
        index = self._index_blocking(entry)
        base = PLACEHOLDER + instance_path(entry) + "/bulkdata/"

        def bulk_uri(path: tuple[int, ...], elem: DataElement) -> str | None:
            return base + ".".join(f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path))

        body = dataset_to_json(ds, bulk_data_uri=bulk_uri, inline_threshold=INLINE_THRESHOLD)
        # cornerstone reads the transfer syntax from (0008,3002) when group 0002 is absent.
        # Implicit VR LE is delivered as Explicit VR LE (PS3.18 §8.7.3): advertise what clients get.
        available = EXPLICIT_VR_LE if entry.transfer_syntax == IMPLICIT_VR_LE else entry.transfer_syntax
        body["00083002"] = {"vr": "UI", "Value": [available]}
        if index is not None:
            vr = "OB" if index.encapsulated or index.bits_allocated <= 8 else "OW"
            body["7FE00010"] = {"vr": vr, "BulkDataURI": base + "7FE00010"}
        return orjson.dumps(dict(sorted(body.items())))

    # ---------------------------------------------------------------- frames

    def index_at_ingest(self, entry: SpoolEntry) -> None:
        """Spool commit hook (writer thread): build the frame index while the file is in the page cache."""
        try:
            self._index_blocking(entry)
        except fr.NotIndexable:
            pass   # not cached: a request for its frames reports why (see routes/wado.py)

    async def frame_index(self, entry: SpoolEntry) -> fr.FrameIndex | None:
        return await self.run(self._index_blocking, entry)  # type: ignore[no-any-return]

    def _index_blocking(self, entry: SpoolEntry) -> fr.FrameIndex | None:
        if "index" not in entry.derived:
            entry.derived["index"] = _index(entry)
        return entry.derived["index"]  # type: ignore[no-any-return]

    async def frames(self, entry: SpoolEntry, numbers: list[int]) -> list[bytes]:
        """The stored bytes of each frame (1-based numbers); raises FrameError for bad numbers."""
        def work() -> list[bytes]:
            index = self._index_blocking(entry)
            if index is None:
                raise fr.FrameError("the instance has no pixel data")
            with open(entry.path, "rb") as fh:
                return [fr.read_frame(fh, index, n) for n in numbers]
        return await self.run(work)  # type: ignore[no-any-return]

    async def transcode_frame(self, entry: SpoolEntry, frame: bytes, target_ts: str) -> bytes:
        def work() -> bytes:
            index = self._index_blocking(entry)
            assert index is not None
            header = entry.derived.get("header")
            if header is None:
                with open(entry.path, "rb") as fh:
                    header = dcmread(fh, stop_before_pixels=True)
                entry.derived["header"] = header
            return ft.transcode_frame(frame, index, header, target_ts)
        return await self.run(work)  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- whole instance

    async def chunks(self, entry: SpoolEntry) -> AsyncIterator[bytes]:
        """The stored Part-10 file, in chunks read off the event loop. An instance up to
        :data:`CHUNK` (most) costs one hop to the pool: open, read, close in one go; one the spool
        wrote moments ago (a cold retrieve's) costs none (:meth:`cache.spool.Spool.take_fresh`)."""
        fresh = Spool.take_fresh(entry)
        if fresh is not None:
            yield fresh
            return
        fh, first = await self.run(_open_first, entry.path)
        if fh is None:
            yield first
            return
        try:
            yield first
            while True:
                chunk = await self.run(fh.read, CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            fh.close()

    async def transcoded(self, entry: SpoolEntry, target_ts: str) -> bytes:
        def work() -> bytes:
            with open(entry.path, "rb") as fh:
                return ft.transcode_part10(fh.read(), target_ts)
        return await self.run(work)  # type: ignore[no-any-return]

    async def dataset(self, entry: SpoolEntry) -> Dataset:
        def work() -> Dataset:
            with open(entry.path, "rb") as fh:
                return dcmread(fh)
        return await self.run(work)  # type: ignore[no-any-return]

    async def element_bytes(self, entry: SpoolEntry, path: list[int]) -> bytes | None:
        """Raw value of a (possibly nested) element, for bulkdata URIs other than pixel data."""
        def work() -> bytes | None:
            with open(entry.path, "rb") as fh:
                ds: Any = dcmread(fh)
            for i, part in enumerate(path):
                if i % 2 == 0:
                    if part not in ds:
                        return None
                    ds = ds[part]
                    if i < len(path) - 1:
                        if ds.VR != "SQ":
                            return None       # an item index below an element that is no sequence
                        ds = ds.value
                else:
                    if not 0 <= part < len(ds):
                        return None
                    ds = ds[part]
            if not isinstance(ds, DataElement):
                return None
            if isinstance(ds.value, bytes):
                return ds.value
            # Numbers and text: the value field as PS3.5 encodes it (little endian).
            buf = DicomBytesIO()
            buf.is_little_endian = True
            buf.is_implicit_VR = True
            write_data_element(buf, ds)
            return bytes(buf.getvalue()[8:])
        return await self.run(work)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
