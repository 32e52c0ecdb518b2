"""One place that turns a step's result into its ledger entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger.entry import Action, Event, Outcome
from ledger.keys import Identity
from ledger.store import Appended, Ledger


def step_key(job: str, round_number: int, party: str, step: str) -> str:
    """The idempotency key `job/r<round>/<party>/<step>`: a retried step writes nothing twice."""
    return f"{job}/r{round_number}/{party}/{step}"


@dataclass(frozen=True, kw_only=True)
class Recorder:
    """Who is writing (the signer), for which job and round, under which purpose and basis."""

    ledger: Ledger
    signer: Identity
    job: str
    round: int
    purpose: str = "HRESCH"
    legal_basis: str = "GDPR Art. 9(2)(j)"
    site: str | None = None  # the site the entries are about (None: the whole federation)

    def key(self, step: str) -> str:
        return step_key(self.job, self.round, self.site or self.signer.name, step)

    def prior(self, step: str) -> dict[str, Any] | None:
        found = self.ledger.events(idempotency_key=self.key(step), actor=self.signer.name)
        return found[0] if found else None

    def event(
        self,
        action: Action,
        step: str | None = None,
        *,
        outcome: Outcome = Outcome.SUCCESS,
        site: str | None = None,
        inputs: dict[str, str] | None = None,
        outputs: dict[str, str] | None = None,
        privacy: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
        recipient: str | None = None,
        key: str | None = None,
    ) -> tuple[Event, Identity]:
        """The event and its signer, for `Ledger.append_decided` (or `record`)."""
        return (
            Event(
                actor=self.signer.name,
                action=action,
                outcome=outcome,
                job=self.job,
                round=self.round,
                site=site or self.site,
                purpose=self.purpose,
                legal_basis=self.legal_basis,
                idempotency_key=key or self.key(step or str(action)),
                inputs=inputs or {},
                outputs=outputs or {},
                privacy=privacy,
                details=details or {},
                recipient=recipient,
            ),
            self.signer,
        )

    def record(self, action: Action, step: str | None = None, **fields: Any) -> Appended:
        """Append one step's entry (a no-op when its idempotency key is already there)."""
        return self.ledger.append(*self.event(action, step, **fields))
