"""One chunk's rows as Parquet files: COPY CSV on a thread -> Arrow's CSV parser -> row groups.

Files are cut after the row group that makes them reach the target size (or at exactly
``batch_rows`` rows when EXTRACT_BATCH_ROWS caps them), like the CSV path; a file's row groups depend only on its first row, so a
retried file has the same bytes. Each row group is encoded on an encoder thread while
the next one is parsed (both run in Arrow without the GIL); one group at a time, in order.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pgsnow.checkpoint import ChunkRecord
from pgsnow.extract.files import FileRecorder, batch_number, file_row_cap
from pgsnow.extract.state import ExtractionRun
from pgsnow.formats import CopyPipe, ParquetWriter, open_arrow_csv
from pgsnow.keys import FileFormat
from pgsnow.postgres import TableReader

# Rows per Parquet row group (held in Arrow until written): bounds memory. On the benchmark's
# 2M-row table 20K rows peaked at 207 MB RSS, 50K at 246 MB, at the same speed.
PARQUET_CHUNK_ROWS = 20_000
# A row group is also cut once the rows waiting for it hold this many bytes in Arrow: rows of large
# values then never pile up into one group (a group is held while it is encoded).
PARQUET_GROUP_BYTES = 64 * 1024 * 1024


def use_jemalloc() -> None:
    """Arrow's allocations from jemalloc rather than pyarrow's default mimalloc.

    Row groups are allocated on this thread and freed on the encoder's; mimalloc kept that memory
    (measured on the benchmark's 2M-row table: RSS climbed through the run to 277 MB with 17 MB
    of Arrow memory live; with jemalloc 231-239 MB, docs/performance.md). Process-wide, like the
    pool itself; a pyarrow built without jemalloc keeps its default.
    """
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        return
    if pa.default_memory_pool().backend_name != pool.backend_name:
        pa.set_memory_pool(pool)


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


def stage_chunk_parquet(run: ExtractionRun, chunk: ChunkRecord, allow_empty: bool) -> None:
    use_jemalloc()
    ParquetChunkStager(run, chunk, allow_empty).stage()


class ParquetChunkStager:
    """Stages one chunk as Parquet files, with three threads: this one parses and slices row
    groups, ``pgsnow-copy`` runs the COPY into ``pipe``, ``pgsnow-encode`` writes each group.

    The open file (``writer``, ``first``, ``last``, ``file_in_chunk``) is touched only by the
    encoder thread while a group is in flight (``encoding``), and by this one otherwise.
    """

    def __init__(self, run: ExtractionRun, chunk: ChunkRecord, allow_empty: bool) -> None:
        self.run = run
        self.chunk = chunk
        self.allow_empty = allow_empty
        self.recorder = FileRecorder(run, FileFormat.PARQUET, chunk.index)
        self.batch_rows = file_row_cap(run.settings)
        self.max_bytes = run.settings.extract.target_file_mb * 1024 * 1024
        self.order_key = run.checkpoint.order_key
        self.width = len(run.schema.columns)
        self.group_rows = min(self.batch_rows, PARQUET_CHUNK_ROWS)
        self.reader = TableReader(run.pg_conn, run.schema, policy=run.options.value_policy)
        self.rows = run.rows(chunk.resume_after or chunk.after, chunk.through)
        # The open file and the keys of its first and last rows.
        self.writer: ParquetWriter | None = None
        self.file_in_chunk = len(chunk.files)
        self.first: tuple[str, ...] | None = None
        self.last: tuple[str, ...] | None = None
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgsnow-encode")
        self.encoding: Future[None] | None = None
        # Rows the open file would hold once the group in flight is written, were no file cut by
        # size: an upper bound, exact whenever no group is in flight.
        self.file_rows_bound = 0
        self.pipe = CopyPipe()
        self.copy_failure: list[BaseException] = []

    def stage(self) -> None:
        copying = threading.Thread(target=self._copy_rows, name="pgsnow-copy", daemon=True)
        copying.start()
        try:
            self._parse_and_encode()
        except BaseException:
            self.pipe.abandon()
            copying.join()
            self.encoder.shutdown(wait=True)
            self.recorder.abandon()
            if self.copy_failure:  # the COPY failed first; what the parser saw next is only its echo
                raise self.copy_failure[0] from None
            raise
        self.encoder.shutdown(wait=True)
        copying.join()
        if self.copy_failure:
            self.recorder.abandon()
            raise self.copy_failure[0]
        try:
            self._close_last_file()
        except BaseException:
            self.recorder.abandon()
            raise
        self.recorder.finish()

    def _copy_rows(self) -> None:
        """The COPY thread: the chunk's rows as CSV records (the order key appended) into the pipe."""
        sink = self.pipe.record_sink()
        try:
            self.reader.copy_arrow_csv(sink, self.rows, trailing_text=self.order_key)
            sink.flush()
        except BaseException as exc:
            if not self.pipe.abandoned:  # an abandoned pipe's COPY fails by design
                self.copy_failure.append(exc)
            self.pipe.close(failed=True)
        else:
            self.pipe.close()

    def _parse_and_encode(self) -> None:
        """Parse the pipe into Arrow batches and hand them to the encoder as row groups."""
        batches = open_arrow_csv(self.pipe, self.run.schema.columns, len(self.order_key))
        pending: list[pa.RecordBatch] = []
        pending_rows = pending_bytes = 0
        for batch in batches or ():
            pending.append(batch)
            pending_rows += batch.num_rows
            pending_bytes += batch.nbytes
            while pending_rows:
                want = self._next_group_rows()
                table = pa.Table.from_batches(pending)
                if pending_bytes >= PARQUET_GROUP_BYTES:
                    # Large values: a group ends where its rows reach the byte budget (counted from
                    # the group's first row, so a retried file is cut the same way).
                    want = min(want, rows_reaching(table, PARQUET_GROUP_BYTES) or want)
                if pending_rows < want:
                    break
                self._submit_group(table.slice(0, want))
                rest = table.slice(want)
                pending, pending_rows = rest.to_batches(), rest.num_rows
                pending_bytes = rest.nbytes
        if pending_rows:
            self._submit_group(pa.Table.from_batches(pending))
        self._settle()

    def _next_group_rows(self) -> int:
        # A size cut only empties the open file, and then the next group is group_rows long
        # anyway; only near the batch_rows cut must the group in flight be waited for.
        if self.batch_rows - self.file_rows_bound < self.group_rows:
            self._settle()
        return min(self.group_rows, self.batch_rows - self.file_rows_bound)

    def _submit_group(self, group: pa.Table) -> None:
        self._settle()  # one group in flight: bounded memory, files and checkpoints in order
        self.file_rows_bound += group.num_rows
        if self.file_rows_bound >= self.batch_rows:
            self.file_rows_bound = 0
        self.encoding = self.encoder.submit(self._write_group, group)

    def _settle(self) -> None:
        """Wait for the group in flight (raising its error); the open file's rows are then exact."""
        in_flight, self.encoding = self.encoding, None
        if in_flight is not None:
            in_flight.result()
        self.file_rows_bound = self.writer.rows if self.writer is not None else 0

    def _write_group(self, group: pa.Table) -> None:
        """The encoder thread: one row group into the open file, which is recorded once full."""
        if self.writer is None:
            self.writer = self._new_writer()
            self.first = self._key_at(group, 0)
        self.writer.write_arrow(group)
        self.last = self._key_at(group, group.num_rows - 1)
        if self.writer.rows >= self.batch_rows or self.writer.compressed_bytes >= self.max_bytes:
            self.recorder.record(self.writer.close(), self.first, self.last)
            self.writer = None

    def _close_last_file(self) -> None:
        writer = self.writer
        if writer is None and self.allow_empty and self.file_in_chunk == len(self.chunk.files):
            # An empty table still stages one (row-less) file: the loader creates the target from it.
            writer = self._new_writer()
        if writer is not None:
            has_rows = writer.rows > 0
            self.recorder.record(
                writer.close(), self.first if has_rows else None, self.last if has_rows else None
            )

    def _new_writer(self) -> ParquetWriter:
        self.file_in_chunk += 1
        batch = batch_number(self.chunk.index, self.file_in_chunk)
        return ParquetWriter(self.run.work_dir / f"batch{batch}.parquet", batch, self.run.schema.columns)

    def _key_at(self, table: pa.Table, row: int) -> tuple[str, ...]:
        return tuple(str(table.column(self.width + i)[row].as_py()) for i in range(len(self.order_key)))
