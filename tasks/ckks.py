"""CKKS under one shared key set (TenSEAL): the `"ckks"` secure-aggregation scheme, kept for
comparison with the default masked BFV (`tasks.bfv`, `tasks.masking`).

Sites share one CKKS key set: they hold the *secret* context and encrypt and decrypt. The
coordinator holds only the *public* context (public key, no secret key, no relinearization or
Galois keys: a weighted sum needs none). It computes ``sum_i w_i * enc(x_i)`` by multiplying
each ciphertext by a plaintext scalar and adding, so it never sees an update or the result.
Any one site, though, can decrypt every other site's update: a site colluding with the
coordinator reads them all. Ciphertexts travel in `tasks.he_container` (magic "MFCK").

Default parameters (the DEFAULT_* constants) are for 10k-200k parameter models: N = 8192 (4096
slots), data primes 60 + 40 bits plus a 60-bit special prime (160 bits, within the 128-bit
security bound of 218 for N = 8192; SEAL refuses insecure sets), scale 2^40. A weighted sum
needs exactly one rescale (after the plaintext weight multiply), so one 40-bit middle prime
suffices; the common ``[60, 40, 40, 60]`` only adds an unused level: ~40% larger updates, ~80%
larger aggregates and ~30% slower encryption at identical precision. Measured per 1M parameters
on one core of an AMD EPYC: an update is 14.4 bytes per float32 byte (the aggregate, one prime
shorter, 8.0), encryption takes ~1.2 s, aggregation ~0.43 s per site, decryption ~0.2 s; after
summing 10 sites the absolute error is ~4e-9 rms and ~5e-8 max. SEAL already zstd-compresses
each ciphertext (14.4 vs 16 bytes per float32 byte raw); general-purpose compression of the
container gains < 0.5%, so none is applied. Values must stay within ``plaintext_bound`` (2^16 for
the defaults) and the weights must sum to at most 1, so the sum cannot overflow.

Residual risks: the container is not authenticated (sign it, see `tasks.transport`); CKKS
decryptions leak a little of the noise, so a full-precision decrypted aggregate handed to the
coordinator together with its ciphertext could help it attack the key (Li-Micciancio,
IND-CPA-D): round or noise decrypted values before they leave a site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  (registers seal::Modulus, so prime values can be read)

from tasks import IntegrityError, StepError
from tasks.he_container import (  # noqa: F401  (the container's layout, for tests)
    CHUNK_LEN,
    CONTEXT_ID_SIZE,
    DIGEST_SIZE,
    HEADER,
    VERSION,
    Container,
    Payload,
    check_summands,
    chunk_size,
    context_id,
    load_context,
    make_public,
    pack,
    pack_aggregate,
    unpack,
)

DEFAULT_POLY_MODULUS_DEGREE = 8192
DEFAULT_COEFF_MOD_BIT_SIZES: tuple[int, ...] = (60, 40, 60)
DEFAULT_GLOBAL_SCALE_BITS = 40

MAGIC = b"MFCK"

# Inputs must satisfy |x| <= 2^(bits left after one rescale - scale bits - margin). With weights
# summing to at most 1 the aggregate obeys the same bound; the margin (x16) keeps CKKS noise and
# scale drift well below the modulus wrap-around, and lets `decrypt_update` flag values beyond
# twice the bound (a wrong key or a forged container) as garbage rather than return them.
RANGE_MARGIN_BITS = 4
# Normalized weights computed in floating point may sum to 1 + a few ulps.
WEIGHT_SUM_TOLERANCE = 1e-9
# One weight multiply needs one rescale: at least two data primes plus the special prime.
MIN_COEFF_MODULI = 3


# ---------------------------------------------------------------- contexts


def create_secret_context(
    *,
    poly_modulus_degree: int = DEFAULT_POLY_MODULUS_DEGREE,
    coeff_mod_bit_sizes: Sequence[int] = DEFAULT_COEFF_MOD_BIT_SIZES,
    global_scale_bits: int = DEFAULT_GLOBAL_SCALE_BITS,
) -> bytes:
    """A fresh CKKS key set, serialized WITH its secret key: only sites may hold this."""
    bits = [int(b) for b in coeff_mod_bit_sizes]
    if len(bits) < MIN_COEFF_MODULI:
        raise StepError(
            f"coeff_mod_bit_sizes needs at least {MIN_COEFF_MODULI} primes (first, one per "
            f"rescale, special), got {bits}"
        )
    if not 0 < global_scale_bits < bits[0]:
        raise StepError(
            f"global_scale_bits must be positive and below the first prime's {bits[0]} bits, "
            f"got {global_scale_bits}"
        )
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus_degree, coeff_mod_bit_sizes=bits
        )
    except (ValueError, RuntimeError, TypeError) as exc:
        raise StepError(
            f"CKKS parameters N={poly_modulus_degree}, primes {bits} are invalid or below "
            f"128-bit security: {exc}"
        ) from exc
    ctx.global_scale = 2.0**global_scale_bits
    return ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )


def public_context(secret_context: bytes) -> bytes:
    """The coordinator's copy of `secret_context`: public key only, secret key dropped."""
    return make_public(secret_context, scheme=ts.SCHEME_TYPE.CKKS)


