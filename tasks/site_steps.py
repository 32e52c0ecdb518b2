"""The site's steps, each recorded in the ledger under the site's own key.

Steps hand each other small frozen references (paths into the site's own root, hashes). Every
step's entry has the idempotency key `job/r<round>/<site>/<step>`, so a retried phase writes
nothing twice; `train` finds its entry first and reuses the released update instead of
training (and spending privacy budget) again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ledger.accounting import Metrics, Population
from ledger.entry import Action
from ledger.identities import COORDINATOR
from tasks import (
    IntegrityError,
    StepError,
    budget,
    models,
    prepared,
    privacy,
    secure_agg,
    transport,
)
from tasks.config import FederationConfig
from tasks.datasource import DataSource, source_for
from tasks.enrollment import open_sealed, seal
from tasks.files import atomic_write, load_array, model_hash, save_array, sha256_file
from tasks.masking import PairwiseMasks, mask_context
from tasks.messages import keys_job
from tasks.prepared import PreparedDataset
from tasks.quarantine import IngestReport, summary_of, write_site_report
from tasks.record import step_key
from tasks.site_run import SiteRun, step_log
from tasks.strategy import FedAvg

# ---------------------------------------------------------------- references between steps


@dataclass(frozen=True, kw_only=True)
class DatasetRef:
    path: Path
    fingerprint: str
    n_train: int
    n_test: int
    patients_train: int
    patients_test: int
    features: int
    cached: bool
    seconds: float
    ingest: dict[str, Any] | None = None  # DICOM: counts listed / ingested / quarantined


@dataclass(frozen=True, kw_only=True)
class TrainRef:
    trained: bool
    n_samples: int
    base_model: str  # sha256 of the global model trained from
    path: Path | None = None
    sha256: str = ""
    epsilon: float = float("nan")  # cumulative after this round; NaN without DP
    reservation: str = ""  # the ledger hold this update is charged to
    reason: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class FileRef:
    path: Path
    sha256: str
    seconds: float
    norm: float = float("nan")


# ---------------------------------------------------------------- steps


def data_source(run: SiteRun) -> DataSource:
    """The site's data under the plan's rules (feature schema, [images])."""
    cfg = run.site.settings
    return source_for(
        run.name, cfg.kind, cfg.data, features=run.fed.features, imaging=run.fed.images
    )


def prepared_cache_path(run: SiteRun) -> Path:
    """Where the site keeps its prepared split: keyed by raw inputs and prep settings."""
    source = data_source(run)
    settings = source.settings() | {
        "image_size": run.fed.model.image_size,
        "holdout": run.fed.holdout_fraction,
        "seed": run.fed.seed,
    }
    digest = hashlib.sha256(
        (source.digest() + json.dumps(settings, sort_keys=True)).encode()
    ).hexdigest()
    return run.site.cache / f"prepared-{digest[:32]}.npz"


def _summary_path(cache: Path) -> Path:
    return cache.with_suffix(".ingest.json")


def _ingest(run: SiteRun, cache: Path) -> tuple[PreparedDataset, dict[str, Any] | None]:
    """Prepare the split now; the site-local quarantine report is written before any stop."""

    def keep_report(report: IngestReport) -> Path:
        where = write_site_report(run.site.root, report)
        step_log().info("site %s: ingest: %s", run.name, report.describe())
        return where

    ds, report = data_source(run).prepare(
        secret=run.site.pseudonym_secret(),
        image_size=run.fed.model.image_size,
        holdout_fraction=run.fed.holdout_fraction,
        seed=run.fed.seed,
        on_report=keep_report,
    )
    summary = None if report is None else report.summary()
    if summary is not None:
        atomic_write(_summary_path(cache), json.dumps(summary, sort_keys=True).encode())
    prepared.save_prepared(ds, cache)  # last: a cache file means its summary is there too
    return ds, summary


def prepared_split(run: SiteRun) -> prepared.PreparedDataset:
    """The site's train/held-out split for this plan: cached, else prepared now (and cached)."""
    cache = prepared_cache_path(run)
    if cache.exists():
        return prepared.load_prepared(cache)
    return _ingest(run, cache)[0]


