"""Clipped sums of per-sample gradients, the core computation of DP-SGD.

For each example i the gradient gᵢ of its own loss is clipped to norm C, and only the sum
Σ min(1, C/‖gᵢ‖)·gᵢ is returned. Three implementations, the first that applies is used:

- **Fused linear chain** (fastest; MLPs and logistic regression trained with the default
  cross-entropy): when the model's forward, traced with `torch.fx`, is a straight chain of
  `nn.Linear` layers and elementwise activations (ReLU, tanh, sigmoid, leaky ReLU, GELU, SiLU),
  the forward and backward passes are written out without autograd: each layer's input aᵢ and
  output gradient bᵢ come from a handful of matrix products, the per-sample norm from
  ‖aᵢ‖²‖bᵢ‖² as below, and each clipped weight sum is one `addmm` straight into the caller's
  buffer. On a small MLP, autograd and per-call overhead cost more than the arithmetic.
- **Layer rules** (any model whose trainable layers are Linear and Conv2d): forward hooks record
  each trainable layer's input aᵢ and the backward pass returns the gradient bᵢ of the summed
  loss with respect to the layer's output.
  For a linear layer on one position per example the per-sample norm needs no per-sample
  gradient at all: ‖bᵢ aᵢᵀ‖² = ‖aᵢ‖²‖bᵢ‖² (Goodfellow 2015, "Efficient Per-Example Gradient
  Computations"), and the clipped sum is one matrix product (the "ghost clipping" of Li et al.
  2022, "Large Language Models Can Be Strong Differentially Private Learners"). Linear layers on
  sequences and 2-D convolutions materialise per-sample weight gradients with one `einsum`.
- **torch.func** (any model): `vmap(grad(...))` materialises every per-sample gradient. Used when
  a trainable parameter belongs to a layer without a rule, or a layer runs twice in one forward.

All give the same result (tests compare them); every trainable parameter gets its per-sample
gradient either way.

**Extreme records.** Each path first computes the per-sample norms in the model's float32. A
record with huge values (a CSV feature of 1e25, say) would overflow there: its squared norm is
inf, and inf·0 or inf − inf gives NaN, which would poison the whole clipped sum. So every batch
checks the largest norm (one reduction); only if it is not finite or above `_SAFE_NORM` are the
flagged examples redone from their float32 per-sample quantities (layer inputs and output
gradients, or per-sample gradients) in float64, where squares of float32 values cannot overflow:
they are clipped to exactly C like any other. An example whose per-sample quantities are not
finite (the float32 forward or backward pass itself overflowed on it) contributes zero, and is
counted in `PerSampleClipper.nonfinite` on the client; the count is never sent. Either way each
example still adds a vector of norm at most C, so the sensitivity, and the guarantee, are those
of ordinary clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call, grad, vmap

_RULE_LAYERS = (nn.Linear, nn.Conv2d)

#: Per-sample norms above this, or not finite, are recomputed in float64 (module docstring). Far
#: above any real gradient norm; below it every float32 square and sum was finite and the factor
#: C/‖g‖ is a normal float32 for any C above 1e-19.
_SAFE_NORM = 1e18


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
    #: Per-sample gradient norms before clipping (diagnostics; never leaves the client): inf
    #: where the norm is beyond float32's range (still clipped exactly), NaN where the gradient
    #: was not finite (it contributed zero).
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
        linear_only = bool(self._plan) and all(layer.linear for layer in self._plan or [])
        self._chain = _linear_chain(model, self.params) if loss is None and linear_only else None
        #: The implementation used (the module docstring's three): the first that applies.
        self.method = (
            "fused-linear"
            if self._chain is not None
            else "layer-rules"
            if self._plan is not None
            else "torch.func"
        )
        self._records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        # Registered on the first use of the layer rules, then kept (cheap when idle) rather
        # than added on every batch.
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._eye: torch.Tensor | None = None  # one-hot rows for the fused cross-entropy
        #: Examples whose per-sample gradient was not finite and so contributed zero, over the
        #: clipper's life. Kept on the client for its own logs; never part of an update.
        self.nonfinite = 0

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
            if not all(
                name in self.params and self.params[name] is getattr(module, pname)
                for pname, name in trainable.items()
            ):
                return None  # a tensor tied between layers: its per-sample parts must be summed
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
        if self._chain is not None:
            out = [torch.zeros_like(p) for p in self.params.values()]
            norms = self._fused(x, y, clip_norm, out, 1.0)
            if norms is not None:
                return ClippedBatch(dict(zip(self.params, out, strict=True)), norms)
        return self._generic(x, y, clip_norm)

    def add_clipped_sum(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        clip_norm: float,
        out: Sequence[torch.Tensor],
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Add `scale` · Σᵢ clip_C(∇ℓ(xᵢ, yᵢ)) into `out` (one tensor per trainable parameter, in
        the order of `params`), in place; return the per-sample norms. `x` must be non-empty.

        The same sum as `clipped_sum`, without materialising it where the fused path applies.
        """
        if self._chain is not None:
            norms = self._fused(x, y, clip_norm, out, scale)
            if norms is not None:
                return norms
        batch = self._generic(x, y, clip_norm)
        torch._foreach_add_(list(out), [batch.grads[n] for n in self.params], alpha=scale)
        return batch.norms

    def _generic(self, x: torch.Tensor, y: torch.Tensor, clip_norm: float) -> ClippedBatch:
        if self._plan is not None:
            result = self._with_rules(x, y, clip_norm)
            if result is not None:
                return result
        return self._with_vmap(x, y, clip_norm)

    # -- fused linear chain ----------------------------------------------------------------

    def _fused(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        clip: float,
        out: Sequence[torch.Tensor],
        scale: float,
    ) -> torch.Tensor | None:
        """The fused path; None where this batch does not qualify (then nothing was added)."""
        chain = self._chain
        assert chain is not None
        if not self.model.training or y.dim() != 1 or y.dtype != torch.int64:
            return None  # eval-mode branches were not traced; soft labels need the real loss
        a = (x.flatten(1) if chain.flatten else x).detach()
        if a.dim() != 2:
            return None  # a sequence per example: the layer rules handle it
        # Detached parameters: nothing here records an autograd graph (cheaper than no_grad).
        weights = [layer.module.weight.detach() for layer in chain.layers]
        biases = [layer.module.bias for layer in chain.layers]
        for act in chain.prefix:
            a = act.forward(a)
        # Forward: each layer's input, and each activation's (input, output).
        inputs: list[torch.Tensor] = []
        saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for layer, weight, bias in zip(chain.layers, weights, biases, strict=True):
            inputs.append(a)
            a = F.linear(a, weight, None if bias is None else bias.detach())
            pairs = []
            for act in layer.acts:
                b = act.forward(a)
                pairs.append((a, b))
                a = b
            saved.append(pairs)
        # d(Σᵢ ℓᵢ)/d logits = softmax − one-hot, for cross-entropy on class indices.
        g = torch.softmax(a, 1)
        eye = self._eye
        if (
            eye is None
            or eye.shape[0] != g.shape[1]
            or eye.dtype != g.dtype
            or eye.device != g.device
        ):
            eye = self._eye = torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
        try:
            g.sub_(torch.index_select(eye, 0, y))
        except (IndexError, RuntimeError):
            return None  # a label outside [0, classes), e.g. ignore_index: the real loss
        # Backward: the gradient of the summed loss with respect to each layer's output.
        outputs: list[torch.Tensor] = [g] * len(chain.layers)
        for i in range(len(chain.layers) - 1, chain.lowest - 1, -1):
            for act, (pre, post) in zip(
                reversed(chain.layers[i].acts), reversed(saved[i]), strict=True
            ):
                g = act.backward(g, pre, post)
            outputs[i] = g
            if i > chain.lowest:
                g = g.mm(weights[i])
        norms = _chain_norms(chain, inputs, outputs)
        if not float(norms.max()) <= _SAFE_NORM:  # NaN fails the comparison too
            sums, norms = self._extreme_rows(
                norms, lambda rows, dtype: self._chain_rows(inputs, outputs, clip, rows, dtype)
            )
            torch._foreach_add_(list(out), [sums[n] for n in self.params], alpha=scale)
            return norms
        factors = (norms + 1e-6).reciprocal_().mul_(clip).clamp_(max=1.0)
        _chain_sums(chain, inputs, outputs, factors, out, scale)
        return norms

    def _chain_rows(
        self,
        inputs: list[torch.Tensor],
        outputs: list[torch.Tensor],
        clip: float,
        rows: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The fused path's clipped sum and norms over `rows` only, computed in `dtype`."""
        chain = self._chain
        assert chain is not None
        ins = [t.index_select(0, rows).to(dtype) for t in inputs]
        outs = [t.index_select(0, rows).to(dtype) for t in outputs]
        checked = [outs[i] for i in chain.trainable]
        checked += [ins[i] for i in chain.trainable if chain.layers[i].weight is not None]
        finite = _finite_rows(checked, len(rows))
        if not bool(finite.all()):
            ins = [_zero_rows(t, finite) for t in ins]
            outs = [_zero_rows(t, finite) for t in outs]
        norms = _chain_norms(chain, ins, outs)
        factors = (clip / (norms + 1e-6)).clamp_(max=1.0)
        sums = [torch.zeros_like(p, dtype=dtype) for p in self.params.values()]
        _chain_sums(chain, ins, outs, factors, sums, 1.0)
        return dict(zip(self.params, sums, strict=True)), norms.masked_fill_(~finite, math.nan)

    # -- extreme records -------------------------------------------------------------------

    def _extreme_rows(
        self,
        norms: torch.Tensor,
        clip_rows: Callable[
            [torch.Tensor, torch.dtype], tuple[dict[str, torch.Tensor], torch.Tensor]
        ],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The clipped sum and norms of a batch whose float32 norms (`norms`) are not all finite
        and safe: the ordinary examples again in float32, the flagged ones in float64, each by
        `clip_rows(row indices, dtype)`, which gives (sums, norms) and a NaN norm for an example
        that is not finite and so contributes zero (counted in `nonfinite`)."""
        flagged = ~(norms <= _SAFE_NORM)
        extreme = flagged.nonzero().squeeze(1)
        sums, extreme_norms = clip_rows(extreme, torch.float64)
        self.nonfinite += int(extreme_norms.isnan().sum())
        merged = norms.clone()
        merged[extreme] = extreme_norms.to(norms.dtype)
        ordinary = (~flagged).nonzero().squeeze(1)
        if len(ordinary) == 0:
            return {n: t.to(norms.dtype) for n, t in sums.items()}, merged
        ordinary_sums, _ = clip_rows(ordinary, norms.dtype)
        return {n: t.add_(sums[n].to(t.dtype)) for n, t in ordinary_sums.items()}, merged

    # -- layer rules ---------------------------------------------------------------------

    def _with_rules(self, x: torch.Tensor, y: torch.Tensor, clip: float) -> ClippedBatch | None:
        assert self._plan is not None
        plan = self._plan
        if not self._handles:
            self._handles = [layer.module.register_forward_hook(self._record) for layer in plan]
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
        raw = [(records[layer.module][0][0], g) for layer, g in zip(plan, grads_out, strict=True)]
        out, norms = _rules_clip(plan, raw, clip, x.shape[0])
        if not float(norms.max()) <= _SAFE_NORM:  # NaN fails the comparison too
            out, norms = self._extreme_rows(
                norms, lambda rows, dtype: _rules_rows(plan, raw, clip, rows, dtype)
            )
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
        grads, norms = _clip_per_sample(per, clip)
        if not float(norms.max()) <= _SAFE_NORM:  # NaN fails the comparison too
            grads, norms = self._extreme_rows(
                norms, lambda rows, dtype: _per_sample_rows(per, clip, rows, dtype)
            )
        return ClippedBatch(grads, norms)


def _clip_per_sample(
    per: dict[str, torch.Tensor], clip: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The clipped sum and the norms of materialised per-sample gradients."""
    sq = sum(_row_norms(t).square_() for t in per.values())
    norms = torch.as_tensor(sq).sqrt()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factors, t) for n, t in per.items()}, norms


