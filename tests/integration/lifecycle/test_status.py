"""``pgsnow status`` against real servers: runs staged by the real extractor, notifications
delivered by the SQS dispatcher to the real loader handler (a corrupt file fails and is
dead-lettered on its first failure), the ledger in the local Snowflake, and the CLI itself.

Files are staged by the real extractor from the local PostgreSQL into a versioned moto bucket
whose notifications feed the loader queue; the loader is the real handler driven by the
SQS dispatcher (or ``load_staged_files`` directly), writing the real ledger in the local
Snowflake.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from lifecycle_support import (
    FILES_PER_RUN,
    drain,
    exists,
    settings_with,
    stage_run,
)
from psycopg2.extensions import connection as PgConnection
from stack_support import corrupt

from pgsnow.cleanup import cleanup_pending_runs
from pgsnow.cli import main
from pgsnow.identifiers import TableRef
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import LocalStack, process_environment
from pgsnow.status import collect_status
from pgsnow.sweeper import build_object_created_event

pytestmark = pytest.mark.integration


def send_notification(stack: LocalStack, sqs: Any, key: str) -> None:
    """The notification S3 would have sent for ``key`` (the sweeper's event builder, real S3 shape)."""
    s3 = stack.aws.client("s3")
    head = s3.head_object(Bucket=stack.resources.bucket, Key=key)
    event = build_object_created_event(
        bucket=stack.resources.bucket,
        key=key,
        size=int(head["ContentLength"]),
        etag=head["ETag"],
        version_id=head.get("VersionId"),
        region=stack.aws.region,
        now=datetime.now(UTC),
    )
    sqs.send_message(QueueUrl=stack.resources.queue_url, MessageBody=json.dumps(event))


# --------------------------------------------------------------------------- tests


def run_status_cli(stack: LocalStack, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()  # drop the log lines of earlier steps
    with process_environment({**stack.env, "CLEANUP_S3_FILES": "after_all"}):
        assert main(["status", *args]) == 0
    return capsys.readouterr().out


def test_run_whose_last_file_failed_keeps_its_files_and_shows_failed(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    sqs: Any,
    dispatcher: SqsDispatcher,
    table: TableRef,
    capsys: pytest.CaptureFixture[str],
    cleanup_s3: Any,
) -> None:
    # Given a staged run whose last file is corrupt, delivered through the queue to the loader
    manifest = stage_run(stack, pg_conn, table)
    keys = [f.key for f in manifest.files]
    drain(sqs, stack.resources.queue_url)
    corrupt(s3, stack.resources.bucket, keys[-1])  # its notification is the one the loader gets
    for key in keys[:-1]:
        send_notification(stack, sqs, key)
    stats = dispatcher.run_until_idle()
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")

    # When cleanup runs, and status is asked for (core function, CLI table and CLI --json)
    cleaned = cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])
    report = collect_status(settings=settings, s3=s3, sqs=sqs, sf_conn=sf_conn, table=table)
    text = run_status_cli(stack, capsys, table.qualified)
    as_json = json.loads(run_status_cli(stack, capsys, table.qualified, "--json"))

    # Then the last file failed into the dead-letter queue, every file is still staged,
    # and status shows the run failed with two of three files loaded and the stuck key
    assert (stats.delivered, stats.failed) == (FILES_PER_RUN, 1)
    assert [r.deleted_keys for r in cleaned] == [[]]
    assert all(exists(s3, settings.bucket, k) for k in keys)
    [status] = report.tables
    assert (status.table, status.last_run_id, status.state) == (table.qualified, manifest.run_id, "failed")
    assert (status.files_staged, status.files_loaded, status.files_failed) == (3, 2, 1)
    assert (status.rows_staged, status.rows_loaded) == (6, 4)
    assert status.lag_seconds is None  # nothing of this table is fully loaded yet
    assert report.dead_letters is not None and keys[-1] in report.dead_letters.keys
    assert report.dead_letters.count >= 1
    assert table.qualified in text and "failed" in text and keys[-1] in text
    assert as_json["tables"][0]["state"] == "failed"
    assert keys[-1] in as_json["dead_letter_queue"]["keys"]


def test_loaded_run_shows_loaded_rows_and_lag(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    s3: Any,
    sqs: Any,
    dispatcher: SqsDispatcher,
    table: TableRef,
    capsys: pytest.CaptureFixture[str],
    cleanup_s3: Any,
) -> None:
    # Given a run whose notifications all reach the loader, then a cleanup pass
    manifest = stage_run(stack, pg_conn, table)
    stats = dispatcher.run_until_idle()
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")
    cleanup_pending_runs(settings=settings, s3=cleanup_s3, sf_conn=sf_conn, tables=[table])

    # When status is asked for every table
    report = collect_status(settings=settings, s3=s3, sqs=sqs, sf_conn=sf_conn)
    as_json = json.loads(run_status_cli(stack, capsys, "--json"))

    # Then this table's last run is loaded with every row, and the lag is measured from its start
    assert stats.failed == 0
    [status] = [t for t in report.tables if t.table == table.qualified]
    assert (status.state, status.files_staged, status.files_loaded, status.files_failed) == (
        "loaded",
        3,
        3,
        0,
    )
    assert (status.rows_staged, status.rows_loaded) == (6, 6)
    assert status.last_loaded_run_id == manifest.run_id
    assert status.lag_seconds is not None and 0 <= status.lag_seconds < 600
    assert table.qualified in [t["table"] for t in as_json["tables"]]


def test_status_of_a_table_never_run(stack: LocalStack, sf_conn: Any, s3: Any, sqs: Any) -> None:
    # Given a table with no manifest, When its status is read, Then it says so
    settings = settings_with(stack)
    report = collect_status(
        settings=settings, s3=s3, sqs=sqs, sf_conn=sf_conn, table=TableRef("public", "no_such_table")
    )
    assert [(t.table, t.state, t.last_run_id) for t in report.tables] == [
        ("public.no_such_table", "never run", None)
    ]
