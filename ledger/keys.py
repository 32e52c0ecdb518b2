"""Ed25519 identities for sites and the coordinator.

A private key lives in one file, mode 0600, next to the party that owns it; only the raw
32-byte public key ever reaches the ledger, artifacts or other parties.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ledger import LedgerError, VerificationError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
# C2SP signed-note signature type for Ed25519.
ED25519_ALG = 0x01


@dataclass(frozen=True, kw_only=True)
class Identity:
    """A named signer: a site, the coordinator or the ledger's log key."""

    name: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return public_key_bytes(self.private_key)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def generate(name: str) -> Identity:
    return Identity(name=name, private_key=Ed25519PrivateKey.generate())


def public_key_bytes(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def key_id(name: str, public_key: bytes) -> bytes:
    """C2SP signed-note key ID: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519_ALG]) + public_key).digest()[:4]


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise VerificationError unless `signature` is `public_key`'s over `message`."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise VerificationError(f"public key must be {PUBLIC_KEY_SIZE} bytes")
    if len(signature) != SIGNATURE_SIZE:
        raise VerificationError(f"signature must be {SIGNATURE_SIZE} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature as exc:
        raise VerificationError("signature does not verify") from exc


def save(identity: Identity, path: Path) -> None:
    """Write the private key as PKCS#8 PEM, mode 0600, atomically."""
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, pem)


def load(name: str, path: Path) -> Identity:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise LedgerError(f"cannot read private key file {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"private key file {path} does not hold an Ed25519 key")
    return Identity(name=name, private_key=key)


def load_or_create(name: str, path: Path) -> Identity:
    path = Path(path)
    if path.exists():
        return load(name, path)
    identity = generate(name)
    save(identity, path)
    return identity


def write_secret(path: Path, data: bytes) -> None:
    """Atomically write `data` to `path`, readable by the owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
