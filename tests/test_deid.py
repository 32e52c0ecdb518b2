"""tasks.deid: every attribute of Table E.1-1 (2026c), keyed UIDs, burned-in annotation."""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import json
import warnings

import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_files
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import validate_value

from tasks import Quarantined, StepError
from tasks.cohort import MIN_SECRET_BYTES
from tasks.deid import (
    ACTIONS,
    MASKED_ACTIONS,
    PROFILE,
    TABLE_EDITION,
    action_for,
    burned_in_reason,
    deidentify,
)

SECRET = b"s" * 32
OTHER_SECRET = b"o" * 32
PSEUDONYM = "PSEUDO1"
# A sequence the table does not list, so it is kept and its items are scrubbed recursively.
NESTED = Tag("ReferencedSeriesSequence")
# Masked (repeating-group) instances: overlay data and comments, curve data; plus an overlay
# element the table does not list, which must stay.
MASKED = {
    Tag(0x6000, 0x3000): "OW",
    Tag(0x6002, 0x4000): "LT",
    Tag(0x5000, 0x3000): "OB",
    Tag(0x501E, 0x0005): "US",
}
KEPT_OVERLAY_ROWS = Tag(0x6000, 0x0010)


def _marker(prefix: str, tag: Tag) -> str:
    return f"{prefix}{tag.group:04X}{tag.element:04X}"  # 10 chars: fits AE, SH and CS


def _original_value(prefix: str, tag: Tag, vr: str) -> object:
    """A distinctive value valid for ``vr``; text VRs carry the tag's unique marker."""
    marker = _marker(prefix, tag)
    values: dict[str, object] = {
        "DA": "20230405",
        "TM": "123456",
        "DT": "20230405123456",
        "AS": "042Y",
        "DS": "12.5",
        "IS": "42",
        "US": 7,
        "SS": 7,
        "UL": 7,
        "SL": 7,
        "FL": 7.0,
        "FD": 7.0,
        "PN": f"{marker}^X",
        "UR": f"http://example.org/{marker}",
        "UI": f"1.2.999.{1 if prefix == 'MK' else 2}.{tag.group}.{tag.element}",
    }
    if vr in values:
        return values[vr]
    if vr in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
        return marker.encode()
    if vr == "SQ":
        item = Dataset()
        item.CodeMeaning = marker + "S"
        return DicomSequence([item])
    return marker  # AE CS LO LT SH ST UC UT


def _vr(tag: Tag) -> str:
    # 25 X-only tags of edition 2026c are newer than pydicom's dictionary: give them LO, a VR
    # that carries the marker (they are removed whatever their VR).
    return dictionary_VR(tag).split(" or ")[0] if dictionary_has_tag(tag) else "LO"


def _table_tags() -> list[Tag]:
    return [Tag(g, e) for g, e in ACTIONS]


def _full_dataset(prefix: str, *, nested: bool) -> Dataset:
    """Every exact tag of the table, masked-group instances, private tags, a kept sequence.

    Nothing is skipped: group 0002 goes to file_meta (by the caller), command-set group 0000
    and the FFFA/FFFC elements sit in the dataset like any other, and tags newer than pydicom's
    dictionary get a plausible VR (:func:`_vr`)."""
    ds = Dataset()
    for tag in _table_tags():
        if tag.group == 0x0002:  # file meta lives in file_meta, added by the caller
            continue
        vr = _vr(tag)
        ds.add(DataElement(tag, vr, _original_value(prefix, tag, vr)))
    for tag, vr in MASKED.items():
        ds.add(DataElement(tag, vr, _original_value(prefix, tag, vr)))
    ds.add(DataElement(KEPT_OVERLAY_ROWS, "US", 4))
    block = ds.private_block(0x0009, f"{prefix}PRIVCREATOR", create=True)
    block.add_new(0x01, "LO", f"{prefix}PRIVATE01")
    block.add_new(0x02, "SQ", _original_value(prefix + "PS", Tag(0x0009, 0x1002), "SQ"))
    if nested:
        item = _full_dataset(prefix.replace("M", "N"), nested=False)
        ds.add(DataElement(NESTED, "SQ", DicomSequence([item])))
    return ds


