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

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg2.errors
from psycopg2 import sql

from pgsnow.config import Component
from pgsnow.demo.compare import TableComparison, compare_table
from pgsnow.demo.dataset import SAMPLE_TABLES, create_sample_shop
from pgsnow.demo.workload import Workload, WorkloadCounts
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
# demo --cdc's own database (``demo_cdc_database``: one per data dir), so a plain demo never drops its
# tables and two demos side by side never rebuild each other's shop under their workloads.
DEMO_CDC_DATABASE_PREFIX = "pgsnow_demo_cdc"
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
    database: str = DEMO_DATABASE,
) -> tuple[str, list[TableRef]]:
    """The DSN and tables to replicate, creating the sample shop when nothing was named."""
    if use_sample:
        from pgsnow.local.postgres import create_database

        dsn = create_database(admin_dsn, database)
        progress(f"creating the sample shop (scale {scale}) in database {database}")
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
    _load_staged(dispatcher, table.qualified)
    cleanup = load_function_handler("cleanup")
    context = LambdaContext.for_invocation("pgsnow-cleanup", memory_mb=512, timeout_s=300)
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


# ----------------------------------------------------------------------------- change capture

# A demo's change-capture cycles while the workload writes, and how long each waits for it.
CDC_CYCLES = 3
CDC_CYCLE_SECONDS = 5.0
CDC_WORKLOAD_RATE = 200.0  # changes per second


@dataclass(frozen=True)
class CdcDemoResult:
    """``pgsnow demo --cdc``: each table's outcome, what the workload did and the drain runs."""

    tables: list[DemoTableResult]
    workload: WorkloadCounts
    change_capture_runs: int
    publication: str
    slot: str

    @property
    def ok(self) -> bool:
        return bool(self.tables) and all(r.ok for r in self.tables)


def _data_dir_digest(data_dir: Path) -> str:
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]


def demo_cdc_database(data_dir: Path) -> str:
    """The source database of ``demo --cdc`` for a data dir."""
    return f"{DEMO_CDC_DATABASE_PREFIX}_{_data_dir_digest(data_dir)}"


def change_capture_names(data_dir: Path) -> tuple[str, str]:
    """The publication and slot of a demo data dir: one pair per data dir, so two demos side by side
    (or a demo next to a real deployment's ``pgsnow`` slot) never share or drop each other's slot."""
    digest = _data_dir_digest(data_dir)
    return f"pgsnow_demo_{digest}", f"pgsnow_demo_{digest}"


def create_change_capture_source(dsn: str, publication: str, slot: str, tables: list[TableRef]) -> None:
    """What ``pgsnow postgres-sql`` prints for these tables (``pgsnow.postgres_setup``), run against
    the server: the wal_level check, replica identities, the publication and the pgoutput slot.
    The replication user's step is left out: a role is cluster-wide and the local demo connects
    as the server's own user. A pair of these names left by an earlier demo of the same data dir
    is dropped first."""
    from pgsnow.postgres import connect
    from pgsnow.postgres_setup import (
        PostgresSetupOptions,
        build_postgres_setup,
        read_table_identities,
        render_composable,
    )

    drop_change_capture_source(dsn, publication, slot)
    conn = connect(dsn)
    try:
        conn.autocommit = True
        options = PostgresSetupOptions(
            publication=publication,
            slot=slot,
            tables=tables,
            database=conn.info.dbname,
            identities=read_table_identities(conn, tables),
            aurora=False,
        )
        steps = [
            step for step in build_postgres_setup(options) if not step.title.startswith("Replication user")
        ]
        with conn.cursor() as cur:
            for step in steps:
                for statement in step.statements:
                    cur.execute(statement)
                    if render_composable(statement) == "SHOW wal_level":
                        level = cur.fetchone()
                        if level is None or level[0] != "logical":
                            raise ConfigError(
                                [f"demo --cdc needs wal_level = logical on the server, it is {level}"]
                            )
    finally:
        conn.close()


