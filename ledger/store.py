"""Persistence of the ledger on SQLite (WAL) or PostgreSQL.

Appends are serialized by the database itself (SQLite `BEGIN IMMEDIATE`, a PostgreSQL
transaction-scoped advisory lock), so any number of threads and processes can append and the
chain stays linear. Every append is one transaction: a crash leaves the entry whole or absent.
Appends go through SQLAlchemy Core (no ORM objects): one tail read, one `IN` query for the
idempotency keys of a batch, one multi-row insert.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool, QueuePool
from sqlmodel import SQLModel

from ledger import LedgerError, VerificationError, merkle, note
from ledger import keys as _keys
from ledger.entry import (
    GENESIS_HASH,
    Action,
    Event,
    SealedEntry,
    b64,
    leaf_hash,
    seal,
    unb64,
    utc_now,
)
from ledger.identities import Judgement, Roster
from ledger.schema import (
    ACTOR_KEY_INDEX,
    INDEXED_FIELDS,
    ActorRow,
    CheckpointRow,
    CosignatureRow,
    EntryRow,
    LogRow,
    PayloadRow,
)

# Any constant works; it only has to be the same for every medfed process.
_PG_APPEND_LOCK = 0x6D656466  # "medf"
_IN_CHUNK = 500

E = EntryRow.__table__
A = ActorRow.__table__
C = CheckpointRow.__table__
L = LogRow.__table__
P = PayloadRow.__table__
W = CosignatureRow.__table__
_TABLES = [E, A, C, L, P, W]
# What a database must hold to be read as a ledger (cosignatures came later: optional).
_REQUIRED = {t.name for t in (E, A, C, L, P)}
log = logging.getLogger("medfed.ledger")
_RAW_COLUMNS = ", ".join(("seq", "body", "entry_hash", "signature", *INDEXED_FIELDS))


class UnreadableError(LedgerError):
    """The ledger (file, database, bundle) cannot be opened or read: bad input, not a bad log."""


@dataclass(frozen=True, kw_only=True)
class Appended:
    seq: int
    entry_hash: str
    created: bool  # False when the idempotency key was already present


def one_line(exc: BaseException) -> str:
    """SQLAlchemy and driver errors span lines and carry SQL; keep the first line of the cause."""
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).strip().splitlines() or [cause.__class__.__name__])[0]
    return first.rstrip(".")


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite URL, or None for in-memory / non-sqlite URLs."""
    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except (ArgumentError, ValueError) as exc:
        raise UnreadableError(f"ledger URL {url!r} is not a valid URL") from exc
    if not database or database == ":memory:":
        return None
    return Path(database)


def open_ledger(url: str, *, write: bool = False, roster: Roster | None = None) -> Ledger:
    """An EXISTING ledger. Readers (verify, queries, proofs) get a read-only connection that
    never creates a file, a table or a row; `write` is for commands that append to a ledger
    that must already exist (erase, a checkpoint on demand). A database without the ledger's
    tables is unreadable, not an empty ledger."""
    engine = _readonly_engine(url)
    try:
        tables = _ledger_tables(engine, url)
    finally:
        if write:
            engine.dispose()
    if write:
        return Ledger(url, roster=roster)
    return Ledger(url, engine=engine, roster=roster, tables=tables)


def _ledger_tables(engine: Engine, url: str) -> set[str]:
    try:
        names = set(inspect(engine).get_table_names())
    except (SQLAlchemyError, sqlite3.Error) as exc:
        raise UnreadableError(f"cannot open ledger {shown_url(url)}: {one_line(exc)}") from exc
    if not _REQUIRED <= names:
        raise UnreadableError(f"{shown_url(url)} holds no medfed ledger (its tables are missing)")
    return names


def _readonly_engine(url: str, **kwargs: Any) -> Engine:
    """An engine that cannot write: SQLite opened with mode=ro (no file or table created),
    PostgreSQL sessions whose transactions are READ ONLY."""
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is None:
            raise UnreadableError(f"ledger URL {shown_url(url)} names no database file")
        if not path.is_file():
            raise UnreadableError(f"ledger file {path} does not exist")
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)

        kwargs.setdefault("poolclass", QueuePool)
        return create_engine("sqlite://", creator=connect, **kwargs)
    engine = _new_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_conn, _record):  # noqa: ANN001
        with dbapi_conn.cursor() as cur:
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        dbapi_conn.commit()

    return engine


