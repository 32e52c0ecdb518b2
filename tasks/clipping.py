"""Per-patient gradient clipping: the sum over sampled patients of each patient's gradient
(all its images' summed-loss gradients together), clipped to `max_grad_norm` as one unit.

Three clippers share one contract, `clipper(xb, yb, owner, n_units) -> (grads, mean loss)`:

- `GhostClipper`: heads of Linear layers (the scatter net's, the tabular models). Norms from
  Gram matrices; no per-image gradient exists at any time.
- `LayerClipper`: convolutional networks (MONAI's ResNets, DenseNet, the BasicUNet encoder).
  One forward and one backward to every layer's output gradient; per layer the patients'
  squared norms come from Gram matrices over a patient's images and positions (cheap where
  a layer has few positions) or from that layer's per-image gradients, summed per patient
  (cheap where it has many), whichever costs fewer operations; the clipped sum is then each
  layer's ordinary weight gradient with every image's output gradient scaled by its
  patient's clip factor. Per-image gradients exist for one layer at a time.
- `OpacusClipper`: Opacus' per-image gradients (hooks or functorch) for every layer at once,
  summed per patient; any layer Opacus supports. The reference the others are measured
  against.

Opacus' own ghost / fast gradient clipping clips each IMAGE: it cannot clip a patient's sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from opacus.grad_sample import GradSampleModule
from opacus.utils.tensor_utils import unfold2d, unfold3d
from torch import nn

from tasks import StepError


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    # Opacus' clipping rule: C / (norm + 1e-6), at most 1.
    return (max_grad_norm / (sq_norms.clamp_min(0).sqrt() + 1e-6)).clamp(max=1.0)


def sum_loss(logits: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), yb, reduction="sum")


def ghost_clippable(module: nn.Module) -> bool:
    """A Sequential whose parameters all sit in trainable Linear layers; every other module
    is parameter-free (ReLU, Flatten, ...). Opacus' validator has already ruled out modules
    that mix samples (BatchNorm)."""
    if not isinstance(module, nn.Sequential):
        return False
    has_linear = False
    for m in module:
        if isinstance(m, nn.Linear):
            if not all(p.requires_grad for p in m.parameters()):
                return False
            has_linear = True
        elif any(True for _ in m.parameters()):
            return False
    return has_linear


class GhostClipper:
    """The sum over patients of each patient's clipped gradient, one tensor per parameter.

    For a Linear layer, image i's weight gradient is g_i a_i^T (g: gradient of the loss at
    the layer's output, a: its input; the bias adds g_i), so patient P's gradient has squared
    norm sum_{i,j in P} (g_i . g_j)(a_i . a_j + 1), summed over layers: two small Gram
    matrices per layer instead of one gradient per image. The clipped sum is then one matmul
    with each image's output gradient scaled by its patient's clip factor."""

    def __init__(self, module: nn.Sequential, max_grad_norm: float) -> None:
        self.module = module
        self.max_grad_norm = max_grad_norm
        self.linears = [m for m in module if isinstance(m, nn.Linear)]
        # The order of `module.parameters()`: each Linear's weight, then its bias.
        self.params = [p for m in self.linears for p in m.parameters()]
        # Linear and ReLU layers ending in one logit: backpropagate by hand, which saves
        # autograd's bookkeeping (~17% of a clipped step here). Anything else: autograd.
        self.by_hand = isinstance(module[-1], nn.Linear) and module[-1].out_features == 1
        self.by_hand &= all(isinstance(m, nn.Linear | nn.ReLU) for m in module)

    def _output_grads(
        self, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Each Linear's inputs and the gradients of the summed loss at its outputs."""
        if not self.by_hand:
            inputs, outputs = [], []
            h = xb
            for m in self.module:
                if isinstance(m, nn.Linear):
                    inputs.append(h)
                    h = m(h)
                    outputs.append(h)
                else:
                    h = m(h)
            loss = sum_loss(h, yb)
            return inputs, list(torch.autograd.grad(loss, outputs)), loss.detach()
        with torch.no_grad():
            seen = []  # every module's input
            h = xb
            for m in self.module:
                seen.append(h)
                h = m(h)
            loss = sum_loss(h, yb)
            g = torch.sigmoid(h) - yb.unsqueeze(1)  # d(summed BCE) / d(logit)
            inputs, grads = [], []
            for m, a in zip(reversed(self.module), reversed(seen), strict=True):
                if isinstance(m, nn.Linear):
                    inputs.append(a)
                    grads.append(g)
                    if len(grads) == len(self.linears):
                        break
                    g = g @ m.weight
                else:  # ReLU
                    g = g * (a > 0)
            return inputs[::-1], grads[::-1], loss

    def __call__(
        self, xb: torch.Tensor, yb: torch.Tensor, owner: torch.Tensor, n_units: int
    ) -> tuple[list[torch.Tensor], float]:
        inputs, out_grads, loss = self._output_grads(xb, yb)
        if any(a.ndim != 2 for a in inputs):
            raise StepError("ghost clipping needs 2-D inputs to Linear layers")
        with torch.no_grad():
            same_patient = owner[:, None] == owner[None, :]
            pair = sum(
                (g @ g.T) * (a @ a.T + (0.0 if m.bias is None else 1.0))
                for m, g, a in zip(self.linears, out_grads, inputs, strict=True)
            )
            sq_norms = pair.new_zeros(n_units).index_add_(
                0, owner, (pair * same_patient).sum(dim=1)
            )
            scale = clip_factors(sq_norms, self.max_grad_norm)[owner].unsqueeze(1)
            grads = []
            for m, g, a in zip(self.linears, out_grads, inputs, strict=True):
                scaled = scale * g
                grads.append(scaled.T @ a)
                if m.bias is not None:
                    grads.append(scaled.sum(dim=0))
        return grads, float(loss) / len(xb)

    def close(self) -> None:
        pass


