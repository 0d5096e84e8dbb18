"""The local Snowflake against a real moto server and the real snowflake connector, over HTTP."""

from __future__ import annotations

import datetime
import gzip
import io
import itertools
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import snowflake.connector
from moto.server import ThreadedMotoServer
from snowflake.connector.errors import ProgrammingError

from pgsnow.local.snowflake import LocalSnowflake, start_local_snowflake

pytestmark = pytest.mark.integration

BUCKET = "pgsnow-local-sf"
STAGE_PREFIX = "staging"
CSV_FORMAT = (
    "FILE_FORMAT = (TYPE = CSV COMPRESSION = GZIP FIELD_DELIMITER = ',' SKIP_HEADER = 1 "
    "FIELD_OPTIONALLY_ENCLOSED_BY = '\"' ESCAPE_UNENCLOSED_FIELD = NONE NULL_IF = () EMPTY_FIELD_AS_NULL = TRUE)"
)
_names = itertools.count()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def s3(moto_endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture(scope="module")
def local(moto_endpoint: str) -> Iterator[LocalSnowflake]:
    server = start_local_snowflake(s3_endpoint_url=moto_endpoint)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def conn(local: LocalSnowflake) -> Iterator[snowflake.connector.SnowflakeConnection]:
    connection = snowflake.connector.connect(**local.connect_kwargs(database="DB", schema="PUBLIC"))
    cursor = connection.cursor()
    cursor.execute("CREATE SCHEMA IF NOT EXISTS DB.PGSNOW")
    cursor.execute(
        f'CREATE OR REPLACE STAGE "DB"."PGSNOW"."PGSNOW_STAGE" URL = \'s3://{BUCKET}/{STAGE_PREFIX}/\' '
        "STORAGE_INTEGRATION = PGSNOW_S3"
    )
    yield connection
    connection.close()


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_names)}"


def put_csv(s3: Any, key: str, text: str) -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(text.encode("utf-8")))


def put_parquet(s3: Any, key: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    s3.put_object(Bucket=BUCKET, Key=key, Body=buffer.getvalue())


def copy_csv_sql(table: str, columns: list[str], selects: list[str], sub_path: str, files: list[str]) -> str:
    return (
        f'COPY INTO "DB"."PUBLIC"."{table}" ({", ".join(f"{chr(34)}{c}{chr(34)}" for c in columns)}) '
        f'FROM (SELECT {", ".join(selects)} FROM @"DB"."PGSNOW"."PGSNOW_STAGE"/{sub_path}) '
        f"FILES = ({', '.join(repr(f) for f in files)}) {CSV_FORMAT} ON_ERROR = ABORT_STATEMENT"
    )


def rows(conn: snowflake.connector.SnowflakeConnection, sql: str) -> list[tuple[Any, ...]]:
    return list(conn.cursor().execute(sql).fetchall())


def test_csv_keeps_null_empty_and_backslash_n_apart_with_quotes_newlines_and_unicode(
    conn: Any, s3: Any
) -> None:
    # Given a CSV in the staged encoding: unquoted empty = NULL, "" = empty string, \N is text
    table = unique("TEXTS")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0), "V" VARCHAR)')
    put_csv(
        s3,
        f"{STAGE_PREFIX}/public/texts/t1.csv.gz",
        'id,v\n1,\n2,""\n3,\\N\n4,"a, ""quoted""\nline"\n5,żółw 🐢\n',
    )

    # When it is copied with NULL_IF = ()
    result = rows(conn, copy_csv_sql(table, ["ID", "V"], ["$1", "$2"], "public/texts/", ["t1.csv.gz"]))

    # Then every value keeps its identity
    assert result[0][1:4] == ("LOADED", 5, 5)
    loaded = rows(conn, f'SELECT "ID", "V", "V" IS NULL FROM "{table}" ORDER BY "ID"')
    assert loaded == [
        (1, None, True),
        (2, "", False),
        (3, "\\N", False),
        (4, 'a, "quoted"\nline', False),
        (5, "żółw 🐢", False),
    ]


