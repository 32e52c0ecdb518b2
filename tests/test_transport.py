"""Signed artifact references: round trips, tampering, replay, wrong signer, atomic writes."""

from __future__ import annotations

import base64
import re
import uuid

import fsspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from pydantic import ValidationError

from ledger import VerificationError, keys
from tasks import IntegrityError, StepError
from tasks import transport as tr

JOB, ROUND, SITE, KIND = "fed-20250101-000000", 3, "site-a", "update"
KEY = f"{JOB}/r0003/{SITE}.ckks"
PAYLOAD = b"\x00ciphertext\xff" * 100

# Signed-message vector: RFC 8785 sorts keys and writes no whitespace.
MESSAGE_FIELDS = {
    "job": "j",
    "round": 1,
    "site": "s",
    "kind": "update",
    "sha256": "ab" * 32,
    "size": 3,
}
MESSAGE_BYTES = (
    b'{"job":"j","kind":"update","round":1,"sha256":"' + b"ab" * 32 + b'","site":"s","size":3}'
)


@pytest.fixture(scope="module")
def site() -> keys.Identity:
    # Fixed seed: Ed25519 signatures are deterministic, so refs are reproducible.
    return keys.Identity(name=SITE, private_key=Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        yield (tmp_path / "store").as_uri()
        return
    url = f"memory://medfed-test-{uuid.uuid4().hex}"
    yield url
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _publish(store: str, signer: keys.Identity, data: bytes = PAYLOAD, **over) -> tr.ArtifactRef:
    fields = {"job": JOB, "round": ROUND, "site": SITE, "kind": KIND} | over
    return tr.publish(store, KEY, data, signer=signer, **fields)


def _fetch(ref: tr.ArtifactRef, signer: keys.Identity, **over) -> bytes:
    fields = {"job": JOB, "round": ROUND, "kind": KIND, "site": SITE} | over
    return tr.fetch(ref, public_key=signer.public_key, **fields)


def _overwrite_raw(uri: str, data: bytes) -> None:
    """Tamper with the stored bytes behind the transport's back."""
    fs, path = url_to_fs(uri)
    fs.pipe_file(path, data)


# ---------------------------------------------------------------- happy path


def test_round_trip(store, site):
    ref = _publish(store, site)
    assert ref.uri == f"{store}/{KEY}"
    assert (ref.size, ref.sha256) == (len(PAYLOAD), tr.sha256_hex(PAYLOAD))
    assert (ref.job, ref.round, ref.site, ref.kind, ref.signer) == (JOB, ROUND, SITE, KIND, SITE)
    assert _fetch(ref, site) == PAYLOAD
    assert _fetch(ref, site, site=None) == PAYLOAD
    fs, path = url_to_fs(ref.uri)
    assert [p for p in fs.find(url_to_fs(store)[1]) if tr.PARTIAL_MARKER in p] == []


def test_ref_json_round_trip_and_frozen(store, site):
    ref = _publish(store, site)
    again = tr.load_ref(ref.model_dump_json())
    assert again == ref
    assert _fetch(again, site) == PAYLOAD
    with pytest.raises(ValidationError):
        ref.round = 4  # type: ignore[misc]


def test_enum_kind_is_its_string(store, site):
    ref = _publish(store, site, kind=tr.ArtifactKind.UPDATE)
    assert ref.kind == "update"
    assert _fetch(ref, site, kind=tr.ArtifactKind.UPDATE) == PAYLOAD


def test_signature_covers_canonical_message(site):
    assert tr.ref_message(**MESSAGE_FIELDS) == MESSAGE_BYTES
    keys.verify(
        site.public_key,
        MESSAGE_BYTES,
        site.sign(tr.ref_message(**dict(reversed(MESSAGE_FIELDS.items())))),
    )


def test_moving_the_store_keeps_the_ref_valid(tmp_path, site):
    ref = _publish((tmp_path / "a").as_uri(), site)
    moved = tmp_path / "b" / KEY
    moved.parent.mkdir(parents=True)
    (tmp_path / "a" / KEY).rename(moved)
    assert _fetch(ref.model_copy(update={"uri": moved.as_uri()}), site) == PAYLOAD


def test_bytes_are_stored_as_given(tmp_path):
    uri = tr.put_bytes(tmp_path.as_uri() + "/", "x/y.bin", b"abc")
    assert uri == f"{tmp_path.as_uri()}/x/y.bin"
    assert (tmp_path / "x" / "y.bin").read_bytes() == b"abc"
    with fsspec.open(uri, "rb") as fh:
        assert fh.read() == b"abc"


# ---------------------------------------------------------------- tampering with the artifact


def test_flipped_byte_in_artifact(store, site):
    ref = _publish(store, site)
    flipped = bytearray(PAYLOAD)
    flipped[17] ^= 0x01
    _overwrite_raw(ref.uri, bytes(flipped))
    with pytest.raises(IntegrityError, match=re.escape(ref.uri) + ".*SHA-256"):
        _fetch(ref, site)


@pytest.mark.parametrize("data", [PAYLOAD[:-1], PAYLOAD + b"\x00", b""])
def test_resized_artifact(store, site, data):
    ref = _publish(store, site)
    _overwrite_raw(ref.uri, data)
    with pytest.raises(IntegrityError, match=re.escape(ref.uri) + f" holds {len(data)} bytes"):
        _fetch(ref, site)


def test_missing_artifact(store, site):
    ref = _publish(store, site)
    fs, path = url_to_fs(ref.uri)
    fs.rm(path)
    with pytest.raises(IntegrityError, match=re.escape(ref.uri) + " cannot be read"):
        _fetch(ref, site)


def test_overwritten_key_invalidates_old_ref(store, site):
    old = _publish(store, site)
    new = _publish(store, site, data=PAYLOAD + b"retry")
    assert old.uri == new.uri
    assert _fetch(new, site) == PAYLOAD + b"retry"
    with pytest.raises(IntegrityError, match=re.escape(old.uri)):
        _fetch(old, site)


# ---------------------------------------------------------------- tampering with the reference


@pytest.mark.parametrize(
    "update",
    [
        {"sha256": tr.sha256_hex(b"something else")},
        {"size": len(PAYLOAD) + 1},
        {"job": "other-job"},
        {"round": ROUND + 1},
        {"site": "site-b"},
        {"kind": "aggregate"},
    ],
)
def test_altered_ref_fails_signature(store, site, update):
    ref = _publish(store, site).model_copy(update=update)
    expect = {k: v for k, v in update.items() if k in ("job", "round", "site", "kind")}
    with pytest.raises(IntegrityError, match=re.escape(ref.uri) + ".*not signed") as info:
        _fetch(ref, site, **expect)
    assert isinstance(info.value.__cause__, VerificationError)


def test_altered_sha_and_matching_bytes_still_fail(store, site):
    """An attacker who swaps the artifact AND fixes up the ref's hash and size is caught."""
    ref = _publish(store, site)
    evil = b"evil update"
    _overwrite_raw(ref.uri, evil)
    forged = ref.model_copy(update={"sha256": tr.sha256_hex(evil), "size": len(evil)})
    with pytest.raises(IntegrityError, match="not signed by the expected key"):
        _fetch(forged, site)


@pytest.mark.parametrize(
    ("expect", "what"),
    [
        ({"round": ROUND + 1}, "round 4"),
        ({"round": ROUND - 1}, "round 2"),
        ({"job": "fed-20250102-000000"}, "job 'fed-20250102-000000'"),
        ({"kind": "aggregate"}, "kind 'aggregate'"),
        ({"site": "site-b"}, "site 'site-b'"),
    ],
)
def test_genuine_ref_replayed_elsewhere_is_rejected(store, site, expect, what):
    ref = _publish(store, site)
    with pytest.raises(IntegrityError, match=re.escape(ref.uri) + ".*not the expected.*" + what):
        _fetch(ref, site, **expect)


def test_wrong_signer_key_is_rejected(store, site):
    ref = _publish(store, site)
    other = keys.generate(SITE)  # same name, different key
    with pytest.raises(IntegrityError, match=re.escape(ref.uri) + ".*not signed"):
        _fetch(ref, other)
    with pytest.raises(IntegrityError, match=re.escape(ref.uri)):
        tr.fetch(ref, public_key=b"short", job=JOB, round=ROUND, kind=KIND)


@pytest.mark.parametrize("signature", ["not base64!", base64.b64encode(b"\x00" * 64).decode()])
def test_bad_signature_encoding_or_value(store, site, signature):
    ref = _publish(store, site).model_copy(update={"signature": signature})
    with pytest.raises(IntegrityError, match=re.escape(ref.uri)):
        _fetch(ref, site)


def test_unvalidated_ref_is_integrity_error(store, site):
    ref = _publish(store, site).model_copy(update={"sha256": "not hex", "round": -1})
    with pytest.raises(IntegrityError, match=re.escape(ref.uri) + ".*malformed"):
        _fetch(ref, site)


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "not json",
        '{"uri": "x", "sha256": "ABC", "size": -1, "job": "", "round": 0, "site": "s", '
        '"kind": "k", "signer": "s", "signature": "x"}',
    ],
)
def test_malformed_ref_json(text):
    with pytest.raises(IntegrityError, match="malformed"):
        tr.load_ref(text)


