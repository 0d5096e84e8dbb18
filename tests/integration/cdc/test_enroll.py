"""Enrolling a change-capture table and its snapshot run (pgsnow.cdc.enroll), against the local
PostgreSQL (a publication and slot of each test's own, dropped afterwards) and a moto server.

Proves: the enrollment records the position S and the snapshot run carries ChangeRange(S) on every
manifest from ``extracting`` on, planned as a full replace without a key list; the enrollment
waits for a transaction that was open when S was read, and past CDC_SNAPSHOT_WAIT_S fails
retryably naming it; a staged snapshot is never run again (the handler reports it); a reset
enrollment enrolls again; a cdc table's run outside its enrollment is refused; a snapshot split
into ranges is finished by its workers as the same full replace carrying S; of two racing
enrollments one is recorded.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from cdc_support import ChangeCaptureSource, change_capture_source
from psycopg2 import sql

from pgsnow.cdc.enroll import SnapshotStaged, reset_enrollment, snapshot_table
from pgsnow.changes import ChangeRange, parse_lsn
from pgsnow.cli import main as cli_main
from pgsnow.config import Component, Settings
from pgsnow.errors import PermanentError, RetryableError
from pgsnow.extract.ranges import FanOut
from pgsnow.extract.run import extract_table
from pgsnow.extract.worker import RangeOutcome, extract_range
from pgsnow.identifiers import TableRef
from pgsnow.local.aws import LocalAws
from pgsnow.local.dispatcher import LambdaContext
from pgsnow.local.stack import load_function_handler
from pgsnow.manifest import RunManifest, RunState
from pgsnow.postgres import connect
from pgsnow.runs import Enrollment, RunStore
from pgsnow.runtime import extractor_runtime, reset_runtime

pytestmark = pytest.mark.integration

PREFIX = "staging"

# pg_dsn, admin, schema_name, s3 and bucket (versioned, as the deployed bucket is): conftest.py.


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = connect(pg_dsn)
    yield conn
    conn.close()


@pytest.fixture
def orders(admin: psycopg2.extensions.connection, schema_name: str) -> TableRef:
    """A table of 23 rows with a primary key."""
    table = TableRef(schema_name, f"orders_{uuid.uuid4().hex[:8]}")
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, note text)").format(
                sql.Identifier(table.schema, table.table)
            )
        )
        cur.execute(
            sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 23) g").format(
                sql.Identifier(table.schema, table.table)
            )
        )
    return table


@pytest.fixture
def source(pg_dsn: str, orders: TableRef) -> Iterator[ChangeCaptureSource]:
    with change_capture_source(pg_dsn, [(orders.schema, orders.table)]) as created:
        yield created


def cdc_env(
    bucket: str, pg_dsn: str, table: TableRef, source: ChangeCaptureSource, **env: str
) -> dict[str, str]:
    return {
        "S3_STAGE_BUCKET": bucket,
        "S3_STAGE_PREFIX": PREFIX,
        "PGSNOW_TABLES": table.qualified,
        "PGSNOW_PG_DSN": pg_dsn,
        "PGSNOW_TABLE_OPTIONS": json.dumps({table.qualified: {"mode": "cdc"}}),
        "CDC_PUBLICATION": source.publication,
        "CDC_SLOT": source.slot,
        "S3_FILE_FORMAT": "csv",
        **env,
    }


def cdc_settings(
    bucket: str, pg_dsn: str, table: TableRef, source: ChangeCaptureSource, **env: str
) -> Settings:
    return Settings.from_env(cdc_env(bucket, pg_dsn, table, source, **env), Component.EXTRACTOR)


def current_lsn(admin: psycopg2.extensions.connection) -> int:
    with admin.cursor() as cur:
        cur.execute("SELECT pg_current_wal_lsn()::text")
        return parse_lsn(cur.fetchone()[0])


def staged_ids(s3: Any, bucket: str, manifest: RunManifest) -> list[int]:
    ids: list[int] = []
    for staged in manifest.files:
        text = gzip.decompress(s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read()).decode()
        reader = csv.DictReader(io.StringIO(text))
        ids += [int(row["id"]) for row in reader]
    return sorted(ids)


class StopsAfterFiles:
    """A remaining-time function: plenty for ``calls`` looks, then inside the deadline margin."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def __call__(self) -> int:
        self.calls -= 1
        return 900_000 if self.calls >= 0 else 1_000


