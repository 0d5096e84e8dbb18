"""A run's lifecycle: ``extract_table`` takes the table's lease, starts or resumes the run, stages
chunk after chunk, and ends it ``staged`` (watermark and published columns saved), handed on
(``extracting``: the deadline is near) or ``failed``; it frees the lease in every case.

A run split into key ranges (``fan_out``, docs/extraction.md "Parallel backfill") is handed on
to the range workers instead: the table's lease passes to the run's ranges and one message per
unfinished range is sent; the worker that stages the last range finishes the run
(``pgsnow.extract.worker``). Without ``fan_out`` (the CLI) such a run's ranges are extracted
here, one after another.

A change-capture table's (mode ``cdc``) run is its snapshot: a full run, replace, started by
``pgsnow.cdc.enroll.snapshot_table`` with the enrollment's ``ChangeRange`` (``snapshot``); a new
run of such a table without one is refused (its replace would roll back applied changes)."""

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

from pgsnow.changes import ChangeRange
from pgsnow.checkpoint import Lease, LeaseLostError, RunCheckpoint
from pgsnow.config import ExtractMode, Settings
from pgsnow.errors import PermanentError, PgSnowError, RetryableError
from pgsnow.extract.chunks import stage_chunks
from pgsnow.extract.finish import finish_run
from pgsnow.extract.plan import run_options
from pgsnow.extract.ranges import FanOut
from pgsnow.extract.schema_drift import check_schema_drift
from pgsnow.extract.start import resume_run, start_run
from pgsnow.extract.state import Deadline, ExtractionRun, Invocation, end_snapshot
from pgsnow.extract.worker import RangeOutcome, extract_range
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, new_run_id
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.postgres import Connection, classify_pg_error
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
    fan_out: FanOut | None = None,
    snapshot: ChangeRange | None = None,
) -> RunManifest:
    """Stage ``table`` (or continue run ``run_id``) and return its manifest.

    With ``fan_out``, a new run reading the whole table of a large table is split into key
    ranges, sent to the workers, and returned ``extracting`` (``fan_out.dispatched`` names it).
    A run already split (a parallel run whose workers all stopped) is handed to the workers
    again with ``fan_out``; without, its ranges are extracted here one after another.

    The manifest is ``staged`` when the run is complete, or still ``extracting`` when the
    invocation stopped because ``remaining_ms()`` fell below the deadline margin: the caller
    then starts a continuation with the same ``run_id``. Without ``run_id`` a new run starts,
    unless an earlier run of the table was left unfinished (handed off or its holder died):
    that run is resumed. ``file_format`` None means the table's option or S3_FILE_FORMAT.

    ``snapshot``: a change-capture table's new run is its snapshot, and carries this position
    (``pgsnow.cdc.enroll`` passes it with the enrollment's ``run_id``).

    Raises UnsafeIdentifierError (before any SQL or S3 call) for a table outside the allowlist,
    RunInProgressError when another invocation holds the table, PermanentError for data
    Snowflake cannot hold (policy ``fail``), RetryableError for transient failures (the run
    is left resumable).
    """
    settings.tables.check(table)
    configured = settings.table_options(table)
    options = run_options(configured)
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
                    if configured.mode is ExtractMode.CDC:
                        _check_snapshot_run(table, lease.run_id, run_id, snapshot)
                    # The last staged run's columns: what the table's NUMBER scales are, and what
                    # this run's columns are checked against (one read for both).
                    published = store.load_published_columns(table)
                    attempt.run, attempt.manifest = start_run(
                        invocation,
                        run_id=lease.run_id,
                        file_format=file_format,
                        started_at=utc_iso(started_at),
                        published=published,
                        range_rows=settings.extract.range_rows if fan_out is not None else None,
                        changes=snapshot,
                    )
                    check_schema_drift(published, table, options, attempt.manifest.columns)
                else:
                    # Known before resuming, so a run that cannot resume (its columns changed) is
                    # marked failed and the table's next run starts afresh (a cdc table: enrolled again).
                    attempt.checkpoint = checkpoint
                    attempt.manifest = store.get_manifest(table, lease.run_id)
                    attempt.run = resume_run(invocation, checkpoint, attempt.manifest)
                if attempt.run.checkpoint.ranges:
                    attempt.run.lease = store.hand_to_ranges(attempt.run.lease, ttl_s=deadline.lease_ttl_s())
                    # A run planned just now has no range staged: only a resumed one reads their checkpoints.
                    pending = (
                        [span.index for span in attempt.run.checkpoint.ranges]
                        if checkpoint is None
                        else _unstaged_ranges(store, attempt.run)
                    )
                    if fan_out is not None:
                        fan_out.send(table, lease.run_id, pending)
                        return attempt.manifest
                else:
                    result = _run_to_its_end(attempt.run, attempt.manifest, started, now)
                    pending = None
    finally:
        end_snapshot(pg_conn)
    if pending is not None:
        # No workers to send the ranges to: extract them here, one after another.
        for index in pending:
            outcome = extract_range(
                settings=settings,
                pg_conn=pg_conn,
                s3=s3,
                table=table,
                run_id=lease.run_id,
                index=index,
                now=now,
                remaining_ms=remaining_ms,
                owner=lease.owner,
                clock=clock,
            )
            if outcome.outcome is RangeOutcome.STOPPED:
                break
            if outcome.manifest is not None:
                return outcome.manifest
        return store.get_manifest(table, lease.run_id)
    if result.state is RunState.STAGED:
        _log_staged(result, started)
    return result


