"""The `medfed` command as a user meets it: exit codes, one-sentence errors, no tracebacks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.demo import demo_config_text
from ledger import keys
from ledger.entry import Action, Event
from ledger.store import Ledger

MEDFED = [sys.executable, "-m", "flows.cli"]


def medfed(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "120"}
    return subprocess.run(
        [*MEDFED, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def assert_one_clean_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("medfed:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr.replace("\n", " ")


def test_bad_config_exits_2_naming_the_field(tmp_path):
    cfg = tmp_path / "federation.toml"
    cfg.write_text(
        demo_config_text(["a", "b"], rounds=2, dp=True).replace("delta = 1e-5", "delta = 3")
    )
    assert_one_clean_error(medfed("validate", str(cfg)), 2, "dp.delta")
    assert_one_clean_error(medfed("run", str(cfg)), 2, "dp.delta")


def test_missing_config_file(tmp_path):
    assert_one_clean_error(
        medfed("run", str(tmp_path / "nope.toml")), 2, "nope.toml", "does not exist"
    )


def test_verify_exit_codes(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger(url)
    who = keys.generate("site-a")
    for i in range(5):
        ledger.append(
            Event(
                actor="site-a",
                action=Action.TRAIN,
                job="j",
                round=i,
                site="site-a",
                idempotency_key=f"k{i}",
            ),
            who,
        )
    ok = medfed("ledger", "verify", "--ledger", url)
    assert ok.returncode == 0 and "intact" in ok.stdout and "6 entries" in ok.stdout
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE ledger_entry SET round = 7 WHERE seq = 3")
    assert_one_clean_error(medfed("ledger", "verify", "--ledger", url), 1, "entry 3")


def test_bad_site_data_fails_inside_prefect_without_a_traceback(tmp_path):
    """A site's missing manifest is found by its preprocess task; the console gets one line."""
    (tmp_path / "data").mkdir()
    cfg = tmp_path / "federation.toml"
    cfg.write_text(demo_config_text(["north", "south"], rounds=1, dp=True))
    proc = medfed("run", str(cfg), timeout=600)
    assert_one_clean_error(proc, 2, "north")
    assert not (tmp_path / "artifacts").exists() or not any(
        (tmp_path / "artifacts").rglob("*.ckks")
    )


@pytest.mark.parametrize("args", [["--help"], ["ledger", "--help"], ["demo", "--help"]])
def test_help_works(args):
    proc = medfed(*args)
    assert proc.returncode == 0 and "Usage" in proc.stdout


def test_compliance_tables_stay_readable_and_json_keeps_values_whole(capsys):
    from flows.ledger_cli import _emit

    digest = "ab" * 32
    row = {"site": "st-mary", "dataset": digest, "recorded": "2026-12-01T18:19:09.807272Z"}
    _emit([row], as_json=False, as_csv=False, title="data use")
    table = capsys.readouterr().out
    assert "abababababab…" in table and digest not in table
    assert "2026-12-01 18:19:09Z" in table and "st-mary" in table
    # Too many wide fields for the terminal: one block per row, every value on one line.
    wide = {f"field_{i}": f"value-number-{i}-{'x' * 20}" for i in range(12)}
    _emit([wide, wide], as_json=False, as_csv=False, title="events")
    blocks = capsys.readouterr().out
    assert blocks.count("── ") == 2
    assert all(f"field {i}" in blocks and wide[f"field_{i}"] in blocks for i in range(12))
    _emit([row], as_json=True, as_csv=False, title="data use")
    assert digest in capsys.readouterr().out
    _emit([], as_json=False, as_csv=False, title="events")
    assert capsys.readouterr().out.strip() == "events: none"
