"""Prometheus metrics (the text format, read by a real scrape over a socket) and JSON-line logs."""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from veil.errors import UserError
from veil.sites.metrics import (
    Metrics,
    configure_json_logging,
    log_event,
    serve_metrics,
)


def test_the_exposition_format_exactly() -> None:
    m = Metrics()
    jobs = m.counter("jobs", "Jobs accepted.", labels=("submitter", "kind"))
    running = m.gauge("jobs_running", "Jobs running now.")
    m.counter("uploads", "Uploads.")
    jobs.inc(submitter="bob", kind="train")
    jobs.inc(2, kind="train", submitter="alice")  # keyword order does not matter
    jobs.inc(0.5, submitter="alice", kind="train")
    running.set(3)
    running.inc(-1)
    assert m.exposition() == (
        "# HELP veil_jobs_total Jobs accepted.\n"
        "# TYPE veil_jobs_total counter\n"
        'veil_jobs_total{submitter="alice",kind="train"} 2.5\n'
        'veil_jobs_total{submitter="bob",kind="train"} 1\n'
        "# HELP veil_jobs_running Jobs running now.\n"
        "# TYPE veil_jobs_running gauge\n"
        "veil_jobs_running 2\n"
        "# HELP veil_uploads_total Uploads.\n"
        "# TYPE veil_uploads_total counter\n"
        "veil_uploads_total 0\n"
    )


def test_label_values_and_help_are_escaped() -> None:
    m = Metrics(namespace="")
    c = m.counter("odd", 'Help with \\ and\nnewline and "quotes".', labels=("v",))
    c.inc(v='a\\b"c\nd')
    g = m.gauge("g", "g")
    g.set(math.inf)
    assert m.exposition().splitlines() == [
        '# HELP odd_total Help with \\\\ and\\nnewline and "quotes".',
        "# TYPE odd_total counter",
        'odd_total{v="a\\\\b\\"c\\nd"} 1',
        "# HELP g g",
        "# TYPE g gauge",
        "g +Inf",
    ]
    # every sample line parses back to one name, label set and value
    sample = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-z_]+="([^"\\\n]|\\.)*",?)*\})? \S+')
    for line in m.exposition().splitlines():
        assert line.startswith("# ") or sample.fullmatch(line), line


@pytest.mark.parametrize("amount", [-1.0, math.nan, -math.inf, math.inf])
def test_a_counter_only_goes_up_by_a_finite_amount(amount: float) -> None:
    m = Metrics()
    c = m.counter("c", "c")
    c.inc(3)
    with pytest.raises(UserError, match="use a gauge"):
        c.inc(amount)
    assert m.exposition().endswith("\nveil_c_total 3\n")


def test_wrong_labels_and_names_are_refused() -> None:
    m = Metrics()
    c = m.counter("c", "c", labels=("a", "b"))
    for labels in ({}, {"a": "1"}, {"a": "1", "b": "2", "x": "3"}, {"a": "1", "x": "2"}):
        with pytest.raises(UserError, match=r"takes labels \(a, b\)"):
            c.inc(1.0, **labels)
    with pytest.raises(UserError, match="takes labels"):
        m.gauge("g", "g").set(1, a="1")
    for bad in ("9lives", "has space", "dash-ed", ""):
        with pytest.raises(UserError, match="invalid metric name"):
            Metrics(namespace="").gauge(bad, "x")
    for label in ("0a", "__reserved", "a-b", "a:b"):
        with pytest.raises(UserError, match="invalid label name"):
            m.gauge("h", "h", labels=(label,))
    with pytest.raises(UserError, match="twice"):
        m.gauge("h", "h", labels=("a", "a"))
    with pytest.raises(UserError, match="the suffix is added"):
        m.counter("jobs_total", "x")
    with pytest.raises(UserError, match="invalid metrics namespace"):
        Metrics(namespace="veil-ops")
    assert m.exposition().count("# TYPE") == 2  # the refused ones left nothing behind


def test_registering_a_name_again() -> None:
    m = Metrics()
    c = m.counter("jobs", "Jobs.", labels=("a",))
    assert m.counter("jobs", "Other help.", labels=("a",)) is c
    with pytest.raises(UserError, match="already registered as a counter"):
        m.gauge("jobs", "Jobs.", labels=("a",))
    with pytest.raises(UserError, match="already registered"):
        m.counter("jobs", "Jobs.", labels=("b",))
    with pytest.raises(UserError, match="already registered"):
        m.counter("jobs", "Jobs.")
    with pytest.raises(UserError, match="'veil_jobs_total'"):
        m.gauge("jobs_total", "would be exposed under the counter's name")
    g = m.gauge("up_total", "A gauge whose name a counter 'up' would expose.")
    with pytest.raises(UserError, match="'veil_up_total'"):
        m.counter("up", "Up.")
    assert m.gauge("up_total", "Up.") is g


