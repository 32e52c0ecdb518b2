"""Appending, idempotency and tamper detection, on SQLite and on PostgreSQL."""

import base64
import json

import pytest
from sqlalchemy import text

from ledger import LedgerError, keys
from ledger.entry import Action, Event
from ledger.store import Ledger
from ledger.verify import EntryError, verify_ledger

SITE = keys.generate("site-a")
COORD = keys.generate("coordinator")


def event(i: int, actor=SITE, action=Action.TRAIN) -> Event:
    return Event(
        actor=actor.name,
        action=action,
        job="job-1",
        round=i,
        site="site-a" if actor is SITE else None,
        idempotency_key=f"job-1/r{i}/{actor.name}/{action}",
        inputs={"dataset": "ab" * 32},
        privacy={"epsilon_cumulative": 0.1 * i},
        details={"samples": 100 + i},
    )


def filled(url: str, n: int = 6) -> Ledger:
    ledger = Ledger(url)
    for i in range(n):
        ledger.append(event(i, SITE), SITE)
        ledger.append(event(i, COORD, Action.SECURE_AGGREGATE), COORD)
    return ledger


def execute(ledger: Ledger, sql: str, **params) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(text(sql), params)


def test_appends_chain_register_keys_and_verify(url):
    ledger = filled(url)
    report = verify_ledger(url)
    # 12 events plus one register_key entry per actor, before its first event.
    assert report.entries == 14 == ledger.size()
    assert report.actors == ("coordinator", "site-a")
    bodies = ledger.events()
    assert (
        bodies[0]["action"] == "register_key"
        and bodies[0]["details"]["public_key"] == SITE.public_key.hex()
    )
    assert [b["seq"] for b in bodies] == list(range(14))
    assert all(bodies[i + 1]["prev"] != bodies[i]["prev"] for i in range(13))


def test_reappending_the_same_event_is_a_no_op(url):
    ledger = filled(url, 2)
    before = ledger.size()
    again = ledger.append(event(1, SITE), SITE)
    assert again.created is False
    assert ledger.size() == before
    verify_ledger(url)


def test_an_actor_cannot_switch_keys(url):
    filled(url, 1)
    impostor = keys.generate("site-a")
    with pytest.raises(LedgerError, match="different key"):
        Ledger(url).append(event(9, SITE), impostor)


TAMPERS = {
    "body edited": ("UPDATE ledger_entry SET body = replace(body, :old, :new) WHERE seq = :s", 7),
    "indexed column edited": ("UPDATE ledger_entry SET action = 'evaluate' WHERE seq = :s", 7),
    "round column edited": ("UPDATE ledger_entry SET round = 42 WHERE seq = :s", 7),
    "signature flipped": ("UPDATE ledger_entry SET signature = :sig WHERE seq = :s", 7),
    "entry hash edited": ("UPDATE ledger_entry SET entry_hash = :h WHERE seq = :s", 7),
    "row deleted": ("DELETE FROM ledger_entry WHERE seq = :s", 7),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampering_is_detected_and_names_the_first_bad_entry(url, name):
    ledger = filled(url)
    sql, seq = TAMPERS[name]
    row = next(r for r in ledger.rows() if r.seq == seq)
    sig = bytearray(base64.b64decode(row.signature))
    sig[0] ^= 1
    execute(
        ledger,
        sql,
        s=seq,
        sig=base64.b64encode(bytes(sig)).decode(),
        h="00" * 32,
        old='"samples":10',
        new='"samples":90',
    )
    with pytest.raises(EntryError) as info:
        verify_ledger(url)
    assert info.value.seq == seq
    assert f"entry {seq}" in str(info.value)


def test_reordering_rows_is_detected(url):
    ledger = filled(url)
    execute(ledger, "UPDATE ledger_entry SET seq = -1 WHERE seq = 4")
    execute(ledger, "UPDATE ledger_entry SET seq = 4 WHERE seq = 5")
    execute(ledger, "UPDATE ledger_entry SET seq = 5 WHERE seq = -1")
    with pytest.raises(EntryError) as info:
        verify_ledger(url)
    assert info.value.seq == 4


def test_inserted_forged_entry_is_detected(url):
    """A row copied from elsewhere in the chain and appended breaks the chain at its seq."""
    ledger = filled(url)
    row = next(r for r in ledger.rows() if r.seq == 3)
    execute(
        ledger,
        "INSERT INTO ledger_entry (seq, idempotency_key, actor, action, job, round, site,"
        " recorded, body, entry_hash, signature) VALUES (:seq, 'forged', :actor, :action, :job,"
        " :round, :site, :recorded, :body, :entry_hash, :signature)",
        seq=14,
        actor=row.actor,
        action=row.action,
        job=row.job,
        round=row.round,
        site=row.site,
        recorded=row.recorded,
        body=row.body,
        entry_hash=row.entry_hash,
        signature=row.signature,
    )
    with pytest.raises(EntryError) as info:
        verify_ledger(url)
    assert info.value.seq == 14


def test_no_patient_identifier_fields_in_entries(url):
    ledger = filled(url, 1)
    for body in ledger.events():
        flat = json.dumps(body).lower()
        for forbidden in ("patientname", "patientid", "birth"):
            assert forbidden not in flat