def _per_sample_rows(
    per: dict[str, torch.Tensor], clip: float, rows: torch.Tensor, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`_clip_per_sample` over `rows` only, in `dtype`; a NaN norm where not finite."""
    part = {n: t.index_select(0, rows).to(dtype) for n, t in per.items()}
    finite = _finite_rows(list(part.values()), len(rows))
    if not bool(finite.all()):
        part = {n: _zero_rows(t, finite) for n, t in part.items()}
    grads, norms = _clip_per_sample(part, clip)
    return grads, norms.masked_fill_(~finite, math.nan)


def _rules_clip(
    plan: list[_Layer], raw: list[tuple[torch.Tensor, torch.Tensor]], clip: float, batch: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The layer rules' clipped sum and norms, from each layer's (input, output gradient)."""
    like = raw[0][1] if raw else torch.zeros(())
    sq_norms = torch.zeros(batch, dtype=like.dtype, device=like.device)
    # Per layer: (activation, output-grad) for the ghost rule, or per-sample gradients.
    parts: list[tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]] = []
    for layer, (a, g) in zip(plan, raw, strict=True):
        if layer.linear and a.dim() == 2:
            parts.append((a, g))
            weight_sq = (a * a).sum(1) if layer.weight else 0.0
            sq_norms += (g * g).sum(1) * (weight_sq + (1.0 if layer.bias else 0.0))
        else:
            per = _per_sample_layer_grads(layer.module, a, g)
            parts.append(per)
            for attr, name in (("weight", layer.weight), ("bias", layer.bias)):
                if name is not None:
                    sq_norms += _row_norms(per[attr]).square_()
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
    return out, norms


