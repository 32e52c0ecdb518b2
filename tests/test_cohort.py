"""Patients: one normalized ID per patient, keyed pseudonyms, and a split no other patient moves."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import StepError
from tasks.cohort import (
    assemble_prepared,
    holdout_score,
    is_held_out,
    normalize_patient_id,
    patient_holdout,
    pseudonymize,
    split_patients,
)

SECRET = b"site-secret-0123456789abcdef"
OTHER_SECRET = b"another-secret-0123456789abcdef"

# --- patient IDs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "normalized"),
    [
        ("p-1", "p-1"),
        (" P-1 ", "p-1"),
        ("Ｐ-1", "p-1"),  # fullwidth P
        ("P\u00a0-\t1\n", "p-1"),  # no-break space, tab and newline inside
        ("\u200bP-1\ufeff", "p-1"),  # zero-width space, byte order mark
        ("943 476 5919", "9434765919"),
        ("MRN0012345", "mrn0012345"),  # leading zeros kept
        ("Straße-7", "strasse-7"),  # full casefolding
        ("ｍｒｎ００１", "mrn001"),
    ],
)
def test_patient_ids_are_normalized_by_one_rule(spelling: str, normalized: str) -> None:
    assert normalize_patient_id(spelling) == normalized


def test_leading_zeros_and_punctuation_still_tell_patients_apart() -> None:
    assert pseudonymize("0012", SECRET) != pseudonymize("12", SECRET)
    assert pseudonymize("P-1", SECRET) != pseudonymize("P1", SECRET)
    assert pseudonymize("P-1", SECRET) != pseudonymize("P-10", SECRET)


@given(st.text(max_size=20))
def test_normalizing_is_idempotent(text: str) -> None:
    once = normalize_patient_id(text)
    assert normalize_patient_id(once) == once


def test_pseudonym_is_truncated_hmac_sha256_of_the_normalized_id() -> None:
    expected = hmac.new(SECRET, b"smh1234567", hashlib.sha256).hexdigest()[:32]
    assert pseudonymize("SMH1234567", SECRET) == expected
    assert pseudonymize(" smh1234567", SECRET) == expected
    assert pseudonymize("SMH1234567", SECRET) != pseudonymize("SMH1234567", OTHER_SECRET)
    assert pseudonymize("SMH1234567", SECRET) != pseudonymize("SMH1234568", SECRET)
    assert len(expected) == 32 and int(expected, 16) >= 0


@pytest.mark.parametrize(
    ("patient_id", "secret", "match"),
    [
        ("", SECRET, "empty patient ID"),
        ("  ", SECRET, "empty"),
        ("\u200b", SECRET, "empty"),
        ("X1", b"short", "16 bytes"),
    ],
)
def test_pseudonym_rejects_bad_input(patient_id: str, secret: bytes, match: str) -> None:
    with pytest.raises(StepError, match=match):
        pseudonymize(patient_id, secret)


# --- the split --------------------------------------------------------------------------------


def _patients(n: int) -> list[str]:
    return [pseudonymize(f"P{i}", SECRET) for i in range(n)]


def test_holdout_score_is_the_documented_hash() -> None:
    p = _patients(1)[0]
    message = b"".join(
        len(f).to_bytes(8, "big") + f for f in (b"medfed/holdout/v1", b"5", p.encode())
    )
    expected = int.from_bytes(hashlib.sha256(message).digest()[:8], "big") / 2**64
    assert holdout_score(p, seed=5) == expected
    assert holdout_score(p, seed=6) != expected


def test_patient_holdout_is_deterministic_and_ignores_duplicates_and_order() -> None:
    patients = _patients(40)
    held = patient_holdout(patients * 3, holdout_fraction=0.25, seed=5)
    assert held == patient_holdout(reversed(patients), holdout_fraction=0.25, seed=5)
    assert held < set(patients) and held
    assert held != patient_holdout(patients, holdout_fraction=0.25, seed=6)
    assert held == {p for p in patients if is_held_out(p, holdout_fraction=0.25, seed=5)}


@settings(max_examples=60, deadline=None)
@given(
    ids=st.sets(st.integers(0, 10**6), min_size=1, max_size=60),
    extra=st.integers(10**6 + 1, 2 * 10**6),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(-(2**63), 2**63),
)
def test_adding_or_removing_a_patient_never_moves_another(
    ids: set[int], extra: int, fraction: float, seed: int
) -> None:
    cohort = [pseudonymize(f"MRN{i}", SECRET) for i in ids]
    newcomer = pseudonymize(f"MRN{extra}", SECRET)
    held = patient_holdout(cohort, holdout_fraction=fraction, seed=seed)
    grown = patient_holdout([*cohort, newcomer], holdout_fraction=fraction, seed=seed)
    assert grown - {newcomer} == held  # adding one: nobody else changes side
    for gone in cohort[:3]:
        shrunk = patient_holdout(
            [p for p in cohort if p != gone], holdout_fraction=fraction, seed=seed
        )
        assert shrunk == held - {gone}  # removing one: nobody else changes side


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(30)))
def test_the_split_does_not_depend_on_row_order(order: list[int]) -> None:
    # Three rows per patient; any row order gives the same patients on each side.
    rows = [pseudonymize(f"P{i % 10}", SECRET) for i in range(30)]
    shuffled = [rows[i] for i in order]
    x = np.arange(30, dtype=np.float32)[:, None]
    y = (np.arange(30) % 2).astype(np.float32)
    a = assemble_prepared(x, y, rows, holdout_fraction=0.4, seed=3, feature_names=("f",))
    b = assemble_prepared(
        x[order], y[order], shuffled, holdout_fraction=0.4, seed=3, feature_names=("f",)
    )
    assert (a.n_patients_train, a.n_patients_test) == (b.n_patients_train, b.n_patients_test)
    assert sorted(a.x_test[:, 0]) == sorted(b.x_test[:, 0])
    assert sorted(a.x_train[:, 0]) == sorted(b.x_train[:, 0])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_the_fraction_is_respected_on_10k_patients(fraction: float) -> None:
    patients = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(10_000)]
    held = patient_holdout(patients, holdout_fraction=fraction, seed=11)
    # Binomial(10000, f): 4.5 standard deviations is at most 0.023 at f = 0.5.
    assert abs(len(held) / 10_000 - fraction) < 4.5 * (fraction * (1 - fraction) / 10_000) ** 0.5


def test_split_patients_refuses_an_empty_side_with_counts_only() -> None:
    patients = _patients(3)
    with pytest.raises(StepError) as info:
        split_patients(patients, holdout_fraction=1e-9, seed=0)
    message = str(info.value)
    assert "3 of 3 patients in training and 0 held out" in message
    assert not any(p in message for p in patients)
    with pytest.raises(StepError, match="0 of 3 patients in training and 3 held out"):
        split_patients(patients, holdout_fraction=1 - 1e-9, seed=0)
    with pytest.raises(StepError, match="holdout_fraction"):
        split_patients(patients, holdout_fraction=0.0, seed=0)
    with pytest.raises(StepError, match="holdout_fraction"):
        split_patients(patients, holdout_fraction=float("nan"), seed=0)


def test_assemble_groups_rows_by_patient() -> None:
    rows = [pseudonymize(p, SECRET) for p in ("a", "b", "A", "c", "d", "B", "e", "f")]
    x = np.arange(8, dtype=np.float32)[:, None]
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.float32)
    ds = assemble_prepared(x, y, rows, holdout_fraction=0.5, seed=1, feature_names=("f",))
    assert ds.n_patients_train + ds.n_patients_test == 6
    assert len(ds.y_train) + len(ds.y_test) == 8
    with pytest.raises(StepError, match="one label and one pseudonym per row"):
        assemble_prepared(x, y[:3], rows, holdout_fraction=0.5, seed=1, feature_names=("f",))
