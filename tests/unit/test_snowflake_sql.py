from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from snowflake.connector import errors as sf_errors

from pgsnow.config import Component, Settings, SnowflakeSettings
from pgsnow.errors import ConfigError, PermanentError, PgSnowError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, StagedObject, parse_data_key
from pgsnow.manifest import Column
from pgsnow.snowflake.connection import connection_kwargs
from pgsnow.snowflake.error_classifier import classify_snowflake_error, redact_credentials
from pgsnow.snowflake.load_sql import (
    AwsCredentials,
    LoadColumn,
    UrlSource,
    aws_credentials_from,
    build_copy_into,
    build_create_file_format,
    build_create_stage,
    build_create_temporary_stage,
    build_query_tag,
    build_table_pipe,
    load_columns_from_table,
)
from pgsnow.snowflake.session_sql import build_set_lock_timeout, session_setup_sql
from pgsnow.snowflake.sql_text import placeholder_list, string_literal
from pgsnow.snowflake.table_sql import (
    build_add_run_id_column,
    build_create_schema,
    build_create_table,
    build_create_work_table,
    build_merge_from,
    build_select_table_columns,
    build_select_work_tables,
)
from pgsnow.typemap import ValueKind, map_pg_type

pytestmark = pytest.mark.unit

RUN = "20261125T120000000000Z"


def column(name: str, pg_type: str, *, nullable: bool = True) -> Column:
    return Column.from_types(name, pg_type, pg_type, map_pg_type(pg_type), nullable)


ORDERS_COLUMNS = (
    column("order_id", "bigint", nullable=False),
    column("payload", "jsonb"),
    column("blob", "bytea"),
)


def test_copy_into_csv_matches_the_documented_shape() -> None:
    staged = parse_data_key(f"staging/public/orders/public_orders_batch1_{RUN}.csv.gz", "staging")

    sql = build_copy_into(
        database="DB",
        control_schema="PGSNOW",
        stage="PGSNOW_STAGE",
        staged=staged,
        columns=[LoadColumn.from_manifest(c) for c in ORDERS_COLUMNS],
    )

    assert sql == (
        'COPY INTO "DB"."PUBLIC"."ORDERS" ("ORDER_ID", "PAYLOAD", "BLOB")\n'
        "  FROM (SELECT $1, PARSE_JSON($2), TO_BINARY($3, 'HEX') "
        'FROM @"DB"."PGSNOW"."PGSNOW_STAGE"/public/orders/)\n'
        f"  FILES = ('public_orders_batch1_{RUN}.csv.gz')\n"
        "  FILE_FORMAT = (TYPE = CSV COMPRESSION = GZIP FIELD_DELIMITER = ',' SKIP_HEADER = 1\n"
        "                 FIELD_OPTIONALLY_ENCLOSED_BY = '\"' ESCAPE_UNENCLOSED_FIELD = NONE\n"
        "                 NULL_IF = () EMPTY_FIELD_AS_NULL = TRUE)\n"
        "  ON_ERROR = ABORT_STATEMENT FORCE = TRUE"
    )


def test_copy_into_plain_csv_is_not_decompressed() -> None:
    staged = parse_data_key("staging/public/orders/hand.csv", "staging")

    sql = build_copy_into(
        database="DB",
        control_schema="PGSNOW",
        stage="PGSNOW_STAGE",
        staged=staged,
        columns=[LoadColumn.from_manifest(ORDERS_COLUMNS[0])],
    )

    assert "COMPRESSION = NONE" in sql
    assert "FILES = ('hand.csv')" in sql


def test_copy_into_parquet_matches_the_documented_shape() -> None:
    staged = parse_data_key(f"staging/public/orders/public_orders_batch2_{RUN}.parquet", "staging")

    sql = build_copy_into(
        database="DB",
        control_schema="PGSNOW",
        stage="PGSNOW_STAGE",
        staged=staged,
        columns=[LoadColumn.from_manifest(c) for c in ORDERS_COLUMNS],
    )

    assert sql == (
        'COPY INTO "DB"."PUBLIC"."ORDERS" ("ORDER_ID", "PAYLOAD", "BLOB")\n'
        '  FROM (SELECT $1:"order_id"::NUMBER(38,0), PARSE_JSON($1:"payload"::VARCHAR), $1:"blob"::BINARY '
        'FROM @"DB"."PGSNOW"."PGSNOW_STAGE"/public/orders/)\n'
        f"  FILES = ('public_orders_batch2_{RUN}.parquet')\n"
        "  FILE_FORMAT = (TYPE = PARQUET)\n"
        "  ON_ERROR = ABORT_STATEMENT FORCE = TRUE"
    )


