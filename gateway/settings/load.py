"""Building the one :class:`Settings`: ``load_settings`` reads the YAML file (``--config`` or
``GATEWAY_CONFIG``), applies the environment (:mod:`gateway.settings.env`) and checks the secrets the
config names are set; ``settings_from_dict`` validates a raw mapping section by section with the
converters of :mod:`gateway.settings.convert`, then the rules that span sections (HTTPS needs both
files, ``stow_node`` names a node, ``cache.tls`` needs ``rediss://``, ...).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.settings.auth import _api_keys, _oidc
from gateway.settings.convert import (
    _ae_title,
    _bool,
    _choice,
    _env_name,
    _fields,
    _file,
    _http_url,
    _int,
    _num,
    _opt_str,
    _ratio,
    _Section,
    _size,
    _str,
    _str_list,
    _url,
)
from gateway.settings.env import apply_env_overrides
from gateway.settings.nodes import _cache_tls, _dimse_tls, _node
from gateway.settings.sections import (
    AuditSection,
    AuthSection,
    CacheSection,
    CacheTls,
    CacheTtl,
    ClusterSection,
    ConfigError,
    DimseTls,
    GatewaySection,
    HttpSection,
    LimitsSection,
    LoggingSection,
    OidcSection,
    ProfilingSection,
    RetrievalSection,
    Settings,
    SpoolSection,
    TracingSection,
)

DIMSE_ENGINE_ENV = "GATEWAY_GATEWAY__DIMSE_ENGINE"
"""The variable load_settings applies to ``gateway.dimse_engine``; settings_from_dict reads it too (only
this key) when the mapping does not set it, so a test suite can run every node on either engine."""


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
            event_loop=h.get("event_loop", dh.event_loop, _choice("asyncio", "uvloop")),
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
