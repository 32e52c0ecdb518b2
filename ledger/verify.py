"""Recompute a whole ledger: chain, entry hashes, signatures, indexed columns, erasable-field
commitments, Merkle roots and every checkpoint (signature, root, consistency with the last).

The keys that entry signatures are checked against come from the caller's pinned `roster`
(the federation's enrolled identities: `ledger.identities`), which also decides who may write
what; with no roster, from the chain's own `register_key` entries (self-signed, and themselves
chained), never from the mutable actor table, which is checked against them. The checkpoint
key is the vkey the caller pins (or the roster's log key), else the one the ledger stores. A
pinned log key must have signed a checkpoint that covers the whole log, and `witnesses=N`
requires that checkpoint to be cosigned (C2SP tlog-cosignature) by N enrolled sites.

Works on a database (`verify_ledger`) or on an exported bundle (`verify_bundle`, no database).
Rows stream through one tight loop (no ORM); signatures, the slow part, are checked in worker
processes when there are many. A long ledger in a database is instead scanned in seq ranges
by worker processes that each read their range themselves (`_scan_range`); the parent stitches
the ranges in order (chain links across them, keys registered in earlier ones) and reports the
same first bad entry as the single loop. Whatever the range scan does not handle exactly goes
back to the single loop, which is the reference.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from sqlalchemy.pool import QueuePool

from ledger import LedgerError, VerificationError, cosignature, jcs, merkle, note
from ledger import keys as _keys
from ledger.entry import GENESIS_HASH, LEAF_PREFIX, Action, commitment, unb64
from ledger.identities import Roster
from ledger.schema import INDEXED_FIELDS
from ledger.store import Ledger, forked_reader, open_ledger, sqlite_path

try:  # orjson parses a ledger body ~4x faster than json; same result for valid JSON.
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

PARALLEL_MIN_SIGNATURES = 4000
# From this many entries a database ledger is scanned in ranges by worker processes; below
# it, forking and stitching cost more than they save.
PARALLEL_MIN_ENTRIES = 50_000
_RANGES_PER_WORKER = 4  # several ranges per worker even out a core that is busy elsewhere
_MIN_SPAN = 4096
_REGISTER = str(Action.REGISTER_KEY)
_ERASE = str(Action.ERASE)


@dataclass(frozen=True, kw_only=True)
class Report:
    entries: int
    head: str  # hex hash of the last entry (genesis when empty)
    actors: tuple[str, ...]
    root: str = ""  # hex RFC 6962 root over all entries
    checkpoints: int = 0
    checkpoint_size: int = 0  # size of the latest verified checkpoint
    vkey: str = ""  # the checkpoint key checked against
    signatures: bool = True
    personal_fields: int = 0  # committed erasable fields still present and matching
    erased_fields: int = 0
    identities_pinned: bool = False  # every actor was checked against a pinned roster
    cosignatures: int = 0  # witness cosignatures verified (0 when no roster names witnesses)
    witnesses: tuple[str, ...] = ()  # who cosigned the checkpoint covering the whole log


class EntryError(VerificationError):
    """The first entry that does not verify, and why."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"entry {seq} does not verify: {reason}")
        self.seq = seq
        self.reason = reason


class CheckpointError(VerificationError):
    """A stored or pinned checkpoint that does not verify against the entries."""

    def __init__(self, size: int, reason: str) -> None:
        super().__init__(f"checkpoint at size {size} does not verify: {reason}")
        self.size = size
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Source:
    """What verification reads, from a database or a bundle."""

    rows: Iterable[Sequence]  # (seq, body, entry_hash hex, signature b64[, *INDEXED_FIELDS])
    checkpoints: Sequence[tuple] = ()  # (size, root hex, note, consistency proof JSON)
    log: tuple[str, str] | None = None  # (origin, vkey) as stored
    payloads: Sequence[tuple] | None = None  # (seq, field, salt hex, value); None: not checked
    columns: bool = True  # rows carry the indexed columns
    public_keys: Mapping[str, str] = field(default_factory=dict)  # bundle's actor -> hex key
    cosignatures: Sequence[tuple[int, str, str]] = ()  # (size, witness, signature line)
    actor_table: Sequence[tuple[str, str]] | None = None  # the database's actor cache


@dataclass(frozen=True, kw_only=True)
class Pins:
    """What the verifier trusts from outside the ledger."""

    vkey: str | None = None  # the log's checkpoint key
    roster: Roster | None = None  # the enrolled identities
    checkpoints: Sequence[str] = ()  # checkpoints kept elsewhere (a site's, an auditor's)
    witnesses: int = 0  # enrolled witnesses that must cosign the checkpoint covering the log

    @property
    def keys(self) -> dict[str, bytes]:
        return self.roster.keys if self.roster else {}

    @property
    def log_vkey(self) -> str | None:
        """The pinned log key: --vkey, else the roster's; both pinned must agree."""
        roster_vkey = self.roster.log_vkey if self.roster else None
        if self.vkey and roster_vkey and self.vkey != roster_vkey:
            raise LedgerError("the --vkey given is not the log key the identities file pins")
        return self.vkey or roster_vkey


