"""cache.spool: atomic writes, LRU eviction by bytes, pins, entries owned by their node."""

import os
import threading
import time

import pytest

from cache.spool import PREPARED_TEMP_FILES, Spool
from translators.uids import InstanceId

TS = "1.2.840.10008.1.2.1"


def iid(uid, node="n", series="1.2.3"):
    return InstanceId(node, "1.2", series, uid)


def put(spool, data, uid, node="n", **kw):
    return spool.write(data, iid(uid, node), sop_class_uid="1.2", transfer_syntax=TS, **kw)


def test_write_index_and_read_back(tmp_path):
    spool = Spool(tmp_path / "s", max_bytes=10_000)
    entry = put(spool, b"x" * 100, "1.1")
    assert entry.path.read_bytes() == b"x" * 100 and entry.size == 100
    assert spool.get("n", "1.1") is entry and spool.total_bytes == 100
    assert entry.id == iid("1.1") and entry.series_uid == "1.2.3"
    assert list((tmp_path / "s" / ".incoming").iterdir()) == []


def test_the_same_uid_from_two_nodes_is_two_entries(tmp_path):
    spool = Spool(tmp_path, max_bytes=10_000)
    a = put(spool, b"from a", "7.7", node="a")
    b = put(spool, b"from node b", "7.7", node="b")
    assert spool.get("a", "7.7").path.read_bytes() == b"from a"
    assert spool.get("b", "7.7").path.read_bytes() == b"from node b"
    assert a.path != b.path and spool.total_bytes == len(b"from a") + len(b"from node b")
    assert spool.get("c", "7.7") is None


def test_lru_eviction_by_bytes_spares_pinned(tmp_path):
    spool = Spool(tmp_path, max_bytes=250)
    put(spool, b"a" * 100, "1")
    put(spool, b"b" * 100, "2")
    with spool.pinned("n", "1"):
        put(spool, b"c" * 100, "3")     # over budget: "2" is the LRU unpinned one
        assert spool.get("n", "2") is None and spool.get("n", "1") is not None
    spool.get("n", "3")
    put(spool, b"d" * 100, "4")         # "1" is now the least recently used
    assert spool.get("n", "1") is None and spool.total_bytes == 200
    assert sorted(p.name for p in (tmp_path / "n").glob("*.dcm")) == ["3.dcm", "4.dcm"]
    assert spool.evictions == 2


def test_commit_pinned_survives_until_unpinned(tmp_path):
    spool = Spool(tmp_path, max_bytes=150)
    first = put(spool, b"a" * 100, "1", pin=True)
    put(spool, b"b" * 100, "2")                 # over budget, but "1" is pinned from its commit
    assert spool.get("n", "1") is first and first.path.exists() and spool.get("n", "2") is None
    spool.unpin(first)
    put(spool, b"c" * 100, "3")
    assert spool.get("n", "1") is None and not first.path.exists()


def test_instance_larger_than_spool_is_evicted_when_unpinned(tmp_path):
    spool = Spool(tmp_path, max_bytes=10)
    entry = put(spool, b"z" * 50, "9.9", pin=True)
    assert entry.path.exists()
    spool.unpin(entry)
    assert spool.get("n", "9.9") is None and not entry.path.exists()


def test_rewrite_replaces_and_concurrent_writers(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 30)
    put(spool, b"old", "9")
    put(spool, b"newer", "9")
    assert spool.get("n", "9").path.read_bytes() == b"newer" and spool.total_bytes == 5

    def writer(n):
        for i in range(50):
            put(spool, bytes([n]) * 10, f"{n}.{i}")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert spool.total_bytes == 5 + 4 * 50 * 10


@pytest.mark.parametrize("bad", [InstanceId("n", "1.2", "1.2.3", "../x"), InstanceId("n/../m", "1.2", "1.2.3", "1"),
                                 InstanceId("n", "1.2\n", "1.2.3", "1")])
def test_commit_refuses_identities_that_are_not_uids_or_node_names(tmp_path, bad):
    spool = Spool(tmp_path, max_bytes=100)
    with pytest.raises(ValueError):
        spool.write(b"1", bad, sop_class_uid="1.2", transfer_syntax=TS)
    assert spool.total_bytes == 0 and list(spool.tmp.iterdir()) == []


def test_temp_spool_is_removed_on_close():
    spool = Spool(None, max_bytes=100)
    root = spool.root
    put(spool, b"1", "1")
    spool.close()
    assert not root.exists()


def test_commit_hook_runs_for_every_entry_and_never_fails_the_write(tmp_path):
    spool = Spool(tmp_path, max_bytes=10_000)
    seen = []
    spool.on_commit = lambda entry: seen.append(entry.sop_instance_uid)
    put(spool, b"a", "1")
    spool.on_commit = lambda entry: 1 / 0
    entry = put(spool, b"b", "2")
    assert seen == ["1"] and spool.get("n", "2") is entry


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
    entry = put(spool, buf.getvalue(), str(ds.SOPInstanceUID))
    reader.close()
    assert entry.derived["index"].number_of_frames == int(ds.NumberOfFrames)


