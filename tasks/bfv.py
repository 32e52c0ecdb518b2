"""BFV over TenSEAL: exact sums of integer vectors modulo the plaintext modulus t.

The layer the `"masked-bfv"` scheme encrypts its masked, quantized updates under. Sites share
the key set (made by the key-holding site, sealed to the others); the coordinator holds only
the public context and adds ciphertexts: a sum needs no multiplication, relinearization or
Galois keys, so none are made.

Parameters (defaults): N = 4096 (4096 batching slots), coefficient primes [36, 36] (the second
is SEAL's special prime: ciphertexts carry one 36-bit prime; 72 bits total, within the 109-bit
128-bit-security bound for N = 4096; SEAL refuses insecure sets), t = 1073153, a 21-bit prime
with t = 1 (mod 2N) as batching requires. Measured here per 1M values: 2.84 bytes per float32
byte for an update and for a sum alike, encryption ~0.3 s, adding one site ~0.03 s,
decryption ~0.13 s; sums of 1024 ciphertexts of values uniform over Z_t decrypt exactly (with
t ~ 2^24 under the same 36-bit prime they did not: the noise budget is what bounds t).
Ciphertexts travel in `tasks.he_container` (magic "MFBV").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  (registers seal::Modulus, so the modulus can be read)

from tasks import IntegrityError, StepError
from tasks.he_container import (
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

DEFAULT_POLY_MODULUS_DEGREE = 4096
DEFAULT_COEFF_MOD_BIT_SIZES: tuple[int, ...] = (36, 36)
DEFAULT_PLAIN_MODULUS = 1073153
MAGIC = b"MFBV"


def create_secret_context(
    *,
    poly_modulus_degree: int = DEFAULT_POLY_MODULUS_DEGREE,
    coeff_mod_bit_sizes: Sequence[int] = DEFAULT_COEFF_MOD_BIT_SIZES,
    plain_modulus: int = DEFAULT_PLAIN_MODULUS,
) -> bytes:
    """A fresh BFV key set, serialized WITH its secret key: only sites may hold this."""
    bits = [int(b) for b in coeff_mod_bit_sizes]
    if plain_modulus % (2 * poly_modulus_degree) != 1:
        raise StepError(
            f"BFV plain modulus {plain_modulus} must be 1 modulo 2N = {2 * poly_modulus_degree} "
            "(batching)"
        )
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=poly_modulus_degree,
            plain_modulus=plain_modulus,
            coeff_mod_bit_sizes=bits,
        )
        ctx.seal_context().data.first_context_data().qualifiers().using_batching  # noqa: B018
    except (ValueError, RuntimeError, TypeError) as exc:
        raise StepError(
            f"BFV parameters N={poly_modulus_degree}, primes {bits}, t={plain_modulus} are "
            f"invalid or below 128-bit security: {exc}"
        ) from exc
    if not ctx.seal_context().data.first_context_data().qualifiers().using_batching:
        raise StepError(f"BFV plain modulus {plain_modulus} does not allow batching (not prime?)")
    return ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )


def public_context(secret_context: bytes) -> bytes:
    """The coordinator's copy of `secret_context`: public key only, secret key dropped."""
    return make_public(secret_context, scheme=ts.SCHEME_TYPE.BFV)


def plain_modulus(context: bytes) -> int:
    return _plain_modulus(_load(context, what="context"))


def encrypt(context: bytes, values: np.ndarray) -> bytes:
    """Encrypt a 1-D vector of elements of Z_t (any integer representatives)."""
    ctx = _load(context, what="context")
    t, slots = _plain_modulus(ctx), _slot_count(ctx)
    cid = context_id(ctx)  # before encrypting (see context_id)
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise StepError(f"BFV encrypts a non-empty 1-D integer vector, got {arr.dtype} {arr.shape}")
    centred = (arr.astype(np.int64) % t + t // 2) % t - t // 2  # the encoder's signed range
    try:
        chunks = [
            ts.bfv_vector(ctx, centred[i : i + slots].tolist()).serialize()
            for i in range(0, centred.size, slots)
        ]
    except (ValueError, RuntimeError, TypeError) as exc:
        raise StepError(f"BFV encryption failed: {exc}") from exc
    return pack(
        MAGIC,
        Container(
            payload=Payload.UPDATE,
            slot_count=slots,
            length=int(centred.size),
            context_id=cid,
            chunks=tuple(chunks),
        ),
    )


def add(public_context: bytes, ciphertexts: Sequence[bytes]) -> bytes:
    """The coordinator's aggregation: the sum of fresh site ciphertexts, from public material."""
    ctx = _load(public_context, what="public context")
    if ctx.is_private() or ctx.has_secret_key():
        raise StepError(
            "the BFV sum was given a context holding the secret key; the coordinator must hold "
            "only the public context"
        )
    if not ciphertexts:
        raise StepError("a BFV sum needs at least one ciphertext")
    cid, slots = context_id(ctx), _slot_count(ctx)
    containers = [
        unpack(MAGIC, c, what=f"ciphertext {i}", context_id=cid, slot_count=slots)
        for i, c in enumerate(ciphertexts)
    ]
    first = check_summands(containers)
    out = []
    for j in range(len(first.chunks)):
        size = chunk_size(first.length, slots, j)
        acc = None
        for i, c in enumerate(containers):
            what = f"ciphertext {i} chunk {j}"
            v = _load_vector(ctx, c.chunks[j], size=size, what=what)
            try:
                acc = v if acc is None else acc.add_(v)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise IntegrityError(f"{what} cannot be added to the others: {exc}") from exc
        assert acc is not None
        out.append(acc.serialize())
    return pack_aggregate(MAGIC, first, out)


def decrypt(secret_context: bytes, ciphertext: bytes) -> np.ndarray:
    """The vector a container holds, as int64 in (-t/2, t/2]."""
    ctx = _load(secret_context, what="secret context")
    if not (ctx.is_private() and ctx.has_secret_key()):
        raise StepError("BFV decryption needs the site's secret context; this context is public")
    slots = _slot_count(ctx)
    c = unpack(MAGIC, ciphertext, what="ciphertext", context_id=context_id(ctx), slot_count=slots)
    parts = []
    for j, chunk in enumerate(c.chunks):
        what = f"ciphertext chunk {j}"
        v = _load_vector(ctx, chunk, size=chunk_size(c.length, slots, j), what=what)
        try:
            parts.append(np.asarray(v.decrypt(), dtype=np.int64))
        except (ValueError, RuntimeError, TypeError) as exc:
            raise IntegrityError(f"{what} does not decrypt: {exc}") from exc
    return np.concatenate(parts)


# ---------------------------------------------------------------- internals


def _slot_count(ctx: ts.Context) -> int:
    return ctx.seal_context().data.first_context_data().parms().poly_modulus_degree()


def _plain_modulus(ctx: ts.Context) -> int:
    return int(ctx.seal_context().data.first_context_data().parms().plain_modulus().value())


def _load_vector(ctx: ts.Context, data: bytes, *, size: int, what: str) -> ts.BFVVector:
    try:
        v = ts.bfv_vector_from(ctx, data)
        got = v.size()
        cts = v.ciphertext()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise IntegrityError(f"{what} is not a valid BFV ciphertext for this context") from exc
    if got != size:
        raise IntegrityError(f"{what} holds {got} values, expected {size}")
    if len(cts) != 1 or cts[0].size() != 2:
        raise IntegrityError(f"{what} is not a fresh two-component ciphertext")
    return v


def _load(data: bytes, *, what: str) -> ts.Context:
    return load_context(data, what=what, scheme=ts.SCHEME_TYPE.BFV)
