"""DICOM TLS (PS3.15 Annex B.1) against real TLS peers, and the Redis cache over TLS with a password.

Peers: Orthanc with its DICOM TLS options (C-ECHO/C-FIND/C-GET through QIDO and WADO; C-MOVE to the
gateway's storage SCP over TLS with ``"UseDicomTls": true``) and DCMTK's ``storescp +tls`` (C-STORE
through STOW-RS), one with a valid certificate and one with an expired one. A throw-away PKI is made
by the ``openssl`` command line (``cryptography`` is not in the lock): a CA, a second CA nobody
trusts, certificates for the peers and the gateway (both roles: client to the PACS, server for
C-MOVE arrivals), an expired one. docs/architecture.md, "DIMSE edge" and "Cache".

Every failure case is checked for what a client gets: a 502 naming the node and saying "TLS", fast
(never a hang until some timeout).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cache.redis import RedisCache
from gateway.app import make_cache
from gateway.demo_data import DEMO_STUDIES
from gateway.settings import load_settings, settings_from_dict
from tests.support.multipart import parse_multipart
from tests.support.server import running_gateway

from .peers import HOST, OrthancPeer, PeerError, PeerTls, _PeerProcess, dcmtk_tool, free_port

pytestmark = pytest.mark.integration

CR = next(s for s in DEMO_STUDIES if s["modalities"] == ["CR"])
DX = next(s for s in DEMO_STUDIES if s["modalities"] == ["DX"])
GATEWAY_AE = "DICOMWEBGW"
TIMEOUTS = {"connect": 3, "acse": 5, "dimse": 20, "network": 30}
DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


# ----------------------------------------------------------------------------- a throw-away PKI


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path           # a CA that signed nothing we meet: the "wrong CA" case
    peer: tuple[Path, Path]  # certificate, key: Orthanc and storescp (server and C-MOVE client)
    gateway: tuple[Path, Path]   # the gateway: client to the PACS, server for C-MOVE arrivals
    expired: tuple[Path, Path]


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:true",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def _leaf(d: Path, name: str, ca: tuple[Path, Path], *, expired: bool = False) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost, usable as TLS server and client, signed by ``ca``."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:false\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    if not expired:
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)
    else:
        # `openssl x509` (3.0) cannot back-date; `openssl ca` takes explicit validity dates.
        db = d / "ca-db"
        db.mkdir(exist_ok=True)
        (db / "index.txt").write_text("")
        (db / "serial").write_text("1000\n")
        cnf = d / "ca.cnf"
        cnf.write_text(f"[ca]\ndefault_ca = d\n[d]\ndir = {db}\ndatabase = {db}/index.txt\n"
                       f"serial = {db}/serial\nnew_certs_dir = {db}\ndefault_md = sha256\npolicy = p\n"
                       "unique_subject = no\n[p]\ncommonName = supplied\n")
        _openssl("ca", "-batch", "-config", cnf.name, "-cert", str(ca[0]), "-keyfile", str(ca[1]),
                 "-in", f"{name}.csr", "-out", f"{name}.pem", "-startdate", "20200101000000Z",
                 "-enddate", "20200102000000Z", "-extfile", ext.name, "-notext", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        raise PeerError("'openssl' not on PATH (Debian package 'openssl')")
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "test-ca")
    other = _ca(d, "other-ca")
    return Pki(ca=ca[0], other_ca=other[0], peer=_leaf(d, "peer", ca), gateway=_leaf(d, "gateway", ca),
               expired=_leaf(d, "expired", ca, expired=True))


# ----------------------------------------------------------------------------- peers


class StorescpTls(_PeerProcess):
    """DCMTK's ``storescp +tls``: accepts C-STORE over TLS only, requires a client certificate."""

    name = "storescp"

    def __init__(self, workdir: Path, tls: PeerTls, *, ae_title: str = "STORESCP") -> None:
        super().__init__(workdir, ae_title, tcp_nodelay=True, startup_timeout=15.0)
        self.tls = tls
        self.executable = dcmtk_tool("storescp")
        self.storage = self.workdir / "received"

    def _start(self) -> None:
        assert self.tls is not None
        self.storage.mkdir(exist_ok=True)
        self._spawn([self.executable, "-aet", self.ae_title, "+tls", str(self.tls.private_key),
                     str(self.tls.certificate), "-pw", "+cf", str(self.tls.trusted), "-rc",
                     "-od", str(self.storage), str(self.dicom_port)])
        self._wait_dicom()

    def received(self) -> set[str]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.storage.iterdir()}


