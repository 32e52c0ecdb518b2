"""One federated round as a Prefect flow run named `<job>-round-<n>`.

The coordinator sends each active site a signed `train` instruction (in parallel, with a
per-site timeout), classifies every site from its signed report (completed / refused /
timed out / failed), aggregates the ciphertexts of the sites that completed when at least
`min_sites` did, sends `evaluate`, and commits once the evaluating sites agree on the model.
Fewer than `min_sites` completed because of failures: the round FAILS, so Retry in the UI
re-runs it, reusing every site that already completed and rescheduling only the others.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.dispatch import (
    Dispatcher,
    InProcessDispatcher,
    Outcome,
    PhaseCall,
    SiteOutcome,
    WorkerDispatcher,
)
from tasks import WorkFailed
from tasks.config import Scheme, load_config
from tasks.coordinator_steps import (
    CoordinatorRun,
    aggregate,
    commit_round,
    committed_model,
    record_cohort,
    record_drop,
)
from tasks.evaluate import Metrics, weighted
from tasks.messages import GlobalModel, Phase, make_instruction, ref_of


@dataclass(frozen=True, kw_only=True)
class SiteRow:
    site: str
    trained: bool
    auc: float
    accuracy: float
    heldout: int
    epsilon: float
    bytes_uploaded: int
    seconds: dict[str, float]
    note: str = ""
    ingest: dict | None = None  # DICOM: files listed / ingested / quarantined by reason


@dataclass(frozen=True, kw_only=True)
class RoundSummary:
    job: str
    round: int
    status: str  # "committed" or "budget_exhausted"
    model_hash: str
    weighted_auc: float
    weighted_accuracy: float
    aggregate_seconds: float
    sites: tuple[SiteRow, ...]
    message: str = ""
    dropped: tuple[str, ...] = ()  # timed out or failed: left out of this job run's later rounds

    def as_dict(self) -> dict:
        return asdict(self)


def to_markdown(s: RoundSummary) -> str:
    lines = [
        f"## {s.job}, round {s.round}: {s.status}",
        "",
        "| site | trained | AUC | accuracy | held-out | epsilon | bytes up | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s.sites:
        secs = ", ".join(f"{k} {v:.2f}" for k, v in r.seconds.items())
        lines.append(
            f"| {r.site} | {'yes' if r.trained else 'no: ' + r.note} | {r.auc:.3f} | "
            f"{r.accuracy:.3f} | {r.heldout} | {r.epsilon:.3f} | {r.bytes_uploaded:,} | {secs} |"
        )
    lines.append(
        f"| **weighted** | | **{s.weighted_auc:.3f}** | **{s.weighted_accuracy:.3f}** | | | | "
        f"secure_aggregate {s.aggregate_seconds:.2f} |"
    )
    ingest = [r for r in s.sites if r.ingest]
    if ingest:
        lines += [
            "",
            "| site | files listed | ingested | images | quarantined (by reason) |",
            "|---|---|---|---|---|",
        ]
        for r in ingest:
            i = r.ingest or {}
            reasons = ", ".join(f"{k} {v}" for k, v in i.get("quarantined_by_reason", {}).items())
            lines.append(
                f"| {r.site} | {i.get('listed')} | {i.get('ingested')} | {i.get('images')} | "
                f"{i.get('quarantined')}{' (' + reasons + ')' if reasons else ''} |"
            )
    if s.message:
        lines += ["", s.message]
    return "\n".join(lines)


def dispatcher_for(sites_dir: str | None) -> Dispatcher:
    return InProcessDispatcher(Path(sites_dir)) if sites_dir else WorkerDispatcher()


# Instruction fields that differ per site, given as mappings by site.
PER_SITE = frozenset({"he_secret"})


def phase_call(run: CoordinatorRun, phase: Phase, sites: list[str], **refs: Any) -> PhaseCall:
    """Signed instructions for `sites`; refs that differ per site are mappings by site."""
    instructions = {}
    for site in sites:
        own = {k: (v.get(site) if k in PER_SITE else v) for k, v in refs.items()}
        instructions[site] = make_instruction(
            signer=run.identity,
            job=run.job,
            round=run.round,
            phase=phase,
            site=site,
            plan=run.plan,
            plan_digest=run.digest,
            timeout_seconds=run.fed.site_timeout_seconds,
            **own,
        )
    return PhaseCall(
        job=run.job,
        round=run.round,
        phase=phase,
        store=run.fed.artifact_store,
        instructions=instructions,
        public_keys={s: run.site_key(s) for s in sites},
        timeout=run.fed.site_timeout_seconds,
        attempt=refs.get("attempt", 0),
    )


def record_drops(
    run: CoordinatorRun,
    outcomes: dict[str, SiteOutcome],
    phase: Phase,
    logger: Any,
    *,
    attempt: int = 0,
) -> dict[str, str]:
    """Sites that timed out, failed or refused the instruction: a ledger entry each."""
    dropped = {}
    for site, o in sorted(outcomes.items()):
        budget_refusal = o.outcome == Outcome.REFUSED and (
            o.report and o.report.data.get("refused") == "budget"
        )
        if o.outcome == Outcome.COMPLETED or budget_refusal:
            continue
        reason = f"{o.outcome}: {o.reason}" if o.reason else str(o.outcome)
        logger.warning("site %s dropped from %s of round %d: %s", site, phase, run.round, reason)
        label = f"{phase}-a{attempt}" if attempt else str(phase)
        record_drop(run, site, label, str(o.outcome), o.reason)
        dropped[site] = reason
    return dropped


def site_refs(prepared: dict[str, Any]) -> dict[str, Any]:
    """The key-set references every instruction after `prepare` carries."""
    return {
        "he_public": ref_of(prepared.get("he_public")),
        "he_secret": {s: ref_of(r) for s, r in prepared.get("he_sealed", {}).items()},
    }


def global_model(run: CoordinatorRun) -> GlobalModel:
    """The model round `run.round` starts from, with every aggregate that built it."""
    aggregates, model = [], ""
    for k in range(1, run.round):
        committed = committed_model(run, k)
        if committed is None:
            raise WorkFailed(f"round {k} of job {run.job} is not committed; run it first")
        model, ref = committed
        aggregates.append(ref)
    return GlobalModel(round=run.round - 1, model_hash=model, aggregates=tuple(aggregates))


def upload_cohort(
    run: CoordinatorRun,
    dispatcher: Dispatcher,
    cohort: dict[str, int],
    refs: dict[str, Any],
    dropped: dict[str, str],
    logger: Any,
    *,
    after: int = -1,
) -> tuple[dict[str, SiteOutcome], dict[str, int], int]:
    """Ask the sites that trained to mask, encrypt and upload for exactly that cohort. When
    one drops after the others masked, its masks would not cancel: under masked BFV, run the
    upload again among the sites left, with fresh masks (training is not redone; the update
    is charged once). Each attempt's cohort is on the ledger before anyone masks for it.
    Returns the uploads, the cohort they cover and its attempt; `dropped` grows in place."""
    masked = run.fed.secure_aggregation.scheme == Scheme.MASKED_BFV
    attempt = after
    while len(cohort) >= run.fed.min_sites:
        attempt = attempt_for(run, cohort, after=attempt)
        record_cohort(run, cohort, attempt)
        sites = sorted(cohort)
        call = phase_call(run, Phase.UPLOAD, sites, cohort=cohort, attempt=attempt, **refs)
        uploads = dispatcher.run(call, sites)
        dropped |= record_drops(run, uploads, Phase.UPLOAD, logger, attempt=attempt)
        left = {s: n for s, n in cohort.items() if uploads[s].outcome == Outcome.COMPLETED}
        if len(left) == len(cohort) or (not masked and len(left) >= run.fed.min_sites):
            return uploads, left, attempt
        if len(left) >= run.fed.min_sites:
            logger.warning(
                "round %d: %s did not upload after the others masked; masking again among %s",
                run.round,
                ", ".join(sorted(set(cohort) - set(left))),
                ", ".join(sorted(left)),
            )
        cohort = left
    raise WorkFailed(
        f"round {run.round}: only {len(cohort)} sites uploaded, fewer than min_sites="
        f"{run.fed.min_sites}; the trained updates are kept: retry the round"
    )


def planned_cohort(
    run: CoordinatorRun, prepared: dict[str, Any], active: list[str]
) -> tuple[dict[str, int] | None, int]:
    """Every active site with the training samples it prepared, recorded as this round's
    first cohort (None for a job prepared before cohorts were named up front)."""
    samples = prepared.get("samples")
    if samples is None:
        return None, -1
    cohort = {s: int(samples[s]) for s in active}
    attempt = attempt_for(run, cohort, after=-1)
    record_cohort(run, cohort, attempt)
    return cohort, attempt


def attempt_for(run: CoordinatorRun, cohort: dict[str, int], *, after: int) -> int:
    """The first attempt after `after` that is new, or already recorded for this very cohort
    (a retried round reuses its uploads): a recorded cohort is never changed."""
    attempt = after + 1
    while (prior := run.recorder().prior(f"cohort-a{attempt}")) is not None:
        if prior["details"].get("cohort") == dict(sorted(cohort.items())):
            return attempt
        attempt += 1
    return attempt


def run_round(
    run: CoordinatorRun,
    dispatcher: Dispatcher,
    prepared: dict[str, Any],
    logger: logging.Logger | logging.LoggerAdapter,
) -> RoundSummary:
    """One round's orchestration, the same under Prefect and in the benchmark."""
    fed, job, r = run.fed, run.job, run.round
    active: list[str] = list(prepared["active"])
    refs = site_refs(prepared)
    start_from = global_model(run)

    # The cohort is named before training, so the sites mask and upload in the same phase;
    # when one does not complete, the others mask again for a new cohort (upload phase).
    planned, attempt = planned_cohort(run, prepared, active)
    trained = dispatcher.run(
        phase_call(
            run,
            Phase.TRAIN,
            active,
            global_model=start_from,
            cohort=planned,
            attempt=max(attempt, 0),
            **refs,
        ),
        active,
    )
    dropped = record_drops(run, trained, Phase.TRAIN, logger)
    done = [s for s in active if trained[s].outcome == Outcome.COMPLETED]
    refused = [s for s in active if s not in done and s not in dropped]
    for s in refused:
        logger.warning("site %s refused round %d: %s", s, r, trained[s].reason)
    if len(done) < fed.min_sites:
        if dropped:
            raise WorkFailed(
                f"round {r}: only {len(done)} of {len(active)} sites completed training, fewer "
                f"than min_sites={fed.min_sites} (dropped: {', '.join(sorted(dropped))}); the "
                "completed sites are kept: retry the round"
            )
        message = (
            f"budget exhausted: only {len(done)} of {len(active)} sites can train "
            f"round {r}, fewer than min_sites={fed.min_sites}"
        )
        logger.warning(message)
        return RoundSummary(
            job=job,
            round=r,
            status="budget_exhausted",
            model_hash="",
            weighted_auc=float("nan"),
            weighted_accuracy=float("nan"),
            aggregate_seconds=0.0,
            sites=tuple(_row(s, trained[s], None) for s in active),
            message=message,
        )

    public = run.paths.he_public.read_bytes() if run.paths.he_public.exists() else None
    if public is None:
        from tasks.coordinator_steps import public_he

        public = public_he(run, prepared)
    masked = fed.secure_aggregation.scheme == Scheme.MASKED_BFV
    if planned is not None and (set(done) == set(planned) or not masked):
        # Every planned site uploaded, or nothing is masked: its uploads are summed as they are.
        uploads, cohort = trained, {s: planned[s] for s in done}
    else:
        cohort = {s: int(trained[s].report.data["samples"]) for s in done}  # type: ignore[union-attr]
        uploads, cohort, attempt = upload_cohort(
            run, dispatcher, cohort, refs, dropped, logger, after=attempt
        )
    agg = aggregate(run, [uploads[s].report for s in cohort], cohort, attempt, public)
    evaluators = [s for s in active if s not in dropped]
    evals = dispatcher.run(
        phase_call(
            run, Phase.EVALUATE, evaluators, global_model=start_from, aggregate=agg.artifact, **refs
        ),
        evaluators,
    )
    dropped |= record_drops(run, evals, Phase.EVALUATE, logger)
    evaluated = [s for s in evaluators if evals[s].outcome == Outcome.COMPLETED]
    if not evaluated:
        raise WorkFailed(f"round {r}: no site evaluated the aggregate; retry the round")
    reports = [evals[s].report for s in evaluated]
    version = commit_round(
        run,
        trained=sorted(agg.weights),  # the sites whose updates the aggregate holds
        refused=refused,
        dropped=dropped,
        evaluations=reports,
        aggregate_ref=agg,
    )
    overall = weighted(
        [
            Metrics(auc=e.data["auc"], accuracy=e.data["accuracy"], n=e.data["heldout"])
            for e in reports
        ]
    )
    logger.info("round %d committed: weighted AUC %.3f, model %s", r, overall.auc, version[:12])
    return RoundSummary(
        job=job,
        round=r,
        status="committed",
        model_hash=version,
        weighted_auc=overall.auc,
        weighted_accuracy=overall.accuracy,
        aggregate_seconds=agg.seconds,
        sites=tuple(
            _row(s, trained[s], evals.get(s), dropped.get(s, ""), uploads.get(s)) for s in active
        ),
        dropped=tuple(sorted(dropped)),
    )


