"""The two messages that cross the site boundary, both signed, both small.

Down: an `Instruction` from the coordinator (job, round, phase, the plan and its digest, the
global model and aggregate references, CKKS key references, a deadline), Ed25519-signed by the
coordinator. A site checks it before touching data (`tasks.site_phase.check_instruction`).

Up: a `SiteReport` (status, counts, metrics, signed artifact references: never a payload and
never a site-private path), Ed25519-signed by the site and written to the artifact store at a
key the coordinator knows (`report_key`), so nothing depends on Prefect's result store.

Signatures cover a domain prefix plus the RFC 8785 canonical JSON of the message body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import rfc8785
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ledger import VerificationError
from ledger import keys as ledger_keys
from ledger.keys import Identity
from tasks import IntegrityError, StepError, transport
from tasks.transport import ArtifactRef

INSTRUCTION_DOMAIN = b"medfed/instruction/v1\n"
REPORT_DOMAIN = b"medfed/site-report/v1\n"
NONCE_BYTES = 16


class Phase(StrEnum):
    PREPARE = "prepare"  # once per job run: check, preprocess, key material; nobody trains
    # preprocess (cached) -> train -> clip_and_noise -> (cohort named) mask, encrypt -> upload
    TRAIN = "train"
    UPLOAD = "upload"  # after a dropout: mask and encrypt again for a new cohort -> upload
    EVALUATE = "evaluate"  # fetch aggregate -> decrypt -> strategy update -> evaluate
    WITNESS = "witness"  # check the ledger extends what the site saw; cosign its checkpoint


class Status(StrEnum):
    COMPLETED = "completed"
    REFUSED = "refused"  # the site declined: instruction, policy or budget
    FAILED = "failed"


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GlobalModel(_Msg):
    """The global model a round starts from: its hash and every aggregate that built it, so a
    site that missed a round rebuilds it (round 0 is the seed's initial model)."""

    round: int = Field(ge=0)
    model_hash: str = ""  # empty for round 0: each site derives it from the seed
    aggregates: tuple[ArtifactRef, ...] = ()


class Instruction(_Msg):
    v: int = 1
    job: str = Field(min_length=1)
    round: int = Field(ge=0)
    phase: Phase
    site: str
    plan: dict[str, Any]
    plan_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    issued: str
    deadline: str
    nonce: str
    global_model: GlobalModel | None = None
    aggregate: ArtifactRef | None = None
    he_public: ArtifactRef | None = None
    he_secret: ArtifactRef | None = None  # the encryption secret sealed to this site
    # Upload phase: the sites whose updates are summed (site -> training samples, which give
    # the FedAvg weights) and the attempt (a new one, with fresh masks, after a dropout).
    cohort: dict[str, int] | None = None
    attempt: int = Field(default=0, ge=0)


class SiteReport(_Msg):
    v: int = 1
    job: str
    round: int
    phase: Phase
    site: str
    status: Status
    instruction: str  # sha256 of the instruction's signed bytes
    attempt: int = 0
    reason: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


def _signed(domain: bytes, body: BaseModel, signer: Identity) -> str:
    fields = body.model_dump(mode="json")
    signature = signer.sign(domain + rfc8785.dumps(fields))
    return json.dumps({"body": fields, "signature": base64.b64encode(signature).decode()})


def _open(domain: bytes, text: str | bytes, public_key: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
        fields, signature = doc["body"], base64.b64decode(doc["signature"], validate=True)
        message = domain + rfc8785.dumps(fields)
    except (ValueError, KeyError, TypeError, binascii.Error, rfc8785.CanonicalizationError) as exc:
        raise IntegrityError(f"{what} is not a signed medfed message") from exc
    try:
        ledger_keys.verify(public_key, message, signature)
    except VerificationError as exc:
        raise IntegrityError(f"{what} is not signed by the expected key") from exc
    return fields


def message_digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def utc(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def make_instruction(
    *,
    signer: Identity,
    job: str,
    round: int,
    phase: Phase,
    site: str,
    plan: dict[str, Any],
    plan_digest: str,
    timeout_seconds: float,
    now: datetime | None = None,
    **refs: Any,
) -> str:
    """A signed instruction (JSON text, what travels as the flow run's parameter)."""
    now = now or datetime.now(UTC)
    body = Instruction(
        job=job,
        round=round,
        phase=phase,
        site=site,
        plan=plan,
        plan_digest=plan_digest,
        issued=utc(now),
        deadline=utc(now + timedelta(seconds=timeout_seconds)),
        nonce=secrets.token_hex(NONCE_BYTES),
        **refs,
    )
    return _signed(INSTRUCTION_DOMAIN, body, signer)


def peek_instruction(text: str) -> dict[str, Any]:
    """The instruction's fields WITHOUT checking its signature: only to name what a refusal
    refers to. Never act on them."""
    try:
        body = json.loads(text)["body"]
        return body if isinstance(body, dict) else {}
    except (ValueError, KeyError, TypeError):
        return {}


def open_instruction(text: str, *, coordinator_key: bytes) -> Instruction:
    fields = _open(INSTRUCTION_DOMAIN, text, coordinator_key, "instruction")
    try:
        return Instruction.model_validate(fields)
    except ValidationError as exc:
        raise IntegrityError(
            f"instruction is malformed: {exc.error_count()} invalid fields"
        ) from exc


def keys_job(federation: str) -> str:
    """Key material is per federation, not per job: its references use job "<name>-keys"."""
    return f"{federation}-keys"


def report_key(job: str, round: int, site: str, phase: Phase, attempt: int = 0) -> str:
    suffix = f"-a{attempt}" if attempt else ""
    return f"{job}/r{round:04d}/{site}.{phase}{suffix}.report.json"


def write_report(store: str, report: SiteReport, signer: Identity) -> str:
    key = report_key(report.job, report.round, report.site, report.phase, report.attempt)
    return transport.put_bytes(store, key, _signed(REPORT_DOMAIN, report, signer).encode())


def read_report(
    store: str,
    *,
    job: str,
    round: int,
    site: str,
    phase: Phase,
    public_key: bytes,
    attempt: int = 0,
) -> SiteReport | None:
    """The site's signed report for (job, round, phase, attempt), or None when there is none."""
    key = report_key(job, round, site, phase, attempt)
    data = transport.get_bytes(store, key)
    if data is None:
        return None
    fields = _open(REPORT_DOMAIN, data, public_key, f"report {key}")
    try:
        report = SiteReport.model_validate(fields)
    except ValidationError as exc:
        raise IntegrityError(f"report {key} is malformed") from exc
    if (report.job, report.round, report.site, report.phase, report.attempt) != (
        job,
        round,
        site,
        phase,
        attempt,
    ):
        raise IntegrityError(f"report {key} is signed for another job, round, site or phase")
    return report


def ref_of(data: dict[str, Any] | None) -> ArtifactRef | None:
    if not data:
        return None
    try:
        return ArtifactRef.model_validate(data)
    except ValidationError as exc:
        raise IntegrityError("a report holds a malformed artifact reference") from exc


__all__ = [
    "GlobalModel",
    "Instruction",
    "Phase",
    "SiteReport",
    "Status",
    "StepError",
    "make_instruction",
    "open_instruction",
    "read_report",
    "write_report",
]
