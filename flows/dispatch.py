"""How the coordinator reaches the sites: one phase at many sites, in parallel, with a timeout.

`WorkerDispatcher` starts each site's `site_round` deployment with `run_deployment` (the site's
own worker runs it, next to its data) and cancels a run that outlives the timeout.
`InProcessDispatcher` runs the same site code in threads of this process, for the demo, the
tests and the benchmark. Both pass the same signed instruction and both classify a site from
the same signed report in the artifact store, so the boundary is checked either way.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.site_flow import deployment_name
from tasks import StepError
from tasks.messages import Phase, SiteReport, Status, read_report
from tasks.site_phase import run_site_phase

log = logging.getLogger("medfed.dispatch")


class Outcome(StrEnum):
    COMPLETED = "completed"
    REFUSED = "refused"
    TIMED_OUT = "timed_out"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class SiteOutcome:
    site: str
    outcome: Outcome
    report: SiteReport | None
    reason: str = ""
    reused: bool = False


@dataclass(frozen=True, kw_only=True)
class PhaseCall:
    """One phase for many sites: the signed instructions and where reports land."""

    job: str
    round: int
    phase: Phase
    store: str
    instructions: Mapping[str, str]  # site -> signed instruction
    public_keys: Mapping[str, bytes]  # site -> Ed25519 key its report must be signed with
    timeout: float
    attempt: int = 0  # upload phase: a new attempt after a dropout


class Dispatcher(Protocol):
    def run(self, call: PhaseCall, sites: list[str]) -> dict[str, SiteOutcome]: ...


def signed_report(call: PhaseCall, site: str) -> SiteReport | None:
    try:
        return read_report(
            call.store,
            job=call.job,
            round=call.round,
            site=site,
            phase=call.phase,
            public_key=call.public_keys[site],
            attempt=call.attempt,
        )
    except StepError as exc:
        log.warning("site %s: its report is unusable: %s", site, exc)
        return None


def classify(call: PhaseCall, site: str, *, finished: bool, error: str = "") -> SiteOutcome:
    """A site's outcome from its signed report (never from what Prefect returned)."""
    report = signed_report(call, site)
    if not finished:
        return SiteOutcome(
            site=site,
            outcome=Outcome.TIMED_OUT,
            report=None,
            reason=f"no report within {call.timeout:g} s",
        )
    if report is None:
        return SiteOutcome(
            site=site, outcome=Outcome.FAILED, report=None, reason=error or "no signed report"
        )
    kind = {
        Status.COMPLETED: Outcome.COMPLETED,
        Status.REFUSED: Outcome.REFUSED,
        Status.FAILED: Outcome.FAILED,
    }[report.status]
    return SiteOutcome(site=site, outcome=kind, report=report, reason=report.reason)


def reusable(call: PhaseCall, site: str) -> SiteOutcome | None:
    """A site that already completed this phase (an earlier attempt of the round) is reused,
    not asked again."""
    if call.phase == Phase.WITNESS:
        return None  # a newer checkpoint may need cosigning; cosigning again is harmless
    report = signed_report(call, site)
    if report is None or report.status != Status.COMPLETED:
        return None
    return SiteOutcome(site=site, outcome=Outcome.COMPLETED, report=report, reused=True)


# ---------------------------------------------------------------- in process


@task(
    name="site_phase", task_run_name="{phase}-{site}", cache_policy=NO_CACHE, persist_result=False
)
def site_phase_task(instruction: str, site_root: str, site: str, phase: str) -> str:
    return str(run_site_phase(instruction, site_root).status)


@dataclass(frozen=True)
class InProcessDispatcher:
    """Sites as threads of this process, each reading only its own root under `sites_dir`:
    Prefect tasks inside a flow run, a plain thread pool outside one (the benchmark)."""

    sites_dir: Path

    def run(self, call: PhaseCall, sites: list[str]) -> dict[str, SiteOutcome]:
        from prefect.context import FlowRunContext

        in_flow = FlowRunContext.get() is not None
        results: dict[str, SiteOutcome] = {}
        pending: dict[str, Any] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, len(sites)))
        try:
            for site in sites:
                if (done := reusable(call, site)) is not None:
                    results[site] = done
                    continue
                args = (call.instructions[site], str(self.sites_dir / site))
                pending[site] = (
                    site_phase_task.submit(*args, site, str(call.phase))
                    if in_flow
                    else pool.submit(run_site_phase, *args)
                )
            deadline = time.monotonic() + call.timeout
            for site, future in pending.items():
                remaining = max(0.0, deadline - time.monotonic())
                results[site] = _settle(call, site, future, remaining)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return results


def _settle(call: PhaseCall, site: str, future: Any, timeout: float) -> SiteOutcome:
    try:
        if isinstance(future, Future):
            future.result(timeout=timeout)
        else:
            future.wait(timeout=timeout)
            if not future.state.is_final():
                return classify(call, site, finished=False)
            future.result()
        return classify(call, site, finished=True)
    except FutureTimeout:
        return classify(call, site, finished=False)
    except Exception as exc:  # the site's own error: its signed report says why
        return classify(call, site, finished=True, error=type(exc).__name__)


# ---------------------------------------------------------------- Prefect workers


@task(name="dispatch", task_run_name="{phase}-{site}", cache_policy=NO_CACHE, persist_result=False)
def dispatch_task(instruction: str, site: str, phase: str, timeout: float, run_name: str) -> bool:
    """Start the site's deployment and wait; True when its run reached a final state."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    flow_run = run_deployment(
        name=deployment_name(site),
        parameters={"instruction": instruction},
        timeout=timeout,
        poll_interval=1,
        flow_run_name=run_name,
        as_subflow=True,
    )
    if flow_run.state is not None and flow_run.state.is_final():
        return True
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    return False


@dataclass(frozen=True)
class WorkerDispatcher:
    """Sites as Prefect deployments `site_round/<site>` run by each site's own worker."""

    def run(self, call: PhaseCall, sites: list[str]) -> dict[str, SiteOutcome]:
        from prefect.context import FlowRunContext

        in_flow = FlowRunContext.get() is not None
        pool = ThreadPoolExecutor(max_workers=max(1, len(sites)))
        results: dict[str, SiteOutcome] = {}
        futures: dict[str, Any] = {}
        for site in sites:
            if (done := reusable(call, site)) is not None:
                results[site] = done
                continue
            args = (
                call.instructions[site],
                site,
                str(call.phase),
                call.timeout,
                f"{call.job}-r{call.round}-{site}-{call.phase}"
                + (f"-a{call.attempt}" if call.attempt else ""),
            )
            # Outside a flow (the benchmark), Prefect's settings (the API URL) live in context
            # variables: each thread runs in a copy of this one's.
            futures[site] = (
                dispatch_task.submit(*args)
                if in_flow
                else pool.submit(contextvars.copy_context().run, dispatch_task.fn, *args)
            )
        pool.shutdown(wait=False)
        for site, future in futures.items():
            try:
                finished = bool(future.result())
                results[site] = classify(call, site, finished=finished)
            except Exception as exc:  # e.g. the site never deployed site_round
                results[site] = classify(
                    call, site, finished=True, error=f"{type(exc).__name__}: {exc}"[:300]
                )
        return results
