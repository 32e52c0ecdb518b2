"""`medfed bench` must time real rounds: its federation can afford every round it runs, and a
round that did not train every site is refused, not reported."""

from __future__ import annotations

import pytest

from flows.bench import BENCH_EPSILON_BUDGET, BENCH_JOBS, require_every_site_trained
from flows.demo import demo_config_text
from flows.round import RoundSummary, SiteRow
from ledger.accounting import epsilon
from tasks import StepError
from tasks.privacy import calibrate_noise, planned_release


def _demo_number(name: str) -> float:
    text = demo_config_text(rounds=1, dp=True)
    line = next(x for x in text.splitlines() if x.startswith(f"{name} ="))
    return float(line.split("=")[1])


def test_bench_budget_covers_all_its_one_round_jobs() -> None:
    """Each bench job is a one-round demo job calibrated to its target epsilon (from plan
    figures: the same at every cohort size); the sites' budget must hold all of them, or the
    timed rounds would be refusals."""
    q, epochs = _demo_number("sample_rate"), int(_demo_number("local_epochs"))
    one = planned_release(sample_rate=q, epochs=epochs, noise_multiplier=1)
    noise = calibrate_noise(
        target_epsilon=_demo_number("target_epsilon"),
        delta=_demo_number("delta"),
        sample_rate=one.sample_rate,
        steps=one.steps,
        accountant="prv",
    )
    release = planned_release(sample_rate=q, epochs=epochs, noise_multiplier=noise)
    spent = epsilon([release] * BENCH_JOBS, delta=_demo_number("delta"), accountant="prv")
    assert _demo_number("target_epsilon") < spent <= BENCH_EPSILON_BUDGET
    # The demo's own budget would not: that is why the bench raises it.
    assert spent > _demo_number("epsilon_budget")


def _summary(status: str, trained: tuple[bool, ...]) -> RoundSummary:
    rows = tuple(
        SiteRow(
            site=f"s{i}",
            trained=t,
            auc=0.5,
            accuracy=0.5,
            heldout=1,
            epsilon=1.0,
            bytes_uploaded=0,
            seconds={},
        )
        for i, t in enumerate(trained)
    )
    return RoundSummary(
        job="j",
        round=1,
        status=status,
        model_hash="",
        weighted_auc=0.5,
        weighted_accuracy=0.5,
        aggregate_seconds=0.0,
        sites=rows,
        message="budget exhausted",
    )


def test_a_round_that_did_not_train_every_site_is_not_timed() -> None:
    require_every_site_trained(_summary("committed", (True, True)), "warm-up")
    with pytest.raises(StepError, match="did not train every site"):
        require_every_site_trained(_summary("committed", (True, False)), "Prefect")
    with pytest.raises(StepError, match="did not train every site"):
        require_every_site_trained(_summary("budget_exhausted", (False, False)), "direct")


def test_the_ledger_bench_runs_end_to_end_in_a_new_scratch_folder(tmp_path) -> None:
    from ledger.bench import run

    scratch = tmp_path / "not" / "there" / "yet"
    figures = run(scratch, entries=3000, signed_entries=600, appends=1000)
    assert set(figures) == {
        "ledger_appends_per_s_sqlite",
        "ledger_verify_1m_chain_merkle_s",
        "ledger_verify_100k_with_signatures_s",
        "inclusion_proof_bytes_ratio",
    }
    assert all(v > 0 for v in figures.values())
    assert scratch.is_dir() and not any(scratch.iterdir())  # its temp files are gone
