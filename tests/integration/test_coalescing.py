"""Single-flight C-FINDs (gateway/coalescing.py), counted at the PACS: concurrent identical QIDOs over a
real Orthanc cost it one C-FIND, on one gateway and across two replicas sharing Redis; a killed
winner is taken over by the replica that followed it; an error reaches every joiner and is not
kept; one joiner leaving does not cancel the C-FIND for the others, the last one does. ``/metrics``
counts the flights, the joiners and the flights followed on another replica, by node.

Orthanc counts C-FINDs through a Lua ``IncomingFindRequestFilter`` that logs each one and holds it
for a configurable time (so concurrent requests really overlap); the fault-injection cases use the
in-process pynetdicom SCP (``DemoPacs``), which counts C-FIND and C-CANCEL requests itself.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from gateway.demo_data import generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import settings_from_dict
from tests.support.server import free_port, running_gateway

from .peers import OrthancPeer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NO_CACHE = {"Cache-Control": "no-cache"}
N = 16
UNPROBED = {"enabled": False}
"""Profiling off for every test here: they count C-FINDs at the PACS, and the probe's own would be
counted."""

LUA = """
function IncomingFindRequestFilter(query, origin)
  print('DWG-CFIND ' .. (query['0008,0052'] or '?'))
  local f = io.open('{delay}', 'r')
  local delay = 0
  if f then delay = tonumber(f:read('*l')) or 0; f:close() end
  local t = os.clock()
  while os.clock() - t < delay do end
  return query
end
"""


class CountingOrthanc:
    def __init__(self, peer: OrthancPeer, delay_file: Path) -> None:
        self.peer = peer
        self.delay_file = delay_file

    def finds(self) -> int:
        """C-FIND requests Orthanc received so far (its Lua filter logs each one on arrival)."""
        return self.peer.log_path.read_text(errors="replace").count("DWG-CFIND")

    def hold(self, seconds: float) -> None:
        """Each C-FIND from now on takes at least ``seconds`` (CPU time of Orthanc's Lua filter)."""
        self.delay_file.write_text(f"{seconds}\n")

    def node(self) -> dict:
        return {"name": "orthanc", "ae_title": self.peer.ae_title, "host": "127.0.0.1",
                "port": self.peer.dicom_port}


@pytest.fixture(scope="module")
def counting(tmp_path_factory: pytest.TempPathFactory, demo_files: list[Path]) -> Iterator[CountingOrthanc]:
    # Orthanc runs as its service user: the script and the delay file live where it can read them.
    luadir = Path(tempfile.mkdtemp(prefix="dwg-lua-"))
    luadir.chmod(0o755)
    delay, script = luadir / "delay", luadir / "count.lua"
    delay.write_text("0\n")
    script.write_text(LUA.replace("{delay}", str(delay)))
    for path in (delay, script):
        path.chmod(0o644)
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc-count"), dicomweb=False,
                       extra_config={"LuaScripts": [str(script)]})
    try:
        peer.start()
        peer.load(demo_files)
        yield CountingOrthanc(peer, delay)
    finally:
        peer.stop()
        shutil.rmtree(luadir, ignore_errors=True)


def settled(counting: CountingOrthanc) -> int:
    """The count once Orthanc's log has caught up (it is written asynchronously)."""
    time.sleep(0.3)
    return counting.finds()


def cost_of_one(counting: CountingOrthanc, url: str, path: str, params: dict) -> tuple[int, bytes]:
    """C-FINDs one uncached request costs, and its body."""
    counting.hold(0)
    before = settled(counting)
    single = httpx.get(url + path, params=params, headers=NO_CACHE, timeout=30)
    assert single.status_code == 200, single.text
    cost = settled(counting) - before
    assert cost >= 1
    return cost, single.content


