"""Parsing of one ``nodes[]`` entry into a :class:`PacsNode` (required keys, name rules, the
tri-state quirks and limits left to the PACS profile, the DIMSE engine), and of the TLS blocks:
a node's ``tls``, the storage SCP's ``gateway.dimse_tls`` and Redis's ``cache.tls``, whose files
must exist when TLS is on (PS3.15 Annex B.1; docs/architecture.md, "DIMSE edge").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from gateway.settings.convert import (
    _ae_title,
    _bool,
    _choice,
    _fields,
    _file,
    _int,
    _num,
    _opt,
    _opt_bool,
    _opt_str,
    _Section,
    _str,
    _unless_null,
)
from gateway.settings.sections import (
    CacheTls,
    ConfigError,
    DimseTimeouts,
    DimseTls,
    NodeQuirks,
    NodeTls,
    PacsNode,
)


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
