"""A site's Prefect deployment: its own process work pool, and `site_round/<site>` on it. The
site root is not a parameter: the site's worker runs with MEDFED_SITE_ROOT in its environment."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectAlreadyExists

from flows.site_flow import deployment_name, site_round
from tasks.site import Site


def ensure_work_pool(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def deploy_site(site: Site, pool: str) -> str:
    ensure_work_pool(pool)
    deployment = site_round.to_deployment(
        name=site.name,
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"medfed site {site.name}: runs one phase of a round on this site's data",
    )
    deployment.apply()
    return deployment_name(site.name)
