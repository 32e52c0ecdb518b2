"""ledger.merkle against RFC 6962 conformance vectors, known answers and a reference model."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import LedgerError, VerificationError, merkle

# transparency-dev/merkle testdata (Apache-2.0), kept in the `shared` folder beside the repo.
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "rfc6962"

# RFC 6962 test tree used by transparency-dev/merkle proof/verify_test.go: leaves, and the root
# of the tree made of the first k leaves for k = 1..8.
KAT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
KAT_ROOTS = [
    bytes.fromhex(h)
    for h in (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]
KAT_LEAF_HASHES = [merkle.leaf_hash(leaf) for leaf in KAT_LEAVES]

# (leaf index, tree size, proof) from verify_test.go's inclusionProofs (1-based leaf there).
KAT_INCLUSION = [
    (0, 1, []),
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
# (old size, new size, proof) from verify_test.go's consistencyProofs.
KAT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip


# --- conformance vectors ---------------------------------------------------------------------


def _vectors(kind: str) -> list:
    folder = CONFORMANCE / kind
    if not folder.is_dir():
        reason = f"conformance vectors not found at {folder} (CI checks out the shared folder)"
        return [pytest.param(None, id=f"{kind}-vectors-missing", marks=pytest.mark.skip(reason))]
    return [
        pytest.param(path, id=f"{kind}/{path.relative_to(folder).as_posix()}")
        for path in sorted(folder.rglob("*.json"))
    ]


def _load(path: Path) -> dict:
    vector = json.loads(path.read_text())
    vector["proof"] = [base64.b64decode(h) for h in vector["proof"] or []]
    return vector


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def _accepted(check, **kwargs) -> bool:
    try:
        check(**kwargs)
    except VerificationError:
        return False
    return True


@pytest.mark.parametrize("path", _vectors("inclusion"))
def test_inclusion_conformance(path: Path) -> None:
    v = _load(path)
    accepted = _accepted(
        merkle.verify_inclusion,
        leaf_hash=_b64(v["leafHash"]),
        index=v["leafIdx"],
        size=v["treeSize"],
        proof=v["proof"],
        root=_b64(v["root"]),
    )
    assert accepted is not v["wantErr"], v["desc"]


@pytest.mark.parametrize("path", _vectors("consistency"))
def test_consistency_conformance(path: Path) -> None:
    v = _load(path)
    accepted = _accepted(
        merkle.verify_consistency,
        old_size=v["size1"],
        new_size=v["size2"],
        old_root=_b64(v["root1"]),
        new_root=_b64(v["root2"]),
        proof=v["proof"],
    )
    assert accepted is not v["wantErr"], v["desc"]


def test_conformance_vectors_cover_both_outcomes() -> None:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"conformance vectors not found at {CONFORMANCE}")
    for kind in ("inclusion", "consistency"):
        wants = [json.loads(p.read_text())["wantErr"] for p in (CONFORMANCE / kind).rglob("*.json")]
        assert wants.count(False) >= 5 and wants.count(True) >= 50, kind


# --- known answers ---------------------------------------------------------------------------


def test_hash_known_answers() -> None:
    # transparency-dev/merkle rfc6962/rfc6962_test.go
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle.empty_root().hex() == empty
    assert merkle.root([]) == merkle.empty_root()
    assert merkle.leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert merkle.leaf_hash(b"L123456").hex() == (
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert merkle.node_hash(KAT_LEAF_HASHES[0], KAT_LEAF_HASHES[1]) == KAT_ROOTS[1]
    assert merkle.node_hash(KAT_LEAF_HASHES[1], KAT_LEAF_HASHES[0]) != KAT_ROOTS[1]
    assert (merkle.LEAF_PREFIX, merkle.NODE_PREFIX, merkle.HASH_SIZE) == (b"\x00", b"\x01", 32)


@pytest.mark.parametrize("size", range(1, 9))
def test_root_known_answers(size: int) -> None:
    assert merkle.root(KAT_LEAF_HASHES[:size]) == KAT_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size", "proof"), KAT_INCLUSION)
def test_inclusion_proof_known_answers(index: int, size: int, proof: list[str]) -> None:
    leaves = KAT_LEAF_HASHES[:size]
    assert [h.hex() for h in merkle.inclusion_proof(leaves, index)] == proof
    merkle.verify_inclusion(
        leaf_hash=leaves[index],
        index=index,
        size=size,
        proof=[bytes.fromhex(h) for h in proof],
        root=KAT_ROOTS[size - 1],
    )


@pytest.mark.parametrize(("old_size", "new_size", "proof"), KAT_CONSISTENCY)
def test_consistency_proof_known_answers(old_size: int, new_size: int, proof: list[str]) -> None:
    generated = merkle.consistency_proof(KAT_LEAF_HASHES[:new_size], old_size)
    assert [h.hex() for h in generated] == proof
    merkle.verify_consistency(
        old_size=old_size,
        new_size=new_size,
        old_root=KAT_ROOTS[old_size - 1],
        new_root=KAT_ROOTS[new_size - 1],
        proof=[bytes.fromhex(h) for h in proof],
    )


# --- preconditions ---------------------------------------------------------------------------


def test_generation_preconditions() -> None:
    leaves = KAT_LEAF_HASHES
    for bad_index in (-1, 8, True, 1.0):
        with pytest.raises(LedgerError):
            merkle.inclusion_proof(leaves, bad_index)  # type: ignore[arg-type]
    with pytest.raises(LedgerError):
        merkle.inclusion_proof([], 0)
    for bad_size in (0, 9, -1):
        with pytest.raises(LedgerError):
            merkle.consistency_proof(leaves, bad_size)
    assert merkle.consistency_proof(leaves, 8) == []
    with pytest.raises(LedgerError):
        merkle.root([*leaves, b"short"])
    with pytest.raises(LedgerError):
        merkle.node_hash(b"short", leaves[0])


def test_verification_preconditions() -> None:
    leaves, root = KAT_LEAF_HASHES, KAT_ROOTS[7]
    proof = merkle.inclusion_proof(leaves, 3)
    good = {"leaf_hash": leaves[3], "index": 3, "size": 8, "proof": proof, "root": root}
    merkle.verify_inclusion(**good)
    for change in (
        {"index": -1},
        {"index": True},
        {"size": 2**64},
        {"leaf_hash": leaves[3][:31]},
        {"root": root + b"\x00"},
        {"root": root.hex()},
        {"proof": [*proof[:2], proof[2] + b"\x00"]},
        {"proof": [*proof, proof[0]]},
    ):
        with pytest.raises(VerificationError):
            merkle.verify_inclusion(**{**good, **change})
    with pytest.raises(VerificationError):
        merkle.verify_consistency(old_size=-1, new_size=8, old_root=root, new_root=root, proof=[])


def test_large_tree_proofs() -> None:
    leaves = [hashlib.sha256(b"\x00" + i.to_bytes(4, "big")).digest() for i in range(65_539)]
    tree_root = merkle.root(leaves)
    for index in (0, 1, 32_767, 65_536, 65_538):
        proof = merkle.inclusion_proof(leaves, index)
        merkle.verify_inclusion(
            leaf_hash=leaves[index], index=index, size=len(leaves), proof=proof, root=tree_root
        )
    old_size = 40_000
    merkle.verify_consistency(
        old_size=old_size,
        new_size=len(leaves),
        old_root=merkle.root(leaves[:old_size]),
        new_root=tree_root,
        proof=merkle.consistency_proof(leaves, old_size),
    )


# --- properties against a reference model ----------------------------------------------------

MAX_SIZE = 150
LEAVES = [merkle.leaf_hash(b"entry %d" % i) for i in range(MAX_SIZE)]


def _ref_root(leaves: list[bytes]) -> bytes:
    """MTH from RFC 6962 section 2.1, recursively: split at the largest power of 2 below n."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _ref_root(leaves[:k]) + _ref_root(leaves[k:])).digest()


