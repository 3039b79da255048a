"""Differentially private statistics over one numeric column, with OpenDP measurements.

A query is count, sum, mean, histogram or quantile of one column, with bounds *declared* by the
analyst (never read from the data: bounds computed from the data would leak it). Values are
clamped to [lower, upper]; missing values are dropped, so "count" counts the values present.

Privacy unit: one record (one row), under add/remove neighbouring (unbounded DP). The data set
size is not assumed public.

Noise is added once, to the exact total, on the integers:

* ``laplace``: the discrete Laplace mechanism, pure ε-DP (Ghosh, Roughgarden, Sundararajan 2012;
  Canonne, Kamath, Steinke 2020, §5.2).
* ``gaussian``: the discrete Gaussian mechanism, ρ-zCDP converted to (ε, δ)-DP with the tight
  conversion of Canonne, Kamath, Steinke 2020 ("The Discrete Gaussian for Differential Privacy").

Both sample from OpenDP's Rust core, which draws its randomness from a cryptographically secure
generator (as every DP noise in Veil must, docs/privacy.md) and cannot be seeded. There is
therefore no seeded mode here: every answer is a real release, in tests too, and tests check
distributions, not values.

Sensitivities (add/remove one record, values clamped to [lower, upper]):

* count: 1;
* sum: max(|lower|, |upper|) · 10^decimals, after values are rounded to ``scale_decimals``
  decimals and summed as integers (so the noise stays discrete and the answer lies on the grid
  10^-decimals);
* histogram: one record changes one bin by 1, so L1 = L2 = 1 (every clamped value falls in a bin);
* mean: a noisy sum divided by a noisy count, each given *half* of the budget (ε/2, δ/2; basic
  composition), then clamped to [lower, upper] (post-processing);
* quantile: the exponential mechanism (McSherry & Talwar 2007) over ``bins`` evenly spaced
  candidates in [lower, upper], as report-noisy-max over OpenDP's quantile scores
  |(1 − α)·#(x < c) − α·#(x > c)| (scaled to integers), whose sensitivity is max(α, 1 − α) in
  those units. With ``laplace`` it uses exponential noise (pure ε-DP; permute-and-flip, McKenna &
  Sheldon 2020), with ``gaussian`` Gumbel noise (the exponential mechanism proper, ρ-zCDP).

Federation: each organisation computes a `PartialAggregate` of its rows (exact integers, no
noise); `release` adds them up exactly and adds noise once. Partials are not private: they must
reach the releasing party through secure aggregation or a trusted party.

The functions here are pure: they do not charge any budget. The caller charges the ledger first
(`PrivacyLedger.spend`) and computes the answer inside it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import opendp.prelude as dp

from veil.errors import DataError, UserError

dp.enable_features("contrib")

QueryKind = Literal["count", "sum", "mean", "histogram", "quantile"]
MechanismKind = Literal["laplace", "gaussian"]

QUERY_KINDS: tuple[str, ...] = get_args(QueryKind)
MECHANISMS: tuple[str, ...] = get_args(MechanismKind)

#: Denominator limit for the quantile α (OpenDP scores with integer α_num / α_den).
_ALPHA_DENOMINATOR = 10_000
#: Integers handed to OpenDP are i64 (u64 for scores): keep totals well inside.
_INT_LIMIT = 2**62
_MAX_DECIMALS = 9
_MAX_BINS = 100_000

_NEIGHBOURING = "add/remove one record"
_RANDOMNESS = "OpenDP CSPRNG (Rust core); cannot be seeded"
_MECHANISM_NAMES = {"laplace": "discrete Laplace", "gaussian": "discrete Gaussian"}


@dataclass(frozen=True)
class QuerySpec:
    """One DP query: what to compute, the declared bounds, and the (ε, δ) it may spend.

    `delta` must be 0 for ``laplace`` (pure ε-DP) and in (0, 1) for ``gaussian``. `bins` is the
    number of equal-width bins over [lower, upper] (histogram) or of evenly spaced candidates
    (quantile, at least 2). `quantile` is the α in (0, 1) of a quantile query. `scale_decimals`
    (sum and mean) rounds values to that many decimals before summing them as integers.
    Invalid combinations raise `UserError` saying what to change.
    """

    kind: QueryKind
    column: str
    lower: float
    upper: float
    epsilon: float
    delta: float = 0.0
    mechanism: MechanismKind = "laplace"
    bins: int | None = None
    quantile: float | None = None
    scale_decimals: int = 0

    def __post_init__(self) -> None:
        if self.kind not in QUERY_KINDS:
            raise UserError(
                f"unknown query kind '{self.kind}'; use one of {', '.join(QUERY_KINDS)}"
            )
        if self.mechanism not in MECHANISMS:
            raise UserError(
                f"unknown mechanism '{self.mechanism}'; use one of {', '.join(MECHANISMS)}"
            )
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)):
            raise UserError(f"bounds must be finite numbers, got [{self.lower}, {self.upper}]")
        if not self.lower < self.upper:
            raise UserError(
                f"the lower bound must be below the upper bound, got [{self.lower}, {self.upper}]"
            )
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise UserError(f"ε must be a positive finite number, got {self.epsilon}")
        if self.mechanism == "laplace" and self.delta != 0:
            raise UserError(
                f"the laplace mechanism is pure ε-DP and takes δ = 0, got δ = {self.delta}; "
                "drop δ or use --mechanism gaussian"
            )
        if self.mechanism == "gaussian" and not (0 < self.delta < 1):
            raise UserError(
                f"the gaussian mechanism needs δ in (0, 1), got δ = {self.delta}; "
                "pass a δ such as 1e-6, or use --mechanism laplace"
            )
        if self.kind in ("histogram", "quantile"):
            least = 1 if self.kind == "histogram" else 2
            if self.bins is None:
                what = "bins" if self.kind == "histogram" else "candidates"
                raise UserError(f"a {self.kind} query needs the number of {what} (bins >= {least})")
            if not least <= self.bins <= _MAX_BINS:
                raise UserError(f"bins must be in [{least}, {_MAX_BINS}], got {self.bins}")
        elif self.bins is not None:
            raise UserError(f"bins applies to histogram and quantile queries, not to {self.kind}")
        if self.kind == "quantile":
            if self.quantile is None or not (0 < self.quantile < 1):
                raise UserError(f"a quantile query needs a quantile in (0, 1), got {self.quantile}")
            alpha = _alpha(self.quantile)
            if not 0 < alpha < 1:
                raise UserError(
                    f"quantile {self.quantile} is too close to 0 or 1 "
                    f"(resolution 1/{_ALPHA_DENOMINATOR})"
                )
        elif self.quantile is not None:
            raise UserError(f"quantile applies to quantile queries, not to {self.kind}")
        if not 0 <= self.scale_decimals <= _MAX_DECIMALS:
            raise UserError(f"decimals must be in [0, {_MAX_DECIMALS}], got {self.scale_decimals}")
        if self.scale_decimals and self.kind not in ("sum", "mean"):
            raise UserError(f"decimals applies to sum and mean queries, not to {self.kind}")
        if self.kind in ("sum", "mean"):
            lo, hi = _scaled_bounds(self)
            if lo >= hi:
                raise UserError(
                    f"with {self.scale_decimals} decimals the bounds [{self.lower}, {self.upper}] "
                    "round to the same integer; pass more decimals"
                )
            if max(abs(lo), abs(hi)) > _INT_LIMIT // 2**20:
                raise UserError("the bounds times 10^decimals are too large; pass fewer decimals")

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (recorded as the ledger charge's parameters)."""
        return asdict(self)


