"""CKKS secure aggregation: correctness against np.average, and the coordinator's threat model.

Most tests use a small N = 4096 key set (data primes 40 + 30 bits, 39-bit special prime, scale
2^30: 109 bits, the 128-bit-security maximum for N = 4096) because CKKS is slow; one test runs
the production defaults.

Tolerance. After `weighted_sum` (one plaintext-weight multiply and rescale per site, then adds)
each slot's error is the fresh-encryption noise plus one rescale rounding per site, each of
order N / scale, weighted and summed; weights sum to 1, so the error does not grow with the
values. Measured over 5 * 10^4 slots and up to 10 sites: max 1.5e-5 for the test key set
(N = 4096, scale 2^30) and 4e-8 for the defaults (N = 8192, scale 2^40; float32 rounding of
values near 1 is 6e-8). We assert 1e-4 and 1e-6: >= 6x margin, yet far below the size of any
bug (a missing weight, a dropped chunk, a slot shifted by one) and, for values near the bound
of 64, below the 4.6e-5 relative scale bias TenSEAL's rescale introduces for a 30-bit prime
when `weighted_sum` does not compensate it (2.9e-3 there).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import IntegrityError, StepError
from tasks import ckks as sa

SMALL = {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (40, 30, 39), "global_scale_bits": 30}
SMALL_SLOTS = 2048
SMALL_ATOL = 1e-4
DEFAULT_ATOL = 1e-6
CONTEXT_ID_OFFSET = sa.HEADER.size - sa.CONTEXT_ID_SIZE


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    secret = sa.create_secret_context(**SMALL)
    return secret, sa.public_context(secret)


@pytest.fixture(scope="module")
def other_keys() -> tuple[bytes, bytes]:
    """A second key set with the SAME parameters: only the keys differ."""
    secret = sa.create_secret_context(**SMALL)
    return secret, sa.public_context(secret)


def _aggregate(keys: tuple[bytes, bytes], updates: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    secret, public = keys
    cts = [sa.encrypt_update(public, x) for x in updates]
    return sa.decrypt_update(secret, sa.weighted_sum(public, cts, w.tolist()))


def _refinalize(body: bytes) -> bytes:
    """Re-append a valid trailer, as a forger who edits a container would."""
    return body + hashlib.sha256(body).digest()


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    ("length", "sites"),
    [(1, 1), (SMALL_SLOTS, 2), (SMALL_SLOTS + 1, 4), (4095, 2), (4097, 3), (10_000, 5)],
)
def test_weighted_sum_matches_np_average(keys, length, sites):
    rng = np.random.default_rng(length * 31 + sites)
    updates = [rng.uniform(-1, 1, length).astype(np.float32) for _ in range(sites)]
    counts = rng.integers(1, 1000, sites)
    w = counts / counts.sum()
    got = _aggregate(keys, updates, w)
    assert got.dtype == np.float32 and got.shape == (length,)
    expected = np.average(np.stack(updates).astype(np.float64), weights=w, axis=0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=SMALL_ATOL)


@settings(max_examples=8, deadline=None)
@given(
    length=st.integers(1, 3 * SMALL_SLOTS + 7),
    raw_weights=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_weighted_sum_property(keys, length, raw_weights, seed):
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0, 1, length).clip(-8, 8) for _ in raw_weights]
    w = np.asarray(raw_weights) / sum(raw_weights)
    got = _aggregate(keys, updates, w)
    expected = np.average(np.stack(updates), weights=w, axis=0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=SMALL_ATOL)


def test_defaults_ten_sites_precision():
    secret = sa.create_secret_context()
    public = sa.public_context(secret)
    assert sa.plaintext_bound(public) == 2.0**16
    rng = np.random.default_rng(7)
    updates = [rng.normal(0, 1e-2, 10_000).astype(np.float32) for _ in range(10)]
    w = rng.random(10)
    w /= w.sum()
    got = _aggregate((secret, public), updates, w)
    expected = np.average(np.stack(updates).astype(np.float64), weights=w, axis=0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=DEFAULT_ATOL)
    # ~1e-4 relative to the update's scale is the requirement; the defaults beat it by far.
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) < 1e-5


def test_values_near_the_bound_keep_absolute_precision(keys):
    """CKKS noise is additive, so precision holds near the bound; a scale bias would not."""
    bound = sa.plaintext_bound(keys[1])
    assert bound == 64.0
    rng = np.random.default_rng(5)
    updates = [rng.uniform(-bound, bound, 3000) for _ in range(3)]
    w = np.array([0.2, 0.3, 0.5])
    got = _aggregate(keys, updates, w)
    expected = np.average(np.stack(updates), weights=w, axis=0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=SMALL_ATOL)


def test_zero_weight_drops_a_site(keys):
    rng = np.random.default_rng(3)
    updates = [rng.uniform(-1, 1, 100) for _ in range(3)]
    got = _aggregate(keys, updates, np.array([0.5, 0.0, 0.5]))
    np.testing.assert_allclose(got, (updates[0] + updates[2]) / 2, rtol=0, atol=SMALL_ATOL)


def test_update_round_trips_without_aggregation(keys):
    secret, public = keys
    x = np.linspace(-3, 3, 5000, dtype=np.float32)
    got = sa.decrypt_update(secret, sa.encrypt_update(public, x))
    np.testing.assert_allclose(got, x, rtol=0, atol=SMALL_ATOL)


def test_container_layout(keys):
    _, public = keys
    blob = sa.encrypt_update(public, np.zeros(4097))
    magic, version, payload, slots, length, count, _ = sa.HEADER.unpack_from(blob)
    assert (magic, version, payload) == (sa.MAGIC, sa.VERSION, sa.Payload.UPDATE)
    assert (slots, length, count) == (SMALL_SLOTS, 4097, 3)
    assert blob[-sa.DIGEST_SIZE :] == hashlib.sha256(blob[: -sa.DIGEST_SIZE]).digest()


# ---------------------------------------------------------------- threat model: the coordinator


def test_public_context_holds_no_secret_key(keys):
    secret, public = keys
    ctx = ts.context_from(public)
    assert ctx.is_public() and not ctx.has_secret_key()
    assert not ctx.has_relin_keys() and not ctx.has_galois_keys()
    assert ts.context_from(secret).has_secret_key()
    assert len(public) < len(secret)


def test_public_context_can_encrypt_but_not_decrypt(keys):
    _, public = keys
    blob = sa.encrypt_update(public, np.ones(10))
    with pytest.raises(StepError, match="secret context"):
        sa.decrypt_update(public, blob)
    # Nor can TenSEAL itself, bypassing our check.
    vector = ts.ckks_vector(ts.context_from(public), [1.0])
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()


def test_weighted_sum_refuses_secret_context(keys):
    secret, public = keys
    blob = sa.encrypt_update(public, np.ones(10))
    with pytest.raises(StepError, match="must hold only the public context"):
        sa.weighted_sum(secret, [blob], [1.0])


def test_public_context_refuses_public_input(keys):
    _, public = keys
    with pytest.raises(StepError, match="already public"):
        sa.public_context(public)


def test_other_key_set_is_refused(keys, other_keys):
    secret, public = keys
    foreign = sa.encrypt_update(other_keys[1], np.ones(10))
    mine = sa.encrypt_update(public, np.ones(10))
    with pytest.raises(IntegrityError, match="ciphertext 1 was encrypted under a different"):
        sa.weighted_sum(public, [mine, foreign], [0.5, 0.5])
    with pytest.raises(IntegrityError, match="different key set"):
        sa.decrypt_update(secret, foreign)


def test_other_key_set_with_forged_header_decrypts_to_detected_garbage(keys, other_keys):
    """Same parameters, other keys: SEAL cannot tell; decryption yields huge garbage.

    The header's context id catches honest mix-ups; a forger can rewrite it (only the
    transport signature stops that), so decrypt_update also refuses out-of-range values.
    """
    secret, public = keys
    x = np.ones(10)
    foreign = sa.encrypt_update(other_keys[1], x)
    # Underneath: TenSEAL loads and decrypts the foreign chunk without complaint.
    chunk = foreign[sa.HEADER.size + sa.CHUNK_LEN.size : -sa.DIGEST_SIZE]
    raw = ts.ckks_vector_from(ts.context_from(secret), chunk).decrypt()
    assert np.max(np.abs(np.asarray(raw) - x)) > 1e6
    my_id = sa.encrypt_update(public, x)[CONTEXT_ID_OFFSET : sa.HEADER.size]
    body = foreign[: -sa.DIGEST_SIZE]
    forged = _refinalize(body[:CONTEXT_ID_OFFSET] + my_id + body[sa.HEADER.size :])
    with pytest.raises(IntegrityError, match="another key or overflowed"):
        sa.decrypt_update(secret, forged)
    # The coordinator cannot notice the forgery, but the sites decrypting the sum can.
    aggregate = sa.weighted_sum(public, [sa.encrypt_update(public, x), forged], [0.5, 0.5])
    with pytest.raises(IntegrityError, match="another key or overflowed"):
        sa.decrypt_update(secret, aggregate)


def test_other_parameters_are_refused(keys):
    secret, public = keys
    big = sa.public_context(sa.create_secret_context())
    with pytest.raises(IntegrityError, match="different key set"):
        sa.weighted_sum(public, [sa.encrypt_update(big, np.ones(3))], [1.0])
    with pytest.raises(IntegrityError, match="different key set"):
        sa.decrypt_update(secret, sa.encrypt_update(big, np.ones(3)))


# ---------------------------------------------------------------- malformed containers


def _with_chunk_count(body: bytes, count: int) -> bytes:
    fields = list(sa.HEADER.unpack_from(body))
    fields[5] = count
    return sa.HEADER.pack(*fields) + body[sa.HEADER.size :]


def _garbled(blob: bytes) -> dict[str, bytes]:
    body = blob[: -sa.DIGEST_SIZE]
    flip = bytearray(blob)
    flip[len(blob) // 2] ^= 0x01
    return {
        "empty": b"",
        "header only": blob[: sa.HEADER.size],
        "cut in chunk": blob[: len(blob) // 2],
        "cut trailer": blob[:-1],
        "trailing byte": blob + b"\x00",
        "flipped body byte": bytes(flip),
        "bad magic": b"XXXX" + blob[4:],
        "bad version": _refinalize(body[:4] + bytes([sa.VERSION + 1]) + body[5:]),
        "bad payload": _refinalize(body[:5] + b"\x07" + body[6:]),
        "chunk count lie": _refinalize(_with_chunk_count(body, 9)),
        "zero-length chunk": _refinalize(
            body[: sa.HEADER.size] + sa.CHUNK_LEN.pack(0) + body[sa.HEADER.size :]
        ),
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "truncated: 0 bytes"),
        ("header only", "truncated"),
        ("cut in chunk", "checksum does not match"),
        ("cut trailer", "checksum does not match"),
        ("trailing byte", "checksum does not match"),
        ("flipped body byte", "checksum does not match"),
        ("bad magic", "not a medfed MFCK container"),
        ("bad version", "container version 2"),
        ("bad payload", "unknown payload type 7"),
        ("chunk count lie", "2053 values in 9 chunks"),
        ("zero-length chunk", "chunk 0 has invalid length 0"),
    ],
)
def test_malformed_container_is_integrity_error(keys, case, message):
    secret, public = keys
    blob = sa.encrypt_update(public, np.ones(SMALL_SLOTS + 5))
    bad = _garbled(blob)[case]
    with pytest.raises(IntegrityError, match=f"ciphertext 1 .*{message}"):
        sa.weighted_sum(public, [blob, bad], [0.5, 0.5])
    with pytest.raises(IntegrityError, match=message):
        sa.decrypt_update(secret, bad)


def _swap_chunk(container: bytes, donor: bytes) -> bytes:
    """`container` (one chunk) with its chunk replaced by `donor`'s only chunk."""
    head = container[: sa.HEADER.size]
    chunk = donor[sa.HEADER.size : -sa.DIGEST_SIZE]
    return _refinalize(head + chunk)


