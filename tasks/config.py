"""The federation file: the coordinator's TOML document, validated by pydantic.

It names the sites and their public keys (from their enrollment files), never a data path or a
site secret: those live in each site's own `site.toml` (`tasks.site`). What the sites are asked
to run is the file's *plan* (`FederationConfig.plan`): every setting that shapes training and
privacy, without the coordinator's local paths; sites approve a plan by its digest.

Relative paths in the file are resolved against the file's own directory, so a federation
folder can be moved as a whole.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import rfc8785
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ledger.identities import Roster, roster_from_mapping
from tasks import StepError
from tasks.schema import Feature, check_schema


class ConfigError(StepError):
    """The federation file is missing, unreadable or invalid; the message names the field."""


class SiteKind(StrEnum):
    DICOM = "dicom"
    TABULAR = "tabular"


class ModelKind(StrEnum):
    CNN = "cnn"
    MONAI = "monai"  # a network from monai.networks.nets (tasks.networks)
    MLP = "mlp"
    LOGISTIC = "logistic"


class Accountant(StrEnum):
    PRV = "prv"
    RDP = "rdp"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


HexKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class SiteEntry(_Strict):
    """A site as the coordinator knows it: a name and public keys, from its enrollment."""

    name: Slug
    kind: SiteKind
    public_key: HexKey  # Ed25519: signs the site's ledger entries, reports and artifacts
    kex_key: HexKey  # X25519: receives the sealed encryption secret; agrees pairwise masks


class Identities(_Strict):
    """Who may write what on the ledger, pinned here (and, through the plan, approved by every
    site): the coordinator's Ed25519 key, the log's checkpoint key (a C2SP vkey) and,
    optionally, the DPO's key (the only one that may erase). The sites' keys are `[[sites]]`."""

    coordinator: HexKey
    log: str = Field(min_length=1)
    dpo: HexKey | None = None

    @field_validator("log")
    @classmethod
    def _vkey(cls, v: str) -> str:
        from ledger import LedgerError
        from ledger.note import parse_vkey

        try:
            parse_vkey(v)
        except LedgerError as exc:
            raise ValueError(f"is not a C2SP verifier key ({exc})") from exc
        return v


JSONValue = str | int | float | bool | list[Any] | dict[str, Any]


class ModelConfig(_Strict):
    kind: ModelKind = ModelKind.CNN
    image_size: int = Field(default=32, ge=8, le=512)
    # Hidden units of the head: `mlp` needs at least 1; `cnn` with 0 has a linear head.
    hidden: int = Field(default=32, ge=0, le=4096)
    # kind "monai": which network (tasks.networks.NETWORKS), its dimensions, and keyword
    # options passed through to its MONAI constructor (e.g. { widen_factor = 0.5 }).
    network: Literal["DenseNet121", "ResNet18", "ResNet34", "BasicUNetEncoder"] | None = None
    spatial_dims: Literal[2, 3] = 2
    in_channels: int = Field(default=1, ge=1, le=16)
    out_channels: int = Field(default=1, ge=1, le=1000)
    options: dict[str, JSONValue] = {}
    # Start from pretrained weights instead of the seed: the SHA-256 of a torch state dict
    # every site holds locally (site.toml `pretrained_weights`). Nothing is downloaded.
    weights_sha256: HexKey | None = None

    @model_validator(mode="after")
    def _kind_settings(self) -> Self:
        if self.kind == ModelKind.MLP and self.hidden < 1:
            raise ValueError("model.hidden must be at least 1 for an mlp")
        if self.kind != ModelKind.MONAI:
            if self.network is not None or self.options or self.weights_sha256 is not None:
                raise ValueError("model.network, options and weights_sha256 are for kind 'monai'")
            return self
        if self.network is None:
            raise ValueError("model.network is required for kind 'monai'")
        if self.out_channels != 1:
            raise ValueError("model.out_channels must be 1: medfed trains binary classifiers")
        if self.in_channels != 1:
            raise ValueError("model.in_channels must be 1: ingest makes single-channel images")
        if self.spatial_dims != 2:
            raise ValueError(
                "model.spatial_dims must be 2: ingest makes 2-D frames (volumes are not "
                "assembled yet)"
            )
        return self


class Window(_Strict):
    """A fixed, public intensity window in modality units (CT: Hounsfield units)."""

    center: float = Field(allow_inf_nan=False)
    width: float = Field(gt=0, allow_inf_nan=False)


class ImagingConfig(_Strict):
    """How DICOM files become training images (`[images]`); every site applies the same rules.

    Intensities: the modality LUT (rescale slope/intercept) first, PixelPaddingValue masked,
    then a modality's fixed `windows` entry, or, for a modality without one, the per-image
    percentile window `percentiles`, mapped to [0, 1]. Shape: the frame is padded to a square
    (aspect ratio kept) -- or, with `field_of_view_mm`, cropped/padded to that physical square
    using PixelSpacing -- then resized to model.image_size."""

    # Modalities (0008,0060) that are training images; anything else is quarantined.
    modalities: tuple[str, ...] = ("CT", "MR", "CR", "DX", "MG", "US", "PT", "NM", "XA", "RF")
    # CT default: a soft-tissue window (center 40 HU, width 400 HU).
    windows: dict[str, Window] = {"CT": Window(center=40.0, width=400.0)}
    percentiles: tuple[float, float] = (0.5, 99.5)
    field_of_view_mm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # Colour images: "luma" (ITU-R BT.601 luma of the RGB image) or "quarantine".
    colour: Literal["luma", "quarantine"] = "luma"
    # Multi-frame images: "split" into frames of the same patient, or "quarantine".
    multiframe: Literal["split", "quarantine"] = "split"
    max_frames: int = Field(default=256, ge=1, le=4096)
    # A site stops when more than this share of its listed files is quarantined.
    max_quarantined_fraction: float = Field(default=0.5, ge=0, le=1, allow_inf_nan=False)

    @field_validator("modalities")
    @classmethod
    def _upper(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must list at least one modality")
        return tuple(m.strip().upper() for m in v)

    @field_validator("windows")
    @classmethod
    def _window_keys(cls, v: dict[str, Window]) -> dict[str, Window]:
        return {k.strip().upper(): w for k, w in v.items()}

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        low, high = v
        if not (0 <= low < high <= 100):
            raise ValueError("must be two percentiles with 0 <= low < high <= 100")
        return v


class DPConfig(_Strict):
    # Every figure must be finite (allow_inf_nan=False): an infinite budget cannot be accounted.
    enabled: bool = True
    noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    target_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_grad_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    # Probability that a patient joins a DP-SGD step (Poisson sampling); steps per epoch are
    # ceil(1 / sample_rate). A plan figure, never derived from a cohort's size: neighbouring
    # cohorts must run the same mechanism for the add/remove-one-patient bound to hold.
    sample_rate: float = Field(default=0.25, gt=0, le=1, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1, allow_inf_nan=False)
    epsilon_budget: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    accountant: Accountant = Accountant.PRV
    # Bound on the L2 norm of each site's model update (clip_and_noise).
    update_clip_norm: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    # Optional site-level Gaussian noise on the clipped update, as a multiple of the clip norm.
    update_noise_multiplier: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    secure_rng: bool = False

    @model_validator(mode="after")
    def _one_noise_mode(self) -> Self:
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of dp.noise_multiplier or dp.target_epsilon")
        return self


class Scheme(StrEnum):
    # Pairwise-masked, quantized updates under BFV: nobody reads one site's update, not even
    # a site together with the coordinator (tasks.masking, tasks.bfv).
    MASKED_BFV = "masked-bfv"
    # One CKKS key set shared by all sites: any site can decrypt any update (tasks.ckks).
    CKKS = "ckks"


class BFVConfig(_Strict):
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (36, 36)
    plain_modulus: int = Field(default=1073153, gt=2)
    # Each site's weighted update in 2^(bits-1) steps per clamp bound (tasks.masking).
    quantization_bits: int = Field(default=18, ge=2, le=30)

    @field_validator("poly_modulus_degree")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 1024 or v > 32768 or v & (v - 1):
            raise ValueError("must be a power of two between 1024 and 32768")
        return v

    @model_validator(mode="after")
    def _batching(self) -> Self:
        if self.plain_modulus % (2 * self.poly_modulus_degree) != 1:
            raise ValueError(
                f"plain_modulus must be a prime equal to 1 modulo 2 x poly_modulus_degree "
                f"({2 * self.poly_modulus_degree}) for batching"
            )
        if 2 ** (self.quantization_bits - 1) >= self.plain_modulus // 4:
            raise ValueError(
                "quantization_bits leaves no headroom below plain_modulus: a sum could wrap"
            )
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


class SecureAggregationConfig(_Strict):
    scheme: Scheme = Scheme.MASKED_BFV
    # The site that creates the shared encryption key set (default: the first site listed).
    # It seals the secret to each other site's X25519 key; the coordinator receives the
    # public context only.
    keyholder: Slug | None = None
    bfv: BFVConfig = BFVConfig()
    ckks: CKKSConfig = CKKSConfig()  # the parameters of scheme "ckks"


class FederationConfig(_Strict):
    name: Slug = "federation"
    rounds: int = Field(default=3, ge=1, le=1000)
    local_epochs: int = Field(default=1, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    learning_rate: float = Field(default=0.1, gt=0, le=10)
    holdout_fraction: float = Field(default=0.25, gt=0, lt=1, allow_inf_nan=False)
    min_sites: int = Field(default=2, ge=1)
    seed: int = 0
    ledger_url: str = "sqlite:///ledger.db"
    artifact_store: str = "artifacts"
    # HL7 PurposeOfUse and the legal basis every entry of this federation's jobs states; a site
    # accepts only the purposes its policy lists.
    purpose: str = "HRESCH"
    legal_basis: str = "GDPR Art. 9(2)(j)"
    # How long the coordinator waits for one site's phase before dropping it from the round.
    site_timeout_seconds: float = Field(default=900.0, gt=0, le=7 * 24 * 3600)
    coordinator_root: Path = Path("coordinator")
    model: ModelConfig = ModelConfig()
    images: ImagingConfig = ImagingConfig()
    dp: DPConfig = DPConfig(noise_multiplier=1.0)
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    # Written by `medfed register` from the coordinator's root; required to run a job.
    identities: Identities | None = None
    # Tabular federations only: the declared feature schema, `[[features]]` (tasks.schema).
    features: tuple[Feature, ...] = ()
    sites: tuple[SiteEntry, ...] = Field(min_length=1)

    @field_validator("learning_rate")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @field_validator("features")
    @classmethod
    def _schema(cls, v: tuple[Feature, ...]) -> tuple[Feature, ...]:
        check_schema(v)
        return v

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("site names must be unique")
        kinds = {s.kind for s in self.sites}
        if len(kinds) > 1:
            raise ValueError("all sites must be of one kind: they train one model")
        image_sites = SiteKind.DICOM in kinds
        if image_sites != (self.model.kind in (ModelKind.CNN, ModelKind.MONAI)):
            raise ValueError(
                "model.kind 'cnn' and 'monai' are for dicom sites; tabular sites use 'mlp' or "
                "'logistic'"
            )
        keys = [s.public_key for s in self.sites] + [s.kex_key for s in self.sites]
        if len(set(keys)) != len(keys):
            raise ValueError("every site needs its own public keys (two sites share one)")
        holder = self.secure_aggregation.keyholder
        if holder is not None and holder not in names:
            raise ValueError(f"secure_aggregation.keyholder '{holder}' is not a listed site")
        bfv = self.secure_aggregation.bfv
        if 2 ** (bfv.quantization_bits - 1) + len(self.sites) >= bfv.plain_modulus // 2:
            raise ValueError(
                f"{len(self.sites)} sites with {bfv.quantization_bits}-bit quantization could "
                f"wrap plain_modulus {bfv.plain_modulus}: use fewer bits or a larger modulus"
            )
        return self

    @model_validator(mode="after")
    def _schema_fits_kind(self) -> Self:
        # Public constants, approved with the plan, replace any statistic of a site's data.
        if self.site_kind == SiteKind.TABULAR and not self.features:
            raise ValueError(
                "a tabular federation must declare its feature schema in [[features]] "
                "(each column's name, type, and bounds or categories)"
            )
        if self.site_kind == SiteKind.DICOM and self.features:
            raise ValueError("[[features]] is for tabular federations; dicom sites take none")
        return self

    @property
    def site_kind(self) -> SiteKind:
        return self.sites[0].kind

    @property
    def keyholder(self) -> str:
        return self.secure_aggregation.keyholder or self.sites[0].name

    def check_runnable(self) -> None:
        """What a job needs beyond a valid file (sites are registered one at a time)."""
        if self.min_sites > len(self.sites):
            raise ConfigError(
                f"min_sites ({self.min_sites}) exceeds the {len(self.sites)} sites listed"
            )
        if self.identities is None:
            raise ConfigError(
                "the federation file pins no [identities] (coordinator and log keys): "
                "'medfed register' writes them"
            )

    def roster(self) -> Roster | None:
        """The enrolled identities every ledger read and write of this federation is held
        to; None while the file pins none."""
        if self.identities is None:
            return None
        return roster_from_mapping(self.plan(), source="the federation's identities")

    @property
    def log_origin(self) -> str:
        """The origin line of this federation's ledger checkpoints."""
        return f"medfed.local/{self.name}"

    def site(self, name: str) -> SiteEntry:
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(f"site '{name}' is not in the federation")

    def plan(self) -> dict[str, Any]:
        """What the sites are asked to run and approve: everything but the coordinator's own
        paths and timeouts. Its digest (`plan_digest`) pins a job to it."""
        return self.model_dump(
            mode="json", exclude={"coordinator_root", "site_timeout_seconds"}
        ) | {
            "secure_aggregation": self.secure_aggregation.model_dump(mode="json")
            | {"keyholder": self.keyholder}
        }


def plan_digest(plan: dict[str, Any]) -> str:
    """SHA-256 of a plan's RFC 8785 canonical JSON."""
    return hashlib.sha256(rfc8785.dumps(plan)).hexdigest()


def plan_from_dict(plan: dict[str, Any]) -> FederationConfig:
    """A plan received in an instruction, validated as a federation (paths already absolute)."""
    try:
        return FederationConfig.model_validate(plan)
    except ValidationError as exc:
        raise ConfigError(f"training plan: {_first_error(exc)}") from exc


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

    ledger_url = cfg.ledger_url
    if ledger_url.startswith("sqlite:///") and not ledger_url.startswith("sqlite:////"):
        ledger_url = "sqlite:///" + str(resolve(Path(ledger_url.removeprefix("sqlite:///"))))
    store = cfg.artifact_store
    if "://" not in store:
        store = resolve(Path(store)).as_uri()
    return cfg.model_copy(
        update={
            "ledger_url": ledger_url,
            "artifact_store": store,
            "coordinator_root": resolve(cfg.coordinator_root),
        }
    )
