"""Local training at a site: torch on CUDA when present, patient-level DP-SGD.

The unit of privacy is the patient. With DP on, each step Poisson-samples PATIENTS (each one
independently with probability `sample_rate`) and takes every image of the sampled patients;
the gradient of each sampled patient's images, summed, is clipped to `max_grad_norm` as ONE
unit, and Gaussian noise of std `noise_multiplier * max_grad_norm` is added to the sum of the
clipped patient gradients. A patient with fifty images therefore moves a step no further than
a patient with one, and the release (noise multiplier, patient sample rate, steps) is
accounted per patient by Opacus' accountants (`tasks.privacy`).

Per-patient clipping lives in `tasks.clipping`: group-aware ghost clipping for Linear heads,
layer-wise patient clipping for convolutional networks, Opacus' per-image gradients summed
per patient for anything else.
"""

from __future__ import annotations

import secrets
import time
import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from opacus.validators import ModuleValidator
from torch import nn

from tasks import StepError
from tasks.clipping import (
    GhostClipper,
    LayerClipper,
    OpacusClipper,
    ghost_clippable,
    layer_clippable,
)
from tasks.models import flat_params, frozen_prefix
from tasks.privacy import Release, planned_release

# Module-level (not catch_warnings, which is not thread-safe across parallel site tasks).
# secure_mode needs torchcsprng, which has no build for current torch; see the README.
warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
# Opacus' per-sample hooks fire on the first layer, whose input needs no gradient: harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

_FEATURE_CHUNK = 512  # images per forward pass through a frozen front-end


