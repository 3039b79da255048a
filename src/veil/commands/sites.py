"""`veil coordinator`, `veil site` and `veil job`: long-lived sites that run many jobs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.commands import help_of
from veil.errors import UserError

if TYPE_CHECKING:
    from veil.sites.control import ControlClient


#: `veil job status`'s exit status for a job that failed or was refused.
EXIT_JOB_DID_NOT_RUN = 4


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `coordinator`, `site` and `job` to the `veil` subcommands."""
    _coordinator(sub.add_parser("coordinator", help=help_of("coordinator")))
    _site(sub.add_parser("site", help=help_of("site")))
    _job(sub.add_parser("job", help=help_of("job")))


def _coordinator(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True, metavar="start")
    s = verbs.add_parser("start", help="serve jobs to sites and submitters until stopped")
    s.add_argument("--home", type=Path, required=True, help="its own folder: jobs.db, jobs/")
    s.add_argument(
        "--pki",
        type=Path,
        required=True,
        help="the coordinator's PKI folder: ca.crt, crl.pem, nodes/server/ (its keys) and each "
        "site's public certificate nodes/NAME/node.crt",
    )
    s.add_argument("--address", default="0.0.0.0:7440", help="host:port of the control service")
    s.add_argument("--jobs-host", help="the host job servers listen on (default: --address's)")
    s.add_argument("--parallel", type=int, default=1, help="jobs that may run at once")
    s.add_argument(
        "--offer-timeout-s",
        type=float,
        default=600.0,
        help="a site that has not answered an offer by then counts as refusing it",
    )
    s.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    s.add_argument("--port-file", type=Path, help="write the control port here once listening")
    s.add_argument("--log-file", type=Path, help="also append the JSON log lines here")
    s.set_defaults(handler=_cmd_coordinator)


def _site(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True, metavar="start|status")
    s = verbs.add_parser("start", help="run this organisation's agent until stopped")
    s.add_argument("--pki", type=Path, required=True, help="this organisation's own PKI folder")
    s.add_argument("--data-dir", type=Path, required=True, help="the folder of its data files")
    s.add_argument("--policy", type=Path, required=True, help="the privacy officer's policy.toml")
    s.add_argument("--coordinator", required=True, help="the coordinator's host:port")
    s.add_argument("--name", help="its certificate name (default: the one client in --pki)")
    s.add_argument(
        "--home",
        type=Path,
        default=Path("veil-site"),
        help="its own state: journal.db, ledger.db, jobs/ (default ./veil-site)",
    )
    s.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    s.add_argument("--log-file", type=Path, help="also append the JSON log lines here")
    s.add_argument("--poll-s", type=float, default=0.5, help="seconds between polls")
    s.set_defaults(handler=_cmd_site_start)
    st = verbs.add_parser("status", help="connected state, current jobs, remaining budget")
    st.add_argument("--home", type=Path, default=Path("veil-site"), help="the site's --home")
    st.set_defaults(handler=_cmd_site_status)


def _job(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True, metavar="submit|list|status|logs|cancel")
    for verb, help_text in (
        ("submit", "sign a run config and submit it as a job"),
        ("list", "list the coordinator's jobs"),
        ("status", "one job: state, each site's answer, rounds, result"),
        ("logs", "one job's events and its server's log"),
        ("cancel", "cancel a job (a running one stops at its next round boundary)"),
    ):
        s = verbs.add_parser(verb, help=help_text)
        if verb == "submit":
            s.add_argument("config", type=Path)
            s.add_argument(
                "--allow-refusals",
                action="store_true",
                help="run without the sites that refuse (default: one refusal stops the job)",
            )
        elif verb != "list":
            s.add_argument("job_id")
        if verb == "logs":
            s.add_argument("--tail", type=int, default=50, help="server log lines to show")
        s.add_argument(
            "--coordinator",
            default=os.environ.get("VEIL_COORDINATOR"),
            help="host:port (default $VEIL_COORDINATOR)",
        )
        s.add_argument(
            "--pki",
            type=Path,
            default=os.environ.get("VEIL_PKI"),
            help="the submitter's PKI folder (default $VEIL_PKI)",
        )
        s.add_argument("--name", help="the submitter's name (default: the one submitter there)")
        s.add_argument("--json", action="store_true", help="print the reply as JSON")
        s.set_defaults(handler=_cmd_job)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from veil.lifecycle import stop_on_signals
    from veil.sites.coordinator import CoordinatorSettings, serve
    from veil.sites.metrics import configure_json_logging

    configure_json_logging(args.log_file)
    settings = CoordinatorSettings(
        home=args.home,
        pki_dir=args.pki,
        address=args.address,
        jobs_host=args.jobs_host,
        parallel=max(1, args.parallel),
        offer_timeout_s=args.offer_timeout_s,
    )

    def listening(port: int) -> None:
        if args.port_file is not None:
            args.port_file.write_text(str(port))

    with stop_on_signals() as stop:
        serve(settings, stop=stop, metrics_address=args.metrics, on_listening=listening)
    return 0


def _cmd_site_start(args: argparse.Namespace) -> int:
    from veil.lifecycle import stop_on_signals
    from veil.sites.metrics import configure_json_logging
    from veil.sites.site import SiteSettings, serve

    configure_json_logging(args.log_file)
    settings = SiteSettings(
        name=args.name or _only_node(args.pki, "client"),
        home=args.home,
        pki_dir=args.pki,
        data_dir=args.data_dir,
        policy=args.policy,
        coordinator=args.coordinator,
        poll_s=args.poll_s,
    )
    with stop_on_signals() as stop:
        serve(settings, stop=stop, metrics_address=args.metrics)
    return 0


