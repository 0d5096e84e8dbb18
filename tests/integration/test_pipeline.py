"""The whole pipeline on loopback: extractor -> S3 notification -> SQS -> dispatcher -> loader handler.

Real servers only: the local PostgreSQL (database ``test``, a schema of our own), a moto
server over HTTP (S3 notifications, SQS with a redrive policy to a dead-letter queue), and
the local Snowflake spoken to by the real connector. The queue's visibility timeout is one
second and its maxReceiveCount two, so a failing message reaches the dead-letter queue
within seconds, by SQS's own redrive, not ours.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from stack_support import MAX_RECEIVE_COUNT

from pgsnow.config import Component
from pgsnow.demo.compare import compare_table
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat, applied_mark_key, data_key
from pgsnow.ledger import ledger_name
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import SNOWFLAKE_DATABASE, LocalStack
from pgsnow.manifest import RunManifest, RunState
from pgsnow.runs import RunStore
from pgsnow.staging import put_data_file

if TYPE_CHECKING:  # the fixture's types, from this directory's conftest.py
    from pipeline_support import PipelineHarness, RecordingLoader

pytestmark = pytest.mark.integration

# (id, name, note, amount): NULL vs '' in both text columns, and text outside ASCII.
PEOPLE_ROWS = [
    (1, "Zoë Ünal", "", "12.50"),
    (2, "", None, None),
    (3, "名前 🚀", 'comma, "quote" and\nnewline', "-0.01"),
    (4, "plain", "n/a", "0.00"),
]


# --------------------------------------------------------------------------- fixtures
# The module's stack and schema are conftest's ``pipeline``; these are its parts, by the names used here.


@pytest.fixture(scope="module")
def source_schema(pipeline: PipelineHarness) -> tuple[str, str]:
    """(DSN of database ``test``, the schema only this module uses)."""
    return pipeline.source_dsn, pipeline.schema


@pytest.fixture(scope="module")
def pg_conn(pipeline: PipelineHarness) -> PgConnection:
    return pipeline.setup_conn


@pytest.fixture(scope="module")
def stack(pipeline: PipelineHarness) -> LocalStack:
    """One local stack for the module, its environment in place for the handlers."""
    return pipeline.stack


@pytest.fixture(scope="module")
def sf_conn(pipeline: PipelineHarness) -> Any:
    return pipeline.sf_conn


@pytest.fixture
def loader(pipeline: PipelineHarness) -> tuple[RecordingLoader, SqsDispatcher]:
    """The real loader handler, recording every delivery, behind a dispatcher on the module's queue."""
    return pipeline.loader()


# --------------------------------------------------------------------------- helpers


def create_people_table(pg_conn: PgConnection, table: TableRef) -> None:
    with pg_conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "CREATE TABLE {} (id integer PRIMARY KEY, name text NOT NULL, note text, amount numeric(10,2))"
            ).format(sql.Identifier(table.schema, table.table))
        )
        cur.executemany(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s)").format(
                sql.Identifier(table.schema, table.table)
            ),
            PEOPLE_ROWS,
        )


def extract(stack: LocalStack, pg_conn: PgConnection, table: TableRef) -> RunManifest:
    return extract_table(
        settings=stack.settings(Component.EXTRACTOR),
        pg_conn=pg_conn,
        s3=stack.aws.client("s3"),
        table=table,
        file_format=FileFormat.CSV,
    )


def ledger_keys(sf_conn: Any, table: TableRef) -> list[str]:
    """Every ledger key of ``table``: its loaded files, and the mark of each replace run swapped in."""
    ledger = ledger_name(SNOWFLAKE_DATABASE, "PGSNOW", table)
    with sf_conn.cursor() as cur:
        cur.execute(
            f'SELECT "S3_KEY" FROM {ledger} WHERE "SCHEMA_NAME" = %s AND "TABLE_NAME" = %s ORDER BY "S3_KEY"',
            (table.schema, table.table),
        )
        return [row[0] for row in cur.fetchall()]


