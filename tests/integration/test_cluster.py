"""Replicas sharing one Redis: one retrieval per series across the cluster, takeover when the holder
dies, C-MOVE sub-operations delivered to another replica. Retrievals are counted at the peer."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import httpx
import yaml
from pydicom import dcmread

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.integration.peers import redis_ping
from tests.support.multipart import parse_multipart
from tests.support.server import free_port, running_gateway

REPO = Path(__file__).resolve().parents[2]
CT = next(s for s in DEMO_STUDIES if s["accession_number"] == "A2303140011")
AXIAL = CT["series"][1]
SERIES_URL = f"/dicom-web/studies/{CT['study_uid']}/series/{AXIAL['series_uid']}"
ALL_SOPS = set(AXIAL["sop_instance_uids"])
ANY_TS = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def config(redis_url: str, prefix: str, secret: str | None, pacs: DemoPacs, spool: Path, *,
           retrieve: str = "get", internal_port: int | None = None, dimse_port: int | None = None,
           http_port: int | None = None, probed: bool = False) -> dict:
    """``probed``: profiling as by default; off otherwise, as these tests count retrievals at the
    PACS and the profile probe's own C-GET would be counted."""
    cfg: dict = {
        "cache": {"url": redis_url, "prefix": prefix, "timeout": 0.5},
        "spool": {"path": str(spool)},
        "cluster": {"internal_port": internal_port or free_port(), "shared_secret": secret},
        "nodes": [{"name": "demo", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port,
                   "retrieve": retrieve}],
    }
    if dimse_port is not None:
        cfg["gateway"] = {"ae_title": "DICOMWEBGW", "dimse_host": "127.0.0.1", "dimse_port": dimse_port}
    if http_port is not None:
        cfg["http"] = {"host": "127.0.0.1", "port": http_port}
    if not probed:
        cfg["profiling"] = {"enabled": False}
    return cfg


def sop_uids(response: httpx.Response) -> list[str]:
    parts = parse_multipart(response.content, response.headers["content-type"])
    return [str(dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID) for _, body in parts]


def spooled(spool: Path) -> set[str]:
    return {p.stem for p in spool.glob("*/*.dcm")}   # <spool>/<node>/<sop>.dcm


class SlowPacs(DemoPacs):
    """Waits ``delay`` seconds before each C-GET/C-MOVE sub-operation (a slow PACS, seen from the gateway)."""

    delay = 0.0

    def _send(self, event, instances):
        for item in super()._send(event, instances):
            time.sleep(self.delay)
            yield item


