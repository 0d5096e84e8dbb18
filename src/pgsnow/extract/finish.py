"""Finishing a run whose every chunk is staged: the key list (deletes), the manifest ``staged``,
then the watermark, the published columns and the checkpoint, and the table's lease released.
A single worker's run ends here, and so does a parallel run, in the worker that took the
table's lease to finish it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pgsnow.checkpoint import PublishedColumns, Watermark
from pgsnow.config import DeleteMode
from pgsnow.extract.key_list import stage_key_list
from pgsnow.extract.state import ExtractionRun
from pgsnow.extract.watermark import watermark_after
from pgsnow.manifest import RunManifest, RunState
from pgsnow.timestamps import utc_iso


def finish_run(
    run: ExtractionRun, manifest: RunManifest, timings: dict[str, float], now: Callable[[], datetime]
) -> RunManifest:
    """Every chunk staged: the key list (deletes), manifest ``staged``, then watermark, published
    columns and checkpoint, and the table is free."""
    options, store = run.options, run.store
    key_list = stage_key_list(run) if options.deletes is not DeleteMode.NONE else None
    cursor_kind = (
        run.schema.column(options.cursor_column).kind
        if manifest.cursor_column and options.cursor_column
        else None
    )
    after = watermark_after(run.pg_conn, run.checkpoint, cursor_kind) if cursor_kind is not None else None
    staged = manifest.with_state(
        RunState.STAGED,
        files=run.checkpoint.files,
        finished_at=utc_iso(now()),
        watermark_after=after,
        key_list=key_list,
        timings=timings,
    )
    store.put_manifest(staged)
    # The watermark moves only once the run's manifest says staged.
    if manifest.cursor_column and after is not None:
        store.save_watermark(run.table, Watermark(manifest.cursor_column, after, run.run_id))
    store.save_published_columns(run.table, PublishedColumns(run.run_id, manifest.columns))
    store.save_checkpoint(run.checkpoint.evolve(state=RunState.STAGED.value, timings=timings))
    store.release_lease(run.lease)
    return staged
