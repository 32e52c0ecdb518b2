"""What a site's ingest set aside, and why: the quarantine report.

Every file a manifest lists is either ingested or quarantined with (file, stage, reason code,
detail). Two views of one report:

- `IngestReport.summary()`: counts only (listed, ingested, images, quarantined by reason). It
  may leave the site: the console, Prefect logs and artifacts, the preprocess ledger entry.
- `write_site_report(...)`: the same with each file's manifest name. File and folder names at
  hospitals often carry PatientIDs, so this file stays in the site's own root.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import StepError
from tasks.files import atomic_write

REPORT_DIR = "quarantine"
REPORT_COLUMNS = ("file", "stage", "reason", "detail")


@dataclass(frozen=True, kw_only=True)
class QuarantinedFile:
    file: str  # the manifest's name for it: site-local only
    stage: str
    code: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class IngestReport:
    listed: int
    ingested: int  # files that gave at least one training image
    images: int
    quarantined: tuple[QuarantinedFile, ...] = field(default_factory=tuple)

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(q.code for q in self.quarantined).items()))

    @property
    def quarantined_fraction(self) -> float:
        return len(self.quarantined) / self.listed if self.listed else 0.0

    def summary(self) -> dict[str, Any]:
        """Counts only: fit to leave the site."""
        return {
            "listed": self.listed,
            "ingested": self.ingested,
            "images": self.images,
            "quarantined": len(self.quarantined),
            "quarantined_by_reason": self.by_reason(),
        }

    def describe(self) -> str:
        """One line of counts for the console and Prefect logs."""
        line = (
            f"{self.listed} files listed, {self.ingested} ingested ({self.images} images), "
            f"{len(self.quarantined)} quarantined"
        )
        reasons = ", ".join(f"{code} {n}" for code, n in self.by_reason().items())
        return f"{line} ({reasons})" if reasons else line


def summary_of(doc: Any) -> dict[str, Any]:
    """A stored summary read back (a cached split's), checked for shape."""
    keys = ("listed", "ingested", "images", "quarantined", "quarantined_by_reason")
    if not isinstance(doc, dict) or set(doc) != set(keys):
        raise StepError("the prepared split's ingest summary is unreadable; delete the cache")
    return doc


def site_report_csv(report: IngestReport) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    for q in sorted(report.quarantined, key=lambda q: q.file):
        writer.writerow((q.file, q.stage, q.code, q.detail))
    return buf.getvalue()


def write_site_report(site_root: Path, report: IngestReport) -> Path:
    """Write `<site root>/quarantine/report.csv` (and `summary.json`); return the CSV's path.

    Rewritten whole on every ingest (atomically), so it always describes the latest one."""
    folder = Path(site_root) / REPORT_DIR
    path = folder / "report.csv"
    atomic_write(path, site_report_csv(report).encode("utf-8"))
    summary = json.dumps(report.summary(), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "summary.json", summary.encode("utf-8"))
    return path


class TooMuchQuarantined(StepError):
    """Most of an export is unusable: the site stops instead of training on what is left."""


def check_ceiling(site: str, report: IngestReport, *, ceiling: float, where: Path | None) -> None:
    if report.quarantined_fraction > ceiling:
        see = f"; the site's quarantine report is {where}" if where else ""
        raise TooMuchQuarantined(
            f"site {site}: {len(report.quarantined)} of the {report.listed} files its manifest "
            f"lists were quarantined ({report.quarantined_fraction:.0%}, more than "
            f"[images] max_quarantined_fraction {ceiling:g}){see}"
        )


__all__ = [
    "IngestReport",
    "QuarantinedFile",
    "REPORT_DIR",
    "TooMuchQuarantined",
    "check_ceiling",
    "site_report_csv",
    "summary_of",
    "write_site_report",
]
