"""Compliance queries over the ledger's signed bodies: events, privacy spend, data use, model
lineage and an accounting of disclosures (HIPAA 45 CFR 164.528 style). Each returns a list of
flat dicts (one per table row), newest facts taken from the entries themselves, not from any
mutable side table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ledger import LedgerError, accounting
from ledger.entry import Action
from ledger.store import Ledger

PURPOSES = {
    "HRESCH": "healthcare research",
    "TREAT": "treatment",
    "HOPERAT": "healthcare operations",
    "PATRQT": "patient requested",
    "HCOMPL": "health compliance",
}


def screened(url: str, identities: Path | None = None) -> Ledger:
    """The ledger for a query: entries screened against the pinned identities (the
    federation file), else against the ledger's own enrollment entries (weaker, but it
    already ignores an actor who only registered a key of its own)."""
    from ledger.store import open_ledger

    return screen(open_ledger(url), identities)


def screen(log: Ledger, identities: Path | None = None) -> Ledger:
    """`screened` over an open ledger (a view of it: the ledger itself is not changed)."""
    from ledger.identities import COORDINATOR, enrolled_in, load_roster

    if identities is not None:
        return log.view(load_roster(identities))
    log = log.view()
    own = log.events(actor=COORDINATOR, action="register_key") + log.events(
        actor=COORDINATOR, action="enroll"
    )
    stored = log.log_identity()
    roster = enrolled_in(
        sorted(own, key=lambda b: b["seq"]), log_vkey=stored[1] if stored else None
    )
    if roster.members:
        log.roster = roster
    return log


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


UNBOUNDED = "unbounded"  # the epsilon of a site that released an update trained without DP


def _figure(eps: float | None) -> float | str | None:
    return eps if eps is None or math.isfinite(eps) else UNBOUNDED


def spend(
    ledger: Ledger, *, site: str | None = None, job: str | None = None
) -> list[dict[str, Any]]:
    """Every charge per site over time: reservations (held, released, or lapsed when the
    round died before anything left the site), releases older than reservations, and
    refusals, each with its own epsilon recomputed at the site's pinned delta."""
    bodies = list(_bodies(ledger))
    out = []
    for name, acc in sorted(accounting.accounts(bodies).items()):
        if site and name != site:
            continue
        policy = acc.effective_policy()
        for c in acc.charges:
            if job and c.job != job:
                continue
            alone = (
                accounting.epsilon(c.releases, delta=policy.delta, accountant=policy.accountant)
                if policy and c.dp
                else None
            )
            out.append(
                {
                    "site": name,
                    "job": c.job,
                    "round": c.round,
                    "reservation": c.key,
                    "population": str(c.population),
                    "state": str(c.state),
                    "dp": c.dp,
                    "epsilon_alone": _figure(alone if c.dp else math.inf),
                    "delta": c.delta,
                }
            )
    return out


def spend_summary(ledger: Ledger, *, site: str | None = None) -> list[dict[str, Any]]:
    """Per site, the figure the budget check uses: epsilon recomputed over every counted
    release and live reservation at the delta the site's policy pins (the larger of the
    training and held-out populations), beside what entries recorded."""
    out = []
    for name, acc in sorted(accounting.accounts(_bodies(ledger)).items()):
        if site and name != site:
            continue
        policy = acc.effective_policy()
        if policy is None and not acc.charges:
            continue
        figures = {"delta": policy.delta, "accountant": policy.accountant} if policy else None
        by_population = {
            p: accounting.epsilon(acc.history(p), **figures) if figures else None
            for p in accounting.Population
        }
        spent = acc.spent(**figures) if figures else None
        budget = policy.epsilon_budget if policy else None
        states = [c.state for c in acc.charges]
        out.append(
            {
                "site": name,
                "epsilon_budget": budget,
                "epsilon_spent": _figure(spent),
                "epsilon_training": _figure(
                    math.inf if acc.unbounded else by_population[accounting.Population.TRAINING]
                ),
                "epsilon_heldout": _figure(by_population[accounting.Population.HELDOUT]),
                "epsilon_recorded": acc.epsilon_recorded,
                "budget_remaining": None
                if budget is None or spent is None
                else max(budget - spent, 0.0),
                "delta": figures["delta"] if figures else None,
                "accountant": figures["accountant"] if figures else None,
                "dp_optouts": acc.dp_optouts,
                "allow_non_dp": policy.allow_non_dp if policy else None,
                "metrics_policy": str(policy.metrics) if acc.policy else "exact (before policy)",
                "exact_metric_releases": acc.exact_metrics,
                "released": states.count(accounting.State.RELEASED),
                "held": states.count(accounting.State.HELD),
                "lapsed": states.count(accounting.State.LAPSED),
                "refusals": acc.refusals,
                "policy_changes": max(acc.policies - 1, 0),
                "jobs": " ".join(sorted({c.job for c in acc.charges if c.job})),
            }
        )
    return out


