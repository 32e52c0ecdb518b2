"""Synthetic DICOM cohorts and DICOM site ingest: de-identification, pixels, the prepared split.

Pseudonyms and the patient-level split are tests/test_cohort.py; tables, tests/test_tabular.py.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tasks import StepError, synthetic
from tasks.cohort import pseudonymize
from tasks.config import ImagingConfig
from tasks.ingest import prepare_dicom_site
from tasks.pixels import decode_frames, image_frames
from tasks.prepared import PreparedDataset, load_prepared, save_prepared
from tasks.quarantine import IngestReport, TooMuchQuarantined
from tasks.synthetic import (
    DEMO_SITES,
    MANIFEST_NAME,
    ensure_demo_cohorts,
    write_dicom_cohort,
)

SECRET = b"site-secret-0123456789abcdef"
OTHER_SECRET = b"another-secret-0123456789abcdef"
SMALL = dataclasses.replace(DEMO_SITES[0], n_patients=6, image_size=32)
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAddress",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "OtherPatientIDs",
)


def _ingest(directory: Path, **overrides: object) -> tuple[PreparedDataset, IngestReport]:
    kwargs: dict[str, object] = {
        "site": "st-mary",
        "secret": SECRET,
        "image_size": 32,
        # Each patient's side is its own hash draw: with six patients, a fraction and seed
        # under which both sides are non-empty for SECRET and OTHER_SECRET alike.
        "holdout_fraction": 0.5,
        "seed": 0,
    }
    kwargs.update(overrides)
    return prepare_dicom_site(directory, directory / MANIFEST_NAME, **kwargs)  # type: ignore[arg-type]


def _prepare(directory: Path, **overrides: object) -> PreparedDataset:
    return _ingest(directory, **overrides)[0]


def _quarantined(report: IngestReport) -> dict[str, str]:
    return {q.file: q.code for q in report.quarantined}


def _manifest(directory: Path) -> list[dict[str, str]]:
    with (directory / MANIFEST_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_manifest(directory: Path, rows: list[tuple[str, str]]) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text("file,label\n" + "".join(f"{f},{lab}\n" for f, lab in rows))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_demo_cohorts(tmp_path_factory.mktemp("demo"), seed=7)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dicom_cohort(SMALL, tmp_path_factory.mktemp("small") / "cohort", seed=3)


@pytest.fixture()
def small_copy(small: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small, tmp_path / "copy"))


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    profile = dataclasses.replace(SMALL, n_patients=16)
    return write_dicom_cohort(profile, tmp_path_factory.mktemp("medium") / "cohort", seed=3)


@pytest.fixture()
def medium_copy(medium: Path, tmp_path: Path) -> Path:
    """Sixteen patients: enough that setting a few files aside leaves both split sides."""
    return Path(shutil.copytree(medium, tmp_path / "copy"))


# --- synthetic cohorts ------------------------------------------------------------------------


def test_demo_sites_are_three_different_hospitals() -> None:
    assert len(DEMO_SITES) == 3
    for field in ("name", "manufacturer", "pixel_spacing", "rescale_slope", "rescale_intercept"):
        assert len({getattr(p, field) for p in DEMO_SITES}) == 3, field
    assert len({p.positive_fraction for p in DEMO_SITES}) == 3


def test_generated_files_are_real_dicom_with_phi(demo: dict[str, Path]) -> None:
    assert set(demo) == {p.name for p in DEMO_SITES}
    for profile in DEMO_SITES:
        rows = _manifest(demo[profile.name])
        assert rows and set(rows[0]) == {"file", "label"}
        ds = pydicom.dcmread(demo[profile.name] / rows[0]["file"])
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.pixel_array.dtype == np.uint16
        assert ds.pixel_array.shape == (profile.image_size, profile.image_size)
        assert (ds.Rows, ds.Columns) == (profile.image_size, profile.image_size)
        assert ds.Manufacturer == profile.manufacturer and ds.Modality == "CT"
        assert float(ds.RescaleSlope) == profile.rescale_slope
        assert float(ds.RescaleIntercept) == profile.rescale_intercept
        assert [float(v) for v in ds.PixelSpacing] == list(profile.pixel_spacing)
        for keyword in PHI_KEYWORDS:
            assert str(ds.data_element(keyword).value), keyword
        assert any(elem.tag.is_private for elem in ds)
        assert ds.StudyInstanceUID and ds.SeriesInstanceUID
        for row in rows:  # file names carry no identifier
            assert row["file"].startswith("img_") and row["file"].endswith(".dcm")
            assert ds.PatientID not in row["file"]


def test_cohort_sizes_and_class_balance_follow_the_profile(demo: dict[str, Path]) -> None:
    for profile in DEMO_SITES:
        rows = _manifest(demo[profile.name])
        low, high = profile.images_per_patient
        assert low * profile.n_patients <= len(rows) <= high * profile.n_patients
        files = sorted(p.name for p in demo[profile.name].glob("*.dcm"))
        assert files == sorted(r["file"] for r in rows)
        positive = np.mean([int(r["label"]) for r in rows])
        recorded = profile.positive_fraction * (1 - profile.missed_lesion_rate)
        assert abs(positive - recorded) < 0.03
        ids = {
            pydicom.dcmread(demo[profile.name] / r["file"], stop_before_pixels=True).PatientID
            for r in rows
        }
        assert len(ids) == profile.n_patients


def test_missed_lesions_only_change_recorded_labels(tmp_path: Path) -> None:
    clean = dataclasses.replace(SMALL, missed_lesion_rate=0.0, n_patients=12)
    noisy = dataclasses.replace(clean, missed_lesion_rate=0.5)
    a = write_dicom_cohort(clean, tmp_path / "clean", seed=3)
    b = write_dicom_cohort(noisy, tmp_path / "noisy", seed=3)
    truth = {r["file"]: int(r["label"]) for r in _manifest(a)}
    recorded = {r["file"]: int(r["label"]) for r in _manifest(b)}
    assert truth.keys() == recorded.keys()
    missed = [f for f in truth if truth[f] != recorded[f]]
    assert missed and all(truth[f] == 1 and recorded[f] == 0 for f in missed)  # 1 -> 0 only
    positives = sum(truth.values())
    assert 0.2 < len(missed) / positives < 0.8
    for name in missed[:3]:  # the image still shows its lesion: same pixels as the clean cohort
        assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_missed_lesion_rate_is_a_fraction(rate: float) -> None:
    with pytest.raises(StepError, match="missed_lesion_rate"):
        dataclasses.replace(SMALL, missed_lesion_rate=rate)


def test_cohort_is_deterministic_under_the_seed(tmp_path: Path, small: Path) -> None:
    again = write_dicom_cohort(SMALL, tmp_path / "again", seed=3)
    other = write_dicom_cohort(SMALL, tmp_path / "other", seed=4)
    names = sorted(p.name for p in small.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (small / name).read_bytes() == (again / name).read_bytes(), name
    assert (small / "img_00000.dcm").read_bytes() != (other / "img_00000.dcm").read_bytes()


def test_interrupted_cohort_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_save = Dataset.save_as

    def failing_save(self: Dataset, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        real_save(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Dataset, "save_as", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_cohort(SMALL, tmp_path / "site", seed=3)
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []  # neither the cohort nor its staging directory


def test_ensure_demo_cohorts_only_fills_what_is_absent(
    tmp_path: Path, small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []

    def fake_write(profile: synthetic.SiteProfile, out_dir: Path, *, seed: int) -> Path:
        written.append(profile.name)
        shutil.copytree(small, out_dir)
        return out_dir

    monkeypatch.setattr(synthetic, "write_dicom_cohort", fake_write)
    shutil.copytree(small, tmp_path / DEMO_SITES[1].name)
    cohorts = ensure_demo_cohorts(tmp_path, seed=0)
    assert written == [DEMO_SITES[0].name, DEMO_SITES[2].name]
    assert cohorts == {p.name: tmp_path / p.name for p in DEMO_SITES}
    ensure_demo_cohorts(tmp_path, seed=0)
    assert len(written) == 2


def test_cohort_write_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "keep.txt").write_text("mine")
    with pytest.raises(StepError, match="site"):
        write_dicom_cohort(SMALL, tmp_path / "site", seed=3)
    assert (tmp_path / "site" / "keep.txt").read_text() == "mine"


def test_bad_site_profile_is_rejected() -> None:
    with pytest.raises(StepError, match="positive_fraction"):
        dataclasses.replace(SMALL, positive_fraction=1.0)
    with pytest.raises(StepError, match="slug"):
        dataclasses.replace(SMALL, name="St Mary")
    with pytest.raises(StepError, match="16-bit"):
        dataclasses.replace(SMALL, rescale_intercept=1000.0)


# --- pixels across the demo's scanners --------------------------------------------------------


def _negative_file(directory: Path) -> Path:
    return directory / next(r["file"] for r in _manifest(directory) if r["label"] == "0")


def test_scanners_agree_in_hounsfield_units_under_one_fixed_window(
    demo: dict[str, Path],
) -> None:
    """Three scanners store the same tissue under different slope/intercept: decoded through
    the modality LUT they agree in HU, and the fixed CT window maps them alike."""
    imaging = ImagingConfig()
    medians = []
    for profile in DEMO_SITES:
        ds = pydicom.dcmread(_negative_file(demo[profile.name]))
        (hu,) = decode_frames(ds, imaging=imaging)
        assert abs(float(np.median(hu)) - profile.base_intensity) < 25.0
        assert abs(float(ds.pixel_array.mean()) - profile.base_intensity) > 400.0  # not HU
        (img,) = image_frames(ds, modality="CT", imaging=imaging, image_size=32)
        assert img.shape == (1, 32, 32) and 0.0 <= img.min() and img.max() <= 1.0
        medians.append(float(np.median(img)))
    window = imaging.windows["CT"]
    expected = [(p.base_intensity - window.center) / window.width + 0.5 for p in DEMO_SITES]
    assert np.allclose(medians, expected, atol=0.07)


# --- DICOM sites ------------------------------------------------------------------------------


def test_prepare_dicom_site_shapes_groups_and_split(small: Path) -> None:
    prepared = _prepare(small)
    rows = _manifest(small)
    assert prepared.x_train.dtype == np.float32 and prepared.x_train.shape[1:] == (1, 32, 32)
    assert prepared.groups_train.dtype == np.int64 and prepared.y_train.dtype == np.float32
    assert len(prepared.y_train) + len(prepared.y_test) == len(rows)
    assert prepared.feature_names == ()
    # Every patient lands on exactly one side: the counts add up to the cohort's patients.
    assert prepared.n_patients_train + prepared.n_patients_test == SMALL.n_patients
    assert set(prepared.groups_train) == set(range(prepared.n_patients_train))
    assert set(prepared.groups_test) == set(range(prepared.n_patients_test))
    assert 0.0 <= prepared.x_train.min() and prepared.x_train.max() <= 1.0
    labels = sorted(int(r["label"]) for r in rows)
    assert sorted(np.concatenate([prepared.y_train, prepared.y_test]).astype(int)) == labels
    again = _prepare(small)
    assert again.fingerprint == prepared.fingerprint
    assert np.array_equal(again.x_train, prepared.x_train)
    assert _prepare(small, secret=OTHER_SECRET).fingerprint != prepared.fingerprint


def test_saved_dataset_round_trips_and_holds_no_phi(small: Path, tmp_path: Path) -> None:
    prepared = _prepare(small)
    digest = save_prepared(prepared, tmp_path / "prepared.npz")
    data = (tmp_path / "prepared.npz").read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    assert save_prepared(prepared, tmp_path / "again.npz") == digest  # deterministic bytes
    loaded = load_prepared(tmp_path / "prepared.npz")
    for field in dataclasses.fields(prepared):
        a, b = getattr(prepared, field.name), getattr(loaded, field.name)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, field.name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    secrets: set[str] = set()
    for row in _manifest(small):
        ds = pydicom.dcmread(small / row["file"], stop_before_pixels=True)
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "OtherPatientIDs"):
            secrets.add(str(ds.data_element(keyword).value))
        secrets.add(pseudonymize(ds.PatientID, SECRET))
    for value in secrets:
        for encoding in ("ascii", "utf-16-le", "utf-32-le"):
            assert value.encode(encoding) not in data, value


def test_load_prepared_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(StepError, match="bad.npz"):
        load_prepared(path)
    with pytest.raises(StepError, match="missing.npz"):
        load_prepared(tmp_path / "missing.npz")


def test_logistic_regression_learns_the_lesions(demo: dict[str, Path]) -> None:
    """Guards the demo: on 32x32 images under the fixed CT window, a linear model over the
    demo model's fixed front end (no DP) finds the lesions at a site."""
    import torch

    from tasks.models import ScatterFrontEnd

    front = ScatterFrontEnd()

    directory = demo[DEMO_SITES[0].name]
    prepared, report = prepare_dicom_site(
        directory,
        directory / MANIFEST_NAME,
        site="st-mary",
        secret=SECRET,
        image_size=32,
        holdout_fraction=0.3,
        seed=0,
    )
    assert report.quarantined == () and report.ingested == report.listed
    with torch.no_grad():
        x_train, x_test = (front(torch.from_numpy(x)).numpy() for x in prepared_x(prepared))
    model = LogisticRegression(C=0.1, max_iter=3000).fit(x_train, prepared.y_train)
    scores = model.predict_proba(x_test)[:, 1]
    assert roc_auc_score(prepared.y_test, scores) > 0.85


