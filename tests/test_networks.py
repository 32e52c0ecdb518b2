"""MONAI networks under patient-level DP-SGD: built from the plan, identical at every site,
made DP-compatible, and clipped per patient exactly as one backward pass per patient would."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fedhelp import brute_force_clipped_sum
from torch import nn

from tasks import StepError, clipping, models, networks
from tasks.clipping import LayerClipper, OpacusClipper, layer_clippable
from tasks.config import ConfigError, ModelConfig, parse_config
from tasks.networks import build_network, load_pretrained
from tasks.train import GradSampleMode, PatientDPSGD, TrainSettings, pick_device, train_local

# Small versions of every listed network (channel counts cut, architecture kept), 2-D and
# 3-D, and the input edge each needs to reach its last layer with more than one value.
NETWORKS = {
    "resnet18-2d": ("ResNet18", 2, {"widen_factor": 0.25}, 16),
    "resnet34-2d": ("ResNet34", 2, {"widen_factor": 0.125}, 16),
    "densenet121-2d": (
        "DenseNet121",
        2,
        {"init_features": 8, "growth_rate": 4, "block_config": (2, 2, 2, 2)},
        64,
    ),
    "unet-encoder-2d": ("BasicUNetEncoder", 2, {"features": (4, 8, 8)}, 16),
    "resnet18-3d": ("ResNet18", 3, {"widen_factor": 0.125}, 16),
    "densenet121-3d": (
        "DenseNet121",
        3,
        {"init_features": 4, "growth_rate": 2, "block_config": (1, 1)},
        16,
    ),
    "unet-encoder-3d": ("BasicUNetEncoder", 3, {"features": (2, 4)}, 8),
}


def _network(key: str) -> tuple[nn.Module, int, int]:
    name, dims, options, edge = NETWORKS[key]
    model = build_network(name, spatial_dims=dims, in_channels=1, out_channels=1, options=options)
    torch.manual_seed(0)
    with torch.no_grad():  # away from the initial point, where some gradients are zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.double(), dims, edge


def _batch(dims: int, edge: int, owner: list[int]):
    gen = torch.Generator().manual_seed(1)
    n = len(owner)
    x = torch.rand(n, 1, *([edge] * dims), generator=gen, dtype=torch.float64)
    y = (torch.rand(n, generator=gen) < 0.5).double()
    return x, y, torch.as_tensor(owner)


# Uneven patients (1 to 4 images), owners out of order: the padded patient layout.
UNEVEN = [0, 3, 1, 1, 2, 0, 3, 3, 4, 1, 0]
# Sorted, even patients: the layout without a copy.
EVEN = [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.fixture(params=["chosen", "gram", "per-patient-kept", "per-patient-recomputed"])
def norm_form(request, monkeypatch) -> str:
    """Each way a layer's per-patient norm and clipped sum can be formed, forced on every
    layer ("chosen": the cost rule picks per layer)."""
    if request.param == "gram":
        monkeypatch.setattr(clipping, "_gram_cheaper", lambda *a: True)
    elif request.param.startswith("per-patient"):
        monkeypatch.setattr(clipping, "_gram_cheaper", lambda *a: False)
    if request.param == "per-patient-recomputed":
        monkeypatch.setattr(clipping, "_KEEP_MAX_FLOATS", 0)
    return request.param


@pytest.mark.parametrize("key", list(NETWORKS))
@pytest.mark.parametrize("clip", [1e-3, 1e6], ids=["every-patient-clipped", "none-clipped"])
def test_layer_clipping_equals_one_backward_pass_per_patient(key, clip, norm_form) -> None:
    model, dims, edge = _network(key)
    for owner in (UNEVEN, EVEN):
        x, y, who = _batch(dims, edge, owner)
        want = brute_force_clipped_sum(model, x, y, who, clip)
        clipper = LayerClipper(model, clip)
        got, loss = clipper(x, y, who, int(who.max()) + 1)
        clipper.close()
        assert np.isfinite(loss)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_the_networks_use_every_layer_type_the_clipper_covers() -> None:
    """The layer types with parameters across the listed networks, 2-D and 3-D: each is one
    the brute-force test above exercised, and each is clipped without Opacus' hooks."""
    seen = set()
    for key in NETWORKS:
        model, _, _ = _network(key)
        assert layer_clippable(model)
        seen |= {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    assert seen == {
        nn.Conv2d,
        nn.Conv3d,
        nn.Linear,
        nn.GroupNorm,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
    }


@pytest.mark.parametrize("key", ["densenet121-2d", "unet-encoder-3d"])
def test_layer_clipping_agrees_with_opacus_per_image_hooks(key) -> None:
    """(Not on MONAI's ResNets: their `out += residual` modifies a hooked output in place,
    which Opacus' full backward hooks refuse.)"""
    model, dims, edge = _network(key)
    x, y, owner = _batch(dims, edge, UNEVEN)
    ours = LayerClipper(model, 0.01)
    got, _ = ours(x, y, owner, 5)
    ours.close()
    theirs = OpacusClipper(model, 0.01, functorch=False)
    want, _ = theirs(x, y, owner, 5)
    theirs.close()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_frozen_layers_get_no_gradient_and_the_rest_are_still_exact() -> None:
    model, dims, edge = _network("unet-encoder-2d")
    for p in model[0].parameters():  # the stem
        p.requires_grad_(False)
    x, y, owner = _batch(dims, edge, UNEVEN)
    clipper = LayerClipper(model, 0.01)
    got, _ = clipper(x, y, owner, 5)
    clipper.close()
    assert len(got) == len([p for p in model.parameters() if p.requires_grad])
    for g, w in zip(got, brute_force_clipped_sum(model, x, y, owner, 0.01), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_physical_batches_of_whole_patients_give_the_same_step() -> None:
    """A logical batch split into passes of at most 2 images, never splitting a patient (one
    with more images gets a pass alone), sums to exactly the one-pass clipped sum: the
    release is unchanged."""
    model, dims, edge = _network("resnet18-2d")
    x, y, owner = _batch(dims, edge, UNEVEN)  # patients of 3, 3, 1, 3, 1 images
    settings = TrainSettings(
        epochs=1, batch_size=4, learning_rate=0.1, seed=0, noise_multiplier=1.0, max_grad_norm=0.01
    )
    whole = PatientDPSGD(model, settings, expected_batch=4.0, generator=None)
    one, loss_one = whole._clipped_sum(x, y, owner, 5)
    whole.close()
    split = PatientDPSGD(
        model, settings, expected_batch=4.0, generator=None, physical_batch_images=2
    )
    calls: list[int] = []
    split.clipper = _Counting(split.clipper, calls)
    many, loss_many = split._clipped_sum(x, y, owner, 5)
    split.close()
    assert calls == [3, 3, 1, 3, 1]
    assert loss_many == pytest.approx(loss_one)
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class _Counting:
    """A clipper that records how many images each pass held."""

    def __init__(self, inner, calls: list[int]) -> None:
        self.inner, self.calls, self.params = inner, calls, inner.params

    def __call__(self, xb, yb, owner, n_units):
        self.calls.append(len(xb))
        assert int(owner.max()) + 1 == n_units  # owners renumbered within the pass
        return self.inner(xb, yb, owner, n_units)

    def close(self) -> None:
        self.inner.close()


def test_a_layer_run_twice_in_one_forward_pass_is_refused() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 1))
    clipper = LayerClipper(model, 1.0)
    with pytest.raises(StepError, match="runs twice"):
        clipper(torch.rand(3, 4), torch.ones(3), torch.tensor([0, 0, 1]), 2)
    clipper.close()


