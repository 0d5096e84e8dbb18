"""Cleanup's ledger lookup, as SQL text (it also runs against the local Snowflake in the integration suite)."""

from __future__ import annotations

import pytest

from pgsnow.cleanup import build_ledger_lookup

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("database", "schema", "count", "expected"),
    [
        (
            "DB",
            "PGSNOW",
            1,
            'SELECT "S3_KEY", "ETAG", "SHA256", "ROWS_LOADED" FROM "DB"."PGSNOW"."LOAD_LEDGER"\n'
            'WHERE "S3_KEY" IN (%s) AND "LOADED_AT" IS NOT NULL',
        ),
        (
            'we"ird db',
            "ctl",
            3,
            'SELECT "S3_KEY", "ETAG", "SHA256", "ROWS_LOADED" FROM "we""ird db"."ctl"."LOAD_LEDGER"\n'
            'WHERE "S3_KEY" IN (%s, %s, %s) AND "LOADED_AT" IS NOT NULL',
        ),
    ],
    ids=["plain", "quoted-names"],
)
def test_ledger_lookup_binds_every_key(database: str, schema: str, count: int, expected: str) -> None:
    assert build_ledger_lookup(database, schema, count) == expected
