"""C-STORE SCU on the fast engine: the same semantics as :func:`gateway.dimse.store.store_all`, for
nodes with ``engine: fast`` (docs/architecture.md, "DIMSE edge" and "STOW-RS").

* Items are sent as they come (any iterable, an ``ItemFeed`` included) on one association at a time,
  planned with :func:`gateway.dimse.contexts.store_proposal` like every store engine; an item whose
  (class, syntax) pair the open association did not propose, or one arriving after the association
  ended while idle, gets a new one.
* An item goes in its own syntax when the PACS accepted it, else transcoded
  (``translators.frames.transcode_part10``) to the native syntax the PACS accepted
  (:func:`gateway.dimse.contexts.store_fallback`).
* Streamed from disk: the data set after the file's meta information is read and sent one PDU at a
  time (:meth:`gateway.dimse.fast.association.Association.send_file`), never decoded or held whole.
* Nothing unconfirmed is a success (PS3.4 B.2.3): an abort, timeout or lost connection during a
  C-STORE makes that item and every later one a processing failure, unconfirmed and not sent; an
  association that cannot be established before any item got a result fails the request (the error
  tree, 502/504 naming the node). ``cancel`` stops between two items.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from gateway.dimse import outcomes
from gateway.dimse.contexts import StorePair, proposed_pairs, store_fallback, store_proposal
from gateway.dimse.fast import commands as cmd
from gateway.dimse.fast import pdu
from gateway.dimse.fast.association import Association
from gateway.dimse.fast.association import request as request_association
from gateway.errors import GatewayError
from gateway.pacs import StoreItem, StoreResult
from gateway.settings import PacsNode
from translators.frames import transcode_part10

log = logging.getLogger(__name__)


class _Link:
    """The request's store association: one at a time, replaced when an item needs a pair it did
    not propose or when it ended while idle."""

    def __init__(self, calling_ae: str, node: PacsNode) -> None:
        self.calling_ae, self.node = calling_ae, node
        self.assoc: Association | None = None
        self.proposed: frozenset[StorePair] = frozenset()
        self.opened = False   # a proposal was answered (assoc None: the PACS accepted none of it)
        self.dead = False     # a C-STORE went unanswered or a later association failed: send no more
        self._msg_id = 0

    def ready(self, pair: StorePair, recent: Iterable[StorePair], upcoming: Iterable[StorePair]
              ) -> Association | None:
        if self.opened and pair in self.proposed:
            if self.assoc is None or (self.assoc.is_established and not self.assoc.peer_spoke()):
                return self.assoc
            log.info("node %s: the store association ended while idle; opening another", self.node.name)
        self.close()
        contexts = store_proposal([pair, *recent, *upcoming])
        self.assoc = request_association(self.calling_ae, self.node, contexts, none_accepted_ok=True)
        self.proposed, self.opened, self._msg_id = proposed_pairs(contexts), True, 0
        return self.assoc

    def next_msg_id(self) -> int:
        self._msg_id = self._msg_id % 65535 + 1
        return self._msg_id

    def close(self) -> None:
        assoc, self.assoc, self.opened = self.assoc, None, False
        if assoc is not None:
            assoc.release()


def store_all(calling_ae: str, node: PacsNode, items: Iterable[StoreItem], workdir: Path,
              cancel: threading.Event) -> list[StoreResult]:
    """C-STORE every item as it comes; one result per item, in order (module docstring)."""
    upcoming = list(dict.fromkeys(_pair(i) for i in items)) if isinstance(items, Sequence) else []
    link = _Link(calling_ae, node)
    results: list[StoreResult] = []
    recent: dict[StorePair, None] = {}   # pairs sent so far, the latest last
    try:
        for item in items:
            pair = _pair(item)
            results.append(_store_next(link, item, workdir, cancel, first=not results,
                                       recent=reversed(recent), upcoming=upcoming))
            recent.pop(pair, None)
            recent[pair] = None
    finally:
        link.close()
    lost = sum(1 for r in results if not r.confirmed)
    if lost:
        log.warning("node %s: %d of %d C-STOREs not confirmed", node.name, lost, len(results))
    return results


def _pair(item: StoreItem) -> StorePair:
    return item.sop_class_uid, item.transfer_syntax


def _store_next(link: _Link, item: StoreItem, workdir: Path, cancel: threading.Event, *, first: bool,
                recent: Iterable[StorePair], upcoming: Iterable[StorePair]) -> StoreResult:
    if cancel.is_set() or link.dead:
        return outcomes.store_lost()
    try:
        assoc = link.ready(_pair(item), recent, upcoming)
    except GatewayError:
        if first:
            raise   # nothing sent yet: the request fails as a whole
        log.warning("node %s: a further store association failed", link.node.name)
        link.dead = True
        return outcomes.store_lost()
    if assoc is None:
        return outcomes.store_sop_class_refused()
    result = _store_one(assoc, link.node, item, link.next_msg_id(), workdir)
    if not result.confirmed and not assoc.is_established:
        link.dead = True   # it ended under this C-STORE: the PACS's state is unknown, send no more
    return result


def _store_one(assoc: Association, node: PacsNode, item: StoreItem, msg_id: int,
               workdir: Path) -> StoreResult:
    syntaxes = assoc.accepted_syntaxes(item.sop_class_uid)
    if not syntaxes:
        return outcomes.store_sop_class_refused()
    path, syntax, temp = item.path, item.transfer_syntax, None
    if syntax not in syntaxes:
        target = store_fallback(syntaxes)
        if target is None:
            return outcomes.store_syntax_refused()
        try:
            data = transcode_part10(item.path.read_bytes(), target)
        except Exception:  # noqa: BLE001 - TranscodeError, codec errors: the PACS cannot take it
            log.info("node %s: transcoding %s to %s failed", node.name, syntax, target, exc_info=True)
            return outcomes.store_syntax_refused()
        fd, name = tempfile.mkstemp(dir=workdir, suffix=".dcm")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        del data
        path, syntax, temp = Path(name), target, Path(name)
    context = next(cid for cid, (ab, ts) in assoc.contexts.items()
                   if ab == item.sop_class_uid and ts == syntax)
    started = time.monotonic()
    try:
        with path.open("rb") as fh:
            length = _skip_file_meta(fh, path)
            assoc.send_file(context, cmd.c_store_rq(msg_id, item.sop_class_uid, item.sop_instance_uid), fh,
                            length)
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
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)
    log.debug("node %s: C-STORE answered in %.3f s", node.name, time.monotonic() - started)
    return outcomes.store_response(cmd.status_dataset(response.command), syntax)


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