def prepared_x(prepared: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    return prepared.x_train, prepared.x_test


def test_missing_manifest(small: Path, tmp_path: Path) -> None:
    with pytest.raises(StepError, match="site st-mary: manifest .*nowhere.csv"):
        prepare_dicom_site(
            small,
            tmp_path / "nowhere.csv",
            site="st-mary",
            secret=SECRET,
            image_size=32,
            holdout_fraction=0.3,
            seed=0,
        )


def test_manifest_without_columns(small_copy: Path) -> None:
    (small_copy / MANIFEST_NAME).write_text("path,target\nimg_00000.dcm,1\n")
    with pytest.raises(StepError, match=r"site st-mary: manifest manifest\.csv.*'file' and"):
        _prepare(small_copy)


def test_a_bad_file_is_quarantined_and_the_site_goes_on(medium_copy: Path) -> None:
    """Missing, not DICOM, truncated, constant: each set aside with its own reason; the rest
    of the site is ingested and split as before."""
    whole, _ = _ingest(medium_copy)
    (medium_copy / "img_00003.dcm").unlink()
    (medium_copy / "img_00002.dcm").write_text("patient,notes\n")
    data = (medium_copy / "img_00005.dcm").read_bytes()
    (medium_copy / "img_00005.dcm").write_bytes(data[:300])  # ends inside the file meta
    (medium_copy / "img_00006.dcm").write_bytes(data[:1000])  # ends before the pixels
    ds = pydicom.dcmread(medium_copy / "img_00004.dcm")
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, dtype=np.uint16).tobytes()
    ds.save_as(medium_copy / "img_00004.dcm")

    prepared, report = _ingest(medium_copy)

    assert _quarantined(report) == {
        "img_00002.dcm": "not-dicom",
        "img_00003.dcm": "missing-file",
        "img_00004.dcm": "constant-image",
        "img_00005.dcm": "truncated-file",
        "img_00006.dcm": "no-pixel-data",
    }
    assert report.listed == len(_manifest(medium_copy)) == report.ingested + 5
    assert len(prepared.y_train) + len(prepared.y_test) == report.images == report.ingested
    assert len(whole.y_train) + len(whole.y_test) == report.images + 5
    summary = report.summary()
    assert summary["quarantined_by_reason"] == {
        "constant-image": 1,
        "missing-file": 1,
        "no-pixel-data": 1,
        "not-dicom": 1,
        "truncated-file": 1,
    }
    assert "img_0000" not in str(summary)  # counts only: names stay in the site report


