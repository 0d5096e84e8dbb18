from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote_plus

import pytest
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from pgsnow.errors import PermanentError, UnsafeIdentifierError
from pgsnow.events import RangeRequest, is_sqs_event, parse_range_event, parse_s3_event_body, parse_sqs_record
from pgsnow.identifiers import TableAllowlist, TableRef
from pgsnow.keys import FileFormat

pytestmark = pytest.mark.unit

BUCKET = "stage-bucket"
PREFIX = "staging"
ALLOW_ORDERS = TableAllowlist.parse("public.orders,sales.My Table,public.café")
RUN = "20261125T120000000000Z"


def s3_body(*raw_keys: str, event_name: str = "ObjectCreated:Put", bucket: str = BUCKET) -> str:
    records = [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "eventName": event_name,
            "s3": {
                "bucket": {"name": bucket},
                "object": {"key": k, "size": 123, "eTag": "abc123", "sequencer": "0055AED6DCD90281E5"},
            },
        }
        for k in raw_keys
    ]
    return json.dumps({"Records": records})


def sqs_record(body: str) -> SQSRecord:
    data: dict[str, Any] = {"messageId": "m1", "receiptHandle": "r", "body": body, "attributes": {}}
    return SQSRecord(data)


@pytest.mark.parametrize(
    ("raw_key", "table", "file_name", "file_format", "run_id", "batch"),
    [
        pytest.param(
            f"staging/public/orders/public_orders_batch1_{RUN}.csv.gz",
            TableRef("public", "orders"),
            f"public_orders_batch1_{RUN}.csv.gz",
            FileFormat.CSV,
            RUN,
            1,
            id="extractor-csv",
        ),
        pytest.param(
            f"staging/public/orders/public_orders_batch12_{RUN}.parquet",
            TableRef("public", "orders"),
            f"public_orders_batch12_{RUN}.parquet",
            FileFormat.PARQUET,
            RUN,
            12,
            id="extractor-parquet",
        ),
        pytest.param(
            quote_plus(f"staging/sales/My Table/sales_My Table_batch3_{RUN}.csv.gz"),
            TableRef("sales", "My Table"),
            f"sales_My Table_batch3_{RUN}.csv.gz",
            FileFormat.CSV,
            RUN,
            3,
            id="space-encoded-as-plus",
        ),
        pytest.param(
            quote_plus("staging/public/café/hand dropped+1.csv"),
            TableRef("public", "café"),
            "hand dropped+1.csv",
            FileFormat.CSV,
            None,
            None,
            id="unicode-and-literal-plus-hand-dropped",
        ),
    ],
)
def test_object_created_key_is_decoded_and_parsed(
    raw_key: str,
    table: TableRef,
    file_name: str,
    file_format: FileFormat,
    run_id: str | None,
    batch: int | None,
) -> None:
    records = parse_sqs_record(
        sqs_record(s3_body(raw_key)), bucket=BUCKET, prefix=PREFIX, allowlist=ALLOW_ORDERS
    )

    assert len(records) == 1
    record = records[0]
    assert record.staged.table == table
    assert record.staged.file_name == file_name
    assert record.staged.file_format is file_format
    assert record.staged.run_id == run_id
    assert record.staged.batch == batch
    assert record.key == f"staging/{table.schema}/{table.table}/{file_name}"
    assert (record.bucket, record.size, record.etag, record.sequencer) == (
        BUCKET,
        123,
        "abc123",
        "0055AED6DCD90281E5",
    )


def test_test_event_has_nothing_to_do() -> None:
    body = json.dumps(
        {
            "Service": "Amazon S3",
            "Event": "s3:TestEvent",
            "Time": "2026-11-25T12:00:00.000Z",
            "Bucket": BUCKET,
            "RequestId": "X",
            "HostId": "Y",
        }
    )

    assert parse_s3_event_body(body, bucket=BUCKET, prefix=PREFIX, allowlist=ALLOW_ORDERS) == []


def test_several_records_in_one_message_are_all_returned() -> None:
    keys = [f"staging/public/orders/public_orders_batch{n}_{RUN}.csv.gz" for n in (1, 2)]

    records = parse_s3_event_body(s3_body(*keys), bucket=BUCKET, prefix=PREFIX, allowlist=ALLOW_ORDERS)

    assert [r.key for r in records] == keys


def test_star_allowlist_accepts_any_table() -> None:
    key = "staging/other/thing/file.parquet"

    records = parse_s3_event_body(
        s3_body(key), bucket=BUCKET, prefix=PREFIX, allowlist=TableAllowlist.parse("*")
    )

    assert records[0].staged.table == TableRef("other", "thing")


