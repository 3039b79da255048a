"""Upper limits: a value no sane run reaches is refused in one line that names the limit and
why it exists, while every shipped example stays within them."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import EXAMPLES
from veil.config import load_config
from veil.config.deployment import MAX_WAIT_S
from veil.config.federation import MAX_BATCH_SIZE, MAX_CLIENTS, MAX_LOCAL_EPOCHS, MAX_ROUNDS
from veil.config.model import MAX_HIDDEN_LAYERS, MAX_HIDDEN_WIDTH
from veil.errors import ConfigError

BASE = """
[data]
dataset = "breast_cancer"
{data}
[model]
{model}
[federation]
{federation}
[deployment]
{deployment}
[ray]
{ray}
"""


def config(tmp_path: Path, **tables: str) -> Path:
    """A small valid config with `tables` (TOML lines by table name) added to their tables."""
    names = ("data", "model", "federation", "deployment", "ray")
    filled = {name: tables.get(name, "") for name in names}
    for key, default in (("clients", 3), ("rounds", 2)):
        if f"{key} =" not in filled["federation"]:
            filled["federation"] += f"\n{key} = {default}"
    path = tmp_path / "run.toml"
    path.write_text(BASE.format(**filled))
    return path


def refusal(tmp_path: Path, **tables: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config(tmp_path, **tables))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_trillion_rounds_is_refused_naming_the_limit(tmp_path: Path) -> None:
    message = refusal(tmp_path, federation="rounds = 1000000000000")
    assert "federation.rounds = 1000000000000" in message
    assert f"above the limit of {MAX_ROUNDS:,} rounds a run may plan" in message
    assert "lower rounds" in message


@pytest.mark.parametrize(
    ("table", "setting", "key", "limit"),
    [
        ("federation", f"clients = {MAX_CLIENTS + 1}", "federation.clients", MAX_CLIENTS),
        ("federation", f"local_epochs = {MAX_LOCAL_EPOCHS + 1}", "local_epochs", MAX_LOCAL_EPOCHS),
        ("federation", f"batch_size = {MAX_BATCH_SIZE + 1}", "batch_size", MAX_BATCH_SIZE),
        ("model", f"hidden = [64, {MAX_HIDDEN_WIDTH + 1}]", "hidden", MAX_HIDDEN_WIDTH),
        ("model", f"hidden = {[8] * (MAX_HIDDEN_LAYERS + 1)}", "hidden", MAX_HIDDEN_LAYERS),
        ("model", "hidden = [8192, 8192, 8192]", "hidden", 2**26),
        ("model", 'name = "cnn"\nchannels = [16, 2048]', "channels", 1024),
        ("model", 'name = "cnn"\nchannels = [4, 4, 4, 4, 4, 4, 4, 4, 4]', "channels", 8),
        ("model", "[model.lora]\nrank = 5000", "lora.rank", 4096),
        ("deployment", "timeout_s = 1e300", "deployment.timeout_s", MAX_WAIT_S),
        ("deployment", f"round_deadline_s = {MAX_WAIT_S + 1}", "round_deadline_s", MAX_WAIT_S),
        ("ray", "workers = 1000000", "ray.workers", 10_000),
        ("data", "max_classes = 1000000", "data.max_classes", 100_000),
    ],
)
def test_each_limit_is_refused_naming_it(
    tmp_path: Path, table: str, setting: str, key: str, limit: int
) -> None:
    message = refusal(tmp_path, **{table: setting})
    assert key in message
    assert f"{limit:,}" in message or str(limit) in message


def test_the_limits_themselves_are_accepted(tmp_path: Path) -> None:
    loaded = load_config(
        config(
            tmp_path,
            federation=f"rounds = {MAX_ROUNDS}\nlocal_epochs = {MAX_LOCAL_EPOCHS}\n"
            f"batch_size = {MAX_BATCH_SIZE}",
            model=f"hidden = [{MAX_HIDDEN_WIDTH}, {MAX_HIDDEN_WIDTH}]",
            deployment=f"timeout_s = {MAX_WAIT_S}",
        )
    )
    assert loaded.federation.rounds == MAX_ROUNDS
    assert loaded.model.hidden == [MAX_HIDDEN_WIDTH, MAX_HIDDEN_WIDTH]


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_is_within_the_limits(example: Path) -> None:
    assert load_config(example).federation.rounds <= MAX_ROUNDS
