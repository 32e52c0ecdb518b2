"""`medfed site ...` (run by a hospital's IT, at the site) and the coordinator's side of
enrollment: `medfed coordinator-key`, `medfed register`, `medfed plan`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import Failure, cli_errors, out

site_app = typer.Typer(no_args_is_help=True, help="Set up and run a site, at the hospital.")
SiteRoot = Annotated[Path, typer.Argument(help="The site's root folder.")]


@site_app.command("init")
@cli_errors
def site_init(
    root: SiteRoot,
    name: Annotated[str, typer.Option(help="The site's name in the federation.")],
    data: Annotated[str, typer.Option(help="DICOM folder, or a CSV / SQLite file (tabular).")],
    labels: Annotated[str, typer.Option(help="DICOM: manifest CSV (file,label); tabular: column.")],
    federation: Annotated[str, typer.Option(help="The federation this site accepts.")],
    coordinator_key: Annotated[
        str, typer.Option(help="The coordinator's public key (hex): 'medfed coordinator-key'.")
    ],
    kind: Annotated[str, typer.Option(help="dicom or tabular.")] = "dicom",
    model_kinds: Annotated[
        list[str] | None, typer.Option("--model-kind", help="Accepted model kinds (repeat).")
    ] = None,
    purposes: Annotated[
        list[str] | None, typer.Option("--purpose", help="Accepted purposes of use (repeat).")
    ] = None,
    epsilon_budget: Annotated[float, typer.Option(help="This site's epsilon budget.")] = 10.0,
    delta: Annotated[float, typer.Option(help="The delta this site accounts at.")] = 1e-5,
    id_column: Annotated[str, typer.Option(help="Tabular: the patient id column.")] = "patient_id",
    table: Annotated[str | None, typer.Option(help="Tabular SQLite: the table.")] = None,
) -> None:
    """Create a site root: site.toml, keys made here (0600), a self-signed enrollment.json."""
    from tasks.config import SiteKind
    from tasks.site import ENROLLMENT_FILE, init_site, site_toml_text

    if kind not in {k.value for k in SiteKind}:
        raise Failure(f"--kind must be one of {[k.value for k in SiteKind]}, not '{kind}'", 2)
    default_models = ["cnn"] if kind == SiteKind.DICOM else ["mlp", "logistic"]
    site = init_site(
        root,
        settings_text=site_toml_text(
            name=name,
            kind=SiteKind(kind),
            data=data,
            labels=labels,
            federation=federation,
            coordinator_key=coordinator_key,
            model_kinds=model_kinds or default_models,
            purposes=purposes or ["HRESCH"],
            epsilon_budget=epsilon_budget,
            delta=delta,
            id_column=id_column,
            table=table,
        ),
    )
    out.print(f"site {site.name} set up in {site.root}")
    out.print(f"send {site.root / ENROLLMENT_FILE} to the coordinator (public keys only)")


@site_app.command("approve")
@cli_errors
def site_approve(
    root: SiteRoot,
    plan: Annotated[Path, typer.Argument(help="The plan JSON from 'medfed plan --out'.")],
) -> None:
    """Approve a training plan: the site will run instructions carrying its digest only."""
    from tasks.site import approve_plan, load_site

    try:
        doc = json.loads(plan.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Failure(f"plan file {plan} cannot be read as JSON", 2) from exc
    digest = approve_plan(load_site(root), doc)
    out.print(f"approved plan {digest}")


@site_app.command("check")
@cli_errors
def site_check(
    root: SiteRoot,
    federation: Annotated[
        Path | None,
        typer.Option(
            help="Federation file whose rules to check against (default: the plan "
            "this site approved last)."
        ),
    ] = None,
) -> None:
    """Dry-run this site's ingest under the federation's rules, training nothing: settings,
    keys, manifest, and every listed file ingested or quarantined with a reason. Writes the
    site-local quarantine report (quarantine/report.csv: file names stay at the site)."""
    from tasks.config import FederationConfig, load_config, plan_from_dict
    from tasks.datasource import dry_run
    from tasks.site import load_site

    site = load_site(root)
    _ = site.identity, site.kex_key
    if federation is not None:
        plan: FederationConfig = load_config(federation)
        rules = f"the rules of {federation}"
    else:
        approved = site.latest_approved()
        if approved is None:
            raise Failure(
                f"site {site.name} has approved no plan yet: pass --federation FILE to check "
                "against a federation's rules",
                2,
            )
        plan = plan_from_dict(approved)
        rules = "the plan it approved last"
    report, path = dry_run(
        site.name,
        site.settings.kind,
        site.settings.data,
        plan=plan,
        secret=site.pseudonym_secret(),
        site_root=site.root,
    )
    out.print(f"site {site.name}: settings, keys and data are readable under {rules}")
    if report is not None:
        out.print(f"site {site.name}: {report.describe()}")
        for q in _first_per_reason(report):
            out.print(f"  {q.code}: e.g. {q.stage}: {q.detail}")
        out.print(f"each quarantined file and its reason: {path}")


def _first_per_reason(report):  # noqa: ANN001, ANN202 - a local view of the report
    seen: dict[str, object] = {}
    for q in report.quarantined:
        seen.setdefault(q.code, q)
    return [seen[k] for k in sorted(seen)]


@site_app.command("deploy")
@cli_errors
def site_deploy(
    root: SiteRoot,
    pool: Annotated[str | None, typer.Option(help="Work pool (default: medfed-<site>).")] = None,
) -> None:
    """Create the site's process work pool and its `site_round/<site>` deployment on the
    Prefect server in PREFECT_API_URL; then start the worker with MEDFED_SITE_ROOT=SITE_ROOT."""
    from flows.deploy import deploy_site
    from tasks.site import load_site

    if not os.environ.get("PREFECT_API_URL"):
        raise Failure("set PREFECT_API_URL to the federation's Prefect server", 2)
    site = load_site(root)
    name = deploy_site(site, pool or f"medfed-{site.name}")
    pool = pool or f"medfed-{site.name}"
    out.print(f"deployed {name} on work pool {pool}; start the site's worker with:")
    out.print(f"  MEDFED_SITE_ROOT={site.root} prefect worker start --pool {pool} --type process")


def coordinator_commands(app: typer.Typer) -> None:
    @app.command("coordinator-key")
    @cli_errors
    def coordinator_key(
        root: Annotated[Path, typer.Argument(help="The coordinator's root folder.")],
    ) -> None:
        """Print the coordinator's public key (hex), creating its keys on first use."""
        from tasks.keyring import CoordinatorPaths, coordinator_identity, log_identity

        paths = CoordinatorPaths(root=root.resolve())
        log_identity(paths)
        typer.echo(coordinator_identity(paths).public_key.hex())

    @app.command("register")
    @cli_errors
    def register(
        config: Annotated[Path, typer.Argument(help="Federation TOML file.")],
        enrollment: Annotated[Path | None, typer.Argument(help="A site's enrollment.json.")] = None,
        dpo: Annotated[
            str | None,
            typer.Option(
                help="Enroll the DPO's Ed25519 public key (hex): the only key that erases."
            ),
        ] = None,
    ) -> None:
        """Register a site from its enrollment file (its public keys go into the federation
        file, the registration into the ledger), and pin the coordinator's and the log's keys
        in the file's [identities]; --dpo enrolls the data protection officer's key."""
        from tasks.config import load_config
        from tasks.coordinator_steps import (
            record_enrollment,
            record_role_enrollment,
            site_entry_from_enrollment,
            site_entry_toml,
        )
        from tasks.keyring import (
            CoordinatorPaths,
            coordinator_identity,
            identities_toml,
            with_identities,
        )

        if enrollment is None and dpo is None:
            raise Failure("give a site's enrollment.json, or --dpo KEY", 2)
        original = config.read_text(encoding="utf-8")
        text = original
        entry = None
        if enrollment is not None:
            entry = site_entry_from_enrollment(enrollment)
            if f'name = "{entry.name}"' in text.split("[[sites]]", 1)[-1] and "[[sites]]" in text:
                raise Failure(f"{config} already lists site '{entry.name}'", 2)
            text += site_entry_toml(entry)
        try:
            config.write_text(text, encoding="utf-8")
            paths = CoordinatorPaths(root=load_config(config).coordinator_root)
            pinned = load_config(config).identities
            keep_dpo = dpo if dpo is not None else (pinned.dpo if pinned else None)
            config.write_text(
                with_identities(text, identities_toml(paths, dpo=keep_dpo)), encoding="utf-8"
            )
            fed = load_config(config)
        except Exception:
            config.write_text(original, encoding="utf-8")  # nothing half-written
            raise
        from ledger.store import Ledger

        identity = coordinator_identity(paths)
        ledger = Ledger(fed.ledger_url, roster=fed.roster())
        if entry is not None:
            record_enrollment(ledger, identity, entry, fed.name)
            out.print(f"registered site {entry.name} in {config} and on the ledger")
        if dpo is not None:
            record_role_enrollment(ledger, identity, fed.name, role="dpo", name="dpo", key=dpo)
            out.print(f"enrolled the DPO's key in {config} and on the ledger")

    @app.command("plan")
    @cli_errors
    def plan(
        config: Annotated[Path, typer.Argument(help="Federation TOML file.")],
        out_file: Annotated[
            Path | None, typer.Option("--out", help="Write the plan JSON here for the sites.")
        ] = None,
    ) -> None:
        """Print the training plan's digest (what each site approves); --out writes the plan."""
        from tasks.config import load_config, plan_digest

        doc = load_config(config).plan()
        if out_file:
            out_file.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        typer.echo(plan_digest(doc))
