"""First bytes at once on a cold retrieve (docs/architecture.md, "Retrieval"), seen from the PACS.

An in-process pynetdicom SCP whose IMAGE-level C-FIND (the manifest) is held back until the test
releases it, while its C-GET/C-MOVE is fast. Orderings are asserted by the events the SCP records
(the test notes into the same log what its client saw), never by wall-clock thresholds:

* the first multipart part reaches the client while the manifest C-FIND is still held, and the
  stream ends (closing delimiter) only after the manifest answered;
* an instance the C-FIND lists but the C-GET/C-MOVE never delivers is retried twice by UID, then the
  stream ends without its closing delimiter;
* 40 concurrent frame requests on a cold series cause one retrieval, one locate and one manifest
  C-FIND at the PACS.

Each over C-GET and over C-MOVE.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from io import BytesIO
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import gateway.settings as gateway_settings
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.server import free_port, running_gateway

from .ownership_support import instance_ds

GATEWAY_AE = "DICOMWEBGW"
ANY_TS = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
ACCEPT_FRAME = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
HOLD_TIMEOUT = 20.0   # the manifest is answered anyway after this (a failing test must still end)


class ManifestHeldPacs(DemoPacs):
    """DemoPacs that records what it did, holds IMAGE-level C-FINDs until ``release`` is set, can be
    slow at STUDY level, and can leave instances out of every C-GET/C-MOVE (``omit``)."""

    def __init__(self, datasets: list[Dataset], **kw: Any) -> None:
        super().__init__(datasets, **kw)
        self.events: list[str] = []
        self.release = threading.Event()
        self.study_delay = 0.0
        self.omit: set[str] = set()
        self._events_lock = threading.Lock()

    def note(self, what: str) -> None:
        with self._events_lock:
            self.events.append(what)

    def _on_find(self, event):  # type: ignore[no-untyped-def]
        if str(event.identifier.QueryRetrieveLevel) == "STUDY" and self.study_delay:
            time.sleep(self.study_delay)
        if str(event.identifier.QueryRetrieveLevel) == "IMAGE":
            self.note("manifest asked")
            released = self.release.wait(HOLD_TIMEOUT)
            self.note("manifest answered" if released else "manifest answered after the hold timed out")
        yield from super()._on_find(event)

    def _select(self, identifier, level):  # type: ignore[no-untyped-def]
        return [i for i in super()._select(identifier, level)
                if str(i.dataset.SOPInstanceUID) not in self.omit]

    def _send(self, event, instances):  # type: ignore[no-untyped-def]
        for item in super()._send(event, instances):
            yield item
            self.note("instance sent")

    def finds(self, level: str, study: str, series: str | None = None) -> int:
        """C-FINDs at ``level`` naming this study (and series): other queries (a PACS profile the
        gateway may run at first contact) are not the retrieval's."""
        return sum(1 for i in list(self.received_identifiers)
                   if str(i.get("QueryRetrieveLevel", "")) == level and str(i.get("StudyInstanceUID", "")) == study
                   and (series is None or str(i.get("SeriesInstanceUID", "")) == series))

    def retrieves(self, study: str) -> list[Dataset]:
        return [i for i in list(self.received_retrieve_identifiers) if str(i.get("StudyInstanceUID", "")) == study]


def series_datasets(count: int) -> tuple[str, str, list[Dataset]]:
    study, series = generate_uid(), generate_uid()
    datasets = [instance_ds(study, series, generate_uid(), number=n, series_number=1, patient_name="FIRST^BYTES",
                            description="first bytes", value=n, patient_id="FB-1") for n in range(1, count + 1)]
    return study, series, datasets


@contextmanager
def gateway_for(pacs: DemoPacs, retrieve: str, tmp_path, *, scp_port: int | None = None,
                other: DemoPacs | None = None) -> Iterator[str]:
    nodes = [{"name": "held", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port,
              "retrieve": retrieve}]
    if other is not None:   # a second node: federated URLs must locate the study first
        nodes.append({"name": "other", "ae_title": other.ae_title, "host": "127.0.0.1", "port": other.port,
                      "retrieve": retrieve})
    cfg: dict[str, Any] = {"spool": {"path": str(tmp_path / "spool")}, "nodes": nodes}
    if retrieve == "move":
        cfg["gateway"] = {"ae_title": GATEWAY_AE, "dimse_host": "127.0.0.1", "dimse_port": scp_port}
    if hasattr(gateway_settings, "ProfilingSection"):
        # A PACS profile queries the PACS at first contact; these tests count what retrievals ask.
        cfg["profiling"] = {"enabled": False}
    with running_gateway(settings_from_dict(cfg)) as url:
        yield url


@contextmanager
def held_pacs(datasets: list[Dataset], retrieve: str, ae_title: str) -> Iterator[tuple[ManifestHeldPacs, int | None]]:
    scp_port = free_port() if retrieve == "move" else None
    destinations = {GATEWAY_AE: ("127.0.0.1", scp_port)} if scp_port is not None else None
    with ManifestHeldPacs(datasets, ae_title=ae_title, move_destinations=destinations) as pacs:
        yield pacs, scp_port


