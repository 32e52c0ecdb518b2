"""The site's flow: `site_round`, deployed on the site's own process work pool and run by the
site's own `prefect worker`. The coordinator only starts it with a signed instruction; the
site root comes from the worker's environment (`MEDFED_SITE_ROOT`), so no site path is ever a
flow-run parameter that the Prefect API, and so the coordinator, could read.

Each step is a Prefect task (visible in the UI). Nothing is cached or persisted by Prefect:
the site reports through the artifact store, signed.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import StepError, site_steps, witness
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
        witness.cosign,
    )
}


def as_task(fn: Any, *args: Any) -> Any:
    return _STEPS[fn](*args)


SITE_ROOT_ENV = "MEDFED_SITE_ROOT"


def deployment_name(site: str) -> str:
    return f"site_round/{site}"


@flow(name="site_round", persist_result=False, log_prints=False)
def site_round(instruction: str) -> dict[str, str]:
    root = os.environ.get(SITE_ROOT_ENV)
    if not root:
        raise StepError(f"this worker has no {SITE_ROOT_ENV}: start it in the site's environment")
    report = run_site_phase(instruction, root, call=as_task)
    return {"status": str(report.status)}
