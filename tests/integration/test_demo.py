"""The demo's sample shop and the PostgreSQL-vs-Snowflake comparison, against real servers.

PostgreSQL is the loopback server (or the embedded fallback); Snowflake is a
fakesnow server spoken to over HTTP by the real connector.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import snowflake.connector
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from snowflake.connector import SnowflakeConnection

from pgsnow.demo.compare import compare_table, read_table_shape
from pgsnow.demo.dataset import SAMPLE_TABLES, create_sample_shop
from pgsnow.demo.pipeline import run_demo
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.local.postgres import create_database, start_local_postgres
from pgsnow.snowflake.sql_text import PARAMSTYLE
from pgsnow.typemap import ValueKind, map_pg_type

pytestmark = pytest.mark.integration

SMALL_SCALE = 0.01
# The placeholder of the project's one Snowflake paramstyle.
MARK = "?" if PARAMSTYLE == "qmark" else "%s"


@pytest.fixture(scope="module")
def demo_dsn() -> str:
    """A fresh database for this module on the local PostgreSQL."""
    admin = start_local_postgres(environ={})
    return create_database(admin.dsn, "pgsnow_test_demo", drop_existing=True)


@pytest.fixture(scope="module")
def small_shop(demo_dsn: str) -> dict[str, int]:
    return create_sample_shop(demo_dsn, "shop", scale=SMALL_SCALE)


@pytest.fixture
def pg_conn(demo_dsn: str) -> Iterator[PgConnection]:
    conn = psycopg2.connect(demo_dsn)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def snowflake_server() -> Iterator[dict[str, Any]]:
    """The local Snowflake the demo itself compares against (fakesnow extended by pgsnow.local)."""
    from moto.server import ThreadedMotoServer

    from pgsnow.local.snowflake import start_local_snowflake

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    local = start_local_snowflake(s3_endpoint_url=f"http://{host}:{port}")
    yield local.connect_kwargs()
    local.stop()
    moto.stop()


@pytest.fixture
def sf_conn(snowflake_server: dict[str, Any]) -> Iterator[SnowflakeConnection]:
    conn = snowflake.connector.connect(**snowflake_server, paramstyle=PARAMSTYLE)
    yield conn
    conn.close()


def table_hash(dsn: str, schema: str, table: str) -> str:
    """md5 of every row's text, in primary-key order."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "SELECT md5(string_agg(t::text, E'\\x1e' ORDER BY t::text COLLATE \"C\")) FROM {}.{} AS t"
            ).format(sql.Identifier(schema), sql.Identifier(table))
        )
        row = cur.fetchone()
    conn.close()
    assert row is not None and row[0] is not None
    return str(row[0])


def copy_to_snowflake(
    pg_conn: PgConnection, sf_conn: SnowflakeConnection, table: TableRef, database: str
) -> int:
    """Copy a table into Snowflake with bound INSERTs, independent of the pipeline under test."""
    shape = read_table_shape(pg_conn, table)
    as_text: list[sql.Composable] = []
    sf_columns: list[str] = []
    sf_values: list[str] = []
    for column in shape.columns:
        ident = sql.Identifier(column.name)
        sf_type = map_pg_type(column.base_type).sql
        sf_columns.append(f"{quote_ident(column.snowflake_name)} {sf_type}")
        if column.kind is ValueKind.TIMESTAMPTZ:
            as_text.append(
                sql.SQL("to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')").format(ident)
            )
        elif column.kind is ValueKind.BINARY:
            as_text.append(sql.SQL("encode({}, 'hex')").format(ident))
        else:
            as_text.append(sql.SQL("{}::text").format(ident))
        if column.kind is ValueKind.JSON:
            sf_values.append(f"PARSE_JSON({MARK})")
        elif column.kind is ValueKind.BINARY:
            sf_values.append(f"TO_BINARY({MARK}, 'HEX')")
        else:
            sf_values.append(f"CAST({MARK} AS {sf_type})")
    target = quote_qualified(database, table.snowflake_schema, table.snowflake_table)
    sf = sf_conn.cursor()
    sf.execute(f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)}")
    sf.execute(f"USE DATABASE {quote_ident(database)}")  # fakesnow's cast macros live in the current database
    sf.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_qualified(database, table.snowflake_schema)}")
    sf.execute(f"CREATE OR REPLACE TABLE {target} ({', '.join(sf_columns)})")
    with pg_conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM {}.{}").format(
                sql.SQL(", ").join(as_text), sql.Identifier(table.schema), sql.Identifier(table.table)
            )
        )
        rows = cur.fetchall()
    for row in rows:
        sf.execute(f"INSERT INTO {target} SELECT {', '.join(sf_values)}", row)
    return len(rows)


# ----------------------------------------------------------------------------- dataset


