"""Verification in seq ranges (worker processes each reading their own range, stitched in
order) reports exactly what the single loop reports: the same report for a good ledger, the
same first bad entry and reason for a tampered one, on SQLite and PostgreSQL. Ranges are made
tiny here so that tampers land on range boundaries and key checks span ranges."""

import base64
import dataclasses
import json

import pytest
from sqlalchemy import text

from ledger import VerificationError, jcs, keys, note, verify
from ledger.entry import Action, Event, leaf_hash
from ledger.identities import Member, Role, Roster
from ledger.store import Ledger

SITE = keys.generate("site-a")
COORD = keys.generate("coordinator")
DPO = keys.generate("dpo")
LOG = keys.generate("medfed-log")
OTHER = keys.generate("site-a")  # same name, another key
ORIGIN = "medfed.test/ranges"
VKEY = note.format_vkey(LOG)
SPAN = 4  # entries per range unless a test says otherwise: boundaries at 4, 8, 12, 16
ENTRIES = 21


def build(url: str) -> Ledger:
    """21 entries: site-a registers at 0, the coordinator at 3, the DPO at 18 (a later range)
    before erasing subject-1's fields at 19; subject-2's field stays; the job ends at 20. A
    checkpoint after each round and at the end."""
    ledger = Ledger(url)
    for r in range(1, 5):
        subject = "subject-1" if r % 2 else "subject-2"
        ledger.append_many(
            [
                (
                    Event(
                        actor="site-a",
                        action=Action.TRAIN,
                        job="job",
                        round=r,
                        site="site-a",
                        idempotency_key=f"r{r}/train",
                        privacy={"epsilon_cumulative": 0.5 * r},
                        details={"samples": 10 * r},
                        personal={"note": f"round {r}"} if r < 4 else {},
                        subject=subject if r < 4 else None,
                    ),
                    SITE,
                ),
                (
                    Event(
                        actor="site-a",
                        action=Action.UPLOAD,
                        job="job",
                        round=r,
                        site="site-a",
                        idempotency_key=f"r{r}/upload",
                    ),
                    SITE,
                ),
                (
                    Event(
                        actor="coordinator",
                        action=Action.SECURE_AGGREGATE,
                        job="job",
                        round=r,
                        idempotency_key=f"r{r}/agg",
                    ),
                    COORD,
                ),
                (
                    Event(
                        actor="coordinator",
                        action=Action.COMMIT_ROUND,
                        job="job",
                        round=r,
                        idempotency_key=f"r{r}/commit",
                    ),
                    COORD,
                ),
            ]
        )
        ledger.checkpoint(LOG, ORIGIN)
    ledger.erase("subject-1", DPO, reason="Art. 17 request")
    ledger.append(
        Event(actor="coordinator", action=Action.JOB_END, job="job", idempotency_key="end"),
        COORD,
    )
    ledger.checkpoint(LOG, ORIGIN)
    assert ledger.size() == ENTRIES
    return ledger


def execute(ledger: Ledger, sql: str, **params) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(text(sql), params)


def rewrite(ledger: Ledger, seq: int, change) -> None:
    """Replace entry `seq` by its body as `change` edits it, canonical and re-hashed, with the
    actor and action columns following the body (so only the checks under test can fail)."""
    fields = json.loads(ledger.entry(seq)[1])
    change(fields)
    body = jcs.dumps(fields)
    execute(
        ledger,
        "UPDATE ledger_entry SET body = :b, entry_hash = :h, actor = :a, action = :act"
        " WHERE seq = :s",
        b=body.decode(),
        h=leaf_hash(body).hex(),
        a=fields["actor"],
        act=fields["action"],
        s=seq,
    )


def outcome(url: str, **kwargs):
    try:
        return verify.verify_ledger(url, vkey=VKEY, **kwargs)
    except verify.EntryError as exc:
        return ("entry", exc.seq, exc.reason)
    except VerificationError as exc:
        return (type(exc).__name__, str(exc))


@pytest.fixture
def same_as_single_loop(monkeypatch):
    """check(url, span=..., **kwargs): verify in ranges and with the single loop, assert both
    give the same outcome and that the ranges did not fall back to the single loop."""
    monkeypatch.setattr(verify, "PARALLEL_MIN_ENTRIES", 1)
    single_loop: list[int] = []
    real = verify._verify_source

    def spy(*args, **kwargs):
        single_loop.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "_verify_source", spy)

    def check(url: str, *, span: int = SPAN, fallback: bool = False, **kwargs):
        monkeypatch.setattr(verify, "_span_for", lambda entries, workers: span)
        in_ranges = outcome(url, workers=2, **kwargs)
        assert bool(single_loop) == fallback, "fell back to the single loop" if single_loop else ""
        single_loop.clear()
        single = outcome(url, workers=1, **kwargs)
        assert single_loop, "workers=1 must take the single loop"
        single_loop.clear()
        assert in_ranges == single
        return in_ranges

    return check


