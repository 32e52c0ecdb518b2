"""C2SP tlog-cosignature (c2sp.org/tlog-cosignature), Ed25519 `cosignature/v1`. Pure.

A cosignature is a signed-note signature line added to a checkpoint by a cosigner (here: a
witness site) stating that, as of its timestamp, this is the largest checkpoint of the log it
has seen that is consistent with the ones before:

- key ID = SHA-256(name || "\\n" || 0x04 || 32-byte Ed25519 public key)[:4];
- vkey = name + "+" + hex(key ID) + "+" + base64(0x04 || public key);
- signature line = "— " + name + " " + base64(key ID || u64 big-endian timestamp || sig);
- signed message = "cosignature/v1\\n" + "time <POSIX seconds, no leading zeroes>\\n" + the
  whole checkpoint body, extension lines included (the spec says they MUST be signed when
  present, though the cosigner vouches only for the first three lines), final newline
  included, signature lines excluded.

The timestamp MUST NOT exceed 2**63 - 1 (zero is allowed); verifiers MAY reject timestamps in
the future, which is left to the caller (no clock here). The message does not commit to the
cosigner's name, so one key must never serve two cosigners: `verify_cosigned` refuses a
witness set in which two names share a key.

Sources read: C2SP/C2SP tlog-cosignature.md (commit 01194db, 2026-06) and signed-note.md
(verifier keys); transparency-dev/formats note/note_cosigv1.go and its test; sigsum-go
pkg/types/tree_head.go and pkg/checkpoint (whose deterministic cosignature is a test vector
in tests/test_cosignature.py); FiloSottile/torchwood cosignature.go (an older snapshot that
signs only the first three lines, as the spec did before extension lines were included).
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ledger import VerificationError
from ledger.keys import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify
from ledger.note import (
    KEY_ID_SIZE,
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    SIGNATURE_PREFIX,
    NoteFormatError,
    _b64decode,
    _is_valid_name,
    parse_checkpoint,
    split_note,
)
from ledger.note import parse_signature_line as _note_signature_line

ALG_COSIGNATURE_V1 = 0x04
COSIGNATURE_HEADER = "cosignature/v1\n"
TIME_PREFIX = "time "
TIMESTAMP_SIZE = 8
MAX_TIMESTAMP = 2**63 - 1
BLOB_SIZE = KEY_ID_SIZE + TIMESTAMP_SIZE + SIGNATURE_SIZE  # 76 bytes

_TIMESTAMP = struct.Struct(">Q")
_KEY_ID_RE = re.compile(r"[0-9a-fA-F]{8}")


@dataclass(frozen=True, kw_only=True)
class Cosignature:
    """One cosignature/v1: the cosigner's name and key ID, its timestamp and Ed25519 signature."""

    name: str
    key_id: bytes
    timestamp: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.key_id, bytes) or len(self.key_id) != KEY_ID_SIZE:
            raise NoteFormatError(f"a key ID is {KEY_ID_SIZE} bytes")
        _check_timestamp(self.timestamp)
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_SIZE:
            raise NoteFormatError(f"an Ed25519 signature is {SIGNATURE_SIZE} bytes")


# --- keys ------------------------------------------------------------------------------------


def cosigner_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || "\\n" || 0x04 || public key)[:4]."""
    _check_name(name)
    _check_public_key(public_key)
    material = name.encode() + b"\n" + bytes([ALG_COSIGNATURE_V1]) + public_key
    return hashlib.sha256(material).digest()[:KEY_ID_SIZE]


def format_cosigner_vkey(identity: Identity) -> str:
    """The cosigner's verifier key: name+hex(key ID)+base64(0x04 || public key)."""
    key_id = cosigner_key_id(identity.name, identity.public_key)
    encoded = base64.b64encode(bytes([ALG_COSIGNATURE_V1]) + identity.public_key).decode()
    return f"{identity.name}+{key_id.hex()}+{encoded}"


