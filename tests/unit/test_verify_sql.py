"""The canonical forms and statement shapes of ``pgsnow.verify``, as SQL text.

The integration suite (tests/integration/test_verify.py) runs these statements on the real
servers; here each shape is pinned down as text, so a change to the canonical form is seen.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from psycopg2 import sql

from pgsnow.identifiers import TableRef
from pgsnow.manifest import Column
from pgsnow.typemap import map_pg_type
from pgsnow.verify import (
    NULL_TOKEN,
    HashPrefix,
    KeyRange,
    Split,
    VerifyPlan,
    Watermark,
    decode_key,
    describe_key,
    pg_bucket_query,
    pg_canonical,
    pg_count_query,
    pg_token,
    sf_bucket_query,
    sf_canonical,
    sf_count_query,
    sf_create_json_function,
    sf_rows_query,
    sf_source_value,
    sf_token,
)

pytestmark = pytest.mark.unit


def column(name: str, pg_type: str) -> Column:
    return Column.from_types(name, pg_type, pg_type, map_pg_type(pg_type), nullable=True)


def pg_text(composable: sql.Composable) -> str:
    """psycopg2 renders identifiers without a connection; literals need one, so they are
    checked through the identifier-free parts of each shape."""

    def render(part: sql.Composable) -> str:
        if isinstance(part, sql.Composed):
            return "".join(render(p) for p in part.seq)
        if isinstance(part, sql.SQL):
            return part.string
        if isinstance(part, sql.Identifier):
            return ".".join('"' + s.replace('"', '""') + '"' for s in part.strings)
        if isinstance(part, sql.Literal):
            value = part.wrapped
            return "'" + str(value).replace("'", "''") + "'" if isinstance(value, str) else str(value)
        raise TypeError(part)

    return render(composable)


SF_DECIMAL_TEXT = 'CAST("C" AS VARCHAR)'
# '.5' (the local emulator's NUMBER(p,p) text) gets its leading zero before trailing zeros are trimmed.
SF_LEADING_ZERO = (
    f"CASE WHEN LEFT({SF_DECIMAL_TEXT}, 1) = '.' THEN '0' || {SF_DECIMAL_TEXT} "
    f"WHEN LEFT({SF_DECIMAL_TEXT}, 2) = '-.' THEN '-0' || SUBSTR({SF_DECIMAL_TEXT}, 2) ELSE {SF_DECIMAL_TEXT} END"
)
CANONICAL_CASES = [
    pytest.param("integer", 'CAST("C" AS VARCHAR)', '"c"::text', id="integer"),
    pytest.param(
        "numeric(12,2)",
        f"CASE WHEN POSITION('.' IN {SF_LEADING_ZERO}) > 0 "
        f"THEN RTRIM(RTRIM({SF_LEADING_ZERO}, '0'), '.') ELSE {SF_LEADING_ZERO} END",
        "CASE WHEN position('.' IN \"c\"::text) > 0 THEN rtrim(rtrim(\"c\"::text, '0'), '.') ELSE \"c\"::text END",
        id="decimal-without-scale-padding",
    ),
    pytest.param(
        "boolean",
        "CASE WHEN \"C\" THEN 'true' WHEN NOT \"C\" THEN 'false' END",
        "CASE WHEN \"c\" THEN 'true' WHEN NOT \"c\" THEN 'false' END",
        id="boolean",
    ),
    pytest.param(
        "time",
        "TO_VARCHAR(TIMESTAMP_FROM_PARTS(TO_DATE('1970-01-01'), \"C\"), 'HH24:MI:SS.FF6')",
        "to_char(\"c\", 'HH24:MI:SS.US')",
        id="time-with-microseconds",
    ),
    pytest.param("bytea", 'LOWER(HEX_ENCODE("C"))', "encode(\"c\", 'hex')", id="binary-lower-hex"),
    pytest.param("text", '"C"', '"c"::text', id="text-as-is"),
]


@pytest.mark.parametrize("pg_type, snowflake_sql, postgres_sql", CANONICAL_CASES)
def test_canonical_text_per_kind(pg_type: str, snowflake_sql: str, postgres_sql: str) -> None:
    c = column("c", pg_type)
    assert sf_canonical(c) == snowflake_sql
    assert pg_text(pg_canonical(c)) == postgres_sql


def test_timestamptz_is_utc_with_microseconds_on_both_sides() -> None:
    c = column("at", "timestamp with time zone")
    assert sf_canonical(c) == (
        "TO_VARCHAR(CONVERT_TIMEZONE('UTC', \"AT\")::TIMESTAMP_NTZ, 'YYYY-MM-DD HH24:MI:SS.FF6') || 'Z'"
    )
    postgres = pg_text(pg_canonical(c))
    assert "to_char(\"at\" AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || 'Z'" in postgres


def test_float_spells_special_values_one_way_and_rounds_half_up() -> None:
    c = column("ratio", "double precision")
    for text in (sf_canonical(c), pg_text(pg_canonical(c))):
        assert "THEN 'NaN'" in text and "THEN 'inf'" in text and "THEN '-inf'" in text
        assert "WHEN \"RATIO\" = 0 THEN '0'" in text or "WHEN \"ratio\" = 0 THEN '0'" in text
        assert "+ 0.5" in text  # floor(v + 0.5): the same rounding in both databases
        assert "ROUND(" not in text.upper().replace("FLOOR(", "")


def test_json_is_compared_by_the_md5_of_its_canonical_text() -> None:
    c = column("doc", "jsonb")
    # Snowflake: the temporary UDF over TO_JSON (JSON null stays 'null', SQL NULL stays NULL).
    assert sf_canonical(c) == 'MD5(PGSNOW_CANONICAL_JSON(TO_JSON("DOC")))'
    assert sf_source_value(c, '"DB"."PGSNOW"."F"') == 'MD5("DB"."PGSNOW"."F"(TO_JSON("DOC")))'
    # PostgreSQL: the same text from built-in functions, the column read through the table alias
    # (a column named "value" or "path" must not be shadowed by the walk's own columns).
    postgres = pg_text(pg_canonical(c))
    assert postgres.startswith("md5((SELECT string_agg(")
    assert '"pgsnow_table"."doc"::jsonb' in postgres
    assert "WITH RECURSIVE pgsnow_walk" in postgres
    arrays = pg_text(pg_canonical(column("tags", "text[]")))
    assert 'to_jsonb("pgsnow_table"."tags")' in arrays


def test_the_snowflake_udf_is_the_canonical_json_module() -> None:
    import inspect

    from pgsnow import canonical_json

    statement = sf_create_json_function("DB", "PGSNOW")
    assert statement.startswith('CREATE OR REPLACE TEMPORARY FUNCTION "DB"."PGSNOW"."PGSNOW_CANONICAL_JSON"(')
    assert "LANGUAGE PYTHON" in statement and "STRICT" in statement
    assert "HANDLER = 'canonical_json'" in statement
    body = statement.split("AS $$", 1)[1]
    assert body == inspect.getsource(canonical_json) + "$$"


@pytest.mark.parametrize(
    "pg_type, escaped",
    [
        pytest.param("text", True, id="text"),
        pytest.param("jsonb", False, id="json-is-an-md5"),
        pytest.param("date", False, id="date"),
    ],
)
def test_tokens_mark_null_and_escape_text(pg_type: str, escaped: bool) -> None:
    c = column("v", pg_type)
    token = sf_token(c)
    assert token.startswith("COALESCE(") and token.endswith(f", '{NULL_TOKEN}')")
    assert ("REPLACE(REPLACE(" in token and "'~~'" in token and "'~|'" in token) is escaped
    assert pg_text(pg_token(c)).endswith(f", '{NULL_TOKEN}')")


@pytest.mark.parametrize(
    "text, values",
    [
        pytest.param("17", ("17",), id="one-value"),
        pytest.param("a~|b|3", ("a|b", "3"), id="escaped-separator"),
        pytest.param("~N|", (None, ""), id="null-and-empty"),
        pytest.param("~~N|x", ("~N", "x"), id="escaped-escape-is-not-null"),
    ],
)
def test_decode_key(text: str, values: tuple[str | None, ...]) -> None:
    assert decode_key(text) == values


def test_describe_key() -> None:
    assert describe_key("eu|300") == "(eu, 300)"
    assert describe_key("~N") == "NULL"


PLAN = VerifyPlan(
    TableRef("shop", "Orders"),
    "DB",
    (column("id", "bigint"), column("note", "text"), column("changed_at", "timestamp with time zone")),
    ("id",),
)


def test_count_query_reads_bounds_of_an_integer_key() -> None:
    query, params = sf_count_query(PLAN)
    assert query == 'SELECT COUNT(*), MIN("ID"), MAX("ID") FROM "DB"."SHOP"."Orders" WHERE TRUE'
    assert params == ()
    assert (
        pg_text(pg_count_query(PLAN)[0])
        == 'SELECT count(*), min("id"), max("id") FROM "shop"."Orders" WHERE true'
    )


def test_watermark_bounds_every_statement_on_both_sides() -> None:
    plan = VerifyPlan(
        PLAN.table, "DB", PLAN.columns, PLAN.primary_key, Watermark("changed_at", "2024-01-01T00:00:00Z")
    )
    query, params = sf_count_query(plan)
    assert '("CHANGED_AT" IS NULL OR "CHANGED_AT" <= %s)' in query
    assert params == ("2024-01-01T00:00:00Z",)
    rows_query, rows_params = sf_rows_query(plan, KeyRange(1, 9))
    assert rows_params == ("2024-01-01T00:00:00Z", 1, 9)
    assert '"ID" BETWEEN %s AND %s' in rows_query


def test_soft_deleted_rows_are_left_out_on_the_snowflake_side_only() -> None:
    plan = replace(PLAN, soft_deleted=True)
    query, params = sf_count_query(plan)
    assert query.endswith('WHERE TRUE AND "_PGSNOW_DELETED_AT" IS NULL')
    assert params == ()
    for statement in (
        sf_rows_query(plan, KeyRange(1, 9)),
        sf_bucket_query(plan, Split(KeyRange(1, 9), width=3)),
    ):
        assert '"_PGSNOW_DELETED_AT" IS NULL' in statement[0]
    assert "DELETED" not in pg_text(pg_count_query(plan)[0]).upper()


def test_range_buckets_use_an_exact_integer_quotient() -> None:
    query, params = sf_bucket_query(PLAN, Split(KeyRange(10, 1000), width=64))
    assert "CAST(((PGSNOW_KEY - %s) - MOD((PGSNOW_KEY - %s), %s)) / %s AS BIGINT) AS PGSNOW_BUCKET" in query
    assert "MD5(LISTAGG(PGSNOW_HASH, '') WITHIN GROUP (ORDER BY PGSNOW_HASH))" in query
    assert params == (10, 10, 64, 64, 10, 1000)
    pg_query, pg_params = pg_bucket_query(PLAN, Split(KeyRange(10, 1000), width=64))
    assert "div(pgsnow_key::numeric - %s, %s)::bigint" in pg_text(pg_query)
    assert "string_agg(pgsnow_hash, '' ORDER BY pgsnow_hash COLLATE \"C\")" in pg_text(pg_query)
    assert pg_params == (10, 64, 10, 1000)


def test_hash_buckets_filter_on_the_key_hash_prefix() -> None:
    query, params = sf_bucket_query(PLAN, Split(HashPrefix("ab"), digits=4))
    assert "SELECT SUBSTR(MD5(COALESCE(PGSNOW_C0, '~N')), 1, %s) AS PGSNOW_BUCKET" in query
    assert 'CAST("ID" AS VARCHAR) AS PGSNOW_C0' in query
    assert query.endswith("WHERE SUBSTR(MD5(COALESCE(PGSNOW_C0, '~N')), 1, %s) = %s) GROUP BY PGSNOW_BUCKET")
    assert params == (4, 2, "ab")


def test_identifiers_with_quotes_are_escaped() -> None:
    plan = VerifyPlan(TableRef("s", 'we"ird'), "DB", (column('k"ey', "integer"),), ('k"ey',))
    query, _ = sf_count_query(plan)
    assert '"DB"."S"."we""ird"' in query and 'MIN("k""ey")' in query