@pytest.mark.parametrize(
    ("name_files", "force", "files_line", "last_line"),
    [
        pytest.param(
            True, True, "  FILES = ('hand.csv')\n", "  ON_ERROR = ABORT_STATEMENT FORCE = TRUE", id="loader"
        ),
        pytest.param(False, True, "", "  ON_ERROR = ABORT_STATEMENT FORCE = TRUE", id="no-files"),
        pytest.param(True, False, "  FILES = ('hand.csv')\n", "  ON_ERROR = ABORT_STATEMENT", id="no-force"),
        pytest.param(False, False, "", "  ON_ERROR = ABORT_STATEMENT", id="pipe-shape"),
    ],
)
def test_copy_into_names_files_and_forces_only_when_asked(
    name_files: bool, force: bool, files_line: str, last_line: str
) -> None:
    staged = parse_data_key("staging/public/orders/hand.csv", "staging")

    sql = build_copy_into(
        database="DB",
        control_schema="PGSNOW",
        stage="PGSNOW_STAGE",
        staged=staged,
        columns=[LoadColumn.from_manifest(ORDERS_COLUMNS[0])],
        name_files=name_files,
        force=force,
    )

    assert sql == (
        'COPY INTO "DB"."PUBLIC"."ORDERS" ("ORDER_ID")\n'
        '  FROM (SELECT $1 FROM @"DB"."PGSNOW"."PGSNOW_STAGE"/public/orders/)\n'
        f"{files_line}"
        "  FILE_FORMAT = (TYPE = CSV COMPRESSION = NONE FIELD_DELIMITER = ',' SKIP_HEADER = 1\n"
        "                 FIELD_OPTIONALLY_ENCLOSED_BY = '\"' ESCAPE_UNENCLOSED_FIELD = NONE\n"
        "                 NULL_IF = () EMPTY_FIELD_AS_NULL = TRUE)\n"
        f"{last_line}"
    )


@pytest.mark.parametrize(
    ("replace", "create"),
    [
        pytest.param(False, "CREATE PIPE IF NOT EXISTS", id="kept"),
        pytest.param(True, "CREATE OR REPLACE PIPE", id="redefined"),
    ],
)
def test_table_pipe_is_the_loaders_copy_naming_no_files(replace: bool, create: str) -> None:
    staged = parse_data_key(f"staging/public/orders/public_orders_batch2_{RUN}.parquet", "staging")

    sql = build_table_pipe(
        database="DB",
        control_schema="PGSNOW",
        stage="PGSNOW_STAGE",
        pipe="PGSNOW_PIPE_PUBLIC_ORDERS",
        staged=staged,
        columns=[LoadColumn.from_manifest(c) for c in ORDERS_COLUMNS],
        replace=replace,
    )

    assert sql == (
        f'{create} "DB"."PGSNOW"."PGSNOW_PIPE_PUBLIC_ORDERS" AUTO_INGEST = FALSE AS\n'
        'COPY INTO "DB"."PUBLIC"."ORDERS" ("ORDER_ID", "PAYLOAD", "BLOB")\n'
        '  FROM (SELECT $1:"order_id"::NUMBER(38,0), PARSE_JSON($1:"payload"::VARCHAR), $1:"blob"::BINARY '
        'FROM @"DB"."PGSNOW"."PGSNOW_STAGE"/public/orders/)\n'
        "  FILE_FORMAT = (TYPE = PARQUET)\n"
        "  ON_ERROR = ABORT_STATEMENT"
    )


def test_named_csv_file_format_has_the_copys_options_on_one_line() -> None:
    sql = build_create_file_format("DB", "PGSNOW", "PGSNOW_CSV", FileFormat.CSV)

    assert sql == (
        'CREATE FILE FORMAT IF NOT EXISTS "DB"."PGSNOW"."PGSNOW_CSV" TYPE = CSV COMPRESSION = AUTO '
        "FIELD_DELIMITER = ',' SKIP_HEADER = 1 FIELD_OPTIONALLY_ENCLOSED_BY = '\"' "
        "ESCAPE_UNENCLOSED_FIELD = NONE NULL_IF = () EMPTY_FIELD_AS_NULL = TRUE"
    )


