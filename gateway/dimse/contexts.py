"""Presentation-context policy: every context the gateway proposes or accepts, decided here.

A presentation context pairs one abstract syntax (a SOP class) with the transfer syntaxes offered
for it; the acceptor picks one syntax per context (PS3.8 §9.3.2.2, §9.3.3.2). What gets proposed
decides whether an instance arrives untouched, is converted by the PACS, or fails, so the three
places the gateway negotiates storage contexts follow one policy, kept in this module:

* **C-GET proposals** (:func:`get_proposal`): the gateway is the storage SCP of the sub-operations
  (PS3.4 C.4.3, role selection PS3.7 D.3.3.4), so it proposes one context per (SOP class, transfer
  syntax): native first (Explicit before Implicit VR LE), then the compressed syntaxes breadth first,
  all within the 128-context limit; ``compressed_first`` flips the two halves for retries.
* **C-STORE proposals** (:func:`store_proposal`, the one plan every store engine uses): instances
  arrive one by one (STOW-RS streams them), so an association proposes the classes and syntaxes of
  the instances at hand plus the native syntaxes of the common storage classes, and a new one is
  planned when an instance's (class, syntax) was not proposed (:func:`proposed_pairs`);
  :func:`store_fallback` picks the syntax to transcode to when the PACS refused an item's own.
* **Storage SCP acceptance** (:func:`scp_contexts`, :func:`scp_verification`): what the C-MOVE
  destination accepts, native or compressed first, and C-ECHO; both storage SCP engines use it.

Pure functions over UIDs (``(SOP class, [transfer syntax])`` tuples); building pynetdicom objects
from them is :mod:`gateway.dimse.association`'s job. Transfer syntax groupings come from
:mod:`translators.syntaxes` (docs/architecture.md, "DIMSE edge").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pynetdicom import ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from gateway.pacs import StoreItem
from translators.syntaxes import COMPRESSED_PREFERENCE, LEGACY, NATIVE

Context = tuple[str, list[str]]
"""(abstract syntax, [transfer syntax, ...]) in proposal order."""

MAX_CONTEXTS = 128
"""Presentation context IDs are the odd numbers 1..255 (PS3.8 §9.3.2.2)."""

VERIFICATION = "1.2.840.10008.1.1"
# Query/Retrieve information models (PS3.4 C.6.1 Patient Root, C.6.2 Study Root): FIND, MOVE, GET.
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

Root = Literal["study", "patient"]
_MODELS: dict[Root, tuple[str, str, str]] = {
    "study": (STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET),
    "patient": (PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET),
}

COMMON_STORAGE: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.128",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.88.59",
    "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.12.2", "1.2.840.10008.5.1.4.1.1.481.1",
)
"""Common storage SOP classes: what a C-GET proposes when the C-FIND did not name any (dcmqrscp
omits them), and what every C-STORE association offers besides the classes at hand."""


def find_model(root: Root) -> str:
    return _MODELS[root][0]


def move_model(root: Root) -> str:
    return _MODELS[root][1]


def get_model(root: Root) -> str:
    return _MODELS[root][2]


def _default(abstract_syntax: str) -> Context:
    # pynetdicom's default list (Implicit, Explicit, Deflated, Big Endian): for non-storage services
    # the encoding of identifiers does not reach web clients as such.
    return abstract_syntax, list(DEFAULT_TRANSFER_SYNTAXES)


# --------------------------------------------------------------------------- queries and C-MOVE


def query_contexts() -> list[Context]:
    """One association serves C-ECHO and both C-FIND models, so it can be reused for any query."""
    return [_default(uid) for uid in (VERIFICATION, STUDY_ROOT_FIND, PATIENT_ROOT_FIND)]


def move_contexts(root: Root) -> list[Context]:
    """C-MOVE needs only its model: the sub-operations come on the PACS's own association."""
    return [_default(move_model(root))]


