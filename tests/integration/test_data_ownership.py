"""Data ownership across nodes and replicas: what a node holds is served for that node only, and only
under its own study; a node that is down says so even when another node's copy of the same UIDs is
at hand.

Real peers of this module's own (the session's are shared with other tests): an Orthanc (node "a")
and a dcmqrscp (node "b"), loaded with *twin* instances, same Study/Series/SOP Instance UIDs but
different content (PatientName, SeriesDescription, pixel values). The fixture checks with its own
C-GET on each PACS that the two really serve different objects before any gateway is involved.
Gateways run in-thread under uvicorn (``running_gateway``), share the session's Redis under a random
prefix (deleted afterwards) and, when two replicas run, the cluster (internal port + shared secret).

The freshness-after-STOW and eviction tests are in ``test_data_freshness.py``; both files build
their data with ``ownership_support.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .ownership_support import (
    SINGLE,
    Twins,
    dead_node,
    instance_ds,
    node_cfg,
    pacs_c_get,
    parse_parts,
    redis_prefix,
    replicas,
    whose_dataset,
    write_files,
)
from .peers import DcmqrscpPeer, OrthancPeer

pytestmark = pytest.mark.integration

FRAMES_ANY = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
SERIES_ANY = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


# ----------------------------------------------------------------------------- peers and data


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twins]:
    """Orthanc "a" and dcmqrscp "b" holding the same UIDs with different content (checked by C-GET)."""
    root = tmp_path_factory.mktemp("twins")
    study = generate_uid()
    series = [generate_uid(), generate_uid()]
    sops = {s: [generate_uid() for _ in range(3)] for s in series}
    expected: dict[str, dict[str, Dataset]] = {"a": {}, "b": {}}
    for node, base in (("a", 1000), ("b", 30000)):
        for k, s in enumerate(series):
            for n, sop in enumerate(sops[s], start=1):
                expected[node][sop] = instance_ds(
                    study, s, sop, number=n, series_number=k + 1, patient_name=f"Twin^{node.upper()}",
                    description=f"TWIN-{node.upper()}", value=base + 100 * k + n, patient_id="OWN0001")
    # A second study on node a's PACS, for "a valid UID of a study that exists, but not this one".
    other_study = generate_uid()
    other = [instance_ds(other_study, generate_uid(), generate_uid(), number=1, series_number=1,
                         patient_name="Other^Study", description="OTHER", value=7, patient_id="OWN0002")]
    files_a = write_files(root / "a", list(expected["a"].values()) + other)
    files_b = write_files(root / "b", list(expected["b"].values()))
    with OrthancPeer(root / "orthanc", ae_title="OWNERA") as orthanc, \
            DcmqrscpPeer(root / "dcmqrscp", ae_title="OWNERB") as dcmqrscp:
        orthanc.load(files_a)
        dcmqrscp.load(files_b)
        twins = Twins(orthanc, dcmqrscp, study, series, sops, expected, other_study)
        # The setup itself: each PACS serves its own object under the shared UIDs (direct C-GET).
        for node, peer in (("a", orthanc), ("b", dcmqrscp)):
            for s in series:
                got = pacs_c_get(peer.dicom_port, peer.ae_title, study, s)
                assert set(got) == set(sops[s]), f"{peer} serves {sorted(got)} for series {s}"
                for sop, ds in got.items():
                    assert whose_dataset(ds, twins) == node, f"{peer} serves the wrong copy of {sop}"
                    assert ds.PixelData == twins.expected[node][sop].PixelData
        assert twins.expected["a"][sops[series[0]][0]].PixelData != \
            twins.expected["b"][sops[series[0]][0]].PixelData
        yield twins


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    yield from redis_prefix(redis_url)


# ----------------------------------------------------------------------------- requests and checks


def request(client: httpx.Client, root: str, node: str, study: str, series: str, resource: str,
            sop: str) -> httpx.Response:
    base = f"{root}/nodes/{node}/dicom-web/studies/{study}/series/{series}"
    if resource == "instance":
        return client.get(f"{base}/instances/{sop}", headers=SINGLE)
    if resource == "metadata":
        return client.get(f"{base}/metadata")
    if resource == "frames":
        return client.get(f"{base}/instances/{sop}/frames/1", headers=FRAMES_ANY)
    if resource == "series":
        return client.get(base, headers=SERIES_ANY)
    raise AssertionError(resource)


def owner_of(r: httpx.Response, resource: str, twins: Twins, series: str, sop: str) -> str:
    """Whose copy the (200) response holds: "a", "b", or a description of what is wrong with it."""
    if resource == "instance":
        return whose_dataset(r.content, twins, sop)
    if resource == "frames":
        parts = parse_parts(r)
        if isinstance(parts, str):
            return parts
        if len(parts) != 1:
            return f"{len(parts)} parts for one frame"
        body = parts[0][1]
        for node in ("a", "b"):
            if body == twins.expected[node][sop].PixelData:
                return node
        return f"frame of {len(body)} bytes matching neither copy"
    if resource == "metadata":
        items = r.json()
        got_sops = sorted(i["00080018"]["Value"][0] for i in items)
        if got_sops != sorted(twins.sops[series]):
            return f"metadata lists {got_sops}"
        owners = {whose_dataset(i, twins) for i in items}
        return owners.pop() if len(owners) == 1 else f"metadata mixes {sorted(owners)}"
    if resource == "series":
        parts = parse_parts(r)
        if isinstance(parts, str):
            return parts
        owners = {whose_dataset(body, twins) for _, body in parts}
        if len(parts) != len(twins.sops[series]):
            return f"{len(parts)} parts for {len(twins.sops[series])} instances"
        return owners.pop() if len(owners) == 1 else f"series mixes {sorted(owners)}"
    raise AssertionError(resource)


def check_owned(client: httpx.Client, root: str, node: str, twins: Twins, series: str,
                resource: str) -> str | None:
    """None when ``/nodes/{node}`` answers with node's own copy; else what it answered."""
    sop = twins.sops[series][1]
    r = request(client, root, node, twins.study, series, resource, sop)
    if r.status_code != 200:
        return f"HTTP {r.status_code} {r.text[:200]!r}"
    owner = owner_of(r, resource, twins, series, sop)
    if owner != node:
        return f"served node {owner}'s copy" if owner in ("a", "b") else f"served {owner}"
    if resource == "metadata" and f"/nodes/{node}/dicom-web/" not in r.json()[0]["7FE00010"]["BulkDataURI"]:
        return "BulkDataURI does not point back at the node"
    return None


