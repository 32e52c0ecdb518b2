"""`medfed`: the command line. The only place that prints.

Exit codes: 0 success, 1 the work failed (a check, a budget, too few sites, a ledger that does
not verify), 2 bad usage or bad input. Defined once, by the error classes (`flows.cli.common`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer  # noqa: E402  (after common: it sets Prefect's environment first)
from rich import box  # noqa: E402
from rich.table import Table  # noqa: E402

from flows.cli.baseline import baseline_command, comparison_table  # noqa: E402
from flows.cli.common import Failure, cli_errors, err, out, quiet_prefect_console
from flows.cli.compliance import report_command  # noqa: E402
from flows.cli.ledger import ledger_app  # noqa: E402
from flows.cli.site import coordinator_commands, site_app  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(ledger_app, name="ledger")
app.add_typer(site_app, name="site")
app.command("report")(report_command)
app.command("baseline")(baseline_command)
coordinator_commands(app)


class _RoundTables(logging.Handler):
    """Prints the table of each round as the training flow reports it."""

    def emit(self, record: logging.LogRecord) -> None:
        summary = getattr(record, "round_summary", None)
        if summary is not None:
            out.print(round_table(summary))


STEP_COLUMNS = {
    "preprocess": "prep",
    "train": "train",
    "clip": "clip",
    "encrypt": "enc",
    "upload": "up",
    "evaluate": "eval",
}


def round_table(s: Any) -> Table:
    table = Table(
        title=f"{s.job} · round {s.round} · {s.status}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("site", no_wrap=True, min_width=max(len(r.site) for r in s.sites))
    for col in ("AUC", "acc", "n", "ε", "KiB up", *STEP_COLUMNS.values()):
        table.add_column(col, justify="right")
    for r in s.sites:
        steps = [f"{r.seconds[k]:.2f}" if k in r.seconds else "—" for k in STEP_COLUMNS]
        if not r.trained:
            steps[1] = "refused"
        table.add_row(
            r.site,
            _f(r.auc),
            _f(r.accuracy),
            str(r.heldout),
            _f(r.epsilon, 2),
            f"{r.bytes_uploaded / 1024:,.0f}",
            *steps,
        )
    table.add_row("weighted", _f(s.weighted_auc), _f(s.weighted_accuracy), *[""] * 9, style="bold")
    table.caption = (
        f"n = held-out images · ε cumulative · step times in seconds · "
        f"secure_aggregate {s.aggregate_seconds:.2f} s · model {s.model_hash[:12]}"
    )
    if s.round == 1:
        table.caption += "".join(_ingest_line(r.site, r.ingest) for r in s.sites if r.ingest)
    return table


def _ingest_line(site: str, ingest: dict) -> str:
    """Counts only: which files were quarantined is in the site's own quarantine report."""
    reasons = ", ".join(f"{k} {v}" for k, v in ingest.get("quarantined_by_reason", {}).items())
    return (
        f"\n{site}: {ingest.get('listed')} files listed, {ingest.get('ingested')} ingested "
        f"({ingest.get('images')} images), {ingest.get('quarantined')} quarantined"
        + (f" ({reasons})" if reasons else "")
    )


def _f(x: float, digits: int = 3) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _run_training(config_path: Path, job: str | None, sites_dir: Path | None) -> list:
    from flows.training import federated_training, new_job_id
    from tasks.config import load_config

    fed = load_config(config_path)  # bad config fails here, before Prefect starts
    job = job or new_job_id(fed)
    quiet_prefect_console()
    handler = _RoundTables()
    report = logging.getLogger("medfed.report")
    report.addHandler(handler)
    report.setLevel(logging.INFO)
    report.propagate = False
    try:
        return federated_training(
            str(config_path.resolve()), job, str(sites_dir.resolve()) if sites_dir else None
        )
    except Exception as exc:
        # Say which job stopped and how to resume it, then let cli_errors give the sentence.
        resume = f"medfed run {config_path} --job {job}"
        if sites_dir:
            resume += f" --sites {sites_dir}"
        err.print(f"medfed: job {job} stopped; resume it with: {resume}", markup=False)
        raise exc from None
    finally:
        report.removeHandler(handler)


