"""C-STORE SCU on the fast engine, for nodes with ``engine: fast``: :class:`FastStore` is this
engine's side of the loop every engine shares (:mod:`gateway.dimse.store_loop`: association per
instance, contexts planned as instances come, transcoding only for a refused syntax, nothing
unconfirmed a success). Streamed from disk: the data set after the file's meta information is read
and sent one PDU at a time (:meth:`gateway.dimse.fast.association.Association.send_file`), never
decoded or held whole (docs/architecture.md, "DIMSE edge" and "STOW-RS").
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Iterable
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

    def send(self, assoc: Association, item: StoreItem, path: Path, syntax: str, msg_id: int) -> StoreResult:
        node = self.node
        context = next(cid for cid, (ab, ts) in assoc.contexts.items()
                       if ab == item.sop_class_uid and ts == syntax)
        started = time.monotonic()
        try:
            with path.open("rb") as fh:
                length = _skip_file_meta(fh, path)
                request = cmd.c_store_rq(msg_id, item.sop_class_uid, item.sop_instance_uid)
                assoc.send_file(context, request, fh, length)
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


def _skip_file_meta(fh: BinaryIO, path: Path) -> int:
    """Position ``fh`` at the data set of a Part-10 file (after the preamble, ``DICM`` and the group
    0002 elements, PS3.10 §7.1) and return the data set's length."""
    total = os.fstat(fh.fileno()).st_size
    head = fh.read(132)
    if len(head) != 132 or head[128:] != b"DICM":
        raise OSError(f"{path.name}: not a Part-10 file")
    offset = 132
    while True:
        element = fh.read(8)
        if len(element) < 8:
            raise OSError(f"{path.name}: file meta information runs past the end")
        group, _, vr = struct.unpack_from("<HH2s", element)
        if group != 0x0002:
            break
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            extra = fh.read(4)
            if len(extra) < 4:
                raise OSError(f"{path.name}: truncated file meta element")
            length = struct.unpack("<I", extra)[0]
            header = 12
        else:
            length = struct.unpack_from("<H", element, 6)[0]
            header = 8
        offset += header + length
        fh.seek(offset)
    fh.seek(offset)
    return total - offset
