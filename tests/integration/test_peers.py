"""The real peers answer as the reference notes describe (checked with pynetdicom directly)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from gateway.demo_data import DEMO_STUDIES

from .peers import DcmqrscpPeer, OrthancPeer, redis_ping

pytestmark = pytest.mark.integration

Peer = OrthancPeer | DcmqrscpPeer


@pytest.fixture(params=["orthanc", "dcmqrscp"])
def peer(request: pytest.FixtureRequest) -> Peer:
    peer: Peer = request.getfixturevalue(request.param)
    return peer


@contextmanager
def associate(peer: Peer) -> Iterator[Association]:
    ae = AE(ae_title="PEERTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(peer.host, peer.dicom_port, ae_title=peer.ae_title, max_pdu=131072)
    assert assoc.is_established, f"association with {peer} failed"
    try:
        yield assoc
    finally:
        assoc.release()


def find_studies(peer: Peer, **keys: str) -> list[Dataset]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientName = ""
    query.StudyDate = ""
    query.NumberOfStudyRelatedInstances = ""
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    results = []
    with associate(peer) as assoc:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            assert status, "C-FIND timed out or was aborted"
            if status.Status in (0xFF00, 0xFF01):
                assert identifier is not None
                results.append(identifier)
            else:
                assert status.Status == 0x0000, f"C-FIND failed: 0x{status.Status:04X}"
    return results


def test_echo(peer: Peer) -> None:
    with associate(peer) as assoc:
        status = assoc.send_c_echo()
    assert status.Status == 0x0000


def test_study_level_find_returns_every_demo_study(peer: Peer) -> None:
    results = find_studies(peer)
    assert sorted(r.StudyInstanceUID for r in results) == sorted(s["study_uid"] for s in DEMO_STUDIES)


def test_number_of_study_related_instances_orthanc_returns_dcmqrscp_omits(
    orthanc: OrthancPeer, dcmqrscp: DcmqrscpPeer
) -> None:
    expected = {s["study_uid"]: s["num_instances"] for s in DEMO_STUDIES}
    from_orthanc = {r.StudyInstanceUID: int(r.NumberOfStudyRelatedInstances) for r in find_studies(orthanc)}
    assert from_orthanc == expected
    assert all("NumberOfStudyRelatedInstances" not in r for r in find_studies(dcmqrscp))


def test_pn_matching_is_case_insensitive_on_orthanc_only(
    orthanc: OrthancPeer, dcmqrscp: DcmqrscpPeer
) -> None:
    assert sorted(str(r.PatientName) for r in find_studies(orthanc, PatientName="doe*")) == [
        "DOE^JANE",
        "Doe^John",
        "Doe^John",
    ]
    assert [str(r.PatientName) for r in find_studies(dcmqrscp, PatientName="DOE*")] == ["DOE^JANE"]


def test_orthanc_serves_dicomweb(orthanc: OrthancPeer) -> None:
    status, body = orthanc.request("GET", "/dicom-web/studies?PatientID=DGW0003")
    assert status == 200
    assert body.count(b'"0020000D"') == 2


def test_redis_answers(redis_url: str) -> None:
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    assert redis_ping(host, int(port))