def _verify_hint(config: Path) -> str:
    from tasks.config import load_config

    fed = load_config(config)
    return (
        f"medfed ledger verify --ledger {fed.ledger_url} --identities {config} "
        f"--witnesses {len(fed.sites)}"
    )


def _finish(summaries: list, config: Path, resume: str) -> None:
    if summaries and summaries[-1].status == "budget_exhausted":
        out.print(f"[yellow]Job stopped: {summaries[-1].message}[/yellow]")
        out.print(f"Verify the record: {_verify_hint(config)}")
        raise Failure(f"{summaries[-1].message}; resume later with: {resume}", 1)
    if summaries:
        last = summaries[-1]
        out.print(
            f"Final weighted AUC {last.weighted_auc:.3f}, accuracy {last.weighted_accuracy:.3f}; "
            f"global model {last.model_hash[:16]}"
        )
    out.print(f"Verify the record: {_verify_hint(config)}")
    out.print(f"The DPO's report: {_report_hint(config)}")


def _report_hint(config: Path) -> str:
    from tasks.config import load_config

    fed = load_config(config)
    return (
        f"medfed report --ledger {fed.ledger_url} --identities {config} "
        f"--out {config.parent / 'report'}"
    )


@app.command()
@cli_errors
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where data, site roots, artifacts and ledger.db go.")
    ] = Path("medfed-demo"),
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 4,
    dp: Annotated[bool, typer.Option(help="Train with DP-SGD (--no-dp for the baseline).")] = True,
    job: Annotated[str | None, typer.Option(help="Job id (default: demo-<timestamp>).")] = None,
    workers: Annotated[
        bool,
        typer.Option(
            help="Run each site on its own Prefect worker process (a local Prefect server is "
            "started and stopped), instead of as threads of this process."
        ),
    ] = False,
    network: Annotated[
        str | None,
        typer.Option(
            help="Train a MONAI network (ResNet18, ResNet34, DenseNet121, BasicUNetEncoder) "
            "instead of the scatter-net head."
        ),
    ] = None,
    local_epochs: Annotated[
        int, typer.Option(min=1, help="Local epochs per round (the demo's plan: 20).")
    ] = 20,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Also run the federation without DP (in WORKDIR/no-dp) and the pooled "
            "baseline with and without DP, and print all four side by side.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --compare: print the comparison as JSON.")
    ] = False,
) -> None:
    """Three synthetic DICOM hospitals, each its own site root, trained together."""

    if compare and not dp:
        raise Failure("--compare runs both with and without DP itself: drop --no-dp", 2)
    out.quiet = as_json  # stdout carries the JSON document alone
    try:
        _demo(workdir, rounds, dp, job, workers, network, local_epochs, compare, as_json)
    finally:
        out.quiet = False


def _demo(
    workdir: Path,
    rounds: int,
    dp: bool,
    job: str | None,
    workers: bool,
    network: str | None,
    local_epochs: int,
    compare: bool,
    as_json: bool,
) -> None:
    from flows.demo import prepare_demo

    config = prepare_demo(workdir, rounds=rounds, dp=dp, network=network, local_epochs=local_epochs)
    out.print(f"Federation: {config}")
    summaries = _demo_federation(config, job, workdir / "sites", workers)
    _finish(summaries, config, f"medfed run {config} --sites {workdir / 'sites'}")
    if not compare:
        return
    if not summaries:
        raise Failure(f"job {job} has no round left to run, so nothing to compare", 2)
    from flows.baseline import baseline, comparison

    plain_dir = workdir / "no-dp"
    plain = prepare_demo(
        plain_dir,
        rounds=rounds,
        dp=False,
        network=network,
        local_epochs=local_epochs,
        cohorts=workdir / "data",
        same_split_as=workdir,
    )
    out.print(f"Federation without DP: {plain}")
    plain_summaries = _demo_federation(plain, None, plain_dir / "sites", workers)
    _finish(plain_summaries, plain, f"medfed run {plain} --sites {plain_dir / 'sites'}")
    out.print("Pooled (centralized) baseline, with and without DP ...")
    doc = comparison(
        baseline(config),
        plain_summaries[-1] if plain_summaries else None,
        summaries[-1],
    )
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    out.print(comparison_table(doc, f"{network or 'scatter-net head'}: {rounds} rounds"))
    ratio = doc["federated_dp_over_centralized_auc"]
    if ratio is not None:
        out.print(f"Federated + DP reaches {ratio:.3f} of the centralized AUC.")


