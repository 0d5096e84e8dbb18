"""Each finished data file: uploaded, recorded in the run's checkpoint, in order (``FileRecorder``);
how big files and chunks are (``file_row_cap``, ``chunk_rows_for``).

A file's key is fixed by its run and batch number, and batch numbers by the chunk and the file's
place in it, so a resumed run stages every file under the key it would have had.

Files are cut by size: once a file reaches EXTRACT_TARGET_FILE_MB compressed (checked after
each CSV block or Parquet row group, so a file ends at most one of those over the target),
or at EXTRACT_BATCH_ROWS rows when that optional cap is set. A chunk's end also ends its last
file, so chunks are sized to hold several target-sized files (``CHUNK_FILES``): only one
file in that many is short.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from pgsnow.checkpoint import ChunkRecord
from pgsnow.config import MAX_FILES_PER_CHUNK, ExtractMode, Settings
from pgsnow.csv_records import csv_fields_at, parse_csv_record
from pgsnow.errors import PermanentError
from pgsnow.extract.state import ExtractionRun, StopForDeadline
from pgsnow.formats import WrittenFile
from pgsnow.keys import FileFormat, data_key
from pgsnow.manifest import StagedFile
from pgsnow.observability import logger
from pgsnow.postgres import estimate_row_bytes
from pgsnow.staging import put_data_file
from pgsnow.typemap import ValueKind

# Batch numbers are chunk * FILES_PER_CHUNK + n: a chunk may hold up to 9999 files.
FILES_PER_CHUNK = MAX_FILES_PER_CHUNK + 1
# No row cap (EXTRACT_BATCH_ROWS unset or 0): a file is cut by size alone.
NO_ROW_CAP = 2**62
# A chunk sized by bytes is meant to hold this many target-sized files. Its last file is cut
# short by the chunk's end, so more files per chunk means fewer short files; fewer means a
# retried or parallel unit of work stays small (8 x 128 MB = 1 GB of staged data).
CHUNK_FILES = 8
# Staged (compressed) bytes per row, guessed from PostgreSQL's bytes on disk per row before a run
# has staged a file: on the benchmark's table gzip CSV is 0.36x of it and Parquet 0.31x. Guessing
# low makes the first chunk larger (more files in it), never its files shorter.
STAGED_PER_DISK_BYTE = 0.25
# Chunk rows when nothing tells the row size (a view, a table never analysed).
FALLBACK_CHUNK_ROWS = 1_000_000


def file_row_cap(settings: Settings) -> int:
    """Rows after which a file is cut whatever its size (EXTRACT_BATCH_ROWS; off by default)."""
    return settings.batch_rows or NO_ROW_CAP


def chunk_rows_for(run: ExtractionRun) -> int:
    """Rows of the run's next chunk: EXTRACT_CHUNK_ROWS when set, else about ``CHUNK_FILES``
    target-sized files' worth.

    The row size is the run's own staged bytes per row once it has staged a file (exact for
    this table and format), before that PostgreSQL's bytes on disk per row scaled by
    ``STAGED_PER_DISK_BYTE``. The chunk's end is stored before it is read, so a retried chunk
    keeps its range whatever a later estimate would say.
    """
    settings = run.settings
    if settings.extract.chunk_rows is not None:
        return settings.extract.chunk_rows
    staged = [f for f in run.checkpoint.files if f.rows > 0]
    row_bytes: float | None
    if staged:
        row_bytes = sum(f.bytes for f in staged) / sum(f.rows for f in staged)
    else:
        on_disk = estimate_row_bytes(run.pg_conn, run.table)
        row_bytes = on_disk * STAGED_PER_DISK_BYTE if on_disk else None
    rows = FALLBACK_CHUNK_ROWS
    if row_bytes:
        target = settings.extract.target_file_mb * 1024 * 1024
        rows = max(1, math.ceil(CHUNK_FILES * target / row_bytes))
    if settings.batch_rows is not None:
        rows = min(rows, CHUNK_FILES * settings.batch_rows)
    return rows


def batch_number(chunk: int, file_in_chunk: int) -> int:
    """The batch of a chunk's n-th file (n from 1): the same (run, chunk, n) always gets the same key."""
    if not 1 <= file_in_chunk < FILES_PER_CHUNK:
        raise PermanentError(
            f"chunk {chunk} would need more than {FILES_PER_CHUNK - 1} files: "
            "set EXTRACT_CHUNK_ROWS lower (or 0: sized by bytes) or raise EXTRACT_TARGET_FILE_MB / EXTRACT_BATCH_ROWS"
        )
    return chunk * FILES_PER_CHUNK + file_in_chunk


def _key_text(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else json.dumps(list(values))


class FileRecorder:
    """Uploads each finished file, records it in the checkpoint, and stops when the deadline is near.

    A file is uploaded (and checkpointed) on a background thread while the next one is
    extracted, one upload at a time and in order: at most two files are on disk, and the
    checkpoint never lists a file before every earlier one. When the deadline is near the
    file is uploaded in the foreground and the chunk stops (``StopForDeadline``). Call
    ``finish`` after the chunk's last file, ``abandon`` when the chunk fails.
    """

    def __init__(self, run: ExtractionRun, file_format: FileFormat, chunk_index: int) -> None:
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
            raise StopForDeadline
        self._pending = self._uploads.submit(self._stage, written, first, last)

    def finish(self) -> None:
        """Wait for the last upload (raising its error); then stop if the deadline is near."""
        try:
            self._wait()
        finally:
            self._uploads.shutdown(wait=True)
        if self.run.staged_this_invocation and self.run.deadline.near():
            raise StopForDeadline

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