def snowflake_row_count(sf_conn: Any, table: TableRef) -> int:
    with sf_conn.cursor() as cur:
        cur.execute(
            f"SELECT COUNT(*) FROM {quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)}"
        )
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def dead_letter_bodies(stack: LocalStack) -> list[str]:
    """Every message body in the dead-letter queue, left there (received with visibility 0)."""
    sqs = stack.aws.client("sqs")
    seen: dict[str, str] = {}
    empty_polls = 0
    while empty_polls < 2:
        messages = sqs.receive_message(
            QueueUrl=stack.resources.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        ).get("Messages", [])
        new = [m for m in messages if m["MessageId"] not in seen]
        seen.update((m["MessageId"], m["Body"]) for m in new)
        empty_polls = 0 if new else empty_polls + 1
    return list(seen.values())


def queue_depth(stack: LocalStack) -> tuple[int, int]:
    attributes = stack.aws.client("sqs").get_queue_attributes(
        QueueUrl=stack.resources.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def new_table(source_schema: tuple[str, str], name: str) -> TableRef:
    return TableRef(source_schema[1], name)


# --------------------------------------------------------------------------- tests


def test_extracted_table_flows_through_the_queue_into_snowflake(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    source_schema: tuple[str, str],
    loader: tuple[RecordingLoader, SqsDispatcher],
) -> None:
    # Given a source table with NULL and '' in text columns and non-ASCII text
    table = new_table(source_schema, "people")
    create_people_table(pg_conn, table)
    recorder, dispatcher = loader

    # When the real extractor stages it and the queue delivers the notifications to the loader
    manifest = extract(stack, pg_conn, table)
    dispatcher.run_until_idle()

    # Then every staged file reached the loader through S3 -> SQS and loaded on the first delivery
    staged_keys = [f.key for f in manifest.files]
    assert staged_keys
    for key in staged_keys:
        assert [(d.receive_count, d.failed) for d in recorder.for_key(key)] == [(1, False)]
    # (and the mark of the run's swap: a full run replaces the table by default)
    assert manifest.write_mode == "replace"
    assert ledger_keys(sf_conn, table) == sorted([*staged_keys, applied_mark_key(table, manifest.run_id)])
    # And Snowflake holds exactly the source rows, cell by cell (NULL is not '')
    comparison = compare_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
    assert comparison.ok, comparison.detail
    assert (comparison.source_rows, comparison.snowflake_rows) == (len(PEOPLE_ROWS), len(PEOPLE_ROWS))
    assert queue_depth(stack) == (0, 0)
    # And the loader marked the run complete as its last file loaded (no cleanup pass ran)
    settled = RunStore(stack.aws.client("s3"), stack.resources.bucket).get_manifest(table, manifest.run_id)
    assert settled.state is RunState.LOADED


def test_failed_copy_is_redelivered_then_dead_lettered_while_the_good_file_loads(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    source_schema: tuple[str, str],
    loader: tuple[RecordingLoader, SqsDispatcher],
) -> None:
    # Given a table staged by the real extractor (the good file, with its run's manifest)
    table = new_table(source_schema, "people_bad")
    create_people_table(pg_conn, table)
    manifest = extract(stack, pg_conn, table)
    (good,) = manifest.files
    # And a second file of the same run with a non-numeric value in the NUMBER column
    bad_key = data_key(stack.resources.prefix, table, 2, manifest.run_id, FileFormat.CSV)
    bad_body = gzip.compress(b'id,name,note,amount\n99,"x","y","not a number"\n', mtime=0)
    put_data_file(
        stack.aws.client("s3"),
        stack.resources.bucket,
        bad_key,
        bad_body,
        run_id=manifest.run_id,
        batch=2,
        rows=1,
        sha256=hashlib.sha256(bad_body).hexdigest(),
    )
    recorder, dispatcher = loader

    # When the dispatcher runs until the queue settles (redeliveries included)
    dispatcher.run_until_idle()

    # Then the bad message was received exactly maxReceiveCount times, failing each time
    assert [(d.receive_count, d.failed) for d in recorder.for_key(bad_key)] == [
        (n, True) for n in range(1, MAX_RECEIVE_COUNT + 1)
    ]
    # And SQS moved it to the dead-letter queue, body naming the bad key
    dead = [json.loads(body) for body in dead_letter_bodies(stack)]
    dead_keys = [unquote_plus(r["s3"]["object"]["key"]) for d in dead for r in d.get("Records", [])]
    assert dead_keys.count(bad_key) == 1
    assert queue_depth(stack) == (0, 0)
    # And the good file loaded once; the bad one left no rows and no ledger entry
    assert [(d.receive_count, d.failed) for d in recorder.for_key(good.key)] == [(1, False)]
    # (the run is complete with the file its manifest lists, so its table was swapped in)
    assert ledger_keys(sf_conn, table) == sorted([good.key, applied_mark_key(table, manifest.run_id)])
    comparison = compare_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
    assert comparison.ok, comparison.detail
    assert snowflake_row_count(sf_conn, table) == len(PEOPLE_ROWS)


def test_test_event_is_consumed_and_keys_outside_staging_never_reach_the_loader(
    stack: LocalStack, loader: tuple[RecordingLoader, SqsDispatcher]
) -> None:
    # Given the bucket notification applied again (S3 then sends an s3:TestEvent to the queue)
    s3 = stack.aws.client("s3")
    bucket = stack.resources.bucket
    notification = s3.get_bucket_notification_configuration(Bucket=bucket)
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"QueueConfigurations": notification["QueueConfigurations"]}
    )
    # And data-looking files written outside the staging prefix
    outside_keys = [
        f"elsewhere/{stack.resources.prefix}/public/orders/public_orders_batch1_x.csv.gz",
        "public/orders/public_orders_batch1_20261125T120000000000Z.csv.gz",
        f"{stack.resources.prefix}-old/public/orders/dropped.parquet",
    ]
    for key in outside_keys:
        s3.put_object(Bucket=bucket, Key=key, Body=gzip.compress(b"id\n1\n"))
    recorder, dispatcher = loader

    # When the queue is drained into the loader
    dispatcher.run_until_idle()

    # Then the loader got the test event, acknowledged it, and saw none of the outside keys
    test_events = [d for d in recorder.deliveries if json.loads(d.body).get("Event") == "s3:TestEvent"]
    assert [(d.receive_count, d.failed) for d in test_events] == [(1, False)]
    assert [d for d in recorder.deliveries if d.s3_keys()] == []
    # And nothing is waiting or dead-lettered because of them
    assert queue_depth(stack) == (0, 0)
    assert [body for body in dead_letter_bodies(stack) if "TestEvent" in body or "orders" in body] == []


