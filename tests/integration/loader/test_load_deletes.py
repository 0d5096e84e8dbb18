"""Deletes from the run's full key list: once a run is complete, target rows whose primary key
is gone from the source are deleted (hard) or flagged in "_PGSNOW_DELETED_AT" (soft), and
nothing else changes. Against moto and the local Snowflake over HTTP."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from load_support import (
    ORDER_COLUMNS,
    ORDERS,
    RUN_1,
    RUN_2,
    ledger_sql,
    orders_sql,
    query,
    stage_run,
)

from pgsnow.cleanup import cleanup_pending_runs
from pgsnow.config import CleanupMode, Settings
from pgsnow.keys import applied_mark_key, parse_data_key
from pgsnow.load.batch import load_staged_files
from pgsnow.load.outcomes import LoadStatus, RunOutcome
from pgsnow.manifest import RunState
from pgsnow.runs import RunStore
from pgsnow.snowflake.table_sql import SOFT_DELETE_COLUMN

pytestmark = pytest.mark.integration


def snapshot(sf_conn: Any, settings: Settings) -> list[tuple[Any, ...]]:
    """Every source column as text, so 'nothing else changed' compares whole rows."""
    names = ", ".join(f'TO_VARCHAR("{n.upper()}")' for n, _, _ in ORDER_COLUMNS)
    return query(sf_conn, f'SELECT {names} FROM {orders_sql(settings)} ORDER BY "ORDER_ID"')


@pytest.mark.parametrize("deletes", ["hard", "soft"], ids=["hard-delete", "soft-delete"])
def test_a_key_gone_from_the_source_is_deleted_after_the_run_completes(
    settings: Settings, s3: Any, sf_conn: Any, deletes: str
) -> None:
    # Given a first complete run with orders 1, 2 and 3 loaded
    first = stage_run(s3, settings, RUN_1, [1, 2, 3], deletes)
    load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(first, settings.prefix)]
    )
    before = snapshot(sf_conn, settings)
    assert [row[0] for row in before] == ["1", "2", "3"]

    # When the next run's key list no longer has order 2 and its last file loads
    second = stage_run(s3, settings, RUN_2, [1, 3], deletes)
    results = load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(second, settings.prefix)]
    )

    # Then order 2 is deleted (hard) or flagged (soft); orders 1 and 3 are unchanged and not flagged
    assert [r.status for r in results] == [LoadStatus.LOADED]
    after = snapshot(sf_conn, settings)
    if deletes == "hard":
        assert after == [before[0], before[2]]
    else:
        assert after == before
        flags = query(
            sf_conn,
            f'SELECT "ORDER_ID", "{SOFT_DELETE_COLUMN}" IS NOT NULL FROM {orders_sql(settings)} ORDER BY "ORDER_ID"',
        )
        assert flags == [(1, False), (2, True), (3, False)]


def test_deletes_of_a_run_whose_last_file_loaded_before_its_manifest_was_staged_are_applied_by_cleanup(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given orders 1, 2 and 3 loaded, then a run without order 2 whose only file loaded while its
    # manifest still said `extracting` (the notification beat the extractor's last write)
    first = stage_run(s3, settings, RUN_1, [1, 2, 3], "hard")
    load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(first, settings.prefix)]
    )
    second = parse_data_key(
        stage_run(s3, settings, RUN_2, [1, 3], "hard", RunState.EXTRACTING), settings.prefix
    )
    loaded = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[second])
    assert [(r.status, r.run_outcome) for r in loaded] == [(LoadStatus.LOADED, None)]
    assert [row[0] for row in snapshot(sf_conn, settings)] == ["1", "2", "3"]
    stage_run(s3, settings, RUN_2, [1, 3], "hard")  # the extractor's `staged` write

    # When the scheduled cleanup pass runs (in a mode that removes no file)
    keep_files = dataclasses.replace(settings, cleanup_mode=CleanupMode.NEVER)
    results = cleanup_pending_runs(settings=keep_files, s3=s3, sf_conn=sf_conn, tables=[ORDERS])

    # Then it completed the run: order 2 is deleted, the mark says applied, and only then is the
    # run marked loaded
    assert [(r.run_id, r.state) for r in results] == [(RUN_2, RunState.LOADED)]
    assert [row[0] for row in snapshot(sf_conn, settings)] == ["1", "3"]
    assert ledger_status(sf_conn, settings, applied_mark_key(ORDERS, RUN_2)) == [("APPLIED", RUN_2)]
    assert RunStore(s3, settings.bucket).get_manifest(ORDERS, RUN_2).state is RunState.LOADED

    # And a redelivered file of the run deletes nothing again and reports the recorded outcome
    again = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[second])
    assert [(r.status, r.run_outcome) for r in again] == [(LoadStatus.ALREADY_LOADED, RunOutcome.APPLIED)]


def test_deletes_are_applied_once_when_the_last_file_is_delivered_again(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given two complete runs with soft deletes; order 2 was flagged by the second
    load_staged_files(
        settings=settings,
        sf_conn=sf_conn,
        s3=s3,
        objects=[parse_data_key(stage_run(s3, settings, RUN_1, [1, 2, 3], "soft"), settings.prefix)],
    )
    second = parse_data_key(stage_run(s3, settings, RUN_2, [1, 3], "soft"), settings.prefix)
    load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[second])
    flagged_at = query(
        sf_conn, f'SELECT TO_VARCHAR("{SOFT_DELETE_COLUMN}") FROM {orders_sql(settings)} WHERE "ORDER_ID" = 2'
    )

    # When the second run's file is delivered again
    again = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[second])

    # Then nothing loads and the flag keeps its first time
    assert [r.status for r in again] == [LoadStatus.ALREADY_LOADED]
    assert (
        query(
            sf_conn,
            f'SELECT TO_VARCHAR("{SOFT_DELETE_COLUMN}") FROM {orders_sql(settings)} WHERE "ORDER_ID" = 2',
        )
        == flagged_at
    )


def ledger_status(sf_conn: Any, settings: Settings, key: str) -> list[tuple[Any, ...]]:
    ledger = ledger_sql(settings)
    return query(sf_conn, f'SELECT "STATUS", "RUN_ID" FROM {ledger} WHERE "S3_KEY" = %s', (key,))


@pytest.mark.parametrize("deletes", ["hard", "soft"], ids=["hard-delete", "soft-delete"])
def test_a_stale_key_list_delivered_after_a_newer_run_was_applied_deletes_nothing(
    settings: Settings, s3: Any, sf_conn: Any, deletes: str
) -> None:
    # Given two complete runs: the older has orders 1 and 2; the newer, taken after order 1 was
    # deleted and order 3 inserted at the source, has 2 and 3
    older = parse_data_key(stage_run(s3, settings, RUN_1, [1, 2], deletes), settings.prefix)
    newer = parse_data_key(stage_run(s3, settings, RUN_2, [2, 3], deletes), settings.prefix)

    # When the newer run is delivered and applied first, then the older run's last file
    applied = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[newer])
    stale = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[older])

    # Then the older run's key list is not applied: order 3, which only the newer run has, is
    # neither deleted nor flagged (order 1 comes back, as a late merge run's keys do, until
    # the next run's deletes: docs/loading.md)
    assert [r.run_outcome for r in applied] == [RunOutcome.APPLIED]
    after = snapshot(sf_conn, settings)
    assert [row[0] for row in after] == ["1", "2", "3"]
    if deletes == "soft":
        flags = query(
            sf_conn, f'SELECT COUNT(*) FROM {orders_sql(settings)} WHERE "{SOFT_DELETE_COLUMN}" IS NOT NULL'
        )
        assert flags == [(0,)]
    # and the run is reported and recorded as superseded, the newer one as applied
    assert [(r.status, r.run_outcome) for r in stale] == [(LoadStatus.LOADED, RunOutcome.SUPERSEDED)]
    assert ledger_status(sf_conn, settings, applied_mark_key(ORDERS, RUN_1)) == [("SUPERSEDED", RUN_1)]
    assert ledger_status(sf_conn, settings, applied_mark_key(ORDERS, RUN_2)) == [("APPLIED", RUN_2)]

    # When the older run's last file is delivered again
    again = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[older])

    # Then nothing changes and the recorded outcome is reported again
    assert [(r.status, r.run_outcome) for r in again] == [(LoadStatus.ALREADY_LOADED, RunOutcome.SUPERSEDED)]
    assert snapshot(sf_conn, settings) == after


def test_a_key_list_older_than_a_loaded_file_of_a_newer_run_deletes_nothing(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given an older complete run with orders 1 and 2, and a newer run whose file (with the new
    # order 3) is loaded while the newer run is still extracting (so it is not complete)
    older = parse_data_key(stage_run(s3, settings, RUN_1, [1, 2], "hard"), settings.prefix)
    newer = parse_data_key(stage_run(s3, settings, RUN_2, [2, 3], "hard"), settings.prefix)
    runs = RunStore(s3, settings.bucket)
    runs.put_manifest(runs.get_manifest(ORDERS, RUN_2).with_state(RunState.EXTRACTING))
    loaded = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[newer])

    # When the older run's last file is delivered after it
    stale = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[older])

    # Then order 3, which only the newer run has, is still there
    assert [r.run_outcome for r in loaded] == [None]
    assert [r.run_outcome for r in stale] == [RunOutcome.SUPERSEDED]
    assert [row[0] for row in snapshot(sf_conn, settings)] == ["1", "2", "3"]
