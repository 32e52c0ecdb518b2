"""DICOM pixels to training images (tasks.pixels): modality units, padding, windows, geometry,
colour, multi-frame, decoders, and every file of pydicom's test corpus."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pydicom
import pytest
from pydicom import config as dicom_config
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.pixels import apply_color_lut
from pydicom.pixels.decoders.base import Decoder
from pydicom.tag import Tag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from tasks import Quarantined, StepError
from tasks.config import ImagingConfig, Window
from tasks.pixels import decode_frames, harmonize, image_frames, pixel_spacing

IMAGING = ImagingConfig()
CT_WINDOW = IMAGING.windows["CT"]


def _dataset(
    stored: np.ndarray,
    *,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    spacing: tuple[float, float] | None = (0.5, 0.5),
    **attrs: object,
) -> Dataset:
    """A minimal explicit-little-endian image; ``stored`` is (rows, cols), (frames, rows, cols)
    or, for RGB, (rows, cols, 3). Signed dtypes set PixelRepresentation 1."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality = modality
    colour = photometric == "RGB"
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    shape = stored.shape[:2] if colour else stored.shape[-2:]
    ds.Rows, ds.Columns = shape
    if stored.ndim == 3 and not colour:
        ds.NumberOfFrames = stored.shape[0]
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def _corpus(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _quarantined(ds: Dataset, imaging: ImagingConfig = IMAGING) -> Quarantined:
    with pytest.raises(Quarantined) as info:
        decode_frames(ds, imaging=imaging)
    return info.value


def _harmonize(frame: np.ndarray, modality: str = "CT", size: int = 32, **kw) -> np.ndarray:
    kw.setdefault("spacing", (0.5, 0.5))
    kw.setdefault("imaging", IMAGING)
    return harmonize(frame, modality=modality, image_size=size, **kw)


def _hu_image(rng: np.random.Generator, low: int = -150, high: int = 200) -> np.ndarray:
    return rng.integers(low, high, size=(32, 32)).astype(np.int16)


# --- modality LUT and a fixed window: the acceptance test -----------------------------


def test_rescaled_ct_matches_its_hu_twin_and_intercept_matters() -> None:
    rng = np.random.default_rng(0)
    hu = _hu_image(rng) // 2 * 2  # even, so that (hu + 1024) / 2 is a whole stored value
    stored = ((hu.astype(np.int32) + 1024) // 2).astype(np.uint16)
    rescaled = _dataset(stored, RescaleSlope=2, RescaleIntercept=-1024)
    twin = _dataset(hu, RescaleSlope=1, RescaleIntercept=0)
    shifted = _dataset(stored, RescaleSlope=2, RescaleIntercept=-1000)

    datasets = {"rescaled": rescaled, "twin": twin, "shifted": shifted}
    frames = {k: decode_frames(d, imaging=IMAGING) for k, d in datasets.items()}
    np.testing.assert_array_equal(frames["rescaled"], frames["twin"])
    np.testing.assert_array_equal(frames["twin"][0], hu.astype(np.float32))
    out = {k: _harmonize(v[0]) for k, v in frames.items()}
    np.testing.assert_array_equal(out["rescaled"], out["twin"])
    # A per-image min-max would cancel the intercept; the fixed window does not.
    assert np.abs(out["shifted"] - out["rescaled"]).mean() > 0.04


def test_a_constant_hu_shift_changes_the_image() -> None:
    hu = _hu_image(np.random.default_rng(1), high=190)
    a, b = _harmonize(hu.astype(np.float32)), _harmonize(hu.astype(np.float32) + 50)
    # Every pixel is inside the window [-160, 240] HU, so the shift is 50 / 400 everywhere.
    np.testing.assert_allclose(b - a, 50 / CT_WINDOW.width, atol=1e-5)
    expected = (hu.astype(np.float32) - (CT_WINDOW.center - CT_WINDOW.width / 2)) / 400
    np.testing.assert_allclose(a[0], expected, atol=1e-5)  # 32 -> 32: no resampling


def test_harmonize_output_contract_and_errors() -> None:
    out = _harmonize(np.linspace(-2000, 3000, 40 * 50, dtype=np.float32).reshape(40, 50), size=8)
    assert out.shape == (1, 8, 8) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(Quarantined) as info:
        _harmonize(np.full((8, 8), 40.0, dtype=np.float32))
    assert (info.value.stage, info.value.code) == ("image", "constant-image")
    with pytest.raises(Quarantined, match="constant"):
        _harmonize(np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(StepError, match="image_size"):
        _harmonize(np.eye(8, dtype=np.float32), size=3)


def test_percentile_window_for_a_modality_without_one() -> None:
    frame = np.arange(100, dtype=np.float32).reshape(10, 10)
    imaging = IMAGING.model_copy(update={"percentiles": (10.0, 90.0)})
    out = _harmonize(frame, "MR", size=10, imaging=imaging)[0]
    low, high = np.percentile(frame, (10, 90))
    np.testing.assert_allclose(out, np.clip((frame - low) / (high - low), 0, 1), atol=1e-6)
    with_window = IMAGING.model_copy(update={"windows": {"MR": Window(center=50, width=20)}})
    np.testing.assert_allclose(
        _harmonize(frame, "mr", size=10, imaging=with_window)[0],
        np.clip((frame - 40) / 20, 0, 1),
        atol=1e-6,
    )


# --- padding ----------------------------------------------------------------------------------


def test_padding_is_nan_then_zero_and_leaves_the_percentile_window_alone() -> None:
    rng = np.random.default_rng(2)
    stored = np.zeros((32, 32), dtype=np.uint16)  # a wide border of padding value 0
    stored[8:24, 8:24] = rng.integers(100, 400, size=(16, 16))
    ds = _dataset(stored, modality="MR", PixelPaddingValue=0, RescaleSlope=1, RescaleIntercept=5)
    frame = decode_frames(ds, imaging=IMAGING)[0]
    assert np.isnan(frame).sum() == 32 * 32 - 16 * 16
    interior = stored[8:24, 8:24].astype(np.float32) + 5
    np.testing.assert_array_equal(frame[8:24, 8:24], interior)

    out = _harmonize(frame, "MR")[0]
    border = np.ones((32, 32), dtype=bool)
    border[8:24, 8:24] = False
    assert (out[border] == 0).all()
    low, high = np.percentile(interior, IMAGING.percentiles)  # interior only
    expected = np.clip((interior - low) / (high - low), 0, 1)
    np.testing.assert_allclose(out[8:24, 8:24], expected, atol=1e-5)


def test_padding_value_is_compared_with_stored_values_and_ranges() -> None:
    stored = np.array([[-2000, -1999, 0, 5, 7, 9]] * 2, dtype=np.int16)
    # Stored -2000 would be a different value after rescale: the mask uses stored values.
    ds = _dataset(stored, PixelPaddingValue=-2000, RescaleSlope=2, RescaleIntercept=-10)
    ds["PixelPaddingValue"].VR = "SS"
    frame = decode_frames(ds, imaging=IMAGING)[0]
    assert np.isnan(frame[:, 0]).all() and not np.isnan(frame[:, 1:]).any()
    ranged = _dataset(stored.astype(np.uint16) * 0 + [[1, 2, 3, 4, 5, 6]], PixelPaddingValue=5)
    ranged.PixelPaddingRangeLimit = 3
    frame = decode_frames(ranged, imaging=IMAGING)[0]
    np.testing.assert_array_equal(np.isnan(frame[0]), [False, False, True, True, True, False])


def test_corpus_ct_with_padding() -> None:
    # 693_UNCR.dcm: a CT whose PixelPaddingValue (-2000) fills the corners outside the scan.
    frame = decode_frames(_corpus("693_UNCR.dcm"), imaging=IMAGING)[0]
    assert np.isnan(frame).any() and np.nanmin(frame) >= -1024
    out = _harmonize(frame, size=16)
    assert out.shape == (1, 16, 16) and np.isfinite(out).all()


# --- geometry ---------------------------------------------------------------------------------


def test_aspect_ratio_is_kept() -> None:
    frame = np.full((40, 80), -1000.0, dtype=np.float32)
    frame[10:30, 30:50] = 100.0  # a 20 x 20 square
    out = _harmonize(frame, size=40)[0]
    rows, cols = np.nonzero(out > 0.5)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert height == width == 10  # 80 x 80 after padding, halved
    assert rows.min() == 15 and cols.min() == 15  # centred: 20 rows of padding above
    assert (out[:10] == 0).all() and (out[30:] == 0).all()


def test_non_square_pixels_are_resampled_to_square() -> None:
    """Rows 1 mm apart, columns 0.5 mm: a 20 mm square is 20 rows by 40 columns of pixels,
    and must come out square, not twice as wide."""
    frame = np.full((60, 80), -1000.0, dtype=np.float32)
    frame[20:40, 20:60] = 100.0
    out = _harmonize(frame, size=40, spacing=(1.0, 0.5))[0]
    rows, cols = np.nonzero(out > 0.5)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert abs(int(height) - int(width)) <= 1
    squashed = _harmonize(frame, size=40, spacing=None)[0]  # spacing unknown: pixels as given
    rows, cols = np.nonzero(squashed > 0.5)
    assert np.ptp(cols) + 1 >= 1.8 * (np.ptp(rows) + 1)


@pytest.mark.parametrize("fov", [40.0, 60.0])  # crop (both images are 50 mm wide) and pad
def test_field_of_view_makes_spacings_alike(fov: float) -> None:
    def phantom(spacing: float) -> np.ndarray:
        n = round(50 / spacing)  # a 50 mm image with a centred 20 mm square
        frame = np.full((n, n), -1000.0, dtype=np.float32)
        side = round(20 / spacing)
        start = (n - side) // 2
        frame[start : start + side, start : start + side] = 100.0
        return frame

    imaging = IMAGING.model_copy(update={"field_of_view_mm": fov})
    fine = _harmonize(phantom(0.5), size=20, spacing=(0.5, 0.5), imaging=imaging)
    coarse = _harmonize(phantom(1.0), size=20, spacing=(1.0, 1.0), imaging=imaging)
    np.testing.assert_allclose(fine, coarse, atol=1e-6)
    side = np.sqrt((fine > 0.5).sum())  # the 20 mm square, in output pixels
    assert abs(side - 20 / fov * 20) < 1
    with pytest.raises(Quarantined) as info:
        _harmonize(phantom(1.0), size=20, spacing=None, imaging=imaging)
    assert (info.value.stage, info.value.code) == ("image", "no-pixel-spacing")
    assert "PixelSpacing is missing" in info.value.detail


def test_pixel_spacing_sources() -> None:
    stored = np.eye(4, dtype=np.uint16)
    assert pixel_spacing(_dataset(stored, spacing=(0.7, 0.8))) == (0.7, 0.8)
    assert pixel_spacing(_dataset(stored, spacing=None)) is None
    imager = _dataset(stored, spacing=None, ImagerPixelSpacing=[0.2, 0.3])
    assert pixel_spacing(imager) == (0.2, 0.3)
    enhanced = _dataset(stored, spacing=None)
    measures, shared = Dataset(), Dataset()
    measures.PixelSpacing = [1.5, 1.25]
    shared.PixelMeasuresSequence = [measures]
    enhanced.SharedFunctionalGroupsSequence = [shared]
    assert pixel_spacing(enhanced) == (1.5, 1.25)
    bad = _dataset(stored, spacing=None)
    bad[Tag(0x00280030)] = RawDataElement(Tag(0x00280030), "DS", 6, b"0.5\\x1", 0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pixel_spacing(bad) is None


# --- photometric interpretations -------------------------------------------------------------


def test_monochrome1_is_inverted() -> None:
    stored = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    ds = _dataset(stored, modality="CR", photometric="MONOCHROME1")
    frame = decode_frames(ds, imaging=IMAGING)[0]
    np.testing.assert_array_equal(frame, -stored.astype(np.float32))
    full_range = IMAGING.model_copy(update={"percentiles": (0.0, 100.0)})
    out = _harmonize(frame, "CR", size=4, imaging=full_range)[0]
    assert out[0, 0] == 1 and out[-1, -1] == 0  # the lowest stored value is the brightest


def test_rgb_becomes_bt601_luma() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    ds = _dataset(rgb, modality="US", photometric="RGB", RescaleSlope=10, RescaleIntercept=99)
    frame = decode_frames(ds, imaging=IMAGING)[0]
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(frame, expected, rtol=1e-6)  # and no modality LUT
    np.testing.assert_allclose(frame[0], [76.245, 149.685], rtol=1e-6)

    refuse = IMAGING.model_copy(update={"colour": "quarantine"})
    assert _quarantined(ds, refuse).code == "colour"
    assert _quarantined(_corpus("OBXXXX1A.dcm"), refuse).code == "colour"


def test_ybr_full_is_converted_to_rgb_first() -> None:
    ybr = decode_frames(_corpus("SC_ybr_full_uncompressed.dcm"), imaging=IMAGING)
    rgb = decode_frames(_corpus("SC_rgb.dcm"), imaging=IMAGING)  # the same picture
    np.testing.assert_allclose(ybr, rgb, atol=2.0)


def test_palette_colour_from_the_corpus() -> None:
    ds = _corpus("OBXXXX1A.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    frames = decode_frames(ds, imaging=IMAGING)
    assert frames.shape == (1, 600, 800) and frames.dtype == np.float32
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    np.testing.assert_allclose(frames[0], rgb @ [0.299, 0.587, 0.114], rtol=1e-5)
    assert image_frames(ds, modality="US", imaging=IMAGING, image_size=16)[0].shape == (1, 16, 16)


def test_unsupported_photometric() -> None:
    ds = _dataset(np.eye(4, dtype=np.uint16), photometric="HSV")
    assert _quarantined(ds).code == "unsupported-photometric"


# --- multi-frame ------------------------------------------------------------------------------


def test_three_frames_split_in_order() -> None:
    stored = np.stack([np.eye(8, dtype=np.uint16) * (k + 1) * 100 for k in range(3)])
    ds = _dataset(stored, modality="MR", RescaleSlope=1, RescaleIntercept=0)
    frames = decode_frames(ds, imaging=IMAGING)
    assert frames.shape == (3, 8, 8)
    assert [float(f.max()) for f in frames] == [100.0, 200.0, 300.0]
    images = image_frames(ds, modality="MR", imaging=IMAGING, image_size=8)
    assert len(images) == 3 and all(i.shape == (1, 8, 8) for i in images)


def test_enhanced_per_frame_rescale() -> None:
    stored = np.stack([np.eye(4, dtype=np.uint16) * 10] * 2)
    ds = _dataset(stored, RescaleSlope=1, RescaleIntercept=0)  # ignored: groups take precedence

    def group(slope: float, intercept: float) -> Dataset:
        transform, item = Dataset(), Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = slope, intercept
        item.PixelValueTransformationSequence = [transform]
        return item

    ds.SharedFunctionalGroupsSequence = [group(3, 7)]
    ds.PerFrameFunctionalGroupsSequence = [group(2, -1000), Dataset()]
    frames = decode_frames(ds, imaging=IMAGING)
    np.testing.assert_array_equal(frames[0], np.eye(4) * 20 - 1000)
    np.testing.assert_array_equal(frames[1], np.eye(4) * 30 + 7)  # the shared group


def test_corpus_multiframe_and_frame_limits() -> None:
    ds = _corpus("emri_small.dcm")
    frames = decode_frames(ds, imaging=IMAGING)
    assert frames.shape == (10, 64, 64)
    np.testing.assert_array_equal(frames, ds.pixel_array.astype(np.float32))
    limited = IMAGING.model_copy(update={"max_frames": 9})
    assert _quarantined(ds, limited).code == "too-many-frames"
    assert decode_frames(ds, imaging=IMAGING.model_copy(update={"max_frames": 10})).shape[0] == 10
    single = IMAGING.model_copy(update={"multiframe": "quarantine"})
    assert _quarantined(ds, single).code == "multiframe"
    assert decode_frames(_corpus("MR_small.dcm"), imaging=single).shape == (1, 64, 64)


# --- malformed headers ------------------------------------------------------------------------


def _with_raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> Dataset:
    """``ds`` with ``keyword`` as a file would hold it: raw bytes, converted on first access."""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return ds


@pytest.mark.parametrize("mode", ["warn", "raise"])
def test_malformed_number_of_frames(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    validation = dicom_config.WARN if mode == "warn" else dicom_config.RAISE
    monkeypatch.setattr(dicom_config.settings, "reading_validation_mode", validation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _quarantined(
            _with_raw(_dataset(np.eye(4, dtype=np.uint16)), "NumberOfFrames", "IS", b"1A")
        )
    assert (q.stage, q.code) == ("pixels", "malformed-header")
    assert q.detail == "attribute NumberOfFrames is malformed" and "1A" not in str(q)


def test_malformed_number_of_frames_in_the_corpus() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _quarantined(_corpus("badVR.dcm"))  # NumberOfFrames "1A", as the issue reports
    assert q.code == "malformed-header" and "NumberOfFrames" in q.detail


@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("Rows", "US", b"\x00\x00"),
        ("BitsAllocated", "US", b"\x0c\x00"),
        ("SamplesPerPixel", "US", b"\x02\x00"),
        ("RescaleSlope", "DS", b"abc "),
        ("RescaleIntercept", "DS", b"1e999 "),
        ("PixelPaddingValue", "US", b"\x01"),
    ],
)
def test_malformed_attributes_are_named(keyword: str, vr: str, value: bytes) -> None:
    ds = _dataset(np.eye(4, dtype=np.uint16), RescaleSlope=1, RescaleIntercept=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _quarantined(_with_raw(ds, keyword, vr, value))
    assert q.code == "malformed-header" and keyword in q.detail


# --- decoders, truncation, missing data -------------------------------------------------------

FAMILIES = {
    "jpeg": (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1),
    "jpeg-ls": (JPEGLSLossless, JPEGLSNearLossless),
    "jpeg2000": (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K),
    "rle": (RLELossless,),
}
# Corpus files no decoder here can read: pydicom's own tests expect them to fail with
# pylibjpeg (a libjpeg limitation; a fragment cut at an embedded sequence delimiter).
UNDECODABLE = {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}


def _corpus_datasets() -> list[tuple[str, Dataset]]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files()):
            try:
                out.append((path, pydicom.dcmread(path, force=True)))
            except Exception:  # noqa: BLE001 - not a file pydicom parses: not our concern
                continue
    return out


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, Dataset]]:
    return _corpus_datasets()


def _syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    return None if meta is None else meta.get("TransferSyntaxUID")


def test_every_compressed_corpus_file_decodes(corpus: list[tuple[str, Dataset]]) -> None:
    decoded: collections.Counter[str] = collections.Counter()
    for path, ds in corpus:
        family = next((f for f, uids in FAMILIES.items() if _syntax(ds) in uids), None)
        name = path.rsplit("/", 1)[-1]
        if family is None or "PixelData" not in ds or name in UNDECODABLE:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = decode_frames(ds, imaging=IMAGING)
        assert frames.shape[1:] == (ds.Rows, ds.Columns), name
        assert not np.isinf(frames).any(), name
        decoded[family] += 1
        decoded[_syntax(ds)] += 1
    assert decoded["jpeg"] >= 10 and decoded["jpeg-ls"] >= 4
    assert decoded["jpeg2000"] >= 10 and decoded["rle"] >= 8
    for tsyntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless):
        assert decoded[tsyntax] >= 1, tsyntax.name
    for tsyntax in (JPEGLSNearLossless, JPEG2000Lossless, JPEG2000):  # lossy and lossless
        assert decoded[tsyntax] >= 3, tsyntax.name
    grey_rle = decode_frames(_corpus("MR_small_RLE.dcm"), imaging=IMAGING)
    np.testing.assert_array_equal(grey_rle, decode_frames(_corpus("MR_small.dcm"), imaging=IMAGING))
    lossless = decode_frames(_corpus("MR_small_jp2klossless.dcm"), imaging=IMAGING)
    np.testing.assert_array_equal(lossless, grey_rle)


@pytest.mark.parametrize(
    ("name", "package"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", "pylibjpeg-libjpeg"),
        ("MR_small_jpeg_ls_lossless.dcm", "pylibjpeg-libjpeg"),
        ("MR_small_jp2klossless.dcm", "pylibjpeg-openjpeg"),
        ("JPEG2000.dcm", "pylibjpeg-openjpeg"),
    ],
)
def test_missing_decoder_names_syntax_and_package(
    monkeypatch: pytest.MonkeyPatch, name: str, package: str
) -> None:
    # Patch the public `Decoder.is_available` property for every compressed syntax, as if no
    # plugin had found its package; the decoders' plugin tables themselves are left untouched.
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: self.is_native))
    ds = _corpus(name)
    tsyntax = ds.file_meta.TransferSyntaxUID
    q = _quarantined(ds)
    assert (q.stage, q.code) == ("pixels", "decoder-missing")
    assert q.detail == f"{tsyntax.name} ({tsyntax}) needs a decoder: install {package}"
    assert decode_frames(_corpus("MR_small.dcm"), imaging=IMAGING).shape == (1, 64, 64)


