"""Chunk after chunk: the staging loop of a run, or of one range of a parallel run.

A chunk's end is fixed (``next_chunk_end``, ``EXTRACT_CHUNK_ROWS`` rows on) and stored in the
checkpoint before the chunk is read, so a retried chunk covers exactly the same key range. A
range's chunks never pass its end, and are numbered ``range * CHUNKS_PER_RANGE + n``, so every
file of a parallel run has a batch number (and key) of its own; range 0's are the numbers a
single worker gives.
"""

from __future__ import annotations

from pgsnow.checkpoint import ChunkRecord
from pgsnow.errors import PermanentError
from pgsnow.extract.csv_stager import stage_chunk_csv
from pgsnow.extract.files import chunk_rows_for
from pgsnow.extract.parquet_stager import stage_chunk_parquet
from pgsnow.extract.start import check_rows_fit
from pgsnow.extract.state import ExtractionRun, StopForDeadline
from pgsnow.keys import FileFormat
from pgsnow.postgres import next_chunk_end

# A range may hold up to this many chunks: range r's chunk n is chunk r * 100000 + n (its files'
# batch numbers then follow pgsnow.extract.files.batch_number).
CHUNKS_PER_RANGE = 100_000


def stage_chunks(run: ExtractionRun) -> bool:
    """Stage chunk after chunk to the end of the run (or of its range); False when stopped for
    the deadline (the checkpoint says where)."""
    stage = stage_chunk_csv if run.checkpoint.file_format is FileFormat.CSV else stage_chunk_parquet
    span = run.checkpoint.range
    # A range reads in a later snapshot than the run's start, where values were checked: check
    # each of its chunks again, as a resumed run does.
    resumed = run.checkpoint.invocations > 1 or span is not None
    first_index = span.index * CHUNKS_PER_RANGE if span is not None else 0
    end = span.through if span is not None else None
    while True:
        chunk = run.checkpoint.in_progress
        if chunk is None:
            if run.staged_this_invocation > 0 and run.deadline.near():
                return False
            done = len(run.checkpoint.finished)
            if done >= CHUNKS_PER_RANGE:
                raise PermanentError(
                    f"a range of run {run.run_id} would need more than {CHUNKS_PER_RANGE} chunks: "
                    "raise EXTRACT_CHUNK_ROWS or lower EXTRACT_RANGE_ROWS",
                    table=run.table.qualified,
                )
            after = run.checkpoint.next_after
            through = end
            if run.checkpoint.order_key:
                through = next_chunk_end(run.pg_conn, run.schema, run.rows(after, end), chunk_rows_for(run))
                if through is None:
                    if done > 0 or first_index > 0:
                        return True
                    # The run's first chunk is staged even when empty: a header-only file tells
                    # the loader the table is empty now.
                    through = end
            chunk = ChunkRecord(first_index + done, after, through)
            run.save(run.checkpoint.evolve(in_progress=chunk))
        if resumed:
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
        if finished.through == end:
            return True
