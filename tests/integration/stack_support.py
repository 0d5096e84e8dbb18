"""Building blocks of the integration suites' module-scoped fixtures.

Each is a context manager, so a module's fixture is a ``with`` and a ``yield``:

* ``new_source_schema(prefix)``: a schema of the module's own in database ``test`` on the local
  PostgreSQL, dropped (CASCADE) afterwards (``source_database`` and ``schema_in`` are its two
  halves, for a database shared by a session and a schema per module);
* ``autocommit_connection(dsn)``: for DDL and source writes (never left idle in transaction);
* ``running_stack(...)``: ``start_stack`` with a bucket name of its own (moto keeps one state per
  process), optionally with its environment in place for the function handlers;
* ``snowflake_session(stack)``: a connection to the stack's local Snowflake.
* ``new_bucket(s3, prefix)``: a bucket no other test uses.
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection

from pgsnow.local.postgres import LocalPostgres, create_database, start_local_postgres
from pgsnow.local.stack import LocalStack, start_stack
from pgsnow.postgres import connect

# One source database per xdist worker: the extractor's safe point counts every transaction open in
# its database (pgsnow.postgres.read_safe_point), so another worker's open transaction in a shared
# database would hold a run's watermark back, and a test that checks the watermark would see it.
SOURCE_DATABASE = (
    f"test_{os.environ['PYTEST_XDIST_WORKER']}" if "PYTEST_XDIST_WORKER" in os.environ else "test"
)
PG_DSN_DEFAULT = "host=127.0.0.1 port=5432 user=postgres dbname=test"
# conftest's ``pipeline`` queue: a failing message is dead-lettered within seconds by SQS's own redrive.
VISIBILITY_TIMEOUT_S = 1
MAX_RECEIVE_COUNT = 2


# --------------------------------------------------------------------------- building blocks


def unique_name(prefix: str, digits: int = 8) -> str:
    return f"{prefix}{uuid.uuid4().hex[:digits]}"


def postgres_secret_arn(secrets_client: Any, dsn: str) -> str:
    """A Secrets Manager secret in the RDS format the deployed functions read, for ``dsn``; its ARN."""
    libpq = psycopg2.extensions.parse_dsn(dsn)
    secret = {
        "host": libpq.get("host", "127.0.0.1"),
        "port": int(libpq.get("port", 5432)),
        "username": libpq.get("user", "postgres"),
        "password": libpq.get("password", "unused-with-trust-auth"),
        "dbname": libpq.get("dbname", "test"),
        "sslmode": "disable",  # loopback server without TLS; deployed secrets default to require
    }
    arn: str = secrets_client.create_secret(
        Name=unique_name("pgsnow/postgres-"), SecretString=json.dumps(secret)
    )["ARN"]
    return arn


@contextmanager
def autocommit_connection(dsn: str) -> Iterator[PgConnection]:
    conn = connect(dsn)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def source_database(admin_dsn: str | None = None) -> Iterator[str]:
    """The DSN of database ``test`` (created if missing) on the local PostgreSQL server
    (``start_local_postgres``: the loopback server, or the embedded one it falls back to), or on
    the server ``admin_dsn`` names (the embedded server a module started for an extension only it
    has). A server started for it is released afterwards."""
    admin = LocalPostgres(dsn=admin_dsn, embedded=False) if admin_dsn else start_local_postgres(environ={})
    try:
        yield create_database(admin.dsn, SOURCE_DATABASE)  # kept if it exists
    finally:
        admin.stop()


@contextmanager
def schema_in(dsn: str, prefix: str) -> Iterator[str]:
    """A schema ``{prefix}_<8 hex>`` created in ``dsn``'s database and dropped (CASCADE) afterwards."""
    schema = unique_name(f"{prefix}_")
    with autocommit_connection(dsn) as conn:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            yield schema
        finally:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@contextmanager
def new_source_schema(prefix: str, admin_dsn: str | None = None) -> Iterator[tuple[str, str]]:
    """(DSN of database ``test``, schema ``{prefix}_<8 hex>``, created) on the server
    ``source_database`` picks; the schema is dropped afterwards."""
    with source_database(admin_dsn) as dsn, schema_in(dsn, prefix) as schema:
        yield dsn, schema


@contextmanager
def running_stack(
    pg_dsn: str,
    data_dir: Path,
    bucket_prefix: str,
    *,
    env: Mapping[str, str] | Callable[[LocalStack], Mapping[str, str]] | None = None,
    for_handlers: bool = False,
    **options: Any,
) -> Iterator[LocalStack]:
    """A local stack whose bucket is ``{bucket_prefix}-<8 hex>``; ``env`` is added to its environment
    (a callable is given the started stack, for values that name its queues or bucket).

    With ``for_handlers`` its environment is also put in this process's for the duration (the
    functions' handlers read ``os.environ``), each function's handler runs as its own template
    role, and the handlers' cached settings are reset on the way in and out
    (``LocalStack.handlers``). ``options`` go to ``start_stack`` (visibility_timeout,
    max_receive_count, template_path, ...).
    """
    local = start_stack(pg_dsn=pg_dsn, data_dir=data_dir, bucket=unique_name(f"{bucket_prefix}-"), **options)
    local.env.update((env(local) if callable(env) else env) or {})
    try:
        if not for_handlers:
            yield local
            return
        with local.handlers():
            yield local
    finally:
        local.stop()


@contextmanager
def snowflake_session(stack: LocalStack) -> Iterator[Any]:
    conn = stack.snowflake_connection()
    try:
        yield conn
    finally:
        conn.close()


def new_bucket(s3: Any, prefix: str, *, versioned: bool = False) -> str:
    """A bucket no other test uses (moto's state is shared by the whole process)."""
    name = unique_name(f"{prefix}-", 12)
    s3.create_bucket(Bucket=name)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


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
