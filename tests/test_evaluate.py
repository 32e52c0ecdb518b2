import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tasks.evaluate import Metrics, metrics, weighted


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = metrics(s, y)
    assert m.auc == pytest.approx(roc_auc_score(y, s))
    assert m.accuracy == pytest.approx(np.mean((s >= 0.5) == y))
    assert m.n == 200


def test_single_class_gives_chance_auc_not_a_crash():
    assert metrics(np.array([0.2, 0.9]), np.array([1, 1])).auc == 0.5


def test_weighted_average_is_by_held_out_count():
    w = weighted([Metrics(auc=1.0, accuracy=1.0, n=30), Metrics(auc=0.5, accuracy=0.0, n=10)])
    assert w.auc == pytest.approx(0.875) and w.accuracy == pytest.approx(0.75) and w.n == 40
