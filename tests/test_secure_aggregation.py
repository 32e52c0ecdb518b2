"""No one reads a site's update: a 3-site round under masked BFV, attacked by the coordinator
colluding with one site (it holds that site's every key and the coordinator's every file); a
site killed after the others masked; the shared-key CKKS scheme, for contrast, falls to the
same attack. Rounds run in process (no Prefect), each site in its own root."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fedhelp import TABULAR_HEADER, tabular_federation
from scipy import stats

from flows.dispatch import InProcessDispatcher
from flows.round import run_round
from flows.training import prepare_sites, start_job
from ledger import queries
from ledger.store import Ledger
from ledger.verify import verify_ledger
from tasks import IntegrityError, bfv, ckks, secure_agg
from tasks.config import load_config
from tasks.coordinator_steps import CoordinatorRun
from tasks.enrollment import load_kex
from tasks.files import load_array
from tasks.masking import mask_context, mask_stream, pair_key
from tasks.synthetic import write_tabular_cohort

log = logging.getLogger("test")
SITES = ("clinic-a", "clinic-b", "clinic-c")
COLLUDER, TARGET, HONEST = SITES
# An MLP, so the update has enough coordinates (~1.5k) for the statistics to mean something.
MLP_HEADER = TABULAR_HEADER.replace('kind = "logistic"', 'kind = "mlp"\nhidden = 64').replace(
    "rounds = 2", "rounds = 1"
)


def federation(tmp_path: Path, scheme: str = "masked-bfv") -> Path:
    header = MLP_HEADER + f'\n[secure_aggregation]\nscheme = "{scheme}"\n'
    sources = {
        name: (write_tabular_cohort(tmp_path / f"{name}.csv", n_patients=90 + 30 * i, seed=i), None)
        for i, name in enumerate(SITES)
    }
    return tabular_federation(tmp_path, sources, header=header, model_kinds=("mlp",))


def one_round(config: Path, job: str = "job-1"):
    fed = load_config(config)
    sites_dir = config.parent / "sites"
    run = CoordinatorRun(fed=fed, job=job, round=0)
    start_job(run)
    state = prepare_sites(run, str(sites_dir), log)
    summary = run_round(
        CoordinatorRun(fed=fed, job=job, round=1), InProcessDispatcher(sites_dir), state, log
    )
    return fed, summary


def site_root(config: Path, site: str) -> Path:
    return config.parent / "sites" / site


def released_update(config: Path, site: str, job: str = "job-1") -> np.ndarray:
    """The clipped update the site released (the ground truth only the site holds)."""
    return load_array(site_root(config, site) / "work" / job / "r0001" / "update.npy")


def uploaded(ledger: Ledger, site: str, step: str = "upload") -> bytes:
    (entry,) = [
        e
        for e in ledger.events(action="upload", actor=site)
        if e["idempotency_key"].endswith(f"/{step}")
    ]
    return Path(entry["details"]["uri"].removeprefix("file://")).read_bytes()


def colluder_strips_its_masks(fed, ledger: Ledger, config: Path, target: str, attempt: int = 0):
    """What the coordinator with the colluding site's keys gets for `target`'s update:
    decrypt it with the shared BFV secret, remove the mask the colluder shares with it."""
    secret = (site_root(config, COLLUDER) / "keys" / "he.secret").read_bytes()
    t = bfv.plain_modulus(secret)
    step = "upload" if attempt == 0 else f"upload-a{attempt}"
    seen = bfv.decrypt(secret, uploaded(ledger, target, step))
    (cohort,) = [
        e["details"]["cohort"]
        for e in ledger.events(action="cohort")
        if e["details"]["attempt"] == attempt
    ]
    context = mask_context(
        federation=fed.name, job="job-1", round=1, attempt=attempt, cohort=sorted(cohort)
    )
    key = pair_key(
        load_kex(site_root(config, COLLUDER) / "keys" / "kex.pem"),
        COLLUDER,
        bytes.fromhex(fed.site(target).kex_key),
        target,
        context,
    )
    mask = mask_stream(key, seen.size, t)
    sign = -1 if COLLUDER < target else 1  # the larger name subtracts the pair's mask
    return (seen - sign * mask) % t, t, cohort


def test_coordinator_with_one_site_learns_nothing_of_another_sites_update(tmp_path):
    config = federation(tmp_path)
    fed, summary = one_round(config)
    assert summary.status == "committed"
    ledger = Ledger(fed.ledger_url)
    truth = released_update(config, TARGET)
    residue, t, cohort = colluder_strips_its_masks(fed, ledger, config, TARGET)
    n = residue.size
    assert n > 1000
    # Uniform over Z_t: chi-square over 16 equal bins; and no correlation with the update.
    counts = np.bincount(residue * 16 // t, minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-6
    weights = secure_agg.check_cohort(fed, cohort)
    q = secure_agg.for_plan(
        fed, (site_root(config, COLLUDER) / "keys" / "he.secret").read_bytes()
    ).quantizer()
    guess = q.decode(residue)
    assert abs(np.corrcoef(guess, truth)[0, 1]) < 5 / np.sqrt(n)
    # The attack itself is sound: with the honest site's key too (all but one colluding, where
    # the aggregate gives the update away anyway) the same arithmetic recovers the update.
    honest_key = pair_key(
        load_kex(site_root(config, HONEST) / "keys" / "kex.pem"),
        HONEST,
        bytes.fromhex(fed.site(TARGET).kex_key),
        TARGET,
        mask_context(federation=fed.name, job="job-1", round=1, attempt=0, cohort=sorted(cohort)),
    )
    sign = -1 if HONEST < TARGET else 1
    recovered = q.decode((residue - sign * mask_stream(honest_key, n, t)) % t) / weights[TARGET]
    assert np.max(np.abs(recovered - truth)) <= 1.01 / (q.scale * weights[TARGET])
    # The coordinator alone cannot decrypt anything, not even the aggregate.
    public = next(fed.coordinator_root.rglob("he.public")).read_bytes()
    aggregate = next((tmp_path / "artifacts").rglob("aggregate.he")).read_bytes()
    with pytest.raises(Exception, match="secret"):
        bfv.decrypt(public, aggregate)
    # The sites' decrypted aggregate is the weighted mean within the quantization bound.
    mean = q.decode(
        bfv.decrypt((site_root(config, HONEST) / "keys" / "he.secret").read_bytes(), aggregate)
    )
    expected = sum(weights[s] * released_update(config, s) for s in SITES)
    assert np.max(np.abs(mean - expected)) <= q.error_bound(len(SITES)) + 1e-6
    verify_ledger(fed.ledger_url)


def test_the_shared_key_ckks_scheme_falls_to_the_same_coalition(tmp_path):
    """Why masked BFV is the default: under "ckks" the colluding site's key decrypts another
    site's update outright."""
    config = federation(tmp_path, scheme="ckks")
    fed, summary = one_round(config)
    assert summary.status == "committed"
    ledger = Ledger(fed.ledger_url)
    secret = (site_root(config, COLLUDER) / "keys" / "he.secret").read_bytes()
    stolen = ckks.decrypt_update(secret, uploaded(ledger, TARGET))
    assert np.allclose(stolen, released_update(config, TARGET), atol=1e-4)
    (start,) = ledger.events(action="job_start")
    assert start["details"]["secure_aggregation"]["scheme"] == "ckks"


