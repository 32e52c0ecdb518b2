"""Patient-level DP-SGD: the patient is the sampled, clipped and accounted unit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedhelp import brute_force_clipped_sum
from sklearn.metrics import roc_auc_score
from torch import nn

from tasks import StepError, models
from tasks.clipping import GhostClipper, LayerClipper, OpacusClipper, ghost_clippable
from tasks.privacy import Release, planned_release
from tasks.step_bench import dp_step_benchmark
from tasks.train import (
    GradSampleMode,
    PatientDPSGD,
    TrainSettings,
    patient_index,
    patient_release,
    split_frozen,
    train_local,
)

FEATURES = 4


def _cohort(
    n_patients: int, images: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tabular rows, `images` per patient; the label is a patient's, the signal its rows'."""
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.random(n_patients) < 0.5, images).astype(np.float32)
    x = rng.normal(size=(n_patients * images, FEATURES)).astype(np.float32)
    x[:, 0] += 2.0 * (2 * y - 1)
    return x, y, np.repeat(np.arange(n_patients, dtype=np.int64), images)


def _with_heavy_patient(x: np.ndarray, y: np.ndarray, groups: np.ndarray, images: int):
    """Add one patient holding `images` identical, strongly mislabelled rows."""
    heavy_x = np.tile(np.array([[-8.0, 5.0, -5.0, 5.0]], dtype=np.float32), (images, 1))
    heavy_y = np.ones(images, dtype=np.float32)
    heavy_g = np.full(images, groups.max() + 1, dtype=np.int64)
    return (
        np.concatenate([x, heavy_x]),
        np.concatenate([y, heavy_y]),
        np.concatenate([groups, heavy_g]),
    )


def _settings(**kw) -> TrainSettings:
    base = dict(
        epochs=2, batch_size=64, learning_rate=0.5, seed=3, noise_multiplier=1.0, max_grad_norm=1.0
    )
    return TrainSettings(**(base | kw))


def _zero_logistic() -> nn.Module:
    return models.load_flat(models.logistic(features=FEATURES), np.zeros(FEATURES + 1, np.float32))


def _train(x, y, groups, settings) -> np.ndarray:
    return train_local(_zero_logistic(), x, y, settings, groups=groups).params


# ---------------------------------------------------------------- the patient is the unit


@pytest.mark.parametrize("mode", list(GradSampleMode))
@pytest.mark.parametrize("per_patient", [True, False])
def test_one_step_sensitivity_to_a_patient_with_50_images(
    per_patient: bool, mode: GradSampleMode
) -> None:
    """Adding a patient with 50 images moves one noiseless step by at most lr * C / E when
    the patient is clipped as one unit; clipping each image alone (the control) lets the
    same patient move it ~50 times further, so this test fails for image-level DP."""
    lr, clip = 0.5, 1.0
    x, y, g = _cohort(10, 3)
    x2, y2, g2 = _with_heavy_patient(x, y, g, 50)
    settings = _settings(
        learning_rate=lr, max_grad_norm=clip, noise_multiplier=1e-9, grad_sample_mode=mode
    )
    expected = 11.0  # patients per step the optimizer divides by, the same in both runs

    def one_step(xs: np.ndarray, ys: np.ndarray, gs: np.ndarray) -> torch.Tensor:
        model = models.logistic(features=FEATURES)
        with torch.no_grad():
            model[0].weight.fill_(0.1)
            model[0].bias.zero_()
        dpsgd = PatientDPSGD(
            model, settings, expected_batch=expected, generator=torch.Generator().manual_seed(0)
        )
        owner = torch.as_tensor(
            np.unique(gs, return_inverse=True)[1] if per_patient else np.arange(len(gs))
        )
        dpsgd.step(torch.as_tensor(xs), torch.as_tensor(ys), owner, int(owner.max()) + 1)
        dpsgd.close()
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    moved = float((one_step(x2, y2, g2) - one_step(x, y, g)).norm())
    bound = lr * clip / expected
    if per_patient:
        assert moved <= bound * (1 + 1e-4)
        assert moved > 0.9 * bound  # the patient's gradient is large: it is clipped, not absent
    else:
        assert moved > 10 * bound


@pytest.mark.parametrize("unit", ["patient", "image"])
def test_training_sensitivity_to_a_patient_with_50_images(unit: str) -> None:
    """Whole `train_local` runs (every patient in every step, noise ~0): with and without a
    50-image patient the parameters differ by about steps * lr * C / patients at most. With
    each image treated as its own patient (what image-level DP does) the bound breaks."""
    lr, clip, n = 0.05, 1.0, 10
    x, y, g = _cohort(n, 3)
    x2, y2, g2 = _with_heavy_patient(x, y, g, 50)
    if unit == "image":
        g, g2 = np.arange(len(g)), np.arange(len(g2))
    settings = _settings(
        learning_rate=lr,
        max_grad_norm=clip,
        noise_multiplier=1e-9,
        batch_size=n,
        sample_rate=1.0,
        epochs=5,
    )
    release = patient_release(settings)
    assert release.sample_rate == 1.0  # every unit in every step: no sampling randomness
    moved = float(np.linalg.norm(_train(x2, y2, g2, settings) - _train(x, y, g, settings)))
    # The sum is divided by the plan's batch size, not by a count of this cohort: the only
    # difference a new patient makes is its own clipped gradient (<= C / batch) each step;
    # slack for the drifting trajectory.
    bound = release.steps * lr * clip / n
    if unit == "patient":
        assert moved <= 1.1 * bound
    else:
        assert moved > 2 * bound


