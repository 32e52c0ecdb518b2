"""The privacy guarantee around the accountant: races, bypasses, drift and failed rounds.

Each test is an attack or a fault a privacy reviewer tried: concurrent jobs racing for the
last of a budget (separate processes, SQLite and PostgreSQL), a plan without DP, a raised
delta, a round that dies before an update leaves, non-finite settings. Figures are
recomputed from the ledger, and once by a second, independent accountant (Google's
`dp-accounting`, PLD).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fedhelp import TABULAR_HEADER, independent_epsilon, tabular_federation

from ledger import accounting, queries
from ledger.accounting import Population, Release, epsilon
from ledger.store import Ledger
from tasks import budget
from tasks.config import ConfigError, load_config
from tasks.coordinator_steps import CoordinatorRun
from tasks.evaluate import from_histogram, metrics, patient_histogram
from tasks.messages import Phase, make_instruction
from tasks.site import approve_plan, load_site
from tasks.site_phase import check_instruction
from tasks.site_steps import round_releases
from tasks.synthetic import write_tabular_cohort

SITES = ("clinic-a", "clinic-b")
DELTA = 1e-5
# One round of TABULAR_HEADER's plan: noise 1.0, the default sample rate 0.25, 3 epochs.
ONE_ROUND = Release(noise_multiplier=1.0, sample_rate=0.25, steps=12)


def _header(*, ledger_url: str | None = None, dp: bool = True) -> str:
    header = TABULAR_HEADER
    if ledger_url:
        header = header.replace('name = "ehr"', f'name = "ehr"\nledger_url = "{ledger_url}"', 1)
    if not dp:
        header = header.replace("noise_multiplier = 1.0", "enabled = false", 1)
    return header


def _federation(tmp_path: Path, *, budget_: float, **header) -> Path:
    sources = {
        name: (write_tabular_cohort(tmp_path / f"{name}.csv", n_patients=60, seed=i), None)
        for i, name in enumerate(SITES, start=1)
    }
    return tabular_federation(
        tmp_path, sources, header=_header(**header), budget=budget_, metrics="noisy"
    )


def _run(config: Path, site: str, job: str, *, round_number: int = 1, timeout: float = 600):
    """A checked train instruction at `site`: what a site phase starts from."""
    fed = load_config(config)
    coordinator = CoordinatorRun(fed=fed, job=job, round=round_number)
    text = make_instruction(
        signer=coordinator.identity,
        job=job,
        round=round_number,
        phase=Phase.TRAIN,
        site=site,
        plan=coordinator.plan,
        plan_digest=coordinator.digest,
        timeout_seconds=timeout,
    )
    return check_instruction(load_site(config.parent / "sites" / site), text)


def _spend(config: Path, **kw) -> dict[str, dict]:
    fed = load_config(config)
    rows = queries.spend_summary(Ledger(fed.ledger_url, roster=fed.roster()), **kw)
    return {r["site"]: r for r in rows}


def _set_policy(config: Path, site: str, **values) -> None:
    path = config.parent / "sites" / site / "site.toml"
    text = path.read_text()
    for key, value in values.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
    path.write_text(text)


def _reserve(config: Path, job: str, *, timeout: float = 600) -> budget.Grant:
    """clinic-a's check and hold for one round of the plan, in `job`."""
    run = _run(config, "clinic-a", job, timeout=timeout)
    return budget.reserve(run, Population.TRAINING, [ONE_ROUND], dp=True, refusal_step="train")


# ---------------------------------------------------------------- 1. concurrent jobs


def _contend(config: Path, job: str, gate: Path) -> None:
    """One job's train-time budget check at every site, in a process of its own: ready, then
    released with the others when `gate` appears; prints (site, job, admitted) lines."""
    runs = [_run(config, site, job) for site in SITES]
    (gate.parent / f"ready-{job}").touch()
    while not gate.exists():
        time.sleep(0.01)
    for run in runs:
        grant = budget.reserve(
            run, Population.TRAINING, round_releases(run), dp=True, refusal_step="train"
        )
        print(json.dumps([run.name, job, grant.admitted]), flush=True)


_CONTENDER = (
    "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
    "from test_privacy_guarantee import _contend; "
    "_contend(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))"
)


