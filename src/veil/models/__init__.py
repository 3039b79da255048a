"""Models: plain `torch.nn.Module`s whose trainable parameters travel as named float32 arrays."""

from veil.models.cnn import SmallCNN
from veil.models.factory import build_model
from veil.models.parameters import get_parameters, set_parameters
from veil.models.tabular import MLP, LinearRegression, LogisticRegression

__all__ = [
    "MLP",
    "LinearRegression",
    "LogisticRegression",
    "SmallCNN",
    "build_model",
    "get_parameters",
    "set_parameters",
]