def _demo_federation(config: Path, job: str | None, sites: Path, workers: bool) -> list:
    from contextlib import nullcontext

    from flows.local import local_federation

    with local_federation(config) if workers else nullcontext():
        return _run_training(config, job, None if workers else sites)


@app.command("demo-data")
@cli_errors
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the three hospitals' DICOM data.")],
) -> None:
    """Generate the demo's three synthetic DICOM hospitals (one folder each, with manifests)."""
    from flows.demo import DEMO_SEED
    from tasks.synthetic import ensure_demo_cohorts

    for name, path in sorted(ensure_demo_cohorts(out_dir, seed=DEMO_SEED).items()):
        out.print(f"{name}: {path}")


@app.command()
@cli_errors
def run(
    config: Annotated[Path, typer.Argument(help="Federation TOML file.")],
    job: Annotated[
        str | None, typer.Option(help="Job id; an existing id resumes that job.")
    ] = None,
    sites: Annotated[
        Path | None,
        typer.Option(
            help="Run the sites in this process, from their roots under this folder (one per "
            "site name). Without it, each site's own Prefect worker runs its deployment."
        ),
    ] = None,
) -> None:
    """Run (or resume) a federation from its TOML file."""
    from tasks.config import load_config

    load_config(config)  # bad input is one sentence before anything starts
    if sites is None and not os.environ.get("PREFECT_API_URL"):
        raise Failure(
            "sites run on their own Prefect workers: set PREFECT_API_URL to the Prefect server "
            "they poll, or pass --sites DIR to run site roots in this process",
            2,
        )
    summaries = _run_training(config, job, sites)
    _finish(summaries, config, f"medfed run {config} --job {job or '<job>'}")


@app.command()
@cli_errors
def serve(
    config: Annotated[Path, typer.Argument(help="Federation TOML file.")],
    cron: Annotated[str | None, typer.Option(help="Cron schedule, e.g. '0 2 * * 1'.")] = None,
    name: Annotated[
        str | None, typer.Option(help="Deployment name (default: federation name).")
    ] = None,
) -> None:
    """Serve the training flow as a Prefect deployment (optionally on a cron schedule), so
    operators can start, schedule and retry runs from the Prefect UI. Needs a Prefect server
    (PREFECT_API_URL) and each site's worker running its `site_round` deployment."""
    from flows.training import federated_training
    from tasks.config import load_config

    fed = load_config(config)
    if not os.environ.get("PREFECT_API_URL"):
        raise Failure("set PREFECT_API_URL to a running Prefect server (prefect server start)", 2)
    quiet_prefect_console()
    federated_training.serve(
        name=name or fed.name,
        cron=cron,
        parameters={"config_path": str(config.resolve())},
        description=f"medfed federation {fed.name}: {len(fed.sites)} sites, {fed.rounds} rounds",
    )


