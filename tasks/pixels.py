"""DICOM pixels to training images: decode, modality units, a public window, a fixed geometry.

:func:`decode_frames` turns a dataset's pixel data into grayscale frames in modality units
(CT: Hounsfield units), padding pixels NaN. Every way a real file can fail -- a malformed
header, a missing decoder, truncated or undecodable pixel data, an unsupported colour model --
raises :class:`~tasks.Quarantined` with a short code, never another exception, and never with
a header value in the message.

:func:`harmonize` maps one frame to a ``(1, image_size, image_size)`` float32 image in [0, 1]
by a MONAI array pipeline. A modality with a fixed window in the federation's plan is windowed
identically at every site and in every image, so a constant shift in HU stays visible to the
model (a per-image min-max would cancel rescale intercepts and differences between images).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureType,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    SpatialPad,
)
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space, get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tasks import Quarantined, StepError
from tasks.config import ImagingConfig

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour models whose decoded form is RGB: pydicom converts YBR_FULL(_422) to RGB by default,
# and the JPEG 2000 decoders undo the YBR_RCT / YBR_ICT component transform themselves.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
# ITU-R BT.601 luma weights of R, G, B (the Y of JPEG's YCbCr and DICOM's YBR_FULL).
BT601_LUMA = (0.299, 0.587, 0.114)

# The package that gives pydicom a decoder for each compressed transfer syntax. RLE needs none
# (pydicom decodes it itself; pylibjpeg-rle is only faster), but is listed for completeness.
_LIBJPEG, _OPENJPEG = "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"
DECODER_PACKAGES: dict[str, str] = {
    JPEGBaseline8Bit: _LIBJPEG,
    JPEGExtended12Bit: _LIBJPEG,
    JPEGLossless: _LIBJPEG,
    JPEGLosslessSV1: _LIBJPEG,
    JPEGLSLossless: _LIBJPEG,
    JPEGLSNearLossless: _LIBJPEG,
    JPEG2000Lossless: _OPENJPEG,
    JPEG2000: _OPENJPEG,
    HTJ2KLossless: _OPENJPEG,
    HTJ2KLosslessRPCL: _OPENJPEG,
    HTJ2K: _OPENJPEG,
    RLELossless: "pylibjpeg-rle",
}
# Codestreams that end with an EOI / EOC marker (both FF D9): a last fragment without it was
# cut short.
_MARKER_TERMINATED = frozenset(set(DECODER_PACKAGES) - {RLELossless})
_INT = re.compile(r"[+-]?\d+")


def _quarantine(code: str, detail: str, stage: str = "pixels") -> Quarantined:
    return Quarantined(stage, code, detail)


def _malformed(keyword: str, what: str = "malformed") -> Quarantined:
    return _quarantine("malformed-header", f"attribute {keyword} is {what}")


# --- guarded header reads ---------------------------------------------------------------------
# pydicom converts a raw element on first access; a bad value may then raise (strict reading)
# or come back as a plain string (the default: warn). Either way the attribute is named and
# its value never repeated: header values can be identifying.


def _get(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception as err:  # noqa: BLE001 - any conversion failure is a malformed header
        raise _malformed(keyword) from err


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _header_int(
    ds: Dataset, keyword: str, *, default: int | None = None, allowed: tuple[int, ...] = ()
) -> int:
    """A required (or defaulted) integer attribute, at least 1 unless ``allowed`` lists it."""
    value = _get(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise _malformed(keyword, "missing")
        return default
    number = _as_int(value)
    if number is None or (number not in allowed if allowed else number < 1):
        raise _malformed(keyword)
    return number


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    value = _get(ds, keyword)
    if value is None or value == "":
        return None
    number = _as_int(value)
    if number is None:
        raise _malformed(keyword)
    return number


def _header_float(ds: Dataset, keyword: str, default: float) -> float:
    value = _get(ds, keyword)
    if value is None or value == "":
        return default
    number = _as_float(value)
    if number is None:
        raise _malformed(keyword)
    return number


@dataclass(frozen=True)
class _Header:
    keyword: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    frames: int
    photometric: str
    planar: int

    def options(self) -> dict[str, Any]:
        """Decoder options from validated values, overriding pydicom's own (unguarded) reads."""
        opts: dict[str, Any] = {
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "pixel_representation": int(self.signed),
            "number_of_frames": self.frames,
            "photometric_interpretation": self.photometric,
        }
        if self.samples > 1:
            opts["planar_configuration"] = self.planar
        return opts


