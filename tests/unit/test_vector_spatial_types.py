"""pgvector and PostGIS types: the type contract, the loader's SQL, and the local Snowflake's
translations (run on DuckDB with the spatial extension, as the local Snowflake runs them)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import duckdb
import pytest
import sqlglot

from pgsnow.local import sf_extension_types
from pgsnow.local.duckdb_setup import load_spatial
from pgsnow.local.sf_copy_sql import (
    GEOGRAPHY_STORAGE,
    GEOMETRY_STORAGE,
    CastTo,
    CopySyntaxError,
    FieldRef,
    FileType,
    ParquetFieldRef,
    ParseJson,
    SqlType,
    TypeFamily,
    compile_select_expr,
    convert_to_column_sql,
    duck_type,
    parse_copy,
)
from pgsnow.manifest import Column
from pgsnow.schema_evolution import ExistingColumn, plan_table_changes
from pgsnow.snowflake.load_sql import LoadColumn, build_insert_rows, load_columns_from_table
from pgsnow.typemap import ValueKind, map_pg_type

# --- the type contract ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pg_type", "kind", "snowflake_type"),
    [
        ("vector(3)", ValueKind.VECTOR, "VECTOR(FLOAT, 3)"),
        ("vector(4096)", ValueKind.VECTOR, "VECTOR(FLOAT, 4096)"),
        ("vector(4097)", ValueKind.JSON, "VARIANT"),  # beyond Snowflake's largest VECTOR
        ("vector", ValueKind.JSON, "VARIANT"),  # no dimension: no VECTOR type to create
        ("halfvec(8)", ValueKind.JSON, "VARIANT"),
        ("sparsevec(5)", ValueKind.TEXT, "VARCHAR(134217728)"),
        ("vector(3)[]", ValueKind.JSON, "VARIANT"),
        ("geometry", ValueKind.GEOMETRY, "GEOMETRY"),
        ("geometry(Point,4326)", ValueKind.GEOMETRY, "GEOMETRY"),
        ("geometry(MultiPolygonZ, 2056)", ValueKind.GEOMETRY, "GEOMETRY"),
        ("geography", ValueKind.GEOGRAPHY, "GEOGRAPHY"),
        ("geography(Point,4326)", ValueKind.GEOGRAPHY, "GEOGRAPHY"),
        ("geometry[]", ValueKind.JSON, "VARIANT"),
    ],
)
def test_extension_types_map(pg_type: str, kind: ValueKind, snowflake_type: str) -> None:
    mapped = map_pg_type(pg_type)
    assert (mapped.kind, mapped.sql) == (kind, snowflake_type)


def test_insert_method_converts_like_the_copy() -> None:
    columns = [
        LoadColumn("v", "V", ValueKind.VECTOR, "VECTOR(FLOAT, 3)"),
        LoadColumn("g", "G", ValueKind.GEOMETRY, "GEOMETRY"),
        LoadColumn("h", "H", ValueKind.GEOGRAPHY, "GEOGRAPHY"),
    ]
    sql = build_insert_rows(("D", "S", "T"), columns)
    assert (
        'SELECT PARSE_JSON("COLUMN1")::ARRAY::VECTOR(FLOAT, 3), TO_GEOMETRY("COLUMN2"), TO_GEOGRAPHY("COLUMN3")'
        in sql
    )


def test_an_existing_geospatial_table_converts_its_staged_text() -> None:
    columns = load_columns_from_table([("G", "GEOMETRY"), ("H", "GEOGRAPHY")])
    assert [(c.kind, c.snowflake_type) for c in columns] == [
        (ValueKind.GEOMETRY, "GEOMETRY"),
        (ValueKind.GEOGRAPHY, "GEOGRAPHY"),
    ]


def test_schema_evolution_reads_a_vector_column_as_the_same_type() -> None:
    wanted = Column.from_types("v", "vector(3)", "vector(3)", map_pg_type("vector(3)"), True)
    existing = [ExistingColumn("V", "VECTOR", None, None, None)]
    assert plan_table_changes("s.t", existing, [wanted]).empty


# --- the local Snowflake --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def duck() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    load_spatial(connection)
    yield connection
    connection.close()


VARIANT = SqlType(TypeFamily.VARIANT, "JSON")
TEXT = SqlType(TypeFamily.TEXT, "VARCHAR")


def run_csv_item(duck: duckdb.DuckDBPyConnection, item: object, field: str | None, column: SqlType) -> object:
    """The value a CSV field becomes through one COPY select item and the column's conversion."""
    compiled = compile_select_expr(item, file_type=FileType.CSV, csv_columns=("f",))  # type: ignore[arg-type]
    value_sql = convert_to_column_sql(compiled, column)
    row = duck.execute(f"SELECT {value_sql} FROM (SELECT CAST(? AS VARCHAR) AS f)", [field]).fetchone()
    assert row is not None
    return row[0]


