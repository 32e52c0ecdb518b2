"""The steps of a federated round: plain functions, each under a thin Prefect task.

One error root, `StepError`; each error class carries the exit code the CLI gives it, so the
codes are defined here once: bad input (a file, a field, a setting) exits 2, a failure of the
work (a check that failed, a budget exhausted, too few sites) exits 1.
"""


class StepError(Exception):
    """Root of every error a step raises. By default bad input: exit code 2."""

    exit_code = 2


class WorkFailed(StepError):
    """The input was fine but the work did not succeed (too few sites, budget exhausted)."""

    exit_code = 1


class IntegrityError(WorkFailed):
    """An artifact's or message's hash, size or signature does not match its reference."""


__all__ = ["IntegrityError", "StepError", "WorkFailed"]
