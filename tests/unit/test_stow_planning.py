"""The C-STORE presentation-context plan every store engine uses (gateway.dimse.contexts.store_proposal):
instances arrive one by one, so a proposal carries the instance at hand, those seen before, and the
native syntaxes of the common storage classes, within the 128-context limit (PS3.8 §9.3.2.2)."""

from __future__ import annotations

from gateway.dimse import contexts as cx
from translators.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE, NATIVE

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
X3D = "1.2.840.10008.5.1.4.1.1.13.1.1"     # X-Ray 3D Angiographic: not a common class
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K = "1.2.840.10008.1.2.4.90"


def classes(n: int) -> list[str]:
    return [f"1.2.3.{i}" for i in range(n)]


def test_the_first_instance_leads_with_its_own_syntax_then_the_native_ones():
    plan = cx.store_proposal([(CT, JPEG_BASELINE)])
    assert plan[:3] == [(CT, [JPEG_BASELINE]), (CT, [EXPLICIT_VR_LE]), (CT, [IMPLICIT_VR_LE])]
    assert all(len(syntaxes) == 1 for _, syntaxes in plan), "one transfer syntax per context"
    assert len(plan) <= cx.MAX_CONTEXTS


def test_common_classes_come_with_their_native_syntaxes_only():
    plan = cx.store_proposal([(CT, EXPLICIT_VR_LE)])
    pairs = cx.proposed_pairs(plan)
    for cls in cx.COMMON_STORAGE:
        assert {(cls, ts) for ts in NATIVE} <= pairs
    assert (MR, RLE) not in pairs and (X3D, EXPLICIT_VR_LE) not in pairs
    assert len(plan) == 2 * len(cx.COMMON_STORAGE)      # CT is common: named once, not twice
    assert len({cls for cls, _ in plan}) == len(cx.COMMON_STORAGE)


def test_classes_and_syntaxes_seen_before_are_kept():
    plan = cx.store_proposal([(MR, RLE), (CT, JPEG_BASELINE), (X3D, IMPLICIT_VR_LE), (MR, J2K)])
    pairs = cx.proposed_pairs(plan)
    assert {(MR, RLE), (MR, J2K), (CT, JPEG_BASELINE), (X3D, IMPLICIT_VR_LE), (X3D, EXPLICIT_VR_LE)} <= pairs
    # class order is the order of first appearance; each class's own syntaxes before its natives
    assert plan[:4] == [(MR, [RLE]), (MR, [J2K]), (MR, [EXPLICIT_VR_LE]), (MR, [IMPLICIT_VR_LE])]


def test_a_class_that_no_longer_fits_is_left_out_whole():
    wanted = [(cls, EXPLICIT_VR_LE) for cls in classes(70)]   # 140 native contexts wanted
    plan = cx.store_proposal(wanted)
    assert len(plan) == cx.MAX_CONTEXTS
    proposed = [cls for cls, _ in plan]
    assert proposed == [cls for cls in classes(64) for _ in NATIVE]   # whole classes, in order
    assert not set(cx.COMMON_STORAGE) & set(proposed)


def test_the_first_class_always_fits():
    many = [(cls, JPEG_BASELINE) for cls in classes(200)]
    plan = cx.store_proposal([(X3D, J2K), *many])
    assert plan[:3] == [(X3D, [J2K]), (X3D, [EXPLICIT_VR_LE]), (X3D, [IMPLICIT_VR_LE])]
    assert len(plan) <= cx.MAX_CONTEXTS


def test_proposed_pairs_tell_what_needs_a_new_association():
    plan = cx.store_proposal([(CT, EXPLICIT_VR_LE)])
    pairs = cx.proposed_pairs(plan)
    assert (CT, EXPLICIT_VR_LE) in pairs and (CT, IMPLICIT_VR_LE) in pairs and (MR, EXPLICIT_VR_LE) in pairs
    assert (CT, JPEG_BASELINE) not in pairs      # a compressed CT after native ones: a new proposal
    assert (CT, JPEG_BASELINE) in cx.proposed_pairs(cx.store_proposal([(CT, JPEG_BASELINE), (CT, EXPLICIT_VR_LE)]))
