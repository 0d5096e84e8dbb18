"""One scheduled change-capture run: drain the slot to a bound, stage, make it durable, then confirm.

``drain_slot`` is the whole run (docs/extraction.md, "Change capture runs"):

1. **Check the slot** (``pgsnow.cdc.slot.check_slot``): missing or invalidated (``wal_status =
   'lost'``, or ``invalidation_reason`` on PostgreSQL 16+) is ``SlotLostError`` (permanent) naming the
   tables and the command that re-snapshots them; nothing restarts from zero silently. A slot another
   consumer holds (``active``) ends the run cleanly: ``{"skipped": "slot busy"}``.
2. **Heartbeat**: ``pg_logical_emit_message(true, 'pgsnow.heartbeat', {run_id, at})`` (or, with
   CDC_HEARTBEAT=table, an upsert of CDC_HEARTBEAT_TABLE's one row, for PostgreSQL < 14). Its LSN
   is the run's end bound, and every run writes one, so an idle publication's slot still advances.
3. **Read** the slot (``pgsnow.cdc.reader``) up to the heartbeat, CDC_MAX_MB (at a commit) or the
   deadline (the Lambda's remaining time less EXTRACT_DEADLINE_MARGIN_S, which leaves the time to
   stage and upload), into per-table spill files.
4. **Repair** what a previous run left: a run that did not finish, or finished its S3 work but
   never got its confirmation to the slot (the slot's position is behind the state's), is
   superseded: its manifests that were not loaded are marked ``failed`` and this run re-stages the
   same changes with the same ``after_lsn``. Then the state records this run, unfinished.
5. **Stage** each table's segments (``pgsnow.cdc.stage``) to local files; write each table's
   manifest (mode ``cdc``, ``staged``, complete file list, ``ChangeRange``) **before** its files.
6. **Upload** the files, answering the server's keep-alives meanwhile without moving the position.
7. **State**: confirmed position, finished, each table's last end.
8. **Only then confirm** the end to the slot; then check that the slot's ``confirmed_flush_lsn``
   reached it (a lost confirmation only makes the next run replay, never lose).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from aws_lambda_powertools.metrics import MetricUnit
from psycopg2 import sql

from pgsnow.cdc.reader import (
    HEARTBEAT_PREFIX,
    DrainedStream,
    ReplicationSession,
    SlotBusyError,
    SpilledChanges,
    open_stream,
)
from pgsnow.cdc.slot import SlotLostError, check_slot, resnapshot_command, slot_health
from pgsnow.cdc.spilled_csv import EarlyCompression
from pgsnow.cdc.stage import StagedSegment, connect_for_staging, stage_table, upload_files
from pgsnow.changes import ChangeRange, format_lsn, parse_lsn
from pgsnow.config import ExtractMode, HeartbeatMethod, Settings, StagedFormat, WriteMode
from pgsnow.errors import PermanentError
from pgsnow.extract.plan import choose_file_format
from pgsnow.extract.schema_drift import kept_numeric_scales
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, new_run_id
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger, record_table_metric
from pgsnow.postgres import Connection, classify_pg_error, connect, describe_table
from pgsnow.postgres_setup import cdc_tables
from pgsnow.runs import DrainState, RunStore
from pgsnow.streamed_upload import StreamedUploads
from pgsnow.timestamps import utc_iso

# Without a Lambda deadline (CLI, tests) a run reads until its heartbeat or byte budget.
NO_DEADLINE_S = 365 * 24 * 3600.0
SKIPPED_BUSY = {"skipped": "slot busy"}
# How often the replication connection answers the server while the run stages and uploads.
KEEP_ALIVE_EVERY_S = 10.0
# Tables staged and uploaded at once (``_stage_and_upload``): two cores' worth of compression, plus
# room for uploads waiting on the network.
STAGE_WORKERS = 4


def connect_control(dsn: str) -> Connection:
    """An autocommit connection (the extractor's session settings) for the slot's catalog rows and
    the heartbeat, which must commit at once."""
    conn = connect(dsn)
    conn.set_session(readonly=False, autocommit=True)
    return conn


@dataclass(frozen=True)
class HeartbeatBound:
    """Where this run's read ends: at the heartbeat message at ``lsn`` (and its commit), or, for a
    heartbeat table, at the first commit at or after ``lsn`` (``at_commit``)."""

    lsn: int
    at_commit: bool = False


def emit_heartbeat(conn: Connection, settings: Settings, run_id: str, at: datetime) -> HeartbeatBound:
    """Write this run's heartbeat; its position is the run's end bound."""
    content = json.dumps({"run_id": run_id, "at": utc_iso(at)}, separators=(",", ":"))
    with conn.cursor() as cur:
        if settings.cdc.heartbeat is HeartbeatMethod.MESSAGE:
            # Transactional: its commit flushes the WAL at once, so the walsender sends it right away
            # (a non-transactional message waits for the WAL writer's next flush, up to about
            # 3 x wal_writer_delay on an idle server, and may not be sent within a short read).
            cur.execute("SELECT pg_logical_emit_message(true, %s, %s)::text", (HEARTBEAT_PREFIX, content))
            found = cur.fetchone()
            assert found is not None  # a SELECT of one expression returns one row
            return HeartbeatBound(parse_lsn(str(found[0])))
        # PostgreSQL < 14 has no logical messages in pgoutput: the slot's row of the heartbeat table
        # (in the publication; `pgsnow postgres-sql` creates it, keyed by slot) is written. The WAL position read inside its transaction, before the commit,
        # precedes that commit, so the first commit at or after it ends the read: by then every
        # transaction that committed before the heartbeat has been received.
        heartbeat = TableRef.parse(settings.cdc.heartbeat_table)
        cur.execute("BEGIN")
        try:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (slot, beat_at, run_id) VALUES (%s, %s, %s) "
                    "ON CONFLICT (slot) DO UPDATE SET beat_at = EXCLUDED.beat_at, run_id = EXCLUDED.run_id"
                ).format(sql.Identifier(heartbeat.schema, heartbeat.table)),
                (settings.cdc.slot, at, run_id),
            )
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            found = cur.fetchone()
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
    assert found is not None  # a SELECT of one expression returns one row
    return HeartbeatBound(parse_lsn(str(found[0])), at_commit=True)


def heartbeat_lag_s(last_heartbeat: str | None, now: datetime) -> float | None:
    """Seconds from the newest heartbeat the slot delivered (its ``at``, as ``emit_heartbeat`` wrote
    it; the drain state's ``last_heartbeat``) to now: how far the drain runs behind. None when there
    is none or it cannot be read (``pgsnow status`` shows what it can). The run's outcome and metric
    and ``pgsnow status`` all measure it here."""
    if not last_heartbeat:
        return None
    try:
        at = datetime.fromisoformat(str(json.loads(last_heartbeat)["at"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # utc_iso writes an offset; a time without one is UTC too
    return round((now - at).total_seconds(), 3)


def drain_slot(
    settings: Settings,
    *,
    dsn: str,
    s3: Any,
    remaining_ms: Callable[[], int] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    work_dir: Path | None = None,
    before_confirm: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Drain ``settings.cdc.slot`` once (module docstring); returns the outcome (also logged).

    ``before_confirm`` is called after the state is written and before the slot is confirmed
    (the fault tests' seam: raising there is dying before the confirmation); ``clock`` is the
    reader's deadline clock (``time.monotonic``; a test's own cuts a read where it wants). Raises
    PermanentError for a missing/invalidated slot or data Snowflake cannot hold, RetryableError
    for transient failures; either way nothing is confirmed and the next run replays.
    """
    slot = settings.cdc.slot
    tables = cdc_tables(settings)
    started_at = now()
    run_id = new_run_id(started_at)
    control = connect_control(dsn)
    try:
        health = check_slot(control, slot, tables, run_id=run_id)
        try:
            if health.active:
                return _skipped_busy(slot, run_id)
            heartbeat = emit_heartbeat(control, settings, run_id, started_at)
        except psycopg2.Error as exc:
            raise classify_pg_error(exc, run_id=run_id) from exc
        with tempfile.TemporaryDirectory(prefix="pgsnow-cdc-", dir=work_dir) as scratch:
            outcome = _drain(
                settings,
                dsn=dsn,
                s3=s3,
                control=control,
                tables=tables,
                run_id=run_id,
                started_at=started_at,
                heartbeat=heartbeat,
                deadline=_deadline(settings, remaining_ms, clock),
                scratch=Path(scratch),
                now=now,
                before_confirm=before_confirm,
                clock=clock,
            )
    except SlotLostError:
        # The reader's checks (before and after it takes the slot, and at the confirmation) too.
        _report_lost(slot, run_id)
        raise
    finally:
        control.close()
    logger.info("change capture run", extra=outcome)
    return outcome


def _skipped_busy(slot: str, run_id: str) -> dict[str, Any]:
    """The outcome of a run that found another consumer on the slot: it exits cleanly, reading nothing."""
    logger.info("slot busy: another invocation is draining it", extra={"slot": slot, "run_id": run_id})
    return dict(SKIPPED_BUSY)


def _report_lost(slot: str, run_id: str) -> None:
    """The SlotLost metric (1) that the SlotLostAlarm watches: the run's error alone would only
    count as one more failed run, but a lost slot needs a person (``pgsnow cdc resnapshot``)."""
    logger.error("the change-capture slot is lost", extra={"slot": slot, "run_id": run_id})
    record_table_metric("SlotLost", None, 1)


def _deadline(
    settings: Settings, remaining_ms: Callable[[], int] | None, clock: Callable[[], float]
) -> float:
    """When reading must stop (on ``clock``): the Lambda's deadline less the margin that staging and
    uploading what was read needs (EXTRACT_DEADLINE_MARGIN_S)."""
    end = (
        NO_DEADLINE_S if remaining_ms is None else remaining_ms() / 1000 - settings.extract.deadline_margin_s
    )
    return clock() + end


def _drain(
    settings: Settings,
    *,
    dsn: str,
    s3: Any,
    control: Connection,
    tables: list[TableRef],
    run_id: str,
    started_at: datetime,
    heartbeat: HeartbeatBound,
    deadline: float,
    scratch: Path,
    now: Callable[[], datetime],
    before_confirm: Callable[[], None] | None,
    clock: Callable[[], float],
) -> dict[str, Any]:
    slot = settings.cdc.slot
    store = RunStore(s3, settings.bucket)
    spill_dir = scratch / "spill"
    spill_dir.mkdir()
    phases = _PhaseClock()
    try:
        session = open_stream(dsn, slot=slot, publication=settings.cdc.publication, tables=tables)
    except SlotBusyError:
        return _skipped_busy(slot, run_id)
    phases.lap("open")
    early = _early_compression(settings, tables, scratch, s3, run_id)
    try:
        try:
            stream = session.read(
                heartbeat_lsn=None if heartbeat.at_commit else heartbeat.lsn,
                heartbeat_commit_lsn=heartbeat.lsn if heartbeat.at_commit else None,
                tables=tables,
                max_bytes=settings.cdc.max_bytes,
                deadline=deadline,
                spill_dir=spill_dir,
                heartbeat_prefix=HEARTBEAT_PREFIX,
                clock=clock,
                on_final=early.final_rows if early is not None else None,
            )
        except SlotBusyError:
            return _skipped_busy(slot, run_id)
        phases.lap("read")
        with KeptAlive(session):
            staged = _make_durable(
                settings,
                dsn=dsn,
                s3=s3,
                store=store,
                stream=stream,
                run_id=run_id,
                started_at=started_at,
                scratch=scratch,
                now=now,
                tables=tables,
                early=early,
            )
        phases.lap("stage_and_upload")
        if before_confirm is not None:
            before_confirm()
        # Only now: every file, manifest and the state are durable in S3.
        session.confirm(stream.end_lsn)
        phases.lap("confirm")
    finally:
        if early is not None:
            early.close()  # also aborts what a failed run streamed and did not complete
        session.close()
    return _report(
        control, settings, run_id=run_id, stream=stream, staged=staged, finished=now(), phases=phases.seconds
    )


def _early_compression(
    settings: Settings, tables: list[TableRef], scratch: Path, s3: Any, run_id: str
) -> EarlyCompression | None:
    """Compression of staged-text spills during the read (``pgsnow.cdc.spilled_csv``), for the
    tables whose runs stage CSV as spilled: CSV configured, and no EXTRACT_BATCH_ROWS cap. Files
    that grow past a part are uploaded as they are compressed (``pgsnow.streamed_upload``), to the
    keys staging gives them, and completed after their run's manifest."""
    if settings.batch_rows is not None:
        return None
    csv_tables = {
        (t.schema, t.table)
        for t in tables
        if (settings.table_options(t).file_format or settings.file_format) is StagedFormat.CSV
    }
    if not csv_tables:
        return None
    return EarlyCompression(
        scratch / "early",
        settings.extract.target_file_mb * 1024 * 1024,
        tables=csv_tables,
        uploads=StreamedUploads(s3, settings.bucket, run_id=run_id),
        key_for=lambda schema, table, batch: data_key(
            settings.prefix, TableRef(schema, table), batch, run_id, FileFormat.CSV
        ),
    )


class _PhaseClock:
    """Wall seconds per phase of a run, in the outcome: where a slow drain spends its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


class KeptAlive:
    """Answers the walsender every ``every_s`` seconds (a status update that moves nothing) from a
    thread while the run stages and uploads: the server ends a replication connection that has not
    replied for wal_sender_timeout (60 s by default), counted from the last reply *while reading*,
    and staging one large table can take longer than that. A failed keep-alive is raised on exit."""

    def __init__(self, session: ReplicationSession, every_s: float = KEEP_ALIVE_EVERY_S) -> None:
        self._session = session
        self._every_s = every_s
        self._stop = threading.Event()
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="pgsnow-keep-alive", daemon=True)

    def __enter__(self) -> KeptAlive:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._failure and exc_info[0] is None:
            raise self._failure[0]

    def _run(self) -> None:
        while True:
            try:
                self._session.keep_alive()
            except BaseException as exc:  # the connection is gone: the confirmation would fail too
                self._failure.append(exc)
                return
            if self._stop.wait(self._every_s):
                return


def _make_durable(
    settings: Settings,
    *,
    dsn: str,
    s3: Any,
    store: RunStore,
    stream: DrainedStream,
    run_id: str,
    started_at: datetime,
    scratch: Path,
    now: Callable[[], datetime],
    tables: list[TableRef],
    early: EarlyCompression | None = None,
) -> dict[TableRef, StagedSegment]:
    """Steps 4-7: repair, state started, stage, manifests then files, state finished."""
    state = _repair(store, settings, tables, run_id, stream.start_lsn)
    state = store.save_drain_state(replace(state, last_run_id=run_id, last_run_finished=False), run_id=run_id)
    staged = _stage_and_upload(
        settings,
        dsn=dsn,
        s3=s3,
        store=store,
        stream=stream,
        state=state,
        run_id=run_id,
        started_at=started_at,
        scratch=scratch,
        now=now,
        early=early,
    )
    state = store.save_drain_state(
        replace(
            state,
            confirmed_lsn=stream.end_lsn,
            last_run_finished=True,
            tables={**state.tables, **{table.qualified: stream.end_lsn for table in staged}},
            last_heartbeat=stream.last_heartbeat or state.last_heartbeat,
            confirmed_at=utc_iso(now()),
        ),
        run_id=run_id,
    )
    return staged


def _repair(
    store: RunStore, settings: Settings, tables: list[TableRef], run_id: str, start_lsn: int
) -> DrainState:
    """The slot's drain state, with a previous run that never got its position confirmed undone."""
    slot = settings.cdc.slot
    state = store.load_drain_state(slot)
    if state is None:
        return DrainState(slot=slot, confirmed_lsn=start_lsn)
    lost_confirmation = state.last_run_finished and start_lsn < state.confirmed_lsn
    if start_lsn > state.confirmed_lsn:
        logger.warning(
            "the slot is ahead of the position pgsnow confirmed: something else consumed or advanced it; "
            f"changes in between may be missing: re-snapshot with `{resnapshot_command(slot, tables)}`",
            extra={
                "slot": slot,
                "run_id": run_id,
                "confirmed_lsn": format_lsn(state.confirmed_lsn),
                "slot_lsn": format_lsn(start_lsn),
            },
        )
    if state.last_run_id is None or (state.last_run_finished and not lost_confirmation):
        return state
    dead = state.last_run_id
    restored = supersede_run(store, slot, tables, dead, run_id)
    logger.warning(
        "the previous change capture run died before confirming; its changes are re-read",
        extra={"slot": slot, "run_id": run_id, "superseded_run_id": dead, "tables": sorted(restored)},
    )
    # Only the tables the state still chains: a table without an entry chains from 0 anyway (a dead
    # run's after_lsn of a table the state did not have is 0), and one whose entry `pgsnow cdc
    # resnapshot` dropped must start a new chain, not continue the dead run's across the gap.
    chained = {name: lsn for name, lsn in restored.items() if name in state.tables}
    return replace(state, confirmed_lsn=start_lsn, tables={**state.tables, **chained})


def supersede_run(
    store: RunStore, slot: str, tables: list[TableRef], dead_run_id: str, run_id: str
) -> dict[str, int]:
    """Mark the manifests of ``dead_run_id`` (a run that died before confirming) ``failed`` unless
    already loaded; returns each of its tables' ``after_lsn`` (where the re-read run chains from)."""
    restored: dict[str, int] = {}
    error = f"superseded: the run died before confirming; run {run_id} re-read its changes"
    for table in tables:
        base = store.read_manifest_for_update(table, dead_run_id)
        if base is None or base.manifest.changes is None or base.manifest.changes.slot != slot:
            continue
        restored[table.qualified] = base.manifest.changes.after_lsn
        if base.manifest.state in {RunState.LOADED, RunState.FAILED}:
            continue  # a loaded run's changes are applied; the re-read run's are then a no-op up to its end
        failed = base.manifest.with_state(
            RunState.FAILED, error=error, finished_at=utc_iso(datetime.now(UTC))
        )
        if not store.write_manifest_if_unchanged(base, failed):
            logger.warning(
                "the superseded run's manifest changed meanwhile (the loader settled it); left as it is",
                extra={"table": table.qualified, "run_id": dead_run_id},
            )
    return restored


def _stage_and_upload(
    settings: Settings,
    *,
    dsn: str,
    s3: Any,
    store: RunStore,
    stream: DrainedStream,
    state: DrainState,
    run_id: str,
    started_at: datetime,
    scratch: Path,
    now: Callable[[], datetime],
    early: EarlyCompression | None = None,
) -> dict[TableRef, StagedSegment]:
    """Per table: stage its segments locally, then write its manifest, then upload its files.

    Tables are independent (each its own manifest and chain), so they go through STAGE_WORKERS
    threads at once, each with its own staging connection: compressing (which releases the GIL),
    PostgreSQL's round trip and the uploads of different tables overlap. Each table's manifest is
    still written before its files. A failure fails the run (the others finish first); nothing is
    confirmed, and the next run supersedes this one's manifests (``_repair``).
    """
    by_table: dict[TableRef, list[SpilledChanges]] = {}
    for segment in stream.segments:
        by_table.setdefault(segment.table, []).append(segment)
    connections = _StagingConnections(dsn, settings.postgres.statement_timeout_ms)

    def stage_one(table: TableRef, segments: list[SpilledChanges]) -> StagedSegment:
        pg_conn = connections.get()
        options = settings.table_options(table)
        published = store.load_published_columns(table)
        kept = kept_numeric_scales(published, options)
        nullable = _source_nullable(pg_conn, table)
        # auto: as full runs decide, by rows (here: the run's changes of the table).
        file_format = choose_file_format(
            options.file_format or settings.file_format, sum(s.rows for s in segments)
        )
        result = stage_table(
            pg_conn,
            segments,
            run_id=run_id,
            prefix=settings.prefix,
            file_format=file_format,
            value_policy=options.value_policy,
            target_file_mb=settings.extract.target_file_mb,
            work_dir=scratch,
            batch_rows=settings.batch_rows,
            kept_scales=kept,
            source_nullable=nullable,
            early=early,
        )
        for segment in segments:  # staged: its spill is no longer needed (Lambda's /tmp is finite)
            segment.path.unlink(missing_ok=True)
        changes = ChangeRange(
            slot=settings.cdc.slot,
            # The table's previous change run's end; lower only when the slot went back further
            # (a server crash loses positions confirmed since its last checkpoint): the run
            # then holds every change after its start, and says so.
            after_lsn=min(state.tables.get(table.qualified, 0), stream.start_lsn),
            end_lsn=stream.end_lsn,
            first_commit_lsn=segments[0].first_commit_lsn,
            last_commit_lsn=segments[-1].last_commit_lsn,
        )
        manifest = RunManifest(
            run_id=run_id,
            table=table,
            mode=ExtractMode.CDC.value,
            file_format=file_format,
            columns=result.columns,
            primary_key=result.primary_key,
            state=RunState.STAGED,
            started_at=utc_iso(started_at),
            finished_at=utc_iso(now()),
            files=tuple(f.staged_file() for f in result.files),
            write_mode=WriteMode.MERGE.value,
            deletes=options.deletes.value,
            warnings=result.warnings,
            changes=changes,
        )
        # The manifest first: any file's S3 event then finds it, complete.
        store.put_manifest(manifest)
        upload_files(s3, settings.bucket, result.files, run_id=run_id)
        _publish_columns(store, manifest)
        return result

    try:
        with ThreadPoolExecutor(max_workers=STAGE_WORKERS, thread_name_prefix="pgsnow-stage") as pool:
            futures = {table: pool.submit(stage_one, table, segments) for table, segments in by_table.items()}
            return {table: future.result() for table, future in futures.items()}
    finally:
        connections.close()


class _StagingConnections:
    """One staging connection per worker thread (a psycopg2 connection serves one thread at a time)."""

    def __init__(self, dsn: str, statement_timeout_ms: int) -> None:
        self._dsn = dsn
        self._statement_timeout_ms = statement_timeout_ms
        self._local = threading.local()
        self._opened: list[Connection] = []
        self._lock = threading.Lock()

    def get(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_for_staging(self._dsn, statement_timeout_ms=self._statement_timeout_ms)
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()


def _source_nullable(pg_conn: Connection, table: TableRef) -> dict[str, bool]:
    """The source table's columns' nullability now; empty when it is gone (dropped since)."""
    try:
        return {c.name: c.nullable for c in describe_table(pg_conn, table).columns}
    except PermanentError:
        return {}
    finally:
        pg_conn.rollback()


def _publish_columns(store: RunStore, manifest: RunManifest) -> None:
    """The run's columns become the table's published ones: the NUMBER scale given to an unbounded
    numeric column is then kept by the next runs (Snowflake cannot change it)."""
    from pgsnow.checkpoint import PublishedColumns

    store.save_published_columns(manifest.table, PublishedColumns(manifest.run_id, manifest.columns))


def _report(
    control: Connection,
    settings: Settings,
    *,
    run_id: str,
    stream: DrainedStream,
    staged: dict[TableRef, StagedSegment],
    finished: datetime,
    phases: dict[str, float],
) -> dict[str, Any]:
    slot = settings.cdc.slot
    # One read of the slot's row: whether the confirmation reached it, and the WAL it still pins.
    health = slot_health(control, slot)
    confirmed = (health.confirmed_flush_lsn or 0) >= stream.end_lsn
    if not confirmed:
        logger.warning(
            "the slot's confirmed position did not reach the run's end: the next run replays these changes",
            extra={
                "slot": slot,
                "run_id": run_id,
                "end_lsn": format_lsn(stream.end_lsn),
                "confirmed_flush_lsn": None
                if health.confirmed_flush_lsn is None
                else format_lsn(health.confirmed_flush_lsn),
            },
        )
    retained = health.retained_wal_bytes
    lag = heartbeat_lag_s(stream.last_heartbeat, finished)
    per_table = {t.qualified: s.rows for t, s in staged.items()}
    files = sum(len(s.files) for s in staged.values())
    staged_bytes = sum(s.bytes for s in staged.values())
    for table, result in staged.items():
        record_table_metric("ChangesStaged", table.qualified, result.rows)
        record_table_metric("ChangeBytesStaged", table.qualified, result.bytes, MetricUnit.Bytes)
    if retained is not None:
        record_table_metric("RetainedWalBytes", None, retained, MetricUnit.Bytes)
    if lag is not None:
        record_table_metric("ReplicationLagSeconds", None, lag, MetricUnit.Seconds)
    return {
        "slot": slot,
        "run_id": run_id,
        "start_lsn": format_lsn(stream.start_lsn),
        "end_lsn": format_lsn(stream.end_lsn),
        "stop_reason": stream.stop_reason,
        "phase_seconds": phases,
        "transactions": stream.transactions,
        "changes": stream.changes,
        "tables": per_table,
        "files": files,
        "bytes": staged_bytes,
        "confirmed": confirmed,
        "retained_wal_bytes": retained,
        "heartbeat_lag_s": lag,
    }
