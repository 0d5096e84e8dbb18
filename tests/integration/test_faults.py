"""Fault injection through the whole pipeline on loopback, each outcome checked with ``pgsnow verify``.

Real servers only (see conftest.py's ``pipeline``): faults are injected at the boundaries the
pipeline does not own — botocore events on the S3 client, a Snowflake connection whose
commit or statement fails, a second PostgreSQL session writing mid-run, messages held back
or delivered twice. Cases already proven elsewhere are listed in docs/guarantees.md and not
repeated here.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg2
import pytest
from botocore.awsrequest import AWSResponse
from psycopg2 import sql
from snowflake.connector import errors as sf_errors

from pgsnow.cleanup import cleanup_pending_runs
from pgsnow.config import Component
from pgsnow.errors import RetryableError
from pgsnow.ledger import ledger_name
from pgsnow.local.stack import SNOWFLAKE_DATABASE, load_function_handler
from pgsnow.manifest import RunState
from pgsnow.runs import RunStore
from pgsnow.runtime import Runtime
from pgsnow.snowflake.connection import connect as sf_connect

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

ITEMS_COLUMNS = (
    "id integer PRIMARY KEY, note text, amount numeric(10, 2), updated_at timestamptz NOT NULL DEFAULT now()"
)
ITEMS_ROWS = "(id, note, amount) SELECT g, 'item ' || g, g + 0.25 FROM generate_series(1, {n}) g"
SMALL_FILES = {"EXTRACT_CHUNK_ROWS": "10", "EXTRACT_BATCH_ROWS": "5"}


def create_items(pipeline: PipelineHarness, name: str, rows: int) -> Any:
    table = pipeline.table(name)
    pipeline.create_table(table, ITEMS_COLUMNS, ITEMS_ROWS.format(n=rows))
    return table


def loader_app() -> Any:
    """The loader function's app module (its handler and the runtime it looks up)."""
    load_function_handler("loader")
    import sys

    return sys.modules["pgsnow_function_loader_app"]


def assert_verified(pipeline: PipelineHarness, table: Any, rows: int, manifest: Any = None) -> None:
    result = pipeline.verify(table, manifest)
    assert result.ok, result.summary()
    assert (result.source_rows, result.target_rows) == (rows, rows)


# --------------------------------------------------------------------------- Snowflake connection faults


