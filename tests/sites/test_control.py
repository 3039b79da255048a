"""The coordinator's control service over real gRPC with mutual TLS (who may call what, under
which name), and the coordinator's own methods called in process as the service calls them."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki_nodes import (
    OTHER_SUBMITTER,
    SUBMITTER,
    ca_of,
    cert_pem,
    copy_of,
    federation,
    job_config,
    signed_bundle,
)

from support import ReservedPort, client_credentials
from veil.crypto import pki
from veil.deployment import server_credentials
from veil.errors import UserError
from veil.sites.bundle import JobBundle, JobRejected, verify_bundle
from veil.sites.control import SERVICE, ControlClient, ControlError, ControlServer, Method
from veil.sites.coordinator import Coordinator, CoordinatorSettings
from veil.transport.grpc.client import open_channel


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return federation(tmp_path_factory.mktemp("pki"))


class Toy:
    """Two toy methods, one per role, that record who called them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def methods(self) -> dict[str, Method]:
        return {
            "Whoami": Method("submitter", self.whoami),
            "Site": Method("client", self.site),
            "Fail": Method("submitter", self.fail),
            "Crash": Method("submitter", self.crash),
        }

    def whoami(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("Whoami", caller))
        return {"caller": caller, "request": request}

    def site(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("Site", caller))
        return {"caller": caller}

    def fail(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        raise UserError("job 42 is finished; submit it again to run it again")

    def crash(self, caller: str, request: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("secret internal detail")


def start(pki_dir: Path, toy: Toy) -> tuple[ControlServer, str]:
    server = ControlServer(
        toy.methods(), ca=ca_of(pki_dir), revoked=lambda: pki.revoked_serials(pki_dir)
    )
    port = server.start("127.0.0.1:0", server_credentials(pki_dir))
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def toy() -> Toy:
    return Toy()


@pytest.fixture(scope="module")
def address(root: Path, toy: Toy) -> Iterator[str]:
    server, address = start(root, toy)
    yield address
    server.stop()


def call(address: str, pki_dir: Path, name: str, method: str, request: Any = None) -> Any:
    with ControlClient(address, pki_dir, name, timeout_s=10) as client:
        return client.call(method, request)


def test_each_method_admits_only_its_role(root: Path, toy: Toy, address: str) -> None:
    assert call(address, root, SUBMITTER, "Whoami")["caller"] == SUBMITTER
    assert call(address, root, "bank_a", "Site") == {"caller": "bank_a"}
    toy.calls.clear()
    with pytest.raises(ControlError, match=r"refused: .*a client certificate is required"):
        call(address, root, SUBMITTER, "Site")
    with pytest.raises(ControlError, match=r"refused: .*a submitter certificate is required"):
        call(address, root, "bank_a", "Whoami")
    assert toy.calls == []  # refused before the handler ran


def test_the_caller_is_the_certificates_name_not_the_requests(
    root: Path, toy: Toy, address: str
) -> None:
    claim = {"caller": "bank_a", "submitter": OTHER_SUBMITTER, "name": "server"}
    reply = call(address, root, SUBMITTER, "Whoami", claim)
    assert reply == {"caller": SUBMITTER, "request": claim}
    assert call(address, root, OTHER_SUBMITTER, "Whoami")["caller"] == OTHER_SUBMITTER
    assert call(address, root, "bank_c", "Site", {"site": "bank_a"}) == {"caller": "bank_c"}


def test_a_certificate_of_another_ca_cannot_call(
    root: Path, toy: Toy, address: str, tmp_path: Path
) -> None:
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue)
    pki.issue(rogue, SUBMITTER, role="submitter")
    (rogue / pki.CA_CERT).write_bytes((root / pki.CA_CERT).read_bytes())  # trusts the server
    toy.calls.clear()
    with pytest.raises(ControlError):
        call(address, rogue, SUBMITTER, "Whoami")
    assert toy.calls == []


def test_a_revoked_certificate_is_refused_at_its_next_call(tmp_path: Path) -> None:
    ca_dir = federation(tmp_path / "ca")
    toy = Toy()
    server, address = start(ca_dir, toy)
    try:
        with ControlClient(address, ca_dir, "bank_a", timeout_s=10) as client:
            assert client.call("Site") == {"caller": "bank_a"}
            pki.revoke(ca_dir, "bank_a")
            with pytest.raises(ControlError, match=r"refused: .*serial \d+ is revoked"):
                client.call("Site")
        assert call(address, ca_dir, "bank_b", "Site") == {"caller": "bank_b"}
    finally:
        server.stop()
    assert toy.calls == [("Site", "bank_a"), ("Site", "bank_b")]


def test_a_handlers_veil_error_reaches_the_caller(root: Path, address: str) -> None:
    with pytest.raises(
        ControlError, match=r"^job 42 is finished; submit it again to run it again$"
    ):
        call(address, root, SUBMITTER, "Fail")
    with pytest.raises(ControlError, match=r"^internal error; see the coordinator log$"):
        call(address, root, SUBMITTER, "Crash")


def test_a_request_that_is_not_one_json_object_is_refused(
    root: Path, toy: Toy, address: str
) -> None:
    channel = open_channel(address, client_credentials(root, SUBMITTER))
    stub = channel.unary_unary(
        f"/{SERVICE}/Whoami", request_serializer=None, response_deserializer=None
    )
    try:
        toy.calls.clear()
        for body in (b"[1, 2]", b'"text"', b"3", b"null"):
            with pytest.raises(grpc.RpcError) as info:
                stub(body, timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details() == "a request is one JSON object"
        with pytest.raises(grpc.RpcError) as info:
            stub(b"{not json", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert toy.calls == []
        assert json.loads(stub(b"", timeout=10)) == {"caller": SUBMITTER, "request": {}}
    finally:
        channel.close()


def test_an_unknown_method_is_refused_not_unreachable(root: Path, address: str) -> None:
    with pytest.raises(ControlError, match="Method not found") as info:
        call(address, root, SUBMITTER, "Nope")
    assert "cannot reach" not in str(info.value)


def test_an_unreachable_coordinator_says_so(root: Path) -> None:
    with ReservedPort() as port:  # bound, never listening: nothing answers there
        expected = f"cannot reach the coordinator at {port.address()}: is `veil coordinator start`"
        with (
            ControlClient(port.address(), root, SUBMITTER, timeout_s=5) as client,
            pytest.raises(ControlError, match=re.escape(expected)),
        ):
            client.call("Whoami")


@pytest.mark.parametrize("reply", [b"\xff\xfe not json", b"[1, 2]", b"", b"NaN"])
def test_a_malformed_reply_is_a_control_error(root: Path, reply: bytes) -> None:
    """Whatever a coordinator answers, the caller (a site's loop) gets ControlError only."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: reply)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Poll": handler})]
    )
    creds = server_credentials(root)
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(creds.private_key, creds.certificate)],
            root_certificates=creds.ca_certificate,
            require_client_auth=True,
        ),
    )
    server.start()
    try:
        with pytest.raises(ControlError, match="the coordinator sent a malformed reply"):
            call(f"127.0.0.1:{port}", root, "bank_a", "Poll")
    finally:
        server.stop(0).wait()


# -- the coordinator's methods, in process --------------------------------------------------


@pytest.fixture
def coordinator(root: Path, tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator that never launches a job server (parallel = 0): `tick` decides only."""
    settings = CoordinatorSettings(
        home=tmp_path / "home", pki_dir=root, address="127.0.0.1:0", parallel=0
    )
    c = Coordinator(settings)
    yield c
    c.shutdown()


def submit(
    c: Coordinator,
    root: Path,
    bundle: JobBundle,
    caller: str = SUBMITTER,
    cert_of: str | None = None,
) -> dict[str, Any]:
    certificate = cert_pem(root, cert_of or bundle.submitter).decode()
    return c.submit(caller, {"bundle": bundle.to_json(), "certificate": certificate})


def offered(c: Coordinator, root: Path, **kw: Any) -> str:
    """Submit a job naming the three sites; its id."""
    config = kw.pop("config", job_config())
    return str(submit(c, root, signed_bundle(root, SUBMITTER, config, **kw))["job_id"])


def test_a_job_is_submitted_only_by_its_signer(coordinator: Coordinator, root: Path) -> None:
    bundle = signed_bundle(root, SUBMITTER, job_config())
    with pytest.raises(UserError, match="signed by 'risk-team', not by 'audit-team'"):
        submit(coordinator, root, bundle, caller=OTHER_SUBMITTER)
    relabelled = dataclasses.replace(bundle, submitter=OTHER_SUBMITTER)
    with pytest.raises(JobRejected, match="does not verify"):
        submit(coordinator, root, relabelled, caller=OTHER_SUBMITTER)
    with pytest.raises(JobRejected, match="names another submitter"):
        submit(coordinator, root, bundle, cert_of=OTHER_SUBMITTER)
    with pytest.raises(JobRejected, match="submitter certificate is required"):
        submit(coordinator, root, bundle, cert_of="bank_a")
    assert coordinator.store.jobs() == []
    reply = submit(coordinator, root, bundle)
    assert reply == {"job_id": bundle.job_id, "state": "offered"}
    with pytest.raises(UserError, match="submitted before"):
        submit(coordinator, root, bundle)  # a replayed submission


def test_a_bundle_altered_after_signing_is_refused(coordinator: Coordinator, root: Path) -> None:
    bundle = signed_bundle(root, SUBMITTER, job_config())
    config = json.loads(json.dumps(bundle.config))
    config["federation"]["rounds"] = 50
    with pytest.raises(JobRejected, match="does not verify"):
        submit(coordinator, root, dataclasses.replace(bundle, config=config))
    with pytest.raises(JobRejected, match="does not verify"):
        submit(coordinator, root, dataclasses.replace(bundle, allow_refusals=True))
    assert coordinator.store.jobs() == []


def test_a_revoked_submitter_cannot_submit(root: Path, tmp_path: Path) -> None:
    ca_dir = copy_of(root, tmp_path / "ca")
    pki.revoke(ca_dir, SUBMITTER)
    settings = CoordinatorSettings(
        home=tmp_path / "home", pki_dir=ca_dir, address="127.0.0.1:0", parallel=0
    )
    c = Coordinator(settings)
    try:
        with pytest.raises(JobRejected, match="revoked"):
            submit(c, ca_dir, signed_bundle(ca_dir, SUBMITTER, job_config()))
        assert c.store.jobs() == []
    finally:
        c.shutdown()


def test_a_job_naming_no_organisation_is_refused(coordinator: Coordinator, root: Path) -> None:
    config = job_config()
    del config["data"]["organisations"]
    with pytest.raises(UserError, match=r"names its organisations in \[data\] organisations"):
        submit(coordinator, root, signed_bundle(root, SUBMITTER, config))


def test_an_offer_goes_only_to_named_sites_until_they_answer(
    coordinator: Coordinator, root: Path
) -> None:
    job_id = offered(coordinator, root, config=job_config(("bank_a", "bank_b")))
    assert coordinator.poll("bank_c", {}) == {"offers": [], "runs": [], "deals": [], "states": {}}
    offers = coordinator.poll("bank_a", {})["offers"]
    assert [o["bundle"]["job_id"] for o in offers] == [job_id]
    bundle = JobBundle.from_json(offers[0]["bundle"])  # as the site checks it
    verify_bundle(bundle, offers[0]["certificate"].encode(), ca_of(root), ())
    with pytest.raises(UserError, match=f"job {job_id} does not name 'bank_c'"):
        coordinator.answer("bank_c", {"job_id": job_id, "accept": False, "reason": "no"})
    assert coordinator.store.answers(job_id) == {}
    coordinator.answer("bank_a", {"job_id": job_id, "accept": True})
    assert coordinator.poll("bank_a", {})["offers"] == []
    assert coordinator.poll("bank_a", {})["states"] == {job_id: "offered"}
    assert len(coordinator.poll("bank_b", {})["offers"]) == 1
    status = coordinator.status(SUBMITTER, {"job_id": job_id})
    assert status["sites"] == {"bank_a": "accepted", "bank_b": "waiting"}


def answer(c: Coordinator, job_id: str, **said: str | bool) -> None:
    """Each site's answer: True accepts, a text refuses with that reason."""
    for site, what in said.items():
        accept = what is True
        c.answer(site, {"job_id": job_id, "accept": accept, "reason": "" if accept else what})


def test_one_refusal_refuses_the_job_with_every_reason(
    coordinator: Coordinator, root: Path
) -> None:
    job_id = offered(coordinator, root)
    answer(coordinator, job_id, bank_a="ε 9 > 3", bank_b="dataset not allowed")
    coordinator.tick()
    assert coordinator.store.get(job_id).state == "offered"  # bank_c has not answered yet
    answer(coordinator, job_id, bank_c=True)
    coordinator.tick()
    job = coordinator.store.get(job_id)
    assert job.state == "refused"
    assert job.reason is not None
    assert "refused by bank_a: ε 9 > 3" in job.reason
    assert "refused by bank_b: dataset not allowed" in job.reason
    assert "bank_c" not in job.reason
    assert coordinator.poll("bank_a", {})["states"] == {job_id: "refused"}


def test_a_job_that_allows_refusals_starts_without_the_refusers(
    coordinator: Coordinator, root: Path
) -> None:
    job_id = offered(coordinator, root, allow_refusals=True)
    answer(coordinator, job_id, bank_a=True, bank_b="no budget", bank_c=True)
    coordinator.tick()
    job = coordinator.store.get(job_id)
    assert (job.state, job.dropped, job.members()) == ("starting", ["bank_b"], ["bank_a", "bank_c"])
    assert job.reason == "refused by bank_b: no budget"
    assert coordinator.running == {}
    every = offered(coordinator, root, allow_refusals=True)
    answer(coordinator, every, bank_a="a", bank_b="b", bank_c="c")
    coordinator.tick()
    assert coordinator.store.get(every).state == "refused"


@pytest.mark.parametrize("allow_refusals", [False, True])
def test_a_silent_site_counts_as_refusing_after_the_offer_timeout(
    coordinator: Coordinator, root: Path, allow_refusals: bool
) -> None:
    coordinator.settings.offer_timeout_s = 0.2
    job_id = offered(coordinator, root, allow_refusals=allow_refusals)
    answer(coordinator, job_id, bank_a=True)
    coordinator.tick()
    assert coordinator.store.get(job_id).state == "offered"
    time.sleep(0.3)
    coordinator.tick()
    job = coordinator.store.get(job_id)
    assert job.reason is not None
    for silent in ("bank_b", "bank_c"):
        assert f"refused by {silent}: no answer within 0.2 s" in job.reason
    if allow_refusals:
        assert (job.state, job.dropped) == ("starting", ["bank_b", "bank_c"])
    else:
        assert job.state == "refused"


def started_ckks(c: Coordinator, root: Path) -> str:
    """A CKKS job every site accepted, waiting for its dealer's keys (bank_c dropped)."""
    job_id = offered(c, root, allow_refusals=True, config=job_config(secure_aggregation="ckks"))
    answer(c, job_id, bank_a=True, bank_b=True, bank_c="no")
    c.tick()
    assert c.store.get(job_id).state == "starting"
    return job_id


PUBLIC = {"he/public.ctx": b"ctx".hex(), "he/keyset.json": b"{}".hex()}


def test_only_the_dealer_sends_key_material(coordinator: Coordinator, root: Path) -> None:
    waiting = offered(coordinator, root, config=job_config(secure_aggregation="ckks"))
    with pytest.raises(UserError, match="'bank_a' is not the key dealer"):
        coordinator.material("bank_a", {"job_id": waiting, "files": PUBLIC})  # still offered
    job_id = started_ckks(coordinator, root)
    deals = coordinator.poll("bank_a", {})["deals"]
    assert [d["job_id"] for d in deals] == [job_id]
    assert sorted(deals[0]["members"]) == ["bank_a", "bank_b"]
    assert coordinator.poll("bank_b", {})["deals"] == []
    for site in ("bank_b", "bank_c"):
        with pytest.raises(UserError, match=f"'{site}' is not the key dealer of job {job_id}"):
            coordinator.material(site, {"job_id": job_id, "files": PUBLIC})
    assert coordinator.store.material(job_id).keys() == {"submitter.crt"}


@pytest.mark.parametrize(
    "files",
    [
        {**PUBLIC, "../../jobs.db": "00"},
        {**PUBLIC, "/etc/passwd": "00"},
        {**PUBLIC, "submitter.crt": b"forged".hex()},
        {**PUBLIC, "he/extra.bin": "00"},
        {**PUBLIC, "he/sealed/bank_c.box": "00"},  # bank_c refused: not a member
        {**PUBLIC, "he/sealed/evil.box": "00"},
        {"he/public.ctx": "00", "he/sealed/bank_a.box": "00"},  # no key set
    ],
    ids=[
        "up",
        "absolute",
        "submitter cert",
        "other he file",
        "non-member box",
        "stranger box",
        "no keyset",
    ],
)
def test_key_material_outside_the_job_is_refused(
    coordinator: Coordinator, root: Path, files: dict[str, str]
) -> None:
    job_id = started_ckks(coordinator, root)
    before = coordinator.store.material(job_id)
    with pytest.raises(UserError, match="the public key set and one sealed box per member"):
        coordinator.material("bank_a", {"job_id": job_id, "files": files})
    assert coordinator.store.material(job_id) == before


def test_the_dealers_material_is_stored_and_handed_to_each_member(
    coordinator: Coordinator, root: Path
) -> None:
    job_id = started_ckks(coordinator, root)
    boxes = {f"he/sealed/{s}.box": s.encode().hex() for s in ("bank_a", "bank_b")}
    coordinator.material("bank_a", {"job_id": job_id, "files": {**PUBLIC, **boxes}})
    assert coordinator.poll("bank_a", {})["deals"] == []  # dealt once
    stored = coordinator.store.material(job_id)
    assert stored["he/sealed/bank_b.box"] == b"bank_b"
    assert stored["he/public.ctx"] == b"ctx"
    coordinator.store.move(job_id, "running", port=4999)  # as `_launch` records it
    runs = coordinator.poll("bank_b", {})["runs"]
    assert [r["port"] for r in runs] == [4999]
    assert set(runs[0]["material"]) == {"he/public.ctx", "he/keyset.json", "he/sealed/bank_b.box"}
    assert coordinator.poll("bank_c", {})["runs"] == []  # dropped: no run, no material
