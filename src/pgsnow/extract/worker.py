"""One range of a parallel run, extracted by one worker; the worker that stages the last range
finishes the run (docs/extraction.md, "Parallel backfill").

A worker takes the range's own lease (a second delivery of the same range is turned away while
it is held; a dead worker's lease expires and the next delivery resumes the range from its
checkpoint), keeps the table's lease alive for the run, reads the range in its own REPEATABLE
READ snapshot chunk after chunk (``stage_chunks``: every file checkpointed, keys fixed by the
range's chunk numbers) and marks the range staged. Then it reads every range's checkpoint: when
all are staged it takes the table's lease over from the ranges (a conditional write: of two
workers finishing together exactly one wins) and finishes the run as a single worker would
(``finish_run``: key list, manifest ``staged`` with every file in key order, watermark,
published columns, lease released).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg2

from pgsnow.checkpoint import Lease, LeaseLostError, RunCheckpoint, RunInProgressError
from pgsnow.config import Settings
from pgsnow.errors import PermanentError, PgSnowError
from pgsnow.extract.chunks import stage_chunks
from pgsnow.extract.finish import finish_run
from pgsnow.extract.plan import run_options
from pgsnow.extract.start import schema_as_started
from pgsnow.extract.state import Deadline, ExtractionRun, Invocation, end_snapshot
from pgsnow.extract.watermark import run_filter
from pgsnow.identifiers import TableRef
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.postgres import Connection, classify_pg_error
from pgsnow.runs import RunStore
from pgsnow.timestamps import utc_iso

# How often a range worker checks (and, when half spent, extends) the run's table lease.
TABLE_LEASE_CHECK_S = 60.0


class RangeOutcome(StrEnum):
    STAGED = "staged"  # the range is staged; other ranges are not yet (or another worker finishes)
    FINISHED = "finished"  # this worker staged the run's last range and finished the run
    STOPPED = "stopped"  # the deadline is near: the range continues in a new delivery
    SKIPPED = "skipped"  # nothing to do: the run is over, or another worker holds the range


@dataclass(frozen=True)
class RangeResult:
    outcome: RangeOutcome
    table: TableRef
    run_id: str
    index: int
    files: int = 0  # staged by this invocation
    rows: int = 0
    bytes: int = 0
    manifest: RunManifest | None = None  # the staged manifest when this worker finished the run


@dataclass
class _RangeRun(ExtractionRun):
    """A range's run: every checkpoint save renews the range's lease, and once a minute the
    run's table lease is checked (LeaseLostError when the run no longer holds the table)."""

    table_lease_checked: float = float("-inf")

    def save(self, checkpoint: RunCheckpoint) -> None:
        super().save(checkpoint)
        if time.monotonic() - self.table_lease_checked >= TABLE_LEASE_CHECK_S:
            self.store.extend_ranges_lease(self.table, self.run_id, ttl_s=self.deadline.lease_ttl_s())
            self.table_lease_checked = time.monotonic()


def extract_range(
    *,
    settings: Settings,
    pg_conn: Connection,
    s3: Any,
    table: TableRef,
    run_id: str,
    index: int,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    remaining_ms: Callable[[], int] | None = None,
    owner: str | None = None,
    clock: Callable[[], float] = time.time,
) -> RangeResult:
    """Extract range ``index`` of parallel run ``run_id`` (resuming it after its last staged file),
    and finish the run when it was the last range left.

    Returns STOPPED when the deadline stopped it (deliver the range again), SKIPPED when there was
    nothing to do. Raises UnsafeIdentifierError for a table outside the allowlist (before any
    SQL or S3 call), PermanentError for a range the run does not have or data Snowflake cannot
    hold (the run is then ``failed``), RetryableError for transient failures (the range is left
    resumable).
    """
    settings.tables.check(table)
    store = RunStore(s3, settings.bucket, clock=clock)
    deadline = Deadline(remaining_ms, settings.extract.deadline_margin_s)
    owner = owner or uuid.uuid4().hex
    main = store.load_checkpoint(table, run_id)
    if main is None or not 0 <= index < len(main.ranges):
        raise PermanentError(f"run {run_id} of {table.qualified} has no range {index}", table=table.qualified)
    if main.state != RunState.EXTRACTING.value:
        return _skipped(table, run_id, index, f"the run is {main.state}")
    try:
        lease = store.acquire_lease(
            table, run_id=run_id, owner=owner, ttl_s=deadline.lease_ttl_s(), resume=True, range_index=index
        )
    except RunInProgressError:
        # Its holder's own message stands for the range (redelivered if the holder dies).
        return _skipped(table, run_id, index, "another worker holds the range")
    worker = _Worker(settings, s3, store, pg_conn, table, main, deadline, owner, now)
    started = time.monotonic()
    try:
        with worker.failure_recorded(lease) as held:
            result = worker.stage_range(lease, held, started)
    finally:
        end_snapshot(pg_conn)
    if result.outcome is not RangeOutcome.STAGED:
        return result
    finished = worker.finish_if_last()
    if finished is None:
        return result
    return replace(result, outcome=RangeOutcome.FINISHED, manifest=finished)


