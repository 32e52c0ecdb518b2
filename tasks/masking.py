"""Pairwise additive masking and the quantization under it (Bonawitz et al. 2017, CCS).

Each pair of sites {i, j} of a round's cohort derives a shared key from their enrolled X25519
keys (registered through the ledger at enrollment and pinned in the plan every site approved,
so nobody can substitute one later) with HKDF-SHA256, bound to the federation, job, round,
attempt and the exact cohort, and expands it with ChaCha20 into a mask vector over Z_t. Site
i adds the mask of every pair where it is the smaller name and subtracts it where it is the
larger, so the masks cancel in the sum over the whole cohort and in no smaller sum. A new
attempt (a site dropped after the others masked) or a new cohort gives independent masks.

A value leaves a site as ``quantize(weight * update) + masks mod t``; an observer missing the
pair key of even one honest partner sees a uniform element of Z_t per coordinate.

Quantization: every coordinate is clamped to [-bound, bound] (the bound comes from the clip
norm, so clamping is post-processing of the already-released update and changes no DP
figure), multiplied by ``scale = 2^(bits-1) / bound`` and the site's FedAvg weight, and
stochastically rounded (unbiased). Each site's integer lies in [-(w * 2^(bits-1)) - 1,
w * 2^(bits-1) + 1]; weights sum to 1, so the cohort's sum stays within 2^(bits-1) + n in
absolute value and never wraps while that is below t / 2. The decoded mean is off by less than
n / scale per coordinate (one rounding step per site), with standard deviation at most
sqrt(n) / (2 * scale).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tasks import StepError

MASK_INFO = b"medfed/pairwise-mask/v1"
CHACHA_NONCE = bytes(16)  # each key is used for exactly one mask stream


# ---------------------------------------------------------------- quantization


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point encoding of weighted updates into Z_t (see the module docstring)."""

    bits: int
    bound: float
    modulus: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 30:
            raise StepError(f"quantization bits must be between 2 and 30, got {self.bits}")
        if not (self.bound > 0 and np.isfinite(self.bound)):
            raise StepError(f"quantization bound must be positive and finite, got {self.bound}")

    @property
    def scale(self) -> float:
        return 2.0 ** (self.bits - 1) / self.bound

    def max_sites(self) -> int:
        """The largest cohort whose sum cannot wrap modulo t."""
        return (self.modulus - 1) // 2 - 2 ** (self.bits - 1) - 1

    def quantize(self, update: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """``weight * clamp(update)`` as integers (int64), stochastically rounded."""
        if not 0 <= weight <= 1:
            raise StepError(f"a site's weight must be in [0, 1], got {weight}")
        x = np.clip(np.asarray(update, dtype=np.float64), -self.bound, self.bound)
        scaled = x * (weight * self.scale)
        low = np.floor(scaled)
        up = rng.random(scaled.shape) < (scaled - low)
        return (low + up).astype(np.int64)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A cohort's sum in Z_t (any representative) back to the weighted mean, float32."""
        t = self.modulus
        centred = (np.asarray(total, dtype=np.int64) % t + t // 2) % t - t // 2
        return (centred / self.scale).astype(np.float32)

    def error_bound(self, sites: int) -> float:
        """Worst-case absolute error of `decode` per coordinate for `sites` contributions
        whose values lay within the bound."""
        return sites / self.scale


def check_fits(quantizer: Quantizer, sites: int) -> None:
    if sites > quantizer.max_sites():
        raise StepError(
            f"{sites} sites with {quantizer.bits}-bit quantization could wrap the plaintext "
            f"modulus {quantizer.modulus}: use fewer bits or a larger modulus"
        )


# ---------------------------------------------------------------- pairwise masks


def cohort_digest(cohort: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(cohort)).encode()).hexdigest()


def mask_context(
    *, federation: str, job: str, round: int, attempt: int, cohort: Sequence[str]
) -> bytes:
    """What every pair key is bound to: a mask is never reused across rounds, attempts or
    cohorts."""
    return "\n".join([federation, job, str(round), str(attempt), cohort_digest(cohort)]).encode()


def pair_key(
    own: X25519PrivateKey, own_name: str, peer_public: bytes, peer_name: str, context: bytes
) -> bytes:
    """The 32-byte key both ends of a pair derive: X25519, then HKDF bound to the pair."""
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives an all-zero secret: refuse it
        raise StepError(f"site {peer_name}'s key exchange key is unusable: {exc}") from exc
    first, second = sorted([own_name, peer_name])
    info = b"\n".join([MASK_INFO, context, first.encode(), second.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask_stream(key: bytes, length: int, modulus: int) -> np.ndarray:
    """`length` elements of Z_t from ChaCha20 under `key`: 64-bit words reduced mod t (the
    bias is below t / 2^64, under 2^-40 for t < 2^24)."""
    encryptor = Cipher(algorithms.ChaCha20(key, CHACHA_NONCE), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8")
    return (words % np.uint64(modulus)).astype(np.int64)


def mask_total(
    *,
    own: X25519PrivateKey,
    own_name: str,
    peers: Mapping[str, bytes],
    context: bytes,
    length: int,
    modulus: int,
) -> np.ndarray:
    """This site's share of the cohort's masks: +mask toward larger names, -mask toward
    smaller ones, mod t. `peers` maps every other cohort member to its X25519 public key."""
    total = np.zeros(length, dtype=np.int64)
    for name, public in sorted(peers.items()):
        if name == own_name:
            continue
        m = mask_stream(pair_key(own, own_name, public, name, context), length, modulus)
        total = (total + m) % modulus if own_name < name else (total - m) % modulus
    return total


@dataclass(frozen=True)
class PairwiseMasks:
    """A site's view of one cohort's masking: its own key and every partner's public key."""

    own: X25519PrivateKey = field(repr=False)
    own_name: str
    peers: Mapping[str, bytes]  # every other cohort member -> its X25519 public key
    context: bytes

    def total(self, length: int, modulus: int) -> np.ndarray:
        return mask_total(
            own=self.own,
            own_name=self.own_name,
            peers=self.peers,
            context=self.context,
            length=length,
            modulus=modulus,
        )


def simulated_cohort(
    keys: Mapping[str, X25519PrivateKey], context: bytes
) -> dict[str, PairwiseMasks]:
    """Every member's masking when one process holds all their keys: benchmarks and tests
    only (a real site holds its own key and its partners' public keys)."""
    public = {n: k.public_key().public_bytes_raw() for n, k in keys.items()}
    return {
        n: PairwiseMasks(
            own=k, own_name=n, peers={p: public[p] for p in keys if p != n}, context=context
        )
        for n, k in keys.items()
    }
