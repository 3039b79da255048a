"""The measurement of a software aggregator: its code (the installed Veil package) and its config.

A hardware TEE measures the memory image it launches; a software process has no such launch
measurement, so `software_dev` measures what determines the aggregator's behaviour instead: the
SHA-256 of every ``.py`` file of the installed `veil` package, sorted by path, and the part of
the run config that decides what the aggregator does with updates. Two processes on the same
Veil installation with the same aggregation config compute the same measurement; any changed
byte of code or any changed aggregation setting changes it.

This is a reproducible *claim*, not a hardware measurement: the process that computes it can lie.

`policy_from_config` is the policy a client holds the aggregator to: with no allow-list in
``[tee]``, exactly the measurement its own installation and config give.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from veil.config import RunConfig, TeeConfig
from veil.crypto.identity import signing_payload
from veil.privacy.tee.policy import Policy

__all__ = ["AGGREGATION_KEYS", "aggregation_config", "code_digest", "measure", "policy_from_config"]

#: The installed `veil` package (this file is veil/privacy/tee/measurement.py).
_PACKAGE_DIR = Path(__file__).resolve().parents[2]

#: The config keys that decide what the aggregator computes from the clients' updates.
AGGREGATION_KEYS = ("secure_aggregation", "strategy", "robust", "privacy")


def aggregation_config(config: RunConfig) -> dict[str, Any]:
    """The aggregation-relevant part of `config`, as plain JSON values."""
    raw = config.to_dict()
    return {key: raw.get(key) for key in AGGREGATION_KEYS}


@lru_cache(maxsize=4)
def code_digest(package_dir: Path | None = None) -> str:
    """SHA-256 (hex) over (relative path, SHA-256 of content) of every .py file in the package."""
    root = Path(package_dir) if package_dir is not None else _PACKAGE_DIR
    parts: list[bytes | str | int] = ["tee/code"]
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts += [path.relative_to(root).as_posix(), hashlib.sha256(path.read_bytes()).digest()]
    return hashlib.sha256(signing_payload(*parts)).hexdigest()


def measure(config: RunConfig, *, package_dir: Path | None = None) -> str:
    """The measurement (hex SHA-256) of an aggregator running this Veil with `config`."""
    settings = json.dumps(aggregation_config(config), sort_keys=True, default=str)
    payload = signing_payload("tee/measurement", code_digest(package_dir), settings)
    return hashlib.sha256(payload).hexdigest()


def policy_from_config(config: RunConfig) -> Policy:
    """The clients' policy: `[tee]`, or with no allow-list the measurement this Veil and this
    config give (a client trusts the aggregator to run exactly the code it runs itself)."""
    tee = config.tee or TeeConfig()
    allowed = frozenset(tee.allowed_measurements) or frozenset({measure(config)})
    return Policy(allowed, tee.min_security_version, tee.allow_insecure_dev)
