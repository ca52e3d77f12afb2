"""gateway.dimse.outcomes: DIMSE statuses and transport failures -> gateway.errors / results (no network)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset

from gateway.dimse import outcomes as oc
from gateway.errors import (
    AssociationAborted,
    AssociationRejected,
    DimseFailure,
    DimseTimeout,
    NodeUnreachable,
)
from gateway.pacs import RetrieveOutcome, StoreResult
from translators.stow import PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED, TRANSFER_SYNTAX_NOT_SUPPORTED

EXPLICIT = "1.2.840.10008.1.2.1"


def status(code: int | None = None, **elements: object) -> Dataset:
    ds = Dataset()
    if code is not None:
        ds.Status = code
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def error(ds: Dataset, *, started: float | None = None, timeout: float | None = 30.0):
    return oc.status_error(ds, "pacs1", "C-FIND", started=time.monotonic() if started is None else started,
                           dimse_timeout=timeout)


# --------------------------------------------------------------------------- response statuses


@pytest.mark.parametrize("code", [0x0000, 0xFF00, 0xFF01, 0xFE00, 0xB000, 0xB006, 0xB007, 0xBFFF])
def test_success_pending_cancel_and_warning_are_not_errors(code):
    assert error(status(code)) is None


@pytest.mark.parametrize(("code", "text"), [
    (0xA700, "out of resources"),
    (0xA701, "out of resources: unable to calculate number of matches"),
    (0xA801, "move destination unknown"),
    (0xA900, "identifier does not match SOP class"),
    (0x0122, "SOP class not supported"),
    (0xC000, "unable to process"),
    (0xCFFF, "unable to process"),
    (0x0110, "failure"),
])
def test_failure_status_is_dimse_failure_naming_node_status_and_meaning(code, text):
    err = error(status(code))
    assert isinstance(err, DimseFailure) and err.status_code == 502
    assert err.node == "pacs1" and err.status == code
    assert err.detail == f"node pacs1: C-FIND failed with status 0x{code:04X} ({text})"


def test_error_comment_is_never_echoed():
    err = error(status(0xC001, ErrorComment="no such patient DOE^JOHN 12345"))
    assert isinstance(err, DimseFailure) and err.detail.endswith("(unable to process)")
    assert "DOE" not in str(err.to_json()) and "12345" not in str(err.to_json())


def test_empty_status_before_the_timeout_is_an_abort():
    err = error(status())
    assert isinstance(err, AssociationAborted) and err.node == "pacs1"
    assert "aborted during C-FIND" in err.detail


def test_empty_status_after_the_timeout_is_a_timeout():
    err = error(status(), started=time.monotonic() - 3.0, timeout=3.0)
    assert isinstance(err, DimseTimeout) and err.status_code == 504 and err.node == "pacs1"
    assert "C-FIND timed out after 3." in err.detail


def test_empty_status_without_a_timeout_is_an_abort():
    assert isinstance(error(status(), started=time.monotonic() - 1000, timeout=None), AssociationAborted)


@pytest.mark.parametrize(("code", "pending"), [(0xFF00, True), (0xFF01, True), (0x0000, False),
                                               (0xFE00, False), (0xB000, False), (0xA700, False), (None, False)])
def test_is_pending(code, pending):
    assert oc.is_pending(status(code)) is pending


# --------------------------------------------------------------------------- association failures


def assoc(*, rejected: bool = False, aborted: bool = False) -> SimpleNamespace:
    return SimpleNamespace(is_rejected=rejected, is_aborted=aborted)


def failure(a: SimpleNamespace, *, connected: bool, elapsed: float = 0.0, timeout: float | None = 5.0):
    return oc.association_failure(a, "pacs1", connected=connected, started=time.monotonic() - elapsed,
                                  connect_timeout=timeout)


def test_association_failures():
    rejected = failure(assoc(rejected=True), connected=True)
    assert isinstance(rejected, AssociationRejected) and "AE titles" in rejected.detail
    refused = failure(assoc(), connected=False)
    assert isinstance(refused, NodeUnreachable) and refused.node == "pacs1"
    slow_connect = failure(assoc(), connected=False, elapsed=5.0)
    assert isinstance(slow_connect, DimseTimeout) and "TCP connect timed out" in slow_connect.detail
    assert isinstance(failure(assoc(), connected=False, elapsed=60, timeout=None), NodeUnreachable)
    aborted = failure(assoc(aborted=True), connected=True)
    assert isinstance(aborted, AssociationAborted) and "aborted the association request" in aborted.detail
    silent = failure(assoc(), connected=True)
    assert isinstance(silent, DimseTimeout) and "did not answer the association request" in silent.detail


def test_refused_services_are_0122_failures():
    study = oc.find_model_refused("pacs1", "study")
    patient = oc.find_model_refused("pacs1", "patient")
    assert "does not support Study Root C-FIND" in study.detail
    assert "does not support Patient Root C-FIND" in patient.detail
    get, move = oc.get_refused("pacs1"), oc.move_refused("pacs1")
    assert "configure `retrieve: move`" in get.detail and "does not accept C-MOVE" in move.detail
    assert {e.status for e in (study, patient, get, move)} == {0x0122}
    assert {e.node for e in (study, patient, get, move)} == {"pacs1"}


# --------------------------------------------------------------------------- C-GET / C-MOVE responses


def counters(code: int | None, completed: int | None = None, failed: int | None = None,
             warning: int | None = None, remaining: int | None = None) -> Dataset:
    ds = status(code)
    for keyword, value in (("NumberOfCompletedSuboperations", completed), ("NumberOfFailedSuboperations", failed),
                           ("NumberOfWarningSuboperations", warning),
                           ("NumberOfRemainingSuboperations", remaining)):
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def fold(ds: Dataset, outcome: RetrieveOutcome, identifier: Dataset | None = None, *,
         started: float | None = None, timeout: float | None = 30.0) -> bool:
    return oc.retrieve_response(ds, identifier, outcome, "pacs1", "C-GET",
                                started=time.monotonic() if started is None else started, dimse_timeout=timeout)


def test_retrieve_counters_follow_every_response():
    outcome = RetrieveOutcome()
    assert fold(counters(0xFF00, completed=1, failed=0, warning=0, remaining=2), outcome) is True
    assert (outcome.completed, outcome.failed, outcome.warning) == (1, 0, 0)
    assert fold(counters(0xFF00, completed=2, failed=0, warning=0, remaining=1), outcome) is True
    assert fold(counters(0x0000, completed=3, failed=0, warning=0), outcome) is False
    assert (outcome.completed, outcome.failed, outcome.warning, outcome.cancelled) == (3, 0, 0, False)


def test_retrieve_missing_counters_keep_the_last_known():
    outcome = RetrieveOutcome(completed=4)
    assert fold(counters(0x0000), outcome) is False
    assert outcome.completed == 4


def test_retrieve_cancel_status_marks_the_outcome_cancelled():
    outcome = RetrieveOutcome()
    assert fold(counters(0xFE00, completed=1, failed=0, warning=0, remaining=5), outcome) is False
    assert outcome.cancelled and outcome.completed == 1


@pytest.mark.parametrize("uids", [["1.2.3.1"], ["1.2.3.1", "1.2.3.2"]])
def test_retrieve_warning_is_partial_with_the_failed_uids(uids):
    outcome = RetrieveOutcome()
    failed_list = Dataset()
    failed_list.FailedSOPInstanceUIDList = uids if len(uids) > 1 else uids[0]
    assert fold(counters(0xB000, completed=3, failed=len(uids), warning=0), outcome, failed_list) is False
    assert outcome.failed == len(uids) and outcome.completed == 3
    assert outcome.failed_uids == uids
    assert not outcome.cancelled


@pytest.mark.parametrize("code", [0xA701, 0xA702])
def test_retrieve_out_of_resources_for_sub_operations_is_partial(code):
    outcome = RetrieveOutcome()
    assert fold(counters(code, completed=2, failed=3), outcome) is False
    assert (outcome.completed, outcome.failed) == (2, 3)


@pytest.mark.parametrize("code", [0xA700, 0xA801, 0xA900, 0xC000, 0x0122])
def test_retrieve_failure_raises_after_taking_the_counters(code):
    outcome = RetrieveOutcome()
    with pytest.raises(DimseFailure) as info:
        fold(counters(code, completed=1, failed=2), outcome)
    assert info.value.status == code and info.value.node == "pacs1" and "C-GET" in info.value.detail
    assert (outcome.completed, outcome.failed) == (1, 2)


def test_retrieve_empty_status_raises_abort_or_timeout():
    with pytest.raises(AssociationAborted):
        fold(status(), RetrieveOutcome())
    with pytest.raises(DimseTimeout):
        fold(status(), RetrieveOutcome(), started=time.monotonic() - 10, timeout=10)


# --------------------------------------------------------------------------- C-STORE responses


@pytest.mark.parametrize("code", [0x0000, 0xB000, 0xB007, 0xA700, 0xC000, 0x0122])
def test_store_answered_is_confirmed_with_the_pacs_status(code):
    assert oc.store_response(status(code), EXPLICIT) == StoreResult(code, confirmed=True, sent_syntax=EXPLICIT)


def test_store_empty_status_is_an_unconfirmed_processing_failure():
    result = oc.store_response(status(), EXPLICIT)
    assert result == StoreResult(PROCESSING_FAILURE, confirmed=False)
    assert result == oc.store_lost()


def test_store_refusals_are_unconfirmed():
    assert oc.store_sop_class_refused() == StoreResult(SOP_CLASS_NOT_SUPPORTED, confirmed=False)
    assert oc.store_syntax_refused() == StoreResult(TRANSFER_SYNTAX_NOT_SUPPORTED, confirmed=False)
