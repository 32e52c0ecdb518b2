"""Ledger entries as bytes: canonical form, hash chain, signature, Merkle leaf. Pure.

An entry's canonical bytes are the RFC 8785 (JCS) serialization of its body. The body
carries the previous entry's hash (the chain), its own sequence number and the signer's key
ID; the entry hash is the RFC 6962 leaf hash of the canonical bytes, so the chain and the
Merkle log commit to exactly the same bytes. The signer signs the canonical bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ledger import VerificationError, jcs
from ledger import keys as _keys

# v2 adds `recipient` and `commitments` (salted commitments to erasable personal fields).
SCHEMA_VERSION = 2
LEAF_PREFIX = b"\x00"
# The chain starts from 32 zero bytes.
GENESIS_HASH = bytes(32)
SALT_SIZE = 32
COMMITMENT_DOMAIN = b"medfed/commitment/v1\x00"


class Action(StrEnum):
    REGISTER_KEY = "register_key"
    ENROLL = "enroll"  # the coordinator registers a site from its enrollment file
    JOB_START = "job_start"
    PREPROCESS = "preprocess"
    POLICY = "policy"  # a site records its privacy policy (budget, pinned delta, opt-outs)
    RESERVE = "reserve"  # a site's budget check and the hold it grants, in one transaction
    TRAIN = "train"
    REFUSE = "refuse"  # a site declines to release: its privacy budget or its policy
    REFUSE_INSTRUCTION = (
        "refuse_instruction"  # a site declines an instruction: signature, plan, policy
    )
    DROP = "drop"  # the coordinator drops a site from a round: timed out or failed
    # The coordinator names the sites one upload attempt of a round masks for and sums.
    COHORT = "cohort"
    CLIP_AND_NOISE = "clip_and_noise"
    ENCRYPT = "encrypt"
    UPLOAD = "upload"
    SECURE_AGGREGATE = "secure_aggregate"
    EVALUATE = "evaluate"
    COMMIT_ROUND = "commit_round"
    JOB_END = "job_end"
    ERASE = "erase"
    DISCLOSE = "disclose"
    # The ledger API refused a request outside the caller's role (`medfed ledger serve`).
    ACCESS_DENIED = "access_denied"


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
    # Who received data or a derived artifact (an accounting of disclosures reads it).
    recipient: str | None = None
    # Erasable personal-data fields (name -> text), e.g. a subject pseudonym or free text. The
    # signed body holds only a salted commitment to each; the text and salt live apart and
    # `Ledger.erase(subject)` destroys them (GDPR Art. 17) without breaking any proof.
    personal: dict[str, str] = field(default_factory=dict)
    subject: str | None = None  # whose personal data `personal` is; required with it

    def __post_init__(self) -> None:
        if self.personal and not self.subject:
            raise ValueError("an event with personal fields must name their subject")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.personal.items()):
            raise ValueError("personal fields are text")


@dataclass(frozen=True, kw_only=True)
class Payload:
    """One erasable field: its text and the salt its commitment was made with."""

    field: str
    subject: str
    salt: bytes
    value: str


@dataclass(frozen=True, kw_only=True)
class SealedEntry:
    """An entry as stored: canonical body, its leaf hash and the actor's signature."""

    seq: int
    body: bytes
    entry_hash: bytes
    signature: bytes
    payloads: tuple[Payload, ...] = ()

    @property
    def fields(self) -> dict[str, Any]:
        return json.loads(self.body)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def leaf_hash(body: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + body).digest()


def commitment(salt: bytes, name: str, value: str) -> bytes:
    """HMAC-SHA256 keyed by a random salt: hiding once the salt is gone, binding while it lives."""
    if len(salt) != SALT_SIZE:
        raise ValueError(f"salt must be {SALT_SIZE} bytes")
    message = COMMITMENT_DOMAIN + name.encode() + b"\x00" + value.encode()
    return hmac.new(salt, message, hashlib.sha256).digest()


def canonical_body(
    event: Event,
    *,
    seq: int,
    prev_hash: bytes,
    key_id: bytes,
    recorded: str,
    commitments: Mapping[str, bytes] | None = None,
) -> bytes:
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
        "recipient": event.recipient,
        "commitments": {k: v.hex() for k, v in sorted((commitments or {}).items())},
    }
    return jcs.dumps(body)


def seal(
    event: Event,
    signer: _keys.Identity,
    *,
    seq: int,
    prev_hash: bytes,
    recorded: str | None = None,
    salts: Mapping[str, bytes] | None = None,
) -> SealedEntry:
    """Canonicalize, chain, commit and sign. `salts` (field -> 32 bytes) is for tests only."""
    if signer.name != event.actor:
        raise ValueError(f"event actor {event.actor!r} is not the signer {signer.name!r}")
    payloads = tuple(
        Payload(
            field=name,
            subject=event.subject or "",
            salt=(salts or {}).get(name) or secrets.token_bytes(SALT_SIZE),
            value=value,
        )
        for name, value in sorted(event.personal.items())
    )
    body = canonical_body(
        event,
        seq=seq,
        prev_hash=prev_hash,
        key_id=signer.key_id,
        recorded=recorded or utc_now(),
        commitments={p.field: commitment(p.salt, p.field, p.value) for p in payloads},
    )
    return SealedEntry(
        seq=seq,
        body=body,
        entry_hash=leaf_hash(body),
        signature=signer.sign(body),
        payloads=payloads,
    )


def check(entry: SealedEntry, *, prev_hash: bytes, public_key: bytes) -> dict[str, Any]:
    """Verify one entry against its predecessor's hash and its actor's key; return its fields."""
    try:
        fields = json.loads(entry.body)
    except ValueError as exc:
        raise VerificationError("body is not JSON") from exc
    if jcs.dumps(fields) != entry.body:
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