def test_release_is_the_same_for_neighbouring_cohorts() -> None:
    """Patients, not images, are counted, and the release does not depend on how many there
    are: a cohort with one patient more runs exactly the same mechanism."""
    x, y, g = _cohort(40, 5)
    settings = _settings(batch_size=16, sample_rate=0.4, epochs=3)
    out = train_local(models.logistic(features=FEATURES), x, y, settings, groups=g)
    assert out.n_samples == 200 and out.n_patients == 40
    planned = planned_release(sample_rate=0.4, epochs=3, noise_multiplier=1.0)
    assert out.release == planned == Release(noise_multiplier=1.0, sample_rate=0.4, steps=9)
    x2, y2, g2 = _with_heavy_patient(x, y, g, 50)
    bigger = train_local(models.logistic(features=FEATURES), x2, y2, settings, groups=g2)
    assert bigger.n_patients == 41 and bigger.release == out.release


def test_uneven_patients_and_unsorted_ids() -> None:
    groups = np.array([7, 3, 7, 7, 100, 3], dtype=np.int64)
    index = patient_index(groups, 6)
    assert index.n_patients == 3
    assert sorted(map(tuple, (sorted(r) for r in index.rows))) == [(0, 2, 3), (1, 5), (4,)]
    np.testing.assert_array_equal(groups[np.concatenate(index.rows)], [3, 3, 7, 7, 7, 100])


@pytest.mark.parametrize(
    ("groups", "message"),
    [(np.zeros(5, dtype=np.int64), "shape"), (np.zeros(6, dtype=np.float32), "integers")],
)
def test_bad_groups_are_rejected(groups: np.ndarray, message: str) -> None:
    x, y, _ = _cohort(2, 3)
    with pytest.raises(StepError, match=message):
        train_local(models.logistic(features=FEATURES), x, y, _settings(), groups=groups)


def test_groups_are_required() -> None:
    x, y, _ = _cohort(2, 3)
    with pytest.raises(TypeError):
        train_local(models.logistic(features=FEATURES), x, y, _settings())  # type: ignore[call-arg]


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_an_empty_poisson_batch_still_takes_a_noisy_step(mode: GradSampleMode) -> None:
    model = models.logistic(features=FEATURES)
    before = models.flat_params(model)
    dpsgd = PatientDPSGD(
        model,
        _settings(grad_sample_mode=mode),
        expected_batch=4.0,
        generator=torch.Generator().manual_seed(0),
    )
    loss = dpsgd.step(
        torch.zeros(0, FEATURES), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0
    )
    assert np.isnan(loss)
    assert np.linalg.norm(models.flat_params(model) - before) > 0  # noise was added


def test_batchnorm_model_is_refused_before_training() -> None:
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    x, y, g = _cohort(4, 2)
    with pytest.raises(StepError, match="BatchNorm.*GroupNorm"):
        train_local(model, x, y, _settings(), groups=g)
    # Without DP the same model trains: the refusal is about DP only.
    train_local(model, x, y, _settings(noise_multiplier=None), groups=g)


def test_settings_are_checked() -> None:
    with pytest.raises(StepError):
        _settings(noise_multiplier=0.0)
    with pytest.raises(StepError):
        _settings(learning_rate=float("nan"))
    with pytest.raises(StepError):
        _settings(max_grad_norm=0.0)


# ---------------------------------------------------------------- ghost clipping


