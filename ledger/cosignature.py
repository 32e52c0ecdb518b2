"""C2SP tlog-cosignature (c2sp.org/tlog-cosignature), Ed25519 `cosignature/v1`. Pure.

A cosignature is a signed-note signature line added to a checkpoint by a cosigner (here: a
witness site) that checked the checkpoint is consistent with the largest one it saw before:

- key ID = SHA-256(name || "\\n" || 0x04 || 32-byte Ed25519 public key)[:4];
- signature line = "— " + name + " " + base64(key ID || u64 big-endian timestamp || sig);
- signed message = "cosignature/v1\\n" + "time <POSIX seconds, no leading zeroes>\\n" + the
  whole checkpoint body (extension lines included), final newline included.

The message does not commit to the cosigner's name, so one key must never serve two
cosigners; the timestamp must not exceed 2**63 - 1.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ledger import VerificationError
from ledger.keys import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify
from ledger.note import (
    KEY_ID_SIZE,
    SIGNATURE_PREFIX,
    NoteFormatError,
    _b64decode,
    _is_valid_name,
    parse_checkpoint,
)

ALG_COSIGNATURE_V1 = 0x04
COSIGNATURE_HEADER = "cosignature/v1\n"
TIMESTAMP_SIZE = 8
MAX_TIMESTAMP = 2**63 - 1
BLOB_SIZE = KEY_ID_SIZE + TIMESTAMP_SIZE + SIGNATURE_SIZE


@dataclass(frozen=True, kw_only=True)
class Cosignature:
    name: str
    key_id: bytes
    timestamp: int
    signature: bytes


def cosigner_key_id(name: str, public_key: bytes) -> bytes:
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise NoteFormatError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")
    material = name.encode() + b"\n" + bytes([ALG_COSIGNATURE_V1]) + public_key
    return hashlib.sha256(material).digest()[:KEY_ID_SIZE]


def format_cosigner_vkey(identity: Identity) -> str:
    """The cosigner's verifier key: name+hex(key ID)+base64(0x04 || public key)."""
    key = base64.b64encode(bytes([ALG_COSIGNATURE_V1]) + identity.public_key).decode()
    return f"{identity.name}+{cosigner_key_id(identity.name, identity.public_key).hex()}+{key}"


def parse_cosigner_vkey(vkey: str) -> tuple[str, bytes]:
    name, _, rest = vkey.partition("+")
    hex_id, _, encoded = rest.partition("+")
    if not _is_valid_name(name) or len(hex_id) != 2 * KEY_ID_SIZE or not encoded:
        raise NoteFormatError("a cosigner key is <name>+<8 hex digits>+<base64 key>")
    raw = _b64decode(encoded, what="cosigner key")
    if len(raw) != 1 + PUBLIC_KEY_SIZE or raw[0] != ALG_COSIGNATURE_V1:
        raise NoteFormatError("a cosignature/v1 key is type 0x04 and 32 bytes")
    try:
        given = bytes.fromhex(hex_id)
    except ValueError as exc:
        raise NoteFormatError("the cosigner key's ID is not hex") from exc
    if given != cosigner_key_id(name, raw[1:]):
        raise NoteFormatError(f"key ID does not match the cosigner key for {name!r}")
    return name, raw[1:]


def signed_message(checkpoint_body: str, timestamp: int) -> bytes:
    """The bytes a cosigner signs over `checkpoint_body` (the note body, no signatures)."""
    parse_checkpoint(checkpoint_body)  # a well-formed checkpoint body, or NoteFormatError
    _check_timestamp(timestamp)
    return (COSIGNATURE_HEADER + f"time {timestamp}\n" + checkpoint_body).encode()


def cosign(checkpoint_body: str, identity: Identity, *, timestamp: int) -> Cosignature:
    if not _is_valid_name(identity.name):
        raise NoteFormatError(f"invalid cosigner name {identity.name!r}")
    return Cosignature(
        name=identity.name,
        key_id=cosigner_key_id(identity.name, identity.public_key),
        timestamp=timestamp,
        signature=identity.sign(signed_message(checkpoint_body, timestamp)),
    )


