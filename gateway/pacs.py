"""The one interface to a PACS node: ``echo``, ``find``, ``get``, ``move``, ``store``.

Everything above ``gateway/dimse/`` talks to PACS through :class:`Pacs` and these value types only;
pynetdicom stays behind it (``gateway.dimse.pacs.PynetdicomPacs`` implements it), so another DIMSE
implementation can be swapped in behind it without touching the services (one implementation
serves every node today).

Contract of every method:

* **Budgets**: ``echo``/``find`` hold one of the node's query associations
  (``max_query_associations``) for their duration; ``get``/``move``/``store`` hold one of its
  transfer associations (``max_associations``, shared by retrievals and stores), so long transfers
  never starve searches (docs/architecture.md, "DIMSE edge").
* **Errors**: failures raise the :mod:`gateway.errors` tree, each naming the node: unreachable 502,
  rejected/aborted 502, a failure status 502 with the status, a timeout 504.
* **Cancellation**: cancelling the awaiting coroutine (the HTTP client left) sets ``cancel`` (a
  C-CANCEL is sent for a running C-FIND/C-GET/C-MOVE, a store stops between instances) and the
  method waits for the worker to stop before it gives the association budget back and re-raises.
  ``get``/``move`` also watch a ``cancel`` event the caller may set itself.
* **Sub-operations**: C-GET's C-STOREs reach ``on_instance`` on the association's thread; it must
  be quick (write, rename, signal) or the PACS times out.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydicom.dataset import Dataset

from gateway.settings import PacsNode

QueryModel = Literal["study", "patient"]
RetrieveLevel = Literal["STUDY", "SERIES", "IMAGE"]

OnInstance = Callable[[bytes, str, str, str], None]
"""A received instance: (Part-10 bytes, SOP Instance UID, SOP Class UID, transfer syntax)."""


@dataclass
class FindResult:
    node: str
    datasets: list[Dataset] = field(default_factory=list)
    truncated: bool = False       # the node's result cap was hit and the C-FIND cancelled
    warnings: list[str] = field(default_factory=list)
    # Search only: which caps may have cut it (gateway/search.py cut_short), for the Warning 299.
    cut_by: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RetrieveRequest:
    """What a C-GET or C-MOVE asks for (PS3.4 C.4.2/C.4.3)."""

    level: RetrieveLevel
    study: str
    series: str | None = None
    sops: tuple[str, ...] | None = None
    patient_id: str | None = None          # Patient Root nodes need it at every level
    sop_classes: tuple[str, ...] = ()      # C-GET: the storage contexts to propose (empty: common ones)
    compressed_first: bool = False         # C-GET: propose compressed syntaxes before native ones


@dataclass
class RetrieveOutcome:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    received: int = 0
    cancelled: bool = False


@dataclass(frozen=True)
class StoreItem:
    """A Part-10 file whose file meta matches its data set (the caller checks that): a file on disk
    (``path``), or bytes held in memory (``pieces``: a STOW-RS part as it was received,
    gateway/stow/receive.py) that an engine sends as they are and that :meth:`file` writes to an
    in-memory file only for a reader that needs one (the pynetdicom engine, transcoding)."""

    path: Path | None      # None: held in memory (``pieces`` and ``materialize``)
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    # Called once, from the engine's thread, when the engine no longer reads the item (its C-STORE
    # answered, lost or skipped): lets STOW-RS free a part held in memory before the request ends.
    done: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    pieces: Sequence[bytes | memoryview] | None = field(default=None, compare=False, repr=False)
    materialize: Callable[[], Path] | None = field(default=None, compare=False, repr=False)

    def file(self) -> Path:
        """The instance as a file: ``path``, or the in-memory item written to one (once, by its owner)."""
        if self.path is not None:
            return self.path
        if self.materialize is None:
            raise ValueError("a store item with neither a path nor a way to write its bytes to one")
        return self.materialize()


StoreItems = Sequence[StoreItem] | AsyncIterable[StoreItem]
"""What :meth:`Pacs.store` takes: every item at once, or items as they become ready."""


@dataclass(frozen=True)
class StoreResult:
    status: int                      # the PACS's C-STORE status, or a gateway code (translators.stow)
    confirmed: bool                  # the PACS answered this C-STORE
    sent_syntax: str | None = None   # the transfer syntax it went in (differs when transcoded)


ProbeContext = tuple[str, Sequence[str]]
"""A presentation context to propose: (abstract syntax, [transfer syntax, ...])."""


@dataclass(frozen=True)
class AssociationFacts:
    """What one A-ASSOCIATE exchange told about a PACS (PS3.8 §9.3.3, PS3.7 Annex D), for its profile
    (docs/architecture.md, "PACS profiles"). No patient data."""

    accepted: tuple[tuple[str, str, bool], ...]   # (abstract syntax, transfer syntax, we may be its SCP)
    rejected: tuple[str, ...]                     # abstract syntaxes of the refused contexts
    max_pdu: int | None                           # the largest PDU the PACS receives (0: unlimited)
    implementation_class_uid: str                 # from the A-ASSOCIATE-AC user information
    implementation_version_name: str
    associate_seconds: float                      # TCP connect + A-ASSOCIATE round trip
    untuned_find_seconds: tuple[float, ...] = ()  # ``timed_find`` without our quick ACKs (Nagle shows)
    idle_kept_seconds: float | None = None        # ``hold_idle``: how long it stayed open while idle
    idle_closed: bool = False                     # ``hold_idle``: the PACS ended it before the time was up


class NotRequested(Exception):
    """Raised by an ``on_instance`` callback for an instance the retrieval did not ask for: the
    sub-operation is refused (PS3.4 C.4.3: the C-STORE fails), nothing is spooled."""


class ArrivalSpan(Protocol):
    def end(self, status: int, stored: bool) -> None:
        """The C-STORE was answered ``status`` and its instance spooled (``stored``) or not."""


class ArrivalTrace(Protocol):
    """Traces the C-STOREs a C-MOVE's sub-operations arrive as at the storage SCP (gateway/tracing.py)."""

    def begin(self) -> ArrivalSpan: ...


