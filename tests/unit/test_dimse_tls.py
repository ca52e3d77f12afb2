"""DICOM TLS (PS3.15 Annex B.1) and Redis TLS without a network: settings, contexts, failure mapping.

The real peers (Orthanc, storescp, redis-server with TLS) are in tests/integration/test_dimse_tls.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cache.redis import RedisCache
from gateway.app import make_cache
from gateway.dimse import tls
from gateway.dimse.outcomes import association_failure, tls_failure
from gateway.errors import AssociationAborted, DimseTimeout, NodeUnreachable
from gateway.settings import (
    CacheTls,
    ConfigError,
    DimseTls,
    NodeTls,
    PacsNode,
    load_settings,
    settings_from_dict,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM)."""
    if shutil.which("openssl") is None:
        pytest.fail("'openssl' not on PATH (Debian package 'openssl')")
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], cwd=d, check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def node(**tls_kw: object) -> PacsNode:
    return PacsNode("pacs1", "PACS1", "127.0.0.1", 11112, tls=NodeTls(**tls_kw))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- settings


def _with_node_tls(**kw: object) -> dict[str, object]:
    return {"nodes": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "pacs", "port": 4242, "tls": kw}]}


def test_node_tls_settings(cert: tuple[Path, Path]) -> None:
    s = settings_from_dict(_with_node_tls(enabled=True, ca_file=str(cert[0]), cert_file=str(cert[0]),
                                          key_file=str(cert[1]), verify=False, server_name="pacs.example.org"))
    t = s.nodes[0].tls
    assert t == NodeTls(True, str(cert[0]), str(cert[0]), str(cert[1]), False, "pacs.example.org")
    assert settings_from_dict(_with_node_tls()).nodes[0].tls == NodeTls()
    # A prepared but disabled block may name files that are not there (yet).
    assert not settings_from_dict(_with_node_tls(ca_file="/nowhere/ca.pem")).nodes[0].tls.enabled


@pytest.mark.parametrize("raw, message", [
    (_with_node_tls(enabled=True, ca_file="/nowhere/ca.pem"), "nodes[orthanc].tls.ca_file: file not found"),
    (_with_node_tls(enabled=True, cert_file="/nowhere/c.pem"), "nodes[orthanc].tls.cert_file: file not found"),
    (_with_node_tls(enabled="yes"), "nodes[orthanc].tls.enabled: expected true or false"),
    (_with_node_tls(enabled=True, verfy=False), "nodes[orthanc].tls.verfy: unknown key"),
    ({"gateway": {"dimse_tls": {"enabled": True}}}, "gateway.dimse_tls.cert_file: required"),
    ({"gateway": {"dimse_tls": {"enabled": True, "cert_file": "/nowhere.pem"}}},
     "gateway.dimse_tls.cert_file: file not found"),
    ({"cache": {"password_env": "not a name"}}, "cache.password_env: expected the name"),
    ({"cache": {"tls": {"ca_file": "/nowhere.pem"}}}, "cache.tls.ca_file: file not found"),
])
def test_tls_settings_errors_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(raw)
    assert str(err.value).startswith(message), str(err.value)


def test_dimse_tls_and_cache_tls_cross_checks(cert: tuple[Path, Path]) -> None:
    c, k = str(cert[0]), str(cert[1])
    with pytest.raises(ConfigError, match=r"^gateway\.dimse_tls\.ca_file: required with require_client_cert"):
        settings_from_dict({"gateway": {"dimse_tls": {"enabled": True, "cert_file": c, "key_file": k,
                                                      "require_client_cert": True}}})
    s = settings_from_dict({"gateway": {"dimse_tls": {"enabled": True, "cert_file": c, "key_file": k,
                                                      "ca_file": c, "require_client_cert": True}}})
    assert s.gateway.dimse_tls == DimseTls(True, c, k, c, True)
    with pytest.raises(ConfigError, match=r"^cache\.tls: needs a rediss:// cache\.url"):
        settings_from_dict({"cache": {"url": "redis://r:6379/0", "tls": {"ca_file": c}}})
    s = settings_from_dict({"cache": {"url": "rediss://r:6380/0", "tls": {"ca_file": c}}})
    assert s.cache.tls == CacheTls(ca_file=c)


def test_password_env_is_read_from_the_environment_never_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cache: {url: 'rediss://redis:6380/0', password_env: REDIS_PASSWORD}\n")
    s = load_settings(cfg, env={"REDIS_PASSWORD": "s3cret"})
    assert s.cache.password_env == "REDIS_PASSWORD"
    assert s.cache.password({"REDIS_PASSWORD": "s3cret"}) == "s3cret"
    assert "s3cret" not in repr(s)
    with pytest.raises(ConfigError, match="^cache.password_env: environment variable REDIS_PASSWORD is not set"):
        load_settings(cfg, env={})
    env = {"GATEWAY_NODES__ORTHANC__AE_TITLE": "O", "GATEWAY_NODES__ORTHANC__HOST": "h",
           "GATEWAY_NODES__ORTHANC__PORT": "1", "GATEWAY_NODES__ORTHANC__TLS__VERIFY": "false"}
    assert load_settings(None, env=env).nodes[0].tls.verify is False


