"""The loader against real servers on loopback: moto (S3, SQS) over HTTP and the local
Snowflake server spoken to by the real snowflake-connector-python."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote_plus

import pytest
import snowflake.connector
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from load_support import (
    ORDER_COLUMNS,
    ORDER_ROWS,
    ORDERS,
    RUN,
    csv_gz_bytes,
    ledger_rows,
    order_count,
    orders_sql,
    parquet_bytes,
    put_run_manifest,
    put_staged_file,
    query,
)
from snowflake.connector.cursor import SnowflakeCursor

from pgsnow.config import Component, Settings
from pgsnow.errors import PermanentError, RetryableError
from pgsnow.keys import FileFormat, data_key, parse_data_key
from pgsnow.load.batch import load_staged_files
from pgsnow.load.outcomes import LoadStatus
from pgsnow.local.aws import LocalAws, create_staging_resources
from pgsnow.local.snowflake import LocalSnowflake
from pgsnow.runtime import Runtime
from pgsnow.snowflake.load_sql import build_create_stage
from pgsnow.snowflake.table_sql import build_create_schema

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]

# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv-gz", "parquet"])
def test_staged_file_loads_cell_exact(
    settings: Settings, s3: Any, sf_conn: Any, file_format: FileFormat
) -> None:
    # Given a run manifest and one staged file with every value kind, NULLs and an empty string
    key = data_key(settings.prefix, ORDERS, 1, RUN, file_format)
    body = csv_gz_bytes(ORDER_ROWS) if file_format is FileFormat.CSV else parquet_bytes(ORDER_ROWS)
    put_run_manifest(s3, settings)
    put_staged_file(s3, settings, key, body, rows=len(ORDER_ROWS))

    # When the loader loads it
    results = load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(key, settings.prefix)]
    )

    # Then the result reports the rows, and the table holds exactly the values staged
    assert [(r.key, r.table, r.status, r.rows) for r in results] == [
        (key, "public.orders", LoadStatus.LOADED, len(ORDER_ROWS))
    ]
    names = ", ".join(f'"{n.upper()}"' for n, _, _ in ORDER_COLUMNS)
    loaded = query(sf_conn, f'SELECT {names} FROM {orders_sql(settings)} ORDER BY "ORDER_ID"')
    assert len(loaded) == len(ORDER_ROWS)
    # NULL timestamps are checked with IS NULL: the emulator returns them as the epoch.
    null_flags = query(
        sf_conn,
        f'SELECT "NOTE" IS NULL, "CREATED" IS NULL, "CREATED_TZ" IS NULL, "PAYLOAD" IS NULL, "BLOB" IS NULL '
        f'FROM {orders_sql(settings)} ORDER BY "ORDER_ID"',
    )
    assert null_flags == [
        (False, False, False, False, False),
        (True, True, True, True, True),
        (False, True, True, False, False),
    ]
    for expected, actual in zip(ORDER_ROWS, loaded, strict=True):
        order_id, amount, ratio, note, paid, day, time_of_day, created, created_tz, payload, blob = actual
        assert (order_id, amount, ratio, note, paid, day, time_of_day) == expected[:7]
        assert note == expected[3]  # '' stays '', NULL stays None
        if expected[7] is not None:
            assert created == expected[7]
        if expected[8] is not None:
            assert created_tz == expected[8]
        assert (None if payload is None else json.loads(payload)) == expected[9]
        assert (None if blob is None else bytes(blob)) == expected[10]
    assert ledger_rows(sf_conn, settings) == [
        (
            key,
            s3.head_object(Bucket=settings.bucket, Key=key)["ETag"].strip('"'),
            hashlib.sha256(body).hexdigest(),
            RUN,
            "public",
            "orders",
            len(ORDER_ROWS),
            True,
        )
    ]


def test_same_file_delivered_twice_loads_once(settings: Settings, s3: Any, sf_conn: Any) -> None:
    # Given a staged file that was loaded
    key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    put_run_manifest(s3, settings)
    put_staged_file(s3, settings, key, csv_gz_bytes(ORDER_ROWS), rows=len(ORDER_ROWS))
    staged = parse_data_key(key, settings.prefix)
    first = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])

    # When the same notification arrives again
    second = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])

    # Then the second delivery is skipped: the rows are there once, the ledger has one entry
    assert [r.status for r in first + second] == [LoadStatus.LOADED, LoadStatus.ALREADY_LOADED]
    assert second[0].rows == len(ORDER_ROWS)
    assert order_count(sf_conn, settings) == len(ORDER_ROWS)
    assert len(ledger_rows(sf_conn, settings)) == 1


def test_changed_content_under_a_loaded_key_is_refused(settings: Settings, s3: Any, sf_conn: Any) -> None:
    # Given a loaded file
    key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    put_run_manifest(s3, settings)
    put_staged_file(s3, settings, key, csv_gz_bytes(ORDER_ROWS[:1]), rows=1)
    staged = parse_data_key(key, settings.prefix)
    load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])

    # When different content is written under the same key and announced
    put_staged_file(s3, settings, key, csv_gz_bytes(ORDER_ROWS[1:]), rows=2)
    with pytest.raises(PermanentError, match="changed file under a loaded key") as caught:
        load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])

    # Then nothing more was loaded and the ledger still describes the first content
    assert caught.value.s3_key == key
    assert order_count(sf_conn, settings) == 1
    assert [row[6] for row in ledger_rows(sf_conn, settings)] == [1]


@pytest.mark.parametrize(
    ("rows", "metadata_rows", "message"),
    [
        pytest.param(
            [*ORDER_ROWS[:2], ("3", "not a number", *ORDER_ROWS[2][2:])],
            3,
            None,
            id="bad-value-for-number",
        ),
        pytest.param(ORDER_ROWS, 5, "the file's pgsnow-rows says 5", id="row-count-mismatch"),
    ],
)
def test_bad_file_fails_and_leaves_nothing(
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    rows: list[tuple[Any, ...]],
    metadata_rows: int,
    message: str | None,
) -> None:
    # Given a staged file that cannot load as announced
    key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    put_run_manifest(s3, settings)
    put_staged_file(s3, settings, key, csv_gz_bytes(rows), rows=metadata_rows)

    # When the loader tries it
    with pytest.raises(PermanentError) as caught:
        load_staged_files(
            settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(key, settings.prefix)]
        )

    # Then it fails permanently, the transaction rolled back: no rows, no ledger entry
    assert caught.value.s3_key == key
    if message:
        assert message in caught.value.message
    assert order_count(sf_conn, settings) == 0
    assert ledger_rows(sf_conn, settings) == []


def test_missing_manifest_is_retryable(settings: Settings, s3: Any, sf_conn: Any) -> None:
    key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    put_staged_file(s3, settings, key, csv_gz_bytes(ORDER_ROWS), rows=len(ORDER_ROWS))

    with pytest.raises(RetryableError, match="manifest"):
        load_staged_files(
            settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(key, settings.prefix)]
        )


def test_hand_dropped_file_needs_an_existing_table(settings: Settings, s3: Any, sf_conn: Any) -> None:
    # Given a plain CSV without pgsnow metadata, and no target table yet
    key = f"{settings.prefix}/public/orders/hand dropped.csv.gz"
    body = csv_gz_bytes([ORDER_ROWS[0]])
    put_staged_file(s3, settings, key, body, rows=None, run_id=None)
    staged = parse_data_key(key, settings.prefix)

    # When it is loaded before the table exists, Then it is refused
    with pytest.raises(PermanentError, match="existing table"):
        load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])

    # When the table exists (created by a pgsnow run), Then it loads by the table's columns
    run_key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    put_run_manifest(s3, settings)
    put_staged_file(s3, settings, run_key, csv_gz_bytes(ORDER_ROWS[1:]), rows=2)
    load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(run_key, settings.prefix)]
    )
    results = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])

    assert [(r.status, r.rows) for r in results] == [(LoadStatus.LOADED, 1)]
    assert query(sf_conn, f'SELECT "NOTE" FROM {orders_sql(settings)} WHERE "ORDER_ID" = 1') == [
        (ORDER_ROWS[0][3],)
    ]


# --------------------------------------------------------------------------- the Lambda handler


def import_loader_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pgsnow_loader_app", REPO / "loader" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeLambdaContext:
    """The attributes Powertools reads from Lambda's context object."""

    function_name = "pgsnow-loader"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:pgsnow-loader"
    memory_limit_in_mb = 1024
    aws_request_id = "test-request"
    log_group_name = "/aws/lambda/pgsnow-loader"
    log_stream_name = "local"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def test_handler_fails_exactly_the_bad_record(
    aws: LocalAws, local_snowflake: LocalSnowflake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the staging bucket with its S3 -> SQS notification, a run manifest, and two staged
    # files: one good, one with a bad NUMBER value
    suffix = uuid.uuid4().hex[:10]
    resources = create_staging_resources(aws, bucket=f"pgsnow-handler-{suffix}")
    env = {
        "S3_STAGE_BUCKET": resources.bucket,
        "PGSNOW_TABLES": "public.orders",
        "SNOWFLAKE_ACCOUNT": "local",
        "SNOWFLAKE_USER": "pgsnow",
        "SNOWFLAKE_PASSWORD": "local",
        "SNOWFLAKE_DATABASE": f"DB_{suffix.upper()}",
    }
    settings = Settings.from_env(env, component=Component.LOADER)
    s3 = aws.client("s3")
    conn = snowflake.connector.connect(
        **local_snowflake.connect_kwargs(database=settings.snowflake.database or "", schema="PUBLIC")
    )
    with conn.cursor() as cursor:
        cursor.execute(build_create_schema(settings.snowflake.database or "", "PGSNOW"))
        cursor.execute(
            build_create_stage(
                settings.snowflake.database or "",
                "PGSNOW",
                "PGSNOW_STAGE",
                bucket=resources.bucket,
                prefix=resources.prefix,
                storage_integration=None,
            )
        )
    put_run_manifest(s3, settings)
    good_key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    bad_key = data_key(settings.prefix, ORDERS, 2, RUN, FileFormat.CSV)
    put_staged_file(s3, settings, good_key, csv_gz_bytes(ORDER_ROWS), rows=len(ORDER_ROWS))
    put_staged_file(s3, settings, bad_key, csv_gz_bytes([(4, "oops", *ORDER_ROWS[0][2:])]), rows=1)
    sqs = aws.client("sqs")
    messages: list[dict[str, Any]] = []
    for _ in range(5):
        received = sqs.receive_message(
            QueueUrl=resources.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        messages += received.get("Messages", [])
        if len(messages) >= 3:
            break
    bodies = [json.loads(m["Body"]) for m in messages]
    assert any(b.get("Event") == "s3:TestEvent" for b in bodies)  # S3's TestEvent is in the batch
    event = {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": resources.queue_arn,
                "awsRegion": aws.region,
            }
            for m in messages
        ]
    }
    bad_message_ids = [
        m["MessageId"]
        for m, b in zip(messages, bodies, strict=True)
        if [unquote_plus(r["s3"]["object"]["key"]) for r in b.get("Records", [])] == [bad_key]
    ]
    app = import_loader_app()
    monkeypatch.setattr(
        app,
        "loader_runtime",
        lambda: Runtime(settings=settings, session=aws.admin_session(), _snowflake=conn),
    )

    # When the handler gets the batch
    response = app.handler(event, FakeLambdaContext())

    # Then only the bad file's message is reported failed, and the good file is loaded
    assert response == {"batchItemFailures": [{"itemIdentifier": i} for i in bad_message_ids]}
    assert len(bad_message_ids) == 1
    assert order_count(conn, settings) == len(ORDER_ROWS)
    assert [row[0] for row in ledger_rows(conn, settings)] == [good_key]
    conn.close()