def test_signature_is_checked_before_reading(tmp_path, site, monkeypatch):
    ref = _publish(tmp_path.as_uri(), site).model_copy(update={"round": 9})

    def boom(*args, **kwargs):
        raise AssertionError("read before the signature was checked")

    monkeypatch.setattr(LocalFileSystem, "cat_file", boom)
    monkeypatch.setattr(LocalFileSystem, "size", boom)
    with pytest.raises(IntegrityError, match="not signed"):
        _fetch(ref, site, round=9)


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("fs_class", [LocalFileSystem, MemoryFileSystem])
@pytest.mark.parametrize("step", ["pipe_file", "mv"])
def test_failed_write_leaves_nothing_at_the_key(tmp_path, monkeypatch, fs_class, step):
    if fs_class is LocalFileSystem:
        store = (tmp_path / "store").as_uri()
    else:
        store = f"memory://medfed-test-{uuid.uuid4().hex}"
    real = getattr(fs_class, step)

    def failing(self, path, *args, **kwargs):
        if step == "pipe_file":  # half the bytes reach the partial file, then the disk fills
            real(self, path, PAYLOAD[: len(PAYLOAD) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs_class, step, failing)
    with pytest.raises(StepError, match=re.escape(f"{store}/{KEY}") + ".*No space") as info:
        _publish(store, keys.generate(SITE))
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    fs, root = url_to_fs(store)
    assert not fs.exists(f"{root}/{KEY}")
    assert fs.find(root) == []  # no partial file left behind either
    if fs_class is MemoryFileSystem and fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.mark.parametrize(
    "key",
    [
        "..",
        "../escape.bin",
        "a/../../escape.bin",
        "a/..",
        "/etc/passwd",
        "",
        "a//b",
        "a/./b",
        ".hidden",
        "a\\..\\b",
        "file:///etc/passwd",
        "x.ckks.partial-1234",
        "white space",
    ],
)
def test_bad_keys_are_rejected(tmp_path, key):
    with pytest.raises(StepError, match=re.escape(repr(key))):
        tr.put_bytes(tmp_path.as_uri(), key, b"x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"round": -1}, "round must be an integer"),
        ({"round": True}, "round must be an integer"),
        ({"size": 2**53}, "size must be an integer"),
        ({"job": ""}, "job must be a non-empty string"),
        ({"sha256": "AB" * 32}, "sha256 must be 64 lowercase hex"),
    ],
)
def test_ref_message_rejects_bad_fields(over, message):
    with pytest.raises(StepError, match=message):
        tr.ref_message(**(MESSAGE_FIELDS | over))
