"""How updates are hidden: the secure-aggregation interface and its two schemes.

A scheme has a site side (`encrypt` an update for a cohort, `decrypt` the aggregate) and a
coordinator side (`aggregate`, from public material only). The key set under the encryption
is made by the key-holding site and sealed to the others (`tasks.site_steps.publish_keys`).

- `"masked-bfv"` (default, `MaskedBFV`): each site encrypts ``quantize(weight * update) + its
  pairwise masks (mod t)`` under BFV. The masks cancel only in the sum over the whole cohort,
  so a site that also holds the BFV secret (any site), even together with the coordinator,
  sees a uniform vector in place of another site's update; the coordinator alone cannot
  decrypt anything, not even the sum. Weights are applied at the sites.
- `"ckks"` (`SharedKeyCKKS`): today's one shared CKKS key set; the coordinator applies the
  weights. Any site can decrypt any single update: kept for comparison only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tasks import IntegrityError, StepError, bfv, ckks
from tasks.config import DPConfig, FederationConfig, Scheme, SecureAggregationConfig
from tasks.masking import PairwiseMasks, Quantizer
from tasks.strategy import FedAvg

# The clamp bound of quantization, in clip norms per unit of site-level noise: a clipped
# update's coordinates lie within the clip norm; N(0, (z C)^2) noise exceeds 6 z C with
# probability 2e-9 per coordinate. Clamping is post-processing of the released update.
NOISE_HEADROOM_SIGMAS = 6.0


class SecureAggregation(Protocol):
    """One scheme, at a site (holding the secret context) or at the coordinator (public)."""

    scheme: Scheme

    def encrypt(
        self, update: np.ndarray, *, weight: float, masks: PairwiseMasks | None
    ) -> bytes: ...

    def aggregate(self, blobs: Sequence[bytes], weights: Sequence[float]) -> bytes: ...

    def decrypt(self, blob: bytes) -> np.ndarray: ...


@dataclass(frozen=True)
class SharedKeyCKKS:
    """Weights applied by the coordinator to unmasked CKKS ciphertexts."""

    context: bytes
    scheme: Scheme = Scheme.CKKS

    def encrypt(self, update: np.ndarray, *, weight: float, masks: PairwiseMasks | None) -> bytes:
        return ckks.encrypt_update(self.context, update)

    def aggregate(self, blobs: Sequence[bytes], weights: Sequence[float]) -> bytes:
        return ckks.weighted_sum(self.context, blobs, weights)

    def decrypt(self, blob: bytes) -> np.ndarray:
        return ckks.decrypt_update(self.context, blob)


@dataclass(frozen=True)
class MaskedBFV:
    """Quantized, weighted, pairwise-masked updates under BFV; the coordinator adds them."""

    context: bytes
    bits: int
    bound: float
    scheme: Scheme = Scheme.MASKED_BFV

    def quantizer(self) -> Quantizer:
        return Quantizer(bits=self.bits, bound=self.bound, modulus=bfv.plain_modulus(self.context))

    def encrypt(self, update: np.ndarray, *, weight: float, masks: PairwiseMasks | None) -> bytes:
        if masks is None:
            raise StepError("masked-bfv encrypts only for a cohort: the pairwise masks are missing")
        q = self.quantizer()
        vector = np.asarray(update)
        if vector.ndim != 1 or vector.size == 0 or not np.all(np.isfinite(vector)):
            raise StepError("the update must be a non-empty 1-D vector of finite numbers")
        # Rounding noise seeded from OS entropy, never from the plan's public seed.
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence()))
        quantized = q.quantize(vector, weight, rng)
        masked = (quantized + masks.total(vector.size, q.modulus)) % q.modulus
        return bfv.encrypt(self.context, masked)

    def aggregate(self, blobs: Sequence[bytes], weights: Sequence[float]) -> bytes:
        return bfv.add(self.context, blobs)  # the sites weighted their own updates

    def decrypt(self, blob: bytes) -> np.ndarray:
        q = self.quantizer()
        total = bfv.decrypt(self.context, blob)
        return q.decode(total)


def clamp_bound(dp: DPConfig) -> float:
    return dp.update_clip_norm * (1.0 + NOISE_HEADROOM_SIGMAS * dp.update_noise_multiplier)


def parameters(sa: SecureAggregationConfig, dp: DPConfig) -> dict[str, Any]:
    """The scheme and everything its key set and encoding depend on (job-start entry)."""
    if sa.scheme == Scheme.CKKS:
        return {"scheme": str(Scheme.CKKS)} | sa.ckks.model_dump(mode="json")
    return key_parameters(sa) | {
        "quantization_bits": sa.bfv.quantization_bits,
        "clamp_bound": clamp_bound(dp),
        "rounding": "stochastic, unbiased",
        "masks": "pairwise X25519 + HKDF-SHA256 + ChaCha20 over Z_t, per round and attempt",
    }


def key_parameters(sa: SecureAggregationConfig) -> dict[str, Any]:
    """What the key set itself is made from (a change needs a new key set)."""
    if sa.scheme == Scheme.CKKS:
        return {"scheme": str(Scheme.CKKS)} | sa.ckks.model_dump(mode="json")
    return {"scheme": str(Scheme.MASKED_BFV)} | sa.bfv.model_dump(
        mode="json", include={"poly_modulus_degree", "coeff_mod_bit_sizes", "plain_modulus"}
    )


def create_secret(sa: SecureAggregationConfig) -> bytes:
    if sa.scheme == Scheme.CKKS:
        c = sa.ckks
        return ckks.create_secret_context(
            poly_modulus_degree=c.poly_modulus_degree,
            coeff_mod_bit_sizes=c.coeff_mod_bit_sizes,
            global_scale_bits=c.global_scale_bits,
        )
    b = sa.bfv
    return bfv.create_secret_context(
        poly_modulus_degree=b.poly_modulus_degree,
        coeff_mod_bit_sizes=b.coeff_mod_bit_sizes,
        plain_modulus=b.plain_modulus,
    )


def public_of(sa: SecureAggregationConfig, secret: bytes) -> bytes:
    if sa.scheme == Scheme.CKKS:
        return ckks.public_context(secret)
    return bfv.public_context(secret)


def backend(sa: SecureAggregationConfig, context: bytes, *, bound: float) -> SecureAggregation:
    """The scheme over `context` (a site's secret one or the coordinator's public one);
    `bound` clamps masked-BFV's quantization (`clamp_bound` of the plan's DP settings)."""
    if sa.scheme == Scheme.CKKS:
        return SharedKeyCKKS(context)
    return MaskedBFV(context, bits=sa.bfv.quantization_bits, bound=bound)


def for_plan(fed: FederationConfig, context: bytes) -> SecureAggregation:
    return backend(fed.secure_aggregation, context, bound=clamp_bound(fed.dp))


def check_cohort(fed: FederationConfig, cohort: Mapping[str, int]) -> dict[str, float]:
    """FedAvg weights of a cohort (site -> samples); refuses a cohort that could not hide an
    update among enough others or whose sum could wrap."""
    names = set(cohort)
    unknown = names - {s.name for s in fed.sites}
    if unknown:
        raise IntegrityError(
            f"the cohort names sites outside the plan: {', '.join(sorted(unknown))}"
        )
    if len(names) < fed.min_sites:
        raise IntegrityError(
            f"the cohort has {len(names)} sites, fewer than the plan's min_sites={fed.min_sites}"
        )
    if any(n <= 0 for n in cohort.values()):
        raise IntegrityError("the cohort's sample counts must be positive")
    return FedAvg().weights(dict(cohort))
