"""PostGIS ``geometry`` / ``geography`` replicated as Snowflake ``GEOMETRY`` / ``GEOGRAPHY``, SRID kept,
in CSV and in Parquet, through the whole local pipeline.

PostGIS is Debian's ``postgresql-15-postgis-3`` (``.ci/run`` installs it) in the loopback server;
where the server is the embedded pgserver, which has no PostGIS, or the package is missing, the
module skips and says so. Every cell Snowflake holds is compared with PostgreSQL's: the SRID and
the exact 2D WKB; ``pgsnow verify`` must call each table equal and find a moved point. Values
Snowflake cannot hold (Z/M coordinates, invalid shapes, a geography in another SRID) are refused
before anything is staged, or staged as NULL under the ``null`` value policy.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from psycopg2 import sql

from pgsnow.demo.pipeline import replicate_table
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import SNOWFLAKE_DATABASE, load_function_handler
from pgsnow.postgres import connect, describe_table
from pgsnow.runtime import reset_runtime

if TYPE_CHECKING:
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

SPATIAL_DDL = (
    "id integer PRIMARY KEY, shape geometry, located geometry(Point, 3857), "
    "place geography(Point, 4326), area geography, shapes geometry[]"
)
ROWS = [
    (
        1,
        "SRID=4326;POLYGON((0 0,1 0,1 1,0 0))",
        "SRID=3857;POINT(1.5 -2.25)",
        "POINT(-122.4194 37.7749)",
        "POLYGON((0 0,0 1,1 1,1 0,0 0))",
        ["POINT(1 2)"],
    ),
    (2, "POINT EMPTY", None, None, None, None),
    (
        3,
        "GEOMETRYCOLLECTION(POINT(1 2),LINESTRING(0 0,1 1))",
        "SRID=3857;POINT(0.1 0.2)",
        "POINT(180 -90)",
        "MULTIPOINT((1 2),(3 4))",
        [],
    ),
    (
        4,
        "SRID=2056;MULTIPOLYGON(((2600000 1200000,2600010 1200000,2600010 1200010,2600000 1200000)))",
        None,
        "POINT(0.123456789012 -0.5)",
        None,
        None,
    ),
    (5, None, None, None, None, None),
]


@pytest.fixture(scope="module")
def postgis(pipeline: PipelineHarness) -> PipelineHarness:
    """conftest's ``pipeline`` on a source server that has PostGIS (or the module skips, saying why)."""
    with pipeline.setup_conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'")
        if cur.fetchone() is None:
            cur.execute("SELECT version()")
            pytest.skip(
                f"PostGIS is not available in this PostgreSQL ({cur.fetchone()[0].split(',')[0]}): install "
                "Debian's postgresql-15-postgis-3 for the loopback server (.ci/run does); the embedded "
                "pgserver has no PostGIS"
            )
        cur.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    return pipeline


@pytest.fixture(scope="module")
def replicated(postgis: PipelineHarness) -> dict[FileFormat, TableRef]:
    return postgis.replicate_in_each_format(
        "spatial", SPATIAL_DDL, sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s::geometry[])"), ROWS
    )


SPATIAL_COLUMNS = ("shape", "located", "place", "area")


def source_cells(harness: PipelineHarness, table: TableRef) -> dict[int, tuple[Any, ...]]:
    """id -> (SRID, WKB hex) per spatial column, and the array's GeoJSON documents."""
    cells = sql.SQL(", ").join(
        sql.SQL("ST_SRID({0}), encode(ST_AsBinary({0}, 'NDR'), 'hex')").format(sql.Identifier(c))
        for c in SPATIAL_COLUMNS
    )
    with harness.setup_conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT id, {}, to_jsonb(shapes)::text FROM {} ORDER BY id").format(
                cells, sql.Identifier(table.schema, table.table)
            )
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


def target_cells(harness: PipelineHarness, table: TableRef) -> dict[int, tuple[Any, ...]]:
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    cells = ", ".join(
        f'ST_SRID("{c.upper()}"), LOWER(HEX_ENCODE(ST_ASWKB("{c.upper()}")))' for c in SPATIAL_COLUMNS
    )
    with harness.sf_conn.cursor() as cur:
        cur.execute(f'SELECT "ID", {cells}, "SHAPES" FROM {target} ORDER BY "ID"')
        return {int(row[0]): row[1:] for row in cur.fetchall()}


