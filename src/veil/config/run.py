"""`RunConfig`, the whole run, and `load_config`, which reads one from a TOML file.

Two top-level keys choose how a run executes: `mode` (in one process, as real processes, or on
Ray) and `secure_aggregation` (how the clients' updates are summed); everything else lives in
sections. Each section validates its own keys, then checks itself against the rest of the run
(`Section.check_in`) in a fixed order, so the first broken rule is the one reported. The
settings of a secure-aggregation backend the run does not use are kept (one line switches the
run back) and reported by `RunConfig.unused_sections`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from veil.config.compression import CompressionConfig
from veil.config.data import DataConfig
from veil.config.deployment import CheckpointConfig, DeploymentConfig
from veil.config.federation import (
    STRATEGY_NAMES,
    FedAvgConfig,
    FederationConfig,
    StrategyConfig,
)
from veil.config.model import ModelConfig
from veil.config.privacy import PrivacyConfig
from veil.config.robustness import (
    AttackConfig,
    RayConfig,
    RobustConfig,
    StragglerConfig,
)
from veil.config.sections import Section, one_line
from veil.config.secure_aggregation import (
    BACKEND_SECTIONS,
    CkksConfig,
    SecAggConfig,
    TeeConfig,
)
from veil.errors import ConfigError

Mode = Literal["simulation", "deployment", "ray"]
#: The built-in secure-aggregation backends; `secure_aggregation` also takes the name of a
#: backend registered with `veil.assembly.secure_aggregation.registry.register`.
Aggregation = Literal["plain", "secagg", "ckks", "tee"]

#: What this version can execute; the other values of the contract are refused with a message.
IMPLEMENTED_MODES: tuple[str, ...] = ("simulation", "deployment", "ray")

#: The keys of `load_config`'s tables that hold paths relative to the config file.
_RELATIVE_PATHS: tuple[tuple[str, str], ...] = (
    ("data", "path"),
    ("data", "schema_file"),
    ("data", "test_file"),
    ("privacy", "ledger"),
    ("checkpoint", "key_file"),
    ("model", "model_dir"),
)


#: The order in which the sections check themselves against the run (the first rule broken is
#: the one reported); "secure_aggregation" stands for the section of the backend the run uses.
_CHECK_ORDER: tuple[str, ...] = (
    "federation",
    "privacy",
    "secure_aggregation",
    "attack",
    "stragglers",
    "ray",
    "robust",
    "model",
    "data",
    "compression",
)


class RunConfig(Section):
    """Everything one federated run needs. Build it in code or load it with `load_config`."""

    name: str = Field("veil-run", min_length=1)
    mode: Mode = "simulation"
    secure_aggregation: str = "plain"
    seed: int = Field(0, ge=0, lt=2**63)
    data: DataConfig
    model: ModelConfig = ModelConfig()
    federation: FederationConfig
    strategy: StrategyConfig = FedAvgConfig()
    privacy: PrivacyConfig | None = None
    secagg: SecAggConfig | None = None
    ckks: CkksConfig | None = None
    tee: TeeConfig | None = None
    deployment: DeploymentConfig = DeploymentConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    robust: RobustConfig | None = None
    attack: AttackConfig | None = None
    stragglers: StragglerConfig | None = None
    ray: RayConfig = RayConfig()
    compression: CompressionConfig | None = None

    @model_validator(mode="after")
    def _fits_together(self) -> RunConfig:
        if self.mode not in IMPLEMENTED_MODES:
            raise ValueError(
                f"mode = '{self.mode}' is not available in this version of Veil; "
                f"use one of {list(IMPLEMENTED_MODES)}"
            )
        # The registry decides which names exist (built-ins, and backends registered in code).
        from veil.assembly.secure_aggregation.registry import names

        if self.secure_aggregation not in names():
            raise ValueError(
                f"secure_aggregation = '{self.secure_aggregation}' is not available in this "
                f"version of Veil; use one of {list(names())}"
            )
        for section in self._sections_to_check():
            section.check_in(self)
        return self

    def _sections_to_check(self) -> Iterator[Section]:
        for name in _CHECK_ORDER:
            if name == "secure_aggregation":
                section = self.aggregation_settings()
            else:
                section = getattr(self, name)
            if section is not None:
                yield section

    def aggregation_settings(self) -> Section | None:
        """The settings of the secure-aggregation backend this run uses: its section, or the
        section's defaults when the config has none; None for "plain", which has no settings."""
        kind = self.secure_aggregation
        section = BACKEND_SECTIONS.get(kind)
        if section is None:
            return None
        given = getattr(self, kind)
        return given if isinstance(given, section) else section()

    def unused_sections(self) -> list[str]:
        """One line for each section this run does not use: the settings of a secure-aggregation
        backend other than `secure_aggregation`, which are kept (so that changing that one line
        switches the run back) and otherwise ignored."""
        return [
            f"[{name}] is unused with secure_aggregation = '{self.secure_aggregation}'"
            for name in BACKEND_SECTIONS
            if name != self.secure_aggregation and getattr(self, name) is not None
        ]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> RunConfig:
        """Validate a mapping (e.g. parsed TOML); raise `ConfigError` with a one-line message."""
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise ConfigError(f"{source}: {one_line(exc, cls, STRATEGY_NAMES)}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping that `from_dict` accepts again."""
        return self.model_dump(mode="json", exclude_none=True)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run config.

    A relative `[data].path` is resolved against the config file's folder. Every problem (missing
    file, TOML syntax, unknown key, wrong type, impossible value) raises `ConfigError` with one line
    that names the key and what is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'; pass the path of a TOML run config")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; a run config is TOML text") from None
    for section, key in _RELATIVE_PATHS:
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            table[key] = str((path.parent / Path(table[key]).expanduser()).resolve())
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("organisations"), dict):
        data["organisations"] = {
            name: str((path.parent / Path(file).expanduser()).resolve())
            if isinstance(file, str)
            else file
            for name, file in data["organisations"].items()
        }
    return RunConfig.from_dict(raw, source=str(path))
