"""The in-process demo PACS, driven by a real pynetdicom SCU over 127.0.0.1."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.association import Association

from gateway.dimse.demo_pacs import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    DemoPacs,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
PT = "1.2.840.10008.5.1.4.1.1.128"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
ROOT = "1.2.826.0.1.3680043.10.1082.99."


def _instance(
    patient: tuple[str, str],
    study: tuple[int, str, str],
    series: tuple[int, str, str],
    number: int,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    charset: str | None = None,
) -> Dataset:
    (name, patient_id), (study_no, study_date, accession), (series_no, modality, sop_class) = (
        patient,
        study,
        series,
    )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{ROOT}3.{study_no}.{series_no}.{number}"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = study_date, "101500", accession
    ds.Modality = modality
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.StudyDescription = f"Study {study_no}"
    ds.SeriesDescription = f"Series {series_no}"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = name, patient_id, "19600101", "O"
    ds.StudyInstanceUID = f"{ROOT}1.{study_no}"
    ds.SeriesInstanceUID = f"{ROOT}2.{study_no}.{series_no}"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(study_no), series_no, number
    if modality != "SR":
        pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * (number + 1)).astype(np.uint16)
        ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
        if transfer_syntax == RLELossless:
            ds.compress(RLELossless, generate_instance_uid=False)
    return ds


JOHN, JANE, JUERGEN = ("Doe^John", "PID1"), ("DOE^JANE", "PID2"), ("Müller^Jürgen", "PID3")
STUDY1, STUDY2, STUDY3, STUDY4 = (
    (1, "20240105", "A1"),
    (2, "20230310", "A2"),
    (3, "20220621", "A3"),
    (4, "20200902", "A4"),
)


def hand_built() -> list[Dataset]:
    """4 studies, 3 patients; study 1 mixes CT and an RLE-compressed PT series."""
    return [
        *(_instance(JOHN, STUDY1, (1, "CT", CT), n) for n in range(1, 4)),
        *(_instance(JOHN, STUDY1, (2, "PT", PT), n, transfer_syntax=RLELossless) for n in range(1, 3)),
        _instance(JOHN, STUDY2, (1, "MR", MR), 1),
        *(_instance(JANE, STUDY3, (1, "CT", CT), n) for n in range(1, 3)),
        _instance(JUERGEN, STUDY4, (1, "SR", SR), 1, charset="ISO_IR 100"),
    ]


def uid(kind: int, *parts: int) -> str:
    return ROOT + ".".join(str(p) for p in (kind, *parts))


@pytest.fixture(scope="module")
def pacs() -> Iterator[DemoPacs]:
    with DemoPacs(hand_built()) as server:
        yield server


@contextmanager
def associate(
    server: DemoPacs, *abstract_syntaxes: str, storage: bool = False, handlers: list[Any] | None = None
) -> Iterator[Association]:
    """An association to ``server``; with ``storage`` also the C-GET storage contexts and SCP roles."""
    ae = AE(ae_title="TESTSCU")
    for syntax in abstract_syntaxes:
        ae.add_requested_context(syntax)
    roles: list[Any] = []
    if storage:
        for sop_class in (CT, MR, PT, SR):
            # One context per compressed syntax: the acceptor picks ONE syntax per context, so a single
            # [Explicit, Implicit, RLE] context would leave no way to receive an RLE instance unchanged.
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            ae.add_requested_context(sop_class, RLELossless)
            roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate(
        "127.0.0.1", server.port, ae_title=server.ae_title, ext_neg=roles, evt_handlers=handlers
    )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def query(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def find(
    server: DemoPacs, identifier: Dataset, model: str = STUDY_ROOT_FIND
) -> tuple[list[int], list[Dataset]]:
    """(every status, the pending identifiers) of one C-FIND."""
    statuses, results = [], []
    with associate(server, model) as assoc:
        assert assoc.is_established
        for status, ds in assoc.send_c_find(identifier, model):
            statuses.append(int(status.Status))
            if ds is not None and status.Status in (0xFF00, 0xFF01):
                results.append(ds)
    return statuses, results


def study_query(**keys: Any) -> Dataset:
    base = {
        "StudyInstanceUID": "",
        "PatientName": "",
        "ModalitiesInStudy": "",
        "NumberOfStudyRelatedSeries": None,
        "NumberOfStudyRelatedInstances": None,
    }
    return query("STUDY", **(base | keys))


def values(ds: Dataset, keyword: str) -> list[Any]:
    value = ds[keyword].value
    return list(value) if ds[keyword].VM > 1 else [value]


def studies(results: list[Dataset]) -> list[str]:
    return [str(ds.StudyInstanceUID) for ds in results]


# --- verification, counters ---------------------------------------------------------------------------


def test_echo_and_counters() -> None:
    with DemoPacs() as server:
        assert server.port > 0
        with associate(server, VERIFICATION) as assoc:
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_echo().Status == 0x0000
        assert server.counters["associations"] == 1
        assert server.counters["echo"] == 2


# --- C-FIND --------------------------------------------------------------------------------------------


def test_find_study_level_with_computed_keys(pacs: DemoPacs) -> None:
    statuses, results = find(pacs, study_query())
    assert statuses == [0xFF00] * 4 + [0x0000]
    by_uid = {str(ds.StudyInstanceUID): ds for ds in results}
    s1 = by_uid[uid(1, 1)]
    assert values(s1, "ModalitiesInStudy") == ["CT", "PT"]
    assert (s1.NumberOfStudyRelatedSeries, s1.NumberOfStudyRelatedInstances) == (2, 5)
    assert s1.QueryRetrieveLevel == "STUDY"
    assert by_uid[uid(1, 2)].ModalitiesInStudy == "MR"
    assert by_uid[uid(1, 4)].PatientName == "Müller^Jürgen"
    assert by_uid[uid(1, 4)].SpecificCharacterSet == "ISO_IR 100"


def test_find_returns_only_requested_keys_of_the_level(pacs: DemoPacs) -> None:
    _, results = find(
        pacs, query("STUDY", StudyInstanceUID=uid(1, 1), SOPInstanceUID="", Modality="", StudyDate="")
    )
    assert len(results) == 1
    assert "SOPInstanceUID" not in results[0] and "Modality" not in results[0]  # lower-level keys
    assert results[0].StudyDate == "20240105"
    assert "AccessionNumber" not in results[0]  # not requested


def test_find_series_level_is_hierarchical(pacs: DemoPacs) -> None:
    statuses, results = find(pacs, query("SERIES", SeriesInstanceUID="", Modality=""))
    assert statuses == [0xA900]
    _, results = find(
        pacs,
        query(
            "SERIES",
            StudyInstanceUID=uid(1, 1),
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        ),
    )
    assert [(ds.Modality, ds.NumberOfSeriesRelatedInstances) for ds in results] == [("CT", 3), ("PT", 2)]


def test_find_image_level(pacs: DemoPacs) -> None:
    keys = {"SOPInstanceUID": "", "InstanceNumber": "", "AvailableTransferSyntaxUID": ""}
    statuses, _ = find(pacs, query("IMAGE", StudyInstanceUID=uid(1, 1), **keys))
    assert statuses == [0xA900]  # no SeriesInstanceUID
    _, results = find(
        pacs, query("IMAGE", StudyInstanceUID=uid(1, 1), SeriesInstanceUID=uid(2, 1, 2), **keys)
    )
    assert [ds.SOPInstanceUID for ds in results] == [uid(3, 1, 2, 1), uid(3, 1, 2, 2)]
    assert {ds.AvailableTransferSyntaxUID for ds in results} == {RLELossless}


def test_find_patient_root_patient_level(pacs: DemoPacs) -> None:
    identifier = query(
        "PATIENT",
        PatientID="",
        PatientName="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    _, results = find(pacs, identifier, PATIENT_ROOT_FIND)
    counts = {
        ds.PatientID: (
            ds.NumberOfPatientRelatedStudies,
            ds.NumberOfPatientRelatedSeries,
            ds.NumberOfPatientRelatedInstances,
        )
        for ds in results
    }
    assert counts == {"PID1": (2, 3, 6), "PID2": (1, 1, 2), "PID3": (1, 1, 1)}
    statuses, _ = find(pacs, query("PATIENT", PatientID=""), STUDY_ROOT_FIND)
    assert statuses == [0xA900]  # no PATIENT level in Study Root
    statuses, _ = find(pacs, query("STUDY", StudyInstanceUID=""), PATIENT_ROOT_FIND)
    assert statuses == [0xA900]  # Patient Root STUDY level needs PatientID
    _, results = find(pacs, query("STUDY", PatientID="PID1", StudyInstanceUID=""), PATIENT_ROOT_FIND)
    assert studies(results) == [uid(1, 1), uid(1, 2)]


def test_find_pn_wildcard_is_case_insensitive_by_default(pacs: DemoPacs) -> None:
    _, results = find(pacs, study_query(PatientName="doe*"))
    assert studies(results) == [uid(1, 1), uid(1, 2), uid(1, 3)]
    _, results = find(pacs, study_query(PatientName="DOE^JOHN"))
    assert studies(results) == [uid(1, 1), uid(1, 2)]
    _, results = find(pacs, study_query(PatientName="müller*"))
    assert [str(ds.PatientName) for ds in results] == ["Müller^Jürgen"]


def test_find_pn_case_sensitive_pacs() -> None:
    with DemoPacs(hand_built(), case_sensitive_pn=True) as server:
        _, results = find(server, study_query(PatientName="Doe*"))
        assert studies(results) == [uid(1, 1), uid(1, 2)]
        _, results = find(server, study_query(PatientName="doe*"))
        assert results == []


def test_find_other_matching_types(pacs: DemoPacs) -> None:
    _, results = find(pacs, study_query(StudyDate="20230101-20231231"))
    assert studies(results) == [uid(1, 2)]
    _, results = find(pacs, study_query(StudyDate="-20221231"))
    assert studies(results) == [uid(1, 3), uid(1, 4)]
    _, results = find(pacs, study_query(StudyInstanceUID=f"{uid(1, 2)}\\{uid(1, 4)}"))
    assert studies(results) == [uid(1, 2), uid(1, 4)]
    _, results = find(pacs, study_query(AccessionNumber="a1"))
    assert results == []  # case-sensitive outside PN


def test_find_modalities_in_study(pacs: DemoPacs) -> None:
    _, results = find(pacs, study_query(ModalitiesInStudy="PT"))
    assert studies(results) == [uid(1, 1)]
    _, results = find(pacs, study_query(ModalitiesInStudy="MR\\PT"))
    assert studies(results) == [uid(1, 1), uid(1, 2)]
    with DemoPacs(hand_built(), honour_modalities_in_study=False) as server:
        _, results = find(server, study_query(ModalitiesInStudy="PT"))
        assert len(results) == 4
        assert values(results[0], "ModalitiesInStudy") == ["CT", "PT"]


def test_find_without_counts_answers_ff01_and_omits_them() -> None:
    with DemoPacs(hand_built(), return_counts=False) as server:
        statuses, results = find(server, study_query(ModalitiesInStudy="MR"))
        assert statuses == [0xFF01, 0x0000]
        assert studies(results) == [uid(1, 2)]
        for keyword in ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"):
            assert keyword not in results[0]
        statuses, _ = find(server, query("STUDY", StudyInstanceUID=""))
        assert set(statuses) == {0xFF00, 0x0000}


def test_received_identifiers_record_what_the_peer_sent() -> None:
    with DemoPacs(hand_built()) as server:
        find(server, study_query(PatientName="doe*"))
        assert len(server.received_identifiers) == 1
        received = server.received_identifiers[0]
        assert received.PatientName == "doe*"
        assert received.QueryRetrieveLevel == "STUDY"
        assert server.counters["find"] == 1


def test_find_delay_and_cancel() -> None:
    with DemoPacs(hand_built(), find_delay=0.2) as server:
        start = time.monotonic()
        find(server, study_query(StudyInstanceUID=uid(1, 1)))
        assert time.monotonic() - start >= 0.4  # one match plus the final response

        statuses = []
        with associate(server, STUDY_ROOT_FIND) as assoc:
            context_id = next(
                cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == STUDY_ROOT_FIND
            )
            for status, _ in assoc.send_c_find(study_query(), STUDY_ROOT_FIND, msg_id=7):
                statuses.append(int(status.Status))
                if status.Status == 0xFF00:
                    assoc.send_c_cancel(7, context_id)
        assert statuses == [0xFF00, 0xFE00]
        assert server.counters["cancel"] == 1


@pytest.mark.parametrize("status", [0xC001, 0xA700])
def test_fail_status_on_find_get_and_move(status: int) -> None:
    with DemoPacs(hand_built(), fail_status=status, move_destinations={"SELF": ("127.0.0.1", 1)}) as server:
        server.move_destinations["SELF"] = ("127.0.0.1", server.port)
        statuses, _ = find(server, study_query())
        assert statuses == [status]
        retrieve = query("STUDY", StudyInstanceUID=uid(1, 1))
        with associate(server, STUDY_ROOT_GET, STUDY_ROOT_MOVE, storage=True) as assoc:
            assert [int(s.Status) for s, _ in assoc.send_c_get(retrieve, STUDY_ROOT_GET)] == [status]
            assert [int(s.Status) for s, _ in assoc.send_c_move(retrieve, "SELF", STUDY_ROOT_MOVE)] == [
                status
            ]
        assert (server.counters["find"], server.counters["get"], server.counters["move"]) == (1, 1, 1)


def test_patient_root_only_refuses_study_root() -> None:
    with DemoPacs(hand_built(), patient_root_only=True) as server:
        with associate(server, STUDY_ROOT_FIND, PATIENT_ROOT_FIND) as assoc:
            assert assoc.is_established
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
            assert (accepted, rejected) == ({PATIENT_ROOT_FIND}, {STUDY_ROOT_FIND})
            with pytest.raises(ValueError):
                next(assoc.send_c_find(study_query(), STUDY_ROOT_FIND))
            identifier = query("STUDY", PatientID="PID2", StudyInstanceUID="")
            results = [
                ds for s, ds in assoc.send_c_find(identifier, PATIENT_ROOT_FIND) if ds and s.Status == 0xFF00
            ]
            assert studies(results) == [uid(1, 3)]
        with associate(server, STUDY_ROOT_FIND) as assoc:
            assert not assoc.is_established


# --- C-GET ---------------------------------------------------------------------------------------------


class Received:
    """A storage SCP handler recording what arrived, with the transfer syntax it arrived in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: dict[str, tuple[str, bytes]] = {}  # SOP Instance UID -> (transfer syntax, dataset bytes)
        self.datasets: dict[str, Dataset] = {}

    def __call__(self, event: evt.Event) -> int:
        ds = event.dataset
        with self.lock:
            self.items[ds.SOPInstanceUID] = (event.context.transfer_syntax, event.encoded_dataset(False))
            self.datasets[ds.SOPInstanceUID] = ds
        return 0x0000