@dataclass(frozen=True)
class PartialAggregate:
    """What one organisation computes locally on its rows: exact integers, no noise.

    `count`: values present. `total`: sum of the clamped values rounded to the spec's decimals,
    times 10^decimals (sum, mean). `counts`: histogram bin counts, or for a quantile the number
    of values strictly below each candidate; `counts_le`: for a quantile, the number of values at
    or below each candidate. Not private on its own (see the module docstring).
    """

    kind: QueryKind
    shape: tuple[float, float, int | None, float | None, int]
    count: int
    total: int = 0
    counts: tuple[int, ...] = ()
    counts_le: tuple[int, ...] = ()


@dataclass(frozen=True)
class QueryAnswer:
    """A released answer and how it was made private.

    `value`: an integer (count, histogram bins, sum with 0 decimals), a float on the grid
    10^-decimals (scaled sum), the mean, or the chosen candidate (quantile). `noise_scale`: the
    discrete Laplace scale or the discrete Gaussian σ, in the units of `value` (for a mean: of the
    sum; for a quantile: of the integer scores). `details` holds the sensitivity, the noise
    variance, the neighbouring relation and, for a mean, both noisy parts.
    """

    kind: str
    value: float | list[int]
    epsilon: float
    delta: float
    mechanism: str
    noise_scale: float
    details: dict[str, Any] = field(default_factory=dict)


