"""Deliver SQS messages to a Lambda handler the way Lambda's SQS event source mapping does.

One ``run_once()`` gathers one batch and, if it holds messages, makes one invocation with an
event shaped exactly like Lambda's (``Records`` of ``aws:sqs`` records) and a context object
with the attributes handlers use. A batch is gathered as Lambda's poller gathers it: receive
after receive (SQS returns at most 10 messages each) until the batch holds ``batch_size``
messages (at most 10,000), the batching window (``batching_window_s``, at most 300 s, counted
from the start of the poll as Lambda counts it from the end of the previous invocation) has
elapsed, or the next message would take the event past Lambda's 6 MB invocation payload; a
message that would not fit waits, still received and invisible, for the next batch. With the
defaults (10 messages, no window) that is one receive, as for a mapping without a window.
What happens after the invocation follows Lambda:

* the handler returns normally, without ReportBatchItemFailures: every message is deleted;
* with ReportBatchItemFailures, the messages listed in ``batchItemFailures`` are kept and
  the rest deleted; ``None``, ``{}`` or an empty list mean all succeeded;
* a malformed response (not an object, ``batchItemFailures`` not a list, an entry without a
  non-empty ``itemIdentifier`` of a message in the batch, or not JSON-serialisable) fails
  the whole batch, as does an exception or running past the function timeout: nothing is
  deleted.

Messages that are not deleted become visible again when the queue's visibility timeout
expires, and moto's SQS moves them to the dead-letter queue after ``maxReceiveCount``
receives: redelivery and dead-lettering are the queue's real behaviour, not ours.

A handler cannot be interrupted in-process, so a timeout is detected after the handler
returns: its result is thrown away as Lambda's would be, but its side effects happened.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pgsnow.local.aws import LocalAws
from pgsnow.observability import logger

Handler = Callable[[dict[str, Any], Any], dict[str, Any] | None]

LOCAL_ACCOUNT_ID = "123456789012"  # moto's default account
MAX_RECEIVE_BATCH = 10  # SQS returns at most 10 messages per receive
# Lambda's limits for an SQS event source on a standard queue: BatchSize up to 10,000 (above 10
# only with a batching window of at least 1 s), MaximumBatchingWindowInSeconds up to 300.
MAX_BATCH_SIZE = 10_000
MAX_BATCHING_WINDOW_S = 300
# Lambda's synchronous invocation payload limit (6 MB): a batch is cut before it would pass it.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
_EVENT_ENVELOPE = len(json.dumps({"Records": []}))
# System attributes Lambda copies into each record when SQS returns them.
_RECORD_ATTRIBUTES = (
    "ApproximateReceiveCount",
    "SentTimestamp",
    "SenderId",
    "ApproximateFirstReceiveTimestamp",
    "SequenceNumber",
    "MessageGroupId",
    "MessageDeduplicationId",
    "AWSTraceHeader",
    "DeadLetterQueueSourceArn",
)


@dataclass
class DispatchStats:
    invocations: int = 0
    delivered: int = 0  # messages handed to the handler
    failed: int = 0  # messages left on the queue for redelivery
    succeeded: int = 0  # messages deleted

    def add(self, other: DispatchStats) -> None:
        self.invocations += other.invocations
        self.delivered += other.delivered
        self.failed += other.failed
        self.succeeded += other.succeeded


@dataclass
class LambdaContext:
    """The attributes and method of the Python runtime's context object that handlers use."""

    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    deadline_monotonic: float
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = ""
    identity: Any = None
    client_context: Any = None

    def __post_init__(self) -> None:
        self.log_group_name = self.log_group_name or f"/aws/lambda/{self.function_name}"
        self.log_stream_name = self.log_stream_name or f"local/[{self.function_version}]{self.aws_request_id}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline_monotonic - time.monotonic()) * 1000))

    @classmethod
    def for_invocation(
        cls, function_name: str, *, memory_mb: int, timeout_s: float, region: str = "us-east-1"
    ) -> LambdaContext:
        """The context of one invocation of ``function_name`` starting now, in the local account."""
        return cls(
            function_name=function_name,
            invoked_function_arn=f"arn:aws:lambda:{region}:{LOCAL_ACCOUNT_ID}:function:{function_name}",
            memory_limit_in_mb=memory_mb,
            deadline_monotonic=time.monotonic() + timeout_s,
        )


class InvalidBatchResponse(Exception):
    """The handler's response is not a valid partial-batch response: Lambda fails the whole batch."""


