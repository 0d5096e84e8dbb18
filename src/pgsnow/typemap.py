"""The type contract: PostgreSQL column type -> staged file encoding -> Snowflake column type.

docs/type-mapping.md is the written form of this module; keep them together.
The extractor and the loader both read the mapping from here so the two sides
cannot disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from pgsnow.errors import PermanentError


class ValueKind(StrEnum):
    """How a value is encoded in staged files; the loader converts from this."""

    INTEGER = "integer"
    DECIMAL = "decimal"  # exact numeric(p, s)
    FLOAT = "float"
    TEXT = "text"
    BOOLEAN = "boolean"
    DATE = "date"
    TIME = "time"
    TIMESTAMP = "timestamp"  # without time zone
    TIMESTAMPTZ = "timestamptz"  # an instant, staged in UTC
    JSON = "json"  # json/jsonb/arrays, staged as JSON text, loaded as VARIANT
    BINARY = "binary"  # bytea, hex in CSV, raw bytes in Parquet
    # Extension types (pgsnow.extension_types): staged as text in both formats.
    VECTOR = "vector"  # pgvector vector(n), staged as its JSON array text
    GEOMETRY = "geometry"  # PostGIS geometry, staged as EWKB hex (SRID kept)
    GEOGRAPHY = "geography"  # PostGIS geography, staged as EWKB hex (SRID 4326)


@dataclass(frozen=True)
class SnowflakeType:
    kind: ValueKind
    sql: str  # the Snowflake column type, e.g. NUMBER(10,2)
    precision: int | None = None
    scale: int | None = None


# Default NUMBER shape for unbounded `numeric`: values are checked by the
# extractor to fit it exactly (no silent rounding), see docs/type-mapping.md.
UNBOUNDED_NUMERIC_PRECISION = 38
UNBOUNDED_NUMERIC_SCALE = 10

_NUMERIC = re.compile(r"^numeric\((\d+),(\d+)\)$")


def map_pg_type(base_type: str) -> SnowflakeType:
    """Map a PostgreSQL type, as printed by ``format_type()`` of the base type, to Snowflake.

    Domains are resolved to their base type by the caller; enums arrive as ``text``.
    """
    t = base_type.strip().lower().replace(", ", ",")
    # pgvector and PostGIS first; imported here because pgsnow.extension_types imports this module.
    from pgsnow.extension_types import map_extension_type

    if (vector_or_spatial := map_extension_type(t)) is not None:
        return vector_or_spatial
    if t.endswith("[]"):
        return SnowflakeType(ValueKind.JSON, "VARIANT")
    if t in {"smallint", "integer", "bigint"}:
        return SnowflakeType(ValueKind.INTEGER, "NUMBER(38,0)", 38, 0)
    if m := _NUMERIC.match(t):
        precision, scale = int(m.group(1)), int(m.group(2))
        if precision > 38:
            raise PermanentError(f"numeric({precision},{scale}) has more than Snowflake's 38 digits")
        return SnowflakeType(ValueKind.DECIMAL, f"NUMBER({precision},{scale})", precision, scale)
    if t == "numeric":
        p, s = UNBOUNDED_NUMERIC_PRECISION, UNBOUNDED_NUMERIC_SCALE
        return SnowflakeType(ValueKind.DECIMAL, f"NUMBER({p},{s})", p, s)
    if t in {"real", "double precision"}:
        return SnowflakeType(ValueKind.FLOAT, "FLOAT")
    if t == "text" or t.startswith(("character varying", "character", "bpchar", "name", "citext")):
        return SnowflakeType(ValueKind.TEXT, "VARCHAR(134217728)")
    if t in {"uuid", "inet", "cidr", "macaddr", "money", "interval", "time with time zone", "xml"}:
        return SnowflakeType(ValueKind.TEXT, "VARCHAR(134217728)")
    if t == "boolean":
        return SnowflakeType(ValueKind.BOOLEAN, "BOOLEAN")
    if t == "date":
        return SnowflakeType(ValueKind.DATE, "DATE")
    if t.startswith("time") and "with time zone" not in t and not t.startswith("timestamp"):
        return SnowflakeType(ValueKind.TIME, "TIME(6)")
    if t.startswith("timestamp") and t.endswith("with time zone"):
        return SnowflakeType(ValueKind.TIMESTAMPTZ, "TIMESTAMP_TZ(6)")
    if t.startswith("timestamp"):
        return SnowflakeType(ValueKind.TIMESTAMP, "TIMESTAMP_NTZ(6)")
    if t in {"json", "jsonb"}:
        return SnowflakeType(ValueKind.JSON, "VARIANT")
    if t == "bytea":
        return SnowflakeType(ValueKind.BINARY, "BINARY")
    raise PermanentError(f"PostgreSQL type {base_type!r} is not in pgsnow's type contract yet")
