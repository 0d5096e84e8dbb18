"""Loader: exactly-once across redelivery and table recreation, grouped COPY, merge, replace,
schema evolution and ON_ERROR, against moto and the local Snowflake over HTTP."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Any

import pytest
from load_support import (
    ORDER_COLUMNS,
    ORDER_ROWS,
    ORDERS,
    csv_gz_bytes,
    ledger_rows,
    ledger_sql,
    manifest_columns,
    order_count,
    orders_sql,
    put_staged_file,
    query,
)

from pgsnow.config import OnError, Settings
from pgsnow.errors import PermanentError
from pgsnow.keys import FileFormat, data_key, parse_data_key
from pgsnow.load.batch import load_batch, load_staged_files
from pgsnow.load.outcomes import LoadStatus, RunOutcome
from pgsnow.manifest import Column, RunManifest, RunState, StagedFile
from pgsnow.runs import RunStore
from pgsnow.typemap import map_pg_type

pytestmark = pytest.mark.integration

RUN_1 = "20261125T120000000000Z"
RUN_2 = "20261126T120000000000Z"


def put_manifest(
    s3: Any,
    settings: Settings,
    run_id: str,
    *,
    write_mode: str = "append",
    state: RunState = RunState.EXTRACTING,
    files: tuple[StagedFile, ...] = (),
    columns: tuple[Column, ...] | None = None,
    cursor_column: str | None = None,
) -> None:
    manifest = RunManifest(
        run_id=run_id,
        table=ORDERS,
        mode="full",
        file_format=FileFormat.CSV,
        columns=columns or manifest_columns(),
        primary_key=("order_id",),
        state=state,
        started_at="2026-11-25T12:00:00Z",
        files=files,
        write_mode=write_mode,
        cursor_column=cursor_column,
    )
    RunStore(s3, settings.bucket).put_manifest(manifest)


def stage(
    s3: Any,
    settings: Settings,
    run_id: str,
    batch: int,
    rows: list[tuple[Any, ...]],
    header: list[str] | None = None,
) -> StagedFile:
    key = data_key(settings.prefix, ORDERS, batch, run_id, FileFormat.CSV)
    body = csv_gz_bytes(rows, header)
    put_staged_file(s3, settings, key, body, rows=len(rows), run_id=run_id)
    return StagedFile(key, batch, len(rows), len(body), hashlib.sha256(body).hexdigest(), FileFormat.CSV)


def order_rows_with(order_id: int, note: str, created_year: int = 2026) -> tuple[Any, ...]:
    """A full row with this id and note; ``created`` (the merge cursor) in the given year."""
    row = list(ORDER_ROWS[0])
    row[0], row[3], row[7] = order_id, note, ORDER_ROWS[0][7].replace(year=created_year)
    return tuple(row)


def test_a_file_delivered_three_times_out_of_order_and_after_recreation_loads_once(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given two files of one run
    put_manifest(s3, settings, RUN_1)
    first = parse_data_key(stage(s3, settings, RUN_1, 1, ORDER_ROWS[:1]).key, settings.prefix)
    second = parse_data_key(stage(s3, settings, RUN_1, 2, ORDER_ROWS[1:]).key, settings.prefix)

    # When they arrive out of order, one of them three times, over three batches
    batches = [[second, first, second], [first], [second]]
    statuses = [
        [r.status for r in load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=batch)]
        for batch in batches
    ]

    # Then each loaded exactly once (a key twice in one batch is one load, reported to both messages)
    assert statuses == [
        [LoadStatus.LOADED, LoadStatus.LOADED, LoadStatus.LOADED],
        [LoadStatus.ALREADY_LOADED],
        [LoadStatus.ALREADY_LOADED],
    ]
    assert order_count(sf_conn, settings) == len(ORDER_ROWS)

    # When the table is dropped and recreated (Snowflake's load metadata is gone) and both arrive again
    query(sf_conn, f"DROP TABLE {orders_sql(settings)}")
    again = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[first, second])

    # Then the ledger still says loaded: nothing is loaded twice
    assert [r.status for r in again] == [LoadStatus.ALREADY_LOADED, LoadStatus.ALREADY_LOADED]
    assert len(ledger_rows(sf_conn, settings)) == 2


def test_a_group_of_files_is_one_copy_and_a_bad_file_fails_alone(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given three files of one run, the middle one with a value that is not a number
    put_manifest(s3, settings, RUN_1)
    good_1 = stage(s3, settings, RUN_1, 1, [ORDER_ROWS[0]])
    bad_row = ("not-a-number", *ORDER_ROWS[1][1:])
    bad = stage(s3, settings, RUN_1, 2, [bad_row])
    good_2 = stage(s3, settings, RUN_1, 3, [ORDER_ROWS[2]])
    objects = [parse_data_key(f.key, settings.prefix) for f in (good_1, bad, good_2)]

    # When the batch is loaded
    outcomes = load_batch(settings=settings, sf_conn=sf_conn, s3=s3, objects=objects)

    # Then the good files load, and the bad one fails with its key named
    assert [o.result.status if o.result else None for o in outcomes] == [
        LoadStatus.LOADED,
        None,
        LoadStatus.LOADED,
    ]
    error = outcomes[1].error
    assert isinstance(error, PermanentError)
    assert error.s3_key == bad.key
    assert order_count(sf_conn, settings) == 2
    assert [row[0] for row in ledger_rows(sf_conn, settings) if row[7]] == sorted([good_1.key, good_2.key])


@pytest.mark.parametrize(
    ("on_error", "expected_status", "expected_rows"),
    [
        pytest.param(OnError.CONTINUE, LoadStatus.PARTIALLY_LOADED, 1, id="continue-partial-recorded"),
        pytest.param(OnError.SKIP_FILE, None, 0, id="skip-file-reported-as-failed"),
    ],
)
def test_on_error_never_hides_rejected_rows(
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    on_error: OnError,
    expected_status: LoadStatus | None,
    expected_rows: int,
) -> None:
    # Given a file with one good and one bad row, and ON_ERROR configured
    settings = dataclasses.replace(settings, load=dataclasses.replace(settings.load, on_error=on_error))
    put_manifest(s3, settings, RUN_1)
    staged = stage(s3, settings, RUN_1, 1, [ORDER_ROWS[0], ("oops", *ORDER_ROWS[1][1:])])

    # When it is loaded
    (outcome,) = load_batch(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(staged.key, settings.prefix)]
    )

    # Then the rejection is reported: a partial file in the result and the ledger, or a failed file
    assert order_count(sf_conn, settings) == expected_rows
    if expected_status is None:
        assert outcome.error is not None and "LOAD_FAILED" in outcome.error.message
        return
    assert outcome.result is not None
    assert (outcome.result.status, outcome.result.rows, outcome.result.errors_seen) == (expected_status, 1, 1)
    assert outcome.result.first_error
    ledger = ledger_sql(settings)
    assert query(sf_conn, f'SELECT "STATUS", "ROWS_LOADED", "ERRORS_SEEN" FROM {ledger}') == [
        ("PARTIALLY_LOADED", 1, 1)
    ]


def test_merge_keeps_the_newest_version_of_each_key(settings: Settings, s3: Any, sf_conn: Any) -> None:
    # Given run 2 (newer) and run 1 (older) in merge mode, with key 1 in both and twice in run 2
    put_manifest(s3, settings, RUN_1, write_mode="merge", cursor_column="created")
    put_manifest(s3, settings, RUN_2, write_mode="merge", cursor_column="created")
    old = stage(s3, settings, RUN_1, 1, [order_rows_with(1, "old", 2025), order_rows_with(2, "two", 2025)])
    new = stage(
        s3,
        settings,
        RUN_2,
        1,
        [order_rows_with(1, "stale", 2020), order_rows_with(1, "newest"), order_rows_with(3, "three")],
    )

    # When the newer run arrives first and the older run after it
    for staged in (new, old):
        load_staged_files(
            settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(staged.key, settings.prefix)]
        )

    # Then each key is there once, with its newest version
    rows = query(sf_conn, f'SELECT "ORDER_ID", "NOTE" FROM {orders_sql(settings)} ORDER BY "ORDER_ID"')
    assert rows == [(1, "newest"), (2, "two"), (3, "three")]


def test_replace_swaps_the_whole_run_in_atomically(
    settings: Settings, s3: Any, sf_conn: Any, local_snowflake: Any
) -> None:
    import snowflake.connector

    # Given a table loaded by an append run
    put_manifest(s3, settings, RUN_1)
    first = stage(s3, settings, RUN_1, 1, ORDER_ROWS)
    load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(first.key, settings.prefix)]
    )
    # and a replace run of two files, its manifest still `extracting`
    put_manifest(s3, settings, RUN_2, write_mode="replace")
    part_1 = stage(s3, settings, RUN_2, 1, [order_rows_with(10, "a")])
    part_2 = stage(s3, settings, RUN_2, 2, [order_rows_with(11, "b")])
    reader = snowflake.connector.connect(
        **local_snowflake.connect_kwargs(database=settings.snowflake.database)
    )
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        with reader.cursor() as cursor:
            while not stop.is_set():
                cursor.execute(f"SELECT COUNT(*) FROM {orders_sql(settings)}")
                seen.append(int(cursor.fetchone()[0]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # When the first file loads, then the manifest is staged, then the last file loads
        load_staged_files(
            settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(part_1.key, settings.prefix)]
        )
        during = order_count(sf_conn, settings)
        put_manifest(s3, settings, RUN_2, write_mode="replace", state=RunState.STAGED, files=(part_1, part_2))
        load_staged_files(
            settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(part_2.key, settings.prefix)]
        )
    finally:
        stop.set()
        watcher.join()
        reader.close()

    # Then the target kept its old rows until the run was complete, then held exactly the new run
    assert during == len(ORDER_ROWS)
    rows = query(sf_conn, f'SELECT "ORDER_ID", "NOTE" FROM {orders_sql(settings)} ORDER BY "ORDER_ID"')
    assert rows == [(10, "a"), (11, "b")]
    # and a concurrent reader only ever saw the whole old table or the whole new one
    assert seen and set(seen) <= {len(ORDER_ROWS), 2}
    # and a redelivered last file swaps nothing again
    again = load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(part_2.key, settings.prefix)]
    )
    assert again[0].status is LoadStatus.ALREADY_LOADED
    assert query(sf_conn, f"SELECT COUNT(*) FROM {orders_sql(settings)}") == [(2,)]


def test_an_older_replace_run_completed_after_a_newer_one_is_never_swapped_in(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given two complete replace runs of one file each; the newer one is loaded (and swapped in) first
    older = stage(s3, settings, RUN_1, 1, [order_rows_with(1, "old")])
    put_manifest(s3, settings, RUN_1, write_mode="replace", state=RunState.STAGED, files=(older,))
    newer = stage(s3, settings, RUN_2, 1, [order_rows_with(2, "new")])
    put_manifest(s3, settings, RUN_2, write_mode="replace", state=RunState.STAGED, files=(newer,))
    applied = load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(newer.key, settings.prefix)]
    )

    # When the older run's file is delivered after it
    stale = load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(older.key, settings.prefix)]
    )

    # Then the target keeps the newer run's table, the older run's shadow table is gone, and the
    # older run is reported superseded
    assert [r.run_outcome for r in applied] == [RunOutcome.APPLIED]
    assert [(r.status, r.run_outcome) for r in stale] == [(LoadStatus.LOADED, RunOutcome.SUPERSEDED)]
    rows = query(sf_conn, f'SELECT "ORDER_ID", "NOTE" FROM {orders_sql(settings)} ORDER BY "ORDER_ID"')
    assert rows == [(2, "new")]
    shadows = query(
        sf_conn,
        f'SELECT COUNT(*) FROM "{settings.snowflake.database}"."INFORMATION_SCHEMA"."TABLES" '
        "WHERE \"TABLE_NAME\" LIKE '%PGSNOW_REPLACE%'",
    )
    assert shadows == [(0,)]


def test_a_new_source_column_appears_in_snowflake(settings: Settings, s3: Any, sf_conn: Any) -> None:
    # Given a loaded table
    put_manifest(s3, settings, RUN_1)
    first = stage(s3, settings, RUN_1, 1, ORDER_ROWS[:1])
    load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(first.key, settings.prefix)]
    )

    # When a later run has a new column and a wider numeric column
    widened = [
        c
        if c.name != "amount"
        else Column.from_types("amount", "numeric(20,2)", "numeric(20,2)", map_pg_type("numeric(20,2)"), True)
        for c in manifest_columns()
    ]
    extra = Column.from_types("channel", "text", "text", map_pg_type("text"), True)
    put_manifest(s3, settings, RUN_2, columns=(*widened, extra))
    header = [n for n, _, _ in ORDER_COLUMNS] + ["channel"]
    second = stage(s3, settings, RUN_2, 1, [(*ORDER_ROWS[2], "web")], header)
    load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(second.key, settings.prefix)]
    )

    # Then the column is there with the new values, old rows NULL, and AMOUNT is wider
    rows = query(sf_conn, f'SELECT "ORDER_ID", "CHANNEL" FROM {orders_sql(settings)} ORDER BY "ORDER_ID"')
    assert rows == [(1, None), (3, "web")]
    database = settings.snowflake.database
    precision = query(
        sf_conn,
        f'SELECT "NUMERIC_PRECISION" FROM "{database}"."INFORMATION_SCHEMA"."COLUMNS" '
        "WHERE \"TABLE_NAME\" = 'ORDERS' AND \"COLUMN_NAME\" = 'AMOUNT'",
    )
    assert precision == [(20,)]


def test_an_incompatible_change_names_the_column_and_changes_nothing(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given a loaded table
    put_manifest(s3, settings, RUN_1)
    first = stage(s3, settings, RUN_1, 1, ORDER_ROWS[:1])
    load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(first.key, settings.prefix)]
    )

    # When a run turns a date column into a boolean and adds a column
    changed = [
        c
        if c.name != "order_day"
        else Column.from_types("order_day", "boolean", "boolean", map_pg_type("boolean"), True)
        for c in manifest_columns()
    ]
    extra = Column.from_types("channel", "text", "text", map_pg_type("text"), True)
    put_manifest(s3, settings, RUN_2, columns=(*changed, extra))
    second = stage(s3, settings, RUN_2, 1, ORDER_ROWS[1:2])

    # Then the load fails naming the table and column, and nothing was altered or loaded
    with pytest.raises(PermanentError, match="ORDER_DAY") as failure:
        load_staged_files(
            settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(second.key, settings.prefix)]
        )
    assert failure.value.table == "public.orders"
    database = settings.snowflake.database
    columns = query(
        sf_conn,
        f'SELECT "COLUMN_NAME" FROM "{database}"."INFORMATION_SCHEMA"."COLUMNS" WHERE "TABLE_NAME" = \'ORDERS\'',
    )
    assert ("CHANNEL",) not in columns
    assert order_count(sf_conn, settings) == 1
