"""Deployment: one server process and one process per organisation, gRPC with mutual TLS.

- `serve`: the server process (`veil server`): the same federation loop as simulation, talking to
  clients through `GrpcGateway`; writes `result.json`, `veil.db` and checkpoints to its run folder.
- `serve_client`: one organisation's process (`veil client`): trains on its own data file.
- `run_deployment`: what `veil run` does with `mode = "deployment"`: plays every organisation
  and the CA operator on one machine as separate folders, starts the server and the clients as
  real processes on 127.0.0.1 (free ports chosen automatically), waits for them, collects their
  logs under `RUN/logs/`, and returns the same `Result` as simulation.

Key custody on loopback, as it would be across machines (`prepare_deployment`):

    RUN/ca/                 the CA operator's folder: ca.crt, ca.key, crl.pem, its register of
                            issued certificates; no federation process is ever given it
    RUN/orgs/NAME/          one organisation's own folder (0700): its keys, created there by
                            `veil.crypto.pki.request` (the CA signs the request and never sees a
                            private key), ca.crt, crl.pem, its data (0600) and its trust state
    RUN/orgs/server/        the coordinator's: its own keys, ca.crt, crl.pem, the members'
                            certificates (public), its test data and checkpoint key; under CKKS
                            the public key set only

On one machine under one user, file permissions cannot keep processes apart: what is tested is
that each process is only given its own folder. Across machines each folder lives on its owner's
machine (docs/deployment.md).

A member's data is its own CSV or Parquet file, checked and encoded by the data contract
(`[data] schema_file`, `member_data_of`); the coordinator then needs no data file
(`coordinator_data_of`). Without a contract (a built-in data set), `run_deployment` prepares each
organisation's split as a NumPy `.npz` archive in its folder, read with `allow_pickle=False`.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc
import numpy as np

from veil.assembly.data import federated_data
from veil.assembly.federation import ServerSide
from veil.assembly.model import objective, training_plan
from veil.assembly.privacy import client_privacy, member_privacy
from veil.assembly.secure_aggregation import registry as secure_aggregation
from veil.assembly.secure_aggregation.base import MemberInputs, ServerTls
from veil.assembly.stages import client_runner, client_stages
from veil.atomic import atomic_write_bytes
from veil.config import RunConfig, load_config
from veil.crypto import pki
from veil.crypto.envelope import generate_key_file, load_key_file
from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.crypto.keyfile import read_private
from veil.crypto.revocation import CRL_FILE
from veil.crypto.trust import TRUST_FILE, TrustStore
from veil.data import ClientData, FederatedData
from veil.data.contract import DataSchema, feature_names, schema_hash
from veil.data.organisations import (
    coordinator_data,
    declared_member,
    load_encoded,
    member_data,
)
from veil.errors import Aborted, UserError
from veil.federation.fingerprint import Declared, Fingerprint, fingerprint
from veil.federation.pipeline import UpdatePipeline
from veil.federation.training import torch_threads
from veil.lifecycle import PARENT_ENV, StopRequest
from veil.models import build_model, get_parameters
from veil.result import RESULT_FILE, Result
from veil.runtime import run_federation
from veil.seeding import Purpose, derive_seed
from veil.store.lock import run_directory
from veil.tensors import NamedArrays
from veil.transport.grpc.client import ClientCredentials, PinnedChannel, open_channel, run_client
from veil.transport.grpc.diagnose import Endpoint, MemberTls
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

if TYPE_CHECKING:
    from veil.privacy.dp.policy import PrivacyPolicy
    from veil.sites.policy import TaskGuard

SERVER_NAME = "server"
TEST_FILE = "server-test.npz"
DATA_FILE = "data.npz"


class DeploymentError(UserError):
    """A deployment could not start or did not finish."""


# -- data files ----------------------------------------------------------------------------


def write_client_data(path: Path, client: ClientData, *, index: int, fed: FederatedData) -> None:
    """One organisation's prepared data (what it would hold in a real deployment)."""
    _private_dir(path.parent)
    _private_npz(
        path,
        x_train=client.x_train,
        y_train=client.y_train,
        x_val=client.x_val,
        y_val=client.y_val,
        meta=np.frombuffer(json.dumps(_shape_meta(fed) | {"index": index}).encode(), np.uint8),
    )


