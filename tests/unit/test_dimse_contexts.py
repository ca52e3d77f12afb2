"""gateway.dimse.contexts: every presentation context the gateway proposes or accepts (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from gateway.dimse import contexts as cx
from gateway.pacs import StoreItem
from translators.syntaxes import (
    COMPRESSED_PREFERENCE,
    DEFLATED_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    JPEG_BASELINE,
    LEGACY,
    NATIVE,
    RLE_LOSSLESS,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"


def classes(n: int) -> list[str]:
    return [f"1.2.840.10008.5.1.4.1.1.{i}" for i in range(1, n + 1)]


# --------------------------------------------------------------------------- queries, C-MOVE


def test_query_association_serves_echo_and_both_find_models():
    assert cx.query_contexts() == [(cx.VERIFICATION, list(DEFAULT_TRANSFER_SYNTAXES)),
                                   (cx.STUDY_ROOT_FIND, list(DEFAULT_TRANSFER_SYNTAXES)),
                                   (cx.PATIENT_ROOT_FIND, list(DEFAULT_TRANSFER_SYNTAXES))]


@pytest.mark.parametrize(("root", "find", "move", "get"), [
    ("study", "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"),
    ("patient", "1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3"),
])
def test_information_models(root, find, move, get):
    assert (cx.find_model(root), cx.move_model(root), cx.get_model(root)) == (find, move, get)
    assert cx.move_contexts(root) == [(move, list(DEFAULT_TRANSFER_SYNTAXES))]


# --------------------------------------------------------------------------- C-GET


def test_get_contexts_one_syntax_each_explicit_before_implicit_then_compressed_breadth_first():
    plan = cx.get_storage_contexts([CT, MR])
    assert all(len(syntaxes) == 1 for _, syntaxes in plan)
    assert plan[:4] == [(CT, [EXPLICIT_VR_LE]), (MR, [EXPLICIT_VR_LE]),
                        (CT, [IMPLICIT_VR_LE]), (MR, [IMPLICIT_VR_LE])]
    compressed = plan[4:]
    assert compressed == [(c, [ts]) for ts in COMPRESSED_PREFERENCE for c in (CT, MR)]
    assert compressed[:2] == [(CT, [RLE_LOSSLESS]), (MR, [RLE_LOSSLESS])]


def test_get_contexts_compressed_first_flips_the_halves():
    native_first = cx.get_storage_contexts([CT, MR])
    compressed_first = cx.get_storage_contexts([CT, MR], compressed_first=True)
    assert sorted(native_first) == sorted(compressed_first)
    assert compressed_first[:2] == [(CT, [RLE_LOSSLESS]), (MR, [RLE_LOSSLESS])]
    assert compressed_first[-4:] == native_first[:4]


def test_get_contexts_duplicates_collapse_and_no_classes_means_the_common_ones():
    assert cx.get_storage_contexts([CT, CT, MR]) == cx.get_storage_contexts([CT, MR])
    common = cx.get_storage_contexts([])
    assert {c for c, _ in common} <= set(cx.COMMON_STORAGE)
    assert common[0] == (cx.COMMON_STORAGE[0], [EXPLICIT_VR_LE])


@pytest.mark.parametrize("n", [1, 5, 20, 63, 64, 100])
@pytest.mark.parametrize("reserved", [1, 2])
def test_get_contexts_stay_within_128(n, reserved):
    plan = cx.get_storage_contexts(classes(n), reserved=reserved)
    assert len(plan) <= cx.MAX_CONTEXTS - reserved
    assert len(plan) == min(cx.MAX_CONTEXTS - reserved, n * (len(NATIVE) + len(COMPRESSED_PREFERENCE)))
    # the native contexts are never crowded out by compressed ones
    natives = [c for c in plan if c[1][0] in NATIVE]
    assert len(natives) == min(2 * n, cx.MAX_CONTEXTS - reserved)


def test_get_proposal_model_find_fallback_storage_and_roles():
    proposal = cx.get_proposal("study", [MR, CT, MR])
    assert proposal.model == cx.STUDY_ROOT_GET
    assert proposal.contexts[:2] == [(cx.STUDY_ROOT_GET, list(DEFAULT_TRANSFER_SYNTAXES)),
                                     (cx.STUDY_ROOT_FIND, list(DEFAULT_TRANSFER_SYNTAXES))]
    assert proposal.contexts[2:] == cx.get_storage_contexts([MR, CT], reserved=2)
    assert proposal.scp_roles == [MR, CT]
    retry = cx.get_proposal("patient", classes(11), compressed_first=True)
    assert retry.model == cx.PATIENT_ROOT_GET and retry.contexts[1][0] == cx.PATIENT_ROOT_FIND
    assert len(retry.contexts) == cx.MAX_CONTEXTS
    assert retry.contexts[2] == (classes(11)[0], [RLE_LOSSLESS])
    # many classes: the native contexts alone fill the 126 left, every class gets Explicit VR LE
    big = cx.get_proposal("study", classes(100))
    assert len(big.contexts) == cx.MAX_CONTEXTS
    assert [c for c, s in big.contexts if s == [EXPLICIT_VR_LE]] == classes(100)


# --------------------------------------------------------------------------- C-STORE


def item(cls: str, ts: str, n: int = 0) -> StoreItem:
    return StoreItem(Path(f"/x/{n}"), cls, f"1.2.{n}", ts)


def test_store_contexts_own_syntax_then_native_fallback():
    plan = cx.store_batches([item(CT, JPEG_BASELINE), item(CT, RLE_LOSSLESS), item(US, EXPLICIT_VR_LE)])
    assert plan == [[(CT, [JPEG_BASELINE]), (CT, [RLE_LOSSLESS]), (CT, [EXPLICIT_VR_LE, IMPLICIT_VR_LE]),
                     (US, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])]]


def test_store_contexts_keep_the_items_native_syntax_first():
    assert cx.store_batches([item(MR, IMPLICIT_VR_LE)]) == [[(MR, [IMPLICIT_VR_LE, EXPLICIT_VR_LE])]]
    assert cx.store_batches([item(MR, IMPLICIT_VR_LE), item(MR, EXPLICIT_VR_LE)]) == [
        [(MR, [IMPLICIT_VR_LE, EXPLICIT_VR_LE]), (MR, [EXPLICIT_VR_LE])]]


def test_store_batches_never_split_a_class_and_hold_at_most_128():
    # 50 classes x 3 contexts (two compressed + native) = 150: two batches, whole classes each.
    items = [item(c, ts, i) for i, c in enumerate(classes(50)) for ts in (RLE_LOSSLESS, JPEG_BASELINE)]
    plan = cx.store_batches(items)
    assert len(plan) == 2
    assert all(len(b) <= cx.MAX_CONTEXTS for b in plan)
    assert [len(b) for b in plan] == [126, 24]
    first, second = ({c for c, _ in b} for b in plan)
    assert not first & second and first | second == set(classes(50))


def test_store_batches_empty():
    assert cx.store_batches([]) == []


@pytest.mark.parametrize(("accepted", "expected"), [
    ([EXPLICIT_VR_LE], EXPLICIT_VR_LE),
    ([IMPLICIT_VR_LE, EXPLICIT_VR_LE], EXPLICIT_VR_LE),
    ([JPEG_BASELINE, IMPLICIT_VR_LE], IMPLICIT_VR_LE),
    ([JPEG_BASELINE], None),
    ([], None),
])
def test_store_fallback_prefers_explicit(accepted, expected):
    assert cx.store_fallback(accepted) == expected


# --------------------------------------------------------------------------- storage SCP


def test_scp_accepts_every_storage_class():
    plan = cx.scp_contexts()
    assert [c for c, _ in plan] == [str(p.abstract_syntax) for p in AllStoragePresentationContexts]
    assert len({tuple(s) for _, s in plan}) == 1


def test_scp_native_first_or_compressed_first_legacy_always_last():
    native_first = cx.scp_contexts()[0][1]
    compressed_first = cx.scp_contexts(compressed_first=True)[0][1]
    assert sorted(native_first) == sorted(compressed_first)
    assert native_first[:2] == [EXPLICIT_VR_LE, IMPLICIT_VR_LE]
    assert native_first[-2:] == list(LEGACY) == compressed_first[-2:] == [DEFLATED_LE, EXPLICIT_VR_BE]
    assert compressed_first[-4:-2] == [EXPLICIT_VR_LE, IMPLICIT_VR_LE]
    assert RLE_LOSSLESS in compressed_first[:-4] and JPEG_BASELINE in compressed_first[:-4]