def test_enrollment_records_the_position_and_every_snapshot_manifest_carries_it(
    admin: Any, pg_conn: Any, s3: Any, bucket: str, pg_dsn: str, orders: TableRef, source: ChangeCaptureSource
) -> None:
    # Given a cdc table in the publication, files of 4 rows in chunks of 8
    settings = cdc_settings(bucket, pg_dsn, orders, source, EXTRACT_CHUNK_ROWS="8", EXTRACT_BATCH_ROWS="4")
    store = RunStore(s3, bucket)
    before = current_lsn(admin)

    # When the first invocation enrolls it and stops at the deadline after a few files
    first = snapshot_table(
        settings=settings, pg_conn=pg_conn, s3=s3, table=orders, remaining_ms=StopsAfterFiles(4)
    )

    # Then the enrollment records S (read during the call), the slot and the snapshot run
    stored = store.read_enrollment(orders)
    assert stored is not None
    enrollment = stored.enrollment
    assert before <= enrollment.snapshot_lsn <= current_lsn(admin)
    assert enrollment.slot == source.slot
    assert isinstance(first, RunManifest)
    assert first.run_id == enrollment.snapshot_run_id
    snapshot = ChangeRange(
        source.slot, enrollment.snapshot_lsn, enrollment.snapshot_lsn, snapshot_lsn=enrollment.snapshot_lsn
    )
    # and the run's manifest says so from ``extracting`` on, planned as a full replace
    assert first.state is RunState.EXTRACTING
    extracting = store.get_manifest(orders, first.run_id)
    assert extracting.state is RunState.EXTRACTING
    assert extracting.changes == snapshot
    assert (extracting.mode, extracting.write_mode, extracting.deletes) == ("full", "replace", "none")

    # When the next invocations continue it (as continuations do, by run id, and as the schedule does)
    second = snapshot_table(
        settings=settings,
        pg_conn=pg_conn,
        s3=s3,
        table=orders,
        run_id=first.run_id,
        remaining_ms=StopsAfterFiles(3),
    )
    assert isinstance(second, RunManifest)
    assert second.run_id == first.run_id
    staged = snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders)

    # Then the one run is staged with every row once, its manifest still carrying S, no key list
    assert isinstance(staged, RunManifest)
    assert staged.run_id == first.run_id and staged.state is RunState.STAGED
    assert store.get_manifest(orders, first.run_id).changes == snapshot
    assert staged.key_list is None
    assert staged_ids(s3, bucket, staged) == list(range(1, 24))
    assert store.run_ids(orders) == [first.run_id]
    # and the enrollment did not move
    assert store.read_enrollment(orders) == stored


def test_a_staged_snapshot_is_not_run_again_and_the_handler_reports_it(
    monkeypatch: pytest.MonkeyPatch,
    aws: LocalAws,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    orders: TableRef,
    source: ChangeCaptureSource,
) -> None:
    # Given the real extractor handler for a cdc table
    for name, value in {**aws.env(), **cdc_env(bucket, pg_dsn, orders, source)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "pgsnow-test-extractor")
    reset_runtime()
    try:
        handler = load_function_handler("extractor")
        runtime = extractor_runtime()
        runtime.continuation_invoker = lambda body: pytest.fail(f"unexpected continuation {body}")
        event = {"schema_name": orders.schema, "table_name": orders.table}

        # When it is invoked three times on its schedule
        results = [handler(event, lambda_context()) for _ in range(3)]
    finally:
        reset_runtime()

    # Then the first stages the snapshot, the others only report it: no second full run
    store = RunStore(s3, bucket)
    stored = store.read_enrollment(orders)
    assert stored is not None
    assert results[0]["state"] == "staged" and results[0]["run_id"] == stored.enrollment.snapshot_run_id
    expected = {
        "table": orders.qualified,
        "mode": "cdc",
        "snapshot_lsn": results[1]["snapshot_lsn"],
        "snapshot_run_id": stored.enrollment.snapshot_run_id,
        "note": "changes come from the slot's change-capture runs",
    }
    assert results[1] == expected and results[2] == expected
    assert parse_lsn(results[1]["snapshot_lsn"]) == stored.enrollment.snapshot_lsn
    assert store.run_ids(orders) == [stored.enrollment.snapshot_run_id]