def test_the_loaders_copy_items_parse() -> None:
    copy = parse_copy(
        'COPY INTO "D"."S"."T" ("V", "G", "H") FROM (SELECT PARSE_JSON($1)::ARRAY::VECTOR(FLOAT, 3), '
        'TO_GEOMETRY($2), TO_GEOGRAPHY($3) FROM @"D"."C"."S"/s/t/) FILES = (\'f.csv.gz\') '
        "FILE_FORMAT = (TYPE = CSV SKIP_HEADER = 1)"
    )
    assert copy is not None and copy.select is not None
    vector, geometry, geography = copy.select
    assert vector == CastTo(CastTo(ParseJson(FieldRef(1)), VARIANT), SqlType(TypeFamily.VECTOR, "FLOAT[3]"))
    assert geometry == CastTo(FieldRef(2), SqlType(TypeFamily.GEOMETRY, GEOMETRY_STORAGE))
    assert geography == CastTo(FieldRef(3), SqlType(TypeFamily.GEOGRAPHY, GEOGRAPHY_STORAGE))
    parquet = parse_copy(
        'COPY INTO "D"."S"."T" ("G") FROM (SELECT TO_GEOMETRY($1:"g"::VARCHAR) FROM @"D"."C"."S"/s/t/) '
        "FILES = ('f.parquet') FILE_FORMAT = (TYPE = PARQUET)"
    )
    assert parquet is not None and parquet.select == (
        CastTo(CastTo(ParquetFieldRef("g"), TEXT), SqlType(TypeFamily.GEOMETRY, GEOMETRY_STORAGE)),
    )


@pytest.mark.parametrize(
    ("type_sql", "message"),
    [
        ("VECTOR(FLOAT, 0)", "outside 1..4096"),
        ("VECTOR(FLOAT, 4097)", "outside 1..4096"),
        ("VECTOR(STRING, 3)", "INT or FLOAT"),
    ],
)
def test_vector_types_snowflake_refuses_are_refused(type_sql: str, message: str) -> None:
    with pytest.raises(CopySyntaxError, match=message):
        parse_copy(
            f"COPY INTO T FROM (SELECT PARSE_JSON($1)::{type_sql} FROM @S/) FILE_FORMAT = (TYPE = CSV)"
        )