def _full_file_dataset() -> Dataset:
    ds = _full_dataset("MK", nested=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _markers(ds: Dataset) -> list[str]:
    """Every marker string an original dataset holds (text values, bytes, private, UIDs)."""
    found: list[str] = []

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif isinstance(elem.value, bytes):
                found.append(elem.value.decode())
            elif elem.VR in ("UI", "PN", "UR", "AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"):
                found.append(str(elem.value))

    walk(ds)
    return [m for m in found if "MK" in m or "NK" in m or m.startswith("1.2.999.")]


def _check_entry(orig: Dataset, out: Dataset, tag: Tag, action: str, *, top: bool) -> None:
    name = f"{tag} {action}"
    if action.startswith("X"):
        assert tag not in out, name
        return
    assert tag in out, name
    before, after = orig[tag], out[tag]
    if top and tag in (Tag("PatientID"), Tag("PatientName")):
        assert str(after.value) == PSEUDONYM, name
    elif action in ("Z", "Z/D"):
        assert after.is_empty, name
    elif action == "D":
        assert after.value != before.value, name
        if after.VR == "SQ":
            assert len(after.value) == 0, name
        else:
            validate_value(after.VR, after.value, validation_mode=config.RAISE)
    elif action == "U":
        assert after.VR == "UI" and after.value != before.value, name
        assert after.value.startswith("2.25.") and len(after.value) <= 64, name
        assert UID(after.value).is_valid, name
    else:
        pytest.fail(f"unexpected action {action} for {tag}")


def _walk_tags(ds: Dataset):
    for elem in ds:
        yield ds, elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk_tags(item)


def _written(ds: Dataset) -> bytes:
    copied = copy.deepcopy(ds)
    # Command-set elements (group 0000) may be in a Dataset but dcmwrite refuses them in files.
    for tag in [t for t in copied.keys() if Tag(t).group == 0]:
        del copied[tag]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buf, copied, enforce_file_format=False)
    return buf.getvalue()


# --- the table --------------------------------------------------------------------------------


def test_table_is_loaded_whole() -> None:
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    assert TABLE_EDITION == "2026c"
    assert len(ACTIONS) + len(MASKED_ACTIONS) == len(table.ALL_TAGS)
    assert set(ACTIONS.values()) <= {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    assert action_for(Tag("PatientName")) == "Z"
    assert action_for((0x0010, 0x0020)) == "Z/D"
    assert action_for(Tag("SOPInstanceUID")) == "U"
    assert action_for(Tag("IconImageSequence")) == "X"
    assert action_for(0x60023000) == "X" and action_for(0x601E4000) == "X"
    assert action_for(0x50100005) == "X"
    assert action_for(KEPT_OVERLAY_ROWS) is None and action_for(Tag("Rows")) is None


def test_profile_record_is_json_safe() -> None:
    record = json.loads(json.dumps(PROFILE))
    assert record["code"] == "113100" and record["table_edition"] == "2026c"
    assert record["table_source"].startswith("dicom-anonymizer ")
    assert record["table_source"].endswith("dicomfields_2026c")
    assert record["options_applied"] == []
    codes = [o["code"] for o in record["options_not_applied"]]
    assert codes == [str(c) for c in range(113101, 113113)]
    assert record["private_tags"] == "removed" and record["uids"] == "keyed-hash per site"


def test_every_table_attribute_is_removed_blanked_or_replaced() -> None:
    ds = _full_file_dataset()
    out = deidentify(ds, pseudonym=PSEUDONYM, uid_secret=SECRET)
    nested_orig, nested_out = ds[NESTED].value[0], out[NESTED].value[0]
    for tag in _table_tags():
        action = ACTIONS[(tag.group, tag.element)]
        if tag.group == 0x0002:
            _check_entry(ds.file_meta, out.file_meta, tag, action, top=True)
            continue
        _check_entry(ds, out, tag, action, top=True)
        _check_entry(nested_orig, nested_out, tag, action, top=False)
    for level in (out, nested_out):
        for tag in MASKED:
            assert tag not in level
        assert level[KEPT_OVERLAY_ROWS].value == 4
    # The file's SOP Instance UID and its file-meta copy still agree.
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID

    assert not [e.tag for _, e in _walk_tags(out) if e.tag.is_private]
    markers = _markers(ds)
    assert len(markers) > 900  # both levels: text, bytes and UID values
    text, written = str(out), _written(out)
    assert "1.2.999." not in text and b"1.2.999." not in written
    leaked = [m for m in markers if m in text or m.encode() in written]
    assert leaked == []


def test_profile_is_recorded_in_the_header() -> None:
    out = deidentify(_full_file_dataset(), uid_secret=SECRET)
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert TABLE_EDITION in out.DeidentificationMethod
    codes = out.DeidentificationMethodCodeSequence
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in codes] == [("113100", "DCM")]


