"""The steps of a federated round: plain functions, each under a thin Prefect task."""


class StepError(Exception):
    """Root of every error a round step raises on bad input or a failed check."""


class IntegrityError(StepError):
    """An artifact's hash, size or signature does not match its reference."""


__all__ = ["IntegrityError", "StepError"]
