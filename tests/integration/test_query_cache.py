"""QIDO cache: hits without DIMSE traffic (counted at the PACS), no-cache bypass, invalidation; cached
answers in one Redis round trip (counted with MONITOR) as the same bytes as an uncached answer, for
every base URL a client may see."""

import asyncio
import copy
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

import httpx
import redis
from pydicom.uid import generate_uid

from cache import keys
from cache.memory import MemoryCache
from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import Settings, settings_from_dict
from tests.support.server import running_gateway


def test_cached_qido_answers_without_dimse_and_no_cache_bypasses():
    with DemoPacs(generate_demo_datasets(), ae_title="QC") as pacs:
        settings = settings_from_dict({"nodes": [{"name": "qc", "ae_title": "QC", "host": "127.0.0.1",
                                                  "port": pacs.port}],
                                       # the probe's C-FINDs would be counted
                                       "profiling": {"enabled": False}})
        with running_gateway(settings) as url:
            first = httpx.get(url + "/dicom-web/studies", params={"PatientName": "doe*"})
            finds = pacs.counters["find"]
            assert finds >= 1
            for _ in range(3):
                again = httpx.get(url + "/dicom-web/studies", params={"PatientName": "doe*"})
                assert again.json() == first.json()
            assert pacs.counters["find"] == finds, "cache hits must not reach the PACS"
            # Paging is served from the same cached result set.
            page = httpx.get(url + "/dicom-web/studies", params={"PatientName": "doe*", "limit": 1, "offset": 1})
            assert page.json() == first.json()[1:2]
            assert pacs.counters["find"] == finds
            fresh = httpx.get(url + "/dicom-web/studies", params={"PatientName": "doe*"},
                              headers={"Cache-Control": "no-cache"})
            assert fresh.json() == first.json()
            assert pacs.counters["find"] > finds


def test_generation_bump_invalidates(tmp_path):
    with DemoPacs(generate_demo_datasets(), ae_title="QC2") as pacs:
        settings = settings_from_dict({"nodes": [{"name": "qc2", "ae_title": "QC2", "host": "127.0.0.1",
                                                  "port": pacs.port}],
                                       # the probe's C-FINDs would be counted
                                       "profiling": {"enabled": False}})
        cache = MemoryCache()
        with running_gateway(settings, cache=cache) as url:
            httpx.get(url + "/dicom-web/studies")
            finds = pacs.counters["find"]
            httpx.get(url + "/dicom-web/studies")
            assert pacs.counters["find"] == finds
            asyncio.run(cache.incr(keys.node_generation("qc2")))   # what STOW does after storing
            httpx.get(url + "/dicom-web/studies")
            assert pacs.counters["find"] > finds


# ------------------------------------------------------------------ answers in one round trip, as bytes

CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")


def redis_settings(redis_url: str, prefix: str, port: int, **extra) -> Settings:
    return settings_from_dict({"cache": {"url": redis_url, "prefix": prefix, "timeout": 1.0},
                               "nodes": [{"name": "qc3", "ae_title": "QC3", "host": "127.0.0.1", "port": port}],
                               **extra})


@contextmanager
def redis_commands(redis_url: str, prefix: str) -> Iterator[list[dict]]:
    """Every command a client (not a script) sends to Redis with a key under ``prefix``, seen by
    MONITOR while the block runs (other processes share this Redis: only our prefix counts)."""
    seen: list[dict] = []
    stop = f"ECHO stop-{prefix}"
    server = redis.Redis.from_url(redis_url)
    ready = threading.Event()

    def watch() -> None:
        with server.monitor() as monitor:
            ready.set()
            for info in monitor.listen():
                if info["command"] == stop:
                    return
                if prefix in info["command"] and info.get("client_type") != "lua":
                    seen.append(info)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5)
    time.sleep(0.2)       # MONITOR is registered once its reply came back: let it settle
    try:
        yield seen
    finally:
        time.sleep(0.2)
        server.echo(f"stop-{prefix}")
        thread.join(10)
        server.close()


def test_a_cached_answer_costs_one_redis_round_trip(redis_url):
    prefix = f"test:{secrets.token_hex(6)}:"
    with DemoPacs(generate_demo_datasets(), ae_title="QC3") as pacs, \
            running_gateway(redis_settings(redis_url, prefix, pacs.port,
                                           # the probe's C-FINDs and profile's Redis commands would be counted
                                           profiling={"enabled": False})) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        params = {"PatientID": "DGW0001"}
        first = client.get("/dicom-web/studies", params=params)
        assert first.status_code == 200 and len(first.json()) == 2
        finds = pacs.counters["find"]
        with redis_commands(redis_url, prefix) as commands:
            again = client.get("/dicom-web/studies", params=params)
        assert again.content == first.content and pacs.counters["find"] == finds
        assert len(commands) == 1, [c["command"][:120] for c in commands]
        assert commands[0]["command"].startswith("EVALSHA"), "generations and value in one script"
        # Without the answer cache (no-cache) the same request asks the PACS and costs more.
        with redis_commands(redis_url, prefix) as commands:
            fresh = client.get("/dicom-web/studies", params=params, headers={"Cache-Control": "no-cache"})
        assert fresh.content == first.content and pacs.counters["find"] > finds and len(commands) > 1
    cleanup(redis_url, prefix)