class FailingCursor:
    """A real cursor whose first statement starting with ``prefix`` raises ``error`` instead of running."""

    def __init__(self, real: Any, owner: FailingConnection) -> None:
        self._real = real
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> FailingCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._real)

    def execute(self, statement: str, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner
        wanted = owner.statement_prefix and statement.lstrip().upper().startswith(owner.statement_prefix)
        if wanted and owner.statement_failures_left > 0:
            owner.statement_failures_left -= 1
            owner.injected.append(statement.split(maxsplit=1)[0])
            raise sf_errors.ServiceUnavailableError(msg="503 from Snowflake (injected)")
        return self._real.execute(statement, *args, **kwargs)


class FailingConnection:
    """A real connection that fails on cue: a statement raises once, or the process 'dies' before COMMIT
    (the connection is closed, so the open transaction is never committed, then the commit raises)."""

    def __init__(self, real: Any, *, statement_prefix: str = "", die_before_commit: bool = False) -> None:
        self._real = real
        self.statement_prefix = statement_prefix.upper()
        self.statement_failures_left = 1 if statement_prefix else 0
        self.deaths_left = 1 if die_before_commit else 0
        self.injected: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def cursor(self, *args: Any, **kwargs: Any) -> FailingCursor:
        return FailingCursor(self._real.cursor(*args, **kwargs), self)

    def commit(self) -> None:
        if self.deaths_left > 0:
            self.deaths_left -= 1
            self.injected.append("COMMIT")
            self._real.close()
            raise sf_errors.OperationalError(msg="connection lost before COMMIT (injected)", sqlstate="08006")
        self._real.commit()


@pytest.fixture
def injected_loader_connection(pipeline: PipelineHarness) -> Iterator[Callable[..., FailingConnection]]:
    """Put a FailingConnection into the loader's cached runtime; the runtime reconnects once it is closed."""
    runtime = pipeline.stack.function_runtime(Component.LOADER)
    installed: list[FailingConnection] = []

    def install(**faults: Any) -> FailingConnection:
        connection = FailingConnection(sf_connect(runtime.settings.snowflake), **faults)
        runtime._snowflake = connection
        installed.append(connection)
        return connection

    yield install
    for connection in installed:
        if not connection.is_closed():
            connection.close()
    runtime._snowflake = None


def test_loader_dies_after_copy_before_commit_then_redelivery_loads_once(
    pipeline: PipelineHarness, injected_loader_connection: Callable[..., FailingConnection]
) -> None:
    """Expected: the first delivery commits nothing (no rows, no ledger row); the redelivered
    message loads the file once; verify passes and nothing is dead-lettered."""
    # Given a staged table and a loader whose connection dies between COPY and COMMIT
    table = create_items(pipeline, "dies_before_commit", 12)
    manifest = pipeline.extract(table)
    (staged,) = manifest.files
    dying = injected_loader_connection(die_before_commit=True)
    recorder, dispatcher = pipeline.loader()

    # When the queue delivers (the failed message returns after the visibility timeout)
    dispatcher.run_until_idle()

    # Then the first delivery failed at COMMIT, the second loaded, exactly once
    assert dying.injected == ["COMMIT"]
    assert [(d.receive_count, d.failed) for d in recorder.for_key(staged.key)] == [(1, True), (2, False)]
    assert pipeline.ledger_keys(table) == [staged.key]
    assert_verified(pipeline, table, 12)
    assert staged.key not in pipeline.dead_letter_keys()


def test_loader_dies_between_swap_and_drop_then_the_retry_keeps_the_new_data(
    pipeline: PipelineHarness, injected_loader_connection: Callable[..., FailingConnection]
) -> None:
    """Expected (replace mode): when the loader dies after the SWAP but before dropping the shadow
    (which then holds the old data), the redelivery finds the run's tag on the target, drops the
    shadow and records the run, and does not swap the old data back in; verify passes."""
    # Given a replaced table, and a second replace run with changed and added rows
    table = create_items(pipeline, "swap_then_crash", 5)
    options = json.dumps({table.qualified: {"write_mode": "replace"}})
    pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    target = sql.Identifier(table.schema, table.table)
    pipeline.run_sql(sql.SQL("UPDATE {} SET note = 'second run' WHERE id <= 2").format(target))
    pipeline.run_sql(sql.SQL("INSERT INTO {} (id, note) VALUES (6, 'new'), (7, 'new')").format(target))
    second = pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options)
    dying = injected_loader_connection(statement_prefix="DROP TABLE")
    recorder, dispatcher = pipeline.loader()

    # When the loader's DROP of the swapped-out shadow fails once, and SQS redelivers
    dispatcher.run_until_idle()

    # Then the first delivery failed right after the swap, the retry finished the run
    assert dying.injected == ["DROP"]
    (staged,) = second.files
    assert [(d.receive_count, d.failed) for d in recorder.for_key(staged.key)] == [(1, True), (2, False)]
    notes = {row[0]: row[1] for row in pipeline.target_rows(table)}
    assert notes[1] == notes[2] == "second run" and notes[6] == notes[7] == "new"
    assert_verified(pipeline, table, 7)
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(
            f'SELECT "TABLE_NAME" FROM "{SNOWFLAKE_DATABASE}"."INFORMATION_SCHEMA"."TABLES" '
            'WHERE "TABLE_SCHEMA" = %s',
            (table.snowflake_schema,),
        )
        names = [row[0] for row in cur.fetchall()]
    assert table.snowflake_table in names
    assert [n for n in names if n.startswith(table.snowflake_table + "__")] == []  # the shadow is gone


