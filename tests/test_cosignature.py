"""C2SP tlog-cosignature (cosignature/v1, Ed25519).

What medfed writes is checked by an independent signer and verifier written here from the
spec text (c2sp.org/tlog-cosignature, C2SP/C2SP commit 01194db) with nothing of medfed's;
published vectors: sigsum-go's deterministic cosignature, the spec's example line and message,
transparency-dev/formats' vkey and timestamp vectors. Tampered cases sit next to valid ones.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import VerificationError, cosignature, keys, note
from ledger.note import NoteFormatError


def _identity(name: str, seed_byte: int) -> keys.Identity:
    seed = bytes([seed_byte]) * 32
    return keys.Identity(name=name, private_key=Ed25519PrivateKey.from_private_bytes(seed))


LOG = _identity("medfed-log", 1)
WITNESS = _identity("st-mary", 2)
OTHER = _identity("st-mary", 3)  # same name, another key
LAKESIDE = _identity("lakeside", 4)
LOG_VKEY = note.parse_vkey(note.format_vkey(LOG))
BODY = note.format_checkpoint(
    note.Checkpoint(origin="medfed.local/demo", size=46, root_hash=bytes(range(32)))
)
EXT_BODY = note.format_checkpoint(
    note.Checkpoint(
        origin="medfed.local/demo", size=46, root_hash=bytes(range(32)), extensions=("round 7",)
    )
)
NOTE = note.sign_note(BODY, LOG)
T = 1_764_950_000


# --- an independent signer and verifier, written from the spec text (no ledger.cosignature) --


def spec_key_id(name: str, public_key: bytes) -> bytes:
    # "SHA-256(<name> || "\n" || 0x04 || 32-byte Ed25519 cosigner public key)[:4]"
    return hashlib.sha256(name.encode() + b"\n" + b"\x04" + public_key).digest()[:4]


def spec_message(body: str, timestamp: int) -> bytes:
    # "two newline terminated lines (one header line and one timestamp line) followed by the
    # whole note body of the cosigned checkpoint (including the final newline, but not
    # including any signature lines)"; header "cosignature/v1"; "time" SP decimal.
    return b"cosignature/v1\n" + b"time " + str(timestamp).encode() + b"\n" + body.encode()


def spec_cosign(body: str, seed: bytes, name: str, timestamp: int) -> str:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes_raw()
    # timestamped_signature: u64 timestamp (big-endian, RFC 8446 3.3) || 64-byte signature;
    # the note signature is base64(32-bit key ID || that).
    blob = spec_key_id(name, public) + struct.pack(">Q", timestamp)
    blob += key.sign(spec_message(body, timestamp))
    return "\u2014 " + name + " " + base64.b64encode(blob).decode() + "\n"


def spec_verify(note_text: str, name: str, public_key: bytes) -> int | None:
    """The timestamp of `name`'s valid cosignature on the note, None when it has no line with
    that name and key ID; raises InvalidSignature for such a line that does not verify."""
    split = note_text.rindex("\n\n")
    body, signatures = note_text[: split + 1], note_text[split + 2 :]
    key_id = spec_key_id(name, public_key)
    for line in signatures.splitlines():
        dash, line_name, blob64 = line.split(" ")
        assert dash == "\u2014"
        blob = base64.b64decode(blob64, validate=True)
        if line_name != name or blob[:4] != key_id:
            continue  # "ignore any signature lines that don't match the name and key ID"
        if len(blob) != 4 + 8 + 64:
            raise InvalidSignature("not a cosignature/v1")
        (timestamp,) = struct.unpack(">Q", blob[4:12])
        if timestamp > 2**63 - 1:  # "It MUST NOT exceed 2^63 - 1"
            raise InvalidSignature("timestamp out of range")
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            blob[12:], spec_message(body, timestamp)
        )
        return timestamp
    return None


def spec_vkey(name: str, public_key: bytes) -> str:
    # signed-note vkey with signature type 0x04.
    encoded = base64.b64encode(b"\x04" + public_key).decode()
    return f"{name}+{spec_key_id(name, public_key).hex()}+{encoded}"


def _seed(identity: keys.Identity) -> bytes:
    return identity.private_key.private_bytes_raw()


# --- published vectors -----------------------------------------------------------------------

# sigsum-go, pkg/checkpoint/checkpoint_test.go (TestCheckpointCosignVerify and
# TestCheckpointVerifyCosignatureByKey; github.com/sigsum/sigsum-go, file at commit dc2785a):
# Ed25519 seed {17, 0, ..., 0}, key name "example.org/witness", timestamp 1234, over the
# checkpoint "example.org/log", size 10, root hash {28, 14, 71, 0, ...}. Ed25519 is
# deterministic, so the line is reproduced byte for byte. The test's other lines: another key
# ID, another key name, and a base64 that does not decode.
SIGSUM_SEED = bytes([17]) + bytes(31)
SIGSUM_BODY = "example.org/log\n10\nHA5HAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
SIGSUM_LINE = (
    "\u2014 example.org/witness ys8uUAAAAAAAAATSftMzceM8zssdZ9jin9SjwIxzx9iADMf63VqirX2hafol9Rsq"
    "NqbofIz0LVRqHXI2kpEBSki5RTXFtxz1vo9+Cg==\n"
)
SIGSUM_OTHER_KEY_ID = SIGSUM_LINE.replace(" ys8u", " yX8u")
SIGSUM_OTHER_NAME = SIGSUM_LINE.replace("example.org/witness ", "example.org/witness-2 ")
SIGSUM_BAD_BASE64 = SIGSUM_LINE.replace("+Cg==", "+CgXX")

# c2sp.org/tlog-cosignature's example (its example message states the time 1679315147).
SPEC_BODY = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
SPEC_LINE = (
    "\u2014 witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlr"
    "DJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
)

# transparency-dev/formats, note/note_cosigv1_test.go (TestCoSigV1NewVerifier and
# TestCoSigV1Timestamp): a native 0x04 vkey, a 0x01 vkey, a cosignature blob whose timestamp is
# 1727964367, and a plain (68-byte) note signature.
FORMATS_VKEY_04 = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
FORMATS_VKEY_01 = "TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6"
FORMATS_COSIG = (
    "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFiEB"
    "YJXORmnFBOBA=="
)
FORMATS_PLAIN_SIG = (
    "eQjRQm6eSKzFoiYalgwCPXu2y3ijtg68is9M46JKxuZB+dRfTmeQeDBoXnvxZx2ugnkyV+MUMLXpWs1hPb/W/4xkNQY="
)


def test_sigsum_vector_is_reproduced_and_verifies():
    witness = keys.Identity(
        name="example.org/witness", private_key=Ed25519PrivateKey.from_private_bytes(SIGSUM_SEED)
    )
    c = cosignature.cosign(SIGSUM_BODY, witness, timestamp=1234)
    assert cosignature.signature_line(c) == SIGSUM_LINE
    assert spec_cosign(SIGSUM_BODY, SIGSUM_SEED, "example.org/witness", 1234) == SIGSUM_LINE
    public = witness.public_key
    cosignature.verify_cosignature(SIGSUM_BODY, c, name="example.org/witness", public_key=public)
    cosigned = SIGSUM_BODY + "\n" + SIGSUM_OTHER_KEY_ID + SIGSUM_LINE + SIGSUM_OTHER_NAME
    assert spec_verify(cosigned, "example.org/witness", public) == 1234
    assert cosignature.verify_cosigned(cosigned, witnesses={"example.org/witness": public}) == [
        "example.org/witness"
    ]
    # sigsum's own tamper: timestamp + 1 no longer verifies.
    bumped = cosignature.Cosignature(
        name=c.name, key_id=c.key_id, timestamp=1235, signature=c.signature
    )
    with pytest.raises(VerificationError):
        cosignature.verify_cosignature(
            SIGSUM_BODY, bumped, name="example.org/witness", public_key=public
        )
    with pytest.raises(NoteFormatError):  # medfed's parser is strict where sigsum skips
        cosignature.parse_signature_line(SIGSUM_BAD_BASE64)


def test_spec_example_message_and_line():
    assert cosignature.signed_message(SPEC_BODY, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\n" + SPEC_BODY.encode()
    )
    assert cosignature.signed_message(SPEC_BODY, 1679315147) == spec_message(SPEC_BODY, 1679315147)
    c = cosignature.parse_signature_line(SPEC_LINE)
    assert c.name == "witness.example.com/w1"
    assert c.timestamp == 1679315147
    assert c.key_id.hex() == "8d66cf3f" and len(c.signature) == 64
    assert cosignature.signature_line(c) == SPEC_LINE


def test_transparency_dev_formats_vectors():
    name, public = cosignature.parse_cosigner_vkey(FORMATS_VKEY_04)
    assert name == "remora.n621.de" and len(public) == 32
    assert spec_key_id(name, public).hex() == "da77ade7"
    assert cosignature.cosigner_key_id(name, public).hex() == "da77ade7"
    with pytest.raises(NoteFormatError):  # a 0x01 note key is not a cosigner key here
        cosignature.parse_cosigner_vkey(FORMATS_VKEY_01)
    c = cosignature.parse_signature_line(f"\u2014 some.witness {FORMATS_COSIG}")
    assert c.timestamp == 1727964367
    with pytest.raises(NoteFormatError):
        cosignature.parse_signature_line(f"\u2014 some.log {FORMATS_PLAIN_SIG}")


# --- medfed against the independent implementation, both ways --------------------------------


@pytest.mark.parametrize("body", [BODY, EXT_BODY], ids=["plain", "extension-line"])
def test_medfed_cosignature_verifies_independently(body):
    c = cosignature.cosign(body, WITNESS, timestamp=T)
    assert cosignature.signed_message(body, T) == spec_message(body, T)
    assert cosignature.signature_line(c) == spec_cosign(body, _seed(WITNESS), "st-mary", T)
    cosigned = cosignature.add_cosignature(note.sign_note(body, LOG), c)
    assert spec_verify(cosigned, "st-mary", WITNESS.public_key) == T
    assert spec_verify(cosigned, "st-mary", OTHER.public_key) is None  # another key's ID


def test_independent_cosignature_verifies_in_medfed():
    line = spec_cosign(EXT_BODY, _seed(LAKESIDE), "lakeside", T)
    c = cosignature.parse_signature_line(line)
    cosignature.verify_cosignature(EXT_BODY, c, name="lakeside", public_key=LAKESIDE.public_key)
    cosigned = note.sign_note(EXT_BODY, LOG) + line
    assert cosignature.verify_cosigned(cosigned, witnesses={"lakeside": LAKESIDE.public_key}) == [
        "lakeside"
    ]


def test_vkey_follows_the_spec():
    vkey = cosignature.format_cosigner_vkey(WITNESS)
    assert vkey == spec_vkey("st-mary", WITNESS.public_key)
    assert cosignature.parse_cosigner_vkey(vkey) == ("st-mary", WITNESS.public_key)
    assert cosignature.cosigner_key_id("st-mary", WITNESS.public_key) != WITNESS.key_id  # 0x01
    name, key_id, key = vkey.split("+", 2)
    for bad in [
        note.format_vkey(WITNESS),  # type 0x01
        f"{name}+00000000+{key}",  # wrong key ID
        f"lakeside+{key_id}+{key}",  # the ID is for another name
        f"{name}+{key_id[:7]}+{key}",  # short ID
        f"{name}+{key_id}",  # no key
        f"{name}+{key_id}+{key}=",  # not canonical base64
        f"{name}+{key_id}+" + base64.b64encode(b"\x04" + bytes(31)).decode(),  # short key
        f"st mary+{key_id}+{key}",  # a space in the name
    ]:
        with pytest.raises(NoteFormatError):
            cosignature.parse_cosigner_vkey(bad)


# --- the cosigned note -----------------------------------------------------------------------


def test_cosigned_note_still_opens_with_the_log_key():
    cosigned = NOTE
    for witness in (WITNESS, LAKESIDE):
        cosigned = cosignature.add_cosignature(
            cosigned, cosignature.cosign(BODY, witness, timestamp=T)
        )
    assert cosigned.startswith(NOTE)
    assert note.open_note(cosigned, [LOG_VKEY]) == (BODY, ["medfed-log"])
    assert note.verify_checkpoint(cosigned, note.format_vkey(LOG)).size == 46
    witnesses = {"st-mary": WITNESS.public_key, "lakeside": LAKESIDE.public_key}
    assert cosignature.verify_cosigned(cosigned, witnesses=witnesses) == ["st-mary", "lakeside"]
    assert [c.name for c in cosignature.cosignatures_in(cosigned)] == ["st-mary", "lakeside"]
    # The log's own signature is still checked: a changed body fails it.
    with pytest.raises(VerificationError):
        note.open_note(cosigned.replace("\n46\n", "\n47\n"), [LOG_VKEY])


def test_unknown_and_foreign_lines_are_ignored():
    cosigned = cosignature.add_cosignature(NOTE, cosignature.cosign(BODY, LAKESIDE, timestamp=T))
    assert cosignature.verify_cosigned(cosigned, witnesses={"st-mary": WITNESS.public_key}) == []
    # The witness's plain note signature (type 0x01) has another key ID: not a cosignature.
    both = note.sign_note(BODY, LOG, WITNESS)
    assert cosignature.verify_cosigned(both, witnesses={"st-mary": WITNESS.public_key}) == []
    assert cosignature.cosignatures_in(both) == []
    assert spec_verify(both, "st-mary", WITNESS.public_key) is None


def test_repeated_cosignatures_count_once_and_all_are_checked():
    c1 = cosignature.cosign(BODY, WITNESS, timestamp=T)
    c2 = cosignature.cosign(BODY, WITNESS, timestamp=T + 60)
    cosigned = cosignature.add_cosignature(cosignature.add_cosignature(NOTE, c1), c2)
    witnesses = {"st-mary": WITNESS.public_key}
    assert cosignature.verify_cosigned(cosigned, witnesses=witnesses) == ["st-mary"]
    bad = cosignature.add_cosignature(NOTE, c1) + _resign_timestamp(
        cosignature.signature_line(c2), T + 61
    )
    with pytest.raises(VerificationError):
        cosignature.verify_cosigned(bad, witnesses=witnesses)


# --- tampered cosignatures, side by side with the valid one ----------------------------------


def _flip(line: str, at: int) -> str:
    prefix, blob64 = line.rstrip("\n").rsplit(" ", 1)
    blob = bytearray(base64.b64decode(blob64))
    blob[at] ^= 0x01
    return f"{prefix} {base64.b64encode(bytes(blob)).decode()}\n"


def _resign_timestamp(line: str, timestamp: int) -> str:
    """The same signature, claimed at another time."""
    prefix, blob64 = line.rstrip("\n").rsplit(" ", 1)
    blob = base64.b64decode(blob64)
    blob = blob[:4] + struct.pack(">Q", timestamp) + blob[12:]
    return f"{prefix} {base64.b64encode(blob).decode()}\n"


def _rename(line: str, name: str, public_key: bytes) -> str:
    """The same timestamped signature, relabelled as `name` with the key ID `public_key` has."""
    _, blob64 = line.rstrip("\n").rsplit(" ", 1)
    blob = spec_key_id(name, public_key) + base64.b64decode(blob64)[4:]
    return f"\u2014 {name} {base64.b64encode(blob).decode()}\n"


GOOD_LINE = spec_cosign(BODY, _seed(WITNESS), "st-mary", T)
EXT_LINE = spec_cosign(EXT_BODY, _seed(WITNESS), "st-mary", T)
OTHER_ROOT = note.format_checkpoint(
    note.Checkpoint(origin="medfed.local/demo", size=46, root_hash=bytes(32))
)

# (case, checkpoint body, cosignature line, does it verify for st-mary's key)
CASES = [
    ("valid", BODY, GOOD_LINE, True),
    ("signature bit flipped", BODY, _flip(GOOD_LINE, 40), False),
    ("timestamp bit flipped", BODY, _flip(GOOD_LINE, 11), False),
    ("timestamp changed", BODY, _resign_timestamp(GOOD_LINE, T + 1), False),
    ("size changed", BODY.replace("\n46\n", "\n45\n"), GOOD_LINE, False),
    ("root changed", OTHER_ROOT, GOOD_LINE, False),
    ("origin changed", BODY.replace("demo", "demp"), GOOD_LINE, False),
    ("valid, extension line", EXT_BODY, EXT_LINE, True),
    ("extension line changed", EXT_BODY.replace("round 7", "round 8"), EXT_LINE, False),
    ("extension line removed", BODY, EXT_LINE, False),
    # Signed over the first three lines only (as torchwood once did), or the log added the
    # extension line after the cosignature: the spec requires extension lines to be signed.
    ("extension line not signed", EXT_BODY, GOOD_LINE, False),
    ("timestamp 0", BODY, spec_cosign(BODY, _seed(WITNESS), "st-mary", 0), True),
    ("timestamp 2**63-1", BODY, spec_cosign(BODY, _seed(WITNESS), "st-mary", 2**63 - 1), True),
]


@pytest.mark.parametrize(
    ("body", "line", "valid"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_tampered_cases_fail_both_verifiers(body, line, valid):
    cosigned = note.sign_note(body, LOG) + line
    witnesses = {"st-mary": WITNESS.public_key}
    c = cosignature.parse_signature_line(line)
    if valid:
        assert spec_verify(cosigned, "st-mary", WITNESS.public_key) == c.timestamp
        assert cosignature.verify_cosigned(cosigned, witnesses=witnesses) == ["st-mary"]
        cosignature.verify_cosignature(body, c, name="st-mary", public_key=WITNESS.public_key)
        return
    with pytest.raises(InvalidSignature):
        spec_verify(cosigned, "st-mary", WITNESS.public_key)
    with pytest.raises(VerificationError):
        cosignature.verify_cosigned(cosigned, witnesses=witnesses)
    with pytest.raises(VerificationError):
        cosignature.verify_cosignature(body, c, name="st-mary", public_key=WITNESS.public_key)


def test_wrong_key_or_name_or_key_id():
    c = cosignature.cosign(BODY, WITNESS, timestamp=T)
    cosignature.verify_cosignature(BODY, c, name="st-mary", public_key=WITNESS.public_key)
    with pytest.raises(VerificationError):  # same name, another key
        cosignature.verify_cosignature(BODY, c, name="st-mary", public_key=OTHER.public_key)
    with pytest.raises(VerificationError):  # the right key, another name
        cosignature.verify_cosignature(BODY, c, name="lakeside", public_key=WITNESS.public_key)
    flipped_id = cosignature.parse_signature_line(_flip(GOOD_LINE, 0))
    with pytest.raises(VerificationError):
        cosignature.verify_cosignature(
            BODY, flipped_id, name="st-mary", public_key=WITNESS.public_key
        )
    # A flipped key ID is another key's line to a note verifier: ignored, never accepted.
    bad = NOTE + _flip(GOOD_LINE, 0)
    assert spec_verify(bad, "st-mary", WITNESS.public_key) is None
    assert cosignature.verify_cosigned(bad, witnesses={"st-mary": WITNESS.public_key}) == []
    # Wrong key configured: its key ID matches no line.
    assert (
        cosignature.verify_cosigned(NOTE + GOOD_LINE, witnesses={"st-mary": OTHER.public_key}) == []
    )


def test_the_signed_message_does_not_name_the_cosigner():
    # Relabelled under another name (key ID recomputed), the signature still verifies with the
    # same key: one key must never serve two cosigners, so a witness set sharing one is refused.
    relabelled = NOTE + GOOD_LINE + _rename(GOOD_LINE, "lakeside", WITNESS.public_key)
    assert spec_verify(relabelled, "lakeside", WITNESS.public_key) == T
    with pytest.raises(VerificationError):
        cosignature.verify_cosigned(
            relabelled, witnesses={"st-mary": WITNESS.public_key, "lakeside": WITNESS.public_key}
        )
    # With lakeside's own key, the relabelled line is not lakeside's.
    assert cosignature.verify_cosigned(
        relabelled, witnesses={"st-mary": WITNESS.public_key, "lakeside": LAKESIDE.public_key}
    ) == ["st-mary"]


def test_a_witness_line_that_is_not_a_cosignature_raises():
    # Name and key ID of the witness, but a 68-byte blob (a plain note signature's size).
    key_id = spec_key_id("st-mary", WITNESS.public_key)
    line = f"\u2014 st-mary {base64.b64encode(key_id + bytes(64)).decode()}\n"
    with pytest.raises(VerificationError):
        cosignature.verify_cosigned(NOTE + line, witnesses={"st-mary": WITNESS.public_key})
    # A 76-byte blob whose timestamp exceeds 2**63 - 1.
    huge = key_id + struct.pack(">Q", 2**63) + bytes(64)
    line = f"\u2014 st-mary {base64.b64encode(huge).decode()}\n"
    with pytest.raises(VerificationError):
        cosignature.verify_cosigned(NOTE + line, witnesses={"st-mary": WITNESS.public_key})
    assert cosignature.cosignatures_in(NOTE + line) == []  # not a cosignature/v1


# --- strict parsing and preconditions --------------------------------------------------------


def _blob_line(blob: bytes, name: str = "st-mary") -> str:
    return f"\u2014 {name} {base64.b64encode(blob).decode()}"


@pytest.mark.parametrize(
    "line",
    [
        "st-mary AAAA",  # no em dash
        "- st-mary " + GOOD_LINE.split(" ")[2],  # a hyphen, not an em dash
        "\u2014 st-mary",  # no blob
        "\u2014 st mary " + GOOD_LINE.split(" ")[2],  # a space in the name
        "\u2014 st+mary " + GOOD_LINE.split(" ")[2],  # a plus in the name
        "\u2014 st-mary  " + GOOD_LINE.split(" ")[2],  # two spaces
        GOOD_LINE.rstrip("\n") + " ",  # trailing space
        GOOD_LINE.rstrip("\n") + "\r\n",  # CRLF
        GOOD_LINE + "\n",  # two newlines
        _blob_line(bytes(68)),  # a plain note signature's size
        _blob_line(bytes(77)),  # one byte too many
        _blob_line(bytes(4) + struct.pack(">Q", 2**63) + bytes(64)),  # timestamp over 2**63 - 1
        _blob_line(bytes(76))[:-3] + "B==",  # unused bits set: not canonical base64
        _blob_line(bytes(76)).rstrip("="),  # unpadded
        "\u2014 \ud800 " + GOOD_LINE.split(" ")[2],  # a name that is not UTF-8
    ],
)
def test_malformed_lines_are_format_errors(line):
    with pytest.raises(NoteFormatError):
        cosignature.parse_signature_line(line)


def test_line_round_trip_with_and_without_newline():
    c = cosignature.parse_signature_line(GOOD_LINE)
    assert cosignature.parse_signature_line(GOOD_LINE.rstrip("\n")) == c
    assert cosignature.signature_line(c) == GOOD_LINE


@pytest.mark.parametrize("timestamp", [-1, 2**63, 2**64, True, 1.0, "1"])
def test_timestamps_are_bounded(timestamp):
    with pytest.raises(NoteFormatError):
        cosignature.cosign(BODY, WITNESS, timestamp=timestamp)
    with pytest.raises(NoteFormatError):
        cosignature.signed_message(BODY, timestamp)


@pytest.mark.parametrize(
    "body",
    [
        "hello\n",  # not a checkpoint
        BODY.rstrip("\n"),  # no final newline
        BODY.replace("\n46\n", "\n046\n"),  # not a canonical size
        BODY + "\n",  # an empty extension line
        BODY + "\n\u2014 medfed-log AAAA\n",  # a signed note, not its body
        BODY.replace("demo", "de\tmo"),  # a control character
        BODY.replace("demo", "de\ud800mo"),  # not UTF-8
        b"medfed.local/demo\n46\n",  # bytes
    ],
)
def test_only_checkpoint_bodies_are_cosigned(body):
    with pytest.raises(NoteFormatError):
        cosignature.cosign(body, WITNESS, timestamp=T)


def test_preconditions_on_names_keys_and_fields():
    with pytest.raises(NoteFormatError):
        cosignature.cosign(BODY, _identity("st mary", 2), timestamp=T)
    with pytest.raises(NoteFormatError):
        cosignature.format_cosigner_vkey(_identity("st+mary", 2))
    with pytest.raises(NoteFormatError):
        cosignature.cosigner_key_id("st-mary", bytes(31))
    with pytest.raises(NoteFormatError):
        cosignature.cosigner_key_id("", WITNESS.public_key)
    c = cosignature.parse_signature_line(GOOD_LINE)
    fields = {
        "name": c.name,
        "key_id": c.key_id,
        "timestamp": c.timestamp,
        "signature": c.signature,
    }
    for field, bad in [
        ("name", "st mary"),
        ("key_id", bytes(3)),
        ("timestamp", -1),
        ("signature", bytes(63)),
        ("signature", bytearray(64)),
    ]:
        with pytest.raises(NoteFormatError):
            cosignature.Cosignature(**{**fields, field: bad})
    with pytest.raises(NoteFormatError):  # a witness key of the wrong size
        cosignature.verify_cosigned(NOTE, witnesses={"st-mary": bytes(31)})


@pytest.mark.parametrize(
    "text",
    [
        BODY,  # no signatures
        BODY + "\n",  # a blank line, no signatures
        NOTE.rstrip("\n"),  # no final newline
        NOTE + "not a signature\n",  # a malformed signature line
        note.sign_note("hello\n", LOG),  # signed, but not a checkpoint
    ],
)
def test_add_cosignature_needs_a_signed_checkpoint(text):
    c = cosignature.cosign(BODY, WITNESS, timestamp=T)
    with pytest.raises(NoteFormatError):
        cosignature.add_cosignature(text, c)


def test_add_cosignature_keeps_within_the_note_signature_limit():
    c = cosignature.cosign(BODY, WITNESS, timestamp=T)
    full = NOTE + GOOD_LINE * (note.MAX_SIGNATURES - 1)
    with pytest.raises(NoteFormatError):
        cosignature.add_cosignature(full, c)
    fits = NOTE + GOOD_LINE * (note.MAX_SIGNATURES - 2)
    assert note.open_note(cosignature.add_cosignature(fits, c), [LOG_VKEY])[1] == ["medfed-log"]


def test_cosignatures_in_rejects_malformed_notes():
    with pytest.raises(NoteFormatError):
        cosignature.cosignatures_in(NOTE + "not a signature\n")
    with pytest.raises(NoteFormatError):
        cosignature.verify_cosigned(NOTE + "not a signature\n", witnesses={})
    assert cosignature.cosignatures_in(NOTE) == []


# --- property: any checkpoint, any timestamp -------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    timestamp=st.integers(min_value=0, max_value=2**63 - 1),
    extensions=st.lists(st.text("abcxyz0123 /=\u00e9", min_size=1, max_size=8), max_size=3),
)
def test_round_trip_through_the_independent_verifier(size, root, timestamp, extensions):
    body = note.format_checkpoint(
        note.Checkpoint(
            origin="medfed.local/p", size=size, root_hash=root, extensions=tuple(extensions)
        )
    )
    c = cosignature.cosign(body, WITNESS, timestamp=timestamp)
    line = cosignature.signature_line(c)
    assert line == spec_cosign(body, _seed(WITNESS), "st-mary", timestamp)
    assert cosignature.parse_signature_line(line) == c
    cosigned = cosignature.add_cosignature(note.sign_note(body, LOG), c)
    assert spec_verify(cosigned, "st-mary", WITNESS.public_key) == timestamp
    assert cosignature.cosignatures_in(cosigned) == [c]
    assert cosignature.verify_cosigned(cosigned, witnesses={"st-mary": WITNESS.public_key}) == [
        "st-mary"
    ]
    assert note.open_note(cosigned, [LOG_VKEY]) == (body, ["medfed-log"])
