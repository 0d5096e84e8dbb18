"""Cleanup modes against real servers: files staged by the real extractor from the local
PostgreSQL, loaded by the real loader into the local Snowflake (its load ledger), and
deleted (or kept) in a moto S3 bucket by ``pgsnow.cleanup``.

Every run here stages three files (six rows, two per file). Settings for each mode are
built by ``Settings.from_env`` from the stack's environment plus ``CLEANUP_S3_FILES``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection

from pgsnow.cleanup import CleanupResult, cleanup_pending_runs, cleanup_run
from pgsnow.config import Component, Settings
from pgsnow.extract import extract_table
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat, parse_data_key
from pgsnow.load import LoadStatus, load_staged_files
from pgsnow.local.postgres import create_database, start_local_postgres
from pgsnow.local.stack import SNOWFLAKE_DATABASE, LocalStack, start_stack
from pgsnow.manifest import RunManifest, RunState
from pgsnow.postgres import connect
from pgsnow.snowflake import LEDGER_TABLE
from pgsnow.staging import get_manifest, put_manifest

pytestmark = pytest.mark.integration

SOURCE_DATABASE = "test"
ROWS_PER_FILE = 2
SOURCE_ROWS = [(n, f"item {n}") for n in range(1, 7)]  # three files of two rows
FILES_PER_RUN = 3


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source_schema() -> Iterator[tuple[str, str]]:
    """(DSN of database ``test``, a schema only this module uses); the schema is dropped afterwards."""
    admin = start_local_postgres(environ={})
    dsn = create_database(admin.dsn, SOURCE_DATABASE)  # kept if it exists
    schema = f"pgsnow_clean_{uuid.uuid4().hex[:8]}"
    conn = connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield dsn, schema
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.close()
        admin.stop()


@pytest.fixture(scope="module")
def pg_conn(source_schema: tuple[str, str]) -> Iterator[PgConnection]:
    conn = connect(source_schema[0])
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def stack(source_schema: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    local = start_stack(
        pg_dsn=source_schema[0],
        data_dir=tmp_path_factory.mktemp("cleanup"),
        bucket=f"pgsnow-clean-{uuid.uuid4().hex[:8]}",
    )
    local.env["EXTRACT_BATCH_ROWS"] = str(ROWS_PER_FILE)
    yield local
    local.stop()


@pytest.fixture(scope="module")
def sf_conn(stack: LocalStack) -> Iterator[Any]:
    conn = stack.snowflake_connection()
    yield conn
    conn.close()


@pytest.fixture
def s3(stack: LocalStack) -> Any:
    return stack.aws.client("s3")


@pytest.fixture
def table(pg_conn: PgConnection, source_schema: tuple[str, str]) -> TableRef:
    """A fresh six-row source table per test."""
    ref = TableRef(source_schema[1], f"items_{uuid.uuid4().hex[:8]}")
    name = sql.Identifier(ref.schema, ref.table)
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, label text)").format(name))
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(name), SOURCE_ROWS)
    return ref


# --------------------------------------------------------------------------- helpers


def mode_settings(stack: LocalStack, mode: str) -> Settings:
    return Settings.from_env({**stack.env, "CLEANUP_S3_FILES": mode}, component=Component.CLEANUP)


def stage_run(stack: LocalStack, pg_conn: PgConnection, s3: Any, table: TableRef) -> RunManifest:
    manifest = extract_table(
        settings=stack.settings(Component.EXTRACTOR),
        pg_conn=pg_conn,
        s3=s3,
        table=table,
        file_format=FileFormat.CSV,
    )
    assert len(manifest.files) == FILES_PER_RUN
    return manifest


def load_keys(stack: LocalStack, sf_conn: Any, s3: Any, keys: list[str]) -> None:
    settings = stack.settings(Component.LOADER)
    results = load_staged_files(
        settings=settings,
        sf_conn=sf_conn,
        s3=s3,
        objects=[parse_data_key(key, settings.prefix) for key in keys],
    )
    assert [r.status for r in results] == [LoadStatus.LOADED] * len(keys)


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
    return get_manifest(s3, bucket, manifest.table, manifest.run_id).state


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
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, s3: Any, table: TableRef, mode: str, deletes: bool
) -> None:
    # Given a run of three files, all loaded
    manifest = stage_run(stack, pg_conn, s3, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, s3, keys)
    settings = mode_settings(stack, mode)

    # When cleanup runs in the mode under test
    result = cleanup_run(settings=settings, s3=s3, sf_conn=sf_conn, manifest=manifest)

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
) -> None:
    # Given a run of three files of which only the first two are loaded
    manifest = stage_run(stack, pg_conn, s3, table)
    keys = [f.key for f in manifest.files]
    loaded, not_loaded = keys[:2], keys[2]
    load_keys(stack, sf_conn, s3, loaded)
    settings = mode_settings(stack, mode)

    # When cleanup runs in the mode under test
    result = cleanup_run(settings=settings, s3=s3, sf_conn=sf_conn, manifest=manifest)

    # Then only after_each deletes, and only the loaded files; the unloaded file always stays
    assert (result.files_total, result.files_loaded) == (FILES_PER_RUN, 2)
    assert sorted(result.deleted_keys) == (sorted(loaded) if deletes_loaded else [])
    assert existing(s3, settings.bucket, keys) == ([not_loaded] if deletes_loaded else keys)
    # And the run stays staged: it is not loaded yet
    assert result.state is RunState.STAGED
    assert manifest_state(s3, settings.bucket, manifest) is RunState.STAGED


@pytest.mark.parametrize("mode", ["after_each", "after_all"])
def test_run_still_extracting_is_never_touched(
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, s3: Any, table: TableRef, mode: str
) -> None:
    # Given files that are all loaded, but whose run's manifest still says extracting
    # (the extractor has not written its final file list yet)
    staged = stage_run(stack, pg_conn, s3, table)
    keys = [f.key for f in staged.files]
    load_keys(stack, sf_conn, s3, keys)
    extracting = staged.with_state(RunState.EXTRACTING, finished_at=None)
    put_manifest(s3, stack.resources.bucket, extracting)
    settings = mode_settings(stack, mode)

    # When cleanup runs on that run directly, and as the scheduled pass over the table
    direct = cleanup_run(settings=settings, s3=s3, sf_conn=sf_conn, manifest=extracting)
    scheduled = cleanup_pending_runs(settings=settings, s3=s3, sf_conn=sf_conn, tables=[table])

    # Then nothing was deleted and the manifest is unchanged
    assert (direct.state, direct.deleted_keys) == (RunState.EXTRACTING, [])
    assert scheduled == []  # the pass only takes staged runs
    assert existing(s3, settings.bucket, keys) == keys
    assert get_manifest(s3, settings.bucket, table, staged.run_id) == extracting


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
) -> None:
    # Given a run whose files are all loaded, but the ledger row of one file records another checksum
    manifest = stage_run(stack, pg_conn, s3, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, s3, keys)
    mismatched = keys[1]
    ledger = quote_qualified(SNOWFLAKE_DATABASE, "PGSNOW", LEDGER_TABLE)
    with sf_conn.cursor() as cur:
        cur.execute(f'UPDATE {ledger} SET "SHA256" = %s WHERE "S3_KEY" = %s', ("0" * 64, mismatched))
    settings = mode_settings(stack, mode)

    # When cleanup runs
    result = cleanup_run(settings=settings, s3=s3, sf_conn=sf_conn, manifest=manifest)

    # Then that file is kept and does not count as loaded, so the run is not loaded either
    assert result.files_loaded == FILES_PER_RUN - 1
    assert mismatched not in result.deleted_keys
    assert len(result.deleted_keys) == deleted_count
    assert mismatched in existing(s3, settings.bucket, keys)
    assert manifest_state(s3, settings.bucket, manifest) is final_state


def test_cleanup_pass_twice_deletes_once(
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, s3: Any, table: TableRef
) -> None:
    # Given a fully loaded run
    manifest = stage_run(stack, pg_conn, s3, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, s3, keys)
    settings = mode_settings(stack, "after_all")

    # When the scheduled cleanup pass runs twice
    first = cleanup_pending_runs(settings=settings, s3=s3, sf_conn=sf_conn, tables=[table])
    second = cleanup_pending_runs(settings=settings, s3=s3, sf_conn=sf_conn, tables=[table])

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
    manifest = stage_run(stack, pg_conn, s3, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, s3, keys)
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
