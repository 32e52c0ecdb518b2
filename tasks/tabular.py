"""Tabular sites: a CSV file or an SQLite table, checked against the federation's declared
feature schema (:mod:`tasks.schema`), each row encoded with the schema's public constants
only, then pseudonymized and split by patient (:mod:`tasks.cohort`).

Every error names the site, the column, the line (CSV) or row (SQLite) and the file, never a
cell's value: errors travel in the site's report to the coordinator, into the ledger's drop
entries and into Prefect's logs, all of which leave the site. For the same reason no parse
failure is raised from inside an ``except`` that holds the value: a chained ``ValueError``
("could not convert string to float: 'JOHN^SMITH'") would print it in a traceback.

Missing cells: empty, NA, N/A, NaN, null, none (any case, surrounding whitespace ignored) and
SQL NULL. A non-finite number (inf, 1e999) is a type error, not a missing value: it is an
export fault, and clipping it to a bound would invent a measurement.
"""

from __future__ import annotations

import csv
import io
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tasks import StepError
from tasks.cohort import (
    assemble_prepared,
    check_labels,
    check_secret,
    normalize_patient_id,
    pseudonymize,
)
from tasks.prepared import PreparedDataset
from tasks.schema import (
    BooleanFeature,
    CategoricalFeature,
    Feature,
    MissingRule,
    NumericFeature,
    expanded_names,
    normalize_category,
)

MISSING_TEXT = frozenset({"", "na", "n/a", "nan", "null", "none"})
BOOLEAN_TEXT: dict[str, bool] = {
    **dict.fromkeys(("true", "t", "yes", "y", "1"), True),
    **dict.fromkeys(("false", "f", "no", "n", "0"), False),
}


class _Mismatch(StepError):
    """A cell does not fit its declared type. Holds what is wrong, never the value; always
    caught and re-raised with the cell's site, column, line and file."""


# --- reading: CSV or SQLite, before any schema ------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Table:
    """A table as read: what messages call it, its header, and its rows, each with the line
    (CSV) or row number (SQLite) it came from."""

    label: str  # "ehr.csv" or "table 'visits' in ehr.sqlite": file names only, no folders
    unit: Literal["line", "row"]
    header_line: int | None  # 1 for CSV; SQLite has no header line
    header: tuple[str, ...]
    rows: tuple[tuple[int, tuple[Any, ...]], ...]

    def where(self, line: int | None) -> str:
        return self.label if line is None else f"{self.label}, {self.unit} {line},"


def read_csv_table(path: Path) -> Table:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise StepError(f"table {path.name} is missing or unreadable.") from err
    reader = csv.reader(io.StringIO(text))
    records: list[tuple[int, tuple[str, ...]]] = []
    try:
        for record in reader:
            if record:  # a blank line is not a row
                records.append((reader.line_num, tuple(record)))
    except csv.Error:
        raise StepError(f"table {path.name} is not valid CSV (line {reader.line_num}).") from None
    if not records:
        raise StepError(f"table {path.name} is empty.")
    header = tuple(h.strip() for h in records[0][1])
    for line, row in records[1:]:
        if len(row) != len(header):
            raise StepError(f"{path.name}, line {line}, has {len(row)} fields, not {len(header)}.")
    return Table(
        label=path.name, unit="line", header_line=1, header=header, rows=tuple(records[1:])
    )


def read_sqlite_table(path: Path, table: str) -> Table:
    path = Path(path)
    label = f"table {table!r} in {path.name}"
    if not path.is_file():
        raise StepError(f"database {path.name} does not exist.")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise StepError(f"database {path.name} cannot be opened.") from err
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?", (table,)
        ).fetchone()
        if found is None:
            raise StepError(f"{path.name} has no table {table!r}.")
        quoted = '"' + table.replace('"', '""') + '"'
        cursor = conn.execute(f"SELECT * FROM {quoted}")  # noqa: S608 - name checked above
        header = tuple(d[0] for d in cursor.description)
        rows = tuple(enumerate((tuple(r) for r in cursor.fetchall()), start=1))
    except sqlite3.Error as err:
        raise StepError(f"{label} cannot be read.") from err
    finally:
        conn.close()
    return Table(label=label, unit="row", header_line=None, header=header, rows=rows)


