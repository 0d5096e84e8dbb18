"""The load ledger's SQL, as text (each statement also runs against the local Snowflake in the
integration suite)."""

from __future__ import annotations

import pytest

from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.ledger import (
    LEDGER_COLUMNS,
    LedgerClaim,
    LedgerRecord,
    LedgerRow,
    build_adopt_legacy_rows,
    build_claim_files,
    build_create_ledger,
    build_mark_submitted,
    build_record_loads,
    build_select_earliest_submission,
    build_select_loaded,
    build_select_newer_runs,
    keys_by_table,
    ledger_name,
    ledger_table,
)

pytestmark = pytest.mark.unit

RUN = "20261125T120000000000Z"
ORDERS = TableRef("public", "orders")
LEDGER = '"DB"."PGSNOW"."LOAD_LEDGER__PUBLIC__ORDERS"'


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param(ORDERS, "LOAD_LEDGER__PUBLIC__ORDERS", id="plain"),
        pytest.param(TableRef("Sales", "Order Lines"), "LOAD_LEDGER__SALES__ORDER LINES", id="mixed-case"),
        pytest.param(TableRef("s", "t" * 300), ("LOAD_LEDGER__S__" + "T" * 300)[:255], id="capped-at-255"),
    ],
)
def test_each_table_has_its_own_ledger(table: TableRef, expected: str) -> None:
    assert ledger_table(table) == expected
    assert len(ledger_table(table)) <= 255


def test_names_that_meet_share_a_ledger() -> None:
    # Upper case and the separator can make two tables' ledger names equal: they then share one
    # ledger (rows are found by key, runs by source schema and table), never a wrong row.
    assert ledger_table(TableRef("public", "Orders")) == ledger_table(TableRef("public", "orders"))
    assert ledger_name('we"ird', "ctl", ORDERS) == '"we""ird"."ctl"."LOAD_LEDGER__PUBLIC__ORDERS"'


def test_create_has_every_column_and_no_upgrade_step() -> None:
    create = build_create_ledger("DB", "PGSNOW", ORDERS)
    assert create.startswith(f"CREATE TABLE IF NOT EXISTS {LEDGER} (")
    for name in LEDGER_COLUMNS:
        assert f'"{name}"' in create


def test_one_claim_statement_binds_every_key_of_a_group() -> None:
    claims = [
        LedgerClaim("staging/public/orders/a.csv.gz", "etag1", "abc", RUN, "public", "orders"),
        LedgerClaim("staging/public/orders/b.csv.gz", None, None, None, "public", "orders"),
    ]
    sql, params = build_claim_files("DB", "PGSNOW", ORDERS, claims)
    assert sql == (
        f'MERGE INTO {LEDGER} AS "LEDGER"\n'
        'USING (SELECT "S3_KEY", "ETAG", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME"\n'
        "  FROM (VALUES (%s, %s, %s, %s, %s, %s), (%s, %s, %s, %s, %s, %s))\n"
        '  AS "CLAIM" ("S3_KEY", "ETAG", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME")) AS "CLAIM"\n'
        'ON "LEDGER"."S3_KEY" = "CLAIM"."S3_KEY"\n'
        'WHEN MATCHED THEN UPDATE SET "S3_KEY" = "LEDGER"."S3_KEY"\n'
        'WHEN NOT MATCHED THEN INSERT ("S3_KEY", "ETAG", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME")\n'
        'VALUES ("CLAIM"."S3_KEY", "CLAIM"."ETAG", "CLAIM"."SHA256", "CLAIM"."RUN_ID", '
        '"CLAIM"."SCHEMA_NAME", "CLAIM"."TABLE_NAME")'
    )
    assert params == (
        *("staging/public/orders/a.csv.gz", "etag1", "abc", RUN, "public", "orders"),
        *("staging/public/orders/b.csv.gz", None, None, None, "public", "orders"),
    )


def test_one_record_statement_sets_each_files_own_result() -> None:
    records = [
        LedgerRecord("a", 42),
        LedgerRecord("b", 7, status="PARTIALLY_LOADED", errors_seen=1, first_error="bad row"),
    ]
    sql, params = build_record_loads("DB", "PGSNOW", ORDERS, records)
    assert sql == (
        f'UPDATE {LEDGER} AS "LEDGER"\n'
        'SET "ROWS_LOADED" = "DONE"."ROWS_LOADED", "LOADED_AT" = CURRENT_TIMESTAMP(), '
        '"STATUS" = "DONE"."STATUS", "ERRORS_SEEN" = "DONE"."ERRORS_SEEN", "FIRST_ERROR" = "DONE"."FIRST_ERROR"\n'
        'FROM (SELECT CAST("S3_KEY" AS VARCHAR) AS "S3_KEY", CAST("ROWS_LOADED" AS NUMBER(38,0)) AS "ROWS_LOADED", '
        'CAST("STATUS" AS VARCHAR) AS "STATUS", CAST("ERRORS_SEEN" AS NUMBER(38,0)) AS "ERRORS_SEEN", '
        'CAST("FIRST_ERROR" AS VARCHAR) AS "FIRST_ERROR"\n'
        "  FROM (VALUES (%s, %s, %s, %s, %s), (%s, %s, %s, %s, %s))\n"
        '  AS "DONE" ("S3_KEY", "ROWS_LOADED", "STATUS", "ERRORS_SEEN", "FIRST_ERROR")) AS "DONE"\n'
        'WHERE "LEDGER"."S3_KEY" = "DONE"."S3_KEY"'
    )
    assert params == ("a", 42, "LOADED", 0, None, "b", 7, "PARTIALLY_LOADED", 1, "bad row")


