"""`veil coordinator start`: the long-lived coordinator that runs many jobs for many sites.

It serves the control service (`veil.sites.control`) to submitters and sites, keeps every job
in its job store (`veil.sites.jobs`), and runs each job as its own `veil server` process in
``HOME/jobs/ID/`` (run folder, result.json, report, checkpoints sealed with the coordinator's
key, server log). The coordinator never decides for a site: it offers each job to the sites it
names, and a job starts only when every one of them has answered (a site that does not answer
within `offer_timeout_s` counts as refusing). A refusal stops the job unless the job allows
refusals; then it runs without the sites that refused.

A restart loses nothing: a job that was running is started again with ``--resume`` on the port
it had, so its members, which keep retrying, rejoin it where its checkpoint left it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.crypto import pki
from veil.crypto.envelope import generate_key_file
from veil.errors import UserError, VeilError
from veil.sites.bundle import JobBundle, verify_bundle, without, write_job_files
from veil.sites.control import ControlServer, Method
from veil.sites.jobs import FINAL, Job, JobStore
from veil.sites.metrics import Metrics, log_event
from veil.sites.views import server_view

log = logging.getLogger("veil.coordinator")

SUBMITTER_CERT = "submitter.crt"
#: Under CKKS the job waits for these from its dealer (the first member by name).
HE_PUBLIC = ("he/public.ctx", "he/keyset.json")
_EXIT_STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGINT}


@dataclass
class CoordinatorSettings:
    """Where the coordinator lives and how it runs jobs."""

    home: Path
    pki_dir: Path
    address: str
    #: The host the job servers listen on (default: the control address's host).
    jobs_host: str | None = None
    parallel: int = 1
    offer_timeout_s: float = 600.0
    tick_s: float = 0.25


@dataclass
class _Running:
    process: subprocess.Popen[bytes]
    port: int


@dataclass
class Coordinator:
    """The coordinator's state; `serve` runs it until `stop` returns True."""

    settings: CoordinatorSettings
    metrics: Metrics = field(default_factory=Metrics)
    running: dict[str, _Running] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    #: Set by `shutdown`: a job server that exits now is to resume, not to fail.
    stopping: bool = False

    def __post_init__(self) -> None:
        home = self.settings.home
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (home / "jobs").mkdir(exist_ok=True, mode=0o700)
        self.key_file = home / "checkpoint.key"
        if not self.key_file.is_file():
            generate_key_file(self.key_file)
        self.store = JobStore(home / "jobs.db")
        self.lock = threading.Lock()
        self.ca = pki.load_certificate(self.settings.pki_dir / pki.CA_CERT)
        self._declare_metrics()

    def _declare_metrics(self) -> None:
        m = self.metrics
        self.m_jobs = m.gauge("jobs", "jobs by state", labels=("state",))
        self.m_submitted = m.counter("jobs_submitted", "jobs submitted")
        self.m_refusals = m.counter("refusals", "jobs refused, by site", labels=("site",))
        self.m_rounds = m.counter("rounds", "rounds finished by the coordinator's jobs")
        self.m_bytes = m.counter("bytes", "bytes moved by finished jobs", labels=("direction",))
        self.m_sites = m.gauge("sites_connected", "sites heard from in the last 10 s")

    # -- the control service ---------------------------------------------------------------

    def methods(self) -> dict[str, Method]:
        """The control service's methods and the role that may call each."""
        return {
            "Submit": Method("submitter", self.submit),
            "List": Method("submitter", self.list_jobs),
            "Status": Method("submitter", self.status),
            "Logs": Method("submitter", self.logs),
            "Cancel": Method("submitter", self.cancel),
            "Poll": Method("client", self.poll),
            "Answer": Method("client", self.answer),
            "Material": Method("client", self.material),
            "Report": Method("client", self.report),
        }

    def submit(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        bundle = JobBundle.from_json(request["bundle"])
        certificate = str(request["certificate"]).encode()
        if bundle.submitter != caller:
            raise UserError(f"the job is signed by '{bundle.submitter}', not by '{caller}'")
        verify_bundle(bundle, certificate, self.ca, pki.revoked_serials(self.settings.pki_dir))
        if not bundle.organisations():
            raise UserError(
                "a job names its organisations in [data] organisations = {NAME = 'FILE'}: "
                "each is a site that holds that file"
            )
        with self.lock:
            job = self.store.add(bundle)
            self.store.put_material(job.id, {SUBMITTER_CERT: certificate})
        self.m_submitted.inc()
        log_event(log, "job submitted", job=job.id, name=job.bundle.name, submitter=caller)
        return {"job_id": job.id, "state": job.state}

    def list_jobs(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        return {"jobs": [_summary(j) for j in self.store.jobs()]}

    def status(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(str(request["job_id"]))
        answers = self.store.answers(job.id)
        return _summary(job) | {
            "sites": {
                n: (
                    "waiting"
                    if n not in answers
                    else ("accepted" if answers[n].accept else f"refused: {answers[n].reason}")
                )
                for n in job.bundle.organisations()
            },
            "dropped": job.dropped,
            "rounds_done": self._rounds_done(job),
            "rounds_planned": job.bundle.config.get("federation", {}).get("rounds"),
            "result": job.summary,
        }

    def logs(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(str(request["job_id"]))
        tail = max(0, int(request.get("tail", 200)))
        path = self._folder(job.id) / "server.log"
        lines = path.read_text(errors="replace").splitlines() if path.is_file() and tail else []
        lines = lines[len(lines) - tail :] if tail else []
        return {"events": self.store.events(job.id), "server_log": lines}

    def cancel(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        job_id = str(request["job_id"])
        with self.lock:
            job = self.store.get(job_id)
            if job.bundle.submitter != caller:
                raise UserError(
                    f"job {job_id} was submitted by '{job.bundle.submitter}': only its "
                    "submitter may cancel it"
                )
            if job.state in FINAL:
                raise UserError(f"job {job_id} is already {job.state}")
            self.store.move(job_id, "cancelled", reason=f"cancelled by {caller}")
            running = self.running.pop(job_id, None)
        if running is not None and running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
        log_event(log, "job cancelled", job=job_id, by=caller)
        return {"job_id": job_id, "state": "cancelled"}

    def poll(self, site: str, request: dict[str, Any]) -> dict[str, Any]:
        """What site `site` is to do: answer offers, deal keys, join running jobs; and the
        state of every job it is part of."""
        self.seen[site] = time.monotonic()
        offers, runs, deals, states = [], [], [], {}
        material = self.store.material
        for job in self.store.jobs():
            if site not in job.bundle.organisations():
                continue
            states[job.id] = job.state
            if job.state == "offered" and site not in self.store.answers(job.id):
                cert = material(job.id)[SUBMITTER_CERT].decode()
                offers.append({"bundle": job.bundle.to_json(), "certificate": cert})
            elif site in job.members() and job.state == "starting" and self._dealer(job) == site:
                if _is_ckks(job) and not set(HE_PUBLIC) <= set(material(job.id)):
                    deals.append({"job_id": job.id, "members": self._certificates(job)})
            elif site in job.members() and job.state == "running" and job.port is not None:
                runs.append(self._run_entry(job, site))
        return {"offers": offers, "runs": runs, "deals": deals, "states": states}

    def _run_entry(self, job: Job, site: str) -> dict[str, Any]:
        files = {
            name: data.hex()
            for name, data in self.store.material(job.id).items()
            if name in HE_PUBLIC or name == f"he/sealed/{site}.box"
        }
        return {"job_id": job.id, "port": job.port, "dropped": job.dropped, "material": files}

    def answer(self, site: str, request: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(str(request["job_id"]))
        if site not in job.bundle.organisations():
            raise UserError(f"job {job.id} does not name '{site}'")
        accept = bool(request["accept"])
        reason = str(request.get("reason", ""))
        self.store.answer(job.id, site, accept=accept, reason=reason)
        if not accept:
            self.m_refusals.inc(site=site)
        log_event(log, "site answered", job=job.id, site=site, accept=accept, reason=reason)
        return {}

    def material(self, site: str, request: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(str(request["job_id"]))
        if job.state != "starting" or self._dealer(job) != site:
            raise UserError(f"'{site}' is not the key dealer of job {job.id}")
        files = {str(k): bytes.fromhex(str(v)) for k, v in dict(request["files"]).items()}
        expected = {*HE_PUBLIC, *(f"he/sealed/{n}.box" for n in job.members())}
        if set(files) != expected:
            raise UserError("key material: the public key set and one sealed box per member")
        if set(HE_PUBLIC) & set(self.store.material(job.id)):
            raise UserError(f"job {job.id} has its key material already")  # one ceremony only
        self.store.put_material(job.id, files)
        return {}

    def report(self, site: str, request: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(str(request["job_id"]))
        self.store.event(job.id, f"site {site}", str(request.get("detail", ""))[:500])
        return {}

    # -- the scheduler ---------------------------------------------------------------------

    def tick(self) -> None:
        """One pass: decide offered jobs, start what may start, collect finished servers."""
        with self.lock:
            for job in self.store.jobs(states=("offered",)):
                self._decide(job)
            for job_id, run in list(self.running.items()):
                if run.process.poll() is not None:
                    self._collected(job_id, run)
            for job in self.store.jobs(states=("running", "starting")):
                if job.id not in self.running and len(self.running) < self.settings.parallel:
                    self._launch_or_fail(job)
            self._count()

    def _launch_or_fail(self, job: Job) -> None:
        """Launch a job; one that cannot be launched fails with the reason, and the coordinator
        goes on serving the others."""
        try:
            self._launch(job)
        except VeilError as exc:
            self.store.move(job.id, "failed", reason=str(exc))
            log_event(log, "job failed", job=job.id, reason=str(exc))
        except OSError as exc:
            self.store.move(job.id, "failed", reason=f"cannot start its server: {exc}")
            log.exception(json.dumps({"event": "job failed", "job": job.id}))

    def _decide(self, job: Job) -> None:
        answers = self.store.answers(job.id)
        names = job.bundle.organisations()
        waited = time.time() - _epoch(job.created_at)
        missing = [n for n in names if n not in answers]
        if missing and waited < self.settings.offer_timeout_s:
            return
        refused = {n: a.reason for n, a in answers.items() if not a.accept}
        refused |= {n: f"no answer within {self.settings.offer_timeout_s:g} s" for n in missing}
        why = "; ".join(f"refused by {n}: {r}" for n, r in refused.items())
        if refused and (not job.bundle.allow_refusals or len(refused) == len(names)):
            self.store.move(job.id, "refused", reason=why)
            log_event(log, "job refused", job=job.id, reason=why)
            return
        self.store.move(job.id, "starting", reason=why or None, dropped=sorted(refused))

    def _launch(self, job: Job) -> None:
        if _is_ckks(job) and not set(HE_PUBLIC) <= set(self.store.material(job.id)):
            return  # the dealer has not sent the key set yet
        folder = self._folder(job.id)
        config_path = write_job_files(job.bundle, folder, without(job.bundle, job.dropped))
        view = server_view(
            self.settings.pki_dir, folder / "pki", job.members(), self.store.material(job.id)
        )
        resume = job.state == "running" and _has_checkpoint(folder / "run")
        if job.state == "running" and not resume:
            shutil.rmtree(folder / "run", ignore_errors=True)  # stopped before its first round
        port_file = folder / "server.port"
        port_file.unlink(missing_ok=True)
        host = self.settings.jobs_host or self.settings.address.rsplit(":", 1)[0]
        args = [
            sys.executable, "-m", "veil.cli", "server", str(config_path),
            "--run-dir", str(folder / "run"), "--pki", str(view),
            "--address", f"{host}:{job.port or 0}",
            "--port-file", str(port_file), "--checkpoint-key", str(self.key_file),
            *(["--resume"] if resume else []),
        ]  # fmt: skip
        from veil.deployment import spawn_child, wait_for_port

        # SIGKILL when the coordinator dies: a job server that stopped politely would tell its
        # members that the run is over; killed, it is resumed from its checkpoint at the next
        # start, and its members, which keep retrying, rejoin it.
        process = spawn_child(args, folder / "server.log", {**os.environ}, signal.SIGKILL)
        try:
            port = wait_for_port(port_file, process, time.monotonic() + 60)
        except UserError as exc:
            self.store.move(job.id, "failed", reason=str(exc))
            return
        self.running[job.id] = _Running(process, port)
        self.store.move(job.id, "running", port=port)
        how = "resumed from its checkpoint" if resume else "from the start"
        self.store.event(job.id, "server started", f"port {port}, {how}")
        log_event(log, "job started", job=job.id, port=port, resumed=resume)

    def _collected(self, job_id: str, run: _Running) -> None:
        del self.running[job_id]
        job = self.store.get(job_id)
        code = run.process.returncode
        if job.state != "running":
            return
        if code in _EXIT_STOPPED and self.stopping:
            return  # the coordinator is stopping: the job resumes at its next start
        result = self._folder(job_id) / "run" / "result.json"
        if code == 0 and result.is_file():
            summary = _result_summary(result)
            self.m_rounds.inc(summary["rounds"])
            self.m_bytes.inc(summary["bytes_up"], direction="up")
            self.m_bytes.inc(summary["bytes_down"], direction="down")
            self.store.move(job_id, "finished", summary=summary)
            log_event(log, "job finished", job=job_id, final=summary["final"])
            return
        from veil.deployment import server_failure

        why = server_failure(code, self._folder(job_id) / "server.log")
        self.store.move(job_id, "failed", reason=why)
        log_event(log, "job failed", job=job_id, reason=why)

    def _count(self) -> None:
        jobs = self.store.jobs()
        for state in ("offered", "starting", "running", "finished", "failed", "refused"):
            self.m_jobs.set(sum(j.state == state for j in jobs), state=state)
        self.m_jobs.set(sum(j.state == "cancelled" for j in jobs), state="cancelled")
        now = time.monotonic()
        self.m_sites.set(sum(now - t < 10 for t in self.seen.values()))

    # -- helpers ---------------------------------------------------------------------------

    def _folder(self, job_id: str) -> Path:
        return self.settings.home / "jobs" / job_id

    def _dealer(self, job: Job) -> str | None:
        members = sorted(job.members())
        return members[0] if members else None

    def _certificates(self, job: Job) -> dict[str, str]:
        return {
            n: (self.settings.pki_dir / pki.NODES / n / pki.NODE_CERT).read_text()
            for n in job.members()
        }

    def _rounds_done(self, job: Job) -> int:
        db = self._folder(job.id) / "run" / "veil.db"
        if not db.is_file():
            return 0
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
                return int(conn.execute("SELECT COUNT(DISTINCT round) FROM rounds").fetchone()[0])
        except sqlite3.Error:
            return 0

    def shutdown(self) -> None:
        """Stop the job servers at once, without telling their members that the run is over:
        each resumes from its checkpoint at the next start, and its members rejoin it."""
        self.stopping = True
        with self.lock:
            for run in self.running.values():
                run.process.kill()
                run.process.wait()
            self.running.clear()
        self.store.close()


def serve(
    settings: CoordinatorSettings,
    *,
    stop: Callable[[], bool],
    metrics_address: str | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Run the coordinator until `stop()` is true."""
    from veil.deployment import SERVER_NAME, server_credentials
    from veil.sites.metrics import serve_metrics

    coordinator = Coordinator(settings)
    pki_dir = settings.pki_dir
    server = ControlServer(
        coordinator.methods(),
        ca=coordinator.ca,
        revoked=lambda: frozenset(pki.revoked_serials(pki_dir)),
    )
    pki.node_files(pki_dir, SERVER_NAME)  # a clear error when the coordinator has no keys
    port = server.start(settings.address, server_credentials(pki_dir))
    exporter = serve_metrics(coordinator.metrics, metrics_address) if metrics_address else None
    log_event(log, "coordinator listening", port=port, home=str(settings.home))
    if on_listening is not None:
        on_listening(port)
    try:
        while not stop():
            coordinator.tick()
            time.sleep(settings.tick_s)
    finally:
        server.stop()
        coordinator.shutdown()
        if exporter is not None:
            exporter.close()
        log_event(log, "coordinator stopped")


def _summary(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "name": job.bundle.name,
        "submitter": job.bundle.submitter,
        "state": job.state,
        "reason": job.reason,
        "submitted_at": job.created_at,
        "updated_at": job.updated_at,
    }


def _is_ckks(job: Job) -> bool:
    return job.bundle.config.get("secure_aggregation") == "ckks"


def _has_checkpoint(run_dir: Path) -> bool:
    from veil.store.checkpoint import CHECKPOINT_FILE

    return (run_dir / CHECKPOINT_FILE).is_file()


def _result_summary(path: Path) -> dict[str, Any]:
    from veil.result import Result

    result = Result.model_validate_json(path.read_text())
    return {
        "final": result.final,
        "rounds": len(result.rounds),
        "epsilon": result.privacy.epsilon,
        "delta": result.privacy.delta,
        "aggregation": result.privacy.aggregation,
        "bytes_up": result.communication.bytes_up,
        "bytes_down": result.communication.bytes_down,
        "organisations": result.privacy.model_dump().get("organisations"),
    }


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