def preprocess(run: SiteRun) -> DatasetRef:
    """Ingest (or reuse the cached split); recorded once per job (round 0)."""
    start = time.perf_counter()
    cfg = run.site.settings
    cache = prepared_cache_path(run)
    cached = cache.exists()
    if cached:
        ds = prepared.load_prepared(cache)
        summary_file = _summary_path(cache)
        summary = (
            summary_of(json.loads(summary_file.read_text(encoding="utf-8")))
            if summary_file.exists()
            else None
        )
    else:
        ds, summary = _ingest(run, cache)
    unit = "images" if cfg.kind == "dicom" else "rows"
    step_log().info(
        "site %s: %s %d training and %d held-out %s (%d + %d patients)",
        run.name,
        "reused the prepared split:" if cached else "prepared",
        len(ds.y_train),
        len(ds.y_test),
        unit,
        ds.n_patients_train,
        ds.n_patients_test,
    )
    ref = DatasetRef(
        path=cache,
        fingerprint=ds.fingerprint,
        n_train=len(ds.y_train),
        n_test=len(ds.y_test),
        patients_train=ds.n_patients_train,
        patients_test=ds.n_patients_test,
        features=int(ds.x_train.shape[1]) if ds.x_train.ndim == 2 else 0,
        cached=cached,
        seconds=time.perf_counter() - start,
        ingest=summary,
    )
    rec = run.recorder(round_number=0)
    prior = rec.prior("preprocess")
    if prior is not None and prior["outputs"].get("dataset") != ds.fingerprint:
        raise StepError(
            f"site {run.name}: its data changed since job {run.job} prepared it; start a new job"
        )
    rec.record(
        Action.PREPROCESS,
        "preprocess",
        outputs={"dataset": ds.fingerprint},
        details={
            "kind": str(cfg.kind),
            "images_or_rows_train": ref.n_train,
            "images_or_rows_heldout": ref.n_test,
            "patients_train": ref.patients_train,
            "patients_heldout": ref.patients_test,
            "pseudonymization": "HMAC-SHA256 with a site secret",
            "cached": cached,
        }
        | _dicom_details(ref, cfg.data.accept_burned_in),
    )
    return ref


def _dicom_details(ref: DatasetRef, accept_burned_in: bool) -> dict[str, Any]:
    """What a DICOM site's preprocess entry adds: the ingest counts and the de-identification
    profile actually applied (which of its options were, and were not)."""
    if ref.ingest is None:
        return {}
    from tasks.deid import PROFILE

    return {
        "ingest": ref.ingest,
        "deidentification": PROFILE,
        "burned_in_annotation": "accepted by site policy" if accept_burned_in else "quarantined",
    }


# ---- the secure-aggregation key set


def publish_keys(run: SiteRun) -> dict[str, Any]:
    """Key holder only: create the scheme's key set here (once), publish its public context,
    and seal the secret context to every other site's X25519 key."""
    site, fed = run.site, run.fed
    params_file = site.keys_dir / "he.params.json"
    params = json.dumps(secure_agg.key_parameters(fed.secure_aggregation), sort_keys=True)
    if site.he_secret_path.exists():
        if params_file.exists() and params_file.read_text() != params:
            raise StepError(
                f"site {site.name}: its encryption key set was made for another scheme or "
                "other parameters; delete keys/he.secret to make a new one"
            )
        secret = site.he_secret_path.read_bytes()
    else:
        from ledger import keys as ledger_keys

        secret = secure_agg.create_secret(fed.secure_aggregation)
        ledger_keys.write_secret(site.he_secret_path, secret)
        ledger_keys.write_secret(params_file, params.encode())
    job = keys_job(fed.name)
    public = transport.publish(
        fed.artifact_store,
        f"{job}/he.public",
        secure_agg.public_of(fed.secure_aggregation, secret),
        job=job,
        round=0,
        site=site.name,
        kind="he_public",
        signer=site.identity,
    )
    sealed = {}
    for other in fed.sites:
        if other.name == site.name:
            continue
        blob = seal(
            secret,
            recipient_kex=bytes.fromhex(other.kex_key),
            federation=fed.name,
            recipient=other.name,
        )
        ref = transport.publish(
            fed.artifact_store,
            f"{job}/he.secret.{other.name}.sealed",
            blob,
            job=job,
            round=0,
            site=other.name,
            kind="he_secret_sealed",
            signer=site.identity,
        )
        sealed[other.name] = ref.model_dump(mode="json")
    return {"he_public": public.model_dump(mode="json"), "he_sealed": sealed}


