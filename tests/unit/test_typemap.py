"""The type contract's table (docs/type-mapping.md), one row per PostgreSQL type: no type is
refused; a type the contract does not name falls back to VARCHAR and is marked so the run warns.

The inputs are what ``pgsnow.postgres.describe_table`` reads from the catalog: ``format_type()``
of the base type, its bare ``typname``, its ``typtype`` and the extension that owns it.
"""

from __future__ import annotations

import json

import pytest

from pgsnow.manifest import Column, column_from_json, column_to_json
from pgsnow.typemap import TEXT_COLUMN_LENGTH, TypeShape, ValueKind, map_pg_type, scale_from_data

TEXT = (ValueKind.TEXT, f"VARCHAR({TEXT_COLUMN_LENGTH})", TypeShape.SCALAR)
VARIANT = (ValueKind.JSON, "VARIANT", TypeShape.SCALAR)
ARRAY = (ValueKind.JSON, "VARIANT", TypeShape.ARRAY)
FALLBACK = (ValueKind.TEXT, f"VARCHAR({TEXT_COLUMN_LENGTH})", TypeShape.FALLBACK)

# (format_type of the base type, typname, typtype, extension) -> (kind, Snowflake type, shape)
BUILT_IN = [
    ("smallint", "int2", (ValueKind.INTEGER, "NUMBER(38,0)", TypeShape.SCALAR)),
    ("integer", "int4", (ValueKind.INTEGER, "NUMBER(38,0)", TypeShape.SCALAR)),
    ("bigint", "int8", (ValueKind.INTEGER, "NUMBER(38,0)", TypeShape.SCALAR)),
    ("numeric(12,2)", "numeric", (ValueKind.DECIMAL, "NUMBER(12,2)", TypeShape.SCALAR)),
    ("numeric(38,0)", "numeric", (ValueKind.DECIMAL, "NUMBER(38,0)", TypeShape.SCALAR)),
    # scale chosen from the data at the table's first run (pgsnow.postgres.choose_numeric_scales)
    ("numeric", "numeric", (ValueKind.DECIMAL, "NUMBER(38,10)", TypeShape.SCALAR)),
    ("numeric(40,2)", "numeric", (ValueKind.DECIMAL, "NUMBER(38,10)", TypeShape.SCALAR)),
    # PostgreSQL 15+: a negative scale holds integers, a scale above the precision small fractions
    ("numeric(5,-2)", "numeric", (ValueKind.DECIMAL, "NUMBER(7,0)", TypeShape.SCALAR)),
    ("numeric(3,5)", "numeric", (ValueKind.DECIMAL, "NUMBER(5,5)", TypeShape.SCALAR)),
    ("numeric(38,-2)", "numeric", (ValueKind.DECIMAL, "NUMBER(38,10)", TypeShape.SCALAR)),
    ("real", "float4", (ValueKind.FLOAT, "FLOAT", TypeShape.SCALAR)),
    ("double precision", "float8", (ValueKind.FLOAT, "FLOAT", TypeShape.SCALAR)),
    ("boolean", "bool", (ValueKind.BOOLEAN, "BOOLEAN", TypeShape.SCALAR)),
    ("date", "date", (ValueKind.DATE, "DATE", TypeShape.SCALAR)),
    ("time without time zone", "time", (ValueKind.TIME, "TIME(6)", TypeShape.SCALAR)),
    ("time(3) without time zone", "time", (ValueKind.TIME, "TIME(6)", TypeShape.SCALAR)),
    ("timestamp without time zone", "timestamp", (ValueKind.TIMESTAMP, "TIMESTAMP_NTZ(6)", TypeShape.SCALAR)),
    (
        "timestamp(3) with time zone",
        "timestamptz",
        (ValueKind.TIMESTAMPTZ, "TIMESTAMP_TZ(6)", TypeShape.SCALAR),
    ),
    ("json", "json", VARIANT),
    ("jsonb", "jsonb", VARIANT),
    ("bytea", "bytea", (ValueKind.BINARY, "BINARY", TypeShape.SCALAR)),
    ("text", "text", TEXT),
    ("character varying(40)", "varchar", TEXT),
    ("character(3)", "bpchar", TEXT),
    ("name", "name", TEXT),
    ('"char"', "char", TEXT),
    ("time with time zone", "timetz", TEXT),
    ("interval", "interval", TEXT),
    ("uuid", "uuid", TEXT),
    ("inet", "inet", TEXT),
    ("cidr", "cidr", TEXT),
    ("macaddr", "macaddr", TEXT),
    ("macaddr8", "macaddr8", TEXT),
    ("money", "money", TEXT),
    ("xml", "xml", TEXT),
    ("jsonpath", "jsonpath", TEXT),
    ("tsvector", "tsvector", TEXT),
    ("tsquery", "tsquery", TEXT),
    ("bit(4)", "bit", TEXT),
    ("bit varying(8)", "varbit", TEXT),
    ("bit varying", "varbit", TEXT),
    ("point", "point", TEXT),
    ("line", "line", TEXT),
    ("lseg", "lseg", TEXT),
    ("box", "box", TEXT),
    ("path", "path", TEXT),
    ("polygon", "polygon", TEXT),
    ("circle", "circle", TEXT),
    ("oid", "oid", TEXT),
    ("regclass", "regclass", TEXT),
    ("regtype", "regtype", TEXT),
    ("regproc", "regproc", TEXT),
    ("regprocedure", "regprocedure", TEXT),
    ("regoper", "regoper", TEXT),
    ("regoperator", "regoperator", TEXT),
    ("regconfig", "regconfig", TEXT),
    ("regdictionary", "regdictionary", TEXT),
    ("regnamespace", "regnamespace", TEXT),
    ("regrole", "regrole", TEXT),
    ("regcollation", "regcollation", TEXT),
    ("xid", "xid", TEXT),
    ("xid8", "xid8", TEXT),
    ("cid", "cid", TEXT),
    ("tid", "tid", TEXT),
    ("pg_lsn", "pg_lsn", TEXT),
    ("pg_snapshot", "pg_snapshot", TEXT),
    ("txid_snapshot", "txid_snapshot", TEXT),
    ("int2vector", "int2vector", TEXT),
    ("oidvector", "oidvector", TEXT),
    ("aclitem", "aclitem", TEXT),
    ("refcursor", "refcursor", TEXT),
    ("integer[]", "_int4", ARRAY),
    ("text[]", "_text", ARRAY),
    ("tsvector[]", "_tsvector", ARRAY),
    ("point[]", "_point", ARRAY),
    ("bit varying[]", "_varbit", ARRAY),
    ("int4range[]", "_int4range", ARRAY),
    # built-in types the contract does not name: their text
    ("pg_node_tree", "pg_node_tree", FALLBACK),
    ("gtsvector", "gtsvector", FALLBACK),
]


