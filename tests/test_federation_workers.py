"""A real federation on one machine: a Prefect server, one process worker per site (each site
deployed from its own root), the coordinator as its own `medfed run` process, an S3-protocol
artifact store (moto's server on loopback) and the PostgreSQL ledger. One site's worker is
killed mid-round, after the others masked for a cohort that included it: they mask again for
the two of them, the round completes and the ledger names the dropped site;
a round that fails for want of sites is retried, rescheduling only the failed site and
charging nothing twice."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from flows.demo import prepare_demo
from flows.local import free_port, kill_tree, prefect_server, threads_per_site, worker
from ledger.store import Ledger
from ledger.verify import verify_ledger
from tasks.config import load_config
from tasks.site import load_site
from tasks.synthetic import ensure_demo_cohorts

pytestmark = [pytest.mark.prefect, pytest.mark.postgres]

SITES = ("lakeside", "northfield", "st-mary")
VICTIM = "northfield"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
}


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    """moto's S3 server on a loopback port, and a bucket in it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = S3_ENV | {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config
    import s3fs

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    s3fs.S3FileSystem(
        endpoint_url=endpoint, client_kwargs={"region_name": S3_ENV["AWS_DEFAULT_REGION"]}
    ).mkdir("medfed-artifacts")
    yield "s3://medfed-artifacts/fed", env
    server.stop()
    fsspec.config.conf.pop("s3", None)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def pg_ledger(postgres_url):
    schema = f"t_{uuid.uuid4().hex[:12]}"
    base = postgres_url.replace("+psycopg", "")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="module")
def federation(tmp_path_factory, s3_store, pg_ledger):
    """Sites set up in their own roots, a server, each site's deployment and worker."""
    root = tmp_path_factory.mktemp("fed")
    cohorts = ensure_demo_cohorts(tmp_path_factory.mktemp("cohorts"), seed=7)
    store, env = s3_store
    env = env | threads_per_site(len(SITES))
    config = prepare_demo(
        root,
        rounds=2,
        dp=True,
        local_epochs=2,
        epsilon_budget=100.0,  # three jobs at epsilon 2 each on one ledger
        site_budget=100.0,
        cohorts=next(iter(cohorts.values())).parent,
        ledger_url=pg_ledger,
        store=store,
        timeout=90,
    )
    home = root / "prefect-home"
    with prefect_server(home) as api:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.deploy import deploy_site

        with temporary_settings(updates={PREFECT_API_URL: api}):
            for s in SITES:
                deploy_site(load_site(root / "sites" / s), f"medfed-{s}")
        workers = {}
        contexts = {s: site_worker(root, api, home, env, s) for s in SITES}
        try:
            for s, ctx in contexts.items():
                workers[s] = ctx.__enter__()
            yield {
                "root": root,
                "config": config,
                "api": api,
                "home": home,
                "env": env,
                "workers": workers,
                "contexts": contexts,
            }
        finally:
            for ctx in contexts.values():
                ctx.__exit__(None, None, None)


def site_worker(root: Path, api: str, home: Path, env: dict, site: str):
    """The site's worker: its own pool, its own root in its environment."""
    return worker(f"medfed-{site}", api, home, **env, MEDFED_SITE_ROOT=str(root / "sites" / site))


