"""The fast storage SCP's A-ASSOCIATE answer (gateway/dimse/fast/scp_negotiation.py): pure rules."""

from __future__ import annotations

from gateway.dimse import contexts
from gateway.dimse.fast import pdu
from gateway.dimse.fast.scp_negotiation import Accepted, AcceptorPolicy, negotiate, supported

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"
OURS = supported([*contexts.scp_contexts(), contexts.scp_verification()])
POLICY = AcceptorPolicy(ae_title="DICOMWEBGW", calling_ae_titles=frozenset({"PACS"}), max_pdu=65536)


def rq(*cxs: pdu.PresentationContext, calling: str = "PACS", called: str = "DICOMWEBGW",
       **kwargs: object) -> pdu.AssociateRq:
    return pdu.AssociateRq(called, calling, cxs or (pdu.PresentationContext(1, CT, (EXPLICIT,)),),
                           pdu.UserInformation(max_pdu=32768), **kwargs)   # type: ignore[arg-type]


def rejection(answer: Accepted | pdu.AssociateRj) -> tuple[int, int, int]:
    assert isinstance(answer, pdu.AssociateRj), answer
    return answer.result, answer.source, answer.reason


def test_rejections_in_ps38_terms() -> None:
    assert rejection(negotiate(rq(called="OTHER"), POLICY, OURS)) == (1, 1, 7)
    assert rejection(negotiate(rq(calling="STRANGER"), POLICY, OURS)) == (1, 1, 3)
    assert rejection(negotiate(rq(application_context="1.2.3"), POLICY, OURS)) == (1, 1, 2)
    assert rejection(negotiate(rq(protocol_version=2), POLICY, OURS)) == (1, 2, 2)
    assert rejection(negotiate(rq(), POLICY, OURS, at_capacity=True)) == (2, 3, 2)


def test_any_calling_ae_without_an_allow_list() -> None:
    open_policy = AcceptorPolicy(ae_title="DICOMWEBGW")
    assert isinstance(negotiate(rq(calling="ANYONE"), open_policy, OURS), Accepted)


def test_contexts_answered_in_order_with_our_preferred_syntax() -> None:
    answer = negotiate(rq(pdu.PresentationContext(1, CT, (IMPLICIT, RLE, EXPLICIT)),
                          pdu.PresentationContext(3, "1.2.3.4", (EXPLICIT,)),
                          pdu.PresentationContext(5, CT, ("1.2.3.999", "1.2.3.998")),
                          pdu.PresentationContext(7, contexts.VERIFICATION, (IMPLICIT,)),
                          pdu.PresentationContext(7, CT, (EXPLICIT,))), POLICY, OURS)
    assert isinstance(answer, Accepted)
    assert [(r.id, r.result, r.transfer_syntax) for r in answer.ac.results] == [
        (1, pdu.ACCEPTANCE, EXPLICIT), (3, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, EXPLICIT),
        (5, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED, "1.2.3.999"), (7, pdu.ACCEPTANCE, IMPLICIT),
        (7, pdu.NO_REASON, EXPLICIT)]
    assert answer.contexts == {1: (CT, EXPLICIT), 7: (contexts.VERIFICATION, IMPLICIT)}
    assert answer.peer_max_pdu == 32768
    assert answer.ac.user.max_pdu == 65536 and answer.ac.user.roles == ()
    # The AC encodes and decodes (the wire form the peer reads).
    decoded = pdu.decode(pdu.A_ASSOCIATE_AC, pdu.encode(answer.ac)[6:])
    assert isinstance(decoded, pdu.AssociateAc) and decoded.results[0].transfer_syntax == EXPLICIT


def test_compressed_first_preference_picks_the_compressed_syntax() -> None:
    compressed_first = supported(contexts.scp_contexts(compressed_first=True))
    answer = negotiate(rq(pdu.PresentationContext(1, CT, (EXPLICIT, RLE))), POLICY, compressed_first)
    assert isinstance(answer, Accepted) and answer.contexts[1] == (CT, RLE)
    answer = negotiate(rq(pdu.PresentationContext(1, CT, (EXPLICIT, RLE))), POLICY, OURS)
    assert isinstance(answer, Accepted) and answer.contexts[1] == (CT, EXPLICIT)


def test_everything_refused_is_still_an_association() -> None:
    answer = negotiate(rq(pdu.PresentationContext(1, "1.2.3.4", (EXPLICIT,))), POLICY, OURS)
    assert isinstance(answer, Accepted) and answer.contexts == {}