def test_redelivered_notification_loads_nothing_twice(
    stack: LocalStack,
    pg_conn: PgConnection,
    sf_conn: Any,
    source_schema: tuple[str, str],
    loader: tuple[RecordingLoader, SqsDispatcher],
) -> None:
    # Given a table replicated through the queue
    table = new_table(source_schema, "people_again")
    create_people_table(pg_conn, table)
    manifest = extract(stack, pg_conn, table)
    recorder, dispatcher = loader
    dispatcher.run_until_idle()
    (good,) = manifest.files
    (first,) = recorder.for_key(good.key)
    assert snowflake_row_count(sf_conn, table) == len(PEOPLE_ROWS)

    # When the exact same S3 event body is sent to the queue again and delivered
    stack.aws.client("sqs").send_message(QueueUrl=stack.resources.queue_url, MessageBody=first.body)
    dispatcher.run_until_idle()

    # Then the loader got it a second time, succeeded, and nothing was loaded twice
    assert [(d.body, d.failed) for d in recorder.for_key(good.key)] == [
        (first.body, False),
        (first.body, False),
    ]
    assert snowflake_row_count(sf_conn, table) == len(PEOPLE_ROWS)
    assert ledger_keys(sf_conn, table) == sorted([good.key, applied_mark_key(table, manifest.run_id)])
    comparison = compare_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
    assert comparison.ok, comparison.detail
    assert queue_depth(stack) == (0, 0)
    assert good.key not in " ".join(dead_letter_bodies(stack))
