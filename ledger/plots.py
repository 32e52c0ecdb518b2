"""The report's figures as inline SVG (matplotlib, no pyplot state): privacy spend per site
against its budget, and model quality per round. Each takes the rows of a ledger query as
they are, so a figure shows exactly what `medfed ledger ... --json` prints.

Text stays text (`svg.fonttype = none`): a browser, a screen reader or a test can read the
titles and labels. Figures carry no timestamp, so one ledger draws byte-identical SVG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from matplotlib import rc_context
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from ledger.queries import UNBOUNDED

_STYLE = {
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def _svg(fig: Figure, name: str) -> str:
    buf = io.StringIO()
    with rc_context({**_STYLE, "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]  # inline: no XML declaration or doctype


def _when(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def spend_figure(
    timeline: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]]
) -> str | None:
    """One panel per site: cumulative epsilon over time (steps at each charge), the budget
    as a dashed line, refusals as red crosses, non-DP releases (policy opt-outs) as orange
    triangles at the top; an unbounded spend is drawn above the budget and labelled."""
    sites = sorted({r["site"] for r in summary} | {r["site"] for r in timeline})
    if not sites:
        return None
    budgets = {r["site"]: r.get("epsilon_budget") for r in summary}
    cols = min(3, len(sites))
    rows = math.ceil(len(sites) / cols)
    with rc_context(_STYLE):
        fig = Figure(figsize=(3.6 * cols, 2.8 * rows + 0.5), layout="constrained")
        fig.suptitle("Privacy spend: cumulative epsilon per site against its budget")
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
        top = max([b for b in budgets.values() if isinstance(b, int | float)] or [1.0])
        finite = [
            r["epsilon_cumulative"]
            for r in timeline
            if isinstance(r.get("epsilon_cumulative"), int | float)
        ]
        ceiling = max([top, *finite]) * 1.15
        times = [t for t in map(_when, (r.get("recorded") for r in timeline)) if t]
        end = max(times) if times else None
        # One time axis for every panel, at least ten seconds wide (a date locator cannot
        # place ticks on an empty span).
        span = (min(times), max(max(times), min(times) + timedelta(seconds=10))) if times else None
        for ax, site in zip(axes.flat, sites, strict=False):
            mine = [r for r in timeline if r["site"] == site]
            _spend_panel(ax, site, mine, budgets.get(site), end)
            ax.set_ylim(0, ceiling * 1.05)
            if span:
                pad = (span[1] - span[0]) * 0.05
                ax.set_xlim(span[0] - pad, span[1] + pad)
        for ax in list(axes.flat)[len(sites) :]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("epsilon (cumulative)")
        return _svg(fig, "spend")


def _spend_panel(
    ax: Any, site: str, rows: Sequence[Mapping[str, Any]], budget: Any, end: datetime | None
) -> None:
    ax.set_title(f"Privacy spend: {site}")
    xs, ys, above = [], [], None
    for r in rows:
        when = _when(r.get("recorded"))
        eps = r.get("epsilon_cumulative")
        if when is None or eps is None:
            continue
        if eps == UNBOUNDED:
            above = above or when
            continue
        xs.append(when)
        ys.append(float(eps))
    if xs:
        # Each charge raises the spend from its time on: hold the last figure to the end.
        ax.step(
            xs + [end or xs[-1]], ys + ys[-1:], where="post", color="#1f77b4", label="epsilon spent"
        )
        ax.plot(xs, ys, "o", color="#1f77b4", ms=3)
    if isinstance(budget, int | float):
        ax.axhline(budget, color="#444", ls="--", lw=1, label=f"budget {budget:g}")
    refused = [
        (_when(r.get("recorded")), r.get("epsilon_cumulative"))
        for r in rows
        if r.get("event") == "refusal"
    ]
    refused = [(w, float(e)) for w, e in refused if w and isinstance(e, int | float)]
    if refused:
        ax.scatter(
            *zip(*refused, strict=True),
            marker="x",
            color="#d62728",
            s=40,
            label="refused",
            zorder=3,
        )
    optouts = [_when(r.get("recorded")) for r in rows if r.get("dp") is False]
    if optouts:
        top = ax.get_ylim()[1]
        ax.scatter(optouts, [top] * len(optouts), marker="v", color="#ff7f0e", s=40, label="no DP")
    if above is not None:
        ax.annotate(
            "unbounded (non-DP release)", xy=(0.02, 0.92), xycoords="axes fraction", color="#ff7f0e"
        )
    if not xs and not refused:
        ax.text(0.5, 0.5, "no charges", ha="center", va="center", transform=ax.transAxes)
    locator = AutoDateLocator(maxticks=4)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.legend(loc="lower right", fontsize=7)


def quality_figure(rows: Sequence[Mapping[str, Any]], job: str) -> str | None:
    """Held-out AUC per round: each site as it released it, and the weighted AUC."""
    rows = [r for r in rows if r["job"] == job and isinstance(r.get("auc"), int | float)]
    if not rows:
        return None
    with rc_context(_STYLE):
        fig = Figure(figsize=(6.4, 3.2), layout="constrained")
        ax = fig.subplots()
        ax.set_title(f"Model quality: {job}")
        for site in sorted({r["site"] for r in rows if r["kind"] == "site"}):
            mine = sorted((r["round"], r["auc"]) for r in rows if r["site"] == site)
            ax.plot(*zip(*mine, strict=True), marker="o", ms=3, lw=1, label=site)
        weighted = sorted((r["round"], r["auc"]) for r in rows if r["kind"] == "weighted")
        if weighted:
            ax.plot(
                *zip(*weighted, strict=True), color="black", lw=2.5, marker="s", label="weighted"
            )
        ax.set_xlabel("round")
        ax.set_ylabel("held-out AUC")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, loc="lower right")
        return _svg(fig, f"quality-{job}")
