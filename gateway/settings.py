"""One typed Settings object, built once at start-up from a YAML file and ``GATEWAY_*`` variables.

Precedence: defaults < YAML file (``--config`` or ``GATEWAY_CONFIG``) < environment. Every key is
overridable from the environment: ``GATEWAY_`` + the key path joined by ``__``, e.g.
``GATEWAY_CACHE__URL=redis://...``; nodes are addressed by name: ``GATEWAY_NODES__ORTHANC__PORT=4243``.
Environment values are read as YAML scalars (``4243`` is an int, ``null``/``true`` work).

Validation happens here and only here: a bad value raises :class:`ConfigError` naming the key
(``nodes[orthanc].timeouts.dimse: expected a number >= 0, got 'slow'``). No other module reads
``os.environ`` for configuration (``gateway.ohif`` only locates its download cache there).
Durations are seconds; sizes accept IEC units (``10GiB``).

The full schema is also published as JSON Schema (``gateway/config.schema.json``) with an example
(``gateway/config.example.yaml``); a unit test keeps the three in step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import unquote

import yaml


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the offending key path."""


T = TypeVar("T")

_SIZE_UNITS = {"": 1, "B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
               "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}


@dataclass(frozen=True)
class DimseTimeouts:
    connect: float = 5.0
    acse: float = 10.0
    dimse: float = 30.0
    network: float = 60.0


@dataclass(frozen=True)
class NodeQuirks:
    """What a PACS does not do by itself; each costs the gateway extra work
    (docs/architecture.md, "Search"; adding one: "How to add").

    Tri-state: True/False as configured, or None (not configured): then the node's PACS profile
    decides, and until it has, the value correct on every PACS (``gateway.profile.decide.SAFE_QUIRKS``;
    docs/architecture.md, "PACS profiles"). Read them from an effective node, never raw."""

    case_sensitive_pn: bool | None = None        # True: PN keys widened, matched locally (safe: True)
    compute_counts: bool | None = None           # fill missing Number Of ... Related ... (safe: True)
    compute_modalities: bool | None = None       # fill missing ModalitiesInStudy (safe: True)
    modalities_in_study_matching: bool | None = None   # False: ignored as a key -> filter locally (safe)
    or_multiple_modalities: bool | None = None   # True: PACS ORs ModalitiesInStudy=CT\MR (safe: False)
    relational_queries: bool | None = None       # True: PACS answers relational C-FIND (safe: False)


class Unset(str):
    """A node choice the operator left out (``retrieve``, ``query_model``): it reads as its default
    (``"get"``, ``"study"``) wherever a node is used, and tells the PACS profile that it may choose
    another (docs/architecture.md, "PACS profiles"). A configured value is a plain ``str``."""

    __slots__ = ()


DEFAULT_QUERY_IDLE_SECONDS = 5.0
"""How long idle query associations are kept for reuse while the node's profile does not say less
(gateway/dimse/pool.py; docs/architecture.md, "PACS profiles")."""


def is_configured(value: object) -> bool:
    """Whether a node setting was configured (not None, not :class:`Unset`)."""
    return value is not None and not isinstance(value, Unset)


@dataclass(frozen=True)
class NodeTls:
    """DICOM TLS to a node (PS3.15 Annex B.1; docs/architecture.md, "DIMSE edge")."""

    enabled: bool = False
    ca_file: str | None = None         # CA bundle that signed the node's certificate; None = system CAs
    cert_file: str | None = None       # our client certificate, for nodes that require one
    key_file: str | None = None        # its private key (None: in cert_file)
    verify: bool = True                # False: no certificate or host name check (test set-ups only)
    server_name: str | None = None     # name the certificate must carry; None = the node's host


@dataclass(frozen=True)
class PacsNode:
    name: str
    ae_title: str
    host: str
    port: int
    retrieve: Literal["get", "move"] = cast(Literal["get", "move"], Unset("get"))
    query_model: Literal["study", "patient"] = cast(Literal["study", "patient"], Unset("study"))
    max_associations: int = 4          # retrievals and stores
    max_query_associations: int = 4    # C-FIND / C-ECHO, a separate budget so retrievals never starve QIDO
    max_results: int = 2000            # per C-FIND; beyond it: C-CANCEL + Warning 299
    max_pdu: int = 131072
    # Tri-state like the quirks (None: not configured, the PACS profile decides; read them from an
    # effective node, docs/architecture.md "PACS profiles"):
    result_cap: int | None = None      # the PACS's own cap on C-FIND matches; 0: none (safe: 0, unknown)
    query_idle_seconds: float | None = None  # idle query associations kept for reuse; 0: none (safe: 5)
    timeouts: DimseTimeouts = field(default_factory=DimseTimeouts)
    quirks: NodeQuirks = field(default_factory=NodeQuirks)
    tls: NodeTls = field(default_factory=NodeTls)
    # The requestor's DIMSE implementation for this node (docs/architecture.md, "DIMSE edge"): the
    # plain-socket engine, or pynetdicom's; unset in the config: gateway.dimse_engine.
    engine: Literal["fast", "pynetdicom"] = "fast"

    def __repr__(self) -> str:
        return f"PacsNode({self.name!r}, {self.ae_title}@{self.host}:{self.port}, retrieve={self.retrieve})"


@dataclass(frozen=True)
class DimseTls:
    """DICOM TLS on the gateway's storage SCP, where C-MOVE sub-operations arrive (PS3.15 Annex B.1)."""

    enabled: bool = False
    cert_file: str | None = None       # the SCP's certificate (required when enabled)
    key_file: str | None = None        # its private key (None: in cert_file)
    ca_file: str | None = None         # CAs whose client certificates are accepted
    require_client_cert: bool = False  # True: a PACS without a certificate signed by ca_file is refused


@dataclass(frozen=True)
class GatewaySection:
    ae_title: str = "DICOMWEBGW"
    dimse_port: int = 11112
    dimse_host: str = "127.0.0.1"       # the storage SCP binds here (loopback unless configured)
    base_url: str | None = None
    stow_node: str | None = None
    dimse_tls: DimseTls = field(default_factory=DimseTls)
    # The storage SCP's implementation (docs/architecture.md, "C-MOVE"): plain sockets, or pynetdicom's;
    # unset in the config: gateway.dimse_engine.
    scp_engine: Literal["fast", "pynetdicom"] = "fast"
    # The requestor's DIMSE implementation for nodes that do not set `engine` (docs/architecture.md,
    # "DIMSE edge"). Also read by settings_from_dict from GATEWAY_GATEWAY__DIMSE_ENGINE (DIMSE_ENGINE_ENV).
    dimse_engine: Literal["fast", "pynetdicom"] = "fast"


@dataclass(frozen=True)
class HttpSection:
    host: str = "127.0.0.1"
    port: int = 8080
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    cors_origins: tuple[str, ...] = ()
    tls_cert_file: str | None = None    # HTTPS without an ingress: PEM certificate (chain) ...
    tls_key_file: str | None = None     # ... and its private key


@dataclass(frozen=True)
class CacheTtl:
    study: float = 60.0
    series: float = 60.0
    instance: float = 300.0
    location: float = 86400.0
    metadata: float = 3600.0      # series metadata, shared by replicas; stale after a STOW into its study


@dataclass(frozen=True)
class CacheTls:
    """TLS to Redis (``rediss://``): the server is verified against ``ca_file`` (None: system CAs)."""

    ca_file: str | None = None
    cert_file: str | None = None       # client certificate, for a Redis with tls-auth-clients
    key_file: str | None = None


@dataclass(frozen=True)
class CacheSection:
    url: str | None = None
    prefix: str = "dwg:"
    ttl: CacheTtl = field(default_factory=CacheTtl)
    max_entries: int = 10000        # in-process cache bound (entries)
    max_bytes: int = 256 << 20      # in-process cache bound (bytes of the values)
    timeout: float = 0.25           # per Redis operation; past it the request goes on without cache
    password_env: str | None = None  # name of the environment variable holding the Redis password
    tls: CacheTls = field(default_factory=CacheTls)   # with a rediss:// url

    def password(self, env: Mapping[str, str] | None = None) -> str | None:
        """The Redis password from ``password_env`` (default env: os.environ); never in the config."""
        if not self.password_env:
            return None
        return (os.environ if env is None else env).get(self.password_env)


@dataclass(frozen=True)
class SpoolSection:
    path: str | None = None
    max_bytes: int = 10 * 1024**3


@dataclass(frozen=True)
class RetrievalSection:
    series_for_frames: bool = True     # metadata/frames of one instance retrieve its whole series
    reject_unexpected_stores: bool = True


@dataclass(frozen=True)
class ClusterSection:
    internal_port: int | None = None
    shared_secret: str | None = None


OPERATIONS: tuple[str, ...] = ("search", "retrieve", "store")
"""What a grant allows on a node: QIDO-RS; WADO-RS/WADO-URI/rendered; STOW-RS."""
SAFE_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                             "ES512", "EdDSA"})
"""Asymmetric JWS algorithms only: never ``none``, never HS* (a public key used as an HMAC secret)."""