@pytest.mark.parametrize(("base_type", "type_name", "expected"), BUILT_IN, ids=[row[0] for row in BUILT_IN])
def test_built_in_types(base_type: str, type_name: str, expected: tuple[ValueKind, str, TypeShape]) -> None:
    mapped = map_pg_type(base_type, type_name=type_name, typtype="b")
    assert (mapped.kind, mapped.sql, mapped.shape) == expected


RANGES = ["int4range", "int8range", "numrange", "daterange", "tsrange", "tstzrange"]


@pytest.mark.parametrize("range_type", RANGES)
def test_ranges_and_multiranges_are_variant_objects(range_type: str) -> None:
    ranged = map_pg_type(range_type, type_name=range_type, typtype="r")
    multi_name = range_type.replace("range", "multirange")
    multi = map_pg_type(multi_name, type_name=multi_name, typtype="m")
    assert (ranged.kind, ranged.sql, ranged.shape) == (ValueKind.JSON, "VARIANT", TypeShape.RANGE)
    assert (multi.kind, multi.sql, multi.shape) == (ValueKind.JSON, "VARIANT", TypeShape.MULTIRANGE)


def test_a_user_range_is_a_range_whatever_its_name() -> None:
    mapped = map_pg_type("sales.float_span", type_name="float_span", typtype="r")
    assert mapped.shape is TypeShape.RANGE


def test_composite_types_are_variant_objects() -> None:
    mapped = map_pg_type("sales.address", type_name="address", typtype="c")
    assert (mapped.kind, mapped.sql, mapped.shape) == (ValueKind.JSON, "VARIANT", TypeShape.COMPOSITE)


