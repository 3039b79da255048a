"""Packages the test extras install: required under CI, skipped (saying why) elsewhere.

`make test` installs the `[test]` extras, so under CI (the CI environment variable, which
`.ci/run` sets) a missing one is a broken install and must fail the run, never skip a few dozen
tests silently. On a developer's machine without them the tests skip, naming the package.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    """`module`, imported; under CI an ImportError fails the test module, elsewhere it skips."""
    if os.environ.get("CI"):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(
                f"'{module}' is missing but CI must have it (pip install -e '.[test]'): {exc}",
                pytrace=False,
            )
    return pytest.importorskip(module)