LENGTH_CASES = [
    pytest.param("VARCHAR(5)", "$2", "abcdef", "abcde", id="varchar-declared-length-in-characters"),
    pytest.param("VARCHAR(2)", "$2", "żół", "żó", id="varchar-length-counts-characters-not-bytes"),
    pytest.param(
        "BINARY", "TO_BINARY($2, 'HEX')", "ab" * (8_388_608 + 1), "ab" * 8_388_608, id="binary-over-8mb"
    ),
]


@pytest.mark.parametrize(("column_type", "select", "too_long", "fits"), LENGTH_CASES)
def test_a_value_longer_than_its_column_is_refused_never_cut(
    conn: Any, s3: Any, column_type: str, select: str, too_long: str, fits: str
) -> None:
    # Given a column with a length and a file with a value that fits and one that does not
    table = unique("LENGTHS")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0), "V" {column_type})')
    key_dir = f"lengths/{table.lower()}/"
    put_csv(s3, f"{STAGE_PREFIX}/{key_dir}a.csv.gz", f"id,v\n1,{fits}\n2,{too_long}\n")
    # When it is copied (ON_ERROR = ABORT_STATEMENT), then the statement fails naming the problem
    with pytest.raises(ProgrammingError, match="too long and would be truncated"):
        rows(conn, copy_csv_sql(table, ["ID", "V"], ["$1", select], key_dir, ["a.csv.gz"]))
    # And nothing was loaded, nothing cut short
    assert rows(conn, f'SELECT COUNT(*) FROM "{table}"') == [(0,)]


@pytest.mark.parametrize(
    ("null_if", "expected"),
    [
        pytest.param("", [None, None], id="default-null-if-is-backslash-n"),
        pytest.param("NULL_IF = ()", [None, "\\N"], id="empty-null-if-keeps-text"),
        pytest.param("NULL_IF = ('x')", [None, "\\N"], id="listed-strings-only"),
    ],
)
def test_null_if_in_plain_copy(conn: Any, s3: Any, null_if: str, expected: list[str | None]) -> None:
    table = unique("NULLIF")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0), "V" VARCHAR)')
    key_dir = f"nullif/{table.lower()}/"
    put_csv(s3, f"{STAGE_PREFIX}/{key_dir}a.csv.gz", "1,\n2,\\N\n")

    rows(
        conn,
        f'COPY INTO "{table}" FROM @"DB"."PGSNOW"."PGSNOW_STAGE"/{key_dir} FILES = (\'a.csv.gz\') '
        f"FILE_FORMAT = (TYPE = CSV {null_if} ESCAPE_UNENCLOSED_FIELD = NONE)",
    )

    assert [r[0] for r in rows(conn, f'SELECT "V" FROM "{table}" ORDER BY "ID"')] == expected