def test_adopting_the_legacy_ledger_copies_only_the_tables_missing_keys() -> None:
    sql, params = build_adopt_legacy_rows("DB", "PGSNOW", ORDERS, ["S3_KEY", "SCHEMA_NAME", "TABLE_NAME"])
    assert sql == (
        f'INSERT INTO {LEDGER} ("S3_KEY", "SCHEMA_NAME", "TABLE_NAME")\n'
        'SELECT "OLD"."S3_KEY", "OLD"."SCHEMA_NAME", "OLD"."TABLE_NAME" FROM "DB"."PGSNOW"."LOAD_LEDGER" AS "OLD"\n'
        'WHERE "OLD"."SCHEMA_NAME" = %s AND "OLD"."TABLE_NAME" = %s\n'
        f'AND NOT EXISTS (SELECT 1 FROM {LEDGER} AS "NEW" WHERE "NEW"."S3_KEY" = "OLD"."S3_KEY")'
    )
    assert params == ("public", "orders")


@pytest.mark.parametrize(
    ("ledger", "keys", "expected"),
    [
        pytest.param(
            LEDGER,
            ["a"],
            'SELECT "S3_KEY", "ETAG", "SHA256", "ROWS_LOADED", "STATUS"\n'
            f"FROM {LEDGER}\n"
            'WHERE "S3_KEY" IN (%s) AND "LOADED_AT" IS NOT NULL',
            id="plain",
        ),
        pytest.param(
            ledger_name('we"ird db', "ctl", ORDERS),
            ["a", "b", "c"],
            'SELECT "S3_KEY", "ETAG", "SHA256", "ROWS_LOADED", "STATUS"\n'
            'FROM "we""ird db"."ctl"."LOAD_LEDGER__PUBLIC__ORDERS"\n'
            'WHERE "S3_KEY" IN (%s, %s, %s) AND "LOADED_AT" IS NOT NULL',
            id="quoted-names",
        ),
    ],
)
def test_the_one_lookup_binds_every_key(ledger: str, keys: list[str], expected: str) -> None:
    assert build_select_loaded(ledger, keys) == (expected, tuple(keys))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: build_select_loaded(LEDGER, []), id="lookup"),
        pytest.param(lambda: build_mark_submitted("DB", "PGSNOW", ORDERS, []), id="mark-submitted"),
        pytest.param(
            lambda: build_select_earliest_submission("DB", "PGSNOW", ORDERS, []), id="earliest-submission"
        ),
        pytest.param(lambda: build_claim_files("DB", "PGSNOW", ORDERS, []), id="claim"),
        pytest.param(lambda: build_record_loads("DB", "PGSNOW", ORDERS, []), id="record"),
    ],
)
def test_an_empty_key_list_is_refused(build: object) -> None:
    with pytest.raises(PermanentError):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("applied_only", "status_filter"),
    [
        pytest.param(False, "", id="any-loaded-file-or-mark"),
        pytest.param(True, " AND \"STATUS\" = 'APPLIED'", id="applied-marks-only"),
    ],
)
def test_select_newer_runs_binds_the_table_and_the_run(applied_only: bool, status_filter: str) -> None:
    table = TableRef("public", "Order's")
    sql, params = build_select_newer_runs("D b", "PGSNOW", table, run_id=RUN, applied_only=applied_only)
    assert sql == (
        'SELECT DISTINCT "RUN_ID" FROM "D b"."PGSNOW"."LOAD_LEDGER__PUBLIC__ORDER\'S"\n'
        'WHERE "SCHEMA_NAME" = %s AND "TABLE_NAME" = %s AND "RUN_ID" > %s AND "LOADED_AT" IS NOT NULL'
        f"{status_filter}"
    )
    assert params == ("public", "Order's", RUN)


def test_keys_are_grouped_by_the_table_whose_ledger_holds_them() -> None:
    keys = [
        "staging/public/orders/public_orders_batch1_20261125T120000000000Z.csv.gz",
        "staging/sales/items/sales_items_batch1_20261125T120000000000Z.parquet",
        "staging/public/orders/hand.csv",
        "elsewhere/public/orders/x.csv",  # outside the prefix: no data key, never loaded
    ]
    assert keys_by_table(keys, "staging") == {
        ORDERS: [keys[0], keys[2]],
        TableRef("sales", "items"): [keys[1]],
    }


@pytest.mark.parametrize(
    ("row", "sha256", "etag", "expected"),
    [
        pytest.param(LedgerRow("k", "e1", "s1", 1), "s1", "other", True, id="sha256-decides"),
        pytest.param(LedgerRow("k", "e1", "s1", 1), "s2", "e1", False, id="sha256-differs"),
        pytest.param(LedgerRow("k", "e1", None, 1), None, '"e1"', True, id="etag-when-no-sha256"),
        pytest.param(LedgerRow("k", "e1", None, 1), None, "e2", False, id="etag-differs"),
        pytest.param(LedgerRow("k", None, None, 1), "s1", "e1", True, id="no-checksum-recorded"),
    ],
)
def test_row_matches_the_loaded_content(
    row: LedgerRow, sha256: str | None, etag: str, expected: bool
) -> None:
    assert row.matches(sha256=sha256, etag=etag) is expected
