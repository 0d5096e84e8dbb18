"""Extractor Lambda: stage one PostgreSQL table into S3 (data files + run manifest).

Invoked with ``{"schema_name": "...", "table_name": "..."}``, directly or as the constant
input of an EventBridge schedule (or inside ``detail`` of an EventBridge event). The table
must be in PGSNOW_TABLES; failures propagate to Lambda's retry and error metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from pgsnow.errors import PermanentError
from pgsnow.extract import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import manifest_key
from pgsnow.observability import logger, metrics
from pgsnow.postgres import Connection, connect
from pgsnow.runtime import Runtime, extractor_runtime, postgres_dsn


@dataclass(frozen=True)
class ExtractRequest:
    table: TableRef

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
        return cls(TableRef(schema, table))


class _PostgresConnectionCache:
    """One PostgreSQL connection per warm container, replaced when it was closed or broken."""

    def __init__(self) -> None:
        self._conn: Connection | None = None

    def get(self, runtime: Runtime) -> Connection:
        if self._conn is None or self._conn.closed:
            settings = runtime.settings
            self._conn = connect(
                postgres_dsn(settings), statement_timeout_ms=settings.postgres.statement_timeout_ms
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
    )
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
