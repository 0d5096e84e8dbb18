"""Fixtures of the staged-file lifecycle suites (cleanup modes, cleanup lifecycle, status).

Each module gets its own module-scoped stack: the local PostgreSQL source schema, a versioned
moto bucket whose notifications feed the loader queue, and the local Snowflake with the real
ledger. A module may define its own ``stack`` (test_cleanup does); the fixtures here that use
one then use the module's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from lifecycle_support import ORPHAN_AGE_MINUTES, RETENTION_DAYS, ROWS_PER_FILE, SOURCE_ROWS, drain
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from stack_support import autocommit_connection, new_source_schema, running_stack, snowflake_session

from pgsnow.config import Component
from pgsnow.identifiers import TableRef
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import LocalStack, load_function_handler


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
