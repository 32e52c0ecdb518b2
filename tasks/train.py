"""Local training at a site: torch on CUDA when present, patient-level DP-SGD through Opacus.

The unit of privacy is the patient. With DP on, each step Poisson-samples PATIENTS (each one
independently with probability `sample_rate`) and takes every image of the sampled patients;
Opacus computes per-image gradients, which are summed per patient, and each patient's sum is
clipped to `max_grad_norm` as ONE unit before Opacus' DPOptimizer adds Gaussian noise. A
patient with fifty images therefore moves a step no further than a patient with one, and
the release (noise multiplier, patient sample rate, steps) is accounted per patient.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tasks import StepError
from tasks.models import flat_params, frozen_prefix, scatter_net
from tasks.privacy import Release, planned_release

# Module-level (not catch_warnings, which is not thread-safe across parallel site tasks).
# secure_mode needs torchcsprng, which has no build for current torch; see the README.
warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
# Opacus' per-sample hooks fire on the first layer, whose input needs no gradient: harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

_FEATURE_CHUNK = 512  # images per forward pass through a frozen front-end


class GradSampleMode(StrEnum):
    """How Opacus computes per-sample gradients (ghost clipping never materialises them, so
    it cannot sum a patient's images before clipping and is not offered)."""

    HOOKS = "hooks"
    FUNCTORCH = "functorch"


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    epochs: int
    # Without DP: images per minibatch. With DP: EXPECTED PATIENTS per step (Poisson).
    batch_size: int
    learning_rate: float
    seed: int
    # None trains without DP (the non-DP baseline); otherwise DP-SGD with this noise.
    noise_multiplier: float | None
    # Per-PATIENT clip: bound on the L2 norm of the sum of one patient's image gradients.
    max_grad_norm: float = 1.0
    grad_sample_mode: GradSampleMode = GradSampleMode.HOOKS

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise StepError("training needs at least one epoch and a batch size of at least 1")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise StepError("learning rate must be a positive number")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise StepError("noise multiplier must be positive (None trains without DP)")
        if not self.max_grad_norm > 0:
            raise StepError("max_grad_norm must be positive")


@dataclass(frozen=True, kw_only=True)
class TrainOutcome:
    params: np.ndarray
    release: Release | None
    n_samples: int  # images (or rows) trained on
    n_patients: int  # privacy units: distinct patients among them
    max_images_per_patient: int
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


@dataclass(frozen=True)
class PatientIndex:
    """Rows grouped by patient: `inverse[i]` is row i's patient (0..n-1), `rows[p]` the rows
    of patient p."""

    inverse: np.ndarray
    rows: tuple[np.ndarray, ...]

    @property
    def n_patients(self) -> int:
        return len(self.rows)

    @property
    def largest(self) -> int:
        return max(len(r) for r in self.rows)


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


def patient_release(*, n_patients: int, settings: TrainSettings) -> Release:
    """The release `train_local` makes: `planned_release` counted in patients."""
    if settings.noise_multiplier is None:
        raise StepError("a release needs a noise multiplier")
    return planned_release(
        n_samples=n_patients,
        batch_size=settings.batch_size,
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


def dp_parts(
    module: nn.Module,
    settings: TrainSettings,
    *,
    expected_batch: float,
    generator: torch.Generator | None,
) -> tuple[GradSampleModule, DPOptimizer]:
    """Opacus' per-sample-gradient wrapper and DP optimizer for `module`.

    The wrapper reports each image's own gradient (loss reduction "sum"); the optimizer
    clips per row of `grad_sample` (we put one row per patient there), adds
    N(0, (noise * clip)^2) and divides by the expected number of patients per step."""
    assert settings.noise_multiplier is not None
    gsm = GradSampleModule(
        module,
        batch_first=True,
        loss_reduction="sum",
        strict=True,
        force_functorch=settings.grad_sample_mode == GradSampleMode.FUNCTORCH,
    )
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=settings.learning_rate, momentum=0.0),
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=expected_batch,  # type: ignore[arg-type]  # a float divides fine
        loss_reduction="mean",
        generator=generator,
    )
    return gsm, optimizer


