"""Typed reads of the manifest's JSON objects: a missing or mistyped field is a :class:`BundleError`
naming the field and where it is, never a ``KeyError`` or ``TypeError`` deep inside the runtime."""

from __future__ import annotations

from typing import Any

from mullama_sdk.errors import BundleError


def need_field(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``d[key]``, which must exist and be a ``kind`` (a bool is not a number here)."""
    if key not in d:
        raise BundleError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise BundleError(f"{where}: field {key!r} has type {type(value).__name__}, expected {kind}")
    return value


def optional_field(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``raw[key]`` if present (then it must be a ``kind``), else an empty ``kind``."""
    value = raw.get(key, kind())
    if not isinstance(value, kind):
        raise BundleError(f"{where}: field {key!r} has type {type(value).__name__}, expected {kind.__name__}")
    return value
