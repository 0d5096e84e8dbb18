"""The sweeper's synthetic S3 notification and status's pure helpers (no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pgsnow.events import parse_s3_event_body
from pgsnow.identifiers import TableAllowlist
from pgsnow.status import DeadLetters, StatusReport, TableStatus, format_lag, keys_in_message
from pgsnow.sweeper import build_object_created_event

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    "key",
    [
        "staging/public/orders/public_orders_batch1_20261125T120000000000Z.csv.gz",
        "staging/public/order lines/public_order lines_batch2_20261125T120000000000Z.parquet",
        "staging/Sales/Ünïcode+plus/dropped file+1.csv",
    ],
    ids=["plain", "space", "unicode-and-plus"],
)
def test_synthetic_event_parses_back_to_the_same_key(key: str) -> None:
    event = build_object_created_event(
        bucket="stage-bucket", key=key, size=42, etag='"abc"', version_id="v1", region="eu-west-1", now=NOW
    )
    [created] = parse_s3_event_body(
        json.dumps(event), bucket="stage-bucket", prefix="staging", allowlist=TableAllowlist.parse("*")
    )
    assert (created.key, created.size, created.etag, created.event_name) == (
        key,
        42,
        "abc",
        "ObjectCreated:Put",
    )
    assert event["Records"][0]["eventTime"] == "2026-11-25T12:00:00.123Z"
    assert keys_in_message(json.dumps(event)) == [key]


@pytest.mark.parametrize(
    ("body", "keys"),
    [
        ('{"Event": "s3:TestEvent"}', []),
        ("not json", []),
        ('{"Records": [{"s3": {}}]}', []),
        ('{"Records": [{"s3": {"object": {"key": "a+b%2Fc"}}}]}', ["a b/c"]),
    ],
    ids=["test-event", "not-json", "no-key", "url-encoded"],
)
def test_keys_in_dead_letter_bodies(body: str, keys: list[str]) -> None:
    assert keys_in_message(body) == keys


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0m00s"), (75, "1m15s"), (3600 * 26 + 60 * 5, "26h05m")],
    ids=["none", "zero", "minutes", "hours"],
)
def test_format_lag(seconds: int | None, text: str) -> None:
    assert format_lag(seconds) == text


def test_status_table_lines() -> None:
    report = StatusReport(
        tables=[
            TableStatus("public.orders", "20261125T120000000000Z", "failed", 3, 2, 1, 6, 4, None, None, None),
            TableStatus("public.customers", "20261125T110000000000Z", "loaded", 1, 1, 0, 5, 5, "42", "x", 75),
        ],
        dead_letters=DeadLetters(count=1, keys=["staging/public/orders/f.csv.gz"]),
    )
    assert report.format_lines() == [
        "TABLE             LAST RUN                STATE   STAGED  LOADED  FAILED  ROWS  WATERMARK  LAG",
        "public.orders     20261125T120000000000Z  failed  3       2       1       4/6   -          -",
        "public.customers  20261125T110000000000Z  loaded  1       1       0       5/5   42         1m15s",
        "",
        "dead-letter queue: 1 message(s)",
        "  staging/public/orders/f.csv.gz",
    ]


@pytest.mark.parametrize(
    ("argv", "table", "as_json"),
    [
        (["status"], None, False),
        (["status", "public.orders", "--json"], "public.orders", True),
    ],
    ids=["every-table", "one-table-json"],
)
def test_status_command_parses(argv: list[str], table: str | None, as_json: bool) -> None:
    from pgsnow.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.table.qualified if args.table else None, args.json) == (table, as_json)