def lambda_context() -> LambdaContext:
    return LambdaContext(
        function_name="pgsnow-test-extractor",
        invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:pgsnow-test-extractor",
        memory_limit_in_mb=1024,
        deadline_monotonic=time.monotonic() + 900,
    )


@pytest.fixture
def open_transaction(pg_dsn: str, orders: TableRef) -> Iterator[tuple[psycopg2.extensions.connection, int]]:
    """Another session's open transaction that has written (so it has an xid): (connection, pid)."""
    conn = psycopg2.connect(pg_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        cur.execute(
            sql.SQL("INSERT INTO {} VALUES (100, 'open before S')").format(
                sql.Identifier(orders.schema, orders.table)
            )
        )
    yield conn, pid
    conn.close()


def test_enrollment_waits_for_a_transaction_open_when_the_position_was_read(
    pg_conn: Any,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    orders: TableRef,
    source: ChangeCaptureSource,
    open_transaction: tuple[Any, int],
) -> None:
    # Given a transaction open in another session, committed from a thread a moment after the
    # enrollment starts waiting for it
    holder, _ = open_transaction
    waiting, committed = threading.Event(), threading.Event()

    def commit_later() -> None:
        waiting.wait(60)
        time.sleep(0.3)
        holder.commit()
        committed.set()

    committer = threading.Thread(target=commit_later)
    committer.start()
    pauses: list[bool] = []

    def sleep(seconds: float) -> None:
        pauses.append(committed.is_set())
        waiting.set()
        time.sleep(seconds)

    settings = cdc_settings(bucket, pg_dsn, orders, source)
    # When the table is enrolled
    try:
        staged = snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders, sleep=sleep)
    finally:
        waiting.set()
        committer.join()

    # Then it waited (it paused while the transaction was open) and did not finish before the commit
    assert pauses and pauses[0] is False
    assert committed.is_set()
    # and its snapshot, taken after, holds the transaction's row
    assert isinstance(staged, RunManifest) and staged.state is RunState.STAGED
    assert staged_ids(s3, bucket, staged) == [*range(1, 24), 100]


def test_enrollment_gives_up_past_the_wait_naming_the_open_transaction(
    admin: Any,
    pg_conn: Any,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    orders: TableRef,
    source: ChangeCaptureSource,
    open_transaction: tuple[Any, int],
) -> None:
    # Given a transaction open in another session and CDC_SNAPSHOT_WAIT_S=0
    holder, pid = open_transaction
    settings = cdc_settings(bucket, pg_dsn, orders, source, CDC_SNAPSHOT_WAIT_S="0")
    with admin.cursor() as cur:  # another session's older transaction may be named instead of ours
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> %s"
            " AND age(backend_xid) >= (SELECT age(backend_xid) FROM pg_stat_activity WHERE pid = %s)",
            (pid, pid),
        )
        older_elsewhere = cur.fetchone()[0] > 0

    # When the table is invoked, it fails retryably, naming the open transaction, nothing recorded
    with pytest.raises(RetryableError) as raised:
        snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders)
    message = str(raised.value)
    assert "CDC_SNAPSHOT_WAIT_S" in message and orders.qualified in message
    assert re.search(r"backend pid \d+ \(open \d+ s", message)
    if not older_elsewhere:
        assert f"backend pid {pid} " in message
    store = RunStore(s3, bucket)
    assert store.read_enrollment(orders) is None
    assert store.run_ids(orders) == []

    # When the transaction ends, the next invocation enrolls the table
    holder.commit()
    # (with the default wait: other sessions' transactions on this server may be open at its S)
    patient = cdc_settings(bucket, pg_dsn, orders, source)
    staged = snapshot_table(settings=patient, pg_conn=pg_conn, s3=s3, table=orders)
    assert isinstance(staged, RunManifest) and staged.state is RunState.STAGED


