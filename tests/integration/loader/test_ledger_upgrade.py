"""Upgrading from the one shared ``LOAD_LEDGER`` to one ledger per target table: a key the old
ledger holds as loaded is still loaded after the upgrade, so a redelivery loads nothing twice."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from load_support import (
    ORDER_ROWS,
    ORDERS,
    RUN,
    csv_gz_bytes,
    ledger_sql,
    order_count,
    put_run_manifest,
    put_staged_file,
    query,
)

from pgsnow.config import Settings
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, parse_data_key
from pgsnow.ledger import ledger_rows
from pgsnow.load.batch import Loader
from pgsnow.load.outcomes import LoadStatus

pytestmark = pytest.mark.integration

OTHER = TableRef("public", "customers")


def create_legacy_ledger(sf_conn: Any, settings: Settings) -> str:
    """The shared ledger as pgsnow before per-table ledgers made it (its CREATE, then its ALTERs)."""
    legacy = f'"{settings.snowflake.database}"."PGSNOW"."LOAD_LEDGER"'
    query(
        sf_conn,
        f"CREATE TABLE IF NOT EXISTS {legacy} (\n"
        '  "S3_KEY" VARCHAR NOT NULL, "ETAG" VARCHAR, "SHA256" VARCHAR, "RUN_ID" VARCHAR,\n'
        '  "SCHEMA_NAME" VARCHAR NOT NULL, "TABLE_NAME" VARCHAR NOT NULL, "ROWS_LOADED" NUMBER(38,0),\n'
        '  "LOADED_AT" TIMESTAMP_TZ(6), PRIMARY KEY ("S3_KEY"))',
    )
    for column in ('"STATUS" VARCHAR', '"ERRORS_SEEN" NUMBER(38,0)', '"FIRST_ERROR" VARCHAR'):
        query(sf_conn, f"ALTER TABLE {legacy} ADD COLUMN IF NOT EXISTS {column}")
    return legacy


def test_a_key_loaded_before_the_upgrade_is_not_loaded_again(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given a file an earlier pgsnow loaded and recorded in the shared ledger (and a row of another
    # table there), written before the ledger had its last column (SUBMITTED_AT)
    put_run_manifest(s3, settings)
    key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    body = csv_gz_bytes(ORDER_ROWS)
    put_staged_file(s3, settings, key, body, rows=len(ORDER_ROWS))
    legacy = create_legacy_ledger(sf_conn, settings)
    other_key = data_key(settings.prefix, OTHER, 1, RUN, FileFormat.CSV)
    for row_key, table in ((key, ORDERS), (other_key, OTHER)):
        query(
            sf_conn,
            f'INSERT INTO {legacy} ("S3_KEY", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME", "ROWS_LOADED", '
            '"LOADED_AT", "STATUS") VALUES (%s, %s, %s, %s, %s, %s, CURRENT_TIMESTAMP(), %s)',
            (row_key, hashlib.sha256(body).hexdigest(), RUN, table.schema, table.table, 3, "LOADED"),
        )

    # When a reader that creates nothing (status, cleanup, the sweeper) looks the key up before
    # any load since the upgrade, it reads the shared ledger
    before = ledger_rows(sf_conn, settings, {ORDERS: [key]})
    # and the upgraded loader receives the file's notification again, in two containers
    outcomes = [Loader(settings, s3).load(sf_conn, [parse_data_key(key, settings.prefix)]) for _ in range(2)]

    # Then the key was known as loaded throughout: nothing was loaded twice
    assert before[key].rows_loaded == 3
    assert [[o.result.status for o in batch if o.result] for batch in outcomes] == [
        [LoadStatus.ALREADY_LOADED],
        [LoadStatus.ALREADY_LOADED],
    ]
    assert order_count(sf_conn, settings) == 0
    # and the table's own ledger adopted its row once (the other table's row stays behind)
    assert query(sf_conn, f'SELECT "S3_KEY", "ROWS_LOADED", "STATUS" FROM {ledger_sql(settings)}') == [
        (key, 3, "LOADED")
    ]
    assert ledger_rows(sf_conn, settings, {ORDERS: [key], OTHER: [other_key]}).keys() == {key, other_key}
