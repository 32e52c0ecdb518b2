"""The federation file: a TOML document validated by pydantic.

It lives in `tasks` (not `flows`) because the steps read their settings from it and `tasks`
never imports `flows`.

Relative paths in the file are resolved against the file's own directory, so a federation
folder can be moved as a whole.
"""

from __future__ import annotations

import math
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """The federation file is missing, unreadable or invalid; the message names the field."""


class SiteKind(StrEnum):
    DICOM = "dicom"
    TABULAR = "tabular"


class ModelKind(StrEnum):
    CNN = "cnn"
    MLP = "mlp"
    LOGISTIC = "logistic"


class Accountant(StrEnum):
    PRV = "prv"
    RDP = "rdp"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


class SiteConfig(_Strict):
    name: Slug
    kind: SiteKind
    data: Path
    # DICOM: the manifest CSV (file,label). Tabular: the label column.
    labels: str
    id_column: str = "patient_id"
    table: str | None = None
    # The site's own privacy policy, overriding [dp] for this site alone: its budget across
    # every job on this ledger, and the delta that epsilon is accounted at.
    epsilon_budget: float | None = Field(default=None, gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)


class ModelConfig(_Strict):
    kind: ModelKind = ModelKind.CNN
    image_size: int = Field(default=32, ge=8, le=512)
    # Hidden units of the head: `mlp` needs at least 1; `cnn` with 0 has a linear head.
    hidden: int = Field(default=32, ge=0, le=4096)

    @model_validator(mode="after")
    def _mlp_has_hidden_units(self) -> Self:
        if self.kind == ModelKind.MLP and self.hidden < 1:
            raise ValueError("model.hidden must be at least 1 for an mlp")
        return self


class DPConfig(_Strict):
    enabled: bool = True
    noise_multiplier: float | None = Field(default=None, gt=0)
    target_epsilon: float | None = Field(default=None, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    epsilon_budget: float = Field(default=10.0, gt=0)
    accountant: Accountant = Accountant.PRV
    # Bound on the L2 norm of each site's model update (clip_and_noise).
    update_clip_norm: float = Field(default=5.0, gt=0)
    # Optional site-level Gaussian noise on the clipped update, as a multiple of the clip norm.
    update_noise_multiplier: float = Field(default=0.0, ge=0)
    secure_rng: bool = False

    @model_validator(mode="after")
    def _one_noise_mode(self) -> Self:
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of dp.noise_multiplier or dp.target_epsilon")
        return self


class CKKSConfig(_Strict):
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    global_scale_bits: int = Field(default=40, ge=20, le=60)

    @field_validator("poly_modulus_degree")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 4096 or v > 32768 or v & (v - 1):
            raise ValueError("must be a power of two between 4096 and 32768")
        return v


class FederationConfig(_Strict):
    name: Slug = "federation"
    rounds: int = Field(default=3, ge=1, le=1000)
    local_epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, le=65536)
    learning_rate: float = Field(default=0.1, gt=0, le=10)
    holdout_fraction: float = Field(default=0.25, gt=0, lt=1)
    min_sites: int = Field(default=2, ge=1)
    seed: int = 0
    ledger_url: str = "sqlite:///ledger.db"
    artifact_store: str = "artifacts"
    # Where each site keeps its keys, caches and model copies (site-private).
    site_root: Path = Path("sites")
    coordinator_root: Path = Path("coordinator")
    model: ModelConfig = ModelConfig()
    dp: DPConfig = DPConfig(noise_multiplier=1.0)
    ckks: CKKSConfig = CKKSConfig()
    sites: tuple[SiteConfig, ...] = Field(min_length=1)

    @field_validator("learning_rate")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("site names must be unique")
        if self.min_sites > len(self.sites):
            raise ValueError(f"min_sites ({self.min_sites}) exceeds the {len(names)} sites listed")
        kinds = {s.kind for s in self.sites}
        if len(kinds) > 1:
            raise ValueError("all sites must be of one kind: they train one model")
        image_sites = SiteKind.DICOM in kinds
        if image_sites != (self.model.kind == ModelKind.CNN):
            raise ValueError(
                "model.kind 'cnn' is for dicom sites; tabular sites use 'mlp' or 'logistic'"
            )
        return self

    @property
    def site_kind(self) -> SiteKind:
        return self.sites[0].kind

    def dp_for(self, site: str) -> DPConfig:
        """The DP settings `site` trains under: [dp] with the site's own budget and delta."""
        cfg = next((s for s in self.sites if s.name == site), None)
        if cfg is None:
            raise ConfigError(f"site '{site}' is not in the federation")
        own = {"epsilon_budget": cfg.epsilon_budget, "delta": cfg.delta}
        return self.dp.model_copy(update={k: v for k, v in own.items() if v is not None})


def load_config(path: Path) -> FederationConfig:
    """Read and validate a federation file; raise ConfigError with one sentence on failure."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return parse_config(raw, base_dir=path.parent.resolve(), source=str(path))


def parse_config(raw: dict, *, base_dir: Path, source: str = "config") -> FederationConfig:
    try:
        cfg = FederationConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from exc
    return _resolve_paths(cfg, base_dir)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"field '{where}' is required"
    if err["type"] == "extra_forbidden":
        return f"field '{where}' is not a known setting"
    return f"field '{where}': {msg}"


def _resolve_paths(cfg: FederationConfig, base: Path) -> FederationConfig:
    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    sites = tuple(
        s.model_copy(
            update={
                "data": resolve(s.data),
                "labels": str(resolve(Path(s.labels))) if s.kind == SiteKind.DICOM else s.labels,
            }
        )
        for s in cfg.sites
    )
    ledger_url = cfg.ledger_url
    if ledger_url.startswith("sqlite:///") and not ledger_url.startswith("sqlite:////"):
        ledger_url = "sqlite:///" + str(resolve(Path(ledger_url.removeprefix("sqlite:///"))))
    store = cfg.artifact_store
    if "://" not in store:
        store = resolve(Path(store)).as_uri()
    return cfg.model_copy(
        update={
            "sites": sites,
            "ledger_url": ledger_url,
            "artifact_store": store,
            "site_root": resolve(cfg.site_root),
            "coordinator_root": resolve(cfg.coordinator_root),
        }
    )
