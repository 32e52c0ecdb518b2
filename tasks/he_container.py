"""The container every homomorphic ciphertext travels in (CKKS and BFV alike)::

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
from dataclasses import dataclass
from enum import IntEnum

from tasks import IntegrityError

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
