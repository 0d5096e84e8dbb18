"""Snowflake's VECTOR type in the local Snowflake (fakesnow on DuckDB).

fakesnow parses Snowflake SQL with sqlglot and writes DuckDB SQL with sqlglot's DuckDB generator,
which spells ``VECTOR(FLOAT, 3)`` as ``VECTOR(DOUBLE, 3)``: no DuckDB type. DuckDB's fixed-size
ARRAY is the faithful store (32-bit elements, a fixed length that every value must have), so:

* ``VECTOR(FLOAT, n)`` becomes ``FLOAT[n]`` and ``VECTOR(INT, n)`` becomes ``INTEGER[n]`` wherever
  fakesnow writes a type (CREATE TABLE, ALTER TABLE ... ADD COLUMN, casts), by wrapping the
  DuckDB generator's ``datatype_sql`` (``install``, idempotent, process-wide: only the local
  Snowflake writes DuckDB SQL with sqlglot in pgsnow);
* ``INFORMATION_SCHEMA.COLUMNS.DATA_TYPE`` says ``VECTOR`` for those columns, as Snowflake does
  (``columns_view_sql``: fakesnow's view with one more case, created or replaced at start-up).

Loading a VECTOR goes through pgsnow's own COPY (``sf_copy_sql``: an ARRAY cast to the VECTOR,
exactly n numbers). docs/snowflake-compatibility.md lists these translations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fakesnow import info_schema
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB

from pgsnow.local.sf_copy_sql import CopySyntaxError, vector_type

_INSTALLED_MARKER = "_pgsnow_vector_types"


def _with_vectors(datatype_sql: Callable[[Any, exp.DataType], str]) -> Callable[[Any, exp.DataType], str]:
    def datatype_sql_with_vectors(generator: Any, expression: exp.DataType) -> str:
        if expression.this == exp.DataType.Type.VECTOR:
            try:
                return vector_type(expression).duck
            except CopySyntaxError as error:
                # Snowflake refuses the type at compile time; DuckDB gets a type it refuses too.
                generator.unsupported(str(error))
                return "INVALID_VECTOR_TYPE"
        return datatype_sql(generator, expression)

    setattr(datatype_sql_with_vectors, _INSTALLED_MARKER, True)
    return datatype_sql_with_vectors


def install() -> None:
    """Make sqlglot's DuckDB generator write Snowflake's VECTOR as DuckDB's fixed-size ARRAY."""
    current = DuckDB.Generator.datatype_sql
    if getattr(current, _INSTALLED_MARKER, False):
        return
    DuckDB.Generator.datatype_sql = _with_vectors(current)  # type: ignore[method-assign,assignment]


# The one line added to fakesnow's DATA_TYPE mapping, and where it goes.
_JSON_CASE = "when columns.data_type='JSON' then 'VARIANT'"
_VECTOR_CASE = "when regexp_full_match(columns.data_type, '(FLOAT|INTEGER)\\[[0-9]+\\]') then 'VECTOR'"


def columns_view_sql() -> str:
    """fakesnow's global INFORMATION_SCHEMA.COLUMNS view, DATA_TYPE ``VECTOR`` for vector columns."""
    original = info_schema.SQL_CREATE_GLOBAL_INFORMATION_SCHEMA_COLUMNS_VIEW
    if _JSON_CASE not in original:
        raise RuntimeError("fakesnow's INFORMATION_SCHEMA.COLUMNS view changed; update sf_extension_types")
    return original.replace("create view if not exists", "create or replace view", 1).replace(
        _JSON_CASE, f"{_JSON_CASE}\n     {_VECTOR_CASE}", 1
    )