VECTOR_3 = SqlType(TypeFamily.VECTOR, "FLOAT[3]")
VECTOR_ITEM = CastTo(CastTo(ParseJson(FieldRef(1)), VARIANT), VECTOR_3)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("[0.1,-2.5,3]", (0.10000000149011612, -2.5, 3.0)),  # float4, as Snowflake's VECTOR(FLOAT, n)
        ("[3.4028235e+38,1e-45,-0]", (3.4028234663852886e38, 1.401298464324817e-45, -0.0)),
        (None, None),
    ],
)
def test_a_json_array_of_n_numbers_becomes_the_vector(
    duck: duckdb.DuckDBPyConnection, field: str | None, expected: tuple[float, ...] | None
) -> None:
    value = run_csv_item(duck, VECTOR_ITEM, field, VECTOR_3)
    assert (tuple(value) if value is not None else None) == expected  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "field",
    ["[1,2]", "[1,2,3,4]", "[]", '[1,"2",3]', "[1,null,3]", "[1,true,3]", "[1e39,1,1]", '{"a":1}', "7", "x"],
    ids=[
        "short",
        "long",
        "empty",
        "string",
        "null",
        "boolean",
        "beyond-float4",
        "object",
        "number",
        "no-json",
    ],
)
def test_anything_else_is_a_conversion_error_never_truncated_or_padded(
    duck: duckdb.DuckDBPyConnection, field: str
) -> None:
    # NULL from a non-NULL field is what the local COPY reports as the row's conversion error.
    assert run_csv_item(duck, VECTOR_ITEM, field, VECTOR_3) is None


GEOMETRY = SqlType(TypeFamily.GEOMETRY, GEOMETRY_STORAGE)
GEOGRAPHY = SqlType(TypeFamily.GEOGRAPHY, GEOGRAPHY_STORAGE)
# PostGIS's own EWKB hex (geometry::text) of each shape.
POINT_4326 = "0101000020E6100000000000000000F03F0000000000000040"  # SRID=4326;POINT(1 2)
POINT_3857 = "0101000020110F0000000000000000F83F0000000000000240"  # SRID=3857;POINT(1.5 2.25)
POINT_NO_SRID = "0101000000000000000000F03F0000000000000040"  # POINT(1 2)
EMPTY_POINT = "0101000000000000000000F87F000000000000F87F"  # POINT EMPTY
POINT_Z = "01010000A0E6100000000000000000F03F00000000000000400000000000000840"  # SRID=4326;POINT Z (1 2 3)
POINT_M = "0101000060E6100000000000000000F03F00000000000000400000000000000840"  # SRID=4326;POINT M (1 2 3)
BOW_TIE = (  # POLYGON((0 0,1 1,1 0,0 1,0 0)): self-intersecting
    "0103000000010000000500000000000000000000000000000000000000000000000000F03F000000000000F03F"
    "000000000000F03F00000000000000000000000000000000000000000000F03F00000000000000000000000000000000"
)
POINT_4269 = "0101000020AD100000000000000000F03F0000000000000040"  # SRID=4269;POINT(1 2)
FAR_POINT_4326 = "0101000020E610000000000000000069400000000000000000"  # SRID=4326;POINT(200 0)


def geospatial(duck: duckdb.DuckDBPyConnection, field: str | None, target: SqlType) -> object:
    return run_csv_item(duck, CastTo(FieldRef(1), target), field, target)


@pytest.mark.parametrize(
    ("field", "srid", "wkb"),
    [
        (POINT_4326, 4326, POINT_NO_SRID),
        (POINT_3857, 3857, "0101000000000000000000F83F0000000000000240"),
        (POINT_NO_SRID, 0, POINT_NO_SRID),
        (POINT_4326.lower(), 4326, POINT_NO_SRID),
        (EMPTY_POINT, 0, EMPTY_POINT),
    ],
)
def test_geometry_keeps_the_ewkb_srid_and_the_2d_wkb(
    duck: duckdb.DuckDBPyConnection, field: str, srid: int, wkb: str
) -> None:
    assert geospatial(duck, field, GEOMETRY) == {"geometry_srid": srid, "wkb": bytes.fromhex(wkb)}


@pytest.mark.parametrize(
    "field",
    [POINT_Z, POINT_M, BOW_TIE, "POINT(1 2)", "zz", "0101", "0001000000" + "3FF0000000000000" * 2],
    ids=["z", "m", "invalid-shape", "wkt-not-read-locally", "not-hex", "truncated", "big-endian"],
)
def test_geometry_refuses_what_snowflake_refuses_or_the_emulator_cannot_read(
    duck: duckdb.DuckDBPyConnection, field: str
) -> None:
    assert geospatial(duck, field, GEOMETRY) is None


