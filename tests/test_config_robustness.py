"""Config sections [robust], [attack], [stragglers] and [ray]: what loads, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.config import load_config
from veil.errors import ConfigError

MINIMAL = """
[data]
dataset = "breast_cancer"
scaling = "bounds"
[federation]
clients = 10
rounds = 2
"""


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_config(path)


def refused(tmp_path: Path, text: str, expected: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message
    return message


def test_robust_attack_stragglers_and_ray_sections_load(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'mode = "ray"\n'
        + MINIMAL
        + '[robust]\nmethod = "multi_krum"\nbyzantine = 2\nkeep = 6\nmax_update_norm = 5.0\n'
        + '[attack]\nkind = "sign_flip"\nfraction = 0.2\nscale = 4.0\n'
        + "[stragglers]\ndeadline_s = 2.0\nspeed_spread = 1.0\n"
        + "[ray]\nworkers = 2\nnum_cpus = 0.5\nclients_per_task = 4\n",
    )
    assert config.mode == "ray"
    assert config.robust is not None and config.robust.byzantine == 2
    assert config.attack is not None and config.attack.scale == 4.0
    assert config.stragglers is not None and config.stragglers.seconds_per_example == 0.001
    assert config.ray.workers == 2 and config.ray.address is None


@pytest.mark.parametrize("aggregation", ["secagg", "ckks"])
def test_robust_aggregation_is_refused_where_updates_are_hidden(
    tmp_path: Path, aggregation: str
) -> None:
    message = refused(
        tmp_path,
        f'secure_aggregation = "{aggregation}"\n' + MINIMAL + '[robust]\nmethod = "median"\n',
        f"[robust] needs the server to see each update, which secure_aggregation = "
        f"'{aggregation}' hides",
    )
    assert "use secure_aggregation = 'plain'" in message


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ('[robust]\nmethod = "krum"\n', "method = 'krum' needs byzantine"),
        ('[robust]\nmethod = "median"\nbyzantine = 1\n', "byzantine applies to method = 'krum'"),
        ('[robust]\nmethod = "median"\ntrim_fraction = 0.1\n', "trim_fraction applies"),
        ('[robust]\nmethod = "krum"\nbyzantine = 1\nkeep = 3\n', "keep applies to method"),
        ('[robust]\nmethod = "trimmed_mean"\ntrim_fraction = 0.5\n', "robust.trim_fraction = 0.5"),
        ('[robust]\nmethod = "mean"\n', "method = 'mean' without max_update_norm"),
        ('[robust]\nmethod = "geomed"\n', "robust.method = 'geomed'"),
        (
            '[robust]\nmethod = "multi_krum"\nbyzantine = 4\n',
            "byzantine = 4 needs at least 11 clients per round (n > 2f + 2), and 10 are selected",
        ),
        (
            '[robust]\nmethod = "multi_krum"\nbyzantine = 2\nkeep = 9\n',
            "robust.keep = 9 exceeds the 10 selected clients less byzantine = 2",
        ),
        ('[attack]\nkind = "sign_flip"\nfraction = 0.05\n', "makes no client malicious"),
        ('[attack]\nkind = "label_flip"\nfraction = 0.2\nscale = 2.0\n', "scale does not apply"),
        ('[attack]\nkind = "backdoor"\nfraction = 0.2\n', "attack.kind = 'backdoor'"),
        ("[stragglers]\ndeadline_s = 0\n", "stragglers.deadline_s = 0"),
        ('[ray]\naddress = "auto"\nlocal_cpus = 2\n', "local_cpus and object_store_mb configure"),
        ("[ray]\nworker = 2\n", "unknown key 'ray.worker' in [ray]; allowed keys: address"),
    ],
    ids=[
        "krum-needs-f",
        "f-for-median",
        "trim-for-median",
        "keep-for-krum",
        "trim-half",
        "mean-alone",
        "unknown-method",
        "krum-too-few",
        "keep-too-many",
        "no-attacker",
        "label-flip-scale",
        "unknown-attack",
        "zero-deadline",
        "ray-local-keys",
        "ray-typo",
    ],
)
def test_invalid_sections_give_one_line(tmp_path: Path, sections: str, expected: str) -> None:
    refused(tmp_path, MINIMAL + sections, expected)


def test_robust_aggregation_is_refused_with_client_level_dp(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace("rounds = 2", "rounds = 2\nfraction_evaluate = 0.0")
        + '[privacy]\nunit = "client"\nepsilon = 5.0\ndelta = 1e-5\n'
        + '[robust]\nmethod = "median"\n'
    )
    refused(tmp_path, text, "[robust] is not available with client-level [privacy]")


@pytest.mark.parametrize(
    "section", ['[attack]\nkind = "scale"\nfraction = 0.2\n', "[stragglers]\ndeadline_s = 1.0\n"]
)
def test_simulated_attacks_and_stragglers_are_refused_in_deployment(
    tmp_path: Path, section: str
) -> None:
    message = refused(
        tmp_path, 'mode = "deployment"\n' + MINIMAL + section, "mode = 'simulation' or 'ray'"
    )
    assert "applies" in message or "simulates" in message


@pytest.mark.parametrize(
    ("top", "sections", "expected"),
    [
        ('secure_aggregation = "secagg"\n', "", "'secagg' is not available with mode = 'ray'"),
        (
            "",
            '[privacy]\nunit = "record"\nepsilon = 5.0\ndelta = 1e-5\n',
            "record-level [privacy] is not available with mode = 'ray'",
        ),
    ],
    ids=["secagg", "record-dp"],
)
def test_what_ray_mode_does_not_run_is_refused(
    tmp_path: Path, top: str, sections: str, expected: str
) -> None:
    text = (
        'mode = "ray"\n'
        + top
        + MINIMAL.replace("rounds = 2", "rounds = 2\nfraction_evaluate = 0.0")
        + sections
    )
    refused(tmp_path, text, expected)
