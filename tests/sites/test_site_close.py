"""A site that was down when a job it joined ended journals the job's end from the
coordinator's word at its next poll (and releases its charge if the job finished); a job that
ended before the site joined it is closed as cancelled."""

from __future__ import annotations

from pathlib import Path

from veil.crypto import pki
from veil.privacy.dp.ledger import PrivacyLedger
from veil.sites.site import Site, SiteSettings


def make_site(tmp_path: Path) -> Site:
    ca = tmp_path / "pki"
    pki.init_ca(ca)
    pki.issue(ca, "bank_a", role="client")
    policy = tmp_path / "policy.toml"
    policy.write_text('datasets = ["bank_a.csv"]\n')
    settings = SiteSettings(
        name="bank_a",
        home=tmp_path / "home",
        pki_dir=ca,
        data_dir=tmp_path / "data",
        policy=policy,
        coordinator="127.0.0.1:9",  # never called here
    )
    return Site(settings)


def test_a_job_that_ended_while_the_site_was_down_is_journalled(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    with PrivacyLedger(site.ledger_path) as ledger:
        ledger.set_budget("bank_a.csv", epsilon=5.0, delta=1e-4)
        charge = ledger.charge(
            "bank_a.csv", epsilon=1.0, delta=1e-5, who="t", what="job j1", mechanism="dp-sgd",
            parameters={},
        )  # fmt: skip
    for job in ("j1", "j2", "j3", "j4"):
        site.journal.answered(
            job, name=job, submitter="t", accept=True, reason="", dataset="bank_a.csv"
        )
    site.journal.update("j1", "running", charges=[charge.id])
    site.journal.update("j2", "running")
    site.journal.update("j4", "running")
    site._act({"states": {"j1": "finished", "j2": "cancelled", "j3": "refused", "j4": "running"}})
    states = {e.job_id: (e.state, e.reason) for e in site.journal.entries()}
    assert states["j1"][0] == "finished" and states["j2"][0] == "cancelled"
    assert states["j3"] == ("cancelled", "the job was refused first")
    assert states["j4"][0] == "running"  # still running at the coordinator: untouched
    with PrivacyLedger(site.ledger_path) as ledger:
        assert ledger.charges()[0].released_at is not None
    site.close()
