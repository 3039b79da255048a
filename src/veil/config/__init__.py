"""Run configuration: one TOML file (or one `RunConfig` built in code) describes a whole run.

Two top-level keys choose how a run executes, `mode` and `secure_aggregation`: changing one of
them runs the same config another way. Everything else lives in sections, one module per
concept; each section forbids unknown keys (a typo is an error, not a silently ignored setting)
and owns the rules that tie its settings to the rest of the run (`Section.check_in`).
`load_config` turns any problem into a `ConfigError` whose message is one line naming the key,
the value and what is allowed; the sections a run does not use are listed, one line each, by
`RunConfig.unused_sections`.

Importing this package loads pydantic and nothing heavy (no torch, scikit-learn or TenSEAL).
"""

from veil.config.compression import CompressionConfig
from veil.config.data import (
    INSTRUCTION_DATASETS,
    REGRESSION_DATASETS,
    TEXT_DATASETS,
    DataConfig,
    DatasetName,
    FeatureBoundsConfig,
    PartitionConfig,
    TargetBoundsConfig,
)
from veil.config.deployment import CheckpointConfig, DeploymentConfig
from veil.config.federation import (
    STRATEGY_NAMES,
    FedAvgConfig,
    FederationConfig,
    FedOptConfig,
    FedProxConfig,
    StrategyConfig,
)
from veil.config.model import LoRAConfig, ModelConfig
from veil.config.privacy import PrivacyConfig
from veil.config.robustness import (
    AttackConfig,
    RayConfig,
    RobustConfig,
    StragglerConfig,
)
from veil.config.run import (
    IMPLEMENTED_MODES,
    Aggregation,
    Mode,
    RunConfig,
    load_config,
)
from veil.config.sections import Section
from veil.config.secure_aggregation import (
    BACKEND_SECTIONS,
    CKKS_MAX_MODULUS_BITS,
    CkksConfig,
    SecAggConfig,
    TeeConfig,
)

__all__ = [
    "BACKEND_SECTIONS",
    "CKKS_MAX_MODULUS_BITS",
    "IMPLEMENTED_MODES",
    "INSTRUCTION_DATASETS",
    "REGRESSION_DATASETS",
    "STRATEGY_NAMES",
    "TEXT_DATASETS",
    "Aggregation",
    "AttackConfig",
    "CheckpointConfig",
    "CkksConfig",
    "CompressionConfig",
    "DataConfig",
    "DatasetName",
    "DeploymentConfig",
    "FeatureBoundsConfig",
    "FedAvgConfig",
    "FedOptConfig",
    "FedProxConfig",
    "FederationConfig",
    "LoRAConfig",
    "Mode",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RayConfig",
    "RobustConfig",
    "RunConfig",
    "SecAggConfig",
    "Section",
    "StragglerConfig",
    "StrategyConfig",
    "TargetBoundsConfig",
    "TeeConfig",
    "load_config",
]