def spend_timeline(ledger: Ledger, *, site: str | None = None) -> list[dict[str, Any]]:
    """Per site, in ledger order, each charge and each refusal with the site's cumulative
    epsilon after it (recomputed over the counted charges so far, as the budget check does)
    beside its budget: the spend over time. A site's last figure is its `epsilon_spent`."""
    bodies = list(_bodies(ledger))
    refusals: dict[str, list[dict[str, Any]]] = {}
    for b in bodies:
        if b.get("action") == Action.REFUSE and b.get("site") and b.get("actor") == b["site"]:
            refusals.setdefault(b["site"], []).append(b)
    out = []
    for name, acc in sorted(accounting.accounts(bodies).items()):
        if site and name != site:
            continue
        policy = acc.effective_policy()
        steps: list[tuple[int, accounting.Charge | dict[str, Any]]] = [
            (-1 if c.seq is None else c.seq, c) for c in acc.charges
        ] + [(b["seq"], b) for b in refusals.get(name, [])]
        so_far: list[accounting.Charge] = []
        cumulative: float | None = None if policy is None else 0.0
        for seq, step in sorted(steps, key=lambda s: s[0]):
            row: dict[str, Any] = {"site": name, "seq": None if seq < 0 else seq}
            if isinstance(step, accounting.Charge):
                so_far.append(step)
                if policy is not None and step.counts:
                    cumulative = accounting.spent(
                        so_far, delta=policy.delta, accountant=policy.accountant
                    )
                row |= {
                    "recorded": step.recorded,
                    "event": "charge",
                    "job": step.job,
                    "round": step.round,
                    "population": str(step.population),
                    "state": str(step.state),
                    "dp": step.dp,
                    "reason": None,
                }
            else:
                row |= {
                    "recorded": step.get("recorded"),
                    "event": "refusal",
                    "job": step.get("job"),
                    "round": step.get("round"),
                    "population": None,
                    "state": None,
                    "dp": None,
                    "reason": (step.get("details") or {}).get("reason"),
                }
            row["epsilon_cumulative"] = _figure(cumulative)
            row["epsilon_budget"] = policy.epsilon_budget if policy else None
            out.append(row)
    return out


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
                        "detail": _aggregate_detail(b.get("details", {})),
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


def latest_model(ledger: Ledger) -> str | None:
    """The global model of the last committed round, None before any."""
    latest = None
    for b in _bodies(ledger):
        if b.get("action") == Action.COMMIT_ROUND:
            latest = b.get("outputs", {}).get("global_model") or latest
    return latest


def quality(ledger: Ledger, *, job: str | None = None) -> list[dict[str, Any]]:
    """Model quality per round: each site's held-out metrics as it released them (noisy,
    exact, or withheld), and the committed round's weighted figures."""
    out = []
    for b in _bodies(ledger):
        if job and b.get("job") != job or b.get("round") is None:
            continue
        d = b.get("details", {})
        if b.get("action") == Action.EVALUATE and b.get("site") and b.get("actor") == b["site"]:
            out.append(
                {
                    "job": b["job"],
                    "round": b["round"],
                    "kind": "site",
                    "site": b["site"],
                    "auc": d.get("auc"),
                    "accuracy": d.get("accuracy"),
                    "heldout": d.get("heldout"),
                    "metrics": d.get("metrics", "exact"),
                    "global_model": b.get("outputs", {}).get("global_model"),
                    "seq": b["seq"],
                }
            )
        elif b.get("action") == Action.COMMIT_ROUND:
            out.append(
                {
                    "job": b["job"],
                    "round": b["round"],
                    "kind": "weighted",
                    "site": None,
                    "auc": d.get("weighted_auc"),
                    "accuracy": d.get("weighted_accuracy"),
                    "heldout": None,
                    "metrics": "weighted over " + ", ".join(d.get("evaluated", [])),
                    "global_model": b.get("outputs", {}).get("global_model"),
                    "seq": b["seq"],
                }
            )
    return out


# What a site did in a round, most telling first: the one word a participation grid shows.
_STATUS_ORDER = ("dropped", "refused", "declined", "aggregated", "trained", "named")


