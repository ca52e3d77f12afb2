"""STOW-RS stored while uploading (docs/architecture.md, "STOW-RS"): each part is C-STOREd as soon as
it is complete, over one association, while later parts still arrive.

An in-process pynetdicom storage SCP records every association and C-STORE on a timeline the client
writes to as well: the client sends one part at a time and waits (bounded) for the SCP to have it
before sending the next, so the order of the timeline shows whether the gateway stored while the
upload ran; nothing here depends on how long anything takes. Real PACS (Orthanc, dcmqrscp):
tests/integration/test_stow.py::test_slow_upload_is_stored_part_by_part.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from cache import keys
from cache.memory import MemoryCache
from gateway.settings import settings_from_dict
from tests.support.server import running_gateway
from translators.uids import StudyId

from .test_stow import CT, EXPLICIT, IMPLICIT, MR, RLE, ct_header, fresh, part10, reasons, referenced

BOUNDARY = "stow-test-boundary"
X3D = "1.2.840.10008.5.1.4.1.1.13.1.1"   # X-Ray 3D Angiographic: not among the commonly proposed classes
NATIVE = [EXPLICIT, IMPLICIT]


class Timeline:
    """Events from every thread (SCP, client, cache), in the order they happened."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self._cv = threading.Condition()

    def add(self, *event: str) -> None:
        with self._cv:
            self.events.append(event)
            self._cv.notify_all()

    def wait(self, predicate: Callable[[list[tuple[str, ...]]], bool], timeout: float = 15) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: predicate(self.events), timeout)

    def stored(self) -> list[str]:
        with self._cv:
            return [e[1] for e in self.events if e[0] == "stored"]

    def index(self, *event: str) -> int:
        with self._cv:
            return self.events.index(event)


