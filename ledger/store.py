"""Persistence of the ledger on SQLite (WAL) or PostgreSQL.

Appends are serialized by the database itself (SQLite `BEGIN IMMEDIATE`, a PostgreSQL
transaction-scoped advisory lock), so any number of threads and processes can append and the
chain stays linear. Every append is one transaction: a crash leaves the entry whole or absent.
Appends go through SQLAlchemy Core (no ORM objects): one tail read, one `IN` query for the
idempotency keys of a batch, one multi-row insert.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

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
from sqlalchemy.pool import NullPool
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
from ledger.schema import INDEXED_FIELDS, ActorRow, CheckpointRow, EntryRow, LogRow, PayloadRow

# Any constant works; it only has to be the same for every medfed process.
_PG_APPEND_LOCK = 0x6D656466  # "medf"
_IN_CHUNK = 500

E = EntryRow.__table__
A = ActorRow.__table__
C = CheckpointRow.__table__
L = LogRow.__table__
P = PayloadRow.__table__
_TABLES = [E, A, C, L, P]
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
    except ArgumentError as exc:
        raise UnreadableError(f"ledger URL {url!r} is not a valid URL") from exc
    if not database or database == ":memory:":
        return None
    return Path(database)


def open_ledger(url: str) -> Ledger:
    """Open an EXISTING ledger for reading; never creates a SQLite file."""
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise UnreadableError(f"ledger file {path} does not exist")
    return Ledger(url)


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
        raise UnreadableError(f"cannot open ledger {url}: {one_line(exc)}") from exc
    return engine


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
        return create_engine(url, pool_pre_ping=True, **kwargs)
    raise UnreadableError(f"ledger URL {url!r} is neither sqlite:/// nor postgresql://")


def forked_reader(url: str) -> Ledger:
    """A Ledger for reading in a forked worker process, on its own unpooled engine: the
    parent's pooled connections (inherited, shared sockets and SQLite lock state) stay
    untouched. The tables must exist already."""
    try:
        return Ledger(url, engine=_new_engine(url, poolclass=NullPool))
    except (SQLAlchemyError, ArgumentError) as exc:
        raise UnreadableError(f"cannot open ledger {url}: {one_line(exc)}") from exc


def _upgrade(conn: Connection) -> None:
    """Ledgers made before checkpoints stored consistency proofs lack that column."""
    names = {c["name"] for c in inspect(conn).get_columns(C.name)}
    if "consistency_proof" not in names:
        conn.execute(
            text(f"ALTER TABLE {C.name} ADD COLUMN consistency_proof VARCHAR NOT NULL DEFAULT '[]'")
        )


def _sqlite_serialized_writes(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        # Take the write lock before reading the chain's tail.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Ledger:
    """The append-only, hash-chained, signed event log at `url`."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or engine_for(url)

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
        results: list[Appended] = []
        if not items:
            return results
        with self._write_txn() as conn:
            tail = conn.execute(
                select(E.c.seq, E.c.entry_hash).order_by(E.c.seq.desc()).limit(1)
            ).first()
            seq = tail.seq + 1 if tail else 0
            prev = bytes.fromhex(tail.entry_hash) if tail else GENESIS_HASH
            existing: dict[str, tuple[int, str]] = {}
            wanted = sorted({ev.idempotency_key for ev, _ in items})
            for i in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[i : i + _IN_CHUNK]
                for key, s, h in conn.execute(
                    select(E.c.idempotency_key, E.c.seq, E.c.entry_hash).where(
                        E.c.idempotency_key.in_(chunk)
                    )
                ):
                    existing[key] = (s, h)
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
                existing[ev.idempotency_key] = (seq, sealed.entry_hash.hex())
                seq, prev = seq + 1, sealed.entry_hash
                return sealed

            for ev, signer in items:
                if ev.idempotency_key in existing:
                    s, h = existing[ev.idempotency_key]
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
                    raise LedgerError(f"actor {signer.name!r} is registered with a different key")
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

    def checkpoint(
        self, signer: _keys.Identity, origin: str, *, recorded: str | None = None
    ) -> str:
        """Sign a C2SP checkpoint of the whole log and store it; return the signed note.

        The root is recomputed from the entry bodies (not the stored hash column), and the new
        tree is proven consistent with the previous stored checkpoint (whose signature is
        checked with this log's key) before anything is signed. A log has one origin and one
        key; a second key or origin is refused. When nothing was appended since the last
        checkpoint, that checkpoint is returned unchanged."""
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

        The erasure entry lists (seq, field) pairs, never the subject. Returns the entry (None
        when the subject has nothing left to erase) and the number of fields destroyed."""
        with self._write_txn() as conn:
            found = conn.execute(
                select(P.c.seq, P.c.field)
                .where(P.c.subject == subject)
                .order_by(P.c.seq, P.c.field)
            ).all()
            if not found:
                return None, 0
            conn.execute(P.delete().where(P.c.subject == subject))
        erased = [{"seq": s, "field": f} for s, f in found]
        key = "erase/" + leaf_hash(json.dumps(erased).encode()).hex()
        appended = self.append(
            Event(
                actor=signer.name,
                action=Action.ERASE,
                job=job,
                idempotency_key=key,
                legal_basis="GDPR Art. 17",
                purpose="PATRQT",  # HL7 PurposeOfUse: patient requested
                details={"erased": erased, "reason": reason},
            ),
            signer,
        )
        return appended, len(found)

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
        """Entry bodies matching indexed columns, e.g. events(site="st-mary", action="train")."""
        query = select(E.c.body).order_by(E.c.seq)
        for column, value in where.items():
            query = query.where(E.c[column] == value)
        return [json.loads(body) for (body,) in self._read(query)]

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
