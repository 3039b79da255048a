"""A job's view of a PKI folder: a member sees its own sealed box and no other, the coordinator
sees none, and no material name writes outside the job's folder or through its links."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pki_nodes import SITES, federation

from veil.crypto import pki
from veil.crypto.revocation import CRL_FILE
from veil.errors import UserError
from veil.sites.views import member_view, server_view

BOXES = {f"he/sealed/{s}.box": f"secret key sealed to {s}".encode() for s in SITES}
PUBLIC = {"he/public.ctx": b"public context", "he/keyset.json": b'{"key_id": "k1"}'}
MATERIAL = {**PUBLIC, **BOXES, "submitter.crt": b"submitter PEM"}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return federation(tmp_path_factory.mktemp("ca"))


def own_folder(ca: Path, target: Path, node: str, public: tuple[str, ...]) -> Path:
    """Node `node`'s own PKI folder: the CA's public files, its own keys, and the public
    certificates of the nodes `public` (no CA key, no other private key)."""
    target.mkdir(parents=True)
    for name in (pki.CA_CERT, CRL_FILE):
        shutil.copy(ca / name, target / name)
    shutil.copytree(ca / pki.NODES / node, target / pki.NODES / node)
    for other in public:
        (target / pki.NODES / other).mkdir(parents=True)
        shutil.copy(ca / pki.NODES / other / pki.NODE_CERT, target / pki.NODES / other)
    return target


def files_in(view: Path) -> dict[str, bytes]:
    """Every file reachable in the view, through its links, by path relative to the view."""
    out = {}
    for folder, _, names in os.walk(view, followlinks=True):
        for name in names:
            path = Path(folder) / name
            out[str(path.relative_to(view))] = path.read_bytes()
    return out


def test_a_member_sees_its_own_sealed_box_and_no_other(ca: Path, tmp_path: Path) -> None:
    site = own_folder(ca, tmp_path / "bank_b", "bank_b", ("server",))
    view = member_view(site, tmp_path / "job" / "pki", "bank_b", MATERIAL)
    seen = files_in(view)
    assert seen["he/sealed/bank_b.box"] == BOXES["he/sealed/bank_b.box"]
    assert {k: seen[k] for k in PUBLIC} == PUBLIC
    for other in ("bank_a", "bank_c"):
        assert not any(BOXES[f"he/sealed/{other}.box"] in data for data in seen.values())
    assert sorted(k for k in seen if k.endswith(".box")) == ["he/sealed/bank_b.box"]
    assert (view / "he/sealed/bank_b.box").stat().st_mode & 0o077 == 0
    # its own keys and the coordinator's certificate, by link; nothing of other members
    assert (
        pki.node_files(view, "bank_b").key.read_bytes()
        == (site / pki.NODES / "bank_b" / pki.NODE_KEY).read_bytes()
    )
    assert (view / pki.NODES / "server" / pki.NODE_CERT).is_file()
    assert sorted(os.listdir(view / pki.NODES)) == ["bank_b", "server"]
    assert (view / pki.CA_CERT).is_symlink()


def test_a_member_view_is_rebuilt_with_the_same_result(ca: Path, tmp_path: Path) -> None:
    """A site that restarts builds the view again over the old one."""
    site = own_folder(ca, tmp_path / "bank_a", "bank_a", ())
    view = tmp_path / "job" / "pki"
    member_view(site, view, "bank_a", {})
    member_view(site, view, "bank_a", MATERIAL)
    he = sorted(k for k in files_in(view) if k.startswith("he/"))
    assert he == ["he/keyset.json", "he/public.ctx", "he/sealed/bank_a.box"]
    assert not (view / pki.NODES / "server").exists()  # the site does not hold it


def test_a_new_revocation_list_reaches_every_view_at_once(ca: Path, tmp_path: Path) -> None:
    site = own_folder(ca, tmp_path / "bank_a", "bank_a", ("server",))
    view = member_view(site, tmp_path / "job" / "pki", "bank_a", {})
    (site / CRL_FILE).write_bytes(b"a newer list")
    assert (view / CRL_FILE).read_bytes() == b"a newer list"


def test_the_coordinator_sees_no_sealed_box(ca: Path, tmp_path: Path) -> None:
    coordinator = own_folder(ca, tmp_path / "coordinator", "server", SITES)
    view = server_view(coordinator, tmp_path / "job" / "pki", ["bank_a", "bank_c"], MATERIAL)
    seen = files_in(view)
    assert {k: v for k, v in seen.items() if k.startswith("he/")} == PUBLIC
    for box in BOXES.values():
        assert not any(box in data for data in seen.values())
    assert "submitter.crt" not in seen
    assert sorted(os.listdir(view / pki.NODES)) == ["bank_a", "bank_c", "server"]
    assert pki.node_files(view, "server").key.is_file()


def test_the_coordinator_needs_each_members_certificate(ca: Path, tmp_path: Path) -> None:
    coordinator = own_folder(ca, tmp_path / "coordinator", "server", ("bank_a",))
    with pytest.raises(UserError, match=r"no certificate for 'bank_b': copy its node\.crt to "):
        server_view(coordinator, tmp_path / "job" / "pki", ["bank_a", "bank_b"], PUBLIC)


LONG_LIVED = [
    pki.CA_CERT,
    CRL_FILE,
    f"{pki.NODES}/bank_a/{pki.NODE_KEY}",
    f"{pki.NODES}/bank_a/{pki.NODE_CERT}",
]


@pytest.mark.parametrize(
    "name",
    ["../x", "../../x", "/etc/veil-views-test", "ABSOLUTE", *LONG_LIVED],
)
def test_material_cannot_write_outside_the_members_view(
    ca: Path, tmp_path: Path, name: str
) -> None:
    """Not beside the view, not at an absolute path, and not through the view's links into
    the site's long-lived files (its keys, its CA, its revocation list)."""
    site = own_folder(ca, tmp_path / "bank_a", "bank_a", ())
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    target = str(tmp_path / "outside") if name == "ABSOLUTE" else name
    try:
        with pytest.raises(UserError, match="would be written outside the job's folder"):
            member_view(site, tmp_path / "jobs" / "j1" / "pki", "bank_a", {target: b"evil"})
        assert {p: p.read_bytes() for p in site.rglob("*") if p.is_file()} == before
        assert not (tmp_path / "outside").exists()
        assert not (tmp_path / "jobs" / "x").exists()
        assert not (tmp_path / "jobs" / "j1" / "x").exists()
    finally:
        assert not Path("/etc/veil-views-test").exists()


@pytest.mark.parametrize("name", ["he/../../x", "he/../ca.crt", "he/../nodes/server/node.key"])
def test_material_cannot_write_outside_the_coordinators_view(
    ca: Path, tmp_path: Path, name: str
) -> None:
    coordinator = own_folder(ca, tmp_path / "coordinator", "server", ("bank_a",))
    before = {p: p.read_bytes() for p in coordinator.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="would be written outside the job's folder"):
        server_view(coordinator, tmp_path / "job" / "pki", ["bank_a"], {name: b"evil"})
    assert {p: p.read_bytes() for p in coordinator.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "x").exists()
