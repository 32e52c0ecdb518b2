"""DICOM sites before training: every listed file ingested or quarantined with a reason.

Per file, in order: read -> is it a training image (SOP class, modality allow-list) -> a
PatientID -> burned-in annotation -> de-identify (the full PS3.15 Annex E Basic Profile,
:mod:`tasks.deid`) -> pixels (decode, modality LUT, padding, fixed window, aspect-kept resize,
:mod:`tasks.pixels`). A file that fails a stage is set aside with (stage, reason) and the site
goes on (:mod:`tasks.quarantine`); a multi-frame image gives one training image per frame, all of
the same patient. Manifest problems (a label that is not 0/1, a path leaving the data folder)
are the site's configuration, not one bad file: they stop the site with the line named.

Nothing that leaves this module carries a raw identifier: each PatientID is normalized and
becomes a keyed pseudonym (:mod:`tasks.cohort`), and the prepared split holds only group
indices of those pseudonyms plus a fingerprint. Tabular sites are :mod:`tasks.tabular`.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from tasks import Quarantined, StepError
from tasks.cohort import (
    assemble_prepared,
    check_labels,
    check_secret,
    normalize_patient_id,
    pseudonymize,
)
from tasks.config import ImagingConfig
from tasks.deid import burned_in_reason, deidentify
from tasks.pixels import image_frames
from tasks.prepared import PreparedDataset
from tasks.quarantine import IngestReport, QuarantinedFile

MANIFEST_COLUMNS = ("file", "label")


class _Silenced(logging.Filter):
    """pydicom's warnings quote header values ("Invalid value for VR PN: '...'"): at a site
    they may be a patient's name, so ingest keeps them out of every log (the quarantine
    report says what was wrong with a file instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


logging.getLogger("pydicom").addFilter(_Silenced())
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR

# --- DICOM sites ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ManifestEntry:
    path: Path
    name: str  # as the manifest writes it: named only in site-local messages and reports
    label: int


def read_manifest(data_dir: Path, manifest: Path, *, site: str) -> list[ManifestEntry]:
    """The manifest's rows; every path must stay inside ``data_dir`` (symlinks resolved)."""
    where = f"site {site}: manifest {manifest.name}"
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise StepError(f"site {site}: manifest {manifest} is missing or unreadable") from err
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not set(MANIFEST_COLUMNS) <= set(reader.fieldnames):
        raise StepError(f"{where} must have the columns 'file' and 'label'")
    root = Path(data_dir).resolve()
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    for line, row in enumerate(reader, start=2):
        name = (row.get("file") or "").strip()
        label = (row.get("label") or "").strip()
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise StepError(f"{where} line {line} has an invalid file name {name!r}")
        if label not in ("0", "1"):
            raise StepError(f"{where} line {line} ({name}) has label {label!r}, not 0 or 1")
        if name in seen:
            raise StepError(f"{where} lists {name} more than once")
        seen.add(name)
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise StepError(f"{where} line {line} ({name}) points outside the data folder")
        entries.append(ManifestEntry(path=path, name=name, label=int(label)))
    if not entries:
        raise StepError(f"{where} lists no files")
    return entries


def read_dicom(path: Path) -> Dataset:
    """Parse one file; every failure is a :class:`Quarantined` at stage "read"."""
    if not path.is_file():
        raise Quarantined("read", "missing-file", "is listed in the manifest but does not exist")
    # From memory, not by path: pydicom names the file it reads in its warnings, and folder
    # names at hospitals often carry patient IDs.
    data = path.read_bytes()
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as err:
        ds = bare_dataset(data)
        if ds is None:
            raise Quarantined(
                "read", "not-dicom", "is not a DICOM file (no DICM preamble, no SOP Class UID)"
            ) from err
    except Exception as err:  # noqa: BLE001 - any parser failure is this file's problem
        raise Quarantined(
            "read", "unreadable-dicom", f"cannot be parsed as DICOM ({type(err).__name__})"
        ) from err
    if len(ds) == 0:
        raise Quarantined(
            "read", "truncated-file", "has a DICOM file header and no data set (truncated?)"
        )
    return ds