class OpacusClipper:
    """The same contract through Opacus' per-image gradients (hooks or functorch): summed per
    patient, clipped per patient, summed. For layers ghost clipping does not cover."""

    def __init__(self, module: nn.Module, max_grad_norm: float, *, functorch: bool) -> None:
        self.gsm = GradSampleModule(
            module, batch_first=True, loss_reduction="sum", strict=True, force_functorch=functorch
        )
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __call__(
        self, xb: torch.Tensor, yb: torch.Tensor, owner: torch.Tensor, n_units: int
    ) -> tuple[list[torch.Tensor], float]:
        loss = sum_loss(self.gsm(xb), yb)
        loss.backward()
        with torch.no_grad():
            per_patient = []
            for p in self.params:
                per_image = p.grad_sample
                p.grad_sample = None  # Opacus accumulates across backward passes otherwise
                per_patient.append(
                    per_image.new_zeros((n_units, *per_image.shape[1:])).index_add_(
                        0, owner, per_image
                    )
                )
                p.grad = None
            sq_norms = sum(g.flatten(1).square().sum(dim=1) for g in per_patient)
            factor = clip_factors(sq_norms, self.max_grad_norm)
            grads = [torch.einsum("u,u...->...", factor, g) for g in per_patient]
        return grads, float(loss.detach()) / len(xb)

    def close(self) -> None:
        self.gsm.to_standard_module()  # removes the hooks


# ---------------------------------------------------------------- convolutional networks

_CONV_ND = (nn.Conv2d, nn.Conv3d)
# A layer's Gram matrices may hold at most this many entries (patients x (images x
# positions)^2); beyond it the layer's per-patient gradients are formed instead.
_GRAM_MAX_ENTRIES = 1 << 25


