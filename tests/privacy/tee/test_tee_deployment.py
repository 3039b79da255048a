"""`secure_aggregation = "tee"` in a real deployment: server and client processes over mutual
TLS; each client binds the evidence to the server certificate it verified against the CA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
name = "deployed-tee"
mode = "deployment"
seed = 7
secure_aggregation = "tee"
[data]
dataset = "breast_cancer"
[model]
name = "logistic"
[federation]
clients = 3
rounds = 2
learning_rate = 0.1
[tee]
allow_insecure_dev = true
[deployment]
round_deadline_s = 60
timeout_s = 240
"""


@pytest.mark.slow
def test_tee_deployment_attests_every_round(tmp_path: Path) -> None:
    config_path = tmp_path / "run.toml"
    config_path.write_text(CONFIG)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "run", str(config_path), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr + (out / "logs" / "server.log").read_text()
    result = json.loads((out / "result.json").read_text())
    assert result["privacy"]["attestation"] == "software_dev (no hardware root of trust)"
    assert result["privacy"]["tee"]["tls_key"].startswith("the server certificate's key")
    for r in result["rounds"]:
        assert r["clients"] == 3 and r["applied"] and r["aggregation"]["attested"] == 3
    assert result["final"]["accuracy"] > 0.85
    client_log = (out / "logs" / "client-0.log").read_text()
    assert "software_dev (no hardware root of trust)" in client_log
