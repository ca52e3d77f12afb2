"""The configuration's shape: frozen dataclasses, one per section of the YAML file (``Settings`` and
what it holds: ``PacsNode`` with its timeouts, quirks and TLS, ``GatewaySection``, ``HttpSection``,
``CacheSection``, ``AuthSection``, ...), their defaults, and :class:`ConfigError`, raised for any value
that does not fit them. No parsing here (that is :mod:`gateway.settings.load` and the converters of
:mod:`gateway.settings.convert`); the few methods read secrets the config names but never holds
(``CacheSection.password``, ``TracingSection.headers``). Each field's key in the YAML file is its name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import unquote


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the offending key path."""


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
    # asyncio (default) or uvloop. uvloop writes to a socket while holding the GIL, so every
    # multipart part of a cold retrieve stalls the DIMSE thread receiving the next instances:
    # measured, a cold study C-GET took 1.3-1.7x as long with uvloop; uvloop serves ~15 % more small
    # cached QIDO requests per second (docs/architecture.md, "HTTP edge").
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"


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
