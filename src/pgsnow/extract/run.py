"""A run's lifecycle: ``extract_table`` takes the table's lease, starts or resumes the run, stages
chunk after chunk, and ends it ``staged`` (watermark and published columns saved), handed on
(``extracting``: the deadline is near) or ``failed``; it frees the lease in every case."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from pgsnow.checkpoint import ChunkRecord, Lease, LeaseLostError, PublishedColumns, Watermark
from pgsnow.config import DeleteMode, Settings
from pgsnow.errors import PgSnowError
from pgsnow.extract.csv_stager import stage_chunk_csv
from pgsnow.extract.files import chunk_rows_for
from pgsnow.extract.key_list import stage_key_list
from pgsnow.extract.parquet_stager import stage_chunk_parquet
from pgsnow.extract.schema_drift import check_schema_drift
from pgsnow.extract.start import check_rows_fit, resume_run, start_run
from pgsnow.extract.state import Deadline, ExtractionRun, Invocation, StopForDeadline
from pgsnow.extract.watermark import watermark_after
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, new_run_id
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.postgres import Connection, classify_pg_error, next_chunk_end
from pgsnow.runs import RunStore
from pgsnow.timestamps import utc_iso


def extract_table(
    *,
    settings: Settings,
    pg_conn: Connection,
    s3: Any,
    table: TableRef,
    file_format: FileFormat | None = None,
    run_id: str | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    remaining_ms: Callable[[], int] | None = None,
    owner: str | None = None,
    clock: Callable[[], float] = time.time,
) -> RunManifest:
    """Stage ``table`` (or continue run ``run_id``) and return its manifest.

    The manifest is ``staged`` when the run is complete, or still ``extracting`` when the
    invocation stopped because ``remaining_ms()`` fell below the deadline margin: the caller
    then starts a continuation with the same ``run_id``. Without ``run_id`` a new run starts,
    unless an earlier run of the table was left unfinished (handed off or its holder died):
    that run is resumed. ``file_format`` None means the table's option or S3_FILE_FORMAT.

    Raises UnsafeIdentifierError (before any SQL or S3 call) for a table outside the allowlist,
    RunInProgressError when another invocation holds the table, PermanentError for data
    Snowflake cannot hold (policy ``fail``), RetryableError for transient failures (the run
    is left resumable).
    """
    settings.tables.check(table)
    options = settings.table_options(table)
    started_at = now()
    started = time.monotonic()
    deadline = Deadline(remaining_ms, settings.extract.deadline_margin_s)
    store = RunStore(s3, settings.bucket, clock=clock)
    lease = store.acquire_lease(
        table,
        run_id=run_id or new_run_id(started_at),
        owner=owner or uuid.uuid4().hex,
        ttl_s=deadline.lease_ttl_s(),
        resume=run_id is None,
    )
    attempt = _Attempt(store, lease, now)
    try:
        with attempt.failure_recorded():
            checkpoint = store.load_checkpoint(table, lease.run_id)
            if checkpoint is not None and checkpoint.state != RunState.EXTRACTING.value:
                store.release_lease(lease)  # a duplicate continuation of a finished run: nothing to do
                return store.get_manifest(table, lease.run_id)
            with tempfile.TemporaryDirectory(prefix="pgsnow-") as work_dir:
                invocation = Invocation(
                    settings, s3, store, pg_conn, table, options, lease, deadline, Path(work_dir)
                )
                if checkpoint is None:
                    # The last staged run's columns: what the table's NUMBER scales are, and what
                    # this run's columns are checked against (one read for both).
                    published = store.load_published_columns(table)
                    attempt.run, attempt.manifest = start_run(
                        invocation,
                        run_id=lease.run_id,
                        file_format=file_format,
                        started_at=utc_iso(started_at),
                        published=published,
                    )
                    check_schema_drift(published, table, options, attempt.manifest.columns)
                else:
                    attempt.run, attempt.manifest = resume_run(invocation, checkpoint)
                result = _run_to_its_end(attempt.run, attempt.manifest, started, now)
    finally:
        _end_snapshot(pg_conn)
    if result.state is RunState.STAGED:
        _log_staged(result, started)
    return result


def _run_to_its_end(
    run: ExtractionRun, manifest: RunManifest, started: float, now: Callable[[], datetime]
) -> RunManifest:
    """Stage the rest of the run: ``staged`` when done, ``extracting`` when the deadline stopped it."""
    complete = _stage_chunks(run)
    elapsed = time.monotonic() - started
    timings = dict(run.checkpoint.timings)
    timings["extract_s"] = round(timings.get("extract_s", 0.0) + elapsed, 3)
    if not complete:
        return _hand_on(run, manifest, timings)
    return _finish(run, manifest, timings, now)


def _stage_chunks(run: ExtractionRun) -> bool:
    """Stage chunk after chunk; False when stopped for the deadline (the checkpoint says where)."""
    stage = stage_chunk_csv if run.checkpoint.file_format is FileFormat.CSV else stage_chunk_parquet
    resumed = run.checkpoint.invocations > 1
    while True:
        chunk = run.checkpoint.in_progress
        if chunk is None:
            if run.staged_this_invocation > 0 and run.deadline.near():
                return False
            index = len(run.checkpoint.finished)
            after = run.checkpoint.next_after
            through = None
            if run.checkpoint.order_key:
                through = next_chunk_end(run.pg_conn, run.schema, run.rows(after, None), chunk_rows_for(run))
                if through is None and index > 0:
                    return True
            chunk = ChunkRecord(index, after, through)
            run.save(run.checkpoint.evolve(in_progress=chunk))
        if resumed:
            # A later snapshot than the one checked at the run's start: check this chunk's rows again.
            rows = run.rows(chunk.resume_after or chunk.after, chunk.through)
            check_rows_fit(run.pg_conn, run.schema, rows, run.options)
        allow_empty = chunk.index == 0 and not chunk.files
        try:
            stage(run, chunk, allow_empty)
        except StopForDeadline:
            return False
        finished = run.checkpoint.in_progress
        assert finished is not None
        run.save(run.checkpoint.evolve(finished=(*run.checkpoint.finished, finished), in_progress=None))
        if finished.through is None:
            return True


def _hand_on(run: ExtractionRun, manifest: RunManifest, timings: dict[str, float]) -> RunManifest:
    """Stopped before the deadline: the lease is left to the run's continuation."""
    run.save(run.checkpoint.evolve(timings=timings))
    run.lease = run.store.hand_off_lease(run.lease, ttl_s=run.deadline.lease_ttl_s())
    logger.info(
        "stopping before the deadline; the run continues in a new invocation",
        extra={"run_id": run.run_id, "table": run.table.qualified, "files": len(run.checkpoint.files)},
    )
    return manifest.with_state(RunState.EXTRACTING, files=run.checkpoint.files, timings=timings)


