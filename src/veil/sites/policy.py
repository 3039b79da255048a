"""A site's policy: what an organisation's privacy officer accepts, checked by the site itself.

The policy is a TOML file (`policy.toml`) that the site, never the coordinator, reads. The site
checks a job against it before it accepts the job (`job_refusals`: every rule the job breaks,
one line each, in the order of the file), and checks every task of an accepted job again
(`TaskGuard`, which the member process runs before it does a task): a coordinator that asks
for more rounds, more local training, or evaluation metrics the policy forbids gets a refusal
with the reason, which it records.

    # what data it may use: file names inside the site's --data-dir
    datasets = ["loans.csv"]
    submitters = ["risk-team"]             # absent or empty: any submitter
    require_secure_aggregation = true      # secure_aggregation must not be "plain"
    allowed_secure_aggregation = ["secagg", "ckks", "tee"]   # absent: any
    require_dp = false                     # the job must have [privacy]
    allow_test_noise = false               # refuse [privacy] production = false
    max_epsilon_per_job = 3.0              # this site's own ε for the job
    max_delta_per_job = 1e-5
    total_epsilon_per_year = 10.0          # over the site's ledger, last 365 days + this job
    min_clients_per_round = 3              # the smallest round the job may aggregate
    allowed_models = ["logistic", "mlp"]   # absent: any
    max_rounds = 50
    send_evaluation_metrics = false        # no federated evaluation metrics in the clear

The ε rules are about the ε this site is charged for the job (`job_charges`): the same numbers
the coordinator accounts for this member. A job without `[privacy]` has no bound on ε at all,
so every ε and δ rule refuses it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from veil.config import RunConfig
from veil.config.federation import FedProxConfig
from veil.config.model import ModelConfig
from veil.config.sections import one_line
from veil.errors import UserError

if TYPE_CHECKING:
    from veil.federation import TrainingPlan
    from veil.privacy.dp.ledger import PrivacyLedger
    from veil.privacy.dp.policy import Charge, PrivacyPolicy

#: What one year of ledger charges is, for `total_epsilon_per_year`.
YEAR = timedelta(days=365)

#: Slack for sums of floating-point ε (the ledger's own tolerance).
_TOLERANCE = 1e-12

#: The task kinds a member knows (`veil.transport.grpc.client`).
TASK_KINDS = ("fit", "evaluate", "protocol")

_MODEL_NAMES: tuple[str, ...] = get_args(ModelConfig.model_fields["name"].annotation)


class PolicyRefusal(UserError):
    """A job or a task breaks the site's policy: the message names the policy key (or the
    job's setting the task departs from), what the job asks for, and what to ask for instead."""


