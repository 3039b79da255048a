"""A fifth secure-aggregation backend takes one module and one registration.

The toy below sums the updates in the clear and says so; registering it is all it takes for a
config to say `secure_aggregation = "toy"` and for `veil.run` to use it: no edit to the runner,
the config module or the CLI. It changes nothing about the sum, so its run must give the plain
run's model bit for bit, while its result names it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import veil
from veil.assembly.secure_aggregation.base import SecureAggregation, ServerInputs, Session
from veil.assembly.secure_aggregation.registry import backend, names, register, unregister
from veil.config import RunConfig
from veil.errors import ConfigError
from veil.store import load_checkpoint

# -- the new module: a backend and its session ---------------------------------------------


class ClearSession(Session):
    """The default aggregator (the clear weighted sum) and no client steps; its record says
    what it is."""

    record_name = "toy"

    def record(self) -> dict[str, Any]:
        return {"sums": "in the clear: the server sees every client's update", "hides": "nothing"}


class ClearSum(SecureAggregation):
    """A toy backend: sums in the clear, and says so."""

    hides_updates = False

    def start(self, inputs: ServerInputs) -> Session:
        return ClearSession()


# -- the registration ----------------------------------------------------------------------


@pytest.fixture
def toy() -> Iterator[SecureAggregation]:
    found = ClearSum()
    register("toy", found)
    yield found
    unregister("toy")


def config(aggregation: str) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 11,
            "secure_aggregation": aggregation,
            "data": {"dataset": "breast_cancer"},
            "model": {"name": "logistic"},
            "federation": {"clients": 3, "rounds": 2, "learning_rate": 0.1},
        }
    )


def test_a_registered_backend_runs_says_so_and_sums_like_plain(
    toy: SecureAggregation, tmp_path: Path
) -> None:
    assert "toy" in names() and backend("toy") is toy
    plain = veil.run(config("plain"), tmp_path / "plain")
    summed = veil.run(config("toy"), tmp_path / "toy")

    assert summed.privacy.aggregation == "toy"
    on_disk = json.loads((tmp_path / "toy" / "result.json").read_text())
    assert on_disk["privacy"]["aggregation"] == "toy"
    assert on_disk["privacy"]["toy"]["sums"].startswith("in the clear")
    assert "toy" not in json.loads((tmp_path / "plain" / "result.json").read_text())["privacy"]

    # The same sum: the same global model, metrics and bytes as the plain run.
    mine = load_checkpoint(tmp_path / "toy" / "checkpoint.safetensors").parameters
    theirs = load_checkpoint(tmp_path / "plain" / "checkpoint.safetensors").parameters
    assert mine.keys() == theirs.keys()
    for name in mine:
        np.testing.assert_array_equal(mine[name], theirs[name])
    assert summed.final == plain.final
    assert [r.metrics for r in summed.rounds] == [r.metrics for r in plain.rounds]
    assert summed.communication.bytes_up == plain.communication.bytes_up


def test_a_name_nobody_registered_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="secure_aggregation = 'toy' is not available") as err:
        config("toy")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="names no backend"):
        backend("toy")


def test_a_built_in_or_taken_name_cannot_be_registered(toy: SecureAggregation) -> None:
    with pytest.raises(ValueError, match="built-in"):
        register("secagg", ClearSum())
    with pytest.raises(ValueError, match="already registered"):
        register("toy", ClearSum())
    register("toy", toy)  # the same backend again is no change
    assert backend("toy") is toy
