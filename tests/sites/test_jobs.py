"""The coordinator's job store: states only along TRANSITIONS, first answers, ordered events,
key material once, a store that survives reopening, and threads that share it."""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki_nodes import job_config

from veil.errors import UserError
from veil.sites.bundle import JobBundle
from veil.sites.jobs import FINAL, TRANSITIONS, JobNotFound, JobStore, State


def bundle(job_id: str, *, name: str = "loans") -> JobBundle:
    """A job for the store (which keeps bundles; the sites verify them, not the store)."""
    return JobBundle(
        job_id=job_id,
        submitter="risk-team",
        config=job_config() | {"name": name},
        schema=None,
        allow_refusals=False,
        submitted_at="2026-01-01T00:00:00+00:00",
        signature=b"\x01" * 64,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore(tmp_path / "jobs.db")
    yield s
    s.close()


def path_to(state: State) -> list[State]:
    """The states from "offered" to `state` along TRANSITIONS (a shortest path)."""
    seen: dict[State, list[State]] = {"offered": []}
    queue: deque[State] = deque(["offered"])
    while queue:
        current = queue.popleft()
        for nxt in TRANSITIONS[current]:
            if nxt not in seen:
                seen[nxt] = [*seen[current], nxt]
                queue.append(nxt)
    return seen[state]


STEPS = [(a, b) for a, nexts in TRANSITIONS.items() for b in nexts]
BARRED = [(a, b) for a in TRANSITIONS for b in TRANSITIONS if b != a and b not in TRANSITIONS[a]]


def test_every_state_is_reachable_and_the_final_ones_lead_nowhere() -> None:
    assert all(path_to(s) is not None for s in TRANSITIONS)
    assert {"finished", "failed", "refused", "cancelled"} == FINAL
    assert len(BARRED) > 20  # the table bars most steps


@pytest.mark.parametrize(("current", "target"), STEPS)
def test_each_allowed_step_moves_the_job_and_records_it(
    store: JobStore, current: State, target: State
) -> None:
    job = store.add(bundle("j1"))
    assert job.state == "offered" and job.seq == 1
    for state in path_to(current):
        store.move("j1", state)
    moved = store.move("j1", target, reason=f"because {target}")
    assert moved.state == target == store.get("j1").state
    assert moved.reason == f"because {target}"
    assert store.events("j1")[-1]["event"] == target
    assert store.events("j1")[-1]["detail"] == f"because {target}"


@pytest.mark.parametrize(("current", "target"), BARRED)
def test_each_barred_step_is_refused_naming_the_state(
    store: JobStore, current: State, target: State
) -> None:
    store.add(bundle("j1"))
    for state in path_to(current):
        store.move("j1", state)
    before = store.events("j1")
    with pytest.raises(UserError, match=f"job j1 is {current}; it cannot become {target}"):
        store.move("j1", target, reason="sneaky", port=1234, dropped=["bank_a"])
    job = store.get("j1")
    assert (job.state, job.port, job.dropped) == (current, None, [])
    assert job.reason != "sneaky"
    assert store.events("j1") == before


def test_a_move_to_the_same_state_updates_fields_without_an_event(store: JobStore) -> None:
    store.add(bundle("j1"))
    store.move("j1", "starting", dropped=["bank_b"])
    store.move("j1", "running", port=4100)
    events = store.events("j1")
    job = store.move("j1", "running", port=4200)
    assert (job.state, job.port) == ("running", 4200)
    assert store.events("j1") == events
    assert job.members() == ["bank_a", "bank_c"]
    done = store.move("j1", "finished", summary={"final": {"accuracy": 0.75}, "rounds": 2})
    assert done.summary == {"final": {"accuracy": 0.75}, "rounds": 2}


def test_an_unknown_job_is_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFound, match="no job 'nope'; `veil job list`"):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.move("nope", "starting")


def test_a_job_id_submitted_twice_is_refused(store: JobStore) -> None:
    store.add(bundle("j1", name="first"))
    with pytest.raises(UserError, match="job j1 was submitted before; submit it anew"):
        store.add(bundle("j1", name="second"))
    with pytest.raises(UserError, match="submitted before"):
        store.add(dataclasses.replace(bundle("j1"), submitter="audit-team"))
    assert [(j.id, j.bundle.name, j.seq) for j in store.jobs()] == [("j1", "first", 1)]
    assert [e["event"] for e in store.events("j1")] == ["submitted"]


