"""Tabular sites: EHR-like extracts, the declared feature schema, and errors that never carry a
cell's value."""

from __future__ import annotations

import csv
import logging
import sqlite3
import tomllib
import traceback
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tasks import StepError
from tasks.cohort import normalize_patient_id
from tasks.prepared import load_prepared, save_prepared
from tasks.schema import Feature, check_schema, expanded_names
from tasks.synthetic import tabular_schema, write_tabular_cohort
from tasks.tabular import (
    Table,
    encode_feature,
    encode_table,
    parse_boolean,
    parse_number,
    prepare_tabular_site,
    read_csv_table,
)

SECRET = b"site-secret-0123456789abcdef"
PHI = "JOHN^SMITH"


def features(*specs: dict) -> tuple[Feature, ...]:
    parsed = TypeAdapter(tuple[Feature, ...]).validate_python(specs)
    check_schema(parsed)
    return parsed


AGE = {"name": "age", "type": "numeric", "min": 0, "max": 100}
SEX = {"name": "sex", "type": "categorical", "categories": ["male", "female"]}
SMOKER = {"name": "smoker", "type": "boolean"}


@pytest.fixture(scope="module")
def table_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tabular_cohort(
        tmp_path_factory.mktemp("tab") / "ehr.csv", n_patients=300, seed=2, shift=0.5
    )


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _tabular(source: Path, **overrides: object):
    kwargs: dict[str, object] = {
        "site": "clinic-a",
        "features": tabular_schema(),
        "label_column": "outcome",
        "secret": SECRET,
        "holdout_fraction": 0.3,
        "seed": 1,
    }
    kwargs.update(overrides)
    return prepare_tabular_site(source, **kwargs)  # type: ignore[arg-type]


# --- the synthetic extract looks like a real one ----------------------------------------------


def test_tabular_cohort_is_ehr_like_and_deterministic(table_csv: Path, tmp_path: Path) -> None:
    header, rows = _read_rows(table_csv)
    assert header[0] == "patient_id" and header[-1] == "outcome"
    column = {name: [r[i] for r in rows] for i, name in enumerate(header)}
    assert {"Male", "Female"} <= set(column["sex"])
    assert {"never", "former", "current"} <= {v.casefold() for v in column["smoking"]}
    assert {"TRUE", "FALSE"} <= set(column["on_statin"])
    assert "" in column["hba1c"] and "NA" in column["cholesterol"]  # empty cells
    ids = column["patient_id"]
    assert 300 < len(rows) <= 900
    assert len({normalize_patient_id(i) for i in ids}) == 300  # visits share one patient ID...
    assert len(set(ids)) > 300  # ...spelled differently across visits
    assert all(normalize_patient_id(i).startswith("mrn") for i in ids)
    again = write_tabular_cohort(tmp_path / "again.csv", n_patients=300, seed=2, shift=0.5)
    assert again.read_bytes() == table_csv.read_bytes()
    shifted = write_tabular_cohort(tmp_path / "shift.csv", n_patients=300, seed=2, shift=-1.0)
    assert shifted.read_bytes() != table_csv.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tabular_extract_is_learnable_through_the_schema(table_csv: Path) -> None:
    prepared = _tabular(table_csv)
    schema = tabular_schema()
    assert prepared.feature_names == expanded_names(schema)
    assert prepared.x_train.shape == (len(prepared.y_train), len(expanded_names(schema)))
    assert prepared.n_patients_train + prepared.n_patients_test == 300
    assert 0.0 <= prepared.x_train.min() and prepared.x_train.max() <= 1.0
    model = LogisticRegression(max_iter=1000).fit(prepared.x_train, prepared.y_train)
    auc = roc_auc_score(prepared.y_test, model.predict_proba(prepared.x_test)[:, 1])
    assert auc > 0.75


def test_a_row_is_encoded_from_the_schema_alone(table_csv: Path, tmp_path: Path) -> None:
    """No statistic of the data: adding an extreme patient leaves every other row as it was."""
    header, rows = _read_rows(table_csv)
    outlier = ["MRN9999999", "99", "Female", "49", "199", "299", "13.9", "349", "current"]
    grown = _write_rows(tmp_path / "grown.csv", header, [*rows, [*outlier, "TRUE", "1"]])
    kw = {"id_column": "patient_id", "label_column": "outcome"}
    x, _, _ = encode_table(read_csv_table(table_csv), tabular_schema(), **kw)
    x_grown, _, _ = encode_table(read_csv_table(grown), tabular_schema(), **kw)
    assert np.array_equal(x_grown[: len(x)], x)


