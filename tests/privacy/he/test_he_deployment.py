"""`secure_aggregation = "ckks"` in a real deployment: the key ceremony seals the secret key to
each client's X25519 key; the server process holds the public context only; ciphertext frames
and the decryption step travel through the signed, nonce-bound gRPC tasks."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import tenseal as ts

import veil
from veil.assembly.secure_aggregation.ckks import settings_from_config
from veil.config import load_config
from veil.crypto import pki
from veil.crypto.sealed_box import BoxError, EncryptionKey, open_box
from veil.privacy.he import keys as he_keys

if TYPE_CHECKING:
    from conftest import Deploy

CONFIG = """
name = "deployed-ckks"
mode = "deployment"
seed = 7
secure_aggregation = "ckks"
[data]
dataset = "breast_cancer"
scaling = "local"
[data.partition]
kind = "dirichlet"
alpha = 0.5
[model]
name = "logistic"
[federation]
clients = 3
rounds = 2
learning_rate = 0.1
[ckks]
clip_range = 4.0
max_weight = 1000
decryptors = 2
[deployment]
round_deadline_s = 60
timeout_s = 300
"""


@pytest.mark.slow
def test_ckks_deployment_matches_simulation(deploy: Deploy) -> None:
    run = deploy(CONFIG, timeout=400)
    deployed, out, config_path = run.result, run.out, run.config_path
    assert deployed["privacy"]["aggregation"] == "ckks"
    for r in deployed["rounds"]:
        assert r["clients"] == 3 and r["applied"]
        assert len(r["aggregation"]["decryptors_answered"]) == 2
    server_log = (out / "logs" / "server.log").read_text()
    assert '"kind": "protocol_result"' in server_log and '"kind": "fit_result"' in server_log
    # The ceremony's outputs: the coordinator's folder holds the public set only (a context
    # without a key, and no sealed box: it could not open one anyway); each member's folder
    # holds its own sealed box, which only its encryption key opens.
    server_he = out / "orgs" / "server" / "he"
    public = ts.context_from((server_he / "public.ctx").read_bytes())
    assert not public.has_secret_key() and not public.is_private()
    assert not (server_he / "sealed").exists()
    keyset = json.loads((server_he / "keyset.json").read_text())
    assert deployed["rounds"][0]["aggregation"]["key_id"] == keyset["key_id"]
    params = settings_from_config(load_config(config_path).ckks).params
    members = ("client-0", "client-1", "client-2")
    for name in members:
        org = out / "orgs" / name
        sealed = org / "he" / "sealed"
        assert sorted(p.name for p in sealed.iterdir()) == [f"{name}.box"]
        assert (sealed / f"{name}.box").stat().st_mode & 0o077 == 0
        # The member's own encryption key opens its box: the run's secret key set.
        secret = he_keys.load_secret(org, name, params)
        assert secret.key_id == keyset["key_id"]
        assert ts.context_from(secret.context).has_secret_key()
        # Another member's key does not (nor would the coordinator's, which has no box at all).
        other = members[(members.index(name) + 1) % len(members)]
        stranger = EncryptionKey.load(pki.node_files(out / "orgs" / other, other).encryption_key)
        box, info = (sealed / f"{name}.box").read_bytes(), he_keys._info(secret.key_id, name)
        own = EncryptionKey.load(pki.node_files(org, name).encryption_key)
        assert open_box(own, box, info=info)  # the same call, with the owner's key
        with pytest.raises(BoxError):
            open_box(stranger, box, info=info)
    simulated = veil.run(load_config(config_path).model_copy(update={"mode": "simulation"}))
    assert abs(simulated.final["accuracy"] - deployed["final"]["accuracy"]) <= 0.01
