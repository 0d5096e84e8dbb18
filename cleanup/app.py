"""Cleanup Lambda: delete staged files the load ledger shows loaded, per CLEANUP_S3_FILES.

Runs on a schedule (every staged run) or invoked with {"schema_name": ..., "table_name": ...}
for one table. Failures propagate so Lambda's retry and error metrics see them.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from pgsnow.cleanup import cleanup_pending_runs
from pgsnow.observability import logger, metrics
from pgsnow.runtime import cleanup_runtime


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    runtime = cleanup_runtime()
    tables = runtime.tables_from_event(event)
    results = cleanup_pending_runs(
        settings=runtime.settings, s3=runtime.s3, sf_conn=runtime.snowflake(), tables=tables
    )
    for result in results:
        metrics.add_metric(name="FilesDeleted", unit="Count", value=len(result.deleted_keys))
        metrics.add_metric(name="BytesDeleted", unit="Bytes", value=result.deleted_bytes)
    return {"runs": [r.as_dict() for r in results]}
