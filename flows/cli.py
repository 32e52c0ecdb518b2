"""`medfed`: the command line. The only place that prints.

Exit codes: 0 success, 1 the work failed (or a ledger does not verify), 2 bad usage or input.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

# Prefect reads these at import: no telemetry (it fails offline), quiet shutdown.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import typer  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ledger import LedgerError, VerificationError  # noqa: E402
from tasks import StepError  # noqa: E402
from tasks.config import ConfigError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out = Console()
err = Console(stderr=True)

KNOWN_ERRORS = (ConfigError, StepError, LedgerError)


class Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, VerificationError):
        return 1
    if isinstance(exc, ConfigError | StepError):
        return 2
    return 1


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known errors into one sentence on stderr and an exit code; no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Failure as exc:
            err.print(f"medfed: {exc}", markup=False, highlight=False)
            raise typer.Exit(exc.code) from None
        except KNOWN_ERRORS as exc:
            err.print(f"medfed: {exc}", markup=False, highlight=False)
            raise typer.Exit(_exit_code(exc)) from None
        except KeyboardInterrupt:
            err.print("medfed: interrupted")
            raise typer.Exit(130) from None

    return wrapper


class _DropKnownTracebacks(logging.Filter):
    """Prefect logs a failed task with its traceback; for our own error types the message says
    it all on the console (the API log, seen in the UI, keeps the full record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KNOWN_ERRORS):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_prefect_console() -> None:
    from prefect import flow  # noqa: F401  (loads prefect.main, which installs the handlers)

    names = [n for n in logging.root.manager.loggerDict if n.startswith("prefect")]
    for logger in [logging.getLogger(), *map(logging.getLogger, names)]:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _DropKnownTracebacks) for f in handler.filters
            ):
                handler.addFilter(_DropKnownTracebacks())


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
    return table


def _f(x: float, digits: int = 3) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _run_training(config_path: Path, job: str | None) -> list:
    from flows.training import federated_training, new_job_id
    from tasks.config import load_config

    fed = load_config(config_path)  # bad config fails here, before Prefect starts
    _quiet_prefect_console()
    handler = _RoundTables()
    report = logging.getLogger("medfed.report")
    report.addHandler(handler)
    report.setLevel(logging.INFO)
    report.propagate = False
    try:
        return federated_training(str(config_path.resolve()), job or new_job_id(fed))
    finally:
        report.removeHandler(handler)


def _finish(summaries: list, ledger_url: str) -> None:
    if summaries and summaries[-1].status == "budget_exhausted":
        out.print(f"[yellow]Job stopped: {summaries[-1].message}[/yellow]")
    elif summaries:
        last = summaries[-1]
        out.print(
            f"Final weighted AUC {last.weighted_auc:.3f}, accuracy {last.weighted_accuracy:.3f}; "
            f"global model {last.model_hash[:16]}"
        )
    out.print(f"Verify the record: medfed ledger verify --ledger {ledger_url}")


@app.command()
@cli_errors
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where data, keys, artifacts and ledger.db go.")
    ] = Path("medfed-demo"),
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 4,
    dp: Annotated[bool, typer.Option(help="Train with DP-SGD (--no-dp for the baseline).")] = True,
    job: Annotated[str | None, typer.Option(help="Job id (default: demo-<timestamp>).")] = None,
) -> None:
    """Generate three synthetic DICOM hospitals (once) and train a federated model on them."""
    from flows.demo import prepare_demo

    config = prepare_demo(workdir, rounds=rounds, dp=dp)
    out.print(f"Federation: {config}")
    summaries = _run_training(config, job)
    _finish(summaries, f"sqlite:///{(workdir / 'ledger.db').resolve()}")


@app.command()
@cli_errors
def run(
    config: Annotated[Path, typer.Argument(help="Federation TOML file.")],
    job: Annotated[
        str | None, typer.Option(help="Job id; an existing id resumes that job.")
    ] = None,
) -> None:
    """Run (or resume) a federation from its TOML file."""
    from tasks.config import load_config

    summaries = _run_training(config, job)
    _finish(summaries, load_config(config).ledger_url)


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
    operators can start, schedule and retry runs from the Prefect UI. Needs a Prefect server:
    `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api."""
    from flows.training import federated_training
    from tasks.config import load_config

    fed = load_config(config)
    if not os.environ.get("PREFECT_API_URL"):
        raise Failure("set PREFECT_API_URL to a running Prefect server (prefect server start)", 2)
    _quiet_prefect_console()
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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Membership-inference attack on a job's final global model, at every site: members are
    the site's training patients, non-members its held-out patients. AUC 0.5 = no leak seen."""
    from ledger.store import Ledger
    from tasks.audit import audit_site, pooled_attack
    from tasks.config import load_config

    fed = load_config(config)
    if job is None:
        commits = Ledger(fed.ledger_url).events(action="commit_round")
        if not commits:
            raise Failure(f"the ledger {fed.ledger_url} has no committed round to audit", 2)
        job = commits[-1]["job"]
    results = [audit_site(fed, job, s.name) for s in fed.sites]
    pooled = pooled_attack(results)
    dp = Ledger(fed.ledger_url).events(job=job, action="train")
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
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
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
    """Check a federation file and print what it resolves to."""
    from tasks.config import load_config

    fed = load_config(config)
    out.print_json(fed.model_dump_json())


@app.command()
@cli_errors
def bench(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    workdir: Annotated[
        Path | None, typer.Option(help="Scratch folder (default: a temp dir).")
    ] = None,
) -> None:
    """Measure round time, Prefect overhead, DP-SGD cost and CKKS cost on this machine."""
    from flows.bench import run_benchmarks

    _quiet_prefect_console()
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
    from flows.ledger_cli import ledger_app

    app.add_typer(ledger_app, name="ledger")
    app()


if __name__ == "__main__":
    main()
