"""Opening a run: a new one (its plan, checkpoint and manifest ``extracting``), or one left
unfinished, resumed from its checkpoint with the columns it started with.

A new run that may fan out (``range_rows`` given) and reads the whole table (mode full, or an
incremental table's backfill) is split into key ranges here (``pgsnow.extract.ranges``); its
values are then checked range by range, by the workers, rather than all at once here."""

from __future__ import annotations

from pgsnow.changes import ChangeRange
from pgsnow.checkpoint import PublishedColumns, RangeRecord, RunCheckpoint
from pgsnow.config import ExtractMode, TableOptions, ValuePolicy
from pgsnow.errors import PermanentError
from pgsnow.extract.plan import choose_file_format, resolve_write_mode
from pgsnow.extract.ranges import plan_ranges
from pgsnow.extract.schema_drift import kept_numeric_scales
from pgsnow.extract.state import ExtractionRun, Invocation
from pgsnow.extract.watermark import run_bounds, run_filter
from pgsnow.keys import FileFormat
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.postgres import (
    Connection,
    RowRange,
    SafePoint,
    TableSchema,
    check_values_fit,
    choose_numeric_scales,
    describe_table,
    estimate_rows,
    read_safe_point,
    with_numeric_scales,
)


def start_run(
    invocation: Invocation,
    *,
    run_id: str,
    file_format: FileFormat | None,
    started_at: str,
    published: PublishedColumns | None,
    range_rows: int | None = None,
    changes: ChangeRange | None = None,
) -> tuple[ExtractionRun, RunManifest]:
    """A new run of the invocation's table: planned, checkpointed, its manifest ``extracting``.
    With ``range_rows``, a run reading the whole table may be split into key ranges
    (``checkpoint.ranges``) for concurrent workers. ``changes``: a change-capture table's
    snapshot position, carried by every manifest of the run from this first one on."""
    settings, table, options, pg_conn = (
        invocation.settings,
        invocation.table,
        invocation.options,
        invocation.pg_conn,
    )
    incremental = options.mode is ExtractMode.INCREMENTAL
    safe_point = _safe_point(invocation, run_id) if incremental else None
    schema = describe_table(pg_conn, table)
    bounds = run_bounds(pg_conn, invocation.store, table, schema, options)
    write_mode = resolve_write_mode(schema, options)
    row_filter, filter_params = run_filter(options, bounds.lower_cursor)
    rows = RowRange(bounds.order_key, None, None, row_filter, filter_params)
    condition, params = rows.condition()
    schema = choose_numeric_scales(
        pg_conn, schema, condition, params, kept=kept_numeric_scales(published, options)
    )
    for warning in schema.warnings:
        logger.warning(warning, extra={"run_id": run_id, "table": table.qualified, "reason": "type_fallback"})
    ranges: tuple[RangeRecord, ...] = ()
    if range_rows is not None and bounds.lower_cursor is None:
        ranges = plan_ranges(pg_conn, schema, bounds.order_key, range_rows)
    if not ranges:  # a parallel run's workers check each range's values in their own snapshots
        check_rows_fit(pg_conn, schema, rows, options)
    chosen = file_format or choose_file_format(
        options.file_format or settings.file_format, estimate_rows(pg_conn, schema, rows)
    )
    checkpoint = RunCheckpoint(
        run_id=run_id,
        table=table,
        mode=options.mode.value,
        file_format=chosen,
        order_key=bounds.order_key,
        watermark_before=bounds.watermark,
        lower_cursor=bounds.lower_cursor,
        safe_point=safe_point.moment if safe_point else None,
        ranges=ranges,
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
        watermark_before=bounds.watermark,
        write_mode=write_mode.value,
        deletes=options.deletes.value,
        warnings=schema.warnings,
        changes=changes,
    )
    run = ExtractionRun.open(invocation, schema, checkpoint, row_filter, filter_params)
    invocation.store.put_manifest(manifest)
    logger.info(
        "extracting",
        extra={
            "run_id": run_id,
            "table": table.qualified,
            "file_format": chosen.value,
            "mode": options.mode.value,
            "write_mode": write_mode.value,
            "ranges": len(ranges),
        },
    )
    return run, manifest


def _safe_point(invocation: Invocation, run_id: str) -> SafePoint:
    """Read before the snapshot: every transaction it cannot see started after this point or is
    listed now."""
    safe_point = read_safe_point(invocation.pg_conn)
    if not safe_point.sees_all_sessions:
        logger.warning(
            "pg_stat_activity hides other roles' transactions (grant pg_read_all_stats): "
            "the safe watermark only counts this role's open transactions",
            extra={"run_id": run_id, "table": invocation.table.qualified},
        )
    return safe_point


def check_rows_fit(pg_conn: Connection, schema: TableSchema, rows: RowRange, options: TableOptions) -> None:
    """Every value of ``rows`` fits Snowflake (policy ``fail``). Whatever the policy, key and cursor
    values must: they are what chunks resume from, so they must stage unchanged."""
    condition, params = rows.condition()
    bounded = rows.after is not None or rows.through is not None
    check_values_fit(
        pg_conn,
        schema,
        condition,
        params,
        columns=None if options.value_policy is ValuePolicy.FAIL else rows.order_key,
        policy=options.value_policy,
        # A chunk or a range: read it along the key's index, not the whole table.
        order_key=rows.order_key if bounded else (),
    )


def schema_as_started(invocation: Invocation, manifest: RunManifest) -> TableSchema:
    """The table as the run of ``manifest`` started it (with the numeric scales it chose: its first
    files were staged with them); PermanentError when its columns changed since."""
    table = invocation.table
    schema = with_numeric_scales(
        describe_table(invocation.pg_conn, table),
        {c.name: c.scale for c in manifest.columns if c.is_unbounded_numeric and c.scale is not None},
    )
    if schema.columns != manifest.columns or schema.primary_key != manifest.primary_key:
        raise PermanentError(
            f"the columns of {table.qualified} changed during run {manifest.run_id}; start a new run",
            table=table.qualified,
        )
    return schema


def resume_run(invocation: Invocation, checkpoint: RunCheckpoint, manifest: RunManifest) -> ExtractionRun:
    """The unfinished run of ``checkpoint`` (whose manifest is ``manifest``), refused when the
    table's columns changed since."""
    schema = schema_as_started(invocation, manifest)
    row_filter, filter_params = run_filter(invocation.options, checkpoint.lower_cursor)
    resumed = checkpoint.evolve(invocations=checkpoint.invocations + 1)
    run = ExtractionRun.open(invocation, schema, resumed, row_filter, filter_params)
    logger.info(
        "resuming",
        extra={
            "run_id": checkpoint.run_id,
            "table": invocation.table.qualified,
            "files": len(checkpoint.files),
        },
    )
    return run
