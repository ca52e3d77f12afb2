"""Receiving a STOW-RS body: every multipart/related part to a temp file of its own, as it arrives.

The body is pushed chunk by chunk through :class:`translators.multipart.MultipartDecoder`; each part
goes to its own file in the request's work directory (under the spool's ``.incoming``, the same
filesystem), so memory stays bounded whatever the upload size (PS3.18 §10.5.1; docs/architecture.md,
"STOW-RS"). File writes are small (one HTTP chunk) page-cache writes done on the event loop. Each
part is announced (``on_part``) the moment its closing delimiter arrives, so it can be stored while
the rest of the body is still coming.

A body that stops being valid multipart keeps the parts before the break (the one it broke off is
reported truncated) and is drained to its end, so that the client reads the answer.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gateway.errors import InsufficientStorage, PayloadTooLarge
from translators import multipart as mp

log = logging.getLogger(__name__)


@dataclass
class Part:
    """One received part: its headers (lower-case names) and its body on disk."""

    headers: dict[str, str]
    path: Path
    size: int = 0
    complete: bool = False   # False: the body ended inside this part
    index: int = 0           # its position in the request

    @property
    def media_type(self) -> str:
        return mp.parse_media_type(self.headers.get("content-type", ""))[0]


@dataclass
class Received:
    parts: list[Part] = field(default_factory=list)
    truncated_headers: bool = False   # the body ended inside a part's header block


class _Receiver:
    """Applies decoder events: each part to a temp file of its own, as its bytes arrive."""

    def __init__(self, workdir: Path, received: Received, on_part: Callable[[Part], None],
                 max_parts: int) -> None:
        self.workdir = workdir
        self.received = received
        self.on_part = on_part
        self.max_parts = max_parts
        self._fh: BinaryIO | None = None

    def apply(self, events: Iterable[mp.Event]) -> None:
        parts = self.received.parts
        for event in events:
            if isinstance(event, mp.PartData):
                assert self._fh is not None
                self._fh.write(event.data)
                parts[-1].size += len(event.data)
            elif isinstance(event, mp.PartStart):
                if len(parts) >= self.max_parts:   # before it is written, let alone stored
                    raise PayloadTooLarge(f"the STOW-RS body has more than {self.max_parts} parts "
                                          f"(limits.max_stow_parts)")
                fd, name = tempfile.mkstemp(dir=self.workdir, suffix=".part")
                self._fh = open(fd, "wb")  # noqa: SIM115 - closed at PartEnd or by close()
                parts.append(Part(event.headers, Path(name), index=len(parts)))
            elif isinstance(event, mp.PartEnd):
                parts[-1].complete = True
                self.close()
                self.on_part(parts[-1])
            elif isinstance(event, mp.Truncated) and event.in_part and self._fh is None:
                self.received.truncated_headers = True

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()


async def receive(body: AsyncIterator[bytes], boundary: str, workdir: Path, *, max_bytes: int,
                  max_parts: int, reserve: Callable[[int], bool] = lambda n: True,
                  on_part: Callable[[Part], None] = lambda part: None,
                  received: Received | None = None) -> Received:
    """Read ``body`` to its end; every part lands in a file under ``workdir``, and each complete one
    is passed to ``on_part`` (on the event loop, in request order) as soon as it ended.

    ``received`` (a new one by default) is filled as the body comes, so it tells what had arrived
    when this raises: an exception from ``body`` (the client left) propagates, the part it cut off
    left incomplete; the files written so far stay in ``workdir`` for the caller to remove with it.
    A body past ``max_bytes`` or with more than ``max_parts`` parts is :class:`PayloadTooLarge` as
    soon as that is known (nothing more is read). Every chunk is first ``reserve``d in the spool's
    budget (uploads count like spooled instances); when the spool cannot make room the upload is
    :class:`InsufficientStorage` (507).
    """
    decoder = mp.MultipartDecoder(boundary)
    receiver = _Receiver(workdir, received if received is not None else Received(), on_part, max_parts)
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
