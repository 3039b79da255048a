"""A run's strategy and aggregator chain, and the optional parts of `[robust]`, `[attack]`,
`[stragglers]` and `[ray]` (each None, or its input, when its section is absent).

Run wiring, not mechanisms: the strategies are `veil.federation.strategy`, the robust estimators
`veil.federation.robust`, the attacks `veil.federation.attacks`.
"""

from __future__ import annotations

from veil.config import (
    FedAvgConfig,
    FedOptConfig,
    FedProxConfig,
    RayConfig,
    RobustConfig,
    RunConfig,
)
from veil.federation import FedAvg, FedOpt, FedProx, Strategy, WeightedSum
from veil.federation.attacks import (
    DEFAULT_SCALE,
    LabelFlipTrainer,
    ModelPoisoning,
    malicious_clients,
)
from veil.federation.compression import Compressor, DecompressingAggregator
from veil.federation.lora_stacking import StackingAggregator
from veil.federation.pipeline import Aggregator, ClientStage
from veil.federation.robust import REPORT_NAMES, CoordinateMedian, Krum, NormBound, TrimmedMean
from veil.federation.strategy import PoissonSource
from veil.federation.training import LocalTrainer, SGDTrainer
from veil.transport.ray import RaySettings
from veil.transport.simulated import Stragglers


def strategy(config: RunConfig, *, poisson_source: PoissonSource | None = None) -> Strategy:
    """The strategy object that `config.strategy` describes; `poisson_source` draws client-level
    DP's Poisson sampling."""
    s = config.strategy
    fractions = config.federation.fraction_fit, config.federation.fraction_evaluate
    if isinstance(s, FedProxConfig):
        return FedProx(
            mu=s.mu,
            fraction_fit=fractions[0],
            fraction_evaluate=fractions[1],
            poisson_source=poisson_source,
        )
    if isinstance(s, FedOptConfig):
        return FedOpt(
            s.name,
            server_learning_rate=s.server_learning_rate,
            beta1=s.beta1,
            beta2=s.beta2,
            tau=s.tau,
            fraction_fit=fractions[0],
            fraction_evaluate=fractions[1],
            poisson_source=poisson_source,
        )
    assert isinstance(s, FedAvgConfig)
    return FedAvg(
        fraction_fit=fractions[0], fraction_evaluate=fractions[1], poisson_source=poisson_source
    )


def clear_aggregator(config: RunConfig, compressor: Compressor | None) -> Aggregator:
    """The rule the run uses on updates in the clear: the weighted sum or `[robust]`'s rule,
    each upload decompressed first when uploads are compressed. A secure-aggregation session
    keeps, wraps or replaces it (`Session.server_aggregator`). Under LoRA stacking it is the
    stacking sum (`veil.federation.lora_stacking`; the config allows no robust rule there)."""
    lora = config.model.lora
    if lora.aggregation == "stack":
        return StackingAggregator(lora.alpha / lora.rank, compressor)
    aggregator = robust_aggregator(config.robust, WeightedSum())
    return aggregator if compressor is None else DecompressingAggregator(aggregator, compressor)


def robust_aggregator(robust: RobustConfig | None, plain: Aggregator) -> Aggregator:
    """The aggregator `[robust]` describes; `plain` (the weighted sum) without the section."""
    if robust is None:
        return plain
    aggregator: Aggregator
    if robust.method == "median":
        aggregator = CoordinateMedian()
    elif robust.method == "trimmed_mean":
        fraction = 0.1 if robust.trim_fraction is None else robust.trim_fraction
        aggregator = TrimmedMean(fraction)
    elif robust.method in ("krum", "multi_krum"):
        assert robust.byzantine is not None  # the config requires it
        keep = 1 if robust.method == "krum" else robust.keep
        aggregator = Krum(robust.byzantine, keep=keep)
    else:
        aggregator = plain
    if robust.max_update_norm is not None:
        aggregator = NormBound(aggregator, robust.max_update_norm)
    return aggregator


class Attack:
    """The run's simulated malicious clients (`[attack]`)."""

    def __init__(self, config: RunConfig, clients: list[str]) -> None:
        if config.attack is None:
            raise ValueError("the config has no [attack] section")
        self.config = config.attack
        self.malicious = malicious_clients(clients, config.attack.fraction, config.seed)
        self.seed = config.seed

    def client_stages(self) -> list[ClientStage]:
        """The model-poisoning stage (last of the client stages), or none for label flipping."""
        kind = self.config.kind
        if kind == "label_flip":
            return []
        scale = self.config.scale if self.config.scale is not None else DEFAULT_SCALE[kind]
        return [ModelPoisoning(kind, self.malicious, scale=scale, seed=self.seed)]

    def trainer(
        self, name: str, honest: LocalTrainer | None, n_classes: int
    ) -> LocalTrainer | None:
        """`name`'s trainer: label flipping around the honest one for a malicious client."""
        if self.config.kind != "label_flip" or name not in self.malicious:
            return honest
        return LabelFlipTrainer(honest or SGDTrainer(), n_classes)

    def describe(self) -> dict[str, object]:
        """What result.json records about the attack."""
        return {
            "kind": self.config.kind,
            "fraction": self.config.fraction,
            "scale": self.config.scale
            if self.config.scale is not None
            else DEFAULT_SCALE.get(self.config.kind),
            "malicious_clients": len(self.malicious),
            "malicious": list(self.malicious)[:REPORT_NAMES],
        }


def attack(config: RunConfig, clients: list[str]) -> Attack | None:
    """The run's attack, or None without `[attack]`."""
    return Attack(config, clients) if config.attack is not None else None


def stragglers(config: RunConfig) -> Stragglers | None:
    """The simulated straggler model of `[stragglers]`, or None."""
    s = config.stragglers
    if s is None:
        return None
    return Stragglers(
        deadline_s=s.deadline_s,
        seconds_per_example=s.seconds_per_example,
        speed_spread=s.speed_spread,
        jitter=s.jitter,
    )


def ray_settings(ray: RayConfig, *, torch_threads: int) -> RaySettings:
    """`RaySettings` for `[ray]`."""
    return RaySettings(
        address=ray.address,
        workers=ray.workers,
        num_cpus=ray.num_cpus,
        num_gpus=ray.num_gpus,
        memory_mb=ray.memory_mb,
        clients_per_task=ray.clients_per_task,
        local_cpus=ray.local_cpus,
        object_store_mb=ray.object_store_mb,
        torch_threads=torch_threads,
    )