@pytest.mark.parametrize("signatures", [True, False])
@pytest.mark.parametrize("span", [1, 2, 4, 8, 16])
def test_a_good_ledger_gets_the_same_report(url, same_as_single_loop, span, signatures):
    build(url)
    report = same_as_single_loop(url, span=span, signatures=signatures)
    assert isinstance(report, verify.Report)
    assert report.entries == ENTRIES and report.checkpoint_size == ENTRIES
    assert report.actors == ("coordinator", "dpo", "site-a")
    assert (report.personal_fields, report.erased_fields) == (1, 2)


def _flip_signature(ledger: Ledger, seq: int) -> None:
    sig = bytearray(base64.b64decode(ledger.entry(seq)[3]))
    sig[0] ^= 1
    execute(
        ledger,
        "UPDATE ledger_entry SET signature = :g WHERE seq = :s",
        g=base64.b64encode(bytes(sig)).decode(),
        s=seq,
    )


def _swap_with_next(ledger: Ledger, seq: int) -> None:
    execute(ledger, "UPDATE ledger_entry SET seq = -5 WHERE seq = :s", s=seq)
    execute(ledger, "UPDATE ledger_entry SET seq = :s WHERE seq = :n", s=seq, n=seq + 1)
    execute(ledger, "UPDATE ledger_entry SET seq = :n WHERE seq = -5", n=seq + 1)


def _copy_row(ledger: Ledger, source: int, seq: int) -> None:
    execute(
        ledger,
        "INSERT INTO ledger_entry (seq, idempotency_key, actor, action, job, round, site,"
        " recorded, body, entry_hash, signature) SELECT :seq, 'forged', actor, action, job,"
        " round, site, recorded, body, entry_hash, signature FROM ledger_entry WHERE seq = :src",
        seq=seq,
        src=source,
    )


def _key(name: str, public_key: bytes) -> str:
    return keys.key_id(name, public_key).hex()


def _reregister(fields: dict) -> None:
    fields["actor"] = "site-a"
    fields["action"] = "register_key"
    fields["details"] = {"public_key": OTHER.public_key.hex(), "algorithm": "ed25519"}
    fields["key_id"] = _key("site-a", OTHER.public_key)


def _as_dpo_before_it_registers(fields: dict) -> None:
    fields["actor"] = "dpo"
    fields["key_id"] = _key("dpo", DPO.public_key)


SQL = {
    "body edited": "UPDATE ledger_entry SET body = body || ' ' WHERE seq = :s",
    "column edited": "UPDATE ledger_entry SET job = 'other' WHERE seq = :s",
    "entry hash edited": "UPDATE ledger_entry SET entry_hash = :zeros WHERE seq = :s",
    "row deleted": "DELETE FROM ledger_entry WHERE seq = :s",
}
# name -> (tamper(ledger, seq), the first bad seq with signatures, without)
TAMPERS = {
    **{
        name: (lambda ledger, s, sql=sql: execute(ledger, sql, s=s, zeros="00" * 32), 0, 0)
        for name, sql in SQL.items()
    },
    "signature flipped": (_flip_signature, 0, None),
    "rows swapped": (_swap_with_next, 0, 0),
    "body rewritten and re-hashed": (
        lambda ledger, s: rewrite(ledger, s, lambda f: f["details"].update(samples=-1)),
        0,
        1,  # the body hashes, so the chain breaks at the next entry
    ),
    "key id changed": (
        lambda ledger, s: rewrite(ledger, s, lambda f: f.update(key_id="00000000")),
        0,
        0,
    ),
    "unregistered actor": (
        lambda ledger, s: rewrite(ledger, s, lambda f: f.update(actor="mallory")),
        0,
        0,
    ),
    "actor registered only later": (
        lambda ledger, s: rewrite(ledger, s, _as_dpo_before_it_registers),
        0,
        0,
    ),
    "re-registered with another key": (lambda ledger, s: rewrite(ledger, s, _reregister), 0, 0),
}


@pytest.mark.parametrize("signatures", [True, False])
@pytest.mark.parametrize("seq", [7, 8, 9])  # last of a range, first of the next, inside it
@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_a_tamper_names_the_same_first_bad_entry(url, same_as_single_loop, name, seq, signatures):
    ledger = build(url)
    tamper, with_sigs, without = TAMPERS[name]
    tamper(ledger, seq)
    result = same_as_single_loop(url, signatures=signatures)
    offset = with_sigs if signatures else without
    if offset is None:
        assert isinstance(result, verify.Report)
    else:
        assert result[:2] == ("entry", seq + offset), result