def partial_aggregate(values: npt.ArrayLike, spec: QuerySpec) -> PartialAggregate:
    """The exact local aggregate of one organisation's values (NaN dropped, values clamped)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = np.clip(x[~np.isnan(x)], spec.lower, spec.upper)
    shape = _shape(spec)
    n = int(x.size)
    if spec.kind == "count":
        return PartialAggregate(spec.kind, shape, count=n)
    if spec.kind in ("sum", "mean"):
        lo, hi = _scaled_bounds(spec)
        if n * max(abs(lo), abs(hi)) >= _INT_LIMIT:
            raise UserError(
                f"{n} values of magnitude up to {max(abs(lo), abs(hi))} (after scaling) could "
                "overflow a 64-bit sum; narrow the bounds or pass fewer decimals"
            )
        scaled = np.rint(x * 10.0**spec.scale_decimals).astype(np.int64)
        scaled = np.clip(scaled, lo, hi)
        return PartialAggregate(spec.kind, shape, count=n, total=int(scaled.sum()))
    assert spec.bins is not None
    if spec.kind == "histogram":
        width = (spec.upper - spec.lower) / spec.bins
        idx = np.clip(np.floor((x - spec.lower) / width), 0, spec.bins - 1).astype(np.int64)
        counts = np.bincount(idx, minlength=spec.bins)
        return PartialAggregate(spec.kind, shape, count=n, counts=tuple(int(c) for c in counts))
    candidates = _candidates(spec)
    ordered = np.sort(x)
    lt = np.searchsorted(ordered, candidates, side="left")
    le = np.searchsorted(ordered, candidates, side="right")
    return PartialAggregate(
        spec.kind,
        shape,
        count=n,
        counts=tuple(int(c) for c in lt),
        counts_le=tuple(int(c) for c in le),
    )


def release(partials: Sequence[PartialAggregate], spec: QuerySpec) -> QueryAnswer:
    """Add the partials exactly and release the total with noise added once.

    The noise does not depend on how many organisations contributed: the answer has the same
    distribution as `answer` on the pooled rows. Raises `UserError` if a partial was computed
    for a different query.
    """
    if not partials:
        raise UserError("release needs at least one partial aggregate")
    shape = _shape(spec)
    for p in partials:
        if p.kind != spec.kind or p.shape != shape:
            raise UserError(
                f"a partial aggregate was computed for a different query ({p.kind}, "
                f"bounds/bins {p.shape}) than the one released ({spec.kind}, {shape})"
            )
    count = sum(p.count for p in partials)
    total = sum(p.total for p in partials)
    counts = [sum(col) for col in zip(*(p.counts for p in partials), strict=True)]
    counts_le = [sum(col) for col in zip(*(p.counts_le for p in partials), strict=True)]
    if abs(total) >= _INT_LIMIT or count >= _INT_LIMIT:
        raise UserError("the pooled total would overflow a 64-bit integer; narrow the bounds")

    base: dict[str, Any] = {
        "neighbouring": _NEIGHBOURING,
        "randomness": _RANDOMNESS,
        "noise": _MECHANISM_NAMES[spec.mechanism]
        if spec.kind != "quantile"
        else "report-noisy-max (exponential mechanism): "
        + ("exponential" if spec.mechanism == "laplace" else "Gumbel"),
        "organisations": len(partials),
    }
    if spec.kind == "count":
        noisy, scale = _noisy_scalar(count, 1, spec.mechanism, spec.epsilon, spec.delta)
        details = {**base, "sensitivity": 1, "noise_variance": _variance(spec.mechanism, scale)}
        return _answer(spec, noisy, scale, details)
    if spec.kind == "sum":
        sens = _sum_sensitivity(spec)
        noisy, scale = _noisy_scalar(total, sens, spec.mechanism, spec.epsilon, spec.delta)
        unit = 10.0**-spec.scale_decimals
        value: float = (
            noisy if spec.scale_decimals == 0 else round(noisy * unit, spec.scale_decimals)
        )
        details = {
            **base,
            "sensitivity": sens * unit,
            "decimals": spec.scale_decimals,
            "noise_variance": _variance(spec.mechanism, scale) * unit**2,
        }
        return _answer(spec, value, scale * unit, details)
    if spec.kind == "mean":
        return _release_mean(count, total, spec, base)
    if spec.kind == "histogram":
        noisy_bins, scale = _noisy_vector(counts, spec.mechanism, spec.epsilon, spec.delta)
        details = {
            **base,
            "sensitivity": 1,
            "bin_edges": np.linspace(spec.lower, spec.upper, len(counts) + 1).tolist(),
            "noise_variance": _variance(spec.mechanism, scale),
        }
        return _answer(spec, noisy_bins, scale, details)
    return _release_quantile(count, counts, counts_le, spec, base)


def answer(values: npt.ArrayLike, spec: QuerySpec) -> QueryAnswer:
    """The DP answer on one organisation's values: `release([partial_aggregate(values)])`."""
    return release([partial_aggregate(values, spec)], spec)


