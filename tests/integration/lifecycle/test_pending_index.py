"""The pending-run index against real servers: a cleanup pass costs what is pending, not what exists.

Runs are staged by the real extractor from the local PostgreSQL and loaded by the real loader
into the local Snowflake; cleanup runs as the template's cleanup role against the moto server.
S3 requests are counted on the client with botocore's ``before-parameter-build`` event (one per API call,
each page of a listing included), Snowflake statements with the local server's query history.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from lifecycle_support import FILES_PER_RUN, ROWS_PER_FILE, exists, load_keys, stage_run, versions
from psycopg2.extensions import connection as PgConnection
from stack_support import running_stack

from pgsnow.cleanup import INDEX_SETTLING, MARKER_WITHOUT_MANIFEST_AGE, CleanupResult, cleanup_pending_runs
from pgsnow.config import Component, Settings
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import (
    MANIFESTS_PREFIX,
    PENDING_INDEX_KEY,
    PENDING_PREFIX,
    FileFormat,
    manifest_key,
    new_run_id,
    pending_key,
)
from pgsnow.local.moto_server import SEED_OBJECTS_PATH
from pgsnow.local.stack import LocalStack
from pgsnow.manifest import RunManifest, RunState
from pgsnow.runs import RunStore

pytestmark = pytest.mark.integration

SETTLED_RUNS = 10_000
SETTLED_TABLES = 10
SEED_BATCH = 2_000


@pytest.fixture(scope="module")
def stack(source_schema: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(
        source_schema[0],
        tmp_path_factory.mktemp("pending"),
        "pgsnow-pending",
        env={"EXTRACT_BATCH_ROWS": str(ROWS_PER_FILE)},
    ) as local:
        yield local


@pytest.fixture
def settled_index(stack: LocalStack, s3: Any) -> None:
    """The bucket's pending-run index was built long ago (passes read only the index)."""
    index_built(s3, stack.resources.bucket, hours_ago=2 * INDEX_SETTLING.total_seconds() / 3600)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class S3Call:
    operation: str
    key: str | None  # Key, or Prefix for a listing


@contextmanager
def counting(client: Any) -> Iterator[list[S3Call]]:
    """Every S3 API call ``client`` makes inside the block (each page of a listing is one call)."""
    calls: list[S3Call] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append(S3Call(model.name, params.get("Key", params.get("Prefix"))))

    client.meta.events.register("before-parameter-build.s3.*", record)
    try:
        yield calls
    finally:
        client.meta.events.unregister("before-parameter-build.s3.*", record)


def mode_settings(stack: LocalStack, mode: str = "after_all") -> Settings:
    return Settings.from_env({**stack.env, "CLEANUP_S3_FILES": mode}, component=Component.CLEANUP)


def hours_from_now(hours: float) -> float:
    return time.time() + hours * 3600


def index_built(s3: Any, bucket: str, *, hours_ago: float) -> None:
    """The bucket's pending-run index was built ``hours_ago`` (its record replaced)."""
    s3.delete_object(Bucket=bucket, Key=PENDING_INDEX_KEY)
    RunStore(s3, bucket, clock=lambda: hours_from_now(-hours_ago)).record_pending_index_built()


def no_index(s3: Any, bucket: str) -> None:
    """The bucket as a release without the index left it: no record (markers, if any, stay)."""
    s3.delete_object(Bucket=bucket, Key=PENDING_INDEX_KEY)


def pending_run_ids(s3: Any, bucket: str, tables: list[TableRef] | None = None) -> list[str]:
    return [p.run_id for p in RunStore(s3, bucket).pending_runs(tables)]


def put_legacy_manifest(s3: Any, bucket: str, manifest: RunManifest) -> None:
    """A manifest as a release without the index wrote it: no pending marker."""
    s3.put_object(Bucket=bucket, Key=manifest_key(manifest.table, manifest.run_id), Body=manifest.to_json())


