"""A federation's PKI for the long-lived sites' unit tests, and signed job bundles.

One folder holds the CA, the coordinator ("server"), three sites (the banks of
`tests/data/banks.py`) and two submitters; it is also the coordinator's PKI folder (it holds
``nodes/NAME/node.crt`` for every site). `signed_bundle` signs a hand-written job config with
a submitter's identity key, as `veil job submit` does, without a config file on disk.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import secrets
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography import x509

from veil.crypto import pki
from veil.crypto.identity import IdentityKey
from veil.sites.bundle import JobBundle

SITES = ("bank_a", "bank_b", "bank_c")
SUBMITTER = "risk-team"
OTHER_SUBMITTER = "audit-team"


def federation(directory: Path) -> Path:
    """A CA in `directory` with the coordinator, the three sites and both submitters."""
    pki.init_ca(directory)
    pki.issue(directory, "server", role="server")
    for site in SITES:
        pki.issue(directory, site, role="client")
    for submitter in (SUBMITTER, OTHER_SUBMITTER):
        pki.issue(directory, submitter, role="submitter")
    return directory


def copy_of(directory: Path, target: Path) -> Path:
    """A copy of a PKI folder (to revoke a certificate without touching the shared one)."""
    shutil.copytree(directory, target)
    return target


def identity(directory: Path, name: str) -> IdentityKey:
    return IdentityKey.load(pki.node_files(directory, name).identity_key)


def cert_pem(directory: Path, name: str) -> bytes:
    return pki.node_files(directory, name).cert.read_bytes()


def ca_of(directory: Path) -> x509.Certificate:
    return pki.load_certificate(directory / pki.CA_CERT)


def job_config(sites: tuple[str, ...] = SITES, **top: Any) -> dict[str, Any]:
    """A job's config table naming `sites` (each by its file name), with top-level `top`."""
    return {
        "name": "loans",
        **top,
        "data": {
            "dataset": "csv",
            "schema_file": "schema.toml",
            "organisations": {s: f"{s}.csv" for s in sites},
        },
        "model": {"name": "mlp", "hidden": [8]},
        "federation": {"clients": len(sites), "rounds": 2},
    }


def signed_bundle(
    directory: Path,
    submitter: str,
    config: dict[str, Any],
    *,
    allow_refusals: bool = False,
    schema: str | None = 'target = "y"\n',
    job_id: str | None = None,
) -> JobBundle:
    """A bundle of `config` signed by `submitter`'s identity key from `directory`."""
    unsigned = JobBundle(
        job_id=job_id or secrets.token_hex(8),
        submitter=submitter,
        config=config,
        schema=schema,
        allow_refusals=allow_refusals,
        submitted_at="2026-01-01T00:00:00+00:00",
        signature=b"",
    )
    return resigned(unsigned, identity(directory, submitter))


def resigned(bundle: JobBundle, key: IdentityKey) -> JobBundle:
    """`bundle` with `key`'s signature of its payload."""
    return dataclasses.replace(bundle, signature=key.sign(bundle.payload()))


def banks_module() -> ModuleType:
    """`tests/data/banks.py` (three banks' CSV files and their schema), imported by path: the
    test folders are not packages, and tests/data is on sys.path only when its tests run."""
    if "banks" in sys.modules:
        return sys.modules["banks"]
    path = Path(__file__).resolve().parents[1] / "data" / "banks.py"
    spec = importlib.util.spec_from_file_location("banks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["banks"] = module
    spec.loader.exec_module(module)
    return module
