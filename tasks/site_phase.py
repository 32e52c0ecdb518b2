"""What a site runs, at the site: check the instruction, then one phase of a round.

`run_site_phase(instruction, site_root)` is the whole site side. It checks the coordinator's
signature and the site's own policy BEFORE touching data (a refusal is a ledger entry), then
runs the phase's steps (`tasks.site_steps`), each recorded in the ledger under the site's own
key, and writes one site-signed `SiteReport` to the artifact store. Nothing private leaves the
site: the report holds counts, metrics, hashes and signed artifact references only.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ledger import LedgerError
from ledger.entry import Action, Outcome
from ledger.store import Ledger
from ledger.witness import WitnessError
from tasks import IntegrityError, StepError, transport
from tasks.budget import BudgetRefused
from tasks.config import plan_digest, plan_from_dict
from tasks.messages import (
    Phase,
    SiteReport,
    Status,
    message_digest,
    open_instruction,
    parse_utc,
    peek_instruction,
    write_report,
)
from tasks.record import Recorder
from tasks.site import Site, load_site
from tasks.site_run import SiteRun, step_log
from tasks.site_steps import (
    FileRef,
    clip_and_noise,
    encrypt,
    evaluate,
    preprocess,
    publish_keys,
    released_update,
    train,
    upload,
)
from tasks.witness import cosign

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s'\"():,]+)+")


def shareable(message: str) -> str:
    """An error message fit to leave the site: paths (folder names are often patient IDs)
    replaced by their last component's kind."""
    return _PATH.sub("<path>", message)[:500]


class Refused(StepError):
    """The instruction fails a check: the site refuses it before reading any data."""

    exit_code = 1


def check_instruction(site: Site, text: str, *, now: datetime | None = None) -> SiteRun:
    """Signature, plan digest, approval and policy; raise `Refused` naming what failed."""
    acc = site.settings.accepts
    try:
        instr = open_instruction(text, coordinator_key=bytes.fromhex(acc.coordinator_key))
    except IntegrityError as exc:
        raise Refused(f"the instruction's signature does not verify ({exc})") from exc
    if instr.site != site.name:
        raise Refused(f"the instruction is addressed to site '{instr.site}', not this site")
    if plan_digest(instr.plan) != instr.plan_digest:
        raise Refused("the instruction's plan does not match its federation digest")
    if site.approved(instr.plan_digest) is None:
        raise Refused(
            f"unknown federation digest {instr.plan_digest[:16]}: this site has not approved "
            "that training plan ('medfed site approve')"
        )
    try:
        fed = plan_from_dict(instr.plan)
    except StepError as exc:
        raise Refused(f"the training plan is invalid: {exc}") from exc
    if fed.name != acc.federation:
        raise Refused(f"the site accepts federation '{acc.federation}', not '{fed.name}'")
    if fed.model.kind not in acc.model_kinds:
        raise Refused(f"the site does not accept model kind '{fed.model.kind}'")
    if fed.purpose not in acc.purposes:
        raise Refused(f"the site does not accept purpose of use '{fed.purpose}'")
    me = next((s for s in fed.sites if s.name == site.name), None)
    if me is None or me.public_key != site.identity.public_key.hex():
        raise Refused("the plan does not list this site with its own public key")
    if me.kind != site.settings.kind:
        raise Refused(f"the plan lists this site as '{me.kind}', it is '{site.settings.kind}'")
    if fed.identities is None or fed.identities.coordinator != acc.coordinator_key:
        raise Refused("the plan does not pin the coordinator key this site accepts")
    if parse_utc(instr.deadline) < (now or datetime.now(UTC)):
        raise Refused(f"the instruction's deadline {instr.deadline} has passed")
    return SiteRun(site=site, instr=instr, fed=fed)


def record_refusal(site: Site, text: str, reason: str) -> SiteReport:
    """Record a refused instruction in the ledger of the plan it claims, if the site approved
    that plan, else of the plan it approved last; the refusal names no data."""
    claimed = peek_instruction(text)
    plan = site.approved(str(claimed.get("plan_digest", ""))) or site.latest_approved()
    job = str(claimed.get("job") or "unknown")
    round_number = claimed.get("round") if isinstance(claimed.get("round"), int) else 0
    attempt = claimed.get("attempt") if isinstance(claimed.get("attempt"), int) else 0
    phase = claimed.get("phase") if claimed.get("phase") in set(Phase) else Phase.PREPARE
    report = SiteReport(
        job=job,
        round=round_number,
        phase=Phase(phase),
        site=site.name,
        status=Status.REFUSED,
        instruction=message_digest(text),
        attempt=max(0, attempt),
        reason=reason,
        data={"refused": "instruction"},
    )
    step_log().warning("site %s refused an instruction: %s", site.name, reason)
    if plan is None:
        return report
    fed = plan_from_dict(plan)
    Recorder(
        ledger=Ledger(fed.ledger_url, roster=fed.roster()),
        signer=site.identity,
        job=job,
        round=round_number,
        purpose=fed.purpose,
        legal_basis=fed.legal_basis,
        site=site.name,
    ).record(
        Action.REFUSE_INSTRUCTION,
        outcome=Outcome.REFUSED,
        key=f"{job}/r{round_number}/{site.name}/{phase}/refused-{report.instruction[:16]}",
        inputs={"instruction": report.instruction},
        details={"phase": str(phase), "reason": reason},
    )
    if claimed.get("job"):
        write_report(fed.artifact_store, report, site.identity)
    return report


# A step runner: calls a step directly, or as a Prefect task (the site_round flow).
Call = Callable[..., Any]


def direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def run_site_phase(instruction: str, site_root: str | Path, *, call: Call = direct) -> SiteReport:
    """The whole site side of one phase: check, run, report (signed, to the store)."""
    site = load_site(Path(site_root))
    try:
        run = check_instruction(site, instruction)
    except Refused as exc:
        return record_refusal(site, instruction, str(exc))
    phases = {
        Phase.PREPARE: prepare_phase,
        Phase.TRAIN: train_phase,
        Phase.UPLOAD: upload_phase,
        Phase.EVALUATE: evaluate_phase,
        Phase.WITNESS: witness_phase,
    }
    try:
        if run.instr.phase != Phase.WITNESS:
            cosign(run)  # the ledger extends what this site saw; a new checkpoint cosigned
        status, reason, data = phases[run.instr.phase](run, call)
    except WitnessError as exc:
        # Written to nothing but the report: a ledger that lost or changed what this site
        # witnessed is not one to append to, train on, or charge budget against.
        reason = f"the ledger does not extend what this site witnessed: {exc}"
        step_log().error("site %s refused %s: %s", run.name, run.instr.phase, reason)
        return _report(run, instruction, Status.REFUSED, reason, {"refused": "ledger"})
    except Exception as exc:
        known = isinstance(exc, StepError | LedgerError)
        reason = shareable(str(exc)) if known else f"internal error ({type(exc).__name__})"
        # Tell the coordinator why, if the store takes it (it may be what failed); the
        # original error is what the site's run ends with.
        with contextlib.suppress(StepError):
            _report(run, instruction, Status.FAILED, reason, {})
        raise
    return _report(run, instruction, status, reason, data)


def _report(
    run: SiteRun, instruction: str, status: Status, reason: str, data: dict[str, Any]
) -> SiteReport:
    report = SiteReport(
        job=run.job,
        round=run.round,
        phase=run.instr.phase,
        site=run.name,
        status=status,
        instruction=message_digest(instruction),
        attempt=run.instr.attempt,
        reason=reason,
        data=data,
    )
    write_report(run.fed.artifact_store, report, run.site.identity)
    return report


# ---------------------------------------------------------------- phases


def prepare_phase(run: SiteRun, call: Call) -> tuple[Status, str, dict[str, Any]]:
    """Everything checkable before anyone trains: the store, the ledger, the data, the keys."""
    transport.check_writable(run.fed.artifact_store)
    run.ledger.size()  # reachable (and tables exist) before any data is read
    data = call(preprocess, run)
    out: dict[str, Any] = {
        "patients_train": data.patients_train,
        "samples_train": data.n_train,
        "dataset": data.fingerprint,
    }
    if data.ingest is not None:
        out["ingest"] = data.ingest  # counts only: which files were set aside stays here
    if run.name == run.fed.keyholder:
        out |= call(publish_keys, run)
    return Status.COMPLETED, "", out


def train_phase(run: SiteRun, call: Call) -> tuple[Status, str, dict[str, Any]]:
    data = call(preprocess, run)
    if parse_utc(run.instr.deadline) < datetime.now(UTC):
        # The coordinator has dropped this site by now: spending budget would buy nothing.
        return Status.REFUSED, "the deadline passed before training began", {"refused": "deadline"}
    trained = call(train, run, data)
    if not trained.trained:
        return (
            Status.REFUSED,
            trained.reason,
            {"refused": "budget", "epsilon": trained.epsilon, "samples": trained.n_samples},
        )
    update = call(clip_and_noise, run, trained)
    data_out: dict[str, Any] = {
        "samples": trained.n_samples,
        "epsilon": trained.epsilon,
        "base_model": trained.base_model,
        "ingest": data.ingest,
        "seconds": {"preprocess": data.seconds, "train": trained.seconds, "clip": update.seconds},
    }
    if not run.instr.cohort:  # the update stays here until the coordinator names a cohort
        return Status.COMPLETED, "", data_out
    # The coordinator named the cohort up front (every active site): mask and upload now.
    status, reason, uploaded = mask_and_upload(run, call, update)
    if status != Status.COMPLETED:
        return status, reason, uploaded | {"samples": trained.n_samples}
    seconds = data_out["seconds"] | uploaded.pop("seconds")
    return Status.COMPLETED, "", data_out | uploaded | {"seconds": seconds}


def upload_phase(run: SiteRun, call: Call) -> tuple[Status, str, dict[str, Any]]:
    """Mask and encrypt the clipped update for the instruction's cohort, then upload it."""
    return mask_and_upload(run, call, released_update(run))


def mask_and_upload(
    run: SiteRun, call: Call, update: FileRef
) -> tuple[Status, str, dict[str, Any]]:
    """The update leaves the site for the instruction's cohort: masked, encrypted, uploaded."""
    cipher = call(encrypt, run, update)
    try:
        ref, seconds = call(upload, run, cipher)
    except BudgetRefused as exc:  # the hold lapsed and the budget is gone: the update stays
        return Status.REFUSED, str(exc), {"refused": "budget"}
    return (
        Status.COMPLETED,
        "",
        {
            "update": ref.model_dump(mode="json"),
            "attempt": run.instr.attempt,
            "seconds": {"encrypt": cipher.seconds, "upload": seconds},
        },
    )


def evaluate_phase(run: SiteRun, call: Call) -> tuple[Status, str, dict[str, Any]]:
    data = call(preprocess, run)
    result = call(evaluate, run, data)
    return Status.COMPLETED, "", result


def witness_phase(run: SiteRun, call: Call) -> tuple[Status, str, dict[str, Any]]:
    """Cosign the ledger's newest checkpoint after checking it extends what the site saw."""
    return Status.COMPLETED, "", call(cosign, run)
