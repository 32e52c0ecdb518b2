"""One federated round as a Prefect flow run named `<job>-round-<n>`.

Sites run preprocess -> train -> clip_and_noise -> encrypt -> upload in parallel (task
futures); the coordinator aggregates ciphertexts; every site decrypts and evaluates; the
coordinator commits the round once every site reports the same global model version.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.config import load_config
from tasks.evaluate import Metrics, weighted
from tasks.steps import (
    RoundContext,
    clip_and_noise_task,
    commit_round_task,
    encrypt_task,
    evaluate_task,
    preprocess_task,
    secure_aggregate_task,
    train_task,
    upload_task,
)


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
    if s.message:
        lines += ["", s.message]
    return "\n".join(lines)


class Submit(Protocol):
    """Schedules a step: Prefect's `task.submit`, or a thread pool over the plain function."""

    def __call__(self, step: Any, *args: Any) -> Any: ...


def resolve(futures: dict[str, Any]) -> dict[str, Any]:
    return {key: f.result() for key, f in futures.items()}


def prefect_submit(step: Any, *args: Any) -> Any:
    return step.submit(*args)


def run_round(
    rc: RoundContext, submit: Submit, logger: logging.Logger | logging.LoggerAdapter
) -> RoundSummary:
    """One round's orchestration; the same code runs under Prefect and directly (bench)."""
    fed, job, round_number = rc.fed, rc.job, rc.round
    names = [s.name for s in fed.sites]

    prepared = {s: submit(preprocess_task, s, rc) for s in names}
    trained_f = {s: submit(train_task, s, rc, prepared[s]) for s in names}
    # Resolve upstream first: a failed step then raises its own error, not the
    # "unfinished run" of the step waiting on it.
    resolve(prepared)
    trained = resolve(trained_f)
    participants = [s for s in names if trained[s].trained]
    for s in names:
        if not trained[s].trained:
            logger.warning("site %s refused round %d: %s", s, round_number, trained[s].reason)
    if len(participants) < fed.min_sites:
        message = (
            f"budget exhausted: only {len(participants)} of {len(names)} sites can train "
            f"round {round_number}, fewer than min_sites={fed.min_sites}"
        )
        logger.warning(message)
        return RoundSummary(
            job=job,
            round=round_number,
            status="budget_exhausted",
            model_hash="",
            weighted_auc=float("nan"),
            weighted_accuracy=float("nan"),
            aggregate_seconds=0.0,
            sites=tuple(
                SiteRow(
                    site=s,
                    trained=trained[s].trained,
                    auc=float("nan"),
                    accuracy=float("nan"),
                    heldout=0,
                    epsilon=trained[s].epsilon,
                    bytes_uploaded=0,
                    seconds={},
                    note=trained[s].reason,
                )
                for s in names
            ),
            message=message,
        )

    updates = {s: submit(clip_and_noise_task, s, rc, trained[s]) for s in participants}
    ciphers = {s: submit(encrypt_task, s, rc, updates[s]) for s in participants}
    uploads = {s: submit(upload_task, s, rc, ciphers[s]) for s in participants}
    resolve(updates), resolve(ciphers)
    upload_refs = list(resolve(uploads).values())
    aggregate = submit(secure_aggregate_task, rc, upload_refs).result()
    evals = {s: submit(evaluate_task, s, rc, prepared[s], aggregate) for s in names}
    eval_refs = resolve(evals)
    version = submit(
        commit_round_task, rc, list(trained.values()), list(eval_refs.values()), aggregate
    ).result()

    overall = weighted([Metrics(auc=e.auc, accuracy=e.accuracy, n=e.n) for e in eval_refs.values()])
    rows = []
    for s in names:
        seconds = {"preprocess": prepared[s].result().seconds, "train": trained[s].seconds}
        if s in participants:
            seconds |= {
                "clip": updates[s].result().seconds,
                "encrypt": ciphers[s].result().seconds,
                "upload": uploads[s].result().seconds,
            }
        seconds["evaluate"] = eval_refs[s].seconds
        rows.append(
            SiteRow(
                site=s,
                trained=trained[s].trained,
                auc=eval_refs[s].auc,
                accuracy=eval_refs[s].accuracy,
                heldout=eval_refs[s].n,
                epsilon=trained[s].epsilon,
                bytes_uploaded=uploads[s].result().artifact.size if s in participants else 0,
                seconds=seconds,
                note=trained[s].reason,
            )
        )
    logger.info(
        "round %d committed: weighted AUC %.3f, model %s", round_number, overall.auc, version[:12]
    )
    return RoundSummary(
        job=job,
        round=round_number,
        status="committed",
        model_hash=version,
        weighted_auc=overall.auc,
        weighted_accuracy=overall.accuracy,
        aggregate_seconds=aggregate.seconds,
        sites=tuple(rows),
    )


@flow(name="federated_round", flow_run_name="{job}-round-{round_number}", persist_result=False)
def federated_round(config_path: str, job: str, round_number: int) -> RoundSummary:
    rc = RoundContext(fed=load_config(Path(config_path)), job=job, round=round_number)
    summary = run_round(rc, prefect_submit, get_run_logger())
    if summary.status == "committed":
        create_markdown_artifact(
            key=f"{job}-round-{round_number}".lower(),
            markdown=to_markdown(summary),
            description=f"Round {round_number} of job {job}",
        )
    return summary