def test_transient_snowflake_error_returns_the_message_then_it_loads(
    pipeline: PipelineHarness, injected_loader_connection: Callable[..., FailingConnection]
) -> None:
    """Expected: a retryable Snowflake error (HTTP 503) on COPY fails the record, SQS redelivers it,
    and the second delivery loads it once; verify passes."""
    # Given a staged table and a loader whose first COPY gets a 503 from Snowflake
    table = create_items(pipeline, "transient_copy", 7)
    manifest = pipeline.extract(table)
    (staged,) = manifest.files
    flaky = injected_loader_connection(statement_prefix="COPY INTO")
    recorder, dispatcher = pipeline.loader()

    # When the queue delivers
    dispatcher.run_until_idle()

    # Then it was retried through the queue and loaded once
    assert flaky.injected == ["COPY"]
    assert [(d.receive_count, d.failed) for d in recorder.for_key(staged.key)] == [(1, True), (2, False)]
    assert pipeline.ledger_keys(table) == [staged.key]
    assert_verified(pipeline, table, 7)
    assert staged.key not in pipeline.dead_letter_keys()


# --------------------------------------------------------------------------- duplicated, reordered, odd events


def test_same_event_delivered_concurrently_loads_once(
    pipeline: PipelineHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expected: two loader invocations (each with its own Snowflake session, as two Lambda
    containers have) handling the same S3 event body at the same time load the file once: the
    rows are there once, the ledger has one row, verify passes; neither invocation fails
    permanently."""
    # Given a staged file whose notification is taken off the queue
    table = create_items(pipeline, "concurrent_event", 20)
    manifest = pipeline.extract(table)
    (staged,) = manifest.files
    (message,) = pipeline.receive_notifications(table, 1)
    app = loader_app()
    _, dispatcher = pipeline.loader()
    record = dispatcher.record(message)
    # each thread is its own "container": its own runtime, S3 client and Snowflake session
    local = threading.local()
    runtimes: list[Runtime] = []

    def runtime_of_this_thread() -> Runtime:
        if not hasattr(local, "runtime"):
            local.runtime = Runtime(
                settings=pipeline.settings(Component.LOADER),
                session=pipeline.stack.function_session(Component.LOADER),
            )
            runtimes.append(local.runtime)
        return local.runtime

    monkeypatch.setattr(app, "loader_runtime", runtime_of_this_thread)
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

    start = threading.Barrier(2)
    outcomes: list[str] = []

    def invoke() -> None:
        start.wait()
        batch = app.load_sqs_batch([SQSRecord(record)])
        try:
            results = batch.results_for(record["messageId"])
            outcomes.append(",".join(str(r.get("status")) for r in results))
        except RetryableError as exc:
            outcomes.append(f"retry: {exc.message}")

    # When two invocations handle the same body at once
    threads = [threading.Thread(target=invoke) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for runtime in runtimes:
        if runtime._snowflake is not None:
            runtime._snowflake.close()

    # Then at most one of them loaded it, and the rows are there exactly once
    assert len(outcomes) == 2, outcomes
    assert pipeline.ledger_keys(table) == [staged.key]
    assert_verified(pipeline, table, 20)
    assert all(o in {"loaded", "already_loaded"} or o.startswith("retry") for o in outcomes), outcomes
    # Both may say "loaded" on the local Snowflake (its snapshot isolation lets the second claim
    # run before the first commits; its COPY load history then skips the file): the rows and the
    # ledger above are what "once" means. Real Snowflake makes the second claim wait (see loading.md).
    assert "loaded" in outcomes, outcomes


def deliver_newer_run_first(pipeline: PipelineHarness, table: Any, older: Any, newer: Any) -> Any:
    """Take both runs' notifications off the queue, deliver the newer run's, then the older run's."""
    messages = pipeline.receive_notifications(table, len(older.files) + len(newer.files))
    by_run = {
        run.run_id: [m["Body"] for m in messages if any(run.run_id in k for k in pipeline.message_keys(m))]
        for run in (older, newer)
    }
    recorder, dispatcher = pipeline.loader()
    for run in (newer, older):
        pipeline.send_bodies(by_run[run.run_id])
        dispatcher.run_until_idle()
    return recorder


def test_newer_run_delivered_before_older_run_newest_wins(pipeline: PipelineHarness) -> None:
    """Expected (merge mode, incremental cursor): when the newer run's file is delivered first
    and the older run's file after it, every key keeps its newest version; verify passes."""
    # Given two incremental merge runs: the second carries an update of key 2 and a new key 9
    table = create_items(pipeline, "out_of_order", 5)
    options = json.dumps(
        {table.qualified: {"mode": "incremental", "cursor_column": "updated_at", "write_mode": "merge"}}
    )
    older = pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options)
    pipeline.run_sql(
        sql.SQL("UPDATE {} SET note = 'newest', updated_at = now() WHERE id = 2").format(
            sql.Identifier(table.schema, table.table)
        )
    )
    pipeline.run_sql(
        sql.SQL("INSERT INTO {} (id, note) VALUES (9, 'new')").format(
            sql.Identifier(table.schema, table.table)
        )
    )
    newer = pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options)
    assert newer.run_id > older.run_id

    # When the newer run's notifications are delivered first, then the older run's
    recorder = deliver_newer_run_first(pipeline, table, older, newer)

    # Then all files loaded, and key 2 holds the newer value
    assert [d for d in recorder.deliveries if d.failed] == []
    assert sorted(pipeline.ledger_keys(table)) == sorted(f.key for f in [*older.files, *newer.files])
    notes = {row[0]: row[1] for row in pipeline.target_rows(table)}
    assert notes[2] == "newest" and notes[9] == "new"
    assert_verified(pipeline, table, 6)