def _rules_rows(
    plan: list[_Layer],
    raw: list[tuple[torch.Tensor, torch.Tensor]],
    clip: float,
    rows: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`_rules_clip` over `rows` only, in `dtype`; a NaN norm where not finite."""
    part = [(a.index_select(0, rows).to(dtype), g.index_select(0, rows).to(dtype)) for a, g in raw]
    checked = [g for _, g in part]
    checked += [a for layer, (a, _) in zip(plan, part, strict=True) if layer.weight]
    finite = _finite_rows(checked, len(rows))
    if not bool(finite.all()):
        part = [(_zero_rows(a, finite), _zero_rows(g, finite)) for a, g in part]
    out, norms = _rules_clip(plan, part, clip, len(rows))
    return out, norms.masked_fill_(~finite, math.nan)


def _chain_norms(
    chain: _Chain, inputs: list[torch.Tensor], outputs: list[torch.Tensor]
) -> torch.Tensor:
    """Per-sample gradient norms of a fused chain, from each layer's input and output gradient.

    Σₗ ‖bᵢ‖²·(‖aᵢ‖² + 1 if bias): every row's sum of squares of every layer's b and a at once, as
    one product with a 0/1 selector matrix.
    """
    parts = [outputs[i] for i in chain.trainable]
    parts += [inputs[i] for i in chain.trainable if chain.layers[i].weight is not None]
    both = torch.cat(parts, 1)
    selector = chain.selector
    if selector.dtype != both.dtype or selector.device != both.device:
        selector = selector.to(both.device, both.dtype)
    sums = (both * both).mm(selector)
    width = len(chain.trainable)
    bias_flags = chain.bias_flags
    if bias_flags.dtype != both.dtype or bias_flags.device != both.device:
        bias_flags = bias_flags.to(both.device, both.dtype)
    sq = (sums[:, :width] * sums[:, width:].add_(bias_flags)).sum(1)
    return sq.sqrt_()


def _chain_sums(
    chain: _Chain,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    factors: torch.Tensor,
    out: Sequence[torch.Tensor],
    scale: float,
) -> None:
    """Add `scale` · Σᵢ fᵢ·gᵢ into `out` for a fused chain: Σᵢ fᵢ bᵢ aᵢᵀ = (b·f)ᵀ a, one product
    per layer; Σᵢ fᵢ bᵢ = bᵀ f."""
    column = factors.unsqueeze(1)
    for i in chain.trainable:
        layer = chain.layers[i]
        g = outputs[i]
        if layer.weight is not None:
            a = inputs[i]
            if g.shape[1] <= a.shape[1]:
                out[layer.weight].addmm_((g * column).t(), a, alpha=scale)
            else:
                out[layer.weight].addmm_(g.t(), a * column, alpha=scale)
        if layer.bias is not None:
            out[layer.bias].addmv_(g.t(), factors, alpha=scale)


def _finite_rows(tensors: list[torch.Tensor], rows: int) -> torch.Tensor:
    """True for each example (first dimension) whose values in every tensor are all finite."""
    finite = torch.ones(rows, dtype=torch.bool, device=tensors[0].device if tensors else None)
    for t in tensors:
        finite &= torch.isfinite(t.reshape(rows, -1)).all(1)
    return finite


def _zero_rows(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`t` with the examples (first dimension) outside `keep` set to zero."""
    return torch.where(keep.reshape(-1, *([1] * (t.dim() - 1))), t, t.new_zeros(()))


def _row_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """The norm of each example's slice (vector_norm: 2x faster than pow(2).sum() on CPU)."""
    norms: torch.Tensor = torch.linalg.vector_norm(per_sample.reshape(len(per_sample), -1), dim=1)
    return norms


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


# -- fused linear chains -------------------------------------------------------------------


@dataclass(frozen=True)
class _Activation:
    """An elementwise function and its gradient rule, backward(grad, input, output)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _ChainLayer:
    """A linear layer of a chain, the indices of its trainable parameters in the clipper's
    `params`, and the activations that follow it."""

    module: nn.Linear
    weight: int | None
    bias: int | None
    acts: tuple[_Activation, ...]


@dataclass(frozen=True)
class _Chain:
    flatten: bool
    prefix: tuple[_Activation, ...]
    layers: tuple[_ChainLayer, ...]
    #: The layers with a trainable parameter, in order.
    trainable: tuple[int, ...]
    #: The first of them: no gradient is propagated below it.
    lowest: int
    #: 0/1 matrix: (squared output gradients of the trainable layers, squared inputs of those
    #: with a trainable weight), concatenated by columns, times it gives one column per layer for
    #: ‖b‖², then one per layer for ‖a‖² (zero where the weight is frozen).
    selector: torch.Tensor
    #: 1.0 for a layer with a trainable bias, else 0.0: the "+1" of ‖b‖²(‖a‖² + 1).
    bias_flags: torch.Tensor


_aten = torch.ops.aten
_RELU = _Activation(torch.relu, lambda g, i, o: _aten.threshold_backward(g, o, 0))
_TANH = _Activation(torch.tanh, lambda g, i, o: _aten.tanh_backward(g, o))
_SIGMOID = _Activation(torch.sigmoid, lambda g, i, o: _aten.sigmoid_backward(g, o))
_SILU = _Activation(F.silu, lambda g, i, o: _aten.silu_backward(g, i))
_IDENTITY = None  # a node that passes its input through


def _module_activation(module: nn.Module) -> _Activation | bool | None:
    """The activation a module applies; None for an identity; False if it is not elementwise."""
    if isinstance(module, nn.ReLU):
        return _RELU
    if isinstance(module, nn.Tanh):
        return _TANH
    if isinstance(module, nn.Sigmoid):
        return _SIGMOID
    if isinstance(module, nn.SiLU):
        return _SILU
    if isinstance(module, nn.LeakyReLU):
        slope = float(module.negative_slope)
        return _Activation(
            lambda t: F.leaky_relu(t, slope),
            lambda g, i, o: _aten.leaky_relu_backward(g, i, slope, False),
        )
    if isinstance(module, nn.GELU):
        approximate = str(module.approximate)
        return _Activation(
            lambda t: F.gelu(t, approximate=approximate),
            lambda g, i, o: _aten.gelu_backward(g, i, approximate=approximate),
        )
    if isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0):
        return _IDENTITY
    return False


_FUNCTIONS: dict[object, _Activation] = {
    torch.relu: _RELU,
    F.relu: _RELU,
    torch.tanh: _TANH,
    F.tanh: _TANH,
    torch.sigmoid: _SIGMOID,
    F.sigmoid: _SIGMOID,
    F.silu: _SILU,
}
_METHODS = {"relu": _RELU, "tanh": _TANH, "sigmoid": _SIGMOID}


def _is_flatten(node: fx.Node, model: nn.Module) -> bool:
    """x.flatten(1), torch.flatten(x, 1) or nn.Flatten(): every dimension after the batch's."""
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        return isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1)
    if (node.op, node.target) not in (("call_method", "flatten"), ("call_function", torch.flatten)):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return (start, end) == (1, -1) and len(node.args) + len(node.kwargs) <= 3


