"""C2SP signed notes (c2sp.org/signed-note) and tlog checkpoints (c2sp.org/tlog-checkpoint).

Ed25519 (signature type 0x01) only. Wire compatible with golang.org/x/mod/sumdb/note: a note
is its body (text ending in a newline), a blank line, then one line per signature,
``"\u2014 " + key name + " " + base64(key ID || signature) + "\\n"``, each signature over the
body's UTF-8 bytes, final newline included. A verifier key (vkey) is
``name + "+" + hex(key ID) + "+" + base64(0x01 || public key)``.

Every failure to read or trust a note raises `VerificationError`; a note, key or checkpoint
that is malformed raises its subclass `NoteFormatError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ledger import VerificationError
from ledger.keys import ED25519_ALG, PUBLIC_KEY_SIZE, Identity, key_id, verify
from ledger.merkle import HASH_SIZE, MAX_TREE_SIZE

SIGNATURE_PREFIX = "\u2014 "  # em dash, space
KEY_ID_SIZE = 4
# The spec says verifiers MUST accept at least 16 signatures; Go's note.Open stops at 100.
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 1 << 20

_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_KEY_ID_RE = re.compile(r"[0-9a-fA-F]{8}")


class NoteFormatError(VerificationError):
    """A signed note, verifier key or checkpoint is not well-formed."""


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """The body of a tlog checkpoint: origin, tree size, root hash, optional extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin or not _is_clean_line(self.origin):
            raise NoteFormatError("checkpoint origin must be one non-empty line of text")
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 <= self.size <= MAX_TREE_SIZE
        ):
            raise NoteFormatError("checkpoint size must be an integer in 0..2**64-1")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise NoteFormatError(f"checkpoint root hash must be {HASH_SIZE} bytes")
        if isinstance(self.extensions, str):
            raise NoteFormatError("checkpoint extensions must be a sequence of lines")
        extensions = tuple(self.extensions)
        for line in extensions:
            if not isinstance(line, str) or not line or not _is_clean_line(line):
                raise NoteFormatError("checkpoint extension lines must be non-empty lines of text")
        object.__setattr__(self, "extensions", extensions)


@dataclass(frozen=True, kw_only=True)
class Verifier:
    """A trusted Ed25519 note key: its name, 4-byte key ID and raw 32-byte public key."""

    name: str
    key_id: bytes
    public_key: bytes

    def __post_init__(self) -> None:
        if not _is_valid_name(self.name):
            raise NoteFormatError(f"invalid key name {self.name!r}")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_SIZE:
            raise NoteFormatError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")
        if self.key_id != key_id(self.name, self.public_key):
            raise NoteFormatError(f"key ID does not match the key for {self.name!r}")


# --- checkpoints -----------------------------------------------------------------------------


def format_checkpoint(cp: Checkpoint) -> str:
    """The checkpoint's note body: origin, size, base64 root, extension lines, each + newline."""
    lines = [cp.origin, str(cp.size), base64.b64encode(cp.root_hash).decode(), *cp.extensions]
    return "".join(line + "\n" for line in lines)


def parse_checkpoint(body: str) -> Checkpoint:
    """Strictly parse a checkpoint body (as `format_checkpoint` writes it)."""
    if not isinstance(body, str) or not body.endswith("\n"):
        raise NoteFormatError("checkpoint body must be text ending in a newline")
    lines = body[:-1].split("\n")
    if len(lines) < 3:
        raise NoteFormatError("checkpoint needs origin, size and root hash lines")
    origin, size_line, root_line, *extensions = lines
    if not _SIZE_RE.fullmatch(size_line):
        raise NoteFormatError(f"checkpoint size {size_line!r} is not a canonical decimal")
    size = int(size_line)
    root_hash = _b64decode(root_line, what="checkpoint root hash")
    return Checkpoint(origin=origin, size=size, root_hash=root_hash, extensions=tuple(extensions))


# --- verifier keys ---------------------------------------------------------------------------


def format_vkey(identity: Identity) -> str:
    """The verifier key others configure to trust `identity`'s notes."""
    if not _is_valid_name(identity.name):
        raise NoteFormatError(f"invalid key name {identity.name!r}")
    encoded = base64.b64encode(bytes([ED25519_ALG]) + identity.public_key).decode()
    return f"{identity.name}+{identity.key_id.hex()}+{encoded}"


def parse_vkey(vkey: str) -> Verifier:
    """Parse `name+hexkeyid+base64(0x01||key)`, checking the key ID against the key."""
    if not isinstance(vkey, str):
        raise NoteFormatError("a verifier key is text")
    name, sep1, rest = vkey.partition("+")
    hex_id, sep2, key64 = rest.partition("+")  # base64 may itself contain '+'
    if not (sep1 and sep2) or not _KEY_ID_RE.fullmatch(hex_id):
        raise NoteFormatError("a verifier key is <name>+<8 hex digits>+<base64 key>")
    raw = _b64decode(key64, what="verifier key")
    if len(raw) != 1 + PUBLIC_KEY_SIZE or raw[0] != ED25519_ALG:
        raise NoteFormatError("only Ed25519 verifier keys (type 0x01, 32 bytes) are supported")
    return Verifier(name=name, key_id=bytes.fromhex(hex_id), public_key=raw[1:])


# --- notes -----------------------------------------------------------------------------------


