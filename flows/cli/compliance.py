"""The compliance officer's commands: `medfed report` (a self-contained HTML report),
`medfed ledger serve` (the read-only API with roles) and `medfed ledger token add`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import Failure, out
from flows.cli.ledger import (
    DEFAULT_LOG_NAME,
    IdentitiesFile,
    LedgerUrl,
    _ledger_errors,
    _read_text,
    ledger_app,
)

token_app = typer.Typer(no_args_is_help=True, help="Make bearer tokens for `ledger serve`.")
ledger_app.add_typer(token_app, name="token")
TokensFile = Annotated[
    Path, typer.Option("--tokens", help="The tokens file (TOML; holds only token hashes).")
]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@_ledger_errors
def report_command(
    ledger: LedgerUrl,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for report.html.")],
    identities: IdentitiesFile = None,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option("--checkpoint", help="A checkpoint you kept: the ledger must contain it."),
    ] = None,
    pdf: Annotated[
        bool, typer.Option("--pdf", help="Also print report.pdf (needs Chromium).")
    ] = False,
) -> None:
    """Write a self-contained HTML report of the ledger (integrity, privacy spend per site
    against its budget, model quality, participation, data use, disclosures, lineage) drawn
    from the same queries as `medfed ledger ... --json`, and data.json beside it."""
    from ledger import report

    kept = [_read_text(p, "checkpoint file") for p in checkpoint or []]
    data = report.collect(ledger, identities=identities, kept_checkpoints=kept)
    page = report.write(data, out_dir)
    verdict = "verified" if data["integrity"]["ok"] else "DOES NOT VERIFY"
    out.print(
        f"wrote {page}: ledger {verdict}, {data['drawn_from']['entries']} entries, "
        f"root {data['drawn_from']['root']}"
    )
    if pdf:
        out.print(f"wrote {print_pdf(page)}")
    if not data["integrity"]["ok"]:
        raise Failure(f"the ledger does not verify: {data['integrity']['error']}", 1)


def browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def print_pdf(page: Path) -> Path:
    """Print the page to PDF with headless Chromium (the page needs no network)."""
    exe = browser()
    if exe is None:
        raise Failure("--pdf needs Chromium (Debian: apt-get install chromium)", 2)
    target = page.with_suffix(".pdf")
    done = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-pdf-header-footer",
            f"--print-to-pdf={target}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0 or not target.is_file():
        raise Failure(f"Chromium could not print {page} to PDF (exit {done.returncode})", 1)
    return target


@token_app.command("add")
@_ledger_errors
def token_add(
    tokens: TokensFile,
    name: Annotated[str, typer.Option("--name", help="A label for the token (e.g. dpo-laptop).")],
    role: Annotated[str, typer.Option("--role", help="auditor, operator or site:<name>.")],
) -> None:
    """Make a token for ROLE and store its hash under NAME; the token is printed once."""
    from ledger.access import add_token

    token = add_token(tokens, label=name, role=role)
    sys.stdout.write(token + "\n")


@ledger_app.command("serve")
@_ledger_errors
def ledger_serve(
    ledger: LedgerUrl,
    tokens: TokensFile,
    key: Annotated[
        Path,
        typer.Option(
            "--key", help="Ed25519 PEM key that signs access_denied entries (coordinator or DPO)."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="That key's enrolled name.")] = "coordinator",
    log_key: Annotated[
        Path | None,
        typer.Option(
            "--log-key",
            help="The log's Ed25519 key: sign a checkpoint after each denial, so the ledger "
            "keeps verifying against its pinned log key.",
        ),
    ] = None,
    log_name: Annotated[str, typer.Option("--log-name")] = DEFAULT_LOG_NAME,
    identities: IdentitiesFile = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8600,
) -> None:
    """Serve the compliance queries, proofs, FHIR export and the report over HTTP, read-only,
    to bearer tokens by role; OpenAPI at /openapi.json, a browser signs in at /login."""
    import uvicorn

    from ledger.api import ApiSettings, create_app

    settings = ApiSettings(
        url=ledger,
        grants=_grants(tokens),
        recorder=_recorder(ledger, key, name, identities),
        identities=identities,
        log_key=_log_key(ledger, log_key, log_name) if log_key is not None else None,
    )
    out.print(f"medfed ledger API on http://{host}:{port} (OpenAPI at /openapi.json)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


def _grants(tokens: Path) -> dict:
    from ledger.access import load_tokens

    grants = load_tokens(tokens)
    if not grants:
        raise Failure(f"tokens file {tokens} has no token: add one with `ledger token add`", 2)
    return grants


def _recorder(url: str, key: Path, name: str, identities: Path | None):  # noqa: ANN202
    """The identity that records denials: enrolled with a role that may write them, or
    the API would write entries a verifier ignores."""
    from ledger import keys
    from ledger.entry import Action
    from ledger.identities import ROLE_ACTIONS, load_roster
    from ledger.queries import screened

    if not key.is_file():
        raise Failure(f"key file {key} does not exist", 2)
    identity = keys.load(name, key)
    roster = load_roster(identities) if identities is not None else screened(url).roster
    member = roster.members.get(name) if roster is not None else None
    if member is None or member.public_key != identity.public_key:
        raise Failure(
            f"{name} with key {key} is not an enrolled identity of this ledger; denials "
            "must be signed by the coordinator or the DPO",
            2,
        )
    if str(Action.ACCESS_DENIED) not in ROLE_ACTIONS[member.role]:
        raise Failure(f"{name} is enrolled as {member.role}, which may not record denials", 2)
    return identity


def _log_key(url: str, path: Path, name: str):  # noqa: ANN202
    from ledger import keys, note
    from ledger.store import open_ledger

    if not path.is_file():
        raise Failure(f"log key file {path} does not exist", 2)
    identity = keys.load(name, path)
    stored = open_ledger(url).log_identity()
    if stored is not None and stored[1] != note.format_vkey(identity):
        raise Failure(f"log key {path} ({name}) is not the key this ledger's checkpoints use", 2)
    return identity
