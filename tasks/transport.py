"""Moving artifacts by signed reference through an fsspec store.

Steps pass an `ArtifactRef` (URI, SHA-256, size, who and what it is for, Ed25519 signature),
never the payload. The signature covers the RFC 8785 canonical JSON of
``{job, round, site, kind, sha256, size}`` (`ref_message`): not the URI, so a store can be moved
without re-signing; the URI is only where to look, the hash says what must be found there.

`fetch` checks, in order: the signature against the key the caller expects, that the reference
is for the job, round, kind (and site) the caller expects (a replayed reference from another
round or job is refused), then the size and hash of the bytes read. Every failure is one
`IntegrityError` naming the URI.

Writes are atomic: the bytes go to ``<key>.partial-<random>`` and are then moved into place, so
a reader never sees half an artifact at the key. Writing a key again replaces the artifact;
references to the old bytes then fail their hash check.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import posixpath
import re
import secrets
from enum import StrEnum
from typing import Any

import rfc8785
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ledger import VerificationError
from ledger import keys as ledger_keys
from ledger.keys import Identity
from tasks import IntegrityError, StepError

PARTIAL_MARKER = ".partial-"
PARTIAL_TOKEN_BYTES = 8
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
# RFC 8785 numbers are IEEE doubles: integers beyond 2^53 - 1 are not exact.
MAX_JSON_INT = 2**53 - 1
# A key is '/'-separated segments of letters, digits, '_', '-', '.', '='; none starts with '.'.
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]*")
# fsspec raises these for a bad URL, an unknown protocol or a failed read or write.
_FS_ERRORS = (OSError, ValueError, ImportError, KeyError)


class ArtifactKind(StrEnum):
    """Well-known artifact kinds; any non-empty string is accepted in a reference."""

    UPDATE = "update"
    AGGREGATE = "aggregate"


class ArtifactRef(BaseModel):
    """Where an artifact is, what it must hash to, and who vouches for it for which step."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    uri: str = Field(min_length=1)
    sha256: str = Field(pattern=SHA256_HEX_PATTERN)
    size: int = Field(ge=0, le=MAX_JSON_INT)
    job: str = Field(min_length=1)
    round: int = Field(ge=0, le=MAX_JSON_INT)
    site: str = Field(min_length=1)
    kind: str = Field(min_length=1)
    signer: str = Field(min_length=1)
    signature: str = Field(min_length=1)  # base64 Ed25519 over ref_message(...)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ref_message(*, job: str, round: int, site: str, kind: str, sha256: str, size: int) -> bytes:
    """The bytes a reference's signature covers: RFC 8785 JSON, independent of location."""
    for name, text in (("job", job), ("site", site), ("kind", kind)):
        if not isinstance(text, str) or not text:
            raise StepError(f"reference field {name} must be a non-empty string, got {text!r}")
    for name, value in (("round", round), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_JSON_INT:
            raise StepError(f"reference field {name} must be an integer in [0, 2^53): {value!r}")
    if not isinstance(sha256, str) or not re.fullmatch(SHA256_HEX_PATTERN, sha256):
        raise StepError(f"reference field sha256 must be 64 lowercase hex digits, got {sha256!r}")
    fields: dict[str, Any] = {
        "job": str(job),
        "round": int(round),
        "site": str(site),
        "kind": str(kind),
        "sha256": sha256,
        "size": int(size),
    }
    return rfc8785.dumps(fields)


def load_ref(text: str | bytes) -> ArtifactRef:
    """Parse a reference received as JSON; a malformed one is an IntegrityError."""
    try:
        return ArtifactRef.model_validate_json(text)
    except ValidationError as exc:
        raise IntegrityError(
            f"artifact reference is malformed: {exc.error_count()} invalid fields"
        ) from exc


def put_bytes(store_url: str, key: str, data: bytes) -> str:
    """Atomically write `data` at `key` under `store_url`; return the artifact's URI."""
    _check_key(key)
    uri = f"{store_url.rstrip('/')}/{key}"
    try:
        fs, path = url_to_fs(uri)
    except _FS_ERRORS as exc:
        raise StepError(f"artifact store {store_url!r} is not a usable fsspec URL: {exc}") from exc
    partial = f"{path}{PARTIAL_MARKER}{secrets.token_hex(PARTIAL_TOKEN_BYTES)}"
    try:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(partial, bytes(data))
        fs.mv(partial, path)
    except _FS_ERRORS as exc:
        with contextlib.suppress(*_FS_ERRORS):
            if fs.exists(partial):
                fs.rm(partial)
        raise StepError(f"cannot write artifact {uri}: {exc}") from exc
    return uri


def get_bytes(store_url: str, key: str) -> bytes | None:
    """The bytes at `key` under `store_url`, or None when nothing is there."""
    _check_key(key)
    uri = f"{store_url.rstrip('/')}/{key}"
    try:
        fs, path = url_to_fs(uri)
        if not fs.exists(path):
            return None
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except _FS_ERRORS as exc:
        raise StepError(f"cannot read artifact {uri}: {exc}") from exc


def check_writable(store_url: str) -> None:
    """Write and delete a probe: a store that cannot be written fails before anyone trains."""
    key = f"_probe/{secrets.token_hex(PARTIAL_TOKEN_BYTES)}"
    uri = put_bytes(store_url, key, b"medfed")
    try:
        fs, path = url_to_fs(uri)
        fs.rm(path)
    except _FS_ERRORS as exc:
        raise StepError(
            f"artifact store {store_url} accepts writes but not deletes: {exc}"
        ) from exc


def publish(
    store_url: str,
    key: str,
    data: bytes,
    *,
    job: str,
    round: int,
    site: str,
    kind: str,
    signer: Identity,
) -> ArtifactRef:
    """Store `data` and return a reference signed by `signer`."""
    digest, size = sha256_hex(data), len(data)
    message = ref_message(job=job, round=round, site=site, kind=kind, sha256=digest, size=size)
    uri = put_bytes(store_url, key, data)
    return ArtifactRef(
        uri=uri,
        sha256=digest,
        size=size,
        job=job,
        round=round,
        site=site,
        kind=str(kind),
        signer=signer.name,
        signature=base64.b64encode(signer.sign(message)).decode("ascii"),
    )


def fetch(
    ref: ArtifactRef,
    *,
    public_key: bytes,
    job: str,
    round: int,
    kind: str,
    site: str | None = None,
) -> bytes:
    """Read the artifact `ref` names after checking its signature, purpose, size and hash."""
    uri = ref.uri
    try:
        signature = base64.b64decode(ref.signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IntegrityError(f"artifact {uri} has a signature that is not base64") from exc
    try:
        message = ref_message(
            job=ref.job,
            round=ref.round,
            site=ref.site,
            kind=ref.kind,
            sha256=ref.sha256,
            size=ref.size,
        )
    except StepError as exc:  # only a reference built without validation gets here
        raise IntegrityError(f"artifact {uri} has a malformed reference: {exc}") from exc
    try:
        ledger_keys.verify(public_key, message, signature)
    except VerificationError as exc:
        raise IntegrityError(
            f"artifact {uri} has a reference not signed by the expected key ({exc})"
        ) from exc
    expected = (job, round, str(kind), ref.site if site is None else site)
    if (ref.job, ref.round, ref.kind, ref.site) != expected:
        raise IntegrityError(
            f"artifact {uri} is signed for job {ref.job!r} round {ref.round} kind {ref.kind!r} "
            f"site {ref.site!r}, not the expected job {job!r} round {round} kind {str(kind)!r}"
            + ("" if site is None else f" site {site!r}")
        )
    try:
        fs, path = url_to_fs(uri)
        stored = fs.size(path)
        if stored is not None and stored != ref.size:
            raise IntegrityError(f"artifact {uri} holds {stored} bytes, its reference {ref.size}")
        data = fs.cat_file(path)
    except _FS_ERRORS as exc:
        raise IntegrityError(f"artifact {uri} cannot be read: {exc}") from exc
    if len(data) != ref.size:
        raise IntegrityError(f"artifact {uri} holds {len(data)} bytes, its reference {ref.size}")
    if sha256_hex(data) != ref.sha256:
        raise IntegrityError(f"artifact {uri} does not match its reference's SHA-256")
    return data


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise StepError(f"artifact key {key!r} must be a non-empty relative path")
    if key.startswith("/") or "\\" in key or "://" in key:
        raise StepError(f"artifact key {key!r} must be a relative path, not absolute")
    segments = key.split("/")
    if ".." in segments:
        raise StepError(f"artifact key {key!r} must not contain '..'")
    if PARTIAL_MARKER in key or not all(_KEY_SEGMENT.fullmatch(s) for s in segments):
        raise StepError(
            f"artifact key {key!r} must be '/'-separated names of letters, digits, '_', '-', "
            "'.', '=' that do not start with '.'"
        )


__all__ = [
    "ArtifactKind",
    "ArtifactRef",
    "check_writable",
    "fetch",
    "get_bytes",
    "load_ref",
    "publish",
    "put_bytes",
    "ref_message",
    "sha256_hex",
]
