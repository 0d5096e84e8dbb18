"""Cleanup modes against real servers: files staged by the real extractor from the local
PostgreSQL, loaded by the real loader into the local Snowflake (its load ledger), and
deleted (or kept) in a moto S3 bucket by ``pgsnow.cleanup``.

Every run here stages three files (six rows, two per file). Settings for each mode are
built by ``Settings.from_env`` from the stack's environment plus ``CLEANUP_S3_FILES``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from lifecycle_support import (
    FILES_PER_RUN,
    ROWS_PER_FILE,
    load_keys,
    stage_run,
)
from psycopg2.extensions import connection as PgConnection
from stack_support import running_stack

from pgsnow.cleanup import CleanupResult, cleanup_pending_runs, cleanup_run
from pgsnow.config import Component, Settings
from pgsnow.identifiers import TableRef
from pgsnow.ledger import ledger_name
from pgsnow.local.stack import SNOWFLAKE_DATABASE, LocalStack
from pgsnow.manifest import RunManifest, RunState
from pgsnow.runs import RunStore

pytestmark = pytest.mark.integration

# --------------------------------------------------------------------------- fixtures
# source_schema, pg_conn, sf_conn, s3 and table (a fresh six-row source table) are lifecycle_support's;
# this module's stack is its own: no handler runs here, settings are built from its environment.


@pytest.fixture(scope="module")
def stack(source_schema: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(
        source_schema[0],
        tmp_path_factory.mktemp("cleanup"),
        "pgsnow-clean",
        env={"EXTRACT_BATCH_ROWS": str(ROWS_PER_FILE)},
    ) as local:
        yield local


# --------------------------------------------------------------------------- helpers


def mode_settings(stack: LocalStack, mode: str) -> Settings:
    return Settings.from_env({**stack.env, "CLEANUP_S3_FILES": mode}, component=Component.CLEANUP)


def existing(s3: Any, bucket: str, keys: list[str]) -> list[str]:
    """The keys whose current version exists (not deleted)."""
    found = []
    for key in keys:
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in {"404", "NoSuchKey"}:
                raise
            continue
        found.append(key)
    return found


def delete_markers(s3: Any, bucket: str, key: str) -> int:
    """How many times ``key`` was deleted (the bucket is versioned: each delete leaves a marker)."""
    versions = s3.list_object_versions(Bucket=bucket, Prefix=key)
    return sum(1 for marker in versions.get("DeleteMarkers", []) if marker["Key"] == key)


def manifest_state(s3: Any, bucket: str, manifest: RunManifest) -> RunState:
    return RunStore(s3, bucket).get_manifest(manifest.table, manifest.run_id).state


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("mode", "deletes"),
    [
        pytest.param("never", False, id="never"),
        pytest.param("after_each", True, id="after_each"),
        pytest.param("after_all", True, id="after_all"),
        pytest.param("true", True, id="true-is-after_all"),
        pytest.param("false", False, id="false-is-never"),
    ],
)
def test_fully_loaded_run(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    mode: str,
    deletes: bool,
    cleanup_s3: Any,
) -> None:
    # Given a run of three files, all loaded
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys)
    settings = mode_settings(stack, mode)

    # When cleanup runs in the mode under test
    result = cleanup_run(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, manifest=manifest)

    # Then the loaded files go (or stay), and the run is marked loaded whatever the mode
    assert (result.files_total, result.files_loaded) == (FILES_PER_RUN, FILES_PER_RUN)
    assert sorted(result.deleted_keys) == (sorted(keys) if deletes else [])
    assert result.deleted_bytes == (sum(f.bytes for f in manifest.files) if deletes else 0)
    assert existing(s3, settings.bucket, keys) == ([] if deletes else keys)
    assert result.state is RunState.LOADED
    assert manifest_state(s3, settings.bucket, manifest) is RunState.LOADED


@pytest.mark.parametrize(
    ("mode", "deletes_loaded"),
    [
        pytest.param("never", False, id="never"),
        pytest.param("after_each", True, id="after_each"),
        pytest.param("after_all", False, id="after_all"),
        pytest.param("true", False, id="true-is-after_all"),
        pytest.param("false", False, id="false-is-never"),
    ],
)
def test_partly_loaded_run(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    mode: str,
    deletes_loaded: bool,
    cleanup_s3: Any,
) -> None:
    # Given a run of three files of which only the first two are loaded
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    loaded, not_loaded = keys[:2], keys[2]
    load_keys(stack, sf_conn, loaded)
    settings = mode_settings(stack, mode)

    # When cleanup runs in the mode under test
    result = cleanup_run(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, manifest=manifest)

    # Then only after_each deletes, and only the loaded files; the unloaded file always stays
    assert (result.files_total, result.files_loaded) == (FILES_PER_RUN, 2)
    assert sorted(result.deleted_keys) == (sorted(loaded) if deletes_loaded else [])
    assert existing(s3, settings.bucket, keys) == ([not_loaded] if deletes_loaded else keys)
    # And the run stays staged: it is not loaded yet
    assert result.state is RunState.STAGED
    assert manifest_state(s3, settings.bucket, manifest) is RunState.STAGED


@pytest.mark.parametrize("mode", ["after_each", "after_all"])
def test_run_still_extracting_is_never_touched(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    mode: str,
    cleanup_s3: Any,
) -> None:
    # Given files that are all loaded, but whose run's manifest still says extracting
    # (the extractor has not written its final file list yet)
    staged = stage_run(stack, pg_conn, table)
    keys = [f.key for f in staged.files]
    load_keys(stack, sf_conn, keys)
    extracting = staged.with_state(RunState.EXTRACTING, finished_at=None)
    RunStore(s3, stack.resources.bucket).put_manifest(extracting)
    settings = mode_settings(stack, mode)

    # When cleanup runs on that run directly, and as the scheduled pass over the table
    direct = cleanup_run(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, manifest=extracting)
    scheduled = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])

    # Then nothing was deleted and the manifest is unchanged
    assert (direct.state, direct.deleted_keys) == (RunState.EXTRACTING, [])
    assert scheduled == []  # the pass only takes staged runs
    assert existing(s3, settings.bucket, keys) == keys
    assert RunStore(s3, settings.bucket).get_manifest(table, staged.run_id) == extracting


@pytest.mark.parametrize(
    ("mode", "deleted_count", "final_state"),
    [
        pytest.param("after_each", 2, RunState.STAGED, id="after_each"),
        pytest.param("after_all", 0, RunState.STAGED, id="after_all"),
    ],
)
def test_ledger_checksum_differing_from_the_manifest_keeps_the_file(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    mode: str,
    deleted_count: int,
    final_state: RunState,
    cleanup_s3: Any,
) -> None:
    # Given a run whose files are all loaded, but the ledger row of one file records another checksum
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys)
    mismatched = keys[1]
    ledger = ledger_name(SNOWFLAKE_DATABASE, "PGSNOW", table)
    with sf_conn.cursor() as cur:
        cur.execute(f'UPDATE {ledger} SET "SHA256" = %s WHERE "S3_KEY" = %s', ("0" * 64, mismatched))
    # (the loader completed the run when its last file loaded: put it back to `staged`, as a loader
    # whose manifest write was refused leaves it, so cleanup decides the run's completion)
    RunStore(s3, stack.resources.bucket).put_manifest(manifest)
    settings = mode_settings(stack, mode)

    # When cleanup runs
    result = cleanup_run(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, manifest=manifest)

    # Then that file is kept and does not count as loaded, so the run is not loaded either
    assert result.files_loaded == FILES_PER_RUN - 1
    assert mismatched not in result.deleted_keys
    assert len(result.deleted_keys) == deleted_count
    assert mismatched in existing(s3, settings.bucket, keys)
    assert manifest_state(s3, settings.bucket, manifest) is final_state


def test_cleanup_pass_twice_deletes_once(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    table: TableRef,
    cleanup_s3: Any,
) -> None:
    # Given a fully loaded run
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys)
    settings = mode_settings(stack, "after_all")

    # When the scheduled cleanup pass runs twice
    first = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])
    second = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])

    # Then the first deleted every file, the second found nothing to do, and each file was deleted once
    assert [sorted(r.deleted_keys) for r in first] == [sorted(keys)]
    assert second == []
    assert existing(s3, settings.bucket, keys) == []
    assert [delete_markers(s3, settings.bucket, key) for key in keys] == [1] * FILES_PER_RUN
    assert manifest_state(s3, settings.bucket, manifest) is RunState.LOADED


@pytest.mark.parametrize("mode", ["after_each", "after_all"])
def test_concurrent_cleanup_of_one_manifest_deletes_each_file_once(
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, s3: Any, table: TableRef, mode: str
) -> None:
    # Given a fully loaded run, and two cleanup invocations holding the same staged manifest
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys)
    settings = mode_settings(stack, mode)
    results: list[CleanupResult] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def invoke() -> None:
        conn = stack.snowflake_connection()  # each invocation has its own clients
        try:
            start.wait()
            results.append(
                cleanup_run(settings=settings, s3=stack.aws.client("s3"), sf_conn=conn, manifest=manifest)
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    # When both run at the same time
    threads = [threading.Thread(target=invoke) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    # Then neither failed, every file is gone, each was deleted once, and the run is loaded
    assert errors == []
    assert len(results) == 2
    assert existing(s3, settings.bucket, keys) == []
    assert [delete_markers(s3, settings.bucket, key) for key in keys] == [1] * FILES_PER_RUN
    assert sorted(key for r in results for key in r.deleted_keys) == sorted(keys)
    assert manifest_state(s3, settings.bucket, manifest) is RunState.LOADED