def _peer_tls(pki: Pki, cert: tuple[Path, Path]) -> PeerTls:
    return PeerTls(certificate=cert[0], private_key=cert[1], trusted=pki.ca,
                   client_certificate=pki.gateway[0], client_private_key=pki.gateway[1])


@pytest.fixture(scope="module")
def scp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc_tls(pki: Pki, scp_port: int, demo_files: list[Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    # The gateway as a C-MOVE destination reached over TLS (object form of a DicomModalities entry).
    gateway = {"AET": GATEWAY_AE, "Host": HOST, "Port": scp_port, "UseDicomTls": True}
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc-tls"), ae_title="ORTHANCTLS", dicomweb=False,
                       tls=_peer_tls(pki, pki.peer), extra_config={"DicomModalities": {"gateway": gateway}})
    wanted = {CR["study_uid"], DX["study_uid"]}
    files = [p for p in demo_files if str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) in wanted]
    try:
        peer.start()
        peer.load(files)
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def storescp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorescpTls]:
    with StorescpTls(tmp_path_factory.mktemp("storescp-tls"), _peer_tls(pki, pki.peer)) as peer:
        yield peer


@pytest.fixture(scope="module")
def storescp_expired(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorescpTls]:
    with StorescpTls(tmp_path_factory.mktemp("storescp-expired"), _peer_tls(pki, pki.expired)) as peer:
        yield peer


def _node(name: str, peer: _PeerProcess, retrieve: str = "get", **tls: object) -> dict[str, object]:
    node: dict[str, object] = {"name": name, "ae_title": peer.ae_title, "host": HOST, "port": peer.dicom_port,
                               "retrieve": retrieve, "timeouts": TIMEOUTS}
    if tls:
        node["tls"] = tls
    return node


@pytest.fixture(scope="module")
def gw(pki: Pki, scp_port: int, orthanc_tls: OrthancPeer, storescp: StorescpTls,
       storescp_expired: StorescpTls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    ours = {"enabled": True, "ca_file": str(pki.ca), "cert_file": str(pki.gateway[0]),
            "key_file": str(pki.gateway[1])}
    settings = settings_from_dict({
        "gateway": {"ae_title": GATEWAY_AE, "dimse_port": scp_port, "dimse_host": HOST,
                    "dimse_tls": {"enabled": True, "cert_file": str(pki.gateway[0]),
                                  "key_file": str(pki.gateway[1]), "ca_file": str(pki.ca),
                                  "require_client_cert": True}},
        "spool": {"path": str(tmp_path_factory.mktemp("spool"))},
        "nodes": [
            _node("orthanc", orthanc_tls, **ours),
            _node("orthanc-move", orthanc_tls, "move", **ours),
            _node("storescp", storescp, **ours),
            _node("wrong-ca", orthanc_tls, **{**ours, "ca_file": str(pki.other_ca)}),
            _node("wrong-name", orthanc_tls, **{**ours, "server_name": "pacs.example.org"}),
            _node("no-client-cert", orthanc_tls, enabled=True, ca_file=str(pki.ca)),
            _node("plain", orthanc_tls),
            _node("expired", storescp_expired, **ours),
            _node("expired-unverified", storescp_expired, **{**ours, "verify": False}),
        ],
    })
    with running_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


# ----------------------------------------------------------------------------- working TLS


def test_qido_and_wado_over_tls(gw: httpx.Client) -> None:
    """C-FIND and C-GET to Orthanc over TLS, through QIDO-RS and WADO-RS."""
    r = gw.get("/nodes/orthanc/dicom-web/studies", params={"StudyInstanceUID": CR["study_uid"]})
    assert r.status_code == 200, r.text
    assert [s["0020000D"]["Value"][0] for s in r.json()] == [CR["study_uid"]]
    series = CR["series"][0]
    r = gw.get(f"/nodes/orthanc/dicom-web/studies/{CR['study_uid']}/series/{series['series_uid']}",
               headers={"Accept": DICOM})
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.content, r.headers["content-type"])
    got = {str(dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID) for _, body in parts}
    assert got == set(series["sop_instance_uids"])


