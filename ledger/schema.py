"""Tables of the ledger. Indexed columns duplicate body fields for queries; verify checks them."""

from __future__ import annotations

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

# Idempotency keys are unique per actor: an entry another actor wrote under the same key
# (an unenrolled one, say) must not block or stand in for the actor's own step.
ACTOR_KEY_INDEX = "ux_ledger_entry_actor_key"


class EntryRow(SQLModel, table=True):
    __tablename__ = "ledger_entry"
    __table_args__ = (Index(ACTOR_KEY_INDEX, "actor", "idempotency_key", unique=True),)

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    idempotency_key: str = Field(index=True)
    actor: str = Field(index=True)
    action: str = Field(index=True)
    job: str = Field(index=True)
    round: int | None = Field(default=None, index=True)
    site: str | None = Field(default=None, index=True)
    recorded: str = Field(index=True)
    body: str  # RFC 8785 canonical JSON, exactly the signed bytes
    entry_hash: str  # hex RFC 6962 leaf hash of body
    signature: str  # base64 Ed25519 over body


class ActorRow(SQLModel, table=True):
    """Cache of registered public keys; the register_key entries in the chain are authoritative."""

    __tablename__ = "ledger_actor"

    name: str = Field(primary_key=True)
    public_key: str  # hex, raw 32 bytes
    key_id: str  # hex, C2SP key id


class CheckpointRow(SQLModel, table=True):
    """Signed checkpoints, each proven consistent with the one before it when it was made."""

    __tablename__ = "ledger_checkpoint"

    size: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    root_hash: str  # hex
    note: str  # C2SP signed note
    recorded: str
    consistency_proof: str = "[]"  # JSON list of hex hashes, from the previous checkpoint


class CosignatureRow(SQLModel, table=True):
    """Witnesses' C2SP cosignatures of stored checkpoints. A cosignature signs a checkpoint,
    not the log, so adding one changes neither the entries nor the checkpoint it covers."""

    __tablename__ = "ledger_cosignature"

    size: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    witness: str = Field(primary_key=True)
    line: str  # the note signature line: em dash, name, base64(key id || time || signature)
    recorded: str


class LogRow(SQLModel, table=True):
    """The log's identity: its checkpoint origin and verifier key. Verifiers may pin their own."""

    __tablename__ = "ledger_log"

    origin: str = Field(primary_key=True)
    vkey: str  # C2SP verifier key: name+hexkeyid+base64(0x01||pubkey)


class PayloadRow(SQLModel, table=True):
    """Erasable personal-data fields; an entry's body holds only HMAC(salt, field, value).

    Erasure deletes the row (salt and value); the commitment in the signed body stays."""

    __tablename__ = "ledger_payload"

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    field: str = Field(primary_key=True)
    subject: str = Field(index=True)
    salt: str  # hex
    value: str


# The columns verify compares against each entry's signed body.
INDEXED_FIELDS = ("idempotency_key", "actor", "action", "job", "round", "site", "recorded")