def test_schema_and_example_know_the_tls_keys() -> None:
    schema = json.loads((ROOT / "gateway" / "config.schema.json").read_text())
    props = schema["properties"]
    node_tls = props["nodes"]["items"]["properties"]["tls"]["properties"]
    assert set(node_tls) == set(NodeTls.__dataclass_fields__)
    assert set(props["gateway"]["properties"]["dimse_tls"]["properties"]) == set(DimseTls.__dataclass_fields__)
    assert set(props["cache"]["properties"]["tls"]["properties"]) == set(CacheTls.__dataclass_fields__)
    example = load_settings(ROOT / "gateway" / "config.example.yaml", env={})
    assert example.nodes[0].tls == NodeTls() and example.gateway.dimse_tls == DimseTls()


# ----------------------------------------------------------------------------- contexts


def test_client_context_is_built_once_per_node(cert: tuple[Path, Path]) -> None:
    n = node(enabled=True, ca_file=str(cert[0]), cert_file=str(cert[0]), key_file=str(cert[1]))
    context = tls.client_context(n)
    assert context is not None and tls.client_context(n) is context
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    attempts = tls.attempt(n), tls.attempt(n)
    assert attempts[0] is not None and attempts[1] is not None and attempts[0] is not attempts[1]
    assert attempts[0].tls_args == (attempts[0], "127.0.0.1")
    assert tls.client_context(node()) is None and tls.attempt(node()) is None


def test_client_context_without_verification_and_with_server_name(cert: tuple[Path, Path]) -> None:
    unverified = tls.client_context(node(enabled=True, verify=False))
    assert unverified is not None and not unverified.check_hostname
    assert unverified.verify_mode == ssl.CERT_NONE
    named = tls.attempt(node(enabled=True, ca_file=str(cert[0]), server_name="pacs.example.org"))
    assert named is not None and named.server_hostname == "pacs.example.org"


def test_a_certificate_that_does_not_load_is_a_config_error(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^nodes\[pacs1\]\.tls\.ca_file: cannot load"):
        tls.prepare([node(enabled=True, ca_file=str(junk))])
    with pytest.raises(ConfigError, match=r"^nodes\[pacs1\]\.tls\.cert_file: cannot load"):
        tls.prepare([node(enabled=True, ca_file=str(cert[0]), cert_file=str(junk))])
    with pytest.raises(ConfigError, match=r"^gateway\.dimse_tls\.cert_file: cannot load"):
        tls.server_context(DimseTls(enabled=True, cert_file=str(junk)))


def test_server_context_client_certificates(cert: tuple[Path, Path]) -> None:
    c, k = str(cert[0]), str(cert[1])
    assert tls.server_context(DimseTls()) is None
    required = tls.server_context(DimseTls(True, c, k, c, True))
    optional = tls.server_context(DimseTls(True, c, k, c, False))
    anonymous = tls.server_context(DimseTls(True, c, k))
    assert required is not None and required.verify_mode == ssl.CERT_REQUIRED
    assert optional is not None and optional.verify_mode == ssl.CERT_OPTIONAL
    assert anonymous is not None and anonymous.verify_mode == ssl.CERT_NONE
    assert required.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_handshake_failure_is_kept_by_the_attempt(cert: tuple[Path, Path]) -> None:
    """The peer closes during the handshake (a port that is not TLS): the attempt keeps the error.
    As pynetdicom does, the socket is wrapped first and connected then (the handshake runs in connect)."""
    attempt = tls.attempt(node(enabled=True, ca_file=str(cert[0])))
    assert attempt is not None
    with socket.create_server(("127.0.0.1", 0)) as listener:
        wrapped = attempt.wrap_socket(socket.socket(), server_side=False,
                                      server_hostname=attempt.server_hostname)
        wrapped.settimeout(5)

        def close_at_once() -> None:
            conn, _ = listener.accept()
            conn.close()

        closer = threading.Thread(target=close_at_once)
        closer.start()
        with pytest.raises(OSError):
            wrapped.connect(listener.getsockname())
        closer.join()
        wrapped.close()
    assert attempt.error is not None
    err = tls_failure("pacs1", attempt.error, elapsed=0.01)
    assert isinstance(err, NodeUnreachable) and "TLS" in err.detail and err.node == "pacs1"


def test_server_handshake_is_bounded_in_time(cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A client that connects and stays silent cannot hold the storage SCP's accept loop."""
    monkeypatch.setattr(tls, "SERVER_HANDSHAKE_TIMEOUT", 0.2)
    context = tls.server_context(DimseTls(True, str(cert[0]), str(cert[1])))
    assert context is not None
    ours, silent = socket.socketpair()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "gateway.dimse.tls"), pytest.raises(OSError):
        context.wrap_socket(ours, server_side=True)
    assert time.monotonic() - started < 2
    assert "DICOM TLS handshake" in caplog.text
    silent.close()


# ----------------------------------------------------------------------------- failure mapping


class _Assoc:
    def __init__(self, *, rejected: bool = False, aborted: bool = False) -> None:
        self.is_rejected = rejected
        self.is_aborted = aborted


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_code = code
    exc.verify_message = message
    return exc


@pytest.mark.parametrize("error, words", [
    (_verify_error(10, "certificate has expired"), ["certificate has expired", "renewed"]),
    (_verify_error(19, "self-signed certificate in certificate chain"), ["self-signed", "nodes[pacs1].tls"]),
    (_verify_error(62, "Hostname mismatch, certificate is not valid for 'x'."),
     ["Hostname mismatch", "nodes[pacs1].tls.server_name"]),
    (ConnectionResetError(104, "Connection reset by peer"), ["closed the connection during the TLS handshake"]),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), ["closed the connection"]),
])
def test_tls_failures_are_502_naming_the_node_and_tls(error: OSError, words: list[str]) -> None:
    err = association_failure(_Assoc(aborted=True), "pacs1", connected=False, started=time.monotonic(),
                              connect_timeout=5, tls_enabled=True, tls_error=error)
    assert isinstance(err, NodeUnreachable) and err.status_code == 502 and err.node == "pacs1"
    assert err.detail.startswith("node pacs1: DICOM TLS failure")
    for word in words:
        assert word in err.detail, err.detail


