"""cache.spool: atomic writes, LRU eviction by bytes, pins."""

import threading

from cache.spool import Spool


def meta(uid, series="1.2.3"):
    return {"sop_instance_uid": uid, "sop_class_uid": "1.2", "transfer_syntax": "1.2.840.10008.1.2.1",
            "study_uid": "1.2", "series_uid": series, "node": "n"}


def test_write_index_and_read_back(tmp_path):
    spool = Spool(tmp_path / "s", max_bytes=10_000)
    entry = spool.write(b"x" * 100, **meta("1.1"))
    assert entry.path.read_bytes() == b"x" * 100 and entry.size == 100
    assert spool.get("1.1") is entry and spool.total_bytes == 100
    assert [e.sop_instance_uid for e in spool.series("1.2.3")] == ["1.1"]
    assert list((tmp_path / "s" / ".incoming").iterdir()) == []


def test_lru_eviction_by_bytes_spares_pinned(tmp_path):
    spool = Spool(tmp_path, max_bytes=250)
    spool.write(b"a" * 100, **meta("1"))
    spool.write(b"b" * 100, **meta("2"))
    with spool.pinned("1"):
        spool.write(b"c" * 100, **meta("3"))     # over budget: "2" is the LRU unpinned one
        assert spool.get("2") is None and spool.get("1") is not None
    spool.get("3")
    spool.write(b"d" * 100, **meta("4"))         # "1" is now the least recently used
    assert spool.get("1") is None and spool.total_bytes == 200
    assert sorted(p.name for p in tmp_path.glob("*.dcm")) == ["3.dcm", "4.dcm"]
    assert spool.evictions == 2


def test_instance_larger_than_spool_is_evicted_when_unpinned(tmp_path):
    spool = Spool(tmp_path, max_bytes=10)
    with spool.pinned("big"):
        pass
    entry = spool.write(b"z" * 50, **meta("big"))
    assert spool.get("big") is None and not entry.path.exists()


def test_rewrite_replaces_and_concurrent_writers(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.write(b"old", **meta("9"))
    spool.write(b"newer", **meta("9"))
    assert spool.get("9").path.read_bytes() == b"newer" and spool.total_bytes == 5

    def writer(n):
        for i in range(50):
            spool.write(bytes([n]) * 10, **meta(f"{n}.{i}"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert spool.total_bytes == 5 + 4 * 50 * 10


def test_temp_spool_is_removed_on_close():
    spool = Spool(None, max_bytes=100)
    root = spool.root
    spool.write(b"1", **meta("1"))
    spool.close()
    assert not root.exists()


def test_commit_hook_runs_for_every_entry_and_never_fails_the_write(tmp_path):
    spool = Spool(tmp_path, max_bytes=10_000)
    seen = []
    spool.on_commit = lambda entry: seen.append(entry.sop_instance_uid)
    spool.write(b"a", **meta("1"))
    spool.on_commit = lambda entry: 1 / 0
    entry = spool.write(b"b", **meta("2"))
    assert seen == ["1"] and spool.get("2") is entry


def test_frame_index_is_built_at_ingest(tmp_path):
    from io import BytesIO

    from gateway.demo_data import generate_demo_datasets
    from gateway.instances import InstanceReader

    ds = next(d for d in generate_demo_datasets() if getattr(d, "NumberOfFrames", 1) and int(d.get("NumberOfFrames", 1)) > 1)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    spool = Spool(tmp_path, max_bytes=1 << 30)
    reader = InstanceReader()
    spool.on_commit = reader.index_at_ingest
    entry = spool.write(buf.getvalue(), **meta(str(ds.SOPInstanceUID)))
    reader.close()
    assert entry.derived["index"].number_of_frames == int(ds.NumberOfFrames)
