"""Run configuration: valid configs load; every invalid one gives one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import EXAMPLES
from veil.config import FedOptConfig, FedProxConfig, RunConfig, load_config
from veil.errors import ConfigError

MINIMAL = """
[data]
dataset = "breast_cancer"
[federation]
clients = 3
rounds = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_load(example: Path) -> None:
    config = load_config(example)
    assert config.federation.rounds >= 1
    assert config.mode in ("simulation", "deployment", "ray")  # all run with `veil run`


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.strategy.name == "fedavg"
    assert config.secure_aggregation == "plain"
    assert config.data.partition.kind == "iid"
    assert RunConfig.from_dict(config.to_dict()) == config


def test_strategy_sections_select_their_model(tmp_path: Path) -> None:
    prox = load_config(write(tmp_path, MINIMAL + '[strategy]\nname = "fedprox"\nmu = 0.1\n'))
    assert isinstance(prox.strategy, FedProxConfig) and prox.strategy.mu == 0.1
    yogi = load_config(write(tmp_path, MINIMAL + '[strategy]\nname = "fedyogi"\n'))
    assert isinstance(yogi.strategy, FedOptConfig) and yogi.strategy.name == "fedyogi"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("clients = 3", "clients = 0", "federation.clients = 0"),
        ("rounds = 2", 'rounds = "two"', "federation.rounds = 'two'"),
        ("rounds = 2", "rounds = 2\nfraction_fit = 1.5", "federation.fraction_fit = 1.5"),
        ("rounds = 2", "rounds = 2\nroundz = 3", "unknown key 'federation.roundz'"),
        ('dataset = "breast_cancer"', 'dataset = "mnist"', "data.dataset = 'mnist'"),
        ("rounds = 2", "rounds = 2\nmin_clients = 5", "min_clients = 5 exceeds clients = 3"),
        (
            "[federation]",
            "[secagg]\nepsilon = 1.0\n[federation]",
            "unknown key 'secagg.epsilon' in [secagg]; allowed keys: clip_range",
        ),
        ("clients = 3", "clients = 3\nclients = 4", "invalid TOML"),
        ("[federation]", '[strategy]\nname = "scaffold"\n[federation]', "use one of 'fedavg'"),
        ("[federation]", '[model]\nname = "logistic"\nhidden = [8]\n[federation]', "hidden"),
    ],
    ids=[
        "zero-clients",
        "wrong-type",
        "fraction",
        "unknown-key",
        "dataset",
        "min-clients",
        "reserved",
        "toml-syntax",
        "strategy-name",
        "unused-model-key",
    ],
)
def test_invalid_configs_give_one_line_naming_the_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in MINIMAL
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL.replace(old, new)))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_the_allowed_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"allowed keys: .*learning_rate"):
        load_config(write(tmp_path, MINIMAL + "learnin_rate = 0.1\n"))


def test_missing_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing required key 'federation'"):
        load_config(write(tmp_path, '[data]\ndataset = "digits"\n'))


def test_tee_with_development_evidence_needs_explicit_consent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no hardware root of trust.*allow_insecure_dev"):
        load_config(write(tmp_path, 'secure_aggregation = "tee"\n' + MINIMAL))


def test_cnn_needs_images(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cnn.*digits"):
        load_config(write(tmp_path, MINIMAL + '[model]\nname = "cnn"\n'))


def test_missing_csv_names_the_path_relative_to_the_config(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'dataset = "breast_cancer"', 'dataset = "csv"\npath = "no/such.csv"\ntarget = "y"'
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "no/such.csv" in str(info.value)
    assert str(tmp_path / "no" / "such.csv") in str(info.value)


def test_csv_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "table.csv").write_text("a,b,y\n1,2,0\n3,4,1\n")
    text = MINIMAL.replace(
        'dataset = "breast_cancer"', 'dataset = "csv"\npath = "table.csv"\ntarget = "y"'
    )
    config = load_config(write(tmp_path, text))
    assert config.data.path == tmp_path / "table.csv"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")