def read_column(path: Path, column: str) -> npt.NDArray[np.float64]:
    """One numeric column of a CSV file, missing values dropped.

    `DataError` if the file cannot be read, `UserError` listing the columns if `column` is absent,
    or naming the first non-numeric entry.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no CSV file at '{path}'")
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read '{path}' as CSV: {exc}") from None
    if column not in header:
        raise UserError(
            f"no column '{column}' in '{path}'; its columns are: {', '.join(map(str, header))}"
        )
    raw = pd.read_csv(path, usecols=[column])[column]
    numeric = pd.to_numeric(raw, errors="coerce")
    bad = numeric.isna() & raw.notna()
    if bool(bad.any()):
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(
            f"column '{column}' of '{path}' is not numeric: row {row + 1} holds "
            f"{raw.iloc[row]!r}; choose a numeric column"
        )
    return np.asarray(numeric.dropna().to_numpy(dtype=np.float64))


def query_csv(path: Path, spec: QuerySpec) -> QueryAnswer:
    """`answer` on the column `spec.column` of a CSV file (see `read_column`)."""
    return answer(read_column(path, spec.column), spec)


# --- releases -----------------------------------------------------------------------------------


def _release_mean(count: int, total: int, spec: QuerySpec, base: dict[str, Any]) -> QueryAnswer:
    eps, delta = spec.epsilon / 2, spec.delta / 2
    sens = _sum_sensitivity(spec)
    noisy_total, sum_scale = _noisy_scalar(total, sens, spec.mechanism, eps, delta)
    noisy_count, count_scale = _noisy_scalar(count, 1, spec.mechanism, eps, delta)
    unit = 10.0**-spec.scale_decimals
    mean = noisy_total * unit / max(noisy_count, 1)
    value = min(max(mean, spec.lower), spec.upper)
    details = {
        **base,
        "budget_split": "half to the sum, half to the count: (ε/2, δ/2) each, basic composition",
        "noisy_sum": noisy_total * unit,
        "noisy_count": noisy_count,
        "sum_sensitivity": sens * unit,
        "count_noise_scale": count_scale,
        "post_processing": "noisy sum / max(noisy count, 1), clamped to [lower, upper]",
    }
    return _answer(spec, value, sum_scale * unit, details)


def _release_quantile(
    count: int,
    lt: list[int],
    le: list[int],
    spec: QuerySpec,
    base: dict[str, Any],
) -> QueryAnswer:
    assert spec.quantile is not None
    alpha = _alpha(spec.quantile)
    num, den = alpha.numerator, alpha.denominator
    # OpenDP's quantile score (make_quantile_score_candidates), lower is better.
    scores = [abs((den - num) * a - num * (count - b)) for a, b in zip(lt, le, strict=True)]
    if max(scores) >= _INT_LIMIT:
        raise UserError("too many records for quantile scores to fit in 64 bits")
    sens = max(num, den - num)
    scale = _calibrate("select", spec.mechanism, sens, spec.epsilon, spec.delta)
    measurement = _measurement("select", spec.mechanism, scale, spec.delta)
    index = int(measurement(scores))
    candidates = _candidates(spec)
    details = {
        **base,
        "selection": "report-noisy-max over the quantile scores (exponential mechanism)",
        "alpha": f"{num}/{den}",
        "candidates": len(candidates),
        "candidate_spacing": float(candidates[1] - candidates[0]),
        "score_sensitivity": sens,
    }
    return _answer(spec, float(candidates[index]), scale, details)


def _answer(
    spec: QuerySpec, value: float | list[int], scale: float, details: dict[str, Any]
) -> QueryAnswer:
    return QueryAnswer(
        kind=spec.kind,
        value=value,
        epsilon=spec.epsilon,
        delta=spec.delta,
        mechanism=spec.mechanism,
        noise_scale=scale,
        details=details,
    )


# --- OpenDP measurements ------------------------------------------------------------------------

_Shape = Literal["scalar", "vector", "select"]


def _measurement(shape: _Shape, mechanism: str, scale: float, delta: float) -> dp.Measurement:
    """The OpenDP measurement: pure ε-DP for laplace, (ε, δ) from ρ-zCDP for gaussian."""
    zcdp = mechanism == "gaussian"
    if shape == "select":
        space = (dp.vector_domain(dp.atom_domain(T="u64")), dp.linf_distance(T="u64"))
        measure = dp.zero_concentrated_divergence() if zcdp else dp.max_divergence()
        base = dp.m.make_noisy_max(*space, measure, scale=scale, negate=True)
    else:
        if shape == "scalar":
            domain, metric = dp.atom_domain(T="i64"), dp.absolute_distance(T="i64")
        else:
            domain = dp.vector_domain(dp.atom_domain(T="i64"))
            metric = dp.l2_distance(T="i64") if zcdp else dp.l1_distance(T="i64")
        make = dp.m.make_gaussian if zcdp else dp.m.make_laplace
        base = make(domain, metric, scale=scale)
    if zcdp:
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(base), delta)
    return base


@functools.lru_cache(maxsize=512)
def _calibrate(shape: _Shape, mechanism: str, d_in: int, epsilon: float, delta: float) -> float:
    """The noise scale whose OpenDP privacy map gives at most (ε, δ) at sensitivity `d_in`.

    Every mechanism here has a privacy loss that depends on `d_in / scale` only, so the scale is
    found once for sensitivity 1 and multiplied by `d_in`; OpenDP's map then checks the result
    at `d_in` itself (and the scale is nudged up if floating-point rounding says otherwise).
    """
    scale = _unit_scale(shape, mechanism, epsilon, delta) * d_in
    d_out: Any = epsilon if mechanism == "laplace" else (epsilon, delta)
    for _ in range(64):
        if _measurement(shape, mechanism, scale, delta).check(d_in, d_out):
            return scale
        scale = math.nextafter(scale, math.inf) * (1 + 1e-12)
    raise AssertionError(f"no {mechanism} scale meets (ε={epsilon}, δ={delta}) at {d_in}")


@functools.lru_cache(maxsize=256)
def _unit_scale(shape: _Shape, mechanism: str, epsilon: float, delta: float) -> float:
    """The noise scale for sensitivity 1: closed form for laplace, OpenDP's search for gaussian."""
    if mechanism == "laplace":
        # ε = 1/scale, or 2/scale for noisy max over scores that may move in both directions.
        return 2.0 / epsilon if shape == "select" else 1.0 / epsilon

    def make(scale: float) -> dp.Measurement:
        return _measurement(shape, mechanism, scale, delta)

    try:
        return float(dp.binary_search_param(make, d_in=1, d_out=(epsilon, delta)))
    except (dp.OpenDPException, ValueError) as exc:
        raise UserError(
            f"cannot calibrate discrete Gaussian noise for (ε={epsilon}, δ={delta}): "
            f"{str(exc).strip().splitlines()[0]}; choose a more usual ε and δ"
        ) from None