@pytest.mark.parametrize(
    ("values", "placeholders"),
    [
        pytest.param(["a"], "%s", id="one"),
        pytest.param(["a", "b", "c"], "%s, %s, %s", id="three"),
    ],
)
def test_placeholder_list_has_one_placeholder_per_value(values: list[str], placeholders: str) -> None:
    assert placeholder_list(values, empty_error="no keys") == placeholders


def test_placeholder_list_refuses_no_values() -> None:
    with pytest.raises(PermanentError, match="no keys to look up"):
        placeholder_list([], empty_error="no keys to look up")


@pytest.mark.parametrize(
    ("pg_type", "csv_expression", "parquet_expression"),
    [
        pytest.param("integer", "$1", '$1:"c"::NUMBER(38,0)', id="integer"),
        pytest.param("numeric(12,2)", "$1", '$1:"c"::NUMBER(12,2)', id="decimal"),
        pytest.param("double precision", "$1", '$1:"c"::FLOAT', id="float"),
        pytest.param("text", "$1", '$1:"c"::VARCHAR(134217728)', id="text"),
        pytest.param("boolean", "$1", '$1:"c"::BOOLEAN', id="boolean"),
        pytest.param("date", "$1", '$1:"c"::DATE', id="date"),
        pytest.param("time without time zone", "$1", '$1:"c"::TIME(6)', id="time"),
        pytest.param("timestamp without time zone", "$1", '$1:"c"::TIMESTAMP_NTZ(6)', id="timestamp"),
        pytest.param("timestamp with time zone", "$1", '$1:"c"::TIMESTAMP_TZ(6)', id="timestamptz"),
        pytest.param("jsonb", "PARSE_JSON($1)", 'PARSE_JSON($1:"c"::VARCHAR)', id="json"),
        pytest.param("integer[]", "PARSE_JSON($1)", 'PARSE_JSON($1:"c"::VARCHAR)', id="array-as-json"),
        pytest.param("bytea", "TO_BINARY($1, 'HEX')", '$1:"c"::BINARY', id="binary"),
        pytest.param(
            "vector(3)",
            "PARSE_JSON($1)::ARRAY::VECTOR(FLOAT, 3)",
            'PARSE_JSON($1:"c"::VARCHAR)::ARRAY::VECTOR(FLOAT, 3)',
            id="vector",
        ),
        pytest.param("geometry", "TO_GEOMETRY($1)", 'TO_GEOMETRY($1:"c"::VARCHAR)', id="geometry"),
        pytest.param(
            "geography(Point,4326)", "TO_GEOGRAPHY($1)", 'TO_GEOGRAPHY($1:"c"::VARCHAR)', id="geography"
        ),
    ],
)
def test_select_expression_per_value_kind(pg_type: str, csv_expression: str, parquet_expression: str) -> None:
    columns = [LoadColumn.from_manifest(column("c", pg_type))]
    csv = parse_data_key("staging/s/t/f.csv.gz", "staging")
    parquet = parse_data_key("staging/s/t/f.parquet", "staging")

    csv_sql = build_copy_into(database="D", control_schema="C", stage="S", staged=csv, columns=columns)
    parquet_sql = build_copy_into(
        database="D", control_schema="C", stage="S", staged=parquet, columns=columns
    )

    assert f"FROM (SELECT {csv_expression} FROM " in csv_sql
    assert f"FROM (SELECT {parquet_expression} FROM " in parquet_sql