def boundary_of(response: httpx.Response) -> bytes:
    ctype = response.headers["content-type"]
    return next(p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";")
                if p.strip().startswith("boundary=")).encode()


def sop_of(body: bytes) -> str:
    return str(dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ----------------------------------------------------------------------------- first part first


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_the_first_part_arrives_while_the_manifest_is_still_being_listed(tmp_path, retrieve):
    study, series, datasets = series_datasets(12)
    with held_pacs(datasets, retrieve, "HELDFIND") as (pacs, scp_port), \
            gateway_for(pacs, retrieve, tmp_path, scp_port=scp_port) as url:
        target = f"{url}/dicom-web/studies/{study}/series/{series}"
        with httpx.stream("GET", target, headers=ANY_TS, timeout=60) as r:
            assert r.status_code == 200
            delimiter, closing = b"--" + boundary_of(r), b"--" + boundary_of(r) + b"--"
            chunks = r.iter_raw()
            buf = b""
            while buf.count(delimiter) < 2:   # the second part has begun: the first is complete
                buf += next(chunks)
            pacs.note("client has the first part")
            while buf.count(delimiter) < len(datasets):   # every part streams while it is held ...
                buf += next(chunks)
            assert closing not in buf, "... but the stream does not end before the manifest is known"
            pacs.note("client has every part's beginning")
            pacs.release.set()
            for chunk in chunks:
                buf += chunk
        parts = parse_multipart(buf, r.headers["content-type"])
    assert sorted(sop_of(body) for _, body in parts) == sorted(str(d.SOPInstanceUID) for d in datasets)
    events = pacs.events
    assert "manifest answered after the hold timed out" not in events, events
    assert events.index("client has the first part") < events.index("manifest answered"), events
    assert events.count("manifest asked") == 1
    first_retrieve = pacs.retrieves(study)[0]
    assert first_retrieve.QueryRetrieveLevel == "SERIES", "the retrieval did not wait for the manifest"


# ----------------------------------------------------------------------------- completeness


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_an_instance_the_pacs_leaves_out_is_retried_then_the_stream_aborts(tmp_path, retrieve):
    study, series, datasets = series_datasets(8)
    left_out = str(datasets[3].SOPInstanceUID)
    with held_pacs(datasets, retrieve, "LEAVESOUT") as (pacs, scp_port), \
            gateway_for(pacs, retrieve, tmp_path, scp_port=scp_port) as url:
        pacs.release.set()
        pacs.omit = {left_out}
        target = f"{url}/dicom-web/studies/{study}/series/{series}"
        buf = b""
        with httpx.stream("GET", target, headers=ANY_TS, timeout=60) as r:
            assert r.status_code == 200
            closing = b"--" + boundary_of(r) + b"--"
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in r.iter_raw():
                    buf += chunk
        assert closing not in buf, "a broken stream, never a short complete one"
        assert buf.count(b"--" + boundary_of(r)) == len(datasets) - 1
        assert metric(url, "dwg_incomplete_retrievals_total") == 1
        assert metric(url, "dwg_aborted_streams_total") == 1
    asked = pacs.retrieves(study)
    assert [a.QueryRetrieveLevel for a in asked] == ["SERIES", "IMAGE", "IMAGE"], "two retries by UID"
    assert all(str(a.SOPInstanceUID) == left_out for a in asked[1:])


# ----------------------------------------------------------------------------- frame storm


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_forty_concurrent_frame_requests_on_a_cold_series_ask_the_pacs_once(tmp_path, retrieve):
    study, series, datasets = series_datasets(40)
    with ExitStack() as stack:
        pacs, scp_port = stack.enter_context(held_pacs(datasets, retrieve, "STORMPACS"))
        other = stack.enter_context(DemoPacs([], ae_title="EMPTYPACS"))
        url = stack.enter_context(gateway_for(pacs, retrieve, tmp_path, scp_port=scp_port, other=other))
        pacs.release.set()
        pacs.study_delay = 0.3   # requests pile up behind the locate: all 40 are in flight at once
        results: dict[str, bytes] = {}
        errors: list[str] = []
        go = threading.Event()

        def frame(ds: Dataset) -> None:
            sop = str(ds.SOPInstanceUID)
            go.wait()
            r = httpx.get(f"{url}/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/1",
                          headers=ACCEPT_FRAME, timeout=60)
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
                return
            (_, body), = parse_multipart(r.content, r.headers["content-type"])
            results[sop] = body

        threads = [threading.Thread(target=frame, args=(ds,)) for ds in datasets]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(90)
        assert not errors, errors
        assert results == {str(ds.SOPInstanceUID): ds.PixelData for ds in datasets}
        assert metric(url, "dwg_retrievals_total") == 1, "one retrieval"
    assert pacs.finds("STUDY", study) == 1, "one locate"
    assert pacs.finds("IMAGE", study, series) == 1, "one manifest"
    asked = pacs.retrieves(study)
    assert asked[0].QueryRetrieveLevel == "IMAGE" and len(asked) <= 2, "the first asked-for instance, then the rest"
    assert pacs.counters["sent"] == len(datasets), "every instance sent once"
