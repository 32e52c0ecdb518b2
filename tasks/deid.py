"""DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, the whole of Table E.1-1.

The table is not retyped here: it is read as data from the ``dicom-anonymizer`` package (Kitware,
BSD), module ``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c``, which ships
Table E.1-1 of DICOM edition 2026c as lists of tags per action. Only those lists are used; the
actions are applied here (that package's anonymizer draws random UIDs and prints).

Where the standard offers a choice (X/Z, Z/D, X/Z/U*...) the choice that keeps no original value
is taken: anything whose action starts with X is removed, Z/D becomes zero-length. These headers
never leave the site: ingest reads pixels from them, so nothing needs to stay Type 1-valid.

None of the options of Table E.1-1 is applied (see :data:`PROFILE`), and no message raised here
ever holds a header value.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _table
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from tasks import Quarantined, StepError
from tasks.cohort import MIN_SECRET_BYTES

TABLE_EDITION = "2026c"
TABLE_NOTE = (
    "DICOM PS3.15 Table E.1-1, edition 2026c, as shipped by dicom-anonymizer (Kitware, BSD) in "
    "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
)
PROFILE_CODE = "113100"
PROFILE_MEANING = "Basic Application Confidentiality Profile"
DEIDENTIFICATION_METHOD = f"DICOM PS3.15 E.1 Basic Profile, Table E.1-1 {TABLE_EDITION}"

# The label the site's UID key has been derived under since medfed's first ingest: kept, so a
# site's replacement UIDs stay what they were.
_UID_KEY_LABEL = b"medfed/ingest/uid-key"
_DUMMY_UID = "2.25.0"

# dicom-anonymizer list name -> Table E.1-1 action code.
_TABLE_LISTS: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def _load_table() -> tuple[dict[tuple[int, int], str], tuple[tuple[int, int, int, int, str], ...]]:
    exact: dict[tuple[int, int], str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, action in _TABLE_LISTS.items():
        for entry in getattr(_table, name):
            key = tuple(int(x) for x in entry)
            # A tag listed under two actions would make the table ambiguous: refuse to guess.
            if key[:2] in exact or any(m[:4] == key for m in masked):
                raise RuntimeError(f"Table E.1-1 lists {entry!r} under two actions.")
            if len(key) == 2:
                exact[(key[0], key[1])] = action
            elif len(key) == 4:
                masked.append((key[0], key[1], key[2], key[3], action))
            else:
                raise RuntimeError(f"Table E.1-1 entry {entry!r} is neither 2 nor 4 numbers.")
    return exact, tuple(masked)


ACTIONS, MASKED_ACTIONS = _load_table()


def _table_source() -> str:
    try:
        return f"dicom-anonymizer {version('dicom-anonymizer')} dicomfields_{TABLE_EDITION}"
    except PackageNotFoundError:  # imported from a source tree without metadata
        return f"dicom-anonymizer dicomfields_{TABLE_EDITION}"


PROFILE: dict[str, object] = {
    "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
    "code": PROFILE_CODE,
    "table": "E.1-1",
    "table_edition": TABLE_EDITION,
    "table_source": _table_source(),
    "options_applied": [],
    "options_not_applied": [
        {"option": "Clean Pixel Data", "code": "113101"},
        {"option": "Clean Recognizable Visual Features", "code": "113102"},
        {"option": "Clean Graphics", "code": "113103"},
        {"option": "Clean Structured Content", "code": "113104"},
        {"option": "Clean Descriptors", "code": "113105"},
        {"option": "Retain Longitudinal Temporal Information With Full Dates", "code": "113106"},
        {
            "option": "Retain Longitudinal Temporal Information With Modified Dates",
            "code": "113107",
        },
        {"option": "Retain Patient Characteristics", "code": "113108"},
        {"option": "Retain Device Identity", "code": "113109"},
        {"option": "Retain UIDs", "code": "113110"},
        {"option": "Retain Safe Private", "code": "113111"},
        {"option": "Retain Institution Identity", "code": "113112"},
    ],
    "private_tags": "removed",
    "uids": "keyed-hash per site",
}


def action_for(tag: int | tuple[int, int] | BaseTag) -> str | None:
    """The Table E.1-1 action code for ``tag``, or None where the table does not list it.

    Exact entries first, then the repeating groups (curves 50xx, overlays 60xx) by their masks.
    """
    t = Tag(tag)
    found = ACTIONS.get((t.group, t.element))
    if found is not None:
        return found
    for group, element, group_mask, element_mask, action in MASKED_ACTIONS:
        if t.group & group_mask == group and t.element & element_mask == element:
            return action
    return None


# --- values -----------------------------------------------------------------------------------

# D: a dummy valid for the VR that can never be mistaken for (or equal) a real value.
_DUMMY_TEXT = "ANONYMIZED"
_DUMMIES: dict[str, object] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "PN": "ANONYMOUS",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "AT": 0,
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
}
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UR", "UT"})
_BYTE_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def _name(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or str(tag)


def _malformed(tag: BaseTag) -> Quarantined:
    return Quarantined("deidentify", "malformed-header", f"attribute {_name(tag)} is malformed")


def _vr_of(elem: DataElement | RawDataElement) -> str:
    """The element's VR without converting its value; ambiguous VRs take their first choice."""
    vr = elem.VR
    # Implicit VR files carry no VR, and UN often hides a known tag: the dictionary knows better.
    if (vr is None or vr == "UN") and dictionary_has_tag(elem.tag):
        vr = dictionary_VR(elem.tag)
    return (vr or "UN").split(" or ")[0]


