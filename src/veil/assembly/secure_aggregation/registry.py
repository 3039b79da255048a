"""Secure-aggregation backends by name, after Opacus' accountant registry.

`secure_aggregation = "NAME"` names a backend: a built-in (`plain`, `secagg`, `ckks`, `tee`;
each module here holds one as `BACKEND` and is imported on first use, so the config and
`veil --help` stay light) or one registered with `register`::

    from veil.assembly.secure_aggregation.registry import register
    register("toy", ToyBackend())

after which a config may say `secure_aggregation = "toy"`; the runner, the config module and the
CLI need no change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from veil.errors import ConfigError

if TYPE_CHECKING:
    from veil.assembly.secure_aggregation.base import SecureAggregation

__all__ = ["BUILT_IN", "backend", "names", "register", "unregister"]

#: The built-in backends: name -> the module that holds it as `BACKEND`.
BUILT_IN: dict[str, str] = {
    "plain": "veil.assembly.secure_aggregation.plain",
    "secagg": "veil.assembly.secure_aggregation.secagg",
    "ckks": "veil.assembly.secure_aggregation.ckks",
    "tee": "veil.assembly.secure_aggregation.tee",
}

_registered: dict[str, SecureAggregation] = {}


def register(name: str, backend: SecureAggregation) -> None:
    """Make `backend` available as ``secure_aggregation = name``. ValueError for a built-in's
    name or a name another backend holds (unregister it first)."""
    if not name or not name.isidentifier():
        raise ValueError(f"a backend name is a plain identifier, got {name!r}")
    if name in BUILT_IN:
        raise ValueError(f"'{name}' is a built-in secure-aggregation backend; pick another name")
    held = _registered.get(name)
    if held is not None and held is not backend:
        raise ValueError(f"'{name}' is already registered to {held!r}; unregister it first")
    _registered[name] = backend


def unregister(name: str) -> None:
    """Remove a backend `register` added (nothing happens for a name it did not add)."""
    _registered.pop(name, None)


def names() -> tuple[str, ...]:
    """Every name `secure_aggregation` may take: the built-ins, then the registered ones."""
    return (*BUILT_IN, *_registered)


def backend(name: str) -> SecureAggregation:
    """The backend called `name`; ConfigError naming the available ones for any other."""
    found = _registered.get(name)
    if found is not None:
        return found
    module = BUILT_IN.get(name)
    if module is None:
        raise ConfigError(
            f"secure_aggregation = '{name}' names no backend; use one of {list(names())}, or "
            "register yours (veil.assembly.secure_aggregation.registry.register)"
        )
    built_in: SecureAggregation = importlib.import_module(module).BACKEND
    return built_in
