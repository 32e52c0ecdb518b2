"""Models that work under DP-SGD (GroupNorm, never BatchNorm) and flat-vector helpers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks import StepError


def small_cnn(*, channels: int = 1, width: int = 16) -> nn.Module:
    """A GroupNorm CNN for single-channel images of any size; outputs one logit."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(channels, width),
        *block(width, width * 2),
        *block(width * 2, width * 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width * 2, 1),
    )


def mlp(*, features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def logistic(*, features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 1))


def build(kind: str, *, features: int | None = None, hidden: int = 32) -> nn.Module:
    if kind == "cnn":
        return small_cnn()
    if features is None or features < 1:
        raise StepError(f"model '{kind}' needs the number of input features")
    if kind == "mlp":
        return mlp(features=features, hidden=hidden)
    if kind == "logistic":
        return logistic(features=features)
    raise StepError(f"unknown model kind '{kind}'")


def initial(kind: str, *, seed: int, features: int | None = None, hidden: int = 32) -> nn.Module:
    """The round-0 global model: identical at every site because it depends only on the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(kind, features=features, hidden=hidden)


def flat_params(model: nn.Module) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy().astype(np.float32)


def load_flat(model: nn.Module, flat: np.ndarray) -> nn.Module:
    n = sum(p.numel() for p in model.parameters())
    if flat.shape != (n,):
        raise StepError(f"parameter vector has shape {flat.shape}, the model needs ({n},)")
    device = next(model.parameters()).device
    torch.nn.utils.vector_to_parameters(torch.as_tensor(flat, dtype=torch.float32, device=device), model.parameters())
    return model
