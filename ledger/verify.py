"""Recompute the whole ledger: chain, entry hashes, signatures, indexed columns.

The keys that signatures are checked against come from the chain's own `register_key`
entries (self-signed, and themselves chained), never from the mutable actor table; a caller
may pin keys it trusts from elsewhere with `trusted_keys`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from ledger import LedgerError, VerificationError
from ledger.entry import GENESIS_HASH, Action, check
from ledger.schema import INDEXED_FIELDS, EntryRow
from ledger.store import Ledger, sealed_from_row


@dataclass(frozen=True, kw_only=True)
class Report:
    entries: int
    head: str  # hex hash of the last entry (genesis when empty)
    actors: tuple[str, ...]


class EntryError(VerificationError):
    """The first entry that does not verify, and why."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"entry {seq} does not verify: {reason}")
        self.seq = seq
        self.reason = reason


def verify_rows(rows: Iterable[EntryRow], *, trusted_keys: Mapping[str, bytes] | None = None) -> Report:
    """Raise EntryError naming the first bad entry; return a Report when all verify."""
    keys: dict[str, bytes] = dict(trusted_keys or {})
    prev = GENESIS_HASH
    expected_seq = 0
    count = 0
    for row in rows:
        if row.seq != expected_seq:
            raise EntryError(expected_seq, f"missing; the next stored entry is {row.seq}")
        try:
            sealed = sealed_from_row(row)
            fields = json.loads(sealed.body)
            actor = fields.get("actor")
            public_key = _key_for(fields, keys)
            check(sealed, prev_hash=prev, public_key=public_key)
        except (VerificationError, ValueError, TypeError) as exc:
            raise EntryError(row.seq, str(exc)) from exc
        for name in INDEXED_FIELDS:
            if getattr(row, name) != fields.get(name):
                raise EntryError(row.seq, f"column '{name}' differs from the signed body")
        keys.setdefault(actor, public_key)
        prev = sealed.entry_hash
        expected_seq += 1
        count += 1
    return Report(entries=count, head=prev.hex(), actors=tuple(sorted(keys)))


def _key_for(fields: dict, keys: Mapping[str, bytes]) -> bytes:
    actor = fields.get("actor")
    if fields.get("action") == Action.REGISTER_KEY:
        claimed = bytes.fromhex(fields["details"]["public_key"])
        if actor in keys and keys[actor] != claimed:
            raise VerificationError(f"actor {actor!r} re-registered with a different key")
        return claimed
    if actor not in keys:
        raise VerificationError(f"actor {actor!r} signs before registering a key")
    return keys[actor]


def verify_ledger(url: str, *, trusted_keys: Mapping[str, bytes] | None = None) -> Report:
    ledger = Ledger(url)
    try:
        return verify_rows(ledger.rows(), trusted_keys=trusted_keys)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read ledger {url}: {exc}") from exc
