"""Cleanup Lambda: remove loaded staged files per CLEANUP_S3_FILES, then sweep for orphans.

Runs on a schedule (every run and every staged file) or invoked with
{"schema_name": ..., "table_name": ...} for one table. Failures propagate so Lambda's
retry and error metrics see them.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from pgsnow.cleanup import CleanupResult, cleanup_pending_runs
from pgsnow.observability import logger, record_table_metric
from pgsnow.runtime import cleanup_runtime
from pgsnow.sweeper import SweepResult, sweep_orphans


def record_nonzero_metric(name: str, table: str, value: float, unit: MetricUnit = MetricUnit.Count) -> None:
    """A table's metric, left out when zero (one pass covers every table)."""
    if value:
        record_table_metric(name, table, value, unit)


def record_metrics(results: list[CleanupResult], sweep: SweepResult) -> None:
    for result in results:
        record_nonzero_metric("FilesDeleted", result.table, len(result.deleted_keys))
        record_nonzero_metric("BytesDeleted", result.table, result.deleted_bytes, MetricUnit.Bytes)
    for table, counts in sweep.counts_by_table().items():
        record_nonzero_metric("OrphansFound", table, counts["found"])
        record_nonzero_metric("OrphansReenqueued", table, counts["reenqueued"])
        record_nonzero_metric("OrphansAbandoned", table, counts["abandoned"] + counts["unloadable"])
        record_nonzero_metric("OrphansDeleted", table, counts["deleted"])
    # The sweep's deletions are the pass's totals, with no table dimension.
    record_table_metric("FilesDeleted", None, len(sweep.deleted_keys))
    record_table_metric("BytesDeleted", None, sweep.deleted_bytes, MetricUnit.Bytes)
    record_table_metric("WorkTablesDropped", None, len(sweep.work_tables_dropped))


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    runtime = cleanup_runtime()
    tables = runtime.tables_from_event(event)
    sf_conn = runtime.snowflake()
    # The function's own session: without a storage integration Snowflake reads a deletes key list
    # with its credentials when the pass completes a run.
    results = cleanup_pending_runs(
        settings=runtime.settings,
        s3=runtime.s3,
        sf_conn=sf_conn,
        tables=tables,
        aws_credentials=runtime.session,
    )
    sweep = sweep_orphans(
        settings=runtime.settings, s3=runtime.s3, sqs=runtime.sqs, sf_conn=sf_conn, tables=tables
    )
    record_metrics(results, sweep)
    return {"runs": [r.as_dict() for r in results], "sweep": sweep.as_dict()}
