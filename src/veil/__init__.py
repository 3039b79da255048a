"""Veil: privacy-preserving machine learning across organisations.

The shortest working example::

    import veil

    config = veil.RunConfig.from_dict({
        "data": {"dataset": "breast_cancer", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [32]},
        "federation": {"clients": 5, "rounds": 20},
    })
    result = veil.run(config, out_dir="runs/medical")
    print(result.final["accuracy"])

`import veil` loads none of the public names below: each is imported from its module on first
use (PEP 562), so that `import veil` and `veil --help` stay fast; `veil.run` brings in torch,
scikit-learn and the rest when it is first touched.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import TYPE_CHECKING, Any

# gRPC's C-core reads these when `grpc` is first imported, and every Veil module that imports
# `grpc` (the deployment transport, vertical learning's channel) runs this file first: a failed
# handshake is then reported in Veil's one line (`veil.transport.grpc.diagnose`) instead of a line
# of C-core internals per reconnection attempt. A user who sets either keeps it.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
os.environ.setdefault("GRPC_TRACE", "")

if TYPE_CHECKING:
    from veil.config import RunConfig, load_config
    from veil.errors import ConfigError, DataError, StoreError, UserError, VeilError
    from veil.result import Result
    from veil.run import run

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "Result",
    "RunConfig",
    "StoreError",
    "UserError",
    "VeilError",
    "__version__",
    "load_config",
    "run",
]

#: Where each lazily loaded public name lives.
_LAZY: dict[str, str] = {
    "ConfigError": "veil.errors",
    "DataError": "veil.errors",
    "StoreError": "veil.errors",
    "UserError": "veil.errors",
    "VeilError": "veil.errors",
    "Result": "veil.result",
    "RunConfig": "veil.config",
    "load_config": "veil.config",
    "run": "veil.run",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access and cache it on the package."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'veil' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The `veil` package object, keeping `veil.run` the function.

    Importing the submodule `veil.run` (`from veil.run import RESULT_FILE`) makes the import
    system bind the module to the package's `run` attribute, which would shadow the function
    `veil.run(config)`; the eager `from veil.run import run` used to rebind it afterwards.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "run" and isinstance(value, types.ModuleType):
            value = value.run
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
