"""Aggregation strategy: FedAvg's weights (coordinator) and update rule (site).

The coordinator only weights ciphertexts; the update rule runs at each site, on the decrypted
mean update, so a new strategy (server learning rate, momentum) changes this module alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tasks import WorkFailed


@dataclass(frozen=True, kw_only=True)
class FedAvg:
    """McMahan et al. 2017: weights n_k / n; the global model moves by the weighted mean."""

    server_learning_rate: float = 1.0

    def weights(self, samples: Mapping[str, int]) -> dict[str, float]:
        total = sum(samples.values())
        if total <= 0 or any(n < 0 for n in samples.values()):
            raise WorkFailed("no training samples behind the uploaded updates")
        return {site: n / total for site, n in sorted(samples.items())}

    def apply(self, base: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        if base.shape != mean_update.shape:
            raise WorkFailed(
                f"the aggregate holds {mean_update.size} values, the model {base.size}"
            )
        return (base + self.server_learning_rate * mean_update).astype(np.float32)
