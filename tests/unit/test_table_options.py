"""PGSNOW_TABLE_OPTIONS: the defaults never duplicate, and options that would are refused at configuration."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pgsnow.config import (
    Component,
    ExtractMode,
    Settings,
    TableOptions,
    WriteMode,
    default_write_mode,
    duplication_problem,
    parse_table_options,
)
from pgsnow.errors import ConfigError
from pgsnow.identifiers import TableRef

pytestmark = pytest.mark.unit

ORDERS = TableRef("public", "orders")


def parse(body: dict[str, Any]) -> tuple[TableOptions | None, list[str]]:
    problems: list[str] = []
    options = parse_table_options(json.dumps({ORDERS.qualified: body}), problems)
    return options.get(ORDERS), problems


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({}, WriteMode.REPLACE, id="full-defaults-to-replace"),
        pytest.param(
            {"mode": "incremental", "cursor_column": "updated_at"},
            WriteMode.MERGE,
            id="incremental-defaults-to-merge",
        ),
        pytest.param(
            {"mode": "incremental", "cursor_column": "updated_at", "lookback_seconds": 300},
            WriteMode.MERGE,
            id="incremental-with-lookback-defaults-to-merge",
        ),
        pytest.param({"write_mode": "merge"}, WriteMode.MERGE, id="full-merge-chosen"),
        pytest.param(
            {"mode": "incremental", "cursor_column": "updated_at", "write_mode": "replace"},
            WriteMode.REPLACE,
            id="incremental-replace-chosen",
        ),
        pytest.param(
            {"write_mode": "append", "allow_duplicates": True}, WriteMode.APPEND, id="full-append-allowed"
        ),
        pytest.param(
            {"mode": "incremental", "cursor_column": "id", "write_mode": "append", "allow_duplicates": True},
            WriteMode.APPEND,
            id="incremental-append-allowed",
        ),
    ],
)
def test_the_write_mode_is_the_choice_or_the_mode_default(body: dict[str, Any], expected: WriteMode) -> None:
    options, problems = parse(body)

    assert problems == []
    assert options is not None and options.effective_write_mode is expected


def test_the_defaults_of_an_unlisted_table_never_append() -> None:
    assert TableOptions().write_mode is None
    assert TableOptions().effective_write_mode is WriteMode.REPLACE
    assert {default_write_mode(mode) for mode in ExtractMode} == {WriteMode.REPLACE, WriteMode.MERGE}


@pytest.mark.parametrize(
    ("body", "reason", "advice"),
    [
        pytest.param(
            {"write_mode": "append"},
            "every full run appends every row again",
            'choose write_mode "replace"',
            id="full-append",
        ),
        pytest.param(
            {
                "mode": "incremental",
                "cursor_column": "updated_at",
                "write_mode": "append",
                "lookback_seconds": 60,
            },
            "the rows within lookback_seconds=60 and at the watermark",
            'choose write_mode "merge"',
            id="incremental-append-with-lookback",
        ),
        pytest.param(
            {"mode": "incremental", "cursor_column": "updated_at", "write_mode": "append"},
            "the rows at the watermark (the next run reads cursor >= watermark)",
            'choose write_mode "merge"',
            id="incremental-append-without-lookback",
        ),
    ],
)
def test_append_that_would_duplicate_is_refused_saying_why_and_what_to_choose(
    body: dict[str, Any], reason: str, advice: str
) -> None:
    _, problems = parse(body)

    assert len(problems) == 1
    problem = problems[0]
    assert problem.startswith("PGSNOW_TABLE_OPTIONS['public.orders']: write_mode append with mode")
    assert reason in problem
    assert advice in problem
    assert '"allow_duplicates": true' in problem


def test_allow_duplicates_must_be_a_json_boolean() -> None:
    _, problems = parse({"write_mode": "append", "allow_duplicates": "yes"})

    assert (
        "PGSNOW_TABLE_OPTIONS['public.orders']: allow_duplicates must be true or false, got 'yes'" in problems
    )


def test_settings_report_a_duplicating_table_with_every_other_problem() -> None:
    env = {
        "S3_STAGE_BUCKET": "bucket",
        "PGSNOW_TABLES": "public.orders,public.customers",
        "PGSNOW_PG_DSN": "host=127.0.0.1",
        "PGSNOW_TABLE_OPTIONS": json.dumps(
            {
                "public.orders": {"write_mode": "append"},
                "public.customers": {"mode": "incremental", "cursor_column": "id", "write_mode": "append"},
            }
        ),
        "EXTRACT_BATCH_ROWS": "many",
    }

    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env, component=Component.EXTRACTOR)

    text = str(raised.value)
    assert "PGSNOW_TABLE_OPTIONS['public.orders']: write_mode append with mode full duplicates rows" in text
    assert "PGSNOW_TABLE_OPTIONS['public.customers']: write_mode append with mode incremental" in text
    assert "EXTRACT_BATCH_ROWS must be an integer" in text


def test_explicit_append_with_allow_duplicates_is_kept() -> None:
    env = {
        "S3_STAGE_BUCKET": "bucket",
        "PGSNOW_TABLES": "public.orders",
        "PGSNOW_PG_DSN": "host=127.0.0.1",
        "PGSNOW_TABLE_OPTIONS": json.dumps(
            {"public.orders": {"write_mode": "append", "allow_duplicates": True}}
        ),
    }

    settings = Settings.from_env(env, component=Component.EXTRACTOR)

    options = settings.table_options(ORDERS)
    assert (options.effective_write_mode, options.allow_duplicates) == (WriteMode.APPEND, True)
    assert duplication_problem(options) is None
