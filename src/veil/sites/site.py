"""`veil site start`: one organisation's long-lived agent.

A site holds the organisation's keys (its PKI folder), its data files (`--data-dir`), its
privacy officer's policy (`policy.toml`, `veil.sites.policy`), its own privacy ledger and its
journal (`veil.sites.journal`), all in its own folders; it calls the coordinator's control
service and nothing calls it. Every `poll_s` it asks the coordinator what to do:

- an offered job: check the submitter's signature (`veil.sites.bundle.verify_bundle`), its own
  data file against the job's data contract, and the job against its policy and its ledger;
  journal the answer, then send it (a refusal carries the one-line reasons);
- a job to deal keys for (CKKS, when it is the dealer): run the key ceremony for the job's
  members from their CA-checked certificates and send the public set and the sealed boxes;
- a running job it accepted: check the job as it will run (without the sites that refused),
  charge its own ledger for its own ε (once: the charge ids go into the journal), and start its
  member, `veil client --policy`, which checks every task against the policy again.

A lost connection (a network cut, a coordinator restart) is retried every poll, forever; the
member processes retry on their own. A site killed and started again rejoins the jobs its
journal says it joined, without charging them again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.atomic import atomic_write_text
from veil.crypto import pki
from veil.errors import UserError, VeilError
from veil.sites.bundle import JobBundle, JobRejected, verify_bundle, without, write_job_files
from veil.sites.control import ControlClient, ControlError
from veil.sites.journal import FINAL_ENTRIES, Entry, Journal, JournalEntry
from veil.sites.metrics import Metrics, log_event
from veil.sites.policy import job_charges, job_refusals, load_policy, year_spent
from veil.sites.views import member_view

log = logging.getLogger("veil.site")

STATUS_FILE = "status.json"
LEDGER_FILE = "ledger.db"
JOURNAL_FILE = "journal.db"
#: The coordinator's states in which a job is over.
_ENDED = ("finished", "failed", "refused", "cancelled")
#: A member process that fails is started again this many times while its job runs.
MAX_ATTEMPTS = 3


@dataclass
class SiteSettings:
    """Where a site lives and whom it talks to."""

    name: str
    home: Path
    pki_dir: Path
    data_dir: Path
    policy: Path
    coordinator: str
    poll_s: float = 0.5


@dataclass
class Site:
    """A site's state; `serve` runs it."""

    settings: SiteSettings
    metrics: Metrics = field(default_factory=Metrics)
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    connected: bool = False
    last_contact: float | None = None
    #: The coordinator's state of each job this site is part of, as of the last poll.
    states: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.policy = load_policy(s.policy)  # a broken policy stops the start, never a job
        s.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (s.home / "jobs").mkdir(exist_ok=True, mode=0o700)
        self.journal = Journal(s.home / JOURNAL_FILE)
        self.ledger_path = s.home / LEDGER_FILE
        from veil.privacy.dp.ledger import PrivacyLedger

        PrivacyLedger(self.ledger_path).close()  # created now: `veil budget set` can find it
        self.ca = pki.load_certificate(s.pki_dir / pki.CA_CERT)
        self.client = ControlClient(s.coordinator, s.pki_dir, s.name, timeout_s=15)
        m = self.metrics
        self.m_jobs = m.counter("site_jobs", "jobs this site ended, by outcome", ("outcome",))
        self.m_refusals = m.counter("site_refusals", "jobs this site refused")
        self.m_connected = m.gauge("site_connected", "1 while the coordinator answers")
        self.m_spent = m.gauge("site_epsilon_spent", "ε charged in 365 days", ("dataset",))
        self.m_left = m.gauge("site_epsilon_remaining", "ε left this year", ("dataset",))

    # -- one poll --------------------------------------------------------------------------

    def step(self) -> None:
        """Ask the coordinator what to do, and do it."""
        self._reap()  # first: a member that ended is journalled, never started again
        try:
            reply = self.client.call("Poll", {"running": sorted(self.children)})
        except ControlError as exc:
            if self.connected:
                log_event(log, "disconnected", reason=str(exc), level="WARNING")
            self.connected = False
        else:
            if not self.connected:
                log_event(log, "connected", coordinator=self.settings.coordinator)
            self.connected, self.last_contact = True, time.time()
            try:
                self._act(reply)
            except (AttributeError, KeyError, TypeError, ValueError):
                log.exception(json.dumps({"event": "malformed poll reply"}))
        self._write_status()

    def _act(self, reply: dict[str, Any]) -> None:
        for offer in reply.get("offers", []):
            self._guarded(str(offer["bundle"].get("job_id", "?")), self.consider, offer)
        for deal in reply.get("deals", []):
            self._guarded(str(deal["job_id"]), self.deal, deal)
        for run in reply.get("runs", []):
            self._guarded(str(run["job_id"]), self.join, run)
        self.states = {str(k): str(v) for k, v in reply.get("states", {}).items()}
        for job_id, state in self.states.items():
            child = self.children.get(job_id)
            if state in ("cancelled", "failed") and child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
            if state in _ENDED and child is None:
                self._close(job_id, state)

    def _close(self, job_id: str, state: str) -> None:
        """Journal the end of a job whose member is not running here: one that ended before
        this site joined it, or whose member ended while this site was down."""
        entry = self.journal.get(job_id)
        if entry is None or entry.state in FINAL_ENTRIES:
            return
        if entry.state == "accepted":
            self.journal.update(job_id, "cancelled", reason=f"the job was {state} first")
            return
        ended: Entry = (
            "finished" if state == "finished" else "cancelled" if state == "cancelled" else "failed"
        )
        self._end(entry, ended)

    def _end(self, entry: JournalEntry, ended: Entry) -> None:
        """Journal a joined job's end; a finished job's ledger charges are marked released
        (a failed or cancelled one's stay unreleased: the ledger cannot know what was sent)."""
        from veil.privacy.dp.ledger import PrivacyLedger

        self.journal.update(entry.job_id, ended)
        if ended == "finished":
            with PrivacyLedger(self.ledger_path) as ledger:
                for charge_id in entry.charges:
                    ledger.mark_released(charge_id)
        self.m_jobs.inc(outcome=ended)

    def _guarded(
        self, job_id: str, action: Callable[[dict[str, Any]], None], item: dict[str, Any]
    ) -> None:
        """Run one action; a failure is logged and reported, and never stops the site."""
        try:
            action(item)
        except ControlError as exc:
            log_event(log, "coordinator refused", job=job_id, reason=str(exc), level="WARNING")
        except VeilError as exc:
            log_event(log, "job error", job=job_id, reason=str(exc), level="ERROR")
        except Exception as exc:  # a malformed reply or a local fault: the site keeps running
            log.exception(json.dumps({"event": "internal error", "job": job_id}))
            self._report(job_id, f"error: {type(exc).__name__}; see the site's log")
            return
            self._report(job_id, f"error: {exc}")

    # -- offers ----------------------------------------------------------------------------

    def consider(self, offer: dict[str, Any]) -> None:
        """Answer one offered job (the journal's answer if it answered before)."""
        bundle = JobBundle.from_json(offer["bundle"])
        entry = self.journal.get(bundle.job_id)
        if entry is None:
            try:
                verify_bundle(bundle, str(offer["certificate"]).encode(), self.ca, self._revoked())
                self._save(bundle)
                reasons = self.refusals(bundle, bundle.config)
            except (JobRejected, UserError) as exc:
                lines = str(exc).splitlines()  # a data file's violations: the first, and a count
                more = (
                    f" (and {len(lines) - 1} more lines in the site's log)"
                    if len(lines) > 1
                    else ""
                )
                reasons = [lines[0] + more if lines else type(exc).__name__]
                log_event(log, "refusing", job=bundle.job_id, detail=str(exc), level="WARNING")
            entry = self.journal.answered(
                bundle.job_id,
                name=bundle.name,
                submitter=bundle.submitter,
                accept=not reasons,
                reason="; ".join(reasons),
                dataset=self._file_of(bundle) or "",
            )
            if reasons:
                self.m_refusals.inc()
            log_event(log, "answered", job=bundle.job_id, accept=not reasons, reasons=reasons)
        accept = entry.state != "refused"
        self.client.call(
            "Answer", {"job_id": bundle.job_id, "accept": accept, "reason": entry.reason}
        )

    def refusals(self, bundle: JobBundle, config_table: dict[str, Any]) -> list[str]:
        """Every reason this site has to refuse the job as `config_table` runs it."""
        from veil.config import load_config
        from veil.deployment import member_data_of
        from veil.privacy.dp.ledger import PrivacyLedger

        name = self.settings.name
        file = self._file_of(bundle)
        if file is None:
            return [f"the job does not name '{name}' in [data] organisations"]
        folder = self._folder(bundle.job_id)
        config = load_config(write_job_files(bundle, folder, config_table))
        path = self.settings.data_dir / file
        if file not in self.policy.datasets:
            return [f"policy datasets: '{file}' is not one of {list(self.policy.datasets)}"]
        if not path.is_file():
            return [f"no data file '{file}' in this site's data folder"]
        client, _ = member_data_of(config, name, path)
        charges = job_charges(config, name, client.n_train, file)
        with PrivacyLedger(self.ledger_path) as ledger:
            spent = year_spent(ledger, file)
            reasons = job_refusals(
                self.policy,
                config,
                submitter=bundle.submitter,
                data_file=file,
                charges=charges,
                spent_this_year=spent,
            )
            if charges and not reasons and file not in {b.dataset_id for b in ledger.budgets()}:
                reasons.append(
                    f"no privacy budget for '{file}' in this site's ledger; its data owner "
                    f"sets one with `veil budget set {file} --epsilon E --delta D "
                    f"--ledger {self.ledger_path}`"
                )
        return reasons

    # -- keys (CKKS) -----------------------------------------------------------------------

    def deal(self, deal: dict[str, Any]) -> None:
        """Run the CKKS key ceremony for a job's members and send what it made: the public set
        and one box sealed to each member (this site keeps its own)."""
        from veil.assembly.secure_aggregation.ckks import ckks_params
        from veil.config import load_config
        from veil.privacy.he import keys as he_keys

        job_id = str(deal["job_id"])
        folder = self._folder(job_id)
        config = load_config(folder / "config.toml")
        dealer = folder / "deal"
        members = {str(k): str(v) for k, v in dict(deal["members"]).items()}
        # Only members of the job as its submitter signed it, this site among them: a name the
        # coordinator made up never becomes a path or a recipient.
        signed = set(self._bundle(job_id).organisations())
        if not set(members) <= signed or self.settings.name not in members:
            raise UserError(f"job {job_id}: the coordinator asked for keys for other members")
        member_view(self.settings.pki_dir, dealer, self.settings.name, {})
        for name, pem in members.items():
            if name != self.settings.name:
                target = dealer / pki.NODES / name / pki.NODE_CERT
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(pem)
        he_dir = dealer / he_keys.HE_DIR
        if not (he_dir / he_keys.KEYSET).is_file():
            he_keys.ceremony(dealer, ckks_params(config.ckks), clients=sorted(members))
        files = {
            str(p.relative_to(dealer)): p.read_bytes().hex()
            for p in sorted(he_dir.rglob("*"))
            if p.is_file()
        }
        self.client.call("Material", {"job_id": job_id, "files": files})
        log_event(log, "dealt keys", job=job_id, members=sorted(members))

    # -- running jobs ----------------------------------------------------------------------

    def join(self, run: dict[str, Any]) -> None:
        """Start (or restart) this site's member of a running job it accepted."""
        job_id = str(run["job_id"])
        entry = self.journal.get(job_id)
        child = self.children.get(job_id)
        if entry is None or entry.state in FINAL_ENTRIES or child is not None:
            return  # not ours, over, or running (`_reap` forgets a member that ended)
        if entry.attempts >= MAX_ATTEMPTS:
            self.journal.update(job_id, "failed", reason="its member failed to run")
            self._report(job_id, "its member failed; see the site's log")
            return
        bundle = self._bundle(job_id)
        dropped = [str(n) for n in run.get("dropped", [])]
        if entry.state == "accepted":
            reasons = self.refusals(bundle, without(bundle, dropped)) if dropped else []
            if reasons:
                self.journal.update(job_id, "refused", reason="; ".join(reasons))
                self._report(job_id, f"refused the job as it runs: {'; '.join(reasons)}")
                return
            self._charge(bundle, entry)
        config_path = write_job_files(bundle, self._folder(job_id), without(bundle, dropped))
        material = {str(k): bytes.fromhex(str(v)) for k, v in run.get("material", {}).items()}
        self._start_member(job_id, config_path, int(run["port"]), material)
        self.journal.update(job_id, "running", attempts=entry.attempts + 1)

    def _charge(self, bundle: JobBundle, entry: JournalEntry) -> None:
        """Charge this site's own ledger for its ε in the job, before it joins; the charge ids
        go into the journal so that a restart never charges twice."""
        from veil.config import load_config
        from veil.deployment import member_data_of
        from veil.privacy.dp.ledger import PrivacyLedger

        file = entry.dataset or ""
        config = load_config(self._folder(bundle.job_id) / "config.toml")
        client, _ = member_data_of(config, self.settings.name, self.settings.data_dir / file)
        charges = job_charges(config, self.settings.name, client.n_train, file)
        ids = []
        record = config.privacy is not None and config.privacy.unit == "record"
        mechanism = "dp-sgd" if record else "dp-fedavg"
        with PrivacyLedger(self.ledger_path) as ledger:
            for c in charges:
                ids.append(
                    ledger.charge(
                        file, epsilon=c.epsilon, delta=c.delta, who=bundle.submitter,
                        what=f"job {bundle.job_id} ({bundle.name})", mechanism=mechanism,
                        parameters=c.parameters,
                    ).id
                )  # fmt: skip
        self.journal.update(
            bundle.job_id,
            "running",
            charges=ids,
            epsilon=sum(c.epsilon for c in charges),
            delta=sum(c.delta for c in charges),
        )
        log_event(log, "charged", job=bundle.job_id, dataset=file, charges=ids)

    def _start_member(
        self, job_id: str, config_path: Path, port: int, material: dict[str, bytes]
    ) -> None:
        from veil.deployment import spawn_child

        s = self.settings
        folder = self._folder(job_id)
        entry = self.journal.get(job_id)
        assert entry is not None and entry.dataset
        view = member_view(s.pki_dir, folder / "pki", s.name, material)
        host = s.coordinator.rsplit(":", 1)[0]
        args = [
            sys.executable, "-m", "veil.cli", "client", str(config_path), "--name", s.name,
            "--data", str(s.data_dir / entry.dataset), "--pki", str(view),
            "--server", f"{host}:{port}", "--policy", str(s.policy),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.children[job_id] = spawn_child(args, folder / "member.log", env, signal.SIGTERM)
        self._report(job_id, "joined")
        log_event(log, "joined", job=job_id, port=port)

    def _reap(self) -> None:
        """Record the member processes that ended."""
        for job_id, child in list(self.children.items()):
            code = child.poll()
            if code is None:
                continue
            del self.children[job_id]
            entry = self.journal.get(job_id)
            if entry is None or entry.state in FINAL_ENTRIES:
                continue
            if code == 0 and self.states.get(job_id) != "cancelled":
                self._end(entry, "finished")
                self._report(job_id, "finished")
            elif self.states.get(job_id) in ("cancelled", "failed", "finished"):
                self._end(entry, "cancelled" if self.states[job_id] == "cancelled" else "failed")
            log_event(log, "member ended", job=job_id, code=code)

    # -- helpers ---------------------------------------------------------------------------

    def _report(self, job_id: str, detail: str) -> None:
        # Lost when the coordinator cannot be reached: the journal holds it.
        with contextlib.suppress(ControlError):
            self.client.call("Report", {"job_id": job_id, "detail": detail})

    def _file_of(self, bundle: JobBundle) -> str | None:
        organisations = dict(bundle.config.get("data", {}).get("organisations") or {})
        file = organisations.get(self.settings.name)
        return None if file is None else Path(str(file)).name

    def _save(self, bundle: JobBundle) -> None:
        folder = self._folder(bundle.job_id)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_text(folder / "bundle.json", json.dumps(bundle.to_json()), mode=0o600)

    def _bundle(self, job_id: str) -> JobBundle:
        path = self._folder(job_id) / "bundle.json"
        return JobBundle.from_json(json.loads(path.read_text()))

    def _folder(self, job_id: str) -> Path:
        return self.settings.home / "jobs" / job_id

    def _revoked(self) -> frozenset[int]:
        return frozenset(pki.revoked_serials(self.settings.pki_dir))

    def status(self) -> dict[str, Any]:
        """What `veil site status` shows."""
        from veil.privacy.dp.ledger import PrivacyLedger

        budget = {}
        with PrivacyLedger(self.ledger_path) as ledger:
            limits = {b.dataset_id: b for b in ledger.budgets()}
            for file in self.policy.datasets:
                spent = year_spent(ledger, file)
                year = self.policy.total_epsilon_per_year
                left = None if year is None else max(0.0, year - spent)
                self.m_spent.set(spent, dataset=file)
                if left is not None:
                    self.m_left.set(left, dataset=file)
                ledger_left = limits[file].epsilon_remaining if file in limits else None
                budget[file] = {"epsilon_this_year": spent, "year_remaining": left,
                                "ledger_remaining": ledger_left}  # fmt: skip
        self.m_connected.set(1.0 if self.connected else 0.0)
        return {
            "name": self.settings.name,
            "coordinator": self.settings.coordinator,
            "connected": self.connected,
            "last_contact": self.last_contact,
            "current_jobs": sorted(j for j, c in self.children.items() if c.poll() is None),
            "budget": budget,
            "jobs": [e.to_json() for e in self.journal.entries()[-20:]],
            "pid": os.getpid(),
        }

    def _write_status(self) -> None:
        atomic_write_text(
            self.settings.home / STATUS_FILE, json.dumps(self.status(), indent=2), mode=0o600
        )

    def close(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children.values():
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        self.client.close()
        self.journal.close()


def serve(
    settings: SiteSettings, *, stop: Callable[[], bool], metrics_address: str | None = None
) -> None:
    """Run the site until `stop()` is true."""
    from veil.sites.metrics import serve_metrics

    site = Site(settings)
    exporter = serve_metrics(site.metrics, metrics_address) if metrics_address else None
    log_event(log, "site started", name=settings.name, coordinator=settings.coordinator)
    try:
        while not stop():
            site.step()
            time.sleep(settings.poll_s)
    finally:
        site.close()
        if exporter is not None:
            exporter.close()
        log_event(log, "site stopped", name=settings.name)
