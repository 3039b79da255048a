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
"""

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
