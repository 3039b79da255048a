"""`veil pki init | issue | revoke | show`."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509

from support import veil
from veil.crypto import pki
from veil.errors import UserError


def test_init_issue_revoke_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert veil("pki", "init", str(d)) == 0
    assert (
        veil("pki", "issue", str(d), "coordinator", "--role", "server", "--host", "10.0.0.5") == 0
    )
    assert veil("pki", "issue", str(d), "bank-a", "--role", "client") == 0
    out = capsys.readouterr().out
    assert "ca.crt" in out and "nodes/bank-a/node.crt" in out and "identity.pub" in out
    assert "PRIVATE KEY" not in out  # paths only, never key material
    server = pki.load_certificate(pki.node_files(d, "coordinator").cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]

    assert veil("pki", "revoke", str(d), "bank-a") == 0
    (serial,) = pki.revoked_serials(d)
    assert f"serial {serial}" in capsys.readouterr().out

    assert veil("pki", "show", str(d)) == 0
    out = capsys.readouterr().out
    bank = next(line for line in out.splitlines() if "bank-a" in line)
    coordinator = next(line for line in out.splitlines() if "coordinator" in line)
    assert "client" in bank and str(serial) in bank and bank.rstrip(" │").endswith("yes")
    assert "server" in coordinator and coordinator.rstrip(" │").endswith("no")


def test_user_errors(tmp_path: Path) -> None:
    d = str(tmp_path)
    with pytest.raises(UserError, match="veil pki init"):
        veil("pki", "issue", d, "bank-a", "--role", "client")
    veil("pki", "init", d)
    with pytest.raises(UserError, match="already exists"):
        veil("pki", "init", d)
    with pytest.raises(UserError, match="server certificates only"):
        veil("pki", "issue", d, "bank-a", "--role", "client", "--host", "x")
    veil("pki", "issue", d, "bank-a", "--role", "client")
    with pytest.raises(UserError, match="--overwrite"):
        veil("pki", "issue", d, "bank-a", "--role", "client")
    assert veil("pki", "issue", d, "bank-a", "--role", "client", "--overwrite") == 0
    with pytest.raises(UserError, match="no node 'ghost'"):
        veil("pki", "revoke", d, "ghost")
    with pytest.raises(SystemExit):
        veil("pki", "issue", d, "bank-b", "--role", "admin")