# ----------------------------------------------------------------------------- 1. same UIDs, two PACS

# (replica index, node) in the order the requests go, per twin series: one series starts with node
# a, the other with node b, so each node has a cold first request and one that comes after the
# other node's copy was fetched (spooled, metadata cached).
ORDERS = {
    1: [[(0, "a"), (0, "b")], [(0, "b"), (0, "a")]],
    2: [[(0, "a"), (1, "b"), (0, "b"), (1, "a")], [(1, "b"), (0, "a"), (1, "a"), (0, "b")]],
}


@pytest.mark.parametrize("count", [1, 2], ids=["one-replica", "two-replicas"])
def test_same_uids_on_two_nodes_each_node_serves_its_own_object(twins, redis_url, prefix, tmp_path, count):
    nodes = [node_cfg("a", twins.a), node_cfg("b", twins.b)]
    problems: list[str] = []
    with replicas(count, nodes, redis_url, prefix, tmp_path) as roots, httpx.Client(timeout=60) as client:
        for phase in ("cold", "warm"):
            for resource in ("instance", "metadata", "frames"):
                for k, series in enumerate(twins.series):
                    for replica, node in ORDERS[count][k]:
                        problem = check_owned(client, roots[replica], node, twins, series, resource)
                        if problem:
                            problems.append(f"{phase} {resource} of series #{k + 1} via /nodes/{node} on "
                                            f"replica {replica + 1}: {problem}")
    assert not problems, "a node answered with another node's object:\n" + "\n".join(problems)


@pytest.mark.parametrize("count", [1, 2], ids=["one-replica", "two-replicas"])
def test_down_node_is_502_even_with_the_other_nodes_copy_at_hand(twins, redis_url, prefix, tmp_path, count):
    nodes = [node_cfg("a", twins.a), dead_node("b")]
    series = twins.series[0]
    sop = twins.sops[series][1]
    problems: list[str] = []
    with replicas(count, nodes, redis_url, prefix, tmp_path) as roots, httpx.Client(timeout=60) as client:
        # Node a's copy: spooled on every replica, its metadata cached in the shared cache.
        for root in roots:
            for resource in ("instance", "metadata", "frames", "series"):
                assert check_owned(client, root, "a", twins, series, resource) is None, (root, resource)
        for i, root in enumerate(roots):
            for resource in ("metadata", "frames", "instance", "series"):
                r = request(client, root, "b", twins.study, series, resource, sop)
                where = f"{resource} via /nodes/b on replica {i + 1}"
                if r.status_code != 502:
                    got = owner_of(r, resource, twins, series, sop) if r.status_code == 200 else r.text[:200]
                    problems.append(f"{where}: HTTP {r.status_code} (content: {got})")
                elif not r.headers["content-type"].startswith("application/json") or r.json().get("node") != "b":
                    problems.append(f"{where}: 502 not naming node b: {r.text[:200]}")
    assert not problems, "node b is down, yet:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- 4. wrong study UID


@pytest.mark.parametrize("wrong", ["unknown-study", "other-existing-study"])
def test_right_series_under_a_wrong_study_is_404_cold_and_warm(twins, redis_url, prefix, tmp_path, wrong):
    series = twins.series[0]
    sop = twins.sops[series][1]
    wrong_study = generate_uid() if wrong == "unknown-study" else twins.other_study
    assert wrong_study != twins.study
    resources = ("metadata", "instance", "frames", "series")
    problems: list[str] = []
    with replicas(1, [node_cfg("a", twins.a)], redis_url, prefix, tmp_path) as (root,), \
            httpx.Client(timeout=60) as client:
        for phase in ("cold", "warm"):
            if phase == "warm":
                # The right URLs: the series is spooled, its manifest and metadata cached.
                for resource in resources:
                    assert check_owned(client, root, "a", twins, series, resource) is None, resource
            for resource in resources:
                r = request(client, root, "a", wrong_study, series, resource, sop)
                if r.status_code != 404:
                    what = r.text[:120] if r.status_code != 200 else \
                        f"node {owner_of(r, resource, twins, series, sop)}'s {resource} of the real study"
                    problems.append(f"{phase} {resource} under the wrong study: HTTP {r.status_code} ({what})")
    assert not problems, f"series {series} is not in study {wrong_study}, yet:\n" + "\n".join(problems)
