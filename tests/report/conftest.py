"""Shared by the browser tests: where Chromium is, or why the test cannot run here."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")

#: Chromium's flags for a test on a closed network: no GPU, no sandbox (containers), nothing
#: that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_INSTALL = (
    "install it with: apt-get install -y chromium chromium-driver, and "
    "pip install -e '.[test]' for Playwright (never `playwright install`: the system Chromium "
    "is used)"
)


def require_chromium() -> Path:
    """The Chromium binary for Playwright. Where it or Playwright is missing: fail under CI
    (the CI environment variable is set; `.ci/run` installs both), skip elsewhere saying how to
    install them."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"Chromium ({CHROMIUM})")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright for Python")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}; {_INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture()
def chromium_launch() -> dict[str, Any]:
    """Keyword arguments for Playwright's ``chromium.launch_persistent_context``."""
    return {"executable_path": str(require_chromium()), "headless": True, "args": CHROMIUM_ARGS}
