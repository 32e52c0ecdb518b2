"""The coordinator's steps: register sites, drop the ones that failed, name each upload
attempt's cohort, aggregate ciphertexts from public material only, commit the round. Each is
recorded in the ledger under the coordinator's key with the idempotency key
`job/r<round>/coordinator/<step>`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ledger.entry import Action, Outcome
from ledger.keys import Identity
from ledger.store import Ledger
from tasks import WorkFailed, secure_agg, transport
from tasks.config import ConfigError, FederationConfig, Scheme, SiteEntry, plan_digest
from tasks.enrollment import read_enrollment
from tasks.evaluate import Metrics, weighted
from tasks.keyring import COORDINATOR, CoordinatorPaths, coordinator_identity, log_identity
from tasks.messages import SiteReport, keys_job, ref_of
from tasks.record import Recorder, step_key
from tasks.strategy import FedAvg


@dataclass(frozen=True, kw_only=True)
class CoordinatorRun:
    """The coordinator's view of one round of one job (round 0: the job's prepare phase)."""

    fed: FederationConfig
    job: str
    round: int

    @cached_property
    def paths(self) -> CoordinatorPaths:
        return CoordinatorPaths(root=self.fed.coordinator_root)

    @cached_property
    def identity(self) -> Identity:
        return coordinator_identity(self.paths)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.fed.ledger_url, roster=self.fed.roster())

    @cached_property
    def plan(self) -> dict[str, Any]:
        return self.fed.plan()

    @cached_property
    def digest(self) -> str:
        return plan_digest(self.plan)

    def recorder(self) -> Recorder:
        return Recorder(
            ledger=self.ledger,
            signer=self.identity,
            job=self.job,
            round=self.round,
            purpose=self.fed.purpose,
            legal_basis=self.fed.legal_basis,
        )

    def site_key(self, name: str) -> bytes:
        return bytes.fromhex(self.fed.site(name).public_key)


# ---------------------------------------------------------------- registration


def site_entry_from_enrollment(path: Path) -> SiteEntry:
    doc = read_enrollment(path)
    return SiteEntry(
        name=doc["site"], kind=doc["kind"], public_key=doc["public_key"], kex_key=doc["kex_key"]
    )


def site_entry_toml(entry: SiteEntry) -> str:
    return (
        "\n[[sites]]\n"
        f'name = "{entry.name}"\n'
        f'kind = "{entry.kind}"\n'
        f'public_key = "{entry.public_key}"\n'
        f'kex_key = "{entry.kex_key}"\n'
    )


def record_enrollment(
    ledger: Ledger, identity: Identity, entry: SiteEntry, federation: str
) -> None:
    """The registration is a ledger entry, signed by the coordinator, naming the site's keys."""
    Recorder(ledger=ledger, signer=identity, job=f"{federation}-enrollment", round=0).record(
        Action.ENROLL,
        site=entry.name,
        key=f"{federation}/enroll/{entry.name}/{entry.public_key[:16]}",
        details={
            "role": "site",
            "site": entry.name,
            "kind": str(entry.kind),
            "public_key": entry.public_key,
            "kex_key": entry.kex_key,
        },
    )


def record_role_enrollment(
    ledger: Ledger, identity: Identity, federation: str, *, role: str, name: str, key: str
) -> None:
    """A non-site identity (the DPO) enrolled on the ledger, signed by the coordinator."""
    Recorder(ledger=ledger, signer=identity, job=f"{federation}-enrollment", round=0).record(
        Action.ENROLL,
        key=f"{federation}/enroll/{role}/{name}/{key[:16]}",
        details={"role": role, "name": name, "public_key": key},
    )


def check_enrolled(ledger: Ledger, fed: FederationConfig) -> None:
    """Every site of the federation file is registered on the ledger with the same key."""
    enrolled = {
        (e["details"].get("site"), e["details"].get("public_key"))
        for e in ledger.events(action=str(Action.ENROLL), actor=COORDINATOR)
    }
    for s in fed.sites:
        if (s.name, s.public_key) not in enrolled:
            raise ConfigError(
                f"site '{s.name}' is not registered on the ledger with the key in the federation "
                "file: register its enrollment file with 'medfed register'"
            )


# ---------------------------------------------------------------- drops


def record_drop(run: CoordinatorRun, site: str, phase: str, status: str, reason: str) -> None:
    run.recorder().record(
        Action.DROP,
        key=step_key(run.job, run.round, COORDINATOR, f"drop-{site}-{phase}"),
        outcome=Outcome.FAILURE,
        site=site,
        details={"phase": phase, "status": status, "reason": reason},
    )


# ---------------------------------------------------------------- aggregate


@dataclass(frozen=True, kw_only=True)
class AggregateRef:
    artifact: transport.ArtifactRef
    weights: dict[str, float]
    seconds: float


def public_he(run: CoordinatorRun, prepared: Mapping[str, Any]) -> bytes:
    """The public encryption context, as published (and signed) by the key-holding site."""
    ref = ref_of(prepared.get("he_public"))
    if ref is None:
        raise WorkFailed("the key-holding site published no public encryption context")
    holder = run.fed.keyholder
    data = transport.fetch(
        ref,
        public_key=run.site_key(holder),
        job=keys_job(run.fed.name),
        round=0,
        kind="he_public",
        site=holder,
    )
    from ledger import keys as ledger_keys

    ledger_keys.write_secret(run.paths.he_public, data)
    return data


def record_cohort(run: CoordinatorRun, cohort: Mapping[str, int], attempt: int) -> None:
    """The cohort of one upload attempt, on the ledger before any site masks for it: every
    site checks its instruction against this entry, so all of them mask for the same set."""
    run.recorder().record(
        Action.COHORT,
        f"cohort-a{attempt}",
        details={
            "cohort": dict(sorted(cohort.items())),
            "attempt": attempt,
            "scheme": str(run.fed.secure_aggregation.scheme),
        },
    )