def test_older_full_merge_run_delivered_after_a_newer_one_does_not_roll_rows_back(
    pipeline: PipelineHarness,
) -> None:
    """Expected (merge mode, no cursor column): when a newer full run is merged first and an older
    run's file arrives after it, rows the newer run wrote keep its values (the target records the
    run that wrote each row), while keys only the older run has are still inserted."""
    # Given two full merge runs: the second changes key 2 and no longer has key 5
    table = create_items(pipeline, "late_full_merge", 5)
    options = json.dumps({table.qualified: {"write_mode": "merge"}})
    target = sql.Identifier(table.schema, table.table)
    older = pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options)
    pipeline.run_sql(sql.SQL("UPDATE {} SET note = 'newest' WHERE id = 2").format(target))
    pipeline.run_sql(sql.SQL("DELETE FROM {} WHERE id = 5").format(target))
    newer = pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options)
    assert newer.run_id > older.run_id and older.cursor_column is None

    # When the newer run is delivered first, then the older one
    recorder = deliver_newer_run_first(pipeline, table, older, newer)

    # Then both loaded; key 2 keeps the newer value; key 5 (only in the older run) is there
    assert [d for d in recorder.deliveries if d.failed] == []
    assert sorted(pipeline.ledger_keys(table)) == sorted(f.key for f in [*older.files, *newer.files])
    rows = {row[0]: row for row in pipeline.target_rows(table)}
    assert rows[2][1] == "newest"
    assert rows[1][-1] == rows[2][-1] == newer.run_id  # _PGSNOW_RUN_ID: the run that wrote the row
    assert rows[5][-1] == older.run_id
    result = pipeline.verify(table)
    assert result.extra == ["5"] and not result.missing and not result.different  # merge keeps deleted keys


def test_older_incremental_run_with_deletes_delivered_after_a_newer_one_deletes_nothing_it_wrote(
    pipeline: PipelineHarness,
) -> None:
    """Expected (incremental merge, deletes=hard): when the newer run is delivered and applied first
    and the older run's file arrives after it, the older run's (stale) key list is not applied:
    the row only the newer run carried stays (incremental mode would never send it again), the
    older run is recorded as superseded, and verify passes."""
    # Given two incremental runs with hard deletes; only the second has the new key 9
    table = create_items(pipeline, "stale_key_list", 5)
    options = json.dumps(
        {
            table.qualified: {
                "mode": "incremental",
                "cursor_column": "updated_at",
                "write_mode": "merge",
                "deletes": "hard",
            }
        }
    )
    older = pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options)
    pipeline.run_sql(
        sql.SQL("INSERT INTO {} (id, note) VALUES (9, 'new')").format(
            sql.Identifier(table.schema, table.table)
        )
    )
    newer = pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options)
    assert newer.run_id > older.run_id

    # When the newer run's notifications are delivered first, then the older run's
    recorder = deliver_newer_run_first(pipeline, table, older, newer)

    # Then every file loaded, key 9 is still there, and the older run is superseded, the newer applied
    assert [d for d in recorder.deliveries if d.failed] == []
    assert sorted(row[0] for row in pipeline.target_rows(table)) == [1, 2, 3, 4, 5, 9]
    marks = {
        key.rsplit("/", 1)[1]: status
        for key, status in pipeline_ledger_statuses(pipeline, table)
        if key.startswith("_pgsnow/applied/")
    }
    assert marks == {older.run_id: "SUPERSEDED", newer.run_id: "APPLIED"}
    assert_verified(pipeline, table, 6)


