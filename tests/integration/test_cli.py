"""The console script, run as a real subprocess: serve, echo, demo."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.demo_data import DEMO_STUDIES
from gateway.dimse.demo_pacs import DemoPacs
from tests.support.server import free_port

CLI = [sys.executable, "-m", "gateway.cli"]


def run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=60, **kw)


def write_config(tmp_path: Path, nodes: list[dict]) -> Path:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": nodes}))
    return cfg


@pytest.fixture()
def pacs():
    with DemoPacs([], ae_title="ECHOME") as p:
        yield p


def test_echo_reports_each_node_and_fails_on_any_failure(tmp_path, pacs):
    good = {"name": "good", "ae_title": "ECHOME", "host": "127.0.0.1", "port": pacs.port}
    bad = {"name": "bad", "ae_title": "NOPE", "host": "127.0.0.1", "port": free_port(),
           "timeouts": {"connect": 1}}
    cfg = write_config(tmp_path, [good, bad])
    result = run(["echo", "--config", str(cfg), "good"])
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "good" in result.stdout
    result = run(["echo", "--config", str(cfg)])
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "bad" in result.stdout and "NodeUnreachable" in result.stdout
    assert pacs.counters["echo"] == 2
    assert run(["echo", "--config", str(cfg), "missing"]).returncode == 2


def test_config_errors_name_the_key(tmp_path):
    cfg = write_config(tmp_path, [{"name": "x", "ae_title": "X", "host": "h", "port": 1,
                                   "timeouts": {"dimse": "slow"}}])
    result = run(["serve", "--config", str(cfg)])
    assert result.returncode == 2
    assert "nodes[x].timeouts.dimse" in result.stderr
    env = dict(os.environ, GATEWAY_HTTP__PORT="not-a-port", GATEWAY_NODES__X__TIMEOUTS__DIMSE="5")
    result = run(["echo", "--config", str(cfg)], env=env)
    assert result.returncode == 2 and "http.port" in result.stderr


def test_serve_refuses_non_loopback_without_auth(tmp_path, pacs):
    cfg = write_config(tmp_path, [{"name": "p", "ae_title": "ECHOME", "host": "127.0.0.1", "port": pacs.port}])
    result = run(["serve", "--config", str(cfg), "--host", "0.0.0.0", "--port", str(free_port())])
    assert result.returncode == 2 and "auth" in result.stderr


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


def test_serve_with_config_and_env_override(tmp_path, pacs):
    cfg = write_config(tmp_path, [{"name": "p", "ae_title": "ECHOME", "host": "127.0.0.1", "port": 1}])
    port = free_port()
    env = dict(os.environ, GATEWAY_NODES__P__PORT=str(pacs.port), GATEWAY_CONFIG=str(cfg))
    proc = subprocess.Popen(CLI + ["serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz?echo=1").json()
        assert ready["nodes"]["p"]["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_serve_runs_on_the_configured_event_loop(tmp_path, pacs, loop):
    """http.event_loop: asyncio by default (uvloop's socket writes hold the GIL), uvloop on request."""
    cfg = write_config(tmp_path, [{"name": "p", "ae_title": "ECHOME", "host": "127.0.0.1", "port": pacs.port}])
    port = free_port()
    env = dict(os.environ, GATEWAY_CONFIG=str(cfg))
    if loop == "uvloop":
        env["GATEWAY_HTTP__EVENT_LOOP"] = "uvloop"
    proc = subprocess.Popen(CLI + ["serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz?echo=1").json()["nodes"]["p"]["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert f"serving on 127.0.0.1:{port}, event loop {loop}" in out


def test_demo_command_serves_the_demo_studies():
    port = free_port()
    proc = subprocess.Popen(CLI + ["demo", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        r = httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=30)
        assert r.status_code == 200
        assert len(r.json()) == len(DEMO_STUDIES)
        mf = httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies", params={"ModalitiesInStudy": "OT"}).json()
        assert len(mf) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/dicom-web" in out
    assert '"qidoRoot"' in out and "@ohif/extension-default.dataSourcesModule.dicomweb" in out


def test_serve_over_https_with_a_certificate(tmp_path, pacs):
    """HTTPS without an ingress (http.tls_cert_file / tls_key_file), checked with a real TLS client."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                           "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                           "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True)
    assert made.returncode == 0, f"openssl is needed for this test: {made.stderr}"
    port = free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({
        "http": {"port": port, "tls_cert_file": str(cert), "tls_key_file": str(key)},
        "nodes": [{"name": "p", "ae_title": "ECHOME", "host": "127.0.0.1", "port": pacs.port}]}))
    proc = subprocess.Popen(CLI + ["serve", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=2,
                              verify=ssl.create_default_context(cafile=str(cert)))
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "the HTTPS server did not start"
                time.sleep(0.2)
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)   # plain HTTP is not served
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    half = tmp_path / "half.yaml"
    half.write_text(yaml.safe_dump({"http": {"tls_cert_file": str(cert)},
                                    "nodes": [{"name": "p", "ae_title": "X", "host": "h", "port": 1}]}))
    result = run(["serve", "--config", str(half)])
    assert result.returncode == 2 and "http.tls_key_file" in result.stderr
