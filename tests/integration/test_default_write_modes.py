"""Running a table again with default settings leaves Snowflake equal to PostgreSQL, never doubled.

The demo runs three times on one data dir (the third after rows were deleted and updated), and
the pipeline runs the defaults of each mode (a full run replaces, an incremental run merges)
repeatedly, each time checked by ``pgsnow verify``. Append stays available when chosen together
with ``allow_duplicates``; a write mode that cannot work on a table is refused before anything is
staged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from psycopg2 import sql

from pgsnow.demo.dataset import create_sample_shop
from pgsnow.demo.pipeline import TableStatus, run_demo
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.local.postgres import create_database, start_local_postgres
from pgsnow.postgres import connect

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

DEMO_DATABASE = "pgsnow_test_default_write_modes"
DEMO_SCHEMA = "shop"


def source_count(dsn: str, table: TableRef) -> int:
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table.schema, table.table)))
            row = cur.fetchone()
    finally:
        conn.rollback()
        conn.close()
    assert row is not None
    return int(row[0])


def run_demo_on(dsn: str, data_dir: Path) -> list[tuple[str, int | None, int | None, bool, bool]]:
    """``pgsnow demo --pg-dsn ... --schema shop`` with default settings: per table (name, source rows,
    Snowflake rows, status OK, verify OK)."""
    results = run_demo(
        pg_dsn=dsn,
        tables=None,
        schema=DEMO_SCHEMA,
        file_format="csv",
        data_dir=data_dir,
        verify=True,
    )
    return [
        (
            r.table.qualified,
            r.source_rows,
            r.snowflake_rows,
            r.status is TableStatus.OK,
            r.verification is not None and r.verification.ok,
        )
        for r in results
    ]


def test_the_demo_run_three_times_on_one_data_dir_is_ok_each_time(tmp_path: Path) -> None:
    # Given the sample shop (every table keyed) and a table without a primary key, in a database of
    # this module's own, and one data dir kept across the runs (the local Snowflake persists there)
    admin = start_local_postgres(environ={})
    dsn = create_database(admin.dsn, DEMO_DATABASE, drop_existing=True)
    create_sample_shop(dsn, DEMO_SCHEMA, scale=0.01)
    conn = connect(dsn)
    conn.autocommit = True
    visits = TableRef(DEMO_SCHEMA, "visits")
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "CREATE TABLE {} (page text, visited_at timestamptz); INSERT INTO {} "
                    "SELECT 'page ' || (i % 7), timestamptz '2026-01-01 00:00:00+00' + i * interval '1 hour' "
                    "FROM generate_series(1, 50) AS i"
                ).format(*[sql.Identifier(visits.schema, visits.table)] * 2)
            )
        data_dir = tmp_path / "demo"

        # When the demo runs, and runs again on the same data
        first = run_demo_on(dsn, data_dir)
        second = run_demo_on(dsn, data_dir)

        # Then both runs are OK with Snowflake holding exactly the source rows: nothing doubled
        for report in (first, second):
            assert report and all(ok and verified for *_, ok, verified in report), report
            assert all(source == target for _, source, target, _, _ in report), report
        assert [(name, source) for name, source, *_ in first] == [
            (name, source) for name, source, *_ in second
        ]
        assert {name for name, *_ in first} >= {f"{DEMO_SCHEMA}.orders", visits.qualified}

        # When rows are deleted and updated in PostgreSQL, keyed and key-less, and the demo runs a third time
        with conn.cursor() as cur:
            cur.execute(
                "DELETE FROM shop.order_lines WHERE order_id IN (SELECT order_id FROM shop.orders WHERE order_id % 5 = 0)"
            )
            cur.execute("DELETE FROM shop.orders WHERE order_id % 5 = 0")
            cur.execute(
                "UPDATE shop.customers SET note = 'changed after the second run' WHERE customer_id % 3 = 0"
            )
            cur.execute("DELETE FROM shop.visits WHERE page = 'page 1'")
            cur.execute("UPDATE shop.visits SET page = 'renamed' WHERE page = 'page 2'")
        third = run_demo_on(dsn, data_dir)

        # Then it is OK too: deleted rows are gone from Snowflake and updated rows changed
        assert third and all(ok and verified for *_, ok, verified in third), third
        counts = {name: (source, target) for name, source, target, _, _ in third}
        assert counts[f"{DEMO_SCHEMA}.orders"][1] == source_count(dsn, TableRef(DEMO_SCHEMA, "orders"))
        assert (
            counts[f"{DEMO_SCHEMA}.orders"][1] < dict((n, s) for n, s, *_ in second)[f"{DEMO_SCHEMA}.orders"]
        )
        assert counts[visits.qualified] == (source_count(dsn, visits), source_count(dsn, visits))
    finally:
        conn.close()


# --------------------------------------------------------------------------- the pipeline, mode by mode


def assert_equal(pipeline: PipelineHarness, table: TableRef) -> None:
    result = pipeline.verify(table)
    assert result.ok, result.to_dict()
    assert pipeline.target_count(table) == source_count(pipeline.source_dsn, table)


def test_a_full_run_of_a_keyed_table_replaces_by_default_so_deleted_rows_go(
    pipeline: PipelineHarness,
) -> None:
    # Given a keyed table replicated with the default options
    table = pipeline.table("keyed_full")
    pipeline.create_table(
        table, "id integer PRIMARY KEY, name text", "SELECT i, 'name ' || i FROM generate_series(1, 40) AS i"
    )
    manifest = pipeline.replicate(table)
    assert manifest.write_mode == "replace"
    assert_equal(pipeline, table)

    # When it runs again unchanged, then after a delete and an update
    pipeline.replicate(table)
    assert_equal(pipeline, table)
    pipeline.run_sql(
        sql.SQL("DELETE FROM {} WHERE id > 30").format(sql.Identifier(table.schema, table.table))
    )
    pipeline.run_sql(
        sql.SQL("UPDATE {} SET name = 'updated' WHERE id <= 5").format(
            sql.Identifier(table.schema, table.table)
        )
    )
    pipeline.replicate(table)

    # Then Snowflake equals PostgreSQL every time: 40 rows, never 80; then 30
    assert_equal(pipeline, table)
    assert pipeline.target_count(table) == 30


def test_a_full_run_of_a_table_without_key_replaces_by_default(pipeline: PipelineHarness) -> None:
    # Given a table without a primary key, with repeated rows of its own
    table = pipeline.table("keyless_full")
    pipeline.create_table(table, "label text, amount integer", "SELECT 'same', 1 FROM generate_series(1, 3)")
    pipeline.run_sql(
        sql.SQL("INSERT INTO {} SELECT 'row ' || i, i FROM generate_series(1, 20) AS i").format(
            sql.Identifier(table.schema, table.table)
        )
    )

    # When it is replicated twice with default options, then once more after a delete
    first = pipeline.replicate(table)
    pipeline.replicate(table)
    assert_equal(pipeline, table)
    pipeline.run_sql(
        sql.SQL("DELETE FROM {} WHERE amount > 10").format(sql.Identifier(table.schema, table.table))
    )
    pipeline.replicate(table)

    # Then each run replaced the table: it holds the source rows, the source's own repeats included
    assert first.write_mode == "replace"
    assert_equal(pipeline, table)
    assert pipeline.target_count(table) == 13


def test_an_incremental_run_merges_by_default_so_rows_read_again_are_not_doubled(
    pipeline: PipelineHarness,
) -> None:
    # Given a keyed table with a cursor column, extracted incrementally with an hour of lookback
    # (every run reads every row again) and no write_mode
    table = pipeline.table("keyed_incremental")
    target = sql.Identifier(table.schema, table.table)
    pipeline.create_table(
        table,
        "id integer PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT now()",
        "SELECT i, 'name ' || i, now() FROM generate_series(1, 25) AS i",
    )
    options = {"mode": "incremental", "cursor_column": "updated_at", "lookback_seconds": 3600}

    # When it runs, runs again unchanged, then again after an update and an insert
    first = pipeline.replicate(table, options)
    second = pipeline.replicate(table, options)
    assert_equal(pipeline, table)
    pipeline.run_sql(
        sql.SQL("UPDATE {} SET name = 'updated', updated_at = now() WHERE id <= 3").format(target)
    )
    pipeline.run_sql(sql.SQL("INSERT INTO {} (id, name) VALUES (26, 'new')").format(target))
    third = pipeline.replicate(table, options)

    # Then every run merged: the rows read again replaced themselves, the update and insert arrived
    assert {m.write_mode for m in (first, second, third)} == {"merge"}
    assert second.total_rows == 25  # the lookback re-read them all
    assert_equal(pipeline, table)
    assert pipeline.target_count(table) == 26


def test_append_chosen_with_allow_duplicates_appends_every_run(pipeline: PipelineHarness) -> None:
    # Given a table whose options choose append and accept its duplicates
    table = pipeline.table("appended")
    pipeline.create_table(
        table, "id integer PRIMARY KEY, name text", "SELECT i, 'n' FROM generate_series(1, 10) AS i"
    )
    options = {"write_mode": "append", "allow_duplicates": True}

    # When it runs twice
    first = pipeline.replicate(table, options)
    pipeline.replicate(table, options)

    # Then append did what it says: every run's rows were added
    assert first.write_mode == "append"
    assert pipeline.target_count(table) == 20


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(
            {"write_mode": "merge"},
            "write_mode merge (chosen) needs a primary key to match rows by, and the table",
            id="merge",
        ),
        pytest.param(
            {"deletes": "hard"},
            "deletes=hard needs a primary key to find deleted rows, and the table",
            id="deletes",
        ),
    ],
)
def test_a_write_that_needs_a_key_is_refused_on_a_table_without_one_before_staging(
    pipeline: PipelineHarness, options: dict[str, object], expected: str
) -> None:
    # Given a table without a primary key
    table = pipeline.table(f"keyless_{next(iter(options))}")
    pipeline.create_table(table, "label text", "SELECT 'x' FROM generate_series(1, 3)")

    # When it is extracted with options that match rows by the key
    with pytest.raises(PermanentError) as raised:
        pipeline.extract(table, PGSNOW_TABLE_OPTIONS=json.dumps({table.qualified: options}))

    # Then the run is refused, naming why and what to choose, and no data file was staged
    assert expected in raised.value.message
    assert 'use write_mode "replace"' in raised.value.message
    listed = pipeline.s3().list_objects_v2(
        Bucket=pipeline.bucket, Prefix=f"{pipeline.prefix}/{table.schema}/{table.table}/"
    )
    assert listed.get("KeyCount", 0) == 0