def drop_change_capture_source(dsn: str, publication: str, slot: str) -> None:
    """Drop the demo's slot (it would pin WAL for ever) and publication, if they exist."""
    from pgsnow.postgres import connect

    conn = connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            # A drain that died leaves its walsender on the slot for a moment: end it, then drop.
            cur.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active_pid IS NOT NULL",
                (slot,),
            )
            for attempt in range(50):
                try:
                    cur.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,),
                    )
                    break
                except psycopg2.errors.ObjectInUse:
                    if attempt == 49:
                        raise
                    time.sleep(0.2)
            cur.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)))
    finally:
        conn.close()


def run_cdc_demo(
    *,
    data_dir: Path,
    file_format: str = "csv",
    pg_dsn: str | None = None,
    progress: ProgressCallback | None = None,
    scale: float = 1.0,
    cycles: int = CDC_CYCLES,
    cycle_seconds: float = CDC_CYCLE_SECONDS,
    rate: float = CDC_WORKLOAD_RATE,
    storage_access: str = "integration",
) -> CdcDemoResult:
    """The sample shop replicated in change-capture mode while a workload writes to it.

    Every table is mode ``cdc``: the demo creates the publication and slot, the extractor enrolls
    and snapshots each table (loaded as any full run), the workload starts, and ``cycles`` times
    (every ``cycle_seconds``) the change-capture function drains the slot and the loader applies
    what it staged. Then the workload stops, the slot is drained until it has confirmed every
    change, the loader applies the rest, and each table is compared and verified. The slot and
    publication are dropped at the end, whatever happened.
    """

    report = progress or _quiet
    chosen_format = FileFormat(file_format)
    publication, slot = change_capture_names(data_dir)
    stack = start_stack(
        pg_dsn=pg_dsn,
        data_dir=data_dir,
        file_format=chosen_format.value,
        progress=report,
        storage_access=StorageAccess(storage_access),
    )
    source_dsn: str | None = None
    try:
        source_dsn, chosen = _prepare_source(
            admin_dsn=stack.pg_dsn,
            tables=None,
            schema=None,
            use_sample=True,
            scale=scale,
            progress=report,
            database=demo_cdc_database(data_dir),
        )
        stack.pg_dsn = source_dsn
        stack.env.update(
            {
                "PGSNOW_PG_DSN": source_dsn,
                "PGSNOW_TABLES": ",".join(t.qualified for t in chosen),
                "PGSNOW_TABLE_OPTIONS": json.dumps({t.qualified: {"mode": "cdc"} for t in chosen}),
                "CDC_PUBLICATION": publication,
                "CDC_SLOT": slot,
            }
        )
        report(f"creating publication {publication} and replication slot {slot}")
        create_change_capture_source(source_dsn, publication, slot, chosen)
        with stack.handlers():
            dispatcher = stack.loader_dispatcher()
            change_capture = stack.change_capture(interval_s=cycle_seconds)
            failed: dict[TableRef, str] = {}
            for table in chosen:
                report(f"enrolling {table.qualified} and loading its snapshot")
                try:
                    snapshot_table(stack, table, dispatcher)
                except Exception as exc:  # the table is reported FAILED, the others go on
                    failed[table] = f"snapshot: {one_line(exc)}"
            workload = Workload(source_dsn, DEMO_SCHEMA, rate=rate)
            report(f"starting the workload ({rate:g} changes/s)")
            workload.start()
            try:
                for cycle in range(1, cycles + 1):
                    time.sleep(cycle_seconds)
                    outcome = change_capture.run_once()
                    _load_staged(dispatcher)
                    report(f"change capture {cycle}/{cycles}: {_outcome_line(outcome)}")
            finally:
                counts = workload.stop()
            report(
                f"workload stopped: {counts.transactions} transactions, {counts.changes} changes "
                f"({counts.inserts} inserts, {counts.updates} updates of which {counts.unchanged_toast_updates} "
                f"left a TOASTed value unchanged, {counts.deletes} deletes, {counts.pk_updates} key moves)"
            )
            runs = change_capture.drain_until_caught_up()
            _load_staged(dispatcher)
            report(f"slot {slot} caught up after {len(runs)} more change-capture runs")
            results = _check_tables(stack, source_dsn, chosen, failed, report)
        return CdcDemoResult(results, counts, len(change_capture.outcomes), publication, slot)
    finally:
        try:
            if source_dsn is not None:
                report(f"dropping replication slot {slot} and publication {publication}")
                drop_change_capture_source(source_dsn, publication, slot)
        finally:
            stack.stop()


