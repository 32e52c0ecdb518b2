"""The seams the next capabilities build on, each tested alone: the aggregation strategy, the
budget decision, the secure-aggregation backend, the data sources, the signed messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ledger import keys
from tasks import IntegrityError, StepError, WorkFailed, secure_agg
from tasks.config import SecureAggregationConfig, SiteKind
from tasks.datasource import DicomSource, TabularSource, source_for
from tasks.messages import (
    Phase,
    SiteReport,
    Status,
    make_instruction,
    open_instruction,
    read_report,
    write_report,
)
from tasks.site import DataSettings
from tasks.strategy import FedAvg
from tasks.synthetic import tabular_schema, write_tabular_cohort


def test_fedavg_matches_numpy_weighted_average():
    rng = np.random.default_rng(0)
    updates = {s: rng.normal(size=20).astype(np.float32) for s in ("a", "b", "c")}
    samples = {"a": 10, "b": 30, "c": 60}
    w = FedAvg().weights(samples)
    assert sum(w.values()) == pytest.approx(1.0)
    mean = sum(w[s] * updates[s] for s in updates)
    expected = np.average(np.stack(list(updates.values())), axis=0, weights=list(samples.values()))
    assert np.allclose(mean, expected, atol=1e-6)
    base = np.ones(20, dtype=np.float32)
    assert np.allclose(FedAvg().apply(base, mean), base + expected, atol=1e-6)
    with pytest.raises(WorkFailed):
        FedAvg().weights({"a": 0})
    with pytest.raises(WorkFailed):
        FedAvg().apply(base, mean[:5])


@pytest.mark.parametrize("scheme", ["ckks", "masked-bfv"])
def test_each_backend_hides_updates_from_the_coordinator_side(scheme):
    """Both schemes behind one interface: sites encrypt for the cohort, the coordinator sums
    from the public context alone and can decrypt nothing, the sites decrypt the weighted
    mean."""
    sa = SecureAggregationConfig(scheme=scheme)
    secret = secure_agg.create_secret(sa)
    site = secure_agg.backend(sa, secret, bound=1.0)
    coordinator = secure_agg.backend(sa, secure_agg.public_of(sa, secret), bound=1.0)
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from tasks.masking import mask_context, simulated_cohort

    context = mask_context(federation="f", job="j", round=1, attempt=0, cohort=["a", "b"])
    masks = simulated_cohort({n: X25519PrivateKey.generate() for n in "ab"}, context)
    a, b = np.full(100, 0.5, np.float32), np.full(100, -0.25, np.float32)
    blobs = [
        coordinator.encrypt(a, weight=0.5, masks=masks["a"]),
        site.encrypt(b, weight=0.5, masks=masks["b"]),
    ]
    summed = coordinator.aggregate(blobs, [0.5, 0.5])
    assert np.allclose(site.decrypt(summed), 0.125, atol=1e-4)
    with pytest.raises(StepError, match="secret"):
        coordinator.decrypt(summed)
    with pytest.raises(StepError, match="secret key"):
        site.aggregate(blobs, [0.5, 0.5])


def test_data_sources_hash_their_raw_inputs(tmp_path):
    csv = write_tabular_cohort(tmp_path / "t.csv", n_patients=40, seed=3)
    data = DataSettings(path=csv, labels="outcome")
    source = source_for("s", SiteKind.TABULAR, data, features=tabular_schema())
    assert isinstance(source, TabularSource)
    # The schema is part of what the prepared cache is keyed by.
    other = source_for("s", SiteKind.TABULAR, data, features=tabular_schema()[:-1])
    assert other.settings() != source.settings()
    before = source.digest()
    ds, report = source.prepare(secret=b"k" * 32, image_size=32, holdout_fraction=0.25, seed=0)
    assert report is None  # tables are all or nothing: no file is quarantined
    assert ds.n_patients_train + ds.n_patients_test == 40
    assert source.digest() == before
    csv.write_text(csv.read_text() + csv.read_text().splitlines()[1] + "\n")
    assert source.digest() != before
    missing = DicomSource(
        site="s", data=DataSettings(path=tmp_path, labels=str(tmp_path / "m.csv"))
    )
    with pytest.raises(StepError, match="manifest"):
        missing.digest()


def _instruction(signer: keys.Identity, **kw) -> str:
    return make_instruction(
        signer=signer,
        job="j",
        round=1,
        phase=Phase.TRAIN,
        site="a",
        plan={"name": "f"},
        plan_digest="0" * 64,
        timeout_seconds=60,
        **kw,
    )


def test_instructions_are_signed_and_tampering_is_caught():
    coordinator = keys.generate("coordinator")
    text = _instruction(coordinator)
    assert open_instruction(text, coordinator_key=coordinator.public_key).round == 1
    doc = json.loads(text)
    doc["body"]["round"] = 2
    with pytest.raises(IntegrityError, match="not signed"):
        open_instruction(json.dumps(doc), coordinator_key=coordinator.public_key)
    with pytest.raises(IntegrityError, match="not signed"):
        open_instruction(text, coordinator_key=keys.generate("x").public_key)
    with pytest.raises(IntegrityError, match="not a signed"):
        open_instruction("{}", coordinator_key=coordinator.public_key)


def test_a_report_is_read_only_for_its_own_site_job_round_and_phase(tmp_path):
    store = (tmp_path / "store").as_uri()
    site = keys.generate("a")
    report = SiteReport(
        job="j", round=1, phase=Phase.TRAIN, site="a", status=Status.COMPLETED, instruction="x"
    )
    write_report(store, report, site)
    kw = dict(job="j", round=1, site="a", phase=Phase.TRAIN)
    assert read_report(store, public_key=site.public_key, **kw) == report
    assert read_report(store, public_key=site.public_key, **(kw | {"round": 2})) is None
    with pytest.raises(IntegrityError):
        read_report(store, public_key=keys.generate("a").public_key, **kw)
    # A report copied under another phase's key is refused: the signature binds the phase.
    src = tmp_path / "store" / "j" / "r0001" / "a.train.report.json"
    (src.parent / "a.evaluate.report.json").write_bytes(src.read_bytes())
    with pytest.raises(IntegrityError, match="another"):
        read_report(store, public_key=site.public_key, **(kw | {"phase": Phase.EVALUATE}))
