"""Who may write what: the federation's enrolled identities, pinned out of band.

A `Roster` is the trust root of a ledger. It names each enrolled actor with its Ed25519 key
and role, the log key that signs checkpoints, and (as the sites) the witnesses that cosign
them. It comes from the federation's enrollment, read from the federation file (or any TOML
file with the same `[identities]` table and `[[sites]]`), never from the ledger's own tables:
whoever can write to the database can register any key it likes there.

Rules, applied to every entry by `verify`, by the flows' reads and by every query:

- the actor is enrolled, and the entry's key id is that of its enrolled key;
- its role permits the action: only the coordinator writes job, drop, aggregate, commit and
  enrollment entries; a site writes only its own site's steps (`site` is itself); only the
  DPO erases; the coordinator or the DPO (whoever runs the ledger API) records denied
  requests;
- a `register_key` entry registers the enrolled key and no other.

Pure: no I/O besides `load_roster` reading one file.
"""

from __future__ import annotations

import base64
import binascii
import functools
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import LedgerError
from ledger import keys as _keys
from ledger.entry import Action

COORDINATOR = "coordinator"
DPO = "dpo"


class Role(StrEnum):
    COORDINATOR = "coordinator"
    SITE = "site"
    DPO = "dpo"


ROLE_ACTIONS: Mapping[Role, frozenset[str]] = {
    Role.COORDINATOR: frozenset(
        map(
            str,
            (
                Action.REGISTER_KEY,
                Action.ENROLL,
                Action.JOB_START,
                Action.DROP,
                Action.COHORT,
                Action.SECURE_AGGREGATE,
                Action.COMMIT_ROUND,
                Action.JOB_END,
                Action.ACCESS_DENIED,
            ),
        )
    ),
    Role.SITE: frozenset(
        map(
            str,
            (
                Action.REGISTER_KEY,
                Action.PREPROCESS,
                Action.POLICY,
                Action.RESERVE,
                Action.TRAIN,
                Action.REFUSE,
                Action.REFUSE_INSTRUCTION,
                Action.CLIP_AND_NOISE,
                Action.ENCRYPT,
                Action.UPLOAD,
                Action.EVALUATE,
                Action.DISCLOSE,
            ),
        )
    ),
    Role.DPO: frozenset(map(str, (Action.REGISTER_KEY, Action.ERASE, Action.ACCESS_DENIED))),
}
_REGISTER = str(Action.REGISTER_KEY)


class RosterError(LedgerError):
    """An identities file or table is missing, unreadable or malformed: bad input (exit 2)."""


@dataclass(frozen=True, kw_only=True)
class Member:
    name: str
    role: Role
    public_key: bytes

    @property
    def key_id_hex(self) -> str:
        return _keys.key_id(self.name, self.public_key).hex()


@dataclass(frozen=True, kw_only=True)
class Roster:
    """The enrolled actors by name, and the log's verifier key (C2SP vkey) when pinned."""

    members: Mapping[str, Member] = field(default_factory=dict)
    log_vkey: str | None = None

    def __post_init__(self) -> None:
        keys_seen: dict[bytes, str] = {}
        for name, m in self.members.items():
            if name != m.name:
                raise RosterError(f"roster entry {name!r} names member {m.name!r}")
            if len(m.public_key) != _keys.PUBLIC_KEY_SIZE:
                raise RosterError(f"the key enrolled for {name!r} is not 32 bytes")
            other = keys_seen.setdefault(m.public_key, name)
            if other != name:
                raise RosterError(f"{other!r} and {name!r} are enrolled with the same key")

    @property
    def keys(self) -> dict[str, bytes]:
        return {name: m.public_key for name, m in self.members.items()}

    @property
    def witnesses(self) -> dict[str, bytes]:
        """The sites: each cosigns the checkpoints of rounds it took part in."""
        return {n: m.public_key for n, m in self.members.items() if m.role == Role.SITE}

    def refusal(self, fields: Mapping[str, Any]) -> str | None:
        """Why this entry (its signed body's fields) is not one its actor may write; None
        when it may. The signature itself is checked apart, with `keys[actor]`."""
        actor = fields.get("actor")
        member = self.members.get(actor) if isinstance(actor, str) else None
        if member is None:
            return f"actor {actor!r} is not an enrolled identity"
        if fields.get("key_id") != member.key_id_hex:
            return f"it is not signed with the key enrolled for {actor!r}"
        action = fields.get("action")
        if action not in ROLE_ACTIONS[member.role]:
            return f"{actor!r} is enrolled as {member.role}, which may not write '{action}' entries"
        if action == _REGISTER:
            details = fields.get("details")
            claimed = details.get("public_key") if isinstance(details, dict) else None
            if claimed != member.public_key.hex():
                return f"{actor!r} registers a key other than its enrolled one"
        elif member.role == Role.SITE and fields.get("site") != actor:
            return f"site {actor!r} may not write entries about site {fields.get('site')!r}"
        return None

    def judge(self, fields: Mapping[str, Any], body: bytes, signature: str) -> Verdict:
        """What a reader does with one stored entry: ADMIT it; IGNORE it (its actor is not
        enrolled, or wrote outside its role); or treat it as FORGED (it names an enrolled
        actor but is not that actor's signature: the database was tampered with)."""
        reason = self.refusal(fields)
        member = self.members.get(fields.get("actor"))  # type: ignore[arg-type]
        if reason is not None:
            if member is not None and fields.get("key_id") != member.key_id_hex:
                return Verdict(Judgement.FORGED, reason)
            return Verdict(Judgement.IGNORE, reason)
        assert member is not None
        try:
            _verifier(member.public_key).verify(base64.b64decode(signature, validate=True), body)
        except (InvalidSignature, ValueError, binascii.Error):
            return Verdict(
                Judgement.FORGED, f"its signature is not {member.name!r}'s over its body"
            )
        return Verdict(Judgement.ADMIT, "")