def test_typed_csv_columns_convert_exactly(conn: Any, s3: Any) -> None:
    # Given every staged value kind in one CSV
    table = unique("TYPED")
    conn.cursor().execute(
        f'CREATE TABLE "{table}" ("N" NUMBER(38,10), "F" FLOAT, "B" BOOLEAN, "D" DATE, "T" TIME(6), '
        '"TS" TIMESTAMP_NTZ(6), "TZ" TIMESTAMP_TZ(6), "J" VARIANT, "BIN" BINARY)'
    )
    put_csv(
        s3,
        f"{STAGE_PREFIX}/public/typed/t.csv.gz",
        "n,f,b,d,t,ts,tz,j,bin\n"
        "1234567890123456789012345678.0123456789,0.1,true,2024-02-29,23:59:59.999999,2024-01-02 03:04:05.000006,"
        '2024-06-01T22:30:00.000001+02:00,"{""k"": [1, 2.5, null]}",deadBEEF\n'
        "-0.0000000001,-inf,false,0001-01-01,00:00:00,1970-01-01 00:00:00,2024-01-01T00:00:00.000000Z,[],\n",
    )

    # When it is loaded with the loader's transformations
    selects = ["$1", "$2", "$3", "$4", "$5", "$6", "$7", "PARSE_JSON($8)", "TO_BINARY($9, 'HEX')"]
    columns = ["N", "F", "B", "D", "T", "TS", "TZ", "J", "BIN"]
    rows(conn, copy_csv_sql(table, columns, selects, "public/typed/", ["t.csv.gz"]))

    # Then numbers are exact, instants are preserved and JSON/binary round-trip
    first, second = rows(conn, f'SELECT * FROM "{table}" ORDER BY "N" DESC')
    assert first[0] == Decimal("1234567890123456789012345678.0123456789")
    assert first[1] == 0.1
    assert first[2] is True
    assert first[3] == datetime.date(2024, 2, 29)
    assert first[4] == datetime.time(23, 59, 59, 999999)
    assert first[5] == datetime.datetime(2024, 1, 2, 3, 4, 5, 6)
    assert first[6] == datetime.datetime(2024, 6, 1, 20, 30, 0, 1, tzinfo=datetime.UTC)
    assert json.loads(first[7]) == {"k": [1, 2.5, None]}
    assert bytes(first[8]) == bytes.fromhex("deadbeef")
    assert second[0] == Decimal("-0.0000000001")
    assert second[1] == float("-inf")
    assert second[2] is False
    assert json.loads(second[7]) == []
    assert rows(conn, f'SELECT COUNT(*) FROM "{table}" WHERE "BIN" IS NULL') == [(1,)]
    assert rows(conn, f'SELECT "N"::VARCHAR FROM "{table}" ORDER BY "N" DESC LIMIT 1') == [
        ("1234567890123456789012345678.0123456789",)
    ]


def test_parquet_typed_columns_with_decimal_and_timestamp_tz(conn: Any, s3: Any) -> None:
    # Given a Parquet file with the staged Arrow types
    table = unique("PARQ")
    conn.cursor().execute(
        f'CREATE TABLE "{table}" ("ID" NUMBER(38,0), "AMOUNT" NUMBER(20,4), "AT" TIMESTAMP_TZ(6), '
        '"PAYLOAD" VARIANT, "RAW" BINARY, "Mixed Case" VARCHAR)'
    )
    instant = datetime.datetime(2024, 3, 10, 1, 2, 3, 456789, tzinfo=datetime.UTC)
    data = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "amount": pa.array([Decimal("1234567890123456.0001"), None], pa.decimal128(20, 4)),
            "at": pa.array([instant, None], pa.timestamp("us", tz="UTC")),
            "payload": pa.array(['{"a": "b"}', None], pa.string()),
            "raw": pa.array([b"\x00\x01\xff", None], pa.binary()),
            "Mixed Case": pa.array(["x", ""], pa.string()),
        }
    )
    put_parquet(s3, f"{STAGE_PREFIX}/public/parq/p1.parquet", data)

    # When it is loaded with $1:"name" casts
    result = rows(
        conn,
        f'COPY INTO "DB"."PUBLIC"."{table}" ("ID", "AMOUNT", "AT", "PAYLOAD", "RAW", "Mixed Case") '
        'FROM (SELECT $1:"id"::NUMBER(38,0), $1:"amount"::NUMBER(20,4), $1:"at"::TIMESTAMP_TZ(6), '
        'PARSE_JSON($1:"payload"::VARCHAR), $1:"raw"::BINARY, $1:"Mixed Case"::VARCHAR '
        'FROM @"DB"."PGSNOW"."PGSNOW_STAGE"/public/parq/) '
        "FILES = ('p1.parquet') FILE_FORMAT = (TYPE = PARQUET) ON_ERROR = ABORT_STATEMENT FORCE = TRUE",
    )

    # Then the typed values arrive unchanged
    assert result[0][1:4] == ("LOADED", 2, 2)
    loaded = rows(conn, f'SELECT * FROM "{table}" ORDER BY "ID"')
    assert loaded[0][:3] == (1, Decimal("1234567890123456.0001"), instant)
    assert json.loads(loaded[0][3]) == {"a": "b"}
    assert bytes(loaded[0][4]) == b"\x00\x01\xff"
    assert loaded[0][5] == "x"
    assert loaded[1][1] is None
    assert loaded[1][3:6] == (None, None, "")
    assert rows(conn, f'SELECT "AT" IS NULL FROM "{table}" WHERE "ID" = 2') == [(True,)]


