"""The fast C-STORE SCU's data set send (``Association.send_file``: a file read a window at a time;
``Association.send_pieces``: an instance held in memory as received pieces), against a pynetdicom SCP
with a small maximum PDU so one instance is many fragments: the data set arrives byte for byte
whatever the windows and the pieces' boundaries, and a file that ends early aborts the association,
never lets the SCP store a short data set (docs/architecture.md, "DIMSE edge")."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from gateway.dimse.fast import association as fast_association
from gateway.dimse.fast import commands as cmd
from gateway.dimse.fast import store as fast_store
from gateway.pacs import StoreItem
from gateway.settings import settings_from_dict

from .peers import HOST

SCP_MAX_PDU = 8192   # a 128 KiB data set in ~17 fragments


class Scp:
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.aborted = threading.Event()
        ae = AE("SENDTEST")
        ae.maximum_pdu_size = SCP_MAX_PDU
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        self.server = ae.start_server((HOST, 0), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ABORTED, lambda e: self.aborted.set())])
        self.port = self.server.server_address[1]

    def _store(self, event: evt.Event) -> int:
        self.received.append(event.request.DataSet.getvalue())
        return 0x0000


@pytest.fixture
def scp() -> Iterator[Scp]:
    s = Scp()
    try:
        yield s
    finally:
        s.server.shutdown()


def _ct_file(path: Path) -> tuple[StoreItem, bytes]:
    """A CT instance of 256x256 16-bit noise; returns its StoreItem and its data set's bytes."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CT", 256, 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.random.default_rng(7).integers(-1024, 3000, (256, 256), dtype="<i2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    with path.open("rb") as fh:
        offset = len(data) - fast_store._skip_file_meta(fh)   # the data set's start
    return StoreItem(path, CTImageStorage, str(ds.SOPInstanceUID), ExplicitVRLittleEndian), data[offset:]


def _node(port: int):  # type: ignore[no-untyped-def]
    return settings_from_dict({"nodes": [{"name": "p", "ae_title": "SENDTEST", "host": HOST, "port": port,
                                          "engine": "fast"}]}).nodes[0]


def test_the_data_set_arrives_byte_for_byte(scp: Scp, tmp_path: Path) -> None:
    items, expected = zip(*(_ct_file(tmp_path / f"{n}.dcm") for n in range(3)), strict=True)
    results = fast_store.store_all("DICOMWEBGW", _node(scp.port), iter(items), tmp_path, threading.Event())
    assert [(r.status, r.confirmed) for r in results] == [(0, True)] * 3
    assert scp.received == list(expected)


def test_a_file_that_ends_early_aborts_the_association(scp: Scp, tmp_path: Path) -> None:
    item, data = _ct_file(tmp_path / "short.dcm")
    assoc = fast_association.request("DICOMWEBGW", _node(scp.port), [(CTImageStorage, [ExplicitVRLittleEndian])])
    assert assoc is not None
    with item.path.open("rb") as fh:
        length = fast_store._skip_file_meta(fh)
        assert length == len(data)
        with pytest.raises(OSError, match="ended 1000 bytes early"):
            assoc.send_file(1, cmd.c_store_rq(1, CTImageStorage, item.sop_instance_uid), fh, length + 1000)
    assert not assoc.is_established
    assert scp.aborted.wait(5), "the SCP never saw the abort"
    assert scp.received == []   # nothing short was stored


def test_from_memory_the_data_set_arrives_byte_for_byte_whatever_the_pieces(scp: Scp, tmp_path: Path) -> None:
    rng = random.Random(11)
    items, expected = [], []
    for n in range(4):
        on_disk, data_set = _ct_file(tmp_path / f"{n}.dcm")
        whole = on_disk.path.read_bytes()
        cuts = sorted(rng.sample(range(1, len(whole)), 40 if n else 1))   # the first: two pieces
        pieces = [memoryview(whole)[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
        items.append(StoreItem(None, on_disk.sop_class_uid, on_disk.sop_instance_uid, on_disk.transfer_syntax,
                               pieces=pieces))
        expected.append(data_set)
    results = fast_store.store_all("DICOMWEBGW", _node(scp.port), iter(items), tmp_path, threading.Event())
    assert [(r.status, r.confirmed) for r in results] == [(0, True)] * 4
    assert scp.received == expected


def test_a_file_larger_than_the_send_window_arrives_byte_for_byte(scp: Scp, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A window of 3 PDUs' worth: the 128 KiB data set goes in several windows, the last one partial.
    monkeypatch.setattr(fast_association, "SEND_WINDOW", 3 * (SCP_MAX_PDU - 6))
    items, expected = zip(*(_ct_file(tmp_path / f"{n}.dcm") for n in range(2)), strict=True)
    results = fast_store.store_all("DICOMWEBGW", _node(scp.port), iter(items), tmp_path, threading.Event())
    assert [(r.status, r.confirmed) for r in results] == [(0, True)] * 2
    assert scp.received == list(expected)