@dataclass(frozen=True)
class Grant:
    nodes: tuple[str, ...] = ("*",)          # node names, "*" = every node
    operations: tuple[str, ...] = OPERATIONS


@dataclass(frozen=True)
class ApiKey:
    sha256: str                               # hex SHA-256 of the key: the key itself is never stored
    name: str
    grants: tuple[Grant, ...] = (Grant(),)


@dataclass(frozen=True)
class ClaimGrant:
    """A token whose claim (a dotted path, e.g. ``realm_access.roles``) holds ``value`` gets ``grant``."""

    claim: str
    value: str
    grant: Grant


@dataclass(frozen=True)
class OidcSection:
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    jwks_url: str | None = None               # None: from {issuer}/.well-known/openid-configuration
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    clock_skew: float = 60.0
    jwks_refresh_interval: float = 30.0       # unknown kid: refetch the JWKS at most this often
    client_claim: str = "azp"                 # the client id (Keycloak azp; Entra azp/appid)
    subject_claim: str = "sub"
    grants: tuple[ClaimGrant, ...] = ()


@dataclass(frozen=True)
class AuthSection:
    mode: Literal["none", "api_key", "oidc"] = "none"
    api_keys: tuple[ApiKey, ...] = ()
    open_metrics: bool = False     # with auth: /metrics without credentials (a scraper on a private net)
    oidc: OidcSection = field(default_factory=OidcSection)