def _dummy(vr: str) -> object:
    if vr == "SQ":
        return DicomSequence()
    if vr in _BYTE_VRS:
        return b""
    if vr in _TEXT_VRS:
        return _DUMMY_TEXT
    return _DUMMIES.get(vr, _DUMMY_TEXT)


def _empty(vr: str) -> object:
    return DicomSequence() if vr == "SQ" else empty_value_for_VR(vr)


def _uid_key(uid_secret: bytes) -> bytes:
    return hmac.new(uid_secret, _UID_KEY_LABEL, hashlib.sha256).digest()


def _replacement_uid(uid: str, key: bytes) -> str:
    digest = hmac.new(key, uid.encode("ascii", "replace"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _converted(ds: Dataset, tag: BaseTag) -> DataElement:
    # pydicom converts raw bytes on access; whatever it raises means the header is malformed.
    try:
        return ds[tag]
    except Exception as err:  # noqa: BLE001 - any conversion failure is a malformed header
        raise _malformed(tag) from err


def _uid_values(ds: Dataset, tag: BaseTag) -> list[str]:
    """The UIDs an element holds, read from the raw bytes where possible (no conversion)."""
    elem = ds.get_item(tag, keep_deferred=True)
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        try:
            text = elem.value.decode("ascii")
        except UnicodeDecodeError as err:
            raise _malformed(tag) from err
        values: Iterable[object] = text.split("\\")
    else:
        value = _converted(ds, tag).value
        if value is None:
            values = []
        elif isinstance(value, str | bytes):
            values = [value]
        else:
            values = value
    out: list[str] = []
    for v in values:
        if not isinstance(v, str):
            raise _malformed(tag)
        out.append(v.strip("\x00 "))
    return out if any(out) else []


# --- applying the table -----------------------------------------------------------------------


def _replace_uids(ds: Dataset, tag: BaseTag, uid_key: bytes | None) -> None:
    if uid_key is None:
        del ds[tag]
        return
    uids = _uid_values(ds, tag)
    new = [_replacement_uid(u, uid_key) if u else "" for u in uids]
    ds[tag] = DataElement(tag, "UI", new if len(new) > 1 else (new[0] if new else ""))


def _apply(ds: Dataset, tag: BaseTag, action: str, uid_key: bytes | None) -> None:
    if action.startswith("X"):
        del ds[tag]
        return
    vr = _vr_of(ds.get_item(tag, keep_deferred=True))
    if action in ("Z", "Z/D"):
        ds[tag] = DataElement(tag, vr, _empty(vr))
    elif action == "U" or (action == "D" and vr == "UI" and uid_key is not None):
        _replace_uids(ds, tag, uid_key)
    elif action == "D":
        ds[tag] = DataElement(tag, vr, _DUMMY_UID if vr == "UI" else _dummy(vr))
    else:  # a code the table lists but this module does not know: fail closed
        del ds[tag]


def _scrub_element(ds: Dataset, tag: BaseTag, uid_key: bytes | None) -> None:
    if tag.is_private:  # odd groups, private creators included
        del ds[tag]
        return
    action = action_for(tag)
    if action is not None:
        _apply(ds, tag, action, uid_key)
    elif _vr_of(ds.get_item(tag, keep_deferred=True)) == "SQ":
        for item in _converted(ds, tag).value or ():
            if isinstance(item, Dataset):
                _scrub(item, uid_key)


def _scrub(ds: Dataset, uid_key: bytes | None) -> None:
    for key in list(ds.keys()):
        tag = Tag(key)
        try:
            _scrub_element(ds, tag, uid_key)
        except Quarantined:
            raise
        except Exception as err:  # noqa: BLE001 - whatever pydicom raises on odd input
            raise _malformed(tag) from err


def _record_profile(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue = PROFILE_CODE
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = PROFILE_MEANING
    ds.DeidentificationMethodCodeSequence = DicomSequence([code])


def deidentify(
    ds: Dataset, *, pseudonym: str | None = None, uid_secret: bytes | None = None
) -> Dataset:
    """A copy of ``ds`` de-identified by the whole of Table E.1-1; the input is never modified.

    At every nesting level: X... removed, Z and Z/D zero-length, D a dummy for the VR, U a keyed
    ``2.25.`` UID under ``uid_secret`` (removed without one), private tags, curves and overlay
    data removed. Top-level PatientID and PatientName become ``pseudonym`` when given. A value
    the profile must read but cannot raises :class:`~tasks.Quarantined` naming the attribute.
    """
    if not isinstance(ds, Dataset):
        raise StepError("deidentify expects a pydicom Dataset.")
    if uid_secret is not None and (
        not isinstance(uid_secret, bytes) or len(uid_secret) < MIN_SECRET_BYTES
    ):
        raise StepError(f"The UID secret must be at least {MIN_SECRET_BYTES} bytes.")
    if pseudonym is not None and not isinstance(pseudonym, str):
        raise StepError("The pseudonym must be text.")
    uid_key = None if uid_secret is None else _uid_key(uid_secret)
    out = copy.deepcopy(ds)
    _scrub(out, uid_key)
    file_meta = getattr(out, "file_meta", None)
    if isinstance(file_meta, Dataset):
        _scrub(file_meta, uid_key)
    if pseudonym is not None:
        out.PatientID = pseudonym
        out.PatientName = pseudonym
    _record_profile(out)
    return out


# --- burned-in annotation ---------------------------------------------------------------------

_BURNING_MODALITIES: dict[str, str] = {
    "US": "an ultrasound (US)",
    "ES": "an endoscopy (ES)",
    "XC": "an external-camera photography (XC)",
    "GM": "a general microscopy (GM)",
    "SM": "a slide microscopy (SM)",
    "OT": "an other-modality (OT)",
}
_SECONDARY_CAPTURE_UIDS = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)
_VL_PREFIX = "1.2.840.10008.5.1.4.1.1.77."


def _texts(ds: Dataset, keyword: str) -> list[str]:
    """The values of a top-level text attribute, stripped and upper-cased; [] when missing or
    unreadable (a malformed value must not decide anything here, nor crash)."""
    try:
        value = ds[tag_for_keyword(keyword)].value
    except Exception:  # noqa: BLE001 - missing or malformed both read as missing
        return []
    if value is None:
        return []
    items = [value] if isinstance(value, str | bytes) else value
    try:
        texts = [(v.decode("ascii") if isinstance(v, bytes) else str(v)) for v in items]
    except Exception:  # noqa: BLE001 - undecodable reads as missing
        return []
    texts = [t.strip("\x00 ").upper() for t in texts]
    # CS and UI are plain ASCII; anything else is a byte pydicom decoded leniently.
    if not all(t.isascii() and t.isprintable() for t in texts):
        return []
    return [t for t in texts if t]


def _burning_kind(ds: Dataset) -> str | None:
    """Which kind of image commonly has text burned in, in fixed words (never header values)."""
    modality = next(iter(_texts(ds, "Modality")), "")
    sop_class = next(iter(_texts(ds, "SOPClassUID")), "")
    if sop_class in _SECONDARY_CAPTURE_UIDS:
        return "a Secondary Capture"
    if sop_class.startswith(_VL_PREFIX):
        return "a video or photographic"
    if modality == "OT" and "SECONDARY" in _texts(ds, "ImageType"):
        return "a secondary (OT)"
    return _BURNING_MODALITIES.get(modality)


def burned_in_reason(ds: Dataset, *, accept_burned_in: bool) -> str | None:
    """None when the image may be used; else one sentence saying why not (no header values).

    BurnedInAnnotation YES (any case or padding) rejects; so does its absence for modalities and
    SOP classes that commonly burn text into the pixels. ``accept_burned_in`` accepts all.
    """
    if accept_burned_in:
        return None
    burned = _texts(ds, "BurnedInAnnotation")
    if burned:
        if burned[0] == "YES":
            return "BurnedInAnnotation is YES: the pixels may show identifying text."
        return None
    kind = _burning_kind(ds)
    if kind is not None:
        return f"BurnedInAnnotation is missing for {kind} image, which commonly has burned-in text."
    return None


__all__ = [
    "ACTIONS",
    "DEIDENTIFICATION_METHOD",
    "MASKED_ACTIONS",
    "PROFILE",
    "TABLE_EDITION",
    "TABLE_NOTE",
    "action_for",
    "burned_in_reason",
    "deidentify",
]
