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
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tasks import StepError, synthetic
from tasks.cohort import pseudonymize
from tasks.ingest import (
    BLANK_TAGS,
    PHI_TAGS,
    REMOVE_TAGS,
    UID_TAGS,
    RequireContrast,
    RequireContrastd,
    check_image,
    deidentify,
    image_transform,
    prepare_dicom_site,
    read_pixels,
)
from tasks.prepared import PreparedDataset, load_prepared, save_prepared
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


def _prepare(directory: Path, **overrides: object) -> PreparedDataset:
    kwargs: dict[str, object] = {
        "secret": SECRET,
        "image_size": 32,
        # Each patient's side is its own hash draw: with six patients, a fraction and seed
        # under which both sides are non-empty for SECRET and OTHER_SECRET alike.
        "holdout_fraction": 0.5,
        "seed": 0,
    }
    kwargs.update(overrides)
    return prepare_dicom_site(directory, directory / MANIFEST_NAME, **kwargs)  # type: ignore[arg-type]


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


# --- de-identification ------------------------------------------------------------------------


def test_deidentify_removes_phi_and_private_tags_without_mutating(small: Path) -> None:
    ds = pydicom.dcmread(small / "img_00000.dcm")
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.PatientName = "NESTED^NAME"
    item.private_block(0x0013, "OTHER VENDOR", create=True).add_new(0x01, "LO", "hidden")
    ds.ReferencedImageSequence = DicomSequence([item])
    before = ds.to_json()
    original_uid = ds.SOPInstanceUID

    out = deidentify(ds, pseudonym="abc123", uid_secret=SECRET)

    assert ds.to_json() == before  # the input is untouched
    assert not any(elem.tag.is_private for elem in out.iterall())
    for keyword in REMOVE_TAGS:
        assert keyword not in out, keyword
    for keyword in BLANK_TAGS - {"PatientID", "PatientName"}:
        assert keyword not in out or not out.data_element(keyword).value, keyword
    assert out.PatientID == "abc123" and str(out.PatientName) == "abc123"
    assert out.PatientIdentityRemoved == "YES" and out.DeidentificationMethod
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not out.ReferencedImageSequence[0].PatientName
    for keyword in UID_TAGS & set(ds.dir()):
        assert out.data_element(keyword).value != ds.data_element(keyword).value, keyword
    assert out.SOPInstanceUID.startswith("2.25.") and out.SOPInstanceUID != original_uid
    # UIDs are replaced consistently, so references still resolve.
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPClassUID == CTImageStorage and out.Manufacturer == ds.Manufacturer
    assert np.array_equal(out.pixel_array, ds.pixel_array)
    text = str(out)
    for keyword in set(PHI_KEYWORDS) - {"PatientSex"}:  # a one-letter value is everywhere
        value = str(ds.data_element(keyword).value)
        assert value not in text, keyword


def test_deidentify_without_keys_blanks_names_and_drops_uids(small: Path) -> None:
    ds = pydicom.dcmread(small / "img_00001.dcm")
    out = deidentify(ds)
    assert not out.PatientID and not out.PatientName
    assert "SOPInstanceUID" not in out and "StudyInstanceUID" not in out
    assert PHI_TAGS >= {"PatientName", "PatientID", "PatientAddress", "OtherPatientIDs"}
    with pytest.raises(StepError, match="UID secret"):
        deidentify(ds, uid_secret=b"short")


# --- pixels and the MONAI pipeline ------------------------------------------------------------


def _negative_file(directory: Path) -> Path:
    return directory / next(r["file"] for r in _manifest(directory) if r["label"] == "0")


def test_modality_lut_is_honoured(demo: dict[str, Path], tmp_path: Path) -> None:
    transform = image_transform(32)
    medians = []
    for profile in DEMO_SITES:
        ds = pydicom.dcmread(_negative_file(demo[profile.name]))
        stored_mean = float(ds.pixel_array.mean())
        hu = read_pixels(ds, source="x")
        assert hu.dtype == np.float32
        assert abs(float(np.median(hu)) - profile.base_intensity) < 25.0
        assert abs(stored_mean - profile.base_intensity) > 400.0  # raw values are not HU
        scaled = transform(hu)
        assert scaled.shape == (1, 32, 32) and scaled.min() == 0.0 and scaled.max() == 1.0
        medians.append(float(np.median(scaled)))
    assert max(medians) - min(medians) < 0.25  # harmonized across scanners
    assert all(0.2 < m < 0.8 for m in medians)

    # Same HU stored under another slope and intercept reads back the same.
    ds = pydicom.dcmread(_negative_file(demo[DEMO_SITES[0].name]))
    hu = read_pixels(ds, source="a")
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -2048.0
    ds.PixelData = np.rint((hu + 2048.0) / 0.5).astype(np.uint16).tobytes()
    assert np.allclose(read_pixels(ds, source="b"), hu, atol=0.5)