def test_sample_shop_is_deterministic_and_idempotent(demo_dsn: str) -> None:
    # Given the shop generated once
    first_counts = create_sample_shop(demo_dsn, "shop_determinism", scale=SMALL_SCALE)
    first = {t: table_hash(demo_dsn, "shop_determinism", t) for t in SAMPLE_TABLES}
    # When it is generated again over the top of itself
    second_counts = create_sample_shop(demo_dsn, "shop_determinism", scale=SMALL_SCALE)
    second = {t: table_hash(demo_dsn, "shop_determinism", t) for t in SAMPLE_TABLES}
    # Then every table has the same rows, byte for byte
    assert first_counts == second_counts
    assert first == second


def test_sample_shop_at_full_scale_has_200k_order_lines(demo_dsn: str) -> None:
    counts = create_sample_shop(demo_dsn, "shop_full", scale=1.0)
    assert counts["order_lines"] >= 200_000
    assert set(counts) == set(SAMPLE_TABLES)
    assert all(rows > 0 for rows in counts.values())


TRICKY_VALUE_QUERIES = [
    pytest.param("SELECT count(*) FROM shop.customers WHERE note IS NULL", id="text-null"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note = ''", id="text-empty"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note = '\\N'", id="text-backslash-N"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note LIKE '%,%'", id="text-comma"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note LIKE '%\"%'", id="text-quote"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note LIKE E'%\\n%'", id="text-newline"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note LIKE E'%\\t%'", id="text-tab"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note LIKE '%🐘%'", id="text-emoji"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note LIKE '%東京%'", id="text-cjk"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note LIKE '%café%'", id="text-accents"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE note LIKE E'%\\u2028%'", id="text-u2028"),
    pytest.param(
        "SELECT count(*) FROM shop.customers WHERE loyalty_points IN (-9223372036854775808, 9223372036854775807)",
        id="bigint-extremes",
    ),
    pytest.param(
        "SELECT count(*) FROM shop.products WHERE abs(weight_kg) = 9999999999999999999999999999.9999999999",
        id="numeric-38-10-full-width",
    ),
    pytest.param(
        "SELECT count(*) FROM shop.products WHERE unit_price = 9999999999.99", id="numeric-12-2-max"
    ),
    pytest.param("SELECT count(*) FROM shop.products WHERE rating = 'NaN'", id="float-nan"),
    pytest.param("SELECT count(*) FROM shop.products WHERE rating = '-Infinity'", id="float-minus-infinity"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE is_active IS NULL", id="boolean-null"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE preferences = 'null'::jsonb", id="json-null"),
    pytest.param("SELECT count(*) FROM shop.customers WHERE preferences IS NULL", id="sql-null-jsonb"),
    pytest.param(
        "SELECT count(*) FROM shop.customers WHERE jsonb_typeof(preferences) = 'array'", id="json-array"
    ),
    pytest.param(
        "SELECT count(*) FROM shop.customers WHERE preferences #> '{nested,deep}' IS NOT NULL",
        id="json-nested",
    ),
    pytest.param(
        "SELECT count(*) FROM shop.customers"
        " WHERE customer_id BETWEEN 1 AND 1000000"
        " AND created_at = timestamptz '2024-11-03 01:30:00-05' + make_interval(secs => customer_id * 3607.123457)",
        id="timestamptz-dst-overlap",
    ),
    pytest.param(
        "SELECT count(*) FROM shop.customers WHERE created_at < timestamptz '1970-01-01 00:00:00+00'",
        id="timestamptz-before-epoch",
    ),
    pytest.param("SELECT count(*) FROM shop.customers WHERE last_login IS NULL", id="timestamp-null"),
    pytest.param("SELECT count(*) FROM shop.products WHERE thumbnail = ''::bytea", id="bytea-empty"),
    pytest.param("SELECT count(*) FROM shop.products WHERE thumbnail IS NULL", id="bytea-null"),
    pytest.param("SELECT count(*) FROM shop.orders WHERE shipping_address LIKE E'%\\r\\n%'", id="text-crlf"),
    pytest.param("SELECT count(*) FROM shop.order_lines WHERE note = '' ", id="order-lines-empty-text"),
]


