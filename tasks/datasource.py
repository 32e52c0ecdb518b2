"""Where a site's training data comes from: one data source per site kind, one interface.

A source hashes its raw inputs (to know when the prepared cache is stale) and prepares the
patient-level split. A new kind (FHIR, a PACS query) is one new class here plus tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tasks import StepError
from tasks.cohort import COHORT_RULES
from tasks.config import ImagingConfig, SiteKind
from tasks.prepared import PreparedDataset
from tasks.quarantine import IngestReport
from tasks.schema import Feature
from tasks.site import DataSettings
from tasks.tabular import prepare_tabular_site

OnReport = Callable[[IngestReport], Any]


# Bumped when ingest's rules change in a way the settings do not show, so cached splits made
# under the old rules are prepared again.
INGEST_RULES = "quarantine/annex-e-2026c/window/v1"


class DataSource(Protocol):
    def digest(self) -> str:
        """SHA-256 over the raw inputs' names and bytes."""
        ...

    def settings(self) -> dict[str, Any]:
        """What, besides the raw bytes, changes the prepared split."""
        ...

    def prepare(
        self,
        *,
        secret: bytes,
        image_size: int,
        holdout_fraction: float,
        seed: int,
        on_report: OnReport | None = None,
    ) -> tuple[PreparedDataset, IngestReport | None]:
        """The split, and (DICOM) what was ingested or quarantined; ``on_report`` sees the
        report first, even when the site then stops on it."""
        ...


def _digest_files(site: str, root: Path, extra: list[Path]) -> str:
    if not root.exists():
        raise StepError(f"site {site}: its data location does not exist (site.toml data.path)")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    named = [(str(p.relative_to(root)) if root.is_dir() else p.name, p) for p in files]
    # Extras (a manifest) may live anywhere, inside the data folder or not.
    named += [(f"extra:{p.name}", p) for p in extra]
    h = hashlib.sha256()
    for name, p in named:
        try:
            h.update(name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        except (OSError, ValueError) as exc:
            # No file name: folder and file names at hospitals often carry patient IDs.
            raise StepError(f"site {site}: one of its data files cannot be read") from exc
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class DicomSource:
    site: str
    data: DataSettings
    imaging: ImagingConfig = ImagingConfig()

    def digest(self) -> str:
        manifest = Path(self.data.labels)
        if not manifest.is_file():
            raise StepError(f"site {self.site}: its label manifest does not exist (data.labels)")
        return _digest_files(self.site, self.data.path, [manifest])

    def settings(self) -> dict[str, Any]:
        return {
            "kind": "dicom",
            "labels": Path(self.data.labels).name,
            "cohort": COHORT_RULES,
            "images": self.imaging.model_dump(mode="json"),
            "accept_burned_in": self.data.accept_burned_in,
            "ingest": INGEST_RULES,
        }

    def prepare(
        self,
        *,
        secret: bytes,
        image_size: int,
        holdout_fraction: float,
        seed: int,
        on_report: OnReport | None = None,
    ) -> tuple[PreparedDataset, IngestReport | None]:
        from tasks import ingest  # DICOM and MONAI load only when a site actually ingests

        return ingest.prepare_dicom_site(
            self.data.path,
            Path(self.data.labels),
            site=self.site,
            secret=secret,
            image_size=image_size,
            holdout_fraction=holdout_fraction,
            seed=seed,
            imaging=self.imaging,
            accept_burned_in=self.data.accept_burned_in,
            on_report=on_report,
        )


@dataclass(frozen=True, kw_only=True)
class TabularSource:
    site: str
    data: DataSettings
    features: tuple[Feature, ...]  # the federation's declared schema

    def digest(self) -> str:
        return _digest_files(self.site, self.data.path, [])

    def settings(self) -> dict[str, Any]:
        # The schema is in the cache key: a changed schema prepares the table again.
        return {
            "kind": "tabular",
            "labels": self.data.labels,
            "id_column": self.data.id_column,
            "table": self.data.table,
            "features": [f.model_dump(mode="json") for f in self.features],
            "cohort": COHORT_RULES,
        }

    def prepare(
        self,
        *,
        secret: bytes,
        image_size: int,
        holdout_fraction: float,
        seed: int,
        on_report: OnReport | None = None,
    ) -> tuple[PreparedDataset, IngestReport | None]:
        return prepare_tabular_site(
            self.data.path,
            site=self.site,
            features=self.features,
            label_column=self.data.labels,
            id_column=self.data.id_column,
            secret=secret,
            holdout_fraction=holdout_fraction,
            seed=seed,
            table=self.data.table,
        ), None


def source_for(
    site: str,
    kind: SiteKind,
    data: DataSettings,
    *,
    features: Sequence[Feature] = (),
    imaging: ImagingConfig | None = None,
) -> DataSource:
    """The site's data source; ``features`` (tabular) and ``imaging`` (DICOM) are the
    federation's rules for turning its data into model input."""
    if kind == SiteKind.DICOM:
        return DicomSource(site=site, data=data, imaging=imaging or ImagingConfig())
    return TabularSource(site=site, data=data, features=tuple(features))


def dry_run(
    site: str, kind: SiteKind, data: DataSettings, *, plan: Any, secret: bytes, site_root: Path
) -> tuple[IngestReport | None, Path | None]:
    """Ingest as a round would (the plan's rules), write the site's quarantine report, train
    nothing and cache nothing: what `medfed site check` runs. Raises what the round would."""
    report_path: list[Path] = []

    def keep(report: IngestReport) -> Path:
        from tasks.quarantine import write_site_report

        report_path.append(write_site_report(site_root, report))
        return report_path[0]

    _, report = source_for(site, kind, data, features=plan.features, imaging=plan.images).prepare(
        secret=secret,
        image_size=plan.model.image_size,
        holdout_fraction=plan.holdout_fraction,
        seed=plan.seed,
        on_report=keep,
    )
    return report, (report_path[0] if report_path else None)
