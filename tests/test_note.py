"""ledger.note: C2SP signed notes and tlog checkpoints, against other implementations' vectors."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import LedgerError, VerificationError, keys, merkle
from ledger.note import (
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    Checkpoint,
    NoteFormatError,
    Verifier,
    format_checkpoint,
    format_vkey,
    open_note,
    parse_checkpoint,
    parse_vkey,
    sign_note,
    verify_checkpoint,
)

# --- vectors from other implementations ------------------------------------------------------

# golang.org/x/mod sumdb/note/note_test.go (TestSign, TestOpen, TestNewVerifier).
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot "
    "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
)
GO_NOTE = GO_TEXT + "\n" + PETER_SIG

# The c2sp.org/signed-note example (C2SP/C2SP signed-note.md at d4c16da5).
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n\u2014 example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)

# Real checkpoints of the Go checksum database, signed by sum.golang.org's log key; the key is
# the one built into the go command (golang/go src/cmd/go/internal/modfetch/key.go).
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_ORIGIN = "go.sum database tree"
SUMDB_CHECKPOINTS = [
    (
        445646,
        "jEFFy4AtYgBBNTSZTiNnQrgQqMbcH0mfO2oP2FxR9VU=",
        "Az3grkGho/PqvUmEuTv6+r2g303hUhu60FOD6vLpm19mBwH9UjquWY2OKxNmZ55z0gHrp24AgPC3Q5WO7uZrVdvdCQU=",
    ),
    (
        15368405,
        "/g9am3I6YWNKaZX/jkne1fqd9zEyjss+JXyPXG0WfkY=",
        "Az3grqJGUaSGukG9p8nI2vKgiFn7qGHxn0W+mrwyI6Gz3F0t1J3LzmWk/p96Ybf295EjwdSwlzgijq5WA9d1Ded7owM=",
    ),
    (
        63096908,
        "8lHrQPRYe4KT4WQ9/Qk8/taKnD6IRHbFgfN7vQE2Y54=",
        "Az3gri/oVBN1jAhNZ/iS+W31psFAWRT20/GyrhpU6taFwulQGetBkH5S7wpGXdS935jiIGiUUAXBVHzT/P6fYhqAmAk=",
    ),
]


def _sumdb_note(size: int, root64: str, sig64: str) -> str:
    return f"{SUMDB_ORIGIN}\n{size}\n{root64}\n\n\u2014 sum.golang.org {sig64}\n"


def _go_identity() -> keys.Identity:
    """The Go test signer key: 'PRIVATE+KEY+<name>+<id>+base64(0x01 || Ed25519 seed)'."""
    _, _, name, key_id_hex, key64 = GO_SKEY.split("+", 4)
    raw = base64.b64decode(key64)
    assert raw[0] == keys.ED25519_ALG
    identity = keys.Identity(name=name, private_key=Ed25519PrivateKey.from_private_bytes(raw[1:]))
    assert identity.key_id.hex() == key_id_hex
    return identity


# --- our own signer --------------------------------------------------------------------------

# Fixed seeds: Ed25519 signing is deterministic, so every run sees the same notes.
LOG = keys.Identity(
    name="medfed.example/ledger", private_key=Ed25519PrivateKey.from_private_bytes(bytes(32))
)
OTHER = keys.Identity(
    name="medfed.example/other", private_key=Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
)
CHECKPOINT = Checkpoint(
    origin="medfed.example/ledger",
    size=5,
    root_hash=merkle.root([merkle.leaf_hash(b"%d" % i) for i in range(5)]),
)
SIGNED = sign_note(format_checkpoint(CHECKPOINT), LOG)
LOG_VKEY = format_vkey(LOG)


def test_round_trip() -> None:
    body = format_checkpoint(CHECKPOINT)
    assert body == f"medfed.example/ledger\n5\n{base64.b64encode(CHECKPOINT.root_hash).decode()}\n"
    assert SIGNED.startswith(body + "\n\u2014 medfed.example/ledger ")
    assert open_note(SIGNED, [parse_vkey(LOG_VKEY)]) == (body, ["medfed.example/ledger"])
    assert verify_checkpoint(SIGNED, LOG_VKEY) == CHECKPOINT
    assert verify_checkpoint(SIGNED, LOG_VKEY, origin="medfed.example/ledger") == CHECKPOINT
    with pytest.raises(VerificationError, match="origin"):
        verify_checkpoint(SIGNED, LOG_VKEY, origin="medfed.example/other")


def test_vkey_round_trip() -> None:
    verifier = parse_vkey(LOG_VKEY)
    assert verifier == Verifier(name=LOG.name, key_id=LOG.key_id, public_key=LOG.public_key)
    assert LOG_VKEY.startswith(f"{LOG.name}+{LOG.key_id.hex()}+A")  # base64 of 0x01 || key


def test_several_signers() -> None:
    note = sign_note(GO_TEXT, LOG, OTHER)
    log, other = parse_vkey(LOG_VKEY), parse_vkey(format_vkey(OTHER))
    assert open_note(note, [log]) == (GO_TEXT, [LOG.name])
    assert open_note(note, [other, log]) == (GO_TEXT, [LOG.name, OTHER.name])
    with pytest.raises(VerificationError, match="no valid signature"):
        open_note(note, [])


def test_body_may_contain_blank_lines() -> None:
    body = "first\n\n\u2014 not a signature\n\nlast\n"
    assert open_note(sign_note(body, LOG), [parse_vkey(LOG_VKEY)]) == (body, [LOG.name])


# --- other implementations -------------------------------------------------------------------


def test_go_signer_reproduces_go_output_byte_for_byte() -> None:
    identity = _go_identity()
    assert format_vkey(identity) == PETER_VKEY
    assert sign_note(GO_TEXT, identity) == GO_NOTE


def test_go_notes_open() -> None:
    peter, enoch = parse_vkey(PETER_VKEY), parse_vkey(ENOCH_VKEY)
    assert peter.key_id.hex() == "c74f20a3" and enoch.key_id.hex() == "af0cfe78"
    both = GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(both, [peter]) == (GO_TEXT, ["PeterNeumann"])
    assert open_note(both, [enoch]) == (GO_TEXT, ["EnochRoot"])
    assert open_note(both, [peter, enoch, peter]) == (GO_TEXT, ["PeterNeumann", "EnochRoot"])
    with pytest.raises(VerificationError) as caught:
        open_note(both, [])
    assert not isinstance(caught.value, NoteFormatError)
    # Unknown signatures are ignored even when repeated or invalid (Go's TestOpen).
    enoch_bad = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    noisy = GO_TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_bad
    assert open_note(noisy, [peter]) == (GO_TEXT, ["PeterNeumann"])


def test_spec_example_opens() -> None:
    assert open_note(SPEC_NOTE, [parse_vkey(SPEC_VKEY)]) == (
        "This is an example message.\n",
        ["example.com/foo"],
    )


@pytest.mark.parametrize(
    ("size", "root64", "sig64"), SUMDB_CHECKPOINTS, ids=[f"size-{c[0]}" for c in SUMDB_CHECKPOINTS]
)
def test_sumdb_checkpoints_verify(size: int, root64: str, sig64: str) -> None:
    note = _sumdb_note(size, root64, sig64)
    checkpoint = verify_checkpoint(note, SUMDB_VKEY, origin=SUMDB_ORIGIN)
    assert checkpoint == Checkpoint(
        origin=SUMDB_ORIGIN, size=size, root_hash=base64.b64decode(root64)
    )
    assert format_checkpoint(checkpoint) + "\n" + f"\u2014 sum.golang.org {sig64}\n" == note
    with pytest.raises(VerificationError):
        verify_checkpoint(_sumdb_note(size + 1, root64, sig64), SUMDB_VKEY)
    with pytest.raises(VerificationError):
        verify_checkpoint(note, PETER_VKEY)


def test_go_vkey_manglings_are_rejected() -> None:
    """Every proper substring and every one-character bump of a vkey (Go's TestNewVerifier)."""
    parse_vkey(PETER_VKEY)
    bad = [
        PETER_VKEY[i:j]
        for i in range(len(PETER_VKEY) + 1)
        for j in range(i + 1, len(PETER_VKEY) + 1)
        if (i, j) != (0, len(PETER_VKEY))
    ]
    bad += [
        PETER_VKEY[:i] + chr(ord(PETER_VKEY[i]) + 1) + PETER_VKEY[i + 1 :]
        for i in range(len(PETER_VKEY))
    ]
    bad += [
        # wrong length key, and unknown algorithm, each with a matching key hash (Go)
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ]
    for vkey in bad:
        with pytest.raises(NoteFormatError):
            parse_vkey(vkey)


# --- tampering -------------------------------------------------------------------------------


def _edit_signature(note: str, edit: Callable[[bytes], bytes]) -> str:
    body, _, line = note.rpartition("\n\n")
    prefix, _, blob = line.rstrip("\n").rpartition(" ")
    return f"{body}\n\n{prefix} {base64.b64encode(edit(base64.b64decode(blob))).decode()}\n"


def _flip(position: int) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        return raw[:position] + bytes([raw[position] ^ 0x01]) + raw[position + 1 :]

    return edit


ROOT64 = base64.b64encode(CHECKPOINT.root_hash).decode()
# The same 32 bytes, but with one of the unused low bits of the last base64 digit set.
_B64_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
NONCANONICAL_ROOT64 = ROOT64[:-2] + _B64_DIGITS[_B64_DIGITS.index(ROOT64[-2]) ^ 1] + "="
OTHER_ROOT64 = base64.b64encode(bytes(32)).decode()
SIG_LINE = SIGNED.rpartition("\n\n")[2]

# (id, tampered note, error type it must raise) -- a signed checkpoint, altered one way each.
TAMPERED: list[tuple[str, str, type[VerificationError]]] = [
    ("altered origin", SIGNED.replace("medfed.example/ledger\n5", "medfed.example/ledgeR\n5"),
     VerificationError),
    ("altered size", SIGNED.replace("\n5\n", "\n6\n", 1), VerificationError),
    ("altered root", SIGNED.replace(ROOT64, OTHER_ROOT64), VerificationError),
    ("extension added", SIGNED.replace(ROOT64 + "\n", ROOT64 + "\nextra\n"), VerificationError),
    ("signature byte flipped", _edit_signature(SIGNED, _flip(10)), VerificationError),
    ("last signature byte flipped", _edit_signature(SIGNED, _flip(67)), VerificationError),
    ("key id byte flipped", _edit_signature(SIGNED, _flip(0)), VerificationError),
    ("signature truncated", _edit_signature(SIGNED, lambda raw: raw[:-1]), VerificationError),
    ("signature extended", _edit_signature(SIGNED, lambda raw: raw + b"\x00"), VerificationError),
    ("signature from another key", sign_note(format_checkpoint(CHECKPOINT), OTHER),
     VerificationError),
    ("no signature lines", format_checkpoint(CHECKPOINT) + "\n", NoteFormatError),
    ("missing blank line", format_checkpoint(CHECKPOINT) + SIG_LINE, NoteFormatError),
    ("no final newline", SIGNED[:-1], NoteFormatError),
    ("hyphen for em dash", SIGNED.replace("\u2014 ", "- "), NoteFormatError),
    ("no space after em dash", SIGNED.replace("\u2014 ", "\u2014"), NoteFormatError),
    ("two spaces before signature", SIGNED.replace("ledger ", "ledger  "), NoteFormatError),
    ("no signature after name", SIGNED.rpartition(" ")[0] + "\n", NoteFormatError),
    ("signature not base64", SIGNED[:-3] + "*==\n", NoteFormatError),
    ("signature padding dropped", SIGNED.rstrip("=\n") + "\n", NoteFormatError),
    ("name with a plus", SIGNED.replace("\u2014 medfed.example/ledger", "\u2014 medfed+ledger"),
     NoteFormatError),
    ("unsigned trailing line", SIGNED + "Unexpected line.\n", NoteFormatError),
    ("CRLF line endings", SIGNED.replace("\n", "\r\n"), NoteFormatError),
    ("control character", "\x01" + SIGNED, NoteFormatError),
    ("not UTF-8", "\udcff" + SIGNED, NoteFormatError),
    ("too many signatures", format_checkpoint(CHECKPOINT) + "\n" + SIG_LINE * (MAX_SIGNATURES + 1),
     NoteFormatError),
]  # fmt: skip


@pytest.mark.parametrize(("note", "error"), [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_tampered_checkpoint_is_rejected(note: str, error: type[VerificationError]) -> None:
    assert note != SIGNED
    with pytest.raises(error) as caught:
        verify_checkpoint(note, LOG_VKEY)
    if error is VerificationError:
        assert not isinstance(caught.value, NoteFormatError)


def test_up_to_max_signatures_are_accepted() -> None:
    note = format_checkpoint(CHECKPOINT) + "\n" + SIG_LINE * MAX_SIGNATURES
    assert verify_checkpoint(note, LOG_VKEY) == CHECKPOINT


def test_oversized_or_non_text_notes_are_rejected() -> None:
    huge = "x" * MAX_NOTE_BYTES + "\n" + SIGNED
    for note in (huge, SIGNED.encode(), None):
        with pytest.raises(NoteFormatError):
            verify_checkpoint(note, LOG_VKEY)  # type: ignore[arg-type]


def test_go_malformed_notes() -> None:
    """Go's TestOpen bad messages, and its invalid signature from a known key."""
    peter = parse_vkey(PETER_VKEY)
    for note in (
        GO_TEXT,
        GO_TEXT + "\n",
        GO_TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + GO_NOTE,
        "\udcff" + GO_NOTE,  # Go: a 0xff byte, invalid UTF-8
        GO_TEXT + "\n\u2014 Bad Name " + PETER_SIG.rpartition(" ")[2].rstrip("\n"),
        GO_NOTE + "Unexpected line.\n",
        GO_TEXT + "\n" + PETER_SIG * 101,
    ):
        with pytest.raises(NoteFormatError):
            open_note(note, [peter])
    with pytest.raises(VerificationError, match="does not verify") as caught:
        open_note(GO_TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:], [peter])
    assert not isinstance(caught.value, NoteFormatError)


def test_invalid_duplicate_from_known_key_is_rejected() -> None:
    """Go skips repeated lines from a known key; the spec says each MUST be verified."""
    bad_copy = _edit_signature(SIGNED, _flip(20)).rpartition("\n\n")[2]
    with pytest.raises(VerificationError, match="does not verify"):
        verify_checkpoint(SIGNED + bad_copy, LOG_VKEY)


def test_key_sharing_only_name_or_only_id_is_ignored() -> None:
    """A signature whose (name, key id) is not a known pair is skipped, not failed."""
    impostor = keys.generate(LOG.name)  # same name, other key, so another key id
    assert impostor.key_id != LOG.key_id
    impostor_line = sign_note(format_checkpoint(CHECKPOINT), impostor).rpartition("\n\n")[2]
    same_id_line = SIG_LINE.replace(LOG.name, "medfed.example/elsewhere")
    for extra in (impostor_line, same_id_line):
        assert verify_checkpoint(SIGNED + extra, LOG_VKEY) == CHECKPOINT
        body = format_checkpoint(CHECKPOINT) + "\n" + extra
        with pytest.raises(VerificationError, match="no valid signature"):
            verify_checkpoint(body, LOG_VKEY)


def test_wrong_vkeys() -> None:
    with pytest.raises(VerificationError, match="no valid signature"):
        verify_checkpoint(SIGNED, format_vkey(OTHER))
    name, key_id_hex, key64 = LOG_VKEY.split("+", 2)
    wrong_id = f"{(int(key_id_hex, 16) ^ 1):08x}"
    type2_key64 = base64.b64encode(b"\x02" + LOG.public_key).decode()
    for vkey in (
        f"{name}+{wrong_id}+{key64}",  # key id does not match the key
        f"{name}x+{key_id_hex}+{key64}",  # nor the name
        f"{name}+{key_id_hex}+{type2_key64}",  # signature type 0x02
        f"{name}+{key_id_hex}",
        LOG_VKEY + "\n",
        " " + LOG_VKEY,
        "",
    ):
        with pytest.raises(NoteFormatError):
            verify_checkpoint(SIGNED, vkey)
    with pytest.raises(NoteFormatError):
        Verifier(name=name, key_id=bytes.fromhex(wrong_id), public_key=LOG.public_key)
    with pytest.raises(VerificationError):
        open_note(SIGNED, [LOG_VKEY])  # type: ignore[list-item]


# --- checkpoint bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "",
        f"origin\n5\n{ROOT64}",  # no final newline
        "origin\n5\n",  # no root line
        f"\n5\n{ROOT64}\n",  # empty origin
        f"origin\n05\n{ROOT64}\n",
        f"origin\n+5\n{ROOT64}\n",
        f"origin\n-1\n{ROOT64}\n",
        f"origin\n 5\n{ROOT64}\n",
        f"origin\n5 \n{ROOT64}\n",
        f"origin\n5_0\n{ROOT64}\n",
        f"origin\n\u0665\n{ROOT64}\n",  # ARABIC-INDIC DIGIT FIVE
        f"origin\n\n{ROOT64}\n",
        f"origin\n18446744073709551616\n{ROOT64}\n",  # 2**64
        f"origin\n5\n{base64.b64encode(bytes(31)).decode()}\n",
        f"origin\n5\n{base64.b64encode(bytes(33)).decode()}\n",
        f"origin\n5\n{ROOT64.rstrip('=')}\n",
        f"origin\n5\n{NONCANONICAL_ROOT64}\n",
        f"origin\n5\n{ROOT64}\n\n",  # empty extension line
        f"origin\n5\n{ROOT64}\next\x01\n",
        f"ori\rgin\n5\n{ROOT64}\n",
    ],
)
def test_malformed_checkpoint_bodies(body: str) -> None:
    with pytest.raises(NoteFormatError):
        parse_checkpoint(body)


