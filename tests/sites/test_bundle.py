"""Signed job bundles: what a submitter signs, what a site verifies, and what a coordinator in
the middle cannot change, forge or re-attribute."""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pki_nodes import (
    OTHER_SUBMITTER,
    SUBMITTER,
    banks_module,
    ca_of,
    cert_pem,
    copy_of,
    federation,
    identity,
    job_config,
    resigned,
    signed_bundle,
)

from veil.config import load_config
from veil.crypto import pki
from veil.errors import UserError
from veil.sites.bundle import (
    SCHEMA_FILE,
    JobBundle,
    JobRejected,
    make_bundle,
    verify_bundle,
    without,
    write_job_files,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return federation(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return banks_module().write_banks(
        tmp_path_factory.mktemp("banks"), rows_per_bank=60, holdout=30
    )


@pytest.fixture(scope="module")
def bundle(root: Path, banks: Any) -> JobBundle:
    config = banks_module().federation_config(banks, test=False)
    return make_bundle(config, submitter=SUBMITTER, identity=identity(root, SUBMITTER))


@pytest.fixture(scope="module")
def lenient(root: Path, banks: Any) -> JobBundle:
    """The same job, submitted to run without the sites that refuse it."""
    config = banks_module().federation_config(banks, test=False)
    key = identity(root, SUBMITTER)
    return make_bundle(config, submitter=SUBMITTER, identity=key, allow_refusals=True)


def verify(bundle: JobBundle, root: Path, signer: str = SUBMITTER, **kw: Any) -> None:
    verify_bundle(bundle, cert_pem(root, signer), ca_of(root), kw.get("revoked", ()))


def relayed(bundle: JobBundle, change: Callable[[dict[str, Any]], None]) -> JobBundle:
    """The bundle as a coordinator relays it (JSON), after `change` to its JSON object."""
    data = json.loads(json.dumps(bundle.to_json()))
    change(data)
    return JobBundle.from_json(json.loads(json.dumps(data)))


def test_a_bundle_verifies_and_survives_its_json_round_trip(
    root: Path, banks: Any, bundle: JobBundle
) -> None:
    verify(bundle, root)
    again = relayed(bundle, lambda d: None)
    assert again == bundle
    verify(again, root)
    assert bundle.submitter == SUBMITTER
    assert bundle.schema == banks.schema.read_text()
    assert bundle.config["data"]["schema_file"] == SCHEMA_FILE
    assert bundle.config["data"]["organisations"] == {
        b: f"{b}.csv" for b in ("bank_a", "bank_b", "bank_c")
    }
    assert bundle.organisations() == ["bank_a", "bank_b", "bank_c"]
    assert bundle.job_id.isalnum() and not bundle.allow_refusals


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        table = data
        for key in path[:-1]:
            table = table[key]
        table[path[-1]] = value

    return change


#: What a coordinator might change in a bundle it relays: every signed field.
TAMPERING: dict[str, Callable[[dict[str, Any]], None]] = {
    "rounds": _set(("config", "federation", "rounds"), 400),
    "learning rate": _set(("config", "federation", "learning_rate"), 10.0),
    "secure aggregation": _set(("config", "secure_aggregation"), "plain"),
    "an organisation's file": _set(("config", "data", "organisations", "bank_a"), "bank_b.csv"),
    "an organisation added": _set(("config", "data", "organisations", "evil"), "evil.csv"),
    "the model": _set(("config", "model", "hidden"), [16, 16]),
    "the schema text": lambda d: d.update(schema=d["schema"].replace("70.0", "700.0", 1)),
    "the schema dropped": _set(("schema",), None),
    "allow_refusals": _set(("allow_refusals",), True),
    "job_id": _set(("job_id",), "0123456789abcdef"),
    "submitted_at": _set(("submitted_at",), "2020-01-01T00:00:00+00:00"),
    "the signature": lambda d: d.update(signature="A" * len(d["signature"])),
}


@pytest.mark.parametrize("field", list(TAMPERING))
def test_a_coordinator_cannot_change_any_signed_field(
    root: Path, bundle: JobBundle, field: str
) -> None:
    changed = relayed(bundle, TAMPERING[field])
    assert changed != bundle  # the change took
    with pytest.raises(JobRejected, match="signature does not verify; the job was changed"):
        verify(changed, root)


def test_the_schema_change_is_a_real_bound(bundle: JobBundle) -> None:
    """The schema tampering above widens a declared bound (not a no-op replace)."""
    assert bundle.schema is not None and "70.0" in bundle.schema


def test_a_job_cannot_be_put_under_another_submitters_name(root: Path, bundle: JobBundle) -> None:
    renamed = relayed(bundle, _set(("submitter",), OTHER_SUBMITTER))
    with pytest.raises(JobRejected, match="does not verify"):
        verify(renamed, root, signer=OTHER_SUBMITTER)  # its certificate, the original signature
    with pytest.raises(JobRejected, match="names another submitter"):
        verify(renamed, root, signer=SUBMITTER)
    with pytest.raises(JobRejected, match="names another submitter"):
        verify(bundle, root, signer=OTHER_SUBMITTER)


def test_only_the_submitters_own_key_signs_for_it(root: Path, bundle: JobBundle) -> None:
    """Re-signed with another key (a site's, another submitter's): refused."""
    for signer in ("bank_a", OTHER_SUBMITTER, "server"):
        with pytest.raises(JobRejected, match="does not verify"):
            verify(resigned(bundle, identity(root, signer)), root)


def test_a_site_or_coordinator_certificate_is_not_a_submitters(
    root: Path, bundle: JobBundle
) -> None:
    for name in ("bank_a", "server"):
        with pytest.raises(JobRejected, match="submitter certificate is required"):
            verify_bundle(bundle, cert_pem(root, name), ca_of(root), ())


def test_a_rogue_ca_cannot_vouch_for_a_forged_job(
    root: Path, bundle: JobBundle, tmp_path: Path
) -> None:
    """A coordinator that runs its own CA issues itself 'risk-team' and signs a job: the
    sites check the certificate against the federation's CA."""
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue)
    pki.issue(rogue, SUBMITTER, role="submitter")
    changed = relayed(bundle, _set(("config", "federation", "rounds"), 99))
    forged = resigned(changed, identity(rogue, SUBMITTER))
    verify_bundle(forged, cert_pem(rogue, SUBMITTER), ca_of(rogue), ())  # valid there
    with pytest.raises(JobRejected, match="not issued by this federation's CA"):
        verify_bundle(forged, cert_pem(rogue, SUBMITTER), ca_of(root), ())


def test_a_revoked_submitter_is_refused(root: Path, bundle: JobBundle, tmp_path: Path) -> None:
    ca_dir = copy_of(root, tmp_path / "ca")
    verify_bundle(bundle, cert_pem(ca_dir, SUBMITTER), ca_of(ca_dir), pki.revoked_serials(ca_dir))
    pki.revoke(ca_dir, SUBMITTER)
    with pytest.raises(JobRejected, match="revoked"):
        verify_bundle(
            bundle, cert_pem(ca_dir, SUBMITTER), ca_of(ca_dir), pki.revoked_serials(ca_dir)
        )


@pytest.mark.parametrize("junk", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\n"])
def test_a_certificate_that_is_not_one_is_refused(
    root: Path, bundle: JobBundle, junk: bytes
) -> None:
    with pytest.raises(JobRejected, match="the submitter's certificate"):
        verify_bundle(bundle, junk, ca_of(root), ())


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("signature"),
        lambda d: d.update(signature="not base64!"),
        lambda d: d.update(job_id="../../etc"),
        lambda d: d.update(job_id="a" * 65),
        lambda d: d.update(job_id=""),
        lambda d: d.update(job_id=7),
        lambda d: d.update(config="rounds=4"),
        lambda d: d.update(schema=["x"]),
        lambda d: d["config"]["federation"].update(rounds=math.nan),
        lambda d: d["config"].update(seed=math.inf),
    ],
    ids=[
        "no signature",
        "bad base64",
        "job id path",
        "job id long",
        "job id empty",
        "job id number",
        "config text",
        "schema list",
        "NaN",
        "infinity",
    ],
)
def test_a_malformed_bundle_is_rejected_not_crashed_on(
    bundle: JobBundle, change: Callable[[dict[str, Any]], None]
) -> None:
    """Whatever the coordinator sends, parsing it raises JobRejected and nothing else (Python's
    json reads NaN and Infinity, which cannot be signed)."""
    data = copy.deepcopy(bundle.to_json())
    change(data)
    with pytest.raises(JobRejected, match="malformed"):
        JobBundle.from_json(json.loads(json.dumps(data)))
    not_objects: list[Any] = [None, [], "bundle", 3]
    for not_an_object in not_objects:
        with pytest.raises(JobRejected, match="malformed"):
            JobBundle.from_json(not_an_object)