def test_a_data_set_without_preamble_or_file_meta_is_still_ingested(
    medium_copy: Path,
) -> None:
    """Older systems export bare data sets (no 128-byte preamble, no DICM, no file meta):
    recognised by their SOP Class UID and ingested like any other file."""
    before, _ = _ingest(medium_copy)
    path = medium_copy / "img_00000.dcm"
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert not path.read_bytes()[128:132] == b"DICM"
    after, report = _ingest(medium_copy)
    assert report.quarantined == ()
    assert after.fingerprint == before.fingerprint


def test_a_mostly_unusable_export_stops_the_site(medium_copy: Path) -> None:
    rows = _manifest(medium_copy)
    for row in rows[: len(rows) // 2 + 1]:
        (medium_copy / row["file"]).write_text("not dicom\n")
    seen: list[IngestReport] = []
    with pytest.raises(TooMuchQuarantined, match=r"site st-mary: \d+ of the \d+ files .*0\.5"):
        _ingest(medium_copy, on_report=seen.append)
    assert seen and len(seen[0].quarantined) == len(rows) // 2 + 1  # reported before stopping
    lenient = ImagingConfig(max_quarantined_fraction=0.9)
    _, report = _ingest(medium_copy, imaging=lenient)
    assert report.by_reason() == {"not-dicom": len(rows) // 2 + 1}


@pytest.mark.parametrize("label", ["2", "yes", ""])
def test_label_not_binary(small_copy: Path, label: str) -> None:
    rows = [(r["file"], r["label"]) for r in _manifest(small_copy)]
    rows[1] = (rows[1][0], label)
    _write_manifest(small_copy, rows)
    with pytest.raises(StepError, match=rf"site st-mary: .* line 3 \({rows[1][0]}\).*not 0 or 1"):
        _prepare(small_copy)


def test_manifest_path_escaping_the_directory(small_copy: Path) -> None:
    _write_manifest(small_copy, [("../outside.dcm", "0"), ("img_00000.dcm", "1")])
    with pytest.raises(StepError, match="outside.dcm"):
        _prepare(small_copy)
    (small_copy / "link.dcm").symlink_to(small_copy.parent / "elsewhere.dcm")
    _write_manifest(small_copy, [("link.dcm", "0"), ("img_00000.dcm", "1")])
    with pytest.raises(StepError, match=r"link\.dcm\) points outside the data folder"):
        _prepare(small_copy)


def test_single_class_only(small_copy: Path) -> None:
    _write_manifest(small_copy, [(r["file"], "0") for r in _manifest(small_copy)])
    with pytest.raises(StepError, match=r"site st-mary: .*manifest\.csv has a single class"):
        _prepare(small_copy)


def test_fewer_than_two_patients(small_copy: Path) -> None:
    by_patient: dict[str, list[str]] = {}
    for row in _manifest(small_copy):
        ds = pydicom.dcmread(small_copy / row["file"], stop_before_pixels=True)
        by_patient.setdefault(ds.PatientID, []).append(row["file"])
    files = next(f for f in by_patient.values() if len(f) >= 2)
    _write_manifest(small_copy, [(files[0], "0"), (files[1], "1")])
    with pytest.raises(StepError, match=r"site st-mary: .*covers fewer than 2 patients"):
        _prepare(small_copy)


def _rewrite(path: Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def test_objects_that_are_not_training_images_are_quarantined(medium_copy: Path) -> None:
    _rewrite(medium_copy / "img_00000.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4")  # SEG
    _rewrite(medium_copy / "img_00001.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.481.2")
    _rewrite(medium_copy / "img_00002.dcm", Modality="RTDOSE")
    _rewrite(medium_copy / "img_00003.dcm", Modality=None)
    _rewrite(medium_copy / "img_00004.dcm", PatientID=None)
    _, report = _ingest(medium_copy, imaging=ImagingConfig(max_quarantined_fraction=0.9))
    assert _quarantined(report) == {
        "img_00000.dcm": "not-an-image",
        "img_00001.dcm": "not-an-image",
        "img_00002.dcm": "modality-not-allowed",
        "img_00003.dcm": "modality-not-allowed",
        "img_00004.dcm": "no-patient-id",
    }
    details = {q.file: q.detail for q in report.quarantined}
    assert "Segmentation Storage" in details["img_00000.dcm"]
    assert "RT Dose Storage" in details["img_00001.dcm"]
    with pytest.raises(TooMuchQuarantined):  # a CT export under an MR-only federation
        _ingest(medium_copy, imaging=ImagingConfig(modalities=("MR",)))


def test_burned_in_annotation_is_quarantined_unless_the_site_accepts_it(
    medium_copy: Path,
) -> None:
    _rewrite(medium_copy / "img_00000.dcm", BurnedInAnnotation="yes ")
    _rewrite(medium_copy / "img_00001.dcm", Modality="US")  # US with no BurnedInAnnotation
    _rewrite(medium_copy / "img_00002.dcm", Modality="US", BurnedInAnnotation="NO")
    _, report = _ingest(medium_copy)
    assert _quarantined(report) == {
        "img_00000.dcm": "burned-in-annotation",
        "img_00001.dcm": "burned-in-annotation",
    }
    _, accepted = _ingest(medium_copy, accept_burned_in=True)
    assert accepted.quarantined == ()


def test_a_malformed_header_value_quarantines_naming_the_attribute(medium_copy: Path) -> None:
    """`NumberOfFrames = 1A` crashed ingest with a traceback; now that file is set aside."""
    path = medium_copy / "img_00000.dcm"
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 1
    ds.save_as(path)
    data = path.read_bytes()
    at = data.index(b"\x28\x00\x08\x00IS")  # (0028,0008) IS, explicit VR little endian
    path.write_bytes(data[: at + 8] + b"1A" + data[at + 10 :])
    _, report = _ingest(medium_copy)
    (q,) = report.quarantined
    assert q.file == "img_00000.dcm" and q.code == "malformed-header"
    assert "NumberOfFrames" in q.detail and "1A" not in q.detail


def test_a_multiframe_image_is_frames_of_one_patient(medium_copy: Path) -> None:
    path = medium_copy / "img_00000.dcm"
    ds = pydicom.dcmread(path)
    frame = ds.pixel_array
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([frame, frame[::-1], frame[:, ::-1]]).tobytes()
    ds.save_as(path)
    before, _ = _ingest(medium_copy, imaging=ImagingConfig(multiframe="quarantine"))
    after, report = _ingest(medium_copy)
    assert report.quarantined == () and report.images == report.listed + 2
    assert len(after.y_train) + len(after.y_test) == len(before.y_train) + len(before.y_test) + 3
    assert after.n_patients_train + after.n_patients_test == 16


def test_short_secret_is_rejected(small: Path) -> None:
    with pytest.raises(StepError, match="16 bytes"):
        _prepare(small, secret=b"short")


def test_patient_id_spellings_are_one_patient(small_copy: Path) -> None:
    """A PatientID written in another case, padded or fullwidth is the same privacy unit."""
    before = _prepare(small_copy)
    by_patient: dict[str, list[str]] = {}
    for row in _manifest(small_copy):
        ds = pydicom.dcmread(small_copy / row["file"], stop_before_pixels=True)
        by_patient.setdefault(str(ds.PatientID), []).append(row["file"])
    patient, files = next((p, f) for p, f in by_patient.items() if len(f) >= 2)
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in patient)
    for name, spelling in zip(files[1:], [f" {patient.lower()} ", fullwidth], strict=False):
        ds = pydicom.dcmread(small_copy / name)
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for the fullwidth spelling
        ds.PatientID = spelling
        ds.save_as(small_copy / name)
    after = _prepare(small_copy)
    assert after.n_patients_train + after.n_patients_test == SMALL.n_patients
    assert after.fingerprint == before.fingerprint