@dataclass
class _Worker:
    settings: Settings
    s3: Any
    store: RunStore
    pg_conn: Connection
    table: TableRef
    main: RunCheckpoint
    deadline: Deadline
    owner: str
    now: Callable[[], datetime]

    @property
    def run_id(self) -> str:
        return self.main.run_id

    def _invocation(self, lease: Lease, work_dir: Path) -> Invocation:
        options = run_options(self.settings.table_options(self.table))  # a cdc table's run: its snapshot
        return Invocation(
            self.settings,
            self.s3,
            self.store,
            self.pg_conn,
            self.table,
            options,
            lease,
            self.deadline,
            work_dir,
        )

    def stage_range(self, lease: Lease, held: list[Lease], started: float) -> RangeResult:
        """Stage the rest of the range; release its lease when done, hand it off when stopped."""
        index = lease.range_index
        assert index is not None
        span = self.main.ranges[index]
        checkpoint = self.store.load_checkpoint(self.table, self.run_id, index)
        if checkpoint is not None and checkpoint.state == RunState.STAGED.value:
            self.store.release_lease(lease)  # a redelivery after the range was staged: try finishing
            return RangeResult(RangeOutcome.STAGED, self.table, self.run_id, index)
        base = checkpoint or self.main.evolve(
            ranges=(), range=span, finished=(), in_progress=None, invocations=0, timings={}
        )
        manifest = self.store.get_manifest(self.table, self.run_id)
        with tempfile.TemporaryDirectory(prefix="pgsnow-") as work_dir:
            invocation = self._invocation(lease, Path(work_dir))
            schema = schema_as_started(invocation, manifest)
            row_filter, filter_params = run_filter(invocation.options, base.lower_cursor)
            run = _RangeRun.open(
                invocation, schema, base.evolve(invocations=base.invocations + 1), row_filter, filter_params
            )
            held[0] = run.lease
            before = len(base.files)
            complete = stage_chunks(run)
            held[0] = run.lease
            timings = dict(run.checkpoint.timings)
            timings["extract_s"] = round(timings.get("extract_s", 0.0) + time.monotonic() - started, 3)
            staged_now = run.checkpoint.files[before:]
            files, rows = len(staged_now), sum(f.rows for f in staged_now)
            size = sum(f.bytes for f in staged_now)
            if not complete:
                run.save(run.checkpoint.evolve(timings=timings))
                self.store.hand_off_lease(run.lease, ttl_s=self.deadline.lease_ttl_s())
                logger.info(
                    "range stopped before the deadline; it continues in a new delivery",
                    extra={"run_id": self.run_id, "table": self.table.qualified, "range": index},
                )
                return RangeResult(RangeOutcome.STOPPED, self.table, self.run_id, index, files, rows, size)
            run.save(run.checkpoint.evolve(state=RunState.STAGED.value, timings=timings))
            self.store.release_lease(run.lease)
        logger.info(
            "range staged",
            extra={
                "run_id": self.run_id,
                "table": self.table.qualified,
                "range": index,
                "files": files,
                "rows": rows,
            },
        )
        return RangeResult(RangeOutcome.STAGED, self.table, self.run_id, index, files, rows, size)

    def finish_if_last(self) -> RunManifest | None:
        """Finish the run if every range is staged and this worker wins the table's lease."""
        # Last range first, stopping at the first one not staged: ranges are sent in key order,
        # so a worker that is not the last one usually stops after a read or two.
        staged: list[RunCheckpoint] = []
        for span in reversed(self.main.ranges):
            checkpoint = self.store.load_checkpoint(self.table, self.run_id, span.index)
            if checkpoint is None or checkpoint.state != RunState.STAGED.value:
                return None
            staged.insert(0, checkpoint)
        lease = self.store.take_over_from_ranges(
            self.table, self.run_id, owner=self.owner, ttl_s=self.deadline.lease_ttl_s()
        )
        if lease is None:
            return None  # another worker is finishing the run
        try:
            with (
                self.failure_recorded(lease) as held,
                tempfile.TemporaryDirectory(prefix="pgsnow-") as work_dir,
            ):
                invocation = self._invocation(lease, Path(work_dir))
                manifest = self.store.get_manifest(self.table, self.run_id)
                schema = schema_as_started(invocation, manifest)
                timings = {"extract_s": round(sum(c.timings.get("extract_s", 0.0) for c in staged), 3)}
                chunks = tuple(chunk for c in staged for chunk in c.finished)
                row_filter, filter_params = run_filter(invocation.options, self.main.lower_cursor)
                run = ExtractionRun.open(
                    invocation,
                    schema,
                    self.main.evolve(finished=chunks, in_progress=None, timings=timings),
                    row_filter,
                    filter_params,
                )
                held[0] = run.lease
                result = finish_run(run, manifest, timings, self.now)
        finally:
            end_snapshot(self.pg_conn)
        logger.info(
            "staged table",
            extra={
                "run_id": self.run_id,
                "table": self.table.qualified,
                "rows": result.total_rows,
                "files": len(result.files),
                "ranges": len(staged),
                "write_mode": result.write_mode,
            },
        )
        return result

    @contextmanager
    def failure_recorded(self, lease: Lease) -> Iterator[list[Lease]]:
        """Yields a one-item list holding the lease as it is renewed. On an error: a retryable one
        hands the lease off (the range or the finishing is resumed by the next delivery); any
        other fails the whole run (manifest ``failed``, the table freed). The error propagates."""
        held = [lease]
        try:
            yield held
        except Exception as exc:
            error: Exception = exc
            if isinstance(exc, psycopg2.Error):
                error = classify_pg_error(exc, table=self.table.qualified, run_id=self.run_id)
            elif isinstance(exc, PgSnowError):
                exc.table = exc.table or self.table.qualified
                exc.run_id = exc.run_id or self.run_id
            self._record_failure(held[0], error)
            if error is exc:
                raise
            raise error from exc

    def _record_failure(self, lease: Lease, error: Exception) -> None:
        context = {"run_id": self.run_id, "table": self.table.qualified, "error": type(error).__name__}
        try:
            if isinstance(error, LeaseLostError):
                return
            # Every checkpoint save renewed the lease: its latest version is the one to rewrite.
            current = self.store.current_lease(self.table, run_id=self.run_id, range_index=lease.range_index)
            if current is None or current.owner != self.owner:
                return  # taken over meanwhile: not ours to hand off or release
            lease = current
            if isinstance(error, PgSnowError) and error.retryable:
                self.store.hand_off_lease(lease, ttl_s=0)
                logger.warning("range interrupted; the next delivery resumes it", extra=context)
                return
            manifest = self.store.get_manifest(self.table, self.run_id)
            self.store.put_manifest(
                manifest.with_state(
                    RunState.FAILED, finished_at=utc_iso(self.now()), error=str(error).splitlines()[0][:500]
                )
            )
            self.store.save_checkpoint(self.main.evolve(state=RunState.FAILED.value))
            self.store.release_lease(lease)
            if lease.range_index is not None:
                table_lease = self.store.take_over_from_ranges(
                    self.table, self.run_id, owner=self.owner, ttl_s=0
                )
                if table_lease is not None:
                    self.store.release_lease(table_lease)
        except PgSnowError as put_error:
            logger.warning("could not record the failure", extra={**context, "put_error": put_error.message})
            return
        logger.error("extraction failed; manifest marked failed", extra=context)


def _skipped(table: TableRef, run_id: str, index: int, reason: str) -> RangeResult:
    logger.info(
        "range skipped", extra={"run_id": run_id, "table": table.qualified, "range": index, "reason": reason}
    )
    return RangeResult(RangeOutcome.SKIPPED, table, run_id, index)
