"""Result values the local Snowflake sends back through the real connector, as Snowflake sends them."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
import snowflake.connector
from moto.server import ThreadedMotoServer

from pgsnow.local.snowflake import start_local_snowflake

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cursor() -> Iterator[snowflake.connector.cursor.SnowflakeCursor]:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    local = start_local_snowflake(s3_endpoint_url=f"http://{host}:{port}")
    conn = snowflake.connector.connect(**local.connect_kwargs(database="RESULTS", schema="PUBLIC"))
    cur = conn.cursor()
    cur.execute("CREATE SCHEMA IF NOT EXISTS RESULTS.PUBLIC")
    yield cur
    conn.close()
    local.stop()
    moto.stop()


@pytest.mark.parametrize("snowflake_type", ["TIMESTAMP_NTZ(6)", "TIMESTAMP_TZ(6)"])
def test_a_null_timestamp_is_none_not_the_epoch(
    cursor: snowflake.connector.cursor.SnowflakeCursor, snowflake_type: str
) -> None:
    # Given a column holding a NULL between two real times (a mask, not a constant column)
    cursor.execute(f'CREATE OR REPLACE TABLE RESULTS.PUBLIC.T ("ID" NUMBER, "AT" {snowflake_type})')
    cursor.execute(
        "INSERT INTO RESULTS.PUBLIC.T VALUES (1, '1970-01-01 00:00:00'), (2, NULL), (3, '2024-01-02 03:04:05.5')"
    )
    # When it is read back through the connector
    rows = cursor.execute('SELECT "ID", "AT" FROM RESULTS.PUBLIC.T ORDER BY "ID"').fetchall()
    # Then the NULL is None and the real epoch stays a time
    values = {row[0]: row[1] for row in rows}
    assert values[2] is None
    assert isinstance(values[1], datetime.datetime)
    assert values[1].replace(tzinfo=None) == datetime.datetime(1970, 1, 1)
    assert values[3].replace(tzinfo=None) == datetime.datetime(2024, 1, 2, 3, 4, 5, 500000)


def test_a_null_timestamp_expression_is_none(cursor: snowflake.connector.cursor.SnowflakeCursor) -> None:
    row = cursor.execute(
        "SELECT NULL::TIMESTAMP_NTZ, CAST(NULL AS TIMESTAMP_TZ), CURRENT_TIMESTAMP()"
    ).fetchone()
    assert row is not None
    assert row[0] is None
    assert row[1] is None
    assert isinstance(row[2], datetime.datetime)


MERGE_CLAUSES = {
    "update-and-insert": (
        'WHEN MATCHED THEN UPDATE SET "V" = "SOURCE"."V" '
        'WHEN NOT MATCHED THEN INSERT ("ID", "V") VALUES ("SOURCE"."ID", "SOURCE"."V")',
        ["number of rows inserted", "number of rows updated"],
    ),
    "insert-only": (
        'WHEN NOT MATCHED THEN INSERT ("ID", "V") VALUES ("SOURCE"."ID", "SOURCE"."V")',
        ["number of rows inserted"],
    ),
    "update-and-delete": (
        'WHEN MATCHED AND "SOURCE"."V" IS NULL THEN DELETE WHEN MATCHED THEN UPDATE SET "V" = "SOURCE"."V"',
        ["number of rows updated", "number of rows deleted"],
    ),
}


@pytest.mark.parametrize("clauses", MERGE_CLAUSES.keys())
def test_a_merge_that_changes_no_row_reports_zeros(
    cursor: snowflake.connector.cursor.SnowflakeCursor, clauses: str
) -> None:
    # Given a target with a row and an empty source (a run whose work table has no rows)
    when, columns = MERGE_CLAUSES[clauses]
    cursor.execute('CREATE OR REPLACE TABLE RESULTS.PUBLIC.TARGET ("ID" NUMBER, "V" VARCHAR)')
    cursor.execute("INSERT INTO RESULTS.PUBLIC.TARGET VALUES (1, 'a')")
    cursor.execute('CREATE OR REPLACE TABLE RESULTS.PUBLIC.SOURCE ("ID" NUMBER, "V" VARCHAR)')

    # When the MERGE runs through the connector
    cursor.execute(
        'MERGE INTO RESULTS.PUBLIC.TARGET AS "TARGET" USING RESULTS.PUBLIC.SOURCE AS "SOURCE" '
        f'ON "TARGET"."ID" = "SOURCE"."ID" {when}'
    )

    # Then it reports zero rows changed, as Snowflake does, in its columns and in rowcount
    assert [d.name for d in cursor.description] == columns
    assert cursor.fetchall() == [tuple(0 for _ in columns)]
    assert cursor.rowcount == 0


def test_a_merge_that_changes_rows_still_counts_them(
    cursor: snowflake.connector.cursor.SnowflakeCursor,
) -> None:
    cursor.execute('CREATE OR REPLACE TABLE RESULTS.PUBLIC.TARGET ("ID" NUMBER, "V" VARCHAR)')
    cursor.execute("INSERT INTO RESULTS.PUBLIC.TARGET VALUES (1, 'a')")
    cursor.execute('CREATE OR REPLACE TABLE RESULTS.PUBLIC.SOURCE ("ID" NUMBER, "V" VARCHAR)')
    cursor.execute("INSERT INTO RESULTS.PUBLIC.SOURCE VALUES (1, 'b'), (2, 'c')")

    cursor.execute(
        'MERGE INTO RESULTS.PUBLIC.TARGET AS "TARGET" USING RESULTS.PUBLIC.SOURCE AS "SOURCE" '
        f'ON "TARGET"."ID" = "SOURCE"."ID" {MERGE_CLAUSES["update-and-insert"][0]}'
    )

    assert cursor.fetchall() == [(1, 1)]
    assert cursor.rowcount == 2


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        pytest.param('DELETE FROM RESULTS.PUBLIC.TARGET WHERE "ID" = -1', [(0,)], id="delete"),
        pytest.param('UPDATE RESULTS.PUBLIC.TARGET SET "V" = \'x\' WHERE "ID" = -1', [(0, 0)], id="update"),
    ],
)
def test_delete_and_update_matching_nothing_report_zeros(
    cursor: snowflake.connector.cursor.SnowflakeCursor, statement: str, expected: list[tuple[int, ...]]
) -> None:
    # (fakesnow already answers these with zeros; kept so a change to the DML answer cannot break them.)
    cursor.execute('CREATE OR REPLACE TABLE RESULTS.PUBLIC.TARGET ("ID" NUMBER, "V" VARCHAR)')

    cursor.execute(statement)

    assert cursor.fetchall() == expected
    assert cursor.rowcount == 0
