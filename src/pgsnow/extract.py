"""Extraction of one table: PostgreSQL -> staged files in S3 + the run manifest (docs/extraction.md).

A run is ``full`` (every row) or ``incremental`` (rows whose cursor column is ``>=`` the stored
watermark minus the lookback; the first run is a backfill). It is split into chunks by key
range (the primary key; ``(cursor, primary key)`` when incremental), read with keyset paging,
each chunk's end fixed before it is read. After every file the run's checkpoint is saved in
S3, so an invocation that stops (the Lambda deadline is near) or dies is resumed after its
last staged file, with the same keys: batch ``chunk * 10000 + n`` for the chunk's n-th file.
One invocation at a time extracts a table: it holds the table's lease (pgsnow.checkpoint).

Order of work: allowlist check (before any SQL or S3); lease; for incremental runs the safe
point; describe the table (one read-only REPEATABLE READ snapshot per invocation); check
every value fits (policy ``fail``); manifest ``extracting``; chunks and files; the key list
when deletes are tracked; manifest ``staged``; watermark; lease released.

S3_FILE_FORMAT=auto: CSV up to AUTO_PARQUET_ABOVE_ROWS estimated rows (the planner's estimate
of the run's range), Parquet above; a never-analysed table (no estimate) gets CSV.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pyarrow as pa
from psycopg2 import sql

from pgsnow.checkpoint import (
    ChunkRecord,
    Lease,
    LeaseLostError,
    PublishedColumns,
    RunCheckpoint,
    Watermark,
)
from pgsnow.config import (
    DeleteMode,
    ExtractMode,
    Settings,
    StagedFormat,
    TableOptions,
    ValuePolicy,
    WriteMode,
)
from pgsnow.csv_records import csv_fields_at, parse_csv_record
from pgsnow.errors import PermanentError, PgSnowError
from pgsnow.formats import (
    CopyPipe,
    CsvBatchSplitter,
    ParquetWriter,
    WrittenFile,
    open_arrow_csv,
)
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, new_run_id
from pgsnow.manifest import Column, RunManifest, RunState, StagedFile
from pgsnow.observability import logger
from pgsnow.postgres import (
    Connection,
    RowRange,
    TableReader,
    TableSchema,
    check_values_fit,
    choose_numeric_scales,
    classify_pg_error,
    csv_select,
    describe_table,
    estimate_rows,
    next_chunk_end,
    read_safe_point,
    with_numeric_scales,
)
from pgsnow.runs import RunStore
from pgsnow.schema_evolution import existing_from_published, plan_table_changes
from pgsnow.staging import put_data_file
from pgsnow.typemap import ValueKind

AUTO_PARQUET_ABOVE_ROWS = 100_000
# Rows per Parquet row group (held in Arrow until written): bounds memory. On the benchmark's
# 2M-row table 20K rows peaked at 207 MB RSS, 50K at 246 MB, at the same speed.
PARQUET_CHUNK_ROWS = 20_000
# A row group is also cut once the rows waiting for it hold this many bytes in Arrow: rows of large
# values then never pile up into one group (a group is held while it is encoded).
PARQUET_GROUP_BYTES = 64 * 1024 * 1024
# Batch numbers are chunk * FILES_PER_CHUNK + n: a chunk may hold up to 9999 files.
FILES_PER_CHUNK = 10_000
# Without a Lambda context (CLI, tests) a lease lasts this long unless renewed.
DEFAULT_LEASE_S = 16 * 60
_TIME_CURSOR_TYPES = {
    ValueKind.TIMESTAMPTZ: "timestamptz",
    ValueKind.TIMESTAMP: "timestamp",
    ValueKind.DATE: "date",
}
_CURSOR_KINDS = {*_TIME_CURSOR_TYPES, ValueKind.INTEGER, ValueKind.DECIMAL}


def choose_file_format(configured: StagedFormat, estimated_rows: int | None) -> FileFormat:
    """Resolve S3_FILE_FORMAT, including ``auto``, to the format of this run's files."""
    if configured is StagedFormat.PARQUET:
        return FileFormat.PARQUET
    if configured is StagedFormat.CSV:
        return FileFormat.CSV
    if estimated_rows is not None and estimated_rows > AUTO_PARQUET_ABOVE_ROWS:
        return FileFormat.PARQUET
    return FileFormat.CSV


def batch_number(chunk: int, file_in_chunk: int) -> int:
    """The batch of a chunk's n-th file (n from 1): the same (run, chunk, n) always gets the same key."""
    if not 1 <= file_in_chunk < FILES_PER_CHUNK:
        raise PermanentError(
            f"chunk {chunk} would need more than {FILES_PER_CHUNK - 1} files: "
            "lower EXTRACT_CHUNK_ROWS or raise EXTRACT_TARGET_FILE_MB / EXTRACT_BATCH_ROWS"
        )
    return chunk * FILES_PER_CHUNK + file_in_chunk


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _StopForDeadline(Exception):
    """Raised after a staged file when the deadline is near; aborts the COPY/cursor in progress."""


