"""End to end in a real browser: a run, `veil dashboard` as its own process, headless Chromium.

The dashboard starts on a folder that does not exist yet; the page must list the run once it
starts, show the round counter advancing while the federation runs, the ε figure once the first
round is accounted, and the report's curves (accuracy, loss, ε) as inline SVG. A screenshot is
saved as a test artifact (in $VEIL_TEST_ARTIFACTS when set, else in the test's temporary
folder).
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

    where = tmp_path / "runs"  # does not exist when the dashboard starts
    out = where / "live"
    results: list[Result] = []
    errors: list[BaseException] = []
    pace = _Pace()

    def run() -> None:
        try:
            results.append(veil.run(_config(), out, observers=[pace]))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    dashboard = subprocess.Popen(
        [sys.executable, "-m", "veil.cli", "dashboard", str(where), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runner = threading.Thread(target=run, daemon=True)
    try:
        assert dashboard.stdout is not None
        line = dashboard.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, f"no address from `veil dashboard`: {line!r} {dashboard.stderr!r}"
        url = match.group(1)
        assert "no runs in" in dashboard.stdout.readline()
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
                _wait_until(lambda: page.is_visible("#empty"), "no 'no runs yet' on the page")
                runner.start()
                _wait_until(lambda: _round(page) >= 1, "the page never showed round 1")
                first = _round(page)
                assert first == 1 and page.inner_text("#status") == "running"
                pace.watching.set()
                _wait_until(lambda: _round(page) > first, "the round counter did not advance")
                assert _round(page) > first
                assert page.inner_text("#status") in ("running", "finished")
                epsilon = page.inner_text("#epsilon")
                assert re.match(r"\d+\.\d{3} of 4", epsilon), epsilon
                assert page.inner_text("#metric-label") == "accuracy"
                assert page.inner_text("#metric") != "-"
                assert not page.is_visible("#empty")
                charts = page.inner_text("#charts")
                for title in ("Accuracy per round", "Loss per round", "ε spent per round"):
                    assert title in charts, charts
                assert "browser-live" in page.inner_text("#runs")
                page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
            finally:
                browser.close()
    finally:
        pace.watching.set()
        dashboard.terminate()
        dashboard.wait(timeout=10)
        if runner.ident is not None:  # started
            runner.join(timeout=60)
    assert not errors, errors
    assert results and len(results[0].rounds) == ROUNDS
    assert (artifacts / "dashboard.png").stat().st_size > 0