def public_he(run: SiteRun) -> bytes:
    ref = run.instr.he_public
    if ref is None:
        raise StepError("the instruction names no public encryption context")
    return transport.fetch(
        ref,
        public_key=run.site_key(run.fed.keyholder),
        job=keys_job(run.fed.name),
        round=0,
        kind="he_public",
        site=run.fed.keyholder,
    )


def secret_he(run: SiteRun) -> bytes:
    """The encryption secret context: the key holder's own, or received sealed, kept here."""
    site = run.site
    if site.he_secret_path.exists():
        return site.he_secret_path.read_bytes()
    ref = run.instr.he_secret
    if ref is None:
        raise StepError(
            f"site {site.name} holds no encryption secret and the instruction names none"
        )
    blob = transport.fetch(
        ref,
        public_key=run.site_key(run.fed.keyholder),
        job=keys_job(run.fed.name),
        round=0,
        kind="he_secret_sealed",
        site=site.name,
    )
    secret = open_sealed(blob, kex=site.kex_key, federation=run.fed.name, recipient=site.name)
    from ledger import keys as ledger_keys

    ledger_keys.write_secret(site.he_secret_path, secret)
    return secret


# ---- the global model


def model_for(fed: FederationConfig, features: int) -> Any:
    return models.from_plan(fed.model, features=features)


def global_before(run: SiteRun, features: int) -> np.ndarray:
    """The global model this round starts from: the site's own copy when it matches the
    instruction's hash, else rebuilt from the seed and every aggregate since (a site that
    missed a round catches up)."""
    g = run.instr.global_model
    target_round = g.round if g is not None else run.round - 1
    path = run.site.global_model(run.job, target_round)
    if path.exists():
        params = load_array(path)
        if target_round == 0 or g is None or model_hash(params) == g.model_hash:
            return params
    params = models.flat_params(
        models.initial_from_plan(
            run.fed.model,
            seed=run.fed.seed,
            features=features,
            weights=run.site.settings.pretrained_weights,
        )
    )
    save_array(run.site.global_model(run.job, 0), params)
    if target_round == 0:
        return params
    if g is None or len(g.aggregates) != target_round:
        raise StepError(
            f"site {run.name} has no global model of round {target_round} and the instruction "
            "does not carry the aggregates to rebuild it"
        )
    backend = secure_agg.for_plan(run.fed, secret_he(run))
    strategy = FedAvg()
    for k, ref in enumerate(g.aggregates, start=1):
        blob = transport.fetch(
            ref, public_key=run.coordinator_key, job=run.job, round=k, kind="aggregate"
        )
        params = strategy.apply(params, backend.decrypt(blob))
        save_array(run.site.global_model(run.job, k), params)
    if model_hash(params) != g.model_hash:
        raise IntegrityError(
            f"site {run.name}: the rebuilt global model of round {target_round} does not match "
            "the committed one"
        )
    step_log().info("site %s rebuilt the global model of round %d", run.name, target_round)
    return params


# ---- train


def noise_multiplier_for(run: SiteRun) -> float | None:
    """The DP-SGD noise of this plan (None without DP): given, or calibrated to the target
    epsilon over the planned rounds from plan figures alone (never the cohort's size)."""
    dp = run.dp
    if not dp.enabled:
        return None
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    one_round = privacy.planned_release(
        sample_rate=dp.sample_rate, epochs=run.fed.local_epochs, noise_multiplier=1.0
    )
    site_level = privacy.site_level_release(dp.update_noise_multiplier)
    return privacy.calibrate_noise(
        target_epsilon=dp.target_epsilon,
        delta=dp.delta,
        sample_rate=one_round.sample_rate,
        steps=one_round.steps * run.fed.rounds,
        accountant=str(dp.accountant),
        # The plan's site-level releases share the target with DP-SGD.
        alongside=(site_level,) * run.fed.rounds if site_level else (),
    )


