"""The CKKS key ceremony: each client's secret key set is sealed to its own X25519 key (bound
in its certificate); the server's files hold no key; rotation gives a new key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support import issue_federation
from veil.crypto import pki
from veil.crypto.sealed_box import BoxError
from veil.errors import UserError
from veil.privacy.he import keys as he_keys
from veil.privacy.he.ckks import CkksParams, SecretKeyRefused, load_secret_context

PARAMS = CkksParams()


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_federation(tmp_path_factory.mktemp("pki"), ["bank-a", "bank-b"])


def test_each_client_opens_its_own_key_and_the_server_gets_none(pki_dir: Path) -> None:
    public = he_keys.ceremony(pki_dir, PARAMS, rotate=True)
    a = he_keys.load_secret(pki_dir, "bank-a", PARAMS)
    b = he_keys.load_secret(pki_dir, "bank-b", PARAMS)
    assert a.key_id == b.key_id == public.key_id and a.release_key == b.release_key
    assert load_secret_context(a.context, PARAMS).has_secret_key()
    server = he_keys.load_public(pki_dir, PARAMS)
    assert server.key_id == public.key_id
    # The server's folder holds no secret: the public context has no key, the boxes are sealed.
    sealed = sorted(p.name for p in (pki_dir / "he" / "sealed").iterdir())
    assert sealed == ["bank-a.box", "bank-b.box"]
    assert a.context not in (pki_dir / "he" / "sealed" / "bank-a.box").read_bytes()


def test_a_client_cannot_open_another_clients_box(pki_dir: Path, tmp_path: Path) -> None:
    he_keys.ceremony(pki_dir, PARAMS, rotate=True)
    copy = tmp_path / "pki"
    shutil.copytree(pki_dir, copy)
    # bank-b's box renamed as bank-a's: bank-a's key does not open it (bound to the recipient).
    sealed = copy / "he" / "sealed"
    (sealed / "bank-b.box").replace(sealed / "bank-a.box")
    with pytest.raises(BoxError):
        he_keys.load_secret(copy, "bank-a", PARAMS)


def test_the_server_refuses_a_public_context_that_holds_the_secret_key(
    pki_dir: Path, tmp_path: Path
) -> None:
    he_keys.ceremony(pki_dir, PARAMS, rotate=True)
    copy = tmp_path / "pki"
    shutil.copytree(pki_dir, copy)
    leaked = he_keys.load_secret(copy, "bank-a", PARAMS).context
    (copy / "he" / "public.ctx").write_bytes(leaked)
    with pytest.raises(SecretKeyRefused):
        he_keys.load_public(copy, PARAMS)


def test_rotation_makes_a_new_key_and_is_explicit(pki_dir: Path) -> None:
    first = he_keys.ceremony(pki_dir, PARAMS, rotate=True)
    with pytest.raises(UserError, match="--rotate"):
        he_keys.ceremony(pki_dir, PARAMS)
    second = he_keys.ceremony(pki_dir, PARAMS, rotate=True)
    assert first.key_id != second.key_id
    with pytest.raises(UserError, match=r"other|parameters"):
        he_keys.load_secret(pki_dir, "bank-a", CkksParams(scale_bits=30))


def test_certificates_bind_the_encryption_key(pki_dir: Path) -> None:
    from veil.crypto.sealed_box import EncryptionKey

    files = pki.node_files(pki_dir, "bank-a")
    cert = pki.load_certificate(files.cert)
    assert (
        pki.certificate_encryption_key(cert)
        == EncryptionKey.load(files.encryption_key).public_bytes()
    )
    assert files.encryption_key.stat().st_mode & 0o077 == 0


def test_keygen_command(pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from veil.cli import main

    config = tmp_path / "run.toml"
    config.write_text(
        'secure_aggregation = "ckks"\n[data]\ndataset = "breast_cancer"\nscaling = "local"\n'
        "[federation]\nclients = 2\nrounds = 1\n[ckks]\nscale_bits = 36\n"
    )
    assert main(["he", "keygen", str(config), "--pki", str(pki_dir), "--rotate"]) == 0
    assert "public context" in capsys.readouterr().out
    params = CkksParams(scale_bits=36)
    assert he_keys.load_secret(pki_dir, "bank-b", params).params == params
    assert main(["he", "keygen", str(config), "--pki", str(pki_dir)]) == 2
    assert "--rotate" in capsys.readouterr().err
