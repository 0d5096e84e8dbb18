"""The local Snowflake's rewrite of TRIM with characters (fakesnow would drop the characters)."""

from __future__ import annotations

import duckdb
import pytest
import sqlglot
from fakesnow.transforms import trim_cast_varchar

from pgsnow.local.sf_function_sql import rewrite_trim_characters

pytestmark = pytest.mark.unit


def _run_as_fakesnow_would(snowflake_sql: str) -> object:
    """Translate like fakesnow's TRIM step, then let DuckDB evaluate it."""
    translated = sqlglot.parse_one(snowflake_sql, read="snowflake").transform(trim_cast_varchar)
    row = duckdb.sql(translated.sql(dialect="duckdb")).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.parametrize(
    ("snowflake_sql", "expected"),
    [
        ("SELECT RTRIM('3.00', '0')", "3."),
        ("SELECT RTRIM(RTRIM('3.00', '0'), '.')", "3"),
        ("SELECT RTRIM(CAST(150000000000000 AS VARCHAR), '0')", "15"),
        ("SELECT RTRIM(TO_VARCHAR(CAST(150000000000000 AS BIGINT)), '0')", "15"),
        ("SELECT LTRIM('  xxab', ' x')", "ab"),
        ("SELECT TRIM('0012300', '0')", "123"),
        ("SELECT TRIM('  spaced  ')", "spaced"),
    ],
    ids=[
        "rtrim-zeros",
        "nested-rtrim",
        "rtrim-of-cast",
        "rtrim-of-to-varchar",
        "ltrim-set",
        "trim-both",
        "trim-spaces",
    ],
)
def test_trim_with_characters_evaluates_like_snowflake(snowflake_sql: str, expected: str) -> None:
    assert _run_as_fakesnow_would(rewrite_trim_characters(snowflake_sql)) == expected


def test_fakesnow_alone_drops_the_characters() -> None:
    """Why the rewrite exists: without it the characters are lost (fakesnow 0.11.14)."""
    assert _run_as_fakesnow_would("SELECT RTRIM('3.00', '0')") == "3.00"


@pytest.mark.parametrize(
    "snowflake_sql",
    [
        "SELECT TRIM(x) FROM t",
        "SELECT RTRIM(CAST(x AS VARCHAR), '0') FROM t",
        "SELECT 1",
    ],
    ids=["no-characters", "already-cast", "no-trim"],
)
def test_other_statements_pass_unchanged(snowflake_sql: str) -> None:
    assert rewrite_trim_characters(snowflake_sql) == snowflake_sql


@pytest.mark.parametrize(
    ("snowflake_sql", "rewritten"),
    [
        (
            'SELECT RTRIM("A", \'0\') AS "T" FROM "DB"."S"."X"',
            'SELECT RTRIM(CAST("A" AS VARCHAR), \'0\') AS "T" FROM "DB"."S"."X"',
        ),
        (
            "SELECT rtrim( f(a, b) || 'x' , '0') FROM t WHERE y = %s",
            "SELECT rtrim( CAST(f(a, b) || 'x' AS VARCHAR) , '0') FROM t WHERE y = %s",
        ),
        (
            "SELECT RTRIM(x, '0'); SELECT LTRIM(y, '-')",
            "SELECT RTRIM(CAST(x AS VARCHAR), '0'); SELECT LTRIM(CAST(y AS VARCHAR), '-')",
        ),
        (
            "SELECT TRIM(CAST(a AS INT) + 1, '0')",
            "SELECT TRIM(CAST(CAST(a AS INT) + 1 AS VARCHAR), '0')",
        ),
    ],
    ids=["only-the-operand", "placeholder-and-nested-call", "two-statements", "cast-to-another-type"],
)
def test_only_the_trim_operand_gains_a_cast(snowflake_sql: str, rewritten: str) -> None:
    assert rewrite_trim_characters(snowflake_sql) == rewritten