# --- the columns a table must have -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where the id, the label and each declared feature sit in a table's rows."""

    id_at: int
    label_at: int
    feature_at: tuple[int, ...]  # one per declared feature, in declared order


def column_layout(
    table: Table, features: Sequence[Feature], *, id_column: str, label_column: str
) -> Layout:
    """The table's columns are exactly the id, the label and every declared feature."""
    if not features:
        raise StepError("the federation declares no feature schema ([[features]]).")
    if id_column == label_column:
        raise StepError("the id and label columns must differ.")
    for f in features:
        if f.name in (id_column, label_column):
            raise StepError(
                f"declared feature {f.name!r} is this site's id or label column; "
                "a feature cannot be either."
            )
    header_at = table.where(table.header_line)
    seen: set[str] = set()
    for column in table.header:
        if column in seen:
            raise StepError(f"{header_at} has the column {column!r} more than once.")
        seen.add(column)
    for column in (id_column, label_column, *(f.name for f in features)):
        if column not in seen:
            raise StepError(f"{header_at} has no column {column!r}.")
    declared = {id_column, label_column, *(f.name for f in features)}
    for column in table.header:
        if column not in declared:
            raise StepError(
                f"{header_at} has a column {column!r} that is neither the id column, "
                "the label column nor a declared feature."
            )
    index = {c: i for i, c in enumerate(table.header)}
    return Layout(
        id_at=index[id_column],
        label_at=index[label_column],
        feature_at=tuple(index[f.name] for f in features),
    )


# --- cells: parse (None is missing), never looking at other rows -------------------------------


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # raised by the caller, outside this except: no chained value


def parse_number(value: Any) -> float | None:
    """A finite float, or None for a missing cell."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().casefold() in MISSING_TEXT:
            return None
        number = _float_or_none(value)
        if number is None:
            raise _Mismatch("is not a number")
    elif isinstance(value, int | float):
        number = float(value)
    else:
        raise _Mismatch("is not a number")
    if math.isnan(number):
        return None
    if not math.isfinite(number):
        raise _Mismatch("is not a finite number")
    return number


def parse_boolean(value: Any) -> bool | None:
    """TRUE/FALSE, true/false, 1/0, yes/no, y/n, t/f (any case), or None for a missing cell."""
    if value is None:
        return None
    if isinstance(value, str):
        key = value.strip().casefold()
        if key in BOOLEAN_TEXT:
            return BOOLEAN_TEXT[key]
        if key in MISSING_TEXT:
            return None
    elif isinstance(value, int | float):
        if math.isnan(value):
            return None
        if value in (0, 1):
            return bool(value)
    raise _Mismatch("is not a boolean (true/false, yes/no, 1/0)")


def parse_text(value: Any) -> str | None:
    """A cell as text (SQLite numbers as their plain spelling), or None for a missing cell."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        value = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise _Mismatch("is not text")
    return None if value.strip().casefold() in MISSING_TEXT else value


# --- encoding: one feature's cell -> its model-input columns ----------------------------------


def _missing(feature: Feature, fill: tuple[float, ...]) -> tuple[float, ...]:
    if feature.missing == MissingRule.ERROR:
        raise _Mismatch("is missing, and the schema refuses missing values for it")
    return (*fill, 1.0)


def _present(feature: Feature, values: tuple[float, ...]) -> tuple[float, ...]:
    return (*values, 0.0) if feature.missing == MissingRule.INDICATOR else values


def encode_numeric(feature: NumericFeature, value: Any) -> tuple[float, ...]:
    number = parse_number(value)
    if number is None:
        return _missing(feature, (feature.scale(feature.fill_value),))
    return _present(feature, (feature.scale(number),))


def encode_categorical(feature: CategoricalFeature, value: Any) -> tuple[float, ...]:
    text = parse_text(value)
    if text is None:
        return _missing(feature, (0.0,) * (len(feature.categories) + 1))
    key = normalize_category(text)
    slot = feature.keys.index(key) if key in feature.keys else len(feature.categories)
    return _present(feature, tuple(float(i == slot) for i in range(len(feature.categories) + 1)))