@dataclass(frozen=True)
class Deadline:
    """When to stop: ``remaining_ms`` (the Lambda context's) below ``margin_s``; never without one."""

    remaining_ms: Callable[[], int] | None = None
    margin_s: float = 60

    def near(self) -> bool:
        return self.remaining_ms is not None and self.remaining_ms() < self.margin_s * 1000

    def lease_ttl_s(self) -> float:
        if self.remaining_ms is None:
            return DEFAULT_LEASE_S
        return self.remaining_ms() / 1000 + 60  # a dead holder's lease outlives its deadline by a minute


@dataclass
class _Run:
    """What one invocation works with (mutable: the checkpoint advances file by file)."""

    settings: Settings
    s3: Any
    store: RunStore
    pg_conn: Connection
    table: TableRef
    options: TableOptions
    schema: TableSchema
    checkpoint: RunCheckpoint
    lease: Lease
    deadline: Deadline
    work_dir: Path
    run_filter: sql.Composable | None = None
    filter_params: tuple[Any, ...] = ()
    staged_this_invocation: int = 0
    uploaded: list[StagedFile] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.checkpoint.run_id

    def rows(self, after: tuple[str, ...] | None, through: tuple[str, ...] | None) -> RowRange:
        return RowRange(self.checkpoint.order_key, after, through, self.run_filter, self.filter_params)

    def save(self, checkpoint: RunCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.store.save_checkpoint(checkpoint)
        self.lease = self.store.renew_lease(self.lease, ttl_s=self.deadline.lease_ttl_s())


def _cursor_column(schema: TableSchema, options: TableOptions) -> str:
    name = options.cursor_column
    assert name is not None  # config refuses incremental without cursor_column
    if schema.relkind in _KEYLESS_RELATIONS:
        raise PermanentError(
            f"incremental extraction of {schema.table.qualified} needs a primary key (the keyset "
            f"tie-breaker and the merge key); a {_RELATION_KINDS[schema.relkind]} has none: "
            "use mode full (replace, the default)",
            table=schema.table.qualified,
        )
    column = next((c for c in schema.columns if c.name == name), None)
    where = f"{schema.table.qualified}.{name}"
    if column is None:
        raise PermanentError(f"cursor column {where} does not exist", table=schema.table.qualified)
    if column.kind not in _CURSOR_KINDS:
        raise PermanentError(
            f"cursor column {where} is {column.pg_type}; it must be a timestamp, date, integer or numeric",
            table=schema.table.qualified,
        )
    if column.nullable:
        raise PermanentError(
            f"cursor column {where} is nullable; rows with a NULL cursor could never be read incrementally "
            "(make it NOT NULL or use mode full)",
            table=schema.table.qualified,
        )
    if not schema.primary_key:
        raise PermanentError(
            f"incremental extraction of {schema.table.qualified} needs a primary key (the keyset tie-breaker)",
            table=schema.table.qualified,
        )
    return name


_RELATION_KINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
}
_KEYLESS_RELATIONS = {"v", "m", "f"}  # PostgreSQL cannot declare a primary key on these


def resolve_write_mode(schema: TableSchema, options: TableOptions) -> WriteMode:
    """The run's write mode (the table's choice, or its mode's default), refused before anything is
    staged when it cannot work on this table: merge and deletes match rows by the primary key."""
    write_mode = options.effective_write_mode
    table = schema.table.qualified
    kind = _RELATION_KINDS.get(schema.relkind, "relation")
    if write_mode is WriteMode.MERGE and not schema.primary_key:
        chosen = "chosen" if options.write_mode is not None else "the default of incremental mode"
        raise PermanentError(
            f"write_mode merge ({chosen}) needs a primary key to match rows by, and the {kind} {table} "
            'has none: use write_mode "replace" (the default of mode full), or add a primary key',
            table=table,
        )
    if options.deletes is not DeleteMode.NONE and not schema.primary_key:
        raise PermanentError(
            f"deletes={options.deletes.value} needs a primary key to find deleted rows, and the {kind} "
            f'{table} has none: use write_mode "replace" (a full run then reflects deleted rows)',
            table=table,
        )
    return write_mode


def _scalar(conn: Connection, query: sql.Composable, params: Sequence[Any]) -> str:
    with conn.cursor() as cur:
        cur.execute(query, tuple(params))
        row = cur.fetchone()
    assert row is not None
    return str(row[0])


def _lower_cursor(conn: Connection, kind: ValueKind, watermark: str, lookback_s: int) -> str:
    """The run's ``>=`` bound: the watermark minus the lookback (time cursors; numbers use the watermark)."""
    type_name = _TIME_CURSOR_TYPES.get(kind)
    if type_name is None or lookback_s == 0:
        return watermark
    query = sql.SQL("SELECT CAST(CAST(%s AS {0}) - make_interval(secs => %s) AS {0})::text").format(
        sql.SQL(type_name)
    )
    return _scalar(conn, query, (watermark, lookback_s))


