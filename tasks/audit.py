"""Empirical privacy audit: a loss-threshold membership-inference attack (Yeom et al. 2018).

The attacker scores each pseudonymous patient by the global model's mean loss over the
patient's images; training patients (members) tend to have lower loss. The attack's AUC at
telling members from held-out patients (non-members) is 0.5 when the model leaks nothing
about membership, and 1.0 when it leaks everything. It is a lower bound on leakage, not a
proof of privacy; DP's epsilon is the upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from ledger.entry import Action
from tasks import StepError, models, prepared
from tasks.config import FederationConfig
from tasks.evaluate import inference_batch_size
from tasks.files import load_array
from tasks.site import Site
from tasks.site_run import SiteRun
from tasks.site_steps import model_for, prepared_cache_path


@dataclass(frozen=True, kw_only=True)
class AttackResult:
    attack_auc: float
    members: int
    non_members: int


def per_sample_loss(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int | None = None
) -> np.ndarray:
    batch_size = batch_size or inference_batch_size(x)
    model.eval()
    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(torch.as_tensor(x[i : i + batch_size], device=device)).squeeze(1)
            target = torch.as_tensor(y[i : i + batch_size], dtype=torch.float32, device=device)
            losses.append(
                nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
                .cpu()
                .numpy()
            )
    return np.concatenate(losses) if losses else np.zeros(0, dtype=np.float32)


def per_patient_mean(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean of `values` per patient index in `groups` (patients numbered 0..P-1)."""
    if values.shape != groups.shape:
        raise StepError("per-sample values and patient groups differ in length")
    counts = np.bincount(groups)
    present = counts > 0
    return (np.bincount(groups, weights=values)[present] / counts[present]).astype(np.float64)


def membership_attack(member_loss: np.ndarray, non_member_loss: np.ndarray) -> AttackResult:
    """AUC of the score -loss at separating members from non-members."""
    if len(member_loss) == 0 or len(non_member_loss) == 0:
        raise StepError("a membership attack needs both member and non-member patients")
    labels = np.concatenate([np.ones(len(member_loss)), np.zeros(len(non_member_loss))])
    scores = -np.concatenate([member_loss, non_member_loss])
    return AttackResult(
        attack_auc=float(roc_auc_score(labels, scores)),
        members=len(member_loss),
        non_members=len(non_member_loss),
    )


@dataclass(frozen=True, kw_only=True)
class SiteAudit:
    site: str
    job: str
    round: int
    attack: AttackResult
    heldout_loss: float
    train_loss: float
    # Per-patient mean losses (pseudonymous, never printed): what `pooled_attack` combines.
    member_loss: np.ndarray
    non_member_loss: np.ndarray


def pooled_attack(audits: list[SiteAudit]) -> AttackResult:
    """One attack over every site's patients at once: more patients, a tighter AUC estimate
    than any single site's (a site's ~100 patients leave a standard error near 0.03)."""
    return membership_attack(
        np.concatenate([a.member_loss for a in audits]),
        np.concatenate([a.non_member_loss for a in audits]),
    )


def audit_site(fed: FederationConfig, job: str, site: Site) -> SiteAudit:
    """Attack the job's final global model with the site's own train/held-out patients (run
    at the site: it needs the site's data and its copy of the model)."""
    from ledger.store import Ledger

    commits = Ledger(fed.ledger_url, roster=fed.roster()).events(
        job=job, action=str(Action.COMMIT_ROUND)
    )
    if not commits:
        raise StepError(f"job '{job}' has no committed round in {fed.ledger_url}")
    last = max(c["round"] for c in commits)
    run = SiteRun(site=site, instr=None, fed=fed)  # type: ignore[arg-type]
    cache = prepared_cache_path(run)
    model_path = site.global_model(job, last)
    for path, what in ((cache, "prepared data"), (model_path, "global model")):
        if not path.exists():
            raise StepError(f"site {site.name} has no {what} for job '{job}'")
    ds = prepared.load_prepared(cache)
    features = int(ds.x_train.shape[1]) if ds.x_train.ndim == 2 else 0
    model = models.load_flat(model_for(fed, features), load_array(model_path))
    member = per_sample_loss(model, ds.x_train, ds.y_train)
    non_member = per_sample_loss(model, ds.x_test, ds.y_test)
    member_patients = per_patient_mean(member, ds.groups_train)
    non_member_patients = per_patient_mean(non_member, ds.groups_test)
    return SiteAudit(
        site=site.name,
        job=job,
        round=last,
        attack=membership_attack(member_patients, non_member_patients),
        train_loss=float(member.mean()),
        heldout_loss=float(non_member.mean()),
        member_loss=member_patients,
        non_member_loss=non_member_patients,
    )
