"""Loader Lambda: S3 ObjectCreated notifications (via SQS) -> COPY INTO Snowflake.

The whole SQS batch is parsed first and its files are loaded together by the runtime's loader
(one per container, ``pgsnow.load.batch.Loader``: grouped by target table and run, one COPY per
group). Powertools' BatchProcessor then reports each record's own outcome: a record whose file
failed (or whose body is not a valid notification) is listed in ``batchItemFailures`` and returns
to the queue (after maxReceiveCount: the dead-letter queue), while the rest are deleted.
An ``s3:TestEvent`` record has nothing to load and succeeds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from pgsnow.errors import PgSnowError
from pgsnow.events import BatchFiles, parse_sqs_batch
from pgsnow.keys import is_run_id, run_started_at
from pgsnow.load.outcomes import FileOutcome, LoadStatus
from pgsnow.observability import logger, record_table_metric
from pgsnow.runtime import loader_runtime

processor = BatchProcessor(event_type=EventType.SQS)


def record_outcome_metrics(outcome: FileOutcome) -> None:
    if outcome.error is not None:
        record_table_metric("FilesFailed", outcome.error.table or outcome.staged.table.qualified, 1)
        return
    result = outcome.result
    assert result is not None
    if result.status is LoadStatus.ALREADY_LOADED:
        record_table_metric("FilesSkipped", result.table, 1)
        return
    record_table_metric("FilesLoaded", result.table, 1)
    record_table_metric("RowsLoaded", result.table, result.rows)
    record_table_metric("CopyDuration", result.table, result.duration_ms, MetricUnit.Milliseconds)
    run_id = outcome.staged.run_id
    if run_id is not None and is_run_id(run_id):
        # How old the loaded rows are: the run read them at its start (a hand-dropped file has no run).
        lag = datetime.now(UTC) - run_started_at(run_id)
        record_table_metric("ReplicationLag", result.table, max(lag.total_seconds(), 0.0), MetricUnit.Seconds)
    if result.errors_seen:
        record_table_metric("RowsRejected", result.table, result.errors_seen)


def load_sqs_batch(records: list[SQSRecord]) -> BatchFiles:
    """Parse and load every record's files; the outcomes, per message id."""
    runtime = loader_runtime()
    settings = runtime.settings
    batch = parse_sqs_batch(
        records, bucket=settings.bucket, prefix=settings.prefix, allowlist=settings.tables
    )
    staged = batch.all_staged()
    if staged:
        for outcome in runtime.loader().load(runtime.snowflake(), staged):
            batch.outcomes[outcome.staged.key] = outcome
            record_outcome_metrics(outcome)
    return batch


def make_record_handler(batch: BatchFiles) -> Any:
    def handle_record(record: SQSRecord) -> list[dict[str, Any]]:
        try:
            return batch.results_for(record.message_id)
        except PgSnowError as exc:
            logger.error(
                f"record failed: {exc.message}", extra={**exc.context(), "message_id": record.message_id}
            )
            raise

    return handle_record


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    records = [SQSRecord(r) for r in event.get("Records", [])]
    batch = load_sqs_batch(records)
    return process_partial_response(
        event=event, record_handler=make_record_handler(batch), processor=processor, context=context
    )
