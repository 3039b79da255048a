"""Fixtures shared across test folders; the plain helpers they share (the examples' path, the
`veil` command in process, a federation's PKI, port files, processes that die on cue) are in
`tests/support.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class DeployedRun:
    """A config run by `veil run` as real processes on loopback."""

    config_path: Path
    out: Path
    #: The parsed `result.json`.
    result: dict[str, Any]

    def log(self, process: str = "server") -> str:
        return (self.out / "logs" / f"{process}.log").read_text()


#: `deploy(config_text)`: run that config (mode = "deployment" in the text) with `veil run`;
#: the test fails, showing the server's log, if the run does.
Deploy = Callable[..., DeployedRun]


@pytest.fixture
def deploy(tmp_path: Path) -> Deploy:
    def run(config_text: str, *, timeout: float = 400) -> DeployedRun:
        config_path = tmp_path / "run.toml"
        config_path.write_text(config_text)
        out = tmp_path / "out"
        command = [sys.executable, "-m", "veil.cli", "run", str(config_path), "--out", str(out)]
        proc = subprocess.run(
            [*command, "--quiet"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ},
        )
        log = out / "logs" / "server.log"
        assert proc.returncode == 0, proc.stderr + (log.read_text() if log.is_file() else "")
        result = json.loads((out / "result.json").read_text())
        return DeployedRun(config_path, out, result)

    return run