@pytest.mark.parametrize(
    ("key", "table_sql", "columns_sql", "location", "files"),
    [
        pytest.param(
            "staging/Sales/Order Lines/it's here.csv.gz",
            '"DB"."Sales"."Order Lines"',
            '("Say ""hi""", "ÉTÉ", "Ünïcödé col")',
            '@"DB"."PGSNOW"."PGSNOW_STAGE"/',
            "FILES = ('Sales/Order Lines/it''s here.csv.gz')",
            id="space-in-table-goes-into-files",
        ),
        pytest.param(
            "staging/public/orders/back\\slash.csv.gz",
            '"DB"."PUBLIC"."ORDERS"',
            '("Say ""hi""", "ÉTÉ", "Ünïcödé col")',
            '@"DB"."PGSNOW"."PGSNOW_STAGE"/public/orders/',
            "FILES = ('back\\\\slash.csv.gz')",
            id="backslash-in-file-name-escaped",
        ),
        pytest.param(
            'staging/my"schema/t/f.parquet',
            '"DB"."my""schema"."T"',
            '("Say ""hi""", "ÉTÉ", "Ünïcödé col")',
            '@"DB"."PGSNOW"."PGSNOW_STAGE"/',
            "FILES = ('my\"schema/t/f.parquet')",
            id="double-quote-in-schema",
        ),
    ],
)
def test_weird_identifiers_are_quoted(
    key: str, table_sql: str, columns_sql: str, location: str, files: str
) -> None:
    staged = parse_data_key(key, "staging")
    columns = [
        LoadColumn.from_manifest(column('Say "hi"', "text")),
        LoadColumn.from_manifest(column("ÉTÉ", "text")),
        LoadColumn.from_manifest(column("Ünïcödé col", "text")),
    ]

    sql = build_copy_into(
        database="DB", control_schema="PGSNOW", stage="PGSNOW_STAGE", staged=staged, columns=columns
    )

    assert sql.startswith(f"COPY INTO {table_sql} {columns_sql}\n")
    assert f" FROM {location})\n" in sql
    assert files in sql


def test_parquet_path_of_a_name_with_quotes_is_quoted() -> None:
    staged = parse_data_key("staging/s/t/f.parquet", "staging")
    columns = [LoadColumn.from_manifest(column('we"ird', "integer"))]

    sql = build_copy_into(database="DB", control_schema="C", stage="S", staged=staged, columns=columns)

    assert '$1:"we""ird"::NUMBER(38,0)' in sql


def test_create_table_uses_the_type_map_and_not_null() -> None:
    sql = build_create_table(
        "DB", (*ORDERS_COLUMNS, column("Mixed Case", "numeric(10,2)")), TableRef("public", "orders")
    )

    assert sql == (
        'CREATE TABLE IF NOT EXISTS "DB"."PUBLIC"."ORDERS" (\n'
        '  "ORDER_ID" NUMBER(38,0) NOT NULL,\n'
        '  "PAYLOAD" VARIANT,\n'
        '  "BLOB" BINARY,\n'
        '  "Mixed Case" NUMBER(10,2)\n'
        ")"
    )


def test_create_table_without_columns_is_refused() -> None:
    with pytest.raises(PermanentError):
        build_create_table("DB", (), TableRef("public", "orders"))


def test_create_schema_quotes_names() -> None:
    assert build_create_schema("D b", 'S"x') == 'CREATE SCHEMA IF NOT EXISTS "D b"."S""x"'


def test_select_table_columns_binds_the_names() -> None:
    sql, params = build_select_table_columns("DB", "PUBLIC", "it's")

    assert '"DB"."INFORMATION_SCHEMA"."COLUMNS"' in sql
    assert params == ("PUBLIC", "it's")
    assert "it's" not in sql


def test_load_columns_from_an_existing_table() -> None:
    rows = [("ORDER_ID", "NUMBER"), ("Mixed", "TEXT"), ("PAYLOAD", "VARIANT"), ("BLOB", "BINARY")]

    columns = load_columns_from_table(rows)

    assert columns == [
        LoadColumn("order_id", "ORDER_ID", ValueKind.DECIMAL, "NUMBER"),
        LoadColumn("Mixed", "Mixed", ValueKind.TEXT, "VARCHAR"),
        LoadColumn("payload", "PAYLOAD", ValueKind.JSON, "VARIANT"),
        LoadColumn("blob", "BLOB", ValueKind.BINARY, "BINARY"),
    ]


def test_query_tag_carries_run_and_table_as_an_escaped_literal() -> None:
    sql = build_query_tag(run_id=RUN, table=TableRef("public", "it's"), s3_key="staging/public/it's/f.csv")

    assert sql == (
        "ALTER SESSION SET QUERY_TAG = "
        f'\'{{"app": "pgsnow", "run_id": "{RUN}", "table": "public.it\'\'s", '
        '"s3_key": "staging/public/it\'\'s/f.csv"}\''
    )


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        pytest.param("plain", "'plain'", id="plain"),
        pytest.param("it's", "'it''s'", id="single-quote"),
        pytest.param("a\\b", "'a\\\\b'", id="backslash"),
        pytest.param("ünï", "'ünï'", id="unicode"),
    ],
)
def test_string_literal(value: str, literal: str) -> None:
    assert string_literal(value) == literal


