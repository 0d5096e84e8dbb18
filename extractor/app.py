"""Extractor Lambda: stage one PostgreSQL table into S3 (data files + run manifest).

Invoked with ``{"schema_name": "...", "table_name": "..."}``, directly or as the constant
input of an EventBridge schedule (or inside ``detail`` of an EventBridge event). The table
must be in PGSNOW_TABLES; failures propagate to Lambda's retry and error metrics.

When the deadline nears, the run stops after its current file and this function invokes
itself asynchronously with ``{"schema_name", "table_name", "run_id"}`` to continue it
(docs/extraction.md). ``continuation_invoker`` is the callable that does it: the Lambda
client by default; the local stack and tests replace it to call the handler in-process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from pgsnow.errors import PermanentError
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import is_run_id, manifest_key
from pgsnow.manifest import RunState
from pgsnow.observability import logger, metrics
from pgsnow.postgres import Connection, connect
from pgsnow.runtime import Runtime, extractor_runtime


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


ContinuationInvoker = Callable[[dict[str, str]], None]


def invoke_self_async(function_name: str | None) -> ContinuationInvoker:
    """The deployed invoker: ``lambda:InvokeFunction`` on this function, InvocationType=Event."""

    def invoke(payload: dict[str, str]) -> None:
        if not function_name:
            raise PermanentError(
                "AWS_LAMBDA_FUNCTION_NAME is not set: cannot continue the run in a new invocation"
            )
        import boto3

        boto3.Session().client("lambda").invoke(
            FunctionName=function_name, InvocationType="Event", Payload=json.dumps(payload).encode()
        )

    return invoke


# Replaced by the local stack and tests (a callable that runs the handler in-process).
continuation_invoker: ContinuationInvoker | None = None


class _PostgresConnectionCache:
    """One PostgreSQL connection per warm container, replaced when it was closed or broken."""

    def __init__(self) -> None:
        self._conn: Connection | None = None

    def get(self, runtime: Runtime) -> Connection:
        if self._conn is None or self._conn.closed:
            settings = runtime.settings
            self._conn = connect(
                runtime.postgres_dsn(), statement_timeout_ms=settings.postgres.statement_timeout_ms
            )
        return self._conn

    def reset(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None


postgres_connections = _PostgresConnectionCache()


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = ExtractRequest.from_event(event)
    runtime = extractor_runtime()
    # The allowlist is checked here (and again in extract_table) before any connection or SQL.
    runtime.settings.tables.check(request.table)
    manifest = extract_table(
        settings=runtime.settings,
        pg_conn=postgres_connections.get(runtime),
        s3=runtime.s3,
        table=request.table,
        run_id=request.run_id,
        remaining_ms=context.get_remaining_time_in_millis,
        owner=getattr(context, "aws_request_id", None),
    )
    if manifest.state is RunState.EXTRACTING:
        # Stopped before the deadline with everything so far checkpointed: continue in a new invocation.
        invoke = continuation_invoker or invoke_self_async(runtime.settings.extract.function_name)
        invoke(request.continuation(manifest.run_id))
    staged_bytes = sum(f.bytes for f in manifest.files)
    metrics.add_dimension(name="table", value=manifest.table.qualified)
    metrics.add_metric(name="RowsExtracted", unit=MetricUnit.Count, value=manifest.total_rows)
    metrics.add_metric(name="BytesStaged", unit=MetricUnit.Bytes, value=staged_bytes)
    metrics.add_metric(name="FilesStaged", unit=MetricUnit.Count, value=len(manifest.files))
    return {
        "run_id": manifest.run_id,
        "table": manifest.table.qualified,
        "state": manifest.state.value,
        "file_format": manifest.file_format.value,
        "files": len(manifest.files),
        "rows": manifest.total_rows,
        "bytes": staged_bytes,
        "bucket": runtime.settings.bucket,
        "manifest_key": manifest_key(manifest.table, manifest.run_id),
    }
