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