def test_truncated_native_pixel_data() -> None:
    ds = _corpus("MR_small.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    q = _quarantined(ds)
    assert q.code == "truncated-pixel-data" and "PixelData" in q.detail
    assert _quarantined(_corpus("MR_truncated.dcm")).code == "truncated-pixel-data"


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_truncated_encapsulated_pixel_data(name: str) -> None:
    # A codestream cut in half but properly encapsulated: libjpeg would decode it silently.
    ds = _corpus(name)
    codestream = b"".join(bytes(f) for f in generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([codestream[: len(codestream) // 2]])
    assert _quarantined(ds).code == "truncated-pixel-data"
    # Cut through an item: the fragment overruns the buffer.
    ds = _corpus("emri_small_jpeg_2k_lossless.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    assert _quarantined(ds).code == "truncated-pixel-data"


def test_undecodable_names_the_exception_class() -> None:
    ds = _corpus("MR_small_RLE.dcm")
    ds.PixelData = encapsulate([b"\x01" + b"\x00" * 63 + b"garbage!"])
    q = _quarantined(ds)
    assert q.code == "undecodable-pixel-data" and q.detail.endswith("(RuntimeError)")


def test_no_pixel_data_and_unknown_syntax() -> None:
    ds = _dataset(np.eye(4, dtype=np.uint16))
    del ds.PixelData
    q = _quarantined(ds)
    assert (q.stage, q.code, q.detail) == ("pixels", "no-pixel-data", "has no pixel data")
    ds = _dataset(np.eye(4, dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    assert _quarantined(ds).code == "unsupported-transfer-syntax"


def test_corpus_smoke(corpus: list[tuple[str, Dataset]]) -> None:
    """Every file pydicom parses decodes to float32 frames or is quarantined; nothing else."""
    codes: collections.Counter[str] = collections.Counter()
    escaped: list[str] = []
    for path, ds in corpus:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames = decode_frames(ds, imaging=IMAGING)
        except Quarantined as q:
            codes[q.code] += 1
            continue
        except Exception as err:  # noqa: BLE001 - exactly what this test is looking for
            escaped.append(f"{path.rsplit('/', 1)[-1]}: {type(err).__name__}")
            continue
        ok = frames.dtype == np.float32 and frames.ndim == 3 and not np.isinf(frames).any()
        if not ok:
            escaped.append(f"{path.rsplit('/', 1)[-1]}: bad array {frames.dtype} {frames.shape}")
        codes["decoded"] += 1
    assert not escaped, escaped
    assert codes["decoded"] >= 150, codes
    assert codes["malformed-header"] >= 1 and codes["truncated-pixel-data"] >= 1, codes
