"""The load ledger's SQL, as text (each statement also runs against the local Snowflake in the
integration suite)."""

from __future__ import annotations

import pytest

from pgsnow.errors import PermanentError
from pgsnow.ledger import (
    LedgerClaim,
    LedgerRow,
    build_claim_file,
    build_create_ledger,
    build_mark_submitted,
    build_record_load,
    build_select_earliest_submission,
    build_select_loaded,
    build_select_newer_runs,
)

pytestmark = pytest.mark.unit

RUN = "20261125T120000000000Z"


def test_ledger_table_claim_and_record() -> None:
    claim = LedgerClaim("staging/public/orders/f.csv.gz", "etag1", "abc", RUN, "public", "orders")

    create = build_create_ledger("DB", "PGSNOW")
    claim_sql, claim_params = build_claim_file("DB", "PGSNOW", claim)
    record_sql, record_params = build_record_load("DB", "PGSNOW", claim.s3_key, 42)

    assert create.startswith('CREATE TABLE IF NOT EXISTS "DB"."PGSNOW"."LOAD_LEDGER" (')
    for name in (
        "S3_KEY",
        "ETAG",
        "SHA256",
        "RUN_ID",
        "SCHEMA_NAME",
        "TABLE_NAME",
        "ROWS_LOADED",
        "LOADED_AT",
    ):
        assert f'"{name}"' in create
    assert claim_sql.startswith('MERGE INTO "DB"."PGSNOW"."LOAD_LEDGER" AS "LEDGER"')
    assert "WHEN NOT MATCHED THEN INSERT" in claim_sql
    assert claim_params == (claim.s3_key, "etag1", "abc", RUN, "public", "orders")
    assert record_sql.startswith('UPDATE "DB"."PGSNOW"."LOAD_LEDGER"\n')
    assert record_params == (42, "LOADED", 0, None, claim.s3_key)


@pytest.mark.parametrize(
    ("database", "schema", "keys", "expected"),
    [
        pytest.param(
            "DB",
            "PGSNOW",
            ["a"],
            'SELECT "S3_KEY", "ETAG", "SHA256", "ROWS_LOADED", "STATUS"\n'
            'FROM "DB"."PGSNOW"."LOAD_LEDGER"\n'
            'WHERE "S3_KEY" IN (%s) AND "LOADED_AT" IS NOT NULL',
            id="plain",
        ),
        pytest.param(
            'we"ird db',
            "ctl",
            ["a", "b", "c"],
            'SELECT "S3_KEY", "ETAG", "SHA256", "ROWS_LOADED", "STATUS"\n'
            'FROM "we""ird db"."ctl"."LOAD_LEDGER"\n'
            'WHERE "S3_KEY" IN (%s, %s, %s) AND "LOADED_AT" IS NOT NULL',
            id="quoted-names",
        ),
    ],
)
def test_the_one_lookup_binds_every_key(database: str, schema: str, keys: list[str], expected: str) -> None:
    assert build_select_loaded(database, schema, keys) == (expected, tuple(keys))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(build_select_loaded, id="lookup"),
        pytest.param(build_mark_submitted, id="mark-submitted"),
        pytest.param(build_select_earliest_submission, id="earliest-submission"),
    ],
)
def test_an_empty_key_list_is_refused(build: object) -> None:
    with pytest.raises(PermanentError):
        build("DB", "PGSNOW", [])  # type: ignore[operator]


@pytest.mark.parametrize(
    ("applied_only", "status_filter"),
    [
        pytest.param(False, "", id="any-loaded-file-or-mark"),
        pytest.param(True, " AND \"STATUS\" = 'APPLIED'", id="applied-marks-only"),
    ],
)
def test_select_newer_runs_binds_the_table_and_the_run(applied_only: bool, status_filter: str) -> None:
    sql, params = build_select_newer_runs(
        "D b", "PGSNOW", schema_name="public", table_name="Order's", run_id=RUN, applied_only=applied_only
    )
    assert sql == (
        'SELECT DISTINCT "RUN_ID" FROM "D b"."PGSNOW"."LOAD_LEDGER"\n'
        'WHERE "SCHEMA_NAME" = %s AND "TABLE_NAME" = %s AND "RUN_ID" > %s AND "LOADED_AT" IS NOT NULL'
        f"{status_filter}"
    )
    assert params == ("public", "Order's", RUN)


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