def parse_cosigner_vkey(vkey: str) -> tuple[str, bytes]:
    """(name, raw 32-byte key) of a type 0x04 vkey, checking its key ID against the key."""
    if not isinstance(vkey, str):
        raise NoteFormatError("a cosigner key is text")
    name, sep1, rest = vkey.partition("+")
    hex_id, sep2, encoded = rest.partition("+")  # base64 may itself contain '+'
    if not (sep1 and sep2) or not _KEY_ID_RE.fullmatch(hex_id):
        raise NoteFormatError("a cosigner key is <name>+<8 hex digits>+<base64 key>")
    _check_name(name)
    raw = _b64decode(encoded, what="cosigner key")
    if len(raw) != 1 + PUBLIC_KEY_SIZE or raw[0] != ALG_COSIGNATURE_V1:
        raise NoteFormatError("a cosignature/v1 key is type 0x04 and 32 bytes")
    if bytes.fromhex(hex_id) != cosigner_key_id(name, raw[1:]):
        raise NoteFormatError(f"key ID does not match the cosigner key for {name!r}")
    return name, raw[1:]


# --- signing and verifying -------------------------------------------------------------------


def signed_message(checkpoint_body: str, timestamp: int) -> bytes:
    """The bytes a cosigner signs over `checkpoint_body` (the note body, no signatures)."""
    parse_checkpoint(checkpoint_body)  # a well-formed checkpoint body, or NoteFormatError
    _check_timestamp(timestamp)
    text = f"{COSIGNATURE_HEADER}{TIME_PREFIX}{timestamp}\n{checkpoint_body}"
    return _utf8(text, what="checkpoint body")


def cosign(checkpoint_body: str, identity: Identity, *, timestamp: int) -> Cosignature:
    """`identity`'s cosignature of `checkpoint_body` at `timestamp` (POSIX seconds)."""
    message = signed_message(checkpoint_body, timestamp)
    return Cosignature(
        name=identity.name,
        key_id=cosigner_key_id(identity.name, identity.public_key),
        timestamp=timestamp,
        signature=identity.sign(message),
    )


def verify_cosignature(
    checkpoint_body: str, c: Cosignature, *, name: str, public_key: bytes
) -> None:
    """Raise VerificationError unless `c` is `name`'s cosignature over `checkpoint_body`."""
    if not isinstance(c, Cosignature):
        raise VerificationError("not a Cosignature")
    if c.name != name or c.key_id != cosigner_key_id(name, public_key):
        raise VerificationError(f"the cosignature is not by {name!r} with its key")
    try:
        verify(public_key, signed_message(checkpoint_body, c.timestamp), c.signature)
    except VerificationError as exc:
        raise VerificationError(f"the cosignature by {name!r} does not verify") from exc


# --- signature lines and notes ---------------------------------------------------------------


def signature_line(c: Cosignature) -> str:
    """The note signature line: "— <name> base64(key ID || timestamp || signature)\\n"."""
    if not isinstance(c, Cosignature):
        raise NoteFormatError("not a Cosignature")
    blob = c.key_id + _TIMESTAMP.pack(c.timestamp) + c.signature
    return f"{SIGNATURE_PREFIX}{c.name} {base64.b64encode(blob).decode()}\n"


def parse_signature_line(line: str) -> Cosignature:
    """Strictly parse one cosignature/v1 line (with or without its final newline)."""
    if not isinstance(line, str):
        raise NoteFormatError("a cosignature line is text")
    name, blob = _parse_line(line.removesuffix("\n"))
    if len(blob) != BLOB_SIZE:
        raise NoteFormatError(f"a cosignature/v1 is {BLOB_SIZE} bytes, not {len(blob)}")
    return _from_blob(name, blob)


def add_cosignature(note_text: str, c: Cosignature) -> str:
    """The signed checkpoint note with `c`'s line appended. Verifiers of the note's other keys
    ignore the line (c2sp.org/signed-note: unknown keys are skipped)."""
    body, lines = _split(note_text)
    parse_checkpoint(body)
    for line in lines:
        _parse_line(line)
    if len(lines) >= MAX_SIGNATURES:
        raise NoteFormatError(f"a note holds at most {MAX_SIGNATURES} signatures")
    cosigned = note_text + signature_line(c)
    if len(cosigned.encode()) > MAX_NOTE_BYTES:
        raise NoteFormatError(f"cosigned note is over {MAX_NOTE_BYTES} bytes")
    return cosigned


