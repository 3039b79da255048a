"""The measurement of a software aggregator: its code (the installed Veil package) and its settings.

A hardware TEE measures the memory image it launches; a software process has no such launch
measurement, so `software_dev` measures what determines the aggregator's behaviour instead: the
SHA-256 of every ``.py`` file of the installed `veil` package, sorted by path, and the settings
that decide what the aggregator does with updates (for a run, the aggregation part of its
config: `veil.assembly.secure_aggregation.tee.aggregation_config`). Two processes on the same
Veil installation with the same aggregation settings compute the same measurement; any changed
byte of code or any changed aggregation setting changes it.

This is a reproducible *claim*, not a hardware measurement: the process that computes it can lie.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from veil.crypto.identity import signing_payload

__all__ = ["code_digest", "measure"]

#: The installed `veil` package (this file is veil/privacy/tee/measurement.py).
_PACKAGE_DIR = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=4)
def code_digest(package_dir: Path | None = None) -> str:
    """SHA-256 (hex) over (relative path, SHA-256 of content) of every .py file in the package."""
    root = Path(package_dir) if package_dir is not None else _PACKAGE_DIR
    parts: list[bytes | str | int] = ["tee/code"]
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts += [path.relative_to(root).as_posix(), hashlib.sha256(path.read_bytes()).digest()]
    return hashlib.sha256(signing_payload(*parts)).hexdigest()


def measure(aggregation: Mapping[str, Any], *, package_dir: Path | None = None) -> str:
    """The measurement (hex SHA-256) of an aggregator running this Veil with the aggregation
    settings `aggregation` (JSON data; keys in any order)."""
    settings = json.dumps(dict(aggregation), sort_keys=True, default=str)
    payload = signing_payload("tee/measurement", code_digest(package_dir), settings)
    return hashlib.sha256(payload).hexdigest()