def test_monochrome1_is_inverted_and_colour_is_rejected(small: Path) -> None:
    ds = pydicom.dcmread(small / "img_00000.dcm")
    hu = read_pixels(ds, source="a.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(read_pixels(ds, source="a.dcm"), -hu)
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(StepError, match=r"a\.dcm.*RGB"):
        read_pixels(ds, source="a.dcm")


@pytest.mark.parametrize(
    ("img", "match"),
    [
        (np.full((8, 8), 3.0), "constant"),
        (np.zeros((2, 8, 8)), "2-D"),
        (np.zeros(8), "2-D"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "non-finite"),
    ],
)
def test_degenerate_images_raise(img: np.ndarray, match: str) -> None:
    with pytest.raises(StepError, match=match):
        check_image(img)
    with pytest.raises(StepError, match=match):
        RequireContrast()(img)


def test_dict_wrapper_copies_and_requires_its_key() -> None:
    img = np.arange(16.0).reshape(4, 4)
    data = {"image": img, "label": 1}
    out = RequireContrastd(keys="image")(data)
    assert out is not data and out["image"] is img and out["label"] == 1
    with pytest.raises(StepError, match="image"):
        RequireContrastd(keys="image")({"label": 1})
    with pytest.raises(StepError, match="constant"):
        RequireContrastd(keys="image")({"image": np.ones((4, 4))})


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
    """Guards the demo: a linear model on 32x32 pixels must find the lesions at one site."""
    directory = demo[DEMO_SITES[0].name]
    prepared = prepare_dicom_site(
        directory,
        directory / MANIFEST_NAME,
        secret=SECRET,
        image_size=32,
        holdout_fraction=0.3,
        seed=0,
    )
    model = LogisticRegression(C=0.1, max_iter=2000)
    model.fit(prepared.x_train.reshape(len(prepared.x_train), -1), prepared.y_train)
    scores = model.predict_proba(prepared.x_test.reshape(len(prepared.x_test), -1))[:, 1]
    assert roc_auc_score(prepared.y_test, scores) > 0.8


def test_missing_manifest(small: Path, tmp_path: Path) -> None:
    with pytest.raises(StepError, match="nowhere.csv"):
        prepare_dicom_site(
            small,
            tmp_path / "nowhere.csv",
            secret=SECRET,
            image_size=32,
            holdout_fraction=0.3,
            seed=0,
        )


def test_manifest_without_columns(small_copy: Path) -> None:
    (small_copy / MANIFEST_NAME).write_text("path,target\nimg_00000.dcm,1\n")
    with pytest.raises(StepError, match=r"manifest\.csv.*'file' and 'label'"):
        _prepare(small_copy)


def test_listed_file_missing(small_copy: Path) -> None:
    (small_copy / "img_00003.dcm").unlink()
    with pytest.raises(StepError, match=r"img_00003\.dcm.*does not exist"):
        _prepare(small_copy)


def test_listed_file_not_dicom(small_copy: Path) -> None:
    (small_copy / "img_00002.dcm").write_text("patient,notes\n")
    with pytest.raises(StepError, match=r"img_00002\.dcm is not a DICOM file"):
        _prepare(small_copy)


@pytest.mark.parametrize("label", ["2", "yes", ""])
def test_label_not_binary(small_copy: Path, label: str) -> None:
    rows = [(r["file"], r["label"]) for r in _manifest(small_copy)]
    rows[1] = (rows[1][0], label)
    _write_manifest(small_copy, rows)
    with pytest.raises(StepError, match=rf"line 3 \({rows[1][0]}\).*not 0 or 1"):
        _prepare(small_copy)


def test_manifest_path_escaping_the_directory(small_copy: Path) -> None:
    _write_manifest(small_copy, [("../outside.dcm", "0"), ("img_00000.dcm", "1")])
    with pytest.raises(StepError, match="outside.dcm"):
        _prepare(small_copy)


def test_single_class_only(small_copy: Path) -> None:
    _write_manifest(small_copy, [(r["file"], "0") for r in _manifest(small_copy)])
    with pytest.raises(StepError, match=r"manifest\.csv has a single class"):
        _prepare(small_copy)


def test_fewer_than_two_patients(small_copy: Path) -> None:
    by_patient: dict[str, list[str]] = {}
    for row in _manifest(small_copy):
        ds = pydicom.dcmread(small_copy / row["file"], stop_before_pixels=True)
        by_patient.setdefault(ds.PatientID, []).append(row["file"])
    files = next(f for f in by_patient.values() if len(f) >= 2)
    _write_manifest(small_copy, [(files[0], "0"), (files[1], "1")])
    with pytest.raises(StepError, match=r"manifest\.csv covers fewer than 2 patients"):
        _prepare(small_copy)


def test_constant_image_names_the_file(small_copy: Path) -> None:
    ds = pydicom.dcmread(small_copy / "img_00004.dcm")
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, dtype=np.uint16).tobytes()
    ds.save_as(small_copy / "img_00004.dcm")
    with pytest.raises(StepError, match=r"img_00004\.dcm.*constant"):
        _prepare(small_copy)


def test_colour_image_names_the_file(small_copy: Path) -> None:
    ds = pydicom.dcmread(small_copy / "img_00001.dcm")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(small_copy / "img_00001.dcm")
    with pytest.raises(StepError, match=r"img_00001\.dcm.*PALETTE COLOR"):
        _prepare(small_copy)


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
