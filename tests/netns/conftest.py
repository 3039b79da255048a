"""Fixtures of the network-namespace tests: one lab for the session (removed at its end, also
after a failure), and the same config run on loopback as the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import netns_lab
import pytest
from lab_federation import CONFIG, ENV, MEMBERS, Reference, final_parameters
from netns_lab import Lab


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The session's namespaces (skipped where none can be made); always removed."""
    reason = netns_lab.unavailable()
    if reason is not None:
        pytest.skip(reason)
    netns_lab.remove_stale()
    made = netns_lab.create(f"{netns_lab.NAME_ROOT}{os.getpid()}", MEMBERS)
    try:
        yield made
    finally:
        netns_lab.destroy(made)


@pytest.fixture
def clean_lab(lab: Lab) -> Iterator[Lab]:
    """The lab with every link up and no bandwidth limit, before and after the test."""
    netns_lab.clear(lab)
    try:
        yield lab
    finally:
        netns_lab.clear(lab)


@pytest.fixture(scope="session")
def loopback(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """CONFIG run as `veil run` runs a deployment: every process on 127.0.0.1."""
    work = tmp_path_factory.mktemp("loopback")
    config_path = work / "run.toml"
    config_path.write_text(CONFIG)
    out = work / "out"
    command = [sys.executable, "-m", "veil.cli", "run", str(config_path), "--out", str(out)]
    proc = subprocess.run(
        [*command, "--quiet"], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    return Reference(result, final_parameters(out, out / "orgs" / "server" / "checkpoint.key"))