@pytest.mark.parametrize("signatures", [True, False])
def test_failures_found_only_by_the_stitch(url, same_as_single_loop, signatures):
    ledger = build(url)
    # A whole range missing: the range before it is whole, the one after starts late.
    execute(ledger, "DELETE FROM ledger_entry WHERE seq >= 8 AND seq < 12")
    assert same_as_single_loop(url, signatures=signatures) == (
        "entry",
        8,
        "missing; the next stored entry is 12",
    )


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda ledger: _copy_row(ledger, 3, ENTRIES), ENTRIES),  # appended copy
        (lambda ledger: _copy_row(ledger, 3, -1), 0),  # before the first entry
        (lambda ledger: execute(ledger, "DELETE FROM ledger_entry WHERE seq = 20"), 20),
        (lambda ledger: execute(ledger, "DELETE FROM ledger_entry WHERE seq = 19"), 19),
        # subject-2's personal field (entry 6) no longer matches its commitment.
        (lambda ledger: execute(ledger, "UPDATE ledger_payload SET value = 'forged'"), 6),
        (
            # A malformed registration, in the last range.
            lambda ledger: rewrite(ledger, 18, lambda f: f["details"].update(public_key="not hex")),
            18,
        ),
    ],
)
def test_the_ends_of_the_log(url, same_as_single_loop, tamper, expected):
    ledger = build(url)
    tamper(ledger)
    result = same_as_single_loop(url, signatures=False)
    assert result[:2] == ("entry", expected), result


def pinned(site_key: bytes = SITE.public_key, *, dpo: bool = True) -> Roster:
    members = [
        Member(name="site-a", role=Role.SITE, public_key=site_key),
        Member(name="coordinator", role=Role.COORDINATOR, public_key=COORD.public_key),
        Member(name="dpo", role=Role.DPO, public_key=DPO.public_key),
    ]
    return Roster(members={m.name: m for m in members if dpo or m.name != "dpo"}, log_vkey=VKEY)


def test_pinned_identities_and_checkpoints(url, same_as_single_loop, tmp_path):
    ledger = build(url)
    kept = ledger.checkpoints()[1][2]
    good = same_as_single_loop(url, roster=pinned(), pinned_checkpoints=[kept])
    assert isinstance(good, verify.Report) and good.identities_pinned
    assert same_as_single_loop(url, roster=pinned(OTHER.public_key))[:2] == ("entry", 0)
    # The DPO erases at 19 after registering at 18, in a later range: not enrolled, it fails.
    result = same_as_single_loop(url, roster=pinned(dpo=False))
    assert result[:2] == ("entry", 18) and "'dpo' is not an enrolled identity" in result[2]


_REAL_SCAN = verify._scan_range


def _scan_seeing_another_anchor(task):  # module level: the pool pickles it by name
    part = _REAL_SCAN(task)
    return dataclasses.replace(part, prev=bytes(32)) if task.start == 2 * SPAN else part


def test_workers_that_disagree_leave_it_to_the_single_loop(url, same_as_single_loop, monkeypatch):
    build(url)
    monkeypatch.setattr(verify, "_scan_range", _scan_seeing_another_anchor)
    assert isinstance(same_as_single_loop(url, fallback=True), verify.Report)


def test_a_wrong_key_hint_leaves_it_to_the_single_loop(url, same_as_single_loop, monkeypatch):
    build(url)
    monkeypatch.setattr(verify, "_hint_keys", lambda ledger, trusted: {"site-a": OTHER.public_key})
    assert isinstance(same_as_single_loop(url, fallback=True), verify.Report)
    assert same_as_single_loop(url, signatures=False).entries == ENTRIES  # hints unused


def test_raw_rows_reads_ranges_in_batches(url):
    ledger = build(url)
    _copy_row(ledger, 3, -2)
    seqs = [r[0] for r in ledger.raw_rows(batch=3)]
    assert seqs == [-2, *range(ENTRIES)]
    assert [r[0] for r in ledger.raw_rows(batch=2, start=4, stop=9)] == [4, 5, 6, 7, 8]
    assert [r[0] for r in ledger.raw_rows(stop=1)] == [-2, 0]
    assert [r[0] for r in ledger.raw_rows(start=18, batch=1)] == [18, 19, 20]
    assert {r[3] for r in ledger.raw_rows(signatures=False)} == {""}
    assert ledger.last_seq() == ENTRIES - 1
