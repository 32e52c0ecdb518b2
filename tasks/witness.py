"""The site as a witness of the federation's ledger.

At the start of every phase the site checks that the ledger still extends the checkpoint it
cosigned last (kept in its own root, never in the database): a truncated, forked or rewritten
ledger is refused before any data is read or budget is spent. It then cosigns the newest
checkpoint if it has not yet (C2SP `cosignature/v1`), stores the cosignature in the ledger and
keeps the cosigned note as its new reference. So a round's commit checkpoint is cosigned when
the next round begins, with no phase of its own; the `witness` phase, after the job's end,
has every site cosign the checkpoint that covers the whole job.
"""

from __future__ import annotations

import time
from pathlib import Path

from ledger import keys as ledger_keys
from ledger import witness
from tasks.site_run import SiteRun


def _kept_path(run: SiteRun) -> Path:
    ids = run.fed.identities
    assert ids is not None  # check_instruction refuses a plan that pins no identities
    return run.site.witness_path(run.fed.log_origin, ids.log)


def kept_checkpoint(run: SiteRun) -> str | None:
    path = _kept_path(run)
    return path.read_text(encoding="utf-8") if path.exists() else None


def cosign(run: SiteRun, *, now: float | None = None) -> dict[str, object]:
    """Check the ledger (raises `witness.WitnessError` unless it extends what this site
    cosigned), cosign its newest checkpoint unless done already, and keep it; returns what
    the report carries."""
    assert run.fed.identities is not None
    done = witness.cosign_newest(
        run.ledger,
        run.site.identity,
        vkey=run.fed.identities.log,
        origin=run.fed.log_origin,
        kept=kept_checkpoint(run),
        timestamp=int(time.time() if now is None else now),
    )
    if done is None:
        return {}  # no checkpoint yet, or none this site has not cosigned
    # fsync'd before the report says so: the site must never forget what it cosigned.
    ledger_keys.write_secret(_kept_path(run), done.note.encode())
    return {"checkpoint_size": done.size, "cosignature": done.line}
