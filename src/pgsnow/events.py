"""S3 ObjectCreated notifications delivered through SQS, parsed into staged objects.

Every name that reaches SQL later starts here, so a key is accepted only when it
lies under the staging prefix, has no empty or ``..`` parts, and names an
allowlisted table. Anything else is a PermanentError: retrying cannot make a
bad key good, and the message must end in the dead-letter queue, not be dropped.
``s3:TestEvent`` messages (sent when the notification is configured) carry no
records and are acknowledged with nothing to do. So is an object under the prefix that is
not a data file (``notes.txt``): the notification covers the whole staging prefix, because
S3's suffix filters are case-sensitive and ``FILE.CSV.GZ`` must load too; such an object is
logged as ignored, not dead-lettered.

The extractor's range queue (parallel backfill) delivers one range of a parallel run per
message: ``parse_range_event`` reads them into ``RangeRequest`` (``is_sqs_event`` tells such an
event from a direct invocation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pgsnow.errors import PermanentError, PgSnowError
from pgsnow.identifiers import TableAllowlist, TableRef
from pgsnow.keys import NotADataFileError, StagedObject, decode_event_key, is_run_id, parse_data_key
from pgsnow.observability import logger

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

TEST_EVENT = "s3:TestEvent"
OBJECT_CREATED_PREFIX = "ObjectCreated:"


@dataclass(frozen=True)
class S3ObjectCreated:
    """One ObjectCreated record: where the object is and the validated staged file it is."""

    event_name: str
    bucket: str
    staged: StagedObject
    size: int | None
    etag: str | None
    sequencer: str | None

    @property
    def key(self) -> str:
        return self.staged.key


def parse_sqs_record(
    record: SQSRecord, *, bucket: str, prefix: str, allowlist: TableAllowlist
) -> list[S3ObjectCreated]:
    """The S3 records in one SQS message (empty for an ``s3:TestEvent``)."""
    return parse_s3_event_body(record.body, bucket=bucket, prefix=prefix, allowlist=allowlist)


def parse_s3_event_body(
    body: str | None, *, bucket: str, prefix: str, allowlist: TableAllowlist
) -> list[S3ObjectCreated]:
    """Parse an S3 event notification (the SQS message body)."""
    try:
        document = json.loads(body or "")
    except ValueError as exc:
        raise PermanentError(f"SQS message body is not JSON: {(body or '')[:80]!r}") from exc
    if not isinstance(document, dict):
        raise PermanentError(
            f"SQS message body is not an S3 event notification: a JSON {type(document).__name__}"
        )
    if document.get("Event") == TEST_EVENT:
        return []
    records = document.get("Records")
    if not isinstance(records, list) or not records:
        raise PermanentError("SQS message body is not an S3 event notification: no Records[]")
    parsed = [_parse_record(r, bucket=bucket, prefix=prefix, allowlist=allowlist) for r in records]
    return [created for created in parsed if created is not None]


def _parse_record(
    record: Any, *, bucket: str, prefix: str, allowlist: TableAllowlist
) -> S3ObjectCreated | None:
    """The record's staged file; None for an object under the prefix that is not a data file."""
    if not isinstance(record, dict):
        raise PermanentError("S3 event record is not an object")
    event_name = record.get("eventName")
    if record.get("eventSource") not in (None, "aws:s3") or not isinstance(event_name, str):
        raise PermanentError(f"not an S3 event record: eventSource={record.get('eventSource')!r}")
    try:
        s3 = record["s3"]
        raw_key = s3["object"]["key"]
        event_bucket = s3["bucket"]["name"]
    except (KeyError, TypeError) as exc:
        raise PermanentError(
            f"S3 event record without s3.bucket.name / s3.object.key: missing {exc}"
        ) from exc
    if not isinstance(raw_key, str) or not isinstance(event_bucket, str):
        raise PermanentError("S3 event record with a non-string bucket or key")
    key = decode_event_key(raw_key)
    if not event_name.startswith(OBJECT_CREATED_PREFIX):
        raise PermanentError(
            f"unexpected S3 event {event_name!r}: the loader only handles ObjectCreated", s3_key=key
        )
    if event_bucket != bucket:
        raise PermanentError(
            f"object is in bucket {event_bucket!r}, not the staging bucket {bucket!r}", s3_key=key
        )
    try:
        staged = parse_data_key(key, prefix)
        allowlist.check(staged.table)
    except NotADataFileError as exc:
        logger.warning(f"ignored: {exc.message}", extra={"s3_key": key})
        return None
    except PermanentError as exc:
        exc.s3_key = exc.s3_key or key
        raise
    obj = s3["object"]
    size = obj.get("size")
    etag = obj.get("eTag")
    sequencer = obj.get("sequencer")
    return S3ObjectCreated(
        event_name=event_name,
        bucket=event_bucket,
        staged=staged,
        size=int(size) if isinstance(size, int | str) and str(size).isdigit() else None,
        etag=etag if isinstance(etag, str) else None,
        sequencer=sequencer if isinstance(sequencer, str) else None,
    )


