"""Synthetic demo data: DICOM cohorts for three hospitals and EHR-like tables.

Everything the demo trains on is generated here, deterministically under a seed, so the demo
needs no downloads. The DICOM files are real (file meta, CT Image Storage, MONOCHROME2,
16-bit unsigned pixels with a modality rescale) and carry realistic identifying tags on
purpose: de-identification in :mod:`tasks.ingest` must remove them before anything else
happens.

Every writer builds its output under a temporary name beside the target and renames it into
place at the end, so an interrupted run never leaves a half-written cohort behind.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tasks import StepError
from tasks.schema import Feature, check_schema

MANIFEST_NAME = "manifest.csv"
MANIFEST_HEADER = ("file", "label")
IMAGE_NAME_FORMAT = "img_{:05d}.dcm"
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "MEDFED SYNTHETIC"
IMPLEMENTATION_CLASS_UID = "2.25.229911864419227455328209183127519532473"
UINT16_MAX = 65535

TABULAR_FEATURES = (
    "age",
    "sex",
    "bmi",
    "systolic_bp",
    "glucose",
    "hba1c",
    "cholesterol",
    "smoking",
    "on_statin",
)
TABULAR_ID_COLUMN = "patient_id"
TABULAR_LABEL_COLUMN = "outcome"
# The federation's declared schema for these tables: public bounds and categories, chosen
# from clinical ranges, never from the generated data.
TABULAR_SCHEMA_TOML = """
[[features]]
name = "age"
type = "numeric"
min = 18
max = 100
missing = "error"
[[features]]
name = "sex"
type = "categorical"
categories = ["male", "female"]
[[features]]
name = "bmi"
type = "numeric"
min = 15
max = 50
[[features]]
name = "systolic_bp"
type = "numeric"
min = 80
max = 200
[[features]]
name = "glucose"
type = "numeric"
min = 50
max = 300
[[features]]
name = "hba1c"
type = "numeric"
min = 4
max = 14
fill = 5.5
[[features]]
name = "cholesterol"
type = "numeric"
min = 100
max = 350
[[features]]
name = "smoking"
type = "categorical"
categories = ["never", "former", "current"]
[[features]]
name = "on_statin"
type = "boolean"
"""

_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_FIRST_NAMES = (
    "JANE",
    "JOHN",
    "MARIA",
    "AHMED",
    "WEI",
    "OLGA",
    "PEDRO",
    "AMARA",
    "LIAM",
    "SOFIA",
    "KENJI",
    "FATIMA",
    "NOAH",
    "INGRID",
    "RAVI",
    "CHLOE",
    "MATEO",
    "AISHA",
    "ERIK",
    "LUCIA",
)
_LAST_NAMES = (
    "DOE",
    "SMITH",
    "GARCIA",
    "KHAN",
    "CHEN",
    "IVANOVA",
    "SILVA",
    "OKAFOR",
    "MURPHY",
    "ROSSI",
    "TANAKA",
    "HADDAD",
    "MILLER",
    "LARSEN",
    "PATEL",
    "MARTIN",
    "LOPEZ",
    "BELLO",
    "NILSSON",
    "MORENO",
)
_STREETS = ("Oak St", "Maple Ave", "High St", "Church Rd", "Station Rd", "Elm Ct", "Mill Ln")
_CITIES = ("Springfield", "Riverton", "Lakeview", "Fairmont", "Ashford", "Brookdale")


@dataclass(frozen=True, kw_only=True)
class SiteProfile:
    """How one hospital's scanner, population and case mix look.

    Intensities (``base_intensity``, ``noise_std``, ``texture_std``, ``lesion_contrast``) are
    in the modality's output units (Hounsfield units for CT); the stored pixels are
    ``(value - rescale_intercept) / rescale_slope`` so that the modality LUT recovers them.
    ``lesion_radius`` is a fraction of the image side. ``missed_lesion_rate`` is the share of
    images showing a lesion whose recorded label says none, as when a report misses a finding:
    real labels are noisy, and a model trained without DP memorises such patients (which the
    membership-inference audit then detects).
    """

    name: str
    institution_name: str
    institution_address: str
    manufacturer: str
    model_name: str
    station_name: str
    mrn_prefix: str
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    kvp: float
    rescale_slope: float
    rescale_intercept: float
    base_intensity: float
    noise_std: float
    texture_std: float
    bias_field: float
    lesion_contrast: float
    bone_contrast: float
    lesion_radius: tuple[float, float]
    positive_fraction: float
    n_patients: int
    images_per_patient: tuple[int, int]
    image_size: int
    missed_lesion_rate: float = 0.0

    def __post_init__(self) -> None:
        if not _SLUG.fullmatch(self.name):
            raise StepError(f"Site profile name {self.name!r} is not a lowercase slug.")
        if not 0.0 < self.positive_fraction < 1.0:
            raise StepError(f"Site profile {self.name}: positive_fraction must be in (0, 1).")
        if not 0.0 <= self.missed_lesion_rate < 1.0:
            raise StepError(f"Site profile {self.name}: missed_lesion_rate must be in [0, 1).")
        if self.n_patients < 2:
            raise StepError(f"Site profile {self.name}: n_patients must be at least 2.")
        low, high = self.images_per_patient
        if not 1 <= low <= high:
            raise StepError(f"Site profile {self.name}: images_per_patient must be 1 <= lo <= hi.")
        if not 16 <= self.image_size <= 1024:
            raise StepError(f"Site profile {self.name}: image_size must be in [16, 1024].")
        if self.rescale_slope <= 0.0:
            raise StepError(f"Site profile {self.name}: rescale_slope must be positive.")
        r_low, r_high = self.lesion_radius
        if not 0.0 < r_low <= r_high < 0.5:
            raise StepError(f"Site profile {self.name}: lesion_radius must be in (0, 0.5).")
        if min(self.noise_std, self.texture_std, self.lesion_contrast, self.bone_contrast) < 0:
            raise StepError(f"Site profile {self.name}: intensities must be non-negative.")
        if min(self.pixel_spacing) <= 0.0:
            raise StepError(f"Site profile {self.name}: pixel_spacing must be positive.")
        if len(self.mrn_prefix) != 3 or not self.mrn_prefix.isalpha():
            raise StepError(f"Site profile {self.name}: mrn_prefix must be three letters.")
        span = 6.0 * (self.noise_std + self.texture_std) + abs(self.bias_field)
        span += 1.5 * self.bone_contrast
        lowest = (self.base_intensity - span - self.rescale_intercept) / self.rescale_slope
        highest = (
            self.base_intensity + span + self.lesion_contrast - self.rescale_intercept
        ) / self.rescale_slope
        if lowest < 0.0 or highest > UINT16_MAX:
            raise StepError(
                f"Site profile {self.name}: intensities do not fit 16-bit unsigned pixels "
                "under its rescale slope and intercept."
            )


DEMO_SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="st-mary",
        institution_name="St. Mary's General Hospital",
        institution_address="12 Church Rd, Riverton",
        manufacturer="GE MEDICAL SYSTEMS",
        model_name="LightSpeed VCT",
        station_name="SMGH-CT01",
        mrn_prefix="SMH",
        pixel_spacing=(0.703125, 0.703125),
        slice_thickness=2.5,
        kvp=120.0,
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        base_intensity=40.0,
        noise_std=14.0,
        texture_std=10.0,
        bias_field=12.0,
        lesion_contrast=55.0,
        bone_contrast=16.0,
        lesion_radius=(0.08, 0.14),
        positive_fraction=0.3,
        n_patients=300,
        images_per_patient=(3, 5),
        image_size=64,
        missed_lesion_rate=0.3,
    ),
    SiteProfile(
        name="northfield",
        institution_name="Northfield University Medical Center",
        institution_address="400 University Ave, Fairmont",
        manufacturer="SIEMENS",
        model_name="SOMATOM Force",
        station_name="NUMC-CT3",
        mrn_prefix="NFU",
        pixel_spacing=(0.48828125, 0.48828125),
        slice_thickness=1.0,
        kvp=100.0,
        rescale_slope=0.5,
        rescale_intercept=-2048.0,
        base_intensity=65.0,
        noise_std=22.0,
        texture_std=14.0,
        bias_field=20.0,
        lesion_contrast=80.0,
        bone_contrast=24.0,
        lesion_radius=(0.07, 0.13),
        positive_fraction=0.5,
        n_patients=250,
        images_per_patient=(3, 5),
        image_size=96,
        missed_lesion_rate=0.3,
    ),
    SiteProfile(
        name="lakeside",
        institution_name="Lakeside Community Hospital",
        institution_address="7 Shore Dr, Lakeview",
        manufacturer="Philips",
        model_name="Ingenuity CT",
        station_name="LCH-CT-A",
        mrn_prefix="LCH",
        pixel_spacing=(0.9765625, 0.9765625),
        slice_thickness=3.0,
        kvp=120.0,
        rescale_slope=2.0,
        rescale_intercept=-1000.0,
        base_intensity=30.0,
        noise_std=9.0,
        texture_std=7.0,
        bias_field=8.0,
        lesion_contrast=38.0,
        bone_contrast=12.0,
        lesion_radius=(0.08, 0.15),
        positive_fraction=0.4,
        n_patients=400,
        images_per_patient=(3, 5),
        image_size=64,
        missed_lesion_rate=0.3,
    ),
)


# ---------------------------------------------------------------------------------------------
# Pure generators: randomness comes in as a Generator, arrays come out.


def _rng(seed: int, *labels: str) -> np.random.Generator:
    """A generator for one purpose, derived from the seed and stable text labels."""
    digest = hashlib.sha256("\x1f".join(labels).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "big")])


def _smooth_field(rng: np.random.Generator, size: int, *, cutoff: float) -> np.ndarray:
    """Unit-variance low-frequency random field (white noise low-passed in Fourier space)."""
    freq = np.fft.fftfreq(size)
    radius2 = freq[:, None] ** 2 + freq[None, :] ** 2
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-radius2 / (2 * cutoff**2))
    field = np.fft.ifft2(spectrum).real
    return (field - field.mean()) / (field.std() + 1e-12)


def _lesion(rng: np.random.Generator, size: int, radius: tuple[float, float]) -> np.ndarray:
    """A roughly round blob with soft edges, peak about 1, at a random position."""
    r = rng.uniform(*radius) * size
    cy, cx = rng.uniform(r + 2.0, size - r - 2.0, size=2)
    ry, rx = r * rng.uniform(0.85, 1.15, size=2)
    theta = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    dist = np.sqrt(u**2 + v**2)
    blob = 1.0 / (1.0 + np.exp((dist - 1.0) / 0.15))
    return blob * (1.0 + 0.1 * _smooth_field(rng, size, cutoff=0.15))


def _bone_arc(rng: np.random.Generator, size: int) -> np.ndarray:
    """A rib-like bright arc crossing the image near one side, peak about 1."""
    angle = rng.uniform(0.0, 2 * np.pi)
    radius = size * rng.uniform(0.7, 1.1)
    reach = radius + size * rng.uniform(0.15, 0.35)  # centre distance: the arc enters the image
    cy = (size - 1) / 2 + reach * np.sin(angle)
    cx = (size - 1) / 2 + reach * np.cos(angle)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dist = np.hypot(yy - cy, xx - cx) - radius
    thickness = size * rng.uniform(0.025, 0.05)
    return np.exp(-((dist / thickness) ** 2))


def synthetic_image(
    profile: SiteProfile, rng: np.random.Generator, *, lesion: bool, patient_offset: float
) -> np.ndarray:
    """One slice in modality units (float64, image_size x image_size)."""
    size = profile.image_size
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    angle = rng.uniform(0.0, 2 * np.pi)
    image = (
        profile.base_intensity
        + patient_offset
        + profile.bias_field * (np.cos(angle) * xx + np.sin(angle) * yy)
        + profile.texture_std * _smooth_field(rng, size, cutoff=0.04)
        + profile.noise_std * rng.standard_normal((size, size))
    )
    image += profile.bone_contrast * rng.uniform(0.5, 1.5) * _bone_arc(rng, size)
    if lesion:
        image += profile.lesion_contrast * _lesion(rng, size, profile.lesion_radius)
    return image


def to_stored(profile: SiteProfile, values: np.ndarray) -> np.ndarray:
    """Invert the modality rescale: stored = (value - intercept) / slope, as uint16."""
    stored = np.rint((values - profile.rescale_intercept) / profile.rescale_slope)
    return np.clip(stored, 0, UINT16_MAX).astype(np.uint16)


@dataclass(frozen=True, kw_only=True)
class _Patient:
    mrn: str
    other_id: str
    name: str
    birth_date: dt.date
    sex: str
    address: str
    referring: str
    offset: float


def _patients(profile: SiteProfile, rng: np.random.Generator) -> list[_Patient]:
    numbers = rng.choice(9_000_000, size=profile.n_patients, replace=False) + 1_000_000
    patients = []
    for number in numbers:
        age_days = int(rng.integers(25 * 365, 90 * 365))
        patients.append(
            _Patient(
                mrn=f"{profile.mrn_prefix}{int(number):07d}",
                other_id=f"INS-{int(rng.integers(10**8, 10**9))}",
                name=f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}",
                birth_date=dt.date(2023, 1, 1) - dt.timedelta(days=age_days),
                sex=str(rng.choice(["F", "M"])),
                address=(
                    f"{int(rng.integers(1, 999))} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}"
                ),
                referring=f"DR {rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}",
                offset=float(rng.normal(0.0, 0.3 * profile.noise_std)),
            )
        )
    return patients


def _uid(*parts: str) -> str:
    """A deterministic ``2.25.`` UID (PS3.5 B.2) derived from the parts' hash.

    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and returns a
    random UUID, so it cannot give reproducible cohorts.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _dicom_dataset(
    profile: SiteProfile,
    patient: _Patient,
    stored: np.ndarray,
    *,
    seed: int,
    study: int,
    instance: int,
    study_time: dt.datetime,
) -> Dataset:
    uid_root = ("medfed-synthetic", str(seed), profile.name, patient.mrn)
    study_uid = _uid(*uid_root, "study", str(study))
    series_uid = _uid(*uid_root, "series", str(study))
    frame_uid = _uid(*uid_root, "frame", str(study))
    sop_uid = _uid(*uid_root, "sop", str(study), str(instance))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = "MEDFED_SYNTH_1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_time.strftime(
        "%Y%m%d"
    )
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time.strftime(
        "%H%M%S"
    )
    ds.AccessionNumber = f"A{profile.mrn_prefix}{study_time:%y%m%d}{study:04d}"
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution_name
    ds.InstitutionAddress = profile.institution_address
    ds.ReferringPhysicianName = patient.referring
    ds.StationName = profile.station_name
    ds.StudyDescription = "CT CHEST WITH CONTRAST"
    ds.SeriesDescription = "AXIAL 2D"
    ds.OperatorsName = "TECH^ANON"
    ds.ManufacturerModelName = profile.model_name
    ds.PatientName = patient.name
    ds.PatientID = patient.mrn
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.OtherPatientIDs = patient.other_id
    ds.PatientAge = f"{(study_time.date() - patient.birth_date).days // 365:03d}Y"
    ds.PatientAddress = patient.address
    ds.SliceThickness = profile.slice_thickness
    ds.KVP = profile.kvp
    ds.DeviceSerialNumber = f"SN{hashlib.sha256(profile.name.encode()).hexdigest()[:8]}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{study:04d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(-instance * profile.slice_thickness)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = list(profile.pixel_spacing)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.RescaleIntercept = profile.rescale_intercept
    ds.RescaleSlope = profile.rescale_slope
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", f"{patient.mrn}|{patient.name}")
    return ds


