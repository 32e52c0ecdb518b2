"""Privacy accounting over the ledger: what each site has released, held and spent.

The ledger is the source of truth for every release. A site charges its budget with a signed
`reserve` entry, written by the same transaction that checked the budget (`Ledger.
append_decided`), so no interleaving of jobs, processes or sites can pass the check twice on
one remainder. A reservation names the releases it covers and a deadline:

- it COUNTS once the update or the metrics it covers left the site (an `upload` or
  `evaluate` entry of that site names it), and while it is unexpired (in flight);
- it LAPSES when it expired unreleased: the round died before anything left the site, so
  nothing was disclosed and nothing stays charged. A retry that releases later reserves
  again (or reuses a live reservation): one charge per update that left.

Two populations are accounted apart: `training` patients (DP-SGD and site-level update noise)
and `heldout` patients (noisy evaluation metrics). A patient's side of the split is decided
by a keyed hash of its own pseudonym alone, so the two sets are disjoint and fixed under
adding or removing one patient: by parallel composition the site's epsilon is the larger of
the two. A counted non-DP reservation (the site's policy opted out) makes the site's spend
unbounded. Every figure is recomputed by an accountant at the delta the site's policy pins,
never taken from what an entry claims.

Entries written before reservations existed (a `train` or `clip_and_noise` entry carrying a
release and no reservation) are charged as they are.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ledger import LedgerError


class Population(StrEnum):
    TRAINING = "training"
    HELDOUT = "heldout"


class Metrics(StrEnum):
    """How a site releases held-out metrics (its own policy)."""

    NOISY = "noisy"  # Gaussian noise on a patient-level histogram: accounted (heldout)
    EXACT = "exact"  # exact figures, no DP for held-out patients: shown, never hidden


RESERVE, POLICY, UPLOAD, EVALUATE = "reserve", "policy", "upload", "evaluate"
_LEGACY = ("train", "clip_and_noise")


@dataclass(frozen=True, kw_only=True)
class Release:
    """One DP mechanism: `steps` Gaussian steps at `sample_rate` with `noise_multiplier`
    (noise std over sensitivity). A Gaussian mechanism without sampling has sample_rate 1."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        ok = (
            math.isfinite(self.noise_multiplier)
            and self.noise_multiplier > 0
            and 0 < self.sample_rate <= 1
            and isinstance(self.steps, int)
            and self.steps >= 1
        )
        if not ok:
            raise LedgerError(f"invalid DP release {asdict(self)}")

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


ACCOUNTANTS = ("prv", "rdp")


def epsilon(history: Sequence[Release], *, delta: float, accountant: str) -> float:
    """Cumulative epsilon at `delta` of every release in `history` (0 when empty), by
    Opacus' accountant `accountant` ("prv" or "rdp")."""
    if accountant not in ACCOUNTANTS:
        raise LedgerError(f"unknown accountant '{accountant}' (use one of {list(ACCOUNTANTS)})")
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant  # torch: load only when used

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(nm, q, steps) for (nm, q), steps in merged(history).items()]
    # PRV evaluates log(1 - q) inside np.where, which warns (harmlessly) at sample rate 1; the
    # RDP optimum at the largest order is a valid (looser) bound.
    import numpy as np

    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def merged(history: Sequence[Release]) -> dict[tuple[float, float], int]:
    """Releases of the same mechanism compose into one with the summed steps; merging them
    keeps the accountant's cost constant however many rounds the ledger holds."""
    steps: dict[tuple[float, float], int] = {}
    for r in history:
        key = (r.noise_multiplier, r.sample_rate)
        steps[key] = steps.get(key, 0) + r.steps
    return steps


@dataclass(frozen=True, kw_only=True)
class Policy:
    """A site's privacy policy as it recorded it in the ledger (a `policy` entry)."""

    epsilon_budget: float
    delta: float
    accountant: str
    allow_non_dp: bool = False
    metrics: Metrics = Metrics.NOISY

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"metrics": str(self.metrics)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        return cls(
            epsilon_budget=float(d["epsilon_budget"]),
            delta=float(d["delta"]),
            accountant=str(d["accountant"]),
            allow_non_dp=bool(d.get("allow_non_dp", False)),
            metrics=Metrics(d.get("metrics", Metrics.NOISY)),
        )


class State(StrEnum):
    RELEASED = "released"  # what it covers left the site: charged for good
    HELD = "held"  # in flight, unexpired: charged until it lapses
    LAPSED = "lapsed"  # expired before anything left the site: not charged


@dataclass(frozen=True, kw_only=True)
class Charge:
    """One reservation (or a pre-reservation release) and whether it counts."""

    key: str
    job: str
    round: int | None
    population: Population
    releases: tuple[Release, ...]
    dp: bool
    state: State
    delta: float | None = None  # the delta recorded with it (the check uses the pinned one)
    seq: int | None = None  # the entry that made it, and when (for the spend over time)
    recorded: str | None = None

    @property
    def counts(self) -> bool:
        return self.state != State.LAPSED


