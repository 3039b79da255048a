"""The settings of each secure-aggregation backend (`[secagg]`, `[ckks]`, `[tee]`) and the
rules each imposes on the rest of the run.

`BACKEND_SECTIONS` maps a `secure_aggregation` value to the section that configures it (the
section's TOML table has the backend's name); `RunConfig` checks the section of the backend the
run uses (its defaults when the table is absent) and reports the tables of the other backends as
unused. "plain" has no section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from veil.config.sections import Section
from veil.selection import sample_size

if TYPE_CHECKING:
    from veil.config.run import RunConfig


def _check_hidden_updates(kind: str, run: RunConfig) -> int:
    """What a backend that hides each update from the server (masking, CKKS) rules out; returns
    the number of clients selected per round."""
    # deployment.max_update_norm and privacy.target_quantile are checked here, not with their
    # sections: it is hiding the updates that makes them impossible.
    if run.deployment.max_update_norm is not None:
        raise ValueError(
            "deployment.max_update_norm needs the server to see each update, which "
            f"secure_aggregation = '{kind}' hides; bound updates with [{kind}].clip_range"
        )
    if run.privacy is not None and run.privacy.target_quantile is not None:
        raise ValueError(
            "privacy.target_quantile (adaptive clipping) is not available with "
            f"secure_aggregation = '{kind}' in this version: the unclipped count would "
            "have to travel inside the protected sum; remove target_quantile and set "
            "clip_norm"
        )
    if run.data.scaling == "federated":
        raise ValueError(
            "data.scaling = 'federated' sends exact per-client feature sums in the clear, "
            f"which secure_aggregation = '{kind}' is meant to hide; use scaling = 'local' "
            "or 'none'"
        )
    selected = sample_size(run.federation.fraction_fit, run.federation.clients)
    if selected < 2:
        raise ValueError(
            f"secure aggregation needs at least 2 clients per round, and fraction_fit = "
            f"{run.federation.fraction_fit} selects {selected}; raise fraction_fit"
        )
    return selected


class SecAggConfig(Section):
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

    def check_in(self, run: RunConfig) -> None:
        """Masking hides each update (see `_check_hidden_updates`); the neighbour graph and the
        threshold must fit the clients selected per round and withstand a malicious server."""
        selected = _check_hidden_updates("secagg", run)
        if self.neighbours == "auto":
            if self.threshold is not None:
                raise ValueError(
                    "secagg.neighbours = 'auto' chooses the threshold too; remove "
                    "secagg.threshold, or set neighbours to a number"
                )
            return
        if self.neighbours is not None and self.neighbours >= selected:
            raise ValueError(
                f"secagg.neighbours = {self.neighbours} must be below the {selected} clients "
                "selected per round; lower it, or remove it for the complete graph"
            )
        k = self.neighbours
        smallest = selected if k is None else k + 1
        largest = selected if k is None else k + 1 + k % 2
        lowest = 2 * largest // 3 + 1
        if self.threshold is not None and not lowest <= self.threshold <= smallest:
            raise ValueError(
                f"secagg.threshold = {self.threshold} must be above two thirds of the largest "
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


#: Largest total coefficient-modulus bits for 128-bit security (HomomorphicEncryption.org
#: standard, ternary secrets), by polynomial modulus degree.
CKKS_MAX_MODULUS_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


class CkksConfig(Section):
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

    def check_in(self, run: RunConfig) -> None:
        """CKKS hides each update (see `_check_hidden_updates`); the decryptors must be among
        the clients selected per round."""
        selected = _check_hidden_updates("ckks", run)
        if self.decryptors > selected:
            raise ValueError(
                f"ckks.decryptors = {self.decryptors} exceeds the {selected} clients selected "
                "per round; lower decryptors or raise fraction_fit"
            )


class TeeConfig(Section):
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

    def check_in(self, run: RunConfig) -> None:
        """Evidence without a hardware root of trust is accepted only when the config says so:
        otherwise every client would refuse the aggregator."""
        if self.backend == "software_dev" and not self.allow_insecure_dev:
            raise ValueError(
                "[tee] backend = 'software_dev' has no hardware root of trust and every "
                "client would refuse it; set [tee] allow_insecure_dev = true (development "
                "only)"
            )


#: The section of each `secure_aggregation` value that has settings; the table's name is the
#: value. A new backend with settings adds its section here (and a field of `RunConfig`).
BACKEND_SECTIONS: dict[str, type[Section]] = {
    "secagg": SecAggConfig,
    "ckks": CkksConfig,
    "tee": TeeConfig,
}