class SitePolicy(BaseModel):
    """A site's `policy.toml`. Unknown keys are refused; values are strictly typed (a string
    where a number or a boolean belongs is an error, never converted). Every key but
    `datasets` may be left out: an absent limit does not limit."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: The data files a job may use: plain file names inside the site's `--data-dir`.
    datasets: tuple[str, ...] = Field(min_length=1, strict=False)
    #: The certificate names (role "submitter") whose jobs the site takes; empty: anyone's.
    submitters: tuple[str, ...] = Field((), strict=False)
    #: Refuse a job whose `secure_aggregation` is "plain" (the coordinator would see this
    #: site's update itself).
    require_secure_aggregation: bool = False
    #: The `secure_aggregation` backends a job may use; absent: any.
    allowed_secure_aggregation: tuple[str, ...] | None = Field(None, strict=False)
    #: Refuse a job without `[privacy]` (differential privacy).
    require_dp: bool = False
    #: Accept a job whose `[privacy] production = false` (seeded noise, which whoever knows the
    #: seed can reproduce and subtract). Only for test sites.
    allow_test_noise: bool = False
    #: The most ε this site may be charged for one job (its own planned charge).
    max_epsilon_per_job: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: The most δ this site may be charged for one job.
    max_delta_per_job: float | None = Field(None, gt=0, lt=1)
    #: The most ε the data set may be charged over 365 days: what the site's ledger holds for
    #: it from the last 365 days, plus this job's.
    total_epsilon_per_year: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: The fewest clients a round the job aggregates may have (the job's `[federation]
    #: min_clients`: a round with fewer answers is discarded, one with that many is applied).
    min_clients_per_round: int | None = Field(None, ge=1)
    #: The `[model] name`s a job may train; absent: any.
    allowed_models: tuple[str, ...] | None = Field(None, strict=False)
    #: The most `[federation] rounds` a job may plan.
    max_rounds: int | None = Field(None, ge=1)
    #: Send federated evaluation metrics (exact, in the clear). When false, a job with
    #: `[federation] fraction_evaluate > 0` is refused, and so is every evaluate task.
    send_evaluation_metrics: bool = False

    @field_validator("datasets")
    @classmethod
    def _file_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
                raise ValueError(
                    f"{name!r} is not a plain file name; list the files of the site's "
                    "--data-dir by name, without a folder"
                )
        return value

    @field_validator("allowed_secure_aggregation")
    @classmethod
    def _known_backends(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        from veil.assembly.secure_aggregation.registry import names

        for name in value or ():
            if name not in names():
                raise ValueError(f"{name!r} names no backend; use some of {list(names())}")
        return value

    @field_validator("allowed_models")
    @classmethod
    def _known_models(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in value or ():
            if name not in _MODEL_NAMES:
                raise ValueError(f"{name!r} names no model; use some of {list(_MODEL_NAMES)}")
        return value


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site's `policy.toml`. Every problem (missing file, bad TOML, unknown
    key, wrong type, impossible value) raises `UserError`: one line naming the file, the key,
    and what to change."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"site policy not found: '{path}'; pass the path of the privacy officer's "
            "policy.toml (docs/sites.md lists its keys)"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}; fix the policy file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; a site policy is TOML text") from None
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {one_line(exc, SitePolicy)}; fix the policy file") from None


# -- what the job costs this site ----------------------------------------------------------


def own_charges(privacy: PrivacyPolicy | None, dataset_id: str) -> list[Charge]:
    """The charges `privacy` (this member's own policy) plans, each under `dataset_id`; []
    without one. Record level names its charges "ID/MEMBER"; a site keeps its own ledger, in
    which the data set is `dataset_id` itself."""
    if privacy is None:
        return []
    return [replace(charge, dataset_id=dataset_id) for charge in privacy.charges(dataset_id)]


def job_charges(config: RunConfig, site: str, n_train: int, dataset_id: str) -> list[Charge]:
    """This site's own planned charges for the job, from the job's config and the size of its
    training set: the same ε and δ the coordinator accounts for this member (record level: its
    DP-SGD; client level: the federation's DP-FedAvg). [] for a job without `[privacy]`;
    `ConfigError` when the job's target cannot be met."""
    from veil.assembly.model import training_plan
    from veil.assembly.privacy import member_privacy

    return own_charges(member_privacy(config, site, n_train, training_plan(config)), dataset_id)


def year_spent(ledger: PrivacyLedger, dataset_id: str, *, now: datetime | None = None) -> float:
    """The ε charged to `dataset_id` in the 365 days before `now` (default: the current time),
    released or not (an unreleased charge may be a release that crashed half-way). A charge
    dated after `now` counts too."""
    since = (now or datetime.now(UTC)) - YEAR
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    spent = []
    for charge in ledger.charges(dataset_id):
        at = datetime.fromisoformat(charge.charged_at)
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        if at > since:
            spent.append(charge.epsilon)
    return math.fsum(spent)


# -- the job -------------------------------------------------------------------------------


def _toml(value: object) -> str:
    """A policy value as the file writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names)


class _Job:
    """One job as the rules see it: its config, who submitted it, which file, what it costs."""

    def __init__(
        self,
        config: RunConfig,
        submitter: str | None,
        data_file: str,
        charges: Sequence[Charge],
        spent_this_year: float,
    ) -> None:
        self.config = config
        self.submitter = submitter
        self.data_file = data_file
        self.epsilon = math.fsum(c.epsilon for c in charges)
        self.delta = math.fsum(c.delta for c in charges)
        self.dataset = charges[0].dataset_id if charges else data_file
        self.spent_this_year = spent_this_year
        self.dp = config.privacy is not None


def _unbounded(key: str, limit: object) -> str:
    return (
        f"policy {key} = {_toml(limit)}: the job has no [privacy], so nothing bounds what it "
        "reveals of this site's data; ask for a job with differential privacy"
    )


def _data_rules(p: SitePolicy, job: _Job) -> list[str]:
    out = []
    if job.data_file not in p.datasets:
        out.append(
            f"policy datasets = {_toml(p.datasets)}: the job asks for '{job.data_file}', which "
            "this site does not offer; ask for one of the listed files"
        )
    if p.submitters and job.submitter is not None and job.submitter not in p.submitters:
        out.append(
            f"policy submitters = {_toml(p.submitters)}: '{job.submitter}' may not submit jobs "
            f"to this site; ask one of {_listed(p.submitters)} to submit it"
        )
    return out


def _protection_rules(p: SitePolicy, job: _Job) -> list[str]:
    out = []
    aggregation = job.config.secure_aggregation
    if p.require_secure_aggregation and aggregation == "plain":
        out.append(
            "policy require_secure_aggregation = true: the job's secure_aggregation is 'plain', "
            "so the coordinator would see this site's update; ask for a secure-aggregation "
            "backend (secagg, ckks or tee)"
        )
    allowed = p.allowed_secure_aggregation
    if allowed is not None and aggregation not in allowed:
        out.append(
            f"policy allowed_secure_aggregation = {_toml(allowed)}: the job's "
            f"secure_aggregation is '{aggregation}'; ask for one of {_listed(allowed)}"
        )
    if p.require_dp and not job.dp:
        out.append(
            "policy require_dp = true: the job has no [privacy]; ask for a job with "
            "differential privacy"
        )
    privacy = job.config.privacy
    if not p.allow_test_noise and privacy is not None and not privacy.production:
        out.append(
            "policy allow_test_noise = false: the job's [privacy] production = false (seeded "
            "noise, which whoever knows the seed can subtract); ask for production = true"
        )
    return out


def _budget_rules(p: SitePolicy, job: _Job) -> list[str]:
    out = []
    if p.max_epsilon_per_job is not None:
        if not job.dp:
            out.append(_unbounded("max_epsilon_per_job", p.max_epsilon_per_job))
        elif job.epsilon > p.max_epsilon_per_job + _TOLERANCE:
            out.append(
                f"policy max_epsilon_per_job = {_toml(p.max_epsilon_per_job)}: this job would "
                f"spend ε = {job.epsilon:.4g} of {job.dataset}; ask for a smaller [privacy] "
                "epsilon, or fewer rounds or local epochs"
            )
    if p.max_delta_per_job is not None:
        if not job.dp:
            out.append(_unbounded("max_delta_per_job", p.max_delta_per_job))
        elif job.delta > p.max_delta_per_job + _TOLERANCE:
            out.append(
                f"policy max_delta_per_job = {_toml(p.max_delta_per_job)}: this job would "
                f"spend δ = {job.delta:.4g} of {job.dataset}; ask for a smaller [privacy] delta"
            )
    total = p.total_epsilon_per_year
    if total is not None:
        if not job.dp:
            out.append(_unbounded("total_epsilon_per_year", total))
        elif job.spent_this_year + job.epsilon > total + _TOLERANCE:
            out.append(
                f"policy total_epsilon_per_year = {_toml(total)}: {job.dataset} was charged "
                f"ε = {job.spent_this_year:.4g} in the last 365 days and this job would add "
                f"ε = {job.epsilon:.4g} (total {job.spent_this_year + job.epsilon:.4g}); ask "
                "for a smaller [privacy] epsilon, or wait until earlier charges are a year old"
            )
    return out


def _shape_rules(p: SitePolicy, job: _Job) -> list[str]:
    out = []
    f = job.config.federation
    if p.min_clients_per_round is not None and f.min_clients < p.min_clients_per_round:
        out.append(
            f"policy min_clients_per_round = {p.min_clients_per_round}: the job may aggregate "
            f"a round of {f.min_clients} client{'s' if f.min_clients > 1 else ''} "
            f"([federation] min_clients = {f.min_clients}); ask for min_clients >= "
            f"{p.min_clients_per_round}"
        )
    model = job.config.model.name
    if p.allowed_models is not None and model not in p.allowed_models:
        out.append(
            f"policy allowed_models = {_toml(p.allowed_models)}: the job trains model "
            f"'{model}'; ask for one of {_listed(p.allowed_models)}"
        )
    if p.max_rounds is not None and f.rounds > p.max_rounds:
        out.append(
            f"policy max_rounds = {p.max_rounds}: the job plans {f.rounds} rounds; ask for "
            f"at most {p.max_rounds}"
        )
    if not p.send_evaluation_metrics and f.fraction_evaluate > 0:
        out.append(
            "policy send_evaluation_metrics = false: the job asks for federated evaluation "
            f"(fraction_evaluate = {f.fraction_evaluate:g}), whose metrics would leave this "
            "site in the clear; ask for fraction_evaluate = 0"
        )
    return out


def job_refusals(
    policy: SitePolicy,
    config: RunConfig,
    *,
    submitter: str | None,
    data_file: str,
    charges: Sequence[Charge],
    spent_this_year: float,
) -> list[str]:
    """Every rule of `policy` the job breaks, one line each (naming the key, what the job asks
    for and what to ask for instead), in the order of the file; [] when the site may accept it.

    `data_file` is the file name the job uses in the site's data folder; `charges` this site's
    own planned charges (`job_charges`); `spent_this_year` what its ledger holds for the data
    set from the last 365 days (`year_spent`). `submitter` None: no submitter to check (a
    member its own operator started, `veil client --policy`)."""
    job = _Job(config, submitter, data_file, charges, spent_this_year)
    rules: list[Callable[[SitePolicy, _Job], list[str]]] = [
        _data_rules,
        _protection_rules,
        _budget_rules,
        _shape_rules,
    ]
    return [line for rule in rules for line in rule(policy, job)]


def member_guard(
    path: Path, config: RunConfig, *, data_file: str, privacy: PrivacyPolicy | None
) -> TaskGuard:
    """What `veil client --policy PATH` runs before it joins: load the policy, refuse the job
    (`PolicyRefusal`, every broken rule in one line) unless it complies, and return the guard
    of its tasks. `privacy` is the member's own policy. Without a submitter or a ledger, the
    submitters rule is not checked and the year's total is checked against this job alone."""
    policy = load_policy(path)
    refusals = job_refusals(
        policy,
        config,
        submitter=None,
        data_file=data_file,
        charges=own_charges(privacy, data_file),
        spent_this_year=0.0,
    )
    if refusals:
        raise PolicyRefusal(
            f"this site's policy '{path}' refuses the job: {'; '.join(refusals)}; nothing was "
            "sent to the coordinator"
        )
    return TaskGuard(policy, config)


# -- every task ----------------------------------------------------------------------------


class TaskGuard:
    """Checks each task of an accepted job before the member does it (`run_client`'s
    `task_guard`): raises `PolicyRefusal`, which the member sends as its refusal of the task.

    Refused: any task for a round beyond the job's `[federation] rounds` or the policy's
    `max_rounds`; a fit whose plan departs from the job's (`training_plan`, with the round's
    decayed learning rate, FedProx's mu and client-level DP's clipping): more local epochs, a
    smaller batch or a larger step would spend more ε than the site accepted; an evaluate task
    when `send_evaluation_metrics` is false; a task kind the member does not know. A fit for a
    round already fitted is allowed (a coordinator that restarts runs an interrupted round
    again); `fitted_rounds` holds the distinct rounds fitted.
    """

    def __init__(self, policy: SitePolicy, config: RunConfig) -> None:
        from veil.assembly.model import training_plan

        self.policy = policy
        self.config = config
        self.plan: TrainingPlan = training_plan(config)
        rounds = config.federation.rounds
        if policy.max_rounds is not None and policy.max_rounds < rounds:
            self.last_round = policy.max_rounds
            self._limit = f"policy max_rounds = {policy.max_rounds}"
        else:
            self.last_round = rounds
            self._limit = f"the job's [federation] rounds = {rounds}"
        self.fitted_rounds: set[int] = set()

    def __call__(self, kind: str, meta: Mapping[str, Any]) -> None:
        round_ = meta.get("round")
        if isinstance(round_, bool) or not isinstance(round_, int):
            raise PolicyRefusal(
                f"the {kind} task carries no round number ({round_!r}); refused: this site "
                "checks every task's round against its policy"
            )
        if kind not in TASK_KINDS:
            raise PolicyRefusal(
                f"task kind '{kind}' is none that this site knows ({', '.join(TASK_KINDS)}); "
                "refused: update Veil on this site if the coordinator's is newer"
            )
        if kind == "evaluate" and not self.policy.send_evaluation_metrics:
            raise PolicyRefusal(
                "policy send_evaluation_metrics = false: this site sends no federated "
                f"evaluation metrics; the evaluate task of round {round_} is refused (run the "
                "job with fraction_evaluate = 0)"
            )
        if round_ > self.last_round or (kind == "fit" and round_ < 1):
            raise PolicyRefusal(
                f"{self._limit}: the coordinator asks for a {kind} task of round {round_}, "
                f"outside rounds 1..{self.last_round} that this site accepted; refused"
            )
        if kind == "fit":
            self._check_plan(meta.get("plan"), round_)
            self.fitted_rounds.add(round_)

    def expected_plan(self, round_: int) -> TrainingPlan:
        """The plan of round `round_` as the coordinator derives it from the job's config."""
        f = self.config.federation
        strategy = self.config.strategy
        privacy = self.config.privacy
        clip = privacy.clip_norm if privacy is not None and privacy.unit == "client" else None
        return replace(
            self.plan,
            learning_rate=self.plan.learning_rate * f.learning_rate_decay ** max(round_ - 1, 0),
            proximal_mu=strategy.mu if isinstance(strategy, FedProxConfig) else 0.0,
            update_clip_norm=clip,
        )

    def _check_plan(self, raw: object, round_: int) -> None:
        from veil.federation import TrainingPlan

        try:
            if not isinstance(raw, Mapping):
                raise TypeError("not a table")
            got = TrainingPlan(**raw)
        except (TypeError, ValueError) as exc:
            raise PolicyRefusal(
                f"the fit task of round {round_} carries a malformed training plan ({exc}); "
                "refused: this site trains only by the plan of the job it accepted"
            ) from None
        want = self.expected_plan(round_)
        adaptive = self.config.privacy is not None and self.config.privacy.target_quantile
        for field in fields(want):
            if field.name == "base_model":
                continue  # the member's runner checks it against its own model
            if field.name == "update_clip_norm" and adaptive:
                # Adaptive clipping moves the norm every round; it must still clip.
                if got.update_clip_norm is None or not got.update_clip_norm > 0:
                    raise self._departs(round_, field.name, "a positive norm", None)
                continue
            asked, planned = getattr(got, field.name), getattr(want, field.name)
            if not _same(asked, planned):
                raise self._departs(round_, field.name, planned, asked)

    def _departs(self, round_: int, name: str, planned: object, asked: object) -> PolicyRefusal:
        return PolicyRefusal(
            f"the fit task of round {round_} asks for {name} = {asked!r}, but the job this "
            f"site accepted plans {planned!r} for that round (a plan other than the accepted "
            "one may spend more ε than the site agreed to); refused: run the job as submitted"
        )


def _same(asked: object, planned: object) -> bool:
    """Equal, numbers to a relative 1e-9 (the plan travels as JSON); bools and None exactly."""
    numbers = (int, float)
    if (
        isinstance(asked, numbers)
        and isinstance(planned, numbers)
        and not isinstance(asked, bool)
        and not isinstance(planned, bool)
    ):
        return math.isclose(asked, planned, rel_tol=1e-9, abs_tol=0.0)
    return asked == planned and type(asked) is type(planned)