class GradSampleMode(StrEnum):
    """How a patient's clipped gradient is computed.

    `ghost`: the fastest group-aware clipper that covers the model: `GhostClipper` for heads
    of Linear layers, `LayerClipper` for convolutional networks (Gram matrices or one
    layer's per-patient gradients at a time), else `hooks`.
    `hooks` / `functorch`: Opacus' GradSampleModule computes per-image gradients, which are
    summed per patient and clipped."""

    GHOST = "ghost"
    HOOKS = "hooks"
    FUNCTORCH = "functorch"


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    epochs: int
    # Without DP: images per minibatch. With DP: the expected patients per step the noisy
    # gradient sum is divided by (a plan figure: a count of this cohort would make the
    # update depend on how many patients there are, outside the DP bound).
    batch_size: int
    learning_rate: float
    seed: int
    # None trains without DP (the non-DP baseline); otherwise DP-SGD with this noise.
    noise_multiplier: float | None
    # With DP: the probability each patient joins a step (Poisson); ceil(1/q) steps per epoch.
    sample_rate: float = 0.25
    # Per-PATIENT clip: bound on the L2 norm of the sum of one patient's image gradients.
    max_grad_norm: float = 1.0
    grad_sample_mode: GradSampleMode = GradSampleMode.GHOST

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise StepError("training needs at least one epoch and a batch size of at least 1")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise StepError("learning rate must be a positive number")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise StepError("noise multiplier must be positive (None trains without DP)")
        if not self.max_grad_norm > 0:
            raise StepError("max_grad_norm must be positive")
        if not 0 < self.sample_rate <= 1:
            raise StepError("sample_rate must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class TrainOutcome:
    params: np.ndarray
    release: Release | None
    n_samples: int  # images (or rows) trained on
    n_patients: int  # privacy units: distinct patients among them
    # The training loss never leaves the site (it is not part of the DP release); kept for
    # local diagnostics and tests.
    mean_loss: float
    device: str
    seconds: float


def pick_device(pinned: str | None = None) -> torch.device:
    """The site's pinned device (site.toml `device`), else CUDA when present, else the CPU."""
    if pinned is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(pinned)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StepError(f"the site pins device {pinned}, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StepError(
                f"the site pins device {pinned}, but only {torch.cuda.device_count()} CUDA "
                "device(s) are present"
            )
    return device


def validate_for_dp(model: nn.Module) -> None:
    """Opacus' validator: BatchNorm and other per-sample-unsafe layers are rejected."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise StepError(f"model is not DP-compatible: {errors[0]} (use GroupNorm, not BatchNorm)")


@dataclass(frozen=True)
class PatientIndex:
    """Rows grouped by patient: `inverse[i]` is row i's patient (0..n-1), `rows[p]` the rows
    of patient p."""

    inverse: np.ndarray
    rows: tuple[np.ndarray, ...]

    @property
    def n_patients(self) -> int:
        return len(self.rows)


def patient_index(groups: np.ndarray, n_rows: int) -> PatientIndex:
    """Index the patient of every row; `groups` holds one integer patient id per row."""
    groups = np.asarray(groups)
    if groups.shape != (n_rows,):
        raise StepError(
            f"patient groups have shape {groups.shape}, expected ({n_rows},): one id per row"
        )
    if not np.issubdtype(groups.dtype, np.integer):
        raise StepError(f"patient groups must be integers, got {groups.dtype}")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    return PatientIndex(inverse=inverse, rows=tuple(np.split(order, bounds)))


def patient_release(settings: TrainSettings) -> Release:
    """The release `train_local` makes with DP: `planned_release` of the settings alone."""
    if settings.noise_multiplier is None:
        raise StepError("a release needs a noise multiplier")
    return planned_release(
        sample_rate=settings.sample_rate,
        epochs=settings.epochs,
        noise_multiplier=settings.noise_multiplier,
    )


def split_frozen(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """Run the model's frozen front-end (see `models.frozen_prefix`) once over `x`; return the
    trainable rest and its inputs. Exact: those modules are fixed functions of one input."""
    k = frozen_prefix(model)
    if k == 0:
        return model, x
    assert isinstance(model, nn.Sequential)
    front, rest = model[:k], model[k:]
    with torch.no_grad():
        feats = torch.cat(
            [front(x[i : i + _FEATURE_CHUNK]) for i in range(0, len(x), _FEATURE_CHUNK)]
        )
    return rest, feats


class PatientDPSGD:
    """One patient-level DP-SGD step: the clipped per-patient gradient sum (a clipper above),
    plus N(0, (noise * clip)^2) per coordinate, divided by the expected number of patients
    per step (as Opacus' DPOptimizer does with loss_reduction "mean"), then a plain SGD
    update. Noise is drawn in one call for all parameters."""

    def __init__(
        self,
        module: nn.Module,
        settings: TrainSettings,
        *,
        expected_batch: float,
        generator: torch.Generator | None,
        physical_batch_images: int | None = None,
    ) -> None:
        if settings.noise_multiplier is None:
            raise StepError("DP-SGD needs a noise multiplier")
        if not expected_batch > 0:
            raise StepError("DP-SGD needs a positive expected batch size")
        if physical_batch_images is not None and physical_batch_images < 1:
            raise StepError("physical_batch_images must be at least 1")
        mode = settings.grad_sample_mode
        self.clipper: GhostClipper | LayerClipper | OpacusClipper
        if mode == GradSampleMode.GHOST and ghost_clippable(module):
            self.clipper = GhostClipper(module, settings.max_grad_norm)
        elif mode == GradSampleMode.GHOST and layer_clippable(module):
            self.clipper = LayerClipper(module, settings.max_grad_norm)
        else:
            self.clipper = OpacusClipper(
                module, settings.max_grad_norm, functorch=mode == GradSampleMode.FUNCTORCH
            )
        self.params = self.clipper.params
        self.sizes = [p.numel() for p in self.params]
        self.noise_std = settings.noise_multiplier * settings.max_grad_norm
        self.step_size = settings.learning_rate / expected_batch
        self.generator = generator
        self.physical_batch_images = physical_batch_images

    def _clipped_sum(
        self, xb: torch.Tensor, yb: torch.Tensor, owner: torch.Tensor, n_units: int
    ) -> tuple[list[torch.Tensor], float]:
        """The clipper's sum, over passes of whole patients of at most
        `physical_batch_images` images each (a patient with more images gets a pass of its
        own). Each patient is clipped within one pass, so the sum is the same as one pass's."""
        cap = self.physical_batch_images
        if cap is None or len(xb) <= cap:
            return self.clipper(xb, yb, owner, n_units)
        counts = torch.bincount(owner, minlength=n_units).tolist()
        passes: list[list[int]] = [[]]
        held = 0
        for unit, count in enumerate(counts):
            if passes[-1] and held + count > cap:
                passes.append([])
                held = 0
            passes[-1].append(unit)
            held += count
        total: list[torch.Tensor] | None = None
        loss_sum = 0.0
        for units in passes:
            members = torch.as_tensor(units, device=owner.device)
            local = torch.full((n_units,), -1, dtype=torch.long, device=owner.device)
            local[members] = torch.arange(len(units), device=owner.device)
            take = torch.isin(owner, members).nonzero().squeeze(1)
            grads, loss = self.clipper(xb[take], yb[take], local[owner[take]], len(units))
            loss_sum += loss * len(take)
            total = (
                grads if total is None else [t.add_(g) for t, g in zip(total, grads, strict=True)]
            )
        assert total is not None
        return total, loss_sum / len(xb)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, owner: torch.Tensor, n_units: int) -> float:
        """`owner[i]` (0..n_units-1) is the sampled patient whose image `xb[i]` is. An empty
        batch still takes a noisy step, as the accountant assumes. Returns the mean loss per
        image (NaN for an empty batch)."""
        if len(xb):
            grads, loss = self._clipped_sum(xb, yb, owner, n_units)
        else:
            grads, loss = [torch.zeros_like(p) for p in self.params], float("nan")
        device = self.params[0].device
        noise = torch.normal(
            0.0, self.noise_std, (sum(self.sizes),), device=device, generator=self.generator
        )
        with torch.no_grad():
            for p, g, z in zip(self.params, grads, noise.split(self.sizes), strict=True):
                p.add_(g.add_(z.view_as(g)), alpha=-self.step_size)
        return loss

    def close(self) -> None:
        self.clipper.close()


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    groups: np.ndarray,
    device: str | None = None,
    physical_batch_images: int | None = None,
) -> TrainOutcome:
    """Train `model` in place on (x, y); return its new parameters and the DP release made.

    `groups[i]` is the (pseudonymous) patient of row i. With DP, patients are the sampled and
    clipped unit, and the release is `patient_release(settings)`, whatever the cohort.
    `device` pins the torch device (default: CUDA when present); `physical_batch_images`
    bounds the images of one forward/backward pass of a DP step (`PatientDPSGD`).
    """
    if len(x) != len(y) or len(x) == 0:
        raise StepError(f"training data has {len(x)} inputs and {len(y)} labels")
    index = patient_index(groups, len(x))
    start = time.perf_counter()
    device = pick_device(device)
    dp = settings.noise_multiplier is not None
    # DP noise and Poisson sampling must be unpredictable: drawn from generators seeded by the
    # public federation seed, anyone holding the config could subtract the noise and replay
    # the sampling. So with DP they are seeded from fresh OS entropy on every run; without
    # DP the run is reproducible under the seed.
    rng = np.random.default_rng(secrets.randbits(128) if dp else settings.seed)
    model.to(device).train()
    if dp:
        validate_for_dp(model)
    trainable, xs = split_frozen(model, torch.as_tensor(x, device=device))
    ys = torch.as_tensor(y, dtype=torch.float32, device=device)
    losses: list[float] = []
    release = None
    if dp:
        release = patient_release(settings)
        generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        q = release.sample_rate
        dpsgd = PatientDPSGD(
            trainable,
            settings,
            expected_batch=float(settings.batch_size),
            generator=generator,
            physical_batch_images=physical_batch_images,
        )
        for _ in range(release.steps):
            chosen = np.flatnonzero(rng.random(index.n_patients) < q)
            rows = [index.rows[p] for p in chosen]
            take = torch.as_tensor(
                np.concatenate(rows) if rows else np.zeros(0, np.int64), device=device
            )
            owner = torch.as_tensor(
                np.repeat(np.arange(len(chosen)), [len(r) for r in rows]), device=device
            )
            loss = dpsgd.step(xs[take], ys[take], owner, len(chosen))
            if np.isfinite(loss):
                losses.append(loss)
        dpsgd.close()
    else:
        optimizer = torch.optim.SGD(trainable.parameters(), lr=settings.learning_rate, momentum=0.0)
        for _ in range(settings.epochs):
            order = torch.as_tensor(rng.permutation(len(x)), device=device)
            for i in range(0, len(x), settings.batch_size):
                take = order[i : i + settings.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.binary_cross_entropy_with_logits(
                    trainable(xs[take]).squeeze(1), ys[take]
                )
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    params = flat_params(model)
    if not np.all(np.isfinite(params)):
        raise StepError(
            "training diverged: parameters are NaN or infinite (lower the learning rate)"
        )
    return TrainOutcome(
        params=params,
        release=release,
        n_samples=len(x),
        n_patients=index.n_patients,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        device=str(device),
        seconds=time.perf_counter() - start,
    )
