"""Gradient inversion: reconstruct training records from what a client sends the server.

The server of a plain (`secure_aggregation = "plain"`) federation receives each client's update
Δ = w_local − w_global. After one local step of plain SGD, −Δ/lr is exactly the gradient of the
client's mean loss; after several steps, `update_as_gradient` takes −Δ/(lr·steps) as the
average gradient (the approximation that Geiping et al. 2020 discuss for multi-step FedAvg
updates; it makes the attack weaker, never stronger). Under secure aggregation the server only
holds the sum of the round's updates, so the same attacks can only invert the sum, as if it came
from one client holding everyone's records.

Attacks:

- `analytic_first_layer`: the input of a fully connected first layer with bias is determined by
  that layer's gradients: ∂ℓ/∂W₁ = (∂ℓ/∂b₁)·xᵀ for one record, so x = ∂ℓ/∂W₁[j] / ∂ℓ/∂b₁[j]
  for every unit j (Geiping, Bauermeister, Dröge & Moeller 2020, "Inverting Gradients — How easy
  is it to break privacy in federated learning?", §3; also Phong et al. 2017). For a batch it
  returns a mixture of the records.
- `dlg`: Deep Leakage from Gradients (Zhu, Liu & Han 2019): optimise dummy records (and soft
  labels, unless the labels are known) so that their gradient matches the observed one in L2.
- `inverting_gradients` (Geiping et al. 2020): match the gradient's direction (cosine
  distance) with a total-variation prior for images, signed Adam steps and box constraints.

`infer_labels` recovers the label of a single record from the sign of the last layer's bias
gradient (iDLG, Zhao, Mopuri & Bilen 2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from veil.tensors import NamedArrays

__all__ = [
    "Reconstruction",
    "analytic_first_layer",
    "dlg",
    "infer_labels",
    "inverting_gradients",
    "update_as_gradient",
]


@dataclass(frozen=True)
class Reconstruction:
    """Reconstructed records (flat features), their labels and the attack's final loss."""

    x: np.ndarray
    labels: np.ndarray
    attack: str
    loss: float


def update_as_gradient(update: NamedArrays, learning_rate: float, steps: int) -> NamedArrays:
    """The average gradient that an SGD update of `steps` steps at `learning_rate` amounts to:
    −Δ/(lr·steps); exact for one step without momentum or weight decay."""
    if learning_rate <= 0 or steps < 1:
        raise ValueError(f"need learning_rate > 0 and steps >= 1, got {learning_rate}, {steps}")
    scale = -1.0 / (learning_rate * steps)
    return {name: (value * scale).astype(np.float32) for name, value in update.items()}


def _layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def infer_labels(model: nn.Module, gradient: NamedArrays) -> np.ndarray | None:
    """The label of a single record from its gradient (iDLG): the one class whose last-layer
    bias gradient p − e_y is negative. None if the model's last layer has no bias."""
    layers = _layers(model)
    if not layers or layers[-1][1].bias is None:
        return None
    g = gradient[_prefix(layers[-1][0]) + "bias"]
    return np.array([int(np.argmin(g))], dtype=np.int64)


def analytic_first_layer(model: nn.Module, gradient: NamedArrays) -> np.ndarray | None:
    """The input of the first fully connected layer, from its weight and bias gradients
    (exact for one record): the least-squares x in ∂W[j] = ∂b[j]·x over all units j.

    None if the model does not start with a linear layer with bias (e.g. the CNN).
    """
    layers = _layers(model)
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    if not layers or layers[0][1].bias is None:
        return None
    name = _prefix(layers[0][0])
    if params[0] != name + "weight":
        return None
    gw = gradient[name + "weight"].astype(np.float64)
    gb = gradient[name + "bias"].astype(np.float64)
    denominator = float(gb @ gb)
    if denominator == 0:
        return None
    return ((gb @ gw) / denominator)[None, :].astype(np.float32)


