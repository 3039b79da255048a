"""`veil run --mode` and `--secure-aggregation`: the same config, run or summed another way."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import EXAMPLES
from veil import cli
from veil.commands.run import run_config
from veil.config import load_config
from veil.deployment import load, prepare_deployment
from veil.errors import ConfigError

SECAGG_CONFIG = """\
name = "override"
seed = 1
secure_aggregation = "secagg"
[data]
dataset = "breast_cancer"
scaling = "none"
[federation]
clients = 3
rounds = 2
"""


def parsed(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(["run", *argv])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_secure_aggregation_overrides_only_that_key(tmp_path: Path) -> None:
    path = write(tmp_path, SECAGG_CONFIG)
    config = run_config(parsed(str(path), "--secure-aggregation", "plain"))
    assert config.secure_aggregation == "plain"
    rest = {**load_config(path).to_dict(), "secure_aggregation": "plain"}
    assert config.to_dict() == rest
    both = run_config(parsed(str(path), "--mode", "ray", "--secure-aggregation", "plain"))
    assert (both.mode, both.secure_aggregation) == ("ray", "plain")
    # A value equal to the file's changes nothing.
    assert run_config(parsed(str(path), "--secure-aggregation", "secagg")) == load_config(path)


def test_an_override_is_validated_with_the_rest_of_the_config(tmp_path: Path) -> None:
    # secagg hides updates, so it refuses the federated scaling that sends per-client sums.
    plain = SECAGG_CONFIG.replace('"secagg"', '"plain"').replace('"none"', '"federated"')
    path = write(tmp_path, plain)
    assert run_config(parsed(str(path))).data.scaling == "federated"
    with pytest.raises(ConfigError, match=r"data\.scaling = 'federated'.*'secagg'"):
        run_config(parsed(str(path), "--secure-aggregation", "secagg"))


def test_an_unused_section_is_reported_in_one_line_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The SecAgg example (one round) summed in the clear: its [secagg] section is kept for the
    # switch back, and `veil run` says once that it is unused.
    text = (EXAMPLES / "medical_diagnosis_secagg.toml").read_text()
    path = write(tmp_path, text.replace("rounds = 20", "rounds = 1"))
    out = tmp_path / "out"
    argv = ["run", str(path), "--secure-aggregation", "plain", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err == "veil: warning: [secagg] is unused with secure_aggregation = 'plain'\n"
    assert json.loads((out / "result.json").read_text())["privacy"]["aggregation"] == "plain"


@pytest.mark.parametrize("mode", [None, "deployment"])
def test_a_deployment_passes_the_override_to_every_process_it_starts(
    tmp_path: Path, mode: str | None
) -> None:
    text = SECAGG_CONFIG if mode else SECAGG_CONFIG.replace("seed = 1", 'mode = "deployment"')
    path = write(tmp_path, text)
    argv = [str(path), *(["--mode", mode] if mode else [])]
    config = run_config(parsed(*argv, "--secure-aggregation", "plain"))
    assert (config.mode, config.secure_aggregation) == ("deployment", "plain")
    files = prepare_deployment(config, tmp_path / "out", config_path=path)
    server_args = files.server_args()
    assert server_args[server_args.index("--secure-aggregation") + 1] == "plain"
    for name in files.clients:
        client_args = files.client_args(name, "127.0.0.1:1")
        assert client_args[client_args.index("--secure-aggregation") + 1] == "plain"
    # What `veil server` / `veil client` then run: the file's config with the override applied.
    assert load(path, secure_aggregation="plain").secure_aggregation == "plain"
    assert load(path).secure_aggregation == "secagg"
    # The file's own value is no override: the command lines stay as they were.
    same = prepare_deployment(
        run_config(parsed(*argv, "--secure-aggregation", "secagg")),
        tmp_path / "same",
        config_path=path,
    )
    assert "--secure-aggregation" not in same.server_args()


@pytest.mark.slow
def test_a_secagg_config_deployed_in_the_clear_with_one_flag(tmp_path: Path) -> None:
    """The coordinator and every member are real processes; a member whose config disagreed
    with the coordinator's would be refused at join, so a finished run shows each got it."""
    path = write(tmp_path, SECAGG_CONFIG)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "run", str(path), "--mode", "deployment",
         "--secure-aggregation", "plain", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["privacy"]["aggregation"] == "plain" and result["mode"] == "deployment"
    assert [r["clients"] for r in result["rounds"]] == [3, 3]


def test_unknown_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli._parser().parse_args(["run", "x.toml", "--secure-aggregation", "secagg+"])
    assert exit.value.code == 2
    assert "invalid choice: 'secagg+'" in capsys.readouterr().err


def test_override_reaches_the_run_and_its_record(tmp_path: Path) -> None:
    path = write(tmp_path, SECAGG_CONFIG)
    out = tmp_path / "out"
    veil = [sys.executable, "-m", "veil.cli"]
    proc = subprocess.run(
        [*veil, "run", str(path), "--out", str(out), "--quiet", "--secure-aggregation", "plain"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["privacy"]["aggregation"] == "plain"
    assert "secure_aggregation" not in result["privacy"]  # no SecAgg parameters: none ran
    shown = subprocess.run(
        [*veil, "runs", "show", result["run_id"], "--store", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["config"]["secure_aggregation"] == "plain"