@dataclass(kw_only=True)
class SiteAccount:
    """Everything the ledger says about one site's privacy spend."""

    site: str
    policy: Policy | None = None
    policies: int = 0  # policy entries recorded: the first, then one per change
    charges: list[Charge] = field(default_factory=list)
    refusals: int = 0
    exact_metrics: int = 0  # evaluations released exactly under the site's policy
    epsilon_recorded: float = 0.0  # the largest cumulative figure an entry claims
    # The figures entries were stated at, for ledgers older than policy entries.
    stated: dict[str, Any] = field(default_factory=dict)

    def effective_policy(self) -> Policy | None:
        """The recorded policy; for an older ledger, the budget, delta and accountant its
        entries were stated at."""
        if self.policy is not None:
            return self.policy
        if {"epsilon_budget", "delta", "accountant"} <= self.stated.keys():
            return Policy.from_dict(self.stated)
        return None

    def history(self, population: Population) -> list[Release]:
        return [
            r for c in self.charges if c.counts and c.population == population for r in c.releases
        ]

    @property
    def unbounded(self) -> bool:
        """A counted non-DP release: no epsilon bounds what the site disclosed."""
        return any(c.counts and not c.dp for c in self.charges)

    @property
    def dp_optouts(self) -> int:
        return sum(1 for c in self.charges if not c.dp)

    def spent(self, *, delta: float, accountant: str, extra: Sequence[Charge] = ()) -> float:
        """Epsilon at `delta` over every counted charge (plus `extra`)."""
        return spent([*self.charges, *extra], delta=delta, accountant=accountant)


def spent(charges: Sequence[Charge], *, delta: float, accountant: str) -> float:
    """Epsilon at `delta` over the counted ones of `charges`, the larger of the two
    populations (parallel composition); infinite after a counted non-DP release."""
    if any(c.counts and not c.dp for c in charges):
        return math.inf
    return max(
        epsilon(
            [r for c in charges if c.counts and c.population == p for r in c.releases],
            delta=delta,
            accountant=accountant,
        )
        for p in Population
    )


def _when(text: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def releases_of(p: Mapping[str, Any]) -> tuple[Release, ...]:
    try:
        return tuple(Release(**r) for r in p.get("releases", ()))
    except (TypeError, LedgerError) as exc:
        raise LedgerError(f"a reservation holds an invalid release: {exc}") from None


def accounts(
    bodies: Iterable[Mapping[str, Any]], *, now: datetime | None = None
) -> dict[str, SiteAccount]:
    """Every site's account from entry bodies (screened by the roster), in seq order. Only a
    site's own entries about itself count."""
    now = now or datetime.now(UTC)
    out: dict[str, SiteAccount] = {}
    reserved: dict[tuple[str, str], dict[str, Any]] = {}  # (site, key) -> reserve body
    released: set[tuple[str, str]] = set()
    legacy: list[Mapping[str, Any]] = []
    for b in bodies:
        site = b.get("site")
        if not site or b.get("actor") != site:
            continue
        acc = out.setdefault(site, SiteAccount(site=site))
        action, p, details = b.get("action"), b.get("privacy") or {}, b.get("details") or {}
        if action == POLICY:
            acc.policies += 1
            acc.policy = Policy.from_dict(p)
        elif action == RESERVE and b.get("outcome") == "success":
            reserved[(site, b["idempotency_key"])] = dict(b)
        elif action in (UPLOAD, EVALUATE) and details.get("reservation"):
            released.add((site, str(details["reservation"])))
        elif action == "refuse":
            acc.refusals += 1
        if action == EVALUATE and "auc" in details and details.get("metrics", "exact") == "exact":
            acc.exact_metrics += 1
        if action in _LEGACY and b.get("outcome") == "success" and "reservation" not in p:
            legacy.append(b)
        acc.stated |= {k: p[k] for k in ("epsilon_budget", "delta", "accountant") if k in p}
        # What an entry claims was spent: a refusal's projection was never spent.
        cumulative = (
            p.get("epsilon_projected") if action == RESERVE else p.get("epsilon_cumulative")
        )
        if isinstance(cumulative, int | float) and math.isfinite(cumulative):
            acc.epsilon_recorded = max(acc.epsilon_recorded, float(cumulative))
    for (site, key), b in reserved.items():
        p = b["privacy"]
        expires = _when(p.get("expires"))
        if (site, key) in released:
            state = State.RELEASED
        elif expires is not None and now < expires:
            state = State.HELD
        else:
            state = State.LAPSED
        out[site].charges.append(
            Charge(
                key=key,
                job=b.get("job", ""),
                round=b.get("round"),
                population=Population(p.get("population", Population.TRAINING)),
                releases=releases_of(p),
                dp=bool(p.get("dp", True)),
                state=state,
                delta=p.get("delta"),
                seq=b.get("seq"),
                recorded=b.get("recorded"),
            )
        )
    for b in legacy:
        p = b.get("privacy") or {}
        release = p.get("release")
        if b["action"] == "clip_and_noise" and not release:
            continue  # clipped without site-level noise: no release
        out[b["site"]].charges.append(
            Charge(
                key=b["idempotency_key"],
                job=b.get("job", ""),
                round=b.get("round"),
                population=Population.TRAINING,
                releases=(Release(**release),) if release else (),
                dp=bool(release),
                state=State.RELEASED,
                delta=p.get("delta"),
                seq=b.get("seq"),
                recorded=b.get("recorded"),
            )
        )
    for acc in out.values():
        acc.charges.sort(key=lambda c: -1 if c.seq is None else c.seq)
    return out


def account(
    bodies: Iterable[Mapping[str, Any]], site: str, *, now: datetime | None = None
) -> SiteAccount:
    return accounts(bodies, now=now).get(site) or SiteAccount(site=site)
