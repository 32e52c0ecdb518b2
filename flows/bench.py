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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.demo import prepare_demo
from flows.dispatch import InProcessDispatcher, WorkerDispatcher
from flows.round import RoundSummary, federated_round, run_round
from flows.training import federated_training, prepare_sites, start_job, witness
from ledger.bench import run as ledger_bench
from ledger.store import Ledger
from tasks import StepError, models, secure_agg
from tasks.config import FederationConfig, Scheme, SecureAggregationConfig, load_config
from tasks.coordinator_steps import CoordinatorRun
from tasks.masking import mask_context, simulated_cohort
from tasks.step_bench import dp_step_benchmark, monai_step_benchmark

log = logging.getLogger("medfed.bench")


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


# The bench trains five one-round jobs on one ledger (warm-up, through Prefect, direct, in plain
# sums, through workers), each calibrated to the demo's epsilon 2: the sites' budget must cover
# all of them, or the timed rounds would be refusals.
BENCH_JOBS = 5
BENCH_EPSILON_BUDGET = 2.0 * BENCH_JOBS + 1.0
# Local epochs of the timed rounds: sized so that an in-process round takes about a minute
# here, like real work, against which a worker's fixed cost per phase is measured.
BENCH_LOCAL_EPOCHS = 1100


def require_every_site_trained(summary: RoundSummary, what: str) -> None:
    """A round that did not train every site would time the wrong thing: say so, don't report."""
    if summary.status != "committed" or not all(r.trained for r in summary.sites):
        raise StepError(f"bench: the {what} round did not train every site: {summary.message}")


def prepared_job(fed: FederationConfig, job: str, sites_dir: Path | None) -> tuple:
    run = CoordinatorRun(fed=fed, job=job, round=0)
    start_job(run)
    state = prepare_sites(run, str(sites_dir) if sites_dir else None, log)
    return CoordinatorRun(fed=fed, job=job, round=1), state


def timed_direct_round(fed: FederationConfig, job: str, sites_dir: Path) -> float:
    """Seconds of one round of a new job, its sites as threads of this process, no Prefect."""
    run, state = prepared_job(fed, job, sites_dir)
    start = time.perf_counter()
    summary = run_round(run, InProcessDispatcher(sites_dir), state, log)
    seconds = time.perf_counter() - start
    require_every_site_trained(summary, job)
    return seconds


def timed_witness(fed: FederationConfig, job: str, dispatcher: Any) -> float:
    """Seconds for every site to check and cosign the checkpoint of round 1 of `job`."""
    sites = [s.name for s in fed.sites]
    start = time.perf_counter()
    cosigned = witness(CoordinatorRun(fed=fed, job=job, round=1), dispatcher, sites, log)
    if len(cosigned) != len(sites):
        raise StepError(f"bench: only {len(cosigned)} of {len(sites)} sites cosigned")
    return time.perf_counter() - start


def round_figures(config: Path) -> dict[str, float]:
    fed = load_config(config)
    sites_dir = config.parent / "sites"
    start = time.perf_counter()
    (warmup,) = federated_training(str(config), "bench-warmup", str(sites_dir))
    first = time.perf_counter() - start
    require_every_site_trained(warmup, "warm-up")

    prepared_job(fed, "bench-prefect", sites_dir)
    with time_spent_in(Ledger, "append_many", "events", "checkpoint") as ledger_time:
        start = time.perf_counter()
        summary = federated_round(str(config), "bench-prefect", 1, str(sites_dir))
        through_prefect = time.perf_counter() - start
    require_every_site_trained(summary, "Prefect")
    witnessed = timed_witness(fed, "bench-prefect", InProcessDispatcher(sites_dir))

    direct = timed_direct_round(fed, "bench-direct", sites_dir)
    return {
        "first_job_seconds_including_prefect_startup": first,
        "round_wall_seconds": through_prefect,
        "in_process_round_seconds": through_prefect,
        "round_direct_seconds": direct,
        "in_process_witness_seconds": witnessed,
        "prefect_overhead_fraction": (through_prefect - direct) / through_prefect,
        # The ledger's own work (CPU time of every append, query and checkpoint) per second
        # of round; and the wall time inside those calls, summed over the sites' parallel
        # threads, which also counts waiting for the GIL while other sites train.
        "ledger_fraction_of_round_time": ledger_time.cpu / through_prefect,
        "ledger_wall_fraction_of_round_time": ledger_time.wall / through_prefect,
    }


def distributed_figures(config: Path, in_process: float) -> dict[str, float]:
    """The same round through a real Prefect server and one process worker per site."""
    from flows.local import local_federation

    fed = load_config(config)
    with local_federation(config):
        prepared_job(fed, "bench-workers", None)
        start = time.perf_counter()
        summary = federated_round(str(config), "bench-workers", 1, None)
        distributed = time.perf_counter() - start
        require_every_site_trained(summary, "distributed")
        witnessed = timed_witness(fed, "bench-workers", WorkerDispatcher())
    return {
        "distributed_round_seconds": distributed,
        "distributed_over_in_process_round_ratio": distributed / in_process,
        # A job's end is followed by a witness phase (each site checks and cosigns the final
        # checkpoint): one more dispatch per site, in parallel, once per job.
        "distributed_witness_seconds": witnessed,
        # Two phases (train, evaluate) per site, run in parallel: the extra wall time of one.
        "dispatch_seconds_per_site_phase": (distributed - in_process) / 2,
    }


