"""One chunk's rows as gzip CSV files, straight from PostgreSQL's ``COPY ... TO STDOUT``."""

from __future__ import annotations

from pgsnow.checkpoint import ChunkRecord
from pgsnow.extract.files import FileRecorder, batch_number, file_row_cap
from pgsnow.extract.state import ExtractionRun
from pgsnow.formats import CsvBatchSplitter, WrittenFile
from pgsnow.keys import FileFormat
from pgsnow.postgres import TableReader


def stage_chunk_csv(run: ExtractionRun, chunk: ChunkRecord, allow_empty: bool) -> None:
    """COPY the chunk's rows as CSV, cut into gzip files at the target size (or the row cap, when set)."""
    recorder = FileRecorder(run, FileFormat.CSV, chunk.index)

    def on_file(written: WrittenFile) -> None:
        first, last = written.first_key, written.last_key
        if isinstance(first, tuple) and isinstance(last, tuple):
            recorder.record(written, first, last)
        else:
            recorder.record(written, None, None)  # a header-only file

    splitter = CsvBatchSplitter(
        batch_rows=file_row_cap(run.settings),
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
