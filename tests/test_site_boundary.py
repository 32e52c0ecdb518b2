"""The site boundary without Prefect: a site set up at the site, instructions it refuses
before reading any data (each refusal a ledger entry), the sealed encryption secret, and a
coordinator root that cannot decrypt anything, tried file by file."""

from __future__ import annotations

import csv
import json
import logging
import stat
import traceback

import pytest
import tenseal as ts
from cryptography.hazmat.primitives import serialization
from fedhelp import tabular_federation

from ledger import keys
from ledger.store import Ledger
from tasks import IntegrityError, StepError
from tasks.bfv import decrypt
from tasks.config import load_config
from tasks.coordinator_steps import CoordinatorRun, site_entry_from_enrollment
from tasks.enrollment import open_sealed, read_enrollment, seal
from tasks.messages import Phase, Status, make_instruction, read_report
from tasks.site import load_site
from tasks.site_phase import run_site_phase
from tasks.synthetic import write_tabular_cohort


@pytest.fixture
def fed(tmp_path):
    a = write_tabular_cohort(tmp_path / "a.csv", n_patients=120, seed=1)
    b = write_tabular_cohort(tmp_path / "b.csv", n_patients=120, seed=2)
    config = tabular_federation(tmp_path, {"clinic-a": (a, None), "clinic-b": (b, None)})
    return load_config(config)


def instruction(fed, *, signer=None, plan=None, digest=None, site="clinic-a", phase=Phase.PREPARE):
    run = CoordinatorRun(fed=fed, job="job-1", round=0)
    return make_instruction(
        signer=signer or run.identity,
        job="job-1",
        round=0,
        phase=phase,
        site=site,
        plan=plan if plan is not None else run.plan,
        plan_digest=digest or run.digest,
        timeout_seconds=60,
    )


def test_site_init_keeps_secrets_at_the_site_and_signs_its_enrollment(fed, tmp_path):
    site = load_site(tmp_path / "sites" / "clinic-a")
    for key in (site.identity_path, site.kex_path, site.pseudonym_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    doc = json.loads((site.root / "enrollment.json").read_text())
    assert set(doc) == {"v", "site", "kind", "public_key", "kex_key", "signature"}
    assert doc["public_key"] == site.identity.public_key.hex()
    # The coordinator's federation file holds the enrollment's public keys and no data path.
    text = (tmp_path / "federation.toml").read_text()
    assert doc["public_key"] in text and "a.csv" not in text
    entry = site_entry_from_enrollment(site.root / "enrollment.json")
    assert entry.public_key == doc["public_key"]
    # A tampered enrollment (another key slipped in) is refused.
    doc["kex_key"] = "00" * 32
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="not signed"):
        read_enrollment(tmp_path / "bad.json")


def test_site_prepares_on_a_valid_instruction(fed, tmp_path):
    report = run_site_phase(instruction(fed), tmp_path / "sites" / "clinic-a")
    assert report.status == Status.COMPLETED, report.reason
    assert report.data["he_public"]["signer"] == "clinic-a"  # the key holder
    assert set(report.data["he_sealed"]) == {"clinic-b"}
    entries = Ledger(fed.ledger_url).events(job="job-1", action="preprocess")
    assert [e["actor"] for e in entries] == ["clinic-a"]


def test_a_bad_cell_fails_the_site_and_its_value_never_leaves(fed, tmp_path, caplog):
    """A patient's name in a numeric column: the failed report, the ledger, the artifact store,
    the logs and the traceback name the site, column, line and file, never the value."""
    table = tmp_path / "b.csv"
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows[6][rows[0].index("glucose")] = "JOHN^SMITH"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StepError) as info:
        run_site_phase(instruction(fed, site="clinic-b"), tmp_path / "sites" / "clinic-b")
    site = load_site(tmp_path / "sites" / "clinic-b")
    report = read_report(
        fed.artifact_store,
        job="job-1",
        round=0,
        site="clinic-b",
        phase=Phase.PREPARE,
        public_key=site.identity.public_key,
    )
    assert report is not None and report.status == Status.FAILED
    assert report.reason == "site clinic-b: b.csv, line 7, column 'glucose' is not a number."
    logging.getLogger("tasks").exception("the phase failed", exc_info=info.value)
    places = [caplog.text, "".join(traceback.format_exception(info.value)), report.reason]
    places += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if _shared(p)]
    for text in places:
        assert "JOHN" not in text and "SMITH" not in text
    assert not Ledger(fed.ledger_url).events(action="preprocess")


