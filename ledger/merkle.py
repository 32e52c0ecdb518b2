"""RFC 6962 / RFC 9162 Merkle tree hashing and proofs, as pure functions.

Bytes in, bytes out, no I/O. A tree is given by its leaf hashes (`leaf_hash(entry)` of each
entry, in log order). Verification follows transparency-dev/merkle's `proof/verify.go`: every
precondition (sizes, index, hash lengths, exact proof length) is checked before any hashing,
and every failure raises `VerificationError`.

Trees are built level by level: pair up neighbours, and carry an odd last node up unchanged.
For RFC 6962's left-balanced trees this gives the same root as the recursive definition
(split at the largest power of two below n), with no recursion or list slicing, and each node
at level `l`, position `j` is the hash of leaves `[j * 2**l, min((j + 1) * 2**l, n))`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

from ledger import LedgerError, VerificationError

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
HASH_SIZE = 32
# Tree sizes and indices are uint64 on the wire (RFC 9162, transparency-dev/merkle).
MAX_TREE_SIZE = 2**64 - 1

_sha256 = hashlib.sha256
_NODE_HASHER = _sha256(NODE_PREFIX)


def leaf_hash(entry: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d)."""
    return _sha256(LEAF_PREFIX + bytes(entry)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right) for two child hashes."""
    if len(left) != HASH_SIZE or len(right) != HASH_SIZE:
        raise LedgerError(f"child hashes must be {HASH_SIZE} bytes")
    return _hash_children(left, right)


def empty_root() -> bytes:
    """MTH({}) = SHA-256 of the empty string."""
    return _sha256(b"").digest()


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of a tree with these leaf hashes."""
    _check_leaf_hashes(leaf_hashes)
    if not leaf_hashes:
        return empty_root()
    level: Sequence[bytes] = leaf_hashes
    while len(level) > 1:
        level = _next_level(level)
    return bytes(level[0])


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 9162 inclusion proof (audit path) for leaf `index`, lowest level first."""
    _check_leaf_hashes(leaf_hashes)
    if not _is_uint(index) or index >= len(leaf_hashes):
        raise LedgerError(f"leaf index {index!r} is outside a tree of size {len(leaf_hashes)}")
    return _path(leaf_hashes, level=0, index=index)


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """RFC 9162 consistency proof from the tree's first `old_size` leaves to all of them.

    Requires 0 < old_size <= len(leaf_hashes); equal sizes give the empty proof.
    """
    _check_leaf_hashes(leaf_hashes)
    new_size = len(leaf_hashes)
    if not _is_uint(old_size) or not 0 < old_size <= new_size:
        raise LedgerError(
            f"old size {old_size!r} must be in 1..{new_size}: "
            "consistency with an empty tree is meaningless"
        )
    if old_size == new_size:
        return []
    # The old tree's last perfect subtree sits at level `shift`; its root seeds the proof
    # unless it is the whole old tree (old_size a power of two), which the verifier holds.
    shift = _trailing_zeros(old_size)
    index = (old_size - 1) >> shift
    return _path(leaf_hashes, level=shift, index=index, with_seed=index != 0)


def verify_inclusion(
    *, leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise VerificationError unless `proof` shows leaf `index` of a `size` tree is `leaf_hash`."""
    _check_tree_size("size", size)
    _check_tree_size("index", index)
    if index >= size:
        raise VerificationError(f"index {index} is beyond tree size {size}")
    _check_hash("leaf hash", leaf_hash)
    _check_hash("root", root)
    proof = list(proof)
    inner, border = _decompose(index, size)
    if len(proof) != inner + border:
        raise VerificationError(f"wrong proof size {len(proof)}, want {inner + border}")
    _check_proof_hashes(proof)
    calculated = _chain_border_right(_chain_inner(leaf_hash, proof[:inner], index), proof[inner:])
    if calculated != root:
        raise VerificationError("inclusion proof does not lead to the expected root")