def _pins(
    vkey: str | None,
    roster: Roster | None,
    pinned_checkpoints: Sequence[str],
    witnesses: int,
) -> Pins:
    if witnesses < 0:
        raise LedgerError("--witnesses must be 0 or more")
    if witnesses and roster is None:
        raise LedgerError("--witnesses needs the enrolled witnesses: pass --identities FILE")
    enrolled = len(roster.witnesses) if roster else 0
    if witnesses > enrolled:
        raise LedgerError(f"--witnesses {witnesses} is more than the {enrolled} enrolled sites")
    return Pins(
        vkey=vkey, roster=roster, checkpoints=tuple(pinned_checkpoints), witnesses=witnesses
    )


def verify_ledger(
    url: str,
    *,
    vkey: str | None = None,
    roster: Roster | None = None,
    pinned_checkpoints: Sequence[str] = (),
    witnesses: int = 0,
    signatures: bool = True,
    workers: int | None = None,
) -> Report:
    """Verify the ledger at `url` (which must exist; opened read-only); raise EntryError /
    CheckpointError / VerificationError."""
    pins = _pins(vkey, roster, pinned_checkpoints, witnesses)
    ledger = open_ledger(url)
    try:
        # The checkpoints are read now, the entries after: no checkpoint covers an unread entry.
        source = source_of(ledger, signatures=signatures)
        report = _verify_in_ranges(
            ledger,
            source,
            workers=(os.cpu_count() or 1) if workers is None else workers,
            pins=pins,
            signatures=signatures,
        )
        if report is not None:
            return report
        return _verify_source(source, pins=pins, signatures=signatures, workers=workers)
    finally:
        ledger.engine.dispose()  # its own read-only engine: a server verifies again and again


def source_of(ledger: Ledger, *, signatures: bool = True) -> Source:
    return Source(
        rows=ledger.raw_rows(signatures=signatures),
        checkpoints=ledger.checkpoints(),
        log=ledger.log_identity(),
        payloads=ledger.payloads(),
        cosignatures=ledger.cosignatures(),
        actor_table=ledger.actor_table(),
    )


def verify_source(
    source: Source,
    *,
    vkey: str | None = None,
    roster: Roster | None = None,
    pinned_checkpoints: Sequence[str] = (),
    witnesses: int = 0,
    signatures: bool = True,
    workers: int | None = None,
) -> Report:
    pins = _pins(vkey, roster, pinned_checkpoints, witnesses)
    return _verify_source(source, pins=pins, signatures=signatures, workers=workers)


def _verify_source(source: Source, *, pins: Pins, signatures: bool, workers: int | None) -> Report:
    roster = pins.roster
    keys: dict[str, bytes] = pins.keys
    key_ids: dict[tuple[str, bytes], str] = {}
    hashes: list[bytes] = []
    sig_jobs: list[tuple[int, bytes, str, bytes]] = []
    commitments: dict[tuple[int, str], str] = {}
    erased: set[tuple[int, str]] = set()
    failure: tuple[int, str] | None = None
    prev_hex = GENESIS_HASH.hex()
    # Locals: this loop runs once per entry.
    add_hash, register, erase = hashes.append, _REGISTER, _ERASE
    columns = source.columns
    n = 0

    for row in source.rows:
        seq = row[0]
        checked = _check_row(row, n, prev_hex, columns, roster)
        if len(checked) == 2:
            failure = checked
            break
        body, digest, digest_hex, fields = checked
        get = fields.get
        actor = get("actor")
        action = get("action")
        public_key = keys.get(actor) if action != register else None
        if public_key is None:
            try:
                public_key = _key_for(fields, keys, register)
            except (VerificationError, KeyError, TypeError, ValueError) as exc:
                failure = (seq, str(exc) or "malformed register_key entry")
                break
        kid = key_ids.get((actor, public_key))
        if kid is None:
            kid = key_ids[(actor, public_key)] = _keys.key_id(str(actor), public_key).hex()
        if get("key_id") != kid:
            failure = (seq, "key id does not match the actor's registered key")
            break
        keys.setdefault(actor, public_key)
        if signatures:
            sig_jobs.append((seq, body, row[3], public_key))
        if action == erase or get("commitments"):
            malformed = _collect_erasable(seq, fields, commitments, erased)
            if malformed:
                failure = (seq, malformed)
                break
        add_hash(digest)
        prev_hex = digest_hex
        n += 1

    if signatures:
        bad_sig = check_signatures(sig_jobs, workers=workers)
        if bad_sig is not None and (failure is None or bad_sig[0] < failure[0]):
            failure = bad_sig
    if failure is not None:
        raise EntryError(*failure)

    for actor, hex_key in source.public_keys.items():
        if keys.get(actor) != bytes.fromhex(hex_key):
            raise VerificationError(
                f"the public key listed for {actor!r} is not the one it registered in the chain"
            )
    return _report(
        source,
        size=n,
        head=prev_hex,
        keys=keys,
        roots_of=functools.partial(merkle.prefix_roots, hashes),
        commitments=commitments,
        erased=erased,
        pins=pins,
        signatures=signatures,
    )