def test_without_pseudonym_names_are_blank_and_without_secret_uids_are_removed() -> None:
    out = deidentify(_full_file_dataset())
    assert out.PatientName == "" and out.PatientID == ""
    for tag in _table_tags():
        if ACTIONS[(tag.group, tag.element)] == "U":
            assert tag not in out and tag not in out[NESTED].value[0]
    assert "MediaStorageSOPInstanceUID" not in out.file_meta


def test_input_is_not_modified() -> None:
    ds = _full_file_dataset()
    before = copy.deepcopy(ds)
    meta_before = ds.file_meta.to_json_dict()
    deidentify(ds, pseudonym=PSEUDONYM, uid_secret=SECRET)
    assert ds == before
    assert ds.file_meta.to_json_dict() == meta_before
    assert ds[NESTED].value[0].PatientName == before[NESTED].value[0].PatientName


# --- UIDs -------------------------------------------------------------------------------------


def _with_uid(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = uid
    ds.FailedSOPInstanceUIDList = [uid, "1.2.3.4"]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def _referencing(uid: str) -> Dataset:
    ds = Dataset()
    item = Dataset()
    item.ReferencedSOPInstanceUID = uid
    ds.ReferencedSeriesSequence = DicomSequence([item])
    return ds


def test_uids_are_consistent_per_secret() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345"
    a = deidentify(_with_uid(uid), uid_secret=SECRET)
    b = deidentify(_referencing(uid), uid_secret=SECRET)
    c = deidentify(_with_uid(uid), uid_secret=OTHER_SECRET)
    new = a.SOPInstanceUID
    assert new != uid and new.startswith("2.25.") and len(new) <= 64 and UID(new).is_valid
    assert a.file_meta.MediaStorageSOPInstanceUID == new
    assert b.ReferencedSeriesSequence[0].ReferencedSOPInstanceUID == new
    assert list(a.FailedSOPInstanceUIDList)[0] == new
    assert list(a.FailedSOPInstanceUIDList)[1] not in (new, "1.2.3.4")
    assert c.SOPInstanceUID != new
    # The key derivation ingest uses: HMAC(secret, label), then HMAC(key, uid), first 16 bytes.
    key = hmac.new(SECRET, b"medfed/ingest/uid-key", hashlib.sha256).digest()
    digest = hmac.new(key, uid.encode(), hashlib.sha256).digest()
    assert new == f"2.25.{int.from_bytes(digest[:16], 'big')}"


def test_bad_arguments_are_step_errors() -> None:
    with pytest.raises(StepError):
        deidentify(_with_uid("1.2.3"), uid_secret=b"x" * (MIN_SECRET_BYTES - 1))
    with pytest.raises(StepError):
        deidentify({"PatientName": "x"})  # type: ignore[arg-type]


# --- malformed values -------------------------------------------------------------------------


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    tag = Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def test_malformed_values_the_table_removes_or_blanks_are_never_read() -> None:
    ds = Dataset()
    _raw(ds, "PatientAge", "AS", b"1A")  # X
    _raw(ds, "PatientSize", "DS", b"not a number")  # X
    _raw(ds, "StudyDate", "DA", b"\xff\xfe\xfd\xfc")  # Z
    _raw(ds, "ContentSequence", "SQ", b"\x01\x02\x03\x04")  # D
    _raw(ds, "NumberOfFrames", "IS", b"1A")  # not in the table: kept, untouched
    out = deidentify(ds, uid_secret=SECRET)
    assert "PatientAge" not in out and "PatientSize" not in out
    assert out.StudyDate == "" and len(out.ContentSequence) == 0
    assert out.get_item(Tag("NumberOfFrames")).value == b"1A"


@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("SOPInstanceUID", "UI", b"1.2.\xffSECRETVALUE"),  # U, not ASCII
        ("ReferencedSeriesSequence", "SQ", b"\xfe\xff"),  # kept, item tag cut short
        # A kept sequence whose item holds a UID (U) that is not ASCII.
        (
            "SOPInstanceUID",
            "SQ",
            b"\xfe\xff\x00\xe0\x14\x00\x00\x00\x08\x00\x18\x00UI\x0c\x00\xffSECRETVALUE",
        ),
    ],
)
def test_malformed_values_the_profile_reads_are_quarantined(
    keyword: str, vr: str, value: bytes
) -> None:
    ds = Dataset()
    _raw(ds, "ReferencedSeriesSequence" if vr == "SQ" else keyword, vr, value)
    with pytest.raises(Quarantined) as caught:
        deidentify(ds, uid_secret=SECRET)
    err = caught.value
    assert (err.stage, err.code) == ("deidentify", "malformed-header")
    assert keyword in err.detail and keyword in str(err)
    assert "SECRETVALUE" not in err.detail and "SECRETVALUE" not in str(err)