def test_reset_enrollment_enrolls_again_with_a_new_snapshot(
    pg_conn: Any, s3: Any, bucket: str, pg_dsn: str, orders: TableRef, source: ChangeCaptureSource
) -> None:
    # Given a table whose snapshot is staged
    settings = cdc_settings(bucket, pg_dsn, orders, source)
    store = RunStore(s3, bucket)
    first = snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders)
    assert isinstance(first, RunManifest)
    old = store.read_enrollment(orders)
    assert old is not None
    assert isinstance(snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders), SnapshotStaged)

    # When its enrollment is reset (pgsnow cdc resnapshot)
    reset_enrollment(store, orders)
    assert store.read_enrollment(orders) is None
    again = snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders)

    # Then the next invocation enrolls it again and stages a second snapshot from the new position
    new = store.read_enrollment(orders)
    assert new is not None and isinstance(again, RunManifest)
    assert new.enrollment.snapshot_run_id == again.run_id != first.run_id
    assert new.enrollment.snapshot_lsn >= old.enrollment.snapshot_lsn  # equal when nothing was written since
    assert again.changes is not None and again.changes.snapshot_lsn == new.enrollment.snapshot_lsn


def test_refusals_name_what_is_missing(
    pg_conn: Any, s3: Any, bucket: str, pg_dsn: str, orders: TableRef, source: ChangeCaptureSource
) -> None:
    # A cdc table's full run outside its enrollment would roll back applied changes: refused
    settings = cdc_settings(bucket, pg_dsn, orders, source)
    with pytest.raises(PermanentError, match="mode cdc"):
        extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders)
    store = RunStore(s3, bucket)
    assert store.run_ids(orders) == []
    # A table outside the publication, a missing slot: refused before S is read, nothing recorded
    other = ChangeCaptureSource(source.dsn, source.publication + "_missing", source.slot)
    with pytest.raises(PermanentError, match="does not exist"):
        snapshot_table(
            settings=cdc_settings(bucket, pg_dsn, orders, other), pg_conn=pg_conn, s3=s3, table=orders
        )
    no_slot = ChangeCaptureSource(source.dsn, source.publication, source.slot + "_missing")
    with pytest.raises(PermanentError, match=r"slot .* does not exist"):
        snapshot_table(
            settings=cdc_settings(bucket, pg_dsn, orders, no_slot), pg_conn=pg_conn, s3=s3, table=orders
        )
    assert store.read_enrollment(orders) is None


def test_pgsnow_extract_enrolls_a_cdc_table_then_reports_its_snapshot(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    aws: LocalAws,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    orders: TableRef,
    source: ChangeCaptureSource,
) -> None:
    # Given the CLI's environment for a cdc table
    for name, value in {**aws.env(), **cdc_env(bucket, pg_dsn, orders, source)}.items():
        monkeypatch.setenv(name, value)
    # When `pgsnow extract` runs twice
    assert cli_main(["extract", orders.qualified]) == 0
    first = capsys.readouterr().out
    assert cli_main(["extract", orders.qualified]) == 0
    second = capsys.readouterr().out
    # Then the first enrolls the table and stages its snapshot, the second reports it
    stored = RunStore(s3, bucket).read_enrollment(orders)
    assert stored is not None
    assert f"run {stored.enrollment.snapshot_run_id}: " in first and "23 rows" in first
    assert json.loads(second)["snapshot_run_id"] == stored.enrollment.snapshot_run_id