def _pixel_keyword(ds: Dataset) -> str:
    present = [kw for kw in PIXEL_KEYWORDS if kw in ds]
    if not present:
        raise _quarantine("no-pixel-data", "has no pixel data")
    if len(present) > 1:
        raise _quarantine("malformed-header", "has more than one pixel data attribute")
    return present[0]


def _read_header(ds: Dataset, keyword: str) -> _Header:
    floating = keyword != "PixelData"
    rows = _header_int(ds, "Rows")
    columns = _header_int(ds, "Columns")
    samples = _header_int(ds, "SamplesPerPixel", default=1, allowed=(1, 3))
    widths = {"PixelData": (1, 8, 16, 32, 64), "FloatPixelData": (32,)}.get(keyword, (64,))
    bits = _header_int(ds, "BitsAllocated", allowed=widths)
    stored = _header_int(ds, "BitsStored", default=bits if floating else None)
    if stored > bits:
        raise _malformed("BitsStored")
    representation = _header_int(
        ds, "PixelRepresentation", default=0 if floating else None, allowed=(0, 1)
    )
    # Absent means one frame; 0 (which pydicom reads as 1) is refused with other malformed values.
    frames = _header_int(ds, "NumberOfFrames", default=1)
    value = _get(ds, "PhotometricInterpretation")
    if not value:
        raise _malformed("PhotometricInterpretation", "missing")
    if not isinstance(value, str):
        raise _malformed("PhotometricInterpretation")
    photometric = value.strip().upper()
    planar = _header_int(ds, "PlanarConfiguration", default=0, allowed=(0, 1))
    return _Header(
        keyword=keyword,
        rows=rows,
        columns=columns,
        samples=samples,
        bits_allocated=bits,
        bits_stored=stored,
        signed=representation == 1,
        frames=frames,
        photometric=photometric,
        planar=planar,
    )


def _check_frames(header: _Header, imaging: ImagingConfig) -> None:
    if header.frames > imaging.max_frames:
        raise _quarantine(
            "too-many-frames", f"has more frames than the {imaging.max_frames} the plan allows"
        )
    if header.frames > 1 and imaging.multiframe == "quarantine":
        raise _quarantine("multiframe", "is a multi-frame image; the plan takes single frames")


def _check_photometric(header: _Header, imaging: ImagingConfig) -> bool:
    """True for a colour image; raise for one the plan refuses or a model we cannot read."""
    if header.photometric in MONOCHROME:
        if header.samples != 1:
            raise _malformed("SamplesPerPixel")
        return False
    if header.photometric not in COLOUR:
        raise _quarantine(
            "unsupported-photometric",
            "has a PhotometricInterpretation other than MONOCHROME1/2, RGB, YBR or PALETTE COLOR",
        )
    if header.samples != (1 if header.photometric == "PALETTE COLOR" else 3):
        raise _malformed("SamplesPerPixel")
    if imaging.colour == "quarantine":
        raise _quarantine("colour", "is a colour image; the plan takes grayscale only")
    return True


# --- transfer syntax, decoder, truncation -----------------------------------------------------


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    try:
        tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    except Exception as err:  # noqa: BLE001
        raise _malformed("TransferSyntaxUID") from err
    if tsyntax:
        return UID(str(tsyntax).strip())
    # No file meta (old ACR-NEMA style files): the encoding the dataset was read with is
    # necessarily a native one, since encapsulated data cannot be read without it.
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is None:
        raise _quarantine("unsupported-transfer-syntax", "has no Transfer Syntax UID")
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _decoder(tsyntax: UID) -> Decoder:
    """The pydicom decoder for ``tsyntax``, checked before any decoding is attempted."""
    try:
        decoder = get_decoder(tsyntax)
    except Exception as err:  # noqa: BLE001 - NotImplementedError for unknown/private UIDs
        raise _quarantine(
            "unsupported-transfer-syntax",
            f"has transfer syntax {tsyntax.name} ({tsyntax}), which has no pixel data decoder",
        ) from err
    if not decoder.is_available:
        package = DECODER_PACKAGES.get(tsyntax)
        if package is None:  # a syntax pydicom knows but we have no package name for
            package = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise _quarantine(
            "decoder-missing", f"{tsyntax.name} ({tsyntax}) needs a decoder: install {package}"
        )
    return decoder


def _expected_bytes(header: _Header) -> int:
    bits = header.rows * header.columns * header.samples * header.frames * header.bits_allocated
    length = (bits + 7) // 8
    if header.photometric == "YBR_FULL_422":  # two chroma samples shared by each pixel pair
        length = length // 3 * 2
    return length


