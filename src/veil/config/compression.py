"""`[compression]`: 8-bit or top-k client updates, and what they cannot be combined with."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from veil.config.sections import Section

if TYPE_CHECKING:
    from veil.config.run import RunConfig


class CompressionConfig(Section):
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
        # Compared with the default, not with the keys written: a config dumped with
        # `RunConfig.to_dict` (every field) must be accepted again.
        default = type(self).model_fields["fraction"].default
        if self.kind != "topk" and self.fraction != default:
            raise ValueError("fraction applies to kind = 'topk'; remove it")
        return self

    def check_in(self, run: RunConfig) -> None:
        """Compression changes what each upload reveals and how large it can be: it is refused
        where the aggregation, robustness or privacy of `run` relies on the uncompressed form."""
        aggregation = run.secure_aggregation
        if aggregation in ("ckks", "tee"):
            raise ValueError(
                f"[compression] is not available with secure_aggregation = "
                f"'{aggregation}' in this version; use 'plain' or 'secagg'"
            )
        if self.kind == "topk" and aggregation == "secagg":
            raise ValueError(
                "compression kind = 'topk' sends each client's own coordinates, which secure "
                "aggregation's dense masks cannot hide; use kind = 'int8' with secagg"
            )
        if self.kind == "topk" and run.robust is not None:
            raise ValueError(
                "compression kind = 'topk' leaves most coordinates zero, which robust "
                "aggregation would read as agreement; use kind = 'int8' with [robust]"
            )
        client_dp = run.privacy is not None and run.privacy.unit == "client"
        if client_dp and aggregation == "plain" and (self.kind == "int8" or self.error_feedback):
            raise ValueError(
                "with client-level [privacy], int8 rounding and error feedback can make an "
                "upload longer than clip_norm, the sensitivity the server's noise is calibrated "
                "to; use secure_aggregation = 'secagg' (its distributed noise covers the "
                "rounding), or kind = 'topk' with error_feedback = false"
            )
        # Here rather than with [ray]: the residual is compression's state, and a run without
        # error feedback compresses under Ray as anywhere else.
        if run.mode == "ray" and self.error_feedback:
            raise ValueError(
                "compression error_feedback keeps each client's residual between rounds, and "
                "mode = 'ray' does not pin a client to one worker; set error_feedback = false"
            )
