"""C2SP tlog-cosignature (cosignature/v1, Ed25519): what medfed writes verifies with an
independent implementation written here from the spec (c2sp.org/tlog-cosignature), using
nothing of medfed's; tampered cosignatures fail next to the valid ones; the spec's own example
line parses to the timestamp its example message states."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import VerificationError, cosignature, keys, note
from ledger.note import NoteFormatError

LOG = keys.generate("medfed-log")
WITNESS = keys.generate("st-mary")
OTHER = keys.generate("st-mary")  # same name, another key
BODY = note.format_checkpoint(
    note.Checkpoint(origin="medfed.local/demo", size=46, root_hash=bytes(range(32)))
)
NOTE = note.sign_note(BODY, LOG)
T = 1_764_950_000


# ------------------------------------------------ an independent verifier, from the spec text


def spec_verify(note_text: str, name: str, public_key: bytes) -> int | None:
    """The timestamp of `name`'s valid cosignature/v1 on the note, None if it has none; raises
    InvalidSignature for a line with its name and key ID that does not verify.

    Spec: key ID = SHA-256(<name> || "\\n" || 0x04 || 32-byte key)[:4]; the signature line is
    "— <name> base64(key ID || u64 big-endian timestamp || Ed25519 signature)"; the signed
    message is "cosignature/v1\\n" "time <decimal>\\n" then the whole note body, final
    newline included, without the signature lines."""
    body, _, signatures = note_text.rpartition("\n\n")
    body += "\n"
    key_id = hashlib.sha256(name.encode() + b"\n" + b"\x04" + public_key).digest()[:4]
    for line in signatures.splitlines():
        dash, line_name, blob64 = line.split(" ")
        assert dash == "\u2014"
        blob = base64.b64decode(blob64, validate=True)
        if line_name != name or blob[:4] != key_id or len(blob) != 4 + 8 + 64:
            continue
        (timestamp,) = struct.unpack(">Q", blob[4:12])
        message = b"cosignature/v1\n" + b"time " + str(timestamp).encode() + b"\n"
        Ed25519PublicKey.from_public_bytes(public_key).verify(blob[12:], message + body.encode())
        return timestamp
    return None


# ------------------------------------------------ medfed's cosignatures, checked independently


def test_a_cosignature_medfed_writes_verifies_independently():
    c = cosignature.cosign(BODY, WITNESS, timestamp=T)
    cosigned = cosignature.add_cosignature(NOTE, c)
    assert spec_verify(cosigned, "st-mary", WITNESS.public_key) == T
    assert spec_verify(cosigned, "st-mary", OTHER.public_key) is None  # another key's ID
    # The log's own verifier still opens the note, ignoring the cosignature line.
    assert note.open_note(cosigned, [note.parse_vkey(note.format_vkey(LOG))]) == (
        BODY,
        ["medfed-log"],
    )
    assert cosignature.verify_cosigned(cosigned, witnesses={"st-mary": WITNESS.public_key}) == [
        "st-mary"
    ]


def test_the_signed_message_is_the_one_the_spec_shows():
    # The spec's example: "cosignature/v1\ntime 1679315147\n" then the checkpoint body.
    spec_body = (
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )
    assert cosignature.signed_message(spec_body, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\n" + spec_body.encode()
    )


def test_the_specs_example_line_parses():
    # c2sp.org/tlog-cosignature's example cosignature (wrapped there; one line here).
    line = (
        "\u2014 witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEh"
        "ZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA=="
    )
    c = cosignature.parse_signature_line(line)
    assert c.name == "witness.example.com/w1"
    assert c.timestamp == 1679315147  # the "time" line of the spec's example message
    assert c.key_id.hex() == "8d66cf3f" and len(c.signature) == 64
    assert cosignature.signature_line(c) == line + "\n"


def test_key_id_and_vkey_follow_the_spec():
    expected = hashlib.sha256(b"st-mary\n\x04" + WITNESS.public_key).digest()[:4]
    assert cosignature.cosigner_key_id("st-mary", WITNESS.public_key) == expected
    vkey = cosignature.format_cosigner_vkey(WITNESS)
    assert vkey.startswith(f"st-mary+{expected.hex()}+")
    assert cosignature.parse_cosigner_vkey(vkey) == ("st-mary", WITNESS.public_key)
    assert base64.b64decode(vkey.split("+", 2)[2])[0] == 0x04
    with pytest.raises(NoteFormatError):
        cosignature.parse_cosigner_vkey(note.format_vkey(WITNESS))  # a 0x01 note key


def _flip(line: str, at: int) -> str:
    name, blob64 = line.rstrip("\n").rsplit(" ", 1)
    blob = bytearray(base64.b64decode(blob64))
    blob[at] ^= 0x01
    return f"{name} {base64.b64encode(bytes(blob)).decode()}\n"


@pytest.mark.parametrize(
    ("tamper", "where"),
    [
        (lambda line: _flip(line, 20), "signature"),
        (lambda line: _flip(line, 11), "timestamp"),
        (lambda line: _flip(line, 0), "key ID"),
    ],
)
def test_tampered_cosignatures_fail_both_verifiers(tamper, where):
    good = cosignature.signature_line(cosignature.cosign(BODY, WITNESS, timestamp=T))
    bad_line = tamper(good)
    bad = NOTE + bad_line
    witnesses = {"st-mary": WITNESS.public_key}
    if where == "key ID":  # no longer the witness's key: ignored by both, not accepted
        assert spec_verify(bad, "st-mary", WITNESS.public_key) is None
        assert cosignature.verify_cosigned(bad, witnesses=witnesses) == []
        return
    with pytest.raises(InvalidSignature):
        spec_verify(bad, "st-mary", WITNESS.public_key)
    with pytest.raises(VerificationError):
        cosignature.verify_cosigned(bad, witnesses=witnesses)
    with pytest.raises(VerificationError):
        cosignature.verify_cosignature(
            BODY,
            cosignature.parse_signature_line(bad_line),
            name="st-mary",
            public_key=WITNESS.public_key,
        )


def test_a_cosignature_over_another_checkpoint_does_not_verify():
    c = cosignature.cosign(BODY, WITNESS, timestamp=T)
    other = BODY.replace("\n46\n", "\n45\n")
    with pytest.raises(VerificationError):
        cosignature.verify_cosignature(other, c, name="st-mary", public_key=WITNESS.public_key)
    with pytest.raises(VerificationError):  # the right signature, claimed by another name
        cosignature.verify_cosignature(BODY, c, name="lakeside", public_key=WITNESS.public_key)


@pytest.mark.parametrize(
    "line",
    [
        "st-mary AAAA",  # no em dash
        "\u2014 st-mary",  # no blob
        "\u2014 st mary AAAA",  # a space in the name
        "\u2014 st-mary " + base64.b64encode(bytes(68)).decode(),  # a plain note signature
        "\u2014 st-mary "
        + base64.b64encode(bytes(76)).decode()[:-3]
        + "B==",  # unused bits set: not canonical base64
    ],
)
def test_malformed_lines_are_format_errors(line):
    with pytest.raises(NoteFormatError):
        cosignature.parse_signature_line(line)


def test_timestamps_are_bounded():
    with pytest.raises(NoteFormatError):
        cosignature.cosign(BODY, WITNESS, timestamp=2**63)
    with pytest.raises(NoteFormatError):
        cosignature.cosign(BODY, WITNESS, timestamp=-1)
    with pytest.raises(NoteFormatError):  # a body that is not a checkpoint
        cosignature.cosign("hello\n", WITNESS, timestamp=T)


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=2**40),
    root=st.binary(min_size=32, max_size=32),
    timestamp=st.integers(min_value=0, max_value=2**63 - 1),
    extensions=st.lists(st.text("abcxyz0123 /", min_size=1, max_size=8), max_size=2),
)
def test_round_trip_through_the_independent_verifier(size, root, timestamp, extensions):
    extensions = [e for e in extensions if e.strip() == e]
    body = note.format_checkpoint(
        note.Checkpoint(
            origin="medfed.local/p", size=size, root_hash=root, extensions=tuple(extensions)
        )
    )
    cosigned = cosignature.add_cosignature(
        note.sign_note(body, LOG), cosignature.cosign(body, WITNESS, timestamp=timestamp)
    )
    assert spec_verify(cosigned, "st-mary", WITNESS.public_key) == timestamp
    (c,) = cosignature.cosignatures_in(cosigned)
    assert c.timestamp == timestamp