def test_string_literal_refuses_control_characters() -> None:
    with pytest.raises(PermanentError):
        string_literal("a\nb")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(sf_errors.OperationalError(msg="x", errno=250001), RetryableError, id="cannot-connect"),
        pytest.param(sf_errors.OperationalError(msg="x", errno=250003), RetryableError, id="request-failed"),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=604, sqlstate="57014"), RetryableError, id="timeout"
        ),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=625, sqlstate="57014"),
            RetryableError,
            id="lock-waiters",
        ),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=12345, sqlstate="40001"),
            RetryableError,
            id="txn-conflict",
        ),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=606, sqlstate="57P03"),
            RetryableError,
            id="warehouse-suspended",
        ),
        pytest.param(sf_errors.ProgrammingError(msg="x", errno=390114), RetryableError, id="token-expired"),
        pytest.param(sf_errors.ServiceUnavailableError(msg="x"), RetryableError, id="http-503"),
        pytest.param(ConnectionResetError("reset"), RetryableError, id="socket-reset"),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=1003, sqlstate="42000"),
            PermanentError,
            id="sql-compilation",
        ),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=2003, sqlstate="42S02"),
            PermanentError,
            id="object-missing",
        ),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=3001, sqlstate="42501"), PermanentError, id="permission"
        ),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=100038, sqlstate="22018"),
            PermanentError,
            id="conversion",
        ),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=100072, sqlstate="22000"),
            PermanentError,
            id="data-error",
        ),
        pytest.param(
            sf_errors.ProgrammingError(msg="x", errno=9999), PermanentError, id="unknown-programming"
        ),
        pytest.param(ValueError("bug"), PermanentError, id="not-a-driver-error"),
    ],
)
def test_classify_snowflake_error(error: BaseException, expected: type[PgSnowError]) -> None:
    classified = classify_snowflake_error(error, table="public.orders", s3_key="k", run_id=RUN)

    assert type(classified) is expected
    assert (classified.table, classified.s3_key, classified.run_id) == ("public.orders", "k", RUN)


def test_classify_keeps_sqlstate() -> None:
    error = sf_errors.ProgrammingError(msg="bad number", errno=100038, sqlstate="22018")

    classified = classify_snowflake_error(error)

    assert classified.sqlstate == "22018"
    assert "bad number" in classified.message


LOCK_TIMEOUT_MESSAGE = (
    "Statement '01b6c04c-0108-5374-0008-50d700010052' has locked table 'LOAD_LEDGER__PUBLIC__ITEMS' "
    "in transaction 1725239781553000000 and this lock has not yet been released. Your statement "
    "'01b6c04c-0108-5374-0008-50d700010056' was aborted because the lock timeout was exceeded."
)


@pytest.mark.parametrize(
    "sqlstate", [pytest.param("57014", id="with-sqlstate"), pytest.param(None, id="errno-only")]
)
def test_a_lock_wait_that_reached_the_lock_timeout_is_retryable(sqlstate: str | None) -> None:
    # A statement that gave up waiting for a lock another transaction holds (the session's
    # LOCK_TIMEOUT): its files go back to the queue and load once the lock is released.
    error = sf_errors.ProgrammingError(msg=LOCK_TIMEOUT_MESSAGE, errno=625, sqlstate=sqlstate)

    classified = classify_snowflake_error(error, table="public.items")

    assert type(classified) is RetryableError
    assert "LOAD_LEDGER__PUBLIC__ITEMS" in classified.message  # names what holds the lock
    assert "1725239781553000000" in classified.message  # the transaction to look for (or abort)


def test_classify_passes_our_own_errors_through() -> None:
    ours = RetryableError("manifest not there yet")

    assert classify_snowflake_error(ours, table="public.orders") is ours
    assert ours.table == "public.orders"


def settings(**changes: object) -> SnowflakeSettings:
    values: dict[str, object] = {
        "account": "acct",
        "user": "loader",
        "password": "pw",
        "secret_arn": None,
        "database": "DB",
        "warehouse": "WH",
        "role": None,
        "stage": "PGSNOW_STAGE",
        "control_schema": "PGSNOW",
        "storage_integration": None,
        "host": None,
        "port": None,
        "protocol": "https",
    }
    values.update(changes)
    return SnowflakeSettings(**values)  # type: ignore[arg-type]


def test_connection_kwargs_for_a_local_server() -> None:
    kwargs = connection_kwargs(settings(host="127.0.0.1", port=8123, protocol="http"))

    assert kwargs["password"] == "pw"
    assert (kwargs["host"], kwargs["port"], kwargs["protocol"]) == ("127.0.0.1", 8123, "http")
    assert kwargs["paramstyle"] == "pyformat"
    assert "role" not in kwargs


