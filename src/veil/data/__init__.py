"""The data layer: load a data set, split it among clients, scale it without leaking.

- `load_dataset` / `Dataset`: built-in data sets and the user's own CSV, in one validated shape.
- `partition_iid`, `partition_dirichlet` (label skew, Hsu et al. 2019), `partition_quantity_skew`.
- `fit_scaler`, `feature_statistics`, `scaler_from_statistics`: local and federated scaling.
- `build_federated_data`: test split, partition, per-client train/validation split and scaling.
"""

from veil.data.datasets import DATASET_NAMES, Dataset, load_dataset, make_synthetic_logistic
from veil.data.federated import (
    ClientData,
    FederatedData,
    PartitionKind,
    ScalingKind,
    build_federated_data,
)
from veil.data.partition import partition_dirichlet, partition_iid, partition_quantity_skew
from veil.data.scaling import (
    FeatureStatistics,
    StandardScaler,
    feature_statistics,
    fit_scaler,
    scaler_from_statistics,
)

__all__ = [
    "DATASET_NAMES",
    "ClientData",
    "Dataset",
    "FeatureStatistics",
    "FederatedData",
    "PartitionKind",
    "ScalingKind",
    "StandardScaler",
    "build_federated_data",
    "feature_statistics",
    "fit_scaler",
    "load_dataset",
    "make_synthetic_logistic",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity_skew",
    "scaler_from_statistics",
]
