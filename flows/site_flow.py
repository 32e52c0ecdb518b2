"""The site's flow: `site_round`, deployed on the site's own process work pool and run by the
site's own `prefect worker`. The coordinator only starts it with a signed instruction; the
site root comes from the site's deployment, never from the coordinator.

Each step is a Prefect task (visible in the UI). Nothing is cached or persisted by Prefect:
the site reports through the artifact store, signed.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import site_steps
from tasks.site_phase import run_site_phase

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)
_STEPS = {
    fn: task(fn, name=fn.__name__, **_TASK)
    for fn in (
        site_steps.preprocess,
        site_steps.publish_keys,
        site_steps.train,
        site_steps.clip_and_noise,
        site_steps.encrypt,
        site_steps.upload,
        site_steps.evaluate,
    )
}


def as_task(fn: Any, *args: Any) -> Any:
    return _STEPS[fn](*args)


def deployment_name(site: str) -> str:
    return f"site_round/{site}"


@flow(name="site_round", persist_result=False, log_prints=False)
def site_round(instruction: str, site_root: str) -> dict[str, str]:
    report = run_site_phase(instruction, site_root, call=as_task)
    return {"status": str(report.status)}