SNAPSHOT_MAX_INVOCATIONS = 100


def snapshot_table(stack: LocalStack, table: TableRef, dispatcher: Any) -> dict[str, Any]:
    """A mode-cdc table's first extractor invocations, as its schedule makes them: the first
    enrolls the table and starts its snapshot (a full run), continuations and range workers
    finish it, the loader loads it; returns the last invocation's result. Call inside
    ``stack.handlers()``."""
    from pgsnow.local.dispatcher import LambdaContext
    from pgsnow.local.range_workers import range_workers_for

    handler = load_function_handler("extractor")
    continuations: list[dict[str, Any]] = []
    # Lambda would start a continuation as a new asynchronous invocation; here it waits its turn.
    stack.function_runtime(Component.EXTRACTOR).continuation_invoker = continuations.append
    event: dict[str, Any] = {"schema_name": table.schema, "table_name": table.table}
    result: dict[str, Any] = {}
    for _ in range(SNAPSHOT_MAX_INVOCATIONS):
        context = LambdaContext.for_invocation("pgsnow-extractor", memory_mb=2048, timeout_s=900)
        result = dict(handler(event, context))
        if not continuations:
            break
        event = continuations.pop(0)
    else:
        raise LoaderFailedError(
            f"the snapshot of {table.qualified} did not finish in {SNAPSHOT_MAX_INVOCATIONS} invocations"
        )
    if stack.env.get("EXTRACT_RANGE_QUEUE_URL"):
        # A large table's snapshot is split into ranges for concurrent extractor invocations.
        range_workers_for(stack, handler).run_until_idle()
    _load_staged(dispatcher)
    return result


def _outcome_line(outcome: dict[str, Any]) -> str:
    if "skipped" in outcome:
        return f"skipped ({outcome['skipped']})"
    return (
        f"{outcome.get('changes', '?')} changes in {outcome.get('transactions', '?')} transactions, "
        f"{outcome.get('files', '?')} files, through {outcome.get('end_lsn', '?')}"
    )


def _load_staged(dispatcher: Any, what: str = "change files") -> None:
    """Deliver what the bucket notification queued to the loader; a file it could not load is an error."""
    with _function_errors() as errors:
        delivered = dispatcher.run_until_idle()
    if delivered.failed:
        reason = errors.messages[0] if errors.messages else "see the loader's log (--verbose)"
        raise LoaderFailedError(f"the loader could not load {what}: {reason}")


def _check_tables(
    stack: LocalStack,
    source_dsn: str,
    tables: list[TableRef],
    failed: dict[TableRef, str],
    report: ProgressCallback,
) -> list[DemoTableResult]:
    from pgsnow.postgres import connect

    results: list[DemoTableResult] = []
    sf_conn = stack.snowflake_connection()
    pg_conn = connect(source_dsn)
    try:
        for table in tables:
            if table in failed:
                results.append(DemoTableResult(table, TableStatus.FAILED, None, None, failed[table]))
                continue
            try:
                comparison = compare_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
                verification = verify_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
                result = _outcome(comparison, verification)
            except Exception as exc:  # one table's failure must not stop the others
                if not pg_conn.closed:
                    pg_conn.rollback()
                result = DemoTableResult(table, TableStatus.FAILED, None, None, f"verifying: {one_line(exc)}")
            results.append(result)
            report(f"{table.qualified} {result.status.value}")
    finally:
        pg_conn.close()
        sf_conn.close()
    return results
