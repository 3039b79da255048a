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


@dataclass
class ClippedBatch:
    """The clipped gradient sum of one batch, per trainable parameter name, and diagnostics."""

    grads: dict[str, torch.Tensor]
    #: Per-sample gradient norms before clipping (diagnostics; never leaves the client).
    norms: torch.Tensor
    loss_sum: float


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
        self._owners = self._rule_owners()
        self.method = "layer-rules" if self._owners is not None else "torch.func"

    def _rule_owners(self) -> dict[str, nn.Module] | None:
        """The supported layer owning each trainable parameter, or None if any has none."""
        owners: dict[str, nn.Module] = {}
        for module_name, module in self.model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if not isinstance(module, _RULE_LAYERS) or pname not in ("weight", "bias"):
                    return None
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    return None
                owners[f"{module_name}.{pname}" if module_name else pname] = module
        return owners

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, clip_norm: float) -> ClippedBatch:
        """Clip every example's gradient to `clip_norm` and sum them; `x` must be non-empty."""
        if self._owners is not None:
            result = self._with_rules(x, y, clip_norm)
            if result is not None:
                return result
        return self._with_vmap(x, y, clip_norm)

    # -- layer rules ---------------------------------------------------------------------

    def _with_rules(self, x: torch.Tensor, y: torch.Tensor, clip: float) -> ClippedBatch | None:
        assert self._owners is not None
        layers = list(dict.fromkeys(self._owners.values()))
        records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in layers}

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            records[module].append((inputs[0].detach(), output))

        handles = [m.register_forward_hook(hook) for m in layers]
        try:
            losses = self.loss(self.model(x), y)
        finally:
            for h in handles:
                h.remove()
        if any(len(r) != 1 for r in records.values()):
            return None  # a layer ran twice (weight sharing) or not at all: use torch.func
        outputs = [records[m][0][1] for m in layers]
        grads_out = torch.autograd.grad(losses.sum(), outputs)
        batch = x.shape[0]
        sq_norms = torch.zeros(batch, dtype=torch.float32)
        # Per layer: either (activation, output-grad) for the ghost rule, or per-sample grads.
        ghost: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        samples: dict[nn.Module, dict[str, torch.Tensor]] = {}
        for module, g in zip(layers, grads_out, strict=True):
            a = records[module][0][0]
            if isinstance(module, nn.Linear) and a.dim() == 2:
                ghost[module] = (a, g)
                if module.weight.requires_grad:
                    sq_norms += a.pow(2).sum(1) * g.pow(2).sum(1)
                if module.bias is not None and module.bias.requires_grad:
                    sq_norms += g.pow(2).sum(1)
            else:
                samples[module] = _per_sample_layer_grads(module, a, g)
                for name, tensor in samples[module].items():
                    if getattr(module, name).requires_grad:
                        sq_norms += tensor.reshape(batch, -1).pow(2).sum(1)
        norms = sq_norms.sqrt()
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)
        out: dict[str, torch.Tensor] = {}
        for pname, module in self._owners.items():
            attr = pname.rsplit(".", 1)[-1]
            if module in ghost:
                a, g = ghost[module]
                scaled = g * factors[:, None]
                out[pname] = scaled.T @ a if attr == "weight" else scaled.sum(0)
            else:
                out[pname] = torch.einsum("b,b...->...", factors, samples[module][attr])
        return ClippedBatch(out, norms, float(losses.detach().sum()))

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
        with torch.no_grad():
            loss_sum = float(self.loss(self.model(x), y).sum())
        return ClippedBatch(grads, norms, loss_sum)


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