def _watermark_after(run: _Run, kind: ValueKind) -> str | None:
    """min(highest cursor staged, safe point): never past what a still-open transaction could write."""
    checkpoint = run.checkpoint
    staged = [f for f in checkpoint.files if f.cursor_range is not None and f.rows > 0]
    if not staged:
        return checkpoint.watermark_before
    highest = staged[-1].cursor_range[1] if staged[-1].cursor_range else None
    type_name = _TIME_CURSOR_TYPES.get(kind)
    if highest is None or type_name is None or checkpoint.safe_point is None:
        return highest
    query = sql.SQL("SELECT least(CAST(%s AS {0}), CAST(CAST(%s AS timestamptz) AS {0}))::text").format(
        sql.SQL(type_name)
    )
    return _scalar(run.pg_conn, query, (highest, checkpoint.safe_point))


def _key_text(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else json.dumps(list(values))


class _FileRecorder:
    """Uploads each finished file, records it in the checkpoint, and stops when the deadline is near.

    A file is uploaded (and checkpointed) on a background thread while the next one is
    extracted, one upload at a time and in order: at most two files are on disk, and the
    checkpoint never lists a file before every earlier one. When the deadline is near the
    file is uploaded in the foreground and the chunk stops (``_StopForDeadline``). Call
    ``finish`` after the chunk's last file, ``abandon`` when the chunk fails.
    """

    def __init__(self, run: _Run, file_format: FileFormat, chunk_index: int) -> None:
        self.run = run
        self.file_format = file_format
        self.chunk_index = chunk_index
        schema = run.schema
        self._order_kinds = [schema.column(k).kind for k in run.checkpoint.order_key]
        self._key_positions: list[int] | None = None
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgsnow-upload")
        self._pending: Future[None] | None = None

    def record(
        self, written: WrittenFile, first: tuple[str, ...] | None, last: tuple[str, ...] | None
    ) -> None:
        self._wait()
        if self.run.deadline.near():
            self._stage(written, first, last)
            raise _StopForDeadline
        self._pending = self._uploads.submit(self._stage, written, first, last)

    def finish(self) -> None:
        """Wait for the last upload (raising its error); then stop if the deadline is near."""
        try:
            self._wait()
        finally:
            self._uploads.shutdown(wait=True)
        if self.run.staged_this_invocation and self.run.deadline.near():
            raise _StopForDeadline

    def abandon(self) -> None:
        """The chunk failed: let the upload in flight end (its own error, if any, is logged only)."""
        try:
            self._wait()
        except Exception as exc:  # the chunk's own error is the one that propagates
            logger.warning(
                "upload failed while the chunk was failing",
                extra={
                    "run_id": self.run.run_id,
                    "table": self.run.table.qualified,
                    "error": type(exc).__name__,
                },
            )
        finally:
            self._uploads.shutdown(wait=True)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def csv_order_key(self, header: bytes, record: bytes) -> tuple[str, ...]:
        """The order key of a CSV record, read back as PostgreSQL input text (only the key's fields
        are read: the record may hold a value of any size)."""
        if self._key_positions is None:
            names = parse_csv_record(header.decode("utf-8"))
            self._key_positions = [names.index(k) for k in self.run.checkpoint.order_key]
        if not self._key_positions:
            return ()
        texts = csv_fields_at(record, self._key_positions)
        return tuple(
            "\\x" + t if k is ValueKind.BINARY else t for t, k in zip(texts, self._order_kinds, strict=True)
        )

    def _stage(
        self, written: WrittenFile, first: tuple[str, ...] | None, last: tuple[str, ...] | None
    ) -> None:
        run = self.run
        key = data_key(run.settings.prefix, run.table, written.batch, run.run_id, self.file_format)
        started = time.monotonic()
        put_data_file(
            run.s3,
            run.settings.bucket,
            key,
            written.path,
            run_id=run.run_id,
            batch=written.batch,
            rows=written.rows,
            sha256=written.sha256,
        )
        written.path.unlink(missing_ok=True)
        pk_width = len(run.schema.primary_key)
        incremental = run.checkpoint.mode == ExtractMode.INCREMENTAL.value
        key_range = cursor_range = None
        if first is not None and last is not None and pk_width:
            key_range = (_key_text(first[-pk_width:]), _key_text(last[-pk_width:]))
            if incremental:
                cursor_range = (first[0], last[0])
        staged = StagedFile(
            key,
            written.batch,
            written.rows,
            written.bytes,
            written.sha256,
            self.file_format,
            chunk=self.chunk_index,
            key_range=key_range,
            cursor_range=cursor_range,
        )
        run.uploaded.append(staged)
        chunk = run.checkpoint.in_progress
        assert chunk is not None
        chunk = ChunkRecord(
            chunk.index, chunk.after, chunk.through, (*chunk.files, staged), last or chunk.resume_after
        )
        run.save(run.checkpoint.evolve(in_progress=chunk))
        run.staged_this_invocation += 1
        logger.info(
            "staged data file",
            extra={
                "run_id": run.run_id,
                "table": run.table.qualified,
                "s3_key": key,
                "rows": written.rows,
                "bytes": written.bytes,
                "chunk": self.chunk_index,
                "duration_ms": round((time.monotonic() - started) * 1000),
            },
        )


def _stage_chunk_csv(run: _Run, chunk: ChunkRecord, allow_empty: bool) -> None:
    recorder = _FileRecorder(run, FileFormat.CSV, chunk.index)

    def on_file(written: WrittenFile) -> None:
        first, last = written.first_key, written.last_key
        if isinstance(first, tuple) and isinstance(last, tuple):
            recorder.record(written, first, last)
        else:
            recorder.record(written, None, None)  # a header-only file

    splitter = CsvBatchSplitter(
        batch_rows=run.settings.batch_rows,
        path_for_batch=lambda batch: run.work_dir / f"batch{batch}.csv.gz",
        on_file=on_file,
        first_batch=batch_number(chunk.index, len(chunk.files) + 1),
        max_bytes=run.settings.extract.target_file_mb * 1024 * 1024,
        record_key=recorder.csv_order_key,
    )
    reader = TableReader(run.pg_conn, run.schema, policy=run.options.value_policy)
    try:
        reader.copy_csv(splitter, run.rows(chunk.resume_after or chunk.after, chunk.through))
        if allow_empty or splitter.rows > 0:
            splitter.finish()
    except BaseException:
        recorder.abandon()
        raise
    recorder.finish()


def rows_reaching(table: pa.Table, budget: int) -> int | None:
    """How many leading rows of ``table`` it takes for their text and binary values to reach
    ``budget`` bytes (at least 1); None when all of them stay below it."""
    import pyarrow.compute as pc

    sizes: Any = None
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_binary(column.type):
            lengths = pc.fill_null(pc.binary_length(column), 0)
            sizes = lengths if sizes is None else pc.add(sizes, lengths)
    if sizes is None:
        return None
    reached = pc.greater_equal(pc.cumulative_sum(sizes), budget)
    first = pc.index(reached, True).as_py()
    return None if first < 0 else first + 1


def _stage_chunk_parquet(run: _Run, chunk: ChunkRecord, allow_empty: bool) -> None:
    """COPY CSV on a thread -> Arrow's CSV parser -> Parquet row groups of PARQUET_CHUNK_ROWS rows.

    Files are cut at exactly ``batch_rows`` rows (and after a row group once they reach the
    target size), like the CSV path; a file's row groups depend only on its first row, so a
    retried file has the same bytes. Each row group is encoded on an encoder thread while
    the next one is parsed (both run in Arrow without the GIL); one group at a time, in order.
    """
    recorder = _FileRecorder(run, FileFormat.PARQUET, chunk.index)
    schema = run.schema
    batch_rows = run.settings.batch_rows
    max_bytes = run.settings.extract.target_file_mb * 1024 * 1024
    order_key = run.checkpoint.order_key
    width = len(schema.columns)
    group_rows = min(batch_rows, PARQUET_CHUNK_ROWS)
    reader = TableReader(run.pg_conn, schema, policy=run.options.value_policy)
    rows = run.rows(chunk.resume_after or chunk.after, chunk.through)
    # Touched only by the encoder thread while a group is in flight, by this one otherwise.
    writer: ParquetWriter | None = None
    file_in_chunk = len(chunk.files)
    first: tuple[str, ...] | None = None
    last: tuple[str, ...] | None = None

    def new_writer() -> ParquetWriter:
        nonlocal file_in_chunk
        file_in_chunk += 1
        batch = batch_number(chunk.index, file_in_chunk)
        return ParquetWriter(run.work_dir / f"batch{batch}.parquet", batch, schema.columns)

    def key_at(table: pa.Table, row: int) -> tuple[str, ...]:
        return tuple(str(table.column(width + i)[row].as_py()) for i in range(len(order_key)))

    def write_group(group: pa.Table) -> None:
        nonlocal writer, first, last
        if writer is None:
            writer = new_writer()
            first = key_at(group, 0)
        writer.write_arrow(group)
        last = key_at(group, group.num_rows - 1)
        if writer.rows >= batch_rows or writer.compressed_bytes >= max_bytes:
            recorder.record(writer.close(), first, last)
            writer = None

    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgsnow-encode")
    encoding: Future[None] | None = None
    # Rows the open file would hold once the group in flight is written, were no file cut by
    # size: an upper bound, exact whenever no group is in flight.
    file_rows_bound = 0

    def settle() -> None:
        nonlocal encoding, file_rows_bound
        in_flight, encoding = encoding, None
        if in_flight is not None:
            in_flight.result()
        file_rows_bound = writer.rows if writer is not None else 0

    def next_group_rows() -> int:
        # A size cut only empties the open file, and then the next group is group_rows long
        # anyway; only near the batch_rows cut must the group in flight be waited for.
        if batch_rows - file_rows_bound < group_rows:
            settle()
        return min(group_rows, batch_rows - file_rows_bound)

    def submit_group(group: pa.Table) -> None:
        nonlocal encoding, file_rows_bound
        settle()  # one group in flight: bounded memory, files and checkpoints in order
        file_rows_bound += group.num_rows
        if file_rows_bound >= batch_rows:
            file_rows_bound = 0
        encoding = encoder.submit(write_group, group)

    pipe = CopyPipe()
    copy_failure: list[BaseException] = []

    def copy_rows() -> None:
        sink = pipe.record_sink()
        try:
            reader.copy_arrow_csv(sink, rows, trailing_text=order_key)
            sink.flush()
        except BaseException as exc:
            if not pipe.abandoned:  # an abandoned pipe's COPY fails by design
                copy_failure.append(exc)
            pipe.close(failed=True)
        else:
            pipe.close()

    copying = threading.Thread(target=copy_rows, name="pgsnow-copy", daemon=True)
    copying.start()
    try:
        batches = open_arrow_csv(pipe, schema.columns, len(order_key))
        pending: list[pa.RecordBatch] = []
        pending_rows = pending_bytes = 0
        for batch in batches or ():
            pending.append(batch)
            pending_rows += batch.num_rows
            pending_bytes += batch.nbytes
            while pending_rows:
                want = next_group_rows()
                table = pa.Table.from_batches(pending)
                if pending_bytes >= PARQUET_GROUP_BYTES:
                    # Large values: a group ends where its rows reach the byte budget (counted from
                    # the group's first row, so a retried file is cut the same way).
                    want = min(want, rows_reaching(table, PARQUET_GROUP_BYTES) or want)
                if pending_rows < want:
                    break
                submit_group(table.slice(0, want))
                rest = table.slice(want)
                pending, pending_rows = rest.to_batches(), rest.num_rows
                pending_bytes = rest.nbytes
        if pending_rows:
            submit_group(pa.Table.from_batches(pending))
        settle()
    except BaseException:
        pipe.abandon()
        copying.join()
        encoder.shutdown(wait=True)
        recorder.abandon()
        if copy_failure:  # the COPY failed first; what the parser saw next is only its echo
            raise copy_failure[0] from None
        raise
    encoder.shutdown(wait=True)
    copying.join()
    if copy_failure:
        recorder.abandon()
        raise copy_failure[0]
    try:
        if writer is None and allow_empty and file_in_chunk == len(chunk.files):
            # An empty table still stages one (row-less) file: the loader creates the target from it.
            writer = new_writer()
        if writer is not None:
            recorder.record(writer.close(), first if writer.rows else None, last if writer.rows else None)
    except BaseException:
        recorder.abandon()
        raise
    recorder.finish()


def _stage_key_list(run: _Run) -> StagedFile:
    """Stage every primary key (CSV gzip, header) for the loader's delete detection."""
    schema = run.schema
    if not schema.primary_key:
        raise PermanentError(
            f"deletes={run.options.deletes.value} needs a primary key on {schema.table.qualified}",
            table=schema.table.qualified,
        )
    key_schema = TableSchema(
        schema.table, tuple(schema.column(k) for k in schema.primary_key), schema.primary_key, None
    )
    select, params = csv_select(key_schema)
    path = run.work_dir / "keys.csv.gz"
    writer: list[WrittenFile] = []
    splitter = CsvBatchSplitter(
        batch_rows=2**62, path_for_batch=lambda _: path, on_file=writer.append, first_batch=0
    )
    with run.pg_conn.cursor() as cur:
        inner = cur.mogrify(select, params or None).decode("utf-8")
        cur.copy_expert(
            sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true, ENCODING 'UTF8')").format(
                sql.SQL(inner)
            ),
            splitter,
        )
    splitter.finish()
    written = writer[0]
    key = run.store.put_key_list(run.table, run.run_id, path, rows=written.rows, sha256=written.sha256)
    path.unlink(missing_ok=True)
    return StagedFile(key, 0, written.rows, written.bytes, written.sha256, FileFormat.CSV)


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
    run_id = lease.run_id
    log_context = {"run_id": run_id, "table": table.qualified}
    manifest: RunManifest | None = None
    run: _Run | None = None
    try:
        checkpoint = store.load_checkpoint(table, run_id)
        if checkpoint is not None and checkpoint.state != RunState.EXTRACTING.value:
            store.release_lease(lease)  # a duplicate continuation of a finished run: nothing to do
            return store.get_manifest(table, run_id)
        with tempfile.TemporaryDirectory(prefix="pgsnow-") as work_dir:
            if checkpoint is None:
                # The last staged run's columns: what the table's NUMBER scales are, and what
                # this run's columns are checked against (one read for both).
                published = store.load_published_columns(table)
                run, manifest = _start_run(
                    settings=settings,
                    s3=s3,
                    store=store,
                    pg_conn=pg_conn,
                    table=table,
                    options=options,
                    lease=lease,
                    deadline=deadline,
                    work_dir=Path(work_dir),
                    run_id=run_id,
                    file_format=file_format,
                    started_at=_iso(started_at),
                    published=published,
                )
                check_schema_drift(published, table, options, manifest.columns)
            else:
                run, manifest = _resume_run(
                    settings=settings,
                    s3=s3,
                    store=store,
                    pg_conn=pg_conn,
                    table=table,
                    options=options,
                    lease=lease,
                    deadline=deadline,
                    work_dir=Path(work_dir),
                    checkpoint=checkpoint,
                )
            complete = _stage_chunks(run)
            elapsed = time.monotonic() - started
            timings = dict(run.checkpoint.timings)
            timings["extract_s"] = round(timings.get("extract_s", 0.0) + elapsed, 3)
            if not complete:
                run.save(run.checkpoint.evolve(timings=timings))
                run.lease = store.hand_off_lease(run.lease, ttl_s=deadline.lease_ttl_s())
                logger.info(
                    "stopping before the deadline; the run continues in a new invocation",
                    extra={**log_context, "files": len(run.checkpoint.files)},
                )
                return manifest.with_state(RunState.EXTRACTING, files=run.checkpoint.files, timings=timings)
            key_list = _stage_key_list(run) if options.deletes is not DeleteMode.NONE else None
            cursor_kind = (
                run.schema.column(options.cursor_column).kind
                if manifest.cursor_column and options.cursor_column
                else None
            )
            watermark_after = _watermark_after(run, cursor_kind) if cursor_kind is not None else None
            staged = manifest.with_state(
                RunState.STAGED,
                files=run.checkpoint.files,
                finished_at=_iso(now()),
                watermark_after=watermark_after,
                key_list=key_list,
                timings=timings,
            )
            store.put_manifest(staged)
            # The watermark moves only once the run's manifest says staged.
            if manifest.cursor_column and watermark_after is not None:
                store.save_watermark(table, Watermark(manifest.cursor_column, watermark_after, run_id))
            store.save_published_columns(table, PublishedColumns(run_id, manifest.columns))
            store.save_checkpoint(run.checkpoint.evolve(state=RunState.STAGED.value, timings=timings))
            store.release_lease(run.lease)
    except _StopForDeadline:  # pragma: no cover - caught inside _stage_chunks
        raise
    except psycopg2.Error as exc:
        error = classify_pg_error(exc, table=table.qualified, run_id=run_id)
        _record_failure(
            s3=s3,
            store=store,
            bucket=settings.bucket,
            manifest=manifest,
            run=run,
            lease=lease,
            now=now,
            error=error,
        )
        raise error from exc
    except PgSnowError as exc:
        exc.table = exc.table or table.qualified
        exc.run_id = exc.run_id or run_id
        _record_failure(
            s3=s3,
            store=store,
            bucket=settings.bucket,
            manifest=manifest,
            run=run,
            lease=lease,
            now=now,
            error=exc,
        )
        raise
    except Exception as exc:
        # Anything else (disk full, an Arrow conversion) still must not leave the run
        # looking like it is in progress; the error itself propagates unchanged.
        _record_failure(
            s3=s3,
            store=store,
            bucket=settings.bucket,
            manifest=manifest,
            run=run,
            lease=lease,
            now=now,
            error=exc,
        )
        raise
    finally:
        _end_snapshot(pg_conn)

    logger.info(
        "staged table",
        extra={
            **log_context,
            "rows": staged.total_rows,
            "bytes": sum(f.bytes for f in staged.files),
            "files": len(staged.files),
            "write_mode": staged.write_mode,
            "duration_ms": round((time.monotonic() - started) * 1000),
        },
    )
    return staged