def _check_native_length(ds: Dataset, header: _Header) -> None:
    value = ds[header.keyword].value
    if isinstance(value, bytes | bytearray | memoryview) and len(value) < _expected_bytes(header):
        raise _quarantine(
            "truncated-pixel-data",
            f"{header.keyword} is shorter than Rows x Columns x SamplesPerPixel x "
            "BitsAllocated x NumberOfFrames needs",
        )


def _ends_with_eoi(codestream: bytes) -> bool:
    # Encoders pad fragments to even length with NUL or with 0xFF fill bytes after the marker.
    return bytes(codestream[-16:]).rstrip(b"\0\xff").endswith(b"\xff\xd9")


def _check_codestreams(ds: Dataset, header: _Header, tsyntax: UID) -> None:
    """JPEG, JPEG-LS and JPEG 2000 frames end with a marker; without it the frame was cut
    short. Checked before decoding because libjpeg decodes a cut JPEG without complaint."""
    value = ds[header.keyword].value
    if tsyntax not in _MARKER_TERMINATED or not isinstance(value, bytes | bytearray):
        return
    try:
        frames = generate_frames(value, number_of_frames=header.frames)
        complete = all(_ends_with_eoi(frame) for frame in frames)
    except Exception:  # noqa: BLE001 - a broken item structure: the decoder will say more
        return
    if not complete:
        raise _quarantine(
            "truncated-pixel-data", f"{tsyntax.name} pixel data has a frame that is cut short"
        )


def _looks_truncated(ds: Dataset, header: _Header, tsyntax: UID) -> bool:
    """After a decoder failure: is the encapsulated data evidently cut short?"""
    value = ds[header.keyword].value
    if not isinstance(value, bytes | bytearray):
        return False
    try:
        fragments = list(generate_fragments(value))
    except Exception:  # noqa: BLE001 - an item that overruns the buffer
        return True
    fragments = fragments[1:] if value[:4] == b"\xfe\xff\x00\xe0" else fragments  # after BOT
    if len(fragments) < header.frames:  # every frame needs at least one fragment
        return True
    return tsyntax in _MARKER_TERMINATED and not _ends_with_eoi(fragments[-1])


def _decode(ds: Dataset, decoder: Decoder, header: _Header, tsyntax: UID) -> tuple[np.ndarray, str]:
    """Stored values as (frames, rows, cols[, samples]), and the photometric model decoded to."""
    try:
        arr, meta = decoder.as_array(ds, **header.options())
        shape = (header.frames, header.rows, header.columns)
        arr = np.asarray(arr).reshape(shape + ((header.samples,) if header.samples > 1 else ()))
    except Exception as err:  # noqa: BLE001 - decoders raise anything; none may escape
        if decoder.is_encapsulated and _looks_truncated(ds, header, tsyntax):
            raise _quarantine(
                "truncated-pixel-data", f"{tsyntax.name} pixel data ends before its last frame"
            ) from err
        raise _quarantine(
            "undecodable-pixel-data",
            f"{tsyntax.name} pixel data cannot be decoded ({type(err).__name__})",
        ) from err
    return arr, str(meta.get("photometric_interpretation", header.photometric))