def _linear_chain(model: nn.Module, params: dict[str, nn.Parameter]) -> _Chain | None:
    """The model as a chain [flatten] → (Linear → activations)*, or None if it is not one.

    Conservative: any other operation, a branch, a layer used twice, a trainable parameter
    outside the chain's Linear layers, a second forward argument or a hook means no chain.
    """
    if not _may_be_chain(model):
        return None
    graph = _trace_training(model)
    if graph is None:
        return None
    walked = _walk_chain(graph, model)
    if walked is None or not walked[2]:
        return None  # not a chain, or no Linear layer in it
    flatten, prefix, layers = walked
    chain = _chain_layers(layers, params)
    if chain is None:
        return None
    return _build_chain(flatten, prefix, chain)


def _may_be_chain(model: nn.Module) -> bool:
    """False if a hook (other than an idle clipper's recorder) or a leaf module that is neither
    Linear, Flatten nor an elementwise activation rules a chain out before tracing."""
    for m in model.modules():
        if m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
        if any(
            getattr(hook, "__func__", None) is not PerSampleClipper._record
            for hook in m._forward_hooks.values()
        ):
            return False  # another clipper's idle recorder is harmless; other hooks are not
        leaf = next(m.children(), None) is None
        if leaf and not isinstance(m, nn.Linear | nn.Flatten) and _module_activation(m) is False:
            return False  # e.g. attention or normalisation: not worth tracing the model
    return True


