"""DICOM sites before training: read, de-identify, pseudonymize, harmonize, split.

DICOM pixels are read through the modality LUT (rescale slope and intercept honoured), then
harmonized by a MONAI array pipeline (channel first, resize, per-image min-max to [0, 1]).
Custom steps follow MONAI's habit: an array op plus a thin dictionary wrapper; degenerate input
raises :class:`~tasks.StepError` instead of being warned about and carried on.

Nothing that leaves this module carries a raw identifier: each PatientID is normalized and
becomes a keyed pseudonym (:mod:`tasks.cohort`), and the prepared split holds only group
indices of those pseudonyms plus a fingerprint. Tabular sites are :mod:`tasks.tabular`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import hmac
import io
from collections.abc import Hashable, Mapping, Sequence
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
from tasks.cohort import (
    MIN_SECRET_BYTES,
    assemble_prepared,
    check_labels,
    check_secret,
    normalize_patient_id,
    pseudonymize,
)
from tasks.prepared import PreparedDataset

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
MANIFEST_COLUMNS = ("file", "label")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_UID_KEY_LABEL = b"medfed/ingest/uid-key"


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
    check_secret(secret)
    data_dir, manifest = Path(data_dir), Path(manifest)
    transform = image_transform(image_size)
    check = RequireContrast()
    entries = _read_manifest(data_dir, manifest)
    labels = np.array([label for _, _, label in entries], dtype=np.float32)
    check_labels(labels, f"Manifest {manifest}")

    images: list[np.ndarray] = []
    pseudonyms: list[str] = []
    for path, name, _ in entries:
        raw = _read_dicom(path, name)
        patient_id = str(raw.get("PatientID", "") or "")
        if not normalize_patient_id(patient_id):
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
    return assemble_prepared(
        np.stack(images), labels, pseudonyms, holdout_fraction=holdout_fraction, seed=seed
    )


__all__ = [
    "BLANK_TAGS",
    "PHI_TAGS",
    "REMOVE_TAGS",
    "RequireContrast",
    "RequireContrastd",
    "UID_TAGS",
    "check_image",
    "deidentify",
    "image_transform",
    "prepare_dicom_site",
    "read_pixels",
]