def encode_boolean(feature: BooleanFeature, value: Any) -> tuple[float, ...]:
    flag = parse_boolean(value)
    if flag is None:
        return _missing(feature, (float(feature.fill),))
    return _present(feature, (float(flag),))


def encode_feature(feature: Feature, value: Any) -> tuple[float, ...]:
    """One cell -> ``len(feature.columns())`` floats, from the schema's constants alone."""
    if isinstance(feature, NumericFeature):
        return encode_numeric(feature, value)
    if isinstance(feature, CategoricalFeature):
        return encode_categorical(feature, value)
    return encode_boolean(feature, value)


def parse_label(value: Any) -> float:
    try:
        flag = parse_boolean(value)
    except _Mismatch:
        raise _Mismatch("is not a label (0/1 or true/false)") from None
    if flag is None:
        raise _Mismatch("has no label")
    return float(flag)


def parse_patient_id(value: Any) -> str:
    text = parse_text(value)
    if text is None or not normalize_patient_id(text):
        raise _Mismatch("has no patient ID")
    return text


# --- a whole table ----------------------------------------------------------------------------


def _cell(table: Table, line: int, column: str, parse: Callable[[Any], Any], value: Any) -> Any:
    try:
        return parse(value)
    except _Mismatch as err:
        raise StepError(f"{table.where(line)} column {column!r} {err}.") from None


def encode_table(
    table: Table, features: Sequence[Feature], *, id_column: str, label_column: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x, y, patient IDs), one entry per row: each row encoded on its own."""
    layout = column_layout(table, features, id_column=id_column, label_column=label_column)
    if not table.rows:
        raise StepError(f"{table.label} has no rows.")
    x = np.empty((len(table.rows), len(expanded_names(features))), dtype=np.float32)
    y = np.empty(len(table.rows), dtype=np.float32)
    ids: list[str] = []
    for r, (line, row) in enumerate(table.rows):
        ids.append(_cell(table, line, id_column, parse_patient_id, row[layout.id_at]))
        y[r] = _cell(table, line, label_column, parse_label, row[layout.label_at])
        x[r] = _encode_row(table, line, row, features, layout)
    return x, y, ids


def _encode_row(
    table: Table, line: int, row: tuple[Any, ...], features: Sequence[Feature], layout: Layout
) -> list[float]:
    values: list[float] = []
    for feature, at in zip(features, layout.feature_at, strict=True):
        values.extend(_cell(table, line, feature.name, partial(encode_feature, feature), row[at]))
    return values


def prepare_tabular_site(
    source: Path,
    *,
    site: str,
    features: Sequence[Feature],
    label_column: str,
    id_column: str = "patient_id",
    secret: bytes,
    holdout_fraction: float,
    seed: int,
    table: str | None = None,
) -> PreparedDataset:
    """Encode a site's table with the declared schema, pseudonymize, split by patient.

    ``source`` is a CSV file, or an SQLite database file when ``table`` is given. Every error
    is one sentence that starts with the site's name.
    """
    try:
        check_secret(secret)
        data = read_csv_table(source) if table is None else read_sqlite_table(source, table)
        x, y, ids = encode_table(data, features, id_column=id_column, label_column=label_column)
        check_labels(y, data.label)
        pseudonyms = [pseudonymize(i, secret) for i in ids]
        if len(set(pseudonyms)) < 2:
            raise StepError(f"{data.label} covers fewer than 2 patients.")
        return assemble_prepared(
            x,
            y,
            pseudonyms,
            holdout_fraction=holdout_fraction,
            seed=seed,
            feature_names=expanded_names(features),
        )
    except StepError as err:
        raise StepError(f"site {site}: {err}") from err


__all__ = [
    "BOOLEAN_TEXT",
    "Layout",
    "MISSING_TEXT",
    "Table",
    "column_layout",
    "encode_feature",
    "encode_table",
    "parse_boolean",
    "parse_number",
    "parse_text",
    "prepare_tabular_site",
    "read_csv_table",
    "read_sqlite_table",
]
