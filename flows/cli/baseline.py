"""`medfed baseline` and `medfed demo --compare`: the pooled baseline beside the federation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from flows.cli.common import cli_errors, out


def _auc(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.3f}"


def comparison_table(doc: dict[str, Any], title: str) -> Table:
    columns = doc["columns"]
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("held-out AUC", no_wrap=True)
    for name in columns:
        table.add_column(name, justify="right")
    sites = sorted({s for c in columns.values() for s in c["sites"]})
    for site in sites:
        table.add_row(site, *(_auc(c["sites"].get(site)) for c in columns.values()))
    table.add_section()
    table.add_row("weighted", *(_auc(c["auc"]) for c in columns.values()))
    table.add_row(
        "epsilon per patient",
        *("no DP" if c["epsilon"] is None else f"{c['epsilon']:.2f}" for c in columns.values()),
    )
    return table


@cli_errors
def baseline_command(
    config: Annotated[Path, typer.Argument(help="Federation TOML file.")],
    sites: Annotated[
        Path | None,
        typer.Option(help="The folder of the site roots (default: 'sites' beside the file)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Simulation only: train the federation's model on every site's training split pooled
    in one place (the federation's rounds x local epochs), without and with its DP, and
    evaluate on each site's held-out split. Refuses unless every site's data is here."""
    from flows.baseline import baseline

    results = baseline(config, sites)
    doc = {
        "columns": {
            r.setting: {
                "sites": {k: m.auc for k, m in r.per_site.items()},
                "auc": r.overall.auc,
                "accuracy": r.overall.accuracy,
                "epsilon": r.epsilon,
                "epochs": r.epochs,
                "seconds": r.seconds,
            }
            for r in results
        }
    }
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    epochs = results[0].epochs
    out.print(comparison_table(doc, f"pooled baseline: {epochs} epochs on every site's data"))
