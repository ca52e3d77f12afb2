"""SOP classes on a cold C-GET without asking the manifest for them (docs/architecture.md, "Retrieval").

The manifest (gateway.retrieval.locating) asks only the IMAGE level's required and unique keys: a
PACS such as Orthanc reads every instance's file to answer SOPClassUID. A C-GET needs the classes for
its storage contexts only when its first proposal (common classes, gateway.retrieval.fetching
BLIND_CLASSES) could not bring an instance: then one C-FIND naming exactly those instances asks for
their classes, and they are retrieved with them. A PACS that never answers SOPClassUID (dcmqrscp)
gets the common storage classes instead.

Seen from an in-process pynetdicom SCP (DemoPacs) that records every identifier it receives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.dimse.demo_pacs import DemoPacs
from gateway.retrieval.fetching import BLIND_CLASSES
from gateway.settings import settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.server import running_gateway

from .ownership_support import instance_ds

ANY_TS = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"   # a common storage class, not among BLIND_CLASSES


class NoClassPacs(DemoPacs):
    """A PACS that never returns SOPClassUID in a C-FIND answer, even when asked (as dcmqrscp)."""

    def _on_find(self, event):  # type: ignore[no-untyped-def]
        for status, answer in super()._on_find(event):
            if answer is not None and "SOPClassUID" in answer:
                del answer.SOPClassUID
            yield status, answer


class NoClassLookupPacs(DemoPacs):
    """A PACS that fails (0xC000) every C-FIND asking for SOPClassUID."""

    def _on_find(self, event):  # type: ignore[no-untyped-def]
        if "SOPClassUID" in event.identifier:
            self._received("find", event)
            yield 0xC000, None
            return
        yield from super()._on_find(event)


def series_of(sop_class: str, count: int) -> tuple[str, str, list[Dataset]]:
    study, series = generate_uid(), generate_uid()
    datasets = []
    for n in range(1, count + 1):
        ds = instance_ds(study, series, generate_uid(), number=n, series_number=1, patient_name="CLASS^TEST",
                         description="classes", value=n, patient_id="CLS-1")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        datasets.append(ds)
    return study, series, datasets


@contextmanager
def gateway_for(pacs: DemoPacs, tmp_path: Any) -> Iterator[str]:
    cfg = {"spool": {"path": str(tmp_path / "spool")},
           "nodes": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port,
                      "retrieve": "get"}],
           # A PACS profile queries the PACS at first contact; these tests count what retrievals ask.
           "profiling": {"enabled": False}}
    with running_gateway(settings_from_dict(cfg)) as url:
        yield url


def class_lookups(pacs: DemoPacs, study: str) -> list[Dataset]:
    """The C-FINDs naming the study that asked for SOPClassUID."""
    return [i for i in list(pacs.received_identifiers)
            if str(i.get("StudyInstanceUID", "")) == study and "SOPClassUID" in i]


def sops_in(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return sorted(str(dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
                  for _, body in parse_multipart(r.content, r.headers["content-type"]))


def retrieved_sops(url: str, study: str, series: str) -> list[str]:
    return sops_in(httpx.get(f"{url}/dicom-web/studies/{study}/series/{series}", headers=ANY_TS, timeout=60))


def named_sops(identifier: Dataset) -> list[str]:
    """The SOPInstanceUID key's values (one UID, or a UID list)."""
    value = identifier.SOPInstanceUID
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def retrieves(pacs: DemoPacs, study: str) -> list[Dataset]:
    return [i for i in list(pacs.received_retrieve_identifiers) if str(i.get("StudyInstanceUID", "")) == study]


def test_blind_classes_are_common_image_classes_and_leave_out_enhanced_ct():
    # The premise of the tests below: CT is proposed before any class is known, Enhanced CT is not.
    assert CT_IMAGE in BLIND_CLASSES and ENHANCED_CT not in BLIND_CLASSES


def test_a_ct_series_is_retrieved_without_any_c_find_asking_for_sop_classes(tmp_path):
    study, series, datasets = series_of(CT_IMAGE, 6)
    with DemoPacs(datasets, ae_title="CLASSCT") as pacs, gateway_for(pacs, tmp_path) as url:
        assert retrieved_sops(url, study, series) == sorted(str(d.SOPInstanceUID) for d in datasets)
        manifests = [i for i in list(pacs.received_identifiers)
                     if str(i.get("QueryRetrieveLevel", "")) == "IMAGE" and str(i.StudyInstanceUID) == study]
        assert manifests, "the manifest C-FIND reached the PACS"
        assert all("SOPInstanceUID" in m and "InstanceNumber" in m for m in manifests)
        assert class_lookups(pacs, study) == []
        assert [str(a.QueryRetrieveLevel) for a in retrieves(pacs, study)] == ["SERIES"]