def _trace_training(model: nn.Module) -> fx.Graph | None:
    """The `torch.fx` graph of the model's training-mode forward, or None if it cannot be traced;
    the model's mode is restored."""
    was_training = model.training
    try:
        model.train(True)  # the path is used for training only: trace the training branch
        # The graph alone (no code generation); math functions are not wrapped (a forward that
        # applies them to tensors fails to trace and so takes the generic path).
        return fx.Tracer(autowrap_modules=()).trace(model)  # type: ignore[arg-type]
    except Exception:  # untraceable forward (data-dependent control flow, ...): no chain
        return None
    finally:
        model.train(was_training)


def _walk_chain(
    graph: fx.Graph, model: nn.Module
) -> tuple[bool, list[_Activation], list[tuple[nn.Linear, list[_Activation]]]] | None:
    """Follow the graph from its one input to its output: (whether the input is flattened first,
    the activations before the first Linear, each Linear with the activations after it), or
    None at the first node that does not continue a straight chain."""
    flatten = False
    prefix: list[_Activation] = []
    layers: list[tuple[nn.Linear, list[_Activation]]] = []
    previous: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None  # a second forward argument
            previous = node
            continue
        if previous is None or len(previous.users) != 1:
            return None  # a value used twice: a branch or a residual connection
        if node.op == "output":
            if node.args != (previous,):
                return None
            break
        if (
            not node.args
            or node.args[0] is not previous
            or any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()])
        ):
            return None
        act: _Activation | bool | None
        if _is_flatten(node, model):
            if not layers:
                flatten = True
            act = _IDENTITY  # after a layer the activations are (batch, features) already
        elif node.op == "call_module" and isinstance(
            module := model.get_submodule(str(node.target)), nn.Linear
        ):
            if type(module).forward is not nn.Linear.forward:
                return None  # a Linear with a forward of its own
            if any(m is module for m, _ in layers):
                return None  # weight sharing
            layers.append((module, []))
            previous = node
            continue
        else:
            act = _node_activation(node, model)
        if act is False:
            return None
        if isinstance(act, _Activation):
            (layers[-1][1] if layers else prefix).append(act)
        previous = node
    return flatten, prefix, layers


