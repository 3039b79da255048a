"""`secure_aggregation = "tee"` in a real deployment: server and client processes over mutual
TLS; each client binds the evidence to the server certificate it verified against the CA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Deploy

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
def test_tee_deployment_attests_every_round(deploy: Deploy) -> None:
    run = deploy(CONFIG, timeout=300)
    result, out = run.result, run.out
    assert result["privacy"]["attestation"] == "software_dev (no hardware root of trust)"
    assert result["privacy"]["tee"]["tls_key"].startswith("the server certificate's key")
    for r in result["rounds"]:
        assert r["clients"] == 3 and r["applied"] and r["aggregation"]["attested"] == 3
    assert result["final"]["accuracy"] > 0.85
    client_log = (out / "logs" / "client-0.log").read_text()
    assert "software_dev (no hardware root of trust)" in client_log
