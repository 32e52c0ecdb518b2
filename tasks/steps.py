"""The steps of one federated round, each recorded in the ledger, each under a thin @task.

Site steps (run where the data is): preprocess -> train -> clip_and_noise -> encrypt ->
upload, and after aggregation, evaluate. Coordinator steps: secure_aggregate, commit_round.
Steps hand each other small frozen references (paths into the site's private folder, or
signed artifact references, plus hashes); payloads and secrets never pass through Prefect.

Every step appends one ledger entry under the idempotency key `job/round/site/step`, so a
retried round writes nothing twice; `train` looks its key up first and reuses a released
update instead of training (and spending privacy budget) again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from torch import nn

from ledger.entry import Action, Event, Outcome
from ledger.store import Ledger
from tasks import StepError, ingest, models, privacy, secure_agg, transport
from tasks.config import FederationConfig, SiteConfig, SiteKind
from tasks.evaluate import metrics, predict
from tasks.keyring import (
    COORDINATOR,
    CoordinatorPaths,
    SitePaths,
    coordinator_identity,
    log_identity,
    read_public_key,
    read_secret,
    site_identity,
)
from tasks.train import TrainSettings, train_local

log = logging.getLogger("medfed.steps")


def step_log() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task (shown on the console and in the UI), else ours."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


@dataclass(frozen=True, kw_only=True)
class RoundContext:
    fed: FederationConfig
    job: str
    round: int

    def site(self, name: str) -> SiteConfig:
        for s in self.fed.sites:
            if s.name == name:
                return s
        raise StepError(f"site '{name}' is not in the federation")

    def site_paths(self, name: str) -> SitePaths:
        return SitePaths(root=self.fed.site_root / name)

    @property
    def coordinator(self) -> CoordinatorPaths:
        return CoordinatorPaths(root=self.fed.coordinator_root)

    def ledger(self) -> Ledger:
        return Ledger(self.fed.ledger_url)

    def key(self, site: str, step: str) -> str:
        return f"{self.job}/r{self.round}/{site}/{step}"

    def work(self, site: str) -> Path:
        return self.site_paths(site).work / self.job / f"r{self.round:04d}"


@dataclass(frozen=True, kw_only=True)
class DatasetRef:
    site: str
    path: Path
    fingerprint: str
    n_train: int
    n_test: int
    patients_train: int
    patients_test: int
    features: int
    cached: bool
    seconds: float


@dataclass(frozen=True, kw_only=True)
class TrainRef:
    site: str
    trained: bool
    n_samples: int
    base_model: str  # sha256 of the global model trained from
    path: Path | None = None
    sha256: str = ""
    epsilon: float = float("nan")  # cumulative after this round; NaN without DP
    reason: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class UpdateRef:
    site: str
    path: Path
    sha256: str
    norm: float
    n_samples: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class CipherRef:
    site: str
    path: Path
    sha256: str
    n_samples: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class UploadRef:
    site: str
    artifact: transport.ArtifactRef
    n_samples: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class AggregateRef:
    artifact: transport.ArtifactRef
    weights: dict[str, float]
    seconds: float


@dataclass(frozen=True, kw_only=True)
class EvalRef:
    site: str
    model_hash: str
    auc: float
    accuracy: float
    n: int
    seconds: float


# ---------------------------------------------------------------- small helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_array(path: Path, array: np.ndarray) -> str:
    """Atomically write a float32 vector as .npy; return the sha256 of its file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    data = buf.getvalue()
    _atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def load_array(path: Path, *, sha256: str | None = None) -> np.ndarray:
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StepError(f"site-private file {path} does not match its recorded hash")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_hash(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params, dtype=np.float32).tobytes()).hexdigest()


def recorded_output(rc: RoundContext, site: str, step: str, output: str, path: Path) -> str | None:
    """The hash a retried step must reproduce: None when the step was never recorded; the
    recorded hash when its output file is still there and intact. Recomputing instead would
    make the ledger's lineage disagree with the artifacts (CKKS encryption is randomized)."""
    prior = rc.ledger().events(idempotency_key=rc.key(site, step))
    if not prior:
        return None
    digest = prior[0]["outputs"][output]
    if not path.exists() or sha256_file(path) != digest:
        raise StepError(
            f"site {site}: {step} of round {rc.round} is already recorded, but its output {path} "
            "is missing or altered; restore it or start a new job"
        )
    return digest


