"""TenSEAL contexts and the container every homomorphic ciphertext travels in (CKKS and BFV
alike), shared by `tasks.ckks` and `tasks.bfv`::

    header   MAGIC (4 bytes, per scheme) | version u8 | payload u8 | slot_count u32
             | length u64 | chunk_count u32 | context_id 32 bytes      (big-endian, HEADER)
    chunks   chunk_count x (u32 byte length | serialized TenSEAL vector)
    trailer  SHA-256 of everything before it

``context_id`` is the SHA-256 of the public key serialization (parameters and public key), so
a ciphertext made under another key set is refused before it is summed or decrypted. The
trailer catches truncation and accidental corruption; it is not authentication: the signature
on the artifact reference (`tasks.transport`) binds a container to a site.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import tenseal as ts

from tasks import IntegrityError, StepError

VERSION = 1
# magic, version, payload, slot_count, length, chunk_count, context_id
HEADER = struct.Struct(">4sBBIQI32s")
CHUNK_LEN = struct.Struct(">I")
CONTEXT_ID_SIZE = 32
DIGEST_SIZE = 32


class Payload(IntEnum):
    """What a container holds: a site's fresh update or the coordinator's sum."""

    UPDATE = 1
    AGGREGATE = 2


@dataclass(frozen=True, kw_only=True)
class Container:
    payload: Payload
    slot_count: int
    length: int
    context_id: bytes
    chunks: tuple[bytes, ...]


def chunk_size(length: int, slots: int, j: int) -> int:
    return min(slots, length - j * slots)


# ---------------------------------------------------------------- contexts


def load_context(data: bytes, *, what: str, scheme: ts.SCHEME_TYPE) -> ts.Context:
    """A serialized TenSEAL context of `scheme` holding a public key, or one clear StepError."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise StepError(f"{what} must be non-empty serialized TenSEAL context bytes")
    try:
        ctx = ts.context_from(bytes(data))
        found = ctx.seal_context().data.first_context_data().parms().scheme()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise StepError(f"{what} is not a serialized TenSEAL context: {exc}") from exc
    if found != scheme.value:
        raise StepError(f"{what} is a {found.name} context, not {scheme.name}")
    if not ctx.has_public_key():
        raise StepError(f"{what} holds no public key")
    return ctx


def context_id(ctx: ts.Context) -> bytes:
    """SHA-256 of the public part: parameters and public key (the same for both copies).
    Take it before encrypting under `ctx`: TenSEAL's serialization of a context changes once
    it has encrypted."""
    public = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return hashlib.sha256(public).digest()


def make_public(secret_context: bytes, *, scheme: ts.SCHEME_TYPE) -> bytes:
    """The coordinator's copy of a secret context: public key only, secret key dropped."""
    ctx = load_context(secret_context, what="secret context", scheme=scheme)
    if not ctx.is_private():
        raise StepError("public_context needs the secret context; this one is already public")
    ctx.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
    data = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    check = load_context(data, what="public context", scheme=scheme)
    if check.is_private() or check.has_secret_key():
        raise StepError("public context still holds a secret key; refusing to hand it out")
    return data


def check_summands(containers: Sequence[Container]) -> Container:
    """Fresh site updates of one shape, the only things a coordinator sums; the first."""
    first = containers[0]
    for i, c in enumerate(containers):
        if c.payload is not Payload.UPDATE:
            raise StepError(f"ciphertext {i} is already an aggregate; only site updates are summed")
        if (c.length, len(c.chunks)) != (first.length, len(first.chunks)):
            raise StepError(
                f"ciphertext {i} holds {c.length} values in {len(c.chunks)} chunks, ciphertext 0 "
                f"holds {first.length} in {len(first.chunks)}"
            )
    return first


def pack(magic: bytes, c: Container) -> bytes:
    parts = [
        HEADER.pack(magic, VERSION, c.payload, c.slot_count, c.length, len(c.chunks), c.context_id)
    ]
    for chunk in c.chunks:
        parts += [CHUNK_LEN.pack(len(chunk)), chunk]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def unpack(
    magic: bytes, data: bytes, *, what: str, context_id: bytes, slot_count: int
) -> Container:
    """Parse and check a container; every defect is an IntegrityError naming `what`."""
    data = bytes(data)
    if len(data) < HEADER.size + DIGEST_SIZE:
        raise IntegrityError(f"{what} is truncated: {len(data)} bytes")
    found, version, payload, slots, length, count, cid = HEADER.unpack_from(data)
    if found != magic:
        raise IntegrityError(f"{what} is not a medfed {magic.decode()} container (magic {found!r})")
    if version != VERSION:
        raise IntegrityError(f"{what} has container version {version}, expected {VERSION}")
    body, digest = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise IntegrityError(f"{what} is truncated or corrupted: its checksum does not match")
    if payload not in {p.value for p in Payload}:
        raise IntegrityError(f"{what} has unknown payload type {payload}")
    if cid != context_id:
        raise IntegrityError(f"{what} was encrypted under a different key set")
    if slots != slot_count:
        raise IntegrityError(f"{what} has {slots} slots per chunk, the context {slot_count}")
    if length < 1 or count != -(-length // slots):
        raise IntegrityError(f"{what} declares {length} values in {count} chunks of {slots}")
    chunks = []
    offset = HEADER.size
    for j in range(count):
        if offset + CHUNK_LEN.size > len(body):
            raise IntegrityError(f"{what} ends before chunk {j}")
        (n,) = CHUNK_LEN.unpack_from(body, offset)
        offset += CHUNK_LEN.size
        if n == 0 or offset + n > len(body):
            raise IntegrityError(f"{what} chunk {j} has invalid length {n}")
        chunks.append(body[offset : offset + n])
        offset += n
    if offset != len(body):
        raise IntegrityError(f"{what} has {len(body) - offset} trailing bytes")
    return Container(
        payload=Payload(payload),
        slot_count=slots,
        length=length,
        context_id=cid,
        chunks=tuple(chunks),
    )


def pack_aggregate(magic: bytes, first: Container, chunks: Sequence[bytes]) -> bytes:
    """The coordinator's sum, shaped like the summands it came from."""
    return pack(
        magic,
        Container(
            payload=Payload.AGGREGATE,
            slot_count=first.slot_count,
            length=first.length,
            context_id=first.context_id,
            chunks=tuple(chunks),
        ),
    )
