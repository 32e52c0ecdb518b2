"""`medfed report` on the demo's ledger: figures equal the CLI's --json figures, the page is
self-contained and renders in headless Chromium, a tampered ledger is reported as such."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from fedhelp import copy_ledger

from ledger import plots

MEDFED = str(Path(sys.executable).with_name("medfed"))


def medfed(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([MEDFED, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def cli_json(*args: str):
    return json.loads(medfed("ledger", *args, "--json").stdout)


@pytest.fixture(scope="module")
def demo_report(demo_workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{demo_workdir}/ledger.db"
    medfed(
        "report", "--ledger", url, "--out", str(out),
        "--identities", str(demo_workdir / "federation.toml"),
    )  # fmt: skip
    return url, out


def embedded(page: Path) -> dict:
    match = re.search(
        r'<script type="application/json" id="medfed-data">(.*?)</script>', page.read_text(), re.S
    )
    assert match, "the report embeds its data"
    return json.loads(match.group(1))


def test_every_figure_in_the_report_is_the_cli_json_figure(demo_report, demo_workdir):
    url, out = demo_report
    data = embedded(out / "report.html")
    assert data == json.loads((out / "data.json").read_text())
    identities = ("--identities", str(demo_workdir / "federation.toml"))
    url_args = ("--ledger", url, *identities)
    assert data["spend"] == cli_json("spend", *url_args)
    assert data["spend_timeline"] == cli_json("spend", "--timeline", *url_args)
    assert data["quality"] == cli_json("quality", *url_args)
    assert data["participation"] == cli_json("participation", *url_args)
    assert data["data_use"] == cli_json("data-use", *url_args)
    assert data["disclosures"] == cli_json("disclosures", *url_args)
    assert data["checkpoints"] == cli_json("checkpoints", "--ledger", url)
    model = data["lineage"]["model"]
    assert data["lineage"]["rows"] == cli_json("lineage", model, *url_args)
    verified = cli_json("verify", *url_args)
    assert {k: data["integrity"][k] for k in verified} == verified
    assert data["drawn_from"] == {"entries": verified["entries"], "root": verified["root"]}

    # What the figures show: every site's spend, its last point is what the budget check
    # uses, against its budget; every site's quality in each round; everyone aggregated.
    sites = {"lakeside", "northfield", "st-mary"}
    assert {r["site"] for r in data["spend"]} == sites
    for row in data["spend"]:
        mine = [t for t in data["spend_timeline"] if t["site"] == row["site"]]
        assert len(mine) == 2  # one training charge per round
        assert mine[-1]["epsilon_cumulative"] == pytest.approx(row["epsilon_spent"])
        assert mine[0]["epsilon_cumulative"] < mine[-1]["epsilon_cumulative"] <= 10.0
        assert all(t["epsilon_budget"] == row["epsilon_budget"] == 10.0 for t in mine)
    assert {(r["round"], r["site"]) for r in data["quality"] if r["kind"] == "site"} == {
        (n, s) for n in (1, 2) for s in sites
    }
    assert [r["status"] for r in data["participation"]] == ["aggregated"] * 6
    assert data["integrity"]["ok"] and data["integrity"]["witnesses"] == sorted(sites)


def test_the_report_needs_no_network_and_escapes_what_it_shows(demo_report):
    _, out = demo_report
    html = (out / "report.html").read_text()
    # Nothing loaded from anywhere: no external script, style, image or font.
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "@import" not in html and not re.search(r"url\((?!#)", html)  # only #ids in SVG
    assert html.count("<svg") == 2  # the spend panels and one quality figure
    assert "<script" in html and html.count("<script") == 1  # data only, no code


def test_headless_chromium_renders_the_plots(demo_report, chromium, tmp_path):
    _, out = demo_report
    page = (out / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    for site in ("lakeside", "northfield", "st-mary"):
        assert f"Privacy spend: {site}" in rendered  # one panel per site, titles as SVG text
    assert "budget 10" in rendered and "epsilon spent" in rendered
    assert "Model quality: demo-" in rendered and "weighted" in rendered
    assert 'id="verdict"' in rendered and "Verified: " in rendered
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.stat().st_size > 50_000  # a page, not a blank
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spend_figure_marks_refusals_and_non_dp_releases():
    t = "2026-12-0{}T10:00:00Z"
    timeline = [
        {"site": "a", "recorded": t.format(1), "event": "charge", "dp": True,
         "epsilon_cumulative": 1.0},
        {"site": "a", "recorded": t.format(2), "event": "refusal", "dp": None,
         "epsilon_cumulative": 1.0},
        {"site": "b", "recorded": t.format(1), "event": "charge", "dp": False,
         "epsilon_cumulative": "unbounded"},
    ]  # fmt: skip
    summary = [{"site": "a", "epsilon_budget": 1.5}, {"site": "b", "epsilon_budget": 2.0}]
    svg = plots.spend_figure(timeline, summary)
    assert svg is not None and svg.startswith("<svg")
    for text in ("Privacy spend: a", "Privacy spend: b", "refused", "no DP", "unbounded",
                 "budget 1.5", "budget 2"):  # fmt: skip
        assert text in svg, text
    assert plots.spend_figure([], []) is None


def test_a_tampered_ledger_is_reported_as_not_verifying(demo_workdir, tmp_path):
    db = tmp_path / "ledger.db"
    shutil.copy(demo_workdir / "ledger.db", db)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
        body = conn.execute("SELECT body FROM ledger_entry WHERE seq = 20").fetchone()[0]
        tampered = body.replace('"HRESCH"', '"TREAT"')
        conn.execute("UPDATE ledger_entry SET body = ? WHERE seq = 20", (tampered,))
    done = medfed("report", "--ledger", f"sqlite:///{db}", "--out", str(tmp_path / "r"),
                  check=False)  # fmt: skip
    assert done.returncode == 1
    assert "does not verify" in done.stderr and "Traceback" not in done.stderr
    html = (tmp_path / "r" / "report.html").read_text()
    assert "DOES NOT VERIFY" in html and "entry 20" in html


def test_bad_input_is_one_sentence_and_exit_2(tmp_path):
    done = medfed("report", "--ledger", f"sqlite:///{tmp_path}/none.db", "--out",
                  str(tmp_path / "r"), check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert " ".join(done.stderr.split()).endswith("none.db does not exist")  # one sentence
    assert not (tmp_path / "r" / "report.html").exists()


@pytest.mark.postgres
@pytest.mark.parametrize("new_url", ["postgresql"], indirect=True)
def test_a_postgresql_ledger_gives_the_same_report(demo_report, demo_workdir, new_url, tmp_path):
    url = new_url()
    copy_ledger(f"sqlite:///{demo_workdir}/ledger.db", url)
    medfed("report", "--ledger", url, "--out", str(tmp_path),
           "--identities", str(demo_workdir / "federation.toml"))  # fmt: skip
    _, sqlite_out = demo_report
    ours, theirs = embedded(tmp_path / "report.html"), embedded(sqlite_out / "report.html")
    assert ours.pop("ledger").startswith("postgresql") and theirs.pop("ledger").startswith("sqlite")
    ours.pop("generated"), theirs.pop("generated")
    assert ours == theirs


def test_kept_checkpoints_are_checked(demo_workdir, tmp_path):
    """A site's kept checkpoint is in the ledger; one the ledger does not contain (a fork
    shown to someone else) makes the report say so and exit 1."""
    from ledger import keys, note
    from ledger.store import open_ledger

    url = f"sqlite:///{demo_workdir}/ledger.db"
    (kept,) = (demo_workdir / "sites" / "st-mary" / "witness").glob("*.checkpoint")
    medfed("report", "--ledger", url, "--out", str(tmp_path / "ok"), "--checkpoint", str(kept))
    assert "Consistent with the 1 kept checkpoint" in (tmp_path / "ok" / "report.html").read_text()

    origin = open_ledger(url).log_identity()[0]
    log_key = keys.load("medfed-log", demo_workdir / "coordinator" / "keys" / "log.pem")
    fork = note.sign_note(
        note.format_checkpoint(note.Checkpoint(origin=origin, size=10, root_hash=b"\1" * 32)),
        log_key,
    )
    (tmp_path / "fork.checkpoint").write_text(fork)
    done = medfed("report", "--ledger", url, "--out", str(tmp_path / "fork"),
                  "--checkpoint", str(tmp_path / "fork.checkpoint"), check=False)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    html = (tmp_path / "fork" / "report.html").read_text()
    assert "DOES NOT VERIFY" in html and "size 10" in html


def test_pdf_is_printed_by_headless_chromium(demo_workdir, chromium, tmp_path):
    url = f"sqlite:///{demo_workdir}/ledger.db"
    medfed("report", "--ledger", url, "--out", str(tmp_path), "--pdf")
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and len(pdf) > 20_000 and b"%%EOF" in pdf[-1024:]