def test_uploads_count_against_the_budget_and_evict_or_are_refused(tmp_path):
    spool = Spool(tmp_path, max_bytes=300)
    put(spool, b"a" * 100, "1")
    pinned = put(spool, b"b" * 100, "2", pin=True)
    assert spool.reserve(150), "room made by evicting the unpinned entry"
    assert spool.get("n", "1") is None and spool.get("n", "2") is pinned
    assert not spool.reserve(100), "the pinned entry and the upload fill the budget: refused"
    assert spool.reserved_bytes == 150
    spool.release(150)
    assert spool.reserve(200) and spool.reserved_bytes == 200


def test_a_just_written_instance_is_read_once_from_memory_within_a_bound(tmp_path, monkeypatch):
    """Spool.take_fresh: the first reader of a cold instance gets the bytes written, not a file read;
    the memory it keeps is bounded (FRESH_BYTES), the oldest let go first."""
    import cache.spool as spool_module

    monkeypatch.setattr(spool_module, "FRESH_BYTES", 250)
    spool = Spool(tmp_path, max_bytes=10_000)
    a = put(spool, b"a" * 100, "1")
    assert Spool.peek_fresh(a) == b"a" * 100
    assert Spool.take_fresh(a) == b"a" * 100 and Spool.take_fresh(a) is None    # once
    b, c, d = (put(spool, bytes([66 + i]) * 100, str(i + 2)) for i in range(3))   # B, C, D
    assert Spool.take_fresh(b) is None                    # aged out: 300 bytes > the 250 kept
    assert Spool.take_fresh(c) == b"C" * 100 and Spool.take_fresh(d) == b"D" * 100
    view = put(spool, memoryview(b"v" * 10), "5")           # only immutable bytes are kept
    assert Spool.take_fresh(view) is None and view.path.read_bytes() == b"v" * 10


def _names_settle(folder, count, timeout=5.0):
    """The number of names in the prepared folder once it settled: ``count`` files, none of them
    also linked into a node's folder (a retired name the preparer has yet to drop). A bare count
    is no sign: created-ahead files and retired names pass through ``count`` together."""
    def settled():
        try:
            names = list(folder.iterdir())
            return len(names) == count and all(p.stat().st_nlink == 1 for p in names)
        except FileNotFoundError:           # dropped between the listing and the stat
            return False

    deadline = time.monotonic() + timeout
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(list(folder.iterdir()))


def test_temp_files_are_created_ahead_and_cleaned_up(tmp_path):
    spool = Spool(tmp_path, max_bytes=10_000)
    put(spool, b"x", "1")
    ready = tmp_path / ".prepared"
    assert _names_settle(ready, PREPARED_TEMP_FILES) == PREPARED_TEMP_FILES
    fd, path = spool.temp_file()                          # an open, empty file of the spool's
    os.close(fd)
    assert path.parent == ready and path.stat().st_size == 0
    spool.close()
    assert sorted(p.name for p in ready.iterdir()) == [path.name]   # only the one handed out is left
    Spool(tmp_path, max_bytes=10_000)                     # a restart clears leftovers
    assert list(ready.iterdir()) == []


def test_prepared_files_are_linked_into_place_and_their_names_dropped_by_the_preparer(tmp_path):
    spool = Spool(tmp_path, max_bytes=10_000)
    entries = [put(spool, bytes([n]) * 10, str(n)) for n in range(1, 6)]
    for n, entry in enumerate(entries, start=1):
        assert entry.path.read_bytes() == bytes([n]) * 10
        assert entry.path.stat().st_nlink in (1, 2)      # 2 until the preparer drops the old name
    # the prepared folder ends up holding only files created ahead, none of the five written
    assert _names_settle(tmp_path / ".prepared", PREPARED_TEMP_FILES) == PREPARED_TEMP_FILES
    assert all(e.path.stat().st_nlink == 1 for e in entries)
    assert all(p.stat().st_size == 0 for p in (tmp_path / ".prepared").iterdir())
    # a second retrieval of an instance in place replaces it (a link cannot)
    again = put(spool, b"new", "3")
    assert again.path == entries[2].path and again.path.read_bytes() == b"new"
    assert spool.total_bytes == 4 * 10 + 3
    spool.close()


def test_a_filesystem_without_hard_links_gets_renames(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    spool = Spool(tmp_path, max_bytes=10_000)
    first, second = put(spool, b"a", "1"), put(spool, b"b", "2")
    assert (first.path.read_bytes(), second.path.read_bytes()) == (b"a", b"b")
    assert first.path.stat().st_nlink == 1
    assert _names_settle(tmp_path / ".prepared", PREPARED_TEMP_FILES) == PREPARED_TEMP_FILES
    spool.close()
