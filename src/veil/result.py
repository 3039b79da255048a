"""The result of a run: the `result.json` contract of DESIGN.md §4, as typed models.

`Result.model_validate_json(text)` checks a `result.json` written by any version of Veil; extra
fields are allowed so that later capabilities can add to it without breaking readers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class RoundResult(_Open):
    round: int
    #: Clients whose update was aggregated.
    clients: int
    #: Selected clients whose update was not aggregated (dropped out, too late, or refused).
    dropped: int
    #: Clients selected for the round (clients + dropped).
    selected: int = 0
    metrics: dict[str, float]
    epsilon: float | None = None
    applied: bool = True
    bytes_up: int = 0
    bytes_down: int = 0
    duration_s: float = 0.0
    failures: list[dict[str, str]] = []
    #: What the aggregator reported: under SecAgg the protocol, threshold, clipped values,
    #: recovered dropouts (and "error" when the sum could not be unmasked).
    aggregation: dict[str, Any] = {}


class Mechanism(_Open):
    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    steps: int


class PrivacyRecord(_Open):
    unit: Literal["record", "client"] | None = None
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    aggregation: Literal["plain", "secagg", "ckks", "tee"] = "plain"
    attestation: str | None = None
    mechanism: Mechanism | None = None


class Communication(_Open):
    bytes_up: int
    bytes_down: int


class Timing(_Open):
    total_s: float


class Baseline(_Open):
    accuracy: float


class Result(_Open):
    """What `veil.run` returns and `veil run` writes to `OUT/result.json`."""

    run_id: str
    name: str = ""
    mode: Literal["simulation", "deployment", "ray"]
    final: dict[str, float]
    centralized_baseline: Baseline | None = None
    rounds: list[RoundResult]
    privacy: PrivacyRecord
    communication: Communication
    timing: Timing
    strategy: str = ""
    clients: int = 0
    pipeline: list[str] = []
    dataset: dict[str, str | bool] = {}

    def to_json(self) -> str:
        """The JSON text of `result.json`."""
        return self.model_dump_json(indent=2) + "\n"