def test_chunk_with_wrong_value_count_is_integrity_error(keys):
    secret, public = keys
    ten = sa.encrypt_update(public, np.ones(10))
    eleven = sa.encrypt_update(public, np.ones(11))
    with pytest.raises(IntegrityError, match="chunk 0 holds 11 values, expected 10"):
        sa.weighted_sum(public, [_swap_chunk(ten, eleven)], [1.0])
    with pytest.raises(IntegrityError, match="chunk 0 holds 11 values, expected 10"):
        sa.decrypt_update(secret, _swap_chunk(ten, eleven))


def test_rescaled_chunk_posing_as_update_is_integrity_error(keys):
    _, public = keys
    update = sa.encrypt_update(public, np.ones(10))
    aggregate = sa.weighted_sum(public, [update], [1.0])
    with pytest.raises(IntegrityError, match="not a freshly encrypted ciphertext"):
        sa.weighted_sum(public, [_swap_chunk(update, aggregate)], [1.0])


def test_garbage_inside_a_rechecksummed_chunk_is_integrity_error(keys):
    secret, public = keys
    blob = sa.encrypt_update(public, np.ones(8))
    start = sa.HEADER.size + sa.CHUNK_LEN.size
    body = blob[: -sa.DIGEST_SIZE]
    junk = _refinalize(body[:start] + b"\xff" * (len(body) - start))
    with pytest.raises(IntegrityError, match="not a valid CKKS ciphertext"):
        sa.weighted_sum(public, [junk], [1.0])


