"""Local training at a site: torch on CUDA when present, DP-SGD through Opacus."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks import StepError
from tasks.models import flat_params
from tasks.privacy import Release, planned_release

# Module-level (not catch_warnings, which is not thread-safe across parallel site tasks).
# secure_mode needs torchcsprng, which has no build for current torch; see the README.
warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
# Opacus' per-sample hooks fire on the first layer, whose input needs no gradient: harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    # None trains without DP (the non-DP baseline); otherwise DP-SGD with this noise.
    noise_multiplier: float | None
    max_grad_norm: float = 1.0


@dataclass(frozen=True, kw_only=True)
class TrainOutcome:
    params: np.ndarray
    release: Release | None
    n_samples: int
    mean_loss: float
    device: str
    seconds: float


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def validate_for_dp(model: nn.Module) -> None:
    """Opacus' validator: BatchNorm and other per-sample-unsafe layers are rejected."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise StepError(f"model is not DP-compatible: {errors[0]} (use GroupNorm, not BatchNorm)")


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, settings: TrainSettings) -> TrainOutcome:
    """Train `model` in place on (x, y); return its new parameters and the DP release made."""
    if len(x) != len(y) or len(x) == 0:
        raise StepError(f"training data has {len(x)} inputs and {len(y)} labels")
    start = time.perf_counter()
    device = pick_device()
    torch.manual_seed(settings.seed)
    model.to(device).train()
    dataset = TensorDataset(torch.as_tensor(x), torch.as_tensor(y, dtype=torch.float32))
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=0.0)
    release = None
    trained = model
    if settings.noise_multiplier is not None:
        validate_for_dp(model)
        engine = PrivacyEngine(accountant="prv")
        trained, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
        )
        release = planned_release(
            n_samples=len(x),
            batch_size=settings.batch_size,
            epochs=settings.epochs,
            noise_multiplier=settings.noise_multiplier,
        )
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(settings.epochs):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch; it still counts as a step
                optimizer.zero_grad(set_to_none=True)
                continue
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(trained(xb).squeeze(1), yb)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    params = flat_params(trained._module if hasattr(trained, "_module") else trained)
    if not np.all(np.isfinite(params)):
        raise StepError("training diverged: parameters are NaN or infinite (lower the learning rate)")
    return TrainOutcome(
        params=params,
        release=release,
        n_samples=len(x),
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        device=str(device),
        seconds=time.perf_counter() - start,
    )