def test_refused_client_certificate_and_handshake_timeout() -> None:
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    err = tls_failure("pacs1", alert, elapsed=0.1)
    assert isinstance(err, NodeUnreachable) and "refused our client certificate" in err.detail
    slow = tls_failure("pacs1", TimeoutError("timed out"), elapsed=5.0)
    assert isinstance(slow, DimseTimeout) and slow.status_code == 504 and "TLS handshake timed out" in slow.detail


def test_plain_connection_to_a_tls_node_hints_at_tls() -> None:
    err = association_failure(_Assoc(aborted=True), "pacs1", connected=True, started=time.monotonic(),
                              connect_timeout=5)
    assert isinstance(err, AssociationAborted) and "nodes[pacs1].tls" in err.detail
    configured = association_failure(_Assoc(aborted=True), "pacs1", connected=True, started=time.monotonic(),
                                     connect_timeout=5, tls_enabled=True)
    assert "nodes[pacs1].tls" not in configured.detail


# ----------------------------------------------------------------------------- Redis


def test_rediss_pool_gets_tls_and_the_password_from_env(cert: tuple[Path, Path]) -> None:
    cache = RedisCache("rediss://:in-url@redis.example.org:6380/2", password="from-env",
                       tls_ca_file=str(cert[0]), tls_cert_file=str(cert[0]), tls_key_file=str(cert[1]))
    try:
        pool = cache._pool
        kw = pool.connection_kwargs
        assert pool.connection_class.__name__ == "SSLConnection"
        assert kw["password"] == "from-env"           # password_env wins over the URL's
        assert kw["ssl_ca_certs"] == str(cert[0]) and kw["ssl_certfile"] == str(cert[0])
        assert kw["ssl_keyfile"] == str(cert[1]) and kw["ssl_cert_reqs"] == "required"
        assert kw["ssl_check_hostname"] is True and kw["ssl_min_version"] == ssl.TLSVersion.TLSv1_2
        assert repr(cache).startswith("RedisCache(rediss://redis.example.org:6380/2")
        assert "from-env" not in repr(cache) and "in-url" not in repr(cache)
    finally:
        asyncio.run(cache.close())
    with pytest.raises(ValueError, match="rediss://"):
        RedisCache("redis://redis:6379/0", tls_ca_file=str(cert[0]))


def test_make_cache_passes_password_env_and_tls(cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWG_UNIT_REDIS_PASSWORD", "pw-from-env")
    settings = settings_from_dict({"cache": {"url": "rediss://redis:6380/0", "password_env": "DWG_UNIT_REDIS_PASSWORD",
                                             "tls": {"ca_file": str(cert[0])}}})
    cache = make_cache(settings)
    try:
        assert isinstance(cache, RedisCache)
        kw = cache._pool.connection_kwargs
        assert kw["password"] == "pw-from-env" and kw["ssl_ca_certs"] == str(cert[0])
    finally:
        asyncio.run(cache.close())
    plain = make_cache(settings_from_dict({"cache": {"url": "redis://redis:6379/0"}}))
    try:
        assert isinstance(plain, RedisCache)
        assert "ssl_ca_certs" not in plain._pool.connection_kwargs
        assert plain._pool.connection_kwargs.get("password") is None
    finally:
        asyncio.run(plain.close())
