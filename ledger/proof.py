"""Inclusion proofs a third party can check offline: one entry, the latest signed checkpoint,
and the RFC 9162 audit path from the entry's leaf hash to that checkpoint's root.

To check one without medfed: verify the checkpoint note with the log's vkey (C2SP signed
note, Ed25519), leaf = SHA-256(0x00 || body bytes), then fold the audit path as in RFC 9162
section 2.1.3.2 and compare with the checkpoint's root.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from ledger import LedgerError, VerificationError, merkle, note
from ledger.entry import leaf_hash
from ledger.store import Ledger, UnreadableError

PROOF_FORMAT = "medfed-inclusion-proof/1"


def inclusion(ledger: Ledger, entry: str | int) -> dict[str, Any]:
    """Proof for `entry` (a sequence number or an idempotency key) against the latest
    checkpoint that covers it."""
    seq = _resolve(ledger, entry)
    cps = ledger.checkpoints()
    if not cps:
        raise LedgerError("the ledger has no checkpoint yet: run `medfed ledger checkpoint`")
    size, _root, text, _proof = cps[-1]
    if seq >= size:
        raise LedgerError(
            f"entry {seq} is newer than the latest checkpoint (size {size}); make a checkpoint"
        )
    hashes = [leaf_hash(r[1].encode()) for r in ledger.raw_rows() if r[0] < size]
    if len(hashes) != size:
        raise VerificationError(f"the ledger has fewer entries than its checkpoint ({size})")
    row = ledger.entry(seq)
    assert row is not None
    log = ledger.log_identity()
    return {
        "format": PROOF_FORMAT,
        "leaf_index": seq,
        "tree_size": size,
        "entry": {"body": row[1], "entry_hash": row[2], "signature": row[3]},
        "leaf_hash_algorithm": "SHA-256(0x00 || body)",
        "audit_path": [h.hex() for h in merkle.inclusion_proof(hashes, seq)],
        "checkpoint": text,
        "vkey": log[1] if log else None,
    }


def check_inclusion(doc: dict[str, Any], vkey: str) -> note.Checkpoint:
    """Raise VerificationError unless `doc` proves its entry is in a checkpoint `vkey` signed."""
    if not isinstance(doc, dict) or doc.get("format") != PROOF_FORMAT:
        raise VerificationError(f"not a {PROOF_FORMAT} document")
    try:
        body = doc["entry"]["body"].encode()
        index = int(doc["leaf_index"])
        path = [bytes.fromhex(h) for h in doc["audit_path"]]
        text = doc["checkpoint"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VerificationError(f"malformed inclusion proof: {exc}") from exc
    cp = note.verify_checkpoint(text, vkey)
    if int(doc.get("tree_size", cp.size)) != cp.size:
        raise VerificationError("tree_size differs from the checkpoint's size")
    leaf = leaf_hash(body)
    if doc["entry"].get("entry_hash") not in (None, leaf.hex()):
        raise VerificationError("entry_hash does not match the entry body")
    fields = json.loads(body)
    if fields.get("seq") != index:
        raise VerificationError("the entry's seq is not the proof's leaf index")
    merkle.verify_inclusion(
        leaf_hash=leaf, index=index, size=cp.size, proof=path, root=cp.root_hash
    )
    return cp


def proof_bytes(size: int, index: int) -> int:
    """Bytes of an audit path (hashes only) for leaf `index` of a `size` tree."""
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return merkle.HASH_SIZE * (inner + border)


_SEQ = re.compile(r"[0-9]{1,30}")
MAX_SEQ = 2**63 - 1  # the largest seq a database column holds


def _resolve(ledger: Ledger, entry: str | int) -> int:
    if isinstance(entry, int) or _SEQ.fullmatch(entry):
        seq = int(entry)
        if not 0 <= seq <= MAX_SEQ:
            raise UnreadableError(f"entry number {entry} is out of range (0..{MAX_SEQ})")
        if ledger.entry(seq) is None:
            raise UnreadableError(f"there is no entry {seq}")
        return seq
    seq = ledger.seq_of(entry)
    if seq is None:
        raise UnreadableError(f"no entry has the idempotency key {entry!r}")
    return seq


def b64_root(cp: note.Checkpoint) -> str:
    return base64.b64encode(cp.root_hash).decode()