def test_checkpoint_body_edge_cases() -> None:
    for size in (0, 2**64 - 1):
        body = f"origin with spaces\n{size}\n{ROOT64}\next one\next two\n"
        cp = parse_checkpoint(body)
        assert cp == Checkpoint(
            origin="origin with spaces",
            size=size,
            root_hash=CHECKPOINT.root_hash,
            extensions=("ext one", "ext two"),
        )
        assert format_checkpoint(cp) == body


def test_checkpoint_preconditions() -> None:
    good = {"origin": "o", "size": 1, "root_hash": bytes(32)}
    for change in (
        {"origin": ""},
        {"origin": "a\nb"},
        {"size": -1},
        {"size": 2**64},
        {"size": True},
        {"size": "1"},
        {"root_hash": bytes(31)},
        {"root_hash": ROOT64},
        {"extensions": "ext"},
        {"extensions": ("",)},
        {"extensions": ("a\nb",)},
    ):
        with pytest.raises(NoteFormatError):
            Checkpoint(**{**good, **change})
    assert Checkpoint(**good, extensions=["e"]).extensions == ("e",)  # type: ignore[arg-type]
    assert issubclass(NoteFormatError, VerificationError)
    assert issubclass(NoteFormatError, LedgerError)


def test_sign_preconditions() -> None:
    for body, signers in (
        ("no newline", (LOG,)),
        ("", (LOG,)),
        ("no signer\n", ()),
        ("tab\there\n", (LOG,)),
        ("body\n", (keys.generate("bad name"),)),
        ("body\n", (keys.generate("bad+name"),)),
        ("body\n", (LOG,) * (MAX_SIGNATURES + 1)),
    ):
        with pytest.raises(NoteFormatError):
            sign_note(body, *signers)