def _report(
    source: Source,
    *,
    size: int,
    head: str,
    keys: Mapping[str, bytes],
    roots_of: Callable[[Sequence[int]], list[bytes]],
    commitments: Mapping[tuple[int, str], str],
    erased: set[tuple[int, str]],
    pins: Pins,
    signatures: bool,
) -> Report:
    """The checks after the entries (actor table, erasable fields, checkpoints, cosignatures),
    once they all verify."""
    present, erased_count = _check_payloads(source.payloads, commitments, erased)
    vkey = pins.log_vkey
    checked = _check_checkpoints(
        size, roots_of, source.checkpoints, source.log, vkey, pins.checkpoints
    )
    cp_count, cp_size, used_vkey, full_root, notes = checked
    if vkey is not None:
        _check_covered(size, notes)
    cosigned = _check_cosignatures(source.cosignatures, notes, pins)
    _check_actor_table(source.actor_table, keys)
    covering = sorted(cosigned.get(size, ()))
    if pins.witnesses and len(covering) < pins.witnesses:
        best = max(cosigned.items(), key=lambda kv: (len(kv[1]), kv[0]), default=(0, set()))
        raise VerificationError(
            f"no checkpoint covering all {size} entries is cosigned by {pins.witnesses} "
            f"enrolled witnesses ({len(covering)} did; the most cosigned checkpoint, at size "
            f"{best[0]}, by {len(best[1])})"
        )
    return Report(
        entries=size,
        head=head,
        actors=tuple(sorted(keys)),
        root=full_root.hex(),
        checkpoints=cp_count,
        checkpoint_size=cp_size,
        vkey=used_vkey,
        signatures=signatures,
        personal_fields=present,
        erased_fields=erased_count,
        identities_pinned=pins.roster is not None,
        cosignatures=sum(len(v) for v in cosigned.values()),
        witnesses=tuple(covering),
    )


def _check_row(
    row: Sequence, expected_seq: int, prev_hex: str | None, columns: bool, roster: Roster | None
) -> tuple[bytes, bytes, str, dict] | tuple[int, str]:
    """The checks one stored row needs from nothing but itself, its predecessor's hash and
    the pinned roster: its place in the sequence, hash, JSON body, stated seq, chain link,
    (when the rows carry them) indexed columns, and whether its actor may write it. Both the
    single loop and the range workers run every row through it. Returns (body, digest,
    digest hex, fields), or (seq, why) for the first failure: a pair, so callers tell the
    two apart by length (a tuple is cheapest here)."""
    seq = row[0]
    if seq != expected_seq:
        return (expected_seq, f"missing; the next stored entry is {seq}")
    body = row[1].encode() if isinstance(row[1], str) else bytes(row[1])
    digest = hashlib.sha256(LEAF_PREFIX + body).digest()
    digest_hex = digest.hex()
    if digest_hex != row[2]:
        return (seq, "entry hash does not match its body")
    try:
        fields = _loads(body)
    except ValueError:
        return (seq, "body is not JSON")
    if type(fields) is not dict or fields.get("seq") != seq:
        return (seq, "body does not state its own sequence number")
    if prev_hex is None or fields.get("prev") != prev_hex:
        return (seq, "hash chain broken: prev does not match the previous entry")
    if columns and tuple(row[4:11]) != tuple(map(fields.get, INDEXED_FIELDS)):
        return (seq, _column_failure(row, fields))
    if roster is not None:
        refused = roster.refusal(fields)
        if refused is not None:
            return (seq, refused)
    return body, digest, digest_hex, fields


def _column_failure(row: Sequence, fields: dict) -> str:
    bad = next(n for i, n in enumerate(INDEXED_FIELDS, 4) if row[i] != fields.get(n))
    return f"column '{bad}' differs from the signed body"


def _collect_erasable(
    seq: int, fields: dict, commitments: dict[tuple[int, str], str], erased: set[tuple[int, str]]
) -> str | None:
    """Record the entry's personal-field commitments and the (seq, field) pairs it erases;
    return why they are malformed (a signed entry can still be nonsense), else None."""
    committed = fields.get("commitments")
    if committed:
        if type(committed) is not dict:
            return "commitments are not an object"
        for name, value in committed.items():
            commitments[(seq, name)] = value
    if fields.get("action") == _ERASE:
        details = fields.get("details") or {}
        items = details.get("erased", []) if type(details) is dict else None
        if type(items) is not list or not all(
            type(i) is dict and type(i.get("seq")) is int and type(i.get("field")) is str
            for i in items
        ):
            return "erase entry does not list (seq, field) pairs"
        for item in items:
            erased.add((item["seq"], item["field"]))
    return None


def _key_for(fields: dict, keys: Mapping[str, bytes], register: str) -> bytes:
    actor = fields.get("actor")
    if fields.get("action") == register:
        claimed = _registered_key(fields)
        if actor in keys and keys[actor] != claimed:
            raise VerificationError(f"actor {actor!r} re-registered with a different key")
        return claimed
    if actor not in keys:
        raise VerificationError(f"actor {actor!r} signs before registering a key")
    return keys[actor]


def _registered_key(fields: dict) -> bytes:
    claimed = bytes.fromhex(fields["details"]["public_key"])
    if len(claimed) != _keys.PUBLIC_KEY_SIZE:
        raise VerificationError("registered public key is not 32 bytes")
    return claimed


