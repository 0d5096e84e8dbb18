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

One file per job:

- ``run``: ``extract_table``, the run's lifecycle: lease, start or resume, chunk after chunk,
  manifest ``staged`` or ``failed``, watermark, lease released.
- ``start``: opening a run: a new one (its plan, checkpoint and manifest ``extracting``) or
  one left unfinished (resumed from its checkpoint).
- ``plan``: what a new run chooses before anything is staged: file format and write mode.
- ``chunks``: chunk after chunk, to the end of the run or of one range of a parallel run.
- ``finish``: a run whose chunks are all staged: key list, manifest ``staged``, watermark, lease.
- ``ranges``: parallel backfill: a large run's key ranges from the table's statistics, and
  ``FanOut``, which sends one message per range to the range queue.
- ``worker``: one range of a parallel run, under its own lease and checkpoint; the worker that
  stages the last range finishes the run.
- ``state``: what one invocation works with (``Invocation``, ``ExtractionRun``) and its
  ``Deadline``.
- ``watermark``: incremental runs: the cursor column, the run's lower bound, the watermark after.
- ``schema_drift``: a new run's columns against the table's last published ones.
- ``files``: ``FileRecorder`` (upload and checkpoint each finished file) and batch numbers.
- ``csv_stager``, ``parquet_stager``: one chunk's rows as CSV or Parquet files.
- ``key_list``: the primary-key list of a run that tracks deletes.
"""
