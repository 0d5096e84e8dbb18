"""Loader Lambda: S3 ObjectCreated notifications (via SQS) -> COPY INTO Snowflake.

Each SQS record is processed on its own (Powertools BatchProcessor): a record that raises
is reported in ``batchItemFailures``, so only that message returns to the queue (and, after
the queue's maxReceiveCount, goes to the dead-letter queue) while the rest are deleted.
An ``s3:TestEvent`` record has nothing to load and succeeds.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from pgsnow.errors import PgSnowError
from pgsnow.events import parse_sqs_record
from pgsnow.load import LoadResult, LoadStatus, load_staged_files
from pgsnow.observability import NAMESPACE, logger, metrics
from pgsnow.runtime import loader_runtime

processor = BatchProcessor(event_type=EventType.SQS)


def record_file_metric(name: str, table: str) -> None:
    """One count per file, with the table as a dimension (a batch may hold several tables)."""
    with single_metric(name=name, unit=MetricUnit.Count, value=1, namespace=NAMESPACE) as metric:
        metric.add_dimension(name="table", value=table)


def handle_record(record: SQSRecord) -> list[dict[str, Any]]:
    runtime = loader_runtime()
    settings = runtime.settings
    created = parse_sqs_record(
        record, bucket=settings.bucket, prefix=settings.prefix, allowlist=settings.tables
    )
    if not created:
        logger.info(
            "s3:TestEvent or empty notification: nothing to load", extra={"message_id": record.message_id}
        )
        return []
    try:
        results: list[LoadResult] = load_staged_files(
            settings=settings, sf_conn=runtime.snowflake(), s3=runtime.s3, objects=[c.staged for c in created]
        )
    except PgSnowError as exc:
        logger.error(f"load failed: {exc.message}", extra={**exc.context(), "message_id": record.message_id})
        record_file_metric("FilesFailed", exc.table or "unknown")
        raise
    for result in results:
        loaded = result.status is LoadStatus.LOADED
        record_file_metric("FilesLoaded" if loaded else "FilesSkipped", result.table)
        if loaded:
            metrics.add_metric(name="RowsLoaded", unit=MetricUnit.Count, value=result.rows)
    return [r.as_dict() for r in results]


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=handle_record, processor=processor, context=context
    )