def test_ghost_mode_picks_the_layer_clipper_for_a_monai_network() -> None:
    model, _, _ = _network("resnet18-2d")
    settings = TrainSettings(
        epochs=1, batch_size=4, learning_rate=0.1, seed=0, noise_multiplier=1.0
    )
    dpsgd = PatientDPSGD(model, settings, expected_batch=4.0, generator=None)
    assert isinstance(dpsgd.clipper, LayerClipper)
    dpsgd.close()
    hooks = TrainSettings(
        epochs=1,
        batch_size=4,
        learning_rate=0.1,
        seed=0,
        noise_multiplier=1.0,
        grad_sample_mode=GradSampleMode.HOOKS,
    )
    dpsgd = PatientDPSGD(model, hooks, expected_batch=4.0, generator=None)
    assert isinstance(dpsgd.clipper, OpacusClipper)
    dpsgd.close()


# ---------------------------------------------------------------- building from the plan


def _spec(**kw) -> ModelConfig:
    return ModelConfig(**({"kind": "monai", "network": "ResNet18"} | kw))


def test_batchnorm_is_replaced_with_groupnorm_and_the_log_says_so(caplog, monkeypatch) -> None:
    monkeypatch.setattr(networks, "_ANNOUNCED", set())
    with caplog.at_level(logging.INFO, logger="medfed.site"):
        model = models.from_plan(_spec(options={"widen_factor": 0.25}))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert "replaced 20 BatchNorm layer(s) with GroupNorm" in caplog.text


