"""One line switches a run: the SecAgg and CKKS examples give the accuracy of the same config
summed in the clear (`secure_aggregation = "plain"`, the example's section then unused), within
0.01, with the examples' own rounds and seed. The two accuracies are printed side by side."""

from __future__ import annotations

import time

import pytest

import veil
from support import EXAMPLES
from veil.config import RunConfig, load_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["secagg", "ckks"])
def test_the_example_and_its_plain_twin_reach_the_same_accuracy(backend: str) -> None:
    own = load_config(EXAMPLES / f"medical_diagnosis_{backend}.toml")
    assert own.secure_aggregation == backend
    plain = RunConfig.from_dict({**own.to_dict(), "secure_aggregation": "plain"})
    assert plain.unused_sections() == [f"[{backend}] is unused with secure_aggregation = 'plain'"]
    accuracy: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for config in (own, plain):
        start = time.perf_counter()
        result = veil.run(config)
        seconds[config.secure_aggregation] = time.perf_counter() - start
        assert result.privacy.aggregation == config.secure_aggregation
        assert len(result.rounds) == own.federation.rounds
        accuracy[config.secure_aggregation] = result.final["accuracy"]
    print(
        f"\n{own.name}, {own.federation.rounds} rounds, seed {own.seed}:"
        f"\n  {'secure_aggregation':<20}{'accuracy':>10}{'seconds':>10}"
        + "".join(f"\n  {k!r:<20}{accuracy[k]:>10.4f}{seconds[k]:>10.1f}" for k in accuracy)
    )
    assert abs(accuracy[backend] - accuracy["plain"]) <= 0.01, accuracy
