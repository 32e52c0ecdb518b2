"""Checkpoints, consistency, offline bundles, inclusion proofs, erasure, queries, FHIR, CLI."""

import base64
import json

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from typer.testing import CliRunner

from ledger import LedgerError, VerificationError, jcs, keys, note, queries
from ledger.accounting import Release, epsilon
from ledger.entry import Action, Event
from ledger.proof import check_inclusion, inclusion
from ledger.store import Ledger, UnreadableError, open_ledger
from ledger.verify import CheckpointError, EntryError, verify_bundle, verify_ledger, write_bundle

SITE = keys.generate("site-a")
COORD = keys.generate("coordinator")
LOG = keys.generate("medfed-log")
DPO = keys.generate("dpo")
ORIGIN = "medfed.test/log"
VKEY = note.format_vkey(LOG)


def _round(ledger: Ledger, job: str, r: int, model: str) -> None:
    base = f"{r - 1:064x}" if r > 1 else "00" * 32
    ledger.append_many(
        [
            (
                Event(
                    actor="site-a",
                    action=Action.PREPROCESS,
                    job=job,
                    round=r,
                    site="site-a",
                    idempotency_key=f"{job}/r{r}/site-a/preprocess",
                    outputs={"dataset": "da" * 32},
                    details={
                        "patients_train": 40,
                        "patients_heldout": 10,
                        "images_or_rows_train": 160,
                        "images_or_rows_heldout": 40,
                    },
                ),
                SITE,
            ),
            (
                Event(
                    actor="site-a",
                    action=Action.TRAIN,
                    job=job,
                    round=r,
                    site="site-a",
                    idempotency_key=f"{job}/r{r}/site-a/train",
                    inputs={"dataset": "da" * 32, "global_model": base},
                    outputs={"local_model": "1c" * 32},
                    privacy={
                        "release": {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20},
                        "epsilon_round": 1.5,
                        "epsilon_cumulative": 1.5 * r,
                        "epsilon_budget": 8.0,
                        "delta": 1e-5,
                        "accountant": "rdp",
                    },
                    personal={"operator_note": f"retrained at request of Dr X, round {r}"},
                    subject="patient-pseudonym-7",
                ),
                SITE,
            ),
            (
                Event(
                    actor="site-a",
                    action=Action.UPLOAD,
                    job=job,
                    round=r,
                    site="site-a",
                    idempotency_key=f"{job}/r{r}/site-a/upload",
                    inputs={"ciphertext": "ce" * 32},
                    outputs={"artifact": "a7" * 32},
                    details={"samples": 160, "bytes": 1000},
                ),
                SITE,
            ),
            (
                Event(
                    actor="coordinator",
                    action=Action.SECURE_AGGREGATE,
                    job=job,
                    round=r,
                    idempotency_key=f"{job}/r{r}/agg",
                    inputs={"site-a": "a7" * 32},
                    outputs={"aggregate": "ag" * 32},
                    details={"weights": {"site-a": 1.0}},
                ),
                COORD,
            ),
            (
                Event(
                    actor="coordinator",
                    action=Action.COMMIT_ROUND,
                    job=job,
                    round=r,
                    idempotency_key=f"{job}/r{r}/commit",
                    outputs={"global_model": model},
                    details={"participants": ["site-a"], "weighted_auc": 0.9},
                ),
                COORD,
            ),
        ]
    )


def filled(url: str, rounds: int = 3) -> Ledger:
    ledger = Ledger(url)
    for r in range(1, rounds + 1):
        _round(ledger, "job-1", r, f"{r:064x}")
        ledger.checkpoint(LOG, ORIGIN)
    return ledger