def participation(ledger: Ledger, *, job: str | None = None) -> list[dict[str, Any]]:
    """Per round and site: named in a cohort, trained, uploaded, covered by the aggregate,
    evaluated; or dropped by the coordinator, refused (budget or policy) or declined the
    instruction, with the reason its entry gives."""
    rounds: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}

    def cell(b: dict[str, Any], name: str) -> dict[str, Any]:
        return rounds.setdefault((b["job"], b["round"]), {}).setdefault(
            name,
            {"flags": set(), "reasons": [], "uploads": 0},
        )

    for b in _bodies(ledger):
        if job and b.get("job") != job or b.get("round") is None or not b.get("job"):
            continue
        action, d = b.get("action"), b.get("details", {})
        own = b.get("site") and b.get("actor") == b.get("site")
        if action == Action.COHORT:
            for name in d.get("cohort", {}):
                cell(b, name)["flags"].add("named")
        elif action == Action.SECURE_AGGREGATE:
            for c in rounds.get((b["job"], b["round"]), {}).values():
                c["flags"].discard("aggregated")
            for name in d.get("sites", []):
                cell(b, name)["flags"].add("aggregated")
        elif action == Action.DROP and b.get("site"):
            c = cell(b, b["site"])
            c["flags"].add("dropped")
            c["reasons"].append(f"dropped in {d.get('phase')}: {d.get('reason')}")
        elif own and action == Action.TRAIN and b.get("outcome") == "success":
            cell(b, b["site"])["flags"].add("trained")
        elif own and action == Action.UPLOAD:
            cell(b, b["site"])["uploads"] += 1
        elif own and action == Action.EVALUATE:
            cell(b, b["site"])["flags"].add("evaluated")
        elif own and action == Action.REFUSE:
            c = cell(b, b["site"])
            c["flags"].add("refused")
            c["reasons"].append(f"refused: {d.get('reason')}")
        elif own and action == Action.REFUSE_INSTRUCTION:
            c = cell(b, b["site"])
            c["flags"].add("declined")
            c["reasons"].append(f"declined the {d.get('phase')} instruction: {d.get('reason')}")
    out = []
    for (job_, round_), sites in rounds.items():
        for name, c in sorted(sites.items()):
            flags = c["flags"]
            out.append(
                {
                    "job": job_,
                    "round": round_,
                    "site": name,
                    "status": next((s for s in _STATUS_ORDER if s in flags), "named"),
                    "trained": "trained" in flags,
                    "uploads": c["uploads"],
                    "aggregated": "aggregated" in flags,
                    "evaluated": "evaluated" in flags,
                    "reason": "; ".join(c["reasons"]) or None,
                }
            )
    return out


def checkpoints(ledger: Ledger) -> list[dict[str, Any]]:
    """Every signed checkpoint: size, root, origin, the log key that signed it, and the
    sites that cosigned it (as stored; `ledger verify` checks the signatures)."""
    from ledger import note

    cosigned: dict[int, list[str]] = {}
    for size, witness, _line in ledger.cosignatures():
        cosigned.setdefault(size, []).append(witness)
    out = []
    for size, root, text, _proof in ledger.checkpoints():
        try:  # stored text, not yet verified: shown as the ledger holds it
            body, lines = note.split_note(text)
            origin = note.parse_checkpoint(body).origin
            signers = [note.parse_signature_line(line)[0] for line in lines]
        except LedgerError:
            origin, signers = None, []
        out.append(
            {
                "size": size,
                "root": root,
                "origin": origin,
                "signed_by": signers[0] if signers else None,
                "cosigned_by": sorted(cosigned.get(size, [])),
            }
        )
    return out


def verification(report: Any, *, vkey_pinned: bool) -> dict[str, Any]:
    """What `ledger verify --json` prints for a verified ledger (a `verify.Report`)."""
    return {
        "ok": True,
        "entries": report.entries,
        "head": report.head,
        "root": report.root,
        "actors": list(report.actors),
        "checkpoints": report.checkpoints,
        "checkpoint_size": report.checkpoint_size,
        "vkey": report.vkey,
        "vkey_pinned": vkey_pinned,
        "identities_pinned": report.identities_pinned,
        "cosignatures": report.cosignatures,
        "witnesses": list(report.witnesses),
        "personal_fields": report.personal_fields,
        "erased_fields": report.erased_fields,
    }


def integrity(
    url: str,
    *,
    roster: Any = None,
    vkey: str | None = None,
    pinned_checkpoints: tuple[str, ...] = (),
    witnesses: int = 0,
) -> dict[str, Any]:
    """`verification` of the ledger at `url`, or {"ok": False, "error": ...} naming the first
    bad entry or checkpoint (unreadable input still raises LedgerError)."""
    from ledger import VerificationError
    from ledger.verify import verify_ledger

    try:
        report = verify_ledger(
            url,
            vkey=vkey,
            roster=roster,
            pinned_checkpoints=pinned_checkpoints,
            witnesses=witnesses,
        )
    except VerificationError as exc:
        return {"ok": False, "error": str(exc)}
    return verification(report, vkey_pinned=vkey is not None or bool(roster and roster.log_vkey))


def _aggregate_detail(d: Mapping[str, Any]) -> str:
    """Which sites an aggregate covers, under which scheme and upload attempt, and weights."""
    covers = f"{d['scheme']} sum of {', '.join(d.get('sites', []))}" if "scheme" in d else ""
    attempt = f" (upload attempt {d['attempt']})" if d.get("attempt") else ""
    return f"{covers}{attempt}; weights {json.dumps(d.get('weights'))}".lstrip("; ")


def _scheme_label(scheme: object) -> str:
    """How an upload was protected, as its entry says (entries before schemes were CKKS)."""
    return {
        "masked-bfv": "pairwise-masked, BFV-encrypted",
        None: "CKKS-encrypted",
        "ckks": "CKKS-encrypted",
    }.get(scheme, f"{scheme}-encrypted")  # type: ignore[call-overload]


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
                f"{_scheme_label(d.get('scheme'))}, clipped and noised model update "
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