@pytest.mark.parametrize(
    ("key", "extra"),
    [
        ("[data] test_file", None),
        (
            "[privacy] ledger",
            "fraction_evaluate = 0.0\n"
            '[privacy]\nunit = "client"\nepsilon = 8.0\ndelta = 1e-5\nledger = "ledger.db"\n',
        ),
        ("[checkpoint] key_file", '[checkpoint]\nkey_file = "checkpoint.key"\n'),
    ],
    ids=["test_file", "ledger", "key_file"],
)
def test_a_local_path_cannot_travel_with_a_job(
    root: Path, banks: Any, key: str, extra: str | None
) -> None:
    make = banks_module().federation_config
    if extra is None:
        config = make(banks, test=True, name="t")
    else:
        config = make(banks, test=False, extra=extra, name="t")
    load_config(config)  # a valid run config: only the job refuses it
    with pytest.raises(UserError, match="^" + re.escape(f"{key} cannot travel with a job: ")):
        make_bundle(config, submitter=SUBMITTER, identity=identity(root, SUBMITTER))


def test_without_drops_exactly_the_refusing_organisations(root: Path, lenient: JobBundle) -> None:
    verify(lenient, root)
    config = without(lenient, ["bank_b"])
    assert config["data"]["organisations"] == {"bank_a": "bank_a.csv", "bank_c": "bank_c.csv"}
    assert config["federation"]["clients"] == 2
    signed = copy.deepcopy(lenient.config)
    del signed["data"]["organisations"]["bank_b"]
    signed["federation"]["clients"] = 2
    assert config == signed  # every other key as signed
    assert lenient.organisations() == ["bank_a", "bank_b", "bank_c"]  # the bundle is untouched
    assert without(lenient, []) == lenient.config
    assert without(lenient, ["bank_a", "bank_c"])["federation"]["clients"] == 1
    with pytest.raises(UserError, match="every organisation refused it"):
        without(lenient, ["bank_a", "bank_b", "bank_c"])