def test_tabular_sqlite_matches_csv(table_csv: Path, tmp_path: Path) -> None:
    header, rows = _read_rows(table_csv)
    numeric = {"age", "bmi", "systolic_bp", "glucose", "hba1c", "cholesterol", "outcome"}
    db = tmp_path / "ehr.sqlite"
    with sqlite3.connect(db) as conn:
        columns = ", ".join(f"{c} {'REAL' if c in numeric else 'TEXT'}" for c in header)
        conn.execute(f"CREATE TABLE visits ({columns})")
        conn.executemany(f"INSERT INTO visits VALUES ({', '.join('?' * len(header))})", rows)
    conn.close()
    from_db = _tabular(db, table="visits")
    from_csv = _tabular(table_csv)
    assert from_db.fingerprint == from_csv.fingerprint
    assert np.array_equal(from_db.x_test, from_csv.x_test)
    with pytest.raises(StepError, match=r"^site clinic-a: ehr\.sqlite has no table 'patients'"):
        _tabular(db, table="patients")
    with pytest.raises(StepError, match=r"ehr\.csv"):
        _tabular(table_csv, table="visits")  # a CSV is not a database


def test_tabular_prepared_file_holds_no_ids(table_csv: Path, tmp_path: Path) -> None:
    prepared = _tabular(table_csv)
    save_prepared(prepared, tmp_path / "tab.npz")
    data = (tmp_path / "tab.npz").read_bytes()
    assert load_prepared(tmp_path / "tab.npz").feature_names == prepared.feature_names
    _, rows = _read_rows(table_csv)
    for mrn in {r[0].strip() for r in rows}:
        for encoding in ("ascii", "utf-32-le"):
            assert mrn.encode(encoding) not in data


def test_id_spellings_are_one_pseudonym_and_one_privacy_unit(tmp_path: Path) -> None:
    rows = [
        ["p-1", "40", "1"],
        [" P-1 ", "41", "0"],
        ["Ｐ-1", "42", "1"],  # fullwidth P
        ["p-2", "50", "0"],
        ["p-3", "60", "1"],
        ["p-4", "70", "0"],
    ]
    path = _write_rows(tmp_path / "ids.csv", ["patient_id", "age", "outcome"], rows)
    table = read_csv_table(path)
    _, _, ids = encode_table(table, features(AGE), id_column="patient_id", label_column="outcome")
    assert len({normalize_patient_id(i) for i in ids[:3]}) == 1
    prepared = _tabular(path, features=features(AGE), holdout_fraction=0.5, seed=0)
    assert prepared.n_patients_train + prepared.n_patients_test == 4  # not 6
    # The three spellings' rows (ages 40-42) sit on one side, in one patient group.
    sides = []
    for split in ("train", "test"):
        ages = np.rint(getattr(prepared, f"x_{split}")[:, 0] * 100)
        groups = getattr(prepared, f"groups_{split}")[np.isin(ages, [40, 41, 42])]
        if len(groups):
            sides.append(set(groups.tolist()))
    assert len(sides) == 1 and len(sides[0]) == 1


# --- the schema's encodings -------------------------------------------------------------------


def test_numeric_is_clipped_then_scaled_by_the_declared_bounds() -> None:
    (age,) = features({**AGE, "min": 20, "max": 70, "fill": 45})
    assert age.columns() == ("age", "age_missing")
    assert encode_feature(age, "45") == (0.5, 0.0)
    assert encode_feature(age, 95.0) == (1.0, 0.0)  # an SQLite REAL, clipped
    assert encode_feature(age, " -3 ") == (0.0, 0.0)
    for missing in ("", "NA", "n/a", " NaN ", "null", None, float("nan")):
        assert encode_feature(age, missing) == (0.5, 1.0)  # the declared fill, flagged
    (default_fill,) = features(AGE)
    assert encode_feature(default_fill, "") == (0.0, 1.0)  # fill defaults to the lower bound