def check_schema_drift(
    published: PublishedColumns | None, table: TableRef, options: TableOptions, columns: Sequence[Column]
) -> None:
    """Before anything is staged: the run's columns against those of the table's last staged run.

    A change Snowflake's table cannot take (pgsnow.schema_evolution) is a PermanentError naming
    the column and both types; the run is then marked failed with nothing staged. Columns
    dropped, added (a rename is both) or changed are logged. A replace run loads into a new
    table, which takes any change, so it is only logged.
    """
    if published is None:
        return
    context = {"table": table.qualified, "previous_run_id": published.run_id}
    existing = [existing_from_published(c) for c in published.columns]
    if options.effective_write_mode is WriteMode.REPLACE:
        sent = {c.snowflake_name for c in columns}
        before = {c.name for c in existing}
        if sent != before:
            logger.info(
                "the source's columns changed; the replace run rebuilds the table with them",
                extra={**context, "added": sorted(sent - before), "dropped": sorted(before - sent)},
            )
        return
    try:
        changes = plan_table_changes(table.qualified, existing, columns)
    except PermanentError as exc:
        exc.message += "; nothing was staged"
        raise
    for name in changes.dropped:
        logger.warning(
            "a column of the last run is no longer in the source: it stays in Snowflake, "
            "nullable, and is no longer filled",
            extra={**context, "column": name},
        )
    for column in changes.added:
        logger.info("a new source column will be added", extra={**context, "column": column.snowflake_name})
    if changes.dropped and changes.added:
        logger.info(
            "a renamed column shows as a dropped column and an added one",
            extra={
                **context,
                "dropped": list(changes.dropped),
                "added": [c.snowflake_name for c in changes.added],
            },
        )
    for column in changes.widened:
        logger.info(
            "a source column's type widened",
            extra={**context, "column": column.snowflake_name, "type": column.snowflake_type},
        )
    for name in changes.kept_nullable:
        logger.info(
            "a source column became NOT NULL; its Snowflake column stays nullable",
            extra={**context, "column": name},
        )