class Judgement(StrEnum):
    ADMIT = "admit"
    IGNORE = "ignore"
    FORGED = "forged"


@dataclass(frozen=True)
class Verdict:
    judgement: Judgement
    reason: str


def enrolled_in(bodies: Iterable[Mapping[str, Any]], *, log_vkey: str | None) -> Roster:
    """The roster a ledger states about itself, for readers who pinned none: the first key
    the coordinator registered, and the sites and DPO its `enroll` entries name. Weaker than
    a pinned roster (the database is not a trust root), but it already ignores anyone who
    only registered a key of their own."""
    coordinator: bytes | None = None
    enrolled: dict[str, Member] = {}
    for b in bodies:
        action, actor, details = b.get("action"), b.get("actor"), b.get("details")
        if actor != COORDINATOR or not isinstance(details, Mapping):
            continue
        try:
            if action == _REGISTER and coordinator is None:
                coordinator = bytes.fromhex(details["public_key"])
            elif action == str(Action.ENROLL) and coordinator is not None:
                role = Role(details.get("role", Role.SITE))
                name = details["site"] if role == Role.SITE else details["name"]
                if role != Role.COORDINATOR and name not in enrolled:
                    key = bytes.fromhex(details["public_key"])
                    enrolled[name] = Member(name=name, role=role, public_key=key)
        except (KeyError, TypeError, ValueError):
            continue
    if coordinator is None:
        return Roster(log_vkey=log_vkey)
    members = {COORDINATOR: Member(name=COORDINATOR, role=Role.COORDINATOR, public_key=coordinator)}
    members |= {n: m for n, m in enrolled.items() if m.public_key != coordinator}
    try:
        return Roster(members=members, log_vkey=log_vkey)
    except RosterError:  # two enrolled with one key: keep the coordinator alone
        return Roster(members={COORDINATOR: members[COORDINATOR]}, log_vkey=log_vkey)


# ---------------------------------------------------------------- reading a roster


@functools.lru_cache(maxsize=256)
def _verifier(public_key: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key)


def roster_from_mapping(doc: Mapping[str, Any], *, source: str = "identities") -> Roster:
    """The roster a federation document pins: `[identities]` (coordinator, log, dpo) and the
    `[[sites]]` names and public keys. Everything else in the document is ignored."""
    if not isinstance(doc, Mapping):
        raise RosterError(f"{source} is not a table of identities")
    ids = doc.get("identities")
    if not isinstance(ids, Mapping):
        raise RosterError(
            f"{source} has no [identities] table (coordinator and log keys): "
            "'medfed register' writes it"
        )
    members: dict[str, Member] = {}

    def add(name: Any, role: Role, hex_key: Any, where: str) -> None:
        if not isinstance(name, str) or not name:
            raise RosterError(f"{source}: field '{where}' needs a name")
        if name in members:
            raise RosterError(f"{source}: '{name}' is enrolled twice")
        members[name] = Member(name=name, role=role, public_key=_hex_key(hex_key, source, where))

    add(COORDINATOR, Role.COORDINATOR, ids.get("coordinator"), "identities.coordinator")
    if ids.get("dpo") is not None:
        add(DPO, Role.DPO, ids.get("dpo"), "identities.dpo")
    sites = doc.get("sites", [])
    if not isinstance(sites, list):
        raise RosterError(f"{source}: field 'sites' is not a list of sites")
    for i, s in enumerate(sites):
        if not isinstance(s, Mapping):
            raise RosterError(f"{source}: field 'sites.{i}' is not a table")
        add(s.get("name"), Role.SITE, s.get("public_key"), f"sites.{i}.public_key")
    log = ids.get("log")
    if log is not None:
        from ledger.note import parse_vkey

        try:
            parse_vkey(log)
        except LedgerError as exc:
            raise RosterError(f"{source}: field 'identities.log' is not a C2SP vkey") from exc
    return Roster(members=members, log_vkey=log)


def load_roster(path: Path) -> Roster:
    """A roster from a TOML file: the federation file itself, or one holding just its
    `[identities]` table and `[[sites]]`."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RosterError(f"identities file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RosterError(f"identities file {path} cannot be read as TOML") from exc
    return roster_from_mapping(doc, source=f"identities file {path}")


def _hex_key(value: Any, source: str, where: str) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != _keys.PUBLIC_KEY_SIZE:
        raise RosterError(f"{source}: field '{where}' is not a 64-digit hex Ed25519 key")
    return raw


__all__ = [
    "COORDINATOR",
    "DPO",
    "Judgement",
    "Verdict",
    "enrolled_in",
    "ROLE_ACTIONS",
    "Member",
    "Role",
    "Roster",
    "RosterError",
    "load_roster",
    "roster_from_mapping",
]
