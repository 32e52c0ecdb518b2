"""Held-out metrics a site computes on the decrypted global model.

Exact metrics are a function of every held-out patient: releasing them gives those patients
no DP at all. `noisy_metrics` releases instead a patient-level histogram of scores under
Gaussian noise (the Gaussian mechanism, L2 sensitivity 1) and derives AUC, accuracy and the
held-out count from it, which is post-processing and costs nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn


@dataclass(frozen=True, kw_only=True)
class Metrics:
    auc: float
    accuracy: float
    n: int


# Input values per inference batch: a deep network's activations are many times its input
# (MONAI's ResNet18 holds 64 channels at full resolution), so large images get smaller batches.
_PREDICT_VALUES = 1 << 22


def inference_batch_size(x: np.ndarray) -> int:
    return max(1, min(1024, _PREDICT_VALUES // max(1, int(np.prod(x.shape[1:])))))


def predict(model: nn.Module, x: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
    batch_size = batch_size or inference_batch_size(x)
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[i : i + batch_size], device=device)
            out.append(torch.sigmoid(model(xb)).squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def metrics(scores: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5) -> Metrics:
    labels = labels.astype(int)
    # AUC is undefined on one class; report chance rather than crash a round.
    auc = float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else 0.5
    accuracy = float(np.mean((scores >= threshold).astype(int) == labels)) if len(labels) else 0.0
    return Metrics(auc=auc, accuracy=accuracy, n=int(len(labels)))


# Public score bins: an edge at the 0.5 decision threshold, so accuracy is exact per bin.
SCORE_BINS = np.linspace(0.0, 1.0, 11)


def patient_histogram(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(2, bins) mass of (label, score bin): each patient spreads a total weight of 1 over its
    images, so adding or removing one patient moves the histogram by at most 1 in L1 and
    hence in L2 however many images it has."""
    labels = labels.astype(int)
    _, patient, per_patient = np.unique(groups, return_inverse=True, return_counts=True)
    weight = 1.0 / per_patient[patient]
    bins = np.clip(np.digitize(scores, SCORE_BINS[1:-1]), 0, len(SCORE_BINS) - 2)
    hist = np.zeros((2, len(SCORE_BINS) - 1))
    np.add.at(hist, (labels, bins), weight)
    return hist


def from_histogram(hist: np.ndarray) -> Metrics:
    """AUC (ties within a bin count one half), accuracy at 0.5 and the count, from a
    (possibly noisy) histogram. Noisy cells are used as they are, negative ones included:
    zero-mean noise keeps each product of two independent cells unbiased, where clipping
    cells at zero would pull every estimate towards chance."""
    neg, pos = hist
    n_neg, n_pos = neg.sum(), pos.sum()
    n = n_neg + n_pos
    if n < 1:
        return Metrics(auc=0.5, accuracy=0.0, n=0)
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    auc = (pos * (below + neg / 2)).sum() / (n_pos * n_neg) if min(n_pos, n_neg) >= 1 else 0.5
    half = (len(SCORE_BINS) - 1) // 2
    accuracy = (neg[:half].sum() + pos[half:].sum()) / n
    return Metrics(
        auc=float(np.clip(auc, 0.0, 1.0)),
        accuracy=float(np.clip(accuracy, 0.0, 1.0)),
        n=int(round(n)),
    )


def noisy_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    groups: np.ndarray,
    noise_multiplier: float,
    secure: bool = True,
) -> Metrics:
    """Metrics from the patient-level histogram plus N(0, noise_multiplier^2) per cell."""
    from tasks.privacy import gaussian_noise

    hist = patient_histogram(scores, labels, groups)
    noise = gaussian_noise(hist.size, std=noise_multiplier, secure=secure).reshape(hist.shape)
    return from_histogram(hist + noise)


def weighted(per_site: Sequence[Metrics]) -> Metrics:
    """Held-out-size weighted metrics over the sites that released them (a withheld site's
    figures are NaN and left out)."""
    per_site = [m for m in per_site if np.isfinite(m.auc)]
    total = sum(m.n for m in per_site)
    if total == 0:
        return Metrics(auc=float("nan"), accuracy=float("nan"), n=0)
    return Metrics(
        auc=sum(m.auc * m.n for m in per_site) / total,
        accuracy=sum(m.accuracy * m.n for m in per_site) / total,
        n=total,
    )
