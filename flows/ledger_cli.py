"""`medfed ledger ...`: verification and compliance queries over the audit ledger."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from flows.cli import cli_errors, out

ledger_app = typer.Typer(no_args_is_help=True, help="Verify and query the audit ledger.")


@ledger_app.command("verify")
@cli_errors
def ledger_verify(
    ledger: Annotated[str, typer.Option("--ledger", help="Ledger URL, e.g. sqlite:///ledger.db")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Recompute the hash chain and every signature; exit 1 naming the first bad entry."""
    from ledger.verify import verify_ledger

    report = verify_ledger(ledger)
    if as_json:
        out.print_json(json.dumps({"ok": True, "entries": report.entries, "head": report.head,
                                   "actors": list(report.actors)}))
    else:
        out.print(f"ledger intact: {report.entries} entries, head {report.head}, "
                  f"actors {', '.join(report.actors)}")
