"""events/*.json are real-shaped: Powertools' event classes and pgsnow's parsers accept them.

They are the inputs for `sam local invoke -e events/...` and for handler tests, so they must
keep matching template.yaml (bucket name, queue, schedule) and the key contract.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, SQSEvent

from pgsnow.events import is_sqs_event, parse_range_event, parse_s3_event_body
from pgsnow.identifiers import TableAllowlist, TableRef
from pgsnow.keys import FileFormat

pytestmark = pytest.mark.unit

EVENTS = Path(__file__).resolve().parents[2] / "events"
BUCKET = "pgsnow-snowflake-stage-dev-4f9d2c1a"  # template.yaml for dev, stack UUID 4f9d2c1a-...
PREFIX = "staging"
ALLOWLIST = TableAllowlist.parse("public.customers,public.orders")


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text(encoding="utf-8"))
    return event


def test_extractor_invoke_names_an_allowlisted_table() -> None:
    event = load_event("extractor_invoke.json")
    assert event == {"schema_name": "public", "table_name": "customers"}
    assert ALLOWLIST.check(TableRef(event["schema_name"], event["table_name"])) == TableRef(
        "public", "customers"
    )


def test_cleanup_schedule_is_an_eventbridge_scheduled_event() -> None:
    event = EventBridgeEvent(load_event("cleanup_schedule.json"))
    assert event.detail_type == "Scheduled Event"
    assert event.source == "aws.events"
    assert event.detail == {}
    assert event.resources[0].startswith("arn:aws:events:us-east-1:123456789012:rule/")


@pytest.mark.parametrize("name", ["loader_sqs_s3_object_created.json", "loader_sqs_s3_test_event.json"])
def test_sqs_records_are_consistent(name: str) -> None:
    for record in SQSEvent(load_event(name)).records:
        assert record.md5_of_body == hashlib.md5(record.body.encode()).hexdigest()
        assert record.event_source == "aws:sqs"
        assert record.event_source_arn == "arn:aws:sqs:us-east-1:123456789012:pgsnow-dev-stage"
        assert record.attributes.approximate_receive_count == "1"


def test_object_created_event_carries_url_encoded_keys_the_loader_accepts() -> None:
    # Given the SQS batch of S3 notifications
    records = list(SQSEvent(load_event("loader_sqs_s3_object_created.json")).records)
    raw_keys = [json.loads(r.body)["Records"][0]["s3"]["object"]["key"] for r in records]
    # When each body is parsed as the loader does
    parsed = [
        obj
        for r in records
        for obj in parse_s3_event_body(r.body, bucket=BUCKET, prefix=PREFIX, allowlist=ALLOWLIST)
    ]
    # Then the extractor's file and the hand-dropped file (encoded key) both decode to staged objects
    assert raw_keys[1] == "staging/public/customers/customers+export+2026-11-25%2C+part+1.csv"
    extracted, dropped = parsed
    assert extracted.staged.file_format is FileFormat.CSV
    assert (extracted.staged.run_id, extracted.staged.batch) == ("20261125T120000000000Z", 1)
    assert dropped.key == "staging/public/customers/customers export 2026-11-25, part 1.csv"
    assert (dropped.staged.run_id, dropped.staged.batch, dropped.staged.gzip) == (None, None, False)
    assert {p.staged.table for p in parsed} == {TableRef("public", "customers")}


def test_s3_test_event_has_no_records() -> None:
    (record,) = SQSEvent(load_event("loader_sqs_s3_test_event.json")).records
    assert json.loads(record.body)["Event"] == "s3:TestEvent"
    assert parse_s3_event_body(record.body, bucket=BUCKET, prefix=PREFIX, allowlist=ALLOWLIST) == []


def test_extractor_range_message_is_an_sqs_event_of_the_range_queue() -> None:
    # Given the range queue's SQS event (parallel backfill), as the event source delivers it
    event = load_event("extractor_sqs_range.json")
    (record,) = SQSEvent(event).records
    assert record.md5_of_body == hashlib.md5(record.body.encode()).hexdigest()
    assert record.event_source_arn == "arn:aws:sqs:us-east-1:123456789012:pgsnow-dev-extract-ranges"
    # Then the extractor reads it as one range of one allowlisted table's run
    assert is_sqs_event(event)
    (request,) = parse_range_event(event, ALLOWLIST)
    assert (request.table, request.run_id, request.index) == (
        TableRef("public", "orders"),
        "20261207T050000000000Z",
        2,
    )