# ---------------------------------------------------------------- range scan


class _Fallback(Exception):
    """The range scan met something only the single loop reproduces exactly (an odd body, or
    rows that changed between two workers' reads): verify with the single loop instead."""


@dataclass(frozen=True, kw_only=True)
class _Range:
    url: str
    start: int | None  # None: from the first row, whatever its seq
    stop: int | None  # None: to the last row, however many were appended meanwhile
    levels: int  # Merkle levels to build above the leaves; ranges start at multiples of 2**levels
    signatures: bool
    hints: Mapping[str, bytes]  # actor -> key to check its signatures with here
    roster: Roster | None


@dataclass(frozen=True, kw_only=True)
class _Part:
    """What one worker found in its range, for the parent to stitch in order."""

    stop: int | None
    first_seq: int | None  # of the first row stored in the range; None when it is empty
    end: int  # one past the last row that passed the checks made here
    failure: tuple[int, str] | None  # the first failing check that needs nothing from outside
    prev: bytes | None  # leaf hash of row start - 1 as this worker read it (its chain anchor)
    last: bytes | None  # leaf hash of row end - 1
    registrations: list[tuple[int, str, bytes, bool]]  # (seq, actor, key, key id matches)
    first_use: dict[tuple[str, str | None], int]  # (actor, key id) of other entries -> first seq
    bad_signature: tuple[int, str] | None  # first, with the key from `hints` or the entry's own
    commitments: dict[tuple[int, str], str]
    erased: set[tuple[int, str]]
    levels: list[bytes]  # packed nodes of Merkle levels 0..levels; [] when anything failed


@dataclass(frozen=True, kw_only=True)
class _Stitched:
    size: int
    head: bytes
    keys: dict[str, bytes]
    levels: list[Sequence[bytes]]  # the whole Merkle tree, leaves first
    commitments: dict[tuple[int, str], str]
    erased: set[tuple[int, str]]


def _verify_in_ranges(
    ledger: Ledger,
    source: Source,
    *,
    workers: int,
    pins: Pins,
    signatures: bool,
) -> Report | None:
    """The report from scanning seq ranges in worker processes; None where that is not done
    (small ledger, one worker, in-memory SQLite) or must be redone by the single loop."""
    tasks = _plan(ledger, workers, signatures, pins.roster)
    if not tasks:
        return None
    pool = ledger.engine.pool
    if ledger.engine.dialect.name == "sqlite" and (
        not isinstance(pool, QueuePool) or pool.checkedout()
    ):
        # A connection mid-transaction (another thread's) would hand its SQLite lock state to
        # the workers, whose own locks might then be no-ops. Idle pooled connections are
        # harmless: they stay open here while the workers read over their own connections.
        return None
    # fork: workers inherit the imported modules; verification runs from the CLI, not a server.
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), mp_context=get_context("fork")
    ) as executor:
        futures = [executor.submit(_scan_range, task) for task in tasks]
        try:
            whole = _stitch(
                (f.result() for f in futures),
                trusted=pins.keys,
                hints=tasks[0].hints if signatures else None,
            )
        except _Fallback:
            return None
        finally:
            for f in futures:  # the stitch stops at the first bad entry; skip what is left
                f.cancel()
    return _report(
        source,
        size=whole.size,
        head=whole.head.hex(),
        keys=whole.keys,
        roots_of=functools.partial(merkle.prefix_roots_of_levels, whole.levels),
        commitments=whole.commitments,
        erased=whole.erased,
        pins=pins,
        signatures=signatures,
    )