def test_parquet_plain_copy_matches_column_names_case_insensitively(conn: Any, s3: Any) -> None:
    table = unique("PLAINPQ")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0), "NAME" VARCHAR, "MISSING" VARCHAR)')
    put_parquet(s3, f"plain/{table}.parquet", pa.table({"name": ["n1"], "id": [7]}))

    rows(
        conn,
        f"COPY INTO \"{table}\" FROM 's3://{BUCKET}/plain/' FILES = ('{table}.parquet') "
        "FILE_FORMAT = (TYPE = PARQUET) MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE",
    )

    assert rows(conn, f'SELECT * FROM "{table}"') == [(7, "n1", None)]


def test_load_history_is_per_table_and_force_reloads(conn: Any, s3: Any) -> None:
    # Given one file and two tables
    first, second = unique("HIST_A"), unique("HIST_B")
    for table in (first, second):
        conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0))')
    put_csv(s3, f"{STAGE_PREFIX}/public/hist/h.csv.gz", "id\n1\n2\n")

    def copy(table: str, force: bool) -> tuple[Any, ...]:
        sql = copy_csv_sql(table, ["ID"], ["$1"], "public/hist/", ["h.csv.gz"])
        return rows(conn, sql + (" FORCE = TRUE" if force else ""))[0]

    # When the file is loaded into the first table twice, then into the second
    loaded = copy(first, force=False)
    skipped = copy(first, force=False)
    other_table = copy(second, force=False)
    forced = copy(first, force=True)

    # Then the repeat is skipped for that table only, and FORCE loads it again
    assert loaded[1:4] == ("LOADED", 2, 2)
    assert skipped[1:4] == ("LOAD_SKIPPED", 0, 0)
    assert other_table[1:4] == ("LOADED", 2, 2)
    assert forced[1:4] == ("LOADED", 2, 2)
    assert rows(conn, f'SELECT COUNT(*) FROM "{first}"') == [(4,)]
    history = rows(
        conn,
        "SELECT TABLE_NAME, STATUS FROM INFORMATION_SCHEMA.LOAD_HISTORY "
        f"WHERE TABLE_NAME IN ('{first}', '{second}') ORDER BY TABLE_NAME, LAST_LOAD_TIME",
    )
    assert history == [(first, "LOADED"), (first, "LOADED"), (second, "LOADED")]


def test_files_under_a_stage_sub_path(conn: Any, s3: Any) -> None:
    table = unique("SUBPATH")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0))')
    put_csv(s3, f"{STAGE_PREFIX}/deep/a/b/one.csv.gz", "id\n1\n")
    put_csv(s3, f"{STAGE_PREFIX}/deep/a/b/two.csv.gz", "id\n2\n")
    put_csv(s3, f"{STAGE_PREFIX}/deep/a/other.csv.gz", "id\n3\n")

    result = rows(conn, copy_csv_sql(table, ["ID"], ["$1"], "deep/a/b/", ["two.csv.gz", "one.csv.gz"]))

    assert [(r[0], r[1]) for r in result] == [
        (f"s3://{BUCKET}/{STAGE_PREFIX}/deep/a/b/two.csv.gz", "LOADED"),
        (f"s3://{BUCKET}/{STAGE_PREFIX}/deep/a/b/one.csv.gz", "LOADED"),
    ]
    assert rows(conn, f'SELECT "ID" FROM "{table}" ORDER BY 1') == [(1,), (2,)]