def _ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) from RFC 6962 section 2.1.1."""
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return _ref_path(m, leaves[:k]) + [_ref_root(leaves[k:])]
    return _ref_path(m - k, leaves[k:]) + [_ref_root(leaves[:k])]


def _ref_subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) from RFC 6962 section 2.1.2."""
    n = len(leaves)
    if m == n:
        return [] if complete else [_ref_root(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return _ref_subproof(m, leaves[:k], complete) + [_ref_root(leaves[k:])]
    return _ref_subproof(m - k, leaves[k:], False) + [_ref_root(leaves[:k])]


ROOTS = [_ref_root(LEAVES[:n]) for n in range(MAX_SIZE + 1)]


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, MAX_SIZE))
    return size, draw(st.integers(0, size - 1))


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    new_size = draw(st.integers(2, MAX_SIZE))
    return draw(st.integers(1, new_size - 1)), new_size


def _flip(data: bytes, position: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, MAX_SIZE))
def test_root_matches_rfc_definition(size: int) -> None:
    assert merkle.root(LEAVES[:size]) == ROOTS[size]


@settings(max_examples=100, deadline=None)
@given(tree_and_index())
def test_inclusion_proofs_match_rfc_and_verify(case: tuple[int, int]) -> None:
    size, index = case
    proof = merkle.inclusion_proof(LEAVES[:size], index)
    assert proof == _ref_path(index, LEAVES[:size])
    merkle.verify_inclusion(
        leaf_hash=LEAVES[index], index=index, size=size, proof=proof, root=ROOTS[size]
    )


