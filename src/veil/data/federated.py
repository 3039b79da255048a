"""Turn one `Dataset` into a simulated federation: a held-out test set and per-client data.

`build_federated_data` does, with ``rng = np.random.default_rng(seed)``:

1. a stratified held-out test split (`test_fraction`): the evaluating party's test set, which no
   client trains on;
2. a partition of the remaining examples among the clients (IID, Dirichlet label skew or
   quantity skew, see `veil.data.partition`);
3. per client, a stratified split of its own examples into local train and validation sets;
4. clamping and scaling, which never look at the test set or at another client's rows. Declared
   feature bounds (`FeatureBounds`: public ranges from the config or the data set's schema),
   when given, first clamp every value into its range, whatever the scaling; then:

   - ``"bounds"``: the bounds' fixed map ``(x - centre) / ((upper - lower) / 6)``
     (`FeatureBounds.scaler`), the same for every client and the test set. It depends on no
     record, so under differential privacy adding one record (however extreme) changes no other
     record's input;
   - ``"federated"``: each client sends `FeatureStatistics` of its own *training* split, the
     server combines them (`scaler_from_statistics`), and every client and the test set use that
     one scaler;
   - ``"local"``: each client fits a scaler on its own training split and applies it to its
     own train and validation data; the test set is scaled with its own statistics (the
     evaluating party's);
   - ``"none"``: raw features (clamped, if bounds are given).

Each client keeps its `Preprocessing` (clamp, then its scaler), so that anything that later
trains as the run did (the privacy audit's canaries) goes through the same transform.

A regression data set (``Dataset.task == "regression"``) splits the same way, its float32
target kept as it is (never scaled here: the model's fixed target map is
`veil.federation.objective`'s). "Stratified" then means stratified by the target's quantile bins
(at most `TARGET_BINS`, fewer for few examples), so the test set and each validation set span
the target's range; a Dirichlet partition deals each quantile bin among the clients as it would
a class (target skew: some clients hold mostly high values, others low).

The same arguments and seed give identical arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

import numpy as np

from veil.data.dataset import Dataset, Task
from veil.data.partition import partition_dirichlet, partition_iid, partition_quantity_skew
from veil.data.scaling import (
    FeatureBounds,
    Preprocessing,
    StandardScaler,
    feature_statistics,
    fit_scaler,
    scaler_from_statistics,
)
from veil.errors import DataError

__all__ = [
    "ClientData",
    "FederatedData",
    "PartitionKind",
    "ScalingKind",
    "build_federated_data",
    "declared_bounds",
    "validation_split",
]

PartitionKind = Literal["iid", "dirichlet", "quantity"]
ScalingKind = Literal["federated", "local", "none", "bounds"]

PARTITIONS: Final[tuple[str, ...]] = get_args(PartitionKind)
SCALINGS: Final[tuple[str, ...]] = get_args(ScalingKind)
#: The most quantile bins of a regression target that splits stratify by (module docstring).
TARGET_BINS: Final[int] = 10
#: Examples per quantile bin at least, when a regression target has few examples.
_EXAMPLES_PER_BIN: Final[int] = 5


@dataclass(eq=False)
class ClientData:
    """One client's private data: float32 features ``(n, d)`` and int64 labels ``(n,)``
    (float32 target values ``(n,)`` for regression).

    The validation arrays may be empty (shape ``(0, d)`` and ``(0,)``). `preprocessing` is the
    transform that turned the client's raw records into `x_train` and `x_val` (identity for
    data built elsewhere, e.g. a deployment's data file).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    #: The name (not the path) of the file the organisation's rows came from, when one was
    #: read for it (`veil.data.organisations`); shown in result.json and the report.
    file: str | None = None

    @property
    def n_train(self) -> int:
        """Number of local training examples."""
        return int(self.y_train.shape[0])


