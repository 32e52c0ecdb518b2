"""Real processes on one machine: a Prefect server on a free loopback port and one process
worker per site, each in its own process group, all stopped on exit. Used by the benchmark and
the integration tests (`deploy/local-federation.sh` does the same from the shell)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tasks import WorkFailed

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads_per_site(sites: int) -> dict[str, str]:
    """Sites sharing one machine split its cores: each worker's torch and BLAS get their share.
    Left alone, each process starts one thread per core, and three sites' spin-waiting thread
    pools on two cores made a round 4-5x slower than the same sites as threads of one process."""
    n = str(max(1, (os.cpu_count() or 1) // max(1, sites)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def worker_env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # A process worker polls every 10 s by default; a round waits on that twice per site.
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        **extra,
    }


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        kill_tree(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), so a killed worker takes its flow runs along."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


@contextmanager
def prefect_server(home: Path, *, timeout: float = 180) -> Iterator[str]:
    """A Prefect server with its own database under `home`; yields its API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = open(home / "server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=worker_env(api, home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise WorkFailed(
                        f"the Prefect server did not start (see {home}/server.log)"
                    ) from None
                time.sleep(0.5)
        yield api
    finally:
        _stop(proc)
        log.close()


@contextmanager
def worker(pool: str, api: str, home: Path, **env: str) -> Iterator[subprocess.Popen]:
    """A process worker on `pool` (the site's own), in its own process group."""
    log = open(home / f"worker-{pool}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
        env=worker_env(api, home, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        _stop(proc)
        log.close()


@contextmanager
def local_federation(config: Path, **env: str) -> Iterator[str]:
    """A Prefect server, each site of `config` deployed from its root beside the file
    (`sites/<name>`) on its own work pool, and one worker process per site; this process
    talks to that server while the block runs. Yields the API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy_site
    from tasks.config import load_config
    from tasks.site import load_site

    fed = load_config(config)
    home = Path(config).parent / "prefect-home"
    env = threads_per_site(len(fed.sites)) | env
    with prefect_server(home) as api, temporary_settings(updates={PREFECT_API_URL: api}):
        for s in fed.sites:
            deploy_site(load_site(Path(config).parent / "sites" / s.name), f"medfed-{s.name}")
        with ExitStack() as stack:
            for s in fed.sites:
                root = str((Path(config).parent / "sites" / s.name).resolve())
                stack.enter_context(
                    worker(f"medfed-{s.name}", api, home, **env, MEDFED_SITE_ROOT=root)
                )
            yield api
