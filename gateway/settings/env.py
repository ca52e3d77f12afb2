"""The environment layer of the configuration: ``apply_env_overrides`` lays ``GATEWAY_*`` variables
over the raw YAML mapping before it is validated. A variable names a key path joined by ``__``
(``GATEWAY_CACHE__URL``); nodes are addressed by name (``GATEWAY_NODES__ORTHANC__PORT``), a new
name adding a node; values are read as YAML scalars. The input mapping is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from gateway.settings.sections import ConfigError


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