class SqsDispatcher:
    def __init__(
        self,
        aws: LocalAws,
        queue_url: str,
        handler: Handler,
        *,
        batch_size: int = MAX_RECEIVE_BATCH,
        batching_window_s: int = 0,
        wait_seconds: int = 1,
        function_timeout_s: int = 60,
        report_batch_item_failures: bool = True,
        function_name: str = "pgsnow-loader",
        memory_limit_in_mb: int = 1024,
    ) -> None:
        check_batching(batch_size, batching_window_s)
        self.aws = aws
        self.queue_url = queue_url
        self.handler = handler
        self.batch_size = batch_size
        self.batching_window_s = batching_window_s
        self.wait_seconds = wait_seconds
        self.function_timeout_s = function_timeout_s
        self.report_batch_item_failures = report_batch_item_failures
        self.function_name = function_name
        self.memory_limit_in_mb = memory_limit_in_mb
        self.stats = DispatchStats()  # totals over every run_once, including the background thread
        self._sqs = aws.client("sqs")
        self._queue_arn = str(
            self._sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
                "QueueArn"
            ]
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Received messages that did not fit the last batch's payload: the next batch starts with them.
        self._held: list[dict[str, Any]] = []

    # -- one batch, one invocation ------------------------------------------------------

    def run_once(self, wait_seconds: int | None = None, *, close_when_empty: bool = False) -> DispatchStats:
        """Gather one batch (the first receive long-polls up to ``wait_seconds``, default the
        dispatcher's); if it holds anything, invoke the handler once and settle the batch.

        ``close_when_empty`` ends the batching window at the first receive that finds nothing: for
        a drain, where nothing more is being sent, so waiting out the window would invoke with
        the same messages, only later."""
        messages = self.gather(self.wait_seconds if wait_seconds is None else wait_seconds, close_when_empty)
        stats = DispatchStats()
        if messages:
            stats = self._invoke(messages)
        with self._lock:
            self.stats.add(stats)
        return stats

    def gather(self, wait_seconds: int, close_when_empty: bool = False) -> list[dict[str, Any]]:
        """One batch of received messages, cut by size, window or payload as Lambda cuts it."""
        window_ends = time.monotonic() + self.batching_window_s
        batch: list[dict[str, Any]] = []
        payload = _EVENT_ENVELOPE
        pending, self._held = self._held, []
        first = True
        while len(batch) < self.batch_size:
            if not pending:
                remaining = window_ends - time.monotonic()
                if not first and (remaining <= 0 or self._stop.is_set()):
                    break
                # Inside the window each receive waits at most a second, so the window's end and
                # stop() are honoured within a second.
                wait = wait_seconds if first else min(1, max(0, int(remaining)))
                pending = self._receive(min(MAX_RECEIVE_BATCH, self.batch_size - len(batch)), wait)
                first = False
                if not pending:
                    if close_when_empty or (not batch and self.batching_window_s == 0):
                        break
                    if wait == 0:  # a short poll found nothing: do not spin on the endpoint
                        time.sleep(min(0.05, max(0.0, remaining)))
                    continue
            message = pending.pop(0)
            size = len(json.dumps(self.record(message)).encode()) + (2 if batch else 0)  # ", "
            if payload + size > MAX_PAYLOAD_BYTES:
                pending.insert(0, message)
                break
            batch.append(message)
            payload += size
        self._held = pending  # still invisible to other consumers: they wait for the next batch
        return batch

    def _receive(self, count: int, wait_seconds: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self._sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=wait_seconds,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        return messages

    def _invoke(self, messages: list[dict[str, Any]]) -> DispatchStats:
        event = {"Records": [self.record(message) for message in messages]}
        context = self.context()
        started = time.monotonic()
        message_ids = [message["MessageId"] for message in messages]
        try:
            response = self.handler(event, context)
            if time.monotonic() - started > self.function_timeout_s:
                raise TimeoutError(f"Task timed out after {self.function_timeout_s} seconds")
            failed_ids = self._failed_ids(response, set(message_ids))
        except Exception as exc:
            # What Lambda does with a failed invocation: nothing is deleted.
            logger.warning(
                "handler invocation failed; the whole batch stays on the queue",
                extra={"error": type(exc).__name__, "detail": str(exc), "messages": len(messages)},
            )
            failed_ids = set(message_ids)
        to_delete = [message for message in messages if message["MessageId"] not in failed_ids]
        self._delete(to_delete)
        return DispatchStats(
            invocations=1,
            delivered=len(messages),
            failed=len(messages) - len(to_delete),
            succeeded=len(to_delete),
        )

    def _failed_ids(self, response: Any, batch_ids: set[str]) -> set[str]:
        json.dumps(response)  # Lambda serialises the response; an unserialisable one fails the invocation
        if not self.report_batch_item_failures or response is None:
            return set()
        if not isinstance(response, dict):
            raise InvalidBatchResponse(f"response must be an object, got {type(response).__name__}")
        failures = response.get("batchItemFailures")
        if failures is None:
            return set()
        if not isinstance(failures, list):
            raise InvalidBatchResponse("batchItemFailures must be a list")
        failed: set[str] = set()
        for failure in failures:
            identifier = failure.get("itemIdentifier") if isinstance(failure, dict) else None
            if not isinstance(identifier, str) or identifier == "" or identifier not in batch_ids:
                raise InvalidBatchResponse(f"invalid batchItemFailures entry {failure!r}")
            failed.add(identifier)
        return failed

    def _delete(self, messages: list[dict[str, Any]]) -> None:
        for start in range(0, len(messages), MAX_RECEIVE_BATCH):
            chunk = messages[start : start + MAX_RECEIVE_BATCH]
            result = self._sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                    for index, message in enumerate(chunk)
                ],
            )
            if result.get("Failed"):
                logger.warning("some messages could not be deleted", extra={"failed": result["Failed"]})

    # -- event and context shapes ------------------------------------------------------

    def record(self, message: dict[str, Any]) -> dict[str, Any]:
        """One SQS message as a record of Lambda's SQS event."""
        return lambda_sqs_record(message, queue_arn=self._queue_arn, region=self.aws.region)

    def context(self) -> LambdaContext:
        return LambdaContext.for_invocation(
            self.function_name,
            memory_mb=self.memory_limit_in_mb,
            timeout_s=self.function_timeout_s,
            region=self.aws.region,
        )

    # -- draining and running in the background -------------------------------------------

    def run_until_idle(self, idle_polls: int = 2, max_seconds: float = 300) -> DispatchStats:
        """Poll until ``idle_polls`` polls in a row find the queue empty, or ``max_seconds`` pass.

        A poll counts as idle only if nothing was received *and* no message is in flight
        (waiting out a visibility timeout), so failed messages are followed through their
        redeliveries to the dead-letter queue before this returns.

        A poll long-polls (``wait_seconds``) only while messages are in flight, to return as soon
        as one becomes visible again. With nothing in flight it does not wait: the local queue
        holds a notification from the moment its object is written, so an empty receive is an
        answer, and waiting would only add ``idle_polls`` times ``wait_seconds`` to every drain.
        For the same reason a drain closes a batch's window at its first empty receive.
        """
        total = DispatchStats()
        deadline = time.monotonic() + max_seconds
        idle = 0
        in_flight = self._in_flight()
        while idle < idle_polls and time.monotonic() < deadline:
            stats = self.run_once(wait_seconds=self.wait_seconds if in_flight else 0, close_when_empty=True)
            total.add(stats)
            in_flight = self._in_flight()
            idle = idle + 1 if stats.delivered == 0 and in_flight == 0 else 0
        return total

    def _in_flight(self) -> int:
        attributes = self._sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessagesDelayed"],
        )["Attributes"]
        return int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)) + int(
            attributes.get("ApproximateNumberOfMessagesDelayed", 0)
        )

    def start(self) -> None:
        """Poll in a background thread until ``stop()``."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._poll_forever, name=f"sqs-dispatcher-{self.function_name}"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; waits for the current poll and invocation to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # the queue endpoint went away or hiccupped: keep serving
                logger.warning(
                    "polling the queue failed", extra={"error": type(exc).__name__, "detail": str(exc)}
                )
                self._stop.wait(1.0)


def lambda_sqs_record(message: dict[str, Any], *, queue_arn: str, region: str) -> dict[str, Any]:
    """One message as ReceiveMessage returns it, as a record of Lambda's SQS event."""
    attributes = message.get("Attributes", {})
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": {name: attributes[name] for name in _RECORD_ATTRIBUTES if name in attributes},
        "messageAttributes": {
            name: _message_attribute(value) for name, value in message.get("MessageAttributes", {}).items()
        },
        "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