def settled_copies(template: RunManifest, count: int) -> list[RunManifest]:
    """``count`` loaded runs with every file claimed, over SETTLED_TABLES tables, a second apart."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    loaded = template.with_state(RunState.LOADED, cleaned=tuple(f.key for f in template.files))
    return [
        replace(
            loaded,
            table=TableRef(template.table.schema, f"settled_{n % SETTLED_TABLES}"),
            run_id=new_run_id(start + timedelta(seconds=n)),
        )
        for n in range(count)
    ]


def put_settled_manifests(stack: LocalStack, manifests: list[RunManifest]) -> float:
    """Write the manifests (no markers: their runs were settled long ago); seconds it took.

    Through the moto server's seeding route (pgsnow.local.moto_server): the objects 10,000 PUTs
    would write, in seconds instead of minutes. The pass under test only reads S3 through its API.
    """
    started = time.monotonic()
    for start in range(0, len(manifests), SEED_BATCH):
        objects = [
            [manifest_key(m.table, m.run_id), m.to_json()] for m in manifests[start : start + SEED_BATCH]
        ]
        request = urllib.request.Request(
            stack.aws.endpoint_url + SEED_OBJECTS_PATH,
            data=json.dumps({"bucket": stack.resources.bucket, "objects": objects}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert json.loads(answer.read())["written"] == len(objects)
    return time.monotonic() - started


def loaded_runs(
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, table: TableRef, count: int
) -> list[RunManifest]:
    """``count`` runs of ``table``, each staged and then fully loaded (the loader marks it loaded)."""
    runs = []
    for _ in range(count):
        manifest = stage_run(stack, pg_conn, table)
        load_keys(stack, sf_conn, [f.key for f in manifest.files])
        runs.append(manifest)
    return runs


def touched_keys(calls: list[S3Call]) -> set[str]:
    return {c.key for c in calls if c.key is not None}


def run_keys(manifest: RunManifest) -> set[str]:
    """Every S3 key a pass may name for this run: its manifest, marker and files."""
    return {
        manifest_key(manifest.table, manifest.run_id),
        pending_key(manifest.table, manifest.run_id),
        *(f.key for f in manifest.files),
    }


def clean_pass(
    stack: LocalStack, client: Any, sf_conn: Any, **options: Any
) -> tuple[list[CleanupResult], list[S3Call], int]:
    """One whole-bucket cleanup pass (mode after_all): its results, S3 calls and Snowflake statements."""
    mark = stack.snowflake.history.mark()
    with counting(client) as calls:
        results = cleanup_pending_runs(settings=mode_settings(stack), s3=client, sf_conn=sf_conn, **options)
    return results, calls, len(stack.snowflake.history.since(mark))


# --------------------------------------------------------------------------- the marker's lifecycle


def test_marker_is_written_before_the_first_manifest(
    stack: LocalStack, pg_conn: PgConnection, s3: Any, table: TableRef
) -> None:
    # When the extractor (as its role) runs the table
    extractor_s3 = stack.function_client(Component.EXTRACTOR, "s3")
    with counting(extractor_s3) as calls:
        manifest = extract_table(
            settings=stack.settings(Component.EXTRACTOR),
            pg_conn=pg_conn,
            s3=extractor_s3,
            table=table,
            file_format=FileFormat.CSV,
        )

    # Then its first S3 write of the run is the marker, before any manifest write, and the run is pending
    puts = [c.key for c in calls if c.operation == "PutObject"]
    marker, manifest_at = pending_key(table, manifest.run_id), manifest_key(table, manifest.run_id)
    assert marker in puts
    assert puts.index(marker) < puts.index(manifest_at)
    # (each manifest write of the run marks it again: extracting, then staged)
    assert puts.count(marker) == 2
    assert versions(s3, stack.resources.bucket, marker) == (2, 0)
    assert pending_run_ids(s3, stack.resources.bucket, [table]) == [manifest.run_id]

    # (tidy: load and settle it, so the whole-bucket passes of this module start from nothing pending)
    sf_conn = stack.snowflake_connection()
    try:
        load_keys(stack, sf_conn, [f.key for f in manifest.files])
        cleanup_pending_runs(settings=mode_settings(stack), s3=s3, sf_conn=sf_conn, tables=[table])
    finally:
        sf_conn.close()
    assert pending_run_ids(s3, stack.resources.bucket, [table]) == []


@pytest.mark.parametrize(
    ("mode", "removed_after_partial_load"),
    [
        pytest.param("never", 0, id="never"),
        pytest.param("after_each", 2, id="after_each"),
        pytest.param("after_all", 0, id="after_all"),
    ],
)
@pytest.mark.usefixtures("settled_index")
def test_marker_stays_while_work_remains_and_goes_once_settled(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    cleanup_s3: Any,
    table: TableRef,
    mode: str,
    removed_after_partial_load: int,
) -> None:
    bucket = stack.resources.bucket
    settings = mode_settings(stack, mode)
    # Given a staged run, two of its three files loaded
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    load_keys(stack, sf_conn, keys[:2])

    # When a pass runs, the run keeps its marker (not complete: work remains, whatever the mode)
    partial = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])
    assert [len(r.deleted_keys) for r in partial] == [removed_after_partial_load]
    assert pending_run_ids(s3, bucket, [table]) == [manifest.run_id]

    # When its last file is loaded and a pass runs, the run is settled: its marker is gone
    load_keys(stack, sf_conn, keys[2:])
    cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])
    assert pending_run_ids(s3, bucket, [table]) == []
    assert RunStore(s3, bucket).get_manifest(table, manifest.run_id).state is RunState.LOADED
    assert [exists(s3, bucket, key) for key in keys] == [mode == "never"] * FILES_PER_RUN

    # And a later pass does not read the run at all
    with counting(cleanup_s3) as calls:
        later = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])
    assert later == []
    assert not touched_keys(calls) & run_keys(manifest)


@pytest.mark.usefixtures("settled_index")
def test_failed_run_loses_its_marker_and_keeps_its_files(
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, s3: Any, cleanup_s3: Any, table: TableRef
) -> None:
    bucket = stack.resources.bucket
    # Given a run whose extraction failed after staging its files (the extractor's last manifest write)
    manifest = stage_run(stack, pg_conn, table)
    RunStore(s3, bucket).put_manifest(manifest.with_state(RunState.FAILED, error="boom"))
    assert pending_run_ids(s3, bucket, [table]) == [manifest.run_id]  # marked when it started

    # When a pass runs
    results = cleanup_pending_runs(
        settings=mode_settings(stack), s3=cleanup_s3, sf_conn=sf_conn, tables=[table]
    )

    # Then nothing is cleaned (its files are the sweeper's), and the run is no longer pending
    assert results == []
    assert pending_run_ids(s3, bucket, [table]) == []
    assert all(exists(s3, bucket, f.key) for f in manifest.files)


@pytest.mark.usefixtures("settled_index")
def test_marker_without_manifest_is_removed_only_once_old(
    stack: LocalStack, sf_conn: Any, s3: Any, cleanup_s3: Any, table: TableRef
) -> None:
    bucket = stack.resources.bucket
    settings = mode_settings(stack)
    # Given a run marked pending whose manifest is not written (yet, or never: its extractor stopped)
    run_id = new_run_id()
    RunStore(s3, bucket).mark_pending(table, run_id)

    # When a pass runs now, the marker stays: the manifest may be about to be written
    cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])
    assert pending_run_ids(s3, bucket, [table]) == [run_id]

    # When a pass runs once the marker is older than the age, it is removed
    age = MARKER_WITHOUT_MANIFEST_AGE.total_seconds() / 3600
    later = lambda: hours_from_now(age + 0.1)  # noqa: E731
    cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table], clock=later)
    assert pending_run_ids(s3, bucket, [table]) == []


def test_removing_listed_markers_keeps_a_marker_written_since(
    stack: LocalStack, s3: Any, table: TableRef
) -> None:
    store = RunStore(s3, stack.resources.bucket)
    # Given a pass that listed a run's marker (and then read a settled manifest)
    run_id = new_run_id()
    store.mark_pending(table, run_id)
    listed = store.pending_runs([table])

    # When the extractor marks the run again before the pass removes what it listed
    store.mark_pending(table, run_id)
    assert store.remove_pending(listed) == []

    # Then the run is still pending: only the versions the pass listed went, and no delete marker was left
    assert pending_run_ids(s3, stack.resources.bucket, [table]) == [run_id]
    assert versions(s3, stack.resources.bucket, pending_key(table, run_id)) == (1, 0)
    store.remove_pending(store.pending_runs([table]))
    assert versions(s3, stack.resources.bucket, pending_key(table, run_id)) == (0, 0)


# --------------------------------------------------------------------------- the upgrade


def test_first_pass_after_upgrade_indexes_the_bucket_once(
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, s3: Any, cleanup_s3: Any, table: TableRef
) -> None:
    bucket = stack.resources.bucket
    store = RunStore(s3, bucket)
    # Given a bucket a release without the index wrote: no record, no markers; one loaded run with
    # its files still staged, one run still extracting, and settled runs
    no_index(s3, bucket)
    [loaded] = loaded_runs(stack, pg_conn, sf_conn, table, 1)
    store.remove_pending(store.pending_runs([table]))
    extracting = replace(
        loaded.with_state(RunState.EXTRACTING, files=(), finished_at=None), run_id=new_run_id()
    )
    put_legacy_manifest(s3, bucket, extracting)
    for settled in settled_copies(loaded, 20):
        put_legacy_manifest(s3, bucket, settled)
    assert pending_run_ids(s3, bucket, [table]) == []

    # When the first pass runs
    results, calls, _ = clean_pass(stack, cleanup_s3, sf_conn)

    # Then it read every manifest once, cleaned the loaded run, indexed the extracting one, and
    # recorded that the index is built
    assert any(c.operation == "ListObjectsV2" and c.key == MANIFESTS_PREFIX for c in calls)
    # (earlier tests' runs are in the bucket too: a run a `never` pass settled is cleaned now, in
    # mode after_all; rebuilding the index is how a changed mode reaches settled runs)
    ours = [(r.run_id, len(r.deleted_keys)) for r in results if r.table == table.qualified]
    assert ours == [(loaded.run_id, FILES_PER_RUN)]
    assert not any(exists(s3, bucket, f.key) for f in loaded.files)
    assert pending_run_ids(s3, bucket, [table]) == [extracting.run_id]
    built_at = store.pending_index_built_at()
    assert built_at is not None and abs((datetime.now(UTC) - built_at).total_seconds()) < 600

    # When a run of the old release starts while the stack is still being updated (no marker), a
    # pass within the settling time indexes it: it reads only manifests written since the build
    straggler = replace(extracting, run_id=new_run_id())
    put_legacy_manifest(s3, bucket, straggler)
    settling = INDEX_SETTLING.total_seconds() / 3600 / 2
    _, calls, _ = clean_pass(stack, cleanup_s3, sf_conn, clock=lambda: hours_from_now(settling))
    assert pending_run_ids(s3, bucket, [table]) == [extracting.run_id, straggler.run_id]

    # And once the index has settled, a pass lists only the index and reads only pending runs
    for run in (extracting, straggler):
        store.put_manifest(run.with_state(RunState.FAILED, error="stopped"))
    settled_hours = INDEX_SETTLING.total_seconds() / 3600 + 0.1
    with counting(cleanup_s3) as calls:
        cleanup_pending_runs(
            settings=mode_settings(stack),
            s3=cleanup_s3,
            sf_conn=sf_conn,
            clock=lambda: hours_from_now(settled_hours),
        )
    assert [c.operation for c in calls if c.operation.startswith("List")] == ["ListObjectVersions"]
    assert {c.key for c in calls if c.operation == "GetObject"} == {
        PENDING_INDEX_KEY,
        manifest_key(table, extracting.run_id),
        manifest_key(table, straggler.run_id),
    }
    assert pending_run_ids(s3, bucket) == []
    assert store.pending_index_built_at() == built_at  # recorded once


# --------------------------------------------------------------------------- the cost


@pytest.mark.usefixtures("settled_index")
def test_pass_touches_only_the_pending_runs(
    stack: LocalStack, pg_conn: PgConnection, sf_conn: Any, s3: Any, cleanup_s3: Any, table: TableRef
) -> None:
    bucket = stack.resources.bucket
    # Given an index built long ago, and nothing pending
    clean_pass(stack, cleanup_s3, sf_conn)
    assert pending_run_ids(s3, bucket) == []

    # When a pass runs over three loaded runs and no settled run
    first = loaded_runs(stack, pg_conn, sf_conn, table, 3)
    results_alone, calls_alone, statements_alone = clean_pass(stack, cleanup_s3, sf_conn)

    # And again over three more loaded runs, with 10,000 settled runs in the bucket
    seconds = put_settled_manifests(stack, settled_copies(first[0], SETTLED_RUNS))
    print(f"wrote {SETTLED_RUNS} settled manifests in {seconds:.1f} s")
    second = loaded_runs(stack, pg_conn, sf_conn, table, 3)
    results, calls, statements = clean_pass(stack, cleanup_s3, sf_conn)
    print(f"the pass: {len(calls)} S3 requests, {statements} Snowflake statements")

    # Then each pass cleaned its three runs completely, and nothing is pending
    for runs, found in ((first, results_alone), (second, results)):
        assert sorted((r.run_id, len(r.deleted_keys)) for r in found) == [
            (m.run_id, FILES_PER_RUN) for m in runs
        ]
        assert not any(exists(s3, bucket, f.key) for m in runs for f in m.files)
    assert pending_run_ids(s3, bucket) == []

    # And the second pass made the same S3 requests and Snowflake statements as the first: the
    # settled runs cost no request
    assert [c.operation for c in calls] == [c.operation for c in calls_alone]
    assert statements == statements_alone
    # (one listing of the index, the record, and the three runs' own objects, nothing else)
    assert [c for c in calls if c.operation.startswith("List") and c.key == PENDING_PREFIX] == [
        S3Call("ListObjectVersions", PENDING_PREFIX)
    ]
    assert touched_keys(calls) <= {PENDING_PREFIX, PENDING_INDEX_KEY}.union(*(run_keys(m) for m in second))
    assert len(calls) <= 3 * 20
