"""What runs at a hospital before training: read, de-identify, pseudonymize, harmonize, split.

DICOM pixels are read through the modality LUT (rescale slope and intercept honoured), then
harmonized by a MONAI array pipeline (channel first, resize, per-image min-max to [0, 1]).
Custom steps follow MONAI's habit: an array op plus a thin dictionary wrapper; degenerate input
raises :class:`~tasks.StepError` instead of being warned about and carried on.

Nothing that leaves this module carries a raw identifier: patients become keyed pseudonyms
(HMAC-SHA256 with the site's secret), and a :class:`PreparedDataset` holds only group indices
of those pseudonyms plus a fingerprint.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import hmac
import io
import math
import sqlite3
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureType,
    MapTransform,
    Resize,
    ScaleIntensity,
    Transform,
)
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence as DicomSequence

from tasks import StepError
from tasks.prepared import (  # re-exported: ingest's output
    PreparedDataset,
    _fingerprint,
    load_prepared,
    save_prepared,
)

# --- DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile -------------------
# Actions for the attributes a site's files may carry: Z = replace with a zero-length value,
# X = remove, U = replace with an internally consistent UID. Private tags are all removed.

BLANK_TAGS: frozenset[str] = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "ReferringPhysicianName",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ContentDate",
        "ContentTime",
    }
)
REMOVE_TAGS: frozenset[str] = frozenset(
    {
        "PatientAddress",
        "PatientAge",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientTelephoneNumbers",
        "PatientSize",
        "PatientWeight",
        "PatientComments",
        "AdditionalPatientHistory",
        "EthnicGroup",
        "Occupation",
        "MilitaryRank",
        "MedicalRecordLocator",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "ReferencedPatientSequence",
        "ReferencedStudySequence",
        "RequestAttributesSequence",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PhysiciansOfRecord",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "RequestingPhysician",
        "OperatorsName",
        "StationName",
        "DeviceSerialNumber",
        "StudyDescription",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "AcquisitionDate",
        "AcquisitionTime",
        "AcquisitionDateTime",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ImageComments",
    }
)
UID_TAGS: frozenset[str] = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "MediaStorageSOPInstanceUID",
        "FrameOfReferenceUID",
        "ReferencedSOPInstanceUID",
        "InstanceCreatorUID",
        "SynchronizationFrameOfReferenceUID",
        "IrradiationEventUID",
    }
)
PHI_TAGS: frozenset[str] = BLANK_TAGS | REMOVE_TAGS | UID_TAGS

DEIDENTIFICATION_METHOD = "DICOM PS3.15 E.1 Basic Profile; HMAC-SHA256 pseudonyms"
MIN_SECRET_BYTES = 16
PSEUDONYM_HEX_CHARS = 32
MANIFEST_COLUMNS = ("file", "label")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_UID_KEY_LABEL = b"medfed/ingest/uid-key"
_MISSING_TEXT = frozenset({"", "na", "n/a", "nan", "null", "none"})


# --- keyed pseudonyms and the patient-level split ---------------------------------------------


def pseudonymize(patient_id: str, secret: bytes) -> str:
    """Keyed pseudonym: HMAC-SHA256(secret, patient_id), hex, first 32 characters."""
    if not isinstance(patient_id, str) or not patient_id.strip():
        raise StepError("Cannot pseudonymize an empty patient ID.")
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise StepError(f"The pseudonymization secret must be at least {MIN_SECRET_BYTES} bytes.")
    digest = hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX_CHARS]


def patient_holdout(
    pseudonyms: Iterable[str], *, holdout_fraction: float, seed: int
) -> frozenset[str]:
    """The held-out patients: a deterministic, patient-level split ranked by a seeded hash.

    Both sides are non-empty; a patient's rank does not depend on who else is in the cohort.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise StepError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}.")
    unique = sorted(set(pseudonyms))
    if len(unique) < 2:
        raise StepError(f"A patient-level split needs at least 2 patients, got {len(unique)}.")
    n_test = min(max(round(len(unique) * holdout_fraction), 1), len(unique) - 1)
    ranked = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}\x1f{p}".encode()).digest())
    return frozenset(ranked[:n_test])


