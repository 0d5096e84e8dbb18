"""pgvector's ``vector(n)`` replicated as Snowflake's ``VECTOR(FLOAT, n)``, in CSV and in Parquet.

pgvector has no Debian package here; the embedded ``pgserver`` (PostgreSQL 16) ships it, so this
module starts its own embedded server in a temporary directory, even when the loopback server
answers, and runs the whole pipeline (extractor, moto S3 and SQS, loader, the local Snowflake)
against it. Every cell Snowflake holds is compared with PostgreSQL's value element by element as
32-bit floats (pgvector stores float4, so does Snowflake's VECTOR(FLOAT, n)), and
``pgsnow verify`` must call each table equal.
"""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import snowflake.connector.errors
from pipeline_support import pipeline_harness
from psycopg2 import sql

from pgsnow.config import Component
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat, data_key, parse_data_key
from pgsnow.local.postgres import LocalPostgres, start_embedded_postgres
from pgsnow.local.stack import SNOWFLAKE_DATABASE
from pgsnow.postgres import connect, describe_table
from pgsnow.snowflake.load_sql import LoadColumn, build_copy_into
from pgsnow.typemap import ValueKind

if TYPE_CHECKING:
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

VECTOR_DDL = (
    "id integer PRIMARY KEY, embedding vector(3) NOT NULL, maybe vector(2), unbounded vector, wide vector(4097), "
    "many vector(2)[]"
)
# pgserver's pgvector is 0.6.2: no halfvec or sparsevec yet (their mapping: tests/unit/test_vector_spatial_types.py).
# Values chosen to test float4 exactly: shortest texts that are not exact binary fractions, the
# largest and smallest normal float4, a subnormal, negative zero, many significant digits.
# 4097 elements: one more than Snowflake's VECTOR holds, so a VARIANT array.
WIDE_VECTOR = "[" + ",".join(str(i / 8) for i in range(-2048, 2049)) + "]"
ROWS = [
    (1, "[0.1,-2.5,3]", "[1,2]", "[1,2,3,4]", None, '{"[1,2]","[0.5,-1e-7]"}'),
    (2, "[3.4028235e+38,-1.1754944e-38,1e-45]", None, None, None, "{}"),
    (3, "[-0,0.33333334,1.2345679]", "[100000000,-7e-7]", "[0.25]", WIDE_VECTOR, None),
]


def float32(value: float) -> float:
    """The float4 nearest to ``value``, as a Python float (a double holds every float4 exactly)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


@pytest.fixture(scope="module")
def embedded_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """An embedded pgserver of this module's own, where pgvector exists."""
    server = start_embedded_postgres(tmp_path_factory.mktemp("pgvector") / "pgdata")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vector_pipeline(
    embedded_postgres: LocalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineHarness]:
    with pipeline_harness(
        "pgsnow_vector", tmp_path_factory.mktemp("vector"), source_admin_dsn=embedded_postgres.dsn
    ) as harness:
        harness.run_sql("CREATE EXTENSION IF NOT EXISTS vector")
        yield harness


@pytest.fixture(scope="module")
def replicated(vector_pipeline: PipelineHarness) -> dict[FileFormat, TableRef]:
    return vector_pipeline.replicate_in_each_format(
        "vectors", VECTOR_DDL, sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)"), ROWS
    )


def source_vectors(harness: PipelineHarness, table: TableRef) -> dict[int, tuple[Any, ...]]:
    """id -> (embedding, maybe) as float8[] of the stored float4 elements, and the other columns' text."""
    with harness.setup_conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "SELECT id, embedding::real[]::float8[], maybe::real[]::float8[], unbounded::text, "
                "wide::text, to_jsonb(many)::text FROM {} ORDER BY id"
            ).format(sql.Identifier(table.schema, table.table))
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


def target_rows(harness: PipelineHarness, table: TableRef) -> dict[int, tuple[Any, ...]]:
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with harness.sf_conn.cursor() as cur:
        cur.execute(
            'SELECT "ID", "EMBEDDING"::ARRAY, "MAYBE"::ARRAY, "UNBOUNDED", "WIDE", "MANY" '
            f'FROM {target} ORDER BY "ID"'
        )
        return {int(row[0]): row[1:] for row in cur.fetchall()}


