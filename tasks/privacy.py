"""Privacy maths: accounting over a site's whole release history, budgets, update clipping.

A site's history is the list of DP-SGD releases it has made (noise multiplier, sample rate,
steps), read back from the ledger; epsilon is always recomputed from that history by an
Opacus accountant, so spend accumulates across rounds, jobs and restarts.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from tasks import StepError

# Calibration searches noise multipliers whose RDP optimum sits at the largest order; the
# bound is still valid (just looser), so the console need not hear about it.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")

_ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


@dataclass(frozen=True, kw_only=True)
class Release:
    """One DP-SGD release: `steps` noisy steps at `sample_rate` with `noise_multiplier`."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 1):
            raise StepError(f"invalid DP release {asdict(self)}")

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def epsilon(history: Sequence[Release], *, delta: float, accountant: str) -> float:
    """Cumulative epsilon at `delta` of every release in `history` (0 when empty)."""
    if not history:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(nm, q, steps) for (nm, q), steps in merged(history).items()]
    # PRV evaluates log(1 - q) inside np.where, which warns (harmlessly) at sample rate 1.
    with np.errstate(divide="ignore"):
        return float(acc.get_epsilon(delta=delta))


def merged(history: Sequence[Release]) -> dict[tuple[float, float], int]:
    """Releases of the same mechanism compose into one with the summed steps; merging them
    keeps the accountant's cost constant however many rounds the ledger holds."""
    steps: dict[tuple[float, float], int] = {}
    for r in history:
        key = (r.noise_multiplier, r.sample_rate)
        steps[key] = steps.get(key, 0) + r.steps
    return steps


def _accountant(name: str) -> PRVAccountant | RDPAccountant:
    try:
        return _ACCOUNTANTS[name]()
    except KeyError:
        raise StepError(
            f"unknown accountant '{name}' (use one of {sorted(_ACCOUNTANTS)})"
        ) from None


def planned_release(
    *, n_samples: int, batch_size: int, epochs: int, noise_multiplier: float
) -> Release:
    """The release one round of local training makes: sample rate 1/ceil(n/batch) and
    ceil(n/batch) steps per epoch. `n_samples` counts PRIVACY UNITS (patients, not images)
    and `batch_size` the expected patients per step; `tasks.train.train_local` samples and
    clips patients accordingly and returns exactly this release."""
    if n_samples < 1:
        raise StepError("a site needs at least one training sample")
    batches = math.ceil(n_samples / batch_size)
    return Release(
        noise_multiplier=noise_multiplier, sample_rate=1 / batches, steps=epochs * batches
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


@dataclass(frozen=True, kw_only=True)
class Admission:
    """Whether a site may make this round's releases, and the figures behind the decision."""

    admitted: bool
    spent: float  # epsilon of the history alone
    projected: float  # epsilon after this round's releases
    reason: str = ""


def admit(
    history: Sequence[Release],
    this_round: Sequence[Release],
    *,
    budget: float,
    delta: float,
    accountant: str,
) -> Admission:
    """The budget decision, pure: admitted iff history plus this round stays within `budget`."""
    projected = epsilon([*history, *this_round], delta=delta, accountant=accountant)
    if projected <= budget:
        return Admission(admitted=True, spent=float("nan"), projected=projected)
    spent = epsilon(history, delta=delta, accountant=accountant)
    return Admission(
        admitted=False,
        spent=spent,
        projected=projected,
        reason=f"budget exhausted: this round would bring epsilon from {spent:.3f} to "
        f"{projected:.3f}, over the budget of {budget:g}",
    )


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
