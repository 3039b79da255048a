"""The result of a run: the `result.json` contract (docs/results.md), as typed models.

`Result.model_validate_json(text)` checks a `result.json` written by any version of Veil; extra
fields are allowed so that later capabilities can add to it without breaking readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The result file of a run folder.
RESULT_FILE = "result.json"


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
    #: The first `LISTED_FAILURES` failed clients with their reasons (the run store keeps these).
    failures: list[dict[str, str]] = []
    #: All failures of the round counted by kind (the reason up to its first colon).
    failure_counts: dict[str, int] = {}
    #: What the aggregator reported: under SecAgg the protocol, threshold, clipped values,
    #: recovered dropouts (and "error" when the sum could not be unmasked).
    aggregation: dict[str, Any] = {}


#: Failed clients listed one by one per round; the others are only counted, so that a round of
#: 10 000 clients with many stragglers stays small in result.json and in the run store.
LISTED_FAILURES = 20


def compact_failures(failures: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """`RoundResult.failures` and `failure_counts` for a round's (client, reason) pairs."""
    counts: dict[str, int] = {}
    for _, reason in failures:
        kind = reason.split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return {
        "failures": [{"client": c, "reason": r} for c, r in failures[:LISTED_FAILURES]],
        "failure_counts": counts,
    }


class Mechanism(_Open):
    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    steps: int


def _absent(value: object) -> bool:
    return value is None


class PrivacyRecord(_Open):
    """What a run guarantees and how it aggregated. The differential-privacy policy fills the
    first fields (and adds its accounting as further keys); the secure-aggregation backend its
    own entry (`veil.assembly.secure_aggregation.base.Session.record`), left out of the JSON
    when the backend has none."""

    unit: Literal["record", "client"] | None = None
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    #: The secure-aggregation backend's name (`secure_aggregation`): a built-in ("plain",
    #: "secagg", "ckks", "tee") or a registered one.
    aggregation: str = "plain"
    attestation: str | None = None
    mechanism: Mechanism | None = None
    #: Under SecAgg: protocol, threshold, neighbours, modulus, encoding bounds, identities.
    secure_aggregation: dict[str, Any] | None = Field(default=None, exclude_if=_absent)
    #: Under CKKS: the scheme's parameters, key id, who holds which key, the threat.
    homomorphic_encryption: dict[str, Any] | None = Field(default=None, exclude_if=_absent)
    #: Under attested aggregation: backend, measurement, policy, TLS key binding.
    tee: dict[str, Any] | None = Field(default=None, exclude_if=_absent)


class Communication(_Open):
    """Bytes moved in the run; `update_bytes_per_client` is one client's upload of an update
    (after compression or masking), `bytes_up_per_client_round` the measured mean including
    protocol messages."""

    bytes_up: int
    bytes_down: int
    update_bytes_per_client: int | None = None
    bytes_up_per_client_round: float | None = None
    trainable_parameters: int | None = None
    model_parameters: int | None = None
    model_bytes_float32: int | None = None
    update_fraction_of_model: float | None = None
    compression: str = "none"


class Timing(_Open):
    total_s: float


class Baseline(_Open):
    """The pooled-data baseline's metrics on the held-out test set: `accuracy` (and loss, AUC)
    for classification; `loss`, `mse`, `mae` and `r2` for regression (extra fields), where
    `accuracy` is None. A result.json written before regression always has `accuracy`."""

    accuracy: float | None = Field(default=None, exclude_if=_absent)


class ClassMetrics(_Open):
    """One class of the held-out test set: the model's precision, recall and F1 on it, its
    number of test examples, and its one-vs-rest ROC AUC (None where undefined)."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int
    auc: float | None = None


class RocPoint(_Open):
    fpr: float
    tpr: float


class CalibrationBin(_Open):
    """One bin of predicted probability of the positive class: the mean prediction in it, the
    fraction of its examples that are positive, and how many examples it holds."""

    predicted: float
    observed: float
    count: int


class Classification(_Open):
    """The final model on the server's held-out test set, class by class (docs/results.md).

    `confusion_matrix[i][j]` counts test examples of class `classes[i]` predicted as
    `classes[j]`. `roc` and `calibration` are filled for two-class tasks only.
    """

    macro_f1: float
    weighted_f1: float
    classes: list[ClassMetrics]
    confusion_matrix: list[list[int]]
    #: Mean one-vs-rest AUC over the classes; None when some class's AUC is undefined.
    auc_ovr_macro: float | None = None
    roc: list[RocPoint] | None = None
    calibration: list[CalibrationBin] | None = None


class OrganisationData(_Open):
    """One organisation's data as the run saw it: its training and validation row counts and,
    where the run read a file for it, the file's name (never its path or contents)."""

    name: str
    rows: int
    validation_rows: int = 0
    file: str | None = None


class DataRecord(_Open):
    """Which data a run trained on (docs/results.md): the data set, the data contract's hash
    (`veil schema`), each organisation's rows and file, and the held-out test set."""

    dataset: str
    synthetic: bool = False
    #: "classification" or "regression".
    task: str = "classification"
    #: SHA-256 of the data contract every organisation encoded its file with (None: no schema).
    schema_hash: str | None = None
    schema_file: str | None = None
    organisations: list[OrganisationData] = []
    test_rows: int = 0
    test_file: str | None = None


class Result(_Open):
    """What `veil.run` returns and `veil run` writes to `OUT/result.json`.

    `status` is "interrupted" when a signal stopped the run before its last round: `rounds`
    then holds the rounds it finished, `final` the metrics of the model after the last of
    them, and `veil run --resume` continues it. A result.json written before `status`
    existed reads as "finished".
    """

    run_id: str
    name: str = ""
    mode: Literal["simulation", "deployment", "ray"]
    status: Literal["finished", "interrupted"] = "finished"
    #: The rounds the configuration asks for (None in a result.json written before it).
    rounds_planned: int | None = None
    #: The signal that interrupted the run ("SIGINT", "SIGTERM"); None when it finished.
    interrupted_by: str | None = None
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
    #: Per-class results of the final model (None in a result.json written before it existed,
    #: and for a run without a held-out test set).
    classification: Classification | None = Field(default=None, exclude_if=_absent)
    #: The data the run trained on (None in a result.json written before it existed).
    data: DataRecord | None = Field(default=None, exclude_if=_absent)

    def to_json(self) -> str:
        """The JSON text of `result.json`."""
        return self.model_dump_json(indent=2) + "\n"