def test_cached_bytes_equal_the_uncached_answer_for_every_base(redis_url):
    prefix = f"test:{secrets.token_hex(6)}:"
    proxy = {"X-Forwarded-Host": "viewer.example", "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/pacs"}
    with DemoPacs(generate_demo_datasets(), ae_title="QC3") as pacs, \
            running_gateway(redis_settings(redis_url, prefix, pacs.port,
                                           http={"trusted_proxies": ["127.0.0.1"]},
                                           # the probe's C-FINDs would be counted
                                           profiling={"enabled": False})) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        cases = [("/dicom-web/studies", {}, {"PatientID": "DGW0001"}),
                 ("/dicom-web/studies", proxy, {"PatientID": "DGW0001"}),
                 ("/nodes/qc3/dicom-web/studies", {"Host": "other.example:8443"}, {"PatientID": "DGW0001"}),
                 (f"/dicom-web/studies/{CT['study_uid']}/series", proxy, {"includefield": "SeriesDescription"}),
                 ("/dicom-web/studies", proxy, {"PatientID": "DGW0001", "limit": "1", "offset": "1"}),
                 ("/dicom-web/series", {}, {"Modality": "CT"})]
        for path, headers, params in cases:
            client.get(path, params=params)                      # cached under the plain base
            finds = pacs.counters["find"]
            cached = client.get(path, params=params, headers=headers)
            assert pacs.counters["find"] == finds, f"{path} {params}: served from the cache"
            uncached = client.get(path, params=params, headers={**headers, "Cache-Control": "no-cache"})
            assert cached.status_code == uncached.status_code == 200
            assert cached.content == uncached.content, f"{path} {headers} {params}"
            assert cached.headers.get_list("warning") == uncached.headers.get_list("warning")
            url_tag = cached.json()[0]["00081190"]["Value"][0]
            if headers is proxy:
                assert url_tag.startswith("https://viewer.example/pacs/dicom-web/studies/")
            elif "Host" in headers:
                assert url_tag.startswith("http://other.example:8443/nodes/qc3/dicom-web/studies/")
        paged = client.get("/dicom-web/studies", params={"PatientID": "DGW0001", "limit": "1", "offset": "1"})
        whole = client.get("/dicom-web/studies", params={"PatientID": "DGW0001"})
        assert paged.json() == whole.json()[1:2]
        assert len(whole.json()) == 2 and not paged.headers.get_list("warning")
        first = client.get("/dicom-web/studies", params={"PatientID": "DGW0001", "limit": "1"})
        assert first.headers.get_list("warning"), "more results remain: still said on a cached answer"
    cleanup(redis_url, prefix)


def test_a_stow_through_the_gateway_makes_the_cached_answer_stale(redis_url):
    prefix = f"test:{secrets.token_hex(6)}:"
    with DemoPacs(generate_demo_datasets(), ae_title="QC3") as pacs, \
            running_gateway(redis_settings(redis_url, prefix, pacs.port)) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        series_url = f"/dicom-web/studies/{CT['study_uid']}/series"
        before = client.get(series_url).json()
        assert client.get(series_url).json() == before
        ds = copy.deepcopy(next(d for d in generate_demo_datasets() if d.StudyInstanceUID == CT["study_uid"]))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        body = b"--qc3\r\nContent-Type: application/dicom\r\n\r\n" + out.getvalue() + b"\r\n--qc3--\r\n"
        stored = client.post("/dicom-web/studies", content=body, headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=qc3',
            "Accept": "application/dicom+json"})
        assert stored.status_code == 200, stored.text
        after = client.get(series_url).json()
        assert len(after) == len(before) + 1, "the next read missed and asked the PACS"
        assert str(ds.SeriesInstanceUID) in {s["0020000E"]["Value"][0] for s in after}
    cleanup(redis_url, prefix)


def cleanup(redis_url: str, prefix: str) -> None:
    server = redis.Redis.from_url(redis_url)
    try:
        found = list(server.scan_iter(match=prefix + "*"))
        if found:
            server.delete(*found)
    finally:
        server.close()
