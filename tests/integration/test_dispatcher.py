"""The SQS -> handler dispatcher against a moto server: Lambda's event shape and batch semantics."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import pytest

from pgsnow.local.aws import LocalAws, create_staging_resources
from pgsnow.local.dispatcher import MAX_PAYLOAD_BYTES, DispatchStats, SqsDispatcher

pytestmark = pytest.mark.integration

VISIBILITY_TIMEOUT_S = 1
MAX_RECEIVE_COUNT = 3


@dataclass(frozen=True)
class Queues:
    url: str
    arn: str
    dlq_url: str


@pytest.fixture
def queues(aws: LocalAws) -> Queues:
    """A queue with a 1 s visibility timeout whose messages go to a DLQ after 3 receives."""
    sqs = aws.client("sqs")
    name = f"pgsnow-dispatch-{uuid.uuid4().hex[:12]}"
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)}
    url = sqs.create_queue(
        QueueName=name,
        Attributes={"VisibilityTimeout": str(VISIBILITY_TIMEOUT_S), "RedrivePolicy": json.dumps(redrive)},
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return Queues(url=url, arn=arn, dlq_url=dlq_url)


@dataclass
class RecordingHandler:
    """A Lambda handler that records its invocations and answers with ``respond(event)``."""

    respond: Callable[[dict[str, Any]], Any] = lambda event: None
    events: list[dict[str, Any]] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        self.events.append(event)
        self.contexts.append(context)
        return self.respond(event)

    def bodies(self) -> list[str]:
        return [record["body"] for event in self.events for record in event["Records"]]


def send(aws: LocalAws, queue_url: str, bodies: list[str]) -> None:
    sqs = aws.client("sqs")
    for body in bodies:
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)


def visible_bodies(aws: LocalAws, queue_url: str) -> list[str]:
    """Bodies of the messages visible now, read without a handler (and deleted)."""
    sqs = aws.client("sqs")
    bodies: list[str] = []
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
        for message in messages:
            bodies.append(message["Body"])
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return sorted(bodies)


def queue_counts(aws: LocalAws, queue_url: str) -> tuple[int, int]:
    attributes = aws.client("sqs").get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def test_event_and_context_have_lambdas_shape(aws: LocalAws, queues: Queues) -> None:
    # Given one message with a string and a binary message attribute
    body = json.dumps({"hello": "wörld"})
    aws.client("sqs").send_message(
        QueueUrl=queues.url,
        MessageBody=body,
        MessageAttributes={
            "kind": {"DataType": "String", "StringValue": "test"},
            "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
        },
    )
    handler = RecordingHandler()
    dispatcher = SqsDispatcher(aws, queues.url, handler, function_timeout_s=30, function_name="pgsnow-loader")

    # When it is dispatched
    stats = dispatcher.run_once()

    # Then the handler got Lambda's SQS event and context, and the message was deleted
    assert stats == DispatchStats(invocations=1, delivered=1, failed=0, succeeded=1)
    (event,) = handler.events
    assert list(event) == ["Records"]
    (record,) = event["Records"]
    assert set(record) == {
        "messageId",
        "receiptHandle",
        "body",
        "attributes",
        "messageAttributes",
        "md5OfBody",
        "eventSource",
        "eventSourceARN",
        "awsRegion",
    }
    assert record["body"] == body
    assert record["md5OfBody"] == hashlib.md5(body.encode()).hexdigest()
    assert (record["eventSource"], record["eventSourceARN"], record["awsRegion"]) == (
        "aws:sqs",
        queues.arn,
        "us-east-1",
    )
    assert set(record["attributes"]) == {
        "ApproximateReceiveCount",
        "SentTimestamp",
        "SenderId",
        "ApproximateFirstReceiveTimestamp",
    }
    assert record["attributes"]["ApproximateReceiveCount"] == "1"
    assert record["messageAttributes"] == {
        "kind": {"stringValue": "test", "stringListValues": [], "binaryListValues": [], "dataType": "String"},
        "blob": {"binaryValue": "AAE=", "stringListValues": [], "binaryListValues": [], "dataType": "Binary"},
    }
    json.dumps(event)  # a real event is plain JSON

    (context,) = handler.contexts
    assert context.function_name == "pgsnow-loader"
    assert context.invoked_function_arn == "arn:aws:lambda:us-east-1:123456789012:function:pgsnow-loader"
    assert context.memory_limit_in_mb == 1024
    assert uuid.UUID(context.aws_request_id)
    assert 25_000 < context.get_remaining_time_in_millis() <= 30_000
    assert queue_counts(aws, queues.url) == (0, 0)


def test_batches_are_at_most_batch_size(aws: LocalAws, queues: Queues) -> None:
    # Given 7 messages and a batch size of 3
    send(aws, queues.url, [f"m{i}" for i in range(7)])
    handler = RecordingHandler()
    dispatcher = SqsDispatcher(aws, queues.url, handler, batch_size=3, wait_seconds=0)

    # When the queue is drained
    stats = dispatcher.run_until_idle(max_seconds=30)

    # Then every message was delivered once, in batches of up to 3
    assert sorted(handler.bodies()) == [f"m{i}" for i in range(7)]
    assert all(1 <= len(event["Records"]) <= 3 for event in handler.events)
    assert (stats.delivered, stats.succeeded, stats.failed) == (7, 7, 0)
    assert stats.invocations == len(handler.events)


def fail_bodies(*bodies: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def respond(event: dict[str, Any]) -> dict[str, Any]:
        return {
            "batchItemFailures": [
                {"itemIdentifier": record["messageId"]}
                for record in event["Records"]
                if record["body"] in bodies
            ]
        }

    return respond


def test_partial_batch_failure_deletes_only_the_successes(aws: LocalAws, queues: Queues) -> None:
    # Given five messages and a handler that reports two of them as failed
    send(aws, queues.url, ["a", "b", "c", "d", "e"])
    dispatcher = SqsDispatcher(aws, queues.url, RecordingHandler(fail_bodies("b", "d")), wait_seconds=0)

    # When they are dispatched (moto may split them over more than one receive)
    stats = DispatchStats()
    deadline = time.monotonic() + 10
    while stats.delivered < 5 and time.monotonic() < deadline:
        stats.add(dispatcher.run_once())

    # Then three were deleted and the two failures come back after the visibility timeout
    assert (stats.delivered, stats.succeeded, stats.failed) == (5, 3, 2)
    assert queue_counts(aws, queues.url) == (0, 2)
    deadline = time.monotonic() + VISIBILITY_TIMEOUT_S + 10
    while queue_counts(aws, queues.url) != (2, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert visible_bodies(aws, queues.url) == ["b", "d"]


def identifiers(event: dict[str, Any]) -> list[str]:
    return [record["messageId"] for record in event["Records"]]


@pytest.mark.parametrize(
    ("respond", "deleted"),
    [
        pytest.param(lambda event: None, True, id="none-is-success"),
        pytest.param(lambda event: {}, True, id="empty-object-is-success"),
        pytest.param(lambda event: {"batchItemFailures": []}, True, id="empty-list-is-success"),
        pytest.param(lambda event: {"batchItemFailures": None}, True, id="null-list-is-success"),
        pytest.param(lambda event: {"statusCode": 200}, True, id="other-keys-are-ignored"),
        pytest.param(lambda event: "ok", False, id="not-an-object"),
        pytest.param(lambda event: {"batchItemFailures": "x"}, False, id="failures-not-a-list"),
        pytest.param(
            lambda event: {"batchItemFailures": [{"itemIdentifier": ""}]}, False, id="empty-identifier"
        ),
        pytest.param(
            lambda event: {"batchItemFailures": [{"itemIdentifier": None}]}, False, id="null-identifier"
        ),
        pytest.param(
            lambda event: {"batchItemFailures": [{"id": identifiers(event)[0]}]}, False, id="bad-key-name"
        ),
        pytest.param(
            lambda event: {"batchItemFailures": [{"itemIdentifier": "not-in-this-batch"}]},
            False,
            id="unknown-id",
        ),
        pytest.param(lambda event: {"batchItemFailures": [], "when": object()}, False, id="not-serialisable"),
    ],
)
def test_response_validation_follows_lambda(
    aws: LocalAws, queues: Queues, respond: Callable[[dict[str, Any]], Any], deleted: bool
) -> None:
    # Given two messages
    send(aws, queues.url, ["x", "y"])
    dispatcher = SqsDispatcher(aws, queues.url, RecordingHandler(respond), wait_seconds=0)

    # When a batch is dispatched and the handler answers with the response under test
    stats = dispatcher.run_once()

    # Then a valid response deletes the batch and a malformed one fails all of it
    assert stats.delivered >= 1
    expected = (stats.delivered, 0) if deleted else (0, stats.delivered)
    assert (stats.succeeded, stats.failed) == expected
    assert queue_counts(aws, queues.url)[1] == (0 if deleted else stats.delivered)


def test_without_report_batch_item_failures_the_response_is_ignored(aws: LocalAws, queues: Queues) -> None:
    send(aws, queues.url, ["x"])
    dispatcher = SqsDispatcher(
        aws, queues.url, RecordingHandler(fail_bodies("x")), wait_seconds=0, report_batch_item_failures=False
    )

    assert dispatcher.run_once() == DispatchStats(invocations=1, delivered=1, failed=0, succeeded=1)
    assert queue_counts(aws, queues.url) == (0, 0)


def test_a_handler_past_its_timeout_fails_the_batch(aws: LocalAws, queues: Queues) -> None:
    send(aws, queues.url, ["slow"])

    def slow(event: dict[str, Any]) -> None:
        time.sleep(1.2)  # the subject: a handler that runs past its one-second timeout

    dispatcher = SqsDispatcher(aws, queues.url, RecordingHandler(slow), wait_seconds=0, function_timeout_s=1)

    assert dispatcher.run_once() == DispatchStats(invocations=1, delivered=1, failed=1, succeeded=0)


def test_a_failing_handler_is_retried_then_dead_lettered(aws: LocalAws, queues: Queues) -> None:
    # Given a handler that always raises
    send(aws, queues.url, ["poison"])

    def explode(event: dict[str, Any]) -> None:
        raise RuntimeError("cannot load this file")

    handler = RecordingHandler(explode)
    dispatcher = SqsDispatcher(aws, queues.url, handler, wait_seconds=1)

    # When the dispatcher runs until the queue settles
    stats = dispatcher.run_until_idle(max_seconds=30)

    # Then the message was delivered maxReceiveCount times, nothing was deleted, and it is in the DLQ
    receive_counts = [
        event["Records"][0]["attributes"]["ApproximateReceiveCount"] for event in handler.events
    ]
    assert receive_counts == [str(n) for n in range(1, MAX_RECEIVE_COUNT + 1)]
    assert stats == DispatchStats(
        invocations=MAX_RECEIVE_COUNT, delivered=MAX_RECEIVE_COUNT, failed=MAX_RECEIVE_COUNT, succeeded=0
    )
    assert queue_counts(aws, queues.url) == (0, 0)
    assert visible_bodies(aws, queues.dlq_url) == ["poison"]


def test_background_thread_delivers_until_stopped(aws: LocalAws, queues: Queues) -> None:
    # Given a dispatcher polling in the background
    handler = RecordingHandler()
    dispatcher = SqsDispatcher(aws, queues.url, handler, wait_seconds=1)
    dispatcher.start()
    try:
        # When messages arrive
        send(aws, queues.url, ["one", "two", "three"])
        deadline = time.monotonic() + 15
        while len(handler.bodies()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        dispatcher.stop()

    # Then they were all handled and deleted, and nothing polls after stop()
    assert sorted(handler.bodies()) == ["one", "three", "two"]
    assert dispatcher.stats.succeeded == 3
    send(aws, queues.url, ["after-stop"])
    time.sleep(0.5)  # a wall-clock wait: there is no event for "nothing happened", only time for a stray poll
    assert "after-stop" not in handler.bodies()
    assert queue_counts(aws, queues.url) == (1, 0)


def test_s3_upload_reaches_the_handler_as_an_s3_event(aws: LocalAws) -> None:
    # Given the staging resources and a dispatcher on the loader queue
    staging = create_staging_resources(aws, bucket=f"pgsnow-{uuid.uuid4().hex[:12]}", visibility_timeout=2)
    handler = RecordingHandler()
    dispatcher = SqsDispatcher(aws, staging.queue_url, handler, wait_seconds=0)
    key = "staging/public/orders/public orders é_batch1.csv.gz"

    # When a data file is uploaded
    aws.client("s3").put_object(Bucket=staging.bucket, Key=key, Body=b"id\n1\n")
    dispatcher.run_until_idle(max_seconds=30)

    # Then the handler saw the s3:TestEvent from setup and then the object's S3 event
    messages = [json.loads(body) for body in handler.bodies()]
    assert [m.get("Event") for m in messages if "Records" not in m] == ["s3:TestEvent"]
    (s3_event,) = [m for m in messages if "Records" in m]
    (record,) = s3_event["Records"]
    assert record["eventSource"] == "aws:s3"
    assert record["s3"]["bucket"]["name"] == staging.bucket
    assert unquote_plus(record["s3"]["object"]["key"]) == key


def hold_for(aws: LocalAws, queue_url: str, seconds: int) -> None:
    """A visibility timeout longer than the batching window, as Lambda's advice asks: a message
    received early in the window must stay invisible until the batch is settled."""
    aws.client("sqs").set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": str(seconds)})


def send_many(aws: LocalAws, queue_url: str, bodies: list[str]) -> None:
    sqs = aws.client("sqs")
    for start in range(0, len(bodies), 10):
        entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies[start : start + 10])]
        assert not sqs.send_message_batch(QueueUrl=queue_url, Entries=entries).get("Failed")


def test_a_batch_above_ten_is_gathered_over_several_receives(aws: LocalAws, queues: Queues) -> None:
    # Given 30 messages and a batch size of 23 (SQS returns at most 10 per receive)
    hold_for(aws, queues.url, 60)
    send_many(aws, queues.url, [f"m{i:02}" for i in range(30)])
    handler = RecordingHandler()
    dispatcher = SqsDispatcher(aws, queues.url, handler, batch_size=23, batching_window_s=30, wait_seconds=0)

    # When one batch is dispatched, then the queue drained
    first = dispatcher.run_once()
    rest = dispatcher.run_until_idle(max_seconds=30)

    # Then the first invocation got exactly 23 messages, the drain the other 7, each once
    assert first == DispatchStats(invocations=1, delivered=23, failed=0, succeeded=23)
    assert [len(event["Records"]) for event in handler.events] == [23, 7]
    assert sorted(handler.bodies()) == [f"m{i:02}" for i in range(30)]
    assert rest.delivered == 7
    assert queue_counts(aws, queues.url) == (0, 0)


def test_the_batching_window_gathers_messages_sent_during_it(aws: LocalAws, queues: Queues) -> None:
    # Given two messages now and a sender that adds three more a second later
    hold_for(aws, queues.url, 60)
    send_many(aws, queues.url, ["early-1", "early-2"])
    handler = RecordingHandler()
    dispatcher = SqsDispatcher(aws, queues.url, handler, batch_size=100, batching_window_s=4, wait_seconds=0)
    late = threading.Timer(1.0, send_many, args=(aws, queues.url, ["late-1", "late-2", "late-3"]))

    # When one batch is dispatched with a 4-second window
    late.start()
    try:
        stats = dispatcher.run_once()
    finally:
        late.join()

    # Then the one invocation holds the messages sent before and during the window
    assert stats == DispatchStats(invocations=1, delivered=5, failed=0, succeeded=5)
    (event,) = handler.events
    assert sorted(record["body"] for record in event["Records"]) == [
        "early-1",
        "early-2",
        "late-1",
        "late-2",
        "late-3",
    ]


def test_a_batch_is_cut_before_the_payload_passes_six_mb(aws: LocalAws, queues: Queues) -> None:
    # Given 30 messages of 240 KB (7 MB together) and a batch size that would take them all
    hold_for(aws, queues.url, 60)
    bodies = [f"{i:02}" + "x" * (240 * 1024) for i in range(30)]
    send(aws, queues.url, bodies)  # one by one: a SendMessageBatch request is limited to 1 MB
    handler = RecordingHandler()
    dispatcher = SqsDispatcher(
        aws, queues.url, handler, batch_size=1000, batching_window_s=30, wait_seconds=0
    )

    # When the queue is drained
    stats = dispatcher.run_until_idle(max_seconds=60)

    # Then each event fits Lambda's 6 MB payload, the first is full (one more record would not
    # fit), and every message was delivered once, on its first receive: the ones that did not fit
    # waited for the next batch without going back to the queue
    sizes = [len(json.dumps(event).encode()) for event in handler.events]
    assert all(size <= MAX_PAYLOAD_BYTES for size in sizes)
    first, second = handler.events
    one_more = {"Records": first["Records"] + second["Records"][:1]}
    assert len(json.dumps(one_more).encode()) > MAX_PAYLOAD_BYTES
    assert sorted(handler.bodies()) == sorted(bodies)
    assert {r["attributes"]["ApproximateReceiveCount"] for e in handler.events for r in e["Records"]} == {"1"}
    assert (stats.invocations, stats.delivered, stats.succeeded) == (2, 30, 30)


@pytest.mark.parametrize(
    ("batch_size", "window", "accepted"),
    [
        pytest.param(10, 0, True, id="ten-without-window"),
        pytest.param(11, 0, False, id="above-ten-needs-a-window"),
        pytest.param(11, 1, True, id="above-ten-with-a-window"),
        pytest.param(10_000, 300, True, id="lambdas-maximums"),
        pytest.param(10_001, 1, False, id="batch-above-10000"),
        pytest.param(0, 0, False, id="empty-batch"),
        pytest.param(10, 301, False, id="window-above-300"),
    ],
)
def test_batching_follows_lambdas_limits(
    aws: LocalAws, queues: Queues, batch_size: int, window: int, accepted: bool
) -> None:
    def build() -> SqsDispatcher:
        return SqsDispatcher(
            aws, queues.url, RecordingHandler(), batch_size=batch_size, batching_window_s=window
        )

    if accepted:
        assert (build().batch_size, build().batching_window_s) == (batch_size, window)
    else:
        with pytest.raises(ValueError, match="batch"):
            build()