def test_a_site_killed_after_the_others_masked_is_masked_out_afresh(tmp_path, monkeypatch):
    """clinic-c dies after masking (its first upload) while the others mask and upload: the
    coordinator names a new cohort, the others mask again with fresh masks in an upload
    phase (no training, one charge), and the aggregate covers exactly them. No individual
    update was ever decrypted."""
    import tasks.site_phase as site_phase

    real_upload = site_phase.upload

    def crash_on_first_attempt(run, cipher):
        if run.name == HONEST and run.instr.attempt == 0:
            raise RuntimeError("site process killed")
        return real_upload(run, cipher)

    monkeypatch.setattr(site_phase, "upload", crash_on_first_attempt)
    config = federation(tmp_path)
    fed, summary = one_round(config)
    assert summary.status == "committed"
    ledger = Ledger(fed.ledger_url)
    cohorts = {
        e["details"]["attempt"]: sorted(e["details"]["cohort"])
        for e in ledger.events(action="cohort")
    }
    assert cohorts == {0: list(SITES), 1: [COLLUDER, TARGET]}
    (agg,) = ledger.events(action="secure_aggregate")
    assert agg["details"]["sites"] == [COLLUDER, TARGET] and agg["details"]["attempt"] == 1
    (drop,) = ledger.events(action="drop")
    assert (drop["site"], drop["details"]["phase"]) == (HONEST, "train")  # masked, then lost
    (commit,) = ledger.events(action="commit_round")
    assert commit["details"]["participants"] == [COLLUDER, TARGET]
    # The compliance officer's participation grid says the same, with the reason.
    rows = {r["site"]: r for r in queries.participation(ledger)}
    assert {s: (r["status"], r["trained"], r["uploads"]) for s, r in rows.items()} == {
        COLLUDER: ("aggregated", True, 2),
        TARGET: ("aggregated", True, 2),
        HONEST: ("dropped", True, 0),
    }
    assert rows[HONEST]["reason"].startswith("dropped in train:") and not rows[HONEST]["aggregated"]
    # Trained once, charged once: both uploads of a site name the same budget hold.
    for s in (COLLUDER, TARGET):
        assert len(ledger.events(action="train", actor=s)) == 1
        holds = {e["details"]["reservation"] for e in ledger.events(action="upload", actor=s)}
        assert len(ledger.events(action="upload", actor=s)) == 2 and len(holds) == 1
    # The aggregate is right: the weighted mean of the two that remain.
    secret = (site_root(config, TARGET) / "keys" / "he.secret").read_bytes()
    q = secure_agg.for_plan(fed, secret).quantizer()
    weights = secure_agg.check_cohort(fed, {s: n for s, n in commit_cohort(ledger, 1).items()})
    aggregate = Path(agg["details"]["uri"].removeprefix("file://")).read_bytes()
    mean = q.decode(bfv.decrypt(secret, aggregate))
    expected = sum(weights[s] * released_update(config, s) for s in (COLLUDER, TARGET))
    assert np.max(np.abs(mean - expected)) <= q.error_bound(2) + 1e-6
    # Every site decrypted only that aggregate; the first attempt's uploads, decrypted by
    # the colluder and stripped of its masks, are still uniform (the dropped site's masks).
    for e in ledger.events(action="evaluate"):
        assert e["inputs"]["aggregate"] == agg["outputs"]["aggregate"]
    residue, t, _ = colluder_strips_its_masks(fed, ledger, config, TARGET, attempt=0)
    assert stats.chisquare(np.bincount(residue * 16 // t, minlength=16)).pvalue > 1e-6
    verify_ledger(fed.ledger_url)


def commit_cohort(ledger: Ledger, attempt: int) -> dict[str, int]:
    (entry,) = [e for e in ledger.events(action="cohort") if e["details"]["attempt"] == attempt]
    return entry["details"]["cohort"]


def test_a_site_masks_only_for_the_cohort_the_ledger_names(tmp_path):
    """The coordinator cannot hand one site a smaller cohort (to pair it with a colluder)
    than the others: the site checks its instruction against the coordinator's ledger entry,
    and refuses a recorded cohort below min_sites. It uploads nothing either way."""
    from tasks.coordinator_steps import record_cohort
    from tasks.messages import Phase, make_instruction
    from tasks.site_phase import run_site_phase

    config = federation(tmp_path)
    fed, _ = one_round(config)
    ledger = Ledger(fed.ledger_url)
    (recorded,) = ledger.events(action="cohort")
    cohort = recorded["details"]["cohort"]
    run = CoordinatorRun(fed=fed, job="job-1", round=1)
    state = run.paths.load_state("job-1", "prepare")

    def upload_instruction(cohort: dict, attempt: int) -> str:
        return make_instruction(
            signer=run.identity,
            job="job-1",
            round=1,
            phase=Phase.UPLOAD,
            site=TARGET,
            plan=run.plan,
            plan_digest=run.digest,
            timeout_seconds=60,
            cohort=cohort,
            attempt=attempt,
            he_public=state["he_public"],
            he_secret=state["he_sealed"].get(TARGET),
        )

    uploads = len(ledger.events(action="upload"))
    pair = {COLLUDER: cohort[COLLUDER], TARGET: cohort[TARGET]}
    with pytest.raises(IntegrityError, match="not the one the coordinator recorded"):
        run_site_phase(upload_instruction(pair, 0), site_root(config, TARGET))
    record_cohort(run, {TARGET: cohort[TARGET]}, 5)
    with pytest.raises(IntegrityError, match="fewer than the plan's min_sites"):
        run_site_phase(upload_instruction({TARGET: cohort[TARGET]}, 5), site_root(config, TARGET))
    assert len(ledger.events(action="upload")) == uploads