def test_get_series_preserves_transfer_syntax(pacs: DemoPacs) -> None:
    received = Received()
    before = pacs.counters["sent"]
    identifier = query("SERIES", StudyInstanceUID=uid(1, 1), SeriesInstanceUID=uid(2, 1, 2))
    with associate(pacs, STUDY_ROOT_GET, storage=True, handlers=[(evt.EVT_C_STORE, received)]) as assoc:
        responses = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))
    final = responses[-1][0]
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 0)
    assert set(received.items) == {uid(3, 1, 2, 1), uid(3, 1, 2, 2)}
    for sop_uid, (transfer_syntax, _) in received.items.items():
        assert transfer_syntax == RLELossless
        original = pacs.get(sop_uid)
        assert original is not None
        assert received.datasets[sop_uid].PixelData == original.PixelData  # encapsulated frames, unchanged
    assert pacs.counters["sent"] - before == 2


def test_get_study_uid_list_and_requires_unique_keys(pacs: DemoPacs) -> None:
    received = Received()
    with associate(pacs, STUDY_ROOT_GET, storage=True, handlers=[(evt.EVT_C_STORE, received)]) as assoc:
        identifier = query("STUDY", StudyInstanceUID=f"{uid(1, 2)}\\{uid(1, 3)}")
        final = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))[-1][0]
        assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 3)
        bad = query("SERIES", SeriesInstanceUID=uid(2, 1, 1))
        assert [int(s.Status) for s, _ in assoc.send_c_get(bad, STUDY_ROOT_GET)] == [0xA900]
    assert len(received.items) == 3


