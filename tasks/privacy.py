"""Privacy maths at the site: the release a round makes, noise calibration, update clipping.

The accountant and the reading of a site's charges from the ledger live in
`ledger.accounting` (a compliance officer recomputes spend with the same code); the budget
check and the reservation it grants are `tasks.budget`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants.utils import get_noise_multiplier

from ledger.accounting import Release, epsilon
from tasks import StepError

# Calibration searches noise multipliers whose RDP optimum sits at the largest order; the
# bound is still valid (just looser), so the console need not hear about it.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def planned_release(*, sample_rate: float, epochs: int, noise_multiplier: float) -> Release:
    """The release one round of local training makes: ceil(1/q) Poisson-sampled steps per
    epoch, each patient in a step with probability `sample_rate`. Every figure comes from the
    plan, none from the cohort: a release that depended on the number of patients would
    differ between neighbouring cohorts, and the accountant's add/remove-one-patient bound
    would not describe it. `tasks.train.train_local` makes exactly this release."""
    if not 0 < sample_rate <= 1 or epochs < 1:
        raise StepError("a DP round needs a sample rate in (0, 1] and at least one epoch")
    steps_per_epoch = math.ceil(1 / sample_rate - 1e-9)
    return Release(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=epochs * steps_per_epoch
    )


def plan(
    history: Sequence[Release],
    per_round: Sequence[Release],
    *,
    rounds: int,
    delta: float,
    accountant: str,
) -> list[float]:
    """Cumulative epsilon after each of the next `rounds` rounds, each making `per_round`."""
    return [
        epsilon([*history, *(list(per_round) * k)], delta=delta, accountant=accountant)
        for k in range(1, rounds + 1)
    ]


def metrics_release(noise_multiplier: float) -> Release:
    """One noisy evaluation: Gaussian noise of std `noise_multiplier` on a patient-level
    histogram whose L2 sensitivity is 1 (`tasks.evaluate.patient_histogram`)."""
    return Release(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)


def site_level_release(update_noise_multiplier: float) -> Release | None:
    """The optional Gaussian noise on a site's clipped update (std = z * clip norm), as a
    patient-level release. One patient can move the clipped update anywhere within the clip
    ball, so its sensitivity is twice the clip norm: account it at noise multiplier z / 2."""
    if update_noise_multiplier <= 0:
        return None
    return Release(noise_multiplier=update_noise_multiplier / 2, sample_rate=1.0, steps=1)


@lru_cache(maxsize=256)
def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    alongside: tuple[Release, ...] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to `tolerance` in epsilon) whose `steps` at `sample_rate`,
    together with the releases `alongside` (the plan's site-level update noise), stay within
    `target_epsilon`. Without `alongside` this is Opacus' own calibration."""
    if not alongside:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=tolerance,
            )
        )

    def spent(noise: float) -> float:
        dp_sgd = Release(noise_multiplier=noise, sample_rate=sample_rate, steps=steps)
        return epsilon([dp_sgd, *alongside], delta=delta, accountant=accountant)

    floor = epsilon(list(alongside), delta=delta, accountant=accountant)
    if floor >= target_epsilon - tolerance:
        raise StepError(
            f"the site-level update noise alone spends epsilon {floor:.3g} of the target "
            f"{target_epsilon:g}: raise dp.update_noise_multiplier or dp.target_epsilon"
        )
    low, high = 0.0, 1.0
    while spent(high) > target_epsilon:  # epsilon falls as the noise grows
        low, high = high, 2 * high
    while target_epsilon - spent(high) > tolerance:
        middle = (low + high) / 2
        low, high = (low, middle) if spent(middle) <= target_epsilon else (middle, high)
    return high


def clip_update(update: np.ndarray, *, max_norm: float) -> tuple[np.ndarray, float]:
    """Scale `update` so its L2 norm is at most `max_norm`; return it and the original norm."""
    if max_norm <= 0:
        raise StepError("update clip norm must be positive")
    if not np.all(np.isfinite(update)):
        raise StepError("model update holds NaN or infinite values")
    norm = float(np.linalg.norm(update))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return (update * scale).astype(np.float32), norm


def gaussian_noise(size: int, *, std: float, secure: bool, seed: int | None = None) -> np.ndarray:
    """N(0, std^2) noise; from the OS CSPRNG when `secure`, else a seeded PCG64."""
    if std < 0:
        raise StepError("noise standard deviation must be non-negative")
    if secure:
        # Box-Muller over 53-bit uniforms drawn from os.urandom.
        raw = np.frombuffer(os.urandom(16 * size), dtype=np.uint64).reshape(2, size)
        u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
        u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    else:
        z = np.random.default_rng(seed).standard_normal(size)
    return (z * std).astype(np.float32)