def test_spatial_columns_map_to_geometry_and_geography(postgis: PipelineHarness) -> None:
    table = postgis.table("spatial_described")
    postgis.create_table(table, SPATIAL_DDL)
    conn = connect(postgis.source_dsn)
    try:
        schema = describe_table(conn, table)
    finally:
        conn.close()
    assert [(c.name, c.kind.value, c.snowflake_type) for c in schema.columns] == [
        ("id", "integer", "NUMBER(38,0)"),
        ("shape", "geometry", "GEOMETRY"),
        ("located", "geometry", "GEOMETRY"),
        ("place", "geography", "GEOGRAPHY"),
        ("area", "geography", "GEOGRAPHY"),
        ("shapes", "json", "VARIANT"),  # an array of geometries: a VARIANT of their GeoJSON
    ]


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=lambda f: f.value)
def test_every_spatial_cell_arrives_exactly_with_its_srid(
    postgis: PipelineHarness, replicated: dict[FileFormat, TableRef], file_format: FileFormat
) -> None:
    table = replicated[file_format]
    source = source_cells(postgis, table)
    target = target_cells(postgis, table)
    assert sorted(target) == sorted(source) == [row[0] for row in ROWS]
    for key, expected in source.items():
        *spatial, shapes = target[key]
        *expected_spatial, expected_shapes = expected
        assert [None if v is None else int(v) if i % 2 == 0 else v for i, v in enumerate(spatial)] == list(
            expected_spatial
        ), key
        assert (json.loads(shapes) if shapes is not None else None) == (
            json.loads(expected_shapes) if expected_shapes is not None else None
        ), key
    with postgis.sf_conn.cursor() as cur:  # loaded by the COPY
        cur.execute(
            f"SELECT COUNT(*) FROM {quote_qualified(SNOWFLAKE_DATABASE, 'INFORMATION_SCHEMA', 'LOAD_HISTORY')} "
            "WHERE FILE_NAME LIKE %s",  # the COPY loads a merge work table: found by the file's path
            (f"%/{table.schema}/{table.table}/%",),
        )
        assert cur.fetchone() == (1,)
    # the SRIDs themselves, not only their agreement: kept as PostgreSQL has them
    assert [target[k][0] for k in (1, 2, 3, 4, 5)] == [4326, 0, 0, 2056, None]
    assert target[1][2] == 3857 and target[1][4] == 4326 and target[1][6] == 4326


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=lambda f: f.value)
def test_verify_calls_replicated_geometries_equal_and_finds_a_moved_point(
    postgis: PipelineHarness, replicated: dict[FileFormat, TableRef], file_format: FileFormat
) -> None:
    table = replicated[file_format]
    result = postgis.verify(table)
    assert result.ok, result
    assert result.source_rows == result.target_rows == len(ROWS)
    source = sql.Identifier(table.schema, table.table)
    postgis.run_sql(
        sql.SQL("UPDATE {} SET located = 'SRID=3857;POINT(1.5 -2.2500001)' WHERE id = 1").format(source)
    )
    try:
        moved = postgis.verify(table)
        assert not moved.ok
        assert moved.different == ["1"], moved
    finally:
        postgis.run_sql(
            sql.SQL("UPDATE {} SET located = 'SRID=3857;POINT(1.5 -2.25)' WHERE id = 1").format(source)
        )
    postgis.run_sql(sql.SQL("UPDATE {} SET shape = ST_SetSRID(shape, 3857) WHERE id = 4").format(source))
    try:
        assert postgis.verify(table).different == ["4"]  # only the SRID changed: still found
    finally:
        postgis.run_sql(sql.SQL("UPDATE {} SET shape = ST_SetSRID(shape, 2056) WHERE id = 4").format(source))


@pytest.mark.parametrize(
    ("column_sql", "value", "problem"),
    [
        ("geometry", "POINT Z (1 2 3)", "Z or M coordinates"),
        ("geometry", "POINT M (1 2 3)", "Z or M coordinates"),
        ("geometry", "POLYGON((0 0,1 1,1 0,0 1,0 0))", "invalid shape"),
        ("geography", "SRID=4269;POINT(1 2)", "SRID is not 4326"),
    ],
    ids=["3d-point", "measured-point", "bow-tie", "nad83-geography"],
)
def test_a_value_snowflake_cannot_hold_is_refused_before_staging(
    postgis: PipelineHarness, column_sql: str, value: str, problem: str
) -> None:
    table = postgis.table(f"spatial_refused_{abs(hash((column_sql, value))) % 10**8}")
    postgis.create_table(table, f"id integer PRIMARY KEY, g {column_sql}")
    target = sql.Identifier(table.schema, table.table)
    postgis.run_sql(sql.SQL("INSERT INTO {} VALUES (1, 'POINT(0 0)'), (2, %s)").format(target), (value,))
    with pytest.raises(PermanentError, match=rf"column 'g' .*{problem}.* at primary key \(id\)=\(2\)"):
        postgis.extract(table)
    # nothing was staged for it
    listed = postgis.s3().list_objects_v2(
        Bucket=postgis.bucket, Prefix=f"{postgis.prefix}/{table.schema}/{table.table}/"
    )
    assert [o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("manifest.json")] == []


