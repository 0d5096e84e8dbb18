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

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pgsnow.config import Component
from pgsnow.demo.compare import TableComparison, compare_table
from pgsnow.demo.dataset import SAMPLE_TABLES, create_sample_shop
from pgsnow.errors import ConfigError, PgSnowError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat
from pgsnow.local.stack import (
    SNOWFLAKE_DATABASE,
    LocalStack,
    StorageAccess,
    load_function_handler,
    start_stack,
)
from pgsnow.observability import SERVICE
from pgsnow.verify import TableVerification, verify_table

ProgressCallback = Callable[[str], None]

DEMO_DATABASE = "pgsnow_demo"  # the PostgreSQL database the sample shop goes into
DEMO_SCHEMA = "shop"


def _quiet(_message: str) -> None:
    return None


class TableStatus(StrEnum):
    OK = "OK"  # replicated, and every row and cell matches
    MISMATCH = "MISMATCH"  # replicated, but the copy differs from the source
    FAILED = "FAILED"  # could not be replicated or compared (the reason says why)


@dataclass(frozen=True)
class DemoTableResult:
    """One table's outcome: its status, row counts where known, and a one-line reason."""

    table: TableRef
    status: TableStatus
    source_rows: int | None
    snowflake_rows: int | None
    detail: str
    verification: TableVerification | None = None

    @property
    def ok(self) -> bool:
        return self.status is TableStatus.OK


def one_line(exc: BaseException) -> str:
    """An error as one line: pgsnow's own message, or the exception's type and first line."""
    if isinstance(exc, PgSnowError):
        text = exc.message
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return " ".join(text.split())


class _FunctionErrors(logging.Handler):
    """The functions' ERROR records while one table replicates: the loader reports a file it could
    not load only in its log (and by leaving the message on the queue)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


@contextmanager
def _function_errors() -> Iterator[_FunctionErrors]:
    functions = logging.getLogger(SERVICE)
    collected = _FunctionErrors()
    functions.addHandler(collected)
    try:
        yield collected
    finally:
        functions.removeHandler(collected)


def _outcome(comparison: TableComparison, verification: TableVerification | None) -> DemoTableResult:
    """The comparison and (when run) pgsnow verify's check, as one status."""
    if not comparison.ok:
        status = TableStatus.FAILED if comparison.detail.startswith("cannot read") else TableStatus.MISMATCH
        detail = comparison.detail
    elif verification is not None and not verification.ok:
        status = TableStatus.FAILED if verification.error else TableStatus.MISMATCH
        detail = f"verify: {verification.error or verification.summary()}"
    else:
        status, detail = TableStatus.OK, comparison.detail
    return DemoTableResult(
        comparison.table, status, comparison.source_rows, comparison.snowflake_rows, detail, verification
    )


def list_schema_tables(dsn: str, schema: str) -> list[TableRef]:
    """The tables replicating ``schema`` means (``pgsnow.postgres.list_schema_tables``)."""
    from pgsnow.postgres import connect
    from pgsnow.postgres import list_schema_tables as tables_of_schema

    conn = connect(dsn)
    try:
        return tables_of_schema(conn, schema)
    finally:
        conn.rollback()
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


class LoaderFailedError(Exception):
    """The loader left at least one of the table's files unloaded (on the queue, then the DLQ)."""


def replicate_table(stack: LocalStack, table: TableRef, file_format: FileFormat, dispatcher: Any) -> None:
    """Extract ``table``, let the queue deliver its files to the loader, then run cleanup."""
    from pgsnow.extract.run import extract_table
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
    with _function_errors() as errors:
        delivered = dispatcher.run_until_idle()
    if delivered.failed:
        reason = errors.messages[0] if errors.messages else "see the loader's log (--verbose)"
        raise LoaderFailedError(f"the loader could not load {table.qualified}: {reason}")
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
    verify: bool = False,
    storage_access: str = "integration",
) -> list[DemoTableResult]:
    """Replicate each table through the local pipeline and compare it with its source.

    A table that cannot be replicated or compared is reported FAILED with its reason and the
    others go on. With ``verify``, each table is also checked by ``pgsnow.verify`` (row hashes
    computed in each database), and its result is part of the table's status.
    """
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
        results: list[DemoTableResult] = []
        # The handlers read this stack's settings and run as their own template roles.
        with stack.handlers():
            # Batches as the deployed event source makes them; each drain closes its window early.
            dispatcher = stack.loader_dispatcher()
            sf_conn = stack.snowflake_connection()
            pg_conn = connect(source_dsn)
            try:
                for table in chosen:
                    started = time.monotonic()
                    result = _demo_table(
                        stack,
                        table,
                        file_format=chosen_format,
                        dispatcher=dispatcher,
                        pg_conn=pg_conn,
                        sf_conn=sf_conn,
                        verify=verify,
                        report=report,
                    )
                    results.append(result)
                    report(f"{table.qualified} {result.status.value} in {time.monotonic() - started:.1f}s")
            finally:
                pg_conn.close()
                sf_conn.close()
        return results
    finally:
        stack.stop()


def _demo_table(
    stack: LocalStack,
    table: TableRef,
    *,
    file_format: FileFormat,
    dispatcher: Any,
    pg_conn: Any,
    sf_conn: Any,
    verify: bool,
    report: ProgressCallback,
) -> DemoTableResult:
    """One table replicated, compared and (``verify``) verified; any failure is its FAILED result."""
    step = "replicating"
    try:
        report(f"replicating {table.qualified} ({file_format.value})")
        replicate_table(stack, table, file_format, dispatcher)
        step = "comparing"
        report(f"comparing {table.qualified}")
        comparison = compare_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
        verification = None
        if verify:
            step = "verifying"
            report(f"verifying {table.qualified}")
            verification = verify_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
        return _outcome(comparison, verification)
    except Exception as exc:  # one table's failure, whatever it is, must not stop the others
        if not pg_conn.closed:
            pg_conn.rollback()  # a failed comparison may leave its transaction aborted
        return DemoTableResult(table, TableStatus.FAILED, None, None, f"{step}: {one_line(exc)}")
