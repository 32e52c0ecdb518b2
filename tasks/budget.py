"""A site's budget check and the reservation it grants, as ONE ledger transaction.

`reserve` runs inside `Ledger.append_decided`: under the ledger's write lock it reads the
site's own entries, recomputes its spend (`ledger.accounting`) at the delta its recorded
policy pins, and appends either a `reserve` entry (the hold) or a `refuse` entry. Two jobs,
processes or machines racing for the last of a budget are serialized by the database: the
second one sees the first one's hold. The site's policy is recorded first whenever it
differs from the one the ledger holds, so a changed budget, delta, opt-out or metrics
policy is itself on the record before any check uses it.

A retried phase reuses the reservation it already holds (or released) for the same job,
round and population, so a retry never charges twice; one whose hold lapsed (the round died
before anything left the site) reserves again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ledger.accounting import (
    Charge,
    Policy,
    Population,
    Release,
    SiteAccount,
    State,
    account,
)
from ledger.entry import Action, Outcome
from tasks import WorkFailed
from tasks.messages import parse_utc
from tasks.site_run import SiteRun


class BudgetRefused(WorkFailed):
    """The site's budget (or its policy) does not allow this release: nothing left the site."""


@dataclass(frozen=True, kw_only=True)
class Grant:
    """The outcome of one check: a reservation (new or reused) or a refusal, with figures."""

    admitted: bool
    key: str = ""  # the reservation's idempotency key
    spent: float = 0.0  # epsilon of what counted before this reservation
    projected: float = 0.0  # epsilon with it
    budget: float = math.inf
    reason: str = ""
    reused: bool = False


def pinned_delta(run: SiteRun) -> float:
    """The delta every figure of this site is stated at: its own policy's (recorded in the
    ledger before any check uses it), never a federation's."""
    return run.site.settings.privacy.delta


def site_policy(run: SiteRun) -> Policy:
    """The policy this site enforces, from its own `site.toml` (and the plan's accountant)."""
    own = run.site.settings.privacy
    return Policy(
        epsilon_budget=own.epsilon_budget,
        delta=pinned_delta(run),
        accountant=str(run.fed.dp.accountant),
        allow_non_dp=own.allow_non_dp,
        metrics=own.metrics,
    )


def reserve(
    run: SiteRun,
    population: Population,
    releases: Sequence[Release],
    *,
    dp: bool,
    refusal_step: str,
    now: datetime | None = None,
) -> Grant:
    """Check the budget and hold `releases` for this job and round, atomically. A refusal is
    recorded under `refusal_step`'s key (once per step: a retry finds it)."""
    policy = site_policy(run)
    budget = min(policy.epsilon_budget, run.fed.dp.epsilon_budget)
    when = now or datetime.now(UTC)
    decided: list[Grant] = []
    rec = run.recorder()

    def decide(read: Any) -> list[Any]:
        acc = account(read(site=run.name), run.name, now=when)
        held = _counted_for(acc, run.job, run.round, population)
        if held is not None:
            decided.append(Grant(admitted=True, key=held.key, budget=budget, reused=True))
            return []
        items = []
        if acc.policy != policy:
            items.append(
                rec.event(
                    Action.POLICY,
                    f"policy-{acc.policies + 1}",
                    privacy=policy.as_dict(),
                    details={"previous": acc.policy.as_dict() if acc.policy else None},
                )
            )
        figures = {"delta": policy.delta, "accountant": policy.accountant}
        spent = acc.spent(**figures)
        key = rec.key(f"reserve-{population}-{sum(c.job == run.job for c in acc.charges) + 1}")
        hold = Charge(
            key=key,
            job=run.job,
            round=run.round,
            population=population,
            releases=tuple(releases),
            dp=dp,
            state=State.HELD,
        )
        projected = acc.spent(**figures, extra=[hold])
        if not dp and not policy.allow_non_dp:
            reason = (
                "the plan trains without DP and this site's policy does not allow releasing a "
                "non-DP update (privacy.allow_non_dp)"
            )
        elif dp and projected > budget:
            reason = (
                f"budget exhausted: this release would bring epsilon from {spent:.3f} to "
                f"{projected:.3f}, over the budget of {budget:g}"
            )
        else:
            reason = ""
        record = {
            "population": str(population),
            "dp": dp,
            "releases": [r.as_dict() for r in releases],
            "epsilon_spent": as_figure(spent),
            "epsilon_projected": as_figure(projected),
            "epsilon_budget": budget,
            **figures,
        }
        if reason:
            items.append(
                rec.event(
                    Action.REFUSE,
                    refusal_step,
                    outcome=Outcome.REFUSED,
                    privacy=record,
                    details={"reason": reason},
                )
            )
        else:
            expires = parse_utc(run.instr.deadline).isoformat()
            items.append(rec.event(Action.RESERVE, key=key, privacy=record | {"expires": expires}))
        decided.append(
            Grant(
                admitted=not reason,
                key="" if reason else key,
                spent=spent,
                projected=projected,
                budget=budget,
                reason=reason,
            )
        )
        return items

    run.ledger.append_decided(decide)
    return decided[-1]


def _counted_for(
    acc: SiteAccount, job: str, round_number: int, population: Population
) -> Charge | None:
    """A reservation already made for this job, round and population that still counts."""
    for c in acc.charges:
        if c.job == job and c.round == round_number and c.population == population and c.counts:
            return c
    return None


def as_figure(eps: float) -> float | str:
    """Epsilon as JSON can hold it (the ledger's canonical JSON has no infinity)."""
    return eps if math.isfinite(eps) else "unbounded"