def round_releases(run: SiteRun) -> list[privacy.Release]:
    """What one round's update discloses, from the plan alone: the DP-SGD release and the
    optional site-level update noise (none without DP: the release is then unbounded)."""
    noise = noise_multiplier_for(run)
    if noise is None:
        return []
    dp_sgd = privacy.planned_release(
        sample_rate=run.dp.sample_rate, epochs=run.fed.local_epochs, noise_multiplier=noise
    )
    site_level = privacy.site_level_release(run.dp.update_noise_multiplier)
    return [dp_sgd, *([site_level] if site_level else [])]


def reserve_update(run: SiteRun, *, refusal_step: str) -> budget.Grant:
    """The budget check and hold for this round's update (reused on a retry)."""
    return budget.reserve(
        run,
        Population.TRAINING,
        round_releases(run),
        dp=run.dp.enabled,
        refusal_step=refusal_step,
    )


def recorded_output(run: SiteRun, step: str, output: str, path: Path) -> str | None:
    """The hash a retried step must reproduce: None when the step was never recorded; the
    recorded hash when its output file is still there and intact. Recomputing instead would
    make the ledger's lineage disagree with the artifacts (CKKS encryption is randomized)."""
    prior = run.recorder().prior(step)
    if prior is None:
        return None
    digest = prior["outputs"][output]
    if not path.exists() or sha256_file(path) != digest:
        raise StepError(
            f"site {run.name}: {step} of round {run.round} is already recorded, but its output "
            "is missing or altered; restore it or start a new job"
        )
    return digest


def train(run: SiteRun, data: DatasetRef) -> TrainRef:
    from tasks.train import TrainSettings, train_local

    start = time.perf_counter()
    reused = _train_already_recorded(run, data)
    if reused is not None:
        return reused
    dp, fed, rec = run.dp, run.fed, run.recorder()
    base = global_before(run, data.features)
    base_hash = model_hash(base)
    releases = round_releases(run)
    noise = releases[0].noise_multiplier if releases else None
    if run.round == 1 and releases:
        projected = privacy.plan(
            [], releases, rounds=fed.rounds, delta=dp.delta, accountant=str(dp.accountant)
        )
        step_log().info(
            "site %s privacy plan: %d round(s) x %d step(s) at patient sample rate %.3f, "
            "noise %.3f -> epsilon of this job by round: %s (delta %g, %s)",
            run.name,
            fed.rounds,
            releases[0].steps,
            releases[0].sample_rate,
            noise or 0.0,
            ", ".join(f"{e:.2f}" for e in projected),
            dp.delta,
            dp.accountant,
        )
    # The budget check and the hold on this round's epsilon: one ledger transaction.
    grant = reserve_update(run, refusal_step="train")
    if not grant.admitted:
        return TrainRef(
            trained=False,
            n_samples=data.n_train,
            base_model=base_hash,
            reason=grant.reason,
            epsilon=grant.spent,
        )
    step_log().info(
        "site %s: training round %d on %d samples for %d epoch(s)%s",
        run.name,
        run.round,
        data.n_train,
        fed.local_epochs,
        f", DP-SGD noise {noise:.3f}, epsilon after it {grant.projected:.2f} of {grant.budget:g}"
        if noise is not None
        else " without DP (the site's policy allows it; its epsilon is unbounded)",
    )
    ds = prepared.load_prepared(data.path)
    model = models.load_flat(model_for(fed, data.features), base)
    outcome = train_local(
        model,
        ds.x_train,
        ds.y_train,
        groups=ds.groups_train,
        settings=TrainSettings(
            epochs=fed.local_epochs,
            batch_size=fed.batch_size,
            learning_rate=fed.learning_rate,
            seed=fed.seed * 1000 + run.round,
            noise_multiplier=noise,
            sample_rate=dp.sample_rate,
            max_grad_norm=dp.max_grad_norm,
        ),
        device=run.site.settings.device,
        physical_batch_images=run.site.settings.physical_batch_images,
    )
    privacy_record: dict[str, Any] = {"dp": False, "epsilon": "unbounded"}
    if outcome.release is not None:
        if outcome.release != releases[0]:
            raise StepError(f"site {run.name}: training made a different DP release than budgeted")
        privacy_record = {
            "release": outcome.release.as_dict(),
            "epsilon_round": privacy.epsilon(
                [outcome.release], delta=budget.pinned_delta(run), accountant=str(dp.accountant)
            ),
            "max_grad_norm": dp.max_grad_norm,
            "unit": "patient",
        }
    privacy_record |= {
        "reservation": grant.key,
        # Over every counted release of the site, this round's (site-level noise included).
        "epsilon_cumulative": budget.as_figure(grant.projected),
        "epsilon_budget": grant.budget,
        "delta": budget.pinned_delta(run),
        "accountant": str(dp.accountant),
    }
    out = run.work() / "local.npy"
    digest = save_array(out, outcome.params)
    # No training loss or other figure of the training patients: only the DP release leaves.
    rec.record(
        Action.TRAIN,
        "train",
        inputs={"dataset": data.fingerprint, "global_model": base_hash},
        outputs={"local_model": digest},
        privacy=privacy_record,
        details={
            "samples": outcome.n_samples,
            "epochs": fed.local_epochs,
            "device": outcome.device,
            "dp": noise is not None,
        },
    )
    return TrainRef(
        trained=True,
        n_samples=outcome.n_samples,
        base_model=base_hash,
        path=out,
        sha256=digest,
        epsilon=grant.projected if noise is not None else float("nan"),
        reservation=grant.key,
        seconds=time.perf_counter() - start,
    )