# --- stored values to modality units ----------------------------------------------------------


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B, in the units of the RGB samples."""
    return rgb[..., :3].astype(np.float64) @ np.asarray(BT601_LUMA)


def _colour_to_luma(ds: Dataset, arr: np.ndarray, header: _Header, decoded: str) -> np.ndarray:
    if header.photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as err:  # noqa: BLE001 - missing or inconsistent LUT attributes
            raise _malformed("RedPaletteColorLookupTableDescriptor") from err
        return _luma(arr)
    if decoded.startswith("YBR_FULL"):  # decoded raw: pydicom left the conversion to us
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif decoded not in ("RGB", "YBR_RCT", "YBR_ICT"):
        raise _quarantine(
            "unsupported-photometric", f"decodes to {decoded}, not a colour model we convert"
        )
    return _luma(arr)


def _padding_mask(ds: Dataset, stored: np.ndarray, header: _Header) -> np.ndarray | None:
    """Pixels whose STORED value is PixelPaddingValue (or within PixelPaddingRangeLimit)."""
    value = _optional_int(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = _optional_int(ds, "PixelPaddingRangeLimit")

    def as_stored(v: int) -> int:
        # A signed image's padding value written as US holds the two's complement bits.
        if header.signed and 2 ** (header.bits_stored - 1) <= v < 2**header.bits_stored:
            return v - 2**header.bits_stored
        return v

    value = as_stored(value)
    if limit is None:
        return stored == value
    low, high = sorted((value, as_stored(limit)))
    return (stored >= low) & (stored <= high)


def _item(seq: Any, index: int) -> Dataset | None:
    try:
        return seq[index] if seq is not None and len(seq) > index else None
    except Exception:  # noqa: BLE001
        return None


def _transformation(group: Dataset | None) -> Dataset | None:
    """The Pixel Value Transformation item of a functional group item, if any."""
    if group is None:
        return None
    return _item(_get(group, "PixelValueTransformationSequence"), 0)


def _rescale(ds: Dataset, frames: int) -> list[tuple[float, float]]:
    """(slope, intercept) per frame: per-frame functional groups, else shared, else the
    dataset's own Rescale Slope/Intercept (enhanced multi-frame objects keep them nested)."""
    shared = _transformation(_item(_get(ds, "SharedFunctionalGroupsSequence"), 0))
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    out: list[tuple[float, float]] = []
    for index in range(frames):
        item = _transformation(_item(per_frame, index)) or shared or ds
        slope = _header_float(item, "RescaleSlope", 1.0)
        out.append((slope, _header_float(item, "RescaleIntercept", 0.0)))
    return out


def _modality_lut(ds: Dataset, stored: np.ndarray, header: _Header) -> np.ndarray:
    if _get(ds, "ModalityLUTSequence"):
        try:
            return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        except Exception as err:  # noqa: BLE001 - a malformed LUT descriptor or data
            raise _malformed("ModalityLUTSequence") from err
    values = stored.astype(np.float64)
    for index, (slope, intercept) in enumerate(_rescale(ds, header.frames)):
        values[index] = values[index] * slope + intercept
    return values


def decode_frames(ds: Dataset, *, imaging: ImagingConfig) -> np.ndarray:
    """Grayscale frames ``(frames, rows, cols)`` float32 in modality units; padding is NaN.

    Grayscale: the modality LUT (Modality LUT Sequence, or Rescale Slope/Intercept, per frame
    for enhanced multi-frame objects), MONOCHROME1 negated so brighter is always higher, and
    PixelPaddingValue (and PixelPaddingRangeLimit) matched against the stored values. Colour
    (RGB, YBR, PALETTE COLOR) becomes BT.601 luma when the plan says ``colour = "luma"``.
    Raises :class:`~tasks.Quarantined` for any file this cannot be done for.
    """
    keyword = _pixel_keyword(ds)
    header = _read_header(ds, keyword)
    _check_frames(header, imaging)
    colour = _check_photometric(header, imaging)
    tsyntax = _transfer_syntax(ds)
    decoder = _decoder(tsyntax)
    if decoder.is_native:
        _check_native_length(ds, header)
    else:
        _check_codestreams(ds, header, tsyntax)
    stored, decoded = _decode(ds, decoder, header, tsyntax)
    padding = _padding_mask(ds, stored, header) if header.samples == 1 else None
    if colour:
        values = _colour_to_luma(ds, stored, header, decoded)
    else:
        values = _modality_lut(ds, stored, header)
        if header.photometric == "MONOCHROME1":
            values = -values
    values = values.astype(np.float32)
    if padding is not None:
        values[padding] = np.nan
    if np.isinf(values).any() or (padding is None and np.isnan(values).any()):
        raise _quarantine("non-finite-pixels", "has pixel values that are not finite numbers")
    if padding is not None and np.isnan(values[~padding]).any():
        raise _quarantine("non-finite-pixels", "has pixel values that are not finite numbers")
    return values


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm: PixelSpacing, else ImagerPixelSpacing, else the shared
    functional groups' Pixel Measures. None when absent or malformed."""
    candidates: list[tuple[Dataset | None, str]] = [
        (ds, "PixelSpacing"),
        (ds, "ImagerPixelSpacing"),
    ]
    try:
        shared = _item(ds.get("SharedFunctionalGroupsSequence"), 0)
        measures = _item(shared.get("PixelMeasuresSequence"), 0) if shared is not None else None
    except Exception:  # noqa: BLE001
        measures = None
    candidates.append((measures, "PixelSpacing"))
    for item, keyword in candidates:
        try:
            value = item.get(keyword) if item is not None else None
            if value is None or isinstance(value, str | bytes) or len(value) != 2:
                continue
        except Exception:  # noqa: BLE001 - unreadable: treat as absent
            continue
        spacing = tuple(_as_float(v) for v in value)
        if all(s is not None and s > 0 for s in spacing):
            return spacing[0], spacing[1]  # type: ignore[return-value]
        return None  # present but malformed: do not fall back to a different attribute
    return None