def test_get_without_matching_storage_context_fails_the_suboperation(pacs: DemoPacs) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(PT, ExplicitVRLittleEndian)  # no RLE: no transcoding in the demo PACS
    assoc = ae.associate("127.0.0.1", pacs.port, ext_neg=[build_role(PT, scp_role=True)])
    try:
        identifier = query("SERIES", StudyInstanceUID=uid(1, 1), SeriesInstanceUID=uid(2, 1, 2))
        final = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))[-1][0]
        assert (final.Status, final.NumberOfFailedSuboperations) == (0xA702, 2)
    finally:
        assoc.release()


def test_get_from_files_sends_the_stored_bytes(tmp_path: Path) -> None:
    paths = []
    for ds in hand_built()[3:5]:  # the RLE PT series
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    received = Received()
    with DemoPacs(files=paths) as server:
        identifier = query("IMAGE", StudyInstanceUID=uid(1, 1), SeriesInstanceUID=uid(2, 1, 2))
        identifier.SOPInstanceUID = uid(3, 1, 2, 1)
        with associate(
            server, PATIENT_ROOT_GET, storage=True, handlers=[(evt.EVT_C_STORE, received)]
        ) as assoc:
            identifier.PatientID = "PID1"
            final = list(assoc.send_c_get(identifier, PATIENT_ROOT_GET))[-1][0]
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 1)
    transfer_syntax, body = received.items[uid(3, 1, 2, 1)]
    assert transfer_syntax == RLELossless
    on_disk = paths[0].read_bytes()
    assert on_disk.endswith(body)  # the dataset part of the file, byte for byte