def _train_already_recorded(run: SiteRun, data: DatasetRef) -> TrainRef | None:
    """A retried round reuses the update it already trained (and holds budget for)."""
    ev = run.recorder().prior("train")
    if ev is None:
        return None
    base = ev["inputs"].get("global_model", "")
    recorded = ev.get("privacy") or {}
    cumulative = recorded.get("epsilon_cumulative", recorded.get("epsilon_spent", float("nan")))
    cumulative = cumulative if isinstance(cumulative, float | int) else float("inf")
    if ev["action"] == str(Action.REFUSE):
        return TrainRef(
            trained=False,
            n_samples=data.n_train,
            base_model=base,
            reason=ev["details"]["reason"],
            epsilon=cumulative,
        )
    path = run.work() / "local.npy"
    digest = recorded_output(run, "train", "local_model", path)
    return TrainRef(
        trained=True,
        n_samples=ev["details"]["samples"],
        base_model=base,
        path=path,
        sha256=digest or "",
        epsilon=cumulative,
        reservation=str(recorded.get("reservation", "")),
    )


def clip_and_noise(run: SiteRun, trained: TrainRef) -> FileRef:
    start = time.perf_counter()
    dp = run.dp
    path = run.work() / "update.npy"
    reused = recorded_output(run, "clip_and_noise", "update", path)
    if reused is not None:
        return FileRef(path=path, sha256=reused, seconds=0.0)
    assert trained.path is not None
    local = load_array(trained.path, sha256=trained.sha256)
    base = load_array(run.site.global_model(run.job, run.round - 1))
    if model_hash(base) != trained.base_model:
        raise StepError(f"site {run.name}: the global model changed under round {run.round}")
    clipped, norm = privacy.clip_update(local - base, max_norm=dp.update_clip_norm)
    noise_std = dp.update_noise_multiplier * dp.update_clip_norm
    release = privacy.site_level_release(dp.update_noise_multiplier)
    privacy_record = None
    if release is not None:
        clipped = clipped + privacy.gaussian_noise(
            clipped.size, std=noise_std, secure=dp.secure_rng
        )  # no seed: noise from a public seed could be subtracted
        privacy_record = {
            "release": release.as_dict(),
            "mechanism": "site-level Gaussian on the clipped update (sensitivity 2 x clip norm)",
            "reservation": trained.reservation,  # charged there, with the DP-SGD release
            "delta": budget.pinned_delta(run),
            "accountant": str(dp.accountant),
        }
    digest = save_array(path, clipped)
    run.recorder().record(
        Action.CLIP_AND_NOISE,
        "clip_and_noise",
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
    )
    return FileRef(path=path, sha256=digest, norm=norm, seconds=time.perf_counter() - start)


