import os
import uuid

import psycopg
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

POSTGRES_URL = os.environ.get(
    "MEDFED_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL test database; CI has one. Locally without it, say so loudly."""
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} (CI must provide it)")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request, tmp_path):
    """A factory of fresh, empty ledger URLs on one back end: SQLite files, or PostgreSQL
    schemas of their own (dropped afterwards) in the test database."""
    if request.param == "sqlite":
        made = iter(range(1_000_000))
        yield lambda: f"sqlite:///{tmp_path}/ledger{next(made) or ''}.db"
        return
    base = request.getfixturevalue("postgres_url").replace("+psycopg", "")
    schemas: list[str] = []

    def make() -> str:
        schemas.append(f"t_{uuid.uuid4().hex[:12]}")
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schemas[-1]}")
        return f"{POSTGRES_URL}?options=-csearch_path%3D{schemas[-1]}"

    yield make
    with psycopg.connect(base, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def url(new_url):
    """A fresh, empty ledger URL on each back end (see `new_url`)."""
    return new_url()


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory):
    """A 2-round `medfed demo --compare` run as a user runs it (its own Prefect server, three
    sites): a real ledger for the report and the ledger API (tests copy it before writing),
    and in `compare.json` the comparison with the pooled baseline and the non-DP federation
    (in `no-dp/`)."""
    import subprocess
    import sys
    from pathlib import Path

    workdir = tmp_path_factory.mktemp("demo")
    medfed = Path(sys.executable).with_name("medfed")
    done = subprocess.run(
        [str(medfed), "demo", "--workdir", str(workdir), "--rounds", "2", "--compare", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (workdir / "compare.json").write_text(done.stdout)
    return workdir


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium; CI installs it (deploy/setup.sh), so there it must exist."""
    import shutil

    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed (deploy/setup.sh installs it under CI)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return found
