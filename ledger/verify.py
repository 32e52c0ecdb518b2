"""Recompute a whole ledger: chain, entry hashes, signatures, indexed columns, erasable-field
commitments, Merkle roots and every checkpoint (signature, root, consistency with the last).

The keys that entry signatures are checked against come from the chain's own `register_key`
entries (self-signed, and themselves chained), never from the mutable actor table; a caller
may pin keys it trusts from elsewhere with `trusted_keys`. The checkpoint key is the vkey the
caller pins, else the one the ledger stores.

Works on a database (`verify_ledger`) or on an exported bundle (`verify_bundle`, no database).
Rows stream through one tight loop (no ORM); signatures, the slow part, are checked in worker
processes when there are many.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from ledger import LedgerError, VerificationError, jcs, merkle, note
from ledger import keys as _keys
from ledger.entry import GENESIS_HASH, LEAF_PREFIX, Action, commitment, unb64
from ledger.schema import INDEXED_FIELDS
from ledger.store import Ledger, open_ledger

try:  # orjson parses a ledger body ~4x faster than json; same result for valid JSON.
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

PARALLEL_MIN_SIGNATURES = 4000


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


def verify_ledger(
    url: str,
    *,
    vkey: str | None = None,
    trusted_keys: Mapping[str, bytes] | None = None,
    pinned_checkpoints: Sequence[str] = (),
    signatures: bool = True,
    workers: int | None = None,
) -> Report:
    """Verify the ledger at `url` (which must exist); raise EntryError / CheckpointError."""
    ledger = open_ledger(url)
    return verify_source(
        source_of(ledger),
        vkey=vkey,
        trusted_keys=trusted_keys,
        pinned_checkpoints=pinned_checkpoints,
        signatures=signatures,
        workers=workers,
    )


def source_of(ledger: Ledger) -> Source:
    return Source(
        rows=ledger.raw_rows(),
        checkpoints=ledger.checkpoints(),
        log=ledger.log_identity(),
        payloads=ledger.payloads(),
    )


def verify_source(
    source: Source,
    *,
    vkey: str | None = None,
    trusted_keys: Mapping[str, bytes] | None = None,
    pinned_checkpoints: Sequence[str] = (),
    signatures: bool = True,
    workers: int | None = None,
) -> Report:
    keys: dict[str, bytes] = dict(trusted_keys or {})
    key_ids: dict[tuple[str, bytes], str] = {}
    hashes: list[bytes] = []
    sig_jobs: list[tuple[int, bytes, str, bytes]] = []
    commitments: dict[tuple[int, str], str] = {}
    erased: set[tuple[int, str]] = set()
    failure: tuple[int, str] | None = None
    prev_hex = GENESIS_HASH.hex()
    sha256 = hashlib.sha256
    columns = source.columns
    register = str(Action.REGISTER_KEY)
    erase = str(Action.ERASE)

    for row in source.rows:
        seq = row[0]
        n = len(hashes)
        if seq != n:
            failure = (n, f"missing; the next stored entry is {seq}")
            break
        body = row[1].encode() if isinstance(row[1], str) else bytes(row[1])
        digest = sha256(LEAF_PREFIX + body).digest()
        if digest.hex() != row[2]:
            failure = (seq, "entry hash does not match its body")
            break
        try:
            fields = _loads(body)
        except ValueError:
            failure = (seq, "body is not JSON")
            break
        if type(fields) is not dict or fields.get("seq") != seq:
            failure = (seq, "body does not state its own sequence number")
            break
        if fields.get("prev") != prev_hex:
            failure = (seq, "hash chain broken: prev does not match the previous entry")
            break
        if columns and tuple(row[4:11]) != tuple(map(fields.get, INDEXED_FIELDS)):
            bad = next(n for i, n in enumerate(INDEXED_FIELDS, 4) if row[i] != fields.get(n))
            failure = (seq, f"column '{bad}' differs from the signed body")
            break
        actor = fields.get("actor")
        public_key = keys.get(actor) if fields.get("action") != register else None
        if public_key is None:
            try:
                public_key = _key_for(fields, keys, register)
            except (VerificationError, KeyError, TypeError, ValueError) as exc:
                failure = (seq, str(exc) or "malformed register_key entry")
                break
        kid = key_ids.get((actor, public_key))
        if kid is None:
            kid = key_ids[(actor, public_key)] = _keys.key_id(str(actor), public_key).hex()
        if fields.get("key_id") != kid:
            failure = (seq, "key id does not match the actor's registered key")
            break
        keys.setdefault(actor, public_key)
        if signatures:
            sig_jobs.append((seq, body, row[3], public_key))
        if fields.get("commitments"):
            for name, value in fields["commitments"].items():
                commitments[(seq, name)] = value
        if fields.get("action") == erase:
            for item in (fields.get("details") or {}).get("erased", []):
                erased.add((item.get("seq"), item.get("field")))
        hashes.append(digest)
        prev_hex = digest.hex()

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
    present, erased_count = _check_payloads(source.payloads, commitments, erased)
    cp_count, cp_size, used_vkey, full_root = _check_checkpoints(
        hashes, source.checkpoints, source.log, vkey, pinned_checkpoints
    )
    return Report(
        entries=len(hashes),
        head=prev_hex,
        actors=tuple(sorted(keys)),
        root=full_root.hex(),
        checkpoints=cp_count,
        checkpoint_size=cp_size,
        vkey=used_vkey,
        signatures=signatures,
        personal_fields=present,
        erased_fields=erased_count,
    )


def _key_for(fields: dict, keys: Mapping[str, bytes], register: str) -> bytes:
    actor = fields.get("actor")
    if fields.get("action") == register:
        claimed = bytes.fromhex(fields["details"]["public_key"])
        if len(claimed) != _keys.PUBLIC_KEY_SIZE:
            raise VerificationError("registered public key is not 32 bytes")
        if actor in keys and keys[actor] != claimed:
            raise VerificationError(f"actor {actor!r} re-registered with a different key")
        return claimed
    if actor not in keys:
        raise VerificationError(f"actor {actor!r} signs before registering a key")
    return keys[actor]


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
        try:
            if jcs.dumps(_loads(body)) != body:
                return seq, "body is not in canonical (RFC 8785) form"
            pk = verifiers.get(public_key)
            if pk is None:
                pk = verifiers[public_key] = _keys.Ed25519PublicKey.from_public_bytes(public_key)
            sig = unb64(signature)
            if len(sig) != _keys.SIGNATURE_SIZE:
                return seq, "signature is not 64 bytes"
            pk.verify(sig, body)  # type: ignore[attr-defined]
        except _keys.InvalidSignature:
            return seq, "signature does not verify"
        except (ValueError, TypeError):
            return seq, "signature is not valid base64"
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
    hashes: list[bytes],
    stored: Sequence[tuple],
    log: tuple[str, str] | None,
    pinned_vkey: str | None,
    pinned_notes: Sequence[str],
) -> tuple[int, int, str, bytes]:
    n = len(hashes)
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
    for text in pinned_notes:
        try:
            external.append(note.verify_checkpoint(text, vkey))
        except VerificationError as exc:
            raise CheckpointError(-1, f"pinned checkpoint: {exc}") from exc
    for cp in [c for _, c in parsed] + external:
        if cp.size > n:
            raise EntryError(n, f"missing; the checkpoint at size {cp.size} covers it")
    sizes = [cp.size for _, cp in parsed] + [cp.size for cp in external]
    roots = merkle.prefix_roots(hashes, [*sizes, n])
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
    return len(parsed), (parsed[-1][1].size if parsed else 0), vkey or "", full_root


# ---------------------------------------------------------------- bundles

BUNDLE_FORMAT = "medfed-ledger-bundle/1"


def write_bundle(ledger: Ledger, path: Path) -> dict[str, int]:
    """Entries, checkpoints with their consistency proofs, the log's vkey and the actors'
    public keys, as one JSON file (written atomically). Personal fields are not included:
    only their commitments, inside the signed bodies."""
    entries = [list(r[:4]) for r in ledger.raw_rows()]
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
            {"size": s, "root_hash": r, "note": t, "consistency_proof": json.loads(p or "[]")}
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
    except (KeyError, TypeError, ValueError) as exc:
        raise UnreadableError(f"bundle {path} is malformed: {exc}") from exc
    log = (data["origin"], data["vkey"]) if data.get("vkey") else None
    return Source(
        rows=rows, checkpoints=cps, log=log, payloads=None, columns=False, public_keys=public
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
