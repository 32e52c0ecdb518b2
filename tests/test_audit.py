import numpy as np
import pytest
import torch
from torch import nn

from tasks import StepError
from tasks.audit import membership_attack, per_patient_mean, per_sample_loss


def test_per_patient_mean_groups_images_of_one_patient():
    values = np.array([1.0, 3.0, 10.0, 4.0, 6.0])
    groups = np.array([0, 0, 1, 2, 2])
    np.testing.assert_allclose(per_patient_mean(values, groups), [2.0, 10.0, 5.0])
    with pytest.raises(StepError):
        per_patient_mean(values, groups[:3])


def test_attack_auc_extremes():
    assert membership_attack(np.array([0.1, 0.2]), np.array([0.9, 1.0])).attack_auc == 1.0
    assert membership_attack(np.array([0.9, 1.0]), np.array([0.1, 0.2])).attack_auc == 0.0
    rng = np.random.default_rng(0)
    same = membership_attack(rng.random(2000), rng.random(2000))
    assert same.attack_auc == pytest.approx(0.5, abs=0.03)
    assert (same.members, same.non_members) == (2000, 2000)
    with pytest.raises(StepError):
        membership_attack(np.array([]), np.array([1.0]))


def test_a_memorizing_model_is_caught():
    """A model trained to zero loss on a few random points leaks membership: AUC near 1."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 20)).astype(np.float32)
    y = rng.integers(0, 2, 40).astype(np.float32)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    members, non_members = slice(0, 20), slice(20, 40)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(torch.as_tensor(x[members])).squeeze(1), torch.as_tensor(y[members])
        )
        loss.backward()
        opt.step()
    result = membership_attack(
        per_sample_loss(model, x[members], y[members]),
        per_sample_loss(model, x[non_members], y[non_members]),
    )
    assert result.attack_auc > 0.9