def write_server_data(path: Path, fed: FederatedData) -> None:
    """The server's held-out test set, the client names and the data's shape."""
    # Each member's training-set size, as it declares it when it joins: the coordinator
    # accounts record-level DP per organisation with it (result.json publishes it anyway).
    meta = _shape_meta(fed) | {
        "clients": [c.name for c in fed.clients],
        "examples": {c.name: c.n_train for c in fed.clients},
    }
    _private_dir(path.parent)
    _private_npz(
        path,
        x_test=fed.x_test,
        y_test=fed.y_test,
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
    )


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _private_npz(path: Path, **arrays: np.ndarray) -> None:
    """An .npz readable by its owner only (0600), written under a temporary name first."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _shape_meta(fed: FederatedData) -> dict[str, Any]:
    return {
        "dataset": fed.dataset_name,
        "synthetic": fed.synthetic,
        "n_features": fed.n_features,
        "n_classes": fed.n_classes,
        "image_shape": list(fed.image_shape) if fed.image_shape else None,
        # Regression: a float32 target, the model's output scale fixed by the declared target
        # bounds (`veil.federation.objective`).
        "task": fed.task,
        "target_bounds": list(fed.target_bounds) if fed.target_bounds else None,
    }


def _task(
    meta: dict[str, Any],
) -> tuple[Literal["classification", "regression"], tuple[float, float] | None]:
    """(task, target bounds) of a data file's metadata; metadata written before regression
    existed is classification."""
    bounds = meta.get("target_bounds")
    task: Literal["classification", "regression"] = (
        "regression" if meta.get("task") == "regression" else "classification"
    )
    return task, (float(bounds[0]), float(bounds[1])) if bounds else None


def _load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not path.is_file():
        raise DeploymentError(f"data file not found: '{path}'")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    return arrays, meta


def _image_shape(meta: dict[str, Any]) -> tuple[int, int, int] | None:
    shape = meta.get("image_shape")
    return (int(shape[0]), int(shape[1]), int(shape[2])) if shape else None


# -- server ----------------------------------------------------------------------------------


def serve(
    config: RunConfig,
    *,
    run_dir: Path,
    pki_dir: Path,
    test_data: Path | None = None,
    address: str | None = None,
    insecure: bool = False,
    port_file: Path | None = None,
    resume: bool = False,
    checkpoint_key: Path | None = None,
    stop: Callable[[], bool] | None = None,
) -> Result:
    """Run the federation as the server process; returns when the run is finished.

    Checkpoints are sealed under `checkpoint_key` (else `[checkpoint].key_file`); with `resume`
    the run continues from `run_dir`'s checkpoint after a crash or an interruption. When
    `stop` (`veil server`'s `StopRequest`) returns True, the run ends at the next round
    boundary (status "interrupted", `veil.runtime.run_federation`) and the clients are told
    that it is over.
    """
    key_path = checkpoint_key or config.checkpoint.key_file
    key = load_key_file(key_path) if key_path else None
    fed, meta = coordinator_data_of(config, test_data)
    identities = member_identities(pki_dir, [c.name for c in fed.clients])
    backend = secure_aggregation.backend(config.secure_aggregation)
    # A TLS key the backend makes in this process (under TEE: inside the attested process,
    # never written to disk) replaces the key file.
    tls = None if insecure else backend.server_tls(config, pki_dir)
    gateways = _Gateways(
        config,
        identities=identities,
        credentials=None if insecure else server_credentials(pki_dir, tls),
        revocations=None if insecure else _revocations_reader(pki_dir),
        fingerprint=lambda initial: fingerprint(config, initial, fed.x_test, meta),
        address=address or config.deployment.address,
        port_file=port_file,
    )
    side = ServerSide(
        gateways.start,
        pki_dir,
        tls_public_key=tls.tls_public_key if tls is not None else None,
        members=gateways.declared_members,
    )
    try:
        with torch_threads(config.federation.torch_threads):
            return run_federation(
                config,
                run_dir,
                [],
                fed=fed,
                resume=resume,
                checkpoint_key=key,
                deployment=side,
                stop=stop,
            )
    finally:
        gateways.close()


def coordinator_data_of(
    config: RunConfig, test_data: Path | None
) -> tuple[FederatedData, dict[str, Any]]:
    """The coordinator's `FederatedData` and the data's metadata for its fingerprint. With a
    data contract: the layout from the schema, the members from `[data] organisations`, the
    held-out file `test_data` (else `[data] test_file`, else none): no member's data. Without
    one: the prepared test file (`veil run`'s loopback deployment)."""
    schema = config.data.contract()
    if schema is None or (test_data is not None and test_data.suffix == ".npz"):
        if test_data is None:
            raise DeploymentError(
                "this config has no data contract ([data] schema_file), so the coordinator "
                "needs its prepared test set: pass --test-data FILE.npz"
            )
        arrays, meta = _load_npz(test_data)
        return _server_data(config, arrays, meta), _with_hash(meta, schema)
    names = list(config.data.organisations or {})
    if not names:
        raise DeploymentError(
            "the coordinator needs the members' names: list them in [data] organisations "
            "= {NAME = 'FILE.csv', ...} (the coordinator reads none of the files)"
        )
    width = len(feature_names(schema))
    fed = coordinator_data(
        schema,
        [declared_member(n, width, 0) for n in names],
        test=test_data or config.data.test_file,
        dataset_name=config.data.schema_file.stem if config.data.schema_file else "csv",
    )
    return fed, _contract_meta(schema, fed)


def _with_hash(meta: dict[str, Any], schema: DataSchema | None) -> dict[str, Any]:
    """A prepared file's metadata, with the hash of the contract that encoded it (if any)."""
    return meta | {"schema_hash": schema_hash(schema)} if schema is not None else meta


def _contract_meta(schema: DataSchema, fed: FederatedData) -> dict[str, Any]:
    """The metadata a data contract gives every process alike (for the fingerprint)."""
    return _shape_meta(fed) | {
        "feature_names": list(fed.feature_names),
        "schema_hash": schema_hash(schema),
    }


def _server_data(
    config: RunConfig, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> FederatedData:
    """The server's `FederatedData`: its test set, and of each member only its declared size."""
    names = list(meta["clients"])
    examples = {str(k): int(v) for k, v in dict(meta.get("examples", {})).items()}
    empty = np.zeros((0, int(meta["n_features"])), np.float32)
    task, target_bounds = _task(meta)
    return FederatedData(
        dataset_name=meta["dataset"],
        synthetic=bool(meta["synthetic"]),
        n_features=int(meta["n_features"]),
        n_classes=int(meta["n_classes"]),
        image_shape=_image_shape(meta),
        feature_names=(),
        class_names=(),
        # No data: only each member's declared size (labels stand in for the count).
        clients=[
            ClientData(
                n, empty, np.zeros(examples.get(n, 0), np.int64), empty, np.zeros(0, np.int64)
            )
            for n in names
        ],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        scaling=config.data.scaling,
        task=task,
        target_bounds=target_bounds,
    )


class _Gateways:
    """Starts the server's `GrpcGateway` when the run asks for it (`start`, the run's
    `GatewayFactory`) and finishes it when the run is over (`close`)."""

    def __init__(
        self,
        config: RunConfig,
        *,
        identities: dict[str, IdentityPublicKey],
        credentials: ServerCredentials | None,
        revocations: Callable[[], bytes | None] | None,
        fingerprint: Callable[[NamedArrays], Fingerprint],
        address: str,
        port_file: Path | None,
    ) -> None:
        self.config = config
        self.identities = identities
        self.credentials = credentials
        self.revocations = revocations
        self.fingerprint = fingerprint
        self.address = address
        self.port_file = port_file
        self.gateway: GrpcGateway | None = None

    def start(self, run_id: str, initial: NamedArrays) -> GrpcGateway:
        """Open the port and wait (up to `connect_timeout_s`) for the members to join."""
        config = self.config
        backend = secure_aggregation.backend(config.secure_aggregation)
        gateway = GrpcGateway(
            run_id=run_id,
            identities=self.identities,
            reference=backend.upload_reference(config, initial, client_privacy(config)),
            deadline_s=config.deployment.round_deadline_s,
            max_update_norm=config.deployment.max_update_norm,
            revocations=self.revocations,
            upload_idle_s=config.deployment.upload_idle_s,
            upload_timeout_s=config.deployment.upload_timeout_s,
            liveness_s=config.deployment.liveness_s,
            # What every member must agree on to join: computed as each member computes it.
            fingerprint=self.fingerprint(initial),
        )
        port = gateway.start(self.address, self.credentials)
        if self.port_file is not None:
            self.port_file.write_text(str(port))
        self.gateway = gateway
        missing = gateway.wait_for_clients(config.deployment.connect_timeout_s)
        if missing:
            logging.getLogger("veil.server").warning(
                json.dumps({"event": "starting without", "clients": missing})
            )
        return gateway

    def declared_members(self, fed: FederatedData) -> FederatedData:
        """`fed` with each member's row counts and file name as it declared them when it joined
        (a member that has not joined keeps what `fed` says). Under record-level DP every
        member's training-set size must be known: the coordinator accounts each one with it."""
        declared = self.gateway.declarations() if self.gateway is not None else {}
        clients = []
        for c in fed.clients:
            d = declared.get(c.name)
            if d is None:
                clients.append(c)
                continue
            width = c.x_train.shape[1]
            clients.append(
                declared_member(c.name, width, d.examples, validation=d.validation, file=d.file)
            )
        unknown = [c.name for c in clients if c.n_train == 0]
        privacy = self.config.privacy
        if unknown and privacy is not None and privacy.unit == "record":
            raise DeploymentError(
                f"record-level DP needs each member's training-set size, declared when it "
                f"joins; {', '.join(unknown)} did not join within [deployment] "
                "connect_timeout_s: start every member, or raise the timeout"
            )
        return replace(fed, clients=clients)

    def close(self) -> None:
        """Tell the members the run is over and stop serving (if the gateway started)."""
        if self.gateway is not None:
            self.gateway.finish()
            self.gateway.stop()


def server_credentials(pki_dir: Path, tls: ServerTls | None = None) -> ServerCredentials:
    files = pki.node_files(pki_dir, SERVER_NAME)
    if tls is not None:  # the in-process key and its certificate, from memory
        certificate, private_key = tls.certificate_pem, tls.private_key_pem
    else:
        certificate, private_key = files.cert.read_bytes(), read_private(files.key, "TLS key")
    return ServerCredentials(
        certificate=certificate,
        private_key=private_key,
        ca_certificate=files.ca_cert.read_bytes(),
        revoked=pki.revoked_serials(pki_dir),
    )


def member_identities(pki_dir: Path, names: list[str]) -> dict[str, IdentityPublicKey]:
    """The members' identity keys, from their certificates in the coordinator's folder
    (``nodes/NAME/node.crt``, public), each checked against the CA and the revocation list."""
    ca = pki.load_certificate(Path(pki_dir) / pki.CA_CERT)
    revoked = pki.revoked_serials(pki_dir)
    identities = {}
    for name in names:
        cert = pki.member_certificate(pki_dir, name)
        pki.verify_certificate(cert, ca, role="client", revoked=revoked)
        if pki.certificate_name(cert) != name:
            raise DeploymentError(f"the certificate filed for '{name}' names another member")
        identities[name] = pki.certificate_identity(cert)
    return identities


def _revocations_reader(pki_dir: Path) -> Callable[[], bytes | None]:
    """Reads the coordinator's copy of the CA's revocation list anew for every task, so that a
    list the CA operator publishes during a run reaches every member at its next task."""
    path = Path(pki_dir) / CRL_FILE

    def read() -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    return read


def member_trust(pki_dir: Path, name: str) -> TrustStore:
    """Member `name`'s trust state (pinned peer keys, newest revocation list) in its own folder,
    seeded with the revocation list it received with its certificate."""
    files = pki.node_files(pki_dir, name)
    trust = TrustStore(files.cert.parent / TRUST_FILE, pki.load_certificate(files.ca_cert))
    crl = Path(pki_dir) / CRL_FILE
    if crl.is_file():
        trust.accept_revocations(crl.read_bytes())
    return trust


# -- client ----------------------------------------------------------------------------------


def serve_client(
    config: RunConfig,
    *,
    name: str,
    data: Path,
    pki_dir: Path,
    server: str,
    insecure: bool = False,
    policy: Path | None = None,
) -> int:
    """Run one organisation until the server ends the run; returns the number of tasks done.
    Its data file is checked against the data contract before anything else: a file that
    breaks it raises `SchemaViolations` (every violation listed) and nothing is trained.

    With `policy` (the site's policy.toml) the job is checked against it before the member
    joins (`PolicyRefusal` listing every rule it breaks), and every task again before it is
    done: a task the policy forbids is refused with the reason (`veil.sites.policy`)."""
    client, meta = member_data_of(config, name, data)
    model = build_model(
        config.model,
        n_features=int(meta["n_features"]),
        n_classes=int(meta["n_classes"]),
        image_shape=_image_shape(meta),
    )
    files = pki.node_files(pki_dir, name)
    # One trust state for the process: the revocation lists that tasks bring reach the
    # secure-aggregation roster at once.
    trust = None if insecure else member_trust(pki_dir, name)
    privacy = member_privacy(config, name, client.n_train, training_plan(config))
    guard = None if policy is None else _policy_guard(policy, config, data, privacy)
    # Its half of secure aggregation, from its own keys; under TEE also the check of the server
    # certificate its channel then pins (evidence binding the key of this very connection).
    member = secure_aggregation.backend(config.secure_aggregation).member(
        MemberInputs(config, name, get_parameters(model), privacy, pki_dir, files, trust)
    )
    runner = client_runner(
        config,
        client,
        index=int(meta.get("index", 0)),
        n_classes=int(meta["n_classes"]),
        pipeline=UpdatePipeline(client_stages=client_stages(config, privacy)),
        privacy=privacy,
        protocol=member.participant,
        objective=objective(config, *_task(meta)),
    )
    # A round the coordinator runs again after a restart gets the same update, not new noise.
    runner.remember_last = True
    channel = _member_channel(server, files, insecure, member.accept_server)
    try:
        with torch_threads(config.federation.torch_threads):
            return run_client(
                channel,
                runner,
                model,
                IdentityKey.load(files.identity_key),
                reconnect_timeout_s=config.deployment.reconnect_timeout_s,
                on_revocations=None if trust is None else trust.accept_revocations,
                fingerprint=fingerprint(
                    config,
                    get_parameters(model),
                    client.x_train,
                    meta,
                    Declared(client.n_train, int(client.y_val.shape[0]), client.file),
                ),
                heartbeat_s=config.deployment.heartbeat_s,
                endpoint=Endpoint(
                    server,
                    None if insecure else MemberTls(files.cert, files.key, files.ca_cert),
                    pinned=member.accept_server is not None,
                ),
                task_guard=guard,
            )
    finally:
        channel.close()


def _policy_guard(
    policy: Path, config: RunConfig, data: Path, privacy: PrivacyPolicy | None
) -> TaskGuard:
    """The site policy's guard of this member's tasks, once the job passed it (`member_guard`)."""
    from veil.sites.policy import member_guard

    return member_guard(policy, config, data_file=data.name, privacy=privacy)


def member_data_of(config: RunConfig, name: str, data: Path) -> tuple[ClientData, dict[str, Any]]:
    """Member `name`'s data and its metadata: with a data contract, its own CSV or Parquet
    file checked and encoded by the schema and split as a simulation splits it; else the
    prepared `.npz` of `veil run`'s loopback deployment."""
    schema = config.data.contract()
    if schema is None or data.suffix == ".npz":
        arrays, meta = _load_npz(data)
        client = ClientData(
            name, arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"]
        )
        return client, _with_hash(meta, schema)
    names = list(config.data.organisations or {})
    if names and name not in names:
        raise DeploymentError(
            f"'{name}' is not one of the organisations in [data] organisations "
            f"({', '.join(names)}); use the name in this organisation's certificate"
        )
    client = member_data(
        schema,
        name,
        data,
        validation_fraction=config.data.validation_fraction,
        seed=derive_seed(config.seed, Purpose.PARTITION),
    )
    width = len(feature_names(schema))
    fed = coordinator_data(schema, [declared_member(name, width, 0)], test=None)
    meta = _contract_meta(schema, fed) | {"index": names.index(name) if names else 0}
    return client, meta


def _member_channel(
    server: str,
    files: pki.NodeFiles,
    insecure: bool,
    accept: Callable[[bytes], bytes] | None,
) -> grpc.Channel:
    """The member's channel to `server`: mutual TLS under the federation's CA, or pinned to
    the certificate `accept` checks (attested aggregation); plaintext with --insecure-dev."""
    credentials = (
        None
        if insecure
        else ClientCredentials(
            certificate=files.cert.read_bytes(),
            private_key=read_private(files.key, "TLS key"),
            ca_certificate=files.ca_cert.read_bytes(),
        )
    )
    if accept is not None and credentials is not None:
        return PinnedChannel(
            server, credentials, client_certificate=files.cert, client_key=files.key, accept=accept
        )
    return open_channel(server, credentials)


# -- one command on loopback -----------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentFiles:
    """Everything a loopback deployment needs on disk, and the commands that use it: the CA
    operator's folder and one folder per organisation (see the module docstring)."""

    config_path: Path
    run_dir: Path
    ca_dir: Path
    orgs_dir: Path
    logs: Path
    key_file: Path
    port_file: Path
    clients: list[str]
    #: The run's `secure_aggregation` when it is not the config file's (`veil run
    #: --secure-aggregation`): every process is told, so that all of them run the same backend.
    secure_aggregation: str | None = None
    #: Each organisation's own data file (`[data] organisations`), given to its process as it
    #: is; an organisation not named here gets a prepared `data.npz` in its folder.
    data: dict[str, Path] = field(default_factory=dict)
    #: Whether the coordinator gets a prepared test set (no: a data contract gives it the
    #: layout, and `[data] test_file` the optional held-out file).
    server_test: bool = True

    def org_dir(self, name: str) -> Path:
        """Organisation `name`'s own folder (the coordinator's is `SERVER_NAME`'s)."""
        return self.orgs_dir / name

    @property
    def server_dir(self) -> Path:
        """The coordinator's own folder."""
        return self.org_dir(SERVER_NAME)

    def server_args(self, address: str = "127.0.0.1:0") -> list[str]:
        """`veil server ...` arguments (after `python -m veil.cli`): its own folder only."""
        own = self.org_dir(SERVER_NAME)
        return [
            "server", str(self.config_path), "--run-dir", str(self.run_dir),
            "--pki", str(own), "--address", address, "--port-file", str(self.port_file),
            "--checkpoint-key", str(self.key_file), *self._overrides(),
            *(["--test-data", str(own / TEST_FILE)] if self.server_test else []),
        ]  # fmt: skip

    def client_args(self, name: str, server: str) -> list[str]:
        """`veil client ...` arguments for organisation `name`: its own folder only."""
        own = self.org_dir(name)
        return [
            "client", str(self.config_path), "--name", name,
            "--data", str(self.data.get(name, own / DATA_FILE)), "--pki", str(own),
            "--server", server,
            *self._overrides(),
        ]  # fmt: skip

    def _overrides(self) -> list[str]:
        if self.secure_aggregation is None:
            return []
        return ["--secure-aggregation", self.secure_aggregation]


def prepare_deployment(config: RunConfig, out: Path, *, config_path: Path) -> DeploymentFiles:
    """Play the CA operator and every organisation on this machine, each in its own folder
    under `out`: each organisation creates its keys and a certificate request in its folder,
    the CA signs the requests (never seeing a private key), and only public files travel (the
    certificates, ``ca.crt``, the revocation list, under CKKS the public and sealed key sets).
    What already exists is kept."""
    out.mkdir(parents=True, exist_ok=True)
    server_dir = out / "orgs" / SERVER_NAME
    files = DeploymentFiles(
        config_path=config_path,
        run_dir=out,
        ca_dir=out / "ca",
        orgs_dir=out / "orgs",
        logs=out / "logs",
        key_file=config.checkpoint.key_file or server_dir / "checkpoint.key",
        port_file=out / "server.port",
        clients=[],
        server_test=config.data.organisations is None,
        secure_aggregation=(
            config.secure_aggregation
            if config.secure_aggregation != load_config(config_path).secure_aggregation
            else None
        ),
    )
    fed = _deployment_data(config, files)
    _private_dir(files.ca_dir)
    _private_dir(files.orgs_dir)
    if not (files.ca_dir / pki.CA_CERT).is_file():
        pki.init_ca(files.ca_dir)
    for name, role in [(SERVER_NAME, "server"), *((n, "client") for n in files.clients)]:
        _enrol(files, name, role)  # type: ignore[arg-type]
    # The coordinator's copies of public files: each member's certificate, the newest list.
    for name in files.clients:
        _copy_public(files.org_dir(name) / pki.NODES / name / pki.NODE_CERT,
                     server_dir / pki.NODES / name / pki.NODE_CERT)  # fmt: skip
    for name in files.clients:
        # The coordinator's certificate (public), which an attested aggregator's clients check.
        _copy_public(server_dir / pki.NODES / SERVER_NAME / pki.NODE_CERT,
                     files.org_dir(name) / pki.NODES / SERVER_NAME / pki.NODE_CERT)  # fmt: skip
    for name in [SERVER_NAME, *files.clients]:
        _copy_public(files.ca_dir / CRL_FILE, files.org_dir(name) / CRL_FILE)
    if not files.key_file.is_file():
        _private_dir(files.key_file.parent)
        generate_key_file(files.key_file)
    # A backend's own preparation: under CKKS the key ceremony, run by the CA operator.
    secure_aggregation.backend(config.secure_aggregation).prepare_deployment(config, files)
    if fed is not None:
        for index, client in enumerate(fed.clients):
            write_client_data(files.org_dir(client.name) / DATA_FILE, client, index=index, fed=fed)
        write_server_data(server_dir / TEST_FILE, fed)
    files.logs.mkdir(exist_ok=True)
    files.port_file.unlink(missing_ok=True)
    return files


def _deployment_data(config: RunConfig, files: DeploymentFiles) -> FederatedData | None:
    """The members' names into `files`, and the data to prepare for them: with `[data]
    organisations` none (each process is given its own file, checked here first so that a
    broken file is reported before any process starts); else the data set split as a
    simulation splits it, to be written as each organisation's `.npz`."""
    schema = config.data.contract()
    organisations = config.data.organisations
    if schema is None or organisations is None:
        fed = federated_data(config)
        files.clients.extend(c.name for c in fed.clients)
        return fed
    for path in organisations.values():
        load_encoded(schema, path)
    files.clients.extend(organisations)
    files.data.update(organisations)
    return None


def _enrol(files: DeploymentFiles, name: str, role: pki.Role) -> None:
    """Organisation `name` requests a certificate from its own folder; the CA signs it."""
    own = files.org_dir(name)
    _private_dir(own)
    if (own / pki.NODES / name / pki.NODE_CERT).is_file():
        return
    request = pki.request(own, name, role=role, overwrite=True)
    pki.sign_request(files.ca_dir, request)
    _copy_public(files.ca_dir / pki.CA_CERT, own / pki.CA_CERT)


def _copy_public(source: Path, target: Path, *, mode: int = 0o644) -> None:
    """What travels between folders: public files, or a box sealed to the recipient."""
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, source.read_bytes(), mode=mode)


def run_deployment(
    config: RunConfig,
    out: Path,
    *,
    config_path: Path,
    resume: bool = False,
    stop: StopRequest | None = None,
) -> Result:
    """Issue certificates, start a server and one process per organisation on 127.0.0.1, wait
    for them, collect their logs, and return the server's result. With `resume`, the server
    continues the run from `out`'s checkpoint. One run per folder (`run_directory`).

    With `stop` (`veil run`'s `StopRequest`), every signal `veil run` gets is forwarded to the
    server: at the first it stops at the next round boundary, tells the clients that the run
    is over and writes an "interrupted" result, which is returned; at the second it aborts
    and `Aborted` is raised. The children die with this process even after a kill -9
    (`spawn_child`).
    """
    with run_directory(out):
        return _run_processes(config, out, config_path=config_path, resume=resume, stop=stop)


def _run_processes(
    config: RunConfig, out: Path, *, config_path: Path, resume: bool, stop: StopRequest | None
) -> Result:
    files = prepare_deployment(config, out, config_path=config_path)
    if stop is not None and stop.signum is not None:
        raise Aborted(f"stopped by {stop.signal_name} before the run started", signum=stop.signum)
    logs = files.logs
    veil = [sys.executable, "-m", "veil.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + config.deployment.timeout_s
    started = time.time()
    aborting = False
    try:
        server_args = [*files.server_args(), *(["--resume"] if resume else [])]
        # SIGHUP: with `veil run` gone nobody waits for a round boundary; it aborts at once.
        server = spawn_child([*veil, *server_args], logs / "server.log", env, signal.SIGHUP)
        procs.append(server)
        if stop is not None:
            stop.add_listener(server.send_signal)
        port = wait_for_port(files.port_file, server, deadline)
        for name in files.clients:
            args = files.client_args(name, f"localhost:{port}")
            procs.append(spawn_child([*veil, *args], logs / f"{name}.log", env))
        code = server.wait(timeout=max(1.0, deadline - time.monotonic()))
        interrupted = _interrupted_result(out, code, since=started)
        if code != 0 and interrupted is None:
            if stop is not None and stop.signum is not None:
                # The forwarded signal ended the server before it could stop at a round (while
                # it was starting, say): an interruption, not a failure.
                raise Aborted(f"stopped by {stop.signal_name}", signum=stop.signum)
            raise DeploymentError(server_failure(code, logs / "server.log"))
        for proc in procs[1:]:
            try:
                proc.wait(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
        if interrupted is not None:
            return interrupted
    except subprocess.TimeoutExpired:
        raise DeploymentError(
            f"the deployment did not finish within {config.deployment.timeout_s:g} s; "
            f"see the logs in {logs}"
        ) from None
    except KeyboardInterrupt:
        aborting = True
        raise
    finally:
        for proc in procs:
            if aborting and proc.poll() is None:
                # The server heard the signal too: a moment to mark its run interrupted.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_ABORT_GRACE_S)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Result.model_validate_json((out / RESULT_FILE).read_text())


#: How long an aborting `veil run` waits for its server to record the interruption.
_ABORT_GRACE_S = 10.0
_STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM}


def _interrupted_result(out: Path, code: int, *, since: float) -> Result | None:
    """The "interrupted" result a server stopped by SIGINT/SIGTERM wrote (exit status 130 or
    143), or None for any other exit. `Aborted` when it was stopped before it wrote one: the
    result.json there (if any) is an older run's."""
    if code not in _STOPPED:
        return None
    path = out / RESULT_FILE
    if not path.is_file() or path.stat().st_mtime < since:
        name = signal.Signals(code - 128).name
        raise Aborted(
            f"the server was stopped ({name}) before it wrote a result", signum=code - 128
        )
    result = Result.model_validate_json(path.read_text())
    return result if result.status == "interrupted" else None


def server_failure(code: int, log: Path) -> str:
    """Why the server failed: its own one-line error (e.g. a full disk), and where its log is."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    said = [line.removeprefix("veil: error: ") for line in lines if line.startswith("veil: error:")]
    why = f": {said[-1]}" if said else ""
    return f"the server exited with status {code}{why}; see {log}"


def spawn_child(
    args: list[str], log_path: Path, env: dict[str, str], death_signal: int = signal.SIGTERM
) -> subprocess.Popen[bytes]:
    """Start a `veil` child in its own process group, so that a Ctrl-C at the terminal reaches
    the parent alone (`veil run` forwards it to the server: `run_deployment`); on Linux the
    child gets `death_signal` when its parent dies, even by kill -9, so none is left running
    (`veil.lifecycle.die_with_parent`, which the child runs at start)."""
    handle = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**env, PARENT_ENV: f"{os.getpid()}:{int(death_signal)}"},
            process_group=0,
        )
    finally:
        handle.close()


def wait_for_port(port_file: Path, server: subprocess.Popen[bytes], deadline: float) -> int:
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text())
        if server.poll() is not None:
            raise DeploymentError(f"the server exited with status {server.returncode} at start")
        time.sleep(0.05)
    raise DeploymentError("the server did not start listening in time")


def configure_logging() -> None:
    """JSON-lines logs on stderr for server and client processes."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def load(config_path: Path, *, secure_aggregation: str | None = None) -> RunConfig:
    """The config a `veil server` / `veil client` process runs: the file's, in deployment
    mode, with `secure_aggregation` when given (`--secure-aggregation`, which `veil run` passes
    to every process it starts); the overridden config is validated again as a whole."""
    config = load_config(config_path)
    updates: dict[str, Any] = {"mode": "deployment"} if config.mode != "deployment" else {}
    if secure_aggregation is not None and secure_aggregation != config.secure_aggregation:
        updates["secure_aggregation"] = secure_aggregation
    if updates:
        config = RunConfig.from_dict({**config.to_dict(), **updates}, source=str(config_path))
    for line in config.unused_sections():  # `veil server` / `veil client`: said once, at start
        print(f"veil: warning: {line}", file=sys.stderr)
    return config