EXTENSION_TYPES = [
    ("hstore", "hstore", "hstore", (ValueKind.JSON, "VARIANT", TypeShape.HSTORE)),
    ("citext", "citext", "citext", TEXT),
    ("ltree", "ltree", "ltree", TEXT),
    ("lquery", "lquery", "ltree", TEXT),
    ("ltxtquery", "ltxtquery", "ltree", TEXT),
    # not in the contract: installed later, or unknown to pgsnow
    ("cube", "cube", "cube", FALLBACK),
    ("seg", "seg", "seg", FALLBACK),
    ("isbn13", "isbn13", "isn", FALLBACK),
    # a schema-qualified name (the extension's schema is not on the search_path) maps the same
    ("ext.ltree", "ltree", "ltree", TEXT),
    # a type of another extension that happens to share a name is not trusted to be hstore
    ("hstore", "hstore", "not_hstore", FALLBACK),
]


@pytest.mark.parametrize(
    ("base_type", "type_name", "extension", "expected"),
    EXTENSION_TYPES,
    ids=[f"{r[2]}.{r[0]}" for r in EXTENSION_TYPES],
)
def test_extension_types(
    base_type: str, type_name: str, extension: str, expected: tuple[ValueKind, str, TypeShape]
) -> None:
    mapped = map_pg_type(base_type, type_name=type_name, typtype="b", extension=extension)
    assert (mapped.kind, mapped.sql, mapped.shape) == expected


@pytest.mark.parametrize("base_type", ["timeline", "names_list", "character_set", "pseudo"])
def test_a_user_type_whose_name_starts_like_a_built_in_one_is_not_taken_for_it(base_type: str) -> None:
    mapped = map_pg_type(base_type, type_name=base_type, typtype="b")
    assert mapped.shape is TypeShape.FALLBACK


def test_scale_from_data_covers_unbounded_and_over_wide_numeric_only() -> None:
    assert scale_from_data("numeric") and scale_from_data("numeric(40, 2)")
    assert scale_from_data("numeric(37,-2)")
    assert not scale_from_data("numeric(38,2)") and not scale_from_data("integer")


def test_a_column_shape_round_trips_and_older_columns_read_as_scalar() -> None:
    ranged = Column.from_types("span", "int4range", "int4range", map_pg_type("int4range", typtype="r"), True)
    assert column_from_json(column_to_json(ranged)) == ranged
    plain = Column.from_types("id", "integer", "integer", map_pg_type("integer"), False)
    written = column_to_json(plain)
    assert "shape" not in written  # what a manifest from before shapes holds
    assert column_from_json(written) == plain


def test_manifest_warnings_round_trip_and_older_manifests_have_none() -> None:
    from pgsnow.identifiers import TableRef
    from pgsnow.keys import FileFormat
    from pgsnow.manifest import RunManifest, RunState

    column = Column.from_types(
        "box", "cube", "cube", map_pg_type("cube", type_name="cube", extension="cube"), True
    )
    manifest = RunManifest(
        run_id="20260101T000000000000Z",
        table=TableRef("public", "shapes"),
        mode="full",
        file_format=FileFormat.CSV,
        columns=(column,),
        primary_key=(),
        state=RunState.EXTRACTING,
        started_at="2026-01-01T00:00:00Z",
        warnings=("column 'box' of public.shapes has type 'cube', which is not in pgsnow's type contract",),
    )
    assert RunManifest.from_json(manifest.to_json()) == manifest
    older = json.loads(manifest.to_json())
    del older["warnings"]
    assert RunManifest.from_json(json.dumps(older)).warnings == ()


@pytest.mark.parametrize(
    ("spelling", "same_as"),
    [
        ("time", "time without time zone"),
        ("time(3)", "time without time zone"),
        ("timestamptz", "timestamp with time zone"),
        ("timestamp(6)", "timestamp without time zone"),
        ("int", "integer"),
        ("int8", "bigint"),
        ("float8", "double precision"),
        ("varchar(10)", "character varying"),
        ("bool", "boolean"),
    ],
)
def test_short_spellings_map_like_format_type_names(spelling: str, same_as: str) -> None:
    assert map_pg_type(spelling) == map_pg_type(same_as)
