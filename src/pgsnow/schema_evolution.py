"""Schema evolution: what an existing Snowflake table needs to take a run's columns.

New source columns are added (nullable: existing rows have no value); widening changes are
applied (NUMBER precision up at the same scale, a longer VARCHAR); nothing is ever dropped or
narrowed. Anything else is incompatible, and the whole plan is refused before any ALTER runs,
so a table never ends up half-changed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pgsnow.errors import PermanentError
from pgsnow.manifest import Column

_TYPE = re.compile(r"^\s*([A-Z_]+)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?\s*$", re.IGNORECASE)
MAX_VARCHAR = 16_777_216

# INFORMATION_SCHEMA.COLUMNS.DATA_TYPE and our type names, per family that can hold the other.
_FAMILY = {
    "NUMBER": "NUMBER",
    "DECIMAL": "NUMBER",
    "NUMERIC": "NUMBER",
    "INT": "NUMBER",
    "INTEGER": "NUMBER",
    "BIGINT": "NUMBER",
    "SMALLINT": "NUMBER",
    "FLOAT": "FLOAT",
    "DOUBLE": "FLOAT",
    "REAL": "FLOAT",
    "VARCHAR": "TEXT",
    "TEXT": "TEXT",
    "STRING": "TEXT",
    "CHAR": "TEXT",
    "BOOLEAN": "BOOLEAN",
    "DATE": "DATE",
    "TIME": "TIME",
    "TIMESTAMP_NTZ": "TIMESTAMP_NTZ",
    "TIMESTAMP": "TIMESTAMP_NTZ",
    "TIMESTAMP_TZ": "TIMESTAMP_TZ",
    "TIMESTAMP_LTZ": "TIMESTAMP_TZ",
    "VARIANT": "VARIANT",
    "OBJECT": "VARIANT",
    "ARRAY": "VARIANT",
    "BINARY": "BINARY",
}


@dataclass(frozen=True)
class ExistingColumn:
    """One row of INFORMATION_SCHEMA.COLUMNS."""

    name: str
    data_type: str
    precision: int | None
    scale: int | None
    length: int | None


@dataclass(frozen=True)
class TableChanges:
    added: tuple[Column, ...]
    widened: tuple[Column, ...]

    @property
    def empty(self) -> bool:
        return not self.added and not self.widened


def _parse(type_text: str) -> tuple[str, int | None, int | None]:
    if type_text.strip().upper().startswith("VECTOR("):
        # VECTOR(FLOAT, n): INFORMATION_SCHEMA says VECTOR; a changed n fails at the COPY's cast.
        return "VECTOR", None, None
    match = _TYPE.match(type_text)
    if not match:
        return type_text.upper(), None, None
    name, first, second = match.groups()
    return name.upper(), int(first) if first else None, int(second) if second else None


def plan_table_changes(
    table: str, existing: Sequence[ExistingColumn], columns: Sequence[Column]
) -> TableChanges:
    """The ALTERs that make ``existing`` hold ``columns``; PermanentError naming the column if none can."""
    by_name = {c.name: c for c in existing}
    added: list[Column] = []
    widened: list[Column] = []
    for column in columns:
        current = by_name.get(column.snowflake_name)
        if current is None:
            added.append(column)
            continue
        wanted, precision, scale = _parse(column.snowflake_type)
        have_family = _FAMILY.get(current.data_type.upper(), current.data_type.upper())
        want_family = _FAMILY.get(wanted, wanted)
        if have_family != want_family:
            raise PermanentError(
                f"incompatible schema change for column {column.snowflake_name}: the table has "
                f"{current.data_type}, the source now sends {column.snowflake_type}; nothing was loaded",
                table=table,
            )
        if want_family == "NUMBER":
            have_precision, have_scale = current.precision or 38, current.scale or 0
            want_precision, want_scale = precision or 38, scale or 0
            if want_scale != have_scale:
                raise PermanentError(
                    f"incompatible schema change for column {column.snowflake_name}: scale "
                    f"{have_scale} -> {want_scale} (Snowflake cannot change a column's scale)",
                    table=table,
                )
            if want_precision > have_precision:
                widened.append(column)
        elif want_family == "TEXT":
            have_length = current.length or MAX_VARCHAR
            want_length = precision or MAX_VARCHAR
            if want_length > have_length:
                widened.append(column)
    return TableChanges(tuple(added), tuple(widened))