@dataclass(eq=False)
class FederatedData:
    """A data set split for a simulated federation.

    For regression (``task == "regression"``) the label arrays hold the float32 target in its
    original units, `class_names` is empty and `n_classes` is 1 (the model's one output), as in
    `Dataset`.

    Attributes:
        dataset_name: Name of the source `Dataset`.
        synthetic: Whether the source data is synthetic.
        n_features: Feature columns.
        n_classes: Number of classes (1 for regression: the model's one output).
        image_shape: ``(channels, height, width)`` for image data, else ``None``.
        feature_names: One name per feature.
        class_names: One name per class.
        clients: Per-client train/validation data, in client order.
        x_test: The held-out test features (float32), seen by no client.
        y_test: The held-out test labels (int64; float32 target values for regression).
        scaling: ``"bounds"``, ``"federated"``, ``"local"`` or ``"none"``: how the features
            were scaled.
        scaler: The shared scaler when ``scaling`` is ``"federated"`` (combined from the
            clients' statistics) or ``"bounds"`` (the bounds' fixed map), to scale new inputs at
            inference time the same way (after clamping into `bounds`); else ``None``.
        bounds: The declared feature bounds that clamped every value, or ``None``.
        x_test_raw: The held-out test features as loaded, before clamping and scaling (None for
            data built elsewhere). The privacy audit draws its input canaries from them and
            passes them through a client's `preprocessing`, as the run's records were.
        task: ``"classification"`` or ``"regression"``.
        target_bounds: Regression: the declared public ``(lower, upper)`` range of the target
            that fixes the model's output scale (`veil.federation.objective`), or None.
    """

    dataset_name: str
    synthetic: bool
    n_features: int
    n_classes: int
    image_shape: tuple[int, int, int] | None
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    clients: list[ClientData]
    x_test: np.ndarray
    y_test: np.ndarray
    scaling: str
    scaler: StandardScaler | None = None
    bounds: FeatureBounds | None = None
    x_test_raw: np.ndarray | None = None
    task: Task = "classification"
    target_bounds: tuple[float, float] | None = None

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        """All clients' training data concatenated (client order), for the centralized baseline."""
        x = np.concatenate([c.x_train for c in self.clients], axis=0).astype(np.float32)
        label_type = np.float32 if self.task == "regression" else np.int64
        y = np.concatenate([c.y_train for c in self.clients], axis=0).astype(label_type)
        return x, y


def declared_bounds(
    dataset: Dataset,
    lower: float | Sequence[float] | None = None,
    upper: float | Sequence[float] | None = None,
    centre: float | Sequence[float] | None = None,
) -> FeatureBounds | None:
    """The public feature bounds of a run: `lower`, `upper` (and optionally `centre`) from the
    config when given (a number for every feature, or one per feature in column order), else the
    bounds that the data set's schema declares (`Dataset.feature_bounds`), else None.

    Raises:
        DataError: If only one of `lower` and `upper` is given, or they do not fit the data.
    """
    if lower is None and upper is None:
        return dataset.feature_bounds
    if lower is None or upper is None:
        raise DataError("feature bounds need both lower and upper; give both, or neither")
    return FeatureBounds.from_values(
        lower,
        upper,
        dataset.n_features,
        source="declared in the config ([data] feature_bounds)",
        centre=centre,
    )


def build_federated_data(
    dataset: Dataset,
    *,
    n_clients: int,
    partition: PartitionKind,
    alpha: float,
    test_fraction: float,
    validation_fraction: float,
    scaling: ScalingKind,
    seed: int,
    min_examples: int = 2,
    client_names: Sequence[str] | None = None,
    bounds: FeatureBounds | None = None,
    target_bounds: tuple[float, float] | None = None,
) -> FederatedData:
    """Split `dataset` into a held-out test set and `n_clients` clients' train/validation data.

    Args:
        dataset: The data to split.
        n_clients: Number of clients, >= 1.
        partition: ``"iid"``, ``"dirichlet"`` (label skew, Hsu et al. 2019) or ``"quantity"``
            (size skew).
        alpha: Dirichlet concentration for ``"dirichlet"`` and ``"quantity"`` (ignored for
            ``"iid"``).
        test_fraction: Share of all examples held out for the test set, in (0, 1).
        validation_fraction: Share of each client's examples kept for local validation, in
            [0, 1); 0 gives empty validation arrays. Each client keeps at least one training
            example.
        scaling: ``"bounds"``, ``"federated"``, ``"local"`` or ``"none"`` (see the module
            docstring); ``"bounds"`` needs `bounds`.
        seed: Seed of the only random generator used.
        min_examples: Smallest number of examples (train + validation) per client.
        client_names: One unique name per client; default ``client-0, client-1, ...``.
        bounds: Declared public feature bounds (`declared_bounds` resolves the config's and the
            schema's); every value is clamped into them before scaling. None: no clamping.
        target_bounds: Declared public range of a regression target (the config's); default
            the data set's own (`Dataset.target_bounds`).

    Raises:
        DataError: For invalid arguments or a split that cannot satisfy them (the message names
            the numbers).
    """
    _validate(dataset, n_clients, partition, test_fraction, validation_fraction, scaling)
    _check_bounds(dataset, scaling, bounds)
    names = _client_names(n_clients, client_names)
    rng = np.random.default_rng(seed)
    y_all = dataset.labels
    # Clamping is value by value: a record's clamped values depend on that record only.
    x_all = dataset.features if bounds is None else bounds.clamp(dataset.features)

    remaining, test_index = _test_split(dataset, test_fraction, n_clients, rng)
    parts = _partition(y_all[remaining], n_clients, partition, alpha, min_examples, rng)
    splits = _local_splits(y_all, remaining, parts, validation_fraction, rng)

    x_test = x_all[test_index]
    scaler, client_scalers, test_scaler = _fit_scalers(scaling, bounds, x_all, splits, x_test)
    x_test = _apply(test_scaler, x_test)
    clients = [
        _client_data(name, train, val, x_all, y_all, Preprocessing(bounds, local_scaler, scaling))
        for name, (train, val), local_scaler in zip(names, splits, client_scalers, strict=True)
    ]
    return FederatedData(
        dataset_name=dataset.name,
        synthetic=dataset.synthetic,
        n_features=dataset.n_features,
        n_classes=dataset.n_classes,
        image_shape=dataset.image_shape,
        feature_names=dataset.feature_names,
        class_names=dataset.class_names,
        clients=clients,
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=y_all[test_index].copy(),
        scaling=scaling,
        scaler=scaler,
        bounds=bounds,
        x_test_raw=np.array(dataset.features[test_index], dtype=np.float32),
        task=dataset.task,
        target_bounds=_target_bounds(dataset, target_bounds),
    )