def test_a_bad_value_aborts_the_whole_statement(conn: Any, s3: Any) -> None:
    # Given two files, the second with a value that is not a number
    table = unique("ABORT")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0), "AMOUNT" NUMBER(10,2))')
    put_csv(s3, f"{STAGE_PREFIX}/public/abort/good.csv.gz", "id,amount\n1,1.50\n")
    put_csv(s3, f"{STAGE_PREFIX}/public/abort/bad.csv.gz", "id,amount\n2,2.00\n3,abc\n")

    # When both are copied in one statement
    sql = copy_csv_sql(table, ["ID", "AMOUNT"], ["$1", "$2"], "public/abort/", ["good.csv.gz", "bad.csv.gz"])
    with pytest.raises(ProgrammingError) as failure:
        conn.cursor().execute(sql)

    # Then the error names the file and column, and nothing was loaded, not even the good file
    message = str(failure.value)
    assert "bad.csv.gz" in message
    assert '"AMOUNT"' in message
    assert "'abc'" in message
    assert failure.value.sqlstate == "22018"
    assert rows(conn, f'SELECT COUNT(*) FROM "{table}"') == [(0,)]
    assert rows(
        conn, f"SELECT COUNT(*) FROM INFORMATION_SCHEMA.LOAD_HISTORY WHERE TABLE_NAME = '{table}'"
    ) == [(0,)]


@pytest.mark.parametrize(
    ("on_error", "expected_result", "expected_ids"),
    [
        pytest.param(
            "CONTINUE", ("PARTIALLY_LOADED", 3, 2, 3, 1), [(1,), (3,)], id="continue-loads-good-rows"
        ),
        pytest.param("SKIP_FILE", ("LOAD_FAILED", 3, 0, 1, 1), [], id="skip-file-loads-nothing-of-it"),
    ],
)
def test_on_error_options(
    conn: Any, s3: Any, on_error: str, expected_result: tuple[Any, ...], expected_ids: list[tuple[int]]
) -> None:
    # Given a file with one bad row (line 3: the header is line 1)
    table = unique("ONERR")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0))')
    put_csv(s3, f"{STAGE_PREFIX}/public/onerr/{table}.csv.gz", "id\n1\nx\n3\n")

    # When it is copied with the ON_ERROR option
    sql = copy_csv_sql(table, ["ID"], ["$1"], "public/onerr/", [f"{table}.csv.gz"]).replace(
        "ON_ERROR = ABORT_STATEMENT", f"ON_ERROR = {on_error}"
    )
    result = rows(conn, sql)[0]

    # Then the result row and the table agree with Snowflake's
    assert result[1:6] == expected_result
    assert result[6] == "Numeric value 'x' is not recognized"
    assert result[7] == 3
    assert result[9] == f'"{table}"["ID":1]'
    assert rows(conn, f'SELECT "ID" FROM "{table}" ORDER BY 1') == expected_ids


def test_null_into_a_not_null_column_aborts(conn: Any, s3: Any) -> None:
    table = unique("NOTNULL")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0) NOT NULL)')
    put_csv(s3, f"{STAGE_PREFIX}/public/notnull/n.csv.gz", "id\n1\n\n")

    with pytest.raises(ProgrammingError, match="NULL result in a non-nullable column"):
        conn.cursor().execute(copy_csv_sql(table, ["ID"], ["$1"], "public/notnull/", ["n.csv.gz"]))
    assert rows(conn, f'SELECT COUNT(*) FROM "{table}"') == [(0,)]