def _run_filter(
    conn: Connection, schema: TableSchema, options: TableOptions, lower_cursor: str | None
) -> tuple[sql.Composable | None, tuple[Any, ...]]:
    if lower_cursor is None or options.cursor_column is None:
        return None, ()
    return sql.SQL("{} >= %s").format(sql.Identifier(options.cursor_column)), (lower_cursor,)


def _kept_numeric_scales(published: PublishedColumns | None, options: TableOptions) -> dict[str, int]:
    """Scales the Snowflake table's NUMBER columns already have (Snowflake cannot change a column's
    scale): from the table's last staged run, except for replace runs, which create a new table."""
    if options.effective_write_mode is WriteMode.REPLACE:
        return {}
    if published is None:
        return {}
    return {c.name: c.scale for c in published.columns if c.kind is ValueKind.DECIMAL and c.scale is not None}


def _start_run(
    *,
    settings: Settings,
    s3: Any,
    store: RunStore,
    pg_conn: Connection,
    table: TableRef,
    options: TableOptions,
    lease: Lease,
    deadline: Deadline,
    work_dir: Path,
    run_id: str,
    file_format: FileFormat | None,
    started_at: str,
    published: PublishedColumns | None,
) -> tuple[_Run, RunManifest]:
    incremental = options.mode is ExtractMode.INCREMENTAL
    # Before the snapshot: every transaction it cannot see started after this point or is listed now.
    safe_point = read_safe_point(pg_conn) if incremental else None
    if safe_point is not None and not safe_point.sees_all_sessions:
        logger.warning(
            "pg_stat_activity hides other roles' transactions (grant pg_read_all_stats): "
            "the safe watermark only counts this role's open transactions",
            extra={"run_id": run_id, "table": table.qualified},
        )
    schema = describe_table(pg_conn, table)
    watermark = lower_cursor = None
    order_key: tuple[str, ...] = schema.primary_key
    if incremental:
        cursor = _cursor_column(schema, options)
        order_key = (cursor, *schema.primary_key)
        stored = store.load_watermark(table)
        if stored is not None and stored.cursor_column == cursor:
            watermark = stored.value
            lower_cursor = _lower_cursor(
                pg_conn, schema.column(cursor).kind, watermark, options.lookback_seconds
            )
    write_mode = resolve_write_mode(schema, options)
    run_filter, filter_params = _run_filter(pg_conn, schema, options, lower_cursor)
    rows = RowRange(order_key, None, None, run_filter, filter_params)
    condition, params = rows.condition()
    schema = choose_numeric_scales(
        pg_conn, schema, condition, params, kept=_kept_numeric_scales(published, options)
    )
    warnings = schema.warnings
    for warning in warnings:
        logger.warning(warning, extra={"run_id": run_id, "table": table.qualified, "reason": "type_fallback"})
    # Key and cursor values are what chunks resume from: they must stage unchanged under any policy.
    check_values_fit(
        pg_conn,
        schema,
        condition,
        params,
        columns=None if options.value_policy is ValuePolicy.FAIL else order_key,
        policy=options.value_policy,
    )
    chosen = file_format or choose_file_format(
        options.file_format or settings.file_format, estimate_rows(pg_conn, schema, rows)
    )
    checkpoint = RunCheckpoint(
        run_id=run_id,
        table=table,
        mode=options.mode.value,
        file_format=chosen,
        order_key=order_key,
        watermark_before=watermark,
        lower_cursor=lower_cursor,
        safe_point=safe_point.moment if safe_point else None,
    )
    manifest = RunManifest(
        run_id=run_id,
        table=table,
        mode=options.mode.value,
        file_format=chosen,
        columns=schema.columns,
        primary_key=schema.primary_key,
        state=RunState.EXTRACTING,
        started_at=started_at,
        cursor_column=options.cursor_column if incremental else None,
        watermark_before=watermark,
        write_mode=write_mode.value,
        deletes=options.deletes.value,
        warnings=warnings,
    )
    run = _Run(
        settings,
        s3,
        store,
        pg_conn,
        table,
        options,
        schema,
        checkpoint,
        lease,
        deadline,
        work_dir,
        run_filter,
        filter_params,
    )
    run.save(checkpoint)
    store.put_manifest(manifest)
    logger.info(
        "extracting",
        extra={
            "run_id": run_id,
            "table": table.qualified,
            "file_format": chosen.value,
            "mode": options.mode.value,
            "write_mode": write_mode.value,
        },
    )
    return run, manifest


