"""Tests for `veil.models`: shapes, parameter transfer, seeding and frozen parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from veil.config import ModelConfig
from veil.models import (
    MLP,
    LogisticRegression,
    SmallCNN,
    build_model,
    get_parameters,
    set_parameters,
)

BATCH = 5


@pytest.mark.parametrize("n_features, n_classes", [(1, 2), (7, 3), (30, 10)])
def test_logistic_output_shape(n_features: int, n_classes: int) -> None:
    model = LogisticRegression(n_features, n_classes)
    out = model(torch.randn(BATCH, n_features))
    assert out.shape == (BATCH, n_classes)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("hidden", [[], [8], [16, 8], [4, 4, 4]])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_mlp_output_shape(hidden: list[int], dropout: float) -> None:
    model = MLP(6, hidden, 3, dropout)
    out = model(torch.randn(BATCH, 6))
    assert out.shape == (BATCH, 3)
    # One Linear per hidden layer plus the output layer.
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == len(hidden) + 1


@pytest.mark.parametrize("channels", [(16, 32), (4,), (3, 5, 7)])
def test_small_cnn_output_shape(channels: tuple[int, ...]) -> None:
    model = SmallCNN((1, 8, 8), 10, channels)
    assert model(torch.randn(BATCH, 1, 8, 8)).shape == (BATCH, 10)
    # Flat rows of 64 features (how tabular loaders hand images over) work too.
    assert model(torch.randn(BATCH, 64)).shape == (BATCH, 10)


def test_build_model_matches_config() -> None:
    assert isinstance(
        build_model(ModelConfig(name="logistic"), n_features=4, n_classes=2), LogisticRegression
    )
    mlp = build_model(ModelConfig(name="mlp", hidden=[5, 3]), n_features=4, n_classes=2)
    assert isinstance(mlp, MLP)
    assert mlp(torch.randn(BATCH, 4)).shape == (BATCH, 2)
    cnn = build_model(
        ModelConfig(name="cnn", channels=[4, 8]),
        n_features=64,
        n_classes=10,
        image_shape=(1, 8, 8),
    )
    assert isinstance(cnn, SmallCNN)
    assert cnn(torch.randn(BATCH, 64)).shape == (BATCH, 10)


def test_build_cnn_without_image_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="image"):
        build_model(ModelConfig(name="cnn"), n_features=64, n_classes=10)


MODEL_FACTORIES = {
    "logistic": lambda: LogisticRegression(5, 3),
    "mlp": lambda: MLP(5, [7, 4], 3),
    "cnn": lambda: SmallCNN((1, 8, 8), 4, (2, 3)),
}


@st.composite
def parameters_for(draw: st.DrawFn, model: nn.Module) -> dict[str, np.ndarray]:
    """Random float32 arrays with the model's trainable parameter names and shapes."""
    elements = st.floats(width=32, allow_nan=False, allow_infinity=True)
    return {
        name: draw(hnp.arrays(np.float32, tuple(p.shape), elements=elements))
        for name, p in model.named_parameters()
    }


@pytest.mark.parametrize("kind", sorted(MODEL_FACTORIES))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_set_get_round_trip_is_bit_identical(kind: str, data: st.DataObject) -> None:
    model = MODEL_FACTORIES[kind]()
    arrays = data.draw(parameters_for(model))
    set_parameters(model, arrays)
    back = get_parameters(model)
    assert sorted(back) == sorted(arrays)
    for name, arr in arrays.items():
        assert back[name].dtype == np.float32
        assert back[name].shape == arr.shape
        np.testing.assert_array_equal(back[name].view(np.uint32), arr.view(np.uint32))


def test_get_parameters_returns_copies() -> None:
    model = LogisticRegression(3, 2)
    params = get_parameters(model)
    params["linear.weight"][:] = 123.0
    assert not torch.any(model.linear.weight == 123.0)


def test_set_parameters_does_not_alias_input() -> None:
    model = LogisticRegression(3, 2)
    params = get_parameters(model)
    set_parameters(model, params)
    params["linear.weight"][:] = 7.0
    assert not torch.any(model.linear.weight == 7.0)


def test_set_parameters_refuses_missing_name() -> None:
    model = MLP(4, [3], 2)
    params = get_parameters(model)
    del params["layers.2.bias"]
    with pytest.raises(ValueError, match=r"layers\.2\.bias"):
        set_parameters(model, params)


def test_set_parameters_refuses_extra_name() -> None:
    model = MLP(4, [3], 2)
    params = get_parameters(model)
    params["layers.9.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError, match=r"layers\.9\.weight"):
        set_parameters(model, params)


def test_set_parameters_refuses_wrong_shape() -> None:
    model = MLP(4, [3], 2)
    params = get_parameters(model)
    params["layers.0.weight"] = np.zeros((4, 3), np.float32)  # transposed
    with pytest.raises(ValueError, match=r"layers\.0\.weight.*shape"):
        set_parameters(model, params)


def test_set_parameters_refuses_float64() -> None:
    model = MLP(4, [3], 2)
    before = get_parameters(model)
    params = dict(before)
    params["layers.0.bias"] = params["layers.0.bias"].astype(np.float64)
    with pytest.raises(ValueError, match=r"layers\.0\.bias.*dtype"):
        set_parameters(model, params)
    # Nothing was loaded: the check happens before any copy.
    after = get_parameters(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def _flat(model: nn.Module) -> np.ndarray:
    return np.concatenate([a.ravel() for a in get_parameters(model).values()])


@pytest.mark.parametrize(
    "config, image_shape",
    [
        (ModelConfig(name="logistic"), None),
        (ModelConfig(name="mlp", hidden=[8, 4]), None),
        (ModelConfig(name="cnn", channels=[3, 4]), (1, 8, 8)),
    ],
)
def test_build_model_seed_determines_weights(
    config: ModelConfig, image_shape: tuple[int, int, int] | None
) -> None:
    def build(seed: int) -> nn.Module:
        return build_model(config, n_features=64, n_classes=3, image_shape=image_shape, seed=seed)

    a, b, c = build(11), build(11), build(12)
    np.testing.assert_array_equal(_flat(a), _flat(b))
    assert not np.array_equal(_flat(a), _flat(c))


def test_build_model_seed_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model(ModelConfig(name="mlp"), n_features=4, n_classes=2, seed=99)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_frozen_parameters_do_not_travel() -> None:
    model = MLP(4, [3], 2)
    model.layers[0].weight.requires_grad_(False)
    frozen_before = model.layers[0].weight.detach().clone()
    params = get_parameters(model)
    assert "layers.0.weight" not in params
    assert set(params) == {"layers.0.bias", "layers.2.weight", "layers.2.bias"}
    # Loading the trainable ones works without the frozen one and leaves it alone.
    set_parameters(model, {k: np.full_like(v, 0.5) for k, v in params.items()})
    assert torch.equal(model.layers[0].weight, frozen_before)
    assert torch.all(model.layers[2].weight == 0.5)
    # Sending the frozen parameter is refused as an unexpected name.
    with pytest.raises(ValueError, match=r"layers\.0\.weight"):
        set_parameters(model, {**params, "layers.0.weight": frozen_before.numpy()})