@pytest.mark.parametrize(
    ("lock_timeout_s", "expected"),
    [
        pytest.param(300, ["ALTER SESSION SET LOCK_TIMEOUT = 300"], id="a-function"),
        pytest.param(None, [], id="the-cli-keeps-snowflakes-default"),
    ],
)
def test_the_session_setup_sets_the_lock_timeout(lock_timeout_s: int | None, expected: list[str]) -> None:
    assert session_setup_sql(settings(lock_timeout_s=lock_timeout_s)) == expected


@pytest.mark.parametrize("seconds", [0, -1, True, 1.5])
def test_a_lock_timeout_is_a_whole_number_of_seconds(seconds: Any) -> None:
    with pytest.raises(PermanentError):
        build_set_lock_timeout(seconds)


BASE_ENV = {
    "S3_STAGE_BUCKET": "b",
    "SNOWFLAKE_ACCOUNT": "acct",
    "SNOWFLAKE_DATABASE": "DB",
    "LOADER_TIMEOUT_S": "900",
    "CLEANUP_TIMEOUT_S": "300",
}


@pytest.mark.parametrize(
    ("component", "environment", "expected"),
    [
        pytest.param(Component.LOADER, BASE_ENV, 300, id="loader"),
        pytest.param(Component.CLEANUP, BASE_ENV, 100, id="cleanup"),
        pytest.param(Component.LOCAL, BASE_ENV, None, id="cli"),
        pytest.param(Component.LOADER, {**BASE_ENV, "LOADER_TIMEOUT_S": ""}, None, id="not-told"),
        pytest.param(Component.LOADER, {**BASE_ENV, "LOADER_TIMEOUT_S": "2"}, 1, id="at-least-a-second"),
    ],
)
def test_the_lock_timeout_is_a_third_of_the_functions_own_timeout(
    component: Component, environment: dict[str, str], expected: int | None
) -> None:
    assert Settings.from_env(environment, component=component).snowflake.lock_timeout_s == expected


def test_connection_kwargs_need_a_credential() -> None:
    with pytest.raises(ConfigError):
        connection_kwargs(settings(password=None))


@pytest.mark.parametrize(
    ("integration", "expected_tail"),
    [
        pytest.param("S3_INT", ' STORAGE_INTEGRATION = "S3_INT"', id="deployed"),
        pytest.param(None, "", id="local"),
    ],
)
def test_create_stage(integration: str | None, expected_tail: str) -> None:
    sql = build_create_stage(
        "DB", "PGSNOW", "PGSNOW_STAGE", bucket="my-bucket", prefix="staging/", storage_integration=integration
    )

    assert sql == (
        'CREATE STAGE IF NOT EXISTS "DB"."PGSNOW"."PGSNOW_STAGE" URL = \'s3://my-bucket/staging/\''
        + expected_tail
    )


def test_work_tables_older_than_a_time_are_read_from_information_schema_tables() -> None:
    created_before = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)

    sql, params = build_select_work_tables("DB", "PGSNOW", created_before=created_before)

    assert sql == (
        'SELECT "TABLE_NAME", "CREATED"\n'
        'FROM "DB"."INFORMATION_SCHEMA"."TABLES"\n'
        'WHERE "TABLE_SCHEMA" = %s AND "TABLE_TYPE" = \'BASE TABLE\' AND "CREATED" < %s\n'
        'AND (STARTSWITH("TABLE_NAME", %s) OR STARTSWITH("TABLE_NAME", %s) OR STARTSWITH("TABLE_NAME", %s))\n'
        'ORDER BY "CREATED", "TABLE_NAME"'
    )
    assert params == ("PGSNOW", created_before, "_PGSNOW_MERGE_", "_PGSNOW_KEYS_", "_PGSNOW_CHANGES_")


def test_a_work_table_is_transient() -> None:
    columns = [column("id", "integer", nullable=False)]

    assert build_create_work_table(("DB", "PGSNOW", "_PGSNOW_CHANGES_0123456789ABCDEF"), columns) == (
        'CREATE OR REPLACE TRANSIENT TABLE "DB"."PGSNOW"."_PGSNOW_CHANGES_0123456789ABCDEF" ("ID" NUMBER(38,0))'
    )


