"""The extractor against real servers: PostgreSQL on loopback and a moto S3 server over HTTP.

Every staged file is read back (gzip + an RFC 4180 reader that keeps NULL apart from '',
and pyarrow) and compared cell by cell with what was inserted.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import time as time_module
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import psycopg2
import psycopg2.extensions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from csv_support import parse_csv_keeping_nulls
from psycopg2 import sql
from stack_support import new_bucket, postgres_secret_arn

from pgsnow.config import Component, Settings
from pgsnow.errors import PermanentError, RetryableError, UnsafeIdentifierError
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, manifest_key, table_prefix
from pgsnow.local.aws import LocalAws
from pgsnow.local.dispatcher import LambdaContext
from pgsnow.local.stack import load_function_handler
from pgsnow.manifest import META_BATCH, META_ROWS, META_RUN_ID, META_SHA256, RunManifest, RunState
from pgsnow.postgres import classify_pg_error, connect, describe_table
from pgsnow.runs import RunStore
from pgsnow.runtime import reset_runtime

pytestmark = pytest.mark.integration

PREFIX = "staging"


# --- fixtures (pg_dsn, admin, schema_name, aws, s3, pg_conn: stack_support) -----------------------


@pytest.fixture
def bucket(s3: Any) -> str:
    """A fresh versioned bucket, so both writes of a manifest can be read back."""
    return new_bucket(s3, "pgsnow-test", versioned=True)


def make_settings(
    bucket: str, pg_dsn: str, *, tables: str = "*", batch_rows: int = 100_000, fmt: str = "csv"
) -> Settings:
    return Settings.from_env(
        {
            "S3_STAGE_BUCKET": bucket,
            "S3_STAGE_PREFIX": PREFIX,
            "PGSNOW_TABLES": tables,
            "PGSNOW_PG_DSN": pg_dsn,
            "EXTRACT_BATCH_ROWS": str(batch_rows),
            "S3_FILE_FORMAT": fmt,
        },
        Component.EXTRACTOR,
    )


def run_sql(
    admin: psycopg2.extensions.connection, statement: sql.Composable | str, params: Any = None
) -> None:
    with admin.cursor() as cur:
        cur.execute(statement, params)


def create_table(admin: psycopg2.extensions.connection, table: TableRef, columns_sql: str) -> None:
    run_sql(
        admin,
        sql.SQL("CREATE TABLE {} ({})").format(
            sql.Identifier(table.schema, table.table), sql.SQL(columns_sql)
        ),
    )


def insert_rows(
    admin: psycopg2.extensions.connection, table: TableRef, columns: list[str], rows: list[tuple[Any, ...]]
) -> None:
    statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(table.schema, table.table),
        sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
    )
    with admin.cursor() as cur:
        cur.executemany(statement, rows)


# --- reading staged files back -----------------------------------------------------------------------


def object_bytes(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def read_csv_object(s3: Any, bucket: str, key: str) -> list[list[str | None]]:
    text = gzip.decompress(object_bytes(s3, bucket, key)).decode("utf-8")
    records = parse_csv_keeping_nulls(text)
    # Cross-check the structure with the standard library reader.
    assert [[v or "" for v in r] for r in records] == list(csv.reader(io.StringIO(text, newline="")))
    return records


def read_parquet_object(s3: Any, bucket: str, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(object_bytes(s3, bucket, key)))


def same_value(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return bool(actual == expected) and type(actual) is type(expected)


# --- every value kind, cell-exact, in both formats ----------------------------------------------------


@dataclass(frozen=True)
class Cell:
    pg_type: str
    value: Any  # bound on insert
    csv_text: str  # expected CSV field
    parquet_value: Any  # expected value read back from Parquet (as_py)
    arrow_type: pa.DataType


CELLS = [
    pytest.param(Cell("smallint", 32767, "32767", 32767, pa.int16()), id="smallint"),
    pytest.param(Cell("integer", -2147483648, "-2147483648", -2147483648, pa.int32()), id="integer"),
    pytest.param(
        Cell("bigint", -9223372036854775808, "-9223372036854775808", -9223372036854775808, pa.int64()),
        id="bigint",
    ),
    pytest.param(
        Cell(
            "numeric(12,2)",
            Decimal("-1234567890.12"),
            "-1234567890.12",
            Decimal("-1234567890.12"),
            pa.decimal128(12, 2),
        ),
        id="numeric-p-s",
    ),
    pytest.param(
        Cell("numeric(10,4)", Decimal("1.5"), "1.5000", Decimal("1.5000"), pa.decimal128(10, 4)),
        id="numeric-scale-padded",
    ),
    pytest.param(
        Cell("numeric(38,0)", Decimal("9" * 38), "9" * 38, Decimal("9" * 38), pa.decimal128(38, 0)),
        id="numeric-38-digits",
    ),
    pytest.param(
        Cell("numeric", Decimal("123.456"), "123.456", Decimal("123.4560000000"), pa.decimal128(38, 10)),
        id="numeric-unbounded",
    ),
    pytest.param(
        Cell(
            "numeric",
            Decimal("1.500000000000000"),
            "1.5000000000",
            Decimal("1.5000000000"),
            pa.decimal128(38, 10),
        ),
        id="numeric-unbounded-trailing-zeros",
    ),
    pytest.param(
        Cell("price_domain", Decimal("19.99"), "19.99", Decimal("19.99"), pa.decimal128(12, 2)),
        id="domain-over-numeric",
    ),
    pytest.param(
        Cell(
            "text",
            'a,b "quoted"\nnext line\r\nx',
            'a,b "quoted"\nnext line\r\nx',
            'a,b "quoted"\nnext line\r\nx',
            pa.string(),
        ),
        id="text-commas-quotes-newlines",
    ),
    pytest.param(Cell("text", "\\N", "\\N", "\\N", pa.string()), id="text-backslash-N"),
    pytest.param(Cell("text", "", "", "", pa.string()), id="text-empty-string"),
    pytest.param(
        Cell("text", "Zoë 🚀 中文 ñ", "Zoë 🚀 中文 ñ", "Zoë 🚀 中文 ñ", pa.string()), id="text-unicode"
    ),
    pytest.param(
        Cell(
            "text",
            "line\u2028sep\u2029para",
            "line\u2028sep\u2029para",
            "line\u2028sep\u2029para",
            pa.string(),
        ),
        id="text-u2028",
    ),
    pytest.param(Cell("varchar(20)", "  padded  ", "  padded  ", "  padded  ", pa.string()), id="varchar"),
    pytest.param(Cell("mood", "happy", "happy", "happy", pa.string()), id="enum"),
    pytest.param(Cell("char(5)", "ab", "ab", "ab", pa.string()), id="char-padding-dropped"),
    pytest.param(
        Cell(
            "interval", "1 year 2 mons 3 days 04:05:06.5", "P1Y2M3DT4H5M6.5S", "P1Y2M3DT4H5M6.5S", pa.string()
        ),
        id="interval-iso-8601",
    ),
    pytest.param(Cell("inet", "192.168.0.1/24", "192.168.0.1/24", "192.168.0.1/24", pa.string()), id="inet"),
    pytest.param(
        Cell("timetz", "10:11:12+02", "10:11:12+02", "10:11:12+02", pa.string()), id="timetz-as-text"
    ),
    pytest.param(Cell("boolean", True, "true", True, pa.bool_()), id="boolean-true"),
    pytest.param(Cell("boolean", False, "false", False, pa.bool_()), id="boolean-false"),
    pytest.param(Cell("date", date(2024, 2, 29), "2024-02-29", date(2024, 2, 29), pa.date32()), id="date"),
    pytest.param(Cell("date", date(1, 1, 1), "0001-01-01", date(1, 1, 1), pa.date32()), id="date-year-1"),
    pytest.param(
        Cell("time", time(13, 14, 15, 123456), "13:14:15.123456", time(13, 14, 15, 123456), pa.time64("us")),
        id="time",
    ),
    pytest.param(
        Cell(
            "timestamp",
            datetime(2024, 1, 2, 3, 4, 5, 678901),
            "2024-01-02 03:04:05.678901",
            datetime(2024, 1, 2, 3, 4, 5, 678901),
            pa.timestamp("us"),
        ),
        id="timestamp",
    ),
    pytest.param(
        Cell(
            "timestamp",
            datetime(9999, 12, 31, 23, 59, 59),
            "9999-12-31 23:59:59",
            datetime(9999, 12, 31, 23, 59, 59),
            pa.timestamp("us"),
        ),
        id="timestamp-whole-seconds-year-9999",
    ),
    pytest.param(
        Cell(
            "timestamptz",
            "2024-06-01 12:00:00.5+02",
            "2024-06-01T10:00:00.500000Z",
            datetime(2024, 6, 1, 10, 0, 0, 500000, tzinfo=UTC),
            pa.timestamp("us", tz="UTC"),
        ),
        id="timestamptz-to-utc",
    ),
    pytest.param(
        Cell(
            "uuid",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            pa.string(),
        ),
        id="uuid",
    ),
    pytest.param(
        Cell(
            "jsonb",
            json.dumps({"b": [1, 2.5], "a": "x\ny", "n": None}),
            '{"a": "x\\ny", "b": [1, 2.5], "n": null}',
            '{"a": "x\\ny", "b": [1, 2.5], "n": null}',
            pa.string(),
        ),
        id="jsonb",
    ),
    # json is staged as its jsonb text: Snowflake's PARSE_JSON refuses duplicate keys and makes
    # exponent-notation numbers doubles; spacing and key order a VARIANT does not keep anyway.
    pytest.param(
        Cell("json", '{"b":  1, "a": 2}', '{"a": 2, "b": 1}', '{"a": 2, "b": 1}', pa.string()),
        id="json-as-jsonb-text",
    ),
    pytest.param(
        Cell("json", '{"a": 1, "a": 2}', '{"a": 2}', '{"a": 2}', pa.string()),
        id="json-duplicate-keys-last-wins",
    ),
    pytest.param(
        Cell(
            "json",
            "[1.2345678901234567890e20, 1e-3]",
            "[123456789012345678900, 0.001]",
            "[123456789012345678900, 0.001]",
            pa.string(),
        ),
        id="json-exponent-numbers-in-plain-notation",
    ),
    pytest.param(
        Cell("json", '{"z": "a\\u0000b"}', '{"z": "a\\u0000b"}', '{"z": "a\\u0000b"}', pa.string()),
        id="json-with-nul-escape-as-written",
    ),
    pytest.param(
        Cell("text[]", ["a", "b,c", None], '["a", "b,c", null]', '["a", "b,c", null]', pa.string()),
        id="text-array",
    ),
    pytest.param(
        Cell("integer[]", [[1, 2], [3, 4]], "[[1, 2], [3, 4]]", "[[1, 2], [3, 4]]", pa.string()),
        id="int-2d-array",
    ),
    pytest.param(Cell("bytea", b"\x00\xffab", "00ff6162", b"\x00\xffab", pa.binary()), id="bytea"),
    pytest.param(Cell("real", 1.1, "1.1", 1.1, pa.float64()), id="real"),
    pytest.param(Cell("double precision", 0.1, "0.1", 0.1, pa.float64()), id="double"),
    pytest.param(Cell("double precision", 1e308, "1e+308", 1e308, pa.float64()), id="double-large"),
    pytest.param(Cell("double precision", float("nan"), "NaN", float("nan"), pa.float64()), id="double-nan"),
    pytest.param(Cell("double precision", float("inf"), "inf", float("inf"), pa.float64()), id="double-inf"),
    pytest.param(Cell("real", float("-inf"), "-inf", float("-inf"), pa.float64()), id="real-minus-inf"),
]
CELL_IDS = [p.id for p in CELLS]
# (position in the CSV record / Parquet table, cell): column 0 is the key.
INDEXED_CELLS = [pytest.param(1 + n, *p.values, id=p.id) for n, p in enumerate(CELLS)]


@dataclass(frozen=True)
class StagedKinds:
    table: TableRef
    manifests: dict[FileFormat, RunManifest]
    csv_records: list[list[str | None]]
    parquet: pa.Table


@pytest.fixture(scope="module")
def staged_kinds(
    admin: psycopg2.extensions.connection, schema_name: str, s3: Any, pg_dsn: str
) -> StagedKinds:
    # Given a table with one column per case, a row of values (id 1) and a row of NULLs (id 2)
    table = TableRef(schema_name, "Every Kind")
    run_sql(
        admin, sql.SQL("CREATE TYPE {} AS ENUM ('happy', 'sad')").format(sql.Identifier(schema_name, "mood"))
    )
    run_sql(
        admin,
        sql.SQL("CREATE DOMAIN {} AS numeric(12,2)").format(sql.Identifier(schema_name, "price_domain")),
    )
    run_sql(admin, sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema_name)))
    columns = ", ".join(f"c{i} {p.values[0].pg_type}" for i, p in enumerate(CELLS))
    create_table(admin, table, f"id integer PRIMARY KEY, {columns}")
    names = ["id"] + [f"c{i}" for i in range(len(CELLS))]
    insert_rows(admin, table, names, [(1, *[p.values[0].value for p in CELLS]), (2, *[None] * len(CELLS))])
    run_sql(admin, "RESET search_path")

    # When it is extracted once as CSV and once as Parquet
    bucket = new_bucket(s3, "pgsnow-kinds")
    settings = make_settings(bucket, pg_dsn)
    manifests = {}
    conn = connect(pg_dsn)
    try:
        for fmt in FileFormat:
            manifests[fmt] = extract_table(
                settings=settings, pg_conn=conn, s3=s3, table=table, file_format=fmt
            )
    finally:
        conn.close()
    csv_key = manifests[FileFormat.CSV].files[0].key
    parquet_key = manifests[FileFormat.PARQUET].files[0].key
    return StagedKinds(
        table, manifests, read_csv_object(s3, bucket, csv_key), read_parquet_object(s3, bucket, parquet_key)
    )


def test_csv_header_is_the_postgres_column_names(staged_kinds: StagedKinds) -> None:
    assert staged_kinds.csv_records[0] == ["id"] + [f"c{i}" for i in range(len(CELLS))]
    assert len(staged_kinds.csv_records) == 3


@pytest.mark.parametrize(("index", "cell"), INDEXED_CELLS)
def test_csv_cell_is_exact(staged_kinds: StagedKinds, index: int, cell: Cell) -> None:
    values_row, nulls_row = staged_kinds.csv_records[1], staged_kinds.csv_records[2]
    assert values_row[0] == "1"
    assert values_row[index] == cell.csv_text
    assert nulls_row[index] is None  # NULL is an unquoted empty field, never ""


@pytest.mark.parametrize(("index", "cell"), INDEXED_CELLS)
def test_parquet_cell_is_exact(staged_kinds: StagedKinds, index: int, cell: Cell) -> None:
    column = staged_kinds.parquet.column(index)
    assert staged_kinds.parquet.schema.field(index).name == f"c{index - 1}"
    assert column.type == cell.arrow_type
    values = column.to_pylist()
    assert same_value(values[0], cell.parquet_value), (values[0], cell.parquet_value)
    assert values[1] is None


def test_empty_string_and_null_are_distinct_on_the_wire(staged_kinds: StagedKinds, s3: Any) -> None:
    # The raw bytes, not a parser, show the contract: '' is "" and NULL is nothing at all.
    empty_index = 1 + CELL_IDS.index("text-empty-string")
    assert staged_kinds.csv_records[1][empty_index] == ""
    assert staged_kinds.csv_records[2][empty_index] is None


def test_manifest_columns_types_and_primary_key(staged_kinds: StagedKinds) -> None:
    manifest = staged_kinds.manifests[FileFormat.CSV]
    assert manifest.primary_key == ("id",)
    by_name = {c.name: c for c in manifest.columns}
    assert [c.name for c in manifest.columns] == ["id"] + [f"c{i}" for i in range(len(CELLS))]
    assert by_name["id"].nullable is False and by_name["c0"].nullable is True
    enum_column = by_name[f"c{CELL_IDS.index('enum')}"]
    assert (enum_column.pg_type.endswith("mood"), enum_column.base_type, enum_column.snowflake_type) == (
        True,
        "text",
        "VARCHAR(134217728)",
    )
    domain_column = by_name[f"c{CELL_IDS.index('domain-over-numeric')}"]
    assert (
        domain_column.base_type,
        domain_column.snowflake_type,
        domain_column.precision,
        domain_column.scale,
    ) == (
        "numeric(12,2)",
        "NUMBER(12,2)",
        12,
        2,
    )
    tz_column = by_name[f"c{CELL_IDS.index('timestamptz-to-utc')}"]
    assert (tz_column.kind.value, tz_column.snowflake_type) == ("timestamptz", "TIMESTAMP_TZ(6)")
    assert manifest.table.snowflake_table == "Every Kind"


# --- manifest states, files, metadata, batching ----------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "batch_rows", "fmt", "expected_file_rows"),
    [
        pytest.param(25, 10, FileFormat.CSV, [10, 10, 5], id="csv-25-by-10"),
        pytest.param(25, 10, FileFormat.PARQUET, [10, 10, 5], id="parquet-25-by-10"),
        pytest.param(20, 10, FileFormat.CSV, [10, 10], id="csv-exact-multiple"),
        pytest.param(7, 100, FileFormat.PARQUET, [7], id="parquet-one-file"),
        pytest.param(0, 10, FileFormat.CSV, [0], id="csv-empty-table"),
        pytest.param(0, 10, FileFormat.PARQUET, [0], id="parquet-empty-table"),
    ],
)
def test_batches_manifest_and_object_metadata(
    admin: psycopg2.extensions.connection,
    schema_name: str,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: psycopg2.extensions.connection,
    rows: int,
    batch_rows: int,
    fmt: FileFormat,
    expected_file_rows: list[int],
) -> None:
    # Given a table of `rows` rows, inserted out of key order, with a text payload containing newlines
    table = TableRef(schema_name, f"batched_{uuid.uuid4().hex[:8]}")
    create_table(admin, table, "id integer PRIMARY KEY, note text")
    ids = list(range(rows, 0, -1))
    insert_rows(admin, table, ["id", "note"], [(i, f"row {i}\nline two") for i in ids])
    settings = make_settings(bucket, pg_dsn, tables=f"{table.schema}.{table.table}", batch_rows=batch_rows)
    run_id = "20261125T120000123456Z"

    # When it is extracted
    manifest = extract_table(
        settings=settings, pg_conn=pg_conn, s3=s3, table=table, file_format=fmt, run_id=run_id
    )

    # Then there is one file per batch, at the specified keys, with rows/bytes/sha256 matching the objects
    assert manifest.state is RunState.STAGED and manifest.run_id == run_id
    assert [f.rows for f in manifest.files] == expected_file_rows
    assert manifest.total_rows == rows
    expected_keys = [data_key(PREFIX, table, n, run_id, fmt) for n in range(1, len(expected_file_rows) + 1)]
    assert [f.key for f in manifest.files] == expected_keys
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=table_prefix(PREFIX, table)).get("Contents", [])
    assert sorted(o["Key"] for o in listed) == sorted(expected_keys)
    staged_ids: list[int] = []
    for staged in manifest.files:
        body = object_bytes(s3, bucket, staged.key)
        head = s3.head_object(Bucket=bucket, Key=staged.key)
        assert (len(body), hashlib.sha256(body).hexdigest()) == (staged.bytes, staged.sha256)
        assert head["Metadata"] == {
            META_RUN_ID: run_id,
            META_BATCH: str(staged.batch),
            META_ROWS: str(staged.rows),
            META_SHA256: staged.sha256,
        }
        if fmt is FileFormat.CSV:
            assert head["ContentEncoding"] == "gzip" and head["ContentType"].startswith("text/csv")
            records = read_csv_object(s3, bucket, staged.key)
            assert records[0] == ["id", "note"]
            assert all(r[1] == f"row {r[0]}\nline two" for r in records[1:])
            staged_ids += [int(str(r[0])) for r in records[1:]]
        else:
            assert head["ContentType"] == "application/vnd.apache.parquet"
            staged_ids += read_parquet_object(s3, bucket, staged.key).column("id").to_pylist()
        assert staged.file_format is fmt
    assert staged_ids == sorted(ids)  # ordered by primary key, across files

    # And the manifest was written twice: `extracting` (schema, no files) first, then `staged`
    versions = s3.list_object_versions(Bucket=bucket, Prefix=manifest_key(table, run_id))["Versions"]
    oldest_first = sorted(versions, key=lambda v: v["LastModified"])
    assert len(oldest_first) == 2
    bodies = [
        RunManifest.from_json(
            s3.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
        )
        for v in versions
    ]
    by_state = {m.state: m for m in bodies}
    extracting = by_state[RunState.EXTRACTING]
    assert extracting.files == () and extracting.finished_at is None
    assert extracting.columns == manifest.columns and extracting.primary_key == ("id",)
    assert RunStore(s3, bucket).get_manifest(table, run_id) == manifest
    assert manifest.finished_at is not None


def test_table_without_primary_key_and_auto_format(
    admin: psycopg2.extensions.connection, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given a small analysed table with no primary key, and S3_FILE_FORMAT=auto
    table = TableRef(schema_name, "no_key")
    create_table(admin, table, '"Name" text, amount numeric(5,1)')
    insert_rows(admin, table, ["Name", "amount"], [("b", Decimal("2.5")), ("a", None)])
    run_sql(admin, sql.SQL("ANALYZE {}").format(sql.Identifier(table.schema, table.table)))
    settings = make_settings(bucket, pg_dsn, fmt="auto")

    # When it is extracted
    manifest = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)

    # Then auto picked CSV for a small table, every row is there and the case policy keeps "Name"
    assert manifest.file_format is FileFormat.CSV and manifest.primary_key == ()
    records = read_csv_object(s3, bucket, manifest.files[0].key)
    assert records[0] == ["Name", "amount"]
    assert sorted(records[1:], key=str) == sorted([["b", "2.5"], ["a", None]], key=str)
    assert [c.snowflake_name for c in manifest.columns] == ["Name", "AMOUNT"]


# --- refusals and policy errors --------------------------------------------------------------------------


def test_allowlist_refusal_happens_before_any_sql(
    admin: psycopg2.extensions.connection, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given a table that exists but is not in PGSNOW_TABLES
    table = TableRef(schema_name, "not_allowed")
    create_table(admin, table, "id integer")
    settings = make_settings(bucket, pg_dsn, tables="public.something_else")

    # When extraction is asked for it
    with pytest.raises(UnsafeIdentifierError, match="not in the configured allowlist"):
        extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)

    # Then no statement ran (any statement would have opened the read-only transaction) and nothing was written
    assert pg_conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert pg_conn.closed == 0
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


POLICY_CASES = [
    # 39 digits: more than NUMBER(38, s) holds at any scale (the chosen scale, 37, leaves its one integer digit)
    pytest.param(
        "numeric",
        "1." + "1" * 38,
        "c",
        "digits beyond scale 37",
        id="unbounded-numeric-39-significant-digits",
    ),
    # 1e38 and more fit no NUMBER: the scale is chosen from the other values (none: 10)
    pytest.param("numeric", "1e38", "c", "1e28 or more in magnitude", id="unbounded-numeric-too-large"),
    pytest.param("numeric", "-1e40", "c", "1e28 or more in magnitude", id="unbounded-numeric-too-small"),
    pytest.param("numeric", "NaN", "c", "numeric NaN", id="unbounded-numeric-nan"),
    pytest.param("numeric", "Infinity", "c", "1e28 or more in magnitude", id="unbounded-numeric-infinity"),
    pytest.param("numeric(10,2)", "NaN", "c", "numeric NaN", id="bounded-numeric-nan"),
    pytest.param("timestamp", "infinity", "c", "infinite date/time", id="timestamp-infinity"),
    pytest.param("timestamptz", "-infinity", "c", "infinite date/time", id="timestamptz-minus-infinity"),
    pytest.param("date", "0044-03-15 BC", "c", "year outside 1..9999", id="date-bc"),
    pytest.param(
        "timestamptz", "10000-01-01 00:00:00+00", "c", "year outside 1..9999", id="timestamptz-year-10000"
    ),
    pytest.param("time", "24:00:00", "c", "time 24:00:00", id="time-24"),
]


@pytest.mark.parametrize(("pg_type", "bad_value", "column", "problem"), POLICY_CASES)
def test_values_snowflake_cannot_hold_fail_before_staging(
    admin: psycopg2.extensions.connection,
    schema_name: str,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: Any,
    pg_type: str,
    bad_value: str,
    column: str,
    problem: str,
) -> None:
    # Given a table whose row with key 42 holds a value Snowflake cannot hold exactly (and good rows around it)
    table = TableRef(schema_name, f"policy_{uuid.uuid4().hex[:8]}")
    create_table(admin, table, f"id integer PRIMARY KEY, {column} {pg_type}")
    insert_rows(admin, table, ["id"], [(1,), (99,)])
    run_sql(
        admin,
        sql.SQL("INSERT INTO {} (id, {}) VALUES (42, %s)").format(
            sql.Identifier(table.schema, table.table), sql.Identifier(column)
        ),
        (bad_value,),
    )
    settings = make_settings(bucket, pg_dsn)

    # When it is extracted
    with pytest.raises(PermanentError) as raised:
        extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table, file_format=FileFormat.PARQUET)

    # Then the error names table, column, problem and key, and nothing was staged (no manifest either)
    message = str(raised.value)
    assert raised.value.table == table.qualified
    assert f"column {column!r}" in message and problem in message and "(id)=(42)" in message
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert pg_conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_missing_table_is_a_permanent_error(
    schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    table = TableRef(schema_name, "does_not_exist")
    with pytest.raises(PermanentError, match="does not exist") as raised:
        extract_table(settings=make_settings(bucket, pg_dsn), pg_conn=pg_conn, s3=s3, table=table)
    assert raised.value.table == table.qualified and not raised.value.retryable


def test_colliding_column_names_are_refused(
    admin: psycopg2.extensions.connection, schema_name: str, pg_conn: Any
) -> None:
    table = TableRef(schema_name, "collide")
    create_table(admin, table, 'id integer, "ID" integer')
    with pytest.raises(PermanentError, match="both map to Snowflake name 'ID'"):
        describe_table(pg_conn, table)


def test_describe_reads_composite_primary_key_in_key_order_and_skips_dropped_columns(
    admin: psycopg2.extensions.connection, schema_name: str, pg_conn: Any
) -> None:
    # Given a table whose key order differs from column order, and a dropped column
    table = TableRef(schema_name, "composite")
    create_table(admin, table, "a integer, gone text, b text NOT NULL, c varchar(5), PRIMARY KEY (b, a)")
    run_sql(
        admin, sql.SQL("ALTER TABLE {} DROP COLUMN gone").format(sql.Identifier(table.schema, table.table))
    )

    # When it is described
    described = describe_table(pg_conn, table)

    # Then
    assert described.primary_key == ("b", "a")
    assert [(c.name, c.pg_type, c.nullable) for c in described.columns] == [
        ("a", "integer", False),
        ("b", "text", False),
        ("c", "character varying(5)", True),
    ]


# --- error classification, with real server errors --------------------------------------------------------


def test_classify_undefined_table_is_permanent(pg_dsn: str) -> None:
    conn = psycopg2.connect(pg_dsn)
    try:
        with pytest.raises(psycopg2.Error) as raised, conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT 1 FROM {}").format(sql.Identifier("no_such_schema_x", "t")))
    finally:
        conn.close()
    error = classify_pg_error(raised.value, table="no_such_schema_x.t")
    assert (type(error), error.sqlstate, error.table) == (PermanentError, "42P01", "no_such_schema_x.t")


def test_classify_lock_timeout_is_retryable(
    admin: psycopg2.extensions.connection, schema_name: str, pg_dsn: str
) -> None:
    # Given a table locked by another session
    table = TableRef(schema_name, "locked")
    create_table(admin, table, "id integer")
    holder = psycopg2.connect(pg_dsn)
    waiter = psycopg2.connect(pg_dsn)
    try:
        with holder.cursor() as cur:
            cur.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(table.schema, table.table)
                )
            )
        # When another session waits longer than its lock_timeout
        with pytest.raises(psycopg2.Error) as raised, waiter.cursor() as cur:
            cur.execute("SET lock_timeout = '50ms'")
            cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table.schema, table.table)))
    finally:
        holder.close()
        waiter.close()
    # Then the error is retryable
    error = classify_pg_error(raised.value)
    assert (type(error), error.sqlstate) == (RetryableError, "55P03")


def test_classify_connection_refused_is_retryable() -> None:
    with pytest.raises(RetryableError, match="connection problem"):
        connect("host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2")


def test_connection_session_is_utc_iso_and_read_only(pg_conn: Any) -> None:
    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT current_setting('TimeZone'), current_setting('DateStyle'), current_setting('IntervalStyle'), "
            "current_setting('transaction_isolation'), current_setting('transaction_read_only'), "
            "current_setting('application_name')"
        )
        settings = cur.fetchone()
    pg_conn.rollback()
    assert settings == ("UTC", "ISO, YMD", "iso_8601", "repeatable read", "on", "pgsnow")


# --- the Lambda handler -------------------------------------------------------------------------------


@pytest.fixture
def extractor_handler(
    monkeypatch: pytest.MonkeyPatch,
    aws: LocalAws,
    admin: psycopg2.extensions.connection,
    schema_name: str,
    bucket: str,
    pg_dsn: str,
) -> Iterator[tuple[Any, TableRef]]:
    """The real extractor/app.py handler, configured like a deployed function: the DSN comes from a secret."""
    table = TableRef(schema_name, f"handled_{uuid.uuid4().hex[:8]}")
    create_table(admin, table, "id bigint PRIMARY KEY, label text")
    insert_rows(admin, table, ["id", "label"], [(i, f"label {i}") for i in range(1, 6)])
    secret_arn = postgres_secret_arn(aws.client("secretsmanager"), pg_dsn)
    for name, value in {
        **aws.env(),
        "S3_STAGE_BUCKET": bucket,
        "S3_STAGE_PREFIX": PREFIX,
        "PGSNOW_TABLES": f"{table.schema}.{table.table},{table.schema}.missing_table",
        "PGSNOW_PG_SECRET_ARN": secret_arn,
        "EXTRACT_BATCH_ROWS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PGSNOW_PG_DSN", raising=False)
    reset_runtime()  # a new runtime: settings, clients and PostgreSQL connection from this environment
    yield load_function_handler("extractor"), table
    reset_runtime()


def lambda_context() -> LambdaContext:
    return LambdaContext(
        function_name="pgsnow-test-extractor",
        invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:pgsnow-test-extractor",
        memory_limit_in_mb=2048,
        deadline_monotonic=time_module.monotonic() + 900,
    )


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param("direct", id="direct-invoke"),
        pytest.param("eventbridge-detail", id="eventbridge-event"),
    ],
)
def test_handler_stages_a_table_using_the_secret(
    extractor_handler: tuple[Any, TableRef], s3: Any, bucket: str, shape: str
) -> None:
    # Given the deployed-style configuration and an event naming an allowlisted table
    handler, table = extractor_handler
    request = {"schema_name": table.schema, "table_name": table.table}
    event = (
        request
        if shape == "direct"
        else {"detail-type": "Scheduled Event", "source": "aws.events", "detail": request}
    )

    # When the handler runs (twice: the cached connection is reused by a warm container)
    first = handler(event, lambda_context())
    second = handler(event, lambda_context())

    # Then it returns a summary matching the staged manifest
    for summary in (first, second):
        manifest = RunStore(s3, bucket).get_manifest(table, summary["run_id"])
        assert summary == {
            "run_id": manifest.run_id,
            "table": table.qualified,
            "state": "staged",
            "file_format": "csv",
            "files": 3,
            "rows": 5,
            "bytes": sum(f.bytes for f in manifest.files),
            "bucket": bucket,
            "manifest_key": manifest_key(table, manifest.run_id),
        }
    assert first["run_id"] != second["run_id"]


@pytest.mark.parametrize(
    ("event", "error", "message"),
    [
        pytest.param({}, PermanentError, "schema_name", id="empty-event"),
        pytest.param({"schema_name": "public"}, PermanentError, "table_name", id="no-table"),
        pytest.param(
            {"schema_name": "public", "table_name": 7},
            PermanentError,
            "non-empty strings",
            id="table-not-string",
        ),
        pytest.param(["public", "t"], PermanentError, "JSON object", id="not-an-object"),
        pytest.param(
            {"schema_name": "public", "table_name": "../etc"},
            UnsafeIdentifierError,
            "unsafe",
            id="path-in-name",
        ),
        pytest.param(
            {"schema_name": "public", "table_name": "customers"},
            UnsafeIdentifierError,
            "allowlist",
            id="not-allowlisted",
        ),
    ],
)
def test_handler_refuses_bad_events(
    extractor_handler: tuple[Any, TableRef],
    s3: Any,
    bucket: str,
    event: Any,
    error: type[Exception],
    message: str,
) -> None:
    handler, _ = extractor_handler
    with pytest.raises(error, match=message):
        handler(event, lambda_context())
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_handler_missing_allowlisted_table_is_permanent(
    extractor_handler: tuple[Any, TableRef], s3: Any, bucket: str
) -> None:
    handler, table = extractor_handler
    with pytest.raises(PermanentError, match="does not exist"):
        handler({"schema_name": table.schema, "table_name": "missing_table"}, lambda_context())
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_failure_mid_run_marks_the_manifest_failed(
    admin: psycopg2.extensions.connection, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given a view whose third row fails to compute (division by zero) after two rows streamed
    base = TableRef(schema_name, f"fails_base_{uuid.uuid4().hex[:6]}")
    view = TableRef(schema_name, f"fails_view_{uuid.uuid4().hex[:6]}")
    create_table(admin, base, "id integer")
    insert_rows(admin, base, ["id"], [(1,), (2,), (3,), (4,)])
    run_sql(
        admin,
        sql.SQL("CREATE VIEW {} AS SELECT id, 10 / (3 - id) AS ratio FROM {}").format(
            sql.Identifier(view.schema, view.table), sql.Identifier(base.schema, base.table)
        ),
    )
    settings = make_settings(bucket, pg_dsn, batch_rows=1)
    run_id = "20261125T130000000000Z"

    # When it is extracted
    with pytest.raises(PermanentError) as raised:
        extract_table(
            settings=settings, pg_conn=pg_conn, s3=s3, table=view, file_format=FileFormat.CSV, run_id=run_id
        )

    # Then the error is classified from its SQLSTATE, and the manifest says failed, listing what was staged
    assert (raised.value.sqlstate, raised.value.run_id, raised.value.table) == (
        "22012",
        run_id,
        view.qualified,
    )
    failed = RunStore(s3, bucket).get_manifest(view, run_id)
    assert failed.state is RunState.FAILED and failed.finished_at is not None
    assert [f.rows for f in failed.files] == [1, 1]
    assert pg_conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_parquet_chunks_that_straddle_batches(
    monkeypatch: pytest.MonkeyPatch,
    admin: psycopg2.extensions.connection,
    schema_name: str,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: Any,
) -> None:
    # Given cursor chunks (3 rows) that do not divide the batch size (4 rows)
    import pgsnow.extract.parquet_stager as parquet_stager

    monkeypatch.setattr(parquet_stager, "PARQUET_CHUNK_ROWS", 3)
    table = TableRef(schema_name, f"straddle_{uuid.uuid4().hex[:6]}")
    create_table(admin, table, "id integer PRIMARY KEY")
    insert_rows(admin, table, ["id"], [(i,) for i in range(1, 11)])
    settings = make_settings(bucket, pg_dsn, batch_rows=4)

    # When it is extracted as Parquet
    manifest = extract_table(
        settings=settings, pg_conn=pg_conn, s3=s3, table=table, file_format=FileFormat.PARQUET
    )

    # Then files are cut at exactly 4 rows regardless of chunking, every row once, in key order
    assert [f.rows for f in manifest.files] == [4, 4, 2]
    ids = [i for f in manifest.files for i in read_parquet_object(s3, bucket, f.key).column("id").to_pylist()]
    assert ids == list(range(1, 11))


@pytest.mark.parametrize(
    ("relation", "where"),
    [
        pytest.param("table", "at ctid (0,2)", id="table-without-key-names-ctid"),
        pytest.param("view", "at a row", id="view-without-key"),
    ],
)
def test_value_errors_without_a_primary_key_and_percent_in_names(
    admin: psycopg2.extensions.connection,
    schema_name: str,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: Any,
    relation: str,
    where: str,
) -> None:
    # Given a relation without a primary key whose column name has a '%' and a quote, holding 'infinity'
    base = TableRef(schema_name, f'keyless_{uuid.uuid4().hex[:6]} 100% "q"')
    create_table(admin, base, 'label text, "50% off ""now""" timestamp')
    run_sql(
        admin,
        sql.SQL("INSERT INTO {} VALUES ('fine', '2024-01-01'), ('bad', 'infinity')").format(
            sql.Identifier(base.schema, base.table)
        ),
    )
    target = base
    if relation == "view":
        target = TableRef(schema_name, f"keyless_view_{uuid.uuid4().hex[:6]}")
        run_sql(
            admin,
            sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
                sql.Identifier(target.schema, target.table), sql.Identifier(base.schema, base.table)
            ),
        )

    # When it is extracted
    with pytest.raises(PermanentError) as raised:
        extract_table(settings=make_settings(bucket, pg_dsn), pg_conn=pg_conn, s3=s3, table=target)

    # Then the error names the column and points at the row as well as it can
    assert """column '50% off "now"'""" in str(raised.value)
    assert "infinite date/time" in str(raised.value) and where in str(raised.value)


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_a_value_over_the_csv_modules_field_limit_stages(
    admin: psycopg2.extensions.connection,
    schema_name: str,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: Any,
    file_format: FileFormat,
) -> None:
    # Given text values larger than Python's default csv field limit (128 KiB), first and last in key order
    table = TableRef(schema_name, f"long_text_{uuid.uuid4().hex[:6]}")
    create_table(admin, table, "id integer PRIMARY KEY, body text")
    long_value = "<p>" + "x" * (131_072 + 1000) + ',\n"quoted"</p>'
    insert_rows(admin, table, ["id", "body"], [(1, long_value), (2, "short"), (3, long_value[::-1])])

    # When it is extracted
    manifest = extract_table(
        settings=make_settings(bucket, pg_dsn), pg_conn=pg_conn, s3=s3, table=table, file_format=file_format
    )

    # Then every value is staged whole
    (staged,) = manifest.files
    if file_format is FileFormat.CSV:
        bodies = [row[1] for row in read_csv_object(s3, bucket, staged.key)[1:]]
    else:
        bodies = read_parquet_object(s3, bucket, staged.key).column("body").to_pylist()
    assert bodies == [long_value, "short", long_value[::-1]]