def _shared(path):
    """What leaves a site: the ledger database and the artifact store."""
    return path.is_file() and (path.name.startswith("ledger") or "artifacts" in path.parts)


@pytest.mark.parametrize(
    "attack",
    [
        "forged signature",
        "unknown digest",
        "plan swapped under its digest",
        "other purpose",
        "addressed to another site",
    ],
)
def test_site_refuses_before_reading_any_data(fed, tmp_path, attack):
    site_root = tmp_path / "sites" / "clinic-a"
    # The site's data is gone: any attempt to read it would fail, not refuse.
    (tmp_path / "a.csv").unlink()
    plan = CoordinatorRun(fed=fed, job="j", round=0).plan
    if attack == "forged signature":
        text = instruction(fed, signer=keys.generate("coordinator"))
    elif attack == "unknown digest":
        other = dict(plan, rounds=plan["rounds"] + 5)
        from tasks.config import plan_digest

        text = instruction(fed, plan=other, digest=plan_digest(other))
    elif attack == "plan swapped under its digest":
        text = instruction(fed, plan=dict(plan, learning_rate=9.0))
    elif attack == "other purpose":
        from tasks.config import plan_digest
        from tasks.site import approve_plan

        other = dict(plan, purpose="MARKETING")
        approve_plan(load_site(site_root), other)  # even approved, the policy does not accept it
        text = instruction(fed, plan=other, digest=plan_digest(other))
    else:
        text = instruction(fed, site="clinic-b")
    report = run_site_phase(text, site_root)
    assert report.status == Status.REFUSED
    ledger = Ledger(fed.ledger_url)
    (refusal,) = ledger.events(action="refuse_instruction")
    assert refusal["actor"] == "clinic-a" and refusal["outcome"] == "refused"
    assert refusal["details"]["reason"] == report.reason
    assert not ledger.events(action="preprocess")


def test_sealed_secret_opens_only_at_its_site(fed, tmp_path):
    a = load_site(tmp_path / "sites" / "clinic-a")
    b = load_site(tmp_path / "sites" / "clinic-b")
    from tasks.enrollment import kex_public

    blob = seal(
        b"secret", recipient_kex=kex_public(b.kex_key), federation="ehr", recipient="clinic-b"
    )
    assert open_sealed(blob, kex=b.kex_key, federation="ehr", recipient="clinic-b") == b"secret"
    with pytest.raises(IntegrityError):
        open_sealed(blob, kex=a.kex_key, federation="ehr", recipient="clinic-b")
    with pytest.raises(IntegrityError):
        open_sealed(blob, kex=b.kex_key, federation="ehr", recipient="clinic-a")


def test_nothing_under_the_coordinator_root_decrypts_or_signs_for_a_site(fed, tmp_path):
    """After a whole job: try every file the coordinator holds as a CKKS context and as a
    private key. None decrypts the aggregate; none is a site's key."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.training import federated_training

    with prefect_test_harness(server_startup_timeout=120):
        summaries = federated_training(
            str(tmp_path / "federation.toml"), "job-x", str(tmp_path / "sites")
        )
    assert [s.status for s in summaries] == ["committed", "committed"]
    aggregate = next((tmp_path / "artifacts").rglob("aggregate.he")).read_bytes()
    site_keys = {s.public_key for s in fed.sites}
    files = [p for p in fed.coordinator_root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        try:
            ctx = ts.context_from(data)
        except Exception:
            ctx = None
        if ctx is not None:
            assert not ctx.has_secret_key(), path
            with pytest.raises(StepError):
                decrypt(data, aggregate)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except Exception:
            continue
        assert keys.public_key_bytes(key).hex() not in site_keys, path
    # The sites themselves can: the same aggregate decrypts with a site's secret context.
    secret = (tmp_path / "sites" / "clinic-b" / "keys" / "he.secret").read_bytes()
    assert decrypt(secret, aggregate).size > 0
