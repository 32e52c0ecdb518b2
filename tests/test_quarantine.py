"""A real hospital export: pydicom's whole test-file corpus as one site's data folder.

The corpus (what pydicom and pydicom-data ship: many transfer syntaxes, colour, multi-frame,
RT and SEG objects, DICOMDIRs, deliberately corrupt files) is copied under a folder named like
a patient, as PACS exports often are. Every file must be ingested or quarantined with a
specific reason, the site must finish, and that folder name must stay at the site.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data.data_manager import DATA_ROOT, external_data_sources
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from ledger.store import Ledger
from tasks.config import ImagingConfig
from tasks.ingest import ingest_manifest, read_manifest

PATIENT_FOLDER = "MRN-4417-SMITH"  # a folder named like a patient: it must never leave the site
SECRET = b"corpus-site-secret-0123456789ab"
REASONS = {
    "missing-file",
    "not-dicom",
    "unreadable-dicom",
    "truncated-file",
    "not-an-image",
    "modality-not-allowed",
    "malformed-header",
    "no-patient-id",
    "burned-in-annotation",
    "no-pixel-data",
    "decoder-missing",
    "unsupported-transfer-syntax",
    "truncated-pixel-data",
    "undecodable-pixel-data",
    "unsupported-photometric",
    "colour",
    "multiframe",
    "too-many-frames",
    "constant-image",
    "no-pixel-spacing",
}
FAMILIES = {
    "JPEG": {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1},
    "JPEG-LS": {JPEGLSLossless, JPEGLSNearLossless},
    "JPEG 2000": {JPEG2000Lossless, JPEG2000},
    "RLE": {RLELossless},
}


def corpus_files() -> list[Path]:
    """Every data file pydicom and pydicom-data ship (DICOM or not, as an export may hold)."""
    roots = [Path(DATA_ROOT)] + [Path(s.data_path) for s in external_data_sources().values()]
    return sorted(
        p
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    )


def corpus_site(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(data folder, manifest outside it, manifest name -> original corpus file)."""
    data = root / "data"
    originals: dict[str, Path] = {}
    for i, src in enumerate(corpus_files()):
        name = f"{PATIENT_FOLDER}/{i:03d}-{src.name}"
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, data / name)
        originals[name] = src
    manifest = root / "labels" / "manifest.csv"  # beside, not inside, the data folder
    manifest.parent.mkdir(parents=True)
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        writer.writerows((name, i % 2) for i, name in enumerate(originals))
    return data, manifest, originals


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    return corpus_site(tmp_path_factory.mktemp("corpus"))


def _family(path: Path) -> str | None:
    try:
        ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    except Exception:  # noqa: BLE001 - unreadable files belong to no family
        return None
    return next((f for f, uids in FAMILIES.items() if ts in uids), None)


def test_every_corpus_file_is_ingested_or_quarantined_with_a_reason(corpus) -> None:
    data, manifest, originals = corpus
    entries = read_manifest(data, manifest, site="corpus")
    imaging = ImagingConfig(max_quarantined_fraction=1.0)
    images, labels, pseudonyms, report = ingest_manifest(
        entries, secret=SECRET, imaging=imaging, image_size=16
    )
    assert report.listed == len(originals) > 260
    assert report.ingested + len(report.quarantined) == report.listed
    assert len(images) == len(labels) == len(pseudonyms) == report.images >= report.ingested
    assert set(report.by_reason()) <= REASONS
    assert "decoder-missing" not in report.by_reason()  # the plugins are installed
    for q in report.quarantined:
        assert q.detail and PATIENT_FOLDER not in q.detail
    # Greyscale JPEG, JPEG-LS, JPEG 2000 and RLE files are decoded and ingested.
    quarantined = {q.file for q in report.quarantined}
    ingested_by_family: dict[str, int] = {}
    for name, src in originals.items():
        family = _family(src)
        if family and name not in quarantined:
            ingested_by_family[family] = ingested_by_family.get(family, 0) + 1
    assert set(ingested_by_family) == set(FAMILIES), ingested_by_family
    # Not images for training: segmentations, RT dose, DICOMDIRs, SR are quarantined.
    codes = {Path(q.file).name.split("-", 1)[1]: q.code for q in report.quarantined}
    assert codes["DICOMDIR"] == "not-an-image"
    assert codes["rtdose.dcm"] == codes["rtplan.dcm"] == "not-an-image"
    # A bare data set without the preamble and file meta is still recognised for what it is.
    assert codes["rtstruct.dcm"] == "not-an-image"
    assert codes["no_meta.dcm"] == "not-dicom"  # no SOP Class UID either: nothing to go on


