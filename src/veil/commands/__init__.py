"""Subcommands of `veil`, each module adding its own parsers with `register(sub)`.

`COMMANDS` names every top-level command, the module that registers it and its one-line help,
in the order `veil --help` lists them. `veil.cli` lists the commands from it and imports a
command's module only when that command is parsed, so `veil --help` loads no command module; a
module's `register` takes its commands' help from here, so the two cannot drift apart. A command
module imports at its top only what its parsers need (argparse, pathlib, `veil.errors`): torch,
scikit-learn, TenSEAL, gRPC and the rest are imported inside the handlers that use them.
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    """One top-level command: the module whose `register(sub)` adds its parser, its help."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "run": Command("veil.commands.run", "run one federation from a TOML config"),
    "runs": Command("veil.commands.run", "list and show runs recorded in a run store"),
    "schema": Command(
        "veil.commands.schema",
        "the data contract: propose a schema from a CSV (infer), validate a CSV (check)",
    ),
    "query": Command(
        "veil.commands.privacy",
        "answer a differentially private statistic of one CSV column, charged to a ledger",
    ),
    "budget": Command("veil.commands.privacy", "show or set privacy budgets in a ledger"),
    "privacy": Command("veil.commands.privacy", "check a run's differential-privacy record"),
    "server": Command("veil.commands.deploy", "run the federation server (mutual TLS)"),
    "client": Command("veil.commands.deploy", "run one organisation's client (mutual TLS)"),
    "keygen": Command(
        "veil.commands.deploy", "create a key file for encrypting checkpoints at rest"
    ),
    "status": Command("veil.commands.deploy", "show a running server's round and clients"),
    "coordinator": Command(
        "veil.commands.sites", "run the long-lived coordinator that runs jobs for many sites"
    ),
    "site": Command(
        "veil.commands.sites", "run one organisation's long-lived agent; show its status"
    ),
    "job": Command("veil.commands.sites", "submit, list, inspect and cancel jobs"),
    "pki": Command(
        "veil.commands.pki", "the federation's certificate authority: init, issue, revoke, show"
    ),
    "audit": Command(
        "veil.commands.audit",
        "attack a finished run (membership, inversion, canaries) and record what leaks",
    ),
    "he": Command("veil.commands.he", "homomorphic encryption: the CKKS key ceremony"),
    "serve": Command("veil.commands.he", "serve a linear model for encrypted inference (HTTPS)"),
    "predict": Command("veil.commands.he", "encrypt features, score them remotely, decrypt here"),
    "tee": Command("veil.commands.tee", "attested aggregation: print the aggregator measurement"),
    "sign": Command("veil.commands.tee", "sign a run folder's artifacts (SHA-256 manifest)"),
    "verify": Command("veil.commands.tee", "check a run folder against its signed manifest"),
    "model": Command("veil.commands.tee", "export the final model with a signed manifest"),
    "psi": Command(
        "veil.commands.vertical", "private set intersection of customer ids (ECDH, mTLS)"
    ),
    "vertical": Command("veil.commands.vertical", "vertical federated learning across two parties"),
    "report": Command(
        "veil.commands.report",
        "write RUN_DIR/report.html: metrics, ε against the budget, participation, "
        "communication, privacy record and configuration",
    ),
    "dashboard": Command(
        "veil.commands.dashboard",
        "serve a read-only local web page of the runs in a run store, live",
    ),
}


def help_of(name: str) -> str:
    """The one-line help of top-level command `name`, as `veil --help` lists it."""
    return COMMANDS[name].help
