"""Parallel backfill through the local pipeline (docs/extraction.md, "Parallel backfill").

The extractor handler plans a run of a table estimated above ``EXTRACT_RANGE_ROWS`` into key
ranges and sends one message per range to the range queue; ``RangeWorkers`` delivers them as the
template's event source does (batch size 1, two invocations at once); the real loader loads the
files. Each case checks the loaded table against PostgreSQL with ``pgsnow verify``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psycopg2
import pytest

import pgsnow.runtime
from pgsnow.config import Component
from pgsnow.events import parse_range_body
from pgsnow.extract.worker import extract_range
from pgsnow.identifiers import TableAllowlist, TableRef
from pgsnow.keys import FileFormat
from pgsnow.local.dispatcher import LambdaContext
from pgsnow.local.range_workers import RangeWorkers, range_workers_for
from pgsnow.local.stack import load_function_handler
from pgsnow.manifest import RunManifest, RunState
from pgsnow.postgres import connect
from pgsnow.runs import RunStore

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

ROWS = 600
# About four ranges of 150 rows, each of two chunks of two files: small, so the suite stays fast.
PARALLEL = {
    "EXTRACT_RANGE_ROWS": "150",
    "EXTRACT_CHUNK_ROWS": "75",
    "EXTRACT_BATCH_ROWS": "50",
    "S3_FILE_FORMAT": "csv",
}
COLUMNS = (
    "id integer PRIMARY KEY, note text, amount numeric(10, 2), updated_at timestamptz NOT NULL DEFAULT now()"
)
ROWS_SQL = "(id, note, amount) SELECT g, 'item ' || g, g + 0.25 FROM generate_series(1, {n}) g"


@pytest.fixture
def parallel_env(pipeline: PipelineHarness, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The extractor handler reads the small range settings from the stack's environment (its
    cached runtime is rebuilt)."""
    for name, value in PARALLEL.items():
        monkeypatch.setitem(pipeline.stack.env, name, value)
    pgsnow.runtime.reset_runtime()
    yield PARALLEL
    monkeypatch.undo()
    pgsnow.runtime.reset_runtime()


def create_analysed(
    pipeline: PipelineHarness, name: str, rows: int = ROWS, *, spread: bool = False
) -> TableRef:
    """A table of ``rows`` rows, analysed; ``spread``: each row written a minute apart (in the past)."""
    table = pipeline.table(name)
    pipeline.create_table(table, COLUMNS, ROWS_SQL.format(n=rows))
    if spread:
        pipeline.run_sql(
            f'UPDATE "{table.schema}"."{table.table}" SET updated_at = now() - make_interval(mins => {rows + 1} - id)'
        )
    pipeline.run_sql(f'ANALYZE "{table.schema}"."{table.table}"')  # the planner splits by pg_stats
    return table


def context() -> LambdaContext:
    return LambdaContext(
        function_name="pgsnow-extractor",
        invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:pgsnow-extractor",
        memory_limit_in_mb=2048,
        deadline_monotonic=time.monotonic() + 900,
    )


def plan_run(table: TableRef) -> dict[str, Any]:
    """The extractor handler invoked as a schedule does: it plans the run and sends its ranges."""
    result: dict[str, Any] = load_function_handler("extractor")(
        {"schema_name": table.schema, "table_name": table.table}, context()
    )
    assert result["state"] == RunState.EXTRACTING.value
    return result


class OverlapRecorder:
    """The extractor handler, recording how many invocations ran at once. The first two wait
    (up to 30 s) for each other, so two workers that do run concurrently always overlap."""

    def __init__(self) -> None:
        self.handler = load_function_handler("extractor")
        self.results: list[dict[str, Any]] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()
        self._meeting = threading.Barrier(2, timeout=30)

    def __call__(self, event: dict[str, Any], ctx: Any) -> Any:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            first_two = len(self.results) + self.running <= 2
        try:
            if first_two:
                self._meeting.wait()
            result = self.handler(event, ctx)
            with self._lock:
                self.results.append(result)
            return result
        finally:
            with self._lock:
                self.running -= 1


def load_and_verify(pipeline: PipelineHarness, table: TableRef) -> None:
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    assert [d for d in recorder.deliveries if d.failed] == []
    result = pipeline.verify(table)
    assert result.ok, result.summary()


def staged_manifest(pipeline: PipelineHarness, table: TableRef, run_id: str) -> RunManifest:
    return RunStore(pipeline.s3(), pipeline.bucket).get_manifest(table, run_id)