def dp_step(
    gsm: GradSampleModule,
    optimizer: DPOptimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    owner: torch.Tensor,
    n_units: int,
) -> float:
    """One patient-level DP-SGD step. `owner[i]` (0..n_units-1) is the sampled patient whose
    image `xb[i]` is; an empty batch still takes a noisy step, as the accountant assumes."""
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in gsm.parameters() if p.requires_grad]
    loss_value = float("nan")
    if len(xb):
        loss = nn.functional.binary_cross_entropy_with_logits(
            gsm(xb).squeeze(1), yb, reduction="sum"
        )
        loss.backward()
        loss_value = float(loss.detach()) / len(xb)
        for p in params:
            per_image = p.grad_sample
            per_patient = per_image.new_zeros((n_units, *per_image.shape[1:]))
            p.grad_sample = per_patient.index_add_(0, owner, per_image)
    else:
        for p in params:
            p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
    return loss_value


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    groups: np.ndarray,
) -> TrainOutcome:
    """Train `model` in place on (x, y); return its new parameters and the DP release made.

    `groups[i]` is the (pseudonymous) patient of row i. With DP, patients are the sampled and
    clipped unit, and the release is `patient_release(n_patients=..., settings=settings)`.
    """
    if len(x) != len(y) or len(x) == 0:
        raise StepError(f"training data has {len(x)} inputs and {len(y)} labels")
    index = patient_index(groups, len(x))
    start = time.perf_counter()
    device = pick_device()
    dp = settings.noise_multiplier is not None
    torch.manual_seed(settings.seed)
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
        release = patient_release(n_patients=index.n_patients, settings=settings)
        generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        q = release.sample_rate
        gsm, optimizer = dp_parts(
            trainable, settings, expected_batch=q * index.n_patients, generator=generator
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
            loss = dp_step(gsm, optimizer, xs[take], ys[take], owner, len(chosen))
            if np.isfinite(loss):
                losses.append(loss)
        gsm.to_standard_module()  # removes the hooks and per-sample gradients
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
        max_images_per_patient=index.largest,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        device=str(device),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------- benchmark


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the tensors created under it.

    Every op's output storage is recorded with a weak reference and dropped when freed, so
    the peak is the step's own working set (activations, gradients, per-sample gradients,
    noise), exact to the byte and independent of the allocator. `tracemalloc` cannot see
    torch's allocations and process RSS is dominated by the ~300 MB torch runtime, so
    neither would measure a 32x32 step honestly."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        for key, (ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[key]
                self._current -= nbytes
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self._live:
                    self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self._current += storage.nbytes()
        self.peak = max(self.peak, self._current)
        return out


def _median_seconds(step: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def dp_step_benchmark(
    *,
    image_size: int = 32,
    batch_size: int = 32,
    repeats: int = 30,
    images_per_patient: int = 4,
    grad_sample_mode: GradSampleMode = GradSampleMode.HOOKS,
    seed: int = 0,
    hidden: int = 0,
) -> dict[str, float]:
    """Time one patient-level DP-SGD step against one plain SGD step of the image model
    (`models.build("cnn", hidden=hidden)`) on the same batch, in this process; and their
    peak memory.

    Steps alternate (plain, DP, plain, ...) after a warm-up so drift hits both alike; times
    are medians. A full step runs the whole model (the fixed front-end forward included);
    `head_*` figures time what `train_local` actually runs, with front-end features computed
    once. Memory: peak bytes of tensors alive at once during one step (see
    `_LiveTensorBytes`). No GPU needed; on CUDA the same code runs on the GPU.
    """
    if image_size < 8 or batch_size < 1 or repeats < 1 or images_per_patient < 1:
        raise StepError("benchmark needs image_size >= 8 and positive batch, repeats, images")
    device = pick_device()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 1, image_size, image_size, generator=gen).to(device)
    y = (torch.rand(batch_size, generator=gen) < 0.4).float().to(device)
    owner = (torch.arange(batch_size) // images_per_patient).to(device)
    n_units = int(owner.max()) + 1
    settings = TrainSettings(
        epochs=1,
        batch_size=n_units,
        learning_rate=0.1,
        seed=seed,
        noise_multiplier=1.0,
        grad_sample_mode=grad_sample_mode,
    )
    figures: dict[str, float] = {}

    def net() -> nn.Module:
        return scatter_net(hidden=hidden).to(device)

    head, feats = split_frozen(net(), x)
    for prefix, (plain_model, dp_model, inputs) in {
        "": (net(), net(), x),
        "head_": (head, split_frozen(net(), x)[0], feats),
    }.items():
        sgd = torch.optim.SGD(plain_model.parameters(), lr=0.1)

        def plain_step(
            model: nn.Module = plain_model,
            opt: torch.optim.Optimizer = sgd,
            xb: torch.Tensor = inputs,
        ) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.binary_cross_entropy_with_logits(model(xb).squeeze(1), y).backward()
            opt.step()

        gsm, dpopt = dp_parts(
            dp_model,
            settings,
            expected_batch=float(n_units),
            generator=torch.Generator(device=device),
        )

        def private_step(
            xb: torch.Tensor = inputs, g: GradSampleModule = gsm, o: DPOptimizer = dpopt
        ) -> None:
            dp_step(g, o, xb, y, owner, n_units)

        for _ in range(3):
            plain_step(), private_step()
        plain_t, dp_t = [], []
        for _ in range(repeats):
            plain_t += _median_seconds(plain_step, 1)
            dp_t += _median_seconds(private_step, 1)
        peaks = []
        for step in (plain_step, private_step):
            with _LiveTensorBytes() as tracker:
                step()
            peaks.append(tracker.peak)
        gsm.to_standard_module()
        figures[f"{prefix}plain_step_seconds"] = float(np.median(plain_t))
        figures[f"{prefix}dp_step_seconds"] = float(np.median(dp_t))
        figures[f"{prefix}dp_step_time_ratio"] = float(np.median(dp_t) / np.median(plain_t))
        figures[f"{prefix}plain_peak_bytes"] = float(peaks[0])
        figures[f"{prefix}dp_peak_bytes"] = float(peaks[1])
        figures[f"{prefix}dp_peak_memory_ratio"] = float(peaks[1] / peaks[0])
    return figures