def shown_url(url: str) -> str:
    """A URL fit for a message: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return repr(url)


# Every engine made in this process, for the fork hook; engine_for's cache stays bounded
# (an evicted engine is collected and its connections closed, as PostgreSQL needs).
_made: weakref.WeakSet[Engine] = weakref.WeakSet()


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    """One engine per URL per process; tables created on first use."""
    try:
        engine = _new_engine(url)
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Concurrent CREATE TABLE races on PostgreSQL's catalog; take the append lock.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_APPEND_LOCK})
            SQLModel.metadata.create_all(conn, tables=_TABLES)
            _upgrade(conn)
    except (SQLAlchemyError, ArgumentError) as exc:
        raise UnreadableError(f"cannot open ledger {shown_url(url)}: {one_line(exc)}") from exc
    _made.add(engine)
    return engine


def _fresh_pools_after_fork() -> None:
    """A forked child must not use its parent's pooled connections (one socket, two
    processes: transactions interleave). SQLAlchemy's recipe: new pools, the inherited
    connections left alone (not closed under the parent)."""
    for engine in list(_made):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_fresh_pools_after_fork)


def _new_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 60, "check_same_thread": False}, **kwargs
        )
        _sqlite_serialized_writes(engine)
        return engine
    if url.startswith("postgresql"):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        try:
            return create_engine(url, pool_pre_ping=True, **kwargs)
        except (ArgumentError, ValueError) as exc:
            raise UnreadableError(f"ledger URL {shown_url(url)} is not a valid URL") from exc
    raise UnreadableError(f"ledger URL {shown_url(url)} is neither sqlite:/// nor postgresql://")


def forked_reader(url: str) -> Ledger:
    """A read-only Ledger in a forked worker process, on its own unpooled engine: the
    parent's pooled connections (inherited, shared sockets and SQLite lock state) stay
    untouched. The tables must exist already."""
    try:
        return Ledger(url, engine=_readonly_engine(url, poolclass=NullPool))
    except (SQLAlchemyError, ArgumentError) as exc:
        raise UnreadableError(f"cannot open ledger {url}: {one_line(exc)}") from exc


def _upgrade(conn: Connection) -> None:
    """Ledgers made before checkpoints stored consistency proofs lack that column; ledgers
    made before idempotency keys were per actor have a unique index on the key alone."""
    inspector = inspect(conn)
    names = {c["name"] for c in inspector.get_columns(C.name)}
    if "consistency_proof" not in names:
        conn.execute(
            text(f"ALTER TABLE {C.name} ADD COLUMN consistency_proof VARCHAR NOT NULL DEFAULT '[]'")
        )
    indexes = {ix["name"]: ix for ix in inspector.get_indexes(E.name)}
    if ACTOR_KEY_INDEX not in indexes:
        old = "ix_ledger_entry_idempotency_key"
        if old in indexes:
            conn.execute(text(f"DROP INDEX {old}"))
        for index in E.indexes:
            if index.name in (old, ACTOR_KEY_INDEX):
                index.create(conn)


def _switch_to_wal(cur: sqlite3.Cursor, patience_s: float = 60.0) -> None:
    """Switching a ledger to WAL needs a moment of exclusive access, and SQLite answers
    "database is locked" at once, without its busy handler, when several processes open
    one new ledger together (CI saw it with eight). The mode persists, so retry briefly."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02 + 0.08 * random.random())