def source_count(pipeline: PipelineHarness, table: TableRef) -> int:
    with pipeline.setup_conn.cursor() as cur:
        cur.execute(f'SELECT count(*) FROM "{table.schema}"."{table.table}"')
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def test_parallel_run_loads_the_table_a_single_worker_loads(
    pipeline: PipelineHarness, parallel_env: dict[str, str]
) -> None:
    # Given a table estimated at four ranges, and an identical one extracted by one worker
    table = create_analysed(pipeline, "parallel_items")
    single = pipeline.table("single_items")
    pipeline.run_sql(
        f'CREATE TABLE "{single.schema}"."{single.table}" (LIKE "{table.schema}"."{table.table}" INCLUDING ALL)'
    )
    pipeline.run_sql(
        f'INSERT INTO "{single.schema}"."{single.table}" SELECT * FROM "{table.schema}"."{table.table}"'
    )
    # When the handler plans the run and two workers extract its ranges concurrently
    planned = plan_run(table)
    recorder = OverlapRecorder()
    stats = RangeWorkers(
        pipeline.stack.aws, pipeline.stack.resources.range_queue_url, recorder, workers=2
    ).run_until_idle()
    # Then every range ran once, two at a time, and the last one finished the run
    outcomes = [r for result in recorder.results for r in result["ranges"]]
    checkpoint = RunStore(pipeline.s3(), pipeline.bucket).load_checkpoint(table, planned["run_id"])
    assert checkpoint is not None and len(checkpoint.ranges) >= 3
    assert (stats.invocations, stats.failed) == (len(checkpoint.ranges), 0)
    assert sorted(o["range"] for o in outcomes) == list(range(len(checkpoint.ranges)))
    assert [o["outcome"] for o in outcomes].count("finished") == 1
    assert recorder.most_at_once == 2
    # And one manifest lists every file once, in key order, with every row
    manifest = staged_manifest(pipeline, table, planned["run_id"])
    assert manifest.state is RunState.STAGED
    assert manifest.total_rows == ROWS
    keys = [f.key for f in manifest.files]
    assert len(set(keys)) == len(keys)
    firsts = [int(f.key_range[0]) for f in manifest.files if f.key_range]
    assert firsts == sorted(firsts)
    # When both tables are loaded
    load_and_verify(pipeline, table)
    pipeline.replicate(single)
    # Then the parallel run's table is the single worker's, row for row
    assert pipeline.target_rows(table) == pipeline.target_rows(single)
    assert pipeline.target_count(table) == ROWS


class WorkerKilled(BaseException):
    """The worker's process dies: nothing of it runs any more (no handler, no finally of ours)."""


class DyingS3:
    """An S3 client (boto3's) whose process dies while uploading its ``dies_at``-th data file."""

    def __init__(self, real: Any, dies_at: int) -> None:
        self._real = real
        self._left = dies_at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def upload_file(self, *args: Any, **kwargs: Any) -> Any:
        return self._count(self._real.upload_file, *args, **kwargs)

    def put_object(self, *args: Any, **kwargs: Any) -> Any:
        if not str(kwargs.get("Key", "")).startswith("_pgsnow/"):
            return self._count(self._real.put_object, *args, **kwargs)
        return self._real.put_object(*args, **kwargs)

    def _count(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        self._left -= 1
        if self._left <= 0:
            raise WorkerKilled
        return call(*args, **kwargs)


def test_a_dead_workers_range_is_resumed_by_the_next_delivery(
    pipeline: PipelineHarness, parallel_env: dict[str, str]
) -> None:
    # Given a planned parallel run
    table = create_analysed(pipeline, "crash_items")
    planned = plan_run(table)
    sqs = pipeline.sqs()
    queue_url = pipeline.stack.resources.range_queue_url
    (message,) = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=1)["Messages"]
    request = parse_range_body(message["Body"], TableAllowlist.parse("*"))
    # When the worker that took a range dies uploading its third file. Its clock runs an hour
    # behind, so the lease it leaves has expired by the time the range is delivered again.
    settings = pipeline.settings(Component.EXTRACTOR, **PARALLEL)
    store = RunStore(pipeline.s3(), pipeline.bucket)
    pg_conn = connect(pipeline.source_dsn)
    try:
        with pytest.raises(WorkerKilled):
            extract_range(
                settings=settings,
                pg_conn=pg_conn,
                s3=DyingS3(pipeline.function_s3(Component.EXTRACTOR), dies_at=3),
                table=table,
                run_id=request.run_id,
                index=request.index,
                clock=lambda: time.time() - 3600,
            )
    finally:
        pg_conn.close()
    before = store.load_checkpoint(table, request.run_id, request.index)
    assert before is not None and before.state == RunState.EXTRACTING.value
    staged_before = [f.key for f in before.files]
    assert len(staged_before) == 2
    # And SQS delivers the dead worker's message again (its visibility timeout ended)
    sqs.change_message_visibility(
        QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
    )
    stats = range_workers_for(pipeline.stack, load_function_handler("extractor")).run_until_idle()
    # Then a worker took the range over and resumed it after its last staged file
    assert stats.failed == 0
    after = store.load_checkpoint(table, request.run_id, request.index)
    assert after is not None and after.state == RunState.STAGED.value
    assert after.invocations == 2
    assert [f.key for f in after.files][:2] == staged_before
    # And the run is staged once, every row once, and the loaded table is the source
    manifest = staged_manifest(pipeline, table, planned["run_id"])
    assert manifest.state is RunState.STAGED and manifest.total_rows == ROWS
    assert len({f.key for f in manifest.files}) == len(manifest.files)
    load_and_verify(pipeline, table)
    assert pipeline.target_count(table) == ROWS


