"""Encrypted inference on the credit-scoring model: a real `veil serve` process over HTTPS
scores CKKS-encrypted features; the decrypted probabilities agree with plaintext inference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import veil
from support import EXAMPLES, issue_federation, wait_for_port
from veil.assembly.data import federated_data as _federated_data
from veil.config import load_config
from veil.privacy.he import inference
from veil.privacy.he.ckks import secret_context_bytes
from veil.privacy.he.wire import pack_message


@pytest.fixture(scope="module")
def credit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """The credit-scoring example trained briefly, a PKI, and its (scaled) test features."""
    root = tmp_path_factory.mktemp("credit")
    config = load_config(EXAMPLES / "credit_scoring.toml")
    d = config.to_dict()
    d["federation"] = {**d["federation"], "rounds": 3, "centralized_baseline": False}
    config = type(config).from_dict(d)
    veil.run(config, root / "run")
    issue_federation(root / "pki", ["bank-a"])
    return root / "run", root / "pki", _federated_data(config).x_test.astype(np.float64)


def test_encrypted_inference_agrees_with_plaintext(
    credit: tuple[Path, Path, np.ndarray], tmp_path: Path
) -> None:
    run_dir, pki_dir, x = credit
    model = inference.LinearModel.load(run_dir)
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "veil.cli",
            "serve",
            str(run_dir),
            "--pki",
            str(pki_dir),
            "--address",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--mutual-tls",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )
    try:
        url = f"https://localhost:{wait_for_port(port_file, server, 60)}"
        logits = inference.predict(url, x, pki_dir=pki_dir, name="bank-a")
        expected = model.logits(x)
        assert logits.shape == expected.shape == (x.shape[0], 2)
        np.testing.assert_allclose(
            inference.softmax(logits), inference.softmax(expected), atol=1e-3
        )
        assert np.max(np.abs(logits - expected)) < 1e-3
        # The command line: `veil predict URL FEATURES.npz` prints class probabilities.
        np.savez(tmp_path / "x.npz", x=x[:5])
        cli = subprocess.run(
            [sys.executable, "-m", "veil.cli", "predict", url, str(tmp_path / "x.npz"),
             "--pki", str(pki_dir), "--name", "bank-a"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        printed = np.loadtxt(cli.stdout.splitlines()[1:], delimiter=",", ndmin=2)
        np.testing.assert_allclose(printed, inference.softmax(expected[:5]), atol=1e-3)
        # Mutual TLS: without a client certificate the server does not talk.
        with pytest.raises(inference.InferenceError, match="cannot reach"):
            inference.predict(url, x[:2], pki_dir=pki_dir)
    finally:
        server.kill()
        server.wait()


def test_the_inference_server_refuses_a_context_with_a_secret_key() -> None:
    model = inference.LinearModel(np.ones((2, 3)), np.zeros(2))
    context, request = inference.encrypt_features(np.ones((4, 3)))
    # Swap the request's key-less context for the client's secret one.
    from veil.privacy.he.wire import unpack_message

    header, body = unpack_message(request, "request")
    secret = secret_context_bytes(context)
    forged = pack_message(
        {**header, "context": len(secret)}, secret + body[int(header["context"]) :]
    )
    with pytest.raises(inference.InferenceError, match="carries the secret key"):
        inference.score_encrypted(model, forged)
    ok = inference.score_encrypted(model, request)
    np.testing.assert_allclose(inference.decrypt_scores(context, ok, 4), 3.0, atol=1e-4)


def test_a_non_linear_model_is_refused() -> None:
    with pytest.raises(inference.InferenceError, match="linear models"):
        inference.LinearModel.from_parameters({"layers.0.weight": np.ones((2, 2), np.float32)})