# --- de-identification ------------------------------------------------------------------------


def _replacement_uid(uid: str, key: bytes) -> str:
    digest = hmac.new(key, uid.encode("ascii", "replace"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _scrub(ds: Dataset, uid_key: bytes | None) -> None:
    for elem in list(ds):
        if elem.tag.is_private:
            del ds[elem.tag]
        elif elem.keyword in REMOVE_TAGS:
            del ds[elem.tag]
        elif elem.keyword in BLANK_TAGS:
            elem.value = None
        elif elem.keyword in UID_TAGS:
            if uid_key is None or not elem.value:
                del ds[elem.tag]
            elif elem.VM > 1:
                elem.value = [_replacement_uid(str(v), uid_key) for v in elem.value]
            else:
                elem.value = _replacement_uid(str(elem.value), uid_key)
        elif elem.VR == "SQ" and isinstance(elem.value, DicomSequence):
            for item in elem.value:
                _scrub(item, uid_key)


def deidentify(
    ds: Dataset, *, pseudonym: str | None = None, uid_secret: bytes | None = None
) -> Dataset:
    """A de-identified copy of ``ds``; the input is never modified.

    Applies :data:`PHI_TAGS` (blank, remove, or replace UIDs) at every nesting level and
    removes every private tag. PatientID and PatientName become ``pseudonym`` when given. UIDs
    are replaced by keyed ``2.25.`` UIDs when ``uid_secret`` is given, otherwise removed.
    """
    if not isinstance(ds, Dataset):
        raise StepError("deidentify expects a pydicom Dataset.")
    if uid_secret is not None and len(uid_secret) < MIN_SECRET_BYTES:
        raise StepError(f"The UID secret must be at least {MIN_SECRET_BYTES} bytes.")
    uid_key = (
        None
        if uid_secret is None
        else hmac.new(uid_secret, _UID_KEY_LABEL, hashlib.sha256).digest()
    )
    out = copy.deepcopy(ds)
    _scrub(out, uid_key)
    file_meta = getattr(out, "file_meta", None)
    if file_meta is not None:
        _scrub(file_meta, uid_key)
    if pseudonym is not None:
        out.PatientID = pseudonym
        out.PatientName = pseudonym
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = DicomSequence([code])
    return out


# --- pixels: modality LUT, then a MONAI array pipeline ----------------------------------------


def read_pixels(ds: Dataset, *, source: str) -> np.ndarray:
    """One 2-D grayscale frame in modality units (modality LUT / rescale applied), float32.

    MONOCHROME1 is negated so that brighter always means a higher value.
    """
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _MONOCHROME:
        raise StepError(
            f"DICOM file {source} has PhotometricInterpretation {photometric or 'missing'!r}, "
            "not MONOCHROME1/2."
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise StepError(f"DICOM file {source} is not a single-frame, single-sample image.")
    if ds.get("BurnedInAnnotation", "NO") == "YES":
        raise StepError(f"DICOM file {source} has burned-in annotation that may hold PHI.")
    try:
        values = apply_modality_lut(ds.pixel_array, ds)
    except Exception as err:  # noqa: BLE001 - any decoder failure is bad input here
        raise StepError(f"DICOM file {source} has pixel data that cannot be decoded.") from err
    values = np.asarray(values, dtype=np.float32)
    if photometric == "MONOCHROME1":
        values = -values
    return values


def check_image(img: np.ndarray) -> np.ndarray:
    """Plain check behind :class:`RequireContrast`: 2-D, finite, not constant."""
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise StepError(f"expected a 2-D image, got shape {tuple(arr.shape)}")
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise StepError("the image is empty or has non-finite values")
    low, high = float(arr.min()), float(arr.max())
    if high <= low:
        raise StepError(f"the image is constant (every pixel is {low:g}), nothing to learn from")
    return img


class RequireContrast(Transform):
    """Array op: pass a 2-D finite non-constant image through unchanged, else raise."""

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return check_image(img)


class RequireContrastd(MapTransform):
    """Dictionary wrapper of :class:`RequireContrast`; copies the input, a missing key raises."""

    def __init__(self, keys: Sequence[Hashable] | Hashable) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.op = RequireContrast()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            if key not in d:
                raise StepError(f"RequireContrastd: key {key!r} is missing from the data.")
            d[key] = self.op(d[key])
        return d


def image_transform(image_size: int) -> Compose:
    """Channel first, resize to ``image_size`` x ``image_size``, per-image min-max to [0, 1]."""
    if not isinstance(image_size, int) or image_size < 4:
        raise StepError(f"image_size must be an integer of at least 4, got {image_size!r}.")
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            Resize((image_size, image_size)),
            ScaleIntensity(minv=0.0, maxv=1.0),
            EnsureType(data_type="numpy", dtype=np.float32, track_meta=False),
        ]
    )


def _assemble(
    x: np.ndarray,
    y: np.ndarray,
    row_pseudonyms: Sequence[str],
    *,
    holdout_fraction: float,
    seed: int,
    feature_names: tuple[str, ...] = (),
    standardize: bool = False,
) -> PreparedDataset:
    """Split rows by patient, index groups, optionally standardize with TRAIN statistics."""
    test_patients = patient_holdout(row_pseudonyms, holdout_fraction=holdout_fraction, seed=seed)
    patients = sorted(set(row_pseudonyms))
    splits: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for split, members in (
        ("train", [p for p in patients if p not in test_patients]),
        ("test", [p for p in patients if p in test_patients]),
    ):
        index = {p: i for i, p in enumerate(members)}
        rows = sorted((index[p], r) for r, p in enumerate(row_pseudonyms) if p in index)
        take = np.array([r for _, r in rows], dtype=np.int64)
        splits[f"x_{split}"] = np.ascontiguousarray(x[take], dtype=np.float32)
        splits[f"y_{split}"] = np.ascontiguousarray(y[take], dtype=np.float32)
        splits[f"groups_{split}"] = np.array([g for g, _ in rows], dtype=np.int64)
        counts[split] = len(members)
    if standardize:
        mean = splits["x_train"].mean(axis=0, dtype=np.float64)
        std = splits["x_train"].std(axis=0, dtype=np.float64)
        std = np.where(std > 0.0, std, 1.0)  # a constant training feature carries no signal
        for split in ("train", "test"):
            scaled = (splits[f"x_{split}"] - mean) / std
            splits[f"x_{split}"] = np.ascontiguousarray(scaled, dtype=np.float32)
    return PreparedDataset(
        **splits,
        fingerprint=_fingerprint(splits, feature_names, patients),
        n_patients_train=counts["train"],
        n_patients_test=counts["test"],
        feature_names=feature_names,
    )


def _check_labels(labels: np.ndarray, source: Path) -> None:
    if len(np.unique(labels)) < 2:
        raise StepError(f"{source} has a single class only; both labels 0 and 1 are needed.")


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise StepError(f"The pseudonymization secret must be at least {MIN_SECRET_BYTES} bytes.")


# --- DICOM sites ------------------------------------------------------------------------------


def _read_manifest(data_dir: Path, manifest: Path) -> list[tuple[Path, str, int]]:
    """(resolved path, manifest name, label) per row; paths must stay inside data_dir."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise StepError(f"Manifest {manifest} is missing or unreadable.") from err
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not set(MANIFEST_COLUMNS) <= set(reader.fieldnames):
        raise StepError(f"Manifest {manifest} must have the columns 'file' and 'label'.")
    root = data_dir.resolve()
    entries: list[tuple[Path, str, int]] = []
    seen: set[str] = set()
    for line, row in enumerate(reader, start=2):
        name = (row.get("file") or "").strip()
        label = (row.get("label") or "").strip()
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise StepError(f"Manifest {manifest} line {line} has an invalid file name {name!r}.")
        if label not in ("0", "1"):
            raise StepError(
                f"Manifest {manifest} line {line} ({name}) has label {label!r}, not 0 or 1."
            )
        if name in seen:
            raise StepError(f"Manifest {manifest} lists {name} more than once.")
        seen.add(name)
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise StepError(f"Manifest {manifest} line {line} points outside {data_dir}.")
        entries.append((path, name, int(label)))
    if not entries:
        raise StepError(f"Manifest {manifest} lists no files.")
    return entries


def _read_dicom(path: Path, name: str) -> Dataset:
    if not path.is_file():
        raise StepError(f"DICOM file {name} listed in the manifest does not exist.")
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise StepError(f"File {name} is not a DICOM file.") from err
    except Exception as err:  # noqa: BLE001 - any parser failure is bad input here
        raise StepError(f"DICOM file {name} cannot be parsed.") from err


def prepare_dicom_site(
    data_dir: Path,
    manifest: Path,
    *,
    secret: bytes,
    image_size: int,
    holdout_fraction: float,
    seed: int,
) -> PreparedDataset:
    """Read, de-identify, pseudonymize, harmonize and split every image a manifest lists."""
    _check_secret(secret)
    data_dir, manifest = Path(data_dir), Path(manifest)
    transform = image_transform(image_size)
    check = RequireContrast()
    entries = _read_manifest(data_dir, manifest)
    labels = np.array([label for _, _, label in entries], dtype=np.float32)
    _check_labels(labels, manifest)

    images: list[np.ndarray] = []
    pseudonyms: list[str] = []
    for path, name, _ in entries:
        raw = _read_dicom(path, name)
        patient_id = str(raw.get("PatientID", "") or "").strip()
        if not patient_id:
            raise StepError(f"DICOM file {name} has no PatientID.")
        pseudonym = pseudonymize(patient_id, secret)
        ds = deidentify(raw, pseudonym=pseudonym, uid_secret=secret)
        pixels = read_pixels(ds, source=name)
        try:
            check(pixels)
        except StepError as err:
            raise StepError(f"DICOM file {name}: {err}.") from err
        images.append(transform(pixels))
        pseudonyms.append(pseudonym)
    if len(set(pseudonyms)) < 2:
        raise StepError(f"Manifest {manifest} covers fewer than 2 patients.")
    return _assemble(
        np.stack(images), labels, pseudonyms, holdout_fraction=holdout_fraction, seed=seed
    )


# --- tabular sites ----------------------------------------------------------------------------


_Rows = list[tuple[int, tuple[Any, ...]]]  # (line or row number, values)


def _read_csv_table(source: Path) -> tuple[list[str], _Rows]:
    try:
        text = source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise StepError(f"Table {source} is missing or unreadable.") from err
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as err:
        raise StepError(f"Table {source} is not valid CSV.") from err
    if not rows:
        raise StepError(f"Table {source} is empty.")
    header = [h.strip() for h in rows[0]]
    body = [(line, tuple(r)) for line, r in enumerate(rows[1:], start=2) if r]
    for line, row in body:
        if len(row) != len(header):
            raise StepError(f"Table {source} line {line} has {len(row)} fields, not {len(header)}.")
    return header, body


def _read_sqlite_table(source: Path, table: str) -> tuple[list[str], _Rows]:
    if not source.is_file():
        raise StepError(f"Database {source} does not exist.")
    try:
        conn = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise StepError(f"Database {source} cannot be opened.") from err
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?", (table,)
        ).fetchone()
        if found is None:
            raise StepError(f"Database {source} has no table {table!r}.")
        quoted = '"' + table.replace('"', '""') + '"'
        cursor = conn.execute(f"SELECT * FROM {quoted}")  # noqa: S608 - name checked above
        header = [d[0] for d in cursor.description]
        body = [(line, tuple(r)) for line, r in enumerate(cursor.fetchall(), start=1)]
    except sqlite3.Error as err:
        raise StepError(f"Database {source} table {table!r} cannot be read.") from err
    finally:
        conn.close()
    return header, body


def _number(value: Any, *, column: str, line: int, source: Path) -> float:
    """A finite float from a CSV string or an SQLite value, else StepError naming the cell."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _MISSING_TEXT):
        raise StepError(f"Column {column!r} in {source} has a missing value at row {line}.")
    if isinstance(value, bytes | bytearray):
        raise StepError(f"Column {column!r} in {source} is not numeric (row {line}).")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise StepError(
            f"Column {column!r} in {source} is not numeric ({value!r} at row {line})."
        ) from err
    if not math.isfinite(number):
        raise StepError(f"Column {column!r} in {source} has a missing value at row {line}.")
    return number


def prepare_tabular_site(
    source: Path,
    *,
    label_column: str,
    id_column: str = "patient_id",
    secret: bytes,
    holdout_fraction: float,
    seed: int,
    table: str | None = None,
) -> PreparedDataset:
    """Pseudonymize, split by patient and standardize (train statistics) an EHR-like table.

    ``source`` is a CSV file, or an SQLite database file when ``table`` is given. Every column
    other than the id and label columns is a numeric feature.
    """
    _check_secret(secret)
    source = Path(source)
    header, body = _read_csv_table(source) if table is None else _read_sqlite_table(source, table)
    if len(set(header)) != len(header):
        raise StepError(f"Table {source} has duplicate column names.")
    for column in (id_column, label_column):
        if column not in header:
            raise StepError(f"Table {source} has no column {column!r}.")
    if id_column == label_column:
        raise StepError(f"Table {source}: the id and label columns must differ.")
    features = tuple(c for c in header if c not in (id_column, label_column))
    if not features:
        raise StepError(f"Table {source} has no feature columns.")
    if not body:
        raise StepError(f"Table {source} has no rows.")
    id_at, label_at = header.index(id_column), header.index(label_column)
    feature_at = [header.index(c) for c in features]

    x = np.empty((len(body), len(features)), dtype=np.float64)
    y = np.empty(len(body), dtype=np.float32)
    pseudonyms: list[str] = []
    for r, (line, row) in enumerate(body):
        patient_id = "" if row[id_at] is None else str(row[id_at]).strip()
        if not patient_id:
            raise StepError(f"Column {id_column!r} in {source} is empty at row {line}.")
        label = _number(row[label_at], column=label_column, line=line, source=source)
        if label not in (0.0, 1.0):
            raise StepError(
                f"Column {label_column!r} in {source} has {row[label_at]!r} at row {line}, "
                "not 0 or 1."
            )
        y[r] = label
        for j, at in enumerate(feature_at):
            x[r, j] = _number(row[at], column=features[j], line=line, source=source)
        pseudonyms.append(pseudonymize(patient_id, secret))
    _check_labels(y, source)
    if len(set(pseudonyms)) < 2:
        raise StepError(f"Table {source} covers fewer than 2 patients.")
    return _assemble(
        x,
        y,
        pseudonyms,
        holdout_fraction=holdout_fraction,
        seed=seed,
        feature_names=features,
        standardize=True,
    )


def source_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the sorted (file name, content sha256) pairs: a cheap cache key for sources."""
    h = hashlib.sha256(b"medfed-sources-v1\n")
    for path in sorted(Path(p) for p in paths):
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as err:
            raise StepError(f"Source file {path} is missing or unreadable.") from err
        h.update(f"{path.name}\x1f{digest}\n".encode())
    return h.hexdigest()


__all__ = [
    "BLANK_TAGS",
    "PHI_TAGS",
    "PreparedDataset",
    "REMOVE_TAGS",
    "RequireContrast",
    "RequireContrastd",
    "UID_TAGS",
    "check_image",
    "deidentify",
    "image_transform",
    "load_prepared",
    "patient_holdout",
    "prepare_dicom_site",
    "prepare_tabular_site",
    "pseudonymize",
    "read_pixels",
    "save_prepared",
    "source_fingerprint",
]