def test_concurrent_increments_add_up() -> None:
    m = Metrics()
    c = m.counter("hits", "Hits.", labels=("t",))
    g = m.gauge("level", "Level.")
    start = threading.Barrier(8)

    def work(t: int) -> None:
        start.wait()
        for _ in range(5000):
            c.inc(t=str(t % 2))
            g.inc()
            g.inc(-0.5)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = m.exposition()
    assert 'veil_hits_total{t="0"} 20000\n' in text
    assert 'veil_hits_total{t="1"} 20000\n' in text
    assert "veil_level 20000\n" in text


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    m = Metrics()
    m.counter("scrapes", "Scrapes.").inc(7)
    with serve_metrics(m) as server:
        yield m, server.port


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.getheader("Content-Type") or "", reply.read().decode()
    finally:
        conn.close()


def test_get_metrics_over_a_real_socket(
    served: tuple[Metrics, int], capfd: pytest.CaptureFixture[str]
) -> None:
    m, port = served
    status, content_type, body = get(port, "/metrics")
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert body == m.exposition() and "veil_scrapes_total 7\n" in body
    m.counter("scrapes", "Scrapes.").inc()
    assert "veil_scrapes_total 8\n" in get(port, "/metrics?x=1")[2]  # live, not a snapshot
    for path in ("/", "/metrics/", "/metricsx", "/../metrics"):
        assert get(port, path)[0] == 404, path
    assert get(port, "/metrics", "POST")[0] == 501
    err = capfd.readouterr().err
    assert "GET" not in err and "HTTP" not in err  # no line per request on stderr


def test_the_server_closes_and_frees_its_port() -> None:
    server = serve_metrics(Metrics())
    port = server.port
    assert server.port > 0 and get(port, "/metrics")[0] == 200
    server.close()
    server.close()  # harmless
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_bad_addresses_are_user_errors() -> None:
    for address in ("nohostport", "127.0.0.1:", ":9464", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(UserError, match="give HOST:PORT"):
            serve_metrics(Metrics(), address)
    with serve_metrics(Metrics()) as taken, pytest.raises(UserError, match="cannot serve"):
        serve_metrics(Metrics(), f"127.0.0.1:{taken.port}")


def test_ipv6_loopback_if_available() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = serve_metrics(Metrics(), "[::1]:0")
    except UserError:
        pytest.skip("IPv6 loopback not configured")
    with server:
        conn = http.client.HTTPConnection("::1", server.port, timeout=10)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 200
        conn.close()


@pytest.fixture
def clean_root() -> Iterator[logging.Logger]:
    """The root logger's handlers and level as they were, after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_event_writes_one_json_object_per_line(
    clean_root: logging.Logger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "logs" / "site.jsonl"
    configure_json_logging(log_file)
    configure_json_logging(log_file)  # idempotent: still one line per event on each
    log = logging.getLogger("veil.test")
    log_event(log, "job accepted", job="j-1", n=3, ok=True, path=tmp_path, nested={"x": [1, 2]})
    log_event(log, "odd", text='multi\nline "quoted"', ratio=math.nan, level="WARNING")
    log_event(log, "quiet", level=logging.DEBUG)  # below INFO: not written
    lines = capsys.readouterr().err.splitlines()
    assert lines == log_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first) == ["ts", "event", "job", "n", "ok", "path", "nested"]
    assert first["event"] == "job accepted" and first["job"] == "j-1" and first["n"] == 3
    assert first["ok"] is True and first["path"] == str(tmp_path)
    assert first["nested"] == {"x": [1, 2]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["text"] == 'multi\nline "quoted"' and second["ratio"] == "nan"
    assert "level" not in second


def test_log_event_levels_and_reserved_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("veil.test.levels")
    with caplog.at_level(logging.INFO, logger="veil.test.levels"):
        log_event(log, "a")
        log_event(log, "b", level="error")
        log_event(log, "c", level=logging.WARNING)
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.ERROR, logging.WARNING]
    with pytest.raises(UserError, match="unknown log level"):
        log_event(log, "x", level="LOUD")
    with pytest.raises(UserError, match="rename the field"):
        log_event(log, "x", ts="yesterday")
    with pytest.raises(UserError, match="rename the field"):
        log_event(log, "x", event="other")


def test_json_logging_does_not_double_a_basic_config_handler(
    clean_root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = logging.StreamHandler(sys.stderr)  # what `veil.deployment.configure_logging` adds
    existing.setFormatter(logging.Formatter("%(message)s"))
    clean_root.addHandler(existing)
    configure_json_logging()
    configure_json_logging()
    log_event(logging.getLogger("veil.test.once"), "once")
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["event"] == "once"
