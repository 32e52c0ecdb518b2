"""`medfed ledger serve`: every endpoint with every role on the demo's ledger, denials recorded
and verifiable, a real server in a real browser, and schemathesis fuzzing per role."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from fedhelp import copy_ledger
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from ledger import keys
from ledger.access import load_tokens
from ledger.api import ApiSettings, create_app
from ledger.store import open_ledger
from ledger.verify import verify_ledger

MEDFED = str(Path(sys.executable).with_name("medfed"))
SITES = {"lakeside", "northfield", "st-mary"}
# Examples per operation and role; MEDFED_FUZZ_EXAMPLES=200 for a longer hunt (no 5xx found).
FUZZ_EXAMPLES = int(os.environ.get("MEDFED_FUZZ_EXAMPLES", "30"))
ROLES = {"auditor": "dpo", "operator": "ops", "site:st-mary": "st-mary-it"}


def add_tokens(path: Path) -> dict[str, str]:
    """role -> token, made with the CLI as an administrator would."""
    tokens = {}
    for role, label in ROLES.items():
        done = subprocess.run(
            [MEDFED, "ledger", "token", "add", "--tokens", str(path), "--name", label,
             "--role", role],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        tokens[role] = done.stdout.strip()
    return tokens


@pytest.fixture
def served(demo_workdir, tmp_path, new_url):
    """The API over a copy of the demo ledger (on SQLite and on PostgreSQL), in process, with
    the coordinator recording denials and the log key checkpointing them."""
    url = new_url()
    copy_ledger(f"sqlite:///{demo_workdir}/ledger.db", url)
    tokens = add_tokens(tmp_path / "tokens.toml")
    keydir = demo_workdir / "coordinator" / "keys"
    api = ApiSettings(
        url=url,
        grants=load_tokens(tmp_path / "tokens.toml"),
        recorder=keys.load("coordinator", keydir / "identity.pem"),
        identities=demo_workdir / "federation.toml",
        log_key=keys.load("medfed-log", keydir / "log.pem"),
    )
    return url, tokens, TestClient(create_app(api)), api


def latest_model(client, token) -> str:
    rows = client.get("/api/quality", headers=bearer(token)).json()
    return rows[-1]["global_model"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def out_of_scope(role: str, path: str, body: object) -> list[str]:
    """What in one 200 response a role may not see; empty when it is in scope."""
    problems = []
    text = json.dumps(body)
    if role.startswith("site:"):
        own = role.split(":", 1)[1]
        rows = body if isinstance(body, list) else []
        problems += [f"row of site {r['site']}" for r in rows if r.get("site", own) != own]
        if path.startswith("/api/fhir"):
            for e in body["entry"]:
                details = e["resource"]["entity"][-1]["detail"]
                site = next(
                    (d["valueString"] for d in details if d["type"]["text"] == "site"), None
                )
                if site != own:
                    problems.append(f"FHIR event of {site}")
        elif path.startswith("/api/proofs"):
            if json.loads(body["entry"]["body"]).get("site") != own:
                problems.append("proof of another site's entry")
        elif not path.startswith(("/api/integrity", "/api/checkpoints")):
            # A site's query rows never name another site, anywhere in them. (The log's
            # integrity names its cosigning sites: membership every site approved.)
            problems += [f"names {s}" for s in SITES - {own} if s in text]
    if role == "operator":
        if path.startswith(("/api/spend", "/api/data-use", "/api/disclosures", "/api/fhir")):
            problems.append("operator read privacy or disclosure data")
        rows = body if isinstance(body, list) else []
        problems += [f"{r['action']} event" for r in rows if r.get("action") in
                     ("disclose", "access_denied", "enroll", "erase", "policy")]  # fmt: skip
    return problems


# Every endpoint, the status each role gets. Parameters that ask for another site's rows
# are out of a site token's role.
def endpoints(model: str) -> dict[str, dict[str, int]]:
    all_ok = {"auditor": 200, "operator": 200, "site:st-mary": 200}
    no_operator = {"auditor": 200, "operator": 403, "site:st-mary": 200}
    return {
        "/api/integrity": all_ok,
        "/api/checkpoints": all_ok,
        "/api/proofs/0": {"auditor": 200, "operator": 403, "site:st-mary": 403},  # registration
        "/api/events": all_ok,
        "/api/events?site=lakeside": {"auditor": 200, "operator": 200, "site:st-mary": 403},
        "/api/events?site=st-mary": all_ok,
        "/api/spend": no_operator,
        "/api/spend?site=northfield": {"auditor": 200, "operator": 403, "site:st-mary": 403},
        "/api/spend/history": no_operator,
        "/api/spend/timeline": no_operator,
        "/api/data-use": no_operator,
        "/api/disclosures": no_operator,
        "/api/quality": all_ok,
        "/api/participation": all_ok,
        f"/api/lineage/{model[:16]}": {"auditor": 200, "operator": 200, "site:st-mary": 403},
        "/api/fhir": no_operator,
        "/report": all_ok,
    }


def test_every_endpoint_with_every_role(served, demo_workdir):
    url, tokens, client, _ = served
    before = open_ledger(url).size()
    model = latest_model(client, tokens["auditor"])
    denied = []
    for path, expected in endpoints(model).items():
        for role, status in expected.items():
            response = client.get(path, headers=bearer(tokens[role]))
            assert response.status_code == status, (role, path, response.text[:300])
            if status == 403:
                denied.append((role, path))
                continue
            body = response.json() if path.startswith("/api") else None
            if body is not None:
                assert out_of_scope(role, path, body) == [], (role, path)
    auditor_rows = client.get("/api/events", headers=bearer(tokens["auditor"])).json()
    assert {r["site"] for r in auditor_rows} >= SITES  # the auditor sees everyone
    site_report = client.get("/report", headers=bearer(tokens["site:st-mary"])).text
    assert "Privacy spend: st-mary" in site_report
    data = embedded_data(site_report)
    for section in ("spend", "spend_timeline", "quality", "participation", "data_use",
                    "disclosures"):  # fmt: skip
        assert data[section] and {r["site"] for r in data[section]} == {"st-mary"}, section
        assert not any(s in json.dumps(data[section]) for s in SITES - {"st-mary"}), section
    assert "lineage" not in data
    operator_report = client.get("/report", headers=bearer(tokens["operator"])).text
    assert "Model quality" in operator_report and "Accounting of disclosures" not in operator_report

    # Each 403 is one access_denied entry: the role and the token's label, never the token.
    log = open_ledger(url)
    entries = [json.loads(r[1]) for r in log.raw_rows()]
    recorded = [e for e in entries if e["action"] == "access_denied"]
    assert len(recorded) == len(denied) == log.size() - before
    assert sorted((e["details"]["role"], e["details"]["endpoint"]) for e in recorded) == sorted(
        (role, re.sub(r"\?.*", "", path).replace(f"/api/lineage/{model[:16]}",
                                                 "/api/lineage/{model}")
         .replace("/api/proofs/0", "/api/proofs/{entry}"))
        for role, path in denied
    )  # fmt: skip
    for e in recorded:
        assert e["actor"] == "coordinator" and e["outcome"] == "refused"
        assert e["details"]["token"] == ROLES[e["details"]["role"]]
    stored = "".join(r[1] for r in log.raw_rows())
    assert not any(t in stored for t in tokens.values())
    # The site sees its own denials; the ledger verifies against the pinned identities.
    mine = client.get("/api/events?action=access_denied", headers=bearer(tokens["site:st-mary"]))
    assert {r["site"] for r in mine.json()} == {"st-mary"}
    report = verify_ledger(url, roster=_roster(demo_workdir))
    assert report.entries == log.size() and report.checkpoint_size == log.size()


def embedded_data(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="medfed-data">(.*?)</script>', html,
                      re.S)  # fmt: skip
    assert match
    return json.loads(match.group(1))


def _roster(demo_workdir):
    from ledger.identities import load_roster

    return load_roster(demo_workdir / "federation.toml")


def test_no_token_or_an_unknown_one_is_401_and_not_recorded(served):
    url, tokens, client, _ = served
    size = open_ledger(url).size()
    assert client.get("/api/spend").status_code == 401
    assert client.get("/api/spend", headers=bearer("mfl_" + "x" * 43)).status_code == 401
    assert client.get("/api/spend", cookies={"medfed_token": "nope"}).status_code == 401
    assert open_ledger(url).size() == size
    assert client.get("/openapi.json").json()["info"]["title"] == "medfed ledger API"


def test_bad_parameters_are_400_with_one_sentence(served):
    _, tokens, client, _ = served
    auditor = bearer(tokens["auditor"])
    bad = client.get("/api/events?since=yesterday", headers=auditor)
    assert bad.status_code == 400 and "--since" in bad.json()["detail"]
    assert client.get("/api/lineage/ffff", headers=auditor).status_code == 400
    assert client.get("/api/proofs/99999", headers=auditor).status_code == 400
    assert client.get("/api/events?round=x", headers=auditor).status_code == 422


def test_tokens_are_stored_hashed_and_bad_files_are_refused(tmp_path, demo_workdir):
    tokens = add_tokens(tmp_path / "tokens.toml")
    text = (tmp_path / "tokens.toml").read_text()
    assert not any(t in text for t in tokens.values())
    assert (tmp_path / "tokens.toml").stat().st_mode & 0o077 == 0
    bad = subprocess.run(
        [MEDFED, "ledger", "token", "add", "--tokens", str(tmp_path / "tokens.toml"),
         "--name", "x", "--role", "site:../etc"], capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "role 'site:../etc'" in bad.stderr
    (tmp_path / "broken.toml").write_text('[[token]]\nname = "a"\nrole = "admin"\nsha256 = "00"\n')
    keydir = demo_workdir / "coordinator" / "keys"
    url = f"sqlite:///{demo_workdir}/ledger.db"
    serve = [MEDFED, "ledger", "serve", "--ledger", url, "--key", str(keydir / "identity.pem")]
    done = subprocess.run([*serve, "--tokens", str(tmp_path / "broken.toml")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "token 1 (a)" in " ".join(done.stderr.split())
    # A key that is not enrolled cannot record denials: refused before serving.
    stranger = tmp_path / "stranger.pem"
    keys.load_or_create("coordinator", stranger)
    done = subprocess.run(
        [*serve[:-1], str(stranger), "--tokens", str(tmp_path / "tokens.toml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "not an enrolled identity" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(demo_workdir, tmp_path):
    """`medfed ledger serve` as a process on a loopback port, stopped afterwards."""
    shutil.copy(demo_workdir / "ledger.db", tmp_path / "ledger.db")
    tokens = add_tokens(tmp_path / "tokens.toml")
    port = _free_port()
    keydir = demo_workdir / "coordinator" / "keys"
    proc = subprocess.Popen(
        [MEDFED, "ledger", "serve", "--ledger", f"sqlite:///{tmp_path}/ledger.db",
         "--tokens", str(tmp_path / "tokens.toml"), "--key", str(keydir / "identity.pem"),
         "--log-key", str(keydir / "log.pem"),
         "--identities", str(demo_workdir / "federation.toml"), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if httpx.get(f"{base}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("medfed ledger serve did not start")
        yield base, tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_browser_signs_in_and_sees_its_roles_report(live_server, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    base, tokens = live_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_extra_http_headers(bearer(tokens["auditor"]))
            page.goto(f"{base}/report")
            assert page.locator("figure svg").count() == 2
            titles = page.locator("svg text").all_text_contents()
            for site in SITES:
                assert f"Privacy spend: {site}" in titles
            assert page.locator("#verdict").inner_text().startswith("Verified:")
            # Each SVG has drawn something: non-empty boxes.
            boxes = page.evaluate(
                "[...document.querySelectorAll('figure svg')].map(s => "
                "s.getBoundingClientRect().width * s.getBoundingClientRect().height)"
            )
            assert all(b > 50_000 for b in boxes)
            page.screenshot(path=str(tmp_path / "served.png"), full_page=True)
            assert (tmp_path / "served.png").stat().st_size > 50_000

            # A person with a site's token signs in through the form: a cookie, then the
            # site's own report.
            person = browser.new_page()
            person.goto(f"{base}/login")
            person.fill("input[name=token]", tokens["site:st-mary"])
            person.click("button[type=submit]")
            person.wait_for_url(f"{base}/report")
            text = person.locator("body").inner_text()
            titles = person.locator("svg text").all_text_contents()
            assert "Privacy spend: st-mary" in titles
            assert not any(t.startswith("Privacy spend: ") and "st-mary" not in t
                           for t in titles if t != "Privacy spend: cumulative epsilon per "
                           "site against its budget")  # fmt: skip
            assert "for role site:st-mary" in " ".join(text.split())
        finally:
            browser.close()


@pytest.mark.parametrize("role", list(ROLES))
def test_fuzzing_the_openapi_spec_finds_no_5xx_and_no_out_of_scope_row(served, role):
    url, tokens, client, _ = served
    app = client.app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.update(headers=bearer(tokens[role]))
    schema = schema.exclude(path="/report")  # no parameters; rendered in the browser test
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 13
    seen = {"200": 0, "403": 0}
    for operation in operations:
        # Random cases, and the spec's own examples (a site token asking for another site).
        cases = st.one_of(operation.as_strategy(), *operation.get_strategies_from_examples())

        @given(case=cases)
        @examples(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def check(case):
            response = case.call(headers=bearer(tokens[role]))
            assert response.status_code < 500, (case.path, case.query, response.text[:300])
            assert response.status_code in (200, 400, 403, 422), response.status_code
            if response.status_code == 200:
                seen["200"] += 1
                problems = out_of_scope(role, case.formatted_path, response.json())
                assert problems == [], (case.formatted_path, case.query, problems)
            elif response.status_code == 403:
                seen["403"] += 1

        check()
    assert seen["200"] > 0
    assert (seen["403"] > 0) == (role != "auditor")
    verify_ledger(url)  # denials recorded on the way still verify