def test_a_missing_file_is_an_error(conn: Any) -> None:
    table = unique("MISSING")
    conn.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0))')

    with pytest.raises(ProgrammingError, match="was not found"):
        conn.cursor().execute(copy_csv_sql(table, ["ID"], ["$1"], "public/none/", ["nope.csv.gz"]))


def test_copy_in_a_rolled_back_transaction_leaves_no_rows(local: LocalSnowflake, s3: Any) -> None:
    # Given a session with autocommit off
    table = unique("TXN")
    put_csv(s3, f"{STAGE_PREFIX}/public/txn/t.csv.gz", "id\n1\n2\n")
    with snowflake.connector.connect(**local.connect_kwargs(database="DB", schema="PUBLIC")) as session:
        session.cursor().execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0))')
        session.autocommit(False)

        # When a COPY runs and the transaction is rolled back
        result = rows(session, copy_csv_sql(table, ["ID"], ["$1"], "public/txn/", ["t.csv.gz"]))
        assert rows(session, f'SELECT COUNT(*) FROM "{table}"') == [(2,)]
        session.rollback()

        # Then neither the rows nor the load history remain, so the file loads again
        assert result[0][1] == "LOADED"
        assert rows(session, f'SELECT COUNT(*) FROM "{table}"') == [(0,)]
        again = rows(session, copy_csv_sql(table, ["ID"], ["$1"], "public/txn/", ["t.csv.gz"]))
        session.commit()
    assert again[0][1] == "LOADED"


def test_query_tag_is_kept_per_session(local: LocalSnowflake) -> None:
    with (
        snowflake.connector.connect(**local.connect_kwargs()) as first,
        snowflake.connector.connect(**local.connect_kwargs()) as second,
    ):
        first.cursor().execute("ALTER SESSION SET QUERY_TAG = 'pgsnow:loader'")
        shown_first = rows(first, "SHOW PARAMETERS LIKE 'QUERY_TAG' IN SESSION")
        shown_second = rows(second, "SHOW PARAMETERS LIKE 'QUERY_TAG' IN SESSION")
        first.cursor().execute("ALTER SESSION UNSET QUERY_TAG")
        shown_after_unset = rows(first, "SHOW PARAMETERS LIKE 'QUERY_TAG'")

    assert shown_first[0][:2] == ("QUERY_TAG", "pgsnow:loader")
    assert shown_second[0][:2] == ("QUERY_TAG", "")
    assert shown_after_unset[0][:2] == ("QUERY_TAG", "")


def test_create_stage_variants(conn: Any) -> None:
    cursor = conn.cursor()
    created = cursor.execute(
        "CREATE STAGE DB.PGSNOW.EXTRA_STAGE URL = 's3://bucket/x/' "
        "CREDENTIALS = (AWS_KEY_ID = 'k' AWS_SECRET_KEY = 's') FILE_FORMAT = (TYPE = CSV)"
    ).fetchall()
    kept = cursor.execute(
        "CREATE STAGE IF NOT EXISTS DB.PGSNOW.EXTRA_STAGE URL = 's3://bucket/y/' STORAGE_INTEGRATION = I"
    ).fetchall()
    with pytest.raises(ProgrammingError, match="already exists"):
        cursor.execute("CREATE STAGE DB.PGSNOW.EXTRA_STAGE URL = 's3://bucket/z/'")
    cursor.execute(
        "CREATE OR REPLACE STAGE DB.PGSNOW.EXTRA_STAGE URL = 's3://bucket/w/' STORAGE_INTEGRATION = I"
    )

    assert created == [("Stage area EXTRA_STAGE successfully created.",)]
    assert kept == [("EXTRA_STAGE already exists, statement succeeded.",)]
    shown = [
        row for row in cursor.execute("SHOW STAGES IN SCHEMA DB.PGSNOW").fetchall() if "EXTRA_STAGE" in row
    ]
    assert len(shown) == 1
    assert "s3://bucket/w/" in shown[0]


