"""Held-out metrics a site computes on the decrypted global model."""

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


def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
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


def weighted(per_site: Sequence[Metrics]) -> Metrics:
    total = sum(m.n for m in per_site)
    if total == 0:
        return Metrics(auc=float("nan"), accuracy=float("nan"), n=0)
    return Metrics(
        auc=sum(m.auc * m.n for m in per_site) / total,
        accuracy=sum(m.accuracy * m.n for m in per_site) / total,
        n=total,
    )