@settings(max_examples=100, deadline=None)
@given(tree_and_index(), st.data())
def test_tampered_inclusion_is_rejected(case: tuple[int, int], data: st.DataObject) -> None:
    size, index = case
    proof = merkle.inclusion_proof(LEAVES[:size], index)
    good = {"leaf_hash": LEAVES[index], "index": index, "size": size, "proof": proof}
    byte = data.draw(st.integers(0, merkle.HASH_SIZE - 1), label="byte")
    tampered = [
        {**good, "root": _flip(ROOTS[size], byte)},
        {**good, "leaf_hash": _flip(LEAVES[index], byte), "root": ROOTS[size]},
    ]
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1), label="proof element")
        bad_proof = [*proof[:i], _flip(proof[i], byte), *proof[i + 1 :]]
        tampered.append({**good, "proof": bad_proof, "root": ROOTS[size]})
    other_index = data.draw(st.integers(0, size), label="other index")
    if other_index != index:
        tampered.append({**good, "index": other_index, "root": ROOTS[size]})
    # A different tree size, with that tree's own root.
    other_size = data.draw(st.integers(index + 1, MAX_SIZE), label="other size")
    if other_size != size:
        tampered.append({**good, "size": other_size, "root": ROOTS[other_size]})
    for kwargs in tampered:
        with pytest.raises(VerificationError):
            merkle.verify_inclusion(**kwargs)


@settings(max_examples=100, deadline=None)
@given(two_sizes())
def test_consistency_proofs_match_rfc_and_verify(sizes: tuple[int, int]) -> None:
    old_size, new_size = sizes
    proof = merkle.consistency_proof(LEAVES[:new_size], old_size)
    assert proof == _ref_subproof(old_size, LEAVES[:new_size], True)
    merkle.verify_consistency(
        old_size=old_size,
        new_size=new_size,
        old_root=ROOTS[old_size],
        new_root=ROOTS[new_size],
        proof=proof,
    )


@settings(max_examples=100, deadline=None)
@given(two_sizes(), st.data())
def test_tampered_consistency_is_rejected(sizes: tuple[int, int], data: st.DataObject) -> None:
    old_size, new_size = sizes
    proof = merkle.consistency_proof(LEAVES[:new_size], old_size)
    good = {
        "old_size": old_size,
        "new_size": new_size,
        "old_root": ROOTS[old_size],
        "new_root": ROOTS[new_size],
        "proof": proof,
    }
    byte = data.draw(st.integers(0, merkle.HASH_SIZE - 1), label="byte")
    i = data.draw(st.integers(0, len(proof) - 1), label="proof element")
    tampered = [
        {**good, "old_root": _flip(ROOTS[old_size], byte)},
        {**good, "new_root": _flip(ROOTS[new_size], byte)},
        {**good, "proof": [*proof[:i], _flip(proof[i], byte), *proof[i + 1 :]]},
        {**good, "proof": proof[:-1]},
        {**good, "proof": [*proof, proof[-1]]},
    ]
    # Other sizes, each with its genuine root.
    other_old = data.draw(st.integers(1, new_size), label="other old size")
    if other_old != old_size:
        tampered.append({**good, "old_size": other_old, "old_root": ROOTS[other_old]})
    other_new = data.draw(st.integers(old_size, MAX_SIZE), label="other new size")
    if other_new != new_size:
        tampered.append({**good, "new_size": other_new, "new_root": ROOTS[other_new]})
    for kwargs in tampered:
        with pytest.raises(VerificationError):
            merkle.verify_consistency(**kwargs)