def test_aggregate_is_not_summed_again(keys):
    _, public = keys
    agg = sa.weighted_sum(public, [sa.encrypt_update(public, np.ones(4))], [1.0])
    with pytest.raises(StepError, match="already an aggregate"):
        sa.weighted_sum(public, [agg], [1.0])


# ---------------------------------------------------------------- caller errors


def test_mismatched_lengths_are_step_errors(keys):
    _, public = keys
    a = sa.encrypt_update(public, np.ones(10))
    b = sa.encrypt_update(public, np.ones(11))
    with pytest.raises(StepError, match="ciphertext 1 holds 11 values") as info:
        sa.weighted_sum(public, [a, b], [0.5, 0.5])
    assert not isinstance(info.value, IntegrityError)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0.5], "got 1 weights for 2"),
        ([0.5, 0.25, 0.25], "got 3 weights for 2"),
        ([0.5, float("nan")], "finite"),
        ([0.5, float("inf")], "finite"),
        ([1.5, -0.5], "non-negative"),
        ([0.0, 0.0], "sum to more than 0"),
        ([0.75, 0.75], "at most 1"),
        (["a", "b"], "numbers"),
    ],
)
def test_bad_weights_are_refused(keys, weights, message):
    _, public = keys
    blob = sa.encrypt_update(public, np.ones(3))
    with pytest.raises(StepError, match=message):
        sa.weighted_sum(public, [blob, blob], weights)


