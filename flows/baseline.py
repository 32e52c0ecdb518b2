"""The pooled (centralized) baseline every federated-learning paper reports beside its
federated figures: the same model trained on every site's training split pooled in one place,
with and without DP, evaluated on each site's own held-out split.

Pooling is exactly what a federation exists to avoid, so this is a simulation tool: it runs
only where every site's data is on this machine (the demo, a test bed of site roots), and it
writes nothing to the ledger (no site released anything). Each site's split is the one its
federation runs use (the site's prepared cache, or the same preparation if none exists yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ledger.accounting import Release, epsilon
from tasks import StepError, models
from tasks.config import FederationConfig, load_config
from tasks.evaluate import Metrics, metrics, predict, weighted
from tasks.prepared import PreparedDataset
from tasks.site import SITE_FILE, Site, load_site
from tasks.site_run import SiteRun
from tasks.site_steps import noise_multiplier_for, prepared_split
from tasks.train import TrainSettings, train_local


@dataclass(frozen=True, kw_only=True)
class BaselineResult:
    setting: str  # "centralized" or "centralized + DP"
    per_site: dict[str, Metrics]
    overall: Metrics  # held-out-size weighted over the sites, as the federation reports
    epsilon: float | None  # per patient, for the DP run
    epochs: int
    seconds: float


def local_sites(fed: FederationConfig, sites_dir: Path) -> list[Site]:
    """Every site of the federation from its root under `sites_dir`, with its data here;
    otherwise one sentence saying which site is not."""
    found = []
    for entry in fed.sites:
        root = sites_dir / entry.name
        if not (root / SITE_FILE).exists():
            raise StepError(
                f"site {entry.name} has no site root under {sites_dir}: the pooled baseline "
                "needs every site's data on this machine, which only a simulation has"
            )
        site = load_site(root)
        if not Path(site.settings.data.path).exists():
            raise StepError(
                f"site {entry.name}'s data is not on this machine: the pooled baseline needs "
                "every site's data in one place, which only a simulation has"
            )
        found.append(site)
    return found


def _run_at(site: Site, fed: FederationConfig) -> SiteRun:
    return SiteRun(site=site, instr=None, fed=fed)  # type: ignore[arg-type]


def pooled(splits: dict[str, PreparedDataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every site's training images, labels and patients, patients numbered apart per site."""
    xs, ys, gs, offset = [], [], [], 0
    for ds in splits.values():
        groups = np.unique(ds.groups_train, return_inverse=True)[1]
        xs.append(ds.x_train)
        ys.append(ds.y_train)
        gs.append(groups + offset)
        offset += int(groups.max()) + 1 if len(groups) else 0
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs).astype(np.int64)


def train_pooled(
    fed: FederationConfig,
    splits: dict[str, PreparedDataset],
    *,
    noise_multiplier: float | None,
    device: str | None = None,
) -> tuple[dict[str, Metrics], float, Release | None]:
    """The plan's model from its round-0 weights, trained on the pooled split for the
    federation's whole budget of epochs (rounds x local epochs) with the plan's batch size,
    learning rate, and (with DP) patient sample rate and clip; exact metrics per site."""
    x, y, groups = pooled(splits)
    features = int(x.shape[1]) if x.ndim == 2 else None
    model = models.initial_from_plan(fed.model, seed=fed.seed, features=features)
    outcome = train_local(
        model,
        x,
        y,
        TrainSettings(
            epochs=fed.rounds * fed.local_epochs,
            batch_size=fed.batch_size,
            learning_rate=fed.learning_rate,
            seed=fed.seed,
            noise_multiplier=noise_multiplier,
            sample_rate=fed.dp.sample_rate,
            max_grad_norm=fed.dp.max_grad_norm,
        ),
        groups=groups,
        device=device,
    )
    per_site = {name: metrics(predict(model, ds.x_test), ds.y_test) for name, ds in splits.items()}
    return per_site, outcome.seconds, outcome.release


def baseline(config: Path, sites_dir: Path | None = None) -> list[BaselineResult]:
    """Centralized without DP, then centralized with the DP a site of this plan runs: the
    noise calibrated for the federation's rounds, so a patient's epsilon is the same as in
    the federation (each patient is at one site)."""
    fed = load_config(config)
    sites = local_sites(fed, sites_dir or config.parent / "sites")
    splits = {s.name: prepared_split(_run_at(s, fed)) for s in sites}
    results = []
    noise = noise_multiplier_for(_run_at(sites[0], fed))
    settings: list[tuple[str, float | None]] = [("centralized", None)]
    if noise is not None:
        settings.append(("centralized + DP", noise))
    for name, z in settings:
        per_site, seconds, release = train_pooled(fed, splits, noise_multiplier=z)
        spent = (
            None
            if release is None
            else epsilon([release], delta=fed.dp.delta, accountant=str(fed.dp.accountant))
        )
        results.append(
            BaselineResult(
                setting=name,
                per_site=per_site,
                overall=weighted(list(per_site.values())),
                epsilon=spent,
                epochs=fed.rounds * fed.local_epochs,
                seconds=seconds,
            )
        )
    return results


def _federated_column(summary: Any) -> dict[str, Any]:
    """A federation's last round as a comparison column (each site's released metrics)."""
    eps = [r.epsilon for r in summary.sites if r.trained and math.isfinite(r.epsilon)]
    return {
        "sites": {r.site: r.auc for r in summary.sites},
        "heldout": {r.site: r.heldout for r in summary.sites},
        "auc": summary.weighted_auc,
        "accuracy": summary.weighted_accuracy,
        "epsilon": max(eps) if eps else None,
        "rounds": summary.round,
    }


def _central_column(result: BaselineResult) -> dict[str, Any]:
    return {
        "sites": {name: m.auc for name, m in result.per_site.items()},
        "heldout": {name: m.n for name, m in result.per_site.items()},
        "auc": result.overall.auc,
        "accuracy": result.overall.accuracy,
        "epsilon": result.epsilon,
        "epochs": result.epochs,
    }


def comparison(
    central: list[BaselineResult], federated: Any | None, federated_dp: Any
) -> dict[str, Any]:
    """Centralized, centralized + DP, federated, federated + DP side by side (weighted AUC
    over the sites' held-out splits), and federated + DP as a share of centralized."""
    columns = {r.setting: _central_column(r) for r in central}
    if federated is not None:
        columns["federated"] = _federated_column(federated)
    columns["federated + DP"] = _federated_column(federated_dp)
    pooled_auc = columns["centralized"]["auc"]
    return {
        "columns": columns,
        "federated_dp_over_centralized_auc": columns["federated + DP"]["auc"] / pooled_auc
        if pooled_auc
        else None,
    }
