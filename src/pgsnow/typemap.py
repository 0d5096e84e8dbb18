"""The type contract: PostgreSQL column type -> staged file encoding -> Snowflake column type.

docs/type-mapping.md is the written form of this module; keep them together.
The extractor and the loader both read the mapping from here so the two sides
cannot disagree. No type refuses a table: a type the contract does not name is staged as
its text output in a VARCHAR (``TypeShape.FALLBACK``), and the run's manifest warns about it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


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
    JSON = "json"  # json/jsonb/arrays/ranges/composites/hstore, staged as JSON text, loaded as VARIANT
    BINARY = "binary"  # bytea, hex in CSV, raw bytes in Parquet
    # Extension types (pgsnow.extension_types): staged as text in both formats.
    VECTOR = "vector"  # pgvector vector(n), staged as its JSON array text
    GEOMETRY = "geometry"  # PostGIS geometry, staged as EWKB hex (SRID kept)
    GEOGRAPHY = "geography"  # PostGIS geography, staged as EWKB hex (SRID 4326)


class TypeShape(StrEnum):
    """How PostgreSQL builds the staged value of a column, beyond its kind.

    JSON-kind columns differ in how their JSON document is built; TEXT-kind columns whose type
    the contract does not name are FALLBACK (staged the same way, but the run warns).
    """

    SCALAR = "scalar"  # the type's own value (json/jsonb as its jsonb text)
    ARRAY = "array"  # to_jsonb(): nested JSON arrays
    RANGE = "range"  # an object: bounds, inclusivity, empty, infinite ends
    MULTIRANGE = "multirange"  # a JSON array of range objects
    COMPOSITE = "composite"  # to_jsonb(): an object by field name
    HSTORE = "hstore"  # to_jsonb() through hstore's cast: an object of text values
    FALLBACK = "fallback"  # not in the contract: its text output, with a warning


@dataclass(frozen=True)
class SnowflakeType:
    kind: ValueKind
    sql: str  # the Snowflake column type, e.g. NUMBER(10,2)
    precision: int | None = None
    scale: int | None = None
    shape: TypeShape = TypeShape.SCALAR


# Unbounded `numeric` is NUMBER(38, s) with s chosen from the data when the table is first
# created (pgsnow.postgres.choose_numeric_scales); this is the scale it gets when that run has
# no value to choose from, and the least it is given otherwise (docs/type-mapping.md).
UNBOUNDED_NUMERIC_PRECISION = 38
UNBOUNDED_NUMERIC_SCALE = 10

# PostgreSQL 15+ also allows a negative scale (numeric(5,-2): multiples of 100) and a scale
# above the precision (numeric(3,5): below 0.001).
_NUMERIC = re.compile(r"^numeric\((\d+),(-?\d+)\)$")
_TYPMOD = re.compile(r"\(\d+(?:,-?\d+)?\)")

_INTEGER = SnowflakeType(ValueKind.INTEGER, "NUMBER(38,0)", 38, 0)
_FLOAT = SnowflakeType(ValueKind.FLOAT, "FLOAT")
# Declared at Snowflake's largest length: a VARCHAR without one holds only 16 MB (16,777,216),
# and PostgreSQL text holds up to 1 GB (values over the 128 MB maximum follow the value policy).
TEXT_COLUMN_LENGTH = 134_217_728
_TEXT = SnowflakeType(ValueKind.TEXT, f"VARCHAR({TEXT_COLUMN_LENGTH})")
_VARIANT = SnowflakeType(ValueKind.JSON, "VARIANT")

# Built-in (pg_catalog) types by format_type() without type modifiers.
_BUILTIN: Mapping[str, SnowflakeType] = {
    "smallint": _INTEGER,
    "integer": _INTEGER,
    "bigint": _INTEGER,
    "real": _FLOAT,
    "double precision": _FLOAT,
    "boolean": SnowflakeType(ValueKind.BOOLEAN, "BOOLEAN"),
    "date": SnowflakeType(ValueKind.DATE, "DATE"),
    "time without time zone": SnowflakeType(ValueKind.TIME, "TIME(6)"),
    "timestamp without time zone": SnowflakeType(ValueKind.TIMESTAMP, "TIMESTAMP_NTZ(6)"),
    "timestamp with time zone": SnowflakeType(ValueKind.TIMESTAMPTZ, "TIMESTAMP_TZ(6)"),
    "json": _VARIANT,
    "jsonb": _VARIANT,
    "bytea": SnowflakeType(ValueKind.BINARY, "BINARY"),
    # Character types (enums arrive as text).
    "text": _TEXT,
    "character varying": _TEXT,
    "character": _TEXT,
    "bpchar": _TEXT,
    "name": _TEXT,
    '"char"': _TEXT,
    # Types Snowflake has no type for, staged as PostgreSQL's text output.
    **dict.fromkeys(
        [
            "uuid",
            "inet",
            "cidr",
            "macaddr",
            "macaddr8",
            "money",
            "interval",
            "time with time zone",
            "xml",
            "jsonpath",
            # full-text search
            "tsvector",
            "tsquery",
            # bit strings: '0101'
            "bit",
            "bit varying",
            # geometric types
            "point",
            "line",
            "lseg",
            "box",
            "path",
            "polygon",
            "circle",
            # the oid family and other system identifiers
            "oid",
            "regclass",
            "regcollation",
            "regconfig",
            "regdictionary",
            "regnamespace",
            "regoper",
            "regoperator",
            "regproc",
            "regprocedure",
            "regrole",
            "regtype",
            "xid",
            "xid8",
            "cid",
            "tid",
            "pg_lsn",
            "pg_snapshot",
            "txid_snapshot",
            "int2vector",
            "oidvector",
            "aclitem",
            "refcursor",
        ],
        _TEXT,
    ),
}

# The same types by their short SQL spellings and catalog names (format_type() never prints
# these, but callers naming a type by hand do: map_pg_type("timestamptz")).
_BUILTIN_ALIASES: Mapping[str, str] = {
    "int": "integer",
    "int2": "smallint",
    "int4": "integer",
    "int8": "bigint",
    "float4": "real",
    "float8": "double precision",
    "bool": "boolean",
    "varchar": "character varying",
    "char": "character",
    "time": "time without time zone",
    "timetz": "time with time zone",
    "timestamp": "timestamp without time zone",
    "timestamptz": "timestamp with time zone",
    "varbit": "bit varying",
}

# Extension types, by (extension, type name). When the caller does not say which extension
# owns a type (format_type() strings in tests), the name alone is looked up. A type whose
# Snowflake type depends on its modifier (e.g. vector(3)) finds it in ``base_type``.
_EXTENSION: Mapping[tuple[str, str], SnowflakeType] = {
    ("citext", "citext"): _TEXT,
    ("hstore", "hstore"): SnowflakeType(ValueKind.JSON, "VARIANT", shape=TypeShape.HSTORE),
    ("ltree", "ltree"): _TEXT,
    ("ltree", "lquery"): _TEXT,
    ("ltree", "ltxtquery"): _TEXT,
}
_EXTENSION_BY_NAME: Mapping[str, SnowflakeType] = {name: t for (_, name), t in _EXTENSION.items()}

# pg_type.typtype values: the type's class.
TYPTYPE_BASE = "b"
TYPTYPE_RANGE = "r"
TYPTYPE_MULTIRANGE = "m"
TYPTYPE_COMPOSITE = "c"


def map_pg_type(
    base_type: str,
    *,
    type_name: str | None = None,
    typtype: str = TYPTYPE_BASE,
    extension: str | None = None,
) -> SnowflakeType:
    """Map a PostgreSQL type to Snowflake; never refuses a type (unknown ones are FALLBACK).

    ``base_type`` is ``format_type()`` of the base type; ``type_name`` its bare ``pg_type.typname``,
    ``typtype`` its class and ``extension`` the extension that owns it (from the catalog,
    ``pgsnow.postgres.describe_table``). Domains are resolved by the caller; enums arrive as ``text``.
    """
    t = base_type.strip().lower().replace(", ", ",")
    # pgvector and PostGIS first; imported here because pgsnow.extension_types imports this module.
    from pgsnow.extension_types import map_extension_type

    if (vector_or_spatial := map_extension_type(t)) is not None:
        return vector_or_spatial
    if t.endswith("[]"):
        return SnowflakeType(ValueKind.JSON, "VARIANT", shape=TypeShape.ARRAY)
    if typtype == TYPTYPE_RANGE:
        return SnowflakeType(ValueKind.JSON, "VARIANT", shape=TypeShape.RANGE)
    if typtype == TYPTYPE_MULTIRANGE:
        return SnowflakeType(ValueKind.JSON, "VARIANT", shape=TypeShape.MULTIRANGE)
    if typtype == TYPTYPE_COMPOSITE:
        return SnowflakeType(ValueKind.JSON, "VARIANT", shape=TypeShape.COMPOSITE)
    if extension is not None:
        return _EXTENSION.get((extension, type_name or t), _FALLBACK)
    if scale_from_data(t):
        return unbounded_numeric_type(UNBOUNDED_NUMERIC_SCALE)
    if m := _NUMERIC.match(t):
        precision, scale = _number_shape(int(m.group(1)), int(m.group(2)))
        return SnowflakeType(ValueKind.DECIMAL, f"NUMBER({precision},{scale})", precision, scale)
    unmodified = _TYPMOD.sub("", t)
    if found := _BUILTIN.get(_BUILTIN_ALIASES.get(unmodified, unmodified)):
        return found
    if type_name is None and (found := _EXTENSION_BY_NAME.get(unmodified)):
        return found
    return _FALLBACK


_FALLBACK = SnowflakeType(ValueKind.TEXT, f"VARCHAR({TEXT_COLUMN_LENGTH})", shape=TypeShape.FALLBACK)


def _number_shape(precision: int, scale: int) -> tuple[int, int]:
    """The NUMBER(p, s) that holds every value of numeric(precision, scale) exactly.

    Snowflake wants 0 <= s <= p: a negative scale holds integers of precision - scale digits,
    a scale above the precision needs that many digits after the point.
    """
    if scale < 0:
        return precision - scale, 0
    return max(precision, scale), scale


def scale_from_data(base_type: str) -> bool:
    """Unbounded ``numeric``, or ``numeric(p,s)`` wider than Snowflake's 38 digits: NUMBER(38, s)
    with the scale chosen from the data (its values may well fit 38 digits)."""
    t = base_type.strip().lower().replace(", ", ",")
    if t == "numeric":
        return True
    m = _NUMERIC.match(t)
    return m is not None and _number_shape(int(m.group(1)), int(m.group(2)))[0] > UNBOUNDED_NUMERIC_PRECISION


def unbounded_numeric_type(scale: int) -> SnowflakeType:
    """The NUMBER an unbounded ``numeric`` column gets for a chosen scale."""
    p = UNBOUNDED_NUMERIC_PRECISION
    return SnowflakeType(ValueKind.DECIMAL, f"NUMBER({p},{scale})", p, scale)
