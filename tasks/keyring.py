"""Where each party's keys live, and the enrollment that creates them.

Site (hospital) `S`, under `site_root/S/keys/`: its Ed25519 identity, its pseudonymization
secret, and the federation's CKKS secret context. Coordinator, under `coordinator_root/`:
its identity, the CKKS *public* context, and the sites' public keys. Nothing secret is ever
copied to the coordinator, the ledger or the artifact store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ledger import keys
from tasks import StepError
from tasks.secure_agg import create_secret_context, public_context

COORDINATOR = "coordinator"
LOG_KEY_NAME = "medfed-log"
PSEUDONYM_SECRET_BYTES = 32


@dataclass(frozen=True, kw_only=True)
class SitePaths:
    root: Path

    @property
    def identity(self) -> Path:
        return self.root / "keys" / "identity.pem"

    @property
    def pseudonym_secret(self) -> Path:
        return self.root / "keys" / "pseudonym.key"

    @property
    def ckks_secret(self) -> Path:
        return self.root / "keys" / "ckks.secret"

    @property
    def coordinator_key(self) -> Path:
        """The coordinator's public key, received at enrollment, to check its artifacts."""
        return self.root / "keys" / "coordinator.pub"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def work(self) -> Path:
        """Site-private intermediate files: local models, plaintext updates, ciphertexts."""
        return self.root / "work"

    def global_model(self, job: str, round_number: int) -> Path:
        return self.root / "models" / job / f"global-r{round_number:04d}.npy"


@dataclass(frozen=True, kw_only=True)
class CoordinatorPaths:
    root: Path

    @property
    def identity(self) -> Path:
        return self.root / "keys" / "identity.pem"

    @property
    def log_key(self) -> Path:
        """The ledger log's key: signs the C2SP checkpoint published at every round commit."""
        return self.root / "keys" / "log.pem"

    @property
    def ckks_public(self) -> Path:
        return self.root / "keys" / "ckks.public"

    def site_public_key(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.pub"


def site_identity(name: str, paths: SitePaths) -> keys.Identity:
    return keys.load(name, paths.identity)


def coordinator_identity(paths: CoordinatorPaths) -> keys.Identity:
    return keys.load(COORDINATOR, paths.identity)


def log_identity(paths: CoordinatorPaths) -> keys.Identity:
    return keys.load(LOG_KEY_NAME, paths.log_key)


def read_secret(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StepError(f"{what} {path} cannot be read; run enrollment first") from exc


def read_public_key(path: Path, whose: str) -> bytes:
    data = read_secret(path, f"public key of {whose}")
    if len(data) != keys.PUBLIC_KEY_SIZE:
        raise StepError(f"public key file {path} is not {keys.PUBLIC_KEY_SIZE} bytes")
    return data


def enroll(
    *,
    sites: list[tuple[str, SitePaths]],
    coordinator: CoordinatorPaths,
    ckks: dict,
) -> None:
    """Create whatever keys are missing; existing keys are kept (re-running is safe).

    The CKKS secret context is generated once and shared by the sites (the known residual
    risk in the README's threat model); the coordinator receives only its public half.
    """
    coord = keys.load_or_create(COORDINATOR, coordinator.identity)
    keys.load_or_create(LOG_KEY_NAME, coordinator.log_key)
    secret_ctx = next(
        (p.ckks_secret.read_bytes() for _, p in sites if p.ckks_secret.exists()), None
    )
    if secret_ctx is None:
        secret_ctx = create_secret_context(**ckks)
    for name, paths in sites:
        identity = keys.load_or_create(name, paths.identity)
        if not paths.pseudonym_secret.exists():
            keys.write_secret(paths.pseudonym_secret, os.urandom(PSEUDONYM_SECRET_BYTES))
        if not paths.ckks_secret.exists():
            keys.write_secret(paths.ckks_secret, secret_ctx)
        if not paths.coordinator_key.exists():
            keys.write_secret(paths.coordinator_key, coord.public_key)
        pub_path = coordinator.site_public_key(name)
        if not pub_path.exists():
            keys.write_secret(pub_path, identity.public_key)
    if not coordinator.ckks_public.exists():
        keys.write_secret(coordinator.ckks_public, public_context(secret_ctx))