# --------------------------------------------------------------------------- C-GET


@dataclass(frozen=True)
class GetProposal:
    model: str
    contexts: list[Context]   # the C-GET model, its C-FIND, then the storage contexts
    scp_roles: list[str]      # SOP classes we offer to be the storage SCP for (PS3.7 D.3.3.4)


def get_proposal(root: Root, sop_classes: Iterable[str], *, compressed_first: bool = False) -> GetProposal:
    """The contexts of a C-GET association.

    The C-FIND model of the same root is proposed too: a PACS without C-GET then still accepts the
    association, and the error can say exactly what is missing instead of reporting an abort.
    """
    model = get_model(root)
    storage = get_storage_contexts(sop_classes, reserved=2, compressed_first=compressed_first)
    return GetProposal(model=model,
                       contexts=[_default(model), _default(find_model(root)), *storage],
                       scp_roles=list(dict.fromkeys(cls for cls, _ in storage)))


def get_storage_contexts(sop_classes: Iterable[str], reserved: int = 1,
                         compressed_first: bool = False) -> list[Context]:
    """(SOP class, [transfer syntax]) pairs within the 128-context limit, ``reserved`` kept free.

    One syntax per context: the SCP of the sub-operations (the PACS) chooses among our *contexts*
    for each instance, so every syntax it might hold the instance in gets its own. Order matters:
    DCMTK-based PACS send each C-GET sub-operation on the *first* accepted context of its SOP class
    and fail when they cannot convert the file to it. ``compressed_first`` is for the retry of
    instances a native-first attempt could not deliver.
    """
    classes = list(dict.fromkeys(sop_classes)) or list(COMMON_STORAGE)
    budget = MAX_CONTEXTS - reserved
    # Explicit and Implicit VR LE in separate contexts, Explicit first: an SCP picks one syntax per
    # context (pynetdicom acceptors prefer Implicit), and Implicit VR LE must not reach web clients
    # (PS3.18 §8.7.3), so we would have to re-encode every instance.
    native: list[Context] = [(c, [ts]) for ts in NATIVE for c in classes][:budget]
    compressed: list[Context] = []
    for ts in COMPRESSED_PREFERENCE:   # breadth first: every class gets RLE before any gets JPEG-LS
        for cls in classes:
            if len(native) + len(compressed) >= budget:
                break
            compressed.append((cls, [ts]))
    return compressed + native if compressed_first else native + compressed


# --------------------------------------------------------------------------- C-STORE

StorePair = tuple[str, str]
"""(SOP class, transfer syntax) of an instance to store."""


def store_proposal(wanted: Iterable[StorePair]) -> list[Context]:
    """The presentation contexts of one C-STORE association, one transfer syntax each.

    ``wanted``: the (SOP class, transfer syntax) pairs of the instances the association is for, most
    important first: the instance about to be sent, then the ones sent before it (most recent
    first), then any known to follow. Every store engine plans with this function; instances come
    one by one (docs/architecture.md, "STOW-RS"), so an engine plans again, for a new association,
    when an instance's pair is not among the :func:`proposed_pairs` of the open one.

    1. Per SOP class of ``wanted``, in order of first appearance: a context for each of its
       syntaxes that is not native, then Explicit VR LE and Implicit VR LE in contexts of their
       own. The acceptor picks one syntax per context (PS3.8 §9.3.3.2), so separate contexts let an
       instance go in its own syntax whenever the PACS takes it; every Storage SCP accepts Implicit
       VR LE (PS3.4 B.2), so an instance whose syntax the PACS refused can be transcoded to a native
       one (:func:`store_fallback`).
    2. Explicit and Implicit VR LE for every class of :data:`COMMON_STORAGE` not named in 1, so an
       instance of another common class arriving later goes on the same association.

    Whole classes only, within the 128-context limit (PS3.8 §9.3.2.2): a class that no longer fits
    is left out and gets an association of its own if an instance of it comes. The first class
    always fits.
    """
    classes: dict[str, list[str]] = {}
    for cls, ts in wanted:
        own = classes.setdefault(cls, [])
        if ts not in NATIVE and ts not in own:
            own.append(ts)
    for cls in COMMON_STORAGE:
        classes.setdefault(cls, [])
    contexts: list[Context] = []
    for cls, own in classes.items():
        group: list[Context] = [(cls, [ts]) for ts in (*own, *NATIVE)]
        if not contexts:
            contexts = group[:MAX_CONTEXTS]
        elif len(contexts) + len(group) <= MAX_CONTEXTS:
            contexts.extend(group)
    return contexts


