"""C-STORE SCU on the fast engine, for nodes with ``engine: fast``: :class:`FastStore` is this
engine's side of the loop every engine shares (:mod:`gateway.dimse.store_loop`: association per
instance, contexts planned as instances come, transcoding only for a refused syntax, nothing
unconfirmed a success). The data set after the file's meta information is sent as it is, never
decoded: from the pieces of an instance held in memory (a STOW-RS part,
:meth:`gateway.dimse.fast.association.Association.send_pieces`), or streamed from its file a window at
a time, never held whole (:meth:`~gateway.dimse.fast.association.Association.send_file`)
(docs/architecture.md, "DIMSE edge" and "STOW-RS").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from gateway.dimse import outcomes, store_loop
from gateway.dimse.contexts import Context
from gateway.dimse.fast import commands as cmd
from gateway.dimse.fast import pdu
from gateway.dimse.fast.association import Association
from gateway.dimse.fast.association import request as request_association
from gateway.pacs import StoreItem, StoreResult
from gateway.settings import PacsNode
from translators import part10_scan

log = logging.getLogger(__name__)


class FastStore:
    """The fast engine's side of :func:`gateway.dimse.store_loop.store_all` (the loop's rules are there)."""

    def __init__(self, calling_ae: str, node: PacsNode) -> None:
        self.calling_ae, self.node = calling_ae, node

    def open(self, contexts: list[Context]) -> Association | None:
        return request_association(self.calling_ae, self.node, contexts, none_accepted_ok=True)

    def reusable(self, assoc: Association) -> bool:
        # Idle, the PACS may have released or aborted it: anything it sent says so.
        return assoc.is_established and not assoc.peer_spoke()

    def is_established(self, assoc: Association) -> bool:
        return assoc.is_established

    def accepted_syntaxes(self, assoc: Association, sop_class: str) -> list[str]:
        return assoc.accepted_syntaxes(sop_class)

    def send(self, assoc: Association, item: StoreItem, path: Path | None, syntax: str,
             msg_id: int) -> StoreResult:
        node = self.node
        context = next(cid for cid, (ab, ts) in assoc.contexts.items()
                       if ab == item.sop_class_uid and ts == syntax)
        started = time.monotonic()
        request = cmd.c_store_rq(msg_id, item.sop_class_uid, item.sop_instance_uid)
        try:
            if path is None and item.pieces is not None:
                assoc.send_pieces(context, request, _data_set(item.pieces))
            else:
                with (path or item.file()).open("rb") as fh:
                    assoc.send_file(context, request, fh, _skip_file_meta(fh))
            response = assoc.receive(node.timeouts.dimse)
            answer = response.command
            if answer.command_field != cmd.C_STORE_RSP or answer.message_id_responded != msg_id:
                raise pdu.ProtocolError(f"expected the C-STORE-RSP to message {msg_id}, got {answer.name}")
        except pdu.UpperLayerError as exc:
            log.info("node %s: C-STORE not answered: %s", node.name, exc)
            if assoc.is_established:
                assoc.abort()
            return outcomes.store_lost()
        except OSError:
            log.info("node %s: C-STORE could not be sent", node.name, exc_info=True)
            return outcomes.store_lost()   # a file the checks let through (never stored)
        log.debug("node %s: C-STORE answered in %.3f s", node.name, time.monotonic() - started)
        return outcomes.store_response(cmd.status_dataset(response.command), syntax)

    def close(self, assoc: Association) -> None:
        assoc.release()


def store_all(calling_ae: str, node: PacsNode, items: Iterable[StoreItem], workdir: Path,
              cancel: threading.Event) -> list[StoreResult]:
    """C-STORE every item as it comes, on the fast engine; one result per item, in order."""
    return store_loop.store_all(FastStore(calling_ae, node), items, workdir, cancel)


def _skip_file_meta(fh: BinaryIO) -> int:
    """Position ``fh`` at the data set of a Part-10 file and return the data set's length."""
    try:
        offset = part10_scan.data_set_offset(fh.read(part10_scan.HEAD))
    except part10_scan.Unscannable as exc:
        raise OSError(f"not a Part-10 file: {exc}") from None
    fh.seek(offset)
    return os.fstat(fh.fileno()).st_size - offset


def _data_set(pieces: Sequence[bytes | memoryview]) -> list[memoryview]:
    """The data set's bytes of a Part-10 file held as ``pieces``: views of the pieces from the data
    set's start (the file meta is not sent: PS3.7 C-STORE carries the data set alone)."""
    # A snapshot first (atomic under the GIL): the pieces' owner empties its list in place when the
    # request goes away (gateway.stow.receive.Part.release), maybe while this C-STORE starts; the
    # views taken keep their bytes alive, a list emptied under the loops below would cut the data set.
    pieces = tuple(pieces)
    try:
        skip = part10_scan.data_set_offset(part10_scan.head_of(pieces))
    except part10_scan.Unscannable as exc:
        raise OSError(f"not a Part-10 file: {exc}") from None
    views: list[memoryview] = []
    for piece in pieces:
        view = memoryview(piece).cast("B")
        if skip >= view.nbytes:
            skip -= view.nbytes
            continue
        views.append(view[skip:])
        skip = 0
    return views