def test_a_sites_first_answer_stands(store: JobStore) -> None:
    store.add(bundle("j1"))
    store.answer("j1", "bank_a", accept=True, reason="")
    store.answer("j1", "bank_b", accept=False, reason="policy: ε too large")
    store.answer("j1", "bank_a", accept=False, reason="changed my mind")
    store.answer("j1", "bank_b", accept=True, reason="")
    answers = store.answers("j1")
    assert {n: (a.accept, a.reason) for n, a in answers.items()} == {
        "bank_a": (True, ""),
        "bank_b": (False, "policy: ε too large"),
    }
    said = [e["detail"] for e in store.events("j1") if e["event"] == "answer"]
    assert said == ["bank_a accepted", "bank_b refused: policy: ε too large"]


def test_events_are_recorded_in_order(store: JobStore) -> None:
    store.add(bundle("j1"))
    store.add(bundle("j2"))
    store.event("j1", "site bank_a", "joined")
    store.move("j1", "starting")
    store.event("j2", "other job")
    store.event("j1", "site bank_b", "joined")
    store.move("j1", "cancelled", reason="cancelled by risk-team")
    events = store.events("j1")
    assert [(e["event"], e["detail"]) for e in events] == [
        ("submitted", "by risk-team"),
        ("site bank_a", "joined"),
        ("starting", ""),
        ("site bank_b", "joined"),
        ("cancelled", "cancelled by risk-team"),
    ]
    times = [e["at"] for e in events]
    assert times == sorted(times)
    assert [e["event"] for e in store.events("j2")] == ["submitted", "other job"]


def test_key_material_is_stored_once(store: JobStore) -> None:
    store.add(bundle("j1"))
    store.add(bundle("j2"))
    store.put_material("j1", {"he/keyset.json": b"first", "he/sealed/bank_a.box": b"\x00\xff"})
    store.put_material("j1", {"he/keyset.json": b"replaced?", "he/public.ctx": b"ctx"})
    assert store.material("j1") == {
        "he/keyset.json": b"first",
        "he/sealed/bank_a.box": b"\x00\xff",
        "he/public.ctx": b"ctx",
    }
    assert store.material("j2") == {}


def test_the_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    first = JobStore(path)
    first.add(bundle("j1"))
    first.answer("j1", "bank_a", accept=False, reason="no budget")
    first.move("j1", "starting", reason="refused by bank_a: no budget", dropped=["bank_a"])
    first.move("j1", "running", port=4321)
    first.put_material("j1", {"submitter.crt": b"PEM"})
    first.add(bundle("j2"))
    first.move("j2", "refused", reason="refused by bank_c")
    while_open = JobStore(path)  # another connection sees every committed write at once
    assert [j.id for j in while_open.jobs()] == ["j1", "j2"]
    while_open.close()
    expected = (first.jobs(), first.answers("j1"), first.events("j1"), first.material("j1"))
    first.close()
    again = JobStore(path)
    assert (again.jobs(), again.answers("j1"), again.events("j1"), again.material("j1")) == expected
    job = again.get("j1")
    assert (job.state, job.port, job.dropped) == ("running", 4321, ["bank_a"])
    assert job.members() == ["bank_b", "bank_c"]
    assert again.jobs(states=("refused",))[0].id == "j2"
    assert again.add(bundle("j3")).seq == 3
    with pytest.raises(UserError, match="submitted before"):
        again.add(bundle("j1"))
    again.close()


def test_threads_share_one_store(store: JobStore) -> None:
    """The control service's threads and the scheduler call one store at once."""
    errors: list[BaseException] = []
    workers, per_worker = 8, 12

    def work(w: int) -> None:
        try:
            for i in range(per_worker):
                job_id = f"w{w}j{i}"
                store.add(bundle(job_id))
                for site in ("bank_a", "bank_b", "bank_c"):
                    store.answer(job_id, site, accept=site != "bank_c", reason="no")
                store.move(job_id, "starting", dropped=["bank_c"])
                store.put_material(job_id, {"he/keyset.json": job_id.encode()})
                store.event(job_id, "site bank_a", "joined")
                store.jobs(states=("offered", "starting"))
                store.move(job_id, "running", port=5000 + i)
        except BaseException as exc:  # every failure, to assert on in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    jobs = store.jobs()
    assert len(jobs) == workers * per_worker
    assert sorted(j.seq for j in jobs) == list(range(1, workers * per_worker + 1))
    assert all(j.state == "running" and j.members() == ["bank_a", "bank_b"] for j in jobs)
    assert all(store.material(j.id) == {"he/keyset.json": j.id.encode()} for j in jobs[:5])
