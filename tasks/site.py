"""A site's own root, set up at the hospital: `site.toml`, its keys, and what it approved.

```
SITE_ROOT/
  site.toml              data location and labels, privacy policy, what the site accepts
  enrollment.json        public material only, self-signed: sent to the coordinator
  keys/identity.pem      Ed25519 identity (0600)     never leaves the site
  keys/kex.pem           X25519 key (0600): opens the sealed encryption secret; pairwise masks
  keys/pseudonym.key     pseudonymization secret (0600)
  keys/he.secret         encryption secret context (0600): made here (key holder) or sealed
  approved/<digest>.json the training plans the site approved (Fed-BioMed style)
  witness/<log>.checkpoint the ledger checkpoint this site cosigned last (it is a witness)
  cache/ work/ models/   prepared data, intermediate files, global model copies
```

Relative paths in `site.toml` are relative to the site root.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ledger import keys
from ledger.accounting import Metrics
from tasks import StepError
from tasks.config import ConfigError, ModelKind, SiteKind, Slug, _first_error, plan_digest

PSEUDONYM_SECRET_BYTES = 32
SITE_FILE = "site.toml"
ENROLLMENT_FILE = "enrollment.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(_Strict):
    path: Path
    # DICOM: the manifest CSV (file,label). Tabular: the label column.
    labels: str
    id_column: str = "patient_id"
    table: str | None = None
    # DICOM: train on images whose BurnedInAnnotation is YES, or missing where text is commonly
    # burned in (US, secondary capture). Off, they are quarantined: burned-in text can be PHI.
    accept_burned_in: bool = False


class PrivacyPolicy(_Strict):
    """The site's own privacy policy, across every job on the ledger. It is recorded in the
    ledger (a `policy` entry) whenever it changes; the budget check always uses the delta
    recorded there, so changing it is a change anyone reading the ledger sees. The
    federation's [dp] budget applies only where it is stricter."""

    epsilon_budget: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1, allow_inf_nan=False)
    # Release a model update trained WITHOUT DP (a plan with [dp] enabled = false). Off, such
    # a round is refused; on, the release is recorded and the site's epsilon is unbounded
    # from then on, for every later check.
    allow_non_dp: bool = False
    # Held-out metrics leave the site "noisy" (Gaussian noise on a patient-level histogram,
    # accounted against the budget for held-out patients) or "exact" (no DP for held-out
    # patients; the ledger and `medfed ledger spend` say so).
    metrics: Metrics = Metrics.NOISY
    metrics_noise_multiplier: float = Field(default=4.0, gt=0, allow_inf_nan=False)


class Accepts(_Strict):
    """What the site agrees to run: checked on every instruction before any data is read."""

    federation: Slug
    coordinator_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_kinds: tuple[ModelKind, ...] = Field(min_length=1)
    purposes: tuple[str, ...] = ("HRESCH",)


class SiteSettings(_Strict):
    name: Slug
    kind: SiteKind
    data: DataSettings
    privacy: PrivacyPolicy = PrivacyPolicy()
    accepts: Accepts
    # Torch device this site trains on ("cpu", "cuda", "cuda:1"); default: CUDA when present.
    device: str | None = Field(default=None, pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    # With DP: the most images one forward/backward pass holds. A step's sampled patients are
    # split into passes of whole patients (one step, one noise draw: the release is the same),
    # so a large logical batch fits the device's memory. None: one pass per step.
    physical_batch_images: int | None = Field(default=None, ge=1)
    # The site's copy of the pretrained weights a plan names by hash ([model] weights_sha256).
    pretrained_weights: Path | None = None


@dataclass(frozen=True)
class Site:
    """A loaded site root: settings with absolute paths, and where its files live."""

    root: Path
    settings: SiteSettings

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def identity_path(self) -> Path:
        return self.keys_dir / "identity.pem"

    @property
    def kex_path(self) -> Path:
        return self.keys_dir / "kex.pem"

    @property
    def pseudonym_path(self) -> Path:
        return self.keys_dir / "pseudonym.key"

    @property
    def he_secret_path(self) -> Path:
        return self.keys_dir / "he.secret"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def work(self, job: str, round_number: int) -> Path:
        """Site-private intermediate files: local models, plaintext updates, ciphertexts."""
        return self.root / "work" / job / f"r{round_number:04d}"

    def global_model(self, job: str, round_number: int) -> Path:
        return self.root / "models" / job / f"global-r{round_number:04d}.npy"

    def witness_path(self, origin: str, vkey: str) -> Path:
        """Where the site keeps the checkpoint of the log (origin, key) it cosigned last."""
        digest = hashlib.sha256(f"{origin}\n{vkey}".encode()).hexdigest()[:16]
        return self.root / "witness" / f"{digest}.checkpoint"

    def approved_plan_path(self, digest: str) -> Path:
        return self.root / "approved" / f"{digest}.json"

    @cached_property
    def identity(self) -> keys.Identity:
        return _load_key(lambda: keys.load(self.name, self.identity_path), self.identity_path)

    @cached_property
    def kex_key(self) -> X25519PrivateKey:
        from tasks.enrollment import load_kex

        return _load_key(lambda: load_kex(self.kex_path), self.kex_path)

    def pseudonym_secret(self) -> bytes:
        try:
            return self.pseudonym_path.read_bytes()
        except OSError as exc:
            raise StepError(f"site {self.name}: pseudonymization secret cannot be read") from exc

    def approved(self, digest: str) -> dict[str, Any] | None:
        path = self.approved_plan_path(digest)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StepError(f"site {self.name}: approved plan {digest[:12]} is unreadable") from exc

    def latest_approved(self) -> dict[str, Any] | None:
        folder = self.root / "approved"
        plans = (
            sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
            if folder.is_dir()
            else []
        )
        for path in reversed(plans):
            plan = self.approved(path.stem)
            if plan is not None:
                return plan
        return None


def _load_key(load: Any, path: Path) -> Any:
    try:
        return load()
    except Exception as exc:  # LedgerError or OSError: the key file is missing or damaged
        raise StepError(
            f"site key file {path.name} cannot be read; run 'medfed site init'"
        ) from exc


def load_site(root: Path) -> Site:
    """Read and validate `root/site.toml`; one sentence naming the field on failure."""
    root = Path(root).resolve()
    path = root / SITE_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path} does not exist: is {root} a site root ('medfed site init')?"
        ) from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as TOML: {exc}") from exc
    try:
        settings = SiteSettings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc)}") from exc
    data = settings.data
    resolved = data.model_copy(
        update={
            "path": _under(root, data.path),
            "labels": str(_under(root, Path(data.labels)))
            if settings.kind == SiteKind.DICOM
            else data.labels,
        }
    )
    weights = settings.pretrained_weights
    return Site(
        root=root,
        settings=settings.model_copy(
            update={"data": resolved, "pretrained_weights": weights and _under(root, weights)}
        ),
    )


