"""Persistence of the ledger on SQLite (WAL) or PostgreSQL.

Appends are serialized by the database itself (SQLite `BEGIN IMMEDIATE`, a PostgreSQL
transaction-scoped advisory lock), so any number of threads and processes can append and the
chain stays linear. Every append is one transaction: a crash leaves the entry whole or absent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, func, text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, SQLModel, select

from ledger import LedgerError
from ledger import keys as _keys
from ledger.entry import GENESIS_HASH, Action, Event, SealedEntry, b64, seal, unb64
from ledger.schema import ActorRow, CheckpointRow, EntryRow

# Any constant works; it only has to be the same for every medfed process.
_PG_APPEND_LOCK = 0x6D656466  # "medf"


@dataclass(frozen=True, kw_only=True)
class Appended:
    seq: int
    entry_hash: str
    created: bool  # False when the idempotency key was already present


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    """One engine per URL per process; tables created on first use."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
            _sqlite_serialized_writes(engine)
        elif url.startswith("postgresql"):
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
            engine = create_engine(url, pool_pre_ping=True)
        else:
            raise LedgerError(f"ledger URL {url!r} is neither sqlite:/// nor postgresql://")
        SQLModel.metadata.create_all(
            engine, tables=[EntryRow.__table__, ActorRow.__table__, CheckpointRow.__table__]
        )
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot open ledger {url}: {exc.__class__.__name__}: {exc}") from exc
    return engine


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

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_for(url)

    @contextmanager
    def _append_txn(self) -> Iterator[Session]:
        try:
            with Session(self.engine) as session, session.begin():
                if self.engine.dialect.name == "postgresql":
                    session.exec(text("SELECT pg_advisory_xact_lock(:k)").bindparams(k=_PG_APPEND_LOCK))
                yield session
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger append failed: {exc.__class__.__name__}: {exc}") from exc

    def append(self, event_: Event, signer: _keys.Identity) -> Appended:
        return self.append_many([(event_, signer)])[0]

    def append_many(self, items: Sequence[tuple[Event, _keys.Identity]]) -> list[Appended]:
        """Append events in one transaction; an event whose idempotency key exists is a no-op."""
        results: list[Appended] = []
        with self._append_txn() as session:
            tail = session.exec(select(EntryRow).order_by(EntryRow.seq.desc()).limit(1)).first()
            seq = tail.seq + 1 if tail else 0
            prev = bytes.fromhex(tail.entry_hash) if tail else GENESIS_HASH
            for ev, signer in items:
                existing = session.exec(
                    select(EntryRow).where(EntryRow.idempotency_key == ev.idempotency_key)
                ).first()
                if existing is not None:
                    results.append(Appended(seq=existing.seq, entry_hash=existing.entry_hash, created=False))
                    continue
                for pending in self._registration_if_new(session, signer, ev.job):
                    sealed = seal(pending, signer, seq=seq, prev_hash=prev)
                    session.add(_row(sealed, pending))
                    seq, prev = seq + 1, sealed.entry_hash
                sealed = seal(ev, signer, seq=seq, prev_hash=prev)
                session.add(_row(sealed, ev))
                results.append(Appended(seq=seq, entry_hash=sealed.entry_hash.hex(), created=True))
                seq, prev = seq + 1, sealed.entry_hash
                session.flush()
        return results

    def _registration_if_new(self, session: Session, signer: _keys.Identity, job: str) -> list[Event]:
        known = session.get(ActorRow, signer.name)
        if known is not None:
            if known.public_key != signer.public_key.hex():
                raise LedgerError(f"actor {signer.name!r} is registered with a different key")
            return []
        session.add(
            ActorRow(name=signer.name, public_key=signer.public_key.hex(), key_id=signer.key_id.hex())
        )
        return [
            Event(
                actor=signer.name,
                action=Action.REGISTER_KEY,
                job=job,
                idempotency_key=f"register_key/{signer.name}/{signer.public_key.hex()}",
                details={"public_key": signer.public_key.hex(), "algorithm": "ed25519"},
            )
        ]

    def size(self) -> int:
        with Session(self.engine) as session:
            return session.exec(select(func.count()).select_from(EntryRow)).one()

    def rows(self, *, batch: int = 5000) -> Iterator[EntryRow]:
        """Every entry in sequence order, streamed in batches.

        Each batch is read in its own short transaction, so a caller that stops iterating
        early never leaves a transaction open (which would block writers and DDL)."""
        last = -1
        while True:
            with Session(self.engine, expire_on_commit=False) as session:
                chunk = session.exec(
                    select(EntryRow).where(EntryRow.seq > last).order_by(EntryRow.seq).limit(batch)
                ).all()
            if not chunk:
                return
            yield from chunk
            last = chunk[-1].seq

    def events(self, **where: object) -> list[dict]:
        """Entry bodies matching indexed columns, e.g. events(site="st-mary", action="train")."""
        with Session(self.engine) as session:
            query = select(EntryRow).order_by(EntryRow.seq)
            for column, value in where.items():
                query = query.where(getattr(EntryRow, column) == value)
            return [json.loads(r.body) for r in session.exec(query)]


def _row(sealed: SealedEntry, ev: Event) -> EntryRow:
    return EntryRow(
        seq=sealed.seq,
        idempotency_key=ev.idempotency_key,
        actor=ev.actor,
        action=str(ev.action),
        job=ev.job,
        round=ev.round,
        site=ev.site,
        recorded=sealed.fields["recorded"],
        body=sealed.body.decode(),
        entry_hash=sealed.entry_hash.hex(),
        signature=b64(sealed.signature),
    )


def sealed_from_row(row: EntryRow) -> SealedEntry:
    return SealedEntry(
        seq=row.seq,
        body=row.body.encode(),
        entry_hash=bytes.fromhex(row.entry_hash),
        signature=unb64(row.signature),
    )
