"""Load staged files into Snowflake exactly once, recorded in the load ledger (``pgsnow.ledger``).

One file per job (docs/loading.md tells the whole story):

- ``batch``: ``Loader`` (kept across batches) groups a batch's files per (table, run, format),
  one COPY per group, retries a failed group file by file, then completes the runs it touched;
  ``load_batch`` for one call.
- ``objects``: S3 facts about a staged file (HEAD, its run's manifest check, a CSV header).
- ``tables``: target tables created from a run's columns and evolved; what was prepared.
- ``copy``: one group's claim, COPY (and MERGE), check and record, in one transaction.
- ``insert``: ``LOAD_METHOD=insert`` with its CSV parser.
- ``through_snowpipe``: ``LOAD_METHOD=snowpipe`` (pipes, submit, confirm, record).
- ``completion``: ``complete_run``, the one step that ends a run (its swap or deletes, exactly
  once, then the manifest's ``loaded``), after each batch and in the cleanup pass.
- ``session``: the batch's connections and the one Snowflake transaction.
- ``work_tables``: the transient tables a load makes for its transaction, and the sweep (in the
  cleanup pass) of those a stopped load left behind.
- ``outcomes``: what a load reports.

This package must not import pyarrow (the loader artifact does not ship it).
"""