def _merge_columns() -> list[Column]:
    return [
        column("id", "integer", nullable=False),
        column("note", "text"),
        column("updated_at", "timestamp with time zone"),
    ]


def test_merge_without_a_cursor_orders_rows_by_the_run_that_wrote_them() -> None:
    statement, params = build_merge_from(
        target=("DB", "S", "T"),
        source=("DB", "PGSNOW", "W"),
        columns=_merge_columns(),
        primary_key=["id"],
        cursor_column=None,
        run_id=RUN,
    )
    assert params == (RUN,)  # bound, not spliced
    assert 'USING (SELECT *, %s AS "_PGSNOW_RUN_ID" FROM "DB"."PGSNOW"."W"' in statement
    assert (
        'WHEN MATCHED AND ("TARGET"."_PGSNOW_RUN_ID" IS NULL OR "SOURCE"."_PGSNOW_RUN_ID" >= '
        '"TARGET"."_PGSNOW_RUN_ID") THEN UPDATE SET' in statement
    )
    assert '"_PGSNOW_RUN_ID" = "SOURCE"."_PGSNOW_RUN_ID"' in statement
    assert 'INSERT ("ID", "NOTE", "UPDATED_AT", "_PGSNOW_RUN_ID")' in statement
    assert build_add_run_id_column(("DB", "S", "T")) == (
        'ALTER TABLE "DB"."S"."T" ADD COLUMN IF NOT EXISTS "_PGSNOW_RUN_ID" VARCHAR'
    )


def test_merge_with_a_cursor_needs_no_run_column() -> None:
    statement, params = build_merge_from(
        target=("DB", "S", "T"),
        source=("DB", "PGSNOW", "W"),
        columns=_merge_columns(),
        primary_key=["id"],
        cursor_column="updated_at",
        run_id=RUN,
    )
    assert params == ()
    assert "_PGSNOW_RUN_ID" not in statement
    assert 'ORDER BY "UPDATED_AT" DESC NULLS LAST' in statement
    assert (
        'WHEN MATCHED AND ("TARGET"."UPDATED_AT" IS NULL OR "SOURCE"."UPDATED_AT" >= "TARGET"."UPDATED_AT")'
        in statement
    )


# --------------------------------------------------------------------------- credentials method

CREDENTIALS = AwsCredentials("ASIAEXAMPLEKEY000001", "c2VjcmV0L2tleStzbGFzaA==", "dG9rZW4vd2l0aCtwbHVz")


def test_temporary_stage_carries_the_credentials_under_the_permanent_stages_name() -> None:
    sql = build_create_temporary_stage(
        "D b", "PGSNOW", "PGSNOW_STAGE", bucket="my-bucket", prefix="/staging/", credentials=CREDENTIALS
    )
    assert sql == (
        'CREATE OR REPLACE TEMPORARY STAGE "D b"."PGSNOW"."PGSNOW_STAGE" URL = \'s3://my-bucket/staging/\' '
        "CREDENTIALS = (AWS_KEY_ID = 'ASIAEXAMPLEKEY000001' AWS_SECRET_KEY = 'c2VjcmV0L2tleStzbGFzaA==' "
        "AWS_TOKEN = 'dG9rZW4vd2l0aCtwbHVz')"
    )