def released_update(run: SiteRun) -> FileRef:
    """The clipped (and noised) update this round's train phase recorded, still intact."""
    path = run.work() / "update.npy"
    digest = recorded_output(run, "clip_and_noise", "update", path)
    if digest is None:
        raise StepError(f"site {run.name} has no clipped update of round {run.round} to upload")
    return FileRef(path=path, sha256=digest, seconds=0.0)


def attempt_step(run: SiteRun, step: str) -> str:
    """Each upload attempt is its own ledger step: `encrypt`, then `encrypt-a1`, ..."""
    return f"{step}-a{run.instr.attempt}" if run.instr.attempt else step


def cohort_weight(run: SiteRun) -> tuple[dict[str, int], float]:
    """The instruction's cohort, checked: the coordinator recorded the same one on the ledger
    (so it cannot show different cohorts to different sites without forking the ledger the
    sites witness), this site is in it with the samples it trained on, and it is large
    enough. Returns the cohort and this site's FedAvg weight in it."""
    cohort = run.instr.cohort
    if not cohort:
        raise StepError("the upload instruction names no cohort")
    key = step_key(run.job, run.round, COORDINATOR, f"cohort-a{run.instr.attempt}")
    recorded = run.ledger.events(idempotency_key=key, actor=COORDINATOR)
    if not recorded or recorded[0]["details"].get("cohort") != dict(sorted(cohort.items())):
        raise IntegrityError(
            f"the cohort of round {run.round} attempt {run.instr.attempt} in the instruction is "
            "not the one the coordinator recorded on the ledger"
        )
    trained = run.recorder().prior("train")
    samples = trained["details"].get("samples") if trained else None
    if cohort.get(run.name) != samples:
        raise IntegrityError(
            f"the cohort lists site {run.name} with {cohort.get(run.name)} samples; it trained "
            f"on {samples}"
        )
    weights = secure_agg.check_cohort(run.fed, cohort)
    return cohort, weights[run.name]


def pairwise_masks(run: SiteRun, cohort: dict[str, int]) -> PairwiseMasks:
    """This site's masks toward every other cohort member, from the X25519 keys the plan pins."""
    return PairwiseMasks(
        own=run.site.kex_key,
        own_name=run.name,
        peers={s: bytes.fromhex(run.fed.site(s).kex_key) for s in cohort if s != run.name},
        context=mask_context(
            federation=run.fed.name,
            job=run.job,
            round=run.round,
            attempt=run.instr.attempt,
            cohort=sorted(cohort),
        ),
    )


def encrypt(run: SiteRun, update: FileRef) -> FileRef:
    start = time.perf_counter()
    step = attempt_step(run, "encrypt")
    path = run.work() / f"{step}.he"
    cohort, weight = cohort_weight(run)
    reused = recorded_output(run, step, "ciphertext", path)
    if reused is not None:
        return FileRef(path=path, sha256=reused, seconds=0.0)
    vector = load_array(update.path, sha256=update.sha256)
    backend = secure_agg.for_plan(run.fed, public_he(run))
    blob = backend.encrypt(vector, weight=weight, masks=pairwise_masks(run, cohort))
    atomic_write(path, blob)
    digest = hashlib.sha256(blob).hexdigest()
    run.recorder().record(
        Action.ENCRYPT,
        step,
        inputs={"update": update.sha256},
        outputs={"ciphertext": digest},
        details={
            "scheme": str(backend.scheme),
            "cohort": sorted(cohort),
            "attempt": run.instr.attempt,
            "parameters": len(vector),
            "ciphertext_bytes": len(blob),
        },
    )
    return FileRef(path=path, sha256=digest, seconds=time.perf_counter() - start)


