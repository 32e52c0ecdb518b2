"""Compliance queries over the ledger's signed bodies: events, privacy spend, data use, model
lineage and an accounting of disclosures (HIPAA 45 CFR 164.528 style). Each returns a list of
flat dicts (one per table row), newest facts taken from the entries themselves, not from any
mutable side table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from ledger import LedgerError
from ledger.entry import Action
from ledger.store import Ledger

PURPOSES = {
    "HRESCH": "healthcare research",
    "TREAT": "treatment",
    "HOPERAT": "healthcare operations",
    "PATRQT": "patient requested",
    "HCOMPL": "health compliance",
}


def _bodies(ledger: Ledger) -> Iterator[dict[str, Any]]:
    """Every entry the ledger's roster admits (all of them when it has none)."""
    return ledger.screened()


def parse_when(text: str, *, what: str = "date") -> datetime:
    """An ISO 8601 date or date-time; one without a time zone is UTC. Bad input raises
    LedgerError naming the option (exit 2)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise LedgerError(
            f"{what} {text!r} is not an ISO 8601 date or date-time (e.g. 2026-12-01 or "
            "2026-12-01T08:00:00+01:00)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    return (
        parse_when(since, what="--since") if since is not None else None,
        parse_when(until, what="--until") if until is not None else None,
    )


def _in_window(body: dict, since: datetime | None, until: datetime | None) -> bool:
    if since is None and until is None:
        return True
    try:
        recorded = parse_when(str(body.get("recorded", "")))
    except LedgerError:
        return False  # a time nobody can place is in no window
    return (since is None or recorded >= since) and (until is None or recorded < until)


def events(
    ledger: Ledger,
    *,
    actor: str | None = None,
    action: str | None = None,
    site: str | None = None,
    job: str | None = None,
    round: int | None = None,  # noqa: A002
    purpose: str | None = None,
    entity: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[dict[str, Any]]:
    """Who did what, when, to which entity (hash prefix), for which purpose."""
    window = _window(since, until)
    out = []
    for b in _bodies(ledger):
        if actor and b.get("actor") != actor or action and b.get("action") != action:
            continue
        if site and b.get("site") != site or job and b.get("job") != job:
            continue
        if round is not None and b.get("round") != round:
            continue
        if purpose and b.get("purpose") != purpose or not _in_window(b, *window):
            continue
        hashes = {**b.get("inputs", {}), **b.get("outputs", {})}
        if entity and not any(h.startswith(entity.lower()) for h in hashes.values()):
            continue
        out.append(
            {
                "seq": b["seq"],
                "recorded": b.get("recorded"),
                "actor": b.get("actor"),
                "action": b.get("action"),
                "outcome": b.get("outcome"),
                "job": b.get("job"),
                "round": b.get("round"),
                "site": b.get("site"),
                "purpose": b.get("purpose"),
                "legal_basis": b.get("legal_basis"),
                "inputs": " ".join(f"{k}={v[:12]}" for k, v in sorted(b.get("inputs", {}).items())),
                "outputs": " ".join(
                    f"{k}={v[:12]}" for k, v in sorted(b.get("outputs", {}).items())
                ),
            }
        )
    return out


_SPEND_ACTIONS = (Action.TRAIN, Action.CLIP_AND_NOISE, Action.REFUSE)

# What a site's epsilon is once it has trained even one round without DP.
UNBOUNDED = "unbounded (trained without DP)"


def spend(
    ledger: Ledger, *, site: str | None = None, job: str | None = None
) -> list[dict[str, Any]]:
    """Every release (DP-SGD in train, site-level noise in clip_and_noise) and refusal per
    site over time, with budget remaining."""
    out = []
    for b in _bodies(ledger):
        if b.get("action") not in _SPEND_ACTIONS or b.get("actor") != b.get("site"):
            continue
        if site and b.get("site") != site or job and b.get("job") != job:
            continue
        p = b.get("privacy") or {}
        if b["action"] == Action.CLIP_AND_NOISE and not p.get("release"):
            continue  # clipped without site-level noise: no release
        if b["action"] == Action.REFUSE:
            cumulative = p.get("epsilon_spent", 0.0)
            this_round = 0.0
        else:
            cumulative = p.get("epsilon_cumulative", 0.0)
            this_round = p.get("epsilon_round")
        budget = p.get("epsilon_budget")
        out.append(
            {
                "recorded": b.get("recorded"),
                "site": b.get("site"),
                "job": b.get("job"),
                "round": b.get("round"),
                "action": b["action"],
                "dataset": b.get("inputs", {}).get("dataset", ""),
                "epsilon_round": this_round,
                "epsilon_cumulative": cumulative,
                "epsilon_budget": budget,
                "budget_remaining": None if budget is None else max(budget - cumulative, 0.0),
                "delta": p.get("delta"),
                "accountant": p.get("accountant"),
                # A train entry without a DP release trained without DP: its epsilon is unbounded.
                "dp": b["action"] != Action.TRAIN or bool(p.get("release")),
                "seq": b["seq"],
            }
        )
    return out


def spend_summary(ledger: Ledger, *, site: str | None = None) -> list[dict[str, Any]]:
    """Per site: latest cumulative epsilon, budget, remaining, rounds trained, refusals."""
    sites: dict[str, dict[str, Any]] = {}
    for r in spend(ledger, site=site):
        s = sites.setdefault(
            r["site"],
            {
                "site": r["site"],
                "epsilon_cumulative": 0.0,
                "epsilon_budget": None,
                "budget_remaining": None,
                "rounds_trained": 0,
                "rounds_without_dp": 0,
                "refusals": 0,
                "accountant": None,
                "delta": None,
                "datasets": set(),
                "jobs": set(),
                "last": None,
            },
        )
        s["rounds_without_dp"] += not r["dp"]
        s["accountant"] = r["accountant"] or s["accountant"]
        s["delta"] = r["delta"] or s["delta"]
        s["epsilon_cumulative"] = max(s["epsilon_cumulative"], r["epsilon_cumulative"] or 0.0)
        s["epsilon_budget"] = (
            r["epsilon_budget"] if r["epsilon_budget"] is not None else s["epsilon_budget"]
        )
        s["rounds_trained"] += r["action"] == Action.TRAIN
        s["refusals"] += r["action"] == Action.REFUSE
        if r["dataset"]:
            s["datasets"].add(r["dataset"][:16])
        s["jobs"].add(r["job"])
        s["last"] = r["recorded"]
    for s in sites.values():
        if s["rounds_without_dp"]:
            s["epsilon_cumulative"] = UNBOUNDED
            s["budget_remaining"] = 0.0
        elif s["epsilon_budget"] is not None:
            s["budget_remaining"] = max(s["epsilon_budget"] - s["epsilon_cumulative"], 0.0)
        s["datasets"] = " ".join(sorted(s["datasets"]))
        s["jobs"] = " ".join(sorted(s["jobs"]))
    return list(sites.values())


def data_use(ledger: Ledger, *, site: str | None = None) -> list[dict[str, Any]]:
    """Per site and dataset fingerprint: pseudonymous patients, images, jobs, rounds, purposes."""
    uses: dict[tuple[str, str], dict[str, Any]] = {}
    for b in _bodies(ledger):
        if site and b.get("site") != site or not b.get("site"):
            continue
        dataset = (
            b.get("outputs", {}).get("dataset")
            if b.get("action") == Action.PREPROCESS
            else b.get("inputs", {}).get("dataset")
        )
        if not dataset:
            continue
        u = uses.setdefault(
            (b["site"], dataset),
            {
                "site": b["site"],
                "dataset": dataset,
                "patients_train": None,
                "patients_heldout": None,
                "images_train": None,
                "images_heldout": None,
                "jobs": set(),
                "rounds_trained": set(),
                "purposes": set(),
                "legal_bases": set(),
                "first_used": b.get("recorded"),
            },
        )
        if b["action"] == Action.PREPROCESS:
            d = b.get("details", {})
            u["patients_train"] = d.get("patients_train")
            u["patients_heldout"] = d.get("patients_heldout")
            u["images_train"] = d.get("images_or_rows_train")
            u["images_heldout"] = d.get("images_or_rows_heldout")
        if b["action"] == Action.TRAIN:
            u["rounds_trained"].add(f"{b.get('job')}/r{b.get('round')}")
        u["jobs"].add(b.get("job"))
        u["purposes"].add(b.get("purpose"))
        u["legal_bases"].add(b.get("legal_basis"))
    for u in uses.values():
        for k in ("jobs", "rounds_trained", "purposes", "legal_bases"):
            u[k] = " ".join(sorted(x for x in u[k] if x))
    return list(uses.values())


def lineage(ledger: Ledger, model: str) -> list[dict[str, Any]]:
    """A global model version back through its rounds to site updates and datasets."""
    bodies = list(_bodies(ledger))
    commits = [b for b in bodies if b.get("action") == Action.COMMIT_ROUND]
    matches = {
        b["outputs"]["global_model"]
        for b in commits
        if b.get("outputs", {}).get("global_model", "").startswith(model.lower())
    }
    if not matches:
        raise LedgerError(f"no committed round produced a model whose hash starts with {model!r}")
    if len(matches) > 1:
        raise LedgerError(f"model prefix {model!r} is ambiguous: {len(matches)} models match")
    target = matches.pop()
    by_round: dict[tuple[str, int], list[dict]] = {}
    for b in bodies:
        if b.get("round") is not None:
            by_round.setdefault((b["job"], b["round"]), []).append(b)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while target and target not in seen:
        seen.add(target)
        commit = next((b for b in commits if b["outputs"].get("global_model") == target), None)
        if commit is None:
            out.append(
                {
                    "kind": "initial model",
                    "job": "",
                    "round": 0,
                    "site": "",
                    "hash": target,
                    "detail": "no round in this ledger produced it",
                    "seq": None,
                }
            )
            break
        job, r = commit["job"], commit["round"]
        d = commit.get("details", {})
        out.append(
            {
                "kind": "global model",
                "job": job,
                "round": r,
                "site": "",
                "hash": target,
                "detail": f"participants {', '.join(d.get('participants', []))}; "
                f"weighted AUC {d.get('weighted_auc', float('nan')):.3f}",
                "seq": commit["seq"],
            }
        )
        base = None
        for b in by_round.get((job, r), []):
            if b.get("action") == Action.SECURE_AGGREGATE:
                out.append(
                    {
                        "kind": "aggregate",
                        "job": job,
                        "round": r,
                        "site": "",
                        "hash": b["outputs"].get("aggregate", ""),
                        "detail": "weights " + json.dumps(b.get("details", {}).get("weights")),
                        "seq": b["seq"],
                    }
                )
            elif b.get("action") == Action.UPLOAD:
                out.append(
                    {
                        "kind": "site update",
                        "job": job,
                        "round": r,
                        "site": b.get("site"),
                        "hash": b["outputs"].get("artifact", ""),
                        "detail": f"{b.get('details', {}).get('samples')} samples, encrypted",
                        "seq": b["seq"],
                    }
                )
            elif b.get("action") in (Action.TRAIN, Action.REFUSE):
                p = b.get("privacy") or {}
                eps = p.get("epsilon_cumulative", p.get("epsilon_spent"))
                out.append(
                    {
                        "kind": "dataset" if b["action"] == Action.TRAIN else "refused",
                        "job": job,
                        "round": r,
                        "site": b.get("site"),
                        "hash": b.get("inputs", {}).get("dataset", ""),
                        "detail": f"epsilon cumulative {eps}" if eps is not None else "no DP",
                        "seq": b["seq"],
                    }
                )
                base = base or b.get("inputs", {}).get("global_model")
        target = base
    return out


def disclosures(
    ledger: Ledger, *, site: str | None = None, since: str | None = None, until: str | None = None
) -> list[dict[str, Any]]:
    """What left each site, to whom, and why: uploads of (encrypted, DP) model updates, shared
    evaluation metrics, and any entry naming a recipient."""
    window = _window(since, until)
    out = []
    for b in _bodies(ledger):
        if site and b.get("site") != site or not _in_window(b, *window):
            continue
        action = b.get("action")
        d = b.get("details", {})
        if b.get("recipient"):
            recipient = b["recipient"]
            description = d.get("description") or f"{action}: " + ", ".join(
                f"{k} {v[:12]}" for k, v in sorted(b.get("outputs", {}).items())
            )
        elif action == Action.UPLOAD:
            recipient = "coordinator (artifact store)"
            description = (
                f"CKKS-encrypted, clipped and noised model update "
                f"{b['outputs'].get('artifact', '')[:12]} from {d.get('samples')} "
                f"training images; {d.get('bytes')} bytes"
            )
        elif action == Action.EVALUATE:
            recipient = "coordinator and federation"
            description = (
                f"held-out metrics (AUC {d.get('auc', float('nan')):.3f}, "
                f"n={d.get('heldout')}) of model "
                f"{b.get('outputs', {}).get('global_model', '')[:12]}"
            )
        else:
            continue
        out.append(
            {
                "date": b.get("recorded"),
                "site": b.get("site") or b.get("actor"),
                "recipient": recipient,
                "description": description,
                "purpose": PURPOSES.get(b.get("purpose", ""), b.get("purpose")),
                "legal_basis": b.get("legal_basis"),
                "job": b.get("job"),
                "round": b.get("round"),
                "seq": b["seq"],
            }
        )
    return out