# --- harmonize: window, geometry, size --------------------------------------------------------


def _window(values: np.ndarray, modality: str, imaging: ImagingConfig) -> tuple[float, float]:
    window = imaging.windows.get(modality.strip().upper())
    if window is not None:
        return window.center - window.width / 2, window.center + window.width / 2
    low, high = np.nanpercentile(values, imaging.percentiles)
    return float(low), float(high)


def _constant() -> Quarantined:
    return _quarantine(
        "constant-image", "the image is constant (or all padding), nothing to learn from", "image"
    )


def _shape_transforms(
    shape: tuple[int, int], spacing: tuple[float, float] | None, imaging: ImagingConfig
) -> list[Any]:
    fov = imaging.field_of_view_mm
    if fov is None:
        steps: list[Any] = []
        if spacing is not None and abs(spacing[0] - spacing[1]) > 0.01 * max(spacing):
            # Non-square pixels (e.g. CR/US): resample to the finer spacing first, so that a
            # physical circle stays a circle.
            finest = min(spacing)
            shape = (
                max(1, round(shape[0] * spacing[0] / finest)),
                max(1, round(shape[1] * spacing[1] / finest)),
            )
            steps.append(Resize(shape, mode="bilinear"))
        # Pad the shorter axis, centred, so that resizing keeps the aspect ratio.
        side = max(shape)
        steps.append(SpatialPad(spatial_size=(side, side), method="symmetric", mode="constant"))
        return steps
    if spacing is None:
        raise _quarantine(
            "no-pixel-spacing",
            "PixelSpacing is missing; the federation asks for a physical field of view",
            "image",
        )
    size = tuple(max(1, round(fov / s)) for s in spacing)
    return [ResizeWithPadOrCrop(spatial_size=size, method="symmetric", mode="constant")]


def harmonize(
    frame: np.ndarray,
    *,
    modality: str,
    spacing: tuple[float, float] | None,
    imaging: ImagingConfig,
    image_size: int,
) -> np.ndarray:
    """One frame in modality units (NaN = padding) as ``(1, image_size, image_size)`` float32
    in [0, 1]: windowed (the plan's fixed window for ``modality``, else the per-image
    percentile window over non-padding pixels), padding set to 0, resampled to square pixels
    when ``spacing`` says they are not, padded to a square (or
    cropped/padded to ``field_of_view_mm`` using ``spacing``), then resized with area
    interpolation (an average over each output pixel's footprint when shrinking)."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 4:
        raise StepError(f"image_size must be an integer of at least 4, got {image_size!r}.")
    arr = np.asarray(frame, dtype=np.float32)
    if arr.ndim != 2:
        raise StepError(f"expected a 2-D frame, got shape {tuple(arr.shape)}")
    padding = np.isnan(arr)
    values = arr[~padding]
    if values.size == 0 or not np.isfinite(values).all():
        raise _constant() if values.size == 0 else StepError("the frame has infinite values")
    if values.min() == values.max():
        raise _constant()
    low, high = _window(values, modality, imaging)
    if not high > low:
        raise _constant()
    pipeline = Compose(
        [
            ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            EnsureChannelFirst(channel_dim="no_channel"),
            *_shape_transforms(arr.shape, spacing, imaging),
            Resize((image_size, image_size), mode="area"),
            EnsureType(data_type="numpy", dtype=np.float32, track_meta=False),
        ]
    )
    # Padding becomes the window's floor (0) before any geometry: shape padding is 0 too.
    image = pipeline(np.where(padding, low, arr))
    return np.clip(image, 0.0, 1.0)


def image_frames(
    ds: Dataset, *, modality: str, imaging: ImagingConfig, image_size: int
) -> list[np.ndarray]:
    """Every frame of ``ds``, decoded and harmonized: what ingest trains on."""
    spacing = pixel_spacing(ds)
    return [
        harmonize(frame, modality=modality, spacing=spacing, imaging=imaging, image_size=image_size)
        for frame in decode_frames(ds, imaging=imaging)
    ]


__all__ = [
    "BT601_LUMA",
    "DECODER_PACKAGES",
    "decode_frames",
    "harmonize",
    "image_frames",
    "pixel_spacing",
]