def test_vector_columns_map_to_vector_float_or_a_documented_fallback(
    vector_pipeline: PipelineHarness,
) -> None:
    table = vector_pipeline.table("vectors_described")
    vector_pipeline.create_table(table, VECTOR_DDL)
    conn = connect(vector_pipeline.source_dsn)
    try:
        schema = describe_table(conn, table)
    finally:
        conn.close()
    assert [(c.name, c.kind.value, c.snowflake_type) for c in schema.columns] == [
        ("id", "integer", "NUMBER(38,0)"),
        ("embedding", "vector", "VECTOR(FLOAT, 3)"),
        ("maybe", "vector", "VECTOR(FLOAT, 2)"),
        ("unbounded", "json", "VARIANT"),  # no dimension: no VECTOR type to create
        ("wide", "json", "VARIANT"),  # beyond Snowflake's 4096
        ("many", "json", "VARIANT"),  # an array of vectors: a VARIANT array of their texts
    ]


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=lambda f: f.value)
def test_every_vector_cell_arrives_exactly(
    vector_pipeline: PipelineHarness, replicated: dict[FileFormat, TableRef], file_format: FileFormat
) -> None:
    table = replicated[file_format]
    source = source_vectors(vector_pipeline, table)
    target = target_rows(vector_pipeline, table)
    assert sorted(target) == sorted(source) == [1, 2, 3]
    with vector_pipeline.sf_conn.cursor() as cur:
        cur.execute(
            f'SELECT "DATA_TYPE" FROM {quote_qualified(SNOWFLAKE_DATABASE, "INFORMATION_SCHEMA", "COLUMNS")} '
            'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s AND "COLUMN_NAME" = %s',
            (table.snowflake_schema, table.snowflake_table, "EMBEDDING"),
        )
        assert cur.fetchall() == [("VECTOR",)]
    for key, (embedding, maybe, unbounded, wide, many) in source.items():
        got_embedding, got_maybe, got_unbounded, got_wide, got_many = target[key]
        # element-wise as float4: every element is exactly PostgreSQL's stored float4
        assert json.loads(got_embedding) == embedding, key
        assert [float32(x) for x in json.loads(got_embedding)] == embedding, key
        assert (json.loads(got_maybe) if got_maybe is not None else None) == maybe, key
        assert (json.loads(got_unbounded) if got_unbounded is not None else None) == (
            json.loads(unbounded) if unbounded is not None else None
        ), key
        assert (json.loads(got_wide) if got_wide is not None else None) == (
            json.loads(wide) if wide is not None else None
        ), key
        assert (json.loads(got_many) if got_many is not None else None) == (
            json.loads(many) if many is not None else None
        ), key


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=lambda f: f.value)
def test_verify_calls_replicated_vectors_equal_and_finds_a_changed_element(
    vector_pipeline: PipelineHarness, replicated: dict[FileFormat, TableRef], file_format: FileFormat
) -> None:
    table = replicated[file_format]
    result = vector_pipeline.verify(table)
    assert result.ok, result
    assert result.source_rows == result.target_rows == len(ROWS)
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with vector_pipeline.sf_conn.cursor() as cur:
        # the nearest float4 above 0.1 in place of 0.1: one ulp, still found
        cur.execute(
            f'UPDATE {target} SET "EMBEDDING" = [0.10000001, -2.5, 3]::VECTOR(FLOAT, 3) WHERE "ID" = 1'
        )
    try:
        changed = vector_pipeline.verify(table)
        assert not changed.ok
        assert changed.different == ["1"], changed
    finally:
        with vector_pipeline.sf_conn.cursor() as cur:
            cur.execute(f'UPDATE {target} SET "EMBEDDING" = [0.1, -2.5, 3]::VECTOR(FLOAT, 3) WHERE "ID" = 1')
    assert vector_pipeline.verify(table).ok


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=lambda f: f.value)
def test_the_demo_comparison_finds_every_cell_equal(
    vector_pipeline: PipelineHarness, replicated: dict[FileFormat, TableRef], file_format: FileFormat
) -> None:
    comparison = vector_pipeline.compare_cells(replicated[file_format])
    assert comparison.ok, comparison.detail
    assert comparison.source_rows == comparison.snowflake_rows == len(ROWS)


def test_a_second_run_merges_into_the_same_column_types(
    vector_pipeline: PipelineHarness, replicated: dict[FileFormat, TableRef]
) -> None:
    # The existing table's INFORMATION_SCHEMA types are compared with the source's (schema
    # evolution) before loading again: the same types, no ALTER, no error; a merge run goes
    # through a work table of the same types and keeps one row per key.
    table = replicated[FileFormat.CSV]
    vector_pipeline.merge_again_in_parquet(table)
    assert vector_pipeline.target_count(table) == len(ROWS)
    assert len(vector_pipeline.ledger_keys(table)) == 2
    assert vector_pipeline.verify(table).ok


@pytest.mark.parametrize(
    ("staged_text", "why"),
    [("[1,2,3,4]", "one too many"), ("[1,2]", "one too few"), ('[1,"x",3]', "not a number")],
    ids=["longer", "shorter", "string-element"],
)
def test_the_loaders_copy_refuses_a_vector_of_another_dimension(
    vector_pipeline: PipelineHarness, replicated: dict[FileFormat, TableRef], staged_text: str, why: str
) -> None:
    # A staged array that does not fit VECTOR(FLOAT, 3) (a file made by hand; pgvector itself
    # enforces the dimension) fails the loader's own COPY text: never truncated, padded or skipped.
    # (``replicated``: the loader has created its stage by now.)
    settings = vector_pipeline.settings(Component.LOADER)
    table = vector_pipeline.table(f"vectors_{why.replace(' ', '_')}")
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with vector_pipeline.sf_conn.cursor() as cur:
        cur.execute(f'CREATE TABLE {target} ("ID" NUMBER(38,0), "EMBEDDING" VECTOR(FLOAT, 3))')
    key = data_key(settings.prefix, table, 1, "20261206T120000000000Z", FileFormat.CSV)
    body = f'id,embedding\n1,"[0.5,1,2]"\n2,"{staged_text.replace(chr(34), chr(34) * 2)}"\n'
    vector_pipeline.s3().put_object(Bucket=vector_pipeline.bucket, Key=key, Body=gzip.compress(body.encode()))
    copy_sql = build_copy_into(
        database=SNOWFLAKE_DATABASE,
        control_schema=settings.snowflake.control_schema,
        stage=settings.snowflake.stage,
        staged=parse_data_key(key, settings.prefix),
        columns=[
            LoadColumn("id", "ID", ValueKind.INTEGER, "NUMBER(38,0)"),
            LoadColumn("embedding", "EMBEDDING", ValueKind.VECTOR, "VECTOR(FLOAT, 3)"),
        ],
    )
    with vector_pipeline.sf_conn.cursor() as cur:
        with pytest.raises(
            snowflake.connector.errors.ProgrammingError, match=r"(?s)cannot be converted.*\"EMBEDDING\":2"
        ):
            cur.execute(copy_sql)
        cur.execute(f"SELECT COUNT(*) FROM {target}")
        assert cur.fetchone() == (0,)  # ABORT_STATEMENT: not even the good row
