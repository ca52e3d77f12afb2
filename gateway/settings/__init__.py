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

The package is a leaf of the gateway's layers (docs/architecture.md, "Layers"): it imports nothing
else of the gateway. Import from ``gateway.settings``; its modules are:

* :mod:`~gateway.settings.sections`: the frozen dataclasses (``Settings``, ``PacsNode``, the
  sections) and :class:`ConfigError`;
* :mod:`~gateway.settings.load`: ``load_settings`` and ``settings_from_dict``, the cross-section rules;
* :mod:`~gateway.settings.env`: ``apply_env_overrides``, the ``GATEWAY_*`` layer;
* :mod:`~gateway.settings.convert`: the value converters naming the key path in their errors;
* :mod:`~gateway.settings.nodes`: one ``nodes[]`` entry, and the TLS blocks;
* :mod:`~gateway.settings.auth`: API keys, grants, OIDC.
"""

from gateway.settings.env import apply_env_overrides
from gateway.settings.load import DIMSE_ENGINE_ENV, load_settings, settings_from_dict
from gateway.settings.sections import (
    DEFAULT_QUERY_IDLE_SECONDS,
    OPERATIONS,
    SAFE_ALGORITHMS,
    ApiKey,
    AuditSection,
    AuthSection,
    CacheSection,
    CacheTls,
    CacheTtl,
    ClaimGrant,
    ClusterSection,
    ConfigError,
    DimseTimeouts,
    DimseTls,
    GatewaySection,
    Grant,
    HttpSection,
    LimitsSection,
    LoggingSection,
    NodeQuirks,
    NodeTls,
    OidcSection,
    PacsNode,
    ProfilingSection,
    RetrievalSection,
    Settings,
    SpoolSection,
    TracingSection,
    Unset,
    is_configured,
)

__all__ = [
    "DEFAULT_QUERY_IDLE_SECONDS",
    "DIMSE_ENGINE_ENV",
    "OPERATIONS",
    "SAFE_ALGORITHMS",
    "ApiKey",
    "AuditSection",
    "AuthSection",
    "CacheSection",
    "CacheTls",
    "CacheTtl",
    "ClaimGrant",
    "ClusterSection",
    "ConfigError",
    "DimseTimeouts",
    "DimseTls",
    "GatewaySection",
    "Grant",
    "HttpSection",
    "LimitsSection",
    "LoggingSection",
    "NodeQuirks",
    "NodeTls",
    "OidcSection",
    "PacsNode",
    "ProfilingSection",
    "RetrievalSection",
    "Settings",
    "SpoolSection",
    "TracingSection",
    "Unset",
    "apply_env_overrides",
    "is_configured",
    "load_settings",
    "settings_from_dict",
]