@pytest.mark.parametrize("query", TRICKY_VALUE_QUERIES)
def test_sample_shop_contains_the_tricky_value(
    small_shop: dict[str, int], pg_conn: PgConnection, query: str
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute(query)
        row = cur.fetchone()
    assert row is not None and row[0] > 0, query


def test_every_sample_table_has_a_primary_key(small_shop: dict[str, int], pg_conn: PgConnection) -> None:
    for name in SAMPLE_TABLES:
        assert read_table_shape(pg_conn, TableRef("shop", name)).primary_key, name


# ----------------------------------------------------------------------------- comparison


@pytest.mark.parametrize("table_name", ["customers", "products"])
def test_compare_reports_ok_for_an_identical_copy(
    small_shop: dict[str, int], pg_conn: PgConnection, sf_conn: SnowflakeConnection, table_name: str
) -> None:
    # Given a faithful copy of the table in Snowflake
    table = TableRef("shop", table_name)
    database = f"CMP_{uuid.uuid4().hex[:8].upper()}"
    copied = copy_to_snowflake(pg_conn, sf_conn, table, database)
    # When the two are compared
    result = compare_table(pg_conn, sf_conn, table, database, chunk_rows=7)
    # Then every row and cell matches
    assert result.ok, result.detail
    assert result.source_rows == result.snowflake_rows == copied == small_shop[table_name]


CUSTOMERS = '"SHOP"."CUSTOMERS"'
DIFFERENCE_CASES = [
    pytest.param(
        f'UPDATE {CUSTOMERS} SET "NOTE" = {MARK} WHERE "CUSTOMER_ID" = {MARK}',
        ("changed", 5),
        ["customer_id=5", "column note", "1 changed"],
        0,
        id="changed-text-cell",
    ),
    pytest.param(
        f'UPDATE {CUSTOMERS} SET "NOTE" = NULL WHERE "CUSTOMER_ID" = {MARK}',
        (1,),  # customer 1's note is '' in PostgreSQL
        ["customer_id=1", "column note", "postgres=''", "snowflake=None"],
        0,
        id="empty-string-became-null",
    ),
    pytest.param(
        f'UPDATE {CUSTOMERS} SET "PREFERENCES" = NULL WHERE "CUSTOMER_ID" = {MARK}',
        (1,),  # customer 1's preferences are JSON null
        ["customer_id=1", "column preferences", "postgres=':n'", "snowflake=None"],  # ':n': JSON null
        0,
        id="json-null-became-sql-null",
    ),
    pytest.param(
        f"UPDATE {CUSTOMERS} SET \"CREATED_AT\" = CAST('1970-01-01T00:00:00Z' AS TIMESTAMP_TZ)"
        f' WHERE "CUSTOMER_ID" = {MARK}',
        (17,),  # customer 17's created_at is NULL in PostgreSQL
        ["customer_id=17", "column created_at"],
        0,
        id="null-timestamp-became-epoch",
    ),
    pytest.param(
        f'DELETE FROM {CUSTOMERS} WHERE "CUSTOMER_ID" = {MARK}',
        (7,),
        ["customer_id=7", "missing from Snowflake", "1 missing"],
        -1,
        id="missing-row",
    ),
    pytest.param(
        f'INSERT INTO {CUSTOMERS} ("CUSTOMER_ID", "EXTERNAL_ID", "FULL_NAME") VALUES ({MARK}, {MARK}, {MARK})',
        (424242, "11111111-1111-1111-1111-111111111111", "Extra"),
        ["customer_id=424242", "in Snowflake only", "1 only in Snowflake"],
        1,
        id="extra-row",
    ),
]


@pytest.mark.parametrize(("statement", "params", "expected_fragments", "row_delta"), DIFFERENCE_CASES)
def test_compare_finds_the_difference(
    small_shop: dict[str, int],
    pg_conn: PgConnection,
    sf_conn: SnowflakeConnection,
    statement: str,
    params: tuple[Any, ...],
    expected_fragments: list[str],
    row_delta: int,
) -> None:
    # Given a faithful copy of the customers table in Snowflake
    table = TableRef("shop", "customers")
    database = f"CMP_{uuid.uuid4().hex[:8].upper()}"
    copy_to_snowflake(pg_conn, sf_conn, table, database)
    # When one row of the copy is changed, removed or added
    cur = sf_conn.cursor()
    cur.execute(f"USE DATABASE {quote_ident(database)}")
    cur.execute(statement, params)
    result = compare_table(pg_conn, sf_conn, table, database, chunk_rows=5)
    # Then the comparison fails and names the first differing key and column
    assert not result.ok
    for fragment in expected_fragments:
        assert fragment in result.detail
    assert result.source_rows == small_shop["customers"]
    assert result.snowflake_rows == small_shop["customers"] + row_delta


def test_compare_reports_a_missing_snowflake_table(
    small_shop: dict[str, int], pg_conn: PgConnection, sf_conn: SnowflakeConnection
) -> None:
    result = compare_table(pg_conn, sf_conn, TableRef("shop", "orders"), "NO_SUCH_DATABASE")
    assert not result.ok
    assert "cannot read Snowflake table" in result.detail


# ----------------------------------------------------------------------------- the whole demo


@pytest.mark.parametrize(
    ("file_format", "storage_access"),
    [("csv", "integration"), ("parquet", "integration"), ("csv", "credentials")],
)
def test_run_demo_replicates_the_sample_shop(file_format: str, storage_access: str, tmp_path: Path) -> None:
    # Given nothing named: the demo creates the sample shop on the local PostgreSQL
    # When it runs extractor -> S3 -> SQS -> loader -> cleanup for every table, the local Snowflake
    # reading S3 through the storage integration or with the loader's credentials
    results = run_demo(
        pg_dsn=None,
        tables=None,
        schema=None,
        file_format=file_format,
        data_dir=tmp_path,
        progress=None,
        scale=0.02,
        storage_access=storage_access,
    )
    # Then every table arrives complete and identical
    assert [r.table.qualified for r in results] == [f"shop.{name}" for name in SAMPLE_TABLES]
    failures = [f"{r.table}: {r.detail}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert all(r.source_rows == r.snowflake_rows > 0 for r in results)