# ---------------------------------------------------------------------------------------------
# Writers: temp path beside the target, rename at the end.


@contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A temporary directory beside ``target``; removed unless the caller renamed it away."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_dicom_cohort(profile: SiteProfile, out_dir: Path, *, seed: int) -> Path:
    """Write one hospital's DICOM files and ``manifest.csv`` (``file,label``) to ``out_dir``.

    ``out_dir`` must not exist yet (or be empty); the cohort appears there all at once.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise StepError(f"Cohort directory {out_dir} already exists and is not empty.")
    rng = _rng(seed, "dicom-cohort", profile.name)
    patients = _patients(profile, rng)
    low, high = profile.images_per_patient
    counts = rng.integers(low, high + 1, size=len(patients))
    n_images = int(counts.sum())
    labels = np.zeros(n_images, dtype=np.int64)
    labels[: round(profile.positive_fraction * n_images)] = 1
    labels = rng.permutation(labels)
    # Recorded labels: a separate stream, so the images do not depend on the miss rate.
    miss_draw = _rng(seed, "missed-lesions", profile.name).random(n_images)
    missed = miss_draw < profile.missed_lesion_rate
    recorded = np.where(missed, 0, labels)

    rows: list[tuple[str, int]] = []
    with _staging_dir(out_dir) as staging:
        index = 0
        for study, (patient, count) in enumerate(zip(patients, counts, strict=True)):
            study_time = dt.datetime(2019, 1, 1, 7, 0) + dt.timedelta(
                days=int(rng.integers(0, 4 * 365)), minutes=int(rng.integers(0, 12 * 60))
            )
            for instance in range(1, int(count) + 1):
                label = int(labels[index])
                values = synthetic_image(
                    profile, rng, lesion=bool(label), patient_offset=patient.offset
                )
                ds = _dicom_dataset(
                    profile,
                    patient,
                    to_stored(profile, values),
                    seed=seed,
                    study=study,
                    instance=instance,
                    study_time=study_time,
                )
                name = IMAGE_NAME_FORMAT.format(index)
                ds.save_as(staging / name, enforce_file_format=True)
                rows.append((name, int(recorded[index])))
                index += 1
        (staging / MANIFEST_NAME).write_text(_csv_text(MANIFEST_HEADER, rows), encoding="utf-8")
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked above; rename cannot replace a directory otherwise
        staging.rename(out_dir)
    return out_dir


def tabular_schema() -> tuple[Feature, ...]:
    """:data:`TABULAR_SCHEMA_TOML`, validated as a federation file validates it."""
    features = TypeAdapter(tuple[Feature, ...]).validate_python(
        tomllib.loads(TABULAR_SCHEMA_TOML)["features"]
    )
    check_schema(features)
    return features


def _maybe(rng: np.random.Generator, text: str, *, missing: float, blank: str = "") -> str:
    """``text``, or (with probability ``missing``) a blank cell as extracts write them."""
    return blank if rng.random() < missing else text


def _id_spelling(rng: np.random.Generator, mrn: int) -> str:
    """One patient's ID as a visit's row spells it: mostly canonical, sometimes lower case or
    padded with spaces (leading zeros kept: they are part of the ID)."""
    canonical = f"MRN{mrn:07d}"
    u = rng.random()
    if u < 0.15:
        return canonical.lower()
    if u < 0.25:
        return f" {canonical} "
    return canonical


def _sex_text(rng: np.random.Generator, male: bool) -> str:
    u = rng.random()
    if u < 0.02:
        return ""
    if u < 0.04:
        return "Unknown"  # not a declared category: the "other" slot
    text = "Male" if male else "Female"
    return text.upper() if u < 0.15 else text


def _visit_row(
    rng: np.random.Generator, mrn: int, patient: dict[str, float], visit: int, shift: float
) -> tuple[object, ...]:
    age = patient["age"] + (visit - 1) * rng.uniform(0.5, 1.5)
    bmi = patient["bmi"] + rng.normal(0.0, 0.6)
    sbp = 100.0 + 0.45 * age + 0.7 * (bmi - 27.0) + rng.normal(0.0, 12.0)
    glucose = 90.0 + 1.6 * (bmi - 27.0) + rng.gamma(2.0, 8.0) + rng.normal(0.0, 8.0)
    hba1c = 3.0 + 0.03 * glucose + rng.normal(0.0, 0.35)
    chol = 190.0 + 0.4 * (age - 55.0) + rng.normal(0.0, 32.0)
    smoking = ("never", "former", "current")[int(patient["smoking"])]
    logit = (
        -1.1
        + 0.4 * shift
        + 0.065 * (age - 56.0)
        + 0.10 * (bmi - 27.5)
        + 0.035 * (sbp - 125.0)
        + 0.9 * (hba1c - 6.0)
        + 0.010 * (chol - 190.0)
        + (0.0, 1.5, 3.0)[int(patient["smoking"])]
        + 1.0 * patient["male"]
        - 1.2 * patient["statin"]
        + patient["frailty"]
    )
    outcome = int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
    return (
        _id_spelling(rng, mrn),
        f"{age:.1f}",
        _sex_text(rng, bool(patient["male"])),
        _maybe(rng, f"{bmi:.1f}", missing=0.04),
        _maybe(rng, f"{sbp:.0f}", missing=0.03),
        _maybe(rng, f"{glucose:.0f}", missing=0.03, blank="NA"),
        _maybe(rng, f"{hba1c:.1f}", missing=0.10),
        _maybe(rng, f"{chol:.0f}", missing=0.06, blank="NA"),
        _maybe(rng, smoking.capitalize() if rng.random() < 0.5 else smoking, missing=0.05),
        _maybe(rng, "TRUE" if patient["statin"] else "FALSE", missing=0.03),
        outcome,
    )


def tabular_rows(
    *, n_patients: int, seed: int, shift: float = 0.0
) -> tuple[tuple[str, ...], list[tuple[object, ...]]]:
    """Visit rows of an EHR extract (header, rows), as real ones look: string categoricals
    (sex Male/Female, smoking never/former/current in mixed case), booleans TRUE/FALSE, empty
    and NA cells, and 1-3 visits per patient whose ID is spelled differently across visits.
    The outcome follows a logistic model of the visit (learnable through the schema)."""
    if n_patients < 2:
        raise StepError("A tabular cohort needs n_patients of at least 2.")
    rng = _rng(seed, "tabular-cohort", repr(float(shift)))
    mrns = rng.choice(9_999_999, size=n_patients, replace=False) + 1
    rows: list[tuple[object, ...]] = []
    for mrn in mrns:
        patient = {
            "age": float(np.clip(rng.normal(56.0 + 6.0 * shift, 12.0), 18.0, 95.0)),
            "male": float(rng.random() < 0.5),
            "smoking": float(rng.choice(3, p=(0.55, 0.25, 0.20))),
            "statin": float(rng.random() < 0.3),
            "bmi": float(rng.normal(27.5 + 1.5 * shift, 4.5)),
            "frailty": float(rng.normal(0.0, 0.4)),
        }
        for visit in range(1, int(rng.integers(1, 4)) + 1):
            rows.append(_visit_row(rng, int(mrn), patient, visit, shift))
    header = (TABULAR_ID_COLUMN, *TABULAR_FEATURES, TABULAR_LABEL_COLUMN)
    return header, rows


def write_tabular_cohort(path: Path, *, n_patients: int, seed: int, shift: float = 0.0) -> Path:
    """Write an EHR-extract-like CSV (see :func:`tabular_rows`) atomically; its federation
    declares :data:`TABULAR_SCHEMA_TOML`."""
    header, rows = tabular_rows(n_patients=n_patients, seed=seed, shift=shift)
    path = Path(path)
    _atomic_write_text(path, _csv_text(header, rows))
    return path


def ensure_demo_cohorts(root: Path, *, seed: int) -> dict[str, Path]:
    """Generate ``root/<site>/`` for each of :data:`DEMO_SITES` unless already complete."""
    root = Path(root)
    cohorts: dict[str, Path] = {}
    for profile in DEMO_SITES:
        out_dir = root / profile.name
        if not (out_dir / MANIFEST_NAME).is_file():
            try:
                write_dicom_cohort(profile, out_dir, seed=seed)
            except (StepError, OSError):
                # Another process may have renamed the same cohort into place first.
                if not (out_dir / MANIFEST_NAME).is_file():
                    raise
        cohorts[profile.name] = out_dir
    return cohorts


__all__ = [
    "DEMO_SITES",
    "MANIFEST_NAME",
    "SiteProfile",
    "TABULAR_FEATURES",
    "TABULAR_ID_COLUMN",
    "TABULAR_LABEL_COLUMN",
    "TABULAR_SCHEMA_TOML",
    "ensure_demo_cohorts",
    "synthetic_image",
    "tabular_rows",
    "tabular_schema",
    "to_stored",
    "write_dicom_cohort",
    "write_tabular_cohort",
]
