"""The declared feature schema of a tabular federation: public constants, never data statistics.

Every tabular site turns its table into model input with the same schema, which the
federation file declares as ``[[features]]`` and every site approves with the plan:

- ``numeric``: clipped to ``[min, max]``, then scaled to [0, 1] by those bounds;
- ``categorical``: one-hot over ``categories`` plus an ``other`` slot for any value not listed
  (matched after stripping surrounding whitespace and casefolding);
- ``boolean``: 1 or 0, from TRUE/FALSE, true/false, 1/0, yes/no, y/n, t/f (any case).

Missing cells (empty, NA, N/A, NaN, null, none, SQL NULL) follow the feature's ``missing``
rule: ``indicator`` (the default) adds a ``<name>_missing`` column, always present, that is 1
where the cell is missing, and puts a declared constant in the value columns (``fill``: the
lower bound by default for numeric, false for boolean; all category slots 0 for categorical);
``error`` refuses a missing cell and adds no column.

A site's feature statistics would make every patient's input depend on every other patient,
outside what DP accounts for; with public constants a patient's row depends on that row only,
and every site's input has the same width and column order by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

MISSING_SUFFIX = "_missing"
OTHER_CATEGORY = "other"
MAX_NAME_CHARS = 128


class FeatureType(StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"
    BOOLEAN = "boolean"


class MissingRule(StrEnum):
    INDICATOR = "indicator"  # a <name>_missing column plus the declared fill
    ERROR = "error"  # a missing cell stops ingest (naming site, column, line, file)


def normalize_category(text: str) -> str:
    """How category values are compared: surrounding whitespace stripped, casefolded."""
    return text.strip().casefold()


class _Feature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    missing: MissingRule = MissingRule.INDICATOR

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # '=' separates a categorical feature from its category in the expanded names.
        if v != v.strip() or "=" in v or not v.isprintable():
            raise ValueError("a feature name has no '=', no surrounding or control whitespace")
        return v

    def value_columns(self) -> tuple[str, ...]:
        return (self.name,)

    def columns(self) -> tuple[str, ...]:
        """The model-input columns this feature expands to, in order."""
        indicator = (self.name + MISSING_SUFFIX,) if self.missing == MissingRule.INDICATOR else ()
        return self.value_columns() + indicator


def _no_bool(v: Any) -> Any:
    # TOML `true` would otherwise pass as the number 1.
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


class NumericFeature(_Feature):
    type: Literal[FeatureType.NUMERIC]
    min: float = Field(allow_inf_nan=False)
    max: float = Field(allow_inf_nan=False)
    fill: float | None = Field(default=None, allow_inf_nan=False)  # None: the lower bound

    _numbers = field_validator("min", "max", "fill", mode="before")(_no_bool)

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if not self.min < self.max or not math.isfinite(self.max - self.min):
            raise ValueError(f"feature '{self.name}' needs min < max (and a finite range)")
        if self.fill is not None:
            if self.missing == MissingRule.ERROR:
                raise ValueError(f"feature '{self.name}' refuses missing cells: it takes no fill")
            if not self.min <= self.fill <= self.max:
                raise ValueError(f"feature '{self.name}' has a fill outside [min, max]")
        return self

    @property
    def fill_value(self) -> float:
        return self.min if self.fill is None else self.fill

    def scale(self, value: float) -> float:
        """Clip to [min, max], then map the bounds to 0 and 1."""
        if not math.isfinite(value):
            raise ValueError("only finite numbers are scaled")
        clipped = min(max(value, self.min), self.max)
        return (clipped - self.min) / (self.max - self.min)


class CategoricalFeature(_Feature):
    type: Literal[FeatureType.CATEGORICAL]
    categories: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _categories(self) -> Self:
        keys = [normalize_category(c) for c in self.categories]
        if any(not k or "=" in k for k in keys):
            raise ValueError(f"feature '{self.name}' has an empty category or one with '='")
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"feature '{self.name}' lists a category twice (after trimming and casefolding)"
            )
        if OTHER_CATEGORY in keys:
            raise ValueError(
                f"feature '{self.name}' lists '{OTHER_CATEGORY}': that slot is reserved for "
                "values not listed, leave it out"
            )
        return self

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(normalize_category(c) for c in self.categories)

    def value_columns(self) -> tuple[str, ...]:
        return tuple(f"{self.name}={c.strip()}" for c in self.categories) + (
            f"{self.name}={OTHER_CATEGORY}",
        )


class BooleanFeature(_Feature):
    type: Literal[FeatureType.BOOLEAN]
    fill: bool = False

    @model_validator(mode="after")
    def _fill(self) -> Self:
        if self.fill and self.missing == MissingRule.ERROR:
            raise ValueError(f"feature '{self.name}' refuses missing cells: it takes no fill")
        return self


def _feature_tag(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return str(kind) if isinstance(kind, str) and kind in tuple(FeatureType) else None


Feature = Annotated[
    Annotated[NumericFeature, Tag(FeatureType.NUMERIC)]
    | Annotated[CategoricalFeature, Tag(FeatureType.CATEGORICAL)]
    | Annotated[BooleanFeature, Tag(FeatureType.BOOLEAN)],
    Discriminator(
        _feature_tag,
        custom_error_type="feature_type",
        custom_error_message="a feature's type must be 'numeric', 'categorical' or 'boolean'",
    ),
]


def expanded_names(features: Sequence[Feature]) -> tuple[str, ...]:
    """Every model-input column of a schema, in declared order: the model's input width."""
    return tuple(name for f in features for name in f.columns())


def check_schema(features: Sequence[Feature]) -> Sequence[Feature]:
    """Feature names, and the columns they expand to, are unique (e.g. no feature called
    'age_missing' beside an 'age' with an indicator)."""
    names = [f.name for f in features]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"feature names must be unique ('{twice[0]}' is declared twice)")
    columns = expanded_names(features)
    clash = sorted({c for c in columns if columns.count(c) > 1})
    if clash:
        raise ValueError(f"two features expand to the same model-input column '{clash[0]}'")
    return features


__all__ = [
    "BooleanFeature",
    "CategoricalFeature",
    "Feature",
    "FeatureType",
    "MISSING_SUFFIX",
    "MissingRule",
    "NumericFeature",
    "OTHER_CATEGORY",
    "check_schema",
    "expanded_names",
    "normalize_category",
]
