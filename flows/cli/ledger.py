"""`medfed ledger ...`: verification, checkpoints, proofs, export, erasure and compliance queries.

Exit codes: 0 intact / done, 1 does not verify (the message names the first bad entry or
checkpoint), 2 unreadable input or bad usage (a missing file, a malformed key or bundle).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from flows.cli.common import Failure, cli_errors, err, out
from ledger import LedgerError, VerificationError

ledger_app = typer.Typer(
    no_args_is_help=True, help="Verify, prove, export and query the audit ledger."
)
checkpoint_app = typer.Typer(help="Sign a checkpoint of the ledger now, or verify one.")
ledger_app.add_typer(checkpoint_app, name="checkpoint")

LedgerUrl = Annotated[str, typer.Option("--ledger", help="Ledger URL, e.g. sqlite:///ledger.db")]
IdentitiesFile = Annotated[
    Path | None,
    typer.Option(
        "--identities",
        help="The enrolled identities: the federation file (or a TOML file with its "
        "[identities] and [[sites]]). Without it, the ledger's own enrollment entries.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
AsCsv = Annotated[bool, typer.Option("--csv", help="Print CSV.")]
DEFAULT_LOG_NAME = "medfed-log"


def _ledger_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Verification failures exit 1; anything else the ledger raises (unreadable file, bad
    key, bad URL) is bad input and exits 2. One sentence, no traceback (via cli_errors)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VerificationError as exc:
            raise Failure(str(exc), 1) from None
        except LedgerError as exc:
            raise Failure(str(exc), 2) from None
        except OSError as exc:
            raise Failure(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 2) from None

    return cli_errors(wrapper)


def _emit(rows: list[dict[str, Any]], *, as_json: bool, as_csv: bool, title: str) -> None:
    if as_json and as_csv:
        raise Failure("choose one of --json and --csv", 2)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    columns = list(rows[0]) if rows else []
    if as_csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buf.getvalue())
        return
    if not rows:
        out.print(f"{title}: none")
        return
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    headers = [c.replace("_", " ") for c in columns]
    # One column per field when the widest cells fit the terminal; else one block per row
    # (like psql's expanded display) rather than columns folded a few letters wide.
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    if sum(widths) + 3 * len(widths) <= out.width:
        table = Table(title=f"{title} ({len(rows)})", title_justify="left", box=box.SIMPLE_HEAD)
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in cells:
            table.add_row(*row)
        out.print(table)
        return
    out.print(f"{title} ({len(rows)})", style="italic")
    for n, row in enumerate(cells, 1):
        block = Table.grid(padding=(0, 2))
        block.add_column(style="bold")
        block.add_column(overflow="fold")
        for h, v in zip(headers, row, strict=True):
            block.add_row(h, v)
        out.print(f"[dim]── {n} ──[/dim]")
        out.print(block)


# A table is for reading: hashes shortened, timestamps to the second. --json and --csv keep
# every value whole.
_LONG_HEX = re.compile(r"\b([0-9a-f]{12})[0-9a-f]{4,}\b")
_TIMESTAMP = re.compile(r"\b(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(\.\d+)?Z\b")


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = _LONG_HEX.sub(r"\1…", str(value))
    return _TIMESTAMP.sub(r"\1 \2Z", text)


def _read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Failure(f"{what} {path} does not exist", 2) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"cannot read {what} {path}: {exc}", 2) from None


def _vkey_arg(vkey: str | None) -> str | None:
    """A vkey given inline or as @FILE / a path to a file holding it."""
    if vkey is None:
        return None
    if vkey.startswith("@"):
        return _read_text(Path(vkey[1:]), "verifier key file").strip()
    if "+" not in vkey and Path(vkey).is_file():
        return _read_text(Path(vkey), "verifier key file").strip()
    from ledger.note import parse_vkey
    from ledger.store import UnreadableError

    try:
        parse_vkey(vkey)
    except VerificationError as exc:
        raise UnreadableError(f"--vkey is not a C2SP verifier key: {exc}") from exc
    return vkey


# ---------------------------------------------------------------- verification


@ledger_app.command("verify")
@_ledger_errors
def ledger_verify(
    ledger: Annotated[str | None, typer.Option("--ledger", help="Ledger URL.")] = None,
    bundle: Annotated[Path | None, typer.Option("--bundle", help="Exported bundle; no DB.")] = None,
    vkey: Annotated[str | None, typer.Option("--vkey", help="Pin the log's verifier key.")] = None,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(
            "--checkpoint",
            help="A checkpoint you (or a site, as a witness) kept earlier; the ledger must "
            "still contain it.",
        ),
    ] = None,
    identities: Annotated[
        Path | None,
        typer.Option(
            "--identities",
            help="The enrolled identities (the federation file): any other actor, or an "
            "actor writing outside its role, fails verification; pins the log key too.",
        ),
    ] = None,
    witnesses: Annotated[
        int,
        typer.Option(
            "--witnesses",
            help="Require a checkpoint covering the whole log cosigned by this many enrolled "
            "sites (needs --identities).",
        ),
    ] = 0,
    as_json: AsJson = False,
) -> None:
    """Recompute chain, signatures, Merkle roots, checkpoints and cosignatures; exit 1 naming
    the first bad entry or checkpoint. A pinned log key (--vkey or --identities) must have
    signed a checkpoint covering the whole log."""
    from ledger.identities import load_roster
    from ledger.verify import verify_bundle, verify_ledger

    if (ledger is None) == (bundle is None):
        raise Failure("give exactly one of --ledger URL and --bundle FILE", 2)
    pinned = [_read_text(p, "checkpoint file") for p in checkpoint or []]
    key = _vkey_arg(vkey)
    roster = load_roster(identities) if identities is not None else None
    pins = dict(vkey=key, roster=roster, pinned_checkpoints=pinned, witnesses=witnesses)
    if bundle is not None:
        report = verify_bundle(bundle, **pins)
    else:
        report = verify_ledger(ledger, **pins)
    from ledger.queries import verification

    doc = verification(report, vkey_pinned=key is not None or bool(roster and roster.log_vkey))
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    out.print(f"ledger intact: {report.entries} entries, signatures valid, head {report.head}")
    out.print(
        f"Merkle root {report.root}; {report.checkpoints} checkpoints verified"
        + (f", latest at size {report.checkpoint_size}" if report.checkpoints else "")
    )
    if report.checkpoints and key is None and not (roster and roster.log_vkey):
        out.print(
            "[yellow]checkpoint key taken from the ledger itself; pin it with --vkey "
            "for verification that does not trust the database[/yellow]"
        )
    if roster is None:
        out.print(
            "[yellow]identities not pinned: any actor that registered a key in the chain is "
            "accepted; pass --identities FEDERATION.toml[/yellow]"
        )
    if report.witnesses:
        out.print(
            f"whole log cosigned by {len(report.witnesses)} witnesses: "
            + ", ".join(report.witnesses)
        )
    if report.entries > report.checkpoint_size:
        out.print(
            f"{report.entries - report.checkpoint_size} entries are not yet covered by a "
            "signed checkpoint"
        )
    if report.personal_fields or report.erased_fields:
        out.print(
            f"personal fields: {report.personal_fields} match their commitments, "
            f"{report.erased_fields} erased"
        )
    out.print(f"actors: {', '.join(report.actors)}")


# ---------------------------------------------------------------- checkpoints


@checkpoint_app.callback(invoke_without_command=True)
@_ledger_errors
def checkpoint_sign(
    ctx: typer.Context,
    ledger: Annotated[str | None, typer.Option("--ledger", help="Ledger URL.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="The log's Ed25519 PEM key.")] = None,
    name: Annotated[str, typer.Option("--name", help="The log key's name.")] = DEFAULT_LOG_NAME,
    origin: Annotated[
        str | None,
        typer.Option(
            "--origin", help="Checkpoint origin (default: the ledger's, else medfed.local/NAME)."
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--out", help="Also write the note here.")] = None,
) -> None:
    """Sign a checkpoint now (with --ledger and --key); see also `checkpoint verify`."""
    if ctx.invoked_subcommand is not None:
        return
    if ledger is None or key is None:
        raise Failure(
            "`medfed ledger checkpoint` needs --ledger URL and --key PATH "
            "(or use `checkpoint verify`)",
            2,
        )
    from ledger import keys
    from ledger.store import open_ledger

    if not key.is_file():
        raise Failure(f"key file {key} does not exist", 2)
    log = open_ledger(ledger, write=True)
    stored = log.log_identity()
    signed = log.checkpoint(
        keys.load(name, key), origin or (stored[0] if stored else f"medfed.local/{name}")
    )
    if output is not None:
        from ledger.verify import _atomic_write_text

        _atomic_write_text(output, signed)
    sys.stdout.write(signed)


@checkpoint_app.command("verify")
@_ledger_errors
def checkpoint_verify(
    file: Annotated[Path, typer.Argument(help="A signed checkpoint (C2SP tlog-checkpoint).")],
    vkey: Annotated[str, typer.Option("--vkey", help="C2SP verifier key name+keyid+base64.")],
    origin: Annotated[str | None, typer.Option("--origin", help="Require this origin.")] = None,
) -> None:
    """Verify any C2SP Ed25519 checkpoint: exit 0 valid, 1 invalid, 2 unreadable."""
    from ledger.note import NoteFormatError, verify_checkpoint

    try:
        text = Path(file).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise Failure(f"checkpoint file {file} does not exist", 2) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"cannot read checkpoint file {file}: {exc}", 2) from None
    key = _vkey_arg(vkey)
    assert key is not None
    try:
        cp = verify_checkpoint(text, key, origin=origin)
    except NoteFormatError as exc:
        raise Failure(f"checkpoint {file} is invalid: {exc}", 1) from None
    out.print(f"checkpoint valid: origin {cp.origin}, size {cp.size}, root {cp.root_hash.hex()}")


@ledger_app.command("vkey")
@_ledger_errors
def ledger_vkey(
    key: Annotated[Path | None, typer.Option("--key", help="An Ed25519 PEM key.")] = None,
    name: Annotated[str, typer.Option("--name", help="The key's name.")] = DEFAULT_LOG_NAME,
    ledger: Annotated[str | None, typer.Option("--ledger", help="Print the stored one.")] = None,
    as_hex: Annotated[
        bool, typer.Option("--hex", help="Print the raw public key (hex), e.g. to enroll a DPO.")
    ] = False,
) -> None:
    """Print a C2SP verifier key, from a private key file or as the ledger stores it."""
    from ledger import keys, note
    from ledger.store import open_ledger

    if key is not None and as_hex:
        sys.stdout.write(keys.load(name, key).public_key.hex() + "\n")
    elif key is not None:
        sys.stdout.write(note.format_vkey(keys.load(name, key)) + "\n")
    elif ledger is not None:
        stored = open_ledger(ledger).log_identity()
        if stored is None:
            raise Failure("the ledger has no checkpoint key yet", 1)
        sys.stdout.write(stored[1] + "\n")
    else:
        raise Failure("give --key PATH or --ledger URL", 2)


# ---------------------------------------------------------------- proofs, export, erasure


@ledger_app.command("prove")
@_ledger_errors
def ledger_prove(
    entry: Annotated[str, typer.Argument(help="Entry sequence number or idempotency key.")],
    ledger: LedgerUrl,
    output: Annotated[Path | None, typer.Option("--out", help="Write the proof here.")] = None,
) -> None:
    """Print an inclusion proof of ENTRY against the latest signed checkpoint (JSON)."""
    from ledger.proof import inclusion
    from ledger.store import open_ledger

    doc = json.dumps(inclusion(open_ledger(ledger), entry), indent=2) + "\n"
    if output is not None:
        from ledger.verify import _atomic_write_text

        _atomic_write_text(output, doc)
    else:
        sys.stdout.write(doc)


@ledger_app.command("verify-proof")
@_ledger_errors
def ledger_verify_proof(
    file: Annotated[Path, typer.Argument(help="A proof written by `medfed ledger prove`.")],
    vkey: Annotated[str, typer.Option("--vkey", help="The log's verifier key (pinned).")],
) -> None:
    """Check an inclusion proof offline: checkpoint signature, leaf hash, audit path."""
    from ledger.proof import check_inclusion

    try:
        doc = json.loads(_read_text(file, "proof file"))
    except ValueError:
        raise Failure(f"proof file {file} is not JSON", 2) from None
    key = _vkey_arg(vkey)
    assert key is not None
    cp = check_inclusion(doc, key)
    out.print(
        f"entry {doc['leaf_index']} is included in {cp.origin} at size {cp.size} "
        f"(root {cp.root_hash.hex()})"
    )


@ledger_app.command("export")
@_ledger_errors
def ledger_export(
    ledger: LedgerUrl,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Write a verification bundle.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="bundle | fhir | csv")] = "bundle",
    output: Annotated[
        Path | None, typer.Option("--out", help="Output file (fhir/csv: stdout)")
    ] = None,
) -> None:
    """Export entries + checkpoints + public keys (bundle), a FHIR R5 Bundle of AuditEvents,
    or a CSV of events."""
    from ledger.store import open_ledger
    from ledger.verify import _atomic_write_text, write_bundle

    log = open_ledger(ledger)
    if bundle is not None or fmt == "bundle":
        target = bundle or output
        if target is None:
            raise Failure("--format bundle needs --bundle FILE", 2)
        counts = write_bundle(log, target)
        out.print(
            f"wrote {target}: {counts['entries']} entries, {counts['checkpoints']} "
            "checkpoints, public keys; check it with "
            f"`medfed ledger verify --bundle {target} --vkey VKEY`"
        )
        return
    if fmt == "fhir":
        from ledger import fhir

        stored = log.log_identity()
        text = (
            json.dumps(
                fhir.bundle(log.raw_rows(), origin=stored[0] if stored else log.url), indent=2
            )
            + "\n"
        )
    elif fmt == "csv":
        from ledger import queries

        buf = io.StringIO()
        rows = queries.events(log)
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["seq"])
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    else:
        raise Failure(f"unknown --format {fmt!r}: use bundle, fhir or csv", 2)
    if output is None:
        sys.stdout.write(text)
    else:
        _atomic_write_text(output, text)
        out.print(f"wrote {output}")


@ledger_app.command("erase")
@_ledger_errors
def ledger_erase(
    ledger: LedgerUrl,
    subject: Annotated[str, typer.Option("--subject", help="The data subject to erase.")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 PEM key of the erasing party.")],
    name: Annotated[str, typer.Option("--name", help="That party's name.")] = "dpo",
    reason: Annotated[str, typer.Option("--reason")] = "GDPR Art. 17 request",
    identities: IdentitiesFile = None,
) -> None:
    """Destroy a subject's erasable fields (salt + value) and record the erasure; every
    signature, chain link, root and proof still verifies. With --identities, only the
    enrolled DPO key may erase."""
    from ledger import keys
    from ledger.identities import load_roster
    from ledger.store import open_ledger

    if not key.is_file():
        raise Failure(f"key file {key} does not exist", 2)
    roster = load_roster(identities) if identities is not None else None
    log = open_ledger(ledger, write=True, roster=roster)
    appended, count = log.erase(subject, keys.load(name, key), reason=reason)
    if appended is None:
        out.print("nothing to erase for that subject")
    else:
        out.print(f"erased {count} personal fields; erasure recorded as entry {appended.seq}")


# ---------------------------------------------------------------- compliance queries


def _screened(url: str, identities: Path | None) -> Any:
    from ledger.queries import screened

    return screened(url, identities)


def _note_ignored(log: Any) -> None:
    if log.ignored:
        who = ", ".join(f"{actor} ({n})" for actor, n in sorted(log.ignored.items()))
        err.print(
            f"medfed: left out entries of actors not enrolled to write them: {who}",
            markup=False,
            highlight=False,
        )


@ledger_app.command("events")
@_ledger_errors
def ledger_events(
    ledger: LedgerUrl,
    actor: Annotated[str | None, typer.Option(help="Who signed it.")] = None,
    action: Annotated[str | None, typer.Option(help="e.g. train, upload, refuse.")] = None,
    site: Annotated[str | None, typer.Option()] = None,
    job: Annotated[str | None, typer.Option()] = None,
    round_: Annotated[int | None, typer.Option("--round")] = None,
    purpose: Annotated[str | None, typer.Option(help="HL7 PurposeOfUse, e.g. HRESCH.")] = None,
    entity: Annotated[str | None, typer.Option(help="Artifact or dataset hash (prefix).")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time, inclusive.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time, exclusive.")] = None,
    identities: IdentitiesFile = None,
    as_json: AsJson = False,
    as_csv: AsCsv = False,
) -> None:
    """Events filtered by who / what / when / action / purpose."""
    from ledger import queries

    log = _screened(ledger, identities)
    rows = queries.events(
        log,
        actor=actor,
        action=action,
        site=site,
        job=job,
        round=round_,
        purpose=purpose,
        entity=entity,
        since=since,
        until=until,
    )
    _emit(rows, as_json=as_json, as_csv=as_csv, title="ledger events")
    _note_ignored(log)


@ledger_app.command("spend")
@_ledger_errors
def ledger_spend(
    ledger: LedgerUrl,
    site: Annotated[str | None, typer.Option()] = None,
    job: Annotated[str | None, typer.Option()] = None,
    history: Annotated[bool, typer.Option("--history", help="Every release, not totals.")] = False,
    timeline: Annotated[
        bool,
        typer.Option(
            "--timeline", help="Each charge and refusal with the cumulative epsilon after it."
        ),
    ] = False,
    identities: IdentitiesFile = None,
    as_json: AsJson = False,
    as_csv: AsCsv = False,
) -> None:
    """Privacy budget per site: epsilon recomputed over every release and live reservation at
    the site's pinned delta, budget, remaining, opt-outs, metrics policy (--history: each
    charge; --timeline: the spend over time)."""
    from ledger import queries

    log = _screened(ledger, identities)
    if timeline and (history or job):
        raise Failure("--timeline covers every job; give it without --history and --job", 2)
    if timeline:
        rows = queries.spend_timeline(log, site=site)
    elif history or job:
        rows = queries.spend(log, site=site, job=job)
    else:
        rows = queries.spend_summary(log, site=site)
    _emit(rows, as_json=as_json, as_csv=as_csv, title="privacy spend")
    _note_ignored(log)


@ledger_app.command("data-use")
@_ledger_errors
def ledger_data_use(
    ledger: LedgerUrl,
    site: Annotated[str | None, typer.Option()] = None,
    identities: IdentitiesFile = None,
    as_json: AsJson = False,
    as_csv: AsCsv = False,
) -> None:
    """Which datasets (fingerprints), how many pseudonymous patients, which jobs and rounds."""
    from ledger import queries

    log = _screened(ledger, identities)

    _emit(
        queries.data_use(log, site=site),
        as_json=as_json,
        as_csv=as_csv,
        title="data use",
    )
    _note_ignored(log)


@ledger_app.command("lineage")
@_ledger_errors
def ledger_lineage(
    model: Annotated[str, typer.Argument(help="Global model hash (or a unique prefix).")],
    ledger: LedgerUrl,
    identities: IdentitiesFile = None,
    as_json: AsJson = False,
    as_csv: AsCsv = False,
) -> None:
    """A model version back to its rounds, site updates and datasets."""
    from ledger import queries

    log = _screened(ledger, identities)

    _emit(
        queries.lineage(log, model),
        as_json=as_json,
        as_csv=as_csv,
        title=f"lineage of {model}",
    )
    _note_ignored(log)


@ledger_app.command("disclosures")
@_ledger_errors
def ledger_disclosures(
    ledger: LedgerUrl,
    site: Annotated[str | None, typer.Option()] = None,
    since: Annotated[str | None, typer.Option()] = None,
    until: Annotated[str | None, typer.Option()] = None,
    identities: IdentitiesFile = None,
    as_json: AsJson = False,
    as_csv: AsCsv = False,
) -> None:
    """Accounting of disclosures (45 CFR 164.528 style): date, recipient, description, purpose."""
    from ledger import queries

    log = _screened(ledger, identities)

    _emit(
        queries.disclosures(log, site=site, since=since, until=until),
        as_json=as_json,
        as_csv=as_csv,
        title="accounting of disclosures",
    )
    _note_ignored(log)


@ledger_app.command("quality")
@_ledger_errors
def ledger_quality(
    ledger: LedgerUrl,
    job: Annotated[str | None, typer.Option()] = None,
    identities: IdentitiesFile = None,
    as_json: AsJson = False,
    as_csv: AsCsv = False,
) -> None:
    """Model quality per round: each site's held-out metrics as released, and the weighted."""
    from ledger import queries

    log = _screened(ledger, identities)
    _emit(queries.quality(log, job=job), as_json=as_json, as_csv=as_csv, title="model quality")
    _note_ignored(log)


@ledger_app.command("participation")
@_ledger_errors
def ledger_participation(
    ledger: LedgerUrl,
    job: Annotated[str | None, typer.Option()] = None,
    identities: IdentitiesFile = None,
    as_json: AsJson = False,
    as_csv: AsCsv = False,
) -> None:
    """Which sites trained, were aggregated, dropped, refused or declined, in each round."""
    from ledger import queries

    log = _screened(ledger, identities)
    _emit(
        queries.participation(log, job=job), as_json=as_json, as_csv=as_csv, title="participation"
    )
    _note_ignored(log)


@ledger_app.command("checkpoints")
@_ledger_errors
def ledger_checkpoints(ledger: LedgerUrl, as_json: AsJson = False, as_csv: AsCsv = False) -> None:
    """Every stored checkpoint: size, root, origin, signer and cosigning sites (as stored;
    `ledger verify` checks them)."""
    from ledger import queries
    from ledger.store import open_ledger

    _emit(
        queries.checkpoints(open_ledger(ledger)),
        as_json=as_json,
        as_csv=as_csv,
        title="checkpoints",
    )