# --- properties ------------------------------------------------------------------------------

_line_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)


@settings(max_examples=50, deadline=None)
@given(
    origin=_line_text,
    size=st.integers(0, 2**64 - 1),
    root_hash=st.binary(min_size=32, max_size=32),
    extensions=st.lists(_line_text, max_size=3).map(tuple),
)
def test_checkpoint_round_trip(
    origin: str, size: int, root_hash: bytes, extensions: tuple[str, ...]
) -> None:
    cp = Checkpoint(origin=origin, size=size, root_hash=root_hash, extensions=extensions)
    assert parse_checkpoint(format_checkpoint(cp)) == cp
    assert verify_checkpoint(sign_note(format_checkpoint(cp), LOG), LOG_VKEY) == cp


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, len(SIGNED) - 1), char=st.characters(blacklist_categories=("Cs",)))
def test_any_one_character_change_is_rejected(position: int, char: str) -> None:
    tampered = SIGNED[:position] + char + SIGNED[position + 1 :]
    if tampered == SIGNED:
        return
    with pytest.raises(VerificationError):
        verify_checkpoint(tampered, LOG_VKEY)


def test_cli_verifies_a_checkpoint_written_by_go_sumdb(tmp_path) -> None:
    """`medfed ledger checkpoint verify` on sum.golang.org's own checkpoints: 0 / 1 / 2."""
    import subprocess
    import sys

    def verify(path, vkey=SUMDB_VKEY):
        cmd = [sys.executable, "-m", "flows.cli", "ledger", "checkpoint", "verify", "--vkey", vkey]
        return subprocess.run([*cmd, str(path)], capture_output=True, text=True).returncode

    good = tmp_path / "sumdb.txt"
    good.write_text(_sumdb_note(*SUMDB_CHECKPOINTS[1]))
    assert verify(good) == 0
    altered = tmp_path / "altered.txt"
    altered.write_text(_sumdb_note(*SUMDB_CHECKPOINTS[1]).replace("15368405", "15368406"))
    assert verify(altered) == 1
    assert verify(tmp_path / "absent.txt") == 2