def calibrate(spec: QuerySpec) -> float:
    """The noise scale `release` will use for `spec` (for a mean: the sum's).

    It depends on the spec only, never on the data, so a caller can call it *before* charging a
    ledger: a spec that OpenDP cannot calibrate then fails before any budget is spent.
    """
    if spec.kind == "quantile":
        assert spec.quantile is not None
        alpha = _alpha(spec.quantile)
        sens = max(alpha.numerator, alpha.denominator - alpha.numerator)
        return _calibrate("select", spec.mechanism, sens, spec.epsilon, spec.delta)
    if spec.kind == "histogram":
        return _calibrate("vector", spec.mechanism, 1, spec.epsilon, spec.delta)
    if spec.kind == "count":
        return _calibrate("scalar", spec.mechanism, 1, spec.epsilon, spec.delta)
    if spec.kind == "sum":
        sens = _sum_sensitivity(spec)
        return _calibrate("scalar", spec.mechanism, sens, spec.epsilon, spec.delta)
    sens = _sum_sensitivity(spec)
    _calibrate("scalar", spec.mechanism, 1, spec.epsilon / 2, spec.delta / 2)
    return _calibrate("scalar", spec.mechanism, sens, spec.epsilon / 2, spec.delta / 2)


def _noisy_scalar(
    value: int, sensitivity: int, mechanism: str, epsilon: float, delta: float
) -> tuple[int, float]:
    scale = _calibrate("scalar", mechanism, sensitivity, epsilon, delta)
    return int(_measurement("scalar", mechanism, scale, delta)(value)), scale


