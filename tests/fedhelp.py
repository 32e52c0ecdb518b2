"""Small federations for tests: tabular or DICOM sites set up in their own roots."""

from __future__ import annotations

from pathlib import Path

from flows.demo import assemble_federation
from tasks.config import SiteKind
from tasks.site import init_site, site_toml_text
from tasks.synthetic import TABULAR_SCHEMA_TOML

# The declared feature schema is that of `write_tabular_cohort`'s tables.
TABULAR_HEADER = """
name = "ehr"
rounds = 2
local_epochs = 3
batch_size = 32
learning_rate = 0.5
min_sites = 2
[model]
kind = "logistic"
[dp]
noise_multiplier = 1.0
max_grad_norm = 1.0
"""
TABULAR_HEADER += TABULAR_SCHEMA_TOML


def _federation(tmp_path: Path, header: str, settings: dict[str, dict]) -> Path:
    """Sites (name -> site_toml_text arguments) initialised in their own roots under one
    coordinator key, registered, and approving the plan of ``header``."""
    from ledger import keys

    coordinator = keys.load_or_create("coordinator", tmp_path / "coordinator/keys/identity.pem")
    sites = [
        init_site(
            tmp_path / "sites" / name,
            settings_text=site_toml_text(
                name=name,
                coordinator_key=coordinator.public_key.hex(),
                delta=1e-5,
                **kwargs,
            ),
        )
        for name, kwargs in settings.items()
    ]
    config = tmp_path / "federation.toml"
    assemble_federation(config, header, sites)
    return config


def tabular_federation(
    tmp_path: Path,
    sources: dict,
    *,
    header: str = TABULAR_HEADER,
    purposes=("HRESCH",),
    metrics: str = "exact",
    budget: float = 10.0,
    model_kinds=("logistic",),
) -> Path:
    """Tabular sites (name -> (file, table)) set up in their own roots, registered and
    approving the plan. Exact held-out metrics by default: tests that assert on AUC need the
    true figure."""
    common = {
        "kind": SiteKind.TABULAR,
        "labels": "outcome",
        "federation": "ehr",
        "model_kinds": list(model_kinds),
        "purposes": list(purposes),
        "epsilon_budget": budget,
        "metrics": metrics,
    }
    return _federation(
        tmp_path,
        header,
        {
            name: common | {"data": str(data), "table": table}
            for name, (data, table) in sources.items()
        },
    )


DICOM_HEADER = """
name = "imaging"
rounds = 1
local_epochs = 1
batch_size = 16
learning_rate = 0.1
holdout_fraction = 0.5
min_sites = 2
[model]
kind = "cnn"
image_size = 16
hidden = 8
[dp]
noise_multiplier = 1.0
max_grad_norm = 1.0
"""


def dicom_federation(
    tmp_path: Path, sources: dict, *, header: str = DICOM_HEADER, budget: float = 10.0
) -> Path:
    """DICOM sites (name -> (data folder, manifest)) in their own roots, registered and
    approving the plan; exact held-out metrics."""
    common = {
        "kind": SiteKind.DICOM,
        "federation": "imaging",
        "model_kinds": ["cnn"],
        "purposes": ["HRESCH"],
        "epsilon_budget": budget,
        "metrics": "exact",
    }
    return _federation(
        tmp_path,
        header,
        {
            name: common | {"data": str(data), "labels": str(manifest)}
            for name, (data, manifest) in sources.items()
        },
    )


def copy_ledger(source: str, target: str) -> None:
    """Every row of the ledger at `source` into the (new, empty) ledger at `target`, as is:
    the same entries, checkpoints and cosignatures on another back end."""
    from ledger.schema import EntryRow
    from ledger.store import _TABLES, engine_for

    assert EntryRow.__table__ in _TABLES
    with engine_for(source).connect() as src, engine_for(target).begin() as dst:
        for table in _TABLES:
            rows = [dict(r._mapping) for r in src.execute(table.select())]
            if rows:
                dst.execute(table.insert(), rows)


def independent_epsilon(releases: list, delta: float) -> float:
    """Google's PLD accountant over the same releases: a second opinion on every figure."""
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(
        dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3
    )
    for r in releases:
        step = dpa.GaussianDpEvent(r.noise_multiplier)
        if r.sample_rate < 1:
            step = dpa.PoissonSampledDpEvent(r.sample_rate, step)
        acc.compose(dpa.SelfComposedDpEvent(step, r.steps))
    return acc.get_epsilon(delta) if releases else 0.0


def brute_force_clipped_sum(model, x, y, owner, clip: float) -> list:
    """The reference every per-patient clipper is tested against: each patient's summed-loss
    gradient by its own backward pass, clipped with Opacus' rule, summed over patients (one
    tensor per trainable parameter)."""
    import torch
    from torch import nn

    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for unit in owner.unique():
        rows = owner == unit
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(x[rows]).squeeze(1), y[rows], reduction="sum"
        )
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return total
