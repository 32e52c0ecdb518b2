"""Models that work under DP-SGD (GroupNorm, never BatchNorm) and flat-vector helpers.

The image model (`kind = "cnn"`) follows Tramèr & Boneh, "Differentially Private Learning
Needs Better Features" (ICLR 2021): a FIXED, data-independent filter bank in the spirit of
a scattering network (Gaussian, difference-of-Gaussian and Gaussian-derivative filters over
a three-level pyramid, rectified and pooled) feeds a small trainable head. Under DP-SGD only
the head carries per-sample gradients, so DP costs little more than plain SGD, and fewer
trainable parameters means less noise in the update. The filters are buffers, not
parameters: they are identical at every site by construction and never leave it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks import StepError

if TYPE_CHECKING:
    from tasks.config import ModelConfig

FILTER_SIZE = 9  # odd; covers +-2 sigma of the widest (sigma 2) filter
PYRAMID_LEVELS = 3  # the image at full, half and quarter resolution


def _gaussian(sigma: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.arange(size, dtype=np.float64) - size // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    g = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return g / g.sum(), xx, yy


def filter_bank(size: int = FILTER_SIZE) -> torch.Tensor:
    """Eight fixed 2-D filters, shape (8, 1, size, size), each of unit L2 norm: a low-pass
    Gaussian, two centre-surround blob detectors (DoG), first derivatives (edges) and second
    derivatives (ridges, corners). Pure function of `size`; no randomness."""
    if size < 5 or size % 2 == 0:
        raise StepError(f"filter size must be odd and at least 5, got {size}")
    g1, xx, yy = _gaussian(1.0, size)
    g15, _, _ = _gaussian(1.5, size)
    g2, _, _ = _gaussian(2.0, size)
    g3, _, _ = _gaussian(3.0, size)
    s2 = 1.5**2
    filters = [
        g1,
        g1 - g2,
        g15 - g3,
        -xx * g1,
        -yy * g1,
        (xx**2 / s2**2 - 1 / s2) * g15,
        (yy**2 / s2**2 - 1 / s2) * g15,
        xx * yy / s2**2 * g15,
    ]
    w = np.stack(filters)
    w /= np.sqrt((w**2).sum(axis=(1, 2), keepdims=True))
    return torch.tensor(w[:, None], dtype=torch.float32)


class ScatterFeatures(nn.Module):
    """Fixed multi-scale features: at each pyramid level, the filter responses split into
    their positive and negative parts, pooled globally by mean and by max. No parameters.

    Output: (N, 2 * 2 * filters * levels) for input (N, channels, H, W), any H, W >= 4.
    """

    def __init__(self, *, channels: int = 1, levels: int = PYRAMID_LEVELS) -> None:
        super().__init__()
        if channels < 1 or levels < 1:
            raise StepError("ScatterFeatures needs at least one channel and one level")
        bank = filter_bank()
        # The same filters on every input channel (a depthwise-then-stacked bank).
        self.register_buffer("weight", bank.repeat(channels, 1, 1, 1), persistent=False)
        self.channels = channels
        self.levels = levels

    @property
    def out_features(self) -> int:
        return 4 * self.weight.shape[0] * self.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise StepError(
                f"ScatterFeatures expects (N, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        pooled = []
        pad = self.weight.shape[-1] // 2
        for level in range(self.levels):
            r = F.conv2d(x, self.weight, padding=pad, groups=self.channels)
            r = torch.cat([F.relu(r), F.relu(-r)], dim=1)
            pooled += [r.mean(dim=(2, 3)), r.amax(dim=(2, 3))]
            if level + 1 < self.levels:
                if min(x.shape[-2:]) < 4:
                    raise StepError(f"image of {tuple(x.shape[-2:])} pixels is too small")
                x = F.avg_pool2d(x, 2)
        return torch.cat(pooled, dim=1)


REFERENCE_IMAGES = 256  # random textures the features are centred on; no patient data
REFERENCE_SEED = 0


def reference_images(*, channels: int, height: int, width: int) -> np.ndarray:
    """A fixed set of random textured images (smooth Gaussian fields of random correlation
    length plus white noise, each min-max scaled to [0, 1] like ingested images). Pure
    function of its arguments: the same at every site, and built from no data at all."""
    rng = np.random.default_rng(REFERENCE_SEED)
    fy, fx = np.fft.fftfreq(height), np.fft.fftfreq(width)
    r2 = fy[:, None] ** 2 + fx[None, :] ** 2
    out = np.empty((REFERENCE_IMAGES, channels, height, width), dtype=np.float32)
    for i in range(REFERENCE_IMAGES):
        for c in range(channels):
            cutoff = rng.uniform(0.02, 0.2)
            spectrum = np.fft.fft2(rng.standard_normal((height, width))) * np.exp(
                -r2 / (2 * cutoff**2)
            )
            field = np.fft.ifft2(spectrum).real
            img = field / (field.std() + 1e-12) * rng.uniform(0.2, 2.0)
            img += rng.standard_normal((height, width)) * rng.uniform(0.2, 2.0)
            out[i, c] = (img - img.min()) / (img.max() - img.min())
    return out


@functools.lru_cache(maxsize=8)
def _reference_mean(channels: int, levels: int, height: int, width: int) -> torch.Tensor:
    front = ScatterFrontEnd(channels=channels, levels=levels, centre=False)
    with torch.no_grad():
        feats = front(
            torch.as_tensor(reference_images(channels=channels, height=height, width=width))
        )
    return feats.mean(dim=0)


class ScatterFrontEnd(nn.Module):
    """The fixed front-end: `ScatterFeatures`, a per-sample GroupNorm (one group per pooled
    filter set; puts every image on one scale), then centring on the mean feature vector of
    `reference_images` of the input's size. Without centring the features share a large
    common offset (rectified, pooled responses are positive) that makes the linear head's
    loss ill-conditioned (curvature ~90 along the offset, <1 elsewhere) and DP-SGD crawl.
    No parameters, no data-dependent statistics."""

    def __init__(
        self, *, channels: int = 1, levels: int = PYRAMID_LEVELS, centre: bool = True
    ) -> None:
        super().__init__()
        self.features = ScatterFeatures(channels=channels, levels=levels)
        self.norm = nn.GroupNorm(4 * levels, self.features.out_features, affine=False)
        self.centre = centre

    @property
    def out_features(self) -> int:
        return self.features.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.features(x))
        if self.centre:
            ref = _reference_mean(
                self.features.channels, self.features.levels, x.shape[-2], x.shape[-1]
            )
            z = z - ref.to(device=z.device, dtype=z.dtype)
        return z


def scatter_net(
    *, channels: int = 1, levels: int = PYRAMID_LEVELS, hidden: int = 0
) -> nn.Sequential:
    """Fixed scattering-like front-end (`ScatterFrontEnd`) and a trainable head: linear
    (`hidden = 0`, the DP default) or one hidden layer. Outputs one logit."""
    front = ScatterFrontEnd(channels=channels, levels=levels)
    head: list[nn.Module] = [nn.Linear(front.out_features, 1)]
    if hidden > 0:
        head = [nn.Linear(front.out_features, hidden), nn.ReLU(), nn.Linear(hidden, 1)]
    return nn.Sequential(front, *head)


def small_cnn(*, channels: int = 1, width: int = 16) -> nn.Module:
    """A fully trainable GroupNorm CNN (for comparison; DP-SGD on it costs 2.5-4x plain SGD)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(4, cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

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


def build(kind: str, *, features: int | None = None, hidden: int = 0) -> nn.Module:
    """`cnn`: the scatter net, its head linear (`hidden = 0`) or with one hidden layer.
    `mlp`: tabular features through one hidden layer of `hidden` units. `logistic`."""
    if hidden < 0:
        raise StepError(f"hidden units must be non-negative, got {hidden}")
    if kind == "cnn":
        return scatter_net(hidden=hidden)
    if features is None or features < 1:
        raise StepError(f"model '{kind}' needs the number of input features")
    if kind == "mlp":
        if hidden < 1:
            raise StepError("model 'mlp' needs at least one hidden unit (model.hidden)")
        return mlp(features=features, hidden=hidden)
    if kind == "logistic":
        return logistic(features=features)
    raise StepError(f"unknown model kind '{kind}'")


def initial(kind: str, *, seed: int, features: int | None = None, hidden: int = 0) -> nn.Module:
    """The round-0 global model: identical at every site because it depends only on the seed.

    Drawn from a private generator, never torch's global RNG: sites initialise in parallel
    threads, and a global seed set in one thread would be consumed or reset by another."""
    model = build(kind, features=features, hidden=hidden)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if not isinstance(module, nn.Linear):
                raise StepError(f"no seeded initialisation for {type(module).__name__}")
            # PyTorch's default for Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / module.in_features**0.5
            for p in own:
                p.uniform_(-bound, bound, generator=generator)
    if kind == "cnn":
        # Start the output layer at zero: logit 0 everywhere, so DP noise in the first steps
        # is not added on top of a random projection. A hidden layer keeps its seeded random
        # init (all-zero hidden units would stay identical forever).
        with torch.no_grad():
            for p in model[-1].parameters():
                p.zero_()
    return model


def _constructor_value(v: Any) -> Any:
    """TOML arrays arrive as lists; MONAI's layer factories want tuples, e.g. ("group", {...})."""
    if isinstance(v, list):
        return tuple(_constructor_value(x) for x in v)
    if isinstance(v, dict):
        return {k: _constructor_value(x) for k, x in v.items()}
    return v


def from_plan(spec: ModelConfig, *, features: int | None = None) -> nn.Module:
    """The plan's model, weights as constructed (`initial_from_plan` sets them)."""
    if spec.kind == "monai":
        from tasks.networks import build_network

        assert spec.network is not None  # the config validator requires it
        return build_network(
            spec.network,
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            options={k: _constructor_value(v) for k, v in spec.options.items()},
        )
    return build(str(spec.kind), features=features, hidden=spec.hidden)


def initial_from_plan(
    spec: ModelConfig, *, seed: int, features: int | None = None, weights: Path | None = None
) -> nn.Module:
    """The round-0 global model of a plan: from the seed, or for a MONAI network the
    pretrained weights the plan names by hash (`weights`: this site's copy of them)."""
    if spec.kind != "monai":
        return initial(str(spec.kind), seed=seed, features=features, hidden=spec.hidden)
    from tasks.networks import load_pretrained, seeded_init

    model = from_plan(spec)
    if spec.weights_sha256 is not None:
        if weights is None:
            raise StepError(
                "the plan starts from pretrained weights, but this site's site.toml names no "
                "pretrained_weights file"
            )
        return load_pretrained(model, weights, sha256=spec.weights_sha256)
    seeded_init(model, torch.Generator().manual_seed(seed))
    # As for the scatter net's head: the output layer starts at zero (logit 0 everywhere).
    output = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        for p in output.parameters():
            p.zero_()
    return model


def frozen_prefix(model: nn.Module) -> int:
    """How many leading modules of a Sequential hold no parameters and no train-mode
    behaviour (their output is a fixed function of the input, so it can be computed once).
    0 for anything else."""
    if not isinstance(model, nn.Sequential):
        return 0
    stateless = (
        ScatterFrontEnd,
        ScatterFeatures,
        nn.GroupNorm,
        nn.Flatten,
        nn.ReLU,
        nn.AdaptiveAvgPool2d,
    )
    n = 0
    for module in model:
        if not isinstance(module, stateless) or any(True for _ in module.parameters()):
            break
        n += 1
    return n


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_params(model: nn.Module) -> np.ndarray:
    return (
        torch.nn.utils.parameters_to_vector(model.parameters())
        .detach()
        .cpu()
        .numpy()
        .astype(np.float32)
    )


def load_flat(model: nn.Module, flat: np.ndarray) -> nn.Module:
    n = n_params(model)
    if flat.shape != (n,):
        raise StepError(f"parameter vector has shape {flat.shape}, the model needs ({n},)")
    device = next(model.parameters()).device
    torch.nn.utils.vector_to_parameters(
        torch.as_tensor(flat, dtype=torch.float32, device=device), model.parameters()
    )
    return model
