"""Build objects from config dicts.

The rule (one rule for every config in the project):

* A dict with a ``type`` key is an object spec. ``type`` is a class or function (new-style pure-Python
  configs import it), a dotted import string ``"package.module.Name"``, or an mmengine ``LazyObject``.
* Every other key is a keyword argument of that constructor (config keys equal constructor arguments;
  derived sizes are computed in code, never in configs).
* Argument values are built recursively first: a nested dict with ``type`` becomes an object, and so do
  such dicts inside lists and tuples. Dicts without ``type`` stay (plain) dicts, with their values built.
* ``build(spec, **extra)`` adds ``extra`` keyword arguments (e.g. ``grid=dataset.grid``) that the config
  does not hold; a key present in both is an error, so nothing is silently overridden.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def resolve_type(t: Any) -> Any:
    """Class/function for a ``type`` value: the object itself, a dotted string, or a LazyObject."""
    if isinstance(t, str):
        module_name, _, attr = t.rpartition(".")
        if not module_name:
            raise ValueError(f"build: type {t!r} is not a dotted import path like 'package.module.Name'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ImportError(f"build: cannot import module {module_name!r} for type {t!r}: {e}") from e
        if not hasattr(module, attr):
            raise ImportError(f"build: module {module_name!r} has no attribute {attr!r} (type {t!r})")
        return getattr(module, attr)
    if hasattr(t, "build") and type(t).__name__ in ("LazyObject", "LazyAttr"):  # mmengine lazy import
        return t.build()
    if callable(t):
        return t
    raise TypeError(f"build: 'type' must be a class, a function or a dotted string, got {t!r}")


def _build_value(v: Any) -> Any:
    if isinstance(v, Mapping):
        if "type" in v:
            return build(v)
        return {k: _build_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_build_value(x) for x in v)
    return v


def to_plain(v: Any) -> Any:
    """mmengine ConfigDict / nested containers → plain dicts, lists and tuples (nothing is built)."""
    if isinstance(v, Mapping):
        return {k: to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(to_plain(x) for x in v)
    return v


def build(spec: Mapping, **extra: Any) -> Any:
    """Build the object described by ``spec`` (see the module docstring for the rule)."""
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"build: expected a dict with a 'type' key, got {spec!r}")
    kwargs = {k: _build_value(v) for k, v in spec.items() if k != "type"}
    clash = sorted(set(kwargs) & set(extra))
    if clash:
        raise ValueError(f"build: keys {clash} given both by the config and by the caller for {spec['type']!r}")
    cls = resolve_type(spec["type"])
    try:
        return cls(**kwargs, **extra)
    except TypeError as e:
        raise TypeError(f"build: {getattr(cls, '__qualname__', cls)}(**{sorted(kwargs) + sorted(extra)}) "
                        f"failed: {e}") from e