@pytest.mark.parametrize("network", ["ResNet18", "DenseNet121", "BasicUNetEncoder"])
def test_initial_weights_come_from_the_seed_alone_even_across_threads(network) -> None:
    spec = _spec(network=network, options={})
    want = models.flat_params(models.initial_from_plan(spec, seed=5))
    got: list[np.ndarray] = []

    def build() -> None:
        torch.rand(1000)  # another thread's use of the global generator changes nothing
        got.append(models.flat_params(models.initial_from_plan(spec, seed=5)))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(g, want) for g in got) and len(got) == 3
    other = models.flat_params(models.initial_from_plan(spec, seed=6))
    assert not np.array_equal(other, want)
    model = models.initial_from_plan(spec, seed=5)
    out = model(torch.rand(2, 1, 32, 32))
    assert torch.equal(out, torch.zeros_like(out))  # the output layer starts at zero


def _weights_file(tmp_path: Path, spec: ModelConfig) -> tuple[Path, str]:
    model = models.from_plan(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.25)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pretrained.pt"
    torch.save(model.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretrained_weights_named_by_hash_load_from_the_sites_copy(tmp_path) -> None:
    spec = _spec(network="BasicUNetEncoder")
    path, digest = _weights_file(tmp_path, spec)
    named = spec.model_copy(update={"weights_sha256": digest})
    model = models.initial_from_plan(named, seed=0, weights=path)
    assert np.all(models.flat_params(model) == 0.25)
    with pytest.raises(StepError, match="names no pretrained_weights file"):
        models.initial_from_plan(named, seed=0)
    wrong = spec.model_copy(update={"weights_sha256": "0" * 64})
    with pytest.raises(StepError, match=r"pretrained\.pt does not have the SHA-256"):
        models.initial_from_plan(wrong, seed=0, weights=path)
    with pytest.raises(StepError, match="does not exist"):
        load_pretrained(models.from_plan(spec), tmp_path / "missing.pt", sha256=digest)
    other, other_digest = _weights_file(tmp_path / "o", _spec(network="ResNet18"))
    with pytest.raises(StepError, match="does not fit the network"):
        load_pretrained(models.from_plan(spec), other, sha256=other_digest)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(StepError, match="is not a torch state dict"):
        load_pretrained(
            models.from_plan(spec), junk, sha256=hashlib.sha256(b"not a state dict").hexdigest()
        )


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"kind": "monai"}, "model.network is required"),
        ({"kind": "monai", "network": "VGG16"}, "model.network"),
        ({"kind": "monai", "network": "ResNet18", "out_channels": 2}, "binary classifiers"),
        ({"kind": "monai", "network": "ResNet18", "spatial_dims": 3}, "volumes"),
        ({"kind": "monai", "network": "ResNet18", "in_channels": 3}, "single-channel"),
        ({"kind": "cnn", "network": "ResNet18"}, "are for kind 'monai'"),
    ],
)
def test_bad_model_settings_are_one_sentence_naming_the_field(model, message) -> None:
    raw = {
        "model": model,
        "sites": [
            {"name": "a", "kind": "dicom", "public_key": "1" * 64, "kex_key": "2" * 64},
        ],
    }
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(raw, base_dir=Path("."))
    assert "model" in str(err.value) and "\n" not in str(err.value)