@pytest.mark.parametrize(
    "make",
    [
        lambda: models.mlp(features=FEATURES, hidden=7),
        lambda: models.logistic(features=FEATURES),
        lambda: nn.Sequential(nn.Linear(FEATURES, 5, bias=False), nn.Tanh(), nn.Linear(5, 1)),
    ],
    ids=["mlp", "logistic", "no-bias-tanh"],
)
@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])
def test_every_clipper_gives_the_brute_force_patient_clipped_sum(make, clip: float) -> None:
    """Ghost clipping (Gram matrices), Opacus hooks and functorch (per-image gradients summed
    per patient) all equal one backward pass per patient, clipped and summed: with uneven
    patients, unsorted owners, small clips (every patient clipped) and large (none)."""
    torch.manual_seed(0)
    model = make()
    n = 23
    x = torch.randn(n, FEATURES) * 3
    y = (torch.rand(n) < 0.5).float()
    owner = torch.as_tensor(np.random.default_rng(0).integers(0, 6, n))
    owner = torch.as_tensor(np.unique(owner, return_inverse=True)[1])
    want = brute_force_clipped_sum(model, x, y, owner, clip)
    n_units = int(owner.max()) + 1
    assert ghost_clippable(model)
    for make_clipper in (
        lambda: GhostClipper(model, clip),
        lambda: OpacusClipper(model, clip, functorch=False),
        lambda: OpacusClipper(model, clip, functorch=True),
    ):
        clipper = make_clipper()  # one at a time: Opacus' hooks stay on the model until close
        got, loss = clipper(x, y, owner, n_units)
        clipper.close()
        assert np.isfinite(loss)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_ghost_clipping_covers_the_demo_head_and_falls_back_elsewhere() -> None:
    head, _ = split_frozen(models.initial("cnn", seed=0, hidden=8), torch.rand(2, 1, 16, 16))
    assert ghost_clippable(head) and ghost_clippable(models.initial("cnn", seed=0))
    assert ghost_clippable(models.mlp(features=3, hidden=4))
    # Parameters outside Linear layers: layer-wise patient clipping instead; Opacus' hooks when
    # asked for.
    assert not ghost_clippable(models.small_cnn())
    assert not ghost_clippable(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)))
    settings = _settings(grad_sample_mode=GradSampleMode.GHOST)
    dpsgd = PatientDPSGD(models.small_cnn(), settings, expected_batch=2.0, generator=None)
    assert isinstance(dpsgd.clipper, LayerClipper)
    dpsgd.close()
    settings = _settings(grad_sample_mode=GradSampleMode.HOOKS)
    dpsgd = PatientDPSGD(models.small_cnn(), settings, expected_batch=2.0, generator=None)
    assert isinstance(dpsgd.clipper, OpacusClipper)
    dpsgd.close()
    frozen = models.mlp(features=3, hidden=4)
    frozen[0].weight.requires_grad_(False)
    assert not ghost_clippable(frozen)


# ---------------------------------------------------------------- it learns


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_dp_training_learns_with_noise_the_public_seed_does_not_predict(
    mode: GradSampleMode,
) -> None:
    x, y, g = _cohort(60, 3, seed=1)
    xt, yt, _ = _cohort(40, 1, seed=2)
    settings = _settings(grad_sample_mode=mode, epochs=5, batch_size=20, learning_rate=1.0)
    model = models.logistic(features=FEATURES)
    out = train_local(model, x, y, settings, groups=g)
    again = train_local(models.logistic(features=FEATURES), x, y, settings, groups=g)
    # Same data, settings and seed, yet different noise and sampling: the seed is public.
    assert not np.array_equal(out.params, again.params)
    with torch.no_grad():
        scores = model(torch.as_tensor(xt)).squeeze(1).numpy()
    assert roc_auc_score(yt, scores) > 0.9


def test_frozen_front_end_is_computed_once_and_exactly() -> None:
    model = models.initial("cnn", seed=0)
    with torch.no_grad():
        model[-1].weight.normal_()
    x = torch.rand(5, 1, 32, 32)
    rest, feats = split_frozen(model, x)
    assert models.n_params(rest) == models.n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(rest(feats), model(x))


def test_cnn_trains_with_patient_level_dp() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((24, 1, 16, 16), dtype=np.float32)
    y = np.repeat(np.array([0, 1] * 4, dtype=np.float32), 3)
    out = train_local(
        models.initial("cnn", seed=0),
        x,
        y,
        _settings(sample_rate=1.0, batch_size=8),
        groups=np.repeat(np.arange(8), 3),
    )
    assert out.release is not None and out.release.sample_rate == 1.0
    assert np.any(out.params != 0) and np.isfinite(out.mean_loss)


def test_benchmark_reports_its_figures() -> None:
    figures = dp_step_benchmark(image_size=16, patients=2, images_per_patient=4, repeats=1)
    for prefix in ("", "opacus_hooks_", "full_model_"):
        for key in ("dp_step_seconds", "plain_step_seconds", "dp_step_time_ratio"):
            assert figures[prefix + key] > 0
    # DP keeps Gram matrices and noise that plain SGD does not; Opacus' hooks keep one
    # gradient per image, far more than ghost clipping's Gram matrices.
    assert figures["dp_peak_bytes"] > figures["plain_peak_bytes"]
    assert figures["opacus_hooks_dp_peak_bytes"] > figures["dp_peak_bytes"]


def test_training_without_dp_is_reproducible_under_the_seed() -> None:
    x, y, g = _cohort(30, 2, seed=1)
    settings = _settings(noise_multiplier=None, epochs=2, batch_size=8, learning_rate=0.5)
    runs = [train_local(_zero_logistic(), x, y, settings, groups=g) for _ in "ab"]
    np.testing.assert_array_equal(runs[0].params, runs[1].params)