# --- C-MOVE --------------------------------------------------------------------------------------------


@contextmanager
def storage_scp(ae_title: str = "STORESCP") -> Iterator[tuple[int, Received]]:
    received = Received()
    ae = AE(ae_title=ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, received)])
    assert server is not None
    try:
        yield int(server.server_address[1]), received
    finally:
        ae.shutdown()


def test_move_study_to_a_storage_scp() -> None:
    with storage_scp() as (port, received):
        with DemoPacs(hand_built(), move_destinations={"STORESCP": ("127.0.0.1", port)}) as server:
            identifier = query("STUDY", StudyInstanceUID=uid(1, 1))
            with associate(server, STUDY_ROOT_MOVE) as assoc:
                responses = list(assoc.send_c_move(identifier, "STORESCP", STUDY_ROOT_MOVE))
                final = responses[-1][0]
                assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 5)
                unknown = list(assoc.send_c_move(identifier, "NOWHERE", STUDY_ROOT_MOVE))
                assert [int(s.Status) for s, _ in unknown] == [0xA801]
            assert server.counters["move"] == 2
            assert server.counters["sent"] == 5
    assert len(received.items) == 5
    syntaxes = {received.items[uid(3, 1, s, n)][0] for s, n in ((2, 1), (2, 2))}
    assert syntaxes == {RLELossless}  # compressed instances keep their encoding
    assert received.items[uid(3, 1, 1, 1)][0] in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# --- C-STORE -------------------------------------------------------------------------------------------