def _row(
    site: str,
    trained: SiteOutcome,
    evaluated: SiteOutcome | None,
    note: str = "",
    uploaded: SiteOutcome | None = None,
) -> SiteRow:
    t = trained.report.data if trained.report else {}
    e = evaluated.report.data if evaluated and evaluated.report else {}
    u = uploaded.report.data if uploaded and uploaded.report else {}
    return SiteRow(
        site=site,
        trained=trained.outcome == Outcome.COMPLETED,
        auc=e.get("auc", float("nan")),
        accuracy=e.get("accuracy", float("nan")),
        heldout=e.get("heldout", 0),
        epsilon=float("nan") if t.get("epsilon") is None else float(t["epsilon"]),  # None: no DP
        bytes_uploaded=int((u.get("update") or {}).get("size", 0)),
        seconds=dict(t.get("seconds", {}))
        | dict(u.get("seconds", {}))
        | dict(e.get("seconds", {})),
        note=note or trained.reason,
        ingest=t.get("ingest"),
    )


@flow(name="federated_round", flow_run_name="{job}-round-{round_number}", persist_result=False)
def federated_round(
    config_path: str, job: str, round_number: int, sites_dir: str | None = None
) -> RoundSummary:
    fed = load_config(Path(config_path))
    run = CoordinatorRun(fed=fed, job=job, round=round_number)
    prepared = run.paths.load_state(job, "prepare")
    if prepared is None:
        raise WorkFailed(f"job {job} has not been prepared; run the training flow")
    summary = run_round(run, dispatcher_for(sites_dir), prepared, get_run_logger())
    if summary.status == "committed":
        create_markdown_artifact(
            key=f"{job}-round-{round_number}".lower(),
            markdown=to_markdown(summary),
            description=f"Round {round_number} of job {job}",
        )
    return summary
