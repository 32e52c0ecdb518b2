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
    cfg.write_text(demo_config_text(rounds=2, dp=True).replace("delta = 1e-5", "delta = 3"))
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


def test_a_site_with_bad_data_stops_the_job_before_anyone_trains(tmp_path):
    """Every site's data is checked in `prepare`: a missing file drops its site, and with
    fewer than min_sites left the job stops (exit 1) naming the site, before any training."""
    from fedhelp import tabular_federation

    from tasks.synthetic import write_tabular_cohort

    a = write_tabular_cohort(tmp_path / "a.csv", n_patients=60, seed=1)
    b = write_tabular_cohort(tmp_path / "b.csv", n_patients=60, seed=2)
    cfg = tabular_federation(tmp_path, {"clinic-a": (a, None), "clinic-b": (b, None)})
    b.unlink()
    proc = medfed("run", str(cfg), "--sites", str(tmp_path / "sites"), timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "clinic-b" in proc.stderr and "nobody trained" in proc.stderr
    assert "--job" in proc.stderr  # the command that resumes the job
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    assert not ledger.events(action="train")
    (drop,) = ledger.events(action="drop")
    assert drop["site"] == "clinic-b" and "b.csv" not in str(drop)  # no site-private path


def test_a_patient_value_in_a_bad_cell_never_leaves_the_site(tmp_path):
    """A name typed into a numeric column stops that site (and, below min_sites, the job):
    what the operator reads, the ledger and the artifact store name site, column, line and
    file, never the value."""
    import csv

    from fedhelp import tabular_federation

    from tasks.synthetic import write_tabular_cohort

    a = write_tabular_cohort(tmp_path / "a.csv", n_patients=60, seed=1)
    b = write_tabular_cohort(tmp_path / "b.csv", n_patients=60, seed=2)
    cfg = tabular_federation(tmp_path, {"clinic-a": (a, None), "clinic-b": (b, None)})
    with b.open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows[1][rows[0].index("age")] = "JOHN^SMITH"  # beside the id column
    with b.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    proc = medfed("run", str(cfg), "--sites", str(tmp_path / "sites"), timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "clinic-b" in proc.stderr
    shared = [tmp_path / "ledger.db", *(tmp_path / "artifacts").rglob("*")]
    texts = [proc.stdout, proc.stderr]
    texts += [p.read_bytes().decode("latin-1") for p in shared if p.is_file()]
    for text in texts:
        assert "JOHN" not in text and "SMITH" not in text
    (drop,) = Ledger(f"sqlite:///{tmp_path}/ledger.db").events(action="drop")
    assert "line 2, column 'age' is not a number" in drop["details"]["reason"]


def test_run_without_workers_or_sites_is_bad_usage(tmp_path):
    cfg = tmp_path / "federation.toml"
    cfg.write_text(
        demo_config_text(rounds=1, dp=True) + '\n[[sites]]\nname = "a"\nkind = "dicom"\n'
        f'public_key = "{"1" * 64}"\nkex_key = "{"2" * 64}"\n'
    )
    env_free = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(
        [*MEDFED, "run", str(cfg)], capture_output=True, text=True, env=env_free, timeout=300
    )
    assert_one_clean_error(proc, 2, "PREFECT_API_URL", "--sites")


@pytest.mark.parametrize("args", [["--help"], ["ledger", "--help"], ["demo", "--help"]])
def test_help_works(args):
    proc = medfed(*args)
    assert proc.returncode == 0 and "Usage" in proc.stdout


def test_compliance_tables_stay_readable_and_json_keeps_values_whole(capsys):
    from flows.cli.ledger import _emit

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
