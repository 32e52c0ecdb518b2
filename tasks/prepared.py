"""A site's prepared split (arrays, patient groups, fingerprint) and its deterministic .npz.

Apart from ingest so that training and evaluation, which only read the prepared split, do not
import the DICOM and MONAI stack: every worker flow run is a fresh Python.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks import StepError

_NPZ_DATE = (1980, 1, 1, 0, 0, 0)
_ARRAY_FIELDS = ("x_train", "y_train", "groups_train", "x_test", "y_test", "groups_test")


# --- the prepared dataset ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PreparedDataset:
    """A site's training and held-out arrays; ``groups_*`` index pseudonymous patients.

    Group indices count patients within each split (0 .. n_patients_split - 1, in pseudonym
    order). ``fingerprint`` is a sha256 over the arrays, feature names and sorted pseudonyms.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    groups_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    groups_test: np.ndarray
    fingerprint: str
    n_patients_train: int
    n_patients_test: int
    feature_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split, n_patients in (("train", self.n_patients_train), ("test", self.n_patients_test)):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            groups = getattr(self, f"groups_{split}")
            if x.dtype != np.float32 or y.dtype != np.float32 or groups.dtype != np.int64:
                raise StepError(f"PreparedDataset {split} arrays have the wrong dtypes.")
            if x.ndim not in (2, 4) or y.shape != (len(x),) or groups.shape != (len(x),):
                raise StepError(f"PreparedDataset {split} arrays have inconsistent shapes.")
            if len(x) == 0 or len(np.unique(groups)) != n_patients:
                raise StepError(f"PreparedDataset {split} split is empty or miscounts patients.")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise StepError("PreparedDataset train and test samples differ in shape.")
        if self.x_train.ndim == 2 and len(self.feature_names) != self.x_train.shape[1]:
            raise StepError("PreparedDataset feature_names do not match the feature count.")


def _fingerprint(
    arrays: Mapping[str, np.ndarray], feature_names: Sequence[str], pseudonyms: Iterable[str]
) -> str:
    h = hashlib.sha256(b"medfed-prepared-v1\n")
    for name in _ARRAY_FIELDS:
        arr = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(arr.tobytes())
    h.update(("\x1f".join(feature_names) + "\n").encode())
    for p in sorted(pseudonyms):
        h.update(f"{p}\n".encode())
    return h.hexdigest()


# --- persistence: a deterministic npz, written atomically -------------------------------------


def _npz_bytes(ds: PreparedDataset) -> bytes:
    entries: dict[str, np.ndarray] = {name: getattr(ds, name) for name in _ARRAY_FIELDS}
    entries["fingerprint"] = np.array(ds.fingerprint)
    entries["n_patients"] = np.array([ds.n_patients_train, ds.n_patients_test], dtype=np.int64)
    entries["feature_names"] = np.array(ds.feature_names, dtype=np.str_)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, arr in entries.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.asarray(arr, order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_NPZ_DATE)
            archive.writestr(info, npy.getvalue())
    return buffer.getvalue()


def save_prepared(ds: PreparedDataset, path: Path) -> str:
    """Write ``ds`` as a deterministic ``.npz`` (temp file, then rename); return its sha256."""
    path = Path(path)
    data = _npz_bytes(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def load_prepared(path: Path) -> PreparedDataset:
    """Read a dataset written by :func:`save_prepared`; any defect is a StepError."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {
                name: npz[name]
                for name in (*_ARRAY_FIELDS, "fingerprint", "n_patients", "feature_names")
            }
    except Exception as err:  # noqa: BLE001 - any reader failure is bad input here
        raise StepError(f"Prepared dataset {path} is missing or unreadable.") from err
    stored_fingerprint = arrays.pop("fingerprint")
    n_patients = arrays.pop("n_patients")
    names = arrays.pop("feature_names")
    fingerprint = str(stored_fingerprint[()]) if stored_fingerprint.shape == () else ""
    if (
        len(fingerprint) != 64
        or set(fingerprint) - set("0123456789abcdef")
        or n_patients.shape != (2,)
        or n_patients.dtype != np.int64
        or names.ndim != 1
    ):
        raise StepError(f"Prepared dataset {path} has malformed metadata.")
    try:
        return PreparedDataset(
            **arrays,
            fingerprint=fingerprint,
            n_patients_train=int(n_patients[0]),
            n_patients_test=int(n_patients[1]),
            feature_names=tuple(str(n) for n in names),
        )
    except StepError as err:
        raise StepError(f"Prepared dataset {path} is inconsistent: {err}") from err


__all__ = ["PreparedDataset", "load_prepared", "save_prepared"]