def _cmd_site_status(args: argparse.Namespace) -> int:
    from veil.sites.site import STATUS_FILE

    path = args.home / STATUS_FILE
    if not path.is_file():
        raise UserError(f"no site status in '{args.home}': is `veil site start --home` this?")
    status = json.loads(path.read_text())
    alive = _alive(int(status.get("pid", 0)))
    state = "running" if alive else "NOT RUNNING"
    link = "connected" if status["connected"] else "NOT CONNECTED"
    print(f"site {status['name']}: {state}; coordinator {status['coordinator']} {link}")
    print(f"current jobs: {', '.join(status['current_jobs']) or 'none'}")
    for dataset, b in status["budget"].items():
        left = "no yearly limit" if b["year_remaining"] is None else f"{b['year_remaining']:.4g}"
        lifetime = b["ledger_remaining"]
        ledger = "no budget set" if lifetime is None else f"{lifetime:.4g}"
        print(f"  {dataset}: ε this year {b['epsilon_this_year']:.4g}, left this year {left}, "
              f"left in the ledger's budget {ledger}")  # fmt: skip
    for job in status["jobs"]:
        extra = f" ε={job['epsilon']:.4g}" if job["epsilon"] else ""
        why = f" ({job['reason']})" if job["reason"] else ""
        print(f"  job {job['job_id']} {job['name']}: {job['state']}{extra}{why}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def _cmd_job(args: argparse.Namespace) -> int:
    from veil.sites.control import ControlClient

    if not args.coordinator or args.pki is None:
        raise UserError(
            "give --coordinator HOST:PORT and --pki DIR (or $VEIL_COORDINATOR, $VEIL_PKI)"
        )
    name = args.name or _only_node(args.pki, "submitter")
    with ControlClient(args.coordinator, args.pki, name) as client:
        reply = _job_call(client, args, name)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        _print_job(args.verb, reply)
    return (
        EXIT_JOB_DID_NOT_RUN
        if args.verb == "status" and reply.get("state") in ("failed", "refused")
        else 0
    )


def _job_call(client: ControlClient, args: argparse.Namespace, name: str) -> dict[str, Any]:
    if args.verb == "submit":
        from veil.crypto import pki
        from veil.crypto.identity import IdentityKey
        from veil.sites.bundle import make_bundle

        files = pki.node_files(args.pki, name)
        bundle = make_bundle(
            args.config,
            submitter=name,
            identity=IdentityKey.load(files.identity_key),
            allow_refusals=args.allow_refusals,
        )
        certificate = files.cert.read_text()
        return client.call("Submit", {"bundle": bundle.to_json(), "certificate": certificate})
    if args.verb == "list":
        return client.call("List")
    if args.verb == "logs":
        return client.call("Logs", {"job_id": args.job_id, "tail": args.tail})
    return client.call(args.verb.capitalize(), {"job_id": args.job_id})


def _print_job(verb: str, reply: dict[str, Any]) -> None:
    if verb == "submit":
        print(f"job {reply['job_id']}: {reply['state']}")
    elif verb == "list":
        for job in reply["jobs"]:
            print(f"{job['job_id']}  {job['state']:<9}  {job['name']}  ({job['submitter']}, "
                  f"{job['submitted_at']})")  # fmt: skip
    elif verb == "logs":
        for event in reply["events"]:
            print(f"{event['at']}  {event['event']}: {event['detail']}")
        for line in reply["server_log"]:
            print(f"  | {line}")
    elif verb == "cancel":
        print(f"job {reply['job_id']}: {reply['state']}")
    else:
        _print_status(reply)


def _print_status(reply: dict[str, Any]) -> None:
    print(f"job {reply['job_id']} ({reply['name']}, by {reply['submitter']}): {reply['state']}")
    if reply.get("reason"):
        print(f"reason: {reply['reason']}")
    for site, answer in reply["sites"].items():
        print(f"  {site}: {answer}")
    print(f"rounds: {reply['rounds_done']} of {reply['rounds_planned']}")
    result = reply.get("result")
    if result:
        shown = [f"{k} {v:.4f}" for k, v in result["final"].items()]
        if result.get("epsilon") is not None:
            shown.append(f"ε {result['epsilon']:.4g}, δ {result['delta']:.3g}")
        shown.append(f"aggregation {result['aggregation']}")
        print(
            f"result: {', '.join(shown)}; the model and report are in the coordinator's job folder"
        )


def _only_node(pki_dir: Path, role: str) -> str:
    """The name of the one node of `role` whose keys are in `pki_dir`."""
    from veil.crypto import pki

    nodes = [
        d.name
        for d in sorted((pki_dir / pki.NODES).glob("*"))
        if (d / pki.NODE_CERT).is_file()
        and (d / pki.NODE_KEY).is_file()
        and pki.certificate_role(pki.load_certificate(d / pki.NODE_CERT)) == role
    ]
    if len(nodes) != 1:
        raise UserError(
            f"'{pki_dir}' holds the keys of {len(nodes)} {role} nodes; name one with --name"
        )
    return nodes[0]