def _moved(gw: httpx.Client, series: dict[str, Any]) -> None:
    r = gw.get(f"/nodes/orthanc-move/dicom-web/studies/{DX['study_uid']}/series/{series['series_uid']}",
               headers={"Accept": DICOM})
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.content, r.headers["content-type"])
    got = {str(dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID) for _, body in parts}
    assert got == set(series["sop_instance_uids"])


def test_c_move_arrives_at_the_storage_scp_over_tls(gw: httpx.Client) -> None:
    """Orthanc opens its own association to the gateway's storage SCP (which speaks only TLS and
    requires a client certificate), over TLS with its certificate."""
    _moved(gw, DX["series"][0])


def _stow_body(demo_files: list[Path]) -> tuple[bytes, str, str]:
    """One demo instance under fresh UIDs, as a STOW-RS body; returns (body, boundary, its SOP UID)."""
    source = next(p for p in demo_files
                  if str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) == CR["study_uid"])
    ds = dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    boundary = secrets.token_hex(8)
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buffer.getvalue()
            + f"\r\n--{boundary}--\r\n".encode())
    return body, boundary, str(ds.SOPInstanceUID)


def _stow(gw: httpx.Client, node: str, demo_files: list[Path]) -> tuple[httpx.Response, str]:
    body, boundary, sop = _stow_body(demo_files)
    r = gw.post(f"/nodes/{node}/dicom-web/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    return r, sop


def test_stow_over_tls_to_storescp(gw: httpx.Client, storescp: StorescpTls, demo_files: list[Path]) -> None:
    r, sop = _stow(gw, "storescp", demo_files)
    assert r.status_code == 200, r.text
    assert sop in storescp.received()


def test_verify_false_accepts_an_expired_certificate(gw: httpx.Client, storescp_expired: StorescpTls,
                                                     demo_files: list[Path]) -> None:
    r, sop = _stow(gw, "expired-unverified", demo_files)
    assert r.status_code == 200, r.text
    assert sop in storescp_expired.received()


# ----------------------------------------------------------------------------- TLS failures


def _tls_502(gw: httpx.Client, node: str, *words: str) -> str:
    started = time.monotonic()
    r = gw.get(f"/nodes/{node}/dicom-web/studies", params={"StudyInstanceUID": CR["study_uid"]})
    elapsed = time.monotonic() - started
    assert r.status_code == 502, r.text
    body = r.json()
    detail = body["detail"]
    assert body["node"] == node and f"node {node}" in detail and "TLS" in detail, detail
    for word in words:
        assert word in detail, detail
    assert elapsed < TIMEOUTS["connect"], f"{elapsed:.1f} s: a TLS failure must not wait for a timeout"
    return str(detail)


def test_wrong_ca_is_a_502_naming_the_node_and_tls(gw: httpx.Client) -> None:
    _tls_502(gw, "wrong-ca", "certificate was not accepted", "nodes[wrong-ca].tls")


def test_host_name_mismatch_is_a_502(gw: httpx.Client) -> None:
    _tls_502(gw, "wrong-name", "certificate was not accepted", "pacs.example.org")


def test_expired_server_certificate_is_a_502(gw: httpx.Client) -> None:
    _tls_502(gw, "expired", "expired")


def test_expired_certificate_fails_stow_too(gw: httpx.Client, storescp_expired: StorescpTls,
                                            demo_files: list[Path]) -> None:
    r, sop = _stow(gw, "expired", demo_files)
    assert r.status_code == 502, r.text
    assert "TLS" in r.json()["detail"] and "expired" in r.json()["detail"]
    assert sop not in storescp_expired.received()


def test_node_refusing_a_missing_client_certificate_is_a_502(gw: httpx.Client) -> None:
    _tls_502(gw, "no-client-cert")


def test_tls_node_without_tls_on_our_side_is_a_quick_502(gw: httpx.Client) -> None:
    started = time.monotonic()
    r = gw.get("/nodes/plain/dicom-web/studies", params={"StudyInstanceUID": CR["study_uid"]})
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert "node plain" in detail and "TLS" in detail and "nodes[plain].tls" in detail, detail
    assert time.monotonic() - started < TIMEOUTS["connect"]


def _echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="STRANGER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=GATEWAY_AE, tls_args=(context, HOST) if context else None)
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


def test_storage_scp_requires_tls_and_a_client_certificate(gw: httpx.Client, pki: Pki, scp_port: int) -> None:
    """The storage SCP speaks TLS only and, with require_client_cert, only to certificates of ca_file.
    (An association that gets through TLS is then refused by AE title: the gateway only accepts its
    configured PACS, so none of these is ever established.)"""
    assert not _echo(scp_port, None)
    no_cert = ssl.create_default_context(cafile=pki.ca)
    assert not _echo(scp_port, no_cert)
    # The failed handshakes are logged by the gateway; the accept loop goes on: a new C-MOVE works.
    _moved(gw, DX["series"][1])


# ----------------------------------------------------------------------------- Redis over TLS


@pytest.fixture(scope="module")
def redis_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A private redis-server with TLS only (no plain port) and a password; yields (port, password)."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise PeerError("'redis-server' not on PATH (Debian package 'redis-server')")
    workdir = tmp_path_factory.mktemp("redis-tls")
    port, password = free_port(), secrets.token_urlsafe(16)
    log_path = workdir / "redis.log"
    argv = [executable, "--port", "0", "--tls-port", str(port), "--bind", HOST, "--save", "", "--appendonly",
            "no", "--dir", str(workdir), "--logfile", str(log_path), "--requirepass", password,
            "--tls-cert-file", str(pki.peer[0]), "--tls-key-file", str(pki.peer[1]),
            "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "optional"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((HOST, port), timeout=1) as raw, \
                        context.wrap_socket(raw, server_hostname=HOST) as tls_sock:
                    tls_sock.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                    answer = b""
                    while b"+PONG" not in answer and (chunk := tls_sock.recv(64)):
                        answer += chunk
                    if b"+PONG" in answer:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise PeerError(f"redis-server with TLS did not answer on port {port}:\n{tail}")
            time.sleep(0.05)
        yield port, password
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_redis_cache_over_tls_with_a_password_from_the_environment(
        redis_tls: tuple[int, str], pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port, password = redis_tls
    config = tmp_path / "config.yaml"
    config.write_text(f"cache:\n  url: rediss://{HOST}:{port}/0\n  password_env: DWG_TEST_REDIS_PASSWORD\n"
                      f"  timeout: 2\n  tls: {{ca_file: {pki.ca}}}\n")
    settings = load_settings(config, env={"DWG_TEST_REDIS_PASSWORD": password})

    async def scenario() -> None:
        cache = RedisCache(
            settings.cache.url or "", prefix=f"tls:{secrets.token_hex(4)}:", timeout=2,
            password=settings.cache.password({"DWG_TEST_REDIS_PASSWORD": password}),
            tls_ca_file=settings.cache.tls.ca_file)
        try:
            assert await cache.ping()
            await cache.set("k", b"v", 30)
            assert await cache.get("k") == b"v"
            assert await cache.incr("n") == 1 and await cache.incr("n") == 2
            assert not cache.degraded and cache.failures == 0
            assert "rediss://" in repr(cache) and password not in repr(cache)
        finally:
            await cache.close()

        wrong = RedisCache(f"rediss://{HOST}:{port}/0", timeout=2, password="not-the-password",
                           tls_ca_file=str(pki.ca))
        try:
            assert await wrong.get("k") is None and wrong.failures >= 1   # refused: degrades, never raises
        finally:
            await wrong.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert password not in caplog.text


def test_make_cache_builds_the_tls_redis_from_settings(redis_tls: tuple[int, str], pki: Pki,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """gateway.app.make_cache: rediss URL, cache.tls and the password from the process environment."""
    port, password = redis_tls
    monkeypatch.setenv("DWG_TEST_REDIS_PASSWORD", password)
    settings = settings_from_dict({"cache": {"url": f"rediss://{HOST}:{port}/0", "timeout": 2,
                                             "password_env": "DWG_TEST_REDIS_PASSWORD",
                                             "tls": {"ca_file": str(pki.ca)}}})

    async def scenario() -> None:
        cache = make_cache(settings)
        try:
            await cache.set("made", b"1", 30)
            assert await cache.get("made") == b"1"
            assert not cache.degraded
        finally:
            await cache.close()

    asyncio.run(scenario())