@dataclass(frozen=True)
class PlainSums:
    """FedAvg in the clear, behind the secure-aggregation interface: the baseline the bench
    times the scheme's round against. Never a scheme a federation can choose."""

    scheme: str = "plaintext (bench only)"

    def encrypt(self, update: np.ndarray, *, weight: float, masks: Any) -> bytes:
        return (np.asarray(update, dtype=np.float32) * weight).tobytes()

    def aggregate(self, blobs: Any, weights: Any) -> bytes:
        total = sum(np.frombuffer(b, dtype=np.float32).astype(np.float64) for b in blobs)
        return np.asarray(total, dtype=np.float32).tobytes()

    def decrypt(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, dtype=np.float32).copy()


@contextmanager
def plaintext_sums() -> Iterator[None]:
    """Every site and the coordinator of this process sum in the clear while the block runs
    (the in-process round calls `secure_agg.for_plan` at each step)."""
    original = secure_agg.for_plan
    secure_agg.for_plan = lambda fed, context: PlainSums()  # type: ignore[assignment]
    try:
        yield
    finally:
        secure_agg.for_plan = original  # type: ignore[assignment]


def plaintext_round_figures(config: Path, with_scheme: float) -> dict[str, float]:
    """The direct round again, the same way, with plain float sums instead of the scheme."""
    with plaintext_sums():
        plain = timed_direct_round(load_config(config), "bench-plaintext", config.parent / "sites")
    return {
        "plaintext_round_seconds": plain,
        "he_round_over_plaintext_round": with_scheme / plain,
    }


def scheme_figures(
    sa: SecureAggregationConfig, bound: float, *, prefix: str, million: int = 1_000_000
) -> dict[str, float]:
    """Bytes and seconds of one scheme at 1M parameters, for a 3-site cohort: encryption
    (quantization and masks included) per site, the coordinator's sum per site, decryption."""
    secret = secure_agg.create_secret(sa)
    site = secure_agg.backend(sa, secret, bound=bound)
    coordinator = secure_agg.backend(sa, secure_agg.public_of(sa, secret), bound=bound)
    names = ["site-a", "site-b", "site-c"]
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    context = mask_context(federation="bench", job="bench", round=1, attempt=0, cohort=names)
    masks = simulated_cohort({n: X25519PrivateKey.generate() for n in names}, context)
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.01, million).astype(np.float32) for _ in names]
    start = time.perf_counter()
    blobs = [
        coordinator.encrypt(u, weight=1 / 3, masks=masks[n])
        for n, u in zip(names, updates, strict=True)
    ]
    encrypt_s = (time.perf_counter() - start) / len(names)
    start = time.perf_counter()
    aggregate = coordinator.aggregate(blobs, [1 / 3] * 3)
    aggregate_s = (time.perf_counter() - start) / len(names)
    start = time.perf_counter()
    mean = site.decrypt(aggregate)
    decrypt_s = time.perf_counter() - start
    scale = 1_000_000 / million
    return {
        f"{prefix}bytes_per_float32_byte": len(blobs[0]) / (4 * million),
        f"{prefix}aggregate_bytes_per_float32_byte": len(aggregate) / (4 * million),
        f"{prefix}encrypt_seconds_per_million_params": encrypt_s * scale,
        f"{prefix}aggregate_seconds_per_million_params_per_site": aggregate_s * scale,
        f"{prefix}decrypt_seconds_per_million_params": decrypt_s * scale,
        f"{prefix}max_abs_error": float(np.max(np.abs(mean - sum(updates) / 3))),
    }


def secure_agg_figures(fed: FederationConfig) -> dict[str, float]:
    """The federation's scheme (masked BFV by default) and shared-key CKKS, side by side."""
    bound = secure_agg.clamp_bound(fed.dp)
    n_model = models.flat_params(models.from_plan(fed.model)).size
    ckks_plan = fed.secure_aggregation.model_copy(update={"scheme": Scheme.CKKS})
    return (
        {
            "model_parameters": float(n_model),
            "secure_agg_scheme": str(fed.secure_aggregation.scheme),
        }
        | scheme_figures(fed.secure_aggregation, bound, prefix="secure_agg_")
        | scheme_figures(ckks_plan, bound, prefix="ckks_")
    )


def run_benchmarks(workdir: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        config = prepare_demo(
            root,
            rounds=1,
            dp=True,
            epsilon_budget=BENCH_EPSILON_BUDGET,
            site_budget=BENCH_EPSILON_BUDGET,
            local_epochs=BENCH_LOCAL_EPOCHS,
        )
        fed = load_config(config)
        figures: dict[str, Any] = {
            "machine": f"{os.cpu_count()} cpu, torch {torch.__version__}, "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        }
        figures |= round_figures(config)
        figures |= plaintext_round_figures(config, figures["round_direct_seconds"])
        figures |= distributed_figures(config, figures["in_process_round_seconds"])
        # A DP step takes `batch_size` expected patients; the demo's have 3-5 images each.
        figures |= dp_step_benchmark(
            image_size=fed.model.image_size,
            patients=fed.batch_size,
            images_per_patient=4,
            hidden=fed.model.hidden,
        )
        # A MONAI ResNet18 at 64x64 under the layer clipper, and under Opacus' hooks.
        figures |= monai_step_benchmark(network="ResNet18", image_size=64, repeats=3)
        figures |= secure_agg_figures(fed)
        figures |= ledger_bench(root / "ledger-bench")
        return figures