def verify_consistency(
    *,
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Raise VerificationError unless `proof` shows the `old_size` tree is a prefix of the new one.

    Semantics of transparency-dev/merkle `VerifyConsistency`: old_size == 0 is always an
    error (RFC 9162 defines proofs for 0 < m only); equal sizes need an empty proof and equal
    roots; otherwise the proof must be non-empty and of the exact expected length.
    """
    _check_tree_size("old size", old_size)
    _check_tree_size("new size", new_size)
    proof = list(proof)
    if new_size < old_size:
        raise VerificationError(f"new size {new_size} < old size {old_size}")
    if old_size == 0:
        raise VerificationError("a consistency proof from the empty tree is meaningless")
    if old_size == new_size:
        if proof:
            raise VerificationError("sizes are equal but the proof is not empty")
        _check_bytes("old root", old_root)
        _check_bytes("new root", new_root)
        if bytes(old_root) != bytes(new_root):
            raise VerificationError("sizes are equal but the roots differ")
        return
    if not proof:
        raise VerificationError("empty consistency proof")
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)

    inner, border = _decompose(old_size - 1, new_size)
    shift = _trailing_zeros(old_size)
    inner -= shift  # shift < inner because old_size < new_size
    # The proof starts with the root of the old tree's last perfect subtree, unless that
    # subtree is the whole old tree.
    if old_size == 1 << shift:
        seed, start = old_root, 0
    else:
        seed, start = proof[0], 1
    if len(proof) != start + inner + border:
        raise VerificationError(f"wrong proof size {len(proof)}, want {start + inner + border}")
    _check_proof_hashes(proof)
    path = proof[start:]

    mask = (old_size - 1) >> shift
    old_calculated = _chain_border_right(_chain_inner_right(seed, path[:inner], mask), path[inner:])
    if old_calculated != old_root:
        raise VerificationError("consistency proof does not lead to the old root")
    new_calculated = _chain_border_right(_chain_inner(seed, path[:inner], mask), path[inner:])
    if new_calculated != new_root:
        raise VerificationError("consistency proof does not lead to the new root")


# --- tree building ---------------------------------------------------------------------------


def _hash_children(left: bytes, right: bytes) -> bytes:
    h = _NODE_HASHER.copy()
    h.update(left)
    h.update(right)
    return h.digest()


def _next_level(level: Sequence[bytes]) -> list[bytes]:
    """Hash neighbouring pairs; an odd last node moves up unchanged."""
    base = _NODE_HASHER
    out: list[bytes] = []
    append = out.append
    it = iter(level)
    for left, right in zip(it, it, strict=False):
        h = base.copy()
        h.update(left)
        h.update(right)
        append(h.digest())
    if len(level) & 1:
        append(bytes(level[-1]))
    return out


def _levels(leaf_hashes: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    """Each level of the tree, leaves first, root level (one node) last. Lazy: O(n) memory."""
    level = leaf_hashes
    yield level
    while len(level) > 1:
        level = _next_level(level)
        yield level


def _path(
    leaf_hashes: Sequence[bytes], *, level: int, index: int, with_seed: bool = False
) -> list[bytes]:
    """Siblings on the way from node (`level`, `index`) up to the root, lowest first.

    With `with_seed`, the node itself comes first (the consistency proof's seed).
    """
    proof: list[bytes] = []
    for depth, nodes in enumerate(_levels(leaf_hashes)):
        if len(nodes) == 1:
            break
        if depth < level:
            continue
        if depth == level and with_seed:
            proof.append(bytes(nodes[index]))
        sibling = index ^ 1
        if sibling < len(nodes):
            proof.append(bytes(nodes[sibling]))
        index >>= 1
    return proof


# --- verification helpers (transparency-dev/merkle proof/verify.go) -------------------------


def _decompose(index: int, size: int) -> tuple[int, int]:
    """Split an inclusion proof into the part below and the part along the right border."""
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = _hash_children(seed, h) if (index >> i) & 1 == 0 else _hash_children(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    """Like _chain_inner but only left siblings: the hash of the earlier, smaller subtree."""
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = _hash_children(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = _hash_children(h, seed)
    return seed


def _trailing_zeros(n: int) -> int:
    return (n & -n).bit_length() - 1


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TREE_SIZE


def _check_tree_size(what: str, value: object) -> None:
    if not _is_uint(value):
        raise VerificationError(f"{what} must be an integer in 0..2**64-1, got {value!r}")


def _check_bytes(what: str, value: object) -> None:
    if not isinstance(value, bytes | bytearray):
        raise VerificationError(f"{what} must be bytes")


def _check_hash(what: str, value: object) -> None:
    _check_bytes(what, value)
    if len(value) != HASH_SIZE:  # type: ignore[arg-type]
        raise VerificationError(f"{what} must be {HASH_SIZE} bytes")


def _check_proof_hashes(proof: Sequence[object]) -> None:
    for i, h in enumerate(proof):
        _check_hash(f"proof[{i}]", h)


def _check_leaf_hashes(leaf_hashes: Sequence[bytes]) -> None:
    if len(leaf_hashes) > MAX_TREE_SIZE:
        raise LedgerError("too many leaves")
    if not set(map(len, leaf_hashes)) <= {HASH_SIZE}:
        raise LedgerError(f"every leaf hash must be {HASH_SIZE} bytes")


def prefix_roots(leaf_hashes: Sequence[bytes], sizes: Sequence[int]) -> list[bytes]:
    """The root of each prefix `leaf_hashes[:size]`, building the tree once: O(n + k log n).

    A prefix of size m is the left-to-right sequence of perfect subtrees given by m's binary
    digits; each is a node of the full tree's levels, and the root folds them right to left.
    """
    _check_leaf_hashes(leaf_hashes)
    _check_prefix_sizes(len(leaf_hashes), sizes)
    if not any(sizes):
        return [empty_root() for _ in sizes]
    return _roots_from_levels(list(_levels(leaf_hashes)), sizes)


def prefix_roots_of_levels(levels: Sequence[Sequence[bytes]], sizes: Sequence[int]) -> list[bytes]:
    """`prefix_roots` from the tree's levels, leaves first, up to one holding a single node
    (as `_levels` builds them); for trees built in parts elsewhere. Node hashes are trusted."""
    _check_prefix_sizes(len(levels[0]) if levels else 0, sizes)
    if not any(sizes):
        return [empty_root() for _ in sizes]
    return _roots_from_levels(levels, sizes)


def _check_prefix_sizes(n: int, sizes: Sequence[int]) -> None:
    for size in sizes:
        if not _is_uint(size) or size > n:
            raise LedgerError(f"prefix size {size!r} is outside a tree of size {n}")


def _roots_from_levels(levels: Sequence[Sequence[bytes]], sizes: Sequence[int]) -> list[bytes]:
    roots = []
    for size in sizes:
        if size == 0:
            roots.append(empty_root())
            continue
        nodes, start = [], 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                nodes.append(levels[level][start >> level])
                start += 1 << level
        acc = bytes(nodes[-1])
        for node in reversed(nodes[:-1]):
            acc = _hash_children(node, acc)
        roots.append(acc)
    return roots
