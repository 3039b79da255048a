"""The data layer: load a data set, split it among clients, scale it without leaking.

- `load_dataset` / `Dataset`: built-in data sets and the user's own CSV, in one validated shape.
- `partition_iid`, `partition_dirichlet` (label skew, Hsu et al. 2019), `partition_quantity_skew`.
- `FeatureBounds`, `declared_bounds`: public per-feature ranges (config or schema) that clamp
  every value and, with ``scaling = "bounds"``, scale it by a fixed map that costs no privacy.
- `fit_scaler`, `feature_statistics`, `scaler_from_statistics`: local and federated scaling.
- `Preprocessing`: a client's whole raw-record-to-input transform (clamp, then scale).
- `build_federated_data`: test split, partition, per-client train/validation split and scaling.
"""

from veil.data.datasets import DATASET_NAMES, Dataset, load_dataset, make_synthetic_logistic
from veil.data.federated import (
    ClientData,
    FederatedData,
    PartitionKind,
    ScalingKind,
    build_federated_data,
    declared_bounds,
)
from veil.data.partition import partition_dirichlet, partition_iid, partition_quantity_skew
from veil.data.scaling import (
    FeatureBounds,
    FeatureStatistics,
    Preprocessing,
    StandardScaler,
    feature_statistics,
    fit_scaler,
    scaler_from_statistics,
)

__all__ = [
    "DATASET_NAMES",
    "ClientData",
    "Dataset",
    "FeatureBounds",
    "FeatureStatistics",
    "FederatedData",
    "PartitionKind",
    "Preprocessing",
    "ScalingKind",
    "StandardScaler",
    "build_federated_data",
    "declared_bounds",
    "feature_statistics",
    "fit_scaler",
    "load_dataset",
    "make_synthetic_logistic",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity_skew",
    "scaler_from_statistics",
]
