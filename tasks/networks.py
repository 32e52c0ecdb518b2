"""MONAI networks (`[model] kind = "monai"`) made fit for patient-level DP-SGD.

A hospital team brings a network from `monai.networks.nets`; medfed builds it from the plan
alone, so every site holds the same architecture and, from the federation's seed, the same
initial weights. Nothing is downloaded: weights are random from the seed, or a local file the
federation names by its SHA-256 (each site keeps its own copy).

Two rewrites make a network DP-compatible, and both are announced:
- BatchNorm mixes the images of a batch (one image's output depends on the others), so no
  per-patient gradient exists; Opacus' `ModuleValidator.fix` replaces it with GroupNorm.
- In-place activations are switched off: the clipper reads each layer's output gradient,
  which an in-place ReLU would overwrite.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from opacus.validators import ModuleValidator
from torch import nn

from tasks import StepError
from tasks.site_run import step_log

_ANNOUNCED: set[str] = set()  # networks whose BatchNorm replacement this process reported
DEFAULT_ENCODER_FEATURES = (16, 32, 64, 128)


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def make(*, spatial_dims: int, in_channels: int, out_channels: int, **options: Any):
        from monai.networks.nets import resnet18, resnet34

        factory = {18: resnet18, 34: resnet34}[depth]
        return factory(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=out_channels,
            pretrained=False,
            **options,
        )

    return make


def _densenet121(*, spatial_dims: int, in_channels: int, out_channels: int, **options: Any):
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        pretrained=False,
        **options,
    )


def basic_unet_encoder(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    features: tuple[int, ...] = DEFAULT_ENCODER_FEATURES,
    act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1}),
    norm: str | tuple = ("instance", {"affine": True}),
    bias: bool = True,
    dropout: float = 0.0,
) -> nn.Sequential:
    """The encoder half of MONAI's BasicUNet (its `TwoConv` stem and `Down` blocks: max-pool,
    then two conv-norm-act layers), globally average-pooled into a linear classifier."""
    from monai.networks.layers.factories import Pool
    from monai.networks.nets.basic_unet import Down, TwoConv

    features = tuple(int(f) for f in features)
    if len(features) < 2 or min(features) < 1:
        raise StepError("model.options.features needs at least two positive channel counts")
    blocks: list[nn.Module] = [
        TwoConv(spatial_dims, in_channels, features[0], act, norm, bias, dropout)
    ]
    blocks += [
        Down(spatial_dims, cin, cout, act, norm, bias, dropout)
        for cin, cout in zip(features, features[1:], strict=False)
    ]
    return nn.Sequential(
        *blocks,
        Pool["adaptiveavg", spatial_dims](1),
        nn.Flatten(),
        nn.Linear(features[-1], out_channels),
    )


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "DenseNet121": _densenet121,
    "ResNet18": _resnet(18),
    "ResNet34": _resnet(34),
    "BasicUNetEncoder": basic_unet_encoder,
}
NETWORKS = tuple(_FACTORIES)  # the config's `network` choices must match these names


def build_network(
    network: str,
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """The named MONAI network, made DP-compatible (see the module docstring). Weights are
    whatever the constructor drew; `seeded_init` sets them."""
    if network not in _FACTORIES:
        raise StepError(f"model.network '{network}' is not one of {', '.join(NETWORKS)}")
    try:
        model = _FACTORIES[network](
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            **(options or {}),
        )
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise StepError(f"model.options do not build a {network}: {exc}") from exc
    return make_dp_compatible(model, network)


def make_dp_compatible(model: nn.Module, name: str) -> nn.Module:
    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if batch_norms:
        model = ModuleValidator.fix(model)
        if name not in _ANNOUNCED:
            _ANNOUNCED.add(name)
            step_log().info(
                "%s: replaced %d BatchNorm layer(s) with GroupNorm (Opacus ModuleValidator.fix): "
                "BatchNorm mixes the images of a batch, so no per-patient gradient exists",
                name,
                batch_norms,
            )
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise StepError(f"model {name} is not DP-compatible after the fix: {errors[0]}")
    return model


_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_NORM = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def seeded_init(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Initial weights drawn from `generator` alone, in module order: convolutions He-normal
    (fan-out, as MONAI's ResNet and DenseNet do), linear layers PyTorch's default uniform,
    norms at identity. Never torch's global RNG: sites initialise in parallel threads."""
    with torch.no_grad():
        for module in model.modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, _CONV):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                for p in own.values():
                    p.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, _NORM):
                for name, p in own.items():
                    p.fill_(1.0 if name == "weight" else 0.0)
            else:
                raise StepError(f"no seeded initialisation for {type(module).__name__}")
    return model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_pretrained(model: nn.Module, path: Path, *, sha256: str) -> nn.Module:
    """Load a state dict the federation names by hash from this site's own copy. The file is
    read with `weights_only` (no pickled code runs) and must fit the DP-compatible network."""
    path = Path(path)
    if not path.is_file():
        raise StepError(f"pretrained weights file {path} does not exist")
    if file_sha256(path) != sha256:
        raise StepError(
            f"pretrained weights file {path} does not have the SHA-256 the federation names"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a state dict
        raise StepError(f"pretrained weights file {path} is not a torch state dict") from exc
    if not isinstance(state, dict):
        raise StepError(f"pretrained weights file {path} is not a torch state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise StepError(
            f"pretrained weights file {path} does not fit the network: {first}"
        ) from exc
    return model