def coordinator(fed: dict, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        **fed["env"],
        "PREFECT_API_URL": fed["api"],
        "PREFECT_HOME": str(fed["home"]),
        "COLUMNS": "120",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(fed["config"]), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def flow_runs_named(api: str, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


def kill_when_running(fed: dict, run_name: str, timeout: float = 300) -> threading.Thread:
    """Kill the victim's worker (and the flow run it started) once that run is RUNNING."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = flow_runs_named(fed["api"], run_name)
            if runs and runs[0].state and runs[0].state.is_running():
                kill_tree(fed["workers"][VICTIM].pid)
                return
            time.sleep(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def restart_victim(fed: dict) -> None:
    fed["contexts"][VICTIM].__exit__(None, None, None)
    ctx = site_worker(fed["root"], fed["api"], fed["home"], fed["env"], VICTIM)
    fed["workers"][VICTIM] = ctx.__enter__()
    fed["contexts"][VICTIM] = ctx


def test_killed_site_is_dropped_and_a_failed_round_retries_only_that_site(federation):
    fed = federation
    ledger = Ledger(load_config(fed["config"]).ledger_url)

    # 1. Kill one site's worker mid-round: the others masked and uploaded for a cohort that
    #    includes it, so they mask again, freshly, for the two of them (the upload phase);
    #    min_sites 2, the round goes on with the others.
    watcher = kill_when_running(fed, f"job-a-r1-{VICTIM}-train")
    proc = coordinator(fed, "--job", "job-a")
    output, _ = proc.communicate(timeout=900)
    watcher.join(timeout=1)
    assert proc.returncode == 0, output
    commits = ledger.events(job="job-a", action="commit_round")
    assert [c["round"] for c in commits] == [1, 2]
    for c in commits:
        assert set(c["details"]["participants"]) == set(SITES) - {VICTIM}
    assert VICTIM in commits[0]["details"]["dropped"]
    drops = ledger.events(job="job-a", action="drop")
    assert [(d["site"], d["round"], d["details"]["status"]) for d in drops] == [
        (VICTIM, 1, "timed_out")
    ]
    assert drops[0]["details"]["phase"] == "train"
    cohorts = [
        (e["details"]["attempt"], sorted(e["details"]["cohort"]))
        for e in ledger.events(job="job-a", round=1, action="cohort")
    ]
    others = sorted(set(SITES) - {VICTIM})
    assert cohorts == [(0, sorted(SITES)), (1, others)]
    (agg,) = ledger.events(job="job-a", round=1, action="secure_aggregate")
    assert (agg["details"]["sites"], agg["details"]["attempt"]) == (others, 1)
    for e in ledger.events(job="job-a", round=1, action="evaluate"):
        assert e["inputs"]["aggregate"] == agg["outputs"]["aggregate"]  # only the sum
    # Every site step is signed by the site itself.
    for e in ledger.events(job="job-a"):
        if e["action"] in (
            "preprocess",
            "train",
            "clip_and_noise",
            "encrypt",
            "upload",
            "evaluate",
        ):
            assert e["actor"] == e["site"]
    verify_ledger(ledger.url)
    # No site path reaches the Prefect API: the site root is in the worker's environment.
    (run,) = flow_runs_named(fed["api"], "job-a-r1-lakeside-train")
    assert set(run.parameters) == {"instruction"}
    assert str(fed["root"]) not in str(run.parameters)

    # 2. A round that fails (min_sites 3, the victim's worker killed mid-train) is retried:
    #    completed sites are reused, only the victim is scheduled again, nothing charged twice.
    restart_victim(fed)
    text = fed["config"].read_text().replace("min_sites = 2", "min_sites = 3")
    fed["config"].write_text(text)
    from flows.demo import assemble_federation  # the sites approve the changed plan

    header = text.split("\n[[sites]]")[0] + "\n"
    assemble_federation(
        fed["config"],
        header,
        [load_site(fed["root"] / "sites" / s) for s in SITES],
        register=False,
    )
    watcher = kill_when_running(fed, f"job-b-r1-{VICTIM}-train")
    proc = coordinator(fed, "--job", "job-b")
    output, _ = proc.communicate(timeout=900)
    watcher.join(timeout=1)
    assert proc.returncode == 1, output
    assert "resume it with" in output and "Traceback" not in output
    assert not ledger.events(job="job-b", action="commit_round")
    assert {d["site"] for d in ledger.events(job="job-b", action="drop")} == {VICTIM}

    restart_victim(fed)
    proc = coordinator(fed, "--job", "job-b")
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    assert [c["round"] for c in ledger.events(job="job-b", action="commit_round")] == [1, 2]
    trains = Counter(e["site"] for e in ledger.events(job="job-b", round=1, action="train"))
    assert trains == Counter(SITES)  # one release per site: nobody trained or paid twice
    for s in set(SITES) - {VICTIM}:
        assert len(flow_runs_named(fed["api"], f"job-b-r1-{s}-train")) == 1  # reused
    assert len(flow_runs_named(fed["api"], f"job-b-r1-{VICTIM}-train")) == 2  # rescheduled
    verify_ledger(ledger.url)