def test_bad_network_options_are_one_sentence() -> None:
    with pytest.raises(StepError, match="model.options do not build a ResNet18"):
        models.from_plan(_spec(options={"no_such_option": 1}))


def test_a_pinned_cuda_device_without_cuda_is_one_sentence() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    with pytest.raises(StepError, match="pins device cuda:0, but no CUDA device"):
        pick_device("cuda:0")
    assert pick_device("cpu") == torch.device("cpu")


def test_a_monai_network_trains_with_patient_level_dp_and_learns() -> None:
    """Bright-blob images vs plain noise, 40 patients of 1-3 images: DP-SGD through the
    layer clipper in physical passes of at most 8 images moves the model to separate them."""
    rng = np.random.default_rng(0)
    n_patients = 40
    per = rng.integers(1, 4, n_patients)
    groups = np.repeat(np.arange(n_patients), per)
    labels = np.repeat(rng.random(n_patients) < 0.5, per).astype(np.float32)
    x = rng.random((len(groups), 1, 16, 16)).astype(np.float32) * 0.3
    x[labels == 1, :, 4:12, 4:12] += 0.7
    model = models.initial_from_plan(
        _spec(network="BasicUNetEncoder", options={"features": [4, 8]}), seed=0
    )
    outcome = train_local(
        model,
        x,
        labels,
        TrainSettings(
            epochs=8,
            batch_size=10,
            learning_rate=1.0,
            seed=0,
            noise_multiplier=0.1,  # 30 runs here: AUC 0.99-1.0 (noise 0.5: 0.46-1.0)
            sample_rate=0.25,
            max_grad_norm=1.0,
        ),
        groups=groups,
        physical_batch_images=8,
    )
    assert outcome.release is not None and outcome.release.steps == 32
    from tasks.evaluate import metrics, predict

    assert metrics(predict(model, x), labels).auc > 0.9


def test_the_monai_benchmark_reports_both_clippers_in_one_run() -> None:
    from tasks.step_bench import monai_step_benchmark

    figures = monai_step_benchmark(network="ResNet18", image_size=16, patients=3, repeats=1)
    for prefix in ("monai_", "monai_opacus_hooks_"):
        assert (
            figures[prefix + "dp_step_seconds"] > 0 and figures[prefix + "plain_step_seconds"] > 0
        )
        assert figures[prefix + "dp_step_time_ratio"] == pytest.approx(
            figures[prefix + "dp_step_seconds"] / figures[prefix + "plain_step_seconds"]
        )
        assert figures[prefix + "dp_peak_memory_ratio"] > 1  # per-patient work costs memory
    assert 9 <= figures["monai_batch_images"] <= 15  # 3 patients of 3-5 images
    # Per-image gradients of every layer at once hold more than one layer's at a time.
    assert figures["monai_opacus_hooks_dp_peak_bytes"] > figures["monai_dp_peak_bytes"]


def test_the_config_offers_exactly_the_networks_medfed_builds() -> None:
    import typing

    from tasks.networks import NETWORKS

    choices = typing.get_args(ModelConfig.model_fields["network"].annotation)[0]
    assert set(typing.get_args(choices)) == set(NETWORKS)