def _noisy_vector(
    values: list[int], mechanism: str, epsilon: float, delta: float
) -> tuple[list[int], float]:
    scale = _calibrate("vector", mechanism, 1, epsilon, delta)
    noisy = _measurement("vector", mechanism, scale, delta)(values)
    return [int(v) for v in noisy], scale


def noise_variance(mechanism: MechanismKind, scale: float) -> float:
    """The exact variance of the integer noise with this scale.

    Discrete Laplace with scale t (P(x) ∝ e^{-|x|/t}): 2p/(1-p)^2 with p = e^{-1/t}.
    Discrete Gaussian with parameter σ: Σ x² e^{-x²/2σ²} / Σ e^{-x²/2σ²}, just below σ²
    (Canonne, Kamath, Steinke 2020, Prop. 5); equal to σ² in double precision once σ ≥ 10.
    """
    if mechanism == "laplace":
        p = math.exp(-1.0 / scale)
        return 2.0 * p / (1.0 - p) ** 2
    if scale >= 10:
        return scale**2
    support = np.arange(-math.ceil(40 * scale) - 1, math.ceil(40 * scale) + 2, dtype=np.float64)
    weights = np.exp(-(support**2) / (2 * scale**2))
    return float((support**2 * weights).sum() / weights.sum())


def _variance(mechanism: str, scale: float) -> float:
    return noise_variance("gaussian" if mechanism == "gaussian" else "laplace", scale)


# --- helpers ------------------------------------------------------------------------------------


def _alpha(quantile: float) -> Fraction:
    return Fraction(quantile).limit_denominator(_ALPHA_DENOMINATOR)


def _scaled_bounds(spec: QuerySpec) -> tuple[int, int]:
    factor = 10.0**spec.scale_decimals
    return round(spec.lower * factor), round(spec.upper * factor)


def _sum_sensitivity(spec: QuerySpec) -> int:
    lo, hi = _scaled_bounds(spec)
    return max(abs(lo), abs(hi))


def _candidates(spec: QuerySpec) -> npt.NDArray[np.float64]:
    assert spec.bins is not None
    return np.linspace(spec.lower, spec.upper, spec.bins)


def _shape(spec: QuerySpec) -> tuple[float, float, int | None, float | None, int]:
    return (spec.lower, spec.upper, spec.bins, spec.quantile, spec.scale_decimals)
