"""Pairwise masks and the quantization under them, and the BFV layer they are encrypted in:
masks cancel over the whole cohort and nowhere else, are fresh per attempt, and look uniform;
stochastic rounding is unbiased and within its documented bound; the sum never wraps; BFV
sums exactly and refuses what it should."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from tasks import IntegrityError, StepError, bfv
from tasks.masking import Quantizer, mask_context, mask_total, pair_key, simulated_cohort

T = bfv.DEFAULT_PLAIN_MODULUS
NAMES = ["clinic-a", "clinic-b", "clinic-c", "clinic-d"]


def cohort_masks(names, *, attempt=0, keys=None):
    keys = keys or {n: X25519PrivateKey.generate() for n in names}
    context = mask_context(federation="f", job="j", round=1, attempt=attempt, cohort=names)
    return keys, simulated_cohort({n: keys[n] for n in names}, context)


def test_masks_cancel_over_the_whole_cohort_and_no_smaller_set():
    _, masks = cohort_masks(NAMES)
    totals = {n: m.total(5000, T) for n, m in masks.items()}
    assert not np.any(sum(totals.values()) % T)
    # Any proper subset (what a coordinator would sum if it left one site out) stays masked.
    for left_out in NAMES:
        partial = sum(v for n, v in totals.items() if n != left_out) % T
        assert np.count_nonzero(partial) > 4990


def test_masks_are_uniform_and_fresh_for_each_attempt_and_cohort():
    keys, first = cohort_masks(NAMES)
    _, again = cohort_masks(NAMES, attempt=1, keys=keys)
    _, smaller = cohort_masks(NAMES[:3], attempt=1, keys=keys)
    n = 200_000
    m0 = first["clinic-a"].total(n, T)
    # Uniform over Z_t: a chi-square test over 64 equal bins.
    counts = np.bincount(m0 * 64 // T, minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-6
    for other in (again["clinic-a"].total(n, T), smaller["clinic-a"].total(n, T)):
        assert abs(np.corrcoef(m0, other)[0, 1]) < 5 / np.sqrt(n)
        assert np.mean(m0 == other) < 1e-3


def test_both_ends_of_a_pair_derive_one_key_and_a_low_order_key_is_refused():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa, pb = a.public_key().public_bytes_raw(), b.public_key().public_bytes_raw()
    ctx = b"ctx"
    assert pair_key(a, "a", pb, "b", ctx) == pair_key(b, "b", pa, "a", ctx)
    assert pair_key(a, "a", pb, "b", ctx) != pair_key(a, "a", pb, "b", b"other")
    # The all-zero point makes the shared secret public: refused, naming the peer.
    with pytest.raises(StepError, match="site b's key exchange key"):
        mask_total(own=a, own_name="a", peers={"b": bytes(32)}, context=ctx, length=4, modulus=T)


def test_quantization_is_unbiased_and_within_its_bound():
    q = Quantizer(bits=18, bound=10.0, modulus=T)
    rng = np.random.default_rng(7)
    weights = np.array([0.5, 0.3, 0.2])
    updates = [rng.uniform(-10, 10, 20_000) for _ in weights]
    truth = sum(w * u for w, u in zip(weights, updates, strict=True))
    total = sum(q.quantize(u, w, rng) for u, w in zip(updates, weights, strict=True))
    err = q.decode(total % T) - truth
    assert np.max(np.abs(err)) <= q.error_bound(len(weights)) + 1e-6  # float32 decode
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(err.size) + 1e-7  # unbiased
    assert err.std() <= np.sqrt(len(weights)) / (2 * q.scale)
    # Values beyond the bound are clamped to it (post-processing of the released update).
    big = q.quantize(np.array([1e6, -1e6]), 1.0, rng)
    assert np.allclose(q.decode(big), [10.0, -10.0])


def test_the_sum_cannot_wrap_even_at_the_extremes():
    q = Quantizer(bits=18, bound=1.0, modulus=T)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        weights = [0.25] * 4
        total = sum(q.quantize(np.full(1000, sign * 1.0), w, rng) for w in weights)
        assert np.allclose(q.decode(total % T), sign, atol=q.error_bound(4))
    assert q.max_sites() > 10_000
    with pytest.raises(StepError, match="between 2 and 30"):
        Quantizer(bits=40, bound=1.0, modulus=T)


def test_masked_values_sum_to_the_weighted_mean_through_bfv():
    """The whole encoding: quantize, mask, encrypt; the coordinator adds; a site decrypts
    and decodes. Exact modulo t, so only quantization error remains."""
    secret = bfv.create_secret_context()
    public = bfv.public_context(secret)
    q = Quantizer(bits=18, bound=5.0, modulus=T)
    _, masks = cohort_masks(NAMES[:3])
    rng = np.random.default_rng(3)
    updates = {n: rng.normal(0, 1, 9000) for n in masks}
    weights = {"clinic-a": 0.2, "clinic-b": 0.5, "clinic-c": 0.3}
    blobs = [
        bfv.encrypt(public, q.quantize(updates[n], weights[n], rng) + masks[n].total(9000, T))
        for n in masks
    ]
    mean = q.decode(bfv.decrypt(secret, bfv.add(public, blobs)))
    truth = sum(weights[n] * np.clip(updates[n], -5, 5) for n in masks)
    assert np.max(np.abs(mean - truth)) <= q.error_bound(3) + 1e-6


def test_bfv_refuses_wrong_keys_tampering_and_a_secret_context_at_the_coordinator():
    secret = bfv.create_secret_context()
    public = bfv.public_context(secret)
    blob = bfv.encrypt(public, np.arange(100))
    with pytest.raises(StepError, match="secret"):
        bfv.decrypt(public, blob)
    with pytest.raises(StepError, match="secret key"):
        bfv.add(secret, [blob])
    other = bfv.public_context(bfv.create_secret_context())
    with pytest.raises(IntegrityError, match="different key set"):
        bfv.add(other, [blob])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    with pytest.raises(IntegrityError, match="corrupted"):
        bfv.add(public, [bytes(flipped)])
    with pytest.raises(StepError, match="already an aggregate"):
        bfv.add(public, [bfv.add(public, [blob])])
    with pytest.raises(IntegrityError, match="MFBV"):
        bfv.add(public, [b"MFCK" + blob[4:]])
    with pytest.raises(StepError, match="batching"):
        bfv.create_secret_context(plain_modulus=T + 2)
