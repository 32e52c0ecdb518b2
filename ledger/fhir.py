"""FHIR R5 export: one AuditEvent per ledger entry, in a collection Bundle. Plain dicts (no
runtime dependency); tests validate them with `fhir.resources`.

Mapping: agent.who = the signing actor; entity = each input/output artifact by hash, plus one
entity for the ledger entry itself whose `detail` carries job, round, site, legal basis, entry
hash, signature and every privacy / round detail (flattened, dotted names); authorization =
HL7 PurposeOfUse; outcome = audit-event-outcome (0 success, 4 refused, 8 failure).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from ledger.entry import utc_now

DCM = "http://dicom.nema.org/resources/ontology/DCM"
OUTCOME = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
PURPOSE = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACTION_SYSTEM = "urn:medfed:ledger:action"
ACTOR_SYSTEM = "urn:medfed:actor"
HASH_SYSTEM = "urn:medfed:sha256"
_NS = uuid.UUID("6d656466-6564-4c65-9467-657200000000")
_ACTION_CODE = {
    "register_key": "C",
    "preprocess": "R",
    "commit_round": "C",
    "job_start": "E",
    "job_end": "E",
    "erase": "D",
    "upload": "E",
    "disclose": "E",
    "access_denied": "R",
}
_OUTCOME_CODE = {
    "success": ("0", "Success"),
    "refused": ("4", "Minor failure"),
    "failure": ("8", "Serious failure"),
}


def audit_event(
    body: dict[str, Any], *, entry_hash: str, signature: str, origin: str
) -> dict[str, Any]:
    code, display = _OUTCOME_CODE.get(body.get("outcome", ""), ("8", "Serious failure"))
    outcome: dict[str, Any] = {"code": {"system": OUTCOME, "code": code, "display": display}}
    reason = (body.get("details") or {}).get("reason")
    if reason:
        outcome["detail"] = [{"text": str(reason)}]
    entities = [
        {
            "what": {"identifier": {"system": HASH_SYSTEM, "value": value}, "display": name},
            "role": {"text": direction},
        }
        for direction, group in (
            ("input", body.get("inputs") or {}),
            ("output", body.get("outputs") or {}),
        )
        for name, value in sorted(group.items())
    ]
    record = {
        "seq": body.get("seq"),
        "entry_hash": entry_hash,
        "signature": signature,
        "job": body.get("job"),
        "round": body.get("round"),
        "site": body.get("site"),
        "legal_basis": body.get("legal_basis"),
        "recipient": body.get("recipient"),
        "privacy": body.get("privacy"),
        "details": body.get("details"),
        "commitments": body.get("commitments"),
    }
    entities.append(
        {
            "what": {
                "identifier": {"system": f"urn:medfed:ledger:{origin}", "value": entry_hash},
                "display": f"ledger entry {body.get('seq')}",
            },
            "role": {"text": "ledger entry"},
            "detail": [d for d in _details(record) if d is not None],
        }
    )
    return {
        "resourceType": "AuditEvent",
        "id": f"medfed-{body.get('seq')}",
        "category": [
            {"coding": [{"system": DCM, "code": "110100", "display": "Application Activity"}]}
        ],
        "code": {
            "coding": [{"system": ACTION_SYSTEM, "code": body.get("action")}],
            "text": body.get("action"),
        },
        "action": _ACTION_CODE.get(body.get("action", ""), "E"),
        "recorded": body.get("recorded"),
        "outcome": outcome,
        "authorization": [
            {"coding": [{"system": PURPOSE, "code": body.get("purpose")}]},
            {"text": f"legal basis: {body.get('legal_basis')}"},
        ],
        "agent": [
            {
                "who": {
                    "identifier": {"system": ACTOR_SYSTEM, "value": body.get("actor")},
                    "display": body.get("actor"),
                },
                "requestor": True,
            }
        ],
        "source": {
            "observer": {
                "identifier": {"system": "urn:medfed:ledger", "value": origin},
                "display": "medfed audit ledger",
            }
        },
        "entity": entities,
    }


def _details(record: dict[str, Any], prefix: str = "") -> Iterable[dict[str, Any] | None]:
    for key, value in record.items():
        name = f"{prefix}{key}"
        if value is None or value == {} or value == []:
            continue
        if isinstance(value, dict):
            yield from _details(value, name + ".")
            continue
        detail: dict[str, Any] = {"type": {"text": name}}
        if isinstance(value, bool):
            detail["valueBoolean"] = value
        elif isinstance(value, int) and abs(value) < 2**31:
            detail["valueInteger"] = value
        elif isinstance(value, int | float):
            detail["valueQuantity"] = {"value": value}
        elif isinstance(value, str):
            detail["valueString"] = value
        else:
            detail["valueString"] = json.dumps(value, sort_keys=True)
        yield detail


def bundle(rows: Iterable[tuple], *, origin: str, timestamp: str | None = None) -> dict[str, Any]:
    """A FHIR R5 collection Bundle of AuditEvents from (seq, body, entry_hash, signature)."""
    entries = []
    for row in rows:
        body = json.loads(row[1])
        resource = audit_event(body, entry_hash=row[2], signature=row[3], origin=origin)
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid5(_NS, row[2])}", "resource": resource})
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": timestamp or utc_now(),
        "entry": entries,
    }