def aggregate(
    run: CoordinatorRun,
    reports: Sequence[SiteReport],
    cohort: Mapping[str, int],
    attempt: int,
    public: bytes,
) -> AggregateRef:
    """The ciphertext sum over one attempt's cohort, every signed update verified."""
    start = time.perf_counter()
    saved = run.paths.load_state(run.job, f"r{run.round:04d}-aggregate")
    if saved is not None and run.recorder().prior("secure_aggregate") is not None:
        return AggregateRef(
            artifact=transport.ArtifactRef.model_validate(saved["artifact"]),
            weights=saved["weights"],
            seconds=0.0,
        )
    if len(reports) < run.fed.min_sites:
        raise WorkFailed(
            f"round {run.round}: {len(reports)} updates, fewer than min_sites={run.fed.min_sites}"
        )
    if {r.site for r in reports} != set(cohort):
        raise WorkFailed(f"round {run.round}: the uploads do not cover the cohort they masked for")
    refs = {r.site: ref_of(r.data.get("update")) for r in reports}
    blobs = []
    for r in reports:
        ref = refs[r.site]
        if ref is None:
            raise WorkFailed(f"site {r.site} reported no update reference")
        blobs.append(
            transport.fetch(
                ref,
                public_key=run.site_key(r.site),
                job=run.job,
                round=run.round,
                kind="update",
                site=r.site,
            )
        )
    weights = FedAvg().weights(dict(cohort))
    backend = secure_agg.for_plan(run.fed, public)
    summed = backend.aggregate(blobs, [weights[r.site] for r in reports])
    ref = transport.publish(
        run.fed.artifact_store,
        f"{run.job}/r{run.round:04d}/aggregate.he",
        summed,
        job=run.job,
        round=run.round,
        site=COORDINATOR,
        kind="aggregate",
        signer=run.identity,
    )
    run.recorder().record(
        Action.SECURE_AGGREGATE,
        "secure_aggregate",
        inputs={site: ref_.sha256 for site, ref_ in refs.items() if ref_ is not None},
        outputs={"aggregate": ref.sha256},
        details={
            "scheme": str(backend.scheme),
            # Which set this aggregate covers: the masks cancel over exactly this cohort.
            "sites": sorted(weights),
            "attempt": attempt,
            "weights": weights,
            "weighted_at": "sites" if backend.scheme == Scheme.MASKED_BFV else "coordinator",
            "uri": ref.uri,
            "bytes": ref.size,
        },
    )
    run.paths.save_state(
        run.job,
        f"r{run.round:04d}-aggregate",
        {"artifact": ref.model_dump(mode="json"), "weights": weights},
    )
    return AggregateRef(artifact=ref, weights=weights, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------- commit


def commit_round(
    run: CoordinatorRun,
    *,
    trained: Sequence[str],
    refused: Sequence[str],
    dropped: Mapping[str, str],
    evaluations: Sequence[SiteReport],
    aggregate_ref: AggregateRef,
) -> str:
    """All evaluating sites must report the same global model; then sign a checkpoint."""
    versions = {e.data["model_hash"] for e in evaluations}
    if len(versions) != 1:
        raise WorkFailed(
            f"round {run.round}: sites decrypted different global models ({len(versions)} versions)"
        )
    version = versions.pop()
    overall = weighted(
        [
            Metrics(auc=e.data["auc"], accuracy=e.data["accuracy"], n=e.data["heldout"])
            for e in evaluations
        ]
    )
    run.recorder().record(
        Action.COMMIT_ROUND,
        "commit_round",
        inputs={"aggregate": aggregate_ref.artifact.sha256},
        outputs={"global_model": version},
        details={
            "participants": sorted(trained),
            "refused": sorted(refused),
            "dropped": dict(sorted(dropped.items())),
            "evaluated": sorted(e.site for e in evaluations),
            # As the sites released them: noisy, exact (their policy) or withheld (None).
            "metrics": {e.site: e.data.get("metrics", "exact") for e in evaluations},
            "weighted_auc": overall.auc if math.isfinite(overall.auc) else None,
            "weighted_accuracy": overall.accuracy if math.isfinite(overall.accuracy) else None,
        },
    )
    run.paths.save_state(
        run.job,
        f"r{run.round:04d}-commit",
        {"model_hash": version, "aggregate": aggregate_ref.artifact.model_dump(mode="json")},
    )
    checkpoint(run)
    return version


def checkpoint(run: CoordinatorRun) -> str:
    """Sign a checkpoint of the whole log, proven consistent with the previous one and with
    the one this log key signed last (kept in the coordinator's root, not in the database)."""
    kept = run.paths.last_checkpoint(run.fed.ledger_url)
    last = kept.read_text(encoding="utf-8") if kept.exists() else None
    signed = run.ledger.checkpoint(
        log_identity(run.paths), origin=run.fed.log_origin, last_signed=last
    )
    if signed != last:
        from ledger import keys as ledger_keys

        ledger_keys.write_secret(kept, signed.encode())  # fsync'd before the job goes on
    return signed


def committed_model(run: CoordinatorRun, round_number: int) -> tuple[str, Any] | None:
    """(model hash, aggregate reference) of a committed round, from the coordinator's state."""
    state = run.paths.load_state(run.job, f"r{round_number:04d}-commit")
    if state is None:
        return None
    return state["model_hash"], transport.ArtifactRef.model_validate(state["aggregate"])


def job_start_digest(ledger: Ledger, job: str) -> str | None:
    found = ledger.events(idempotency_key=f"{job}/start", actor=COORDINATOR)
    return found[0]["inputs"].get("federation") if found else None