def test_no_ciphertexts_is_refused(keys):
    with pytest.raises(StepError, match="at least one"):
        sa.weighted_sum(keys[1], [], [])


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (np.ones((2, 2)), "1-D"),
        (np.array([]), "1-D"),
        (np.array([1.0, np.nan]), "NaN"),
        (np.array([1.0, np.inf]), "NaN or infinite"),
        (np.array([65.0]), "above the context's bound 64"),
        (np.array(["x"]), "real numbers"),
    ],
)
def test_bad_updates_are_refused(keys, update, message):
    with pytest.raises(StepError, match=message):
        sa.encrypt_update(keys[1], update)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({**SMALL, "coeff_mod_bit_sizes": (60, 40, 40, 60)}, "128-bit security"),
        ({**SMALL, "coeff_mod_bit_sizes": (40, 40)}, "at least 3 primes"),
        ({**SMALL, "global_scale_bits": 40}, "below the first prime"),
        ({**SMALL, "poly_modulus_degree": 5000}, "invalid"),
    ],
)
def test_bad_parameters_are_refused(params, message):
    with pytest.raises(StepError, match=message):
        sa.create_secret_context(**params)


@pytest.mark.parametrize("data", [b"", b"not a context", "text"])
def test_bad_context_bytes_are_refused(data, keys):
    with pytest.raises(StepError):
        sa.encrypt_update(data, np.ones(3))
    with pytest.raises(StepError):
        sa.decrypt_update(data, sa.encrypt_update(keys[1], np.ones(3)))