def pipeline_ledger_statuses(pipeline: PipelineHarness, table: Any) -> list[tuple[str, str]]:
    ledger = ledger_name(SNOWFLAKE_DATABASE, "PGSNOW", table)
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(
            f'SELECT "S3_KEY", "STATUS" FROM {ledger} WHERE "SCHEMA_NAME" = %s AND "TABLE_NAME" = %s',
            (table.schema, table.table),
        )
        return [(str(key), str(status)) for key, status in cur.fetchall()]


def test_hand_dropped_file_with_spaces_and_unicode_in_its_key_loads(pipeline: PipelineHarness) -> None:
    """Expected: a CSV dropped by hand under an existing table's prefix, its key holding spaces, '+',
    and non-ASCII characters (URL-encoded in the S3 event), loads into that table; verify passes."""
    # Given a replicated table, and two new source rows also written by hand as a CSV file
    table = create_items(pipeline, "hand_dropped", 3)
    pipeline.extract(table)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    pipeline.run_sql(
        sql.SQL(
            "INSERT INTO {} (id, note, amount, updated_at) VALUES "
            "(50, 'Zoë, \"hand\"', 1.25, '2024-01-01 00:00:00+00'), (51, '', NULL, '2024-01-02 00:00:00+00')"
        ).format(sql.Identifier(table.schema, table.table))
    )
    body = gzip.compress(
        'id,note,amount,updated_at\n50,"Zoë, ""hand""",1.25,2024-01-01 00:00:00+00\n'
        '51,"",,2024-01-02 00:00:00+00\n'.encode(),
        mtime=0,
    )
    key = f"{pipeline.prefix}/{table.schema}/{table.table}/hand dropped ünï+extra 🚀.csv.gz"
    pipeline.s3().put_object(Bucket=pipeline.bucket, Key=key, Body=body)

    # When the notification is delivered
    dispatcher.run_until_idle()

    # Then the event's encoded key was decoded to the object's key, and the rows loaded once
    deliveries = recorder.for_key(key)
    assert [(d.receive_count, d.failed) for d in deliveries] == [(1, False)]
    assert key in pipeline.ledger_keys(table)
    assert_verified(pipeline, table, 5)


# --------------------------------------------------------------------------- S3 faults


def test_extractor_killed_mid_upload_then_resumed_stages_exactly_the_source(
    pipeline: PipelineHarness,
) -> None:
    """Expected: when the S3 connection drops on the third data-file upload the run is left
    resumable; the next invocation resumes it; after loading, verify passes (nothing lost,
    nothing twice) and no notification is dead-lettered."""
    # Given a 40-row table staged in files of 5 rows, and an S3 client whose 3rd data PutObject fails
    table = create_items(pipeline, "killed_upload", 40)
    s3 = pipeline.function_s3(Component.EXTRACTOR)
    puts = {"n": 0}

    def drop_third_data_upload(params: dict[str, Any], **_: Any) -> None:
        if "_batch" in params.get("Key", ""):
            puts["n"] += 1
            if puts["n"] == 3:
                from botocore.exceptions import ConnectionClosedError

                raise ConnectionClosedError(endpoint_url=pipeline.stack.aws.endpoint_url)

    s3.meta.events.register("before-parameter-build.s3.PutObject", drop_third_data_upload)

    # When the extractor runs (and fails), then runs again with a healthy client
    with pytest.raises(RetryableError):
        pipeline.extract(table, s3=s3, **SMALL_FILES)
    resumed = pipeline.extract(table, **SMALL_FILES)

    # Then the resumed run finished the same run's files; loading them gives exactly the source
    assert resumed.state is RunState.STAGED
    assert sum(f.rows for f in resumed.files) == 40
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    assert [d for d in recorder.deliveries if d.failed] == []
    assert sorted(pipeline.ledger_keys(table)) == sorted(f.key for f in resumed.files)
    assert_verified(pipeline, table, 40)


