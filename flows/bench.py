"""`medfed bench`: figures measured in one run on this machine, reported as ratios and rates.

Nothing here asserts a speed; tests never time anything. The Prefect overhead compares the
same `run_round` orchestration through Prefect task runs and through a plain thread pool
over the very same step functions, in one process, after a warm-up round that starts the
API and fills the preprocessing caches.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tasks.steps import RoundContext

from flows.demo import prepare_demo
from flows.round import RoundSummary, Submit, federated_round, run_round
from flows.training import enroll_federation, federated_training
from ledger.bench import run as ledger_bench
from ledger.store import Ledger
from tasks import StepError, models, secure_agg
from tasks.config import FederationConfig, load_config
from tasks.train import dp_step_benchmark

log = logging.getLogger("medfed.bench")


def thread_pool_submit(pool: ThreadPoolExecutor) -> Submit:
    """Run a step's plain function (`task.fn`) in the pool, resolving upstream futures there."""

    def submit(step: Any, *args: Any) -> Future:
        def call() -> Any:
            return step.fn(*[a.result() if isinstance(a, Future) else a for a in args])

        return pool.submit(call)

    return submit


@dataclass
class SpentIn:
    wall: float = 0.0  # summed over threads, so parallel calls count once each
    cpu: float = 0.0  # the calling thread's CPU time: excludes waits for the GIL and locks


@contextmanager
def time_spent_in(cls: type, *methods: str) -> Iterator[SpentIn]:
    """Accumulate the time spent in `cls.methods` (from any thread) while the block runs."""
    total = SpentIn()
    lock = threading.Lock()
    originals = {m: getattr(cls, m) for m in methods}

    def timed(fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    total.wall += time.perf_counter() - wall
                    total.cpu += time.thread_time() - cpu

        return wrapper

    for name, fn in originals.items():
        setattr(cls, name, timed(fn))
    try:
        yield total
    finally:
        for name, fn in originals.items():
            setattr(cls, name, fn)


# The bench trains three one-round jobs on one ledger (warm-up, through Prefect, direct), each
# calibrated to the demo's epsilon 2: the sites' budget must cover all three, or the timed
# rounds would be refusals.
BENCH_JOBS = 3
BENCH_EPSILON_BUDGET = 2.0 * BENCH_JOBS + 1.0


def require_every_site_trained(summary: RoundSummary, what: str) -> None:
    """A round that did not train every site would time the wrong thing: say so, don't report."""
    if summary.status != "committed" or not all(r.trained for r in summary.sites):
        raise StepError(f"bench: the {what} round did not train every site: {summary.message}")


def round_figures(config: Path) -> dict[str, float]:
    fed = load_config(config)
    start = time.perf_counter()
    (warmup,) = federated_training(str(config), "bench-warmup")  # starts the API, fills caches
    first = time.perf_counter() - start
    require_every_site_trained(warmup, "warm-up")

    with time_spent_in(Ledger, "append_many", "events", "checkpoint") as ledger_time:
        start = time.perf_counter()
        summary = federated_round(str(config), "bench-prefect", 1)
        through_prefect = time.perf_counter() - start
    require_every_site_trained(summary, "Prefect")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4 * len(fed.sites)) as pool:
        summary = run_round(
            RoundContext(fed=fed, job="bench-direct", round=1), thread_pool_submit(pool), log
        )
    direct = time.perf_counter() - start
    require_every_site_trained(summary, "direct")
    return {
        "first_job_seconds_including_prefect_startup": first,
        "round_wall_seconds": through_prefect,
        "round_direct_seconds": direct,
        "prefect_overhead_fraction": (through_prefect - direct) / through_prefect,
        # The ledger's own work (CPU time of every append, query and checkpoint) per second
        # of round; and the wall time inside those calls, summed over the sites' parallel
        # threads, which also counts waiting for the GIL while other sites train.
        "ledger_fraction_of_round_time": ledger_time.cpu / through_prefect,
        "ledger_wall_fraction_of_round_time": ledger_time.wall / through_prefect,
    }


def ckks_figures(fed: FederationConfig, *, million: int = 1_000_000) -> dict[str, float]:
    params = {
        "poly_modulus_degree": fed.ckks.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(fed.ckks.coeff_mod_bit_sizes),
        "global_scale_bits": fed.ckks.global_scale_bits,
    }
    secret = secure_agg.create_secret_context(**params)
    public = secure_agg.public_context(secret)
    rng = np.random.default_rng(0)
    n_model = models.flat_params(models.build(str(fed.model.kind), hidden=fed.model.hidden)).size
    model_blob = secure_agg.encrypt_update(public, rng.normal(0, 0.01, n_model).astype(np.float32))
    big = rng.normal(0, 0.01, million).astype(np.float32)
    start = time.perf_counter()
    blob = secure_agg.encrypt_update(public, big)
    encrypt_s = time.perf_counter() - start
    start = time.perf_counter()
    aggregate = secure_agg.weighted_sum(public, [blob, blob], [0.5, 0.5])
    aggregate_s = (time.perf_counter() - start) / 2
    start = time.perf_counter()
    secure_agg.decrypt_update(secret, aggregate)
    decrypt_s = time.perf_counter() - start
    return {
        "model_parameters": float(n_model),
        "ckks_ciphertext_bytes_per_float32_byte": len(model_blob) / (4 * n_model),
        "ckks_encrypt_seconds_per_million_params": encrypt_s * 1_000_000 / million,
        "ckks_aggregate_seconds_per_million_params_per_site": aggregate_s * 1_000_000 / million,
        "ckks_decrypt_seconds_per_million_params": decrypt_s * 1_000_000 / million,
    }


def run_benchmarks(workdir: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        config = prepare_demo(root, rounds=1, dp=True, epsilon_budget=BENCH_EPSILON_BUDGET)
        fed = load_config(config)
        enroll_federation(fed)
        figures: dict[str, Any] = {
            "machine": f"{os.cpu_count()} cpu, torch {torch.__version__}, "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        }
        figures |= round_figures(config)
        # A DP step takes `batch_size` expected patients; the demo's have 3-5 images each.
        figures |= dp_step_benchmark(
            image_size=fed.model.image_size,
            patients=fed.batch_size,
            images_per_patient=4,
            hidden=fed.model.hidden,
        )
        figures |= ckks_figures(fed)
        figures |= ledger_bench(root / "ledger-bench")
        return figures