def test_a_failed_snapshot_is_enrolled_again(
    admin: Any, pg_conn: Any, s3: Any, bucket: str, pg_dsn: str, orders: TableRef, source: ChangeCaptureSource
) -> None:
    # Given a snapshot stopped at the deadline, then a column added: its continuation fails for good
    settings = cdc_settings(bucket, pg_dsn, orders, source, EXTRACT_CHUNK_ROWS="8", EXTRACT_BATCH_ROWS="4")
    store = RunStore(s3, bucket)
    first = snapshot_table(
        settings=settings, pg_conn=pg_conn, s3=s3, table=orders, remaining_ms=StopsAfterFiles(4)
    )
    assert isinstance(first, RunManifest) and first.state is RunState.EXTRACTING
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN amount numeric DEFAULT 1").format(
                sql.Identifier(orders.schema, orders.table)
            )
        )
    with pytest.raises(PermanentError, match="changed during run"):
        snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders)
    failed = store.read_enrollment(orders)
    assert failed is not None and failed.enrollment.snapshot_run_id == first.run_id
    assert store.get_manifest(orders, first.run_id).state is RunState.FAILED

    # When the table is invoked again
    staged = snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders)

    # Then it is enrolled again (a new snapshot run, S not before the old one) and staged
    again = store.read_enrollment(orders)
    assert again is not None and isinstance(staged, RunManifest) and staged.state is RunState.STAGED
    assert again.enrollment.snapshot_run_id == staged.run_id != first.run_id
    assert again.enrollment.snapshot_lsn >= failed.enrollment.snapshot_lsn
    assert staged.changes is not None and staged.changes.snapshot_lsn == again.enrollment.snapshot_lsn
    assert staged_ids(s3, bucket, staged) == list(range(1, 24))


def test_an_enrollment_is_recorded_once_of_two_racing_writers(s3: Any, bucket: str, orders: TableRef) -> None:
    # Given two invocations enrolling the table at once (each read "not enrolled")
    store = RunStore(s3, bucket)
    first = Enrollment(orders, "slot_a", 0x5000, "2026-12-07T00:00:00Z", "20261207T000000000000Z")
    second = Enrollment(orders, "slot_a", 0x6000, "2026-12-07T00:00:01Z", "20261207T000001000000Z")

    # When both record theirs, the second is refused and the first stands
    won = store.write_enrollment(first, replacing=None)
    assert won is not None and won.enrollment == first
    assert store.write_enrollment(second, replacing=None) is None
    assert store.read_enrollment(orders) == won

    # and a replacement (a failed snapshot enrolled again) needs the enrollment as it was read
    replaced = store.write_enrollment(second, replacing=won)
    assert replaced is not None and store.read_enrollment(orders) == replaced
    assert store.write_enrollment(first, replacing=won) is None
    assert store.read_enrollment(orders) == replaced


def test_a_snapshot_split_into_ranges_is_finished_by_its_workers_carrying_the_position(
    admin: Any, pg_conn: Any, s3: Any, bucket: str, pg_dsn: str, orders: TableRef, source: ChangeCaptureSource
) -> None:
    # Given a cdc table with statistics, and ranges of 5 rows for the extractor's workers
    with admin.cursor() as cur:
        cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(orders.schema, orders.table)))
    settings = cdc_settings(bucket, pg_dsn, orders, source, EXTRACT_RANGE_ROWS="5")
    store = RunStore(s3, bucket)
    sent: list[dict[str, Any]] = []

    # When the table is enrolled with workers to fan out to
    planned = snapshot_table(
        settings=settings, pg_conn=pg_conn, s3=s3, table=orders, fan_out=FanOut(sent.extend)
    )

    # Then its snapshot run is handed to the workers as ranges
    stored = store.read_enrollment(orders)
    assert stored is not None and isinstance(planned, RunManifest)
    assert planned.run_id == stored.enrollment.snapshot_run_id and planned.state is RunState.EXTRACTING
    assert len(sent) >= 2 and {body["run_id"] for body in sent} == {planned.run_id}

    # When each range is extracted by a worker
    results = [
        extract_range(
            settings=settings,
            pg_conn=pg_conn,
            s3=s3,
            table=orders,
            run_id=planned.run_id,
            index=body["range"],
        )
        for body in sent
    ]

    # Then the last one finishes the run: a full replace without a key list, carrying S, every row once
    assert [r.outcome for r in results][-1] is RangeOutcome.FINISHED
    staged = results[-1].manifest
    assert staged is not None and staged.state is RunState.STAGED
    assert (staged.mode, staged.write_mode, staged.deletes, staged.key_list) == (
        "full",
        "replace",
        "none",
        None,
    )
    assert staged.changes == stored.enrollment.changes
    assert staged_ids(s3, bucket, staged) == list(range(1, 24))
    # and the next invocation only reports it
    assert isinstance(snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=orders), SnapshotStaged)
