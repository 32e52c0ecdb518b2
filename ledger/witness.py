"""A witness of the ledger (C2SP tlog-witness semantics, the witness reading the log itself).

Every site is a witness of the ledger it writes to. It keeps the checkpoint it last cosigned
outside the database (in its own root) and, before it acts on the ledger, checks:

- the entries still hash to the kept checkpoint's root: nothing it saw was truncated,
  deleted or rewritten (a suffix cut exactly at an older checkpoint included);
- the newest stored checkpoint is signed by the log key, is not older than the kept one, and
  its root is that of the entries it covers.

Both roots are recomputed from the entry bodies, which proves the newest checkpoint
consistent with the kept one (the RFC 6962 consistency proof between them follows from the
leaves). When asked to, the witness then cosigns the newest checkpoint (C2SP
`cosignature/v1`) and keeps it as its new reference; a witness never cosigns a checkpoint that
does not extend the one it kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger import VerificationError, cosignature, merkle, note
from ledger.keys import Identity
from ledger.store import Ledger


class WitnessError(VerificationError):
    """The ledger does not extend what this witness saw: it was truncated, forked or rewritten."""


@dataclass(frozen=True, kw_only=True)
class Cosigned:
    """A witness's cosignature of the checkpoint at `size`, and the cosigned note it keeps."""

    size: int
    line: str
    note: str


@dataclass(frozen=True, kw_only=True)
class LogView:
    """What the witness found: the newest stored checkpoint (None before the first) and how
    many entries the log holds."""

    checkpoint: note.Checkpoint | None
    note: str | None
    entries: int
    kept: note.Checkpoint | None = None  # what the witness had cosigned before


def check_log(ledger: Ledger, *, vkey: str, origin: str, kept: str | None) -> LogView:
    """Raise WitnessError unless the ledger still extends the kept checkpoint (None: this
    witness has cosigned nothing yet) and its newest checkpoint is sound."""
    kept_cp = _open(kept, vkey, origin, "the checkpoint this site kept") if kept else None
    # The checkpoint first, then the entries: a checkpoint never covers an entry not yet read.
    stored = ledger.latest_checkpoint()
    latest = _open(stored[1], vkey, origin, "the ledger's newest checkpoint") if stored else None
    try:
        hashes = ledger.leaf_hashes()
    except VerificationError as exc:
        raise WitnessError(f"the ledger is not whole: {exc}") from exc
    if kept_cp is not None:
        if latest is None or latest.size < kept_cp.size:
            newest = f"covers {latest.size} entries" if latest else "is gone (none is stored)"
            raise WitnessError(
                f"the ledger's newest checkpoint {newest}, fewer than the {kept_cp.size} of the "
                "checkpoint this site cosigned: the log was truncated or rolled back"
            )
        if kept_cp.size > len(hashes):
            raise WitnessError(
                f"the ledger holds {len(hashes)} entries, fewer than the {kept_cp.size} of the "
                "checkpoint this site cosigned: entries were deleted"
            )
    if latest is not None and latest.size > len(hashes):
        raise WitnessError(
            f"the ledger's newest checkpoint covers {latest.size} entries but it holds "
            f"{len(hashes)}: entries were deleted"
        )
    checks = [(cp, what) for cp, what in ((kept_cp, "cosigned"), (latest, "newest")) if cp]
    roots = merkle.prefix_roots(hashes, [cp.size for cp, _ in checks])
    for (cp, what), root in zip(checks, roots, strict=True):
        if cp.root_hash != root:
            raise WitnessError(
                f"the entries 0..{cp.size - 1} no longer hash to the {what} checkpoint's root: "
                "the log was rewritten or forked"
            )
    return LogView(
        checkpoint=latest, note=stored[1] if stored else None, entries=len(hashes), kept=kept_cp
    )


def cosign_newest(
    ledger: Ledger,
    identity: Identity,
    *,
    vkey: str,
    origin: str,
    kept: str | None,
    timestamp: int,
) -> Cosigned | None:
    """Check the log (`check_log`), cosign its newest checkpoint, store the cosignature in the
    ledger, and return it with the cosigned note for the witness to keep (None: the ledger
    has no checkpoint yet, or none newer than the one this witness cosigned)."""
    view = check_log(ledger, vkey=vkey, origin=origin, kept=kept)
    if view.checkpoint is None or view.note is None:
        return None
    if view.kept is not None and view.kept.size == view.checkpoint.size:
        return None  # the same checkpoint (check_log proved the roots equal): cosigned already
    body = note.format_checkpoint(view.checkpoint)
    signed = cosignature.cosign(body, identity, timestamp=timestamp)
    line = cosignature.signature_line(signed)
    ledger.add_cosignature(view.checkpoint.size, identity.name, line)
    return Cosigned(
        size=view.checkpoint.size, line=line, note=cosignature.add_cosignature(view.note, signed)
    )


def _open(text: str, vkey: str, origin: str, what: str) -> note.Checkpoint:
    try:
        return note.verify_checkpoint(text, vkey, origin=origin)
    except VerificationError as exc:
        raise WitnessError(f"{what} does not verify with the log key: {exc}") from exc