def execute(ledger: Ledger, sql: str, **params) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(text(sql), params)


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_are_signed_consistent_and_verify(url):
    ledger = filled(url)
    cps = ledger.checkpoints()
    assert [c[0] for c in cps] == [7, 12, 17]  # round 1 also registers two keys
    assert json.loads(cps[0][3]) == [] and json.loads(cps[1][3])  # proof from the previous
    cp = note.verify_checkpoint(cps[-1][2], VKEY, origin=ORIGIN)
    report = verify_ledger(url, vkey=VKEY)
    assert report.checkpoints == 3 and report.checkpoint_size == 17
    assert report.root == cp.root_hash.hex()
    # nothing new: the same note comes back
    assert ledger.checkpoint(LOG, ORIGIN) == cps[-1][2]


def test_checkpoint_refuses_a_second_key(url):
    ledger = filled(url, 1)
    with pytest.raises(LedgerError, match="another key"):
        ledger.checkpoint(keys.generate("medfed-log"), ORIGIN)


@pytest.mark.parametrize("where", ["origin", "root", "signature"])
def test_a_flipped_checkpoint_byte_is_detected(url, where):
    ledger = filled(url)
    size, _root, text_, _p = ledger.checkpoints()[1]
    raw = bytearray(text_.encode())
    index = {
        "origin": 0,
        "root": text_.index("\n", text_.index("\n") + 1) + 3,
        "signature": len(raw) - 10,
    }[where]
    raw[index] ^= 1
    execute(
        ledger,
        "UPDATE ledger_checkpoint SET note = :n WHERE size = :s",
        n=raw.decode(errors="replace"),
        s=size,
    )
    with pytest.raises(CheckpointError) as info:
        verify_ledger(url, vkey=VKEY)
    assert info.value.size == size


def test_a_pinned_vkey_rejects_checkpoints_by_another_key(url):
    filled(url, 1)
    with pytest.raises(CheckpointError):
        verify_ledger(url, vkey=note.format_vkey(keys.generate("medfed-log")))


def test_truncation_is_caught_by_the_checkpoint_naming_the_first_missing_entry(url):
    ledger = filled(url)
    execute(ledger, "DELETE FROM ledger_entry WHERE seq >= 15")
    with pytest.raises(EntryError) as info:
        verify_ledger(url, vkey=VKEY)
    assert info.value.seq == 15


def test_a_rewritten_history_is_caught_by_a_pinned_checkpoint(url, tmp_path):
    ledger = filled(url, 2)
    kept = ledger.checkpoints()[-1][2]
    # the operator drops everything and rebuilds a different (valid, re-signed) history
    execute(ledger, "DELETE FROM ledger_entry")
    execute(ledger, "DELETE FROM ledger_checkpoint")
    execute(ledger, "DELETE FROM ledger_actor")
    execute(ledger, "DELETE FROM ledger_payload")
    _round(ledger, "job-2", 1, "ff" * 32)
    _round(ledger, "job-2", 2, "fe" * 32)
    ledger.checkpoint(LOG, ORIGIN)
    verify_ledger(url, vkey=VKEY)  # internally consistent
    with pytest.raises(CheckpointError, match="rewritten"):
        verify_ledger(url, vkey=VKEY, pinned_checkpoints=[kept])


def test_a_missing_consistency_proof_is_detected(url):
    ledger = filled(url)
    execute(ledger, "UPDATE ledger_checkpoint SET consistency_proof = '[]' WHERE size = 12")
    with pytest.raises(CheckpointError) as info:
        verify_ledger(url, vkey=VKEY)
    assert info.value.size == 12


# ---------------------------------------------------------------- bundles and proofs