def cosignatures_in(note_text: str) -> list[Cosignature]:
    """Every signature line of the note shaped like a cosignature/v1 (a 76-byte blob with a
    timestamp under 2**63), in order; who made them, and whether they verify, is the caller's
    to check. Other signatures (the log's own, say) are skipped; a malformed line raises."""
    _, lines = _split(note_text)
    found = []
    for line in lines:
        name, blob = _parse_line(line)
        if len(blob) != BLOB_SIZE:
            continue
        try:
            found.append(_from_blob(name, blob))
        except NoteFormatError:
            continue  # a 76-byte signature of another kind
    return found


def verify_cosigned(note_text: str, *, witnesses: Mapping[str, bytes]) -> list[str]:
    """Names of the `witnesses` (name -> raw Ed25519 key) whose cosignature over the note's
    body verifies, in the order of their first line. A line with a witness's name and key ID
    that is not a valid cosignature raises VerificationError; other lines are ignored."""
    expected = _index_witnesses(witnesses)
    body, lines = _split(note_text)
    parse_checkpoint(body)
    names: list[str] = []
    for line in lines:
        name, blob = _parse_line(line)
        key = expected.get((name, blob[:KEY_ID_SIZE]))
        if key is None:
            continue  # another signer's line, or a key this caller does not trust
        if len(blob) != BLOB_SIZE:
            raise VerificationError(f"the line by {name!r} with its key is not a cosignature/v1")
        verify_cosignature(body, _from_blob(name, blob), name=name, public_key=key)
        if name not in names:
            names.append(name)
    return names


# --- helpers ---------------------------------------------------------------------------------


def _split(note_text: str) -> tuple[str, list[str]]:
    """(body, signature lines without newlines) of a signed note, as note.open_note splits."""
    if not isinstance(note_text, str) or len(note_text) > MAX_NOTE_BYTES:
        raise NoteFormatError(f"a signed note is text of at most {MAX_NOTE_BYTES} bytes")
    return split_note(note_text)


def _parse_line(line: str) -> tuple[str, bytes]:
    """(name, decoded blob: key ID and the rest) of one signature line without its newline."""
    name, key_id, rest = _note_signature_line(line)
    return name, key_id + rest


def _from_blob(name: str, blob: bytes) -> Cosignature:
    (timestamp,) = _TIMESTAMP.unpack(blob[KEY_ID_SIZE : KEY_ID_SIZE + TIMESTAMP_SIZE])
    return Cosignature(
        name=name,
        key_id=blob[:KEY_ID_SIZE],
        timestamp=timestamp,
        signature=blob[KEY_ID_SIZE + TIMESTAMP_SIZE :],
    )


def _index_witnesses(witnesses: Mapping[str, bytes]) -> dict[tuple[str, bytes], bytes]:
    if not isinstance(witnesses, Mapping):
        raise VerificationError("witnesses must map names to raw public keys")
    expected: dict[tuple[str, bytes], bytes] = {}
    owner: dict[bytes, str] = {}
    for name, key in witnesses.items():
        expected[(name, cosigner_key_id(name, key))] = key
        other = owner.setdefault(key, name)
        if other != name:  # the signed message does not name the cosigner
            raise VerificationError(f"witnesses {other!r} and {name!r} share one key")
    return expected


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _is_valid_name(name):
        raise NoteFormatError(f"invalid cosigner name {name!r}")
    _utf8(name, what="cosigner name")


def _check_public_key(public_key: object) -> None:
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        raise NoteFormatError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")


def _check_timestamp(timestamp: object) -> None:
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise NoteFormatError("a cosignature timestamp is an integer")
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise NoteFormatError(f"a cosignature timestamp is in 0..{MAX_TIMESTAMP}")


def _utf8(text: str, *, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise NoteFormatError(f"{what} is not valid UTF-8") from exc


__all__ = [
    "ALG_COSIGNATURE_V1",
    "BLOB_SIZE",
    "COSIGNATURE_HEADER",
    "MAX_TIMESTAMP",
    "TIMESTAMP_SIZE",
    "TIME_PREFIX",
    "Cosignature",
    "add_cosignature",
    "cosign",
    "cosignatures_in",
    "cosigner_key_id",
    "format_cosigner_vkey",
    "parse_cosigner_vkey",
    "parse_signature_line",
    "signature_line",
    "signed_message",
    "verify_cosignature",
    "verify_cosigned",
]