@pytest.mark.parametrize(
    ("body", "error_type", "message_part"),
    [
        pytest.param("not json at all", PermanentError, "not JSON", id="non-json"),
        pytest.param("", PermanentError, "not JSON", id="empty-body"),
        pytest.param("[1, 2]", PermanentError, "not an S3 event", id="json-list"),
        pytest.param('{"hello": "world"}', PermanentError, "no Records", id="json-without-records"),
        pytest.param('{"Records": []}', PermanentError, "no Records", id="empty-records"),
        pytest.param(
            '{"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]}',
            PermanentError,
            "s3.bucket.name",
            id="record-without-s3",
        ),
        pytest.param(
            json.dumps({"Records": [{"eventSource": "aws:sns", "eventName": "x"}]}),
            PermanentError,
            "not an S3 event record",
            id="other-event-source",
        ),
        pytest.param(
            s3_body(
                f"staging/public/orders/public_orders_batch1_{RUN}.csv.gz", event_name="ObjectRemoved:Delete"
            ),
            PermanentError,
            "only handles ObjectCreated",
            id="object-removed",
        ),
        pytest.param(
            s3_body(f"staging/public/orders/public_orders_batch1_{RUN}.csv.gz", bucket="someone-else"),
            PermanentError,
            "not the staging bucket",
            id="other-bucket",
        ),
        pytest.param(
            s3_body(f"elsewhere/public/orders/public_orders_batch1_{RUN}.csv.gz"),
            PermanentError,
            "outside the staging prefix",
            id="outside-prefix",
        ),
        pytest.param(
            s3_body("_pgsnow/manifests/public/orders/x.json"),
            PermanentError,
            "outside the staging prefix",
            id="manifest-key",
        ),
        pytest.param(
            s3_body("staging/public/../orders/file.csv.gz"),
            PermanentError,
            "'..'",
            id="dot-dot",
        ),
        pytest.param(
            s3_body(quote_plus("staging/public/orders/../../etc/file.csv")),
            PermanentError,
            "'..'",
            id="encoded-dot-dot",
        ),
        pytest.param(
            s3_body("staging/public/orders/deeper/file.csv.gz"),
            PermanentError,
            "{prefix}/{schema}/{table}/{file}",
            id="too-deep",
        ),
        pytest.param(
            s3_body(f"staging/public/customers/public_customers_batch1_{RUN}.csv.gz"),
            UnsafeIdentifierError,
            "not in the configured allowlist",
            id="table-not-allowlisted",
        ),
    ],
)
def test_bad_messages_are_permanent_errors(body: str, error_type: type[Exception], message_part: str) -> None:
    with pytest.raises(error_type) as caught:
        parse_s3_event_body(body, bucket=BUCKET, prefix=PREFIX, allowlist=ALLOW_ORDERS)

    assert message_part in str(caught.value)
    assert not getattr(caught.value, "retryable", True)


def test_an_object_that_is_not_a_data_file_is_ignored_not_dead_lettered() -> None:
    # The notification covers the whole prefix (S3's suffix filters are case-sensitive)
    assert (
        parse_s3_event_body(
            s3_body("staging/public/orders/notes.txt"), bucket=BUCKET, prefix=PREFIX, allowlist=ALLOW_ORDERS
        )
        == []
    )


@pytest.mark.parametrize(
    ("file_name", "gzip"),
    [
        pytest.param("EXPORT.CSV.GZ", True, id="upper-case-csv-gz"),
        pytest.param("export.Csv", False, id="mixed-case-csv"),
        pytest.param("PART-0.PARQUET", False, id="upper-case-parquet"),
    ],
)
def test_extensions_match_in_any_case(file_name: str, gzip: bool) -> None:
    (created,) = parse_s3_event_body(
        s3_body(f"staging/public/orders/{file_name}"), bucket=BUCKET, prefix=PREFIX, allowlist=ALLOW_ORDERS
    )
    assert (created.staged.file_name, created.staged.gzip, created.staged.run_id) == (file_name, gzip, None)


def test_rejected_key_is_named_in_the_error() -> None:
    key = f"staging/public/customers/public_customers_batch1_{RUN}.csv.gz"

    with pytest.raises(PermanentError) as caught:
        parse_s3_event_body(s3_body(key), bucket=BUCKET, prefix=PREFIX, allowlist=ALLOW_ORDERS)

    assert caught.value.s3_key == key


# --------------------------------------------------------------------------- the extractor's range queue

RANGE_ALLOW = TableAllowlist.parse("public.orders")


def range_event(*bodies: Any) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"m{n}",
                "eventSource": "aws:sqs",
                "body": body if isinstance(body, str) else json.dumps(body),
            }
            for n, body in enumerate(bodies)
        ]
    }


def test_range_message_round_trips() -> None:
    request = RangeRequest(TableRef("public", "orders"), RUN, 3)
    (parsed,) = parse_range_event(range_event(request.body()), RANGE_ALLOW)
    assert (parsed.table, parsed.run_id, parsed.index, parsed.message_id) == (request.table, RUN, 3, "m0")


@pytest.mark.parametrize(
    ("event", "sqs"),
    [
        pytest.param(range_event({"x": 1}), True, id="sqs-records"),
        pytest.param({"schema_name": "public", "table_name": "orders"}, False, id="direct-invocation"),
        pytest.param({"Records": []}, False, id="no-records"),
        pytest.param({"Records": [{"eventSource": "aws:s3"}]}, False, id="s3-records"),
    ],
)
def test_sqs_events_are_told_from_direct_invocations(event: dict[str, Any], sqs: bool) -> None:
    assert is_sqs_event(event) is sqs


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param("not json", "not a JSON object", id="not-json"),
        pytest.param({"schema_name": "public", "run_id": RUN, "range": 0}, "table_name", id="no-table"),
        pytest.param(
            {"schema_name": "public", "table_name": "orders", "run_id": "yesterday", "range": 0},
            "run_id",
            id="bad-run",
        ),
        pytest.param(
            {"schema_name": "public", "table_name": "orders", "run_id": RUN, "range": -1},
            "non-negative",
            id="negative",
        ),
        pytest.param(
            {"schema_name": "public", "table_name": "orders", "run_id": RUN, "range": True},
            "non-negative",
            id="bool",
        ),
    ],
)
def test_malformed_range_messages_are_permanent(body: Any, error: str) -> None:
    with pytest.raises(PermanentError, match=error):
        parse_range_event(range_event(body), RANGE_ALLOW)


def test_range_message_for_a_table_outside_the_allowlist_is_refused() -> None:
    body = RangeRequest(TableRef("public", "secrets"), RUN, 0).body()
    with pytest.raises(UnsafeIdentifierError):
        parse_range_event(range_event(body), RANGE_ALLOW)
