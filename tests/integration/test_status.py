"""``pgsnow status`` against real servers: runs staged by the real extractor, notifications
delivered by the SQS dispatcher to the real loader handler (a corrupt file fails and is
dead-lettered on its first failure), the ledger in the local Snowflake, and the CLI itself.

Files are staged by the real extractor from the local PostgreSQL into a versioned moto bucket
whose notifications feed the loader queue; the loader is the real handler driven by the
SQS dispatcher (or ``load_staged_files`` directly), writing the real ledger in the local
Snowflake.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.exceptions import ClientError
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection

from pgsnow.cleanup import cleanup_pending_runs
from pgsnow.cli import main
from pgsnow.config import Component, Settings
from pgsnow.extract import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, parse_data_key
from pgsnow.load import LoadStatus, load_staged_files
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.postgres import create_database, start_local_postgres
from pgsnow.local.stack import LocalStack, load_function_handler, process_environment, start_stack
from pgsnow.manifest import RunManifest
from pgsnow.postgres import connect
from pgsnow.runtime import reset_runtime
from pgsnow.status import collect_status
from pgsnow.sweeper import build_object_created_event

pytestmark = pytest.mark.integration

SOURCE_DATABASE = "test"
ROWS_PER_FILE = 2
SOURCE_ROWS = [(n, f"item {n}") for n in range(1, 7)]  # three files of two rows
FILES_PER_RUN = 3
ORPHAN_AGE_MINUTES = 5
RETENTION_DAYS = 2


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source_schema() -> Iterator[tuple[str, str]]:
    admin = start_local_postgres(environ={})
    dsn = create_database(admin.dsn, SOURCE_DATABASE)
    schema = f"pgsnow_stat_{uuid.uuid4().hex[:8]}"
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
        data_dir=tmp_path_factory.mktemp("status"),
        bucket=f"pgsnow-stat-{uuid.uuid4().hex[:8]}",
        visibility_timeout=1,
        max_receive_count=1,  # a failed file goes to the dead-letter queue on its first failure
    )
    local.env.update(
        {
            "EXTRACT_BATCH_ROWS": str(ROWS_PER_FILE),
            "LOADER_QUEUE_URL": local.resources.queue_url,
            "LOADER_DLQ_URL": local.resources.dlq_url,
            "CLEANUP_ORPHAN_AGE_MINUTES": str(ORPHAN_AGE_MINUTES),
            "S3_STAGE_RETENTION_DAYS": str(RETENTION_DAYS),
        }
    )
    try:
        with process_environment(local.env):
            reset_runtime()
            yield local
    finally:
        reset_runtime()
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
def sqs(stack: LocalStack) -> Any:
    """The SQS client; the loader queue starts each test empty (earlier tests' notifications are gone)."""
    client = stack.aws.client("sqs")
    drain(client, stack.resources.queue_url)
    return client


@pytest.fixture
def dispatcher(stack: LocalStack) -> SqsDispatcher:
    return SqsDispatcher(
        stack.aws, stack.resources.queue_url, load_function_handler("loader"), wait_seconds=1
    )


@pytest.fixture
def table(pg_conn: PgConnection, source_schema: tuple[str, str]) -> TableRef:
    ref = TableRef(source_schema[1], f"items_{uuid.uuid4().hex[:8]}")
    name = sql.Identifier(ref.schema, ref.table)
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, label text)").format(name))
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(name), SOURCE_ROWS)
    return ref


# --------------------------------------------------------------------------- helpers


def drain(sqs: Any, queue_url: str) -> int:
    """Receive and delete every visible message: the notifications are lost (PurgeQueue allows one a minute)."""
    drained = 0
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get(
        "Messages", []
    ):
        for message in messages:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        drained += len(messages)
    return drained


def settings_with(stack: LocalStack, **env: str) -> Settings:
    return Settings.from_env({**stack.env, **env}, component=Component.CLEANUP)


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
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(k, settings.prefix) for k in keys]
    )
    assert [r.status for r in results] == [LoadStatus.LOADED] * len(keys)


def versions(s3: Any, bucket: str, key: str) -> tuple[int, int]:
    """(data versions, delete markers) of exactly ``key``."""
    listing = s3.list_object_versions(Bucket=bucket, Prefix=key)
    data = sum(1 for v in listing.get("Versions", []) if v["Key"] == key)
    markers = sum(1 for m in listing.get("DeleteMarkers", []) if m["Key"] == key)
    return data, markers


def exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in {"404", "NoSuchKey"}:
            return False
        raise
    return True


def tags(s3: Any, bucket: str, key: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


def corrupt(s3: Any, bucket: str, key: str) -> None:
    """Replace a staged file's bytes with a CSV the loader cannot COPY, keeping its pgsnow metadata."""
    head = s3.head_object(Bucket=bucket, Key=key)
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=gzip.compress(b"id,label\nnot-a-number,x\n"),
        Metadata=head["Metadata"],
        ContentType="text/csv; charset=utf-8",
        ContentEncoding="gzip",
    )


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
) -> None:
    # Given a staged run whose last file is corrupt, delivered through the queue to the loader
    manifest = stage_run(stack, pg_conn, s3, table)
    keys = [f.key for f in manifest.files]
    drain(sqs, stack.resources.queue_url)
    corrupt(s3, stack.resources.bucket, keys[-1])  # its notification is the one the loader gets
    for key in keys[:-1]:
        send_notification(stack, sqs, key)
    stats = dispatcher.run_until_idle()
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")

    # When cleanup runs, and status is asked for (core function, CLI table and CLI --json)
    cleaned = cleanup_pending_runs(settings=settings, s3=s3, sf_conn=sf_conn, tables=[table])
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
) -> None:
    # Given a run whose notifications all reach the loader, then a cleanup pass
    manifest = stage_run(stack, pg_conn, s3, table)
    stats = dispatcher.run_until_idle()
    settings = settings_with(stack, CLEANUP_S3_FILES="after_all")
    cleanup_pending_runs(settings=settings, s3=s3, sf_conn=sf_conn, tables=[table])

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