def test_a_job_that_does_not_allow_refusals_cannot_be_run_without_a_site(
    bundle: JobBundle,
) -> None:
    """A coordinator that drops a site from such a job (claiming it refused) is caught where
    the job's config is made, by the coordinator and by every site."""
    assert without(bundle, []) == bundle.config
    with pytest.raises(JobRejected, match="does not allow refusals, so it cannot run without"):
        without(bundle, ["bank_b"])


def test_written_job_files_are_a_run_config_with_the_bundled_schema(
    lenient: JobBundle, tmp_path: Path
) -> None:
    bundle = lenient
    folder = tmp_path / "job"
    path = write_job_files(bundle, folder, without(bundle, ["bank_c"]))
    config = load_config(path)
    assert config.data.schema_file == (folder / SCHEMA_FILE).resolve()
    assert (folder / SCHEMA_FILE).read_text() == bundle.schema
    assert config.data.organisations is not None
    assert sorted(config.data.organisations) == ["bank_a", "bank_b"]
    assert config.federation.clients == 2
    assert config.federation.rounds == bundle.config["federation"]["rounds"]
    assert (folder / SCHEMA_FILE).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("model", "model_dir", "/srv/models"),
        ("privacy", "ledger", "/site/home/ledger.db"),
        ("data", "schema_file", "/etc/passwd"),
        ("data", "organisations", {"bank_a": "../other/bank_a.csv", "bank_b": "bank_b.csv"}),
        ("data", "organisations", {"bank_a": "/data/bank_a.csv", "bank_b": "bank_b.csv"}),
    ],
)
def test_a_signed_job_naming_a_path_on_the_site_is_refused(
    root: Path, section: str, key: str, value: object
) -> None:
    """A submitter's own signature does not let it point a site at the site's own disk."""
    config = job_config()
    config.setdefault(section, {})[key] = value
    hostile = signed_bundle(root, SUBMITTER, config)
    with pytest.raises(JobRejected, match=re.escape(f"[{section}]")):
        verify(hostile, root)
