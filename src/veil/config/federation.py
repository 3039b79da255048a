"""`[federation]` (rounds, client selection, local training) and `[strategy]` (how the
server combines the clients' models)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from veil.config.sections import Section, above_limit
from veil.selection import sample_size

if TYPE_CHECKING:
    from veil.config.run import RunConfig

#: Upper limits of `[federation]`: far above any sane run, low enough that a run stays finite on
#: one machine (each is named in the message that refuses a larger value).
MAX_ROUNDS = 100_000
MAX_CLIENTS = 100_000
MAX_LOCAL_EPOCHS = 1_000
MAX_BATCH_SIZE = 100_000


class FederationConfig(Section):
    """Rounds, client selection and local training."""

    #: Number of organisations (clients) that hold data.
    clients: int = Field(ge=1)
    rounds: int = Field(ge=1)
    #: Fraction of clients selected to train in each round.
    fraction_fit: float = Field(1.0, gt=0, le=1)
    #: Fraction of clients that evaluate the global model on their own data each round.
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    #: A round with fewer surviving clients leaves the global model unchanged.
    min_clients: int = Field(1, ge=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    #: Multiply the clients' learning rate by this after every round (1: constant). Under DP a
    #: decaying rate leaves less noise in the final model.
    learning_rate_decay: float = Field(1.0, gt=0, le=1)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    #: Simulation only: probability that a selected client drops out of a round.
    simulated_dropout: float = Field(0.0, ge=0, lt=1)
    #: Also train the same model on the pooled training data, for comparison.
    centralized_baseline: bool = False
    #: Evaluate every this many rounds (the last round is always evaluated).
    evaluate_every: int = Field(1, ge=1)
    #: Threads torch may use in this process. Small models train fastest on one: with more, the
    #: threads' synchronisation costs more than the arithmetic, badly so on a busy machine.
    torch_threads: int = Field(1, ge=1, le=256)
    #: Where the model trains and is evaluated: "cpu" (the default), "cuda" (the first GPU;
    #: refused when torch sees none) or "auto" (a GPU when there is one). Every tensor that
    #: meets the model lives on its device; data stays in host memory and moves batch by batch.
    #: mode = "simulation" only in this version.
    device: Literal["auto", "cpu", "cuda"] = "cpu"

    @field_validator("rounds", "clients", "local_epochs", "batch_size")
    @classmethod
    def _within_limits(cls, value: int, info: ValidationInfo) -> int:
        limit, what, reason = _LIMITS[info.field_name or ""]
        if value > limit:
            raise above_limit(limit, what, reason)
        return value

    @model_validator(mode="after")
    def _enough_clients(self) -> FederationConfig:
        if self.min_clients > self.clients:
            raise ValueError(
                f"min_clients = {self.min_clients} exceeds clients = {self.clients}; "
                "lower min_clients or add clients"
            )
        selected = sample_size(self.fraction_fit, self.clients)
        if selected < self.min_clients:
            raise ValueError(
                f"fraction_fit = {self.fraction_fit} selects {selected} of {self.clients} clients, "
                f"fewer than min_clients = {self.min_clients}; raise fraction_fit"
            )
        return self

    def check_in(self, run: RunConfig) -> None:
        """Simulated dropout is a simulation's stand-in for clients that fail; a deployment has
        real ones. A device other than the CPU is for simulations."""
        if run.mode == "deployment" and self.simulated_dropout > 0:
            raise ValueError("simulated_dropout applies to mode = 'simulation' only")
        if run.mode != "simulation" and self.device != "cpu":
            raise ValueError(
                f"device = '{self.device}' applies to mode = 'simulation' in this version (Ray "
                "workers and deployment members build their models on the CPU); remove it"
            )


_LIMITS: dict[str, tuple[int, str, str]] = {
    "rounds": (
        MAX_ROUNDS,
        "rounds a run may plan",
        "a run that long would not finish in a sane time; lower rounds",
    ),
    "clients": (
        MAX_CLIENTS,
        "clients in one federation",
        "each client needs its own examples and state; lower clients",
    ),
    "local_epochs": (
        MAX_LOCAL_EPOCHS,
        "local epochs per round",
        "clients would overfit their own data and rounds would never end; lower local_epochs",
    ),
    "batch_size": (
        MAX_BATCH_SIZE,
        "examples per batch",
        "a batch that large only costs memory (a smaller data set is trained whole); "
        "lower batch_size",
    ),
}


class FedAvgConfig(Section):
    """FedAvg (McMahan et al. 2017): the example-weighted mean of client models."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(Section):
    """FedProx (Li et al. 2020): FedAvg whose clients add (mu/2)·||w - w_global||² to the loss."""

    name: Literal["fedprox"]
    mu: float = Field(0.01, gt=0)


class FedOptConfig(Section):
    """Adaptive server optimisers of Reddi et al. 2021 (FedAdagrad, FedAdam, FedYogi)."""

    name: Literal["fedadam", "fedyogi", "fedadagrad"]
    server_learning_rate: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    #: Adaptivity: the epsilon-like term in the denominator.
    tau: float = Field(1e-3, gt=0)


StrategyConfig = Annotated[FedAvgConfig | FedProxConfig | FedOptConfig, Field(discriminator="name")]

#: Every `[strategy] name`: the tags of `StrategyConfig`'s union.
STRATEGY_NAMES: tuple[str, ...] = tuple(
    name
    for model in (FedAvgConfig, FedProxConfig, FedOptConfig)
    for name in get_args(model.model_fields["name"].annotation)
)
