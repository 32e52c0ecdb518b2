"""Where a site's training data comes from: one data source per site kind, one interface.

A source hashes its raw inputs (to know when the prepared cache is stale) and prepares the
patient-level split. A new kind (FHIR, a PACS query) is one new class here plus tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tasks import StepError
from tasks.cohort import COHORT_RULES
from tasks.config import SiteKind
from tasks.prepared import PreparedDataset
from tasks.schema import Feature
from tasks.site import DataSettings
from tasks.tabular import prepare_tabular_site


class DataSource(Protocol):
    def digest(self) -> str:
        """SHA-256 over the raw inputs' names and bytes."""
        ...

    def settings(self) -> dict[str, Any]:
        """What, besides the raw bytes, changes the prepared split."""
        ...

    def prepare(
        self, *, secret: bytes, image_size: int, holdout_fraction: float, seed: int
    ) -> PreparedDataset: ...


def _digest_files(site: str, root: Path, extra: list[Path]) -> str:
    if not root.exists():
        raise StepError(f"site {site}: its data location does not exist (site.toml data.path)")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for p in [*files, *extra]:
        try:
            h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        except (OSError, ValueError) as exc:
            # No file name: folder and file names at hospitals often carry patient IDs.
            raise StepError(f"site {site}: one of its data files cannot be read") from exc
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class DicomSource:
    site: str
    data: DataSettings

    def digest(self) -> str:
        manifest = Path(self.data.labels)
        if not manifest.is_file():
            raise StepError(f"site {self.site}: its label manifest does not exist (data.labels)")
        return _digest_files(self.site, self.data.path, [manifest])

    def settings(self) -> dict[str, Any]:
        return {"kind": "dicom", "labels": Path(self.data.labels).name, "cohort": COHORT_RULES}

    def prepare(
        self, *, secret: bytes, image_size: int, holdout_fraction: float, seed: int
    ) -> PreparedDataset:
        from tasks import ingest  # DICOM and MONAI load only when a site actually ingests

        return ingest.prepare_dicom_site(
            self.data.path,
            Path(self.data.labels),
            secret=secret,
            image_size=image_size,
            holdout_fraction=holdout_fraction,
            seed=seed,
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
        self, *, secret: bytes, image_size: int, holdout_fraction: float, seed: int
    ) -> PreparedDataset:
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
        )


def source_for(
    site: str, kind: SiteKind, data: DataSettings, *, features: Sequence[Feature] = ()
) -> DataSource:
    """The site's data source; ``features`` is the federation's schema (tabular sites)."""
    if kind == SiteKind.DICOM:
        return DicomSource(site=site, data=data)
    return TabularSource(site=site, data=data, features=tuple(features))