def _total(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of all entries of all `parts`."""
    return torch.stack([p.sum() for p in parts]).sum()


class _Matcher:
    """The gradient of the model's mean loss on dummy records, differentiable in the records."""

    def __init__(self, model: nn.Module, parameters: NamedArrays, gradient: NamedArrays) -> None:
        self.model = model
        model.train(False)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.names = names
        self.params = {n: torch.from_numpy(parameters[n]).requires_grad_(True) for n in names}
        self.target = [torch.from_numpy(gradient[n]).to(torch.float32) for n in names]

    def grads(self, x: torch.Tensor, soft_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = functional_call(self.model, self.params, (x,))
        loss = -(soft_labels * F.log_softmax(out, dim=1)).sum(1).mean()
        return torch.autograd.grad(loss, list(self.params.values()), create_graph=True)


def _adam(
    variables: list[torch.Tensor],
    objective: Callable[[], torch.Tensor],
    iterations: int,
    rate: float,
    *,
    signed: bool = False,
    project: Callable[[], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> float:
    """Minimise `objective` over `variables` with Adam (Kingma & Ba 2015), the learning rate
    cut tenfold at 3/8, 5/8 and 7/8 of the iterations as Geiping et al. do; `signed` feeds Adam
    the sign of the gradient (their choice for the cosine loss). Returns the last loss."""
    m = [torch.zeros_like(v) for v in variables]
    s = [torch.zeros_like(v) for v in variables]
    b1, b2, eps = 0.9, 0.999, 1e-8
    loss = math.nan
    milestones = {int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)}
    for t in range(1, iterations + 1):
        if t in milestones:
            rate /= 10
        value = objective()
        grads = torch.autograd.grad(value, variables)
        loss = float(value.detach())
        with torch.no_grad():
            for v, g, mv, sv in zip(variables, grads, m, s, strict=True):
                g = g.sign() if signed else g
                mv.mul_(b1).add_(g, alpha=1 - b1)
                sv.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = mv / (1 - b1**t) / ((sv / (1 - b2**t)).sqrt() + eps)
                v.sub_(step, alpha=rate)
            if project is not None:
                project()
        if on_step is not None:
            on_step()
    return loss


def _soft_labels(
    labels: np.ndarray | None, n: int, n_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fixed one-hot labels when known; otherwise trainable label logits (DLG)."""
    if labels is not None:
        return F.one_hot(torch.from_numpy(labels), n_classes).float(), []
    logits = torch.randn(n, n_classes, generator=generator).requires_grad_(True)
    return logits, [logits]


def dlg(
    model: nn.Module,
    parameters: NamedArrays,
    gradient: NamedArrays,
    *,
    n_examples: int,
    n_features: int,
    n_classes: int,
    labels: np.ndarray | None = None,
    iterations: int = 300,
    rate: float = 0.1,
    seed: int = 0,
    init: np.ndarray | None = None,
    on_step: Callable[[], None] | None = None,
) -> Reconstruction:
    """Deep Leakage from Gradients (Zhu et al. 2019): minimise Σ‖∇θℓ(x', y') − g‖² over dummy
    records x' (and soft labels y' when `labels` is None), from random `init` by default."""
    generator = torch.Generator().manual_seed(seed)
    matcher = _Matcher(model, parameters, gradient)
    start = (
        torch.from_numpy(np.array(init, dtype=np.float32))
        if init is not None
        else torch.randn(n_examples, n_features, generator=generator)
    )
    x = start.clone().requires_grad_(True)
    fixed, label_vars = _soft_labels(labels, n_examples, n_classes, generator)

    def objective() -> torch.Tensor:
        soft = torch.softmax(fixed, dim=1) if label_vars else fixed
        grads = matcher.grads(x, soft)
        return _total((g - t) ** 2 for g, t in zip(grads, matcher.target, strict=True))

    loss = _adam([x, *label_vars], objective, iterations, rate, on_step=on_step)
    found = labels if labels is not None else fixed.detach().argmax(1).numpy()
    return Reconstruction(x.detach().numpy().copy(), np.asarray(found), "dlg", loss)


def _total_variation(x: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    img = x.reshape(x.shape[0], *image_shape)
    dx = (img[:, :, :, 1:] - img[:, :, :, :-1]).abs().mean()
    dy = (img[:, :, 1:, :] - img[:, :, :-1, :]).abs().mean()
    return dx + dy


def inverting_gradients(
    model: nn.Module,
    parameters: NamedArrays,
    gradient: NamedArrays,
    *,
    n_examples: int,
    n_features: int,
    n_classes: int,
    labels: np.ndarray | None = None,
    image_shape: tuple[int, int, int] | None = None,
    bounds: tuple[float, float] | None = None,
    tv_weight: float = 1e-2,
    iterations: int = 500,
    rate: float = 0.1,
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> Reconstruction:
    """Inverting Gradients (Geiping et al. 2020): minimise 1 − cos(∇θℓ(x', y), g) plus
    `tv_weight`·TV(x') for images, with signed Adam steps, keeping x' inside `bounds`."""
    generator = torch.Generator().manual_seed(seed)
    matcher = _Matcher(model, parameters, gradient)
    x = torch.randn(n_examples, n_features, generator=generator)
    if bounds is not None:
        low, high = bounds
        x = (x * (high - low) / 4 + (low + high) / 2).clamp(low, high)
    x.requires_grad_(True)
    fixed, label_vars = _soft_labels(labels, n_examples, n_classes, generator)
    target_norm = torch.sqrt(_total(t**2 for t in matcher.target))

    def objective() -> torch.Tensor:
        soft = torch.softmax(fixed, dim=1) if label_vars else fixed
        grads = matcher.grads(x, soft)
        dot = _total(g * t for g, t in zip(grads, matcher.target, strict=True))
        norm = torch.sqrt(_total(g**2 for g in grads))
        loss = 1 - dot / (norm * target_norm + 1e-12)
        if image_shape is not None and tv_weight > 0:
            loss = loss + tv_weight * _total_variation(x, image_shape)
        return loss

    def project() -> None:
        if bounds is not None:
            x.clamp_(*bounds)

    loss = _adam(
        [x, *label_vars], objective, iterations, rate, signed=True, project=project, on_step=on_step
    )
    found = labels if labels is not None else fixed.detach().argmax(1).numpy()
    return Reconstruction(x.detach().numpy().copy(), np.asarray(found), "inverting-gradients", loss)