def _finish(
    run: ExtractionRun, manifest: RunManifest, timings: dict[str, float], now: Callable[[], datetime]
) -> RunManifest:
    """Every chunk staged: the key list (deletes), manifest ``staged``, then watermark, published
    columns and checkpoint, and the table is free."""
    options, store = run.options, run.store
    key_list = stage_key_list(run) if options.deletes is not DeleteMode.NONE else None
    cursor_kind = (
        run.schema.column(options.cursor_column).kind
        if manifest.cursor_column and options.cursor_column
        else None
    )
    after = watermark_after(run.pg_conn, run.checkpoint, cursor_kind) if cursor_kind is not None else None
    staged = manifest.with_state(
        RunState.STAGED,
        files=run.checkpoint.files,
        finished_at=utc_iso(now()),
        watermark_after=after,
        key_list=key_list,
        timings=timings,
    )
    store.put_manifest(staged)
    # The watermark moves only once the run's manifest says staged.
    if manifest.cursor_column and after is not None:
        store.save_watermark(run.table, Watermark(manifest.cursor_column, after, run.run_id))
    store.save_published_columns(run.table, PublishedColumns(run.run_id, manifest.columns))
    store.save_checkpoint(run.checkpoint.evolve(state=RunState.STAGED.value, timings=timings))
    store.release_lease(run.lease)
    return staged