def signature_line(c: Cosignature) -> str:
    blob = c.key_id + struct.pack(">Q", c.timestamp) + c.signature
    return f"{SIGNATURE_PREFIX}{c.name} {base64.b64encode(blob).decode()}\n"


def parse_signature_line(line: str) -> Cosignature:
    """Strictly parse one cosignature/v1 line (with or without its final newline)."""
    if not isinstance(line, str) or not line.startswith(SIGNATURE_PREFIX):
        raise NoteFormatError("a cosignature line starts with an em dash and a space")
    name, _, encoded = line[len(SIGNATURE_PREFIX) :].removesuffix("\n").partition(" ")
    if not _is_valid_name(name) or not encoded:
        raise NoteFormatError("malformed cosignature line")
    raw = _b64decode(encoded, what="cosignature")
    if len(raw) != BLOB_SIZE:
        raise NoteFormatError(f"a cosignature/v1 is {BLOB_SIZE} bytes, not {len(raw)}")
    (timestamp,) = struct.unpack(">Q", raw[KEY_ID_SIZE : KEY_ID_SIZE + TIMESTAMP_SIZE])
    _check_timestamp(timestamp)
    return Cosignature(
        name=name,
        key_id=raw[:KEY_ID_SIZE],
        timestamp=timestamp,
        signature=raw[KEY_ID_SIZE + TIMESTAMP_SIZE :],
    )


def verify_cosignature(
    checkpoint_body: str, c: Cosignature, *, name: str, public_key: bytes
) -> None:
    """Raise VerificationError unless `c` is `name`'s cosignature over `checkpoint_body`."""
    if c.name != name or c.key_id != cosigner_key_id(name, public_key):
        raise VerificationError(f"the cosignature is not by {name!r} with its key")
    try:
        verify(public_key, signed_message(checkpoint_body, c.timestamp), c.signature)
    except VerificationError as exc:
        raise VerificationError(f"the cosignature by {name!r} does not verify") from exc


def add_cosignature(note_text: str, c: Cosignature) -> str:
    """A signed note with `c`'s line appended (verifiers of the note's other keys ignore it)."""
    if not note_text.endswith("\n") or "\n\n" not in note_text:
        raise NoteFormatError("not a signed note")
    return note_text + signature_line(c)


def _split(note_text: str) -> tuple[str, list[str]]:
    split = note_text.rfind("\n\n")
    if split < 0 or not note_text.endswith("\n"):
        raise NoteFormatError("not a signed note")
    return note_text[: split + 1], note_text[split + 2 : -1].split("\n")


def cosignatures_in(note_text: str) -> list[Cosignature]:
    """Every line of the note that has the shape of a cosignature/v1 (its verifier decides)."""
    found = []
    for line in _split(note_text)[1]:
        try:
            found.append(parse_signature_line(line))
        except NoteFormatError:
            continue  # another kind of signature (the log's own, say)
    return found


def verify_cosigned(note_text: str, *, witnesses: Mapping[str, bytes]) -> list[str]:
    """Names of the `witnesses` (name -> Ed25519 key) whose cosignature over the note's body
    verifies. A line by a known witness with its key ID that does not verify raises; lines
    of other names or keys are ignored."""
    body, _ = _split(note_text)
    names: list[str] = []
    for c in cosignatures_in(note_text):
        key = witnesses.get(c.name)
        if key is None or c.key_id != cosigner_key_id(c.name, key):
            continue
        verify_cosignature(body, c, name=c.name, public_key=key)
        if c.name not in names:
            names.append(c.name)
    return names


def _check_timestamp(timestamp: int) -> None:
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise NoteFormatError("a cosignature timestamp is an integer")
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise NoteFormatError(f"a cosignature timestamp is in 0..{MAX_TIMESTAMP}")
