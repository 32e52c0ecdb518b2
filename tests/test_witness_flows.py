"""Every site is a witness, through the real training flow (sites in process, one Prefect
API), on SQLite and PostgreSQL ledgers: the sites cosign each checkpoint, a truncated ledger
makes every site refuse the next job before anyone trains, and an unenrolled actor's entries
change nothing the flow does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedhelp import TABULAR_HEADER, tabular_federation
from prefect.testing.utilities import prefect_test_harness
from sqlalchemy import text
from typer.testing import CliRunner

from flows.cli.main import app
from flows.training import federated_training as _federated_training
from ledger import VerificationError, keys
from ledger.entry import Action, Event, Outcome
from ledger.identities import load_roster
from ledger.store import Ledger
from ledger.verify import verify_ledger
from tasks import WorkFailed
from tasks.config import load_config
from tasks.synthetic import write_tabular_cohort

pytestmark = pytest.mark.prefect
SITES = ("clinic-a", "clinic-b")


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def config(tmp_path, url) -> Path:
    sources = {
        name: (write_tabular_cohort(tmp_path / f"{name}.csv", n_patients=120, seed=i), None)
        for i, name in enumerate(SITES, 1)
    }
    header = f'ledger_url = "{url}"\n' + TABULAR_HEADER.replace(
        "local_epochs = 3", "local_epochs = 1"
    )
    return tabular_federation(tmp_path, sources, header=header)


def train(config: Path, job: str) -> list:
    return _federated_training(str(config), job, str(config.parent / "sites"))


def kept(config: Path, site: str) -> str:
    (path,) = (config.parent / "sites" / site / "witness").glob("*.checkpoint")
    return path.read_text()


def test_sites_cosign_every_checkpoint_and_verify_counts_them(config):
    summaries = train(config, "job-1")
    assert [s.status for s in summaries] == ["committed", "committed"]
    fed = load_config(config)
    ledger = Ledger(fed.ledger_url)
    # Round 1's commit and the job's end (right after the last round's) are witnessed, each
    # by both sites.
    sizes = [size for size, *_ in ledger.checkpoints()]
    cosigned = [(size, site) for size, site, _ in ledger.cosignatures()]
    assert cosigned == [(s, site) for s in (sizes[0], sizes[-1]) for site in SITES]
    assert sizes[-1] == ledger.size()
    report = verify_ledger(fed.ledger_url, roster=load_roster(config), witnesses=2)
    assert report.witnesses == SITES and report.entries == ledger.size()
    for site in SITES:  # each site kept the checkpoint covering the whole log, cosigned
        assert f"\n{ledger.size()}\n" in kept(config, site)
    result = CliRunner().invoke(
        app,
        [
            "ledger",
            "verify",
            "--ledger",
            fed.ledger_url,
            "--identities",
            str(config),
            "--witnesses",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["witnesses"] == list(SITES)


def test_a_truncated_ledger_makes_every_site_refuse_the_next_job(config):
    train(config, "job-1")
    fed = load_config(config)
    ledger = Ledger(fed.ledger_url)
    cut = ledger.size() - 12  # the last round's tail and the job's end, as the attack did
    with ledger.engine.begin() as conn:
        conn.execute(text("DELETE FROM ledger_cosignature WHERE size > :c"), {"c": cut})
        conn.execute(text("DELETE FROM ledger_checkpoint WHERE size > :c"), {"c": cut})
        conn.execute(text("DELETE FROM ledger_entry WHERE seq >= :c"), {"c": cut})
    with pytest.raises(WorkFailed, match="nobody trained"):
        train(config, "job-2")
    assert not ledger.events(job="job-2", action="train")
    assert not ledger.events(job="job-2", action="preprocess")
    drops = ledger.events(job="job-2", action="drop")
    assert {d["site"] for d in drops} == set(SITES)
    assert all("does not extend what this site witnessed" in d["details"]["reason"] for d in drops)
    for site in SITES:  # and any site's kept checkpoint shows the truncation to a verifier
        with pytest.raises(VerificationError):
            verify_ledger(fed.ledger_url, pinned_checkpoints=[kept(config, site)])


def test_an_unenrolled_actors_entries_change_nothing_the_flow_does(config):
    fed = load_config(config)
    mallory = keys.generate("mallory")
    forged = [
        Event(
            actor="mallory",
            action=Action.REFUSE,
            job="job-m",
            round=1,
            site=s,
            outcome=Outcome.REFUSED,
            idempotency_key=f"job-m/r1/{s}/train",
            details={"reason": "budget"},
        )
        for s in SITES
    ] + [
        Event(
            actor="mallory",
            action=Action.COMMIT_ROUND,
            job="job-m",
            round=r,
            idempotency_key=f"job-m/r{r}/coordinator/commit_round",
            outputs={"global_model": "ff" * 32},
        )
        for r in (1, 2)
    ]
    Ledger(fed.ledger_url).append_many([(e, mallory) for e in forged])
    summaries = train(config, "job-m")
    assert [s.status for s in summaries] == ["committed", "committed"]
    assert all(r.trained for s in summaries for r in s.sites)
    roster = load_roster(config)
    trusted = Ledger(fed.ledger_url, roster=roster)
    assert {e["site"] for e in trusted.events(job="job-m", round=1, action="train")} == set(SITES)
    assert [e["actor"] for e in trusted.events(job="job-m", action="commit_round")] == [
        "coordinator",
        "coordinator",
    ]
    with pytest.raises(VerificationError, match="'mallory' is not an enrolled identity"):
        verify_ledger(fed.ledger_url, roster=roster)
    result = CliRunner().invoke(
        app, ["ledger", "events", "--ledger", fed.ledger_url, "--job", "job-m", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "mallory" not in {e["actor"] for e in json.loads(result.stdout)}
    assert "mallory (5)" in result.stderr
