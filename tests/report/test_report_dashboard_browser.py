"""End to end in a real browser: a run, `veil dashboard` as its own process, headless Chromium.

The page must show the round counter advancing while the federation runs and the ε figure once
the first round is accounted. A screenshot is saved as a test artifact (in $VEIL_TEST_ARTIFACTS
when set, else in the test's temporary folder).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import veil
from veil.config import RunConfig
from veil.federation import RoundRecord, Strategy
from veil.result import Result
from veil.store import DB_NAME, RunStore
from veil.tensors import NamedArrays

ROUNDS = 4


class _Pace:
    """Holds the run after round 1 until the browser has seen it (`watching`), then lets it go on
    at a human pace (a round every 0.2 s), so that the test does not race the run."""

    def __init__(self) -> None:
        self.watching = threading.Event()

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        if record.round == 1:
            self.watching.wait(timeout=120)
        time.sleep(0.2)


def _config() -> RunConfig:
    return RunConfig.from_dict(
        {
            "name": "browser-live",
            "seed": 4,
            "data": {"dataset": "breast_cancer", "validation_fraction": 0.0, "scaling": "bounds"},
            "model": {"name": "logistic"},
            "federation": {"clients": 3, "rounds": ROUNDS, "fraction_evaluate": 0.0},
            "privacy": {"unit": "record", "epsilon": 4.0, "delta": 1e-5, "clip_norm": 1.0},
        }
    )


def _round(page: Any) -> int:
    match = re.match(r"\s*(\d+)", page.inner_text("#round"))
    return int(match.group(1)) if match else -1


def _wait_until(condition: Callable[[], bool], message: str, timeout_s: float = 30) -> None:
    # Polled from Python: the page's Content-Security-Policy forbids Playwright's eval.
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


@pytest.mark.slow
def test_dashboard_follows_a_running_federation(
    chromium_launch: dict[str, Any], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    out = tmp_path / "run"
    results: list[Result] = []
    errors: list[BaseException] = []
    pace = _Pace()

    def run() -> None:
        try:
            results.append(veil.run(_config(), out, observers=[pace]))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    # An empty run store first, so that `veil dashboard` (a process of its own, slow to import)
    # starts while the run loads its data; the run then records into this store.
    out.mkdir()
    RunStore(out / DB_NAME).close()
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "veil.cli", "dashboard", str(out), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        assert dashboard.stdout is not None
        line = dashboard.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, f"no address from `veil dashboard`: {line!r} {dashboard.stderr!r}"
        url = match.group(1)
        artifacts = Path(os.environ.get("VEIL_TEST_ARTIFACTS", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            # A fresh profile per test (Playwright takes it as a parameter, not as a flag).
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), **chromium_launch
            )
            try:
                page = browser.new_page()
                page.goto(url)
                _wait_until(lambda: _round(page) >= 1, "the page never showed round 1")
                first = _round(page)
                assert first == 1 and page.inner_text("#status") == "running"
                pace.watching.set()
                _wait_until(lambda: _round(page) > first, "the round counter did not advance")
                assert _round(page) > first
                assert page.inner_text("#status") in ("running", "finished")
                epsilon = page.inner_text("#epsilon")
                assert re.match(r"\d+\.\d{3} of 4", epsilon), epsilon
                assert page.inner_text("#accuracy") != "-"
                assert "browser-live" in page.inner_text("#runs")
                page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
            finally:
                browser.close()
    finally:
        pace.watching.set()
        dashboard.terminate()
        dashboard.wait(timeout=10)
        runner.join(timeout=60)
    assert not errors, errors
    assert results and len(results[0].rounds) == ROUNDS
    assert (artifacts / "dashboard.png").stat().st_size > 0
