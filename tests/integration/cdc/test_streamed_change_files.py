"""Change files uploaded while the slot is still read (``pgsnow.streamed_upload``), end to end on the
local stack: the drain runs with the change-capture role's credentials (moto enforces them), the
loader through the queue with its own, cleanup with its own. A file larger than a part is streamed,
listed in its manifest with S3's checksum over its parts, applied exactly once, and removed by
cleanup; a run that fails before its manifest leaves nothing of it in the bucket."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from cdc_support import change_capture_source, put_in_cdc_mode
from pipeline_support import PipelineHarness
from psycopg2 import sql

from pgsnow.cdc.drain import drain_slot
from pgsnow.cdc.enroll import snapshot_table
from pgsnow.cleanup import cleanup_run
from pgsnow.config import CleanupMode, Component
from pgsnow.errors import RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import table_prefix
from pgsnow.manifest import META_SHA256, RunManifest, RunState
from pgsnow.postgres import connect
from pgsnow.runs import RunStore
from pgsnow.runtime import reset_runtime
from pgsnow.staging import PARTS_CHECKSUM_PREFIX, staged_checksum
from pgsnow.streamed_upload import PART_BYTES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS_PER_TRANSACTION = 5_000
TRANSACTIONS = 4  # ~20 MB of hex text: a file of ~11 MB compressed, more than one part


@pytest.fixture
def streamed_table(
    pipeline: PipelineHarness, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TableRef, dict[str, str]]]:
    table = pipeline.table(f"streamed_{random.getrandbits(32):08x}")
    pipeline.run_sql(
        sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, payload text NOT NULL)").format(
            sql.Identifier(table.schema, table.table)
        )
    )
    with change_capture_source(pipeline.source_dsn, [(table.schema, table.table)]) as source:
        env = put_in_cdc_mode(pipeline.stack.env, monkeypatch, table, source)
        try:
            yield table, env
        finally:
            reset_runtime()


def write_changes(pipeline: PipelineHarness, table: TableRef, first_id: int) -> None:
    """TRANSACTIONS transactions of ROWS_PER_TRANSACTION rows of 1 KB of hex (compresses about 2:1),
    then an update and a delete, so the run holds every kind of change."""
    ident = sql.Identifier(table.schema, table.table)
    for n in range(TRANSACTIONS):
        start = first_id + n * ROWS_PER_TRANSACTION
        pipeline.run_sql(
            sql.SQL(
                "INSERT INTO {} SELECT g,"
                " (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 32) i)"
                " FROM generate_series(%s, %s) g"
            ).format(ident),
            (start, start + ROWS_PER_TRANSACTION - 1),
        )
    pipeline.run_sql(sql.SQL("UPDATE {} SET payload = 'updated' WHERE id = %s").format(ident), (first_id,))
    pipeline.run_sql(sql.SQL("DELETE FROM {} WHERE id = %s").format(ident), (first_id + 1,))


def snapshot(pipeline: PipelineHarness, table: TableRef, env: dict[str, str]) -> None:
    settings = pipeline.settings(Component.EXTRACTOR, **env)
    pg_conn = connect(pipeline.source_dsn)
    try:
        outcome = snapshot_table(
            settings=settings, pg_conn=pg_conn, s3=pipeline.function_s3(Component.EXTRACTOR), table=table
        )
    finally:
        pg_conn.close()
    assert isinstance(outcome, RunManifest) and outcome.state is RunState.STAGED


def change_runs(pipeline: PipelineHarness, table: TableRef) -> list[RunManifest]:
    store = RunStore(pipeline.s3(), pipeline.bucket)
    runs = [store.get_manifest(table, run_id) for run_id in store.run_ids(table)]
    return [m for m in runs if m.changes is not None and m.mode == "cdc" and m.files]


def open_uploads(pipeline: PipelineHarness, table: TableRef) -> list[str]:
    listed = pipeline.s3().list_multipart_uploads(
        Bucket=pipeline.bucket, Prefix=table_prefix(pipeline.prefix, table)
    )
    return [u["Key"] for u in listed.get("Uploads", [])]


def test_a_change_file_streamed_during_the_read_is_applied_once_verified_and_cleaned_up(
    pipeline: PipelineHarness, streamed_table: tuple[TableRef, dict[str, str]]
) -> None:
    table, env = streamed_table
    recorder, dispatcher = pipeline.loader()
    # Given the table's snapshot loaded, then ~20 MB of changes in the slot
    snapshot(pipeline, table, env)
    dispatcher.run_until_idle()
    write_changes(pipeline, table, first_id=1)
    # When the slot is drained with the change-capture role
    settings = pipeline.settings(Component.CHANGE_CAPTURE, **env)
    outcome = drain_slot(settings, dsn=pipeline.source_dsn, s3=pipeline.function_s3(Component.CHANGE_CAPTURE))
    assert outcome["confirmed"] and outcome["tables"] == {
        table.qualified: TRANSACTIONS * ROWS_PER_TRANSACTION + 2
    }
    # Then its file went up in parts, is listed with S3's checksum over them, and no upload is left open
    (run,) = change_runs(pipeline, table)
    (listed,) = run.files
    assert listed.bytes > PART_BYTES and listed.sha256.startswith(PARTS_CHECKSUM_PREFIX)
    head = pipeline.s3().head_object(Bucket=pipeline.bucket, Key=listed.key, ChecksumMode="ENABLED")
    assert META_SHA256 not in {k.lower() for k in head["Metadata"]}
    assert head["ETag"].strip('"').endswith(f"-{-(-listed.bytes // PART_BYTES)}")
    assert staged_checksum(head) == listed.sha256 and head["ContentLength"] == listed.bytes
    assert open_uploads(pipeline, table) == []
    # When the queue is delivered (the loader checks the file against the manifest first)
    dispatcher.run_until_idle()
    # Then it applied, once, and Snowflake matches PostgreSQL
    assert [d for d in recorder.deliveries if d.failed] == []
    verification = pipeline.verify(table)
    assert verification.ok, verification
    # And cleanup recognises the loaded file by that checksum and removes it
    cleanup_settings = pipeline.settings(
        Component.CLEANUP, **env, CLEANUP_S3_FILES=CleanupMode.AFTER_EACH.value
    )
    result = cleanup_run(
        settings=cleanup_settings,
        s3=pipeline.function_s3(Component.CLEANUP),
        sf_conn=pipeline.sf_conn,
        manifest=RunStore(pipeline.s3(), pipeline.bucket).get_manifest(table, run.run_id),
    )
    assert result.deleted_keys == [listed.key], result
    listed_now = pipeline.s3().list_objects_v2(Bucket=pipeline.bucket, Prefix=listed.key)
    assert listed_now.get("KeyCount", 0) == 0


def test_a_run_that_fails_before_its_manifest_leaves_no_streamed_file_or_upload(
    pipeline: PipelineHarness,
    streamed_table: tuple[TableRef, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table, env = streamed_table
    snapshot(pipeline, table, env)
    write_changes(pipeline, table, first_id=1)
    settings = pipeline.settings(Component.CHANGE_CAPTURE, **env)
    s3 = pipeline.function_s3(Component.CHANGE_CAPTURE)

    # Given S3 refusing the run's manifest (after the file's parts went up during the read)
    def refused(store: RunStore, manifest: RunManifest, *args: Any, **kwargs: Any) -> Any:
        raise RetryableError("S3 SlowDown: the manifest is refused (injected)")

    parts_sent: list[str] = []
    real_upload_part = s3.upload_part

    def counting_upload_part(**kwargs: Any) -> Any:
        parts_sent.append(kwargs["Key"])
        return real_upload_part(**kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(RunStore, "put_manifest", refused)
        patched.setattr(s3, "upload_part", counting_upload_part)
        # When the run fails
        with pytest.raises(RetryableError, match="injected"):
            drain_slot(settings, dsn=pipeline.source_dsn, s3=s3)
    # Then parts had gone up, but no object is under the table's prefix but the snapshot's and no
    # upload is left open: nothing of the failed run can be loaded
    assert parts_sent
    keys = [
        o["Key"]
        for o in pipeline.s3()
        .list_objects_v2(Bucket=pipeline.bucket, Prefix=table_prefix(pipeline.prefix, table))
        .get("Contents", [])
    ]
    assert not any(key in keys for key in parts_sent)
    assert open_uploads(pipeline, table) == []
    # And the next run stages the same changes again, streamed, and they apply
    recorder, dispatcher = pipeline.loader()
    outcome = drain_slot(settings, dsn=pipeline.source_dsn, s3=s3)
    assert outcome["confirmed"] and outcome["tables"] == {
        table.qualified: TRANSACTIONS * ROWS_PER_TRANSACTION + 2
    }
    dispatcher.run_until_idle()
    assert [d for d in recorder.deliveries if d.failed] == []
    verification = pipeline.verify(table)
    assert verification.ok, verification
