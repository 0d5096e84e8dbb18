"""Schema evolution: what an existing Snowflake table needs to take a run's columns.

The ONE owner of the compatibility rules. The extractor applies them before it stages a run
(against the columns of the table's last staged run, ``pgsnow.checkpoint``), the loader again
before it loads (against the real Snowflake table, the source of truth for what it can take,
which also covers hand-dropped files and tables altered by hand). docs/loading.md has the table.

* A new source column is added, nullable (existing rows have no value for it).
* A column the run does not send stays in the table and is filled with NULL from then on; if it
  is NOT NULL there, it is made nullable first (``DROP NOT NULL``), or every load would fail.
  A renamed column is exactly that: the old name stops filling, the new one is added.
* A source column that became nullable makes its NOT NULL target column nullable; one that
  became NOT NULL leaves the target as it is (Snowflake's SET NOT NULL fails on existing NULLs,
  and the rows the source no longer has may hold them).
* Widening is applied with ``SET DATA TYPE``: NUMBER precision up at the same scale, a longer
  VARCHAR. A narrower type the table still holds (precision down at the same scale, a shorter
  VARCHAR; smallint/integer/bigint are all NUMBER(38,0)) loads into the column unchanged.
* Anything else (another type family, another NUMBER scale, TIMESTAMP_NTZ <-> TIMESTAMP_TZ) is
  refused with a PermanentError naming the column and both types, before any ALTER runs, so a
  table never ends up half-changed.

This module must not import pyarrow (the loader artifact does not ship it).
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
# The hint every refusal ends with: a replace run loads into a new table, which takes any type.
REBUILD_HINT = "to take the new type, run the table once with write_mode=replace (it rebuilds the table)"


@dataclass(frozen=True)
class ExistingColumn:
    """One column of the table as it is: a row of INFORMATION_SCHEMA.COLUMNS (or, in the
    extractor, a column of the table's last staged run)."""

    name: str
    data_type: str
    precision: int | None
    scale: int | None
    length: int | None
    nullable: bool = True

    @property
    def type_text(self) -> str:
        """The type as a person reads it: NUMBER(10,2), VARCHAR(20), TIMESTAMP_NTZ."""
        family = _FAMILY.get(self.data_type.upper())
        if family == "NUMBER":
            return f"NUMBER({self.precision or 38},{self.scale or 0})"
        if family == "TEXT":
            # INFORMATION_SCHEMA says TEXT; the DDL that made it (and a reader) says VARCHAR.
            return f"VARCHAR({self.length})" if self.length and self.length < MAX_VARCHAR else "VARCHAR"
        return self.data_type.upper()


@dataclass(frozen=True)
class TableChanges:
    """What a run's columns change in the table. ``added``/``widened``/``relaxed`` are ALTERs;
    ``dropped`` (names the run does not send) and ``kept_nullable`` (source NOT NULL, target
    nullable) only need saying."""

    added: tuple[Column, ...] = ()
    widened: tuple[Column, ...] = ()
    relaxed: tuple[str, ...] = ()  # Snowflake names to ALTER ... DROP NOT NULL
    dropped: tuple[str, ...] = ()
    kept_nullable: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """No ALTER is needed."""
        return not self.added and not self.widened and not self.relaxed


def existing_from_published(column: Column) -> ExistingColumn:
    """A column of an earlier run (its manifest's Snowflake type), as the table would hold it."""
    name, first, second = _parse(column.snowflake_type)
    family = _FAMILY.get(name, name)
    if family == "NUMBER":
        return ExistingColumn(
            column.snowflake_name, "NUMBER", first or 38, second or 0, None, column.nullable
        )
    if family == "TEXT":
        return ExistingColumn(
            column.snowflake_name, "TEXT", None, None, first or MAX_VARCHAR, column.nullable
        )
    return ExistingColumn(column.snowflake_name, name, None, None, None, column.nullable)


def _parse(type_text: str) -> tuple[str, int | None, int | None]:
    if type_text.strip().upper().startswith("VECTOR("):
        # VECTOR(FLOAT, n): INFORMATION_SCHEMA says VECTOR; a changed n fails at the COPY's cast.
        return "VECTOR", None, None
    match = _TYPE.match(type_text)
    if not match:
        return type_text.upper(), None, None
    name, first, second = match.groups()
    return name.upper(), int(first) if first else None, int(second) if second else None


def _refuse(table: str, column: Column, current: ExistingColumn, why: str) -> PermanentError:
    return PermanentError(
        f"incompatible schema change for column {column.snowflake_name}: the table has "
        f"{current.type_text}, the source now sends {column.snowflake_type} ({why}); {REBUILD_HINT}",
        table=table,
    )


def plan_table_changes(
    table: str, existing: Sequence[ExistingColumn], columns: Sequence[Column]
) -> TableChanges:
    """The ALTERs that make ``existing`` take ``columns``; a PermanentError naming the column and
    both types when it cannot (checked for every column before the caller alters anything)."""
    by_name = {c.name: c for c in existing}
    sent = {c.snowflake_name for c in columns}
    added: list[Column] = []
    widened: list[Column] = []
    relaxed: list[str] = []
    kept_nullable: list[str] = []
    for column in columns:
        current = by_name.get(column.snowflake_name)
        if current is None:
            added.append(column)
            continue
        if column.nullable and not current.nullable:
            relaxed.append(current.name)
        elif not column.nullable and current.nullable:
            kept_nullable.append(current.name)
        wanted, precision, scale = _parse(column.snowflake_type)
        have_family = _FAMILY.get(current.data_type.upper(), current.data_type.upper())
        want_family = _FAMILY.get(wanted, wanted)
        if have_family != want_family:
            raise _refuse(table, column, current, "Snowflake cannot change a column's type to another kind")
        if want_family == "NUMBER":
            have_precision, have_scale = current.precision or 38, current.scale or 0
            want_precision, want_scale = precision or 38, scale or 0
            if want_scale != have_scale:
                raise _refuse(table, column, current, "Snowflake cannot change a NUMBER column's scale")
            if want_precision > have_precision:
                widened.append(column)
        elif want_family == "TEXT":
            have_length = current.length or MAX_VARCHAR
            want_length = precision or MAX_VARCHAR
            if want_length > have_length:
                widened.append(column)
    dropped = [c.name for c in existing if c.name not in sent]
    relaxed += [c.name for c in existing if c.name not in sent and not c.nullable]
    return TableChanges(tuple(added), tuple(widened), tuple(relaxed), tuple(dropped), tuple(kept_nullable))
