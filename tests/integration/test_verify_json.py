"""JSON columns in ``pgsnow verify``: one canonical text computed by PostgreSQL's SQL and by the
Snowflake UDF (pgsnow.canonical_json), so a changed number or string inside a document is found
while key order and number spelling are not mistaken for differences.

Three layers, each on real servers: PostgreSQL's SQL against the Python module on generated
documents; the local Snowflake running the UDF it is sent; and verify on replicated tables.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import snowflake.connector.errors
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection

from pgsnow.canonical_json import canonical_json
from pgsnow.demo.pipeline import replicate_table
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import SNOWFLAKE_DATABASE, LocalStack, load_function_handler
from pgsnow.postgres import connect
from pgsnow.verify import (
    json_function_name,
    pg_canonical_json,
    prepare_snowflake_session,
    sf_create_json_function,
    verify_table,
)

if TYPE_CHECKING:
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

SEED = 20261125
GENERATED_DOCUMENTS = 400
KEYS = ["a", "b", "aa", "", "é", "日本", "a.b", 'q"uote', "back\\slash", "new\nline", "value", "path", "1"]

HANDPICKED = [
    '{"b": 1, "aa": 2}',
    '{"a": 1.10}',
    '{"a": 0.0000000001}',
    "100.00",
    "-0.0",
    "12345678901234567890123456789012345678",
    "123456789012345678901234567890123456789012",
    "0.1234567890123456789",
    "0.1234567890123455",
    "-0.1234567890123455",
    "9.9999999999999999",
    "1e400",
    "1e-400",
    '["x", [], {}, null, true, false]',
    '{"\\u00e9": "\\u2028", "": ""}',
    "null",
    '"\\\\N"',
    '{"value": {"path": [1, [2, [3]]]}}',
]


def _number(rng: random.Random) -> str:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40))).lstrip("0") or "0"
    sign = rng.choice(["", "-"])
    match rng.randint(0, 3):
        case 0:
            return sign + digits  # an integer, up to 40 digits
        case 1:
            scale = rng.randint(1, len(digits) + 5)
            padded = digits.rjust(scale + 1, "0")
            return sign + padded[:-scale] + "." + padded[-scale:]
        case 2:
            return (
                sign + digits[:1] + ("." + digits[1:] if len(digits) > 1 else "") + f"e{rng.randint(-60, 60)}"
            )
        case _:
            return sign + str(rng.choice([0, 1, 10, 100, 2**53, 2**63 - 1]))


def _string(rng: random.Random) -> str:
    alphabet = ["a", "Z", " ", "|", "~", "\\", '"', "\n", "\t", "é", "\u2028", "日", "😀", "N", "0"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))


def _value(rng: random.Random, depth: int) -> str:
    kind = rng.randint(0, 6 if depth < 3 else 4)
    if kind == 0:
        return "null"
    if kind == 1:
        return rng.choice(["true", "false"])
    if kind in (2, 3):
        return _number(rng)
    if kind == 4:
        return json.dumps(_string(rng), ensure_ascii=rng.random() < 0.5)
    if kind == 5:
        members = {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
        return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in members.items()) + "}"
    return "[" + ", ".join(_value(rng, depth + 1) for _ in range(rng.randint(0, 4))) + "]"


def generated_documents() -> list[str]:
    rng = random.Random(SEED)
    return HANDPICKED + [_value(rng, 0) for _ in range(GENERATED_DOCUMENTS)]


class BeyondDouble(ValueError):
    """A number no double holds: Snowflake has no second spelling for it."""


def within_double_range(documents: list[str]) -> list[str]:
    """The documents Snowflake can hold: a number beyond the range of doubles (1e400, 1e-400)
    it cannot store at all, exactly or not, so verify rightly reports those rows as different."""
    held = []
    for document in documents:
        try:
            snowflake_spelling(document)
        except BeyondDouble:
            continue
        held.append(document)
    return held


def snowflake_spelling(document: str) -> str:
    """The same value as Snowflake may print it: keys reordered, numbers as doubles or trimmed."""
    rng = random.Random(document)

    def respell(value: Any) -> Any:
        if isinstance(value, dict):
            items = [(k, respell(v)) for k, v in value.items()]
            rng.shuffle(items)
            return dict(items)
        if isinstance(value, list):
            return [respell(v) for v in value]
        return value

    def number(text: str) -> Any:
        value = Decimal(text)
        if value == value.to_integral_value() and abs(value) < 10**38:
            return int(value)  # Snowflake keeps integers below 10^38 exact
        if not Decimal("1e-300") < abs(value) < Decimal("1e300"):
            raise BeyondDouble(text)
        return float(value)  # otherwise a double

    parsed = json.loads(document, parse_float=number, parse_int=number)
    return json.dumps(respell(parsed), ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- fixtures


# The module's stack and schema are conftest's ``pipeline``; these are its parts.


@pytest.fixture(scope="module")
def setup_conn(pipeline: PipelineHarness) -> PgConnection:
    """Autocommit, for DDL and source writes."""
    return pipeline.setup_conn


@pytest.fixture
def pg_conn(pipeline: PipelineHarness) -> Iterator[PgConnection]:
    """The connection verify reads with: not autocommit, so it reads one snapshot."""
    conn = connect(pipeline.source_dsn)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def stack(pipeline: PipelineHarness) -> LocalStack:
    return pipeline.stack


@pytest.fixture(scope="module")
def sf_conn(pipeline: PipelineHarness) -> Any:
    # verify creates its UDF once per session; creating it is DDL, which commits an open
    # transaction, so it is made before any test opens one.
    prepare_snowflake_session(pipeline.sf_conn, SNOWFLAKE_DATABASE)
    return pipeline.sf_conn


# --------------------------------------------------------------------------- the two implementations


def test_postgres_computes_the_same_canonical_text_as_the_udf_module(setup_conn: PgConnection) -> None:
    documents = generated_documents()
    query = sql.SQL("SELECT u.i, {} FROM unnest(%s::text[]) WITH ORDINALITY AS u(d, i) ORDER BY u.i").format(
        pg_canonical_json(sql.SQL("u.d::jsonb"))
    )
    with setup_conn.cursor() as cur:
        cur.execute(query, (documents,))
        from_postgres = [text for _, text in cur.fetchall()]
    mismatches = [
        (document, text)
        for document, text in zip(documents, from_postgres, strict=True)
        if text != canonical_json(document)
    ]
    assert mismatches == []
    # and the generator reaches what matters: nesting, long numbers, unicode keys
    assert any("k" + "é".encode().hex() + "." in (t or "") for t in from_postgres)
    assert any(len(d) > 200 for d in documents)


def test_snowflake_spellings_give_the_same_canonical_text() -> None:
    respelled = 0
    for document in generated_documents():
        try:
            spelling = snowflake_spelling(document)
        except BeyondDouble:
            continue
        assert canonical_json(spelling) == canonical_json(document), document
        respelled += 1
    assert respelled > GENERATED_DOCUMENTS * 0.8


def test_the_local_snowflake_runs_the_udf_it_is_sent(sf_conn: Any, setup_conn: PgConnection) -> None:
    # The documents as the extractor stages them: PostgreSQL's text of each jsonb value.
    with setup_conn.cursor() as pg:
        pg.execute(
            "SELECT u.d::jsonb::text FROM unnest(%s::text[]) WITH ORDINALITY AS u(d, i) ORDER BY u.i",
            (within_double_range(generated_documents()),),
        )
        documents = [text for (text,) in pg.fetchall()]
    cur = sf_conn.cursor()
    table = quote_qualified(SNOWFLAKE_DATABASE, "PGSNOW", f"JSON_DOCS_{uuid.uuid4().hex[:8].upper()}")
    cur.execute(f'CREATE TABLE {table} ("I" INT, "TXT" VARCHAR, "DOC" VARIANT)')
    cur.executemany(f'INSERT INTO {table} ("I", "TXT") VALUES (%s, %s)', list(enumerate(documents)))
    cur.execute(f'UPDATE {table} SET "DOC" = PARSE_JSON("TXT")')
    function = json_function_name(SNOWFLAKE_DATABASE, "PGSNOW")
    rows = cur.execute(f'SELECT "I", {function}(TO_JSON("DOC")) FROM {table} ORDER BY "I"').fetchall()
    assert [text for _, text in rows] == [canonical_json(d) for d in documents]


def test_the_local_snowflake_refuses_udfs_it_cannot_run_faithfully(sf_conn: Any) -> None:
    cur = sf_conn.cursor()
    for statement, reason in [
        (
            "CREATE TEMPORARY FUNCTION F(X VARCHAR) RETURNS VARCHAR LANGUAGE JAVASCRIPT AS $$return X$$",
            "Python UDFs only",
        ),
        (
            "CREATE FUNCTION F(X VARCHAR) RETURNS VARCHAR LANGUAGE PYTHON RUNTIME_VERSION = '3.11' "
            "HANDLER = 'f' AS $$def f(x): return x$$",
            "TEMPORARY",
        ),
        (
            "CREATE TEMPORARY FUNCTION F(X VARCHAR) RETURNS VARCHAR LANGUAGE PYTHON RUNTIME_VERSION = '3.11' "
            "PACKAGES = ('numpy') HANDLER = 'f' AS $$def f(x): return x$$",
            "PACKAGES",
        ),
        (
            "CREATE TEMPORARY FUNCTION F(X VARCHAR) RETURNS VARCHAR LANGUAGE PYTHON RUNTIME_VERSION = '3.11' "
            "HANDLER = 'g' AS $$def f(x): return x$$",
            "HANDLER 'g'",
        ),
        (
            'CREATE TEMPORARY FUNCTION "NO_SUCH_DB"."S".F(X VARCHAR) RETURNS VARCHAR LANGUAGE PYTHON '
            "RUNTIME_VERSION = '3.11' HANDLER = 'f' AS $$def f(x): return x$$",
            "does not exist",
        ),
    ]:
        with pytest.raises(snowflake.connector.errors.ProgrammingError, match=reason):
            cur.execute(statement)


# --------------------------------------------------------------------------- verify on replicated tables

JSON_DDL = """
CREATE TABLE {} (
    id integer PRIMARY KEY,
    doc jsonb,
    raw json,
    "value" jsonb,
    tags text[],
    ratios numeric[]
)
"""


@pytest.fixture(scope="module")
def documents_table(
    pipeline: PipelineHarness, setup_conn: PgConnection, stack: LocalStack
) -> dict[FileFormat, TableRef]:
    """Generated documents in jsonb, json and array columns, replicated as CSV and as Parquet."""
    documents = within_double_range(generated_documents())
    dispatcher = SqsDispatcher(stack.aws, stack.resources.queue_url, load_function_handler("loader"))
    tables = {}
    for file_format in (FileFormat.CSV, FileFormat.PARQUET):
        table = pipeline.table(f"docs_{file_format.value}")
        target = sql.Identifier(table.schema, table.table)
        with setup_conn.cursor() as cur:
            cur.execute(sql.SQL(JSON_DDL).format(target))
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT u.i, u.d::jsonb, u.d::json, jsonb_build_object('k', u.i), "
                    "ARRAY['a|b', NULL, u.i::text], ARRAY[1.10, u.i / 7.0] "
                    "FROM unnest(%s::text[]) WITH ORDINALITY AS u(d, i)"
                ).format(target),
                (documents,),
            )
        replicate_table(stack, table, file_format, dispatcher)
        tables[file_format] = table
    return tables


def has_long_exponent_integer(document: str) -> bool:
    """Whether ``document`` writes an integer of more than 17 significant digits in exponent
    notation: as written, Snowflake's PARSE_JSON would make it a double and lose digits, which is
    why the extractor stages a ``json`` column as its jsonb text (plain notation)."""
    found = False

    def number(text: str) -> Decimal:
        nonlocal found
        value = Decimal(text)
        digits = len("".join(map(str, value.as_tuple().digits)).strip("0"))
        if "e" in text.lower() and value == value.to_integral_value() and digits > 17 and abs(value) < 10**38:
            found = True
        return value

    json.loads(document, parse_float=number, parse_int=number)
    return found


def test_verify_matches_replicated_json_in_both_formats(
    pg_conn: PgConnection, sf_conn: Any, documents_table: dict[FileFormat, TableRef]
) -> None:
    documents = within_double_range(generated_documents())
    # the json column holds values Snowflake would round if they were staged as written
    assert any(has_long_exponent_integer(d) for d in documents)
    for table in documents_table.values():
        result = verify_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
        assert (result.error, result.missing, result.extra, result.different) == (None, [], [], [])
        assert result.ok
        assert result.source_rows == result.target_rows == len(documents)


def _document_row(pg_conn: PgConnection, table: TableRef) -> tuple[int, str]:
    """A row whose document is an object with a number in it (from the handpicked ones)."""
    with pg_conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT id, doc::text FROM {} WHERE doc = %s::jsonb").format(
                sql.Identifier(table.schema, table.table)
            ),
            ('{"value": {"path": [1, [2, [3]]]}}',),
        )
        row = cur.fetchone()
    pg_conn.rollback()
    assert row is not None
    return int(row[0]), str(row[1])


@pytest.mark.parametrize(
    "replacement, differs",
    [
        pytest.param('{"value": {"path": [1, [2, [4]]]}}', True, id="nested-number-changed"),
        pytest.param('{"value": {"path": [1, [2, ["3"]]]}}', True, id="number-became-string"),
        pytest.param('{"value": {"path": [1, [2, [3.0000000000001]]]}}', True, id="fourteenth-digit"),
        pytest.param('{"value": {"path": [1, [[3], 2]]}}', True, id="array-reordered"),
        pytest.param('{"value": {"path": [1, [2, [3]]], "extra": null}}', True, id="member-added"),
        pytest.param('{"value": {"path": [1.0, [2.00, [3e0]]]}}', False, id="numbers-respelled"),
        pytest.param('{ "value" : { "path" : [1,[2,[3]]] } }', False, id="whitespace"),
    ],
)
def test_verify_finds_a_changed_value_inside_a_document(
    pg_conn: PgConnection,
    in_rolled_back_transaction: Any,
    documents_table: dict[FileFormat, TableRef],
    replacement: str,
    differs: bool,
) -> None:
    # Given a faithful copy, and one document rewritten in Snowflake
    table = documents_table[FileFormat.CSV]
    row_id, _ = _document_row(pg_conn, table)
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    cur = in_rolled_back_transaction.cursor()
    cur.execute(f'UPDATE {target} SET "DOC" = PARSE_JSON(%s) WHERE "ID" = %s', (replacement, row_id))

    # When verify compares the table
    result = verify_table(pg_conn, in_rolled_back_transaction, table, SNOWFLAKE_DATABASE)

    # Then only a real change is a difference, and it names the row
    assert result.ok is not differs, result.summary()
    assert result.different == ([str(row_id)] if differs else [])


def test_verify_reports_a_missing_create_function_privilege_as_an_error(
    pg_conn: PgConnection, stack: LocalStack, documents_table: dict[FileFormat, TableRef]
) -> None:
    # A session that cannot create the UDF (here: its schema does not exist) gets a clear error,
    # not a silent weaker comparison.
    conn = stack.snowflake_connection()
    try:
        result = verify_table(
            pg_conn,
            conn,
            documents_table[FileFormat.CSV],
            SNOWFLAKE_DATABASE,
            sf_control_schema="NO_SUCH_SCHEMA",
        )
    finally:
        conn.close()
    assert not result.ok
    assert result.error is not None
    assert "PGSNOW_CANONICAL_JSON" in result.error and "CREATE FUNCTION" in result.error


def test_the_udf_statement_creates_a_working_function(sf_conn: Any) -> None:
    # The statement verify sends, run again (OR REPLACE) in a session that has it: still one function.
    cur = sf_conn.cursor()
    cur.execute(sf_create_json_function(SNOWFLAKE_DATABASE, "PGSNOW"))
    function = json_function_name(SNOWFLAKE_DATABASE, "PGSNOW")
    (text,) = cur.execute(f"SELECT {function}(%s)", ('{"b": 2, "a": [1.50]}',)).fetchone()
    assert text == canonical_json('{"a": [1.5], "b": 2}')
