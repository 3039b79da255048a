"""Ray is an optional extra: without it, mode = "ray" says how to install it, before any work."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from veil.config import RunConfig
from veil.errors import UserError
from veil.run import run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "medical_diagnosis_ray.toml"


def test_mode_ray_without_ray_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    config = RunConfig.from_dict(tomllib.loads(EXAMPLE.read_text()))
    with pytest.raises(UserError, match=r"pip install 'veil\[ray\]'"):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before the run folder was touched