@dataclass
class PendingMove:
    """A C-MOVE this process issued, waiting for its sub-operations at the move destination."""

    msg_id: int
    study: str
    series: str | None
    expected: set[str] | None
    on_instance: OnInstance
    received: set[str] = field(default_factory=set)
    trace: ArrivalTrace | None = None   # None unless the move was issued for a traced request


@dataclass(frozen=True)
class RemoteMove:
    """A C-MOVE another replica issued whose sub-operation arrived here."""

    write: OnInstance                                              # SCP thread: into the local spool
    announce: Callable[[str, str, str], Coroutine[Any, Any, None]]  # loop: (sop, class, ts) to the originator


LookupMove = Callable[[int, str], Coroutine[Any, Any, RemoteMove | None]]
"""(Message ID, SOP Instance UID) -> the other replica's move, or None; runs on the event loop."""


class MoveDestination(Protocol):
    """Where C-MOVE sub-operations arrive (the gateway's storage SCP, PS3.4 C.4.2): the retrieval
    service registers each move it issues, so arrivals reach that move's ``on_instance``."""

    def register(self, move: PendingMove) -> None: ...

    def unregister(self, msg_id: int) -> None: ...

    def is_pending(self, msg_id: int) -> bool: ...

    def prefer_compressed(self, on: bool) -> None:
        """Counted switch: while any retry asks for it, accept compressed syntaxes first."""
        ...


class Pacs(Protocol):
    async def echo(self, node: PacsNode) -> float:
        """C-ECHO; the round trip in seconds."""
        ...

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult:
        """One C-FIND, every pending response collected; past ``max_results`` (default: the node's
        cap) it is cancelled and the result marked truncated."""
        ...

    async def get(self, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
                  cancel: threading.Event) -> RetrieveOutcome:
        """C-GET; the sub-operations arrive on the same association, through ``on_instance``."""
        ...

    async def move(self, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
                   cancel: threading.Event) -> RetrieveOutcome:
        """C-MOVE to ``destination`` (the gateway's storage SCP, which routes the arrivals)."""
        ...

    async def store(self, node: PacsNode, items: StoreItems, workdir: Path) -> list[StoreResult]:
        """C-STORE every item, one result per item in order; nothing unconfirmed is a success.

        ``items`` may be all known (a sequence) or come one by one (an async iterable: STOW-RS hands
        each instance over as soon as its part arrived). Each is stored as it comes, in order, over
        one association as far as the presentation contexts allow; the transfer budget is taken when
        the first item arrives and held until the iterable ends. If the iterable raises, the items
        before are still stored, then the exception propagates. Transcoded copies (for a PACS that
        refused an item's syntax) go to ``workdir``."""
        ...

    def query_associations_opened(self, node: PacsNode) -> int:
        """Query associations opened with the node so far (/metrics: reuse shows as few)."""
        ...

    async def associate_probe(self, node: PacsNode, contexts: Sequence[ProbeContext], *,
                              scp_roles: Sequence[str] = (),
                              timed_find: tuple[str, Dataset] | None = None,
                              hold_idle: float = 0.0) -> AssociationFacts:
        """Open one association proposing ``contexts`` (``scp_roles``: SOP classes whose SCP role we
        offer, as for C-GET), report what was accepted and who answered, release it. With
        ``timed_find`` (the C-FIND model's UID, an identifier matching a few entities) that C-FIND
        runs three times without the gateway's TCP quick ACKs and is timed, so a PACS with Nagle on
        shows its ~40 ms stalls. With ``hold_idle`` the association is then held idle that many
        seconds, watched for the PACS ending it (``idle_kept_seconds``, ``idle_closed``). Holds a
        transfer association of the node's budget."""
        ...

    async def close(self) -> None: ...