def source_digest(site: SiteConfig) -> str:
    """Hash of the site's raw inputs, to know when the preprocessing cache is stale."""
    h = hashlib.sha256()
    root = site.data
    if not root.exists():
        raise StepError(f"site {site.name}: data location {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    if site.kind == SiteKind.DICOM:
        files.append(Path(site.labels))
    for p in files:
        try:
            h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        except OSError as exc:
            raise StepError(f"site {site.name}: data file {p} cannot be read") from exc
    return h.hexdigest()


def model_for(rc: RoundContext, features: int) -> nn.Module:
    m = rc.fed.model
    return models.build(str(m.kind), features=features, hidden=m.hidden)


def global_before(rc: RoundContext, site: str, features: int) -> np.ndarray:
    """The global model this round starts from, from the site's own copy."""
    paths = rc.site_paths(site)
    prev = paths.global_model(rc.job, rc.round - 1)
    if prev.exists():
        return load_array(prev)
    if rc.round != 1:
        raise StepError(f"site {site} has no global model of round {rc.round - 1} for job {rc.job}")
    m = rc.fed.model
    init = models.flat_params(
        models.initial(str(m.kind), seed=rc.fed.seed, features=features, hidden=m.hidden)
    )
    save_array(prev, init)
    return init


def release_history(ledger: Ledger, site: str) -> list[privacy.Release]:
    """Every DP release the site has made, in any job, read from the ledger."""
    history = []
    for ev in ledger.events(site=site):
        release = (ev.get("privacy") or {}).get("release")
        if ev.get("actor") == site and release and ev["outcome"] == str(Outcome.SUCCESS):
            history.append(privacy.Release(**release))
    return history


def noise_multiplier_for(rc: RoundContext, site: str, n_samples: int) -> float | None:
    dp = rc.fed.dp_for(site)
    if not dp.enabled:
        return None
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    one_round = privacy.planned_release(
        n_samples=n_samples,
        batch_size=rc.fed.batch_size,
        epochs=rc.fed.local_epochs,
        noise_multiplier=1.0,
    )
    site_level = privacy.site_level_release(dp.update_noise_multiplier)
    return privacy.calibrate_noise(
        target_epsilon=dp.target_epsilon,
        delta=dp.delta,
        sample_rate=one_round.sample_rate,
        steps=one_round.steps * rc.fed.rounds,
        accountant=str(dp.accountant),
        # The plan's site-level releases share the target with DP-SGD.
        alongside=(site_level,) * rc.fed.rounds if site_level else (),
    )


# ---------------------------------------------------------------- site steps


def prepared_cache_path(rc: RoundContext, site: str) -> Path:
    """Where the site keeps its prepared split: keyed by its raw inputs and prep settings."""
    cfg = rc.site(site)
    fed = rc.fed
    settings = {
        "kind": str(cfg.kind),
        "labels": cfg.labels,
        "id_column": cfg.id_column,
        "table": cfg.table,
        "image_size": fed.model.image_size,
        "holdout": fed.holdout_fraction,
        "seed": fed.seed,
    }
    digest = hashlib.sha256(
        (source_digest(cfg) + json.dumps(settings, sort_keys=True)).encode()
    ).hexdigest()
    return rc.site_paths(site).cache / f"prepared-{digest[:32]}.npz"


def preprocess(site: str, rc: RoundContext) -> DatasetRef:
    start = time.perf_counter()
    cfg = rc.site(site)
    paths = rc.site_paths(site)
    fed = rc.fed
    cache = prepared_cache_path(rc, site)
    cached = cache.exists()
    if cached:
        ds = ingest.load_prepared(cache)
    else:
        secret = read_secret(paths.pseudonym_secret, f"pseudonymization secret of site {site}")
        if cfg.kind == SiteKind.DICOM:
            ds = ingest.prepare_dicom_site(
                cfg.data,
                Path(cfg.labels),
                secret=secret,
                image_size=fed.model.image_size,
                holdout_fraction=fed.holdout_fraction,
                seed=fed.seed,
            )
        else:
            ds = ingest.prepare_tabular_site(
                cfg.data,
                label_column=cfg.labels,
                id_column=cfg.id_column,
                secret=secret,
                holdout_fraction=fed.holdout_fraction,
                seed=fed.seed,
                table=cfg.table,
            )
        paths.cache.mkdir(parents=True, exist_ok=True)
        ingest.save_prepared(ds, cache)
    step_log().info(
        "site %s: %s %d training and %d held-out %s (%d + %d patients)",
        site,
        "reused the prepared split:" if cached else "prepared",
        len(ds.y_train),
        len(ds.y_test),
        "images" if cfg.kind == SiteKind.DICOM else "rows",
        ds.n_patients_train,
        ds.n_patients_test,
    )
    ref = DatasetRef(
        site=site,
        path=cache,
        fingerprint=ds.fingerprint,
        n_train=len(ds.y_train),
        n_test=len(ds.y_test),
        patients_train=ds.n_patients_train,
        patients_test=ds.n_patients_test,
        features=int(ds.x_train.shape[1]) if ds.x_train.ndim == 2 else 0,
        cached=cached,
        seconds=time.perf_counter() - start,
    )
    rc.ledger().append(
        Event(
            actor=site,
            action=Action.PREPROCESS,
            job=rc.job,
            round=rc.round,
            site=site,
            idempotency_key=rc.key(site, "preprocess"),
            outputs={"dataset": ds.fingerprint},
            details={
                "kind": str(cfg.kind),
                "images_or_rows_train": ref.n_train,
                "images_or_rows_heldout": ref.n_test,
                "patients_train": ref.patients_train,
                "patients_heldout": ref.patients_test,
                "deidentified": True,
                "pseudonymization": "HMAC-SHA256 with a site secret",
                "cached": cached,
            },
        ),
        site_identity(site, paths),
    )
    return ref


def train(site: str, rc: RoundContext, data: DatasetRef) -> TrainRef:
    start = time.perf_counter()
    paths = rc.site_paths(site)
    ledger = rc.ledger()
    key = rc.key(site, "train")
    reused = _train_already_recorded(rc, ledger, site, data)
    if reused is not None:
        return reused
    dp = rc.fed.dp_for(site)
    base = global_before(rc, site, data.features)
    base_hash = model_hash(base)
    noise = noise_multiplier_for(rc, site, data.patients_train)  # the patient is the DP unit
    history = release_history(ledger, site)
    # Without DP the release has no epsilon bound; say so rather than record nothing.
    privacy_record: dict | None = {"dp": False, "epsilon": "unbounded"}
    epsilon_after = float("nan")  # stays NaN without any DP release: there is no epsilon
    planned = None
    if noise is not None:
        planned = privacy.planned_release(
            n_samples=data.patients_train,
            batch_size=rc.fed.batch_size,
            epochs=rc.fed.local_epochs,
            noise_multiplier=noise,
        )
    this_round = [r for r in (planned, privacy.site_level_release(dp.update_noise_multiplier)) if r]
    if this_round:
        epsilon_after = privacy.epsilon(
            history + this_round, delta=dp.delta, accountant=str(dp.accountant)
        )
        if rc.round == 1:
            projected = privacy.plan(
                history,
                this_round,
                rounds=rc.fed.rounds,
                delta=dp.delta,
                accountant=str(dp.accountant),
            )
            step_log().info(
                "site %s privacy plan: %d round(s) x %d step(s) at patient sample rate %.3f, noise "
                "%.3f -> cumulative epsilon by round: %s (budget %g, delta %g, %s)",
                site,
                rc.fed.rounds,
                planned.steps if planned else 0,
                planned.sample_rate if planned else 0.0,
                noise or 0.0,
                ", ".join(f"{e:.2f}" for e in projected),
                dp.epsilon_budget,
                dp.delta,
                dp.accountant,
            )
        if epsilon_after > dp.epsilon_budget:
            spent = privacy.epsilon(history, delta=dp.delta, accountant=str(dp.accountant))
            reason = (
                f"budget exhausted: this round would bring epsilon from {spent:.3f} to "
                f"{epsilon_after:.3f}, over the budget of {dp.epsilon_budget:g}"
            )
            ledger.append(
                Event(
                    actor=site,
                    action=Action.REFUSE,
                    outcome=Outcome.REFUSED,
                    job=rc.job,
                    round=rc.round,
                    site=site,
                    idempotency_key=key,
                    inputs={"dataset": data.fingerprint},
                    privacy={
                        "epsilon_spent": spent,
                        "epsilon_projected": epsilon_after,
                        "epsilon_budget": dp.epsilon_budget,
                        "delta": dp.delta,
                        "accountant": str(dp.accountant),
                    },
                    details={"reason": reason},
                ),
                site_identity(site, paths),
            )
            return TrainRef(
                site=site,
                trained=False,
                n_samples=data.n_train,
                base_model=base_hash,
                reason=reason,
                epsilon=spent,
            )
    step_log().info(
        "site %s: training round %d on %d samples for %d epoch(s)%s",
        site,
        rc.round,
        data.n_train,
        rc.fed.local_epochs,
        f", DP-SGD noise {noise:.3f}, epsilon after it {epsilon_after:.2f} of {dp.epsilon_budget:g}"
        if noise is not None
        else " without DP",
    )
    ds = ingest.load_prepared(data.path)
    model = models.load_flat(model_for(rc, data.features), base)
    outcome = train_local(
        model,
        ds.x_train,
        ds.y_train,
        groups=ds.groups_train,
        settings=TrainSettings(
            epochs=rc.fed.local_epochs,
            batch_size=rc.fed.batch_size,
            learning_rate=rc.fed.learning_rate,
            seed=rc.fed.seed * 1000 + rc.round,
            noise_multiplier=noise,
            max_grad_norm=dp.max_grad_norm,
        ),
    )
    if outcome.release is not None:
        if outcome.release != planned:
            raise StepError(f"site {site}: training made a different DP release than was budgeted")
        privacy_record = {
            "release": outcome.release.as_dict(),
            "epsilon_round": privacy.epsilon(
                [outcome.release], delta=dp.delta, accountant=str(dp.accountant)
            ),
            # After this release only; a site-level release, if any, follows in clip_and_noise.
            "epsilon_cumulative": epsilon_after
            if this_round == [planned]
            else privacy.epsilon(
                history + [outcome.release], delta=dp.delta, accountant=str(dp.accountant)
            ),
            "epsilon_budget": dp.epsilon_budget,
            "delta": dp.delta,
            "accountant": str(dp.accountant),
            "max_grad_norm": dp.max_grad_norm,
            "unit": "patient",
            "patients": outcome.n_patients,
            "max_images_per_patient": outcome.max_images_per_patient,
        }
    out = rc.work(site) / "local.npy"
    digest = save_array(out, outcome.params)
    ledger.append(
        Event(
            actor=site,
            action=Action.TRAIN,
            job=rc.job,
            round=rc.round,
            site=site,
            idempotency_key=key,
            inputs={"dataset": data.fingerprint, "global_model": base_hash},
            outputs={"local_model": digest},
            privacy=privacy_record,
            details={
                "samples": outcome.n_samples,
                "epochs": rc.fed.local_epochs,
                "mean_loss": outcome.mean_loss,
                "device": outcome.device,
                "dp": noise is not None,
            },
        ),
        site_identity(site, paths),
    )
    return TrainRef(
        site=site,
        trained=True,
        n_samples=outcome.n_samples,
        base_model=base_hash,
        path=out,
        sha256=digest,
        epsilon=epsilon_after,
        seconds=time.perf_counter() - start,
    )


def _train_already_recorded(
    rc: RoundContext, ledger: Ledger, site: str, data: DatasetRef
) -> TrainRef | None:
    """A retried round reuses the update it already released (and paid for)."""
    prior = ledger.events(idempotency_key=rc.key(site, "train"))
    if not prior:
        return None
    ev = prior[0]
    base = ev["inputs"].get("global_model", "")
    recorded = ev.get("privacy") or {}
    cumulative = recorded.get("epsilon_cumulative", recorded.get("epsilon_spent", float("nan")))
    if ev["action"] == str(Action.REFUSE):
        return TrainRef(
            site=site,
            trained=False,
            n_samples=data.n_train,
            base_model=base,
            reason=ev["details"]["reason"],
            epsilon=cumulative,
        )
    path = rc.work(site) / "local.npy"
    digest = recorded_output(rc, site, "train", "local_model", path)
    return TrainRef(
        site=site,
        trained=True,
        n_samples=ev["details"]["samples"],
        base_model=base,
        path=path,
        sha256=digest,
        epsilon=cumulative,
    )


def clip_and_noise(site: str, rc: RoundContext, trained: TrainRef) -> UpdateRef:
    start = time.perf_counter()
    dp = rc.fed.dp_for(site)
    path = rc.work(site) / "update.npy"
    reused = recorded_output(rc, site, "clip_and_noise", "update", path)
    if reused is not None:
        norm = rc.ledger().events(idempotency_key=rc.key(site, "clip_and_noise"))[0]["details"][
            "norm_before"
        ]
        return UpdateRef(
            site=site, path=path, sha256=reused, norm=norm, n_samples=trained.n_samples, seconds=0.0
        )
    local = load_array(trained.path, sha256=trained.sha256)
    base = load_array(rc.site_paths(site).global_model(rc.job, rc.round - 1))
    if model_hash(base) != trained.base_model:
        raise StepError(f"site {site}: the global model changed under round {rc.round}")
    clipped, norm = privacy.clip_update(local - base, max_norm=dp.update_clip_norm)
    noise_std = dp.update_noise_multiplier * dp.update_clip_norm
    release = privacy.site_level_release(dp.update_noise_multiplier)
    privacy_record = None
    if release is not None:
        clipped = clipped + privacy.gaussian_noise(
            clipped.size, std=noise_std, secure=dp.secure_rng
        )  # no seed: noise from a public seed could be subtracted
        history = release_history(rc.ledger(), site) + [release]
        privacy_record = {
            "release": release.as_dict(),
            "mechanism": "site-level Gaussian on the clipped update (sensitivity 2 x clip norm)",
            "epsilon_cumulative": privacy.epsilon(
                history, delta=dp.delta, accountant=str(dp.accountant)
            ),
            "epsilon_budget": dp.epsilon_budget,
            "delta": dp.delta,
            "accountant": str(dp.accountant),
        }
    digest = save_array(path, clipped)
    rc.ledger().append(
        Event(
            actor=site,
            action=Action.CLIP_AND_NOISE,
            job=rc.job,
            round=rc.round,
            site=site,
            idempotency_key=rc.key(site, "clip_and_noise"),
            inputs={"local_model": trained.sha256, "global_model": trained.base_model},
            outputs={"update": digest},
            privacy=privacy_record,
            details={
                "norm_before": norm,
                "clip_norm": dp.update_clip_norm,
                "clipped": norm > dp.update_clip_norm,
                "noise_std": noise_std,
                "secure_rng": dp.secure_rng,
            },
        ),
        site_identity(site, rc.site_paths(site)),
    )
    return UpdateRef(
        site=site,
        path=path,
        sha256=digest,
        norm=norm,
        n_samples=trained.n_samples,
        seconds=time.perf_counter() - start,
    )


def encrypt(site: str, rc: RoundContext, update: UpdateRef) -> CipherRef:
    start = time.perf_counter()
    paths = rc.site_paths(site)
    path = rc.work(site) / "update.ckks"
    reused = recorded_output(rc, site, "encrypt", "ciphertext", path)
    if reused is not None:
        return CipherRef(
            site=site, path=path, sha256=reused, n_samples=update.n_samples, seconds=0.0
        )
    vector = load_array(update.path, sha256=update.sha256)
    blob = secure_agg.encrypt_update(
        read_secret(paths.ckks_secret, f"CKKS context of site {site}"), vector
    )
    _atomic_write(path, blob)
    digest = hashlib.sha256(blob).hexdigest()
    rc.ledger().append(
        Event(
            actor=site,
            action=Action.ENCRYPT,
            job=rc.job,
            round=rc.round,
            site=site,
            idempotency_key=rc.key(site, "encrypt"),
            inputs={"update": update.sha256},
            outputs={"ciphertext": digest},
            details={"scheme": "CKKS", "parameters": len(vector), "ciphertext_bytes": len(blob)},
        ),
        site_identity(site, paths),
    )
    return CipherRef(
        site=site,
        path=path,
        sha256=digest,
        n_samples=update.n_samples,
        seconds=time.perf_counter() - start,
    )


def upload(site: str, rc: RoundContext, encrypted: CipherRef) -> UploadRef:
    start = time.perf_counter()
    data = encrypted.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != encrypted.sha256:
        raise StepError(f"site {site}: ciphertext {encrypted.path} changed after encryption")
    identity = site_identity(site, rc.site_paths(site))
    ref = transport.publish(
        rc.fed.artifact_store,
        f"{rc.job}/r{rc.round:04d}/{site}.ckks",
        data,
        job=rc.job,
        round=rc.round,
        site=site,
        kind="update",
        signer=identity,
    )
    rc.ledger().append(
        Event(
            actor=site,
            action=Action.UPLOAD,
            job=rc.job,
            round=rc.round,
            site=site,
            idempotency_key=rc.key(site, "upload"),
            recipient=COORDINATOR,
            inputs={"ciphertext": encrypted.sha256},
            outputs={"artifact": ref.sha256},
            details={"uri": ref.uri, "bytes": ref.size, "samples": encrypted.n_samples},
        ),
        identity,
    )
    return UploadRef(
        site=site, artifact=ref, n_samples=encrypted.n_samples, seconds=time.perf_counter() - start
    )


# ---------------------------------------------------------------- coordinator steps


def aggregation_weights(uploads: Sequence[UploadRef]) -> dict[str, float]:
    total = sum(u.n_samples for u in uploads)
    if total <= 0:
        raise StepError("no training samples behind the uploaded updates")
    return {u.site: u.n_samples / total for u in uploads}


def secure_aggregate(rc: RoundContext, uploads: Sequence[UploadRef]) -> AggregateRef:
    start = time.perf_counter()
    if len(uploads) < rc.fed.min_sites:
        raise StepError(
            f"round {rc.round}: {len(uploads)} updates, fewer than min_sites={rc.fed.min_sites}"
        )
    coord = rc.coordinator
    blobs = [
        transport.fetch(
            u.artifact,
            public_key=read_public_key(coord.site_public_key(u.site), f"site {u.site}"),
            job=rc.job,
            round=rc.round,
            kind="update",
            site=u.site,
        )
        for u in uploads
    ]
    weights = aggregation_weights(uploads)
    public_ctx = read_secret(coord.ckks_public, "CKKS public context")
    aggregate = secure_agg.weighted_sum(public_ctx, blobs, [weights[u.site] for u in uploads])
    identity = coordinator_identity(coord)
    ref = transport.publish(
        rc.fed.artifact_store,
        f"{rc.job}/r{rc.round:04d}/aggregate.ckks",
        aggregate,
        job=rc.job,
        round=rc.round,
        site=COORDINATOR,
        kind="aggregate",
        signer=identity,
    )
    rc.ledger().append(
        Event(
            actor=COORDINATOR,
            action=Action.SECURE_AGGREGATE,
            job=rc.job,
            round=rc.round,
            idempotency_key=rc.key(COORDINATOR, "secure_aggregate"),
            inputs={u.site: u.artifact.sha256 for u in uploads},
            outputs={"aggregate": ref.sha256},
            details={
                "weights": weights,
                "uri": ref.uri,
                "bytes": ref.size,
                "sites": sorted(weights),
            },
        ),
        identity,
    )
    return AggregateRef(artifact=ref, weights=weights, seconds=time.perf_counter() - start)


def evaluate(site: str, rc: RoundContext, data: DatasetRef, aggregate: AggregateRef) -> EvalRef:
    start = time.perf_counter()
    paths = rc.site_paths(site)
    blob = transport.fetch(
        aggregate.artifact,
        public_key=read_public_key(paths.coordinator_key, "the coordinator"),
        job=rc.job,
        round=rc.round,
        kind="aggregate",
    )
    mean_update = secure_agg.decrypt_update(
        read_secret(paths.ckks_secret, f"CKKS context of site {site}"), blob
    )
    base = global_before(rc, site, data.features)
    new_global = (base + mean_update).astype(np.float32)
    save_array(paths.global_model(rc.job, rc.round), new_global)
    version = model_hash(new_global)
    ds = ingest.load_prepared(data.path)
    model = models.load_flat(model_for(rc, data.features), new_global)
    m = metrics(predict(model, ds.x_test), ds.y_test)
    rc.ledger().append(
        Event(
            actor=site,
            action=Action.EVALUATE,
            job=rc.job,
            round=rc.round,
            site=site,
            idempotency_key=rc.key(site, "evaluate"),
            inputs={"aggregate": aggregate.artifact.sha256, "dataset": data.fingerprint},
            outputs={"global_model": version},
            details={"auc": m.auc, "accuracy": m.accuracy, "heldout": m.n},
        ),
        site_identity(site, paths),
    )
    return EvalRef(
        site=site,
        model_hash=version,
        auc=m.auc,
        accuracy=m.accuracy,
        n=m.n,
        seconds=time.perf_counter() - start,
    )


def commit_round(
    rc: RoundContext, trained: Sequence[TrainRef], evals: Sequence[EvalRef], aggregate: AggregateRef
) -> str:
    versions = {e.model_hash for e in evals}
    if len(versions) != 1:
        raise StepError(
            f"round {rc.round}: sites decrypted different global models ({len(versions)} versions)"
        )
    version = versions.pop()
    total = sum(e.n for e in evals)
    ledger = rc.ledger()
    ledger.append(
        Event(
            actor=COORDINATOR,
            action=Action.COMMIT_ROUND,
            job=rc.job,
            round=rc.round,
            idempotency_key=rc.key(COORDINATOR, "commit_round"),
            inputs={"aggregate": aggregate.artifact.sha256},
            outputs={"global_model": version},
            details={
                "participants": sorted(t.site for t in trained if t.trained),
                "refused": sorted(t.site for t in trained if not t.trained),
                "weighted_auc": sum(e.auc * e.n for e in evals) / total,
                "weighted_accuracy": sum(e.accuracy * e.n for e in evals) / total,
            },
        ),
        coordinator_identity(rc.coordinator),
    )
    # Publish a signed checkpoint of the whole log, proven consistent with the previous one.
    ledger.checkpoint(log_identity(rc.coordinator), origin=f"medfed.local/{rc.fed.name}")
    return version


# ---------------------------------------------------------------- Prefect tasks
# Thin wrappers. Nothing is cached or persisted by Prefect: results are references to
# site-private files, and the steps are idempotent through the ledger instead.

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)
preprocess_task = task(preprocess, name="preprocess", task_run_name="preprocess-{site}", **_TASK)
train_task = task(train, name="train", task_run_name="train-{site}", **_TASK)
clip_and_noise_task = task(
    clip_and_noise, name="clip_and_noise", task_run_name="clip_and_noise-{site}", **_TASK
)
encrypt_task = task(encrypt, name="encrypt", task_run_name="encrypt-{site}", **_TASK)
upload_task = task(
    upload, name="upload", task_run_name="upload-{site}", retries=2, retry_delay_seconds=1, **_TASK
)
secure_aggregate_task = task(
    secure_aggregate, name="secure_aggregate", retries=2, retry_delay_seconds=1, **_TASK
)
evaluate_task = task(evaluate, name="evaluate", task_run_name="evaluate-{site}", **_TASK)
commit_round_task = task(commit_round, name="commit_round", **_TASK)
