"""Identity and trust: OIDC bearer tokens against a JWKS the test serves over HTTP, API keys stored
hashed, grants per node and per operation over real (in-process) PACS, and the audit trail."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.demo_data import DEMO_STUDIES, generate_demo_datasets
from gateway.dimse.demo_pacs import DemoPacs
from gateway.settings import ConfigError, settings_from_dict
from tests.support.server import running_gateway

pytestmark = pytest.mark.integration

AUDIENCE = "dicomweb-gateway"
API_KEY = "kiosk-key-1234"


class Issuer:
    """An OIDC issuer on a free loopback port: discovery document and JWKS, keys it can rotate."""

    def __init__(self) -> None:
        self.keys = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.jwks_fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks.json"}
                elif self.path == "/jwks.json":
                    issuer.jwks_fetches += 1
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def jwks(self) -> dict[str, object]:
        keys = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec_key.public_key()))
        keys.append({**ec_jwk, "kid": "ec1", "use": "sig", "alg": "ES256"})
        return {"keys": keys}

    def token(self, kid: str = "k1", key: object = None, alg: str = "RS256", **claims: object) -> str:
        now = int(time.time())
        payload = {"iss": self.url, "aud": AUDIENCE, "sub": "dr-house", "azp": "ohif", "iat": now,
                   "exp": now + 300, "realm_access": {"roles": ["pacs-reader"]}, **claims}
        signing = key or (self.ec_key if alg.startswith("ES") else self.keys[kid])
        return jwt.encode({k: v for k, v in payload.items() if v is not None}, signing, algorithm=alg,
                          headers={"kid": kid})

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    issuer = Issuer()
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def two_pacs() -> Iterator[tuple[DemoPacs, DemoPacs]]:
    """Node a holds the first four demo studies, node b the others."""
    datasets = generate_demo_datasets()
    first = {s["study_uid"] for s in DEMO_STUDIES[:4]}
    with DemoPacs([d for d in datasets if d.StudyInstanceUID in first], ae_title="NODEA") as a, \
            DemoPacs([d for d in datasets if d.StudyInstanceUID not in first], ae_title="NODEB") as b:
        yield a, b


@pytest.fixture(scope="module")
def gateway(issuer, two_pacs, tmp_path_factory) -> Iterator[tuple[str, object]]:
    a, b = two_pacs
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    settings = settings_from_dict({
        "gateway": {"stow_node": "a"},
        "auth": {"mode": "oidc",
                 "api_keys": [{"sha256": hashlib.sha256(API_KEY.encode()).hexdigest(), "name": "kiosk",
                               "grants": [{"nodes": ["b"], "operations": ["search", "retrieve"]}]}],
                 "oidc": {"issuer": issuer.url, "audience": [AUDIENCE], "algorithms": ["RS256", "ES256"],
                          "clock_skew": 5, "jwks_refresh_interval": 2,
                          "grants": [{"claim": "realm_access.roles", "value": "pacs-reader", "nodes": ["a"],
                                      "operations": ["search", "retrieve"]},
                                     {"claim": "scope", "value": "dicomweb.store", "nodes": ["a"],
                                      "operations": ["store"]}]}},
        "audit": {"file": str(audit)},
        "nodes": [{"name": "a", "ae_title": "NODEA", "host": "127.0.0.1", "port": a.port},
                  {"name": "b", "ae_title": "NODEB", "host": "127.0.0.1", "port": b.port}]})
    with running_gateway(settings) as url:
        yield url, audit


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def studies(url: str, headers: dict[str, str], node: str | None = None) -> httpx.Response:
    root = f"/nodes/{node}/dicom-web" if node else "/dicom-web"
    return httpx.get(url + root + "/studies", headers=headers, timeout=30)


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("case", ["bad signature", "expired", "not yet valid", "wrong issuer", "wrong audience",
                                  "alg none", "HS256 with the public key", "unknown kid", "garbage"])
def test_every_bad_token_is_401_with_a_challenge(gateway, issuer, case):
    url, _ = gateway
    now = int(time.time())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = issuer.keys["k1"].public_key().public_bytes(
        encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo)
    token = {
        "bad signature": lambda: issuer.token(key=other),
        "expired": lambda: issuer.token(exp=now - 60, iat=now - 600),
        "not yet valid": lambda: issuer.token(nbf=now + 600),
        "wrong issuer": lambda: issuer.token(iss="https://evil.example"),
        "wrong audience": lambda: issuer.token(aud="someone-else"),
        "alg none": lambda: b64({"alg": "none", "kid": "k1"}) + "." + b64(
            {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": now + 300}) + ".",
        "HS256 with the public key": lambda: b64({"alg": "HS256", "kid": "k1", "typ": "JWT"}) + "." + b64(
            {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": now + 300}) + "." + base64.urlsafe_b64encode(
            hmac.new(public_pem, b"x", hashlib.sha256).digest()).rstrip(b"=").decode(),
        "unknown kid": lambda: issuer.token(kid="nobody", key=other),
        "garbage": lambda: "not.a.jwt",
    }[case]()
    r = studies(url, bearer(token))
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized", (case, r.text)
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="dicomweb-gateway"') and 'error="invalid_token"' in challenge


def test_a_valid_token_searches_only_the_nodes_it_is_granted(gateway, issuer, two_pacs):
    url, _ = gateway
    ok = studies(url, bearer(issuer.token()))
    assert ok.status_code == 200
    node_a = {s["study_uid"] for s in DEMO_STUDIES[:4]}
    found = {s["0020000D"]["Value"][0] for s in ok.json()}
    assert found and found <= node_a, "the federated search silently left node b out"
    es = studies(url, bearer(issuer.token(kid="ec1", alg="ES256")))
    assert es.status_code == 200, "ES256 keys work too"


def test_forbidden_and_unknown_nodes_look_the_same(gateway, issuer):
    url, _ = gateway
    token = bearer(issuer.token())
    forbidden = studies(url, token, node="b")
    unknown = studies(url, token, node="nosuchnode")
    assert forbidden.status_code == unknown.status_code == 403
    assert forbidden.json()["error"] == unknown.json()["error"] == "Forbidden"
    s = DEMO_STUDIES[5]
    assert httpx.get(f"{url}/nodes/b/dicom-web/studies/{s['study_uid']}/metadata", headers=token,
                     timeout=30).status_code == 403
    # A federated retrieve never reaches node b: the study is only there, so it is not found.
    assert httpx.get(f"{url}/dicom-web/studies/{s['study_uid']}/metadata", headers=token,
                     timeout=30).status_code == 404


def test_store_needs_the_store_grant(gateway, issuer, two_pacs):
    url, _ = gateway
    a, _ = two_pacs
    ds = generate_demo_datasets()[0]
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + buf.getvalue() + b"\r\n--B--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}
    denied = httpx.post(url + "/dicom-web/studies", content=body, headers={**headers, **bearer(issuer.token())},
                        timeout=30)
    assert denied.status_code == 403
    before = a.counters.get("store", 0)
    stored = httpx.post(url + "/dicom-web/studies", content=body, timeout=30,
                        headers={**headers, **bearer(issuer.token(scope="openid dicomweb.store"))})
    assert stored.status_code == 200 and a.counters.get("store", 0) == before + 1


def test_api_keys_are_checked_by_their_hash_and_have_their_own_grants(gateway):
    url, _ = gateway
    assert studies(url, {"X-Api-Key": "wrong"}).status_code == 401
    assert studies(url, {"Authorization": "Bearer wrong"}).status_code == 401
    ok = studies(url, {"X-Api-Key": API_KEY})
    node_b = {s["study_uid"] for s in DEMO_STUDIES[4:]}
    assert ok.status_code == 200 and {s["0020000D"]["Value"][0] for s in ok.json()} <= node_b
    assert studies(url, {"X-Api-Key": API_KEY}, node="a").status_code == 403


def test_rotated_keys_are_fetched_on_an_unknown_kid_at_a_bounded_rate(gateway, issuer):
    url, _ = gateway
    time.sleep(2.1)                                   # past the refresh interval of earlier tests
    issuer.keys["k2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fetches = issuer.jwks_fetches
    assert studies(url, bearer(issuer.token(kid="k2"))).status_code == 200, "the new key was fetched"
    assert issuer.jwks_fetches == fetches + 1
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for i in range(10):                               # forged kids cannot make the gateway hammer the issuer
        assert studies(url, bearer(issuer.token(kid=f"forged{i}", key=other))).status_code == 401
    assert issuer.jwks_fetches <= fetches + 2


def test_every_access_has_an_audit_record(gateway, issuer):
    url, audit = gateway
    token = bearer(issuer.token())
    s = DEMO_STUDIES[0]
    series = s["series"][0]
    sop = series["sop_instance_uids"][0]
    httpx.get(url + "/dicom-web/studies?PatientID=DGW0001", headers={**token, "X-Request-ID": "req-42"}, timeout=30)
    httpx.get(f"{url}/nodes/a/dicom-web/studies/{s['study_uid']}/series/{series['series_uid']}/metadata",
              headers=token, timeout=30)
    httpx.get(f"{url}/nodes/a/dicom-web/studies/{s['study_uid']}/series/{series['series_uid']}/instances/{sop}/frames/1",
              headers=token, timeout=30)
    httpx.get(url + "/dicom-web/studies", headers=bearer("bad.bad.bad"), timeout=30)
    time.sleep(0.2)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    by_id = {r["DicomwebGateway"]["request_id"]: r for r in records}
    search = by_id["req-42"]
    assert search["EventIdentification"]["EventID"]["code"] == "110112"
    assert search["ActiveParticipant"][0]["UserID"] == "dr-house"
    assert search["ActiveParticipant"][0]["AlternativeUserID"] == "ohif"
    assert search["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    query = next(o for o in search["ParticipantObjectIdentification"] if "ParticipantObjectQuery" in o)
    assert base64.b64decode(query["ParticipantObjectQuery"]) == b"PatientID=DGW0001"
    retrieves = [r for r in records if r["DicomwebGateway"]["operation"] == "retrieve"
                 and r["DicomwebGateway"]["status"] == 200]
    assert len(retrieves) >= 2
    for r in retrieves[-2:]:
        assert r["DicomwebGateway"]["node"] == "a" and r["DicomwebGateway"]["bytes"] > 0
        ids = {o["ParticipantObjectID"] for o in r["ParticipantObjectIdentification"]}
        assert s["study_uid"] in ids and series["series_uid"] in ids
        assert r["EventIdentification"]["EventOutcomeIndicator"] == "0"
    denied = [r for r in records if r["DicomwebGateway"]["status"] == 401]
    assert denied and denied[-1]["EventIdentification"]["EventID"]["code"] == "110114"
    assert denied[-1]["EventIdentification"]["EventOutcomeIndicator"] == "4"


def test_unsafe_oidc_configurations_are_refused():
    with pytest.raises(ConfigError, match="algorithms"):
        settings_from_dict({"auth": {"mode": "oidc", "oidc": {"issuer": "https://i", "audience": ["a"],
                                                              "algorithms": ["HS256"]}}})
    with pytest.raises(ConfigError, match="algorithms"):
        settings_from_dict({"auth": {"mode": "oidc", "oidc": {"issuer": "https://i", "audience": ["a"],
                                                              "algorithms": ["none"]}}})
    with pytest.raises(ConfigError, match="audience"):
        settings_from_dict({"auth": {"mode": "oidc", "oidc": {"issuer": "https://i"}}})
    with pytest.raises(ConfigError, match="sha256"):
        settings_from_dict({"auth": {"mode": "api_key", "api_keys": [{"sha256": "abc"}]}})