def sign_note(body: str, *signers: Identity) -> str:
    """Sign `body` (text ending in a newline) with each signer, in order."""
    _check_text(body)
    if not body.endswith("\n"):
        raise NoteFormatError("note body must end with a newline")
    if not signers:
        raise NoteFormatError("a note needs at least one signer")
    if len(signers) > MAX_SIGNATURES:
        raise NoteFormatError(f"at most {MAX_SIGNATURES} signatures per note")
    message = body.encode()
    lines = []
    for signer in signers:
        if not _is_valid_name(signer.name):
            raise NoteFormatError(f"invalid key name {signer.name!r}")
        blob = base64.b64encode(signer.key_id + signer.sign(message)).decode()
        lines.append(f"{SIGNATURE_PREFIX}{signer.name} {blob}\n")
    note = body + "\n" + "".join(lines)
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise NoteFormatError(f"signed note is over {MAX_NOTE_BYTES} bytes")
    return note


def open_note(text: str, verifiers: Sequence[Verifier]) -> tuple[str, list[str]]:
    """Check a signed note; return its body and the names of the verifiers that signed it.

    Signatures from keys not among `verifiers` (name and key ID both matching) are ignored. A
    signature from a known key that does not verify rejects the whole note, as does a note
    with no valid signature from a known key.
    """
    known = _index_verifiers(verifiers)
    if isinstance(text, str) and len(text) > MAX_NOTE_BYTES:  # cheap bound before scanning
        raise NoteFormatError(f"note is over {MAX_NOTE_BYTES} bytes")
    _check_text(text)
    if len(text.encode()) > MAX_NOTE_BYTES:
        raise NoteFormatError(f"note is over {MAX_NOTE_BYTES} bytes")
    body, lines = split_note(text)
    if len(lines) > MAX_SIGNATURES:
        raise NoteFormatError(f"note has more than {MAX_SIGNATURES} signatures")

    message = body.encode()
    verified: list[str] = []
    for line in lines:
        name, sig_key_id, signature = parse_signature_line(line)
        verifier = known.get((name, sig_key_id))
        if verifier is None:
            continue  # unknown key: ignored, as the spec requires
        # Unlike Go's note.Open, repeated lines from one known key are all checked.
        try:
            verify(verifier.public_key, message, signature)
        except VerificationError as exc:
            raise VerificationError(
                f"signature by {name}+{sig_key_id.hex()} does not verify"
            ) from exc
        if name not in verified:
            verified.append(name)
    if not verified:
        raise VerificationError("note has no valid signature from a trusted key")
    return body, verified


def verify_checkpoint(text: str, vkey: str, *, origin: str | None = None) -> Checkpoint:
    """Open a signed checkpoint with one verifier key and parse its body.

    With `origin`, also require the checkpoint to come from that log.
    """
    body, _ = open_note(text, [parse_vkey(vkey)])
    checkpoint = parse_checkpoint(body)
    if origin is not None and checkpoint.origin != origin:
        raise VerificationError(
            f"checkpoint origin {checkpoint.origin!r} is not the expected {origin!r}"
        )
    return checkpoint


# --- helpers ---------------------------------------------------------------------------------


def split_note(text: str) -> tuple[str, list[str]]:
    """(body, signature lines without their newlines) of a signed note."""
    split = text.rfind("\n\n")
    if split < 0:
        raise NoteFormatError("note has no blank line before its signatures")
    body, block = text[: split + 1], text[split + 2 :]
    if not block or not block.endswith("\n"):
        raise NoteFormatError("note must end with signature lines, each ending in a newline")
    return body, block[:-1].split("\n")


def parse_signature_line(line: str) -> tuple[str, bytes, bytes]:
    """(key name, key ID, signature) of one signature line without its newline."""
    if not line.startswith(SIGNATURE_PREFIX):
        raise NoteFormatError("signature line must start with an em dash and a space")
    name, _, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
    if not _is_valid_name(name) or not encoded:
        raise NoteFormatError(f"malformed signature line for {name!r}")
    raw = _b64decode(encoded, what="signature")
    if len(raw) <= KEY_ID_SIZE:
        raise NoteFormatError("signature is too short")
    return name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:]


def _index_verifiers(verifiers: Sequence[Verifier]) -> dict[tuple[str, bytes], Verifier]:
    known: dict[tuple[str, bytes], Verifier] = {}
    for v in verifiers:
        if not isinstance(v, Verifier):
            raise VerificationError("verifiers must be Verifier objects (see parse_vkey)")
        other = known.setdefault((v.name, v.key_id), v)
        if other.public_key != v.public_key:
            raise VerificationError(f"ambiguous verifier keys for {v.name}+{v.key_id.hex()}")
    return known


def _b64decode(text: str, *, what: str) -> bytes:
    """Strict, canonical standard base64: one encoding per byte string, so notes don't malleate."""
    try:
        raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise NoteFormatError(f"{what} is not valid base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteFormatError(f"{what} is not canonical base64")
    return raw


def _check_text(text: object) -> None:
    """Notes are valid UTF-8 with no ASCII control characters other than newline."""
    if not isinstance(text, str):
        raise NoteFormatError("a note is text")
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise NoteFormatError("note is not valid UTF-8") from exc
    if any(c < " " and c != "\n" for c in text):
        raise NoteFormatError("note contains a control character")


def _is_clean_line(line: str) -> bool:
    return not any(c < " " for c in line)


def _is_valid_name(name: object) -> bool:
    """Non-empty, no Unicode spaces, no '+', no control characters (as Go's isValidName)."""
    return (
        isinstance(name, str)
        and bool(name)
        and "+" not in name
        and not any(c.isspace() or c < " " for c in name)
    )


__all__ = [
    "KEY_ID_SIZE",
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "SIGNATURE_PREFIX",
    "Checkpoint",
    "NoteFormatError",
    "Verifier",
    "format_checkpoint",
    "format_vkey",
    "open_note",
    "parse_signature_line",
    "parse_checkpoint",
    "parse_vkey",
    "sign_note",
    "split_note",
    "verify_checkpoint",
]