class SlowDown:
    """A botocore ``before-send`` handler answering the first ``times`` matching requests with 503 SlowDown."""

    BODY = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    def __init__(self, operations: set[str], times: int) -> None:
        self.operations = operations
        self.left = {op: times for op in operations}
        self.sent: dict[str, int] = {op: 0 for op in operations}

    def __call__(self, request: Any, **kwargs: Any) -> AWSResponse | None:
        operation = kwargs["event_name"].rsplit(".", 1)[-1]
        if operation not in self.operations or self.left[operation] == 0:
            return None
        self.left[operation] -= 1
        self.sent[operation] += 1
        body = self.BODY

        class Raw:
            def stream(self, **_: Any) -> Iterator[bytes]:
                yield body

        return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, Raw())


def test_s3_slowdown_on_upload_and_download_is_retried_by_botocore(pipeline: PipelineHarness) -> None:
    """Expected: 503 SlowDown answers (two per operation, within botocore's standard retry budget
    of three attempts) on the extractor's uploads and the loader's reads are retried; the data
    arrives exactly (verify passes) and no delivery fails."""
    # Given an extractor S3 client and the loader's S3 client that both get 503s first
    table = create_items(pipeline, "slowdown", 9)
    extractor_s3 = pipeline.function_s3(Component.EXTRACTOR)
    upload_faults = SlowDown({"PutObject"}, times=2)
    extractor_s3.meta.events.register("before-send.s3", upload_faults)
    loader_s3 = pipeline.stack.function_runtime(Component.LOADER).s3
    download_faults = SlowDown({"HeadObject", "GetObject"}, times=2)
    loader_s3.meta.events.register("before-send.s3", download_faults)
    try:
        # When the table is extracted and loaded
        manifest = pipeline.extract(table, s3=extractor_s3)
        recorder, dispatcher = pipeline.loader()
        dispatcher.run_until_idle()
    finally:
        loader_s3.meta.events.unregister("before-send.s3", download_faults)

    # Then every injected 503 was answered by a retry, and the data is exact
    assert upload_faults.sent == {"PutObject": 2}
    assert download_faults.sent == {"HeadObject": 2, "GetObject": 2}
    assert [d for d in recorder.deliveries if d.failed] == []
    assert pipeline.ledger_keys(table) == [f.key for f in manifest.files]
    assert_verified(pipeline, table, 9)


# --------------------------------------------------------------------------- source writes during a run


def test_rows_written_while_an_incremental_run_pages_are_captured_by_the_next_run(
    pipeline: PipelineHarness,
) -> None:
    """Expected: inserts, updates of already-read and not-yet-read rows, and a transaction opened
    before the run but committed after it, all written while the run pages through the table in
    chunks of 10, are in Snowflake after the next run; verify up to that run's watermark passes."""
    # Given an incremental merge table of 30 rows, and a transaction that started before the run
    table = create_items(pipeline, "paged_writes", 30)
    target = sql.Identifier(table.schema, table.table)
    options = json.dumps(
        {table.qualified: {"mode": "incremental", "cursor_column": "updated_at", "write_mode": "merge"}}
    )
    late = psycopg2.connect(pipeline.source_dsn)
    with late.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} (id, note) VALUES (500, 'late commit')").format(target))
    time.sleep(0.05)  # wall clock is the subject: rows written from here on get a later now()
    s3 = pipeline.function_s3(Component.EXTRACTOR)
    writes = {"done": False}

    def write_between_chunks(params: dict[str, Any], **_: Any) -> None:
        # Runs as the run's first data file is uploaded: the run is paging through the table
        if writes["done"] or "_batch" not in params.get("Key", ""):
            return
        writes["done"] = True
        writer = psycopg2.connect(pipeline.source_dsn)
        writer.autocommit = True
        try:
            with writer.cursor() as cur:
                cur.execute(
                    sql.SQL("INSERT INTO {} (id, note) VALUES (101, 'inserted mid-run')").format(target)
                )
                cur.execute(
                    sql.SQL(
                        "UPDATE {} SET note = 'updated mid-run', updated_at = now() WHERE id IN (1, 29)"
                    ).format(target)
                )
        finally:
            writer.close()

    s3.meta.events.register("before-parameter-build.s3.PutObject", write_between_chunks)
    try:
        # When the first run pages through the table while those writes commit, then the late one commits
        first = pipeline.extract(table, s3=s3, PGSNOW_TABLE_OPTIONS=options, **SMALL_FILES)
    finally:
        late.commit()
        late.close()
    assert writes["done"]
    # And the next run extracts, and the loader consumes both runs
    second = pipeline.extract(table, PGSNOW_TABLE_OPTIONS=options, **SMALL_FILES)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()

    # Then everything committed before the second run is in Snowflake, newest versions
    assert first.state is RunState.STAGED and second.state is RunState.STAGED
    assert [d for d in recorder.deliveries if d.failed] == []
    notes = {row[0]: row[1] for row in pipeline.target_rows(table)}
    assert (notes[1], notes[29], notes[101], notes[500]) == (
        "updated mid-run",
        "updated mid-run",
        "inserted mid-run",
        "late commit",
    )
    result = pipeline.verify(table, second)
    assert result.ok, result.to_dict()
    assert result.watermark is not None and result.source_rows == 32