@dataclass(frozen=True)
class LimitsSection:
    max_emulation_queries: int = 200     # extra C-FINDs one QIDO request may spend on emulated features
    fanout_concurrency: int = 4
    query_cap: int = 10000               # max results a QIDO answer returns before Warning 299
    max_frames_per_request: int = 4096   # frame numbers one /frames/{list} request may name
    max_rendered_frames: int = 16        # images one /rendered request may produce
    max_rendered_pixels: int = 67108864  # frames x viewport width x height of one /rendered request
    max_decode_bytes: int = 536870912    # decoded size of one frame (rows x columns x samples x bytes)
    max_stow_bytes: int = 4294967296     # one STOW-RS request body (413 past it)
    max_stow_parts: int = 10000          # parts of one STOW-RS request body (413 past it)
    max_requests_per_client: int = 128   # concurrent requests of one client address (429 past it)
    max_requests_total: int = 1024       # concurrent requests of the process (503 past it)


@dataclass(frozen=True)
class AuditSection:
    file: str | None = None                   # JSON lines, one record per access (gateway/audit.py)
    syslog_host: str | None = None            # RFC 5424 syslog target
    syslog_port: int = 514
    syslog_transport: Literal["udp", "tcp"] = "udp"
    include_query: bool = True                # a search's query string in its record (base64)


@dataclass(frozen=True)
class ProfilingSection:
    """PACS profiles: what each node can do, measured with read-only operations (gateway/profile/;
    docs/architecture.md, "PACS profiles")."""

    # Probe each node at first contact (in the background, read-only), then every `interval`: the
    # quirk handling is learned, not configured. Off: safe defaults until probed on demand.
    enabled: bool = True
    interval: float = 86400.0          # seconds before a node is probed again
    identity_check: float = 300.0      # at most this often, one association reads the PACS's implementation
    #                                    class UID / version name; a change (an upgrade) probes again
    probe_move: bool = False           # run the storage SCP so C-MOVE to the gateway can be probed (and
    #                                    chosen) for nodes without `retrieve`; the PACS must know our AE


@dataclass(frozen=True)
class LoggingSection:
    format: Literal["text", "json"] = "text"  # json: one object per line, with the request id
    level: Literal["debug", "info", "warning", "error"] = "info"


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")   # an RFC 9110 token