def burst(urls: list[str], path: str, params: dict, n: int = N) -> list[httpx.Response]:
    """``n`` requests at once, spread over ``urls``; every other one with ``no-cache``."""
    def one(i: int) -> httpx.Response:
        headers = NO_CACHE if i % 2 == 0 else {}
        return httpx.get(urls[i % len(urls)] + path, params=params, headers=headers, timeout=60)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def coalesced(url: str) -> dict[str, float]:
    """The single-flight's counters of node ``orthanc`` on ``/metrics`` (0 until counted)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {key: float(value) for key, value in
              (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("dwg_find_"))}
    return {name: values.get(f'dwg_find_{name}_total{{node="orthanc"}}', 0.0)
            for name in ("flights", "joined", "followed")}


def cleanup(redis_url: str, prefix: str) -> None:
    server = redis.Redis.from_url(redis_url)
    try:
        found = list(server.scan_iter(match=prefix + "*"))
        if found:
            server.delete(*found)
    finally:
        server.close()


def test_concurrent_identical_qidos_cost_orthanc_one_c_find(counting):
    settings = settings_from_dict({"nodes": [counting.node()],
                                   "profiling": UNPROBED})
    with running_gateway(settings) as url:
        path, params = "/dicom-web/studies", {"PatientID": "DGW0001"}
        cost, body = cost_of_one(counting, url, path, params)
        counting.hold(0.5)
        before, counted = counting.finds(), coalesced(url)
        responses = burst([url], path, params)
        assert [r.status_code for r in responses] == [200] * N
        assert all(r.content == body for r in responses)
        assert settled(counting) - before == cost, f"{N} requests, no-cache ones included, cost one request's C-FINDs"
        counting.hold(0)
        after = coalesced(url)
        assert after["flights"] - counted["flights"] == cost, "/metrics: one flight per C-FIND Orthanc saw"
        # The no-cache half cannot be answered from the cache: all but the first joined its C-FINDs.
        assert after["joined"] - counted["joined"] >= (N // 2 - 1) * cost
        assert after["followed"] == 0, "one replica: nothing to follow"


def test_two_replicas_sharing_redis_cost_orthanc_one_c_find(counting, redis_url):
    prefix, secret = f"test:{secrets.token_hex(6)}:", secrets.token_hex(16)

    def replica() -> dict:
        return {"cache": {"url": redis_url, "prefix": prefix, "timeout": 1.0},
                "cluster": {"internal_port": free_port(), "shared_secret": secret},
                "nodes": [counting.node()], "profiling": UNPROBED}

    try:
        with running_gateway(settings_from_dict(replica())) as url_a, \
                running_gateway(settings_from_dict(replica())) as url_b:
            path, params = "/dicom-web/studies", {"PatientID": "DGW0003"}
            cost, body = cost_of_one(counting, url_a, path, params)
            counting.hold(0.5)
            before = counting.finds()
            followed = coalesced(url_a)["followed"] + coalesced(url_b)["followed"]
            responses = burst([url_a, url_b], path, {**params, "includefield": "StudyDescription"})
            assert [r.status_code for r in responses] == [200] * N
            # The same answer from both replicas, each with its own base in RetrieveURL.
            assert len({r.content.replace(url_b.encode(), url_a.encode()) for r in responses}) == 1
            assert settled(counting) - before == cost, "one C-FIND per identifier for both replicas"
            # Both replicas asked (nothing of it was cached yet), Orthanc answered one of them.
            now = coalesced(url_a)["followed"] + coalesced(url_b)["followed"]
            assert now - followed >= 1, "/metrics: a flight answered by the other replica's C-FIND"
    finally:
        counting.hold(0)
        cleanup(redis_url, prefix)


@contextmanager
def gateway_process(cfg: dict, workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m gateway.cli serve`` with its own YAML (a replica that can be killed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gateway.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    url = f"http://127.0.0.1:{cfg['http']['port']}"
    log_path = workdir / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
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
            proc.kill()
        proc.wait(15)


def test_a_killed_winner_is_taken_over_by_its_follower(redis_url, tmp_path):
    prefix, secret = f"test:{secrets.token_hex(6)}:", secrets.token_hex(16)
    # DGW0002 has one study: with a pause per match and at the end the C-FIND takes ~4 s.
    with DemoPacs(generate_demo_datasets(), ae_title="SLOWFIND", find_delay=2.0) as pacs:
        def replica(**extra) -> dict:
            return {"cache": {"url": redis_url, "prefix": prefix, "timeout": 1.0},
                    "cluster": {"internal_port": free_port(), "shared_secret": secret},
                    "spool": {"path": str(tmp_path / secrets.token_hex(4))},
                    "nodes": [{"name": "slow", "ae_title": "SLOWFIND", "host": "127.0.0.1", "port": pacs.port}],
                    "profiling": UNPROBED, **extra}

        path, params = "/dicom-web/studies", {"PatientID": "DGW0002"}
        try:
            with gateway_process(replica(http={"host": "127.0.0.1", "port": free_port()}), tmp_path / "a") \
                    as (url_a, proc_a), running_gateway(settings_from_dict(replica())) as url_b, \
                    ThreadPoolExecutor(2) as pool:
                winner = pool.submit(httpx.get, url_a + path, params=params, headers=NO_CACHE, timeout=60)
                deadline = time.monotonic() + 20
                while pacs.counters["find"] == 0:       # A's C-FIND reached the PACS: A holds the lease
                    assert time.monotonic() < deadline, "replica A never asked the PACS"
                    time.sleep(0.02)
                follower = pool.submit(httpx.get, url_b + path, params=params, headers=NO_CACHE, timeout=60)
                time.sleep(1.0)
                assert pacs.counters["find"] == 1, "replica B follows A's C-FIND instead of asking"
                proc_a.kill()
                answer = follower.result(timeout=60)
                assert answer.status_code == 200 and len(answer.json()) == 1
                assert pacs.counters["find"] == 2, "A's lease expired: B asked the PACS itself"
                with pytest.raises(httpx.TransportError):
                    winner.result(timeout=60)
        finally:
            cleanup(redis_url, prefix)


class SlowFailingPacs(DemoPacs):
    """Fails every C-FIND with ``fail_status``, after ``hold`` seconds (so callers overlap)."""

    hold = 0.0

    def _on_find(self, event):
        time.sleep(self.hold)
        yield from super()._on_find(event)


def test_an_error_reaches_every_joiner_and_is_not_kept():
    with SlowFailingPacs(generate_demo_datasets(), ae_title="FAILING", fail_status=0xA700) as pacs:
        pacs.hold = 0.5
        settings = settings_from_dict({"nodes": [{"name": "failing", "ae_title": "FAILING",
                                                  "host": "127.0.0.1", "port": pacs.port}],
                                       "profiling": UNPROBED})
        with running_gateway(settings) as url:
            responses = burst([url], "/dicom-web/studies", {"PatientID": "DGW0001"}, n=8)
            assert [r.status_code for r in responses] == [502] * 8
            assert all(r.json()["node"] == "failing" and r.json()["error"] == "DimseFailure" for r in responses)
            assert pacs.counters["find"] == 1, "one failed C-FIND, shared by its joiners"
            again = httpx.get(url + "/dicom-web/studies", params={"PatientID": "DGW0001"}, timeout=30)
            assert again.status_code == 502 and pacs.counters["find"] == 2, "the error was not kept"


def test_one_joiner_leaving_does_not_cancel_the_others_the_last_one_does():
    # A pause of 1 s per match: the callers below leave (0.5 s) while the C-FIND is still pending on
    # either engine, so the C-CANCEL has a pending response to go with (0.5 s raced the C-FIND's end).
    with DemoPacs(generate_demo_datasets(), ae_title="SLOWFIND", find_delay=1.0) as pacs:
        settings = settings_from_dict({"nodes": [{"name": "slow", "ae_title": "SLOWFIND",
                                                  "host": "127.0.0.1", "port": pacs.port}],
                                       "profiling": UNPROBED})
        with running_gateway(settings) as url, ThreadPoolExecutor(4) as pool:
            path, params = url + "/dicom-web/studies", {"PatientID": "DGW0001"}
            # DGW0001 has two studies: the C-FIND takes ~3 s (a pause per match and at the end).
            impatient = pool.submit(httpx.get, path, params=params, headers=NO_CACHE, timeout=0.5)
            patient = pool.submit(httpx.get, path, params=params, headers=NO_CACHE, timeout=30)
            with pytest.raises(httpx.TimeoutException):
                impatient.result()
            answer = patient.result()
            assert answer.status_code == 200 and len(answer.json()) == 2
            assert pacs.counters["find"] == 1 and pacs.counters["cancel"] == 0

            params = {"PatientID": "DGW0002"}
            leaving = [pool.submit(httpx.get, path, params=params, headers=NO_CACHE, timeout=0.5)
                       for _ in range(2)]
            for call in leaving:
                with pytest.raises(httpx.TimeoutException):
                    call.result()
            deadline = time.monotonic() + 10
            while pacs.counters["cancel"] == 0:
                assert time.monotonic() < deadline, "the last caller leaving must cancel the C-FIND"
                time.sleep(0.05)
            assert pacs.counters["find"] == 2 and pacs.counters["cancel"] == 1
