"""`medfed ledger ...` on bad or foreign input: one sentence, exit 2, no traceback, and the
database it was pointed at left exactly as it was."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid

import psycopg
import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from ledger import keys, note
from ledger.entry import Action, Event
from ledger.store import Ledger

LOG = keys.generate("medfed-log")
SITE = keys.generate("site-a")
VKEY = note.format_vkey(LOG)


def medfed(*args: str):
    return CliRunner().invoke(app, list(args))


def one_sentence(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = result.output.strip()
    assert text.startswith("medfed: ") and "Traceback" not in text, text
    return text


@pytest.fixture
def ledger_file(tmp_path):
    url = f"sqlite:///{tmp_path}/l.db"
    ledger = Ledger(url)
    for i in range(3):
        ledger.append(
            Event(
                actor="site-a",
                action=Action.TRAIN,
                job="j",
                site="site-a",
                idempotency_key=f"j/r{i}/site-a/train",
                round=i,
            ),
            SITE,
        )
    ledger.checkpoint(LOG, "medfed.local/t")
    return tmp_path / "l.db"


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("content", ["empty", "foreign sqlite", "not a database"])
def test_verify_and_queries_on_a_database_without_a_ledger_exit_2_and_write_nothing(
    tmp_path, content
):
    path = tmp_path / "other.db"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "foreign sqlite":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE patients (id TEXT)")
    else:
        path.write_text("name,age\n")
    before = sha(path)
    for args in (
        ["verify"],
        ["events"],
        ["spend"],
        ["prove", "0"],
        ["export", "--bundle", str(tmp_path / "b.json")],
    ):
        result = medfed("ledger", *args, "--ledger", f"sqlite:///{path}")
        assert result.exit_code == 2, (args, result.output)
        one_sentence(result)
        assert sha(path) == before, args
    if content == "foreign sqlite":
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert names == {"patients"}


def test_verify_on_a_postgresql_schema_without_a_ledger_exits_2_and_creates_nothing(
    postgres_url,
):
    base = postgres_url.replace("+psycopg", "")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        url = f"{postgres_url}?options=-csearch_path%3D{schema}"
        result = medfed("ledger", "verify", "--ledger", url)
        assert result.exit_code == 2 and "holds no medfed ledger" in one_sentence(result)
        with psycopg.connect(base) as conn:
            tables = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            ).fetchone()[0]
        assert tables == 0
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_verifying_a_ledger_leaves_its_file_unchanged(ledger_file):
    before = sha(ledger_file)
    result = medfed("ledger", "verify", "--ledger", f"sqlite:///{ledger_file}", "--vkey", VKEY)
    assert result.exit_code == 0, result.output
    assert sha(ledger_file) == before


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///", "sqlite:/x.db", "mysql://h/db", "postgresql://[::1", "nonsense"],
)
def test_a_malformed_ledger_url_is_one_sentence(url):
    result = medfed("ledger", "verify", "--ledger", url)
    assert result.exit_code == 2, result.output
    one_sentence(result)


@pytest.mark.parametrize("entry", ["99999999999999999999", "²", "1e3", "77"])
def test_prove_with_an_entry_number_out_of_range_is_one_sentence(ledger_file, entry):
    result = medfed("ledger", "prove", entry, "--ledger", f"sqlite:///{ledger_file}")
    assert result.exit_code == 2, result.output
    one_sentence(result)


def test_dates_are_parsed_as_iso_8601_in_utc(ledger_file):
    url = f"sqlite:///{ledger_file}"
    for since, expected in [
        ("2000-01-01", 4),
        ("2000-01-01T00:00:00+05:00", 4),
        ("2999-12-31", 0),
        ("2999-01-01T00:00Z", 0),
    ]:
        result = medfed("ledger", "events", "--ledger", url, "--since", since, "--json")
        assert result.exit_code == 0, result.output
        assert len(__import__("json").loads(result.stdout)) == expected, since
    for bad in ["2026-12-1", "not-a-date", "2026-13-01", ""]:
        for option in ("--since", "--until"):
            result = medfed("ledger", "events", "--ledger", url, option, bad)
            assert result.exit_code == 2, (bad, result.output)
            assert option in one_sentence(result)
        result = medfed("ledger", "disclosures", "--ledger", url, "--until", bad)
        assert result.exit_code == 2, (bad, result.output)


def test_a_kept_checkpoint_with_trailing_whitespace_still_verifies(ledger_file, tmp_path):
    url = f"sqlite:///{ledger_file}"
    kept = tmp_path / "kept.txt"
    kept.write_text(Ledger(url).latest_checkpoint()[1] + "\n\n  \n")
    result = medfed("ledger", "verify", "--ledger", url, "--vkey", VKEY, "--checkpoint", str(kept))
    assert result.exit_code == 0, result.output


def test_witnesses_without_identities_is_bad_usage(ledger_file):
    result = medfed("ledger", "verify", "--ledger", f"sqlite:///{ledger_file}", "--witnesses", "1")
    assert result.exit_code == 2 and "--identities" in one_sentence(result)
    result = medfed(
        "ledger",
        "verify",
        "--ledger",
        f"sqlite:///{ledger_file}",
        "--identities",
        "/nonexistent.toml",
    )
    assert result.exit_code == 2 and "does not exist" in one_sentence(result)
