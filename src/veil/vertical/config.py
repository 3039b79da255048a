"""The config of a vertical run (`veil vertical train CONFIG`): a TOML file of its own, not a
`RunConfig`, because a vertical run has parties with different columns instead of clients.

    name = "vertical-credit"
    model = "logistic"            # or "split", "secureboost"
    [data]                        # German credit split between a bank and a payment company
    bank_fraction = 0.85
    payment_fraction = 0.8
    test_fraction = 0.25
    seed = 0
    [psi]
    reveal = "intersection"       # the bank learns the common ids ("size": only their number)
    [logistic]                    # Hardy et al. 2017 under Paillier
    epochs = 5
    [split]                       # split learning, optional DP
    epochs = 30
    [secureboost]                 # SecureBoost trees (Cheng et al. 2021) under Paillier
    trees = 10
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from veil.errors import ConfigError

__all__ = ["VerticalConfig", "load_vertical_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VerticalData(_Section):
    """German credit, column-split; each party holds a random fraction of the customers."""

    dataset: Literal["german_credit"] = "german_credit"
    bank_fraction: float = Field(0.85, gt=0, le=1)
    payment_fraction: float = Field(0.8, gt=0, le=1)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 0


class VerticalPsi(_Section):
    """Who learns what in PSI: the bank (designated) learns the intersection, or only its size
    (then no training is possible: the run stops after PSI)."""

    reveal: Literal["intersection", "size"] = "intersection"


class VerticalLogistic(_Section):
    """`veil.vertical.logistic.LRSettings`, plus the Paillier key size (>= 2048 bits)."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.1, gt=0)
    l2: float = Field(1e-3, ge=0)
    tolerance: float = Field(1e-4, ge=0)
    key_bits: int = Field(2048, ge=2048)


class VerticalSplit(_Section):
    """`veil.vertical.split.SplitSettings` (noise multipliers of 0 turn DP off)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.01, gt=0)
    embedding_dim: int = Field(4, ge=1)
    hidden: int = Field(16, ge=1)
    embedding_noise: float = Field(0.0, ge=0)
    embedding_clip: float = Field(1.0, gt=0)
    gradient_noise: float = Field(0.0, ge=0)
    gradient_clip: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class VerticalSecureBoost(_Section):
    """`veil.vertical.boosting.BoostSettings` (binary objective), plus the bank's Paillier key
    size (>= 2048 bits)."""

    trees: int = Field(10, ge=1)
    max_depth: int = Field(3, ge=1)
    bins: int = Field(32, ge=2, le=256)
    learning_rate: float = Field(0.3, gt=0, le=1)
    reg_lambda: float = Field(1.0, ge=0)
    min_child_weight: float = Field(1.0, ge=0)
    gamma: float = Field(0.0, ge=0)
    first_tree_active_only: bool = False
    key_bits: int = Field(2048, ge=2048)


class VerticalConfig(_Section):
    """A vertical run: PSI, then one model trained across the two parties."""

    name: str = "vertical"
    model: Literal["logistic", "split", "secureboost"] = "logistic"
    data: VerticalData = VerticalData()
    psi: VerticalPsi = VerticalPsi()
    logistic: VerticalLogistic = VerticalLogistic()
    split: VerticalSplit = VerticalSplit()
    secureboost: VerticalSecureBoost = VerticalSecureBoost()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> VerticalConfig:
        """Validate; ConfigError with one line naming the key otherwise."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_one_line(exc)}") from None


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{key}'; see docs/vertical.md for the keys of a vertical run"
    else:
        msg = f"{key} = {first.get('input')!r}: {first['msg']}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more)"
    return msg


def load_vertical_config(path: str | Path) -> VerticalConfig:
    """Read and validate a vertical-run TOML file; ConfigError if missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'; pass a vertical run config (TOML)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return VerticalConfig.from_dict(raw, source=str(path))
