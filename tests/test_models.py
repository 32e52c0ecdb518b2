"""The DP-friendly image model: fixed scattering-like front-end, trainable linear head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from tasks import StepError, models
from tasks.train import validate_for_dp


def test_filter_bank_is_fixed_and_unit_norm() -> None:
    bank = models.filter_bank()
    assert bank.shape == (8, 1, models.FILTER_SIZE, models.FILTER_SIZE)
    torch.testing.assert_close(bank.flatten(1).norm(dim=1), torch.ones(8))
    torch.testing.assert_close(bank, models.filter_bank())  # no randomness
    with pytest.raises(StepError):
        models.filter_bank(4)


def test_cnn_trains_only_its_head_and_is_identical_everywhere() -> None:
    a = models.initial("cnn", seed=1)
    b = models.build("cnn")
    front = a[0]
    assert isinstance(front, models.ScatterFrontEnd)
    assert not list(front.parameters())  # fixed filters are buffers, never released
    assert models.n_params(a) == front.out_features + 1  # linear head: weights + bias
    np.testing.assert_array_equal(models.flat_params(a), 0.0)  # zero head at round 0
    x = torch.rand(3, 1, 32, 32)
    # Two builds (two sites) compute the same features without sharing anything.
    torch.testing.assert_close(a[0](x), b[0](x))


def test_hidden_head_starts_with_zero_output_and_seeded_hidden_layer() -> None:
    a = models.initial("cnn", seed=1, hidden=8)
    b = models.initial("cnn", seed=1, hidden=8)
    assert models.n_params(a) == (a[0].out_features + 1) * 8 + 8 + 1
    np.testing.assert_array_equal(models.flat_params(a), models.flat_params(b))  # every site
    hidden, out = a[1], a[-1]
    assert torch.all(out.weight == 0) and torch.all(out.bias == 0)  # logit 0 at round 0
    assert hidden.weight.std() > 0  # not zero: zero hidden units would never differ


@pytest.mark.parametrize("kind", ["cnn", "mlp", "logistic"])
def test_round_zero_model_is_the_same_in_parallel_threads_whatever_the_global_rng(kind) -> None:
    """Sites initialise concurrently in one process; another thread seeding or drawing from
    torch's global RNG meanwhile must not change the round-0 model (it once did, and the
    sites then decrypted different global models)."""
    import threading

    kw = {"seed": 5, "hidden": 16} | ({} if kind == "cnn" else {"features": 7})
    want = models.flat_params(models.initial(kind, **kw))
    got: list[np.ndarray] = []
    stop = threading.Event()

    def disturb() -> None:
        while not stop.is_set():
            torch.manual_seed(0)
            torch.rand(64)

    noise = threading.Thread(target=disturb)
    noise.start()
    try:
        threads = [
            threading.Thread(
                target=lambda: got.append(models.flat_params(models.initial(kind, **kw)))
            )
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        noise.join()
    assert len(got) == 8
    for params in got:
        np.testing.assert_array_equal(params, want)
    assert models.flat_params(models.initial(kind, **(kw | {"seed": 6}))).tolist() != want.tolist()


def test_mlp_needs_hidden_units() -> None:
    with pytest.raises(StepError, match="hidden unit"):
        models.build("mlp", features=4, hidden=0)


def test_features_are_centred_on_the_reference_images() -> None:
    front = models.ScatterFrontEnd()
    ref = torch.as_tensor(models.reference_images(channels=1, height=24, width=24))
    z = front(ref)
    assert z.mean(dim=0).abs().max() < 1e-4
    raw = models.ScatterFrontEnd(centre=False)(ref)
    assert raw.mean(dim=0).norm() > 5  # what centring removes: a large common offset


def test_front_end_rejects_wrong_input() -> None:
    with pytest.raises(StepError, match="expects"):
        models.ScatterFrontEnd()(torch.rand(2, 3, 32, 32))
    with pytest.raises(StepError, match="too small"):
        models.ScatterFrontEnd()(torch.rand(2, 1, 3, 3))


def test_frozen_prefix() -> None:
    assert models.frozen_prefix(models.build("cnn")) == 1
    assert models.frozen_prefix(models.small_cnn()) == 0
    assert models.frozen_prefix(models.build("mlp", features=4, hidden=8)) == 0
    assert models.frozen_prefix(nn.Linear(2, 1)) == 0


@pytest.mark.parametrize(
    "model", [models.build("cnn"), models.small_cnn(), models.build("mlp", features=3, hidden=8)]
)
def test_models_pass_opacus_validation(model: nn.Module) -> None:
    assert ModuleValidator.validate(model, strict=False) == []
    validate_for_dp(model)


def test_batchnorm_is_rejected_with_a_clear_message() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))
    with pytest.raises(StepError, match="BatchNorm") as err:
        validate_for_dp(model)
    assert "GroupNorm" in str(err.value)


def test_flat_round_trip_and_shape_check() -> None:
    model = models.build("cnn")
    flat = np.arange(models.n_params(model), dtype=np.float32)
    models.load_flat(model, flat)
    np.testing.assert_array_equal(models.flat_params(model), flat)
    with pytest.raises(StepError, match="shape"):
        models.load_flat(model, flat[:-1])


def test_build_errors() -> None:
    with pytest.raises(StepError, match="features"):
        models.build("mlp")
    with pytest.raises(StepError, match="unknown"):
        models.build("resnet", features=3)