# --------------------------------------------------------------------------- cleanup racing a retry


def test_cleanup_running_while_a_retry_of_the_same_run_loads_deletes_nothing_unloaded(
    pipeline: PipelineHarness,
) -> None:
    """Expected: with CLEANUP_S3_FILES=after_each, cleanup passes while one file of a run is still
    waiting for its retry delete only loaded files; the retried file then loads (not 'no longer
    exists'), cleanup completes the run, and verify passes."""
    # Given a run of two files; the first is loaded, the second's notification is held back (a retry)
    table = create_items(pipeline, "cleanup_race", 10)
    manifest = pipeline.extract(table, EXTRACT_BATCH_ROWS="5")
    first_file, second_file = manifest.files
    messages = pipeline.receive_notifications(table, 2)
    body_of = {pipeline.message_keys(m)[0]: m["Body"] for m in messages}
    recorder, dispatcher = pipeline.loader()
    pipeline.send_bodies([body_of[first_file.key]])
    dispatcher.run_until_idle()
    settings = pipeline.settings(Component.CLEANUP, CLEANUP_S3_FILES="after_each")
    s3 = pipeline.s3()  # inspecting
    cleanup_s3 = pipeline.function_s3(Component.CLEANUP)

    # When cleanup runs before the retry arrives
    before = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=pipeline.sf_conn, tables=[table])

    # Then it removed only the loaded file and left the run open
    assert [sorted(r.deleted_keys) for r in before] == [[first_file.key]]
    s3.head_object(Bucket=pipeline.bucket, Key=second_file.key)  # still there
    assert RunStore(s3, pipeline.bucket).get_manifest(table, manifest.run_id).state is not RunState.LOADED

    # When the retry is delivered while cleanup passes keep running on their own session
    cleanup_conn = sf_connect(settings.snowflake)
    background_s3 = pipeline.function_s3(Component.CLEANUP)  # made here: boto3 sessions are not thread-safe
    stop = threading.Event()
    passes: list[Any] = []

    def keep_cleaning() -> None:
        while not stop.is_set():
            passes.extend(
                cleanup_pending_runs(
                    settings=settings, s3=background_s3, sf_conn=cleanup_conn, tables=[table]
                )
            )

    cleaner = threading.Thread(target=keep_cleaning)
    cleaner.start()
    try:
        pipeline.send_bodies([body_of[second_file.key]])
        dispatcher.run_until_idle()
    finally:
        stop.set()
        cleaner.join(timeout=60)
        cleanup_conn.close()
    final = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=pipeline.sf_conn, tables=[table])

    # Then the retried file loaded on its delivery, and the run ends loaded with both files removed
    assert [(d.receive_count, d.failed) for d in recorder.for_key(second_file.key)] == [(1, False)]
    assert sorted(pipeline.ledger_keys(table)) == sorted([first_file.key, second_file.key])
    assert passes, "cleanup ran at least once during the retry"
    assert RunStore(s3, pipeline.bucket).get_manifest(table, manifest.run_id).state is RunState.LOADED
    removed = {k for r in [*before, *passes, *final] for k in r.deleted_keys}
    assert removed == {first_file.key, second_file.key}
    assert_verified(pipeline, table, 10)