def test_categorical_is_one_hot_with_an_other_slot() -> None:
    (sex,) = features(SEX)
    assert sex.columns() == ("sex=male", "sex=female", "sex=other", "sex_missing")
    assert encode_feature(sex, " MALE ") == (1.0, 0.0, 0.0, 0.0)
    assert encode_feature(sex, "Female") == (0.0, 1.0, 0.0, 0.0)
    assert encode_feature(sex, "Unknown") == (0.0, 0.0, 1.0, 0.0)
    assert encode_feature(sex, "") == (0.0, 0.0, 0.0, 1.0)
    (code,) = features({"name": "code", "type": "categorical", "categories": ["1", "2"]})
    assert encode_feature(code, 2) == encode_feature(code, 2.0) == (0.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "spelling", ["TRUE", "true", "True", "1", "yes", "Y", "t", " TRUE ", 1, 1.0]
)
def test_boolean_spellings_true(spelling: object) -> None:
    assert parse_boolean(spelling) is True


@pytest.mark.parametrize("spelling", ["FALSE", "false", "0", "no", "N", "f", 0, 0.0])
def test_boolean_spellings_false(spelling: object) -> None:
    assert parse_boolean(spelling) is False


def test_boolean_and_the_error_rule() -> None:
    (smoker,) = features(SMOKER)
    assert encode_feature(smoker, "TRUE") == (1.0, 0.0)
    assert encode_feature(smoker, "") == (0.0, 1.0)
    (strict,) = features({**SMOKER, "missing": "error"})
    assert strict.columns() == ("smoker",)  # no indicator column
    assert encode_feature(strict, "no") == (0.0,)
    with pytest.raises(StepError, match="refuses missing values"):
        encode_feature(strict, "")


def test_non_finite_numbers_are_type_errors_and_nan_is_missing() -> None:
    assert parse_number("nan") is None and parse_number(float("nan")) is None
    for value in ("inf", "-Infinity", "1e999", float("inf")):
        with pytest.raises(StepError, match="not a finite number"):
            parse_number(value)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({**AGE, "min": 5, "max": 5}, "min < max"),
        ({**AGE, "min": -1e308, "max": 1e308}, "finite range"),
        ({**AGE, "max": float("inf")}, "finite"),
        ({**AGE, "fill": 101}, "fill outside"),
        ({**AGE, "min": True}, "not true/false"),
        ({**AGE, "missing": "error", "fill": 3}, "takes no fill"),
        ({**SEX, "categories": []}, "at least 1"),
        ({**SEX, "categories": ["male", " MALE"]}, "twice"),
        ({**SEX, "categories": ["male", "Other"]}, "reserved"),
        ({**SEX, "categories": ["male", " "]}, "empty category"),
        ({**AGE, "type": "text"}, "'numeric', 'categorical' or 'boolean'"),
        ({**AGE, "name": "age=1"}, "'='"),
        ({**AGE, "categories": ["a"]}, "Extra inputs"),
        ({**SMOKER, "missing": "impute"}, "indicator"),
    ],
)
def test_bad_feature_declarations(spec: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        features(spec)


def test_schema_names_and_their_columns_are_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        features(AGE, AGE)
    with pytest.raises(ValueError, match="same model-input column"):
        features(AGE, {**SMOKER, "name": "age_missing"})
    features({**AGE, "missing": "error"}, {**SMOKER, "name": "age_missing"})  # no clash


# --- mismatches: site, column, line and file; never the value ---------------------------------


def _planted(table_csv: Path, tmp_path: Path, column: str, value: str) -> Path:
    header, rows = _read_rows(table_csv)
    rows[5][header.index(column)] = value
    return _write_rows(tmp_path / "bad.csv", header, rows)


def _assert_names_the_cell_not_the_value(message: str, column: str, line: int) -> None:
    assert message.startswith("site clinic-a: bad.csv, line ")
    assert f"line {line}," in message and f"column '{column}'" in message
    for part in ("JOHN", "SMITH", PHI):
        assert part not in message


@pytest.mark.parametrize(
    ("column", "value", "what"),
    [
        ("glucose", PHI, "is not a number"),
        ("age", PHI, "is not a number"),
        ("on_statin", PHI, "is not a boolean"),
        ("outcome", PHI, "is not a label (0/1 or true/false)"),
        ("outcome", "2", "is not a label"),
        ("outcome", "", "has no label"),
        ("patient_id", "", "has no patient ID"),
        ("patient_id", "\u200b ", "has no patient ID"),
        ("age", "", "refuses missing values"),  # age is declared missing = "error"
        ("bmi", "inf", "is not a finite number"),
    ],
)
def test_a_cell_outside_its_declared_type_names_site_column_line_file(
    table_csv: Path, tmp_path: Path, column: str, value: str, what: str
) -> None:
    with pytest.raises(StepError) as info:
        _tabular(_planted(table_csv, tmp_path, column, value))
    message = str(info.value)
    _assert_names_the_cell_not_the_value(message, column, 7)
    assert what in message and "\n" not in message
    # Nor does the traceback a log handler would print: no chained ValueError holds it.
    assert PHI not in "".join(traceback.format_exception(info.value))


def test_categorical_never_fails_on_a_value(table_csv: Path, tmp_path: Path) -> None:
    prepared = _tabular(_planted(table_csv, tmp_path, "sex", PHI))  # the "other" slot
    assert prepared.n_patients_train + prepared.n_patients_test == 300


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: [*h, "notes"], r"bad\.csv, line 1, has a column 'notes' that is neither"),
        (
            lambda h: [c if c != "bmi" else "BMI" for c in h],
            r"bad\.csv, line 1, has no column 'bmi'",
        ),
        (
            lambda h: [c if c != "hba1c" else "bmi" for c in h],
            r"bad\.csv, line 1, has the column 'bmi' more than once",
        ),
    ],
)
def test_columns_must_match_the_schema(table_csv: Path, tmp_path: Path, edit, match) -> None:
    header, rows = _read_rows(table_csv)
    new_header = edit(header)
    rows = [r + [PHI] * (len(new_header) - len(r)) for r in rows]
    with pytest.raises(StepError, match=rf"^site clinic-a: {match}") as info:
        _tabular(_write_rows(tmp_path / "bad.csv", new_header, rows))
    assert PHI not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"label_column": "death"}, r"bad\.csv, line 1, has no column 'death'"),
        ({"id_column": "mrn"}, r"bad\.csv, line 1, has no column 'mrn'"),
        ({"features": ()}, r"declares no feature schema"),
        ({"features": features(AGE, {**AGE, "name": "outcome"})}, "'outcome' is this site's"),
        ({"id_column": "outcome"}, "must differ"),
    ],
)
def test_tabular_layout_errors(
    table_csv: Path, tmp_path: Path, overrides: dict[str, object], match: str
) -> None:
    header, rows = _read_rows(table_csv)
    with pytest.raises(StepError, match=rf"^site clinic-a: .*{match}"):
        _tabular(_write_rows(tmp_path / "bad.csv", header, rows), **overrides)