def _resume_run(
    *,
    settings: Settings,
    s3: Any,
    store: RunStore,
    pg_conn: Connection,
    table: TableRef,
    options: TableOptions,
    lease: Lease,
    deadline: Deadline,
    work_dir: Path,
    checkpoint: RunCheckpoint,
) -> tuple[_Run, RunManifest]:
    manifest = store.get_manifest(table, checkpoint.run_id)
    # The run staged its first files with the numeric scales it chose when it started.
    schema = with_numeric_scales(
        describe_table(pg_conn, table),
        {c.name: c.scale for c in manifest.columns if c.is_unbounded_numeric and c.scale is not None},
    )
    if schema.columns != manifest.columns or schema.primary_key != manifest.primary_key:
        raise PermanentError(
            f"the columns of {table.qualified} changed during run {checkpoint.run_id}; start a new run",
            table=table.qualified,
        )
    run_filter, filter_params = _run_filter(pg_conn, schema, options, checkpoint.lower_cursor)
    run = _Run(
        settings,
        s3,
        store,
        pg_conn,
        table,
        options,
        schema,
        checkpoint.evolve(invocations=checkpoint.invocations + 1),
        lease,
        deadline,
        work_dir,
        run_filter,
        filter_params,
    )
    run.save(run.checkpoint)
    logger.info(
        "resuming",
        extra={"run_id": checkpoint.run_id, "table": table.qualified, "files": len(checkpoint.files)},
    )
    return run, manifest