def proposed_pairs(contexts: Iterable[Context]) -> frozenset[StorePair]:
    """The (SOP class, transfer syntax) pairs a proposal offers: an instance whose pair is not among
    them needs a new association (the PACS was never asked for it)."""
    return frozenset((cls, ts) for cls, syntaxes in contexts for ts in syntaxes)


def store_batches(items: Sequence[StoreItem]) -> list[list[Context]]:
    """Presentation contexts for the items, in batches of at most 128 (one association each).

    Superseded by :func:`store_proposal`: no store engine uses it any more (instances are no longer
    all known when the first association opens). Kept only for its unit tests in
    tests/unit/test_dimse_contexts.py; remove both together.

    Per SOP class: one context per non-native transfer syntax of its items, then the native
    fallback ``[the items' native syntaxes first, then the other of Explicit/Implicit VR LE]`` (every
    Storage SCP accepts Implicit VR LE, PS3.4 B.2), and, when items come in both native syntaxes, an
    exact context for the second one too. A SOP class never spans two batches.
    """
    by_class: dict[str, list[str]] = {}
    for item in items:
        syntaxes = by_class.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax not in syntaxes:
            syntaxes.append(item.transfer_syntax)
    batches: list[list[Context]] = [[]]
    for cls, syntaxes in by_class.items():
        contexts: list[Context] = [(cls, [ts]) for ts in syntaxes if ts not in NATIVE]
        natives = [ts for ts in syntaxes if ts in NATIVE]
        contexts.append((cls, natives + [ts for ts in NATIVE if ts not in natives]))
        if len(natives) == 2:
            contexts.append((cls, [natives[1]]))
        contexts = contexts[:MAX_CONTEXTS]
        if len(batches[-1]) + len(contexts) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(contexts)
    return [b for b in batches if b]


def store_fallback(accepted: Iterable[str]) -> str | None:
    """The native syntax to transcode an item to when the PACS refused the item's own (Explicit VR
    LE first), or None when it accepted neither for the SOP class."""
    offered = set(accepted)
    return next((ts for ts in NATIVE if ts in offered), None)


# --------------------------------------------------------------------------- storage SCP


def scp_contexts(*, compressed_first: bool = False) -> list[Context]:
    """What the gateway's storage SCP accepts: every storage SOP class in every syntax pynetdicom knows.

    pynetdicom accepts, per proposed context, the first syntax in *our* list that was proposed.
    DCMTK proposes one context per SOP class ([stored, uncompressed...]) and fails sub-operations it
    cannot convert, so a retry flips the order (``compressed_first``). Deflated and Big Endian are a
    last resort either way.
    """
    legacy = list(LEGACY)
    native = list(NATIVE)
    compressed = [str(ts) for ts in ALL_TRANSFER_SYNTAXES if ts not in native + legacy]
    syntaxes = compressed + native + legacy if compressed_first else native + compressed + legacy
    return [(str(cx.abstract_syntax), list(syntaxes)) for cx in AllStoragePresentationContexts]


def scp_verification() -> Context:
    """C-ECHO at the storage SCP (PS3.7 9.1.5): how a PACS administrator checks the move destination."""
    return VERIFICATION, list(NATIVE)
