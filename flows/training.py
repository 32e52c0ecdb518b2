"""The federated training job: pin the plan, prepare every site, run rounds, resume.

A job is pinned to its plan: the job-start entry records the plan's digest, and resuming the
job with a changed federation file is refused. Before round 1 every site runs `prepare`
(instruction and policy checks, store and ledger reachable, data ingested, key material):
a site that fails it is dropped before anyone trains, and with fewer than `min_sites` left the
job stops before anyone spends budget.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.dispatch import Dispatcher, Outcome
from flows.round import (
    RoundSummary,
    dispatcher_for,
    federated_round,
    phase_call,
    record_drops,
)
from ledger.entry import Action
from tasks import WorkFailed, secure_agg
from tasks.config import ConfigError, FederationConfig, load_config
from tasks.coordinator_steps import (
    CoordinatorRun,
    check_enrolled,
    checkpoint,
    job_start_digest,
    public_he,
)
from tasks.messages import Phase

# The CLI listens here to print one table per round; flows never print.
report_log = logging.getLogger("medfed.report")


def new_job_id(fed: FederationConfig, now: datetime | None = None) -> str:
    return f"{fed.name}-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"


def committed_rounds(run: CoordinatorRun) -> set[int]:
    return {e["round"] for e in run.ledger.events(job=run.job, action=str(Action.COMMIT_ROUND))}


def _job_for_this_run(config_path: str, job: str | None) -> str:
    """An explicit job id, else one derived from the run's scheduled start: stable when the
    operator retries the flow run from the UI, so a retry resumes the same job."""
    if job:
        return job
    scheduled = flow_run.scheduled_start_time
    return new_job_id(
        load_config(Path(config_path)), scheduled.astimezone(UTC) if scheduled else None
    )


def _run_name() -> str:
    params = flow_run.parameters
    return _job_for_this_run(params["config_path"], params.get("job"))


def start_job(run: CoordinatorRun) -> None:
    """The job-start entry pins the plan; a resumed job must present the same one."""
    pinned = job_start_digest(run.ledger, run.job)
    if pinned is not None and pinned != run.digest:
        raise ConfigError(
            f"job {run.job} was started with federation digest {pinned[:16]}, but the "
            f"federation file now gives {run.digest[:16]}: restore the file, or start a new "
            "job (omit --job)"
        )
    run.fed.check_runnable()
    check_enrolled(run.ledger, run.fed)
    fed = run.fed
    run.recorder().record(
        Action.JOB_START,
        key=f"{run.job}/start",
        inputs={"federation": run.digest},
        details={
            "sites": [s.name for s in fed.sites],
            "rounds": fed.rounds,
            "model": str(fed.model.kind),
            "dp": fed.dp.model_dump(mode="json"),
            "min_sites": fed.min_sites,
            "secure_aggregation": secure_agg.parameters(fed.secure_aggregation, fed.dp),
        },
    )


def prepare_sites(run: CoordinatorRun, sites_dir: str | None, logger) -> dict:
    """Every site's `prepare` phase; returns (and keeps) the job state rounds start from."""
    names = [s.name for s in run.fed.sites]
    outcomes = dispatcher_for(sites_dir).run(phase_call(run, Phase.PREPARE, names), names)
    dropped = record_drops(run, outcomes, Phase.PREPARE, logger)
    active = [s for s in names if outcomes[s].outcome == Outcome.COMPLETED]
    holder = run.fed.keyholder
    if holder not in active:
        raise WorkFailed(
            f"the key-holding site {holder} did not prepare "
            f"({dropped.get(holder, 'no report')}); nobody trained"
        )
    if len(active) < run.fed.min_sites:
        raise WorkFailed(
            f"only {len(active)} of {len(names)} sites prepared, fewer than min_sites="
            f"{run.fed.min_sites} (dropped: {', '.join(sorted(dropped))}); nobody trained"
        )
    keys = outcomes[holder].report.data  # type: ignore[union-attr]
    state = {
        "active": active,
        "dropped": dropped,
        # Training samples per site: each round's cohort is named (with them) before training.
        "samples": {s: int(outcomes[s].report.data["samples_train"]) for s in active},  # type: ignore[union-attr]
        "he_public": keys["he_public"],
        "he_sealed": keys.get("he_sealed", {}),
    }
    public_he(run, state)  # checks the key holder's signature; keeps the public context
    run.paths.save_state(run.job, "prepare", state)
    return state


def witness(
    run: CoordinatorRun,
    dispatcher: Dispatcher,
    sites: list[str],
    logger: logging.Logger | logging.LoggerAdapter,
) -> list[str]:
    """Every site checks the checkpoint just signed (the job's end) against the one it cosigned
    last, then cosigns it (C2SP tlog-cosignature); a round's checkpoint is cosigned as the
    next round's phases begin. Returns the sites that cosigned; a site that finds the ledger
    does not extend what it saw fails the job."""
    outcomes = dispatcher.run(phase_call(run, Phase.WITNESS, sites), sites)
    cosigned = [s for s in sites if outcomes[s].outcome == Outcome.COMPLETED]
    objections = []
    for s in sites:
        o = outcomes[s]
        if o.outcome == Outcome.COMPLETED:
            continue
        logger.warning("site %s did not cosign the checkpoint: %s", s, o.reason or o.outcome)
        if o.report is not None and o.report.data.get("refused") == "ledger":
            objections.append(s)
    logger.info("ledger checkpoint cosigned by %d of %d sites", len(cosigned), len(sites))
    if objections:
        raise WorkFailed(
            f"sites {', '.join(objections)} found that the ledger does not extend the "
            "checkpoint they cosigned: it was truncated or rewritten (run `medfed ledger verify`)"
        )
    return cosigned


@flow(name="federated_training", flow_run_name=_run_name, persist_result=False)
def federated_training(
    config_path: str, job: str | None = None, sites_dir: str | None = None
) -> list[RoundSummary]:
    """Run (or resume) `job`: rounds already committed in the ledger are skipped.

    `sites_dir`: run the sites in this process from their roots under this folder (demo,
    tests); without it, each site's own worker runs its `site_round` deployment."""
    logger = get_run_logger()
    fed = load_config(Path(config_path))
    job = _job_for_this_run(config_path, job)
    run = CoordinatorRun(fed=fed, job=job, round=0)
    start_job(run)
    state = prepare_sites(run, sites_dir, logger)
    done = committed_rounds(run)
    summaries: list[RoundSummary] = []
    status = "completed"
    for r in range(1, fed.rounds + 1):
        if r in done:
            logger.info("round %d of job %s is already committed; skipping", r, job)
            continue
        summary = federated_round(config_path, job, r, sites_dir)
        summaries.append(summary)
        report_log.info("round %d", r, extra={"round_summary": summary})
        if summary.status == "budget_exhausted":
            status = "budget_exhausted"
            break
        if summary.dropped:
            # A site that timed out or failed sits out the rest of this run (a resume or a
            # retry asks it again), so one dead site costs one timeout, not one per round.
            state["active"] = [s for s in state["active"] if s not in summary.dropped]
            run.paths.save_state(job, "prepare", state)
    run.recorder().record(
        Action.JOB_END,
        key=f"{job}/end",
        details={"status": status, "rounds_run": [s.round for s in summaries]},
    )
    checkpoint(run)
    witness(run, dispatcher_for(sites_dir), state["active"], logger)
    return summaries
