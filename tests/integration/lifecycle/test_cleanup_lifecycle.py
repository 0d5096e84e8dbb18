"""The staged-file lifecycle against real servers: versioned removal, archive, run completion,
the orphan sweeper (re-enqueue -> loaded, or abandoned -> reported -> removed after retention)
and concurrent cleanup passes.

Files are staged by the real extractor from the local PostgreSQL into a versioned moto bucket
whose notifications feed the loader queue; the loader is the real handler driven by the
SQS dispatcher (or ``load_staged_files`` directly), writing the real ledger in the local
Snowflake.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from lifecycle_support import (
    FILES_PER_RUN,
    ORPHAN_AGE_MINUTES,
    RETENTION_DAYS,
    drain,
    exists,
    load_keys,
    settings_with,
    stage_run,
    tags,
    versions,
)
from psycopg2.extensions import connection as PgConnection
from stack_support import corrupt

from pgsnow.cleanup import CleanupResult, cleanup_pending_runs, cleanup_run
from pgsnow.config import Component
from pgsnow.errors import ConfigError
from pgsnow.identifiers import TableRef
from pgsnow.load.completion import complete_run
from pgsnow.load.session import LoadSession
from pgsnow.load.work_tables import WORK_TABLE_MAX_AGE, new_work_table
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import LocalStack
from pgsnow.manifest import Column, RunState
from pgsnow.runs import RunStore
from pgsnow.snowflake.table_sql import WORK_TABLE_PREFIXES, build_create_work_table
from pgsnow.sweeper import TAG_ABANDONED_AT, TAG_REENQUEUED_AT, OrphanStatus, SweepResult, sweep_orphans
from pgsnow.typemap import map_pg_type

pytestmark = pytest.mark.integration


def later(minutes: float = 0, days: float = 0) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes, days=days)


def statuses(result: SweepResult, keys: list[str]) -> list[OrphanStatus | None]:
    by_key = {o.key: o.status for o in result.orphans}
    return [by_key.get(key) for key in keys]


# --------------------------------------------------------------------------- cleanup's removal


@pytest.mark.parametrize("mode", ["after_each", "after_all"])
def test_removal_leaves_no_loaded_version_behind_the_marker(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    mode: str,
    cleanup_s3: Any,
) -> None:
    # Given a fully loaded run in the versioned bucket
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys)
    settings = settings_with(stack, CLEANUP_S3_FILES=mode)

    # When cleanup removes its files
    result = cleanup_run(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, manifest=manifest)

    # Then no data version of any key remains, each key has one delete marker, and the claim is recorded
    assert sorted(result.deleted_keys) == sorted(keys)
    assert [versions(s3, settings.bucket, key) for key in keys] == [(0, 1)] * FILES_PER_RUN
    assert sorted(RunStore(s3, settings.bucket).get_manifest(table, manifest.run_id).cleaned) == sorted(keys)


def test_newer_content_under_a_loaded_key_is_kept(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    cleanup_s3: Any,
) -> None:
    # Given a loaded run whose first key was then overwritten with other bytes (never loaded)
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys)
    corrupt(s3, stack.resources.bucket, keys[0])
    settings = settings_with(stack, CLEANUP_S3_FILES="after_each")

    # When cleanup runs
    cleanup_run(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, manifest=manifest)

    # Then the loaded version of that key is gone but the newer, unloaded one stays current
    assert versions(s3, settings.bucket, keys[0]) == (1, 0)
    assert exists(s3, settings.bucket, keys[0])
    assert [exists(s3, settings.bucket, k) for k in keys[1:]] == [False, False]


def test_archive_prefix_copies_then_removes(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    cleanup_s3: Any,
) -> None:
    # Given a fully loaded run and an archive prefix
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    originals = {k: s3.get_object(Bucket=stack.resources.bucket, Key=k)["Body"].read() for k in keys}
    load_keys(stack, sf_conn, keys)
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all", CLEANUP_ARCHIVE_PREFIX="archive")

    # When cleanup runs
    result = cleanup_run(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, manifest=manifest)

    # Then each file sits byte-identical under archive/ and is gone from staging
    assert result.archive_prefix == "archive"
    for key in keys:
        archived = s3.get_object(Bucket=settings.bucket, Key=f"archive/{key}")["Body"].read()
        assert archived == originals[key]
        assert not exists(s3, settings.bucket, key)


@pytest.mark.parametrize("archive", ["staging", "staging/archive", "_pgsnow/archive"])
def test_archive_prefix_inside_staging_or_control_is_refused(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    archive: str,
    cleanup_s3: Any,
) -> None:
    # Given a loaded run and an archive prefix the loader or manifests would see
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys)
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all", CLEANUP_ARCHIVE_PREFIX=archive)

    # When cleanup runs, Then it refuses and every file stays
    with pytest.raises(ConfigError, match="CLEANUP_ARCHIVE_PREFIX"):
        cleanup_run(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, manifest=manifest)
    assert all(exists(s3, settings.bucket, k) for k in keys)


def test_complete_run_moves_state_only(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    cleanup_s3: Any,
) -> None:
    # Given a run with two of three files loaded
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys[:2])
    settings = settings_with(stack, CLEANUP_S3_FILES="after_each")
    args = {
        "settings": settings,
        "s3": cleanup_s3,
        "sf_conn": sf_conn,
        "table": table,
        "run_id": manifest.run_id,
    }

    # When the completion check runs before and after the last file loads
    before = complete_run(**args).state
    load_keys(stack, sf_conn, keys[2:])
    after = complete_run(**args).state

    # Then the run is staged, then loaded, and no file was removed by the check
    assert (before, after) == (RunState.STAGED, RunState.LOADED)
    assert RunStore(s3, settings.bucket).get_manifest(table, manifest.run_id).state is RunState.LOADED
    assert all(exists(s3, settings.bucket, k) for k in keys)

    # And a later cleanup pass still removes the files of the now loaded run
    results = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])
    assert [sorted(r.deleted_keys) for r in results] == [sorted(keys)]


# --------------------------------------------------------------------------- concurrency


def test_concurrent_cleanup_passes_remove_each_file_once(
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, s3: Any, table: TableRef
) -> None:
    # Given two fully loaded runs of one table
    manifests = [stage_run(stack, pg_conn, table) for _ in range(2)]
    keys = [f.key for m in manifests for f in m.files]
    load_keys(stack, sf_conn, keys)
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")
    results: list[CleanupResult] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    # each invocation has its own clients, of the cleanup role (made here: boto3 sessions are not
    # thread-safe)
    clients = [stack.function_client(Component.CLEANUP, "s3") for _ in range(3)]

    def cleanup_pass(s3_client: Any) -> None:
        conn = stack.snowflake_connection()
        try:
            start.wait()
            results.extend(
                cleanup_pending_runs(settings=settings, s3=s3_client, sf_conn=conn, tables=[table])
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    # When three scheduled passes run at the same time
    threads = [threading.Thread(target=cleanup_pass, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)

    # Then nothing failed, every file is gone, removed exactly once in all, and both runs are loaded
    assert errors == []
    assert sorted(k for r in results for k in r.deleted_keys) == sorted(keys)
    assert [versions(s3, settings.bucket, k) for k in keys] == [(0, 1)] * len(keys)
    assert {RunStore(s3, settings.bucket).get_manifest(table, m.run_id).state for m in manifests} == {
        RunState.LOADED
    }


# --------------------------------------------------------------------------- the sweeper


def test_file_whose_notification_was_lost_is_swept_reenqueued_and_loaded(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    sqs: Any,
    dispatcher: SqsDispatcher,
    table: TableRef,
    cleanup_s3: Any,
    cleanup_sqs: Any,
) -> None:
    # Given a staged run whose notifications were all lost (the queue was purged)
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    drain(sqs, stack.resources.queue_url)
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")

    # When the sweeper runs before the files are old enough, then after
    too_early = sweep_orphans(
        settings=settings, s3=cleanup_s3, sqs=cleanup_sqs, sf_conn=sf_conn, tables=[table]
    )
    first = sweep_orphans(
        settings=settings,
        s3=cleanup_s3,
        sqs=cleanup_sqs,
        sf_conn=sf_conn,
        tables=[table],
        now=later(ORPHAN_AGE_MINUTES + 1),
    )

    # Then young files are left alone, and old ones are re-enqueued once, tagged and reported
    assert (too_early.scanned, too_early.orphans) == (0, [])
    assert statuses(first, keys) == [OrphanStatus.REENQUEUED] * FILES_PER_RUN
    assert all(TAG_REENQUEUED_AT in tags(s3, settings.bucket, k) for k in keys)
    assert first.report_key is not None and first.report_key.startswith("_pgsnow/reports/orphans/")
    report = json.loads(s3.get_object(Bucket=settings.bucket, Key=first.report_key)["Body"].read())
    assert sorted(o["key"] for o in report["orphans"]) == sorted(keys)
    assert report["per_table"][table.qualified]["reenqueued"] == FILES_PER_RUN

    # When the loader consumes the synthetic notifications, and cleanup and the sweeper run again
    stats = dispatcher.run_until_idle()
    cleaned = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])
    second = sweep_orphans(
        settings=settings,
        s3=cleanup_s3,
        sqs=cleanup_sqs,
        sf_conn=sf_conn,
        tables=[table],
        now=later(3 * ORPHAN_AGE_MINUTES),
    )

    # Then every file was loaded, the run completed and its files removed, and no orphan remains
    assert (stats.delivered, stats.failed) == (FILES_PER_RUN, 0)
    assert [(r.state, sorted(r.deleted_keys)) for r in cleaned] == [(RunState.LOADED, sorted(keys))]
    assert (second.scanned, second.orphans) == (0, [])


def test_orphan_that_cannot_load_is_abandoned_reported_then_removed_after_retention(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    sqs: Any,
    dispatcher: SqsDispatcher,
    table: TableRef,
    cleanup_s3: Any,
    cleanup_sqs: Any,
) -> None:
    # Given a run whose first two files loaded and whose last file is corrupt, its notification lost
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    bad = keys[-1]
    load_keys(stack, sf_conn, keys[:2])
    corrupt(s3, stack.resources.bucket, bad)
    drain(sqs, stack.resources.queue_url)
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")

    def sweep(at: datetime) -> SweepResult:
        return sweep_orphans(
            settings=settings, s3=cleanup_s3, sqs=cleanup_sqs, sf_conn=sf_conn, tables=[table], now=at
        )

    # When the sweeper re-enqueues it and the loader fails it (dead-lettered)
    first = sweep(later(minutes=ORPHAN_AGE_MINUTES + 1))
    stats = dispatcher.run_until_idle()
    # And later passes run: right after, after the orphan age, within and past the retention
    waiting = sweep(later(minutes=ORPHAN_AGE_MINUTES + 2))
    abandoned = sweep(later(minutes=3 * ORPHAN_AGE_MINUTES))
    within_retention = sweep(later(days=RETENTION_DAYS - 1))
    past_retention = sweep(later(days=RETENTION_DAYS + 1))

    # Then only the bad file was an orphan; it went re-enqueued -> waiting -> abandoned (tagged,
    # reported) -> still abandoned -> deleted; the loaded files of the unfinished run were never touched
    assert stats.failed >= 1
    assert [statuses(p, [bad]) for p in (first, waiting, abandoned, within_retention, past_retention)] == [
        [OrphanStatus.REENQUEUED],
        [OrphanStatus.WAITING],
        [OrphanStatus.ABANDONED],
        [OrphanStatus.ABANDONED],
        [OrphanStatus.DELETED],
    ]
    assert all(len(p.orphans) == 1 for p in (first, waiting, abandoned, within_retention, past_retention))
    assert abandoned.report_key is not None
    report = json.loads(s3.get_object(Bucket=settings.bucket, Key=abandoned.report_key)["Body"].read())
    assert [(o["key"], o["status"]) for o in report["orphans"]] == [(bad, "abandoned")]
    assert past_retention.deleted_keys == [bad]
    assert not exists(s3, settings.bucket, bad)
    assert [exists(s3, settings.bucket, k) for k in keys[:2]] == [True, True]
    assert RunStore(s3, settings.bucket).get_manifest(table, manifest.run_id).state is RunState.STAGED


def test_abandoned_tag_is_set_once(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    sqs: Any,
    table: TableRef,
    cleanup_s3: Any,
    cleanup_sqs: Any,
) -> None:
    # Given a run never loaded, with no loader running: re-enqueued once, then seen again twice
    manifest = stage_run(stack, pg_conn, table)
    key = manifest.files[0].key
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")
    for minutes in (ORPHAN_AGE_MINUTES + 1, 3 * ORPHAN_AGE_MINUTES):
        sweep_orphans(
            settings=settings,
            s3=cleanup_s3,
            sqs=cleanup_sqs,
            sf_conn=sf_conn,
            tables=[table],
            now=later(minutes),
        )
    first_mark = tags(s3, settings.bucket, key)[TAG_ABANDONED_AT]

    # When a later pass sees it again
    sweep_orphans(
        settings=settings,
        s3=cleanup_s3,
        sqs=cleanup_sqs,
        sf_conn=sf_conn,
        tables=[table],
        now=later(10 * ORPHAN_AGE_MINUTES),
    )

    # Then the abandoned mark keeps its first time (retention counts from there)
    assert tags(s3, settings.bucket, key)[TAG_ABANDONED_AT] == first_mark


# --------------------------------------------------------------------------- work tables


def test_the_sweep_drops_the_work_tables_stopped_loads_left(
    stack: LocalStack, sf_conn: Any, cleanup_s3: Any, cleanup_sqs: Any, table: TableRef
) -> None:
    # Given a work table of each kind left in the control schema by a load stopped before its DROP
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")
    assert settings.snowflake.database is not None
    session = LoadSession(settings, settings.snowflake.database, sf_conn, cleanup_s3)
    key = Column.from_types("id", "integer", "integer", map_pg_type("integer"), False)
    left = sorted(new_work_table(session, prefix) for prefix in WORK_TABLE_PREFIXES)
    for work in left:
        session.execute(build_create_work_table(work, [key]))

    # When the cleanup function's sweep runs an hour later (as the cleanup role, on its schedule)
    result = sweep_orphans(
        settings=settings,
        s3=cleanup_s3,
        sqs=cleanup_sqs,
        sf_conn=sf_conn,
        tables=[table],
        now=later(minutes=WORK_TABLE_MAX_AGE.total_seconds() / 60 + 1),
    )

    # Then it dropped them, and reports how many
    assert sorted(result.work_tables_dropped) == [name for _, _, name in left]
    assert result.as_dict()["work_tables_dropped"] == len(WORK_TABLE_PREFIXES)
    remaining = sf_conn.cursor().execute(
        f'SELECT COUNT(*) FROM "{settings.snowflake.database}"."INFORMATION_SCHEMA"."TABLES" '
        'WHERE "TABLE_SCHEMA" = %s AND STARTSWITH("TABLE_NAME", \'_PGSNOW_\')',
        (settings.snowflake.control_schema,),
    )
    assert remaining.fetchall() == [(0,)]
