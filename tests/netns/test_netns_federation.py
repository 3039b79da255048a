"""A SecAgg federation over a misbehaving network: the coordinator and each of three members in
its own network namespace (`netns_lab`), the processes started with the CLI. Whatever the
network does (a bandwidth limit, latency, connections dropped or cut, a member unplugged
mid-round, the coordinator restarted mid-run), the run must finish every round with every
member and end with the same metrics and model as the same config on loopback.

Needs root and iproute2 (skipped otherwise). Each run takes 10-40 s: all are marked slow.
"""

from __future__ import annotations

import time
from pathlib import Path

import netns_lab
import pytest
from lab_federation import (
    CONFIG,
    ROUNDS,
    Federation,
    Reference,
    accepted,
    assert_same_result,
    durations,
    wait_for,
)
from netns_lab import COORDINATOR, Lab

pytestmark = pytest.mark.slow

#: Seconds one run may take in the lab, from the server's start to the last member's exit.
RUN_TIMEOUT_S = 180.0
#: The proxy's one-way latency: each of a SecAgg round's seven tasks then costs at least two
#: round trips (the task, the answer), so a round lasts about 0.75 s instead of 0.1 s.
LATENCY_MS = 25


def test_bandwidth_limited_links(clean_lab: Lab, loopback: Reference, tmp_path: Path) -> None:
    """A 20 Mbit/s token bucket on every member's link, both ways."""
    netns_lab.limit_bandwidth(clean_lab, "20mbit")
    with Federation(clean_lab, tmp_path, CONFIG) as fed:
        port = fed.start_server()
        fed.start_members(f"{COORDINATOR}:{port}")
        fed.wait(RUN_TIMEOUT_S)
        assert_same_result(fed.result(), fed.final_parameters(), loopback)
    # The buckets carried the run (each member downloads the 34 KB model twice a round and
    # uploads its 34 KB masked update) and held packets back.
    stats = netns_lab.qdisc_stats(clean_lab)
    assert len(stats) == 2 * clean_lab.members
    assert all(s["sent"] > ROUNDS * 34_000 for s in stats.values()), stats
    assert all(s["overlimits"] > 0 for s in stats.values()), stats


def test_latency_and_connections_cut_mid_download(
    clean_lab: Lab, loopback: Reference, tmp_path: Path
) -> None:
    """25 ms each way, and every connection reset once it has carried 60 KB from the
    coordinator: the members lose their connection in the middle of a task's download a few
    times each, reconnect, and are sent the task again."""
    with Federation(clean_lab, tmp_path, CONFIG) as fed:
        fed.start_server()
        address = fed.start_proxy(
            latency_ms=LATENCY_MS, cut_after=60_000, cut_direction="down", seed=1
        )
        fed.start_members(address)
        fed.wait(RUN_TIMEOUT_S)
        result = fed.result()
        assert_same_result(result, fed.final_parameters(), loopback)
        stats = fed.proxy_stats()
    # Each member downloads about 250 KB: at least three cuts each, hence reconnections.
    assert stats["cut"] >= 3 * clean_lab.members, stats
    assert stats["connections"] > clean_lab.members, stats
    assert min(durations(result)) >= 7 * 2 * LATENCY_MS / 1000, durations(result)


def test_latency_and_dropped_connections(
    clean_lab: Lab, loopback: Reference, tmp_path: Path
) -> None:
    """25 ms each way; every member's first two connections are reset as they open, and then
    one in five at random, besides the cuts mid-download: the members keep retrying."""
    with Federation(clean_lab, tmp_path, CONFIG) as fed:
        fed.start_server()
        address = fed.start_proxy(
            latency_ms=LATENCY_MS,
            drop_first=2,
            drop=0.2,
            cut_after=60_000,
            cut_direction="down",
            seed=2,
        )
        fed.start_members(address)
        fed.wait(RUN_TIMEOUT_S)
        assert_same_result(fed.result(), fed.final_parameters(), loopback)
        stats = fed.proxy_stats()
    assert stats["dropped"] >= 2 * clean_lab.members, stats


def test_connection_cut_during_an_upload(
    clean_lab: Lab, loopback: Reference, tmp_path: Path
) -> None:
    """The first time a member sends more than 16 KB at once (its masked update, 34 KB), its
    connection is reset in the middle: it must send that answer again after reconnecting."""
    with Federation(clean_lab, tmp_path, CONFIG) as fed:
        fed.start_server()
        address = fed.start_proxy(cut_upload_over=16_000, max_cuts=1)
        fed.start_members(address)
        fed.wait(RUN_TIMEOUT_S)
        assert fed.proxy_stats()["cut"] == 1
        assert_same_result(fed.result(), fed.final_parameters(), loopback)


def test_member_unplugged_mid_round(clean_lab: Lab, loopback: Reference, tmp_path: Path) -> None:
    """Member 0's link goes down once it has answered the first step of round 2, and comes
    back 3 s later: the round waits for it (its deadline is 30 s) and it finishes the round
    over the same connection. Through the 25 ms proxy, so that a round lasts long enough to
    be unplugged inside it."""
    outage_s = 3.0
    with Federation(clean_lab, tmp_path, CONFIG) as fed:
        fed.start_server()
        fed.start_members(fed.start_proxy(latency_ms=LATENCY_MS))
        member = fed.files.clients[0]
        wait_for(lambda: accepted(fed.log(), member, 2), 120, f"{member} to start round 2")
        netns_lab.member_link(clean_lab, 0, up=False)
        recorded_at_cut = fed.rounds_recorded()
        time.sleep(outage_s)  # the outage itself, not a wait for an event
        netns_lab.member_link(clean_lab, 0, up=True)
        fed.wait(RUN_TIMEOUT_S)
        result = fed.result()
        assert_same_result(result, fed.final_parameters(), loopback)
    assert recorded_at_cut == [1], "the member was unplugged after round 2 had ended"
    assert durations(result)[1] >= outage_s, durations(result)


def test_coordinator_restarted_mid_run(clean_lab: Lab, loopback: Reference, tmp_path: Path) -> None:
    """The coordinator is killed (SIGKILL) once round 1 is recorded and started again with
    `--resume` on the same address; the members, which kept retrying, join it again and the
    run ends with every round recorded once. The links are limited to 2 Mbit/s, so that a
    round lasts about half a second and the kill lands before the run's end."""
    netns_lab.limit_bandwidth(clean_lab, "2mbit")
    with Federation(clean_lab, tmp_path, CONFIG) as fed:
        port = fed.start_server()
        fed.start_members(f"{COORDINATOR}:{port}")
        wait_for(lambda: bool(fed.rounds_recorded()), 120, "round 1 to be recorded")
        fed.kill_server()
        killed_at = fed.rounds_recorded()
        fed.start_server(port=port, resume=True)
        fed.wait(RUN_TIMEOUT_S)
        result = fed.result()
        assert_same_result(result, fed.final_parameters(), loopback, restored=killed_at)
        assert fed.rounds_recorded() == list(range(1, ROUNDS + 1))
    assert killed_at and killed_at[-1] < ROUNDS, killed_at