@pytest.mark.parametrize(
    "value",
    [
        b"\xfe\xff\x00\xe0\x10\x00\x00\x00\x10\x00\x10\x00PN\xff\x7fSECRETVALUE",
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff\xfe\xff\x00\xe0\x00\x00\x00\x00",
        b"\xfe\xff\x00\xe0\xff\xff\xff\xffSECRETVALUE",
        b"\x08\x00\x18\x00\x04\x00\x00\x00SECR",
    ],
)
def test_garbage_in_a_kept_sequence_is_handled_or_quarantined(value: bytes) -> None:
    ds = Dataset()
    _raw(ds, "ReferencedSeriesSequence", "SQ", value)
    try:
        out = deidentify(ds, uid_secret=SECRET)
    except Quarantined as err:
        assert "SECRETVALUE" not in str(err) and "SECR" not in err.detail
        return
    for item in out.ReferencedSeriesSequence:
        for key in item.keys():
            assert not Tag(key).is_private
            if Tag(key) == Tag("PatientName"):
                assert item.PatientName == ""


# --- burned-in annotation ---------------------------------------------------------------------


def _image(**attrs: object) -> Dataset:
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # " Yes " is not a valid CS: that is the point
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "ds",
    [
        _image(Modality="CT", BurnedInAnnotation="yes"),
        _image(Modality="CT", BurnedInAnnotation=" Yes "),
        _image(Modality="US"),
        _image(Modality="US", BurnedInAnnotation=""),
        _image(Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.7"),
        _image(SOPClassUID="1.2.840.10008.5.1.4.1.1.7.4"),
        _image(SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.4"),
        _image(Modality="OT", ImageType=["DERIVED", "SECONDARY"]),
    ],
)
def test_burned_in_is_rejected(ds: Dataset) -> None:
    reason = burned_in_reason(ds, accept_burned_in=False)
    assert reason is not None and reason.endswith(".") and "BurnedInAnnotation" in reason
    assert burned_in_reason(ds, accept_burned_in=True) is None


@pytest.mark.parametrize(
    "ds",
    [
        _image(Modality="US", BurnedInAnnotation="NO"),
        _image(Modality="CT"),
        _image(),
    ],
)
def test_burned_in_is_accepted(ds: Dataset) -> None:
    assert burned_in_reason(ds, accept_burned_in=False) is None


def test_burned_in_reads_malformed_values_as_missing() -> None:
    ds = Dataset()
    _raw(ds, "Modality", "CS", b"US")
    _raw(ds, "BurnedInAnnotation", "CS", b"\xff\xfe")
    reason = burned_in_reason(ds, accept_burned_in=False)
    assert reason is not None and "missing" in reason and "\xff" not in reason
    ds = Dataset()
    _raw(ds, "Modality", "CS", b"CT")
    _raw(ds, "SOPClassUID", "UI", b"\xff\xfe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom decodes it leniently, with a warning
        assert burned_in_reason(ds, accept_burned_in=False) is None


# --- pydicom's corpus -------------------------------------------------------------------------


def _corpus() -> list[Dataset]:
    datasets = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in get_testdata_files():
            try:
                datasets.append(pydicom.dcmread(path, force=True))
            except Exception:  # noqa: BLE001 - files pydicom itself cannot parse are skipped
                continue
    return datasets


def test_pydicom_corpus_is_deidentified_or_quarantined() -> None:
    done = 0
    for ds in _corpus():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = deidentify(ds, pseudonym="p", uid_secret=b"x" * 32)
            except Quarantined:
                continue
            done += 1
            assert out.PatientName == "p"
            for _, elem in _walk_tags(out):
                assert not elem.tag.is_private
                if elem.keyword == "PatientName" and elem is not out["PatientName"]:
                    assert elem.is_empty
    assert done > 100