class RecordingScp:
    """A storage SCP accepting ``supported`` (SOP class -> syntaxes); records associations (and how
    many were open at once) and each C-STORE (SOP Instance UID, the syntax it came in)."""

    def __init__(self, timeline: Timeline, supported: dict[str, list[str]], *, idle_timeout: float | None = None):
        self.timeline = timeline
        self.ae_title = "STREAMSCP"
        self.associations = self.open = self.max_open = 0
        self.syntax: dict[str, str] = {}
        self._lock = threading.Lock()
        self._ae = AE(ae_title=self.ae_title)
        for cls, syntaxes in supported.items():
            self._ae.add_supported_context(cls, syntaxes)
        if idle_timeout is not None:
            self._ae.network_timeout = idle_timeout   # aborts an association idle that long
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted),
                    (evt.EVT_RELEASED, self._closed), (evt.EVT_ABORTED, self._closed)]
        self._server = self._ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.dicom_port = self._server.server_address[1]

    def _accepted(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1
            self.open += 1
            self.max_open = max(self.max_open, self.open)
        self.timeline.add("association")

    def _closed(self, event: evt.Event) -> None:
        with self._lock:
            self.open -= 1

    def _store(self, event: evt.Event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        self.syntax[sop] = str(event.context.transfer_syntax)
        self.timeline.add("stored", sop)
        return 0x0000

    def stop(self) -> None:
        self._ae.shutdown()


class RecordingCache(MemoryCache):
    """The in-process cache, with the counters the gateway bumped on the timeline."""

    def __init__(self, timeline: Timeline) -> None:
        super().__init__()
        self.timeline = timeline

    async def incr(self, key: str) -> int:
        self.timeline.add("bumped", key)
        return await super().incr(key)


@pytest.fixture()
def stream_gw(tmp_path) -> Iterator:
    """start(supported, idle_timeout=None) -> (timeline, scp, gateway url); stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(supported: dict[str, list[str]], *, idle_timeout: float | None = None):
            timeline = Timeline()
            scp = RecordingScp(timeline, supported, idle_timeout=idle_timeout)
            stack.callback(scp.stop)
            settings = settings_from_dict({
                "spool": {"path": str(tmp_path / "spool")},
                "profiling": {"enabled": False},   # its probe association would be counted at the SCP
                "nodes": [{"name": "stream", "ae_title": scp.ae_title, "host": "127.0.0.1",
                           "port": scp.dicom_port, "max_associations": 2,
                           "timeouts": {"connect": 2, "acse": 3, "dimse": 10, "network": 30}}],
            })
            url = stack.enter_context(running_gateway(settings, cache=RecordingCache(timeline)))
            return timeline, scp, url

        yield start


def part_chunks(data: list[bytes]) -> list[bytes]:
    """One chunk per part: the part and the delimiter after it, so the part is complete on arrival."""
    delimiter = [f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() for _ in data]
    closing = f"\r\n--{BOUNDARY}--\r\n".encode()
    return [(delimiter[0] if i == 0 else b"") + d + (delimiter[i + 1] if i + 1 < len(data) else closing)
            for i, d in enumerate(data)]


def slow_body(timeline: Timeline, sent: list[Dataset], *, leave_after: int | None = None,
              pause: float = 0.0) -> Iterator[bytes]:
    """Part by part; before each next part, wait until the SCP has the previous one (at most 15 s:
    a gateway that stores only at the end fails the ordering assertions instead of hanging).
    ``leave_after``: after that many parts, send half the next one and disconnect."""
    chunks = part_chunks([part10(d) for d in sent])
    for i, chunk in enumerate(chunks):
        if i:
            timeline.wait(lambda events, i=i: sum(e[0] == "stored" for e in events) >= i)
            time.sleep(pause)
        if leave_after is not None and i == leave_after:
            yield chunk[:len(chunk) // 2]
            raise ConnectionAbortedError("the client gives up half-way")
        timeline.add("sent", str(i))
        yield chunk


def post(url: str, body) -> httpx.Response:
    with httpx.Client(timeout=60) as client:
        return client.post(f"{url}/dicom-web/studies", content=body, headers=ct_header(BOUNDARY))


def test_each_part_is_stored_while_the_upload_runs_over_one_association(stream_gw):
    timeline, scp, url = stream_gw({CT: NATIVE})
    sent = fresh(5)
    r = post(url, slow_body(timeline, sent))
    assert r.status_code == 200, r.text
    assert referenced(r.json()) == [d.SOPInstanceUID for d in sent]
    for i, ds in enumerate(sent[:-1]):
        assert timeline.index("stored", ds.SOPInstanceUID) < timeline.index("sent", str(i + 1)), (
            f"part {i} was not stored before part {i + 1} was sent")
    assert timeline.index("stored", sent[0].SOPInstanceUID) < timeline.index("sent", str(len(sent) - 1))
    assert scp.associations == 1, "one association for the whole request"
    assert set(scp.syntax.values()) == {EXPLICIT}


def test_client_leaving_midway_leaves_exactly_the_complete_parts_stored_and_the_cache_bumped(stream_gw):
    timeline, scp, url = stream_gw({CT: NATIVE})
    sent = fresh(6)
    study = sent[0].StudyInstanceUID
    with pytest.raises(ConnectionAbortedError):
        post(url, slow_body(timeline, sent, leave_after=3))
    generation = keys.study_generation(StudyId("stream", study))
    assert timeline.wait(lambda events: ("bumped", generation) in events), "the study's generation was bumped"
    assert timeline.wait(lambda events: ("bumped", keys.node_generation("stream")) in events)
    assert timeline.stored() == [d.SOPInstanceUID for d in sent[:3]]
    # Nothing reached the PACS after the bump: the part cut off and the ones never sent stay out.
    time.sleep(0.5)
    assert timeline.stored() == [d.SOPInstanceUID for d in sent[:3]]
    assert scp.associations == 1


def test_malformed_body_after_good_parts_reports_the_stored_ones_and_the_bad_ones(stream_gw):
    timeline, scp, url = stream_gw({CT: NATIVE})
    good = fresh(2)
    chunks = part_chunks([part10(good[0]), part10(good[1]), b"this is not DICOM"])
    # the multipart structure breaks inside the next part's header block (no blank line, > 16 KiB)
    broken = b"Content-Type: application/dicom\r\nX-Padding: " + b"x" * 20000
    body = b"".join(chunks[:-1]) + chunks[-1].replace(f"\r\n--{BOUNDARY}--\r\n".encode(),
                                                      f"\r\n--{BOUNDARY}\r\n".encode() + broken)
    r = post(url, body)
    assert r.status_code == 202, r.text
    assert referenced(r.json()) == [good[0].SOPInstanceUID, good[1].SOPInstanceUID]
    failed = r.json()["00081198"]["Value"]
    assert [i["00081197"]["Value"][0] for i in failed] == [0xC000, 0xC001]
    assert reasons(r.json()) == {None: 0xC001}    # neither bad part had UIDs to report
    assert timeline.stored() == [good[0].SOPInstanceUID, good[1].SOPInstanceUID]


def test_classes_and_syntaxes_not_in_the_first_proposal_get_a_new_association(stream_gw):
    """CT first (its class and the common classes' native syntaxes proposed); an RLE MR was not
    proposed: a second association, planned from it and the CT before it, so the next CT needs
    none; a class outside the common ones: a third. One association open at a time."""
    timeline, scp, url = stream_gw({CT: NATIVE, MR: [RLE, *NATIVE], X3D: NATIVE})
    study = generate_uid()
    ct = fresh(3, study=study)
    mr = fresh(2, "MR", RLE, study=study)
    x3d = fresh(1, study=study)[0]
    x3d.SOPClassUID = x3d.file_meta.MediaStorageSOPClassUID = X3D
    sent = [ct[0], ct[1], mr[0], ct[2], x3d, mr[1]]
    r = post(url, slow_body(timeline, sent))
    assert r.status_code == 200, r.text
    assert referenced(r.json()) == [d.SOPInstanceUID for d in sent]
    assert [scp.syntax[d.SOPInstanceUID] for d in sent] == [EXPLICIT, EXPLICIT, RLE, EXPLICIT, EXPLICIT, RLE]
    assert scp.associations == 3 and scp.max_open == 1
    events = [e for e in timeline.events if e[0] in ("association", "stored")]
    assert events == [("association",), ("stored", ct[0].SOPInstanceUID), ("stored", ct[1].SOPInstanceUID),
                      ("association",), ("stored", mr[0].SOPInstanceUID), ("stored", ct[2].SOPInstanceUID),
                      ("association",), ("stored", x3d.SOPInstanceUID), ("stored", mr[1].SOPInstanceUID)]


def test_an_association_the_pacs_closed_while_idle_is_replaced(stream_gw):
    """A slow client outlives the PACS's idle timeout between two parts: every C-STORE on the first
    association was answered, so the next part goes on a new one."""
    timeline, scp, url = stream_gw({CT: NATIVE}, idle_timeout=1)
    sent = fresh(2)
    r = post(url, slow_body(timeline, sent, pause=2.5))
    assert r.status_code == 200, r.text
    assert referenced(r.json()) == [d.SOPInstanceUID for d in sent]
    assert timeline.stored() == [d.SOPInstanceUID for d in sent]
    assert scp.associations == 2
