"""Ledger entries as bytes: canonical form, hash chain, signature, Merkle leaf. Pure.

An entry's canonical bytes are the RFC 8785 (JCS) serialization of its body. The body
carries the previous entry's hash (the chain), its own sequence number and the signer's key
ID; the entry hash is the RFC 6962 leaf hash of the canonical bytes, so the chain and the
Merkle log commit to exactly the same bytes. The signer signs the canonical bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import rfc8785

from ledger import VerificationError
from ledger import keys as _keys

SCHEMA_VERSION = 1
LEAF_PREFIX = b"\x00"
# The chain starts from 32 zero bytes.
GENESIS_HASH = bytes(32)


class Action(StrEnum):
    REGISTER_KEY = "register_key"
    JOB_START = "job_start"
    PREPROCESS = "preprocess"
    TRAIN = "train"
    REFUSE = "refuse"
    CLIP_AND_NOISE = "clip_and_noise"
    ENCRYPT = "encrypt"
    UPLOAD = "upload"
    SECURE_AGGREGATE = "secure_aggregate"
    EVALUATE = "evaluate"
    COMMIT_ROUND = "commit_round"
    JOB_END = "job_end"


class Outcome(StrEnum):
    SUCCESS = "success"
    REFUSED = "refused"
    FAILURE = "failure"


@dataclass(frozen=True, kw_only=True)
class Event:
    """What happened, as the acting party states it. Never holds patient identifiers."""

    actor: str
    action: Action
    job: str
    idempotency_key: str
    round: int | None = None
    site: str | None = None
    outcome: Outcome = Outcome.SUCCESS
    purpose: str = "HRESCH"  # HL7 PurposeOfUse: healthcare research
    legal_basis: str = "GDPR Art. 9(2)(j)"
    inputs: dict[str, str] = field(default_factory=dict)  # name -> sha256 hex
    outputs: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SealedEntry:
    """An entry as stored: canonical body, its leaf hash and the actor's signature."""

    seq: int
    body: bytes
    entry_hash: bytes
    signature: bytes

    @property
    def fields(self) -> dict[str, Any]:
        return json.loads(self.body)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def leaf_hash(body: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + body).digest()


def canonical_body(event: Event, *, seq: int, prev_hash: bytes, key_id: bytes, recorded: str) -> bytes:
    if seq < 0:
        raise ValueError("seq must be non-negative")
    if len(prev_hash) != 32:
        raise ValueError("prev_hash must be 32 bytes")
    body = {
        "v": SCHEMA_VERSION,
        "seq": seq,
        "prev": prev_hash.hex(),
        "recorded": recorded,
        "key_id": key_id.hex(),
        "actor": event.actor,
        "action": str(event.action),
        "outcome": str(event.outcome),
        "job": event.job,
        "round": event.round,
        "site": event.site,
        "purpose": event.purpose,
        "legal_basis": event.legal_basis,
        "idempotency_key": event.idempotency_key,
        "inputs": event.inputs,
        "outputs": event.outputs,
        "privacy": event.privacy,
        "details": event.details,
    }
    return rfc8785.dumps(body)


def seal(
    event: Event,
    signer: _keys.Identity,
    *,
    seq: int,
    prev_hash: bytes,
    recorded: str | None = None,
) -> SealedEntry:
    if signer.name != event.actor:
        raise ValueError(f"event actor {event.actor!r} is not the signer {signer.name!r}")
    body = canonical_body(
        event, seq=seq, prev_hash=prev_hash, key_id=signer.key_id, recorded=recorded or utc_now()
    )
    return SealedEntry(seq=seq, body=body, entry_hash=leaf_hash(body), signature=signer.sign(body))


def check(entry: SealedEntry, *, prev_hash: bytes, public_key: bytes) -> dict[str, Any]:
    """Verify one entry against its predecessor's hash and its actor's key; return its fields."""
    try:
        fields = json.loads(entry.body)
    except ValueError as exc:
        raise VerificationError("body is not JSON") from exc
    if rfc8785.dumps(fields) != entry.body:
        raise VerificationError("body is not in canonical form")
    if fields.get("seq") != entry.seq:
        raise VerificationError(f"body says seq {fields.get('seq')}, stored at {entry.seq}")
    if fields.get("prev") != prev_hash.hex():
        raise VerificationError("hash chain broken: prev does not match the previous entry")
    if leaf_hash(entry.body) != entry.entry_hash:
        raise VerificationError("entry hash does not match its body")
    if fields.get("key_id") != _keys.key_id(fields.get("actor", ""), public_key).hex():
        raise VerificationError("key id does not match the actor's registered key")
    _keys.verify(public_key, entry.body, entry.signature)
    return fields


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)