@dataclass(frozen=True)
class TracingSection:
    """OpenTelemetry traces (gateway/tracing.py), exported over OTLP/HTTP; off, nothing is imported."""

    enabled: bool = False
    endpoint: str = "http://localhost:4318/v1/traces"   # the collector's OTLP/HTTP traces URL
    service_name: str = "dicomweb-gateway"    # the resource's service.name
    sample_ratio: float = 1.0                 # new traces kept (0..1); a caller's traceparent decides its own
    headers_env: str | None = None            # env variable with export headers (auth tokens), see headers()
    timeout: float = 10.0                     # seconds per export request

    def headers(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The export request's headers from ``headers_env`` (default env: os.environ), in the format
        of OTEL_EXPORTER_OTLP_HEADERS: ``name=value`` pairs separated by commas, percent-encoded
        (``authorization=Bearer%20abc,x-scope-orgid=imaging``). Never in the config file."""
        if not self.headers_env:
            return {}
        text = (os.environ if env is None else env).get(self.headers_env, "")
        headers: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = pair.partition("=")
            name, value = unquote(name).strip().lower(), unquote(value).strip()
            if not sep or not _HEADER_NAME.fullmatch(name) or any(c in value for c in "\r\n\0"):
                # The value may be a credential: the error names the variable only.
                raise ConfigError(f"tracing.headers_env: {self.headers_env} is not a list of name=value "
                                  "pairs separated by commas")
            headers[name] = value
        return headers


@dataclass(frozen=True)
class Settings:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    http: HttpSection = field(default_factory=HttpSection)
    nodes: tuple[PacsNode, ...] = ()
    cache: CacheSection = field(default_factory=CacheSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    auth: AuthSection = field(default_factory=AuthSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    audit: AuditSection = field(default_factory=AuditSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    tracing: TracingSection = field(default_factory=TracingSection)
    profiling: ProfilingSection = field(default_factory=ProfilingSection)

    def node(self, name: str) -> PacsNode | None:
        for node in self.nodes:
            if node.name.lower() == name.lower():
                return node
        return None

    @property
    def stow_node(self) -> PacsNode | None:
        if self.gateway.stow_node:
            return self.node(self.gateway.stow_node)
        return self.nodes[0] if self.nodes else None


# ---------------------------------------------------------------- loading


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from an optional YAML file and ``GATEWAY_*`` variables (default env: os.environ)."""
    env = os.environ if env is None else env
    path = path or env.get("GATEWAY_CONFIG") or None
    raw: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        raw = loaded or {}
    raw = apply_env_overrides(raw, env)
    settings = settings_from_dict(raw)
    password_env = settings.cache.password_env
    if password_env and not env.get(password_env):
        raise ConfigError(f"cache.password_env: environment variable {password_env} is not set")
    tracing = settings.tracing
    if tracing.enabled and tracing.headers_env:
        if not env.get(tracing.headers_env):
            raise ConfigError(f"tracing.headers_env: environment variable {tracing.headers_env} is not set")
        tracing.headers(env)   # malformed headers fail start-up, not every export
    return settings


def apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    raw = _deep_copy(raw)
    for name in sorted(env):
        if not name.startswith("GATEWAY_") or name == "GATEWAY_CONFIG" or "__" not in name:
            continue
        parts = [p.lower() for p in name[len("GATEWAY_"):].split("__")]
        try:
            value = yaml.safe_load(env[name]) if env[name] != "" else None
        except yaml.YAMLError:
            value = env[name]
        _set_path(raw, parts, value, name)
    return raw


def _set_path(raw: dict[str, Any], parts: list[str], value: Any, var: str) -> None:
    if parts[0] == "nodes":
        if len(parts) < 3:
            raise ConfigError(f"{var}: nodes are addressed as GATEWAY_NODES__<NAME>__<KEY>")
        nodes = raw.setdefault("nodes", [])
        if not isinstance(nodes, list):
            raise ConfigError("nodes: expected a list")
        node = next((n for n in nodes if isinstance(n, dict) and str(n.get("name", "")).lower() == parts[1]),
                    None)
        if node is None:
            node = {"name": parts[1]}
            nodes.append(node)
        target, rest = node, parts[2:]
    else:
        target, rest = raw, parts
    for key in rest[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            target[key] = nxt
        target = nxt
    target[rest[-1]] = value


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# ---------------------------------------------------------------- validation


class _Section:
    """Reads typed values out of one mapping, naming the key path in every error."""

    def __init__(self, raw: Any, path: str, known: set[str]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(raw).__name__}")
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{self._key(path, sorted(unknown)[0])}: unknown key "
                              f"(known: {', '.join(sorted(known))})")
        self.raw = raw
        self.path = path

    @staticmethod
    def _key(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def get(self, key: str, default: T, convert: Callable[[Any, str], T]) -> T:
        if key not in self.raw or self.raw[key] is None and default is None:
            return default
        return convert(self.raw[key], self._key(self.path, key))

    def sub(self, key: str, known: set[str]) -> _Section:
        return _Section(self.raw.get(key), self._key(self.path, key), known)


def _int(lo: int = 0, hi: int | None = None) -> Callable[[Any, str], int]:
    def convert(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            bounds = f">= {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"{key}: expected an integer {bounds}, got {v!r}")
        return v
    return convert


def _num(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ConfigError(f"{key}: expected a number >= 0 (seconds), got {v!r}")
    return float(v)


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _opt_bool(v: Any, key: str) -> bool | None:
    """A tri-state setting: true, false, or null (not configured)."""
    return None if v is None else _bool(v, key)


def _opt(convert: Callable[[Any, str], T]) -> Callable[[Any, str], T | None]:
    """A tri-state value: ``convert``'s, or null (not configured: the PACS profile decides)."""
    def checked(v: Any, key: str) -> T | None:
        return None if v is None else convert(v, key)
    return checked


def _unless_null(default: T, convert: Callable[[Any, str], T]) -> Callable[[Any, str], T]:
    """``convert``, except that null keeps ``default`` (an :class:`Unset` choice)."""
    def checked(v: Any, key: str) -> T:
        return default if v is None else convert(v, key)
    return checked


def _str(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key}: expected a non-empty string, got {v!r}")
    return v


def _opt_str(v: Any, key: str) -> str | None:
    return None if v is None else _str(v, key)


def _ae_title(v: Any, key: str) -> str:
    if not isinstance(v, str) or not (1 <= len(v.strip()) <= 16) or "\\" in v:
        raise ConfigError(f"{key}: expected an AE title of 1-16 characters, got {v!r}")
    return v.strip()


def _str_list(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f"{key}: expected a list of strings, got {v!r}")
    return tuple(v)


def _size(v: Any, key: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", v, re.IGNORECASE)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    raise ConfigError(f"{key}: expected a size such as 10GiB or 512MiB, got {v!r}")


def _grant(v: Any, key: str) -> Grant:
    if not isinstance(v, dict) or set(v) - {"nodes", "operations"}:
        raise ConfigError(f"{key}: expected {{nodes: [...], operations: [...]}}, got {v!r}")
    nodes = _str_list(v.get("nodes", ["*"]), f"{key}.nodes")
    operations = _str_list(v.get("operations", list(OPERATIONS)), f"{key}.operations")
    bad = [o for o in operations if o not in OPERATIONS]
    if bad:
        raise ConfigError(f"{key}.operations: {bad[0]!r} is not one of {', '.join(OPERATIONS)}")
    return Grant(nodes, operations)


def _api_keys(v: Any, key: str) -> tuple[ApiKey, ...]:
    """Each key as ``{sha256, name, grants}``; a plain string is a legacy key with every right,
    hashed here (only the hash is kept in memory). ``GATEWAY_AUTH__API_KEYS`` may hold the list."""
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected a list of keys, got {type(v).__name__}")
    keys = []
    for i, item in enumerate(v):
        where = f"{key}[{i}]"
        if isinstance(item, str) and item:
            keys.append(ApiKey(hashlib.sha256(item.encode()).hexdigest(), f"key{i + 1}"))
            continue
        if not isinstance(item, dict) or set(item) - {"sha256", "name", "grants"}:
            raise ConfigError(f"{where}: expected a key string or {{sha256, name, grants}}")
        digest = item.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(f"{where}.sha256: expected 64 hex digits (printf %s KEY | sha256sum)")
        grants = item.get("grants", [{}])
        if not isinstance(grants, list):
            raise ConfigError(f"{where}.grants: expected a list")
        keys.append(ApiKey(digest.lower(), _str(item.get("name", f"key{i + 1}"), f"{where}.name"),
                           tuple(_grant(g, f"{where}.grants[{j}]") for j, g in enumerate(grants))))
    return tuple(keys)


def _claim_grants(v: Any, key: str) -> tuple[ClaimGrant, ...]:
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected a list of {{claim, value, nodes, operations}}")
    out = []
    for i, item in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) - {"claim", "value", "nodes", "operations"}:
            raise ConfigError(f"{where}: expected {{claim, value, nodes, operations}}")
        grant = _grant({k: item[k] for k in ("nodes", "operations") if k in item}, where)
        out.append(ClaimGrant(_str(item.get("claim"), f"{where}.claim"),
                              _str(item.get("value"), f"{where}.value"), grant))
    return tuple(out)


def _algorithms(v: Any, key: str) -> tuple[str, ...]:
    algorithms = _str_list(v, key)
    unsafe = [a for a in algorithms if a not in SAFE_ALGORITHMS]
    if unsafe or not algorithms:
        raise ConfigError(f"{key}: {unsafe[0] if unsafe else 'nothing'!r} is not allowed "
                          f"(asymmetric algorithms only: {', '.join(sorted(SAFE_ALGORITHMS))})")
    return algorithms


def _oidc(o: _Section) -> OidcSection:
    d = OidcSection()
    return OidcSection(
        issuer=o.get("issuer", d.issuer, _url),
        audience=o.get("audience", d.audience, _str_list),
        jwks_url=o.get("jwks_url", d.jwks_url, _url),
        algorithms=o.get("algorithms", d.algorithms, _algorithms),
        clock_skew=o.get("clock_skew", d.clock_skew, _num),
        jwks_refresh_interval=o.get("jwks_refresh_interval", d.jwks_refresh_interval, _num),
        client_claim=o.get("client_claim", d.client_claim, _str),
        subject_claim=o.get("subject_claim", d.subject_claim, _str),
        grants=o.get("grants", d.grants, _claim_grants),
    )


def _choice(*options: str) -> Callable[[Any, str], Any]:
    def convert(v: Any, key: str) -> Any:
        if v not in options:
            raise ConfigError(f"{key}: expected one of {', '.join(options)}, got {v!r}")
        return v
    return convert


def _url(v: Any, key: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not re.match(r"^https?://[^/]+", v):
        raise ConfigError(f"{key}: expected an absolute http(s) URL, got {v!r}")
    return v.rstrip("/")


def _ratio(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
        raise ConfigError(f"{key}: expected a number from 0 to 1, got {v!r}")
    return float(v)


def _http_url(v: Any, key: str) -> str:
    url = _url(_str(v, key), key)
    assert url is not None
    return url


def _fields(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _file(v: Any, key: str) -> str | None:
    """A path to an existing file (certificates, keys), or None."""
    if v is None:
        return None
    path = _str(v, key)
    if not Path(path).is_file():
        raise ConfigError(f"{key}: file not found: {path!r}")
    return path


def _env_name(v: Any, key: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ConfigError(f"{key}: expected the name of an environment variable, got {v!r}")
    return v


def _node_tls(s: _Section) -> NodeTls:
    """A node's ``tls``: its files must exist only when it is enabled (a prepared, disabled block is fine)."""
    enabled = s.get("enabled", False, _bool)
    files: Callable[[Any, str], str | None] = _file if enabled else _opt_str
    tls = NodeTls(
        enabled=enabled,
        ca_file=s.get("ca_file", None, files),
        cert_file=s.get("cert_file", None, files),
        key_file=s.get("key_file", None, files),
        verify=s.get("verify", True, _bool),
        server_name=s.get("server_name", None, _opt_str),
    )
    if tls.key_file and not tls.cert_file:
        raise ConfigError(f"{s.path}.cert_file: required with key_file")
    return tls


def _dimse_tls(s: _Section) -> DimseTls:
    enabled = s.get("enabled", False, _bool)
    files: Callable[[Any, str], str | None] = _file if enabled else _opt_str
    tls = DimseTls(
        enabled=enabled,
        cert_file=s.get("cert_file", None, files),
        key_file=s.get("key_file", None, files),
        ca_file=s.get("ca_file", None, files),
        require_client_cert=s.get("require_client_cert", False, _bool),
    )
    if enabled and not tls.cert_file:
        raise ConfigError(f"{s.path}.cert_file: required with enabled: true (the storage SCP's certificate)")
    if enabled and tls.require_client_cert and not tls.ca_file:
        raise ConfigError(f"{s.path}.ca_file: required with require_client_cert: true")
    return tls


def _cache_tls(s: _Section) -> CacheTls:
    tls = CacheTls(**{k: s.get(k, None, _file) for k in ("ca_file", "cert_file", "key_file")})
    if tls.key_file and not tls.cert_file:
        raise ConfigError(f"{s.path}.cert_file: required with key_file")
    return tls


DIMSE_ENGINE_ENV = "GATEWAY_GATEWAY__DIMSE_ENGINE"
"""The variable load_settings applies to ``gateway.dimse_engine``; settings_from_dict reads it too (only
this key) when the mapping does not set it, so a test suite can run every node on either engine."""


def _node(raw: Any, index: int, engine: Literal["fast", "pynetdicom"] = "fast") -> PacsNode:
    label = f"nodes[{raw.get('name', index)}]" if isinstance(raw, dict) else f"nodes[{index}]"
    s = _Section(raw, label, _fields(PacsNode))
    d = PacsNode("x", "X", "h", 1)
    for required in ("name", "ae_title", "host", "port"):
        if s.raw.get(required) is None:
            raise ConfigError(f"{label}.{required}: required")
    name = s.get("name", d.name, _str)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"{label}.name: letters, digits, '-' and '_' only, got {name!r}")
    t = s.sub("timeouts", _fields(DimseTimeouts))
    q = s.sub("quirks", _fields(NodeQuirks))
    dq = NodeQuirks()
    return PacsNode(
        name=name,
        ae_title=s.get("ae_title", d.ae_title, _ae_title),
        host=s.get("host", d.host, _str),
        port=s.get("port", d.port, _int(1, 65535)),
        # Left out (or null): Unset, which the PACS profile may replace (architecture.md, "PACS profiles").
        retrieve=s.get("retrieve", d.retrieve, _unless_null(d.retrieve, _choice("get", "move"))),
        query_model=s.get("query_model", d.query_model,
                          _unless_null(d.query_model, _choice("study", "patient"))),
        max_associations=s.get("max_associations", d.max_associations, _int(1, 64)),
        max_query_associations=s.get("max_query_associations", d.max_query_associations, _int(1, 64)),
        max_results=s.get("max_results", d.max_results, _int(1)),
        max_pdu=s.get("max_pdu", d.max_pdu, _int(0)),
        result_cap=s.get("result_cap", d.result_cap, _opt(_int(0))),
        query_idle_seconds=s.get("query_idle_seconds", d.query_idle_seconds, _opt(_num)),
        timeouts=DimseTimeouts(**{k: t.get(k, getattr(DimseTimeouts(), k), _num)
                                  for k in _fields(DimseTimeouts)}),
        quirks=NodeQuirks(**{k: q.get(k, getattr(dq, k), _opt_bool) for k in _fields(NodeQuirks)}),
        tls=_node_tls(s.sub("tls", _fields(NodeTls))),
        engine=s.get("engine", engine, _choice("fast", "pynetdicom")),
    )


def settings_from_dict(raw: Mapping[str, Any]) -> Settings:
    root = _Section(dict(raw), "", _fields(Settings))
    g = root.sub("gateway", _fields(GatewaySection))
    dg = GatewaySection()
    h = root.sub("http", _fields(HttpSection))
    dh = HttpSection()
    c = root.sub("cache", _fields(CacheSection))
    dc = CacheSection()
    ct = c.sub("ttl", _fields(CacheTtl))
    sp = root.sub("spool", _fields(SpoolSection))
    r = root.sub("retrieval", _fields(RetrievalSection))
    cl = root.sub("cluster", _fields(ClusterSection))
    a = root.sub("auth", _fields(AuthSection))
    lim = root.sub("limits", _fields(LimitsSection))
    au = root.sub("audit", _fields(AuditSection))
    lg = root.sub("logging", _fields(LoggingSection))
    tr = root.sub("tracing", _fields(TracingSection))
    pr = root.sub("profiling", _fields(ProfilingSection))
    dp = ProfilingSection()
    dt = TracingSection()
    dl = LimitsSection()

    raw_nodes = root.raw.get("nodes") or []
    if not isinstance(raw_nodes, list):
        raise ConfigError("nodes: expected a list of nodes")
    engines = _choice("fast", "pynetdicom")
    from_env = engines(os.environ.get(DIMSE_ENGINE_ENV) or dg.dimse_engine, DIMSE_ENGINE_ENV)
    engine: Literal["fast", "pynetdicom"] = g.get("dimse_engine", from_env, engines)
    nodes = tuple(_node(n, i, engine) for i, n in enumerate(raw_nodes))
    seen: set[str] = set()
    for n in nodes:
        if n.name.lower() in seen:
            raise ConfigError(f"nodes[{n.name}].name: duplicate node name")
        seen.add(n.name.lower())

    settings = Settings(
        gateway=GatewaySection(
            ae_title=g.get("ae_title", dg.ae_title, _ae_title),
            dimse_port=g.get("dimse_port", dg.dimse_port, _int(0, 65535)),
            dimse_host=g.get("dimse_host", dg.dimse_host, _str),
            base_url=g.get("base_url", dg.base_url, _url),
            stow_node=g.get("stow_node", dg.stow_node, _opt_str),
            dimse_tls=_dimse_tls(g.sub("dimse_tls", _fields(DimseTls))),
            scp_engine=g.get("scp_engine", engine, engines),
            dimse_engine=engine,
        ),
        http=HttpSection(
            host=h.get("host", dh.host, _str),
            port=h.get("port", dh.port, _int(0, 65535)),
            trusted_proxies=h.get("trusted_proxies", dh.trusted_proxies, _str_list),
            cors_origins=h.get("cors_origins", dh.cors_origins, _str_list),
            tls_cert_file=h.get("tls_cert_file", None, _file),
            tls_key_file=h.get("tls_key_file", None, _file),
        ),
        nodes=nodes,
        cache=CacheSection(
            url=c.get("url", dc.url, _opt_str),
            prefix=c.get("prefix", dc.prefix, _str),
            ttl=CacheTtl(**{k: ct.get(k, getattr(CacheTtl(), k), _num) for k in _fields(CacheTtl)}),
            max_entries=c.get("max_entries", dc.max_entries, _int(1)),
            max_bytes=c.get("max_bytes", dc.max_bytes, _size),
            timeout=c.get("timeout", dc.timeout, _num),
            password_env=c.get("password_env", None, _env_name),
            tls=_cache_tls(c.sub("tls", _fields(CacheTls))),
        ),
        spool=SpoolSection(
            path=sp.get("path", None, _opt_str),
            max_bytes=sp.get("max_bytes", SpoolSection().max_bytes, _size),
        ),
        retrieval=RetrievalSection(**{k: r.get(k, getattr(RetrievalSection(), k), _bool)
                                      for k in _fields(RetrievalSection)}),
        cluster=ClusterSection(
            internal_port=cl.get("internal_port", None, _int(1, 65535)),
            shared_secret=cl.get("shared_secret", None, _opt_str),
        ),
        auth=AuthSection(
            mode=a.get("mode", "none", _choice("none", "api_key", "oidc")),
            api_keys=a.get("api_keys", (), _api_keys),
            open_metrics=a.get("open_metrics", False, _bool),
            oidc=_oidc(a.sub("oidc", _fields(OidcSection))),
        ),
        limits=LimitsSection(**{k: lim.get(k, getattr(dl, k), _int(1)) for k in _fields(LimitsSection)}),
        audit=AuditSection(
            file=au.get("file", None, _opt_str),
            syslog_host=au.get("syslog_host", None, _opt_str),
            syslog_port=au.get("syslog_port", 514, _int(1, 65535)),
            syslog_transport=au.get("syslog_transport", "udp", _choice("udp", "tcp")),
            include_query=au.get("include_query", True, _bool),
        ),
        logging=LoggingSection(
            format=lg.get("format", "text", _choice("text", "json")),
            level=lg.get("level", "info", _choice("debug", "info", "warning", "error")),
        ),
        tracing=TracingSection(
            enabled=tr.get("enabled", dt.enabled, _bool),
            endpoint=tr.get("endpoint", dt.endpoint, _http_url),
            service_name=tr.get("service_name", dt.service_name, _str),
            sample_ratio=tr.get("sample_ratio", dt.sample_ratio, _ratio),
            headers_env=tr.get("headers_env", None, _env_name),
            timeout=tr.get("timeout", dt.timeout, _num),
        ),
        profiling=ProfilingSection(
            enabled=pr.get("enabled", dp.enabled, _bool),
            interval=pr.get("interval", dp.interval, _num),
            identity_check=pr.get("identity_check", dp.identity_check, _num),
            probe_move=pr.get("probe_move", dp.probe_move, _bool),
        ),
    )
    if bool(settings.http.tls_cert_file) != bool(settings.http.tls_key_file):
        raise ConfigError("http.tls_key_file: HTTPS needs both http.tls_cert_file and http.tls_key_file")
    if settings.auth.mode == "oidc" and not settings.auth.oidc.issuer:
        raise ConfigError("auth.oidc.issuer: required with auth.mode: oidc")
    if settings.auth.mode == "oidc" and not settings.auth.oidc.audience:
        raise ConfigError("auth.oidc.audience: required with auth.mode: oidc (the gateway's client id)")
    if settings.auth.mode == "api_key" and not settings.auth.api_keys:
        raise ConfigError("auth.api_keys: at least one key is required with auth.mode: api_key")
    if settings.gateway.stow_node and settings.node(settings.gateway.stow_node) is None:
        raise ConfigError(f"gateway.stow_node: no node named {settings.gateway.stow_node!r}")
    if settings.cache.url and not re.match(r"^(redis|rediss|unix)://", settings.cache.url):
        raise ConfigError(f"cache.url: expected redis://, rediss:// or unix://, got {settings.cache.url!r}")
    if settings.cache.tls != CacheTls() and not (settings.cache.url or "").startswith("rediss://"):
        raise ConfigError("cache.tls: needs a rediss:// cache.url")
    return settings