def check_batching(batch_size: int, batching_window_s: int) -> None:
    """Lambda's rules for an SQS event source's BatchSize and MaximumBatchingWindowInSeconds."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}")
    if not 0 <= batching_window_s <= MAX_BATCHING_WINDOW_S:
        raise ValueError(f"batching_window_s must be 0..{MAX_BATCHING_WINDOW_S}, got {batching_window_s}")
    if batch_size > MAX_RECEIVE_BATCH and batching_window_s < 1:
        raise ValueError(f"a batch_size above {MAX_RECEIVE_BATCH} needs a batching window of at least 1 s")


def _message_attribute(value: dict[str, Any]) -> dict[str, Any]:
    """boto3's MessageAttributeValue in Lambda's camelCase shape (binary as base64 text)."""
    shaped: dict[str, Any] = {}
    if "StringValue" in value:
        shaped["stringValue"] = value["StringValue"]
    if "BinaryValue" in value:
        shaped["binaryValue"] = base64.b64encode(value["BinaryValue"]).decode("ascii")
    shaped["stringListValues"] = list(value.get("StringListValues", []))
    shaped["binaryListValues"] = [
        base64.b64encode(item).decode("ascii") for item in value.get("BinaryListValues", [])
    ]
    shaped["dataType"] = value["DataType"]
    return shaped
