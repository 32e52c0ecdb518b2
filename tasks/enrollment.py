"""Enrollment (a site's public material, self-signed) and sealed delivery of the secret
context of the secure-aggregation scheme.

A site's `enrollment.json` carries only public keys: its Ed25519 identity (signs everything the
site says) and an X25519 key (receives the sealed secret; agrees the site's pairwise masks,
`tasks.masking`). It is signed by the identity key, so the coordinator registers exactly what
the site's IT produced.

The key-holding site seals the secret context to each other site: X25519 with a fresh
ephemeral key, HKDF-SHA256 bound to (federation, recipient, both public keys), ChaCha20-Poly1305.
The sealed blob travels through the artifact store under a signed reference; the coordinator,
which relays it, cannot open it.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ledger import VerificationError
from ledger import keys as ledger_keys
from tasks import IntegrityError, StepError
from tasks.site import ENROLLMENT_FILE, Site

ENROLLMENT_VERSION = 1
ENROLLMENT_DOMAIN = b"medfed/enrollment/v1\n"
SEAL_INFO = b"medfed/ckks-secret/v1"
X25519_KEY_SIZE = 32
NONCE_SIZE = 12


# ---------------------------------------------------------------- X25519 keys


def load_kex(path: Path) -> X25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, X25519PrivateKey):
        raise StepError(f"key file {Path(path).name} does not hold an X25519 key")
    return key


def load_or_create_kex(path: Path) -> X25519PrivateKey:
    path = Path(path)
    if path.exists():
        return load_kex(path)
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ledger_keys.write_secret(path, pem)
    return key


def kex_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------- enrollment


def _enrollment_message(fields: dict[str, Any]) -> bytes:
    return ENROLLMENT_DOMAIN + rfc8785.dumps(fields)


def make_enrollment(site: Site) -> dict[str, Any]:
    fields = {
        "v": ENROLLMENT_VERSION,
        "site": site.name,
        "kind": str(site.settings.kind),
        "public_key": site.identity.public_key.hex(),
        "kex_key": kex_public(site.kex_key).hex(),
    }
    signature = site.identity.sign(_enrollment_message(fields))
    return fields | {"signature": base64.b64encode(signature).decode()}


def write_enrollment(site: Site) -> Path:
    path = site.root / ENROLLMENT_FILE
    path.write_text(json.dumps(make_enrollment(site), indent=2) + "\n", encoding="utf-8")
    return path


def read_enrollment(path: Path) -> dict[str, Any]:
    """Parse and check an enrollment file: its fields and its self-signature."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StepError(f"enrollment file {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise StepError(f"enrollment file {path} is not JSON") from exc
    expected = {"v", "site", "kind", "public_key", "kex_key", "signature"}
    if not isinstance(doc, dict) or set(doc) != expected or doc.get("v") != ENROLLMENT_VERSION:
        raise StepError(f"enrollment file {path} does not have the fields {sorted(expected)}")
    try:
        public_key = bytes.fromhex(doc["public_key"])
        kex = bytes.fromhex(doc["kex_key"])
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise StepError(
            f"enrollment file {path} has a key or signature that is not encoded"
        ) from exc
    if len(kex) != X25519_KEY_SIZE:
        raise StepError(f"enrollment file {path}: kex_key is not {X25519_KEY_SIZE} bytes")
    fields = {k: v for k, v in doc.items() if k != "signature"}
    try:
        ledger_keys.verify(public_key, _enrollment_message(fields), signature)
    except VerificationError as exc:
        raise IntegrityError(f"enrollment file {path} is not signed by the key it names") from exc
    return doc


# ---------------------------------------------------------------- sealed CKKS secret


def _seal_key(
    shared: bytes, *, federation: str, recipient: str, eph: bytes, static: bytes
) -> bytes:
    info = SEAL_INFO + rfc8785.dumps([federation, recipient, eph.hex(), static.hex()])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal(secret: bytes, *, recipient_kex: bytes, federation: str, recipient: str) -> bytes:
    """Encrypt `secret` so that only the holder of `recipient_kex`'s private key can read it."""
    ephemeral = X25519PrivateKey.generate()
    eph_pub = kex_public(ephemeral)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_kex))
    key = _seal_key(
        shared, federation=federation, recipient=recipient, eph=eph_pub, static=recipient_kex
    )
    nonce = secrets.token_bytes(NONCE_SIZE)
    aad = rfc8785.dumps([federation, recipient])
    return eph_pub + nonce + ChaCha20Poly1305(key).encrypt(nonce, secret, aad)


def open_sealed(blob: bytes, *, kex: X25519PrivateKey, federation: str, recipient: str) -> bytes:
    if len(blob) <= X25519_KEY_SIZE + NONCE_SIZE:
        raise IntegrityError("sealed secret is truncated")
    eph_pub, nonce = blob[:X25519_KEY_SIZE], blob[X25519_KEY_SIZE : X25519_KEY_SIZE + NONCE_SIZE]
    static = kex_public(kex)
    shared = kex.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    key = _seal_key(shared, federation=federation, recipient=recipient, eph=eph_pub, static=static)
    try:
        return ChaCha20Poly1305(key).decrypt(
            nonce, blob[X25519_KEY_SIZE + NONCE_SIZE :], rfc8785.dumps([federation, recipient])
        )
    except InvalidTag as exc:
        raise IntegrityError("sealed secret does not open with this site's key") from exc