def test_concurrent_jobs_in_separate_processes_cannot_overspend(tmp_path, url):
    """Six jobs, each its own Python process, race for budgets that fit exactly one more
    round: the check and the hold are one ledger transaction, so one job wins per site and
    the spend recomputed from the ledger stays within every budget."""
    one, two = (epsilon([ONE_ROUND] * k, delta=DELTA, accountant="prv") for k in (1, 2))
    config = _federation(tmp_path, budget_=(one + two) / 2, ledger_url=url)
    gate = tmp_path / "go"
    jobs = [f"job-{k}" for k in range(6)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CONTENDER,
                str(Path(__file__).parent),
                str(config),
                job,
                str(gate),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready-{job}").exists() for job in jobs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    gate.touch()  # every process is past its imports and set-up: all check at once
    outcomes = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        outcomes += [tuple(json.loads(line)) for line in out.splitlines()]
    for site in SITES:
        admitted = [job for name, job, ok in outcomes if name == site and ok]
        assert len(admitted) == 1, (site, admitted)
    spend = _spend(config)
    for site in SITES:
        row = spend[site]
        assert row["epsilon_spent"] == pytest.approx(one)
        assert row["epsilon_spent"] <= row["epsilon_budget"]
        assert row["held"] == 1 and row["refusals"] == 5
        assert row["budget_remaining"] == pytest.approx(row["epsilon_budget"] - one)


# ---------------------------------------------------------------- 2. training without DP


def test_a_plan_without_dp_is_refused_unless_the_site_opts_out_and_then_spend_is_unbounded(
    tmp_path,
):
    config = _federation(tmp_path, budget_=10.0, dp=False)
    refused = budget.reserve(
        _run(config, "clinic-a", "job-1"), Population.TRAINING, [], dp=False, refusal_step="train"
    )
    assert not refused.admitted and "allow_non_dp" in refused.reason
    assert _spend(config)["clinic-a"]["epsilon_spent"] == 0.0

    _set_policy(config, "clinic-a", allow_non_dp="true")
    run = _run(config, "clinic-a", "job-2")
    granted = budget.reserve(run, Population.TRAINING, [], dp=False, refusal_step="train")
    assert granted.admitted
    row = _spend(config)["clinic-a"]
    assert row["epsilon_spent"] == queries.UNBOUNDED and row["budget_remaining"] == 0.0
    assert row["dp_optouts"] == 1 and row["allow_non_dp"] is True and row["policy_changes"] == 1
    # Every later DP check sees the unbounded spend: a DP round is refused.
    later = _reserve(config, "job-3")
    assert not later.admitted and "budget exhausted" in later.reason


# ---------------------------------------------------------------- 6. delta drift


def test_the_check_uses_the_pinned_delta_and_a_change_is_on_the_record(tmp_path):
    one, two = (epsilon([ONE_ROUND] * k, delta=DELTA, accountant="prv") for k in (1, 2))
    config = _federation(tmp_path, budget_=(one + two) / 2)
    first = _reserve(config, "job-1")
    assert first.admitted
    # A second round does not fit at delta 1e-5; at delta 0.2 it would (epsilon shrinks as
    # delta grows). Raising delta is a recorded policy change, never a silent one.
    assert epsilon([ONE_ROUND] * 2, delta=0.2, accountant="prv") < (one + two) / 2
    blocked = _reserve(config, "job-2")
    assert not blocked.admitted
    _set_policy(config, "clinic-a", delta="0.2")
    _reserve(config, "job-3")
    fed = load_config(config)
    policies = Ledger(fed.ledger_url, roster=fed.roster()).events(site="clinic-a", action="policy")
    assert [p["privacy"]["delta"] for p in policies] == [DELTA, 0.2]
    assert policies[1]["details"]["previous"]["delta"] == DELTA
    reserves = Ledger(fed.ledger_url).events(site="clinic-a", action="reserve")
    assert [r["privacy"]["delta"] for r in reserves] == [DELTA, 0.2]
    assert _spend(config)["clinic-a"]["policy_changes"] == 1


def test_the_federations_delta_does_not_move_the_sites_check(tmp_path):
    config = _federation(tmp_path, budget_=10.0)
    text = config.read_text().replace("[dp]\n", "[dp]\ndelta = 0.01\n", 1)
    config.write_text(text)
    approve_plan(load_site(config.parent / "sites" / "clinic-a"), load_config(config).plan())
    run = _run(config, "clinic-a", "job-1")
    assert run.fed.dp.delta == 0.01
    budget.reserve(run, Population.TRAINING, [ONE_ROUND], dp=True, refusal_step="train")
    [reserve] = Ledger(run.fed.ledger_url).events(site="clinic-a", action="reserve")
    assert reserve["privacy"]["delta"] == DELTA


# ---------------------------------------------------------------- 9. failed rounds


def test_a_hold_whose_update_never_left_lapses_and_a_retry_is_charged_once(tmp_path):
    config = _federation(tmp_path, budget_=10.0)
    one = epsilon([ONE_ROUND], delta=DELTA, accountant="prv")
    run = _run(config, "clinic-a", "job-1", timeout=60)
    grant = budget.reserve(
        run, Population.TRAINING, round_releases(run), dp=True, refusal_step="train"
    )
    assert grant.admitted
    fed = load_config(config)

    def spent(at: datetime) -> float:
        acc = accounting.account(Ledger(fed.ledger_url).screened(), "clinic-a", now=at)
        return acc.spent(delta=DELTA, accountant="prv")

    now = datetime.now(UTC)
    assert spent(now) == pytest.approx(one)  # in flight: held against the budget
    assert spent(now + timedelta(seconds=120)) == 0.0  # the round died: nothing left
    # A retry of the same round before the hold lapsed reuses it: one charge.
    again = _reserve(config, "job-1")
    assert again.reused and again.key == grant.key and spent(now) == pytest.approx(one)


# ---------------------------------------------------------------- 4. metrics


def test_the_patient_histogram_moves_by_at_most_one_for_any_patient():
    rng = np.random.default_rng(0)
    scores, labels = rng.random(40), rng.integers(0, 2, 40)
    groups = np.repeat(np.arange(10), 4)
    base = patient_histogram(scores, labels, groups)
    heavy = patient_histogram(
        np.concatenate([scores, rng.random(50)]),
        np.concatenate([labels, np.ones(50, int)]),
        np.concatenate([groups, np.full(50, 99)]),
    )
    assert np.linalg.norm(heavy - base) <= 1.0 + 1e-9
    assert base.sum() == pytest.approx(10)  # one unit of mass per patient
    # Without noise the histogram gives the patient-weighted figures back (binned AUC).
    exact = metrics(scores, labels)
    binned = from_histogram(base)
    assert binned.n == 10 and abs(binned.auc - exact.auc) < 0.15


# ---------------------------------------------------------------- 7. non-finite settings


@pytest.mark.parametrize(
    "setting",
    ["epsilon_budget = inf", "delta = nan", "noise_multiplier = inf", "sample_rate = inf"],
)
def test_non_finite_dp_settings_are_rejected_before_anything_is_written(tmp_path, setting):
    config = _federation(tmp_path, budget_=10.0)
    key = setting.split(" =")[0]
    text = config.read_text()
    text = re.sub(rf"^{key} = .*$\n?", "", text, flags=re.M).replace("[dp]\n", f"[dp]\n{setting}\n")
    config.write_text(text)
    with pytest.raises(ConfigError, match=f"dp.{key}"):
        load_config(config)
    ledger = Ledger(f"sqlite:///{config.parent / 'ledger.db'}")
    size, files = ledger.size(), sorted(config.parent.rglob("*"))
    medfed = Path(sys.executable).parent / "medfed"
    for command in (["validate", str(config)], ["run", str(config), "--sites", "sites"]):
        out = subprocess.run(
            [str(medfed), *command],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=config.parent,
        )
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and f"dp.{key}" in out.stderr
    assert ledger.size() == size and sorted(config.parent.rglob("*")) == files


def test_a_lapsed_hold_is_not_reused_and_the_retry_charges_once(tmp_path):
    config = _federation(tmp_path, budget_=10.0)
    one = epsilon([ONE_ROUND], delta=DELTA, accountant="prv")
    first = _reserve(config, "job-1", timeout=2)
    time.sleep(3.0)  # the round died; its deadline (the hold's expiry) passed
    retry = _reserve(config, "job-1")
    assert retry.admitted and not retry.reused and retry.key != first.key
    row = _spend(config)["clinic-a"]
    assert row["lapsed"] == 1 and row["held"] == 1
    assert row["epsilon_spent"] == pytest.approx(one)


# ---------------------------------------------------------------- a whole job


@pytest.fixture
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.prefect
def test_a_round_that_dies_before_updates_leave_charges_once_and_leaks_no_figures(
    tmp_path, prefect_api, monkeypatch
):
    """clinic-b's preprocessing fails in the middle of round 1 and clinic-a's update never
    leaves (the store refuses it): the round fails. clinic-a holds budget while the round is
    in flight; once its deadline passed the hold lapses. The retry completes with ONE charge
    per site. No training loss leaves a site; clinic-a's held-out metrics are noisy and
    accounted, clinic-b's are exact by its policy; a second accountant agrees with spend."""
    from flows.training import federated_training
    from tasks import StepError, site_phase, site_steps

    config = _federation(tmp_path, budget_=10.0)
    _set_policy(config, "clinic-b", metrics='"exact"')
    real_preprocess, real_publish = site_phase.preprocess, site_steps.transport.publish

    def failing_preprocess(run):
        if run.name == "clinic-b" and run.instr.phase == Phase.TRAIN:
            raise StepError("site clinic-b: its data changed since the job prepared it")
        return real_preprocess(run)

    def failing_publish(store, name, data, **kw):
        if kw.get("kind") == "update":
            raise StepError("the artifact store refused the upload")
        return real_publish(store, name, data, **kw)

    monkeypatch.setattr(site_phase, "preprocess", failing_preprocess)
    monkeypatch.setattr(site_steps.transport, "publish", failing_publish)
    with pytest.raises(Exception, match="fewer than min_sites"):
        federated_training(str(config), "job-1", str(config.parent / "sites"))
    fed = load_config(config)
    ledger = Ledger(fed.ledger_url, roster=fed.roster())

    def spent(site: str, at: datetime) -> float:
        acc = accounting.account(ledger.screened(), site, now=at)
        return acc.spent(delta=DELTA, accountant="prv")

    one = epsilon(round_releases(_run(config, "clinic-a", "job-1")), delta=DELTA, accountant="prv")
    now = datetime.now(UTC)
    assert spent("clinic-a", now) == pytest.approx(one)  # held while the round may retry
    later = now + timedelta(seconds=fed.site_timeout_seconds + 60)
    assert spent("clinic-a", later) == 0.0 and spent("clinic-b", later) == 0.0

    monkeypatch.setattr(site_phase, "preprocess", real_preprocess)
    monkeypatch.setattr(site_steps.transport, "publish", real_publish)
    summaries = federated_training(str(config), "job-1", str(config.parent / "sites"))
    assert [s.status for s in summaries][-1] == "committed"
    spend = _spend(config)
    history = queries.spend(ledger)
    for site in SITES:
        training = [r for r in history if r["site"] == site and r["population"] == "training"]
        assert [r["state"] for r in training] == ["released"] * fed.rounds  # one per round
        assert spend[site]["epsilon_training"] == pytest.approx(
            epsilon(
                round_releases(_run(config, site, "job-1")) * fed.rounds,
                delta=DELTA,
                accountant="prv",
            )
        )
    assert spent("clinic-a", later) == pytest.approx(spend["clinic-a"]["epsilon_spent"])

    bodies = list(ledger.screened())
    assert not any("mean_loss" in (b.get("details") or {}) for b in bodies)
    evaluations = {b["site"]: b["details"] for b in bodies if b["action"] == "evaluate"}
    assert evaluations["clinic-a"]["metrics"] == "noisy" and evaluations["clinic-a"]["release"]
    assert (
        evaluations["clinic-b"]["metrics"] == "exact"
        and "reservation" not in evaluations["clinic-b"]
    )
    assert spend["clinic-a"]["metrics_policy"] == "noisy" and spend["clinic-a"]["epsilon_heldout"]
    assert spend["clinic-b"]["metrics_policy"] == "exact"
    assert spend["clinic-b"]["exact_metric_releases"] == fed.rounds

    # A second, independent accountant recomputes every counted release.
    for site, acc in accounting.accounts(bodies).items():
        mine = spend[site]["epsilon_spent"]
        theirs = max(independent_epsilon(acc.history(p), DELTA) for p in accounting.Population)
        assert theirs * 0.97 <= mine <= theirs * 1.03, (site, mine, theirs)


def test_a_site_policy_with_an_infinite_budget_is_rejected(tmp_path):
    config = _federation(tmp_path, budget_=10.0)
    _set_policy(config, "clinic-a", epsilon_budget="inf")
    with pytest.raises(ConfigError, match="privacy.epsilon_budget"):
        load_site(config.parent / "sites" / "clinic-a")


def test_a_refusals_projection_is_not_reported_as_recorded_spend(tmp_path):
    one, two = (epsilon([ONE_ROUND] * k, delta=DELTA, accountant="prv") for k in (1, 2))
    config = _federation(tmp_path, budget_=(one + two) / 2)
    assert _reserve(config, "job-1").admitted and not _reserve(config, "job-2").admitted
    row = _spend(config)["clinic-a"]
    assert row["refusals"] == 1 and row["epsilon_recorded"] == pytest.approx(one)