def _under(root: Path, p: Path) -> Path:
    return p if p.is_absolute() else (root / p).resolve()


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def site_toml_text(
    *,
    name: str,
    kind: SiteKind,
    data: str,
    labels: str,
    federation: str,
    coordinator_key: str,
    model_kinds: list[str],
    purposes: list[str],
    epsilon_budget: float,
    delta: float,
    id_column: str = "patient_id",
    table: str | None = None,
    metrics: str = "noisy",
    allow_non_dp: bool = False,
) -> str:
    lines = [
        "# medfed site: written by `medfed site init`; this file never leaves the site.",
        f"name = {_toml_str(name)}",
        f"kind = {_toml_str(str(kind))}",
        "",
        "[data]",
        f"path = {_toml_str(data)}",
        f"labels = {_toml_str(labels)}",
        f"id_column = {_toml_str(id_column)}",
    ]
    if table:
        lines.append(f"table = {_toml_str(table)}")
    lines += [
        "",
        "[privacy]  # this site's own policy, across every job on the ledger",
        f"epsilon_budget = {epsilon_budget!r}",
        f"delta = {delta!r}",
        "# true: release updates trained without DP (recorded; epsilon unbounded from then on)",
        f"allow_non_dp = {str(allow_non_dp).lower()}",
        '# held-out metrics leave the site "noisy" (accounted) or "exact" (no DP for them)',
        f"metrics = {_toml_str(metrics)}",
        "",
        "[accepts]  # checked on every instruction before any data is read",
        f"federation = {_toml_str(federation)}",
        f"coordinator_key = {_toml_str(coordinator_key)}",
        f"model_kinds = {json.dumps(model_kinds)}",
        f"purposes = {json.dumps(purposes)}",
        "",
    ]
    return "\n".join(lines)


def init_site(root: Path, *, settings_text: str) -> Site:
    """Create a site root: site.toml, its keys (0600, created here), its enrollment file.

    Refuses a folder that already holds a site.toml; keys already present are kept."""
    root = Path(root).resolve()
    if (root / SITE_FILE).exists():
        raise ConfigError(f"{root} is already a site root (it has a {SITE_FILE})")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{SITE_FILE}.new"
    tmp.write_text(settings_text, encoding="utf-8")
    try:
        SiteSettings.model_validate(tomllib.loads(settings_text))
    except (ValidationError, tomllib.TOMLDecodeError) as exc:
        tmp.unlink()
        detail = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise ConfigError(f"site settings: {detail}") from exc
    os.replace(tmp, root / SITE_FILE)
    site = load_site(root)
    keys.load_or_create(site.name, site.identity_path)
    from tasks.enrollment import load_or_create_kex, write_enrollment

    load_or_create_kex(site.kex_path)
    if not site.pseudonym_path.exists():
        keys.write_secret(site.pseudonym_path, os.urandom(PSEUDONYM_SECRET_BYTES))
    write_enrollment(site)
    return site


def approve_plan(site: Site, plan: dict[str, Any]) -> str:
    """Record that the site approves `plan` (after its IT reviewed it); return its digest."""
    acc = site.settings.accepts
    if plan.get("name") != acc.federation:
        raise ConfigError(
            f"site {site.name} accepts federation '{acc.federation}', not '{plan.get('name')}'"
        )
    digest = plan_digest(plan)
    keys.write_secret(
        site.approved_plan_path(digest), json.dumps(plan, indent=2, sort_keys=True).encode()
    )
    return digest