def _target_bounds(
    dataset: Dataset, declared: tuple[float, float] | None
) -> tuple[float, float] | None:
    if declared is None:
        return dataset.target_bounds
    if dataset.task != "regression":
        raise DataError(
            f"target bounds apply to a regression target; data set {dataset.name!r} has classes"
        )
    if not declared[0] < declared[1]:
        raise DataError(f"target bounds need lower < upper, got {declared}")
    return (float(declared[0]), float(declared[1]))


def _strata(labels: np.ndarray) -> np.ndarray:
    """What splits stratify by: the class labels themselves, or for a regression target
    (floating point) its quantile bin, ``0..k-1`` with k = min(`TARGET_BINS`, n // 5), at
    least 1."""
    if not np.issubdtype(labels.dtype, np.floating):
        return labels
    n = int(labels.shape[0])
    bins = max(1, min(TARGET_BINS, n // _EXAMPLES_PER_BIN))
    if bins == 1:
        return np.zeros(n, dtype=np.int64)
    edges = np.quantile(labels.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, labels, side="right").astype(np.int64)


def _check_bounds(dataset: Dataset, scaling: str, bounds: FeatureBounds | None) -> None:
    """DataError unless `bounds` are given for ``"bounds"`` scaling and fit the data's width."""
    if scaling == "bounds" and bounds is None:
        raise DataError(
            f"scaling = 'bounds' needs declared feature bounds, and data set {dataset.name!r} "
            "declares none; set [data] feature_bounds = {lower = [...], upper = [...]} (public "
            "ranges, one per feature, not computed from the data)"
        )
    if bounds is not None and bounds.n_features != dataset.n_features:
        raise DataError(
            f"feature bounds ({bounds.source}) declare {bounds.n_features} features, data set "
            f"{dataset.name!r} has {dataset.n_features}; give one range per feature column"
        )


def _test_split(
    dataset: Dataset, test_fraction: float, n_clients: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(The examples left for the clients, the held-out test examples): a stratified split
    that leaves at least one example per client; DataError if the test set would be empty."""
    remaining, test_index = _stratified_split(
        dataset.labels, test_fraction, rng, keep_at_least=n_clients
    )
    if test_index.size == 0:
        raise DataError(
            f"test_fraction={test_fraction} of {dataset.n_examples} examples leaves an empty "
            "test set; use a larger test_fraction"
        )
    return remaining, test_index


def _partition(
    labels: np.ndarray,
    n_clients: int,
    partition: str,
    alpha: float,
    min_examples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Positions ``0..n-1`` of the examples left after the test split (their `labels`) dealt
    among the clients by `partition`."""
    n_remaining = int(labels.shape[0])
    if partition == "iid":
        if n_remaining < n_clients * min_examples:
            raise DataError(
                f"cannot give each of {n_clients} clients at least {min_examples} examples from "
                f"the {n_remaining} examples left after the test split; use fewer clients or a "
                "smaller test_fraction"
            )
        return partition_iid(n_remaining, n_clients, rng)
    if partition == "dirichlet":
        return partition_dirichlet(_strata(labels), n_clients, alpha, rng, min_examples)
    return partition_quantity_skew(n_remaining, n_clients, alpha, rng, min_examples)


def _local_splits(
    labels: np.ndarray,
    remaining: np.ndarray,
    parts: Sequence[np.ndarray],
    validation_fraction: float,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per client, its examples (indices into the data set) split stratified into (train,
    validation), keeping at least one training example."""
    splits: list[tuple[np.ndarray, np.ndarray]] = []
    for part in parts:
        own = remaining[part]
        train_pos, val_pos = _stratified_split(
            labels[own], validation_fraction, rng, keep_at_least=1
        )
        splits.append((own[train_pos], own[val_pos]))
    return splits


def _fit_scalers(
    scaling: str,
    bounds: FeatureBounds | None,
    x_all: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    x_test: np.ndarray,
) -> tuple[StandardScaler | None, list[StandardScaler | None], StandardScaler | None]:
    """The scalers of `scaling` (module docstring): (the shared one or None, one per client,
    the test set's), each fitted on clients' training rows only (or on the test set, for its
    own under ``"local"``)."""
    scaler: StandardScaler | None = None
    client_scalers: list[StandardScaler | None]
    test_scaler: StandardScaler | None = None
    if scaling == "bounds" and bounds is not None:
        scaler = test_scaler = bounds.scaler()
        client_scalers = [scaler] * len(splits)
    elif scaling == "federated":
        scaler = scaler_from_statistics([feature_statistics(x_all[tr]) for tr, _ in splits])
        client_scalers = [scaler] * len(splits)
        test_scaler = scaler
    elif scaling == "local":
        client_scalers = [fit_scaler(x_all[tr]) for tr, _ in splits]
        test_scaler = fit_scaler(x_test)
    else:
        client_scalers = [None] * len(splits)
    return scaler, client_scalers, test_scaler


def _client_data(
    name: str,
    train: np.ndarray,
    val: np.ndarray,
    x_all: np.ndarray,
    y_all: np.ndarray,
    preprocessing: Preprocessing,
) -> ClientData:
    """The client's rows `train` and `val` of the (clamped) data, scaled by its scaler."""
    return ClientData(
        name=name,
        x_train=_apply(preprocessing.scaler, x_all[train]),
        y_train=y_all[train].copy(),
        x_val=_apply(preprocessing.scaler, x_all[val]),
        y_val=y_all[val].copy(),
        preprocessing=preprocessing,
    )


def _apply(scaler: StandardScaler | None, x: np.ndarray) -> np.ndarray:
    if scaler is None:
        return np.array(x, dtype=np.float32)  # a copy: clients never share memory
    return scaler.transform(x)


def _stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator, *, keep_at_least: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..n-1`` into (kept, held out), holding out ``round(fraction * n)``.

    The held-out count is apportioned among classes (a regression target's quantile bins,
    `_strata`) by largest remainder, so each class is held out in proportion to its size. At
    least `keep_at_least` positions are kept (if there are that many). Both results are sorted
    int64 arrays.
    """
    labels = _strata(labels)
    n = int(labels.shape[0])
    n_held = min(round(fraction * n), max(n - keep_at_least, 0))
    if n_held <= 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = n_held * counts / n
    per_class = np.floor(quotas).astype(np.int64)
    shortfall = n_held - int(per_class.sum())
    # Largest remainder first; ties broken by class order (stable sort) for determinism.
    order = np.argsort(-(quotas - per_class), kind="stable")
    per_class[order[:shortfall]] += 1
    held: list[np.ndarray] = []
    for cls, take in zip(classes, per_class, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        held.append(members[:take])
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask).astype(np.int64), held_out


def _validate(
    dataset: Dataset,
    n_clients: int,
    partition: str,
    test_fraction: float,
    validation_fraction: float,
    scaling: str,
) -> None:
    if partition not in PARTITIONS:
        raise DataError(f"unknown partition {partition!r}; choose one of: {', '.join(PARTITIONS)}")
    if scaling not in SCALINGS:
        raise DataError(f"unknown scaling {scaling!r}; choose one of: {', '.join(SCALINGS)}")
    if n_clients < 1:
        raise DataError(f"the number of clients must be at least 1, got {n_clients}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(
            f"validation_fraction must lie in [0, 1), got {validation_fraction}; use 0 for none"
        )
    if n_clients + 1 > dataset.n_examples:
        raise DataError(
            f"data set {dataset.name!r} has {dataset.n_examples} examples, too few for "
            f"{n_clients} clients and a test set; use fewer clients"
        )


def _client_names(n_clients: int, client_names: Sequence[str] | None) -> list[str]:
    if client_names is None:
        return [f"client-{i}" for i in range(n_clients)]
    names = [str(name) for name in client_names]
    if len(names) != n_clients:
        raise DataError(f"{len(names)} client names given for {n_clients} clients; give one each")
    if len(set(names)) != len(names):
        raise DataError(f"client names must be unique, got {names}")
    return names


def validation_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One organisation's own split of its rows into (training, validation) positions, the
    validation share `fraction` of them, stratified as the simulated clients' splits are; at
    least one row is kept for training."""
    return _stratified_split(labels, fraction, rng, keep_at_least=1)