@app.command("audit-privacy")
@cli_errors
def audit_privacy(
    config: Annotated[
        Path, typer.Argument(help="Federation TOML file (e.g. medfed-demo/federation.toml).")
    ],
    job: Annotated[
        str | None, typer.Option(help="Job to audit (default: the latest committed).")
    ] = None,
    sites: Annotated[
        Path, typer.Option(help="The folder holding the site roots (the attack needs their data).")
    ] = Path("medfed-demo/sites"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Membership-inference attack on a job's final global model, at every site: members are
    the site's training patients, non-members its held-out patients. AUC 0.5 = no leak seen."""
    from ledger.store import Ledger
    from tasks.audit import audit_site, pooled_attack
    from tasks.config import load_config

    fed = load_config(config)
    if job is None:
        commits = Ledger(fed.ledger_url, roster=fed.roster()).events(action="commit_round")
        if not commits:
            raise Failure(f"the ledger {fed.ledger_url} has no committed round to audit", 2)
        job = commits[-1]["job"]
    from tasks.site import load_site

    results = [audit_site(fed, job, load_site(sites / s.name)) for s in fed.sites]
    pooled = pooled_attack(results)
    dp = Ledger(fed.ledger_url, roster=fed.roster()).events(job=job, action="train")
    epsilon = {e["site"]: (e.get("privacy") or {}).get("epsilon_cumulative") for e in dp}
    rows = [
        {
            "site": r.site,
            "attack_auc": r.attack.attack_auc,
            "members": r.attack.members,
            "non_members": r.attack.non_members,
            "train_loss": r.train_loss,
            "heldout_loss": r.heldout_loss,
            "epsilon": epsilon.get(r.site),
        }
        for r in results
    ]
    doc = {
        "job": job,
        "round": results[0].round,
        "sites": rows,
        "pooled": {
            "attack_auc": pooled.attack_auc,
            "members": pooled.members,
            "non_members": pooled.non_members,
        },
    }
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    table = Table(title=f"membership inference on {job}, round {doc['round']}", box=box.SIMPLE_HEAD)
    table.add_column("site", no_wrap=True)
    for col in ("attack AUC", "members", "non-members", "train loss", "held-out loss", "ε"):
        table.add_column(col, justify="right")
    for r in rows:
        # A site's train entry states "unbounded" once it released a non-DP update.
        eps = r["epsilon"]
        eps = "no DP" if eps is None else eps if isinstance(eps, str) else f"{eps:.2f}"
        table.add_row(
            r["site"],
            f"{r['attack_auc']:.3f}",
            str(r["members"]),
            str(r["non_members"]),
            f"{r['train_loss']:.3f}",
            f"{r['heldout_loss']:.3f}",
            eps,
        )
    table.add_section()
    table.add_row(
        "all sites", f"{pooled.attack_auc:.3f}", str(pooled.members), str(pooled.non_members)
    )
    out.print(table)


@app.command()
@cli_errors
def validate(config: Annotated[Path, typer.Argument(help="Federation TOML file.")]) -> None:
    """Check a federation file and everything reachable from the coordinator before anyone
    trains: the artifact store (written and deleted), the ledger, the encryption settings, every
    site's registration. Prints the plan digest the sites must approve."""
    from ledger.store import Ledger
    from tasks import transport
    from tasks.config import load_config, plan_digest
    from tasks.coordinator_steps import check_enrolled
    from tasks.secure_agg import create_secret

    fed = load_config(config)
    fed.check_runnable()
    transport.check_writable(fed.artifact_store)
    check_enrolled(Ledger(fed.ledger_url, roster=fed.roster()), fed)
    create_secret(fed.secure_aggregation)  # the scheme's parameters make a valid key set
    out.print(
        f"{config}: valid; {len(fed.sites)} sites registered; artifact store writable; "
        f"plan digest {plan_digest(fed.plan())}"
    )


@app.command()
@cli_errors
def bench(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    workdir: Annotated[
        Path | None, typer.Option(help="Scratch folder (default: a temp dir).")
    ] = None,
) -> None:
    """Measure round time, Prefect overhead, DP-SGD and secure-aggregation cost here."""
    from flows.bench import run_benchmarks

    quiet_prefect_console()
    figures = run_benchmarks(workdir)
    if as_json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        table = Table(title="medfed bench")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for k, v in figures.items():
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