def _stage_chunks(run: _Run) -> bool:
    """Stage chunk after chunk; False when stopped for the deadline (the checkpoint says where)."""
    stage = _stage_chunk_csv if run.checkpoint.file_format is FileFormat.CSV else _stage_chunk_parquet
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
                through = next_chunk_end(
                    run.pg_conn, run.schema, run.rows(after, None), run.settings.extract.chunk_rows
                )
                if through is None and index > 0:
                    return True
            chunk = ChunkRecord(index, after, through)
            run.save(run.checkpoint.evolve(in_progress=chunk))
        if resumed:
            # A later snapshot than the one checked at the run's start: check this chunk's rows again.
            condition, params = run.rows(chunk.resume_after or chunk.after, chunk.through).condition()
            policy_columns = (
                None if run.options.value_policy is ValuePolicy.FAIL else run.checkpoint.order_key
            )
            check_values_fit(
                run.pg_conn,
                run.schema,
                condition,
                params,
                columns=policy_columns,
                policy=run.options.value_policy,
            )
        allow_empty = chunk.index == 0 and not chunk.files
        try:
            stage(run, chunk, allow_empty)
        except _StopForDeadline:
            return False
        finished = run.checkpoint.in_progress
        assert finished is not None
        run.save(run.checkpoint.evolve(finished=(*run.checkpoint.finished, finished), in_progress=None))
        if finished.through is None:
            return True