def test_the_null_policy_stages_a_3d_point_as_null(postgis: PipelineHarness) -> None:
    table = postgis.table("spatial_policy")
    postgis.create_table(table, "id integer PRIMARY KEY, g geometry")
    postgis.run_sql(
        sql.SQL("INSERT INTO {} VALUES (1, 'POINT(1 2)'), (2, 'POINT Z (1 2 3)')").format(
            sql.Identifier(table.schema, table.table)
        )
    )
    stack = postgis.stack
    dispatcher = SqsDispatcher(stack.aws, stack.resources.queue_url, load_function_handler("loader"))
    options = json.dumps({f"{table.schema}.{table.table}": {"value_policy": "null"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(stack.env, "PGSNOW_TABLE_OPTIONS", options)
        replicate_table(stack, table, FileFormat.CSV, dispatcher)
    cells = target_cells_of(postgis, table)
    assert cells == [(1, 0, "0101000000000000000000f03f0000000000000040"), (2, None, None)]


def target_cells_of(harness: PipelineHarness, table: TableRef) -> list[tuple[Any, ...]]:
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with harness.sf_conn.cursor() as cur:
        cur.execute(
            f'SELECT "ID", ST_SRID("G"), LOWER(HEX_ENCODE(ST_ASWKB("G"))) FROM {target} ORDER BY "ID"'
        )
        return [(int(r[0]), None if r[1] is None else int(r[1]), r[2]) for r in cur.fetchall()]


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=lambda f: f.value)
def test_the_demo_comparison_finds_every_cell_equal(
    postgis: PipelineHarness, replicated: dict[FileFormat, TableRef], file_format: FileFormat
) -> None:
    comparison = postgis.compare_cells(replicated[file_format])
    assert comparison.ok, comparison.detail
    assert comparison.source_rows == comparison.snowflake_rows == len(ROWS)


def test_the_insert_load_method_converts_geometries_like_the_copy(
    postgis: PipelineHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LOAD_METHOD=insert binds each staged text and converts it with TO_GEOMETRY/TO_GEOGRAPHY in
    # the INSERT, as the COPY does: the same SRIDs and WKB arrive.
    table = postgis.table("spatial_inserted")
    postgis.create_table(table, SPATIAL_DDL)
    for row in ROWS:
        postgis.run_sql(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s::geometry[])").format(
                sql.Identifier(table.schema, table.table)
            ),
            row,
        )
    stack = postgis.stack
    dispatcher = SqsDispatcher(stack.aws, stack.resources.queue_url, load_function_handler("loader"))
    monkeypatch.setitem(stack.env, "LOAD_METHOD", "insert")
    reset_runtime()
    try:
        replicate_table(stack, table, FileFormat.CSV, dispatcher)
    finally:
        monkeypatch.delitem(stack.env, "LOAD_METHOD")
        reset_runtime()
    with postgis.sf_conn.cursor() as cur:  # inserted, not copied: no COPY load history for it
        cur.execute(
            f"SELECT COUNT(*) FROM {quote_qualified(SNOWFLAKE_DATABASE, 'INFORMATION_SCHEMA', 'LOAD_HISTORY')} "
            "WHERE FILE_NAME LIKE %s",  # the COPY loads a merge work table: found by the file's path
            (f"%/{table.schema}/{table.table}/%",),
        )
        assert cur.fetchone() == (0,)
    assert postgis.ledger_keys(table)  # and recorded as loaded
    source = source_cells(postgis, table)
    target = target_cells(postgis, table)
    assert sorted(target) == sorted(source)
    for key, expected in source.items():
        assert [
            None if v is None else int(v) if i % 2 == 0 else v for i, v in enumerate(target[key][:-1])
        ] == list(expected[:-1]), key
    assert postgis.verify(table).ok


def test_a_second_run_merges_into_the_same_column_types(
    postgis: PipelineHarness, replicated: dict[FileFormat, TableRef]
) -> None:
    # The existing table's INFORMATION_SCHEMA types are compared with the source's (schema
    # evolution) before loading again: the same types, no ALTER, no error; a merge run goes
    # through a work table of the same types and keeps one row per key.
    table = replicated[FileFormat.CSV]
    postgis.merge_again_in_parquet(table)
    assert postgis.target_count(table) == len(ROWS)
    assert len(postgis.ledger_keys(table)) == 2
    assert postgis.verify(table).ok
