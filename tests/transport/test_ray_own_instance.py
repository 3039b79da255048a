"""mode = "ray" without a running Ray: the run starts a local instance and stops it at the end."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from extras import require
from veil.config import RunConfig
from veil.run import run

ray = require("ray")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "medical_diagnosis_ray.toml"


@pytest.mark.slow
def test_a_run_starts_and_stops_its_own_local_instance() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    raw["federation"]["rounds"] = 2
    raw["ray"] = {"workers": 1, "local_cpus": 1, "object_store_mb": 100}
    assert not ray.is_initialized()
    result = run(RunConfig.from_dict(raw))
    assert result.mode == "ray" and result.rounds[-1].clients == 5
    assert not ray.is_initialized()