def _conv_direct(m: nn.Module) -> bool:
    return (
        isinstance(m, _CONV_ND)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _layer_form(m: nn.Module) -> str | None:
    """How `LayerClipper` handles a module with trainable parameters of its own:
    "linear" / "conv" (Gram or per-patient gradients, clipped sum by the weight-gradient
    kernel), "sampled" (Opacus' per-image gradient function for the type: norms, conv1d,
    grouped convolutions), None (not supported)."""
    if isinstance(m, nn.Linear):
        return "linear"
    if _conv_direct(m):
        return "conv"
    if type(m) in GradSampleModule.GRAD_SAMPLERS:
        return "sampled"
    return None


def _trainable_layers(module: nn.Module) -> list[nn.Module]:
    return [
        m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def layer_clippable(module: nn.Module) -> bool:
    """Every module holding trainable parameters is a form `LayerClipper` handles, and every
    trainable parameter sits in such a module (no parameter of a container's own)."""
    layers = _trainable_layers(module)
    return bool(layers) and all(_layer_form(m) is not None for m in layers)


@dataclass(frozen=True)
class PatientLayout:
    """A batch laid out patient-major: patient u's images at rows u*width .. u*width+width-1,
    zero-padded to `width` (the most images any patient has). A zero image and a zero output
    gradient add nothing to a weight gradient, so per-patient sums over the padded layout
    are exact. `dest` is None when the batch already is that layout (sorted, even patients)."""

    units: int
    width: int
    dest: torch.Tensor | None

    def place(self, t: torch.Tensor) -> torch.Tensor:
        if self.dest is None:
            return t
        out = t.new_zeros((self.units * self.width, *t.shape[1:]))
        out[self.dest] = t
        return out

    def blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """(U*m, T, k) rows of a placed batch -> (U, m*T, k): each patient's rows."""
        return rows.reshape(self.units, -1, rows.shape[-1])


def patient_layout(owner: torch.Tensor, n_units: int) -> PatientLayout:
    counts = torch.bincount(owner, minlength=n_units)
    width = max(1, int(counts.max()))
    ordered = len(owner) < 2 or bool((owner[1:] >= owner[:-1]).all())
    if ordered and bool((counts == width).all()):
        return PatientLayout(n_units, width, None)
    order = torch.argsort(owner, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(owner), device=owner.device) - starts[owner[order]]
    dest = torch.empty_like(owner)
    dest[order] = owner[order] * width + position
    return PatientLayout(n_units, width, dest)


def _rows(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear or convolutional layer as a matrix product per image: input rows (N, T, d)
    and output-gradient rows (N, T, p), T positions (1 for a linear layer on vectors)."""
    n = a.shape[0]
    if isinstance(m, nn.Linear):
        return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    unfold = unfold2d if isinstance(m, nn.Conv2d) else unfold3d
    cols = unfold(
        a, kernel_size=m.kernel_size, padding=m.padding, stride=m.stride, dilation=m.dilation
    )
    return cols.transpose(1, 2), g.reshape(n, g.shape[1], -1).transpose(1, 2)


def _conv_weight_grad(m: nn.Module, a: torch.Tensor, g: torch.Tensor, groups: int = 1):
    weight_grad = (
        torch.nn.grad.conv2d_weight if isinstance(m, nn.Conv2d) else torch.nn.grad.conv3d_weight
    )
    shape = (groups * m.out_channels, *m.weight.shape[1:])
    return weight_grad(a, shape, g, m.stride, m.padding, m.dilation, groups)


def _per_patient_weight(
    m: nn.Module, a: torch.Tensor, g: torch.Tensor, layout: PatientLayout
) -> torch.Tensor:
    """(U, *weight shape): each patient's weight gradient from the placed batch. For a
    convolution, one grouped weight-gradient call (a patient's images as the batch, patients
    as groups), so no per-image gradient and no unfolded input is formed."""
    u, w = layout.units, layout.width
    if isinstance(m, nn.Linear):
        a_p, g_p = (
            layout.blocks(a.reshape(len(a), -1, a.shape[-1])),
            layout.blocks(g.reshape(len(g), -1, g.shape[-1])),
        )
        return torch.bmm(g_p.transpose(1, 2), a_p)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(u, w, *t.shape[1:]).transpose(0, 1).reshape(w, -1, *t.shape[2:])

    return _conv_weight_grad(m, grouped(a), grouped(g), groups=u).reshape(u, *m.weight.shape)


def _gram_cheaper(m: nn.Module, a: torch.Tensor, g: torch.Tensor, layout: PatientLayout) -> bool:
    """Gram form sum_{r,s} (g_r . g_s)(a_r . a_s) over a patient's rows (images x positions)
    vs the patient's gradient: fewer multiplications, and the Gram matrices fit."""
    positions = (
        g[0].numel() // g.shape[1] if not isinstance(m, nn.Linear) else g[0].numel() // g.shape[-1]
    )
    rows = layout.width * positions
    p = m.weight.shape[0]
    d = m.weight[0].numel()
    return rows * (d + p) < d * p and layout.units * rows * rows <= _GRAM_MAX_ENTRIES


# Per-patient gradients a layer may keep for the clipped sum (floats, all layers together);
# beyond it, the clipped gradient is recomputed from the scaled output gradient.
_KEEP_MAX_FLOATS = 1 << 26


@dataclass
class _Tap:
    """What one forward/backward leaves at a layer: its input and its output's gradient, and
    the per-patient (for "sampled" layers per-image) gradients kept for the clipped sum."""

    module: nn.Module
    form: str
    params: list[nn.Parameter]
    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    kept: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.a = self.g = None
        self.kept = {}


class LayerClipper:
    """Per-patient clipping for convolutional networks (see the module docstring). Each
    layer with parameters gets a forward hook that keeps its input and hooks its output
    tensor for the gradient; a tensor hook reports the gradient of the value the layer
    produced, even where the network then changes that tensor in place (`out += residual`).
    The one backward pass runs to the input images only, so autograd forms no parameter
    gradient. Per layer, each patient's squared norm comes from the Gram form or from the
    patient's gradient (kept, where small, for the clipped sum); the clipped sum is
    sum_P c_P G_P over kept gradients, else the layer's weight gradient with each image's
    output gradient scaled by its patient's factor c_P."""

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        if not layer_clippable(module):
            raise StepError("the model has layers per-patient layer clipping does not cover")
        self.module = module
        self.max_grad_norm = max_grad_norm
        self.taps = [
            _Tap(
                m, str(_layer_form(m)), [p for p in m.parameters(recurse=False) if p.requires_grad]
            )
            for m in _trainable_layers(module)
        ]
        self.params = [p for t in self.taps for p in t.params]
        self._active = False  # the hooks record only inside __call__
        self._handles = [t.module.register_forward_hook(self._keeper(t)) for t in self.taps]

    def _keeper(self, tap: _Tap):  # type: ignore[no-untyped-def]
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not self._active:
                return
            if tap.a is not None:
                raise StepError(
                    f"layer {type(module).__name__} runs twice in one forward pass; "
                    "per-patient layer clipping needs each layer once"
                )
            tap.a = inputs[0]

            def grab(grad: torch.Tensor) -> None:
                tap.g = grad

            output.register_hook(grab)

        return keep

    def _sq_norms(
        self, tap: _Tap, layout: PatientLayout, owner: torch.Tensor, budget: list[int]
    ) -> torch.Tensor:
        """Each patient's squared gradient norm at this layer; keeps what the clipped sum can
        reuse while `budget[0]` floats last."""
        m, a, g, units = tap.module, tap.a, tap.g, layout.units
        assert a is not None and g is not None
        if tap.form == "sampled":
            sampler = GradSampleModule.GRAD_SAMPLERS[type(m)]
            tap.kept = {p: gs for p, gs in sampler(m, [a], g).items() if p.requires_grad}
            return sum(
                gs.new_zeros((units, *gs.shape[1:]))
                .index_add_(0, owner, gs)
                .flatten(1)
                .square()
                .sum(1)
                for gs in tap.kept.values()
            )
        sq = torch.zeros(units, device=g.device, dtype=g.dtype)
        if m.weight.requires_grad:
            a_placed, g_placed = layout.place(a), layout.place(g)
            if _gram_cheaper(m, a, g, layout):
                a_rows, g_rows = _rows(m, a_placed, g_placed)
                a_p, g_p = layout.blocks(a_rows), layout.blocks(g_rows)
                gram = torch.bmm(a_p, a_p.transpose(1, 2)).mul_(torch.bmm(g_p, g_p.transpose(1, 2)))
                sq += gram.sum(dim=(1, 2))
            else:
                weight = _per_patient_weight(m, a_placed, g_placed, layout)
                sq += weight.flatten(1).square().sum(1)
                if weight.numel() <= budget[0]:
                    budget[0] -= weight.numel()
                    tap.kept[m.weight] = weight
        if m.bias is not None and m.bias.requires_grad:
            channel = -1 if tap.form == "linear" else 1
            summed = [d for d in range(1, g.ndim) if d != channel % g.ndim]
            per_image = g.sum(dim=summed) if summed else g  # (N, p)
            per_patient = per_image.new_zeros((units, per_image.shape[1])).index_add_(
                0, owner, per_image
            )
            sq += per_patient.square().sum(1)
            tap.kept[m.bias] = per_patient
        return sq

    def _clipped(self, tap: _Tap, factor: torch.Tensor, owner: torch.Tensor) -> list[torch.Tensor]:
        """The layer's clipped gradient sum, sum_P c_P G_P."""
        m, a, g = tap.module, tap.a, tap.g
        assert a is not None and g is not None
        if tap.form == "sampled":  # kept per image
            return [torch.einsum("n,n...->...", factor[owner], tap.kept[p]) for p in tap.params]
        out = []
        for p in tap.params:
            if p in tap.kept:
                out.append(torch.einsum("u,u...->...", factor, tap.kept[p]))
                continue
            gs = g * factor[owner].view(-1, *([1] * (g.ndim - 1)))
            if tap.form == "linear":
                out.append(gs.reshape(-1, gs.shape[-1]).T @ a.reshape(-1, a.shape[-1]))
            else:
                out.append(_conv_weight_grad(m, a, gs))
        return out

    def __call__(
        self, xb: torch.Tensor, yb: torch.Tensor, owner: torch.Tensor, n_units: int
    ) -> tuple[list[torch.Tensor], float]:
        for t in self.taps:
            t.clear()
        images = xb.detach().requires_grad_(True)
        self._active = True
        try:
            loss = sum_loss(self.module(images), yb)
        finally:
            self._active = False
        torch.autograd.grad(loss, images)
        try:
            with torch.no_grad():
                layout = patient_layout(owner, n_units)
                budget = [_KEEP_MAX_FLOATS]
                sq_norms = torch.zeros(n_units, device=xb.device, dtype=xb.dtype)
                for t in self.taps:
                    if t.g is not None:
                        sq_norms += self._sq_norms(t, layout, owner, budget)
                factor = clip_factors(sq_norms, self.max_grad_norm)
                grads = []
                for t in self.taps:
                    if t.g is None:  # the layer does not reach the loss
                        grads += [torch.zeros_like(p) for p in t.params]
                    else:
                        grads += self._clipped(t, factor, owner)
        finally:
            for t in self.taps:
                t.clear()
        return grads, float(loss.detach()) / len(xb)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
