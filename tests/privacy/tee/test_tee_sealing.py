"""Sealed storage (keys from a measurement) and signed run manifests (`veil sign`/`verify`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import veil
from veil.assembly.secure_aggregation.tee import checkpoint_sealing_key, measure
from veil.cli import main
from veil.config import RunConfig, load_config
from veil.crypto.envelope import SealedDataError, generate_key_file, load_key_file
from veil.crypto.identity import IdentityKey
from veil.crypto.manifest import ManifestError, sign_run, verify_run
from veil.errors import StoreError
from veil.privacy.tee.sealed import seal_to_measurement, unseal
from veil.store import load_checkpoint

SECRET = os.urandom(32)


def test_sealed_data_opens_only_for_the_same_measurement_and_context() -> None:
    blob = seal_to_measurement(b"aggregator state", SECRET, "ab" * 32, context=b"round-3")
    assert unseal(blob, SECRET, "ab" * 32, context=b"round-3") == b"aggregator state"
    with pytest.raises(SealedDataError, match="another aggregator measurement"):
        unseal(blob, SECRET, "cd" * 32, context=b"round-3")
    with pytest.raises(SealedDataError):
        unseal(blob, os.urandom(32), "ab" * 32, context=b"round-3")
    with pytest.raises(SealedDataError):
        unseal(blob, SECRET, "ab" * 32, context=b"round-4")


def tee_config(key_file: Path, **extra: object) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 3,
            "secure_aggregation": "tee",
            "data": {"dataset": "breast_cancer"},
            "model": {"name": "logistic"},
            "federation": {"clients": 3, "rounds": 2, "learning_rate": 0.1},
            "tee": {"allow_insecure_dev": True},
            "checkpoint": {"key_file": str(key_file)},
            **extra,
        }
    )


@pytest.fixture(scope="module")
def tee_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path, Path]:
    base = tmp_path_factory.mktemp("tee-run")
    key_file = base / "checkpoint.key"
    generate_key_file(key_file)
    config = tee_config(key_file)
    veil.run(config, base / "out")
    return config, base / "out", key_file


def test_checkpoints_do_not_unseal_after_the_config_changes(
    tee_run: tuple[RunConfig, Path, Path],
) -> None:
    config, out, key_file = tee_run
    secret = load_key_file(key_file)
    same = load_checkpoint(
        out / "checkpoint.safetensors", key=checkpoint_sealing_key(secret, config)
    )
    assert same.round == 2
    changed = tee_config(key_file, strategy={"name": "fedprox", "mu": 0.1})
    for key in (checkpoint_sealing_key(secret, changed), secret):
        with pytest.raises(StoreError, match="cannot decrypt"):
            load_checkpoint(out / "checkpoint.safetensors", key=key)


def veil_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_signed_run_verifies_and_any_changed_byte_fails(
    tee_run: tuple[RunConfig, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = tee_run
    server = IdentityKey.generate()
    key_path, pub_path = tmp_path / "id.key", tmp_path / "id.pub"
    server.save(key_path)
    server.public_key().save(pub_path)
    code, _, err = veil_cli(capsys, "sign", str(out), "--identity-key", str(key_path))
    assert code == 0, err
    code, stdout, err = veil_cli(capsys, "verify", str(out), "--public-key", str(pub_path))
    assert code == 0 and "verified: " in stdout, err
    assert set(verify_run(out).files) >= {"result.json", "checkpoint.safetensors", "veil.db"}

    with pytest.raises(ManifestError, match="another key"):
        verify_run(out, IdentityKey.generate().public_key())
    checkpoint = out / "checkpoint.safetensors"
    original = checkpoint.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0x01
    checkpoint.write_bytes(bytes(tampered))
    try:
        code, _, err = veil_cli(capsys, "verify", str(out), "--public-key", str(pub_path))
        assert code == 2
        assert "'checkpoint.safetensors' changed after the manifest was signed" in err
    finally:
        checkpoint.write_bytes(original)
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match="added after"):
        verify_run(out)
    (out / "extra.bin").unlink()
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"run_id"', '"run_id" ', 1))
    with pytest.raises(ManifestError, match="signature does not verify"):
        verify_run(out)


def test_sign_run_then_verify_in_process(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    key = IdentityKey.generate()
    sign_run(tmp_path, key)
    assert verify_run(tmp_path, key.public_key()).files.keys() == {"model.safetensors"}
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_run(tmp_path)
    with pytest.raises(ManifestError, match="no signed manifest"):
        verify_run(tmp_path / "nowhere")


def test_tee_measure_prints_the_measurement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        'secure_aggregation = "tee"\n[data]\ndataset = "breast_cancer"\n'
        "[federation]\nclients = 3\nrounds = 1\n[tee]\nallow_insecure_dev = true\n"
    )
    code, stdout, err = veil_cli(capsys, "tee", "measure", str(path))
    assert code == 0, err
    assert stdout.strip() == measure(load_config(path))


def test_exported_model_verifies_and_a_tampered_model_fails(
    tee_run: tuple[RunConfig, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`veil model export` signs the final model and the run's record; `veil model verify`
    fails on any changed byte."""
    _, out, _ = tee_run
    server = IdentityKey.generate()
    key_path, pub_path = tmp_path / "server.key", tmp_path / "server.pub"
    server.save(key_path)
    server.public_key().save(pub_path)
    model = tmp_path / "model"
    code, _, err = veil_cli(
        capsys, "model", "export", str(out), "--out", str(model), "--identity-key", str(key_path)
    )
    assert code == 0, err
    assert sorted(p.name for p in model.iterdir()) == [
        "checkpoint.safetensors",
        "manifest.json",
        "manifest.sig",
        "result.json",
    ]
    verify = ("model", "verify", str(model), "--public-key", str(pub_path))
    code, stdout, err = veil_cli(capsys, *verify)
    assert code == 0 and "verified: 2 files" in stdout, err
    weights = model / "checkpoint.safetensors"
    tampered = bytearray(weights.read_bytes())
    tampered[-1] ^= 0x01
    weights.write_bytes(bytes(tampered))
    code, _, err = veil_cli(capsys, *verify)
    assert code == 2 and "'checkpoint.safetensors' changed" in err
    code, _, err = veil_cli(
        capsys, "model", "export", str(out), "--out", str(model), "--identity-key", str(key_path)
    )
    assert code == 2 and "not empty" in err