def test_redelivery_after_cleanup_is_already_loaded(settings: Settings, s3: Any, sf_conn: Any) -> None:
    # Given a loaded file that cleanup then deleted, and a never-loaded key that is gone too
    key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    put_run_manifest(s3, settings)
    put_staged_file(s3, settings, key, csv_gz_bytes(ORDER_ROWS), rows=len(ORDER_ROWS))
    staged = parse_data_key(key, settings.prefix)
    load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])
    s3.delete_object(Bucket=settings.bucket, Key=key)
    never_loaded = parse_data_key(data_key(settings.prefix, ORDERS, 9, RUN, FileFormat.CSV), settings.prefix)

    # When their notifications are delivered (again)
    results = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])
    with pytest.raises(PermanentError, match="no longer exists"):
        load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[never_loaded])

    # Then the loaded one is reported as already loaded, with its rows, and nothing changed
    assert [(r.status, r.rows) for r in results] == [(LoadStatus.ALREADY_LOADED, len(ORDER_ROWS))]
    assert order_count(sf_conn, settings) == len(ORDER_ROWS)


# --------------------------------------------------------------------------- a steady batch

# DDL; ALTER SESSION (the query tag, autocommit) changes no object, so it is not counted.
PREPARATION = re.compile(r"\s*(CREATE|DROP|ALTER\s+(?!SESSION\b))", re.IGNORECASE)


