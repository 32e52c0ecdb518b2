"""The compliance officer's report: one self-contained HTML file drawn from the ledger.

Every table and figure is the output of a `ledger.queries` function (the ones `medfed ledger
... --json` prints), embedded whole as JSON in the page (`<script id="medfed-data">`) beside
the tables and plots drawn from it, so a reader (or a test) can check the report against the
CLI. The page names the ledger size and Merkle root it was drawn from, and needs no network
to view: styles and SVG figures are inline, nothing is loaded.

A report can be scoped to a role of the ledger API (`ledger.access.Grant`): a site's report
holds its own rows only, an operator's no disclosures, data use or spend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape

from ledger import LedgerError, VerificationError, plots, queries
from ledger.access import AUDITOR_GRANT, Grant, Section
from ledger.store import open_ledger, shown_url

FORMAT = "medfed-report/1"
_ATTEMPTS = 3  # redraw when entries were appended while drawing


def collect(
    url: str,
    *,
    identities: Path | None = None,
    kept_checkpoints: Sequence[str] = (),
    grant: Grant = AUDITOR_GRANT,
) -> dict[str, Any]:
    """Everything the report shows, as query rows, drawn from one ledger size: redrawn when
    entries were appended meanwhile (at most a few times; then the figures say so)."""
    from ledger.identities import load_roster

    roster = load_roster(identities) if identities is not None else None
    reader = open_ledger(url)
    try:
        for _ in range(_ATTEMPTS):
            before = reader.size()
            data = _draw(url, reader, identities, roster, tuple(kept_checkpoints), grant)
            if reader.size() == before:
                data["drawn_from"]["entries"] = before
                return data
        data["drawn_from"]["note"] = "entries were appended while the report was drawn"
        return data
    finally:
        reader.engine.dispose()


def _draw(
    url: str,
    reader: Any,
    identities: Path | None,
    roster: Any,
    kept: tuple[str, ...],
    grant: Grant,
) -> dict[str, Any]:
    integrity = queries.integrity(url, roster=roster, pinned_checkpoints=kept)
    log = queries.screen(reader, identities)
    data: dict[str, Any] = {
        "format": FORMAT,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "ledger": shown_url(url),
        "role": grant.role,
        "drawn_from": {"entries": integrity.get("entries"), "root": integrity.get("root")},
        "integrity": integrity | {"kept_checkpoints": len(kept), "identities": bool(roster)},
        "checkpoints": queries.checkpoints(log),
    }
    try:
        _sections(data, log, grant)
    except VerificationError as exc:  # the queries refuse a forged entry: show no figure
        data["withheld"] = str(exc)
        for key in _SECTIONS:
            data.pop(key, None)
    if log.ignored:
        data["ignored_actors"] = dict(sorted(log.ignored.items()))
    return data


_SECTIONS = (
    "spend",
    "spend_timeline",
    "quality",
    "participation",
    "data_use",
    "disclosures",
    "lineage",
)


def _sections(data: dict[str, Any], log: Any, grant: Grant) -> None:
    site = grant.site
    if grant.may(Section.SPEND):
        data["spend"] = queries.spend_summary(log, site=site)
        data["spend_timeline"] = queries.spend_timeline(log, site=site)
    if grant.may(Section.QUALITY):
        data["quality"] = grant.scoped(queries.quality(log))
    if grant.may(Section.PARTICIPATION):
        data["participation"] = grant.scoped(queries.participation(log))
    if grant.may(Section.DATA_USE):
        data["data_use"] = queries.data_use(log, site=site)
    if grant.may(Section.DISCLOSURES):
        data["disclosures"] = queries.disclosures(log, site=site)
    if grant.may(Section.LINEAGE):
        model = queries.latest_model(log)
        data["lineage"] = {
            "model": model,
            "rows": queries.lineage(log, model) if model else [],
        }


def render(data: Mapping[str, Any]) -> str:
    """The HTML page of `collect`'s data: tables, inline SVG figures, and the data itself."""
    jobs = sorted({r["job"] for r in data.get("quality", [])})
    figures = {
        "spend": plots.spend_figure(data.get("spend_timeline", []), data.get("spend", []))
        if "spend" in data
        else None,
        "quality": [(job, plots.quality_figure(data["quality"], job)) for job in jobs],
    }
    env = Environment(autoescape=select_autoescape(default=True), trim_blocks=True)
    env.filters["cell"] = _cell
    template = env.from_string(
        resources.files("ledger").joinpath("report.html.j2").read_text(encoding="utf-8")
    )
    return template.render(
        data=data,
        figures=figures,
        grid=_participation_grid(data.get("participation", [])),
        data_json=_script_json(data),
    )


def write(data: Mapping[str, Any], out_dir: Path) -> Path:
    """Write report.html (and data.json, the same rows) into `out_dir`; returns the page."""
    from ledger.verify import _atomic_write_text

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(f"cannot create report directory {out_dir}: {exc.strerror}") from None
    page = out_dir / "report.html"
    _atomic_write_text(out_dir / "data.json", json.dumps(data, indent=2, default=str) + "\n")
    _atomic_write_text(page, render(data))
    return page


def _script_json(data: Mapping[str, Any]) -> str:
    """JSON safe inside <script>: no '</' can close the element early."""
    return json.dumps(data, default=str).replace("</", "<\\/").replace("<!--", "<\\!--")


def _participation_grid(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rounds down, sites across, one status per cell (with its reason as a tooltip)."""
    sites = sorted({r["site"] for r in rows})
    rounds = sorted({(r["job"], r["round"]) for r in rows})
    cells = {(r["job"], r["round"], r["site"]): r for r in rows}
    return {
        "sites": sites,
        "rows": [
            {"job": job, "round": rnd, "cells": [cells.get((job, rnd, s)) for s in sites]}
            for job, rnd in rounds
        ],
    }


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)
