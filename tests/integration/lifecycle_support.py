"""Shared fixtures and helpers for the staged-file lifecycle suites (cleanup modes, cleanup lifecycle,
status).

Each test module that imports the fixtures gets its own module-scoped stack: the local
PostgreSQL source schema, a versioned moto bucket whose notifications feed the loader queue,
and the local Snowflake with the real ledger. A module may define its own ``stack`` (test_cleanup
does); the imported fixtures that use one then use the module's.
"""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from stack_support import autocommit_connection, new_source_schema, running_stack, snowflake_session

from pgsnow.config import Component, Settings
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, parse_data_key
from pgsnow.load.batch import load_staged_files
from pgsnow.load.outcomes import LoadStatus
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import LocalStack, load_function_handler
from pgsnow.manifest import RunManifest

ROWS_PER_FILE = 2
SOURCE_ROWS = [(n, f"item {n}") for n in range(1, 7)]  # three files of two rows
FILES_PER_RUN = 3
ORPHAN_AGE_MINUTES = 5
RETENTION_DAYS = 2


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source_schema() -> Iterator[tuple[str, str]]:
    """(DSN of database ``test``, a schema only this module uses); the schema is dropped afterwards."""
    with new_source_schema("pgsnow_lc") as found:
        yield found


@pytest.fixture(scope="module")
def pg_conn(source_schema: tuple[str, str]) -> Iterator[PgConnection]:
    with autocommit_connection(source_schema[0]) as conn:
        yield conn


@pytest.fixture(scope="module")
def stack(source_schema: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The stack, its environment in place for the handlers."""
    with running_stack(
        source_schema[0],
        tmp_path_factory.mktemp("lifecycle"),
        "pgsnow-lc",
        for_handlers=True,
        visibility_timeout=1,
        max_receive_count=1,  # a failed file goes to the dead-letter queue on its first failure
        # test_archive_prefix_copies_then_removes archives under archive/: the cleanup role needs
        # the template's ArchiveLoadedFiles statement, present only with this parameter
        template_parameters={"CleanupArchivePrefix": "archive"},
        env=lambda local: {
            "EXTRACT_BATCH_ROWS": str(ROWS_PER_FILE),
            "LOADER_QUEUE_URL": local.resources.queue_url,
            "LOADER_DLQ_URL": local.resources.dlq_url,
            "CLEANUP_ORPHAN_AGE_MINUTES": str(ORPHAN_AGE_MINUTES),
            "S3_STAGE_RETENTION_DAYS": str(RETENTION_DAYS),
        },
    ) as local:
        yield local


@pytest.fixture(scope="module")
def sf_conn(stack: LocalStack) -> Iterator[Any]:
    with snowflake_session(stack) as conn:
        yield conn


@pytest.fixture
def s3(stack: LocalStack) -> Any:
    """The local administrator's S3 client: for seeding and inspecting, not for code under test."""
    return stack.aws.client("s3")


@pytest.fixture
def cleanup_s3(stack: LocalStack) -> Any:
    """The cleanup role's S3 client, for calling the cleanup's core functions directly."""
    return stack.function_client(Component.CLEANUP, "s3")


@pytest.fixture
def cleanup_sqs(stack: LocalStack) -> Any:
    """The cleanup role's SQS client (the sweeper re-enqueues and reads the dead-letter queue)."""
    return stack.function_client(Component.CLEANUP, "sqs")


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


def stage_run(stack: LocalStack, pg_conn: PgConnection, table: TableRef) -> RunManifest:
    """One extractor run of ``table``, as the extractor's role."""
    manifest = extract_table(
        settings=stack.settings(Component.EXTRACTOR),
        pg_conn=pg_conn,
        s3=stack.function_client(Component.EXTRACTOR, "s3"),
        table=table,
        file_format=FileFormat.CSV,
    )
    # (not a test module: no assertion rewriting here, so the message says what was found)
    assert len(manifest.files) == FILES_PER_RUN, [f.key for f in manifest.files]
    return manifest


def load_keys(stack: LocalStack, sf_conn: Any, keys: list[str]) -> None:
    """Load ``keys`` as the loader's role."""
    settings = stack.settings(Component.LOADER)
    s3 = stack.function_client(Component.LOADER, "s3")
    results = load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(k, settings.prefix) for k in keys]
    )
    assert [r.status for r in results] == [LoadStatus.LOADED] * len(keys), results


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
