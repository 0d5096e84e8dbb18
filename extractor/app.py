"""Extractor Lambda: stage one PostgreSQL table into S3 (data files + run manifest).

Invoked with ``{"schema_name": "...", "table_name": "..."}``, directly or as the constant
input of an EventBridge schedule (or inside ``detail`` of an EventBridge event). The table
must be in PGSNOW_TABLES; failures propagate to Lambda's retry and error metrics. A table in
mode cdc is enrolled and snapshot (``pgsnow.cdc.enroll``); once its snapshot is staged, its
invocations report that and do nothing (the change-capture function brings its changes).

When the deadline nears, the run stops after its current file and this function invokes
itself asynchronously with ``{"schema_name", "table_name", "run_id"}`` to continue it
(docs/extraction.md), through ``Runtime.invoke_continuation``.

Parallel backfill (EXTRACT_MAX_WORKERS > 1): a large run is split into key ranges, one message
each on the range queue, whose SQS event source invokes this function for one range at a time
(``{"Records": [...]}`` with ``{"schema_name", "table_name", "run_id", "range"}`` bodies). A
range stopped by the deadline is sent to the queue again; an error fails the message, which
SQS redelivers after its visibility timeout (then the dead-letter queue).

``change_capture_handler`` is the second entry point, of the change-capture function
(``ChangeCaptureFunction``: the same code, reserved concurrency 1, on a schedule): each invocation
drains the CDC_SLOT replication slot once (``pgsnow.cdc.drain.drain_slot``); the schedule's event
carries nothing it needs. A concurrent invocation that finds the slot busy returns
``{"skipped": "slot busy"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from pgsnow.cdc.drain import drain_slot
from pgsnow.cdc.enroll import SnapshotStaged, snapshot_table
from pgsnow.config import ExtractMode
from pgsnow.errors import PermanentError
from pgsnow.events import RangeRequest, is_sqs_event, parse_range_event
from pgsnow.extract.run import extract_table
from pgsnow.extract.worker import RangeOutcome, extract_range
from pgsnow.identifiers import TableRef
from pgsnow.keys import is_run_id, manifest_key
from pgsnow.manifest import RunState
from pgsnow.observability import logger, record_table_metric
from pgsnow.runtime import change_capture_runtime, extractor_runtime


@dataclass(frozen=True)
class ExtractRequest:
    table: TableRef
    run_id: str | None = None  # a continuation names the run it continues

    @classmethod
    def from_event(cls, event: Any) -> ExtractRequest:
        if not isinstance(event, Mapping):
            raise PermanentError("extractor event must be a JSON object with schema_name and table_name")
        body = event
        if "table_name" not in event and isinstance(event.get("detail"), Mapping):
            body = event["detail"]  # an EventBridge event carrying the request as its detail
        schema, table = body.get("schema_name"), body.get("table_name")
        if not isinstance(schema, str) or not isinstance(table, str) or not schema or not table:
            raise PermanentError(
                'extractor event must carry non-empty strings "schema_name" and "table_name", '
                f"got keys {sorted(body)}"
            )
        run_id = body.get("run_id")
        if run_id is not None and (not isinstance(run_id, str) or not is_run_id(run_id)):
            raise PermanentError(
                f"extractor event run_id must look like 20260101T000000000000Z, got {run_id!r}"
            )
        return cls(TableRef(schema, table), run_id)

    def continuation(self, run_id: str) -> dict[str, str]:
        return {"schema_name": self.table.schema, "table_name": self.table.table, "run_id": run_id}


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    runtime = extractor_runtime()
    if is_sqs_event(event):
        return {
            "ranges": [
                _extract_range(request, context)
                for request in parse_range_event(event, runtime.settings.tables)
            ]
        }
    request = ExtractRequest.from_event(event)
    # The allowlist is checked here (and again in extract_table) before any connection or SQL.
    runtime.settings.tables.check(request.table)
    fan_out = runtime.fan_out()
    arguments: dict[str, Any] = {
        "settings": runtime.settings,
        "pg_conn": runtime.postgres(),
        "s3": runtime.s3,
        "table": request.table,
        "run_id": request.run_id,
        "remaining_ms": context.get_remaining_time_in_millis,
        "owner": getattr(context, "aws_request_id", None),
        "fan_out": fan_out,
    }
    if runtime.settings.table_options(request.table).mode is ExtractMode.CDC:
        # A change-capture table: its enrollment and snapshot; once staged, the slot brings its changes.
        outcome = snapshot_table(**arguments)
        if isinstance(outcome, SnapshotStaged):
            return outcome.report()
        manifest = outcome
    else:
        manifest = extract_table(**arguments)
    handed_to_ranges = fan_out is not None and manifest.run_id in fan_out.dispatched
    if manifest.state is RunState.EXTRACTING and not handed_to_ranges:
        # Stopped before the deadline with everything so far checkpointed: continue in a new invocation.
        runtime.invoke_continuation(request.continuation(manifest.run_id))
    table = manifest.table.qualified
    staged_bytes = sum(f.bytes for f in manifest.files)
    record_table_metric("RowsExtracted", table, manifest.total_rows)
    record_table_metric("BytesStaged", table, staged_bytes, MetricUnit.Bytes)
    record_table_metric("FilesStaged", table, len(manifest.files))
    return {
        "run_id": manifest.run_id,
        "table": table,
        "state": manifest.state.value,
        "file_format": manifest.file_format.value,
        "files": len(manifest.files),
        "rows": manifest.total_rows,
        "bytes": staged_bytes,
        "bucket": runtime.settings.bucket,
        "manifest_key": manifest_key(manifest.table, manifest.run_id),
    }


def _extract_range(request: RangeRequest, context: LambdaContext) -> dict[str, Any]:
    runtime = extractor_runtime()
    result = extract_range(
        settings=runtime.settings,
        pg_conn=runtime.postgres(),
        s3=runtime.s3,
        table=request.table,
        run_id=request.run_id,
        index=request.index,
        remaining_ms=context.get_remaining_time_in_millis,
        owner=getattr(context, "aws_request_id", None),
    )
    if result.outcome is RangeOutcome.STOPPED:
        # Checkpointed before the deadline: the range continues in the next delivery.
        runtime.send_range_messages([request.body()])
    table = request.table.qualified
    record_table_metric("RowsExtracted", table, result.rows)
    record_table_metric("BytesStaged", table, result.bytes, MetricUnit.Bytes)
    record_table_metric("FilesStaged", table, result.files)
    return {
        "run_id": result.run_id,
        "table": table,
        "range": result.index,
        "outcome": result.outcome.value,
        "files": result.files,
        "rows": result.rows,
        "state": result.manifest.state.value if result.manifest is not None else None,
    }


@logger.inject_lambda_context(clear_state=True)
def change_capture_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """One change-capture run (the event, a schedule's, is not read)."""
    # Its own function and role (template ChangeCaptureFunction), not the extractor's.
    runtime = change_capture_runtime()
    return drain_slot(
        runtime.settings,
        dsn=runtime.postgres_dsn(),
        s3=runtime.s3,
        remaining_ms=context.get_remaining_time_in_millis,
    )
