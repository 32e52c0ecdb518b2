"""Who may read what through `medfed ledger serve`: bearer tokens and the roles they carry.

A tokens file (TOML) names each token by a label and a role and stores only its SHA-256: the
file grants nothing to whoever reads it. Tokens are 256-bit random strings, so one hash
without a slow KDF is enough; lookups compare every stored hash in constant time.

Roles:
- `auditor`: every query, every site.
- `site:<name>`: that site's own rows only (its events, spend, data use, disclosures, quality
  and participation), never another site's name or figures, and no lineage (it names every
  site's updates).
- `operator`: rounds and models (quality, participation, lineage, the round events), no
  disclosures, no data use, no privacy spend.

Pure, but for reading and writing the tokens file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ledger import LedgerError
from ledger.entry import Action

TOKEN_PREFIX = "mfl_"
AUDITOR, OPERATOR, SITE_PREFIX = "auditor", "operator", "site:"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SITE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class TokensError(LedgerError):
    """The tokens file is missing, unreadable or malformed: bad input (exit 2)."""


class Section(StrEnum):
    """What a request reads; each role is a set of these."""

    INTEGRITY = "integrity"
    CHECKPOINTS = "checkpoints"
    PROOFS = "proofs"
    EVENTS = "events"
    SPEND = "spend"
    DATA_USE = "data-use"
    QUALITY = "quality"
    PARTICIPATION = "participation"
    LINEAGE = "lineage"
    DISCLOSURES = "disclosures"
    FHIR = "fhir"
    REPORT = "report"


_EVERYWHERE = frozenset({Section.INTEGRITY, Section.CHECKPOINTS, Section.PROOFS, Section.REPORT})
SECTIONS: Mapping[str, frozenset[Section]] = {
    AUDITOR: frozenset(Section),
    OPERATOR: _EVERYWHERE
    | {Section.EVENTS, Section.QUALITY, Section.PARTICIPATION, Section.LINEAGE},
    SITE_PREFIX: _EVERYWHERE
    | {
        Section.EVENTS,
        Section.SPEND,
        Section.DATA_USE,
        Section.QUALITY,
        Section.PARTICIPATION,
        Section.DISCLOSURES,
        Section.FHIR,
    },
}
# An operator sees what rounds did, not what sites disclosed, enrolled or erased.
_ROUND_ACTIONS = frozenset(
    map(
        str,
        (
            Action.JOB_START,
            Action.COHORT,
            Action.RESERVE,
            Action.TRAIN,
            Action.REFUSE,
            Action.REFUSE_INSTRUCTION,
            Action.DROP,
            Action.CLIP_AND_NOISE,
            Action.ENCRYPT,
            Action.UPLOAD,
            Action.SECURE_AGGREGATE,
            Action.EVALUATE,
            Action.COMMIT_ROUND,
            Action.JOB_END,
        ),
    )
)


def parse_role(text: object) -> tuple[str, str | None]:
    """(kind, site) of a role string; raises TokensError naming what is wrong."""
    if text in (AUDITOR, OPERATOR):
        return str(text), None
    if isinstance(text, str) and text.startswith(SITE_PREFIX):
        site = text[len(SITE_PREFIX) :]
        if _SITE.match(site):
            return SITE_PREFIX, site
    raise TokensError(
        f"role {text!r} is not one of auditor, operator, site:<name> (a lower-case site name)"
    )


@dataclass(frozen=True, kw_only=True)
class Grant:
    """What one token may read: its label (recorded with a denial; the token never is)."""

    label: str
    role: str

    @property
    def kind(self) -> str:
        return parse_role(self.role)[0]

    @property
    def site(self) -> str | None:
        return parse_role(self.role)[1]

    def may(self, section: Section) -> bool:
        return section in SECTIONS[self.kind]

    def admits(self, row: Mapping[str, Any]) -> bool:
        """Whether one query row (or entry body) is inside this role's scope."""
        if self.kind == SITE_PREFIX:
            return row.get("site") == self.site
        if self.kind == OPERATOR:
            return "action" not in row or row["action"] in _ROUND_ACTIONS
        return True

    def scoped(self, rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [r for r in rows if self.admits(r)]


AUDITOR_GRANT = Grant(label="local", role=AUDITOR)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def authenticate(grants: Mapping[str, Grant], token: str | None) -> Grant | None:
    """The grant of a presented token; None for no token or an unknown one. Every stored
    hash is compared, in constant time, whichever matches."""
    if not token:
        return None
    presented = hash_token(token)
    found = None
    for digest, grant in grants.items():
        if hmac.compare_digest(digest, presented):
            found = grant
    return found


def load_tokens(path: Path) -> dict[str, Grant]:
    """{sha256 hex: Grant} from a tokens file; TokensError names the file and the field."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokensError(f"tokens file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TokensError(f"tokens file {path} is not readable TOML: {exc}") from None
    entries = doc.get("token", [])
    if not isinstance(entries, list):
        raise TokensError(f"tokens file {path}: [[token]] must be an array of tables")
    grants: dict[str, Grant] = {}
    labels: set[str] = set()
    for n, t in enumerate(entries, 1):
        where = f"tokens file {path}, token {n}"
        if not isinstance(t, dict):
            raise TokensError(f"{where} is not a table")
        label, role, digest = t.get("name"), t.get("role"), t.get("sha256")
        if not isinstance(label, str) or not _LABEL.match(label):
            raise TokensError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-'")
        if label in labels:
            raise TokensError(f"{where}: name {label!r} is used twice")
        try:
            parse_role(role)
        except TokensError as exc:
            raise TokensError(f"{where} ({label}): {exc}") from None
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise TokensError(f"{where} ({label}): sha256 must be 64 lower-case hex digits")
        if digest in grants:
            raise TokensError(f"{where} ({label}): the same token is listed twice")
        labels.add(label)
        grants[digest] = Grant(label=label, role=str(role))
    return grants


def add_token(path: Path, *, label: str, role: str) -> str:
    """Make a token for `role`, store its hash under `label` in the tokens file (created,
    owner-only, when missing) and return the token: it is shown once and stored nowhere."""
    path = Path(path)
    existing = load_tokens(path) if path.exists() else {}
    if any(g.label == label for g in existing.values()):
        raise TokensError(f"tokens file {path} already has a token named {label!r}")
    if not _LABEL.match(label):
        raise TokensError(f"token name {label!r}: use 1-64 letters, digits, '.', '_' or '-'")
    parse_role(role)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
    text += f'\n[[token]]\nname = "{label}"\nrole = "{role}"\nsha256 = "{hash_token(token)}"\n'
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    load_tokens(path)  # what was written reads back
    return token


_HEADER = (
    "# medfed ledger API tokens: only SHA-256 hashes of the tokens are stored here.\n"
    "# Roles: auditor (everything), operator (rounds and models), site:<name> (that site).\n"
)
