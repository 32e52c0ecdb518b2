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


class Quarantined(StepError):
    """One input file cannot be used: the site sets it aside and goes on without it.

    ``stage`` is where it failed (read, header, deidentify, pixels, image), ``code`` a short
    reason that counts are kept by, ``detail`` one sentence naming the attribute or transfer
    syntax. None of them ever holds a header value or the file's name (folder and file names at
    hospitals often carry patient IDs): the file is named only in the site-local report."""

    def __init__(self, stage: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.stage = stage
        self.code = code
        self.detail = detail


__all__ = ["IntegrityError", "Quarantined", "StepError", "WorkFailed"]
