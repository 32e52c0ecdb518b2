"""Patients, whatever the data: normalized IDs, keyed pseudonyms, the patient-level split.

Shared by DICOM and tabular sites. The patient is the privacy unit, so everything here is about
getting that unit right:

- **One patient, one ID.** Every patient ID is normalized before it is pseudonymized
  (:func:`normalize_patient_id`), so ``p-1``, `` P-1 `` and ``Ｐ-1`` are one patient.
- **Pseudonyms** are HMAC-SHA256 of the normalized ID under the site's secret: nothing that
  leaves this module carries a raw identifier.
- **The split** puts each patient on one side by a threshold on a hash of that patient's
  pseudonym alone (:func:`is_held_out`): adding or removing a patient never moves another
  patient between training and held-out, whatever the cohort's size or row order.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from tasks import StepError
from tasks.prepared import PreparedDataset, _fingerprint

MIN_SECRET_BYTES = 16
PSEUDONYM_HEX_CHARS = 32
HOLDOUT_DOMAIN = b"medfed/holdout/v1"
HOLDOUT_SCORE_BYTES = 8
_MAX_FOLDS = 8
# Changes whenever the rules above change what a prepared split holds, so that a site's cached
# split is prepared again (it is part of every data source's cache settings).
COHORT_RULES = "ids-nfkc-casefold-nows/holdout-threshold-v1"


# --- patient IDs and pseudonyms ---------------------------------------------------------------


def _invisible(ch: str) -> bool:
    # Whitespace and format characters (zero-width space, BOM, soft hyphen...) are how the
    # same ID gets typed, copied or exported differently; they never tell two patients apart.
    return ch.isspace() or unicodedata.category(ch) == "Cf"


def _fold(text: str) -> str:
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return "".join(ch for ch in folded if not _invisible(ch))


def normalize_patient_id(patient_id: str) -> str:
    """The one spelling of a patient ID that is pseudonymized.

    Unicode NFKC (fullwidth and other compatibility forms become plain characters), casefold,
    NFKC again (casefolding can leave a non-normalized string), then every whitespace and
    invisible format character removed — surrounding and internal alike. Everything else is
    kept, leading zeros and punctuation included: they can tell patients apart.

    Removing internal whitespace rather than keeping one space merges spellings such as
    ``943 476 5919`` and ``9434765919``: merging two IDs into one unit only coarsens the
    privacy unit, while one patient split across two units would break the guarantee.
    """
    if not isinstance(patient_id, str):
        raise StepError("A patient ID must be text.")
    # Removing a character can let its neighbours compose (NFKC turns a spacing diaeresis
    # into a space plus a combining mark), so fold until nothing changes: then the rule is
    # idempotent and every spelling of one ID lands on the same string.
    folded = _fold(patient_id)
    for _ in range(_MAX_FOLDS):
        again = _fold(folded)
        if again == folded:
            break
        folded = again
    return folded


def check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise StepError(f"The pseudonymization secret must be at least {MIN_SECRET_BYTES} bytes.")


def pseudonymize(patient_id: str, secret: bytes) -> str:
    """Keyed pseudonym: HMAC-SHA256(secret, normalized patient ID), hex, first 32 characters."""
    normalized = normalize_patient_id(patient_id)
    if not normalized:
        raise StepError("Cannot pseudonymize an empty patient ID.")
    check_secret(secret)
    digest = hmac.new(secret, normalized.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX_CHARS]


# --- the patient-level split ------------------------------------------------------------------


def _length_prefixed(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(8, "big") + f for f in fields)


def holdout_score(pseudonym: str, *, seed: int) -> float:
    """A patient's uniform score in [0, 1): the first 8 bytes of SHA-256 over a
    domain-separated, length-prefixed (seed, pseudonym), as an integer over 2^64."""
    message = _length_prefixed(HOLDOUT_DOMAIN, str(int(seed)).encode(), pseudonym.encode())
    head = hashlib.sha256(message).digest()[:HOLDOUT_SCORE_BYTES]
    return int.from_bytes(head, "big") / 2 ** (8 * HOLDOUT_SCORE_BYTES)


def _check_fraction(holdout_fraction: float) -> None:
    if not 0.0 < holdout_fraction < 1.0:  # also false for NaN
        raise StepError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}.")


def is_held_out(pseudonym: str, *, holdout_fraction: float, seed: int) -> bool:
    """Held out iff the patient's own score is below the fraction: no other patient counts."""
    _check_fraction(holdout_fraction)
    return holdout_score(pseudonym, seed=seed) < holdout_fraction


