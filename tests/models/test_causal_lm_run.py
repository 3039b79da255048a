"""`veil run` with `[model] name = "causal_lm"`: federated instruction tuning of a causal LM
with LoRA across three organisations (`examples/llm_instruct.toml`), with DP-SGD, client-level
DP, SecAgg and int8 compression working unchanged.

Model: the tiny GPT-2 of `veil.models.tiny_lm`, built by this module into its own cache folder
(no download). Data: the SYNTHETIC instruction set of `veil.data.instructions`.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from extras import require
from support import EXAMPLES
from veil.config import RunConfig
from veil.errors import ConfigError
from veil.report.html import render_report
from veil.result import Result
from veil.run import run
from veil.store import load_checkpoint

require("peft")

EXAMPLE = EXAMPLES / "llm_instruct.toml"


@pytest.fixture(scope="module", autouse=True)
def tiny_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every run here builds (once) and reads the tiny GPT-2 from this module's own cache."""
    folder = tmp_path_factory.mktemp("veil-cache")
    previous = os.environ.get("VEIL_CACHE_DIR")
    os.environ["VEIL_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["VEIL_CACHE_DIR"]
    else:
        os.environ["VEIL_CACHE_DIR"] = previous


def _raw() -> dict[str, Any]:
    with EXAMPLE.open("rb") as f:
        return tomllib.load(f)


def _config(**sections: Any) -> RunConfig:
    raw = copy.deepcopy(_raw())
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return RunConfig.from_dict(raw)


def _perplexities(result: Result) -> list[float]:
    return [r.metrics["perplexity"] for r in result.rounds]


def _base(result: Result) -> float:
    section = getattr(result, "language_model", None)
    assert isinstance(section, dict)
    return float(section["base"]["perplexity"])


@pytest.mark.slow
def test_example_tunes_below_the_base_model_and_writes_generations(tmp_path: Path) -> None:
    result = run(_config(), out_dir=tmp_path)
    base = _base(result)
    perplexities = _perplexities(result)
    assert len(perplexities) == 5
    assert all(p < base for p in perplexities)  # every round below the base model
    assert perplexities[-1] < perplexities[0] and perplexities[-1] < base / 100
    assert result.final["token_accuracy"] > 0.5
    section = result.language_model  # type: ignore[attr-defined]
    prompts = [g["prompt"] for g in section["generations"]]
    assert prompts == [
        "What is 7 plus 5?",
        "Convert 3 kilometres to metres.",
        "What is the capital of France?",
        "What is the opposite of hot?",
    ]
    assert all(isinstance(g["output"], str) for g in section["generations"])
    assert result.dataset["synthetic"] is True
    html = (tmp_path / "report.html").read_text()
    assert "Language model" in html and "What is the capital of France?" in html
    # Only the adapters travel.
    fraction = result.communication.update_fraction_of_model
    assert fraction is not None and fraction < 0.15


@pytest.mark.slow
def test_dp_sgd_reports_epsilon_and_still_beats_the_base_model() -> None:
    privacy = {
        "unit": "record",
        "epsilon": 8.0,
        "delta": 1e-5,
        "noise_multiplier": "calibrate",
        "clip_norm": 1.0,
    }
    result = run(
        _config(privacy=privacy, federation={"rounds": 3, "learning_rate": 0.05, "batch_size": 32})
    )
    epsilons = [r.epsilon for r in result.rounds]
    assert None not in epsilons and epsilons[-1] == pytest.approx(8.0, rel=0.01)
    assert _perplexities(result)[-1] < _base(result) / 10


@pytest.mark.slow
def test_secagg_equals_plain_within_the_quantisation_error(tmp_path: Path) -> None:
    rounds = {"rounds": 2}
    plain = run(_config(federation=rounds), out_dir=tmp_path / "plain")
    masked = run(_config(federation=rounds, secure_aggregation="secagg"), out_dir=tmp_path / "sa")
    assert masked.rounds[-1].aggregation["protocol"] == "secagg"
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.safetensors").parameters
    b = load_checkpoint(tmp_path / "sa" / "checkpoint.safetensors").parameters
    gap = max(float(np.abs(a[n] - b[n]).max()) for n in a)
    assert 0 < gap < 1e-4  # SecAgg's fixed point rounds; nothing else differs
    for p, m in zip(_perplexities(plain), _perplexities(masked), strict=True):
        assert m == pytest.approx(p, rel=1e-3)


@pytest.mark.slow
def test_int8_uploads_and_client_level_dp_work_unchanged() -> None:
    compressed = run(_config(compression={"kind": "int8"}, federation={"rounds": 2}))
    assert compressed.communication.compression == "int8"
    assert _perplexities(compressed)[-1] < _base(compressed) / 100
    privacy = {
        "unit": "client",
        "epsilon": 8.0,
        "delta": 1e-3,
        "noise_multiplier": "calibrate",
        "clip_norm": 1.0,
    }
    private = run(_config(privacy=privacy, federation={"rounds": 2}))
    assert private.rounds[-1].epsilon == pytest.approx(8.0, rel=0.01)
    assert _perplexities(private)[-1] < _base(private)


@pytest.mark.slow
def test_jsonl_organisations_and_the_pooled_baseline(tmp_path: Path) -> None:
    import json

    from veil.data.instructions import synthetic_instructions

    pairs = synthetic_instructions(240, seed=9)
    files = {}
    for k, name in enumerate(("org_a", "org_b", "org_c")):
        rows = range(k, 240, 3)
        lines = [
            json.dumps({"instruction": pairs.instructions[i], "response": pairs.responses[i]})
            for i in rows
        ]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n")
    raw = copy.deepcopy(_raw())
    raw["data"] = {
        "dataset": "instructions",
        "organisations": {n: str(f) for n, f in files.items()},
    }
    raw["federation"] |= {"rounds": 2, "centralized_baseline": True}
    result = run(RunConfig.from_dict(raw))
    assert [o.name for o in result.data.organisations] == ["org_a", "org_b", "org_c"]  # type: ignore[union-attr]
    assert result.dataset["synthetic"] is False
    prompts = [g["prompt"] for g in result.language_model["generations"]]  # type: ignore[attr-defined]
    assert prompts == [pairs.instructions[0], pairs.instructions[1], pairs.instructions[2]]
    assert _perplexities(result)[-1] < _base(result)
    baseline = result.centralized_baseline
    assert baseline is not None and baseline.perplexity < _base(result)


@pytest.mark.parametrize(
    ("data", "model", "message"),
    [
        ({"dataset": "vader_lexicon", "scaling": "none"}, {"name": "causal_lm"}, "instruction"),
        ({"dataset": "synthetic_instructions"}, {"name": "mlp"}, "name = 'causal_lm'"),
        ({"dataset": "instructions"}, {"name": "causal_lm"}, "organisations"),
        ({"dataset": "synthetic_instructions"}, {"name": "causal_lm", "loss": "squared"}, "loss"),
        (
            {"dataset": "synthetic_instructions", "scaling": "local"},
            {"name": "causal_lm"},
            "must not be scaled",
        ),
    ],
)
def test_causal_lm_config_refusals(
    data: dict[str, Any], model: dict[str, Any], message: str
) -> None:
    raw = {"name": "t", "data": data, "model": model, "federation": {"clients": 3, "rounds": 1}}
    with pytest.raises((ConfigError, ValueError), match=message):
        RunConfig.from_dict(raw)


def test_causal_lm_runs_in_simulation_only() -> None:
    raw = {
        "name": "t",
        "mode": "deployment",
        "data": {"dataset": "synthetic_instructions"},
        "model": {"name": "causal_lm"},
        "federation": {"clients": 3, "rounds": 1},
    }
    with pytest.raises(ConfigError, match="mode = 'simulation'"):
        RunConfig.from_dict(raw)


def test_the_report_shows_the_language_model_section() -> None:
    result = {
        "name": "lm",
        "final": {"perplexity": 2.5},
        "language_model": {
            "model_dir": "tiny",
            "max_length": 24,
            "base": {"perplexity": 6000.0, "token_accuracy": 0.01},
            "generations": [{"prompt": "What is <b>?", "output": "x & y"}],
        },
    }
    html = render_report(result)
    assert "Language model" in html and "6000" in html
    assert "What is &lt;b&gt;?" in html and "x &amp; y" in html  # escaped