def _plan(ledger: Ledger, workers: int, signatures: bool, roster: Roster | None) -> list[_Range]:
    if workers < 2 or (ledger.engine.dialect.name == "sqlite" and sqlite_path(ledger.url) is None):
        return []
    last = ledger.last_seq()
    if last is None or last + 1 < PARALLEL_MIN_ENTRIES:
        return []
    span = _span_for(last + 1, workers)
    count = -(-(last + 1) // span)
    if count < 2:
        return []
    hints = _hint_keys(ledger, roster.keys if roster else {}) if signatures else {}
    return [
        _Range(
            url=ledger.url,
            start=i * span if i else None,
            stop=(i + 1) * span if i < count - 1 else None,
            levels=span.bit_length() - 1,
            signatures=signatures,
            hints=hints,
            roster=roster,
        )
        for i in range(count)
    ]


def _span_for(entries: int, workers: int) -> int:
    """Entries per range: a power of two, so that each range holds whole Merkle subtrees."""
    wanted = -(-entries // (workers * _RANGES_PER_WORKER))
    return max(_MIN_SPAN, 1 << (wanted - 1).bit_length())


def _hint_keys(ledger: Ledger, trusted: dict[str, bytes]) -> dict[str, bytes]:
    """Each actor's key as its first register_key entry by the action column states it. Only
    a guess to check signatures with: the stitch falls back to the single loop unless every
    guess it relied on is the key the chain establishes."""
    hints = dict(trusted)
    try:
        registrations = ledger.events(action=_REGISTER)
    except ValueError:  # a body that is not JSON; the scan names it
        return hints
    for fields in registrations:
        try:
            hints.setdefault(fields["actor"], _registered_key(fields))
        except (VerificationError, KeyError, TypeError, ValueError):
            continue
    return hints


def _scan_range(task: _Range) -> _Part:
    """In a worker: the checks on one range that need no other range, in the single loop's
    order, stopping at the first failure."""
    ledger = forked_reader(task.url)
    try:
        return _scan(ledger, task)
    finally:
        ledger.engine.dispose()


def _anchor(ledger: Ledger, start: int | None) -> bytes | None:
    """The hash the range's first entry must chain to: of entry start - 1 as read here (the
    stitch checks it is the one the previous range ended with). None when it is missing."""
    if start is None:
        return GENESIS_HASH
    before = list(ledger.raw_rows(start=start - 1, stop=start, signatures=False))
    return _leaf_hash(before[0][1]) if before else None


def _scan(ledger: Ledger, task: _Range) -> _Part:
    start = task.start or 0
    prev = _anchor(ledger, task.start)
    prev_hex = prev.hex() if prev is not None else None
    hashes: list[bytes] = []
    registrations: list[tuple[int, str, bytes, bool]] = []
    first_use: dict[tuple[str, str | None], int] = {}
    commitments: dict[tuple[int, str], str] = {}
    erased: set[tuple[int, str]] = set()
    verifiers: dict[bytes, object] = {}
    failure: tuple[int, str] | None = None
    bad_signature: tuple[int, str] | None = None
    first_seq: int | None = None
    add_hash, register, erase = hashes.append, _REGISTER, _ERASE
    hints, signatures = task.hints, task.signatures
    n = start

    for row in ledger.raw_rows(start=task.start, stop=task.stop, signatures=signatures):
        seq = row[0]
        if first_seq is None:
            first_seq = seq
        # No anchor (the entry before the range is missing) breaks the chain here.
        checked = _check_row(row, n, prev_hex, True, task.roster)
        if len(checked) == 2:
            failure = checked
            break
        body, digest, digest_hex, fields = checked
        get = fields.get
        actor = get("actor")
        if type(actor) is not str:
            raise _Fallback(f"entry {seq} names a non-string actor")
        action = get("action")
        if action == register:
            try:
                claimed = _registered_key(fields)
            except (VerificationError, KeyError, TypeError, ValueError) as exc:
                failure = (seq, str(exc) or "malformed register_key entry")
                break
            # Whether it re-registers an actor with another key is for the stitch to say.
            kid_ok = get("key_id") == _keys.key_id(actor, claimed).hex()
            registrations.append((seq, actor, claimed, kid_ok))
            key: bytes | None = claimed
        else:
            kid = get("key_id")
            # Any key id that is not a string mismatches alike; None keeps the pair hashable.
            first_use.setdefault((actor, kid if type(kid) is str else None), seq)
            key = hints.get(actor)
        if signatures and bad_signature is None and key is not None:
            reason = _signature_failure(body, row[3], key, verifiers)
            if reason is not None:
                bad_signature = (seq, reason)
        if action == erase or get("commitments"):
            # The single loop names it, after any failure this row's key check would add.
            if _collect_erasable(seq, fields, commitments, erased):
                raise _Fallback(f"entry {seq} has malformed erasable fields")
        add_hash(digest)
        prev_hex = digest_hex
        n += 1

    clean = failure is None and bad_signature is None
    return _Part(
        stop=task.stop,
        first_seq=first_seq,
        end=n,
        failure=failure,
        prev=prev,
        last=hashes[-1] if hashes else None,
        registrations=registrations,
        first_use=first_use,
        bad_signature=bad_signature,
        commitments=commitments,
        erased=erased,
        levels=_packed_levels(hashes, task.levels) if clean else [],
    )


def _leaf_hash(body: str | bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + (body.encode() if isinstance(body, str) else body)).digest()


def _packed_levels(hashes: list[bytes], count: int) -> list[bytes]:
    """Merkle levels 0..count over these leaves, each as one bytes object (cheap to send)."""
    level: Sequence[bytes] = hashes
    packed = [b"".join(level)]
    for _ in range(count):
        level = merkle._next_level(level)
        packed.append(b"".join(level))
    return packed


def _stitch(
    parts: Iterable[_Part], *, trusted: dict[str, bytes], hints: Mapping[str, bytes] | None
) -> _Stitched:
    """Join the parts in seq order, doing the checks that span ranges; raise EntryError for the
    first bad entry, exactly as the single loop would, or _Fallback. `hints`: the keys the
    workers checked signatures with (None: signatures not checked)."""
    keys = dict(trusted)
    since = dict.fromkeys(keys, -1)  # seq from which each actor's key holds
    used: list[_Part] = []
    head = GENESIS_HASH
    end_of_log: int | None = None  # set once a range ended before its stop
    for part in parts:
        if end_of_log is not None:
            if part.first_seq is not None:
                raise EntryError(end_of_log, f"missing; the next stored entry is {part.first_seq}")
            continue
        if part.first_seq is not None and part.prev != head:
            raise _Fallback("a row changed between two workers' reads")
        failure = _first([part.failure, _key_failure(part, keys, since)])
        bad_sig = part.bad_signature
        if hints is not None:
            _check_hints(part, hints, keys, failure, bad_sig)
        if bad_sig is not None and (failure is None or bad_sig[0] < failure[0]):
            raise EntryError(*bad_sig)
        if failure is not None:
            raise EntryError(*failure)
        used.append(part)
        head = part.last or head
        if part.stop is None or part.end < part.stop:
            end_of_log = part.end
    commitments: dict[tuple[int, str], str] = {}
    erased: set[tuple[int, str]] = set()
    for part in used:
        commitments.update(part.commitments)
        erased |= part.erased
    return _Stitched(
        size=used[-1].end if used else 0,
        head=head,
        keys=keys,
        levels=_tree_levels([p.levels for p in used]),
        commitments=commitments,
        erased=erased,
    )


def _check_hints(
    part: _Part,
    hints: Mapping[str, bytes],
    keys: Mapping[str, bytes],
    failure: tuple[int, str] | None,
    bad_sig: tuple[int, str] | None,
) -> None:
    """The single loop checks the signatures of entries before the first failure, each with
    its actor's registered key; the worker used the hinted key up to its first bad signature.
    Both agree if the keys agree for every actor signing in between."""
    bound = min(
        failure[0] if failure else float("inf"), bad_sig[0] + 1 if bad_sig else float("inf")
    )
    for (actor, _kid), seq in part.first_use.items():
        if seq < bound and hints.get(actor) != keys.get(actor):
            raise _Fallback(f"the hinted key of {actor!r} is not its registered key")


def _first(failures: Iterable[tuple[int, str] | None]) -> tuple[int, str] | None:
    found = [f for f in failures if f is not None]
    return min(found) if found else None


def _key_failure(
    part: _Part, keys: dict[str, bytes], since: dict[str, int]
) -> tuple[int, str] | None:
    """The part's first entry whose key does not check against keys registered before it
    (here or in earlier parts); extends keys and since with the part's registrations."""
    failure = None
    for seq, actor, key, kid_ok in part.registrations:
        if actor in keys and keys[actor] != key:
            failure = (seq, f"actor {actor!r} re-registered with a different key")
            break
        if not kid_ok:
            failure = (seq, "key id does not match the actor's registered key")
            break
        if actor not in keys:
            keys[actor], since[actor] = key, seq
    # An actor's key never changes once registered, so each (actor, key id) pair fails at its
    # first use or nowhere.
    for (actor, kid), seq in part.first_use.items():
        if failure is not None and seq > failure[0]:
            continue
        if since.get(actor, seq) >= seq:
            failure = _first([failure, (seq, f"actor {actor!r} signs before registering a key")])
        elif kid != _keys.key_id(actor, keys[actor]).hex():
            failure = _first([failure, (seq, "key id does not match the actor's registered key")])
    return failure


class _Packed(Sequence[bytes]):
    """Hashes packed end to end in one bytes object."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // merkle.HASH_SIZE

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]  # no slices
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = index * merkle.HASH_SIZE
        return self.data[i : i + merkle.HASH_SIZE]


def _tree_levels(parts: list[list[bytes]]) -> list[Sequence[bytes]]:
    """The whole tree's levels from the parts' packed levels: each part's nodes at level l
    are the tree's (its range starts at a multiple of 2**l), and the few levels above the
    parts' tops are built here."""
    if not parts or not parts[0]:
        return [[]]
    levels: list[Sequence[bytes]] = [
        _Packed(b"".join(p[level] for p in parts if p)) for level in range(len(parts[0]))
    ]
    top: Sequence[bytes] = list(levels[-1])
    while len(top) > 1:
        top = merkle._next_level(top)
        levels.append(top)
    return levels


# ---------------------------------------------------------------- signatures


def check_signatures(
    jobs: Sequence[tuple[int, bytes, str, bytes]], *, workers: int | None = None
) -> tuple[int, str] | None:
    """(seq, reason) of the first entry whose signature or canonical form fails, else None."""
    if workers is None:
        workers = os.cpu_count() or 1
    if workers <= 1 or len(jobs) < PARALLEL_MIN_SIGNATURES:
        return _check_chunk(jobs)
    size = -(-len(jobs) // (workers * 4))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    # fork: workers inherit the imported modules; verification runs from the CLI, not a server.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
        results = [r for r in pool.map(_check_chunk, chunks) if r is not None]
    return min(results) if results else None


def _check_chunk(jobs: Sequence[tuple[int, bytes, str, bytes]]) -> tuple[int, str] | None:
    verifiers: dict[bytes, object] = {}
    for seq, body, signature, public_key in jobs:
        reason = _signature_failure(body, signature, public_key, verifiers)
        if reason is not None:
            return seq, reason
    return None


def _signature_failure(
    body: bytes, signature: str, public_key: bytes, verifiers: dict[bytes, object]
) -> str | None:
    """Why one entry's canonical form or signature fails, else None."""
    try:
        if jcs.dumps(_loads(body)) != body:
            return "body is not in canonical (RFC 8785) form"
        pk = verifiers.get(public_key)
        if pk is None:
            pk = verifiers[public_key] = _keys.Ed25519PublicKey.from_public_bytes(public_key)
        sig = unb64(signature)
        if len(sig) != _keys.SIGNATURE_SIZE:
            return "signature is not 64 bytes"
        pk.verify(sig, body)  # type: ignore[attr-defined]
    except _keys.InvalidSignature:
        return "signature does not verify"
    except (ValueError, TypeError):
        return "signature is not valid base64"
    return None


# ---------------------------------------------------------------- erasable fields


def _check_payloads(
    payloads: Sequence[tuple] | None,
    commitments: Mapping[tuple[int, str], str],
    erased: set[tuple[int, str]],
) -> tuple[int, int]:
    if payloads is None:
        return 0, len(erased)
    errors: list[tuple[int, str]] = []
    seen = set()
    for seq, name, salt, value in payloads:
        seen.add((seq, name))
        expected = commitments.get((seq, name))
        if expected is None:
            errors.append((seq, f"stored personal field '{name}' has no commitment in the entry"))
            continue
        try:
            ok = commitment(bytes.fromhex(salt), name, value).hex() == expected
        except ValueError:
            ok = False
        if not ok:
            errors.append((seq, f"personal field '{name}' does not match its commitment"))
    for seq, name in commitments:
        if (seq, name) not in seen and (seq, name) not in erased:
            errors.append((seq, f"personal field '{name}' is gone but no erasure entry records it"))
    if errors:
        raise EntryError(*min(errors))
    return len(seen), len(erased)


# ---------------------------------------------------------------- checkpoints


def _check_checkpoints(
    n: int,
    roots_of: Callable[[Sequence[int]], list[bytes]],
    stored: Sequence[tuple],
    log: tuple[str, str] | None,
    pinned_vkey: str | None,
    pinned_notes: Sequence[str],
) -> tuple[int, int, str, bytes, list[tuple[note.Checkpoint, str]]]:
    """Returns (stored checkpoints verified, size of the latest, vkey used, root of the whole
    log, every verified checkpoint with its note: stored ones, then pinned ones)."""
    vkey = pinned_vkey or (log[1] if log else None)
    origin = log[0] if log and not pinned_vkey else None
    if (stored or pinned_notes) and not vkey:
        raise VerificationError("the ledger has checkpoints but no log key: pass --vkey")
    parsed: list[tuple[tuple, note.Checkpoint]] = []
    for row in stored:
        size = row[0]
        try:
            cp = note.verify_checkpoint(row[2], vkey, origin=origin)
        except VerificationError as exc:
            raise CheckpointError(size, str(exc)) from exc
        if origin is None:
            origin = cp.origin
        if cp.size != size or cp.root_hash.hex() != row[1]:
            raise CheckpointError(size, "stored size or root differs from the signed note")
        parsed.append((row, cp))
    external = []
    # A kept file may gain trailing blank lines or spaces in transit; the note ends in one "\n".
    pinned_notes = [text.rstrip() + "\n" for text in pinned_notes]
    for text in pinned_notes:
        try:
            external.append(note.verify_checkpoint(text, vkey))
        except VerificationError as exc:
            raise CheckpointError(-1, f"pinned checkpoint: {exc}") from exc
    for cp in [c for _, c in parsed] + external:
        if cp.size > n:
            raise EntryError(n, f"missing; the checkpoint at size {cp.size} covers it")
    sizes = [cp.size for _, cp in parsed] + [cp.size for cp in external]
    roots = roots_of([*sizes, n])
    full_root = roots[-1]
    for (_row, cp), root in zip(parsed, roots, strict=False):
        if cp.root_hash != root:
            raise CheckpointError(
                cp.size, f"its root does not match entries 0..{cp.size - 1}: history was rewritten"
            )
    for cp, root in zip(external, roots[len(parsed) :], strict=False):
        if cp.root_hash != root:
            raise CheckpointError(
                cp.size,
                "the pinned checkpoint's root does not match the "
                f"entries 0..{cp.size - 1}: history was rewritten",
            )
    previous: note.Checkpoint | None = None
    for row, cp in parsed:
        if previous is not None and previous.size > 0:
            try:
                proof = [bytes.fromhex(h) for h in json.loads(row[3] or "[]")]
                merkle.verify_consistency(
                    old_size=previous.size,
                    new_size=cp.size,
                    old_root=previous.root_hash,
                    new_root=cp.root_hash,
                    proof=proof,
                )
            except (VerificationError, LedgerError, ValueError, TypeError) as exc:
                raise CheckpointError(
                    cp.size,
                    f"not proven consistent with the checkpoint at size {previous.size}: {exc}",
                ) from exc
        previous = cp
    verified = [(cp, row[2]) for row, cp in parsed] + list(zip(external, pinned_notes, strict=True))
    latest = parsed[-1][1].size if parsed else 0
    return len(parsed), latest, vkey or "", full_root, verified


def _check_covered(n: int, verified: Sequence[tuple[note.Checkpoint, str]]) -> None:
    """A pinned log key vouches for the log only through a checkpoint covering all of it."""
    if not verified:
        raise VerificationError(
            f"no checkpoint signed by the pinned log key: nothing vouches for these {n} entries"
        )
    covered = max(cp.size for cp, _ in verified)
    if covered < n:
        raise VerificationError(
            f"entries {covered}..{n - 1} are not covered by a checkpoint signed by the pinned "
            "log key (one is signed at every round commit and job end; `medfed ledger "
            "checkpoint` signs one now)"
        )


def _check_cosignatures(
    stored: Sequence[tuple[int, str, str]],
    verified: Sequence[tuple[note.Checkpoint, str]],
    pins: Pins,
) -> dict[int, set[str]]:
    """Every stored cosignature, and those in pinned notes, checked against the enrolled
    witnesses; returns checkpoint size -> the witnesses whose cosignature verifies. Without a
    roster there are no witness keys to check with: nothing is counted."""
    if pins.roster is None:
        return {}
    witnesses = pins.roster.witnesses
    bodies = {cp.size: note.format_checkpoint(cp) for cp, _ in verified}
    cosigned: dict[int, set[str]] = {}
    for size, witness, line in stored:
        body = bodies.get(size)
        if body is None:
            raise CheckpointError(size, f"{witness!r} cosigned a checkpoint that is not stored")
        key = witnesses.get(witness)
        if key is None:
            raise CheckpointError(size, f"cosigned by {witness!r}, who is not an enrolled witness")
        try:
            c = cosignature.parse_signature_line(line)
            if c.name != witness:
                raise VerificationError(f"the line is signed as {c.name!r}")
            cosignature.verify_cosignature(body, c, name=witness, public_key=key)
        except VerificationError as exc:
            raise CheckpointError(
                size, f"the cosignature by {witness!r} does not verify: {exc}"
            ) from exc
        cosigned.setdefault(size, set()).add(witness)
    for cp, text in verified[len(verified) - len(pins.checkpoints) :]:
        try:
            names = cosignature.verify_cosigned(text, witnesses=witnesses)
        except VerificationError as exc:
            raise CheckpointError(cp.size, f"pinned checkpoint: {exc}") from exc
        cosigned.setdefault(cp.size, set()).update(names)
    return cosigned


def _check_actor_table(table: Sequence[tuple[str, str]] | None, keys: Mapping[str, bytes]) -> None:
    """The actor table is a cache of the chain's registrations: it must agree with them (a
    tampered row would otherwise block appends while the log verifies)."""
    for name, hex_key in table or ():
        if name not in keys:
            raise VerificationError(
                f"the actor table names {name!r}, for whom the chain holds no registered key"
            )
        if keys[name].hex() != hex_key:
            raise VerificationError(
                f"the actor table's key for {name!r} is not the one in its signed registration"
            )


# ---------------------------------------------------------------- bundles

BUNDLE_FORMAT = "medfed-ledger-bundle/1"


def write_bundle(ledger: Ledger, path: Path) -> dict[str, int]:
    """Entries, checkpoints with their consistency proofs, the log's vkey and the actors'
    public keys, as one JSON file (written atomically). Personal fields are not included:
    only their commitments, inside the signed bodies."""
    entries = [list(r[:4]) for r in ledger.raw_rows()]
    cosigs = ledger.cosignatures()
    log = ledger.log_identity()
    keys_: dict[str, str] = {}
    for seq, body, _h, _s in entries:
        fields = json.loads(body)
        if fields.get("action") == str(Action.REGISTER_KEY):
            keys_.setdefault(fields["actor"], fields["details"]["public_key"])
        del seq
    bundle = {
        "format": BUNDLE_FORMAT,
        "origin": log[0] if log else None,
        "vkey": log[1] if log else None,
        "public_keys": keys_,
        "checkpoints": [
            {
                "size": s,
                "root_hash": r,
                "note": t,
                "consistency_proof": json.loads(p or "[]"),
                "cosignatures": {w: line for size, w, line in cosigs if size == s},
            }
            for s, r, t, p in ledger.checkpoints()
        ],
        "entries": entries,
    }
    _atomic_write_text(path, json.dumps(bundle, separators=(",", ":")))
    return {"entries": len(entries), "checkpoints": len(bundle["checkpoints"])}


def read_bundle(path: Path) -> Source:
    from ledger.store import UnreadableError

    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise UnreadableError(f"bundle {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise UnreadableError(f"bundle {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise UnreadableError(f"{path} is not a {BUNDLE_FORMAT} file")
    try:
        rows = [(int(s), str(b), str(h), str(g)) for s, b, h, g in data["entries"]]
        cps = [
            (
                int(c["size"]),
                str(c["root_hash"]),
                str(c["note"]),
                json.dumps(c["consistency_proof"]),
            )
            for c in data["checkpoints"]
        ]
        public = {str(k): str(v) for k, v in data.get("public_keys", {}).items()}
        cosigs = [
            (int(c["size"]), str(w), str(line))
            for c in data["checkpoints"]
            for w, line in c.get("cosignatures", {}).items()
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UnreadableError(f"bundle {path} is malformed: {exc}") from exc
    log = (data["origin"], data["vkey"]) if data.get("vkey") else None
    return Source(
        rows=rows,
        checkpoints=cps,
        log=log,
        payloads=None,
        columns=False,
        public_keys=public,
        cosignatures=cosigs,
    )


def verify_bundle(path: Path, **kwargs: object) -> Report:
    return verify_source(read_bundle(path), **kwargs)  # type: ignore[arg-type]


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