def test_tabular_single_class_ragged_rows_and_missing_file(table_csv: Path, tmp_path: Path) -> None:
    header, rows = _read_rows(table_csv)
    with pytest.raises(StepError, match=r"bad\.csv has a single class"):
        _tabular(_write_rows(tmp_path / "bad.csv", header, [[*r[:-1], "0"] for r in rows]))
    rows[3] = rows[3][:-1]
    with pytest.raises(StepError, match=r"bad\.csv, line 5, has 10 fields, not 11"):
        _tabular(_write_rows(tmp_path / "bad.csv", header, rows))
    with pytest.raises(StepError, match=r"^site clinic-a: table absent\.csv is missing"):
        _tabular(tmp_path / "absent.csv")
    with pytest.raises(StepError, match=r"absent\.db does not exist"):
        _tabular(tmp_path / "absent.db", table="visits")


def test_table_where_names_file_and_line() -> None:
    table = Table(label="x.csv", unit="line", header_line=1, header=(), rows=())
    assert table.where(7) == "x.csv, line 7,"
    assert table.where(None) == "x.csv"


def test_a_planted_value_never_reaches_logs(table_csv, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StepError) as info:
        _tabular(_planted(table_csv, tmp_path, "glucose", PHI))
    logging.getLogger("medfed.test").exception("ingest failed", exc_info=info.value)
    assert "glucose" in caplog.text and PHI not in caplog.text


def test_the_readme_schema_example_is_valid_and_expands_as_it_says() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Tabular sites: the declared feature schema", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    schema = features(*tomllib.loads(example)["features"])
    stated = section.split("The model's inputs are the expanded columns in declared order, here")
    names = stated[1].split(". An invalid", 1)[0]
    assert expanded_names(schema) == tuple(n.strip().strip("`") for n in names.split(","))
