"""One phase at one site: the checked instruction, its plan and the site, loaded once and
handed to every step."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ledger.store import Ledger
from tasks.config import DPConfig, FederationConfig
from tasks.messages import Instruction
from tasks.record import Recorder
from tasks.site import Site

log = logging.getLogger("medfed.site")


def step_log() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task or flow (console and UI), else ours."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            return get_run_logger()
        except MissingContextError:
            return log
    except ImportError:  # pragma: no cover
        return log


# ---------------------------------------------------------------- the run of one phase


@dataclass(frozen=True, kw_only=True)
class SiteRun:
    """One phase at one site: the checked instruction, its plan, the site; loaded once."""

    site: Site
    instr: Instruction
    fed: FederationConfig

    @property
    def job(self) -> str:
        return self.instr.job

    @property
    def round(self) -> int:
        return self.instr.round

    @property
    def name(self) -> str:
        return self.site.name

    @cached_property
    def ledger(self) -> Ledger:
        """The federation's ledger, read and written under the identities the plan pins."""
        return Ledger(self.fed.ledger_url, roster=self.fed.roster())

    def recorder(self, round_number: int | None = None) -> Recorder:
        return Recorder(
            ledger=self.ledger,
            signer=self.site.identity,
            job=self.job,
            round=self.round if round_number is None else round_number,
            purpose=self.fed.purpose,
            legal_basis=self.fed.legal_basis,
            site=self.name,
        )

    @cached_property
    def dp(self) -> DPConfig:
        """The federation's DP settings under the site's own policy: the stricter budget and
        delta win."""
        own = self.site.settings.privacy
        return self.fed.dp.model_copy(
            update={
                "epsilon_budget": min(own.epsilon_budget, self.fed.dp.epsilon_budget),
                "delta": min(own.delta, self.fed.dp.delta),
            }
        )

    def work(self) -> Path:
        return self.site.work(self.job, self.round)

    @property
    def coordinator_key(self) -> bytes:
        return bytes.fromhex(self.site.settings.accepts.coordinator_key)

    def site_key(self, name: str) -> bytes:
        return bytes.fromhex(self.fed.site(name).public_key)