def plaintext_bound(context: bytes) -> float:
    """Largest |value| `encrypt_update` accepts under `context` (2^16 for the defaults)."""
    return _plaintext_bound(_load(context, what="context"))


# ---------------------------------------------------------------- site and coordinator steps


def encrypt_update(context: bytes, update: np.ndarray) -> bytes:
    """Encrypt a 1-D float vector into one container; a public context suffices."""
    ctx = _load(context, what="context")
    x = _as_update(update, bound=_plaintext_bound(ctx))
    slots = _slot_count(ctx)
    try:
        chunks = [
            ts.ckks_vector(ctx, x[i : i + slots].tolist()).serialize()
            for i in range(0, x.size, slots)
        ]
    except (ValueError, RuntimeError, TypeError) as exc:
        raise StepError(f"CKKS encryption failed: {exc}") from exc
    return pack(
        MAGIC,
        Container(
            payload=Payload.UPDATE,
            slot_count=slots,
            length=int(x.size),
            context_id=context_id(ctx),
            chunks=tuple(chunks),
        ),
    )


def weighted_sum(
    public_context: bytes, ciphertexts: Sequence[bytes], weights: Sequence[float]
) -> bytes:
    """The coordinator's aggregation: a container holding ``sum_i weights[i] * x_i``.

    Refuses a context that holds a secret key. Weights must be finite, non-negative, not all
    zero and sum to at most 1 (normalize them: FedAvg's n_i / n), which keeps the sum in range.
    """
    ctx = _load(public_context, what="public context")
    if ctx.is_private() or ctx.has_secret_key():
        raise StepError(
            "weighted_sum was given a context holding the secret key; the coordinator must "
            "hold only the public context"
        )
    w = _check_weights(weights, count=len(ciphertexts))
    if _rescale_levels(ctx) < 1:
        raise StepError("public context has no level left for the weight multiply")
    cid, slots = context_id(ctx), _slot_count(ctx)
    # TenSEAL's rescale divides by the last data prime q but then labels the result with the
    # global scale D instead of D^2 / q: every product comes out multiplied by D / q (a bias of
    # 1.3e-7 for the defaults, 4.6e-5 for a 30-bit prime). Multiplying the weight by q / D first
    # cancels it exactly, leaving only CKKS noise.
    w = w * (_rescale_prime(ctx) / ctx.global_scale)
    containers = [
        unpack(MAGIC, c, what=f"ciphertext {i}", context_id=cid, slot_count=slots)
        for i, c in enumerate(ciphertexts)
    ]
    first = check_summands(containers)
    out = []
    for j in range(len(first.chunks)):
        size = chunk_size(first.length, slots, j)
        acc = None
        for i, (c, wi) in enumerate(zip(containers, w, strict=True)):
            what = f"ciphertext {i} chunk {j}"
            v = _load_vector(ctx, c.chunks[j], size=size, what=what, fresh=True)
            try:
                v.mul_(float(wi))
                acc = v if acc is None else acc.add_(v)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise IntegrityError(f"{what} cannot be combined with the others: {exc}") from exc
        assert acc is not None  # at least one ciphertext, checked above
        out.append(acc.serialize())
    return pack_aggregate(MAGIC, first, out)