@contextmanager
def gateway_process(cfg: dict, workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m gateway.cli serve`` with its own YAML; yields (root URL, process)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log_path = workdir / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    url = f"http://127.0.0.1:{cfg['http']['port']}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_fifty_concurrent_requests_across_two_replicas_cause_one_retrieval(redis_url, tmp_path):
    prefix, secret = f"test:{secrets.token_hex(6)}:", secrets.token_hex(16)
    ports = free_port(), free_port()
    with DemoPacs(generate_demo_datasets(), ae_title="CLUSTER") as pacs:
        a = settings_from_dict(config(redis_url, prefix, secret, pacs, tmp_path / "a", internal_port=ports[0]))
        b = settings_from_dict(config(redis_url, prefix, secret, pacs, tmp_path / "b", internal_port=ports[1]))
        with running_gateway(a) as url_a, running_gateway(b) as url_b, \
                httpx.Client(timeout=60, limits=httpx.Limits(max_connections=60)) as client:
            def request(i: int) -> set[str]:
                root = url_a if i % 2 else url_b
                if i % 4 < 2:
                    meta = client.get(root + SERIES_URL + "/metadata")
                    assert meta.status_code == 200
                    return {m["00080018"]["Value"][0] for m in meta.json()}
                r = client.get(root + SERIES_URL, headers=ANY_TS)
                assert r.status_code == 200
                uids = sop_uids(r)
                assert len(uids) == len(ALL_SOPS)
                return set(uids)

            with ThreadPoolExecutor(50) as pool:
                results = list(pool.map(request, range(50)))
            assert results == [ALL_SOPS] * 50, "every response complete"
            assert pacs.counters["get"] == 1, "one C-GET for 50 requests on two replicas (counted at the PACS)"
            assert pacs.counters["sent"] == len(ALL_SOPS)
            assert spooled(tmp_path / "a") == ALL_SOPS and spooled(tmp_path / "b") == ALL_SOPS

            # A later request on either replica is served from its own spool, no PACS involved.
            assert set(sop_uids(client.get(url_b + SERIES_URL, headers=ANY_TS))) == ALL_SOPS
            assert pacs.counters["get"] == 1

            # The internal endpoint: on its own port, shared secret only.
            sop = AXIAL["sop_instance_uids"][3]
            internal = f"http://127.0.0.1:{ports[0]}/internal/instances/demo/"
            assert client.get(internal + sop).status_code == 401
            assert client.get(internal + sop, headers={"Authorization": "Bearer wrong"}).status_code == 401
            auth = {"Authorization": f"Bearer {secret}"}
            assert client.get(internal + "1.2.3.4", headers=auth).status_code == 404
            ok = client.get(internal + sop, headers=auth)
            assert ok.status_code == 200 and ok.content == (tmp_path / "a" / "demo" / f"{sop}.dcm").read_bytes()
            assert client.get(internal.replace("/demo/", "/other/") + sop, headers=auth).status_code == 404, \
                "another node's copy is another object"
            assert client.get(url_a + "/internal/instances/demo/" + sop, headers=auth).status_code == 404


def test_holder_dies_mid_retrieval_and_another_replica_finishes(redis_url, tmp_path):
    prefix, secret = f"test:{secrets.token_hex(6)}:", secrets.token_hex(16)
    pacs = SlowPacs(generate_demo_datasets(), ae_title="SLOWPACS")
    pacs.delay = 0.3                      # 24 instances: ~7 s for the whole series
    pacs.start()
    try:
        cfg_a = config(redis_url, prefix, secret, pacs, tmp_path / "a" / "spool", http_port=free_port())
        b = settings_from_dict(config(redis_url, prefix, secret, pacs, tmp_path / "b"))
        with gateway_process(cfg_a, tmp_path / "a") as (url_a, proc_a), running_gateway(b) as url_b:
            # Replica A takes the lease and retrieves; its client reads slowly (in the background).
            threading.Thread(target=lambda: _swallow(url_a + SERIES_URL), daemon=True).start()
            _wait(lambda: pacs.counters["sent"] >= 3, "A's retrieval started")
            # Replica B's request joins it as a follower and copies what A announces...
            result: dict[str, httpx.Response] = {}
            joined = threading.Thread(
                target=lambda: result.update(r=httpx.get(url_b + SERIES_URL, headers=ANY_TS, timeout=90)))
            joined.start()
            _wait(lambda: len(spooled(tmp_path / "b")) >= 2, "B copies from A")
            # ...until A dies without a word (no end entry, its lease left to expire).
            proc_a.kill()
            proc_a.wait(10)
            killed_at = time.monotonic()
            copied = spooled(tmp_path / "b")
            sent_by_a = pacs.counters["sent"]
            assert sent_by_a < len(ALL_SOPS), "A was stopped mid-retrieval"
            pacs.delay = 0.0
            joined.join(60)
            assert not joined.is_alive()
            r = result["r"]
            assert r.status_code == 200
            uids = sop_uids(r)
            assert sorted(uids) == sorted(ALL_SOPS), "B's response is complete"
            assert time.monotonic() - killed_at < 20, "B took over once A's lease expired"
        assert pacs.counters["get"] == 2, "A's retrieval, then B's for what was still missing"
        takeover = pacs.received_retrieve_identifiers[-1]
        assert takeover.QueryRetrieveLevel == "IMAGE"
        asked = set(takeover.SOPInstanceUID) if takeover["SOPInstanceUID"].VM > 1 else {takeover.SOPInstanceUID}
        assert asked and asked.isdisjoint(copied), "B asked the PACS only for what it did not have"
    finally:
        pacs.stop()


def test_cross_replica_c_move(redis_url, tmp_path):
    """The PACS delivers A's C-MOVE to B's storage SCP (one AE title, two replicas): A still answers."""
    prefix, secret = f"test:{secrets.token_hex(6)}:", secrets.token_hex(16)
    scp_a, scp_b = free_port(), free_port()
    with DemoPacs(generate_demo_datasets(), ae_title="MOVEPACS",
                  move_destinations={"DICOMWEBGW": ("127.0.0.1", scp_b)}) as pacs:
        spool_a, spool_b = tmp_path / "a" / "spool", tmp_path / "b" / "spool"
        cfg_a = config(redis_url, prefix, secret, pacs, spool_a, retrieve="move", dimse_port=scp_a,
                       http_port=free_port())
        cfg_b = config(redis_url, prefix, secret, pacs, spool_b, retrieve="move", dimse_port=scp_b,
                       http_port=free_port())
        with gateway_process(cfg_a, tmp_path / "a") as (url_a, _), gateway_process(cfg_b, tmp_path / "b") as (url_b, _):
            r = httpx.get(url_a + SERIES_URL, headers=ANY_TS, timeout=60)
            assert r.status_code == 200
            assert sorted(sop_uids(r)) == sorted(ALL_SOPS)
            assert pacs.counters["move"] == 1, "one C-MOVE"
            assert pacs.counters["sent"] == len(ALL_SOPS)
            assert spooled(spool_b) == ALL_SOPS, "the sub-operations arrived at B's storage SCP"
            assert spooled(spool_a) == ALL_SOPS, "and were copied to A"
            metrics_b = httpx.get(url_b + "/metrics").text
            assert "dwg_unexpected_stores_total 0\n" in metrics_b
            assert "dwg_retrievals_total 0\n" in metrics_b, "B only received; A retrieved"


def test_internal_endpoint_refused_without_a_shared_secret(redis_url, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="gateway.cluster")
    port = free_port()
    with DemoPacs(generate_demo_datasets(), ae_title="NOSECRET") as pacs:
        settings = settings_from_dict(config(redis_url, f"test:{secrets.token_hex(6)}:", None, pacs,
                                             tmp_path / "s", internal_port=port, probed=True))
        with running_gateway(settings) as url:
            meta = httpx.get(url + SERIES_URL + "/metadata", timeout=60)
            assert meta.status_code == 200 and len(meta.json()) == len(ALL_SOPS), "serves alone"
            try:
                httpx.get(f"http://127.0.0.1:{port}/internal/instances/1.2.3", timeout=2)
                raise AssertionError("the internal endpoint must not listen without a shared secret")
            except httpx.ConnectError:
                pass
    assert any("shared_secret" in rec.getMessage() for rec in caplog.records)


def test_replicas_serve_alone_when_redis_dies(tmp_path):
    """Redis killed: the lease cannot be taken, each replica retrieves for itself (bounded wait)."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server must be installed (scripts/install-test-deps.sh)"
    port = free_port()
    redis = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: redis_ping("127.0.0.1", port), "redis-server started", 10)
        url, secret = f"redis://127.0.0.1:{port}/0", secrets.token_hex(16)
        with DemoPacs(generate_demo_datasets(), ae_title="NOREDIS") as pacs:
            a = settings_from_dict(config(url, "t:", secret, pacs, tmp_path / "a"))
            b = settings_from_dict(config(url, "t:", secret, pacs, tmp_path / "b"))
            with running_gateway(a) as url_a, running_gateway(b) as url_b:
                first = CT["series"][0]
                meta = f"/dicom-web/studies/{CT['study_uid']}/series/{first['series_uid']}/metadata"
                assert httpx.get(url_a + meta, timeout=60).status_code == 200
                assert httpx.get(url_b + meta, timeout=60).status_code == 200
                assert pacs.counters["get"] == 1, "with Redis: one retrieval"
                redis.kill()
                redis.wait(10)
                started = time.monotonic()
                with ThreadPoolExecutor(2) as pool:
                    results = list(pool.map(lambda root: httpx.get(root + SERIES_URL + "/metadata", timeout=60),
                                            [url_a, url_b]))
                assert [len(r.json()) for r in results] == [len(ALL_SOPS)] * 2
                assert time.monotonic() - started < 15, "bounded wait for Redis, then each replica alone"
                assert pacs.counters["get"] == 3, "each replica retrieved the new series itself"
    finally:
        redis.kill()
        redis.wait(10)


def _swallow(url: str) -> None:
    try:
        with httpx.stream("GET", url, headers=ANY_TS, timeout=60) as r:
            for _ in r.iter_bytes(4096):
                time.sleep(0.05)
    except httpx.HTTPError:
        pass          # the replica is killed under it


def _wait(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.05)