def _log_staged(staged: RunManifest, started: float) -> None:
    logger.info(
        "staged table",
        extra={
            "run_id": staged.run_id,
            "table": staged.table.qualified,
            "rows": staged.total_rows,
            "bytes": sum(f.bytes for f in staged.files),
            "files": len(staged.files),
            "write_mode": staged.write_mode,
            "duration_ms": round((time.monotonic() - started) * 1000),
        },
    )


def _end_snapshot(pg_conn: Connection) -> None:
    """Close the read-only transaction; a broken connection is the caller's to replace."""
    if pg_conn.closed:
        return
    try:
        pg_conn.rollback()
    except psycopg2.Error:
        logger.warning("could not end the PostgreSQL transaction; the connection will be replaced")
        pg_conn.close()


@dataclass
class _Attempt:
    """This invocation's hold on a run, for recording how it failed: the lease it acquired, and
    the run and its manifest once they are open."""

    store: RunStore
    lease: Lease
    now: Callable[[], datetime]
    run: ExtractionRun | None = None
    manifest: RunManifest | None = None

    @contextmanager
    def failure_recorded(self) -> Iterator[None]:
        """Any error of the block is recorded (``_record_failure``), then propagates: a PostgreSQL
        error as its classified PgSnowError, a PgSnowError with the run's table and id, anything
        else (disk full, an Arrow conversion) unchanged."""
        try:
            yield
        except StopForDeadline:  # pragma: no cover - caught inside _stage_chunks
            raise
        except Exception as exc:
            error = self._as_run_error(exc)
            self._record_failure(error)
            if error is exc:
                raise
            raise error from exc

    def _as_run_error(self, exc: Exception) -> Exception:
        table, run_id = self.lease.table.qualified, self.lease.run_id
        if isinstance(exc, psycopg2.Error):
            return classify_pg_error(exc, table=table, run_id=run_id)
        if isinstance(exc, PgSnowError):
            exc.table = exc.table or table
            exc.run_id = exc.run_id or run_id
        return exc

    def _record_failure(self, error: BaseException) -> None:
        """A retryable failure leaves the run resumable; any other marks it ``failed`` and frees the table."""
        run, manifest, lease = self.run, self.manifest, self.lease
        current_lease = run.lease if run is not None else lease
        context = {"run_id": lease.run_id, "table": lease.table.qualified, "error": type(error).__name__}
        try:
            if isinstance(error, LeaseLostError):
                return  # another invocation owns the run now
            if isinstance(error, PgSnowError) and error.retryable and manifest is not None:
                self.store.hand_off_lease(current_lease, ttl_s=0)
                logger.warning("extraction interrupted; the next invocation resumes the run", extra=context)
                return
            if manifest is not None:
                files = run.checkpoint.files if run is not None else ()
                failed = manifest.with_state(
                    RunState.FAILED,
                    files=files,
                    finished_at=utc_iso(self.now()),
                    error=str(error).splitlines()[0][:500],
                )
                self.store.put_manifest(failed)
                if run is not None:
                    self.store.save_checkpoint(run.checkpoint.evolve(state=RunState.FAILED.value))
            self.store.release_lease(current_lease)
        except PgSnowError as put_error:
            logger.warning("could not record the failure", extra={**context, "put_error": put_error.message})
            return
        if manifest is not None:
            # The error's message travels with the exception; the log names only its type
            # (database messages can quote row contents).
            logger.error("extraction failed; manifest marked failed", extra=context)
