"""Step benchmarks: a patient-level DP-SGD step against a plain SGD step of the same model on
the same batch, in time and in peak tensor memory (`medfed bench`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tasks import StepError
from tasks.models import scatter_net
from tasks.train import GradSampleMode, PatientDPSGD, TrainSettings, pick_device, split_frozen


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


def _step_figures(
    make: Callable[[], nn.Module],
    inputs: torch.Tensor,
    y: torch.Tensor,
    owner: torch.Tensor,
    mode: GradSampleMode,
    repeats: int,
    *,
    learning_rate: float,
) -> dict[str, float]:
    """Median seconds and peak tensor bytes of a plain SGD step and a patient-level DP-SGD
    step of two fresh copies of one model on the same batch; steps alternate after a warm-up
    so drift hits both alike."""
    n_units = int(owner.max()) + 1
    settings = TrainSettings(
        epochs=1,
        batch_size=n_units,
        learning_rate=learning_rate,
        seed=0,
        noise_multiplier=1.0,
        grad_sample_mode=mode,
    )
    plain_model = make()
    sgd = torch.optim.SGD(plain_model.parameters(), lr=settings.learning_rate)

    def plain_step() -> None:
        sgd.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(plain_model(inputs).squeeze(1), y).backward()
        sgd.step()

    dpsgd = PatientDPSGD(
        make(),
        settings,
        expected_batch=float(n_units),
        generator=torch.Generator(device=inputs.device),
    )

    def private_step() -> None:
        dpsgd.step(inputs, y, owner, n_units)

    times: dict[Callable[[], None], list[float]] = {plain_step: [], private_step: []}
    for i in range(3 + repeats):
        for step, seconds in times.items():
            t0 = time.perf_counter()
            step()
            if i >= 3:
                seconds.append(time.perf_counter() - t0)
    peaks = []
    for step in times:
        with _LiveTensorBytes() as tracker:
            step()
        peaks.append(tracker.peak)
    dpsgd.close()
    plain_s, dp_s = (float(np.median(t)) for t in times.values())
    return {
        "plain_step_seconds": plain_s,
        "dp_step_seconds": dp_s,
        "dp_step_time_ratio": dp_s / plain_s,
        "plain_peak_bytes": float(peaks[0]),
        "dp_peak_bytes": float(peaks[1]),
        "dp_peak_memory_ratio": float(peaks[1] / peaks[0]),
    }


def dp_step_benchmark(
    *,
    image_size: int = 32,
    patients: int = 16,
    images_per_patient: int = 4,
    repeats: int = 30,
    seed: int = 0,
    hidden: int = 0,
) -> dict[str, float]:
    """Patient-level DP-SGD step vs plain SGD step of the image model
    (`models.build("cnn", hidden=hidden)`) on one batch of `patients` x `images_per_patient`
    images, in this process: median seconds and peak memory of each.

    Unprefixed figures time what `train_local` runs: the trainable head on front-end
    features computed once, with the default (ghost) clipping. `opacus_hooks_*`: the same
    head through Opacus' per-image hooks. `full_model_*`: the whole model, the fixed
    front-end forward included, in every step. Memory: peak bytes of tensors alive at once
    during one step (see `_LiveTensorBytes`). On CUDA the same code runs on the GPU.
    """
    if image_size < 8 or patients < 1 or repeats < 1 or images_per_patient < 1:
        raise StepError("benchmark needs image_size >= 8 and positive patients, images and repeats")
    device = pick_device()
    gen = torch.Generator().manual_seed(seed)
    n = patients * images_per_patient
    x = torch.rand(n, 1, image_size, image_size, generator=gen).to(device)
    y = (torch.rand(n, generator=gen) < 0.4).float().to(device)
    owner = (torch.arange(n) // images_per_patient).to(device)

    def net() -> nn.Module:
        return scatter_net(hidden=hidden).to(device)

    def head() -> nn.Module:
        return split_frozen(net(), x[:1])[0]

    _, feats = split_frozen(net(), x)
    figures: dict[str, float] = {}
    for prefix, make, inputs, mode in (
        ("", head, feats, GradSampleMode.GHOST),
        ("opacus_hooks_", head, feats, GradSampleMode.HOOKS),
        ("full_model_", net, x, GradSampleMode.GHOST),
    ):
        step = _step_figures(make, inputs, y, owner, mode, repeats, learning_rate=0.1)
        figures |= {prefix + k: v for k, v in step.items()}
    return figures


def _out_of_place_residuals(model: nn.Module) -> nn.Module:
    """MONAI's ResNetBlock adds its residual in place (`out += residual`) on the output of a
    hooked layer, which Opacus' full backward hooks refuse; the same block with `out + residual`
    computes the same function, so Opacus' hooks can be timed on the same network."""
    from monai.networks.nets.resnet import ResNetBlock

    def forward(block: ResNetBlock, x: torch.Tensor) -> torch.Tensor:
        out = block.bn2(block.conv2(block.act(block.bn1(block.conv1(x)))))
        residual = x if block.downsample is None else block.downsample(x)
        return block.act(out + residual)

    for m in model.modules():
        if isinstance(m, ResNetBlock):
            m.forward = forward.__get__(m)  # type: ignore[method-assign]
    return model


def monai_step_benchmark(
    *,
    network: str = "ResNet18",
    image_size: int = 64,
    patients: int = 16,
    images_per_patient: tuple[int, int] = (3, 5),
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """A MONAI network (2-D, one channel, one logit, DP-compatible) at `image_size`, on one
    step's batch shaped like the demo's: `patients` sampled patients of 3-5 images each.
    `monai_*`: patient-level DP-SGD with the layer clipper against plain SGD.
    `monai_opacus_hooks_*`: the same step through Opacus' per-image hooks (per-image
    gradients of every layer at once, summed per patient), in the same run."""
    from tasks.networks import build_network

    if image_size < 16 or patients < 1 or repeats < 1:
        raise StepError("the MONAI benchmark needs image_size >= 16, patients and repeats")
    device = pick_device()
    rng = np.random.default_rng(seed)
    counts = rng.integers(images_per_patient[0], images_per_patient[1] + 1, patients)
    owner = torch.as_tensor(np.repeat(np.arange(patients), counts), device=device)
    gen = torch.Generator().manual_seed(seed)
    n = len(owner)
    x = torch.rand(n, 1, image_size, image_size, generator=gen).to(device)
    y = (torch.rand(n, generator=gen) < 0.4).float().to(device)

    def net() -> nn.Module:
        torch.manual_seed(seed)
        return build_network(network, spatial_dims=2, in_channels=1, out_channels=1).to(device)

    figures: dict[str, float] = {"monai_batch_images": float(n), "monai_image_size": image_size}
    for prefix, make, mode in (
        ("monai_", net, GradSampleMode.GHOST),
        ("monai_opacus_hooks_", lambda: _out_of_place_residuals(net()), GradSampleMode.HOOKS),
    ):
        step = _step_figures(make, x, y, owner, mode, repeats, learning_rate=0.01)
        figures |= {prefix + k: v for k, v in step.items()}
    return figures