@pytest.mark.parametrize(
    ("source", "auth"),
    [
        pytest.param(
            UrlSource("bkt", storage_integration="S3_INT"),
            '  STORAGE_INTEGRATION = "S3_INT"\n',
            id="integration",
        ),
        pytest.param(
            UrlSource("bkt", credentials=CREDENTIALS),
            "  CREDENTIALS = (AWS_KEY_ID = 'ASIAEXAMPLEKEY000001' AWS_SECRET_KEY = 'c2VjcmV0L2tleStzbGFzaA==' "
            "AWS_TOKEN = 'dG9rZW4vd2l0aCtwbHVz')\n",
            id="credentials",
        ),
    ],
)
def test_key_list_copy_from_a_url_is_a_standard_load_with_the_auth_after_the_location(
    source: UrlSource, auth: str
) -> None:
    """Snowflake takes a transformation (SELECT) only from a stage; from a URL, the standard load."""
    key_file = StagedObject(
        key=f"_pgsnow/keys/public/orders/{RUN}.csv.gz",
        table=TableRef("public", "orders"),
        file_name=f"{RUN}.csv.gz",
        file_format=FileFormat.CSV,
        gzip=True,
        run_id=RUN,
        batch=None,
    )
    sql = build_copy_into(
        database="DB",
        control_schema="PGSNOW",
        stage="PGSNOW_STAGE",
        staged=key_file,
        columns=[LoadColumn("order_id", "ORDER_ID", ValueKind.INTEGER, "NUMBER(19,0)")],
        target=("DB", "PGSNOW", "_PGSNOW_KEYS_X"),
        url_source=source,
    )
    assert sql.startswith(
        'COPY INTO "DB"."PGSNOW"."_PGSNOW_KEYS_X"\n'
        "  FROM 's3://bkt/_pgsnow/keys/public/orders/'\n"
        f"{auth}"
        f"  FILES = ('{RUN}.csv.gz')\n"
        "  FILE_FORMAT = (TYPE = CSV COMPRESSION = GZIP"
    )
    assert "SELECT" not in sql


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("access_key_id", "AKIA' OR 1=1", id="quote-in-key-id"),
        pytest.param("secret_access_key", "abc)def", id="paren-in-secret"),
        pytest.param("session_token", "tok\nen", id="newline-in-token"),
        pytest.param("access_key_id", "", id="empty-key-id"),
    ],
)
def test_malformed_credentials_are_refused_without_echoing_them(field: str, value: str) -> None:
    values = {"access_key_id": "AKIAOK", "secret_access_key": "c2VjcmV0", "session_token": "dG9rZW4="}
    with pytest.raises(PermanentError) as caught:
        AwsCredentials(**{**values, field: value})
    assert field.replace("_", " ") in caught.value.message
    assert value not in caught.value.message or not value


def test_credentials_repr_shows_no_secret() -> None:
    shown = f"{CREDENTIALS!r} {CREDENTIALS}"
    assert CREDENTIALS.secret_access_key not in shown and "dG9rZW4" not in shown
    assert "ASIAEXAMPLEKEY000001" not in shown  # only its first characters


def test_redact_credentials_removes_clauses_pieces_and_known_values() -> None:
    sql = build_create_temporary_stage("D", "C", "S", bucket="b", prefix="p", credentials=CREDENTIALS)
    quoted_back = f"syntax error near 'AWS_SECRET_KEY = '{CREDENTIALS.secret_access_key}"  # a piece of it
    echoed = f"token {CREDENTIALS.session_token} was rejected"
    redacted = [redact_credentials(text, CREDENTIALS.secret_values) for text in (sql, quoted_back, echoed)]
    assert redacted[0].endswith("URL = 's3://b/p/' CREDENTIALS = (<redacted>)")
    for text in redacted:
        assert CREDENTIALS.secret_access_key not in text and "dG9rZW4vd2l0aCtwbHVz" not in text


def test_classifier_redacts_a_server_message_that_quotes_the_statement() -> None:
    sql = build_create_temporary_stage("D", "C", "S", bucket="b", prefix="p", credentials=CREDENTIALS)
    error = sf_errors.ProgrammingError(msg=f"SQL compilation error:\n{sql}", errno=1003, sqlstate="42000")
    classified = classify_snowflake_error(error, secrets=CREDENTIALS.secret_values)
    assert isinstance(classified, PermanentError)
    assert "CREDENTIALS = (<redacted>)" in classified.message
    assert CREDENTIALS.secret_access_key not in str(classified) and "dG9rZW4vd2l0aCtwbHVz" not in str(
        classified
    )


@dataclass
class _Frozen:
    access_key: str
    secret_key: str
    token: str | None


class _Session:
    def __init__(self, frozen: _Frozen | None) -> None:
        self.frozen = frozen

    def get_credentials(self) -> Any:
        if self.frozen is None:
            return None
        frozen = self.frozen
        return type("Creds", (), {"get_frozen_credentials": lambda _self: frozen})()


def test_credentials_come_frozen_from_the_session_and_a_missing_role_is_permanent() -> None:
    session = _Session(_Frozen("ASIAKEY1", "c2VjcmV0", "dG9rZW4="))
    assert aws_credentials_from(session) == AwsCredentials("ASIAKEY1", "c2VjcmV0", "dG9rZW4=")
    rotated = _Frozen("ASIAKEY2", "c2VjcmV0", "dG9rZW4=")
    assert aws_credentials_from(_Session(rotated)).fingerprint != aws_credentials_from(session).fingerprint
    with pytest.raises(PermanentError, match="SNOWFLAKE_STORAGE_INTEGRATION"):
        aws_credentials_from(_Session(None))