def test_bundle_verifies_offline_and_detects_each_tamper(url, tmp_path):
    ledger = filled(url)
    path = tmp_path / "bundle.json"
    write_bundle(ledger, path)
    report = verify_bundle(path, vkey=VKEY)
    assert report.entries == 17 and report.checkpoints == 3
    assert "Dr X" not in path.read_text()  # personal text stays out of the bundle
    original = json.loads(path.read_text())

    def tampered(mutate) -> int:
        doc = json.loads(json.dumps(original))
        mutate(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(VerificationError) as info:
            verify_bundle(path, vkey=VKEY)
        return getattr(info.value, "seq", getattr(info.value, "size", None))

    def flip_sig(doc):
        sig = bytearray(base64.b64decode(doc["entries"][8][3]))
        sig[5] ^= 1
        doc["entries"][8][3] = base64.b64encode(bytes(sig)).decode()

    def edit(doc):
        doc["entries"][9][1] = doc["entries"][9][1].replace('"samples":160', '"samples":999')

    assert tampered(flip_sig) == 8
    assert tampered(edit) == 9
    assert tampered(lambda d: d["entries"].pop(4)) == 4
    assert tampered(lambda d: d["entries"].insert(4, d["entries"][2])) == 4
    assert tampered(lambda d: d["entries"].__setitem__(slice(4, 6), d["entries"][5:3:-1])) == 4
    assert (
        tampered(
            lambda d: d["checkpoints"][0].__setitem__(
                "note", d["checkpoints"][0]["note"].replace("\n7\n", "\n6\n")
            )
        )
        == 7
    )


def test_inclusion_proof_checks_offline_and_rejects_alteration(url):
    ledger = filled(url)
    doc = json.loads(json.dumps(inclusion(ledger, "job-1/r2/site-a/train")))
    cp = check_inclusion(doc, VKEY)
    assert cp.size == 17 and doc["leaf_index"] == 8
    bad = json.loads(json.dumps(doc))
    bad["audit_path"][0] = "00" * 32
    with pytest.raises(VerificationError):
        check_inclusion(bad, VKEY)
    bad = json.loads(json.dumps(doc))
    bad["entry"]["body"] = bad["entry"]["body"].replace("1.5", "0.5")
    with pytest.raises(VerificationError):
        check_inclusion(bad, VKEY)
    with pytest.raises(VerificationError):
        check_inclusion(doc, note.format_vkey(keys.generate("medfed-log")))


# ---------------------------------------------------------------- erasure


def test_erasure_destroys_personal_fields_and_every_proof_still_verifies(url):
    ledger = filled(url)
    before = inclusion(ledger, 8)
    assert verify_ledger(url, vkey=VKEY).personal_fields == 3
    appended, count = ledger.erase("patient-pseudonym-7", DPO, reason="Art. 17 request")
    assert count == 3 and appended is not None
    assert ledger.payloads() == []
    erase_body = ledger.events(action="erase")[0]
    assert "patient-pseudonym-7" not in json.dumps(erase_body)
    ledger.checkpoint(LOG, ORIGIN)
    report = verify_ledger(url, vkey=VKEY)
    assert report.erased_fields == 3 and report.personal_fields == 0
    check_inclusion(before, VKEY)  # a proof made before the erasure still checks
    check_inclusion(inclusion(ledger, 8), VKEY)
    assert ledger.erase("patient-pseudonym-7", DPO, reason="again") == (None, 0)


def test_payload_deleted_without_an_erasure_entry_or_edited_is_detected(url):
    ledger = filled(url)
    execute(ledger, "UPDATE ledger_payload SET value = 'forged' WHERE seq = 8")
    with pytest.raises(EntryError) as info:
        verify_ledger(url, vkey=VKEY)
    assert info.value.seq == 8
    execute(ledger, "DELETE FROM ledger_payload WHERE seq = 8")
    with pytest.raises(EntryError, match="no erasure entry") as info:
        verify_ledger(url, vkey=VKEY)
    assert info.value.seq == 8


@pytest.mark.parametrize(
    "details",
    [{"erased": [5]}, {"erased": "all"}, {"erased": [{"seq": [1], "field": "x"}]}],
    ids=["items-not-objects", "not-a-list", "unhashable-seq"],
)
def test_a_signed_but_malformed_erase_entry_is_named_not_a_crash(url, details):
    """Signed by a registered key and still nonsense: verification names the entry."""
    ledger = filled(url)
    appended = ledger.append(
        Event(
            actor=DPO.name,
            action=Action.ERASE,
            job="erasure",
            idempotency_key="erase/malformed",
            details=details,
        ),
        DPO,
    )
    with pytest.raises(EntryError, match="erase entry does not list") as info:
        verify_ledger(url)
    assert info.value.seq == appended.seq


# ---------------------------------------------------------------- queries and FHIR


def test_compliance_queries(url):
    ledger = filled(url)
    [summary] = queries.spend_summary(ledger, site="site-a")
    # Entries older than reservations are charged as they stand, recomputed, not believed.
    release = Release(noise_multiplier=1.1, sample_rate=0.05, steps=20)
    spent = epsilon([release] * 3, delta=1e-5, accountant="rdp")
    assert summary["epsilon_spent"] == pytest.approx(spent) and summary["epsilon_recorded"] == 4.5
    assert summary["budget_remaining"] == pytest.approx(8.0 - spent)
    assert summary["released"] == 3 and summary["metrics_policy"] == "exact (before policy)"
    assert [r["state"] for r in queries.spend(ledger)] == ["released"] * 3
    [use] = queries.data_use(ledger)
    assert use["patients_train"] == 40 and use["rounds_trained"].count("job-1/r") == 3
    lineage = queries.lineage(ledger, f"{3:064x}")
    assert [r["round"] for r in lineage if r["kind"] == "global model"] == [3, 2, 1]
    assert {r["kind"] for r in lineage} >= {"global model", "dataset", "site update"}
    disclosures = queries.disclosures(ledger)
    assert len(disclosures) == 3 and disclosures[0]["purpose"] == "healthcare research"
    assert len(queries.events(ledger, action="train", entity="da" * 4)) == 3
    assert queries.events(ledger, since="2999-01-01") == []


def test_fhir_export_is_a_valid_r5_bundle(url):
    from fhir.resources.auditevent import AuditEvent
    from fhir.resources.bundle import Bundle

    from ledger import fhir

    ledger = filled(url, 1)
    doc = fhir.bundle(ledger.raw_rows(), origin=ORIGIN)
    parsed = Bundle.model_validate(doc)
    assert len(parsed.entry) == 7
    [train] = [
        AuditEvent.model_validate(e["resource"])
        for e in doc["entry"]
        if e["resource"]["code"]["text"] == "train"
    ]
    details = {d.type.text: d for e in train.entity for d in (e.detail or [])}
    assert details["privacy.epsilon_cumulative"].valueQuantity.value == 1.5
    assert details["round"].valueInteger == 1
    assert train.authorization[0].coding[0].code == "HRESCH"


# ---------------------------------------------------------------- canonical JSON


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fast_jcs_matches_rfc8785(value):
    try:
        expected = rfc8785.dumps(value)
    except Exception:  # noqa: BLE001
        with pytest.raises(Exception):  # noqa: B017
            jcs.dumps(value)
        return
    assert jcs.dumps(value) == expected


@settings(max_examples=2000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_fast_jcs_numbers_match_rfc8785(x):
    assert jcs.dumps([x, {"k": x}]) == rfc8785.dumps([x, {"k": x}])


# ---------------------------------------------------------------- CLI


def test_cli_exit_codes(tmp_path):
    from flows.cli.main import app

    run = CliRunner().invoke
    url = f"sqlite:///{tmp_path}/l.db"
    missing = tmp_path / "missing.db"
    result = run(app, ["ledger", "verify", "--ledger", f"sqlite:///{missing}"])
    assert result.exit_code == 2 and "does not exist" in result.output and not missing.exists()
    ledger = filled(url)
    key = tmp_path / "log.pem"
    keys.save(LOG, key)
    assert run(app, ["ledger", "verify", "--ledger", url, "--vkey", VKEY]).exit_code == 0
    result = run(
        app,
        ["ledger", "checkpoint", "--ledger", url, "--key", str(key), "--out", str(tmp_path / "cp")],
    )
    assert result.exit_code == 0, result.output
    cp = tmp_path / "cp"
    assert run(app, ["ledger", "checkpoint", "verify", "--vkey", VKEY, str(cp)]).exit_code == 0
    cp.write_text(cp.read_text().replace("\n17\n", "\n16\n"))
    assert run(app, ["ledger", "checkpoint", "verify", "--vkey", VKEY, str(cp)]).exit_code == 1
    assert (
        run(
            app, ["ledger", "checkpoint", "verify", "--vkey", VKEY, str(tmp_path / "nope")]
        ).exit_code
        == 2
    )
    assert run(app, ["ledger", "checkpoint", "verify", "--vkey", "junk", str(cp)]).exit_code == 2
    for args in (
        ["spend", "--json"],
        ["data-use", "--csv"],
        ["disclosures"],
        ["events", "--action", "train"],
        ["lineage", f"{3:064x}"],
    ):
        result = run(app, ["ledger", *args[:1], "--ledger", url, *args[1:]])
        assert result.exit_code == 0, (args, result.output)
    result = run(app, ["ledger", "prove", "8", "--ledger", url, "--out", str(tmp_path / "p")])
    assert result.exit_code == 0
    assert run(app, ["ledger", "verify-proof", str(tmp_path / "p"), "--vkey", VKEY]).exit_code == 0
    assert (
        run(app, ["ledger", "export", "--ledger", url, "--bundle", str(tmp_path / "b")]).exit_code
        == 0
    )
    assert (
        run(app, ["ledger", "verify", "--bundle", str(tmp_path / "b"), "--vkey", VKEY]).exit_code
        == 0
    )
    result = run(app, ["ledger", "export", "--ledger", url, "--format", "fhir"])
    assert result.exit_code == 0 and '"AuditEvent"' in result.output
    execute(ledger, "UPDATE ledger_entry SET round = 9 WHERE seq = 3")
    result = run(app, ["ledger", "verify", "--ledger", url])
    assert result.exit_code == 1 and "entry 3" in result.output and "Traceback" not in result.output


def test_opening_a_missing_sqlite_ledger_does_not_create_it(tmp_path):
    with pytest.raises(UnreadableError, match="does not exist"):
        open_ledger(f"sqlite:///{tmp_path}/none.db")
    assert not (tmp_path / "none.db").exists()


def test_spend_reports_training_without_dp_as_unbounded(tmp_path):
    from ledger import keys
    from ledger.entry import Action, Event
    from ledger.queries import UNBOUNDED, spend_summary
    from ledger.store import Ledger

    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    site = keys.generate("a")
    dp = {
        "release": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10},
        "epsilon_cumulative": 0.8,
        "epsilon_budget": 2.0,
        "delta": 1e-5,
        "accountant": "prv",
    }
    ledger.append(
        Event(
            actor="a",
            action=Action.TRAIN,
            job="j1",
            round=1,
            site="a",
            idempotency_key="j1/1",
            privacy=dp,
        ),
        site,
    )
    [summary] = spend_summary(ledger)
    one = epsilon(
        [Release(noise_multiplier=1.0, sample_rate=0.1, steps=10)], delta=1e-5, accountant="prv"
    )
    assert summary["epsilon_spent"] == pytest.approx(one)
    assert summary["budget_remaining"] == pytest.approx(max(2.0 - one, 0.0))
    assert summary["accountant"] == "prv" and summary["dp_optouts"] == 0
    ledger.append(
        Event(
            actor="a",
            action=Action.TRAIN,
            job="j2",
            round=1,
            site="a",
            idempotency_key="j2/1",
            privacy={"dp": False, "epsilon": "unbounded"},
        ),
        site,
    )
    [summary] = spend_summary(ledger)
    assert summary["epsilon_spent"] == UNBOUNDED
    assert summary["budget_remaining"] == 0.0 and summary["dp_optouts"] == 1