def decrypt_update(secret_context: bytes, ciphertext: bytes) -> np.ndarray:
    """Decrypt a container (an update or an aggregate) to a float32 vector of its length."""
    ctx = _load(secret_context, what="secret context")
    if not (ctx.is_private() and ctx.has_secret_key()):
        raise StepError("decrypt_update needs the site's secret context; this context is public")
    slots = _slot_count(ctx)
    c = unpack(MAGIC, ciphertext, what="ciphertext", context_id=context_id(ctx), slot_count=slots)
    parts = []
    for j, chunk in enumerate(c.chunks):
        what = f"ciphertext chunk {j}"
        v = _load_vector(ctx, chunk, size=chunk_size(c.length, slots, j), what=what)
        try:
            parts.append(np.asarray(v.decrypt(), dtype=np.float64))
        except (ValueError, RuntimeError, TypeError) as exc:
            raise IntegrityError(f"{what} does not decrypt: {exc}") from exc
    values = np.concatenate(parts)
    limit = 2 * _plaintext_bound(ctx)
    if not np.all(np.abs(values) <= limit):  # also catches NaN
        raise IntegrityError(
            f"decrypted values exceed {limit:g}: the ciphertext was made under another key or "
            "overflowed"
        )
    return values.astype(np.float32)


# ---------------------------------------------------------------- internals


def _slot_count(ctx: ts.Context) -> int:
    return ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def _rescale_levels(ctx: ts.Context) -> int:
    return ctx.seal_context().data.first_context_data().chain_index()


def _plaintext_bound(ctx: ts.Context) -> float:
    try:
        scale_bits = math.log2(ctx.global_scale)
    except ValueError as exc:  # TenSEAL raises when no global scale was set
        raise StepError(f"context has no global scale: {exc}") from exc
    first = ctx.seal_context().data.first_context_data()
    after = first.next_context_data() or first
    return 2.0 ** (after.total_coeff_modulus_bit_count() - scale_bits - RANGE_MARGIN_BITS)


def _as_update(update: np.ndarray, *, bound: float) -> np.ndarray:
    arr = np.asarray(update)
    if arr.ndim != 1 or arr.size == 0:
        raise StepError(f"update must be a non-empty 1-D vector, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise StepError(f"update must hold real numbers, got dtype {arr.dtype}")
    x = arr.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise StepError("update holds NaN or infinite values")
    peak = float(np.max(np.abs(x)))
    if peak > bound:
        raise StepError(f"update has |value| {peak:g} above the context's bound {bound:g}")
    return x


def _check_weights(weights: Sequence[float], *, count: int) -> np.ndarray:
    if count == 0:
        raise StepError("weighted_sum needs at least one ciphertext")
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise StepError(f"weights must be numbers: {exc}") from exc
    if w.ndim != 1 or w.size != count:
        raise StepError(f"got {w.size} weights for {count} ciphertexts")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise StepError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0 or total > 1 + WEIGHT_SUM_TOLERANCE:
        raise StepError(f"weights must sum to more than 0 and at most 1, got {total!r}")
    return w


def _rescale_prime(ctx: ts.Context) -> int:
    """The prime a fresh ciphertext's first rescale divides by."""
    return ctx.seal_context().data.first_context_data().parms().coeff_modulus()[-1].value()


def _load_vector(
    ctx: ts.Context, data: bytes, *, size: int, what: str, fresh: bool = False
) -> ts.CKKSVector:
    """Deserialize one chunk; `fresh` also demands a just-encrypted ciphertext (top level)."""
    try:
        v = ts.ckks_vector_from(ctx, data)
        got = v.size()
        cts = v.ciphertext()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise IntegrityError(f"{what} is not a valid CKKS ciphertext for this context") from exc
    if got != size:
        raise IntegrityError(f"{what} holds {got} values, expected {size}")
    if fresh and (
        len(cts) != 1
        or cts[0].parms_id() != ctx.seal_context().data.first_parms_id()
        or cts[0].scale != ctx.global_scale
    ):
        raise IntegrityError(f"{what} is not a freshly encrypted ciphertext at the context's scale")
    return v


__all__ = [
    "DEFAULT_COEFF_MOD_BIT_SIZES",
    "DEFAULT_GLOBAL_SCALE_BITS",
    "DEFAULT_POLY_MODULUS_DEGREE",
    "create_secret_context",
    "decrypt_update",
    "encrypt_update",
    "plaintext_bound",
    "public_context",
    "weighted_sum",
]


def _load(data: bytes, *, what: str) -> ts.Context:
    return load_context(data, what=what, scheme=ts.SCHEME_TYPE.CKKS)
