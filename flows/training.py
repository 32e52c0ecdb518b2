"""The federated training job: enrollment, rounds, resume, and the job's ledger entries."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.round import RoundSummary, federated_round
from ledger.entry import Action, Event
from ledger.store import Ledger
from tasks.config import FederationConfig, load_config
from tasks.keyring import (
    COORDINATOR,
    CoordinatorPaths,
    SitePaths,
    coordinator_identity,
    enroll,
    log_identity,
)

# The CLI listens here to print one table per round; flows never print.
report_log = logging.getLogger("medfed.report")


def new_job_id(fed: FederationConfig, now: datetime | None = None) -> str:
    return f"{fed.name}-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"


def enroll_federation(fed: FederationConfig) -> None:
    enroll(
        sites=[(s.name, SitePaths(root=fed.site_root / s.name)) for s in fed.sites],
        coordinator=CoordinatorPaths(root=fed.coordinator_root),
        ckks={
            "poly_modulus_degree": fed.ckks.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(fed.ckks.coeff_mod_bit_sizes),
            "global_scale_bits": fed.ckks.global_scale_bits,
        },
    )


def committed_rounds(ledger: Ledger, job: str) -> set[int]:
    return {e["round"] for e in ledger.events(job=job, action=str(Action.COMMIT_ROUND))}


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


@flow(name="federated_training", flow_run_name=_run_name, persist_result=False)
def federated_training(config_path: str, job: str | None = None) -> list[RoundSummary]:
    """Run (or resume) `job`: rounds already committed in the ledger are skipped."""
    logger = get_run_logger()
    fed = load_config(Path(config_path))
    job = _job_for_this_run(config_path, job)
    enroll_federation(fed)
    ledger = Ledger(fed.ledger_url)
    coordinator_paths = CoordinatorPaths(root=fed.coordinator_root)
    coordinator = coordinator_identity(coordinator_paths)
    ledger.append(
        Event(
            actor=COORDINATOR,
            action=Action.JOB_START,
            job=job,
            idempotency_key=f"{job}/start",
            inputs={"config": hashlib.sha256(Path(config_path).read_bytes()).hexdigest()},
            details={
                "sites": [s.name for s in fed.sites],
                "rounds": fed.rounds,
                "model": str(fed.model.kind),
                "dp": fed.dp.model_dump(mode="json"),
                "min_sites": fed.min_sites,
            },
        ),
        coordinator,
    )
    done = committed_rounds(ledger, job)
    summaries: list[RoundSummary] = []
    status = "completed"
    for r in range(1, fed.rounds + 1):
        if r in done:
            logger.info("round %d of job %s is already committed; skipping", r, job)
            continue
        summary = federated_round(config_path, job, r)
        summaries.append(summary)
        report_log.info("round %d", r, extra={"round_summary": summary})
        if summary.status == "budget_exhausted":
            status = "budget_exhausted"
            break
    ledger.append(
        Event(
            actor=COORDINATOR,
            action=Action.JOB_END,
            job=job,
            idempotency_key=f"{job}/end",
            details={"status": status, "rounds_run": [s.round for s in summaries]},
        ),
        coordinator,
    )
    ledger.checkpoint(log_identity(coordinator_paths), origin=f"medfed.local/{fed.name}")
    return summaries