_UID_TEXT = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def bare_dataset(data: bytes) -> Dataset | None:
    """A data set written without the Part 10 preamble and file meta (older systems export
    these), or None. Any bytes force-read as *something*, so only a data set that names a
    well-formed SOP Class UID counts; the later stages check the rest."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        uid = str(ds.get("SOPClassUID", "") or "")
    except Exception:  # noqa: BLE001 - not DICOM after all
        return None
    return ds if _UID_TEXT.match(uid) else None


def header_text(ds: Dataset, keyword: str) -> str:
    """A header value as stripped text; a value pydicom cannot convert names the attribute."""
    try:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()
    except Exception as err:  # noqa: BLE001 - malformed bytes raise from many places
        raise Quarantined(
            "header", "malformed-header", f"attribute {keyword} is malformed"
        ) from err


def sop_class(ds: Dataset) -> str:
    uid = header_text(ds, "SOPClassUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = header_text(ds.file_meta, "MediaStorageSOPClassUID")
    return uid


def check_training_image(ds: Dataset, imaging: ImagingConfig) -> str:
    """The file's modality if it is an image the federation trains on, else quarantine.

    An image is an object of an "... Image Storage" SOP class (PS3.4 B.5) whose Modality is in
    the federation's allow-list: segmentations, RT dose/structures/plans, SR, presentation
    states, waveforms, DICOMDIRs and private SOP classes are not images for training."""
    uid = sop_class(ds)
    if uid == MEDIA_STORAGE_DIRECTORY:
        raise Quarantined("image-class", "not-an-image", "is a DICOMDIR, not an image")
    if not uid:
        raise Quarantined("image-class", "not-an-image", "has no SOP Class UID")
    name = UID(uid).name
    if "Image Storage" not in name:
        described = name if name != uid else f"{uid} (not a known storage class)"
        raise Quarantined(
            "image-class", "not-an-image", f"is a {described} object, not an image for training"
        )
    modality = header_text(ds, "Modality").upper()
    if not modality:
        raise Quarantined("image-class", "modality-not-allowed", "has no Modality")
    if modality not in imaging.modalities:
        raise Quarantined(
            "image-class",
            "modality-not-allowed",
            f"has Modality {modality}, not one of the federation's [images] modalities",
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise Quarantined(
            "pixels",
            "no-pixel-data",
            f"is a {name} object without pixel data (the file may be truncated)",
        )
    return modality


@dataclass(frozen=True, kw_only=True)
class IngestedFile:
    pseudonym: str
    frames: list[np.ndarray]


def ingest_file(
    path: Path,
    *,
    secret: bytes,
    imaging: ImagingConfig,
    image_size: int,
    accept_burned_in: bool,
) -> IngestedFile:
    """One file to de-identified training frames of one pseudonymous patient, or Quarantined."""
    raw = read_dicom(path)
    modality = check_training_image(raw, imaging)
    patient_id = header_text(raw, "PatientID")
    if not normalize_patient_id(patient_id):
        raise Quarantined("header", "no-patient-id", "has no PatientID")
    reason = burned_in_reason(raw, accept_burned_in=accept_burned_in)
    if reason is not None:
        raise Quarantined("burned-in", "burned-in-annotation", reason)
    pseudonym = pseudonymize(patient_id, secret)
    ds = deidentify(raw, pseudonym=pseudonym, uid_secret=secret)
    frames = image_frames(ds, modality=modality, imaging=imaging, image_size=image_size)
    return IngestedFile(pseudonym=pseudonym, frames=frames)


Progress = Callable[[int, int], None]


def ingest_manifest(
    entries: list[ManifestEntry],
    *,
    secret: bytes,
    imaging: ImagingConfig,
    image_size: int,
    accept_burned_in: bool = False,
    progress: Progress | None = None,
) -> tuple[list[np.ndarray], list[int], list[str], IngestReport]:
    """Every entry ingested or quarantined: (images, labels, pseudonyms, report)."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    pseudonyms: list[str] = []
    quarantined: list[QuarantinedFile] = []
    ingested = 0
    for i, entry in enumerate(entries):
        try:
            with warnings.catch_warnings():  # pydicom's warnings quote header values
                warnings.simplefilter("ignore")
                got = ingest_file(
                    entry.path,
                    secret=secret,
                    imaging=imaging,
                    image_size=image_size,
                    accept_burned_in=accept_burned_in,
                )
        except Quarantined as q:
            quarantined.append(
                QuarantinedFile(file=entry.name, stage=q.stage, code=q.code, detail=q.detail)
            )
        else:
            ingested += 1
            images += got.frames
            labels += [entry.label] * len(got.frames)
            pseudonyms += [got.pseudonym] * len(got.frames)
        if progress is not None:
            progress(i + 1, len(entries))
    report = IngestReport(
        listed=len(entries), ingested=ingested, images=len(images), quarantined=tuple(quarantined)
    )
    return images, labels, pseudonyms, report


def prepare_dicom_site(
    data_dir: Path,
    manifest: Path,
    *,
    site: str,
    secret: bytes,
    image_size: int,
    holdout_fraction: float,
    seed: int,
    imaging: ImagingConfig | None = None,
    accept_burned_in: bool = False,
    on_report: Callable[[IngestReport], Any] | None = None,
) -> tuple[PreparedDataset, IngestReport]:
    """Ingest every listed file (quarantining what cannot be used), then split by patient.

    ``on_report`` sees the report before the ceiling and the split are checked, so the site's
    quarantine report is written even when too much was set aside to train."""
    from tasks.quarantine import check_ceiling

    check_secret(secret)
    imaging = imaging or ImagingConfig()
    entries = read_manifest(Path(data_dir), Path(manifest), site=site)
    images, labels, pseudonyms, report = ingest_manifest(
        entries,
        secret=secret,
        imaging=imaging,
        image_size=image_size,
        accept_burned_in=accept_burned_in,
    )
    where = on_report(report) if on_report is not None else None
    check_ceiling(site, report, ceiling=imaging.max_quarantined_fraction, where=where)
    where_text = f"site {site}: after quarantine, manifest {Path(manifest).name}"
    if not images:
        raise StepError(f"{where_text} has no usable image")
    y = np.array(labels, dtype=np.float32)
    check_labels(y, where_text)
    if len(set(pseudonyms)) < 2:
        raise StepError(f"{where_text} covers fewer than 2 patients")
    try:
        prepared = assemble_prepared(
            np.stack(images), y, pseudonyms, holdout_fraction=holdout_fraction, seed=seed
        )
    except StepError as err:
        raise StepError(f"site {site}: {err}") from err
    return prepared, report


__all__ = [
    "ManifestEntry",
    "check_training_image",
    "header_text",
    "ingest_file",
    "ingest_manifest",
    "prepare_dicom_site",
    "read_dicom",
    "read_manifest",
]