@dataclass
class BatchFiles:
    """An SQS batch parsed up front: each message's files (or why it could not be parsed),
    and, once loaded, each file's outcome, so every message can answer for itself."""

    files_by_message: dict[str, list[S3ObjectCreated]] = field(default_factory=dict)
    parse_errors: dict[str, PermanentError] = field(default_factory=dict)
    outcomes: dict[str, FileOutcomeLike] = field(default_factory=dict)

    def all_staged(self) -> list[StagedObject]:
        return [created.staged for files in self.files_by_message.values() for created in files]

    def results_for(self, message_id: str) -> list[dict[str, Any]]:
        """The message's load results; raises the first error of any of its files."""
        if message_id in self.parse_errors:
            raise self.parse_errors[message_id]
        results = []
        for created in self.files_by_message.get(message_id, []):
            outcome = self.outcomes.get(created.key)
            if outcome is None:
                raise PermanentError("the file was not loaded", s3_key=created.key)
            if outcome.error is not None:
                raise outcome.error
            if outcome.result is not None:
                results.append(outcome.result.as_dict())
        return results


class _ResultLike(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class FileOutcomeLike(Protocol):
    """``pgsnow.load.outcomes.FileOutcome`` (events does not import the loader)."""

    @property
    def error(self) -> PgSnowError | None: ...

    @property
    def result(self) -> _ResultLike | None: ...


def parse_sqs_batch(
    records: Sequence[SQSRecord], *, bucket: str, prefix: str, allowlist: TableAllowlist
) -> BatchFiles:
    """Parse every record; a record that does not parse fails alone (its error is kept)."""
    batch = BatchFiles()
    for record in records:
        try:
            batch.files_by_message[record.message_id] = parse_sqs_record(
                record, bucket=bucket, prefix=prefix, allowlist=allowlist
            )
        except PermanentError as exc:
            batch.parse_errors[record.message_id] = exc
    return batch


@dataclass(frozen=True)
class RangeRequest:
    """One range of a parallel run to extract, as the range queue delivers it."""

    table: TableRef
    run_id: str
    index: int
    message_id: str | None = None

    def body(self) -> dict[str, Any]:
        """The message body that asks for this range again."""
        return {
            "schema_name": self.table.schema,
            "table_name": self.table.table,
            "run_id": self.run_id,
            "range": self.index,
        }


def is_sqs_event(event: Any) -> bool:
    """An event of an SQS event source (``Records`` of ``aws:sqs`` records)."""
    records = event.get("Records") if isinstance(event, dict) else None
    return (
        isinstance(records, list)
        and bool(records)
        and all(isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records)
    )


def parse_range_event(event: dict[str, Any], allowlist: TableAllowlist) -> list[RangeRequest]:
    """Every range an SQS event of the range queue asks for, its table checked against the allowlist."""
    return [
        parse_range_body(r.get("body"), allowlist, message_id=r.get("messageId")) for r in event["Records"]
    ]


def parse_range_body(body: Any, allowlist: TableAllowlist, *, message_id: str | None = None) -> RangeRequest:
    try:
        document = json.loads(body) if isinstance(body, str) else None
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise PermanentError(f"range message body is not a JSON object: {str(body)[:80]!r}")
    schema, table, run_id, index = (
        document.get("schema_name"),
        document.get("table_name"),
        document.get("run_id"),
        document.get("range"),
    )
    if not isinstance(schema, str) or not isinstance(table, str) or not schema or not table:
        raise PermanentError('range message must carry non-empty strings "schema_name" and "table_name"')
    if not isinstance(run_id, str) or not is_run_id(run_id):
        raise PermanentError(f"range message run_id must look like 20260101T000000000000Z, got {run_id!r}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise PermanentError(f"range message range must be a non-negative integer, got {index!r}")
    return RangeRequest(allowlist.check(TableRef(schema, table)), run_id, index, message_id)