def patient_holdout(
    pseudonyms: Iterable[str], *, holdout_fraction: float, seed: int
) -> frozenset[str]:
    """The held-out patients among ``pseudonyms`` (duplicates and order do not matter)."""
    _check_fraction(holdout_fraction)
    return frozenset(p for p in set(pseudonyms) if holdout_score(p, seed=seed) < holdout_fraction)


def split_patients(
    pseudonyms: Iterable[str], *, holdout_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(training, held-out) patients, each sorted; both sides must be non-empty."""
    patients = sorted(set(pseudonyms))
    held = patient_holdout(patients, holdout_fraction=holdout_fraction, seed=seed)
    train = [p for p in patients if p not in held]
    test = [p for p in patients if p in held]
    if not train or not test:
        raise StepError(
            f"The patient-level split at holdout_fraction {holdout_fraction} put "
            f"{len(train)} of {len(patients)} patients in training and {len(test)} held out; "
            "both sides need at least one patient (more patients, or another holdout_fraction)."
        )
    return train, test


# --- the prepared dataset ---------------------------------------------------------------------


def check_labels(labels: np.ndarray, source: str) -> None:
    if len(np.unique(labels)) < 2:
        raise StepError(f"{source} has a single class only; both labels 0 and 1 are needed.")


def assemble_prepared(
    x: np.ndarray,
    y: np.ndarray,
    row_pseudonyms: Sequence[str],
    *,
    holdout_fraction: float,
    seed: int,
    feature_names: tuple[str, ...] = (),
) -> PreparedDataset:
    """Rows (images or table rows) and their patients' pseudonyms -> the patient-level split.

    Rows are grouped by patient, patients in pseudonym order; a patient's rows keep their
    order in the input. ``x`` is already model input: nothing here looks at its values.
    """
    if not len(x) == len(y) == len(row_pseudonyms):
        raise StepError("assemble_prepared needs one label and one pseudonym per row.")
    train, test = split_patients(row_pseudonyms, holdout_fraction=holdout_fraction, seed=seed)
    splits: dict[str, np.ndarray] = {}
    for split, members in (("train", train), ("test", test)):
        index = {p: i for i, p in enumerate(members)}
        rows = sorted((index[p], r) for r, p in enumerate(row_pseudonyms) if p in index)
        take = np.array([r for _, r in rows], dtype=np.int64)
        splits[f"x_{split}"] = np.ascontiguousarray(x[take], dtype=np.float32)
        splits[f"y_{split}"] = np.ascontiguousarray(y[take], dtype=np.float32)
        splits[f"groups_{split}"] = np.array([g for g, _ in rows], dtype=np.int64)
    return PreparedDataset(
        **splits,
        fingerprint=_fingerprint(splits, feature_names, train + test),
        n_patients_train=len(train),
        n_patients_test=len(test),
        feature_names=feature_names,
    )


__all__ = [
    "COHORT_RULES",
    "MIN_SECRET_BYTES",
    "PSEUDONYM_HEX_CHARS",
    "assemble_prepared",
    "check_labels",
    "check_secret",
    "holdout_score",
    "is_held_out",
    "normalize_patient_id",
    "patient_holdout",
    "pseudonymize",
    "split_patients",
]