def test_store_then_find() -> None:
    with DemoPacs() as server:
        ds = _instance(JANE, (9, "20250101", "A9"), (1, "CT", CT), 1)
        ds.SOPInstanceUID = generate_uid()
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CT, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", server.port)
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        assert server.counters["store"] == 1
        assert server.sop_instance_uids() == [ds.SOPInstanceUID]
        stored = server.get(ds.SOPInstanceUID)
        assert stored is not None and stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        _, results = find(server, study_query())
        assert studies(results) == [uid(1, 9)]
        assert results[0].NumberOfStudyRelatedInstances == 1


# --- the shared demo data set -------------------------------------------------------------------------


def test_demo_data_counts_match_the_generator() -> None:
    demo_data = pytest.importorskip("gateway.demo_data")
    datasets = demo_data.generate_demo_datasets()
    expected: dict[str, tuple[set[str], int, set[str]]] = {}
    for ds in datasets:
        series, count, modalities = expected.get(ds.StudyInstanceUID, (set(), 0, set()))
        expected[ds.StudyInstanceUID] = (
            series | {ds.SeriesInstanceUID},
            count + 1,
            modalities | {ds.Modality},
        )
    with DemoPacs(datasets) as server:
        statuses, results = find(server, study_query())
    assert statuses[-1] == 0x0000
    got = {
        ds.StudyInstanceUID: (
            ds.NumberOfStudyRelatedSeries,
            ds.NumberOfStudyRelatedInstances,
            set(values(ds, "ModalitiesInStudy")),
        )
        for ds in results
    }
    assert got == {k: (len(series), n, mods) for k, (series, n, mods) in expected.items()}