def test_a_coordinate_beyond_14_decimal_places_is_refused_not_rounded(
    duck: duckdb.DuckDBPyConnection,
) -> None:
    # 0.1 + 0.2 = 0.30000000000000004: 17 decimal places, which Snowflake would round.
    x = struct.pack("<d", 0.1 + 0.2).hex().upper()
    assert geospatial(duck, "0101000000" + x + "0000000000000000", GEOMETRY) is None
    fine = struct.pack("<d", 0.3).hex().upper()
    assert geospatial(duck, "0101000000" + fine + "0000000000000000", GEOMETRY) is not None


def test_geography_is_wgs84_only(duck: duckdb.DuckDBPyConnection) -> None:
    assert geospatial(duck, POINT_4326, GEOGRAPHY) == {
        "geography_srid": 4326,
        "wkb": bytes.fromhex(POINT_NO_SRID),
    }
    assert geospatial(duck, POINT_NO_SRID, GEOGRAPHY) == {  # WKB without an SRID is WGS 84
        "geography_srid": 4326,
        "wkb": bytes.fromhex(POINT_NO_SRID),
    }
    assert geospatial(duck, POINT_4269, GEOGRAPHY) is None
    assert geospatial(duck, POINT_3857, GEOGRAPHY) is None
    assert geospatial(duck, FAR_POINT_4326, GEOGRAPHY) is None  # longitude 200


def test_storage_types_are_recognised_in_the_catalog() -> None:
    assert duck_type("FLOAT[3]") == SqlType(TypeFamily.VECTOR, "FLOAT[3]")
    assert duck_type("INTEGER[16]") == SqlType(TypeFamily.VECTOR, "INTEGER[16]")
    assert duck_type(GEOMETRY_STORAGE) == GEOMETRY
    assert duck_type(GEOGRAPHY_STORAGE) == GEOGRAPHY
    assert duck_type("FLOAT").family is TypeFamily.FLOAT


def test_fakesnow_writes_the_storage_types() -> None:
    sf_extension_types.install()
    sf_extension_types.install()  # idempotent
    statement = sqlglot.parse_one(
        'CREATE TABLE T ("V" VECTOR(FLOAT, 3), "I" VECTOR(INT, 2), "G" GEOMETRY, "H" GEOGRAPHY)',
        read="snowflake",
    )
    assert statement.sql(dialect="duckdb") == (
        f'CREATE TABLE T ("V" FLOAT[3], "I" INTEGER[2], "G" {GEOMETRY_STORAGE}, "H" {GEOGRAPHY_STORAGE})'
    )


def test_information_schema_names_the_snowflake_types() -> None:
    view = sf_extension_types.columns_view_sql()
    assert view.startswith("\ncreate or replace view _fs_global._fs_information_schema._fs_columns")
    assert "then 'VECTOR'" in view and "then 'GEOMETRY'" in view and "then 'GEOGRAPHY'" in view


def test_session_accessors_read_the_stored_struct(duck: duckdb.DuckDBPyConnection) -> None:
    session = duck.cursor()
    sf_extension_types.prepare_session(session)
    stored = geospatial(duck, POINT_3857, GEOMETRY)
    row = session.execute(
        "SELECT ST_SRID(g), hex(ST_ASWKB(g)), hex(ST_ASBINARY(g)) FROM (SELECT ? AS g)", [stored]
    ).fetchone()
    assert row == (
        3857,
        "0101000000000000000000F83F0000000000000240",
        "0101000000000000000000F83F0000000000000240",
    )
    session.close()


def test_a_raw_field_never_loads_into_a_vector_column(duck: duckdb.DuckDBPyConnection) -> None:
    # COPY without the ARRAY cast (e.g. a hand-dropped file): Snowflake cannot load a VECTOR
    # directly from a file, so even a well-formed array is the row's conversion error locally.
    assert run_csv_item(duck, FieldRef(1), "[1,2,3]", VECTOR_3) is None