def test_databases_and_stages_survive_a_restart(moto_endpoint: str, s3: Any, tmp_path: Path) -> None:
    # Given a persistent local Snowflake with a loaded table
    put_csv(s3, f"{STAGE_PREFIX}/public/persist/p.csv.gz", "id\n42\n")
    first = start_local_snowflake(s3_endpoint_url=moto_endpoint, data_dir=tmp_path)
    try:
        with snowflake.connector.connect(**first.connect_kwargs(database="KEEP", schema="PUBLIC")) as session:
            cursor = session.cursor()
            cursor.execute("CREATE SCHEMA IF NOT EXISTS KEEP.PGSNOW")
            cursor.execute(f"CREATE STAGE KEEP.PGSNOW.PGSNOW_STAGE URL = 's3://{BUCKET}/{STAGE_PREFIX}/'")
            cursor.execute('CREATE TABLE "T" ("ID" NUMBER(38,0))')
            cursor.execute(
                'COPY INTO "T" FROM (SELECT $1 FROM @KEEP.PGSNOW.PGSNOW_STAGE/public/persist/) '
                f"FILES = ('p.csv.gz') {CSV_FORMAT}"
            )
    finally:
        first.stop()

    # When a new server starts on the same directory
    second = start_local_snowflake(s3_endpoint_url=moto_endpoint, data_dir=tmp_path)
    try:
        with snowflake.connector.connect(**second.connect_kwargs()) as session:
            kept_rows = rows(session, 'SELECT "ID" FROM KEEP.PUBLIC."T"')
        with snowflake.connector.connect(
            **second.connect_kwargs(database="KEEP", schema="PUBLIC")
        ) as session:
            # Then the rows, the stage and the load history are all still there
            repeat = rows(
                session,
                'COPY INTO "T" FROM (SELECT $1 FROM @KEEP.PGSNOW.PGSNOW_STAGE/public/persist/) '
                f"FILES = ('p.csv.gz') {CSV_FORMAT}",
            )
    finally:
        second.stop()
    assert kept_rows == [(42,)]
    assert repeat[0][1] == "LOAD_SKIPPED"


def test_statements_we_do_not_handle_are_fakesnow_as_is(conn: Any) -> None:
    cursor = conn.cursor()
    table = unique("PASS")
    cursor.execute(f'CREATE TABLE "{table}" ("ID" NUMBER(38,0), "V" VARCHAR)')
    cursor.execute(f'INSERT INTO "{table}" VALUES (%s, %s)', (1, "a"))
    cursor.execute(
        f"MERGE INTO \"{table}\" t USING (SELECT 1 AS ID, 'b' AS V) s ON t.ID = s.ID "
        "WHEN MATCHED THEN UPDATE SET t.V = s.V"
    )
    assert rows(conn, f'SELECT "ID", "V" FROM "{table}"') == [(1, "b")]
    cursor.execute("ALTER SESSION SET QUOTED_IDENTIFIERS_IGNORE_CASE = FALSE")


def test_query_history_lists_each_statement_as_the_client_sent_it(local: LocalSnowflake, conn: Any) -> None:
    table = unique("HISTORY")
    mark = local.history.mark()
    rows(conn, f"CREATE TABLE {table} (ID INT)")
    rows(conn, f"INSERT INTO {table} VALUES (%s)" % 1)
    conn.autocommit(False)
    rows(conn, f"INSERT INTO {table} VALUES (2)")
    conn.commit()
    conn.autocommit(True)
    sent = [s.sql_text for s in local.history.since(mark)]
    assert sent[:2] == [f"CREATE TABLE {table} (ID INT)", f"INSERT INTO {table} VALUES (1)"]
    assert f"INSERT INTO {table} VALUES (2)" in sent
    assert sum(1 for text in sent if text.strip().upper() == "COMMIT") == 1
    assert rows(conn, f"SELECT COUNT(*) FROM {table}") == [(2,)]
