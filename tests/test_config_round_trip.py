"""`RunConfig.to_dict` is accepted again by `RunConfig.from_dict` and gives the same config:
`veil run CONFIG --rounds N` (and a deployment's per-member config) rebuild a config from its
dump with overrides, so a dump the validators refuse would break every override of it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from support import EXAMPLES
from veil.config import RunConfig, load_config
from veil.errors import ConfigError

CONFIGS = sorted(p for p in EXAMPLES.rglob("*.toml") if "[data]" in p.read_text())


def _loadable(path: Path) -> RunConfig | None:
    try:
        return load_config(path)
    except ConfigError:
        return None  # vertical FL configs, and site jobs whose data each site supplies


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_survives_its_own_dump(path: Path) -> None:
    config = _loadable(path)
    if config is None:
        pytest.skip(f"{path.name} is not a config `veil run` loads as it is")
    again = RunConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_keys_refused_when_changed_are_accepted_at_their_defaults() -> None:
    # int8 compression dumps topk's default fraction; a trees run with [secagg] dumps SecAgg's
    # default clip_range and max_weight, which the trees set themselves.
    trees = tomllib.loads((EXAMPLES / "credit_trees.toml").read_text())
    trees["secure_aggregation"] = "secagg"
    trees["secagg"] = {"threshold": 3}
    for raw in (
        tomllib.loads((EXAMPLES / "llm_lora.toml").read_text()),
        trees,
    ):
        config = RunConfig.from_dict(raw)
        assert RunConfig.from_dict(config.to_dict()) == config
    # Changed, they are still refused.
    with pytest.raises(ConfigError, match="fraction applies to kind = 'topk'"):
        RunConfig.from_dict({**trees, "compression": {"kind": "int8", "fraction": 0.5}})
    with pytest.raises(ConfigError, match="sets \\[secagg\\] clip_range and max_weight itself"):
        RunConfig.from_dict({**trees, "secagg": {"threshold": 3, "clip_range": 3.0}})
