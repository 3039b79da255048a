"""A job as it travels: the run config and its data contract, signed by the submitter.

`veil job submit CONFIG` reads the config and the data schema it names, and signs both with the
submitter's identity key (the key its `submitter` certificate binds). The coordinator stores
the bundle and hands it to every site as it is; each site checks the signature against the
submitter's certificate under the federation's CA before it reads anything else, so a
coordinator cannot run a job nobody submitted, change a submitted one, or put a job under
another submitter's name (`verify_bundle`).

What a bundle may name: the data schema travels inside it; each organisation's file is named
by its file name only (the site resolves it in its own `--data-dir`). Paths that would point
at the submitter's own disk (a held-out test file, a ledger, a checkpoint key, a model folder)
are refused at submission with what to do instead (`make_bundle`).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from veil.atomic import atomic_write_text
from veil.crypto import pki
from veil.crypto.identity import IdentityKey, SignatureRejected, signing_payload
from veil.errors import UserError

#: The file names a job's config and schema get in each job folder.
CONFIG_FILE = "config.toml"
SCHEMA_FILE = "schema.toml"

#: Keys a job may not carry, and what to do instead.
_LOCAL_PATHS: dict[tuple[str, str], str] = {
    ("data", "path"): "give each organisation's file by name in [data] organisations",
    ("data", "test_file"): "held-out files are not sent with a job; drop test_file",
    ("privacy", "ledger"): "in a job each site charges its own ledger; drop ledger",
    ("checkpoint", "key_file"): "the coordinator seals checkpoints with its own key; drop it",
    ("model", "model_dir"): "a job uses the built-in models only; drop model_dir",
}


class JobRejected(UserError):
    """A job bundle is malformed, or its signature does not verify."""


@dataclass(frozen=True)
class JobBundle:
    """One submitted job: what was signed, and the signature."""

    job_id: str
    submitter: str
    #: The run config as a TOML table (schema_file rewritten to `SCHEMA_FILE`).
    config: dict[str, Any]
    #: The data contract's TOML text, when the config names one.
    schema: str | None
    #: Whether the job may go on without a site that refuses it.
    allow_refusals: bool
    submitted_at: str
    signature: bytes

    @property
    def name(self) -> str:
        """The run's name."""
        return str(self.config.get("name", "veil-run"))

    def organisations(self) -> list[str]:
        """The organisations the job names, in the config's order."""
        return list(dict(self.config.get("data", {}).get("organisations") or {}))

    def payload(self) -> bytes:
        """The bytes the submitter signs."""
        return signing_payload(
            "veil-job",
            self.job_id,
            self.submitter,
            _canonical(self.config),
            self.schema or "",
            int(self.allow_refusals),
            self.submitted_at,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON object (the signature in base64)."""
        return {
            "job_id": self.job_id,
            "submitter": self.submitter,
            "config": self.config,
            "schema": self.schema,
            "allow_refusals": self.allow_refusals,
            "submitted_at": self.submitted_at,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobBundle:
        """Parse `to_json`'s object; JobRejected naming what is wrong."""
        try:
            bundle = cls(
                job_id=_text(data["job_id"]),
                submitter=_text(data["submitter"]),
                config=dict(data["config"]),
                schema=None if data.get("schema") is None else _text(data["schema"]),
                allow_refusals=bool(data["allow_refusals"]),
                submitted_at=_text(data["submitted_at"]),
                signature=base64.b64decode(_text(data["signature"]), validate=True),
            )
            # Python's json reads NaN and Infinity, which cannot be signed: refuse them here
            # rather than let `verify_bundle` raise a ValueError that no caller expects.
            bundle.payload()
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise JobRejected(f"malformed job bundle ({exc}); submit it again") from None
        if not bundle.job_id.isalnum() or len(bundle.job_id) > 64:
            raise JobRejected("malformed job id; submit the job again")
        return bundle


def make_bundle(
    config_path: Path,
    *,
    submitter: str,
    identity: IdentityKey,
    allow_refusals: bool = False,
) -> JobBundle:
    """Read `config_path` (and the schema it names), check that the job carries no local
    path, and sign it as `submitter`. The config is validated as `veil run` would first."""
    from veil.config import load_config

    load_config(config_path)  # every ConfigError before anything is sent
    raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    problem = local_path({k: v for k, v in raw.items() if k != "data"})
    if problem is None and isinstance(raw.get("data"), dict):
        portable = {
            k: v for k, v in raw["data"].items() if k not in ("schema_file", "organisations")
        }
        problem = local_path({"data": portable})
    if problem is not None:
        raise UserError(problem)
    data = raw.get("data", {})
    schema = None
    if isinstance(data, dict) and isinstance(data.get("schema_file"), str):
        schema_path = (config_path.parent / data["schema_file"]).expanduser()
        schema = schema_path.read_text(encoding="utf-8")
        data["schema_file"] = SCHEMA_FILE
    if isinstance(data, dict) and isinstance(data.get("organisations"), dict):
        data["organisations"] = {k: Path(str(v)).name for k, v in data["organisations"].items()}
    raw.pop("mode", None)
    unsigned = JobBundle(
        job_id=secrets.token_hex(8),
        submitter=submitter,
        config=raw,
        schema=schema,
        allow_refusals=allow_refusals,
        submitted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        signature=b"",
    )
    return _signed(unsigned, identity)


def _signed(bundle: JobBundle, identity: IdentityKey) -> JobBundle:
    return JobBundle(**{**bundle.__dict__, "signature": identity.sign(bundle.payload())})


def verify_bundle(
    bundle: JobBundle, certificate_pem: bytes, ca: x509.Certificate, revoked: Collection[int]
) -> None:
    """Check that `certificate_pem` is a valid `submitter` certificate of the CA, names the
    bundle's submitter, and that its identity key signed the bundle; JobRejected otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
        pki.verify_certificate(cert, ca, role="submitter", revoked=revoked)
    except (ValueError, UserError) as exc:
        raise JobRejected(f"job {bundle.job_id}: the submitter's certificate: {exc}") from None
    if pki.certificate_name(cert) != bundle.submitter:
        raise JobRejected(f"job {bundle.job_id}: the certificate names another submitter")
    try:
        pki.certificate_identity(cert).verify(bundle.signature, bundle.payload())
    except (UserError, SignatureRejected):
        raise JobRejected(
            f"job {bundle.job_id}: the submitter's signature does not verify; the job was "
            "changed after it was signed"
        ) from None
    problem = local_path(bundle.config)
    if problem is not None:
        raise JobRejected(f"job {bundle.job_id}: {problem}")


def local_path(config: Mapping[str, Any]) -> str | None:
    """What in a job's config would name a path on the machine that runs it, or None. A signed
    job is checked again by the coordinator and by every site: `make_bundle` refuses these on
    the submitter's side, but a site does not trust a submitter with its own disk."""
    for (section, key), instead in _LOCAL_PATHS.items():
        table = config.get(section)
        if isinstance(table, dict) and key in table:
            return f"[{section}] {key} cannot travel with a job: {instead}"
    data = config.get("data")
    data = data if isinstance(data, dict) else {}
    if data.get("schema_file", SCHEMA_FILE) != SCHEMA_FILE:
        return f"[data] schema_file must be the bundled '{SCHEMA_FILE}'"
    for name, file in dict(data.get("organisations") or {}).items():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            return f"[data] organisations.{name} must be a plain file name, not {file!r}"
    return None


def without(bundle: JobBundle, dropped: Sequence[str]) -> dict[str, Any]:
    """The job's config with the organisations in `dropped` removed (a job that may go on
    without the sites that refused it); every other key as signed. JobRejected if the
    submitter did not allow refusals: only the signed bundle says whether a job may shrink."""
    config = json.loads(_canonical(bundle.config))
    if dropped and not bundle.allow_refusals:
        raise JobRejected(
            f"job {bundle.job_id} does not allow refusals, so it cannot run without "
            f"{', '.join(dropped)}; its submitter may submit it again with --allow-refusals"
        )
    if dropped:
        organisations = config["data"]["organisations"]
        for name in dropped:
            organisations.pop(name, None)
        if not organisations:
            raise UserError(f"job {bundle.job_id}: every organisation refused it")
        federation = config.get("federation", {})
        if "clients" in federation:
            federation["clients"] = len(organisations)
    return dict(config)


def write_job_files(bundle: JobBundle, folder: Path, config: Mapping[str, Any]) -> Path:
    """Write `config` (the job's, as it runs) and the bundle's schema into `folder`; returns
    the config's path, which `veil server` / `veil client` read."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if bundle.schema is not None:
        atomic_write_text(folder / SCHEMA_FILE, bundle.schema, mode=0o600)
    path = folder / CONFIG_FILE
    atomic_write_text(path, tomli_w.dumps(dict(config)), mode=0o600)
    return path


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value
