"""Snowflake's VECTOR, GEOMETRY and GEOGRAPHY types in the local Snowflake (fakesnow on DuckDB).

fakesnow parses Snowflake SQL with sqlglot and writes DuckDB SQL with sqlglot's DuckDB generator,
which spells ``VECTOR(FLOAT, 3)`` as ``VECTOR(DOUBLE, 3)`` (no DuckDB type) and keeps GEOMETRY
and GEOGRAPHY (DuckDB's GEOMETRY keeps no per-value SRID; GEOGRAPHY is no DuckDB type). So:

* ``VECTOR(FLOAT, n)`` becomes ``FLOAT[n]`` and ``VECTOR(INT, n)`` becomes ``INTEGER[n]`` (DuckDB's
  fixed-size ARRAY: 32-bit elements, a length every value must have); ``GEOMETRY`` and
  ``GEOGRAPHY`` become a struct of the SRID and the 2D WKB (``sf_copy_sql.GEOMETRY_STORAGE``,
  ``GEOGRAPHY_STORAGE``), wherever fakesnow writes a type (CREATE TABLE, ALTER TABLE ... ADD
  COLUMN), by wrapping the DuckDB generator's ``datatype_sql`` (``install``, idempotent,
  process-wide: only the local Snowflake writes DuckDB SQL with sqlglot in pgsnow);
* ``INFORMATION_SCHEMA.COLUMNS.DATA_TYPE`` says ``VECTOR``, ``GEOMETRY`` or ``GEOGRAPHY`` for those
  columns, as Snowflake does (``columns_view_sql``: fakesnow's view with three more cases,
  created or replaced at start-up);
* each session gets ``ST_SRID(g)`` and ``ST_ASWKB(g)`` / ``ST_ASBINARY(g)`` over the stored
  struct (``SESSION_MACROS``: temporary macros on the session's DuckDB connection).

Loading goes through pgsnow's own COPY (``sf_copy_sql``: an ARRAY cast to the VECTOR, exactly n
numbers; TO_GEOMETRY/TO_GEOGRAPHY of EWKB hex with Snowflake's refusals). A bare VECTOR or
geospatial column cannot be SELECTed locally (fakesnow has no result type for it): cast a VECTOR to
ARRAY, read a geometry with ST_SRID/ST_ASWKB. docs/snowflake-compatibility.md lists all of this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fakesnow import info_schema
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB

from pgsnow.local.sf_copy_sql import (
    GEOGRAPHY_STORAGE,
    GEOMETRY_STORAGE,
    CopySyntaxError,
    geospatial_from_ewkb_hex_sql,
    vector_type,
)

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
        if expression.this == exp.DataType.Type.GEOMETRY:
            return GEOMETRY_STORAGE
        if expression.this == exp.DataType.Type.GEOGRAPHY:
            return GEOGRAPHY_STORAGE
        return datatype_sql(generator, expression)

    setattr(datatype_sql_with_vectors, _INSTALLED_MARKER, True)
    return datatype_sql_with_vectors


def _with_geospatial_casts(cast_sql: Callable[..., str]) -> Callable[..., str]:
    """``TO_GEOMETRY(x)`` / ``TO_GEOGRAPHY(x)`` (sqlglot: a cast) as the COPY converts them, with
    Snowflake's refusals raised as an error (the INSERT load method goes through fakesnow)."""

    def cast_sql_with_geospatial(generator: Any, expression: exp.Cast, safe_prefix: str | None = None) -> str:
        target = expression.to.this if isinstance(expression.to, exp.DataType) else None
        if target in {exp.DataType.Type.GEOMETRY, exp.DataType.Type.GEOGRAPHY}:
            geography = target == exp.DataType.Type.GEOGRAPHY
            text = f"CAST({generator.sql(expression, 'this')} AS VARCHAR)"
            value = geospatial_from_ewkb_hex_sql(text, geography=geography)
            name = "TO_GEOGRAPHY" if geography else "TO_GEOMETRY"
            return (
                f"(CASE WHEN {text} IS NOT NULL AND {value} IS NULL "
                f"THEN error('{name}: not a 2D, valid EWKB hex shape Snowflake holds: ' || {text}) "
                f"ELSE {value} END)"
            )
        return cast_sql(generator, expression, safe_prefix)

    setattr(cast_sql_with_geospatial, _INSTALLED_MARKER, True)
    return cast_sql_with_geospatial


def install() -> None:
    """Make sqlglot's DuckDB generator write Snowflake's VECTOR as DuckDB's fixed-size ARRAY, the
    geospatial types as their stored struct, and TO_GEOMETRY/TO_GEOGRAPHY as their conversion."""
    current = DuckDB.Generator.datatype_sql
    if getattr(current, _INSTALLED_MARKER, False):
        return
    DuckDB.Generator.datatype_sql = _with_vectors(current)  # type: ignore[method-assign,assignment]
    DuckDB.Generator.cast_sql = _with_geospatial_casts(DuckDB.Generator.cast_sql)  # type: ignore[method-assign]


# The lines added to fakesnow's DATA_TYPE mapping, and where they go.
_JSON_CASE = "when columns.data_type='JSON' then 'VARIANT'"
_EXTENSION_CASES = (
    "when regexp_full_match(columns.data_type, '(FLOAT|INTEGER)\\[[0-9]+\\]') then 'VECTOR'\n"
    f"     when columns.data_type='{GEOMETRY_STORAGE}' then 'GEOMETRY'\n"
    f"     when columns.data_type='{GEOGRAPHY_STORAGE}' then 'GEOGRAPHY'"
)


def columns_view_sql() -> str:
    """fakesnow's global INFORMATION_SCHEMA.COLUMNS view, with VECTOR/GEOMETRY/GEOGRAPHY DATA_TYPEs."""
    original = info_schema.SQL_CREATE_GLOBAL_INFORMATION_SCHEMA_COLUMNS_VIEW
    if _JSON_CASE not in original:
        raise RuntimeError("fakesnow's INFORMATION_SCHEMA.COLUMNS view changed; update sf_extension_types")
    return original.replace("create view if not exists", "create or replace view", 1).replace(
        _JSON_CASE, f"{_JSON_CASE}\n     {_EXTENSION_CASES}", 1
    )


# Snowflake's accessors over the stored struct (SRID, plain 2D WKB). Temporary macros shadow the
# spatial extension's functions of the same names in the session only; pgsnow's COPY runs on
# connections of its own and keeps spatial's.
SESSION_MACROS = (
    "CREATE OR REPLACE TEMP MACRO st_srid(g) AS struct_extract_at(g, 1)",
    "CREATE OR REPLACE TEMP MACRO st_aswkb(g) AS struct_extract_at(g, 2)",
    "CREATE OR REPLACE TEMP MACRO st_asbinary(g) AS struct_extract_at(g, 2)",
)


def prepare_session(duck: Any) -> None:
    """Give a session's DuckDB connection the geospatial accessors (``SESSION_MACROS``)."""
    for statement in SESSION_MACROS:
        duck.execute(statement)