def _check_snapshot_run(
    table: TableRef, run_id: str, enrolled_run_id: str | None, snapshot: ChangeRange | None
) -> None:
    """A change-capture table's new run must be the snapshot its enrollment names."""
    if snapshot is None:
        raise PermanentError(
            f"{table.qualified} is in mode cdc: its one run is the snapshot its enrollment starts "
            "(the extractor function's invocation, pgsnow.cdc.enroll.snapshot_table); a full run "
            "outside it would roll back the changes applied since",
            table=table.qualified,
        )
    if run_id != enrolled_run_id:
        # The lease named a run of its dead holder that never checkpointed: not the enrolled one.
        raise RetryableError(
            f"{table.qualified}: took over the lease of run {run_id}, which is not the enrolled snapshot "
            f"{enrolled_run_id}; the lease is released and the next invocation starts the snapshot",
            table=table.qualified,
            run_id=run_id,
        )


def _unstaged_ranges(store: RunStore, run: ExtractionRun) -> list[int]:
    """The ranges still to stage; when none is (the finisher died), the last range, whose
    delivery then finishes the run."""
    ranges = run.checkpoint.ranges
    pending = []
    for span in ranges:
        checkpoint = store.load_checkpoint(run.table, run.run_id, span.index)
        if checkpoint is None or checkpoint.state != RunState.STAGED.value:
            pending.append(span.index)
    return pending or [ranges[-1].index]


def _run_to_its_end(
    run: ExtractionRun, manifest: RunManifest, started: float, now: Callable[[], datetime]
) -> RunManifest:
    """Stage the rest of the run: ``staged`` when done, ``extracting`` when the deadline stopped it."""
    complete = stage_chunks(run)
    elapsed = time.monotonic() - started
    timings = dict(run.checkpoint.timings)
    timings["extract_s"] = round(timings.get("extract_s", 0.0) + elapsed, 3)
    if not complete:
        return _hand_on(run, manifest, timings)
    return finish_run(run, manifest, timings, now)


def _hand_on(run: ExtractionRun, manifest: RunManifest, timings: dict[str, float]) -> RunManifest:
    """Stopped before the deadline: the lease is left to the run's continuation."""
    run.save(run.checkpoint.evolve(timings=timings))
    run.lease = run.store.hand_off_lease(run.lease, ttl_s=run.deadline.lease_ttl_s())
    logger.info(
        "stopping before the deadline; the run continues in a new invocation",
        extra={"run_id": run.run_id, "table": run.table.qualified, "files": len(run.checkpoint.files)},
    )
    return manifest.with_state(RunState.EXTRACTING, files=run.checkpoint.files, timings=timings)


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


@dataclass
class _Attempt:
    """This invocation's hold on a run, for recording how it failed: the lease it acquired, and
    the run and its manifest once they are open."""

    store: RunStore
    lease: Lease
    now: Callable[[], datetime]
    run: ExtractionRun | None = None
    checkpoint: RunCheckpoint | None = None  # a resumed run's, before it is open
    manifest: RunManifest | None = None

    @contextmanager
    def failure_recorded(self) -> Iterator[None]:
        """Any error of the block is recorded (``_record_failure``), then propagates: a PostgreSQL
        error as its classified PgSnowError, a PgSnowError with the run's table and id, anything
        else (disk full, an Arrow conversion) unchanged."""
        try:
            yield
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
                checkpoint = run.checkpoint if run is not None else self.checkpoint
                files = checkpoint.files if checkpoint is not None else ()
                failed = manifest.with_state(
                    RunState.FAILED,
                    files=files,
                    finished_at=utc_iso(self.now()),
                    error=str(error).splitlines()[0][:500],
                )
                self.store.put_manifest(failed)
                if checkpoint is not None:
                    self.store.save_checkpoint(checkpoint.evolve(state=RunState.FAILED.value))
            self.store.release_lease(current_lease)
        except PgSnowError as put_error:
            logger.warning("could not record the failure", extra={**context, "put_error": put_error.message})
            return
        if manifest is not None:
            # The error's message travels with the exception; the log names only its type
            # (database messages can quote row contents).
            logger.error("extraction failed; manifest marked failed", extra=context)