def test_instances_of_a_class_the_first_c_get_did_not_propose_are_looked_up_and_retrieved(tmp_path):
    study, series, datasets = series_of(ENHANCED_CT, 5)
    sops = sorted(str(d.SOPInstanceUID) for d in datasets)
    with DemoPacs(datasets, ae_title="CLASSENH") as pacs, gateway_for(pacs, tmp_path) as url:
        assert retrieved_sops(url, study, series) == sops
        lookups = class_lookups(pacs, study)
        assert len(lookups) == 1, "one C-FIND for the classes of what the first C-GET could not bring"
        assert sorted(named_sops(lookups[0])) == sops      # UID list matching: exactly those
        assert str(lookups[0].SeriesInstanceUID) == series
        # The blind C-GET, then one with the looked-up class (the series again: nothing had come).
        assert len(retrieves(pacs, study)) == 2
        # Served again from the spool: no more lookups, no more retrieves.
        assert retrieved_sops(url, study, series) == sops
        assert len(class_lookups(pacs, study)) == 1 and len(retrieves(pacs, study)) == 2


def test_a_partly_spooled_series_of_an_unproposed_class_is_completed(tmp_path):
    # One instance spooled first: the series' retrieve then lists the manifest before retrieving
    # the rest (gateway.retrieval.fetching: _from_pacs), still without asking for classes up front.
    study, series, datasets = series_of(ENHANCED_CT, 4)
    sops = sorted(str(d.SOPInstanceUID) for d in datasets)
    first = str(datasets[0].SOPInstanceUID)
    with DemoPacs(datasets, ae_title="CLASSPART") as pacs, gateway_for(pacs, tmp_path) as url:
        assert sops_in(httpx.get(f"{url}/dicom-web/studies/{study}/series/{series}/instances/{first}",
                                 headers=ANY_TS, timeout=60)) == [first]
        before = len(class_lookups(pacs, study))   # the instance's own, its C-GET had to learn it
        assert retrieved_sops(url, study, series) == sops
        later = class_lookups(pacs, study)[before:]
        assert len(later) == 1 and sorted(named_sops(later[0])) == sorted(set(sops) - {first}), \
            "one lookup, for the instances not spooled"


def test_a_pacs_that_never_names_classes_gets_the_common_storage_classes(tmp_path):
    study, series, datasets = series_of(ENHANCED_CT, 4)
    with NoClassPacs(datasets, ae_title="NOCLASS") as pacs, gateway_for(pacs, tmp_path) as url:
        assert retrieved_sops(url, study, series) == sorted(str(d.SOPInstanceUID) for d in datasets)
        assert len(class_lookups(pacs, study)) == 1, "asked once; not again for every retry"


def test_a_failed_class_lookup_falls_back_to_the_common_storage_classes(tmp_path):
    study, series, datasets = series_of(ENHANCED_CT, 3)
    with NoClassLookupPacs(datasets, ae_title="NOLOOKUP") as pacs, gateway_for(pacs, tmp_path) as url:
        assert retrieved_sops(url, study, series) == sorted(str(d.SOPInstanceUID) for d in datasets)
        assert len(class_lookups(pacs, study)) == 1, "tried once, then the common classes"


@pytest.mark.parametrize("cls", [CT_IMAGE, ENHANCED_CT])
def test_an_instance_the_pacs_leaves_out_costs_one_class_lookup_then_the_stream_aborts(tmp_path, cls):
    study, series, datasets = series_of(cls, 4)
    left_out = str(datasets[2].SOPInstanceUID)

    class LeavesOut(DemoPacs):
        def _select(self, identifier, level):  # type: ignore[no-untyped-def]
            return [i for i in super()._select(identifier, level) if str(i.dataset.SOPInstanceUID) != left_out]

    with LeavesOut(datasets, ae_title="LEAVESOUT2") as pacs, gateway_for(pacs, tmp_path) as url:
        with httpx.stream("GET", f"{url}/dicom-web/studies/{study}/series/{series}", headers=ANY_TS,
                          timeout=60) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in r.iter_raw():
                    pass
        lookups = class_lookups(pacs, study)
        # Looked up: the left-out instance (and, for the class the first C-GET did not propose, the
        # rest that it could not bring); never once per retry.
        assert len(lookups) == 1 and left_out in named_sops(lookups[0])