def _node_activation(node: fx.Node, model: nn.Module) -> _Activation | bool | None:
    """The activation a one-input node (not a Linear) applies, as `_module_activation`."""
    if node.op == "call_module":
        return _module_activation(model.get_submodule(str(node.target)))
    if node.op == "call_function" and len(node.args) == 1:
        act = _FUNCTIONS.get(node.target, False)
        return False if set(node.kwargs) - {"inplace"} else act
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return _METHODS.get(str(node.target), False)
    return False


def _chain_layers(
    layers: list[tuple[nn.Linear, list[_Activation]]], params: dict[str, nn.Parameter]
) -> list[_ChainLayer] | None:
    """Each layer with the indices of its parameters in `params`, or None unless every
    trainable parameter belongs to exactly one layer of the chain."""
    # Parameters by identity: a tensor tied between two layers (or trainable outside the chain)
    # would need its gradients summed across layers, which the chain does not do.
    index = {id(p): i for i, p in enumerate(params.values())}
    chain: list[_ChainLayer] = []
    covered: list[int] = []
    for module, acts in layers:
        found: dict[str, int | None] = {}
        for attr in ("weight", "bias"):
            tensor = getattr(module, attr)
            found[attr] = index.get(id(tensor)) if tensor is not None else None
            if found[attr] is not None:
                covered.append(id(tensor))
            elif tensor is not None and tensor.requires_grad:
                return None  # trainable, yet not under its own name: tied to another tensor
        chain.append(_ChainLayer(module, found["weight"], found["bias"], tuple(acts)))
    if sorted(covered) != sorted(index):
        return None  # a trainable parameter the chain does not reach, or one reached twice
    return chain


def _build_chain(flatten: bool, prefix: list[_Activation], chain: list[_ChainLayer]) -> _Chain:
    """The `_Chain` of the layers, with the selector and bias flags of `_chain_norms`."""
    trainable = [i for i, c in enumerate(chain) if c.weight is not None or c.bias is not None]
    widths = [chain[i].module.out_features for i in trainable]
    column = [*range(len(trainable))]
    for j, i in enumerate(trainable):
        if chain[i].weight is not None:
            widths.append(chain[i].module.in_features)
            column.append(len(trainable) + j)
    selector = torch.zeros(sum(widths), 2 * len(trainable))
    row = 0
    for width, col in zip(widths, column, strict=True):
        selector[row : row + width, col] = 1.0
        row += width
    bias_flags = torch.tensor([float(chain[i].bias is not None) for i in trainable])
    return _Chain(
        flatten, tuple(prefix), tuple(chain), tuple(trainable), trainable[0], selector, bias_flags
    )