def _end_snapshot(pg_conn: Connection) -> None:
    """Close the read-only transaction; a broken connection is the caller's to replace."""
    if pg_conn.closed:
        return
    try:
        pg_conn.rollback()
    except psycopg2.Error:
        logger.warning("could not end the PostgreSQL transaction; the connection will be replaced")
        pg_conn.close()


def _record_failure(
    *,
    s3: Any,
    store: RunStore,
    bucket: str,
    manifest: RunManifest | None,
    run: _Run | None,
    lease: Lease,
    now: Callable[[], datetime],
    error: BaseException,
) -> None:
    """A retryable failure leaves the run resumable; any other marks it ``failed`` and frees the table."""
    current_lease = run.lease if run is not None else lease
    context = {"run_id": lease.run_id, "table": lease.table.qualified, "error": type(error).__name__}
    try:
        if isinstance(error, LeaseLostError):
            return  # another invocation owns the run now
        if isinstance(error, PgSnowError) and error.retryable and manifest is not None:
            store.hand_off_lease(current_lease, ttl_s=0)
            logger.warning("extraction interrupted; the next invocation resumes the run", extra=context)
            return
        if manifest is not None:
            files = run.checkpoint.files if run is not None else ()
            failed = manifest.with_state(
                RunState.FAILED, files=files, finished_at=_iso(now()), error=str(error).splitlines()[0][:500]
            )
            store.put_manifest(failed)
            if run is not None:
                store.save_checkpoint(run.checkpoint.evolve(state=RunState.FAILED.value))
        store.release_lease(current_lease)
    except PgSnowError as put_error:
        logger.warning("could not record the failure", extra={**context, "put_error": put_error.message})
        return
    if manifest is not None:
        # The error's message travels with the exception; the log names only its type
        # (database messages can quote row contents).
        logger.error("extraction failed; manifest marked failed", extra=context)