class WritesAfterFirstRange:
    """The extractor handler; once its first range is staged, a second session writes to the
    table (while other ranges are still to be read in their own snapshots)."""

    def __init__(self, pipeline: PipelineHarness, table: TableRef) -> None:
        self.handler = load_function_handler("extractor")
        self.pipeline = pipeline
        self.table = table
        self.written = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any], ctx: Any) -> Any:
        result = self.handler(event, ctx)
        with self._lock:
            if not self.written.is_set():
                self._write()
                self.written.set()
        return result

    def _write(self) -> None:
        target = f'"{self.table.schema}"."{self.table.table}"'
        conn = psycopg2.connect(self.pipeline.source_dsn)
        try:
            with conn, conn.cursor() as cur:
                # rows in the first and the last ranges, and beyond the last key
                cur.execute(
                    f"UPDATE {target} SET note = 'changed', updated_at = now() WHERE id IN (2, 3, 299, 598)"
                )
                cur.execute(f"DELETE FROM {target} WHERE id IN (5, 300, 597)")
                cur.execute(
                    f"INSERT INTO {target} (id, note, amount) "
                    "SELECT g, 'item ' || g, g + 0.25 FROM generate_series(601, 620) g"
                )
        finally:
            conn.close()


def test_writes_during_a_parallel_backfill_are_caught_up_by_the_next_run(
    pipeline: PipelineHarness, parallel_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an incremental table with hard deletes, whose first run (the backfill) is parallel:
    # its ranges are cut on the cursor column, the order's leading column (rows written over time)
    table = create_analysed(pipeline, "moving_items", spread=True)
    options = {table.qualified: {"mode": "incremental", "cursor_column": "updated_at", "deletes": "hard"}}
    monkeypatch.setitem(pipeline.stack.env, "PGSNOW_TABLE_OPTIONS", json.dumps(options))
    pgsnow.runtime.reset_runtime()
    planned = plan_run(table)
    # When rows are updated, deleted and inserted while its ranges are extracted
    writer = WritesAfterFirstRange(pipeline, table)
    range_workers_for(pipeline.stack, writer).run_until_idle()
    assert writer.written.is_set()
    manifest = staged_manifest(pipeline, table, planned["run_id"])
    assert manifest.state is RunState.STAGED and manifest.watermark_after is not None
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    assert [d for d in recorder.deliveries if d.failed] == []
    # And the next run catches up (a single worker: it reads from the watermark)
    catch_up = load_function_handler("extractor")(
        {"schema_name": table.schema, "table_name": table.table}, context()
    )
    assert catch_up["state"] == RunState.STAGED.value
    # Then Snowflake holds exactly the source's rows
    load_and_verify(pipeline, table)
    assert pipeline.target_count(table) == source_count(pipeline, table) == ROWS - 3 + 20


def test_a_small_table_stays_single_worker(pipeline: PipelineHarness, parallel_env: dict[str, str]) -> None:
    # Given a table estimated at one range
    table = create_analysed(pipeline, "small_items", rows=100)
    # When the handler extracts it
    result = load_function_handler("extractor")(
        {"schema_name": table.schema, "table_name": table.table}, context()
    )
    # Then the run is staged by that one invocation and nothing went to the range queue
    assert result["state"] == RunState.STAGED.value
    attributes = pipeline.sqs().get_queue_attributes(
        QueueUrl=pipeline.stack.resources.range_queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert FileFormat(result["file_format"]) is FileFormat.CSV


def test_a_value_snowflake_cannot_hold_fails_the_whole_run_and_frees_the_table(
    pipeline: PipelineHarness, parallel_env: dict[str, str]
) -> None:
    # Given a planned parallel run, and then a value Snowflake cannot hold in its last range
    # (the plan reads no rows: each range checks its own values in its own snapshot)
    table = create_analysed(pipeline, "failing_items")
    planned = plan_run(table)
    pipeline.run_sql(f'UPDATE "{table.schema}"."{table.table}" SET amount = \'NaN\' WHERE id = {ROWS - 1}')
    # When the workers extract the ranges, and a failed range comes back after a second
    # (not the template's 90 minutes)
    sqs = pipeline.sqs()
    queue_url = pipeline.stack.resources.range_queue_url
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": "1"})
    try:
        stats = range_workers_for(pipeline.stack, load_function_handler("extractor")).run_until_idle()
    finally:
        sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": "5400"})
    # Then the range that met it failed, and with it the run: its manifest says why, the table's
    # lease is free for the next run, and the failed range's redelivery found the run over
    assert stats.failed >= 1
    manifest = staged_manifest(pipeline, table, planned["run_id"])
    assert manifest.state is RunState.FAILED
    assert manifest.error is not None and "NaN" in manifest.error
    assert RunStore(pipeline.s3(), pipeline.bucket).current_lease(table) is None
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert (
        attributes["ApproximateNumberOfMessages"],
        attributes["ApproximateNumberOfMessagesNotVisible"],
    ) == (
        "0",
        "0",
    )