def _medfed(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.prefect
def test_a_site_over_the_corpus_finishes_a_round_and_keeps_file_names_home(
    corpus, tmp_path: Path
) -> None:
    """`medfed site check` dry-runs it; `medfed run` trains a round with it and a synthetic
    hospital; the counts reach the ledger, the names only the site's quarantine report."""
    import dataclasses

    from fedhelp import DICOM_HEADER, dicom_federation

    from tasks.synthetic import DEMO_SITES, MANIFEST_NAME, write_dicom_cohort

    data, manifest, originals = corpus
    small = dataclasses.replace(DEMO_SITES[0], n_patients=24, image_size=32)
    cohort = write_dicom_cohort(small, tmp_path / "st-mary-data", seed=5)
    header = DICOM_HEADER + "[images]\nmax_quarantined_fraction = 0.95\n"
    cfg = dicom_federation(
        tmp_path,
        {"corpus": (data, manifest), "st-mary": (cohort, cohort / MANIFEST_NAME)},
        header=header,
    )

    check = _medfed("site", "check", str(tmp_path / "sites" / "corpus"))
    assert check.returncode == 0, check.stderr
    assert "Traceback" not in check.stdout + check.stderr
    assert f"{len(originals)} files listed" in check.stdout
    report_csv = tmp_path / "sites" / "corpus" / "quarantine" / "report.csv"
    rows = list(csv.DictReader(report_csv.open()))
    assert rows and all(r["file"].startswith(PATIENT_FOLDER) and r["reason"] for r in rows)

    run = _medfed("run", str(cfg), "--sites", str(tmp_path / "sites"))
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert f"corpus: {len(originals)} files listed" in run.stdout
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    (prep,) = [e for e in ledger.events(action="preprocess") if e["site"] == "corpus"]
    ingest = prep["details"]["ingest"]
    assert ingest["listed"] == len(originals)
    assert ingest["ingested"] + ingest["quarantined"] == len(originals)
    assert sum(ingest["quarantined_by_reason"].values()) == ingest["quarantined"] == len(rows)
    deid = prep["details"]["deidentification"]
    assert deid["code"] == "113100" and deid["options_applied"] == []
    assert ledger.events(action="train")
    shared = [tmp_path / "ledger.db", *(tmp_path / "artifacts").rglob("*")]
    texts = [run.stdout, run.stderr]
    texts += [p.read_bytes().decode("latin-1") for p in shared if p.is_file()]
    for text in texts:
        assert PATIENT_FOLDER not in text


def test_the_round_artifact_and_table_show_counts_and_no_file_names() -> None:
    from flows.cli.main import round_table
    from flows.round import RoundSummary, SiteRow, to_markdown
    from tasks.quarantine import IngestReport, QuarantinedFile

    report = IngestReport(
        listed=5,
        ingested=3,
        images=12,
        quarantined=(
            QuarantinedFile(
                file=f"{PATIENT_FOLDER}/a.dcm", stage="read", code="not-dicom", detail="x"
            ),
            QuarantinedFile(
                file=f"{PATIENT_FOLDER}/b.dcm", stage="pixels", code="colour", detail="y"
            ),
        ),
    )
    row = SiteRow(
        site="corpus",
        trained=True,
        auc=0.7,
        accuracy=0.6,
        heldout=4,
        epsilon=1.0,
        bytes_uploaded=10,
        seconds={},
        ingest=report.summary(),
    )
    summary = RoundSummary(
        job="j",
        round=1,
        status="committed",
        model_hash="ab" * 32,
        weighted_auc=0.7,
        weighted_accuracy=0.6,
        aggregate_seconds=0.1,
        sites=(row,),
    )
    markdown = to_markdown(summary)
    assert "| corpus | 5 | 3 | 12 | 2 (colour 1, not-dicom 1) |" in markdown
    assert "corpus: 5 files listed, 3 ingested (12 images), 2 quarantined" in str(
        round_table(summary).caption
    )
    assert PATIENT_FOLDER not in markdown + str(report.summary()) + report.describe()


def test_site_check_stops_on_a_mostly_unusable_export_with_one_sentence(tmp_path: Path) -> None:
    import dataclasses

    from fedhelp import dicom_federation

    from tasks.synthetic import DEMO_SITES, MANIFEST_NAME, write_dicom_cohort

    small = dataclasses.replace(DEMO_SITES[0], n_patients=6, image_size=32)
    good = write_dicom_cohort(small, tmp_path / "good", seed=3)
    bad = write_dicom_cohort(small, tmp_path / PATIENT_FOLDER, seed=4)
    for path in sorted(bad.glob("*.dcm"))[:-2]:
        path.write_bytes(path.read_bytes()[:300])  # cut inside the file meta
    cfg = dicom_federation(
        tmp_path, {"good": (good, good / MANIFEST_NAME), "bad": (bad, bad / MANIFEST_NAME)}
    )
    ok = _medfed("site", "check", str(tmp_path / "sites" / "good"), timeout=300)
    assert ok.returncode == 0 and "0 quarantined" in ok.stdout, ok.stderr
    proc = _medfed("site", "check", str(tmp_path / "sites" / "bad"), "--federation", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("medfed:")]
    assert "site bad:" in line and "max_quarantined_fraction 0.5" in line
    rows = list(csv.DictReader((tmp_path / "sites/bad/quarantine/report.csv").open()))
    assert len(rows) == len(list(bad.glob("*.dcm"))) - 2
    assert {r["reason"] for r in rows} == {"truncated-file"}


def test_the_readme_images_example_is_a_valid_section() -> None:
    """The README's `[images]` example parses as the federation's ImagingConfig, and its
    defaults are the code's defaults (commented lines aside)."""
    import re
    import tomllib

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```toml\n(\[images\]\n.*?)```", readme, flags=re.S)
    section = tomllib.loads(block)["images"]
    assert ImagingConfig.model_validate(section) == ImagingConfig()