def sqs_record_for(settings: Settings, key: str) -> SQSRecord:
    """The SQS message S3's notification of ``key`` becomes."""
    body = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": settings.bucket}, "object": {"key": key}},
            }
        ]
    }
    return SQSRecord({"messageId": uuid.uuid4().hex, "body": json.dumps(body), "attributes": {}})


def test_a_steady_batch_sends_no_ddl_and_no_column_lookup(
    settings: Settings, s3: Any, sf_conn: Any, aws: LocalAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the loader handler's runtime (one per container), which loaded a first batch of a run
    app = import_loader_app()
    runtime = Runtime(settings=settings, session=aws.admin_session(), _snowflake=sf_conn)
    monkeypatch.setattr(app, "loader_runtime", lambda: runtime)
    put_run_manifest(s3, settings)
    keys = [data_key(settings.prefix, ORDERS, batch, RUN, FileFormat.CSV) for batch in (1, 2, 3)]
    for key in keys:
        put_staged_file(s3, settings, key, csv_gz_bytes(ORDER_ROWS), rows=len(ORDER_ROWS))
    first = app.load_sqs_batch([sqs_record_for(settings, keys[0])])
    assert [o.error for o in first.outcomes.values()] == [None]

    # When a second batch brings new files of the same table and run, every statement the real
    # connector sends is recorded
    statements: list[str] = []
    execute = SnowflakeCursor.execute

    def recording_execute(cursor: SnowflakeCursor, command: str, *args: Any, **kwargs: Any) -> Any:
        statements.append(command)
        return execute(cursor, command, *args, **kwargs)

    monkeypatch.setattr(SnowflakeCursor, "execute", recording_execute)
    second = app.load_sqs_batch([sqs_record_for(settings, key) for key in keys[1:]])

    # Then both files load, with a COPY and no DDL (CREATE/ALTER/DROP) or column look-up
    assert [o.result.status for o in second.outcomes.values() if o.result] == [LoadStatus.LOADED] * 2
    assert any(s.startswith("COPY INTO") for s in statements)
    preparation = [s for s in statements if PREPARATION.match(s) or "INFORMATION_SCHEMA" in s]
    assert preparation == []
    assert order_count(sf_conn, settings) == 3 * len(ORDER_ROWS)


def test_a_table_dropped_by_hand_is_prepared_again_on_the_retry(
    settings: Settings, s3: Any, sf_conn: Any, aws: LocalAws
) -> None:
    # Given a runtime's loader that prepared the orders table for a first batch
    runtime = Runtime(settings=settings, session=aws.admin_session(), _snowflake=sf_conn)
    put_run_manifest(s3, settings)
    keys = [data_key(settings.prefix, ORDERS, batch, RUN, FileFormat.CSV) for batch in (1, 2)]
    for key in keys:
        put_staged_file(s3, settings, key, csv_gz_bytes(ORDER_ROWS), rows=len(ORDER_ROWS))
    loader = runtime.loader()
    loader.load(sf_conn, [parse_data_key(keys[0], settings.prefix)])

    # When someone drops the table, and the next file's load fails and is retried
    query(sf_conn, f"DROP TABLE {orders_sql(settings)}")
    (failed,) = loader.load(sf_conn, [parse_data_key(keys[1], settings.prefix)])
    (retried,) = loader.load(sf_conn, [parse_data_key(keys[1], settings.prefix)])

    # Then the failure returns the file to the queue, and the retry creates the table and loads it
    assert failed.error is not None
    assert retried.result is not None and retried.result.status is LoadStatus.LOADED
    assert order_count(sf_conn, settings) == len(ORDER_ROWS)
