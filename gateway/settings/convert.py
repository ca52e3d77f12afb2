"""The value converters of the loader: ``_Section`` reads one mapping of the raw YAML, refusing
unknown keys, and each converter (``_int``, ``_num``, ``_bool``, ``_str``, ``_size``, ``_url``,
``_file``, ``_choice``, ...) checks one value and raises :class:`ConfigError` naming its key path
(``nodes[orthanc].port: expected an integer ...``). They are private to the package: the section
builders (:mod:`gateway.settings.load`, :mod:`~gateway.settings.nodes`, :mod:`~gateway.settings.auth`)
import them from here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.settings.sections import ConfigError

T = TypeVar("T")

_SIZE_UNITS = {"": 1, "B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
               "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}


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
