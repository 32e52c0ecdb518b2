"""What every `medfed` command shares: the consoles, and one sentence plus an exit code for
every known error. Exit codes are defined by the error classes (`exit_code`): 0 success,
1 the work failed (a check, a budget, too few sites), 2 bad usage or bad input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import wraps
from typing import Any

# Prefect reads these at import: no telemetry (it fails offline), quiet shutdown.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from ledger import LedgerError  # noqa: E402
from tasks import StepError  # noqa: E402

out = Console()
err = Console(stderr=True)

KNOWN_ERRORS = (StepError, LedgerError)


class Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def exit_code(exc: BaseException) -> int:
    return int(getattr(exc, "exit_code", 1))


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known errors into one sentence on stderr and an exit code; no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Failure as exc:
            err.print(f"medfed: {exc}", markup=False, highlight=False)
            raise typer.Exit(exc.code) from None
        except KNOWN_ERRORS as exc:
            err.print(f"medfed: {exc}", markup=False, highlight=False)
            raise typer.Exit(exit_code(exc)) from None
        except KeyboardInterrupt:
            err.print("medfed: interrupted")
            raise typer.Exit(130) from None

    return wrapper


class _DropKnownTracebacks(logging.Filter):
    """Prefect logs a failed task with its traceback; for our own error types the message says
    it all on the console (the API log, seen in the UI, keeps the full record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KNOWN_ERRORS):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_prefect_console() -> None:
    from prefect import flow  # noqa: F401  (loads prefect.main, which installs the handlers)

    names = [n for n in logging.root.manager.loggerDict if n.startswith("prefect")]
    for logger in [logging.getLogger(), *map(logging.getLogger, names)]:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _DropKnownTracebacks) for f in handler.filters
            ):
                handler.addFilter(_DropKnownTracebacks())
