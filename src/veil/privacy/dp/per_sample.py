"""Clipped sums of per-sample gradients, the core computation of DP-SGD.

For each example i the gradient gᵢ of its own loss is clipped to norm C, and only the sum
Σ min(1, C/‖gᵢ‖)·gᵢ is returned. Two implementations:

- **Layer rules** (default, fast): forward hooks record each trainable layer's input aᵢ and the
  backward pass returns the gradient bᵢ of the summed loss with respect to the layer's output.
  For a linear layer on one position per example the per-sample norm needs no per-sample
  gradient at all: ‖bᵢ aᵢᵀ‖² = ‖aᵢ‖²‖bᵢ‖² (Goodfellow 2015, "Efficient Per-Example Gradient
  Computations"), and the clipped sum is one matrix product (the "ghost clipping" of Li et al.
  2022, "Large Language Models Can Be Strong Differentially Private Learners"). Linear layers on
  sequences and 2-D convolutions materialise per-sample weight gradients with one `einsum`.
- **torch.func** (any model): `vmap(grad(...))` materialises every per-sample gradient. Used when
  a trainable parameter belongs to a layer without a rule, or a layer runs twice in one forward.

Both give the same result (tests compare them); every trainable parameter gets its per-sample
gradient either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

_RULE_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class _Layer:
    """A layer with a per-sample rule and the full names of its trainable parameters."""

    module: nn.Module
    linear: bool
    weight: str | None
    bias: str | None


@dataclass
class ClippedBatch:
    """The clipped gradient sum of one batch, per trainable parameter name, and diagnostics."""

    grads: dict[str, torch.Tensor]
    #: Per-sample gradient norms before clipping (diagnostics; never leaves the client).
    norms: torch.Tensor


class PerSampleClipper:
    """Computes Σᵢ clip_C(∇ℓ(xᵢ, yᵢ)) for a model and a loss."""

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        #: Per-example loss (reduction "none"); default cross-entropy.
        self.loss = loss or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._plan = self._rule_plan()
        self.method = "layer-rules" if self._plan is not None else "torch.func"
        self._records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        # Hooks stay registered (cheap when idle) rather than being added on every batch.
        self._handles = [
            layer.module.register_forward_hook(self._record) for layer in self._plan or []
        ]

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        if self._records is not None:
            self._records[module].append((inputs[0].detach(), output))  # type: ignore[arg-type]

    def close(self) -> None:
        """Remove the forward hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _rule_plan(self) -> list[_Layer] | None:
        """One entry per layer with trainable parameters, or None if a layer has no rule."""
        plan: list[_Layer] = []
        for module_name, module in self.model.named_modules():
            trainable = {
                pname: f"{module_name}.{pname}" if module_name else pname
                for pname, p in module.named_parameters(recurse=False)
                if p.requires_grad
            }
            if not trainable:
                continue
            if not isinstance(module, _RULE_LAYERS) or set(trainable) - {"weight", "bias"}:
                return None
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                return None
            plan.append(
                _Layer(
                    module,
                    isinstance(module, nn.Linear),
                    trainable.get("weight"),
                    trainable.get("bias"),
                )
            )
        return plan

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, clip_norm: float) -> ClippedBatch:
        """Clip every example's gradient to `clip_norm` and sum them; `x` must be non-empty."""
        if self._plan is not None:
            result = self._with_rules(x, y, clip_norm)
            if result is not None:
                return result
        return self._with_vmap(x, y, clip_norm)

    # -- layer rules ---------------------------------------------------------------------

    def _with_rules(self, x: torch.Tensor, y: torch.Tensor, clip: float) -> ClippedBatch | None:
        assert self._plan is not None
        plan = self._plan
        records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {
            layer.module: [] for layer in plan
        }
        self._records = records
        try:
            losses = self.loss(self.model(x), y)
        finally:
            self._records = None
        if any(len(r) != 1 for r in records.values()):
            return None  # a layer ran twice (weight sharing) or not at all: use torch.func
        grads_out = torch.autograd.grad(
            losses.sum(), [records[layer.module][0][1] for layer in plan]
        )
        batch = x.shape[0]
        sq_norms = torch.zeros(batch, dtype=torch.float32)
        # Per layer: (activation, output-grad) for the ghost rule, or per-sample gradients.
        parts: list[tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]] = []
        for layer, g in zip(plan, grads_out, strict=True):
            a = records[layer.module][0][0]
            if layer.linear and a.dim() == 2:
                parts.append((a, g))
                weight_sq = (a * a).sum(1) if layer.weight else 0.0
                sq_norms += (g * g).sum(1) * (weight_sq + (1.0 if layer.bias else 0.0))
            else:
                per = _per_sample_layer_grads(layer.module, a, g)
                parts.append(per)
                for attr, name in (("weight", layer.weight), ("bias", layer.bias)):
                    if name is not None:
                        sq_norms += per[attr].reshape(batch, -1).pow(2).sum(1)
        norms = sq_norms.sqrt()
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)
        out: dict[str, torch.Tensor] = {}
        for layer, part in zip(plan, parts, strict=True):
            if isinstance(part, tuple):
                a, g = part
                scaled = g * factors[:, None]
                if layer.weight:
                    out[layer.weight] = scaled.T @ a
                if layer.bias:
                    out[layer.bias] = scaled.sum(0)
            else:
                for attr, name in (("weight", layer.weight), ("bias", layer.bias)):
                    if name is not None:
                        out[name] = torch.einsum("b,b...->...", factors, part[attr])
        return ClippedBatch(out, norms)

    # -- torch.func fallback ---------------------------------------------------------------

    def _with_vmap(self, x: torch.Tensor, y: torch.Tensor, clip: float) -> ClippedBatch:
        params = {n: p.detach() for n, p in self.params.items()}
        buffers = dict(self.model.named_buffers())

        def one_loss(
            p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
        ) -> torch.Tensor:
            out = functional_call(self.model, (p, buffers), (xi.unsqueeze(0),))
            return self.loss(out, yi.unsqueeze(0)).sum()

        per = vmap(grad(one_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)
        batch = x.shape[0]
        sq = sum(t.reshape(batch, -1).pow(2).sum(1) for t in per.values())
        norms = torch.as_tensor(sq).sqrt()
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)
        grads = {n: torch.einsum("b,b...->...", factors, t) for n, t in per.items()}
        return ClippedBatch(grads, norms)


def _per_sample_layer_grads(
    module: nn.Module, a: torch.Tensor, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample weight and bias gradients of one Linear (any rank) or Conv2d layer."""
    batch = a.shape[0]
    if isinstance(module, nn.Linear):
        a3 = a.reshape(batch, -1, a.shape[-1])
        g3 = g.reshape(batch, -1, g.shape[-1])
        per = {"weight": torch.einsum("bto,bti->boi", g3, a3)}
        if module.bias is not None:
            per["bias"] = g3.sum(1)
        return per
    assert isinstance(module, nn.Conv2d)
    cols = F.unfold(
        a,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,  # type: ignore[arg-type]
        stride=module.stride,
    )
    g2 = g.reshape(batch, g.shape[1], -1)
    weight = torch.einsum("bol,bkl->bok", g2, cols).reshape(batch, *module.weight.shape)
    per = {"weight": weight}
    if module.bias is not None:
        per["bias"] = g2.sum(2)
    return per