def _sqlite_serialized_writes(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")
        _switch_to_wal(cur)
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        # Take the write lock before reading the chain's tail.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Ledger:
    """The append-only, hash-chained, signed event log at `url`.

    With a `roster` (the federation's enrolled identities), this Ledger writes only entries
    their signer may write, and its reads (`events`, `screened`) keep only entries an
    enrolled actor wrote within its role: others are counted in `ignored` and skipped; an
    entry that names an enrolled actor but is not its signature raises VerificationError."""

    def __init__(
        self,
        url: str,
        *,
        engine: Engine | None = None,
        roster: Roster | None = None,
        tables: set[str] | None = None,
    ) -> None:
        self.url = url
        self.engine = engine or engine_for(url)
        self.roster = roster
        self.ignored: Counter[str] = Counter()  # actor -> entries skipped by the roster
        self._tables = tables

    def view(self, roster: Roster | None = None) -> Ledger:
        """Another reader over this one's engine (and connection pool), with its own roster
        and its own count of ignored entries: what a long-running server hands each request."""
        return Ledger(self.url, engine=self.engine, roster=roster, tables=self._tables)

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _write_txn(self) -> Iterator[Connection]:
        """One transaction holding the ledger's write lock."""
        try:
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_APPEND_LOCK})
                yield conn
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed: {one_line(exc)}") from exc

    def append(self, event_: Event, signer: _keys.Identity) -> Appended:
        return self.append_many([(event_, signer)])[0]

    def append_many(self, items: Sequence[tuple[Event, _keys.Identity]]) -> list[Appended]:
        """Append events in one transaction; an event whose idempotency key exists is a no-op.

        Every entry is signed by its own actor; a signer not yet known gets a self-signed
        `register_key` entry in the chain just before its first event."""
        if not items:
            return []
        with self._write_txn() as conn:
            return self._append(conn, items)

    def append_decided(
        self, decide: Callable[[Callable[..., list[dict]]], Sequence[tuple[Event, _keys.Identity]]]
    ) -> list[Appended]:
        """Read, decide and append as ONE transaction under the write lock: `decide` gets a
        reader (`events`, screened by the roster) of the ledger as no other writer can change
        it until this commits, and returns what to append. A check and what it grants (a
        privacy budget and its reservation) are thereby atomic across threads, processes and
        machines on SQLite and PostgreSQL alike."""
        with self._write_txn() as conn:

            def read(**where: object) -> list[dict]:
                query = select(E.c.seq, E.c.body, E.c.signature).order_by(E.c.seq)
                for column, value in where.items():
                    query = query.where(E.c[column] == value)
                return list(self._screen(tuple(r) for r in conn.execute(query)))

            return self._append(conn, decide(read))

    def _append(
        self, conn: Connection, items: Sequence[tuple[Event, _keys.Identity]]
    ) -> list[Appended]:
        """append_many inside a transaction that holds the write lock."""
        results: list[Appended] = []
        tail = conn.execute(
            select(E.c.seq, E.c.entry_hash).order_by(E.c.seq.desc()).limit(1)
        ).first()
        seq = tail.seq + 1 if tail else 0
        prev = bytes.fromhex(tail.entry_hash) if tail else GENESIS_HASH
        # Idempotency keys are per actor: an entry someone else wrote under a key never
        # makes this actor's step look done.
        existing: dict[tuple[str, str], tuple[int, str]] = {}
        wanted = sorted({ev.idempotency_key for ev, _ in items})
        for i in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[i : i + _IN_CHUNK]
            for key, s, h, actor, body, sig in conn.execute(
                select(
                    E.c.idempotency_key,
                    E.c.seq,
                    E.c.entry_hash,
                    E.c.actor,
                    E.c.body,
                    E.c.signature,
                ).where(E.c.idempotency_key.in_(chunk))
            ):
                owner = self._owner(s, key, actor, body, sig)
                if owner is not None:
                    existing[(key, owner)] = (s, h)
        names = sorted({signer.name for _, signer in items})
        actors = dict(
            conn.execute(select(A.c.name, A.c.public_key).where(A.c.name.in_(names))).all()
        )
        entry_rows: list[dict[str, Any]] = []
        payload_rows: list[dict[str, Any]] = []
        actor_rows: list[dict[str, Any]] = []

        def add(ev: Event, signer: _keys.Identity) -> SealedEntry:
            nonlocal seq, prev
            recorded = utc_now()
            sealed = seal(ev, signer, seq=seq, prev_hash=prev, recorded=recorded)
            if self.roster is not None:
                reason = self.roster.refusal(json.loads(sealed.body))
                if reason is not None:
                    raise LedgerError(f"refusing to write a '{ev.action}' entry: {reason}")
            entry_rows.append(_row(sealed, ev, recorded))
            payload_rows.extend(
                {
                    "seq": seq,
                    "field": p.field,
                    "subject": p.subject,
                    "salt": p.salt.hex(),
                    "value": p.value,
                }
                for p in sealed.payloads
            )
            existing[(ev.idempotency_key, ev.actor)] = (seq, sealed.entry_hash.hex())
            seq, prev = seq + 1, sealed.entry_hash
            return sealed

        for ev, signer in items:
            if (ev.idempotency_key, ev.actor) in existing:
                s, h = existing[(ev.idempotency_key, ev.actor)]
                results.append(Appended(seq=s, entry_hash=h, created=False))
                continue
            public_hex = signer.public_key.hex()
            known = actors.get(signer.name)
            if known is None:
                actors[signer.name] = public_hex
                actor_rows.append(
                    {
                        "name": signer.name,
                        "public_key": public_hex,
                        "key_id": signer.key_id.hex(),
                    }
                )
                add(registration(signer, ev.job), signer)
            elif known != public_hex:
                raise LedgerError(
                    f"actor {signer.name!r} is registered with a different key on this "
                    "ledger (or its actor table was altered: run `medfed ledger verify`)"
                )
            sealed = add(ev, signer)
            results.append(
                Appended(seq=sealed.seq, entry_hash=sealed.entry_hash.hex(), created=True)
            )
        if actor_rows:
            conn.execute(insert(A), actor_rows)
        if entry_rows:
            conn.execute(insert(E), entry_rows)
        if payload_rows:
            conn.execute(insert(P), payload_rows)
        return results

    def _owner(self, seq: int, key: str, actor: str, body: str, signature: str) -> str | None:
        """Whose step an entry already stored under an idempotency key records: its actor
        column, or with a roster the enrolled actor that signed it (None: nobody's, so it
        stands in for no one's step). An entry naming an enrolled actor that did not sign it
        would make that actor's step look done: it raises."""
        if self.roster is None:
            return actor
        fields = json.loads(body)
        verdict = self.roster.judge(fields, body.encode(), signature)
        if verdict.judgement == Judgement.FORGED:
            raise VerificationError(
                f"entry {seq}, stored under the idempotency key {key!r}, does not verify: "
                f"{verdict.reason} (run `medfed ledger verify`)"
            )
        return fields["actor"] if verdict.judgement == Judgement.ADMIT else None

    def checkpoint(
        self,
        signer: _keys.Identity,
        origin: str,
        *,
        recorded: str | None = None,
        last_signed: str | None = None,
    ) -> str:
        """Sign a C2SP checkpoint of the whole log and store it; return the signed note.

        The root is recomputed from the entry bodies (not the stored hash column), and the new
        tree is proven consistent with the previous stored checkpoint (whose signature is
        checked with this log's key) before anything is signed. `last_signed` is the
        checkpoint this key signed last, as its holder kept it outside the database: the log
        must still extend it, so a truncated or rewritten log is never signed again. A log
        has one origin and one key; a second key or origin is refused. When nothing was
        appended since the last checkpoint, that checkpoint is returned unchanged."""
        vkey = note.format_vkey(signer)
        with self._write_txn() as conn:
            log = conn.execute(select(L.c.origin, L.c.vkey)).first()
            if log is None:
                conn.execute(insert(L), [{"origin": origin, "vkey": vkey}])
            elif (log.origin, log.vkey) != (origin, vkey):
                raise LedgerError(
                    f"this ledger's checkpoints are signed as {log.vkey} for origin "
                    f"{log.origin!r}; refusing to sign with another key or origin"
                )
            hashes = []
            for s, body, stored in conn.execute(
                select(E.c.seq, E.c.body, E.c.entry_hash).order_by(E.c.seq)
            ):
                h = leaf_hash(body.encode())
                if s != len(hashes) or h.hex() != stored:
                    raise VerificationError(
                        f"entry {len(hashes)} does not verify: refusing to sign a checkpoint "
                        "over a broken log (run `medfed ledger verify`)"
                    )
                hashes.append(h)
            if last_signed is not None:
                _check_extends(hashes, note.verify_checkpoint(last_signed, vkey, origin=origin))
            last = conn.execute(
                select(C.c.size, C.c.note).order_by(C.c.size.desc()).limit(1)
            ).first()
            proof: list[bytes] = []
            if last is not None:
                previous = note.verify_checkpoint(last.note, vkey, origin=origin)
                if previous.size > len(hashes):
                    raise VerificationError(
                        f"the last checkpoint covers {previous.size} entries but the log has "
                        f"{len(hashes)}: entry {len(hashes)} is missing"
                    )
                if previous.size == len(hashes):
                    if previous.root_hash != merkle.root(hashes):
                        raise VerificationError("the log no longer matches its last checkpoint")
                    return last.note
                new_root = merkle.root(hashes)
                if previous.size > 0:
                    proof = merkle.consistency_proof(hashes, previous.size)
                    merkle.verify_consistency(
                        old_size=previous.size,
                        new_size=len(hashes),
                        old_root=previous.root_hash,
                        new_root=new_root,
                        proof=proof,
                    )
            else:
                new_root = merkle.root(hashes)
            body = note.format_checkpoint(
                note.Checkpoint(origin=origin, size=len(hashes), root_hash=new_root)
            )
            signed = note.sign_note(body, signer)
            conn.execute(
                insert(C),
                [
                    {
                        "size": len(hashes),
                        "root_hash": new_root.hex(),
                        "note": signed,
                        "recorded": recorded or utc_now(),
                        "consistency_proof": json.dumps([p.hex() for p in proof]),
                    }
                ],
            )
        return signed

    def erase(
        self, subject: str, signer: _keys.Identity, *, reason: str, job: str = "erasure"
    ) -> tuple[Appended | None, int]:
        """Destroy the salts and values of `subject`'s personal fields and record the erasure.

        The erasure entry lists (seq, field) pairs, never the subject; it is written in the
        same transaction that destroys them. Returns the entry (None when the subject has
        nothing left to erase) and the number of fields destroyed."""
        with self._write_txn() as conn:
            found = conn.execute(
                select(P.c.seq, P.c.field)
                .where(P.c.subject == subject)
                .order_by(P.c.seq, P.c.field)
            ).all()
            if not found:
                return None, 0
            erased = [{"seq": s, "field": f} for s, f in found]
            event_ = Event(
                actor=signer.name,
                action=Action.ERASE,
                job=job,
                idempotency_key="erase/" + leaf_hash(json.dumps(erased).encode()).hex(),
                legal_basis="GDPR Art. 17",
                purpose="PATRQT",  # HL7 PurposeOfUse: patient requested
                details={"erased": erased, "reason": reason},
            )
            # One transaction: the fields are gone only if the signed erasure is written
            # (a signer the roster refuses erases nothing).
            conn.execute(P.delete().where(P.c.subject == subject))
            (appended,) = self._append(conn, [(event_, signer)])
        return appended, len(found)

    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        """Keep a witness's cosignature of the stored checkpoint at `size` (once per witness
        and size: the first one stays)."""
        with self._write_txn() as conn:
            if conn.execute(select(C.c.size).where(C.c.size == size)).first() is None:
                raise LedgerError(f"there is no stored checkpoint at size {size} to cosign")
            held = conn.execute(
                select(W.c.line).where(W.c.size == size, W.c.witness == witness)
            ).first()
            if held is None:
                conn.execute(
                    insert(W),
                    [{"size": size, "witness": witness, "line": line, "recorded": utc_now()}],
                )

    # ------------------------------------------------------------------ reading

    def _read(self, query: Any) -> list[Any]:
        try:
            with self.engine.connect() as conn:
                return conn.execute(query).all()
        except SQLAlchemyError as exc:
            raise UnreadableError(f"cannot read ledger {self.url}: {one_line(exc)}") from exc

    def size(self) -> int:
        return self._read(select(func.count()).select_from(E))[0][0]

    def last_seq(self) -> int | None:
        """The highest stored seq (None when empty): an index lookup, unlike size()."""
        return self._read(select(func.max(E.c.seq)))[0][0]

    def raw_rows(
        self,
        *,
        batch: int = 20000,
        start: int | None = None,
        stop: int | None = None,
        signatures: bool = True,
    ) -> Iterator[tuple]:
        """(seq, body, entry_hash, signature, *INDEXED_FIELDS) for start <= seq < stop (None:
        unbounded) in seq order, as plain tuples, streamed in keyset-paginated batches, each
        read in its own short transaction. signatures=False reads '' for each signature.

        Read through the DBAPI cursor: building SQLAlchemy Row objects costs about as much as
        the database read itself, and verification reads every row."""
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        columns = (
            _RAW_COLUMNS if signatures else _RAW_COLUMNS.replace("signature", "'' AS signature")
        )
        errors = (SQLAlchemyError, self.engine.dialect.loaded_dbapi.Error)
        try:
            conn = self.engine.raw_connection()
            try:
                cursor = conn.cursor()
                low = (">=", start)
                while True:
                    bounds = [(f"seq {low[0]} {mark}", low[1]), (f"seq < {mark}", stop)]
                    bounds = [(sql, value) for sql, value in bounds if value is not None]
                    where = (" WHERE " + " AND ".join(sql for sql, _ in bounds)) if bounds else ""
                    cursor.execute(
                        f"SELECT {columns} FROM {E.name}{where} ORDER BY seq LIMIT {batch:d}",
                        tuple(value for _, value in bounds),
                    )
                    chunk = cursor.fetchall()
                    conn.rollback()  # end the read transaction (PostgreSQL; no-op on SQLite)
                    if not chunk:
                        return
                    yield from chunk
                    low = (">", chunk[-1][0])
            finally:
                conn.close()
        except errors as exc:
            raise UnreadableError(f"cannot read ledger {self.url}: {one_line(exc)}") from exc

    def rows(self, *, batch: int = 5000) -> Iterator[EntryRow]:
        """Every entry as an EntryRow, in sequence order (kept for callers of the ORM view)."""
        for r in self.raw_rows(batch=batch):
            yield EntryRow(
                seq=r[0],
                body=r[1],
                entry_hash=r[2],
                signature=r[3],
                idempotency_key=r[4],
                actor=r[5],
                action=r[6],
                job=r[7],
                round=r[8],
                site=r[9],
                recorded=r[10],
            )

    def events(self, **where: object) -> list[dict]:
        """Entry bodies matching indexed columns, e.g. events(site="st-mary", action="train");
        with a roster, only those its enrolled actors wrote within their roles."""
        query = select(E.c.seq, E.c.body, E.c.signature).order_by(E.c.seq)
        for column, value in where.items():
            query = query.where(E.c[column] == value)
        return list(self._screen((r[0], r[1], r[2]) for r in self._read(query)))

    def screened(self) -> Iterator[dict]:
        """Every entry's body (with its `entry_hash`) in seq order, screened by the roster as
        `events` is, streamed."""
        for row in self.raw_rows():
            for fields in self._screen([(row[0], row[1], row[3])]):
                fields["entry_hash"] = row[2]
                yield fields

    def _screen(self, rows: Iterator[tuple[int, str, str]] | list) -> Iterator[dict]:
        for seq, body, signature in rows:
            fields = json.loads(body)
            if self.roster is None:
                yield fields
                continue
            verdict = self.roster.judge(fields, body.encode(), signature)
            if verdict.judgement == Judgement.FORGED:
                raise VerificationError(
                    f"entry {seq} does not verify: {verdict.reason}; the ledger was tampered "
                    "with (run `medfed ledger verify`)"
                )
            if verdict.judgement == Judgement.IGNORE:
                actor = str(fields.get("actor"))
                if not self.ignored[actor]:
                    log.warning("ignoring ledger entries of %r: %s", actor, verdict.reason)
                self.ignored[actor] += 1
                continue
            yield fields

    def entry(self, seq: int) -> tuple | None:
        rows = self._read(
            select(E.c.seq, E.c.body, E.c.entry_hash, E.c.signature).where(E.c.seq == seq)
        )
        return rows[0] if rows else None

    def seq_of(self, idempotency_key: str) -> int | None:
        rows = self._read(select(E.c.seq).where(E.c.idempotency_key == idempotency_key))
        return rows[0][0] if rows else None

    def checkpoints(self) -> list[tuple[int, str, str, str]]:
        """(size, root_hash hex, note, consistency_proof JSON), by size."""
        return [
            tuple(r)
            for r in self._read(
                select(C.c.size, C.c.root_hash, C.c.note, C.c.consistency_proof).order_by(C.c.size)
            )
        ]

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """(size, note) of the stored checkpoint with the largest size; None when there is none."""
        rows = self._read(select(C.c.size, C.c.note).order_by(C.c.size.desc()).limit(1))
        return (rows[0][0], rows[0][1]) if rows else None

    def cosignatures(self) -> list[tuple[int, str, str]]:
        """(size, witness, signature line) of every stored cosignature, by size and witness."""
        if self._tables is not None and W.name not in self._tables:
            return []  # a ledger made before witnesses: nothing cosigned
        return [
            tuple(r)
            for r in self._read(
                select(W.c.size, W.c.witness, W.c.line).order_by(W.c.size, W.c.witness)
            )
        ]

    def actor_table(self) -> list[tuple[str, str]]:
        """(name, public key hex) as the actor cache holds them."""
        return [tuple(r) for r in self._read(select(A.c.name, A.c.public_key).order_by(A.c.name))]

    def leaf_hashes(self) -> list[bytes]:
        """Every entry's leaf hash, recomputed from its stored body, in seq order; raises
        VerificationError when a seq is missing."""
        hashes: list[bytes] = []
        for row in self.raw_rows(signatures=False):
            if row[0] != len(hashes):
                raise VerificationError(
                    f"entry {len(hashes)} is missing; the next stored entry is {row[0]}"
                )
            hashes.append(leaf_hash(row[1].encode()))
        return hashes

    def log_identity(self) -> tuple[str, str] | None:
        """(origin, vkey) of this ledger's checkpoints, as stored; None before the first."""
        rows = self._read(select(L.c.origin, L.c.vkey))
        return (rows[0][0], rows[0][1]) if rows else None

    def payloads(self) -> list[tuple[int, str, str, str]]:
        """(seq, field, salt hex, value) of every personal field not yet erased."""
        return [
            tuple(r)
            for r in self._read(
                select(P.c.seq, P.c.field, P.c.salt, P.c.value).order_by(P.c.seq, P.c.field)
            )
        ]