def test_no_patient_identifiers_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        with DemoPacs(hand_built()) as server:
            _, results = find(server, study_query(PatientName="doe*", PatientID=""))
            assert len(results) == 3
            with associate(
                server, STUDY_ROOT_GET, storage=True, handlers=[(evt.EVT_C_STORE, Received())]
            ) as assoc:
                list(assoc.send_c_get(query("STUDY", StudyInstanceUID=uid(1, 2)), STUDY_ROOT_GET))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("C-FIND STUDY" in m for m in messages)
    for phi in ("doe", "Doe^John", "DOE^JANE", "PID1", "PID2"):
        assert not any(phi in m for m in messages), phi


def test_get_cancel_stops_the_suboperations() -> None:
    with DemoPacs(hand_built()) as server:
        received = Received()
        state: dict[str, Any] = {}

        def cancel_after_first(event: evt.Event) -> int:
            status = received(event)
            if len(received.items) == 1:
                state["assoc"].send_c_cancel(11, state["context_id"])
            return status

        with associate(
            server, STUDY_ROOT_GET, storage=True, handlers=[(evt.EVT_C_STORE, cancel_after_first)]
        ) as assoc:
            state["assoc"] = assoc
            state["context_id"] = next(
                cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == STUDY_ROOT_GET
            )
            identifier = query("STUDY", StudyInstanceUID=uid(1, 1))
            final = list(assoc.send_c_get(identifier, STUDY_ROOT_GET, msg_id=11))[-1][0]
        assert final.Status == 0xFE00
        assert final.NumberOfCompletedSuboperations == 1
        assert final.NumberOfRemainingSuboperations == 4
        assert server.counters["cancel"] == 1
        assert server.counters["sent"] == 1