def upload(run: SiteRun, encrypted: FileRef) -> tuple[transport.ArtifactRef, float]:
    """The update leaves the site: only under a hold that still counts. The train step's hold
    may have lapsed (this is a retry after the round died): then the budget is checked and
    held again, and a refusal keeps the update here (`BudgetRefused`). Every attempt of a
    round is charged to the same hold: re-masking the same update releases nothing new."""
    start = time.perf_counter()
    data = encrypted.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != encrypted.sha256:
        raise StepError(f"site {run.name}: its ciphertext changed after encryption")
    grant = reserve_update(run, refusal_step="upload")
    if not grant.admitted:
        raise budget.BudgetRefused(grant.reason)
    step = attempt_step(run, "upload")
    ref = transport.publish(
        run.fed.artifact_store,
        f"{run.job}/r{run.round:04d}/{run.name}.{step}.he",
        data,
        job=run.job,
        round=run.round,
        site=run.name,
        kind="update",
        signer=run.site.identity,
    )
    run.recorder().record(
        Action.UPLOAD,
        step,
        recipient=COORDINATOR,
        inputs={"ciphertext": encrypted.sha256},
        outputs={"artifact": ref.sha256},
        # Names the hold this release is charged to: from now on it counts for good.
        details={
            "uri": ref.uri,
            "bytes": ref.size,
            "reservation": grant.key,
            "scheme": str(run.fed.secure_aggregation.scheme),
            "attempt": run.instr.attempt,
        },
    )
    return ref, time.perf_counter() - start


# ---- evaluate


def evaluate(run: SiteRun, data: DatasetRef) -> dict[str, Any]:
    """Decrypt the aggregate, apply it, and release held-out metrics as the site's policy
    says: noisy (a patient-level histogram under Gaussian noise, held and charged against the
    held-out patients' budget like any release), or exact (the policy says so; the entry
    too). A noisy release the budget refuses is withheld: the site still applies the model."""
    from tasks.evaluate import metrics, noisy_metrics, predict

    start = time.perf_counter()
    ref = run.instr.aggregate
    if ref is None:
        raise StepError("the evaluate instruction names no aggregate")
    blob = transport.fetch(
        ref, public_key=run.coordinator_key, job=run.job, round=run.round, kind="aggregate"
    )
    mean_update = secure_agg.for_plan(run.fed, secret_he(run)).decrypt(blob)
    base = global_before(run, data.features)
    new_global = FedAvg().apply(base, mean_update)
    save_array(run.site.global_model(run.job, run.round), new_global)
    version = model_hash(new_global)
    policy = run.site.settings.privacy
    released: dict[str, Any] = {"metrics": str(policy.metrics)}
    prior = run.recorder().prior("evaluate")
    if prior is not None:  # a retry: release nothing new, repeat what the ledger holds
        released = dict(prior["details"])
    elif policy.metrics == Metrics.EXACT:
        ds = prepared.load_prepared(data.path)
        model = models.load_flat(model_for(run.fed, data.features), new_global)
        m = metrics(predict(model, ds.x_test), ds.y_test)
        released |= {"auc": m.auc, "accuracy": m.accuracy, "heldout": m.n}
    else:
        release = privacy.metrics_release(policy.metrics_noise_multiplier)
        grant = budget.reserve(
            run, Population.HELDOUT, [release], dp=True, refusal_step="evaluate-refused"
        )
        if grant.admitted:
            ds = prepared.load_prepared(data.path)
            model = models.load_flat(model_for(run.fed, data.features), new_global)
            m = noisy_metrics(
                predict(model, ds.x_test),
                ds.y_test,
                groups=ds.groups_test,
                noise_multiplier=policy.metrics_noise_multiplier,
                secure=run.dp.secure_rng,
            )
            released |= {
                "auc": m.auc,
                "accuracy": m.accuracy,
                "heldout": m.n,
                "reservation": grant.key,
                "release": release.as_dict(),
                "epsilon_heldout": budget.as_figure(grant.projected),
            }
        else:
            released = {"metrics": "withheld", "reason": grant.reason}
    run.recorder().record(
        Action.EVALUATE,
        "evaluate",
        inputs={"aggregate": ref.sha256, "dataset": data.fingerprint},
        outputs={"global_model": version},
        details=released,
    )
    return {
        "model_hash": version,
        "auc": released.get("auc", float("nan")),
        "accuracy": released.get("accuracy", float("nan")),
        "heldout": released.get("heldout", 0),
        "metrics": released["metrics"],
        "seconds": {"evaluate": time.perf_counter() - start},
    }
