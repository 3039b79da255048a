"""One line switches a run: the settings of a secure-aggregation backend the run does not use are
kept and reported in one line each, and the run goes on; unknown keys and wrong values in them
are still refused, and the section's rules apply only when its backend runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import EXAMPLES
from veil.config import RunConfig, load_config
from veil.errors import ConfigError

MINIMAL = """
[data]
dataset = "breast_cancer"
scaling = "none"
[federation]
clients = 3
rounds = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("backend", ["secagg", "ckks"])
def test_an_example_summed_in_the_clear_reports_its_unused_section(backend: str) -> None:
    example = load_config(EXAMPLES / f"medical_diagnosis_{backend}.toml")
    assert example.unused_sections() == []
    plain = RunConfig.from_dict({**example.to_dict(), "secure_aggregation": "plain"})
    assert plain.unused_sections() == [f"[{backend}] is unused with secure_aggregation = 'plain'"]
    # The section is kept, not serialised as a warning, and the same line switches back.
    assert "unused_sections" not in plain.to_dict()
    assert getattr(plain, backend) == getattr(example, backend)
    back = RunConfig.from_dict({**plain.to_dict(), "secure_aggregation": backend})
    assert back == example


@pytest.mark.parametrize("backend", ["secagg", "ckks"])
def test_changing_the_line_in_the_file_is_enough(tmp_path: Path, backend: str) -> None:
    text = (EXAMPLES / f"medical_diagnosis_{backend}.toml").read_text()
    line = f'secure_aggregation = "{backend}"'
    assert text.count(line) == 1
    config = load_config(write(tmp_path, text.replace(line, 'secure_aggregation = "plain"')))
    assert config.secure_aggregation == "plain"
    assert config.unused_sections() == [f"[{backend}] is unused with secure_aggregation = 'plain'"]


def test_every_unused_backend_section_gets_its_own_line(tmp_path: Path) -> None:
    text = 'secure_aggregation = "ckks"\n' + MINIMAL + "[secagg]\n[ckks]\n[tee]\n"
    config = load_config(write(tmp_path, text))
    assert config.unused_sections() == [
        "[secagg] is unused with secure_aggregation = 'ckks'",
        "[tee] is unused with secure_aggregation = 'ckks'",
    ]


def test_an_unused_section_is_not_checked_against_the_run(tmp_path: Path) -> None:
    # Three neighbours among three selected clients is refused when SecAgg runs ...
    text = MINIMAL + "[secagg]\nneighbours = 3\n"
    with pytest.raises(ConfigError, match=r"secagg\.neighbours = 3 must be below the 3 clients"):
        load_config(write(tmp_path, 'secure_aggregation = "secagg"\n' + text))
    # ... and only reported when the run sums in the clear; so is [tee] without consent.
    config = load_config(write(tmp_path, text + "[tee]\n"))
    assert len(config.unused_sections()) == 2


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("[secagg]\nepsilon = 1.0\n", "unknown key 'secagg.epsilon' in [secagg]; allowed keys"),
        ("[ckks]\ndecryptors = 0\n", "ckks.decryptors = 0"),
        ("[ckks]\ncoeff_modulus_bits = [60]\n", "coeff_modulus_bits needs at least two primes"),
        ('[tee]\nbackend = "sgx"\n', "tee.backend = 'sgx'"),
    ],
    ids=["unknown-key", "wrong-value", "own-rule", "unknown-backend"],
)
def test_an_unused_section_still_refuses_unknown_keys_and_wrong_values(
    tmp_path: Path, section: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + section))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_rules_that_protect_updates_still_refuse(tmp_path: Path) -> None:
    # Not an unused section: [robust] would need to see the updates that SecAgg hides.
    text = 'secure_aggregation = "secagg"\n' + MINIMAL + '[robust]\nmethod = "median"\n'
    with pytest.raises(ConfigError, match=r"\[robust\] needs the server to see each update"):
        load_config(write(tmp_path, text))


def test_server_and_client_say_it_once_as_they_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `veil server` and `veil client` both read their config through `deployment.load`.
    from veil.deployment import load

    config = load(write(tmp_path, MINIMAL + "[ckks]\ndecryptors = 3\n"))
    assert config.mode == "deployment" and config.ckks is not None
    err = capsys.readouterr().err
    assert err == "veil: warning: [ckks] is unused with secure_aggregation = 'plain'\n"
