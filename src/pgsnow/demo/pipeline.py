"""The demo: the whole pipeline on loopback servers, table by table, checked cell by cell.

``start_stack`` brings up PostgreSQL (the given DSN, the local server or the
embedded fallback), a moto server with the staging bucket, queue and bucket
notification, and the local Snowflake reading that bucket; it then creates
the Snowflake database, control schema and external stage. ``run_demo``
replicates each table the way the deployed functions do: the real extractor
stages files, the bucket notification puts S3 events on SQS, the dispatcher
delivers them to the real loader handler, the real cleanup handler runs, and
``compare_table`` checks the result.

The handlers read their configuration through ``Settings.from_env``, so the
stack's settings are put into this process's environment while it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgsnow.config import Component
from pgsnow.demo.compare import TableComparison, compare_table
from pgsnow.demo.dataset import SAMPLE_TABLES, create_sample_shop
from pgsnow.errors import ConfigError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat
from pgsnow.local.stack import (
    SNOWFLAKE_DATABASE,
    LocalStack,
    StorageAccess,
    load_function_handler,
    start_stack,
)
from pgsnow.verify import TableVerification, verify_table

ProgressCallback = Callable[[str], None]

DEMO_DATABASE = "pgsnow_demo"  # the PostgreSQL database the sample shop goes into
DEMO_SCHEMA = "shop"


def _quiet(_message: str) -> None:
    return None


def list_schema_tables(dsn: str, schema: str) -> list[TableRef]:
    """The ordinary and partitioned tables of ``schema``, by name."""
    from pgsnow.postgres import connect

    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                ORDER BY c.relname
                """,
                (schema,),
            )
            return [TableRef(schema, name) for (name,) in cur.fetchall()]
    finally:
        conn.close()


def _prepare_source(
    *,
    admin_dsn: str,
    tables: list[TableRef] | None,
    schema: str | None,
    use_sample: bool,
    scale: float,
    progress: ProgressCallback,
) -> tuple[str, list[TableRef]]:
    """The DSN and tables to replicate, creating the sample shop when nothing was named."""
    if use_sample:
        from pgsnow.local.postgres import create_database

        dsn = create_database(admin_dsn, DEMO_DATABASE)
        progress(f"creating the sample shop (scale {scale}) in database {DEMO_DATABASE}")
        create_sample_shop(dsn, DEMO_SCHEMA, scale=scale, progress=progress)
        return dsn, [TableRef(DEMO_SCHEMA, name) for name in SAMPLE_TABLES]
    if tables:
        return admin_dsn, tables
    found = list_schema_tables(admin_dsn, schema or "public")
    if not found:
        raise ConfigError([f"schema {schema or 'public'!r} has no tables to replicate"])
    return admin_dsn, found


def replicate_table(stack: LocalStack, table: TableRef, file_format: FileFormat, dispatcher: Any) -> None:
    """Extract ``table``, let the queue deliver its files to the loader, then run cleanup."""
    from pgsnow.extract import extract_table
    from pgsnow.local.dispatcher import LambdaContext
    from pgsnow.postgres import connect

    pg_conn = connect(stack.pg_dsn)
    try:
        extract_table(
            settings=stack.settings(Component.EXTRACTOR),
            pg_conn=pg_conn,
            s3=stack.function_client(Component.EXTRACTOR, "s3"),
            table=table,
            file_format=file_format,
        )
    finally:
        pg_conn.close()
    dispatcher.run_until_idle()
    cleanup = load_function_handler("cleanup")
    context = LambdaContext(
        function_name="pgsnow-cleanup",
        invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:pgsnow-cleanup",
        memory_limit_in_mb=512,
        deadline_monotonic=time.monotonic() + 300,
    )
    cleanup({"schema_name": table.schema, "table_name": table.table}, context)


def run_demo(
    *,
    pg_dsn: str | None,
    tables: list[TableRef] | None,
    schema: str | None,
    file_format: str,
    data_dir: Path,
    progress: ProgressCallback | None = None,
    scale: float = 1.0,
    verifications: list[TableVerification] | None = None,
    storage_access: str = "integration",
) -> list[TableComparison]:
    """Replicate each table through the local pipeline and compare it with its source.

    When ``verifications`` is given, each table is also checked by ``pgsnow.verify`` (row
    hashes computed in each database) and its result appended there.
    """
    from pgsnow.local.dispatcher import SqsDispatcher
    from pgsnow.postgres import connect

    report = progress or _quiet
    chosen_format = FileFormat(file_format)
    use_sample = pg_dsn is None and not tables and schema is None
    stack = start_stack(
        pg_dsn=pg_dsn,
        data_dir=data_dir,
        file_format=chosen_format.value,
        progress=report,
        storage_access=StorageAccess(storage_access),
    )
    try:
        source_dsn, chosen = _prepare_source(
            admin_dsn=stack.pg_dsn,
            tables=tables,
            schema=schema,
            use_sample=use_sample,
            scale=scale,
            progress=report,
        )
        stack.pg_dsn = source_dsn
        stack.env["PGSNOW_PG_DSN"] = source_dsn
        stack.env["PGSNOW_TABLES"] = ",".join(t.qualified for t in chosen)
        results: list[TableComparison] = []
        # The handlers read this stack's settings and run as their own template roles.
        with stack.handlers():
            dispatcher = SqsDispatcher(stack.aws, stack.resources.queue_url, load_function_handler("loader"))
            sf_conn = stack.snowflake_connection()
            pg_conn = connect(source_dsn)
            try:
                for table in chosen:
                    started = time.monotonic()
                    report(f"replicating {table.qualified} ({chosen_format.value})")
                    replicate_table(stack, table, chosen_format, dispatcher)
                    report(f"comparing {table.qualified}")
                    results.append(compare_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE))
                    if verifications is not None:
                        report(f"verifying {table.qualified}")
                        verifications.append(verify_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE))
                    report(f"{table.qualified} done in {time.monotonic() - started:.1f}s")
            finally:
                pg_conn.close()
                sf_conn.close()
        return results
    finally:
        stack.stop()