def _check_extends(hashes: list[bytes], kept: note.Checkpoint) -> None:
    """Raise unless the log whose leaves are `hashes` still extends the checkpoint `kept`."""
    if kept.size > len(hashes) or merkle.root(hashes[: kept.size]) != kept.root_hash:
        raise VerificationError(
            f"refusing to sign: the log no longer extends the checkpoint this log key signed "
            f"last (size {kept.size}); it was truncated or rewritten (run `medfed ledger verify`)"
        )


def registration(signer: _keys.Identity, job: str) -> Event:
    return Event(
        actor=signer.name,
        action=Action.REGISTER_KEY,
        job=job,
        idempotency_key=f"register_key/{signer.name}/{signer.public_key.hex()}",
        details={"public_key": signer.public_key.hex(), "algorithm": "ed25519"},
    )


def _row(sealed: SealedEntry, ev: Event, recorded: str) -> dict[str, Any]:
    return {
        "seq": sealed.seq,
        "idempotency_key": ev.idempotency_key,
        "actor": ev.actor,
        "action": str(ev.action),
        "job": ev.job,
        "round": ev.round,
        "site": ev.site,
        "recorded": recorded,
        "body": sealed.body.decode(),
        "entry_hash": sealed.entry_hash.hex(),
        "signature": b64(sealed.signature),
    }


def sealed_from_row(row: EntryRow) -> SealedEntry:
    return SealedEntry(
        seq=row.seq,
        body=row.body.encode(),
        entry_hash=bytes.fromhex(row.entry_hash),
        signature=unb64(row.signature),
    )
