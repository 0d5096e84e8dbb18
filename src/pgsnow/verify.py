"""``pgsnow verify``: did Snowflake get exactly what PostgreSQL has? Answered without pulling rows.

Both databases turn every row into the same *canonical text* (one form per value kind of
``pgsnow.typemap``, see docs/verify.md) and hash it with MD5. Rows are grouped into buckets
(primary-key ranges for a single integer key, MD5 prefixes of the key otherwise); each side
returns one line per bucket: its row count and the MD5 of its sorted row hashes. Only buckets
that differ are split again, and only small differing buckets are compared row by row (key and
hash, never the values), so the client fetches a few hundred bucket lines for a matching table
of any size, and the keys that are missing, extra or different for one that does not match.

The SQL is built by pure functions (``pg_*`` with ``psycopg2.sql``, ``sf_*`` as text with
``quote_ident``) so each shape is unit-tested as text. The Snowflake SQL is real Snowflake SQL
that the local emulator also runs (docs/snowflake-compatibility.md lists the choices).
"""

from __future__ import annotations

import inspect
import json
import math
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import STATUS_READY
from psycopg2.extensions import connection as PgConnection

from pgsnow import canonical_json
from pgsnow.config import DEFAULT_CONTROL_SCHEMA
from pgsnow.errors import PgSnowError, VerifyError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.manifest import Column, RunManifest
from pgsnow.pg_json import json_document
from pgsnow.snowflake.sql_text import string_literal
from pgsnow.snowflake.table_sql import SOFT_DELETE_COLUMN
from pgsnow.typemap import ValueKind

# Canonical row text: tokens joined by SEPARATOR. In a text or JSON token, ESCAPE and SEPARATOR
# are escaped by ESCAPE, so NULL_TOKEN (which no escaped value can be) differs from '' and '~N'.
ESCAPE = "~"
SEPARATOR = "|"
NULL_TOKEN = ESCAPE + "N"
TINY_FLOAT_TEXT = "tiny"  # |x| < 1e-290: floats this small are compared as one class
TINY_FLOAT_LIMIT = "1e-290"
FLOAT_SIGNIFICANT_DIGITS = 15
# JSON values are compared by their canonical text (pgsnow.canonical_json): PostgreSQL builds it
# in SQL, Snowflake runs that module as a temporary Python UDF created in the control schema.
JSON_FUNCTION = "PGSNOW_CANONICAL_JSON"
JSON_FUNCTION_RUNTIME = "3.11"
SOURCE_ALIAS = "pgsnow_table"  # the table in PostgreSQL's inner SELECT

DEFAULT_MAX_KEYS = 20  # keys listed per table
ROOT_BUCKETS = 256  # first split of a table
SUB_BUCKETS = 64  # later splits of a differing bucket
LEAF_ROWS = 500  # a differing bucket this small is compared key by key
MAX_BUCKET_ROWS = 50_000  # bucket hashes aggregate at most ~this many 32-character hashes
_HEX_DIGITS = 32
# Key ranges are used while they stay exact in the emulator's floating-point division and
# the keys are dense enough for ranges to balance; sparse or extreme keys are hashed instead.
MAX_RANGE_SPAN = 2**53
MAX_RANGE_SPARSENESS = 1024


# ----------------------------------------------------------------------------- canonical text
#
# Each query reads the table once in an inner SELECT that projects one *source value* per
# column (its canonical text; for JSON the MD5 of its canonical JSON text) as pgsnow_c<i>; the
# outer SELECT builds tokens, row hashes and key hashes from those names, so each column's
# canonical expression appears once in the statement (the emulator translates every statement).


def _pg_literal(text: str) -> sql.Composable:
    return sql.Literal(text)


def _pg_value(column: Column) -> sql.Composable:
    """The column as the extractor stages its value."""
    ident = sql.Identifier(column.name)
    if column.kind is ValueKind.FLOAT and column.base_type == "real":
        # The value the extractor stages: the double nearest to real's shortest text (3.4e+38 is
        # 3.4e38, not 3.3999999521443642e38). Shortest text needs extra_float_digits >= 1:
        # pgsnow.postgres.connect sets it, and so does verify_plan in its own transaction.
        return sql.SQL("{}::text::float8").format(ident)
    return ident


# Kinds compared through the canonical-JSON text: JSON documents, and vectors as the JSON array of
# their elements (float4 widened to double on both sides, so 15 significant digits tell every
# float4 apart: the comparison is exact).
_JSON_COMPARED = frozenset({ValueKind.JSON, ValueKind.VECTOR})


def json_compared(column: Column) -> bool:
    return column.kind in _JSON_COMPARED


def pg_source_value(column: Column) -> sql.Composable:
    """What the inner SELECT projects for ``column`` in PostgreSQL: its canonical text (for JSON,
    the MD5 of the canonical JSON text)."""
    if not json_compared(column):
        return pg_canonical(column, _pg_value(column))
    return sql.SQL("md5({})").format(pg_canonical_json(pg_json_document(column)))


def pg_json_document(column: Column) -> sql.Composable:
    """The JSON document a JSON-compared column holds as Snowflake holds it, read from the table
    aliased ``SOURCE_ALIAS`` (the canonical-JSON subquery has columns of its own)."""
    if (vector_document := _pgvector_json_document(column)) is not None:
        return vector_document
    # The JSON the extractor stages (pgsnow.pg_json): arrays, ranges, composites, hstore as JSON;
    # json (not jsonb) as jsonb, duplicate keys last-wins.
    return json_document(column.shape, sql.Identifier(SOURCE_ALIAS, column.name))


def _pgvector_json_document(column: Column) -> sql.Composable | None:
    """The JSON document of a pgvector column as Snowflake holds it; None for any other column.

    ``vector(n)`` (a VECTOR): its float4 elements as doubles, what ``VECTOR(FLOAT, n)::ARRAY``
    holds. ``vector`` without a dimension (or wider than 4096) and ``halfvec`` (a VARIANT): the
    JSON array that is their text. Arrays of them follow the generic array rule.
    """
    ident = sql.Identifier(SOURCE_ALIAS, column.name)
    if column.kind is ValueKind.VECTOR:
        return sql.SQL("to_jsonb({}::real[]::float8[])").format(ident)
    if column.base_type.startswith(("vector", "halfvec")) and not column.base_type.endswith("[]"):
        return sql.SQL("{}::text::jsonb").format(ident)
    return None


def sf_source_value(column: Column, json_function: str = JSON_FUNCTION) -> str:
    """What the inner SELECT projects for ``column`` in Snowflake (see ``pg_source_value``).

    Formatting happens here, next to the table, where the column's type is known: the local
    emulator picks some translations (HEX_ENCODE, TO_VARCHAR with a format) by the known type.
    ``json_function`` is the (qualified) name of the canonical-JSON UDF (``sf_create_json_function``).
    """
    if not json_compared(column):
        return sf_canonical(column, quote_ident(column.snowflake_name))
    # JSON null stays 'null'; SQL NULL stays NULL (the UDF is STRICT).
    return f"MD5({json_function}({sf_json_document(column)}))"


def sf_json_document(column: Column) -> str:
    """The JSON text of a JSON-compared column in Snowflake (see ``pg_json_document``)."""
    ident = quote_ident(column.snowflake_name)
    if column.kind is ValueKind.VECTOR:
        ident = f"{ident}::ARRAY"  # a VECTOR casts to the ARRAY of its elements
    # TO_JSON, not the VARIANT itself: a Python UDF receives a VARIANT's decimals as strings, so
    # 1.5 and "1.5" would look alike.
    return f"TO_JSON({ident})"


_PG_NUMBER_TEXT = "(pgsnow_walk.pgsnow_value #>> '{{}}')"
_PG_UNSIGNED_TEXT = f"ltrim({_PG_NUMBER_TEXT}, '-')"
_PG_CANONICAL_NUMBER = f"""CASE
      -- fast path: an integer of at most 15 digits is exact, its text only needs zeros moved
      WHEN position('.' IN {_PG_NUMBER_TEXT}) = 0 AND length({_PG_UNSIGNED_TEXT}) <= 15 THEN
        CASE WHEN {_PG_NUMBER_TEXT} = '0' THEN 'd0'
             ELSE 'd' || CASE WHEN left({_PG_NUMBER_TEXT}, 1) = '-' THEN '-' ELSE '' END
                  || rtrim({_PG_UNSIGNED_TEXT}, '0') || 'e'
                  || (length({_PG_UNSIGNED_TEXT}) - length(rtrim({_PG_UNSIGNED_TEXT}, '0')))::text END
      ELSE (SELECT 'd' || CASE WHEN pgsnow_q.pgsnow_n = 0 THEN '0' ELSE
              CASE WHEN pgsnow_q.pgsnow_n < 0 THEN '-' ELSE '' END || rtrim(pgsnow_q.pgsnow_digits, '0') || 'e'
              || (length(pgsnow_q.pgsnow_digits) - length(rtrim(pgsnow_q.pgsnow_digits, '0'))
                  - length(pgsnow_q.pgsnow_fraction))::text END
        FROM (SELECT pgsnow_p.pgsnow_n, split_part(pgsnow_p.pgsnow_r, '.', 2) AS pgsnow_fraction,
                     ltrim(replace(pgsnow_p.pgsnow_r, '.', ''), '0') AS pgsnow_digits
              -- exact for an integer no double could have produced (see pgsnow.canonical_json),
              -- else the nearest double's {{digits}} significant digits, else (beyond doubles)
              -- rounded half away from zero at the decimal exponent read from the number's plain
              -- text (exact, unlike log())
              FROM (SELECT pgsnow_z.pgsnow_n, abs(CASE
                    WHEN pgsnow_z.pgsnow_n = trunc(pgsnow_z.pgsnow_n) AND abs(pgsnow_z.pgsnow_n) < {{limit}}
                         AND (abs(pgsnow_z.pgsnow_n) < {{double_limit}}
                              OR length(trim(BOTH '0' FROM replace(abs(pgsnow_z.pgsnow_n)::text, '.', '')))
                                 > {{double_digits}})
                      THEN pgsnow_z.pgsnow_n
                    WHEN abs(pgsnow_z.pgsnow_n) BETWEEN {{double_low}} AND {{double_high}}
                      THEN pgsnow_z.pgsnow_n::float8::numeric  -- DBL_DIG (15) digits, half to even
                    ELSE round(pgsnow_z.pgsnow_n, {{last_digit}} - CASE WHEN abs(pgsnow_z.pgsnow_n) >= 1
                        THEN length(split_part(abs(pgsnow_z.pgsnow_n)::text, '.', 1)) - 1
                        ELSE length(ltrim(split_part(abs(pgsnow_z.pgsnow_n)::text, '.', 2), '0'))
                             - length(split_part(abs(pgsnow_z.pgsnow_n)::text, '.', 2)) - 1 END)
                    END)::text AS pgsnow_r
                    FROM (SELECT {_PG_NUMBER_TEXT}::numeric AS pgsnow_n) AS pgsnow_z) AS pgsnow_p) AS pgsnow_q)
      END"""

# Each leaf of the document with its path, as pgsnow.canonical_json writes it. Names inside are
# prefixed so that no column of the user's table (referenced qualified by SOURCE_ALIAS) is shadowed.
# A number is formatted in a subquery only on the number branch (bench/verify_json.py: 1.8x faster
# than formatting every leaf through LATERAL joins).
_PG_CANONICAL_JSON = (
    """(SELECT string_agg(pgsnow_leaves.pgsnow_line, chr(10) ORDER BY pgsnow_leaves.pgsnow_line COLLATE "C")
FROM (
  WITH RECURSIVE pgsnow_walk(pgsnow_path, pgsnow_value) AS (
      SELECT ''::text, {document}
    UNION ALL
      SELECT pgsnow_walk.pgsnow_path || pgsnow_child.pgsnow_step, pgsnow_child.pgsnow_value
      FROM pgsnow_walk CROSS JOIN LATERAL (
          SELECT 'k' || encode(convert_to(pgsnow_e.key, 'UTF8'), 'hex') || '.', pgsnow_e.value
          FROM jsonb_each(CASE WHEN jsonb_typeof(pgsnow_walk.pgsnow_value) = 'object'
                               THEN pgsnow_walk.pgsnow_value END) AS pgsnow_e
        UNION ALL
          SELECT 'i' || (pgsnow_a.pgsnow_ordinal - 1)::text || '.', pgsnow_a.pgsnow_element
          FROM jsonb_array_elements(CASE WHEN jsonb_typeof(pgsnow_walk.pgsnow_value) = 'array'
                                         THEN pgsnow_walk.pgsnow_value END)
               WITH ORDINALITY AS pgsnow_a(pgsnow_element, pgsnow_ordinal)
      ) AS pgsnow_child(pgsnow_step, pgsnow_value)
  )
  SELECT pgsnow_walk.pgsnow_path || ':' || CASE jsonb_typeof(pgsnow_walk.pgsnow_value)
      WHEN 'object' THEN 'o' WHEN 'array' THEN 'a' WHEN 'null' THEN 'n'
      WHEN 'boolean' THEN CASE WHEN pgsnow_walk.pgsnow_value = 'true'::jsonb THEN 't' ELSE 'f' END
      WHEN 'string' THEN 's' || encode(convert_to(pgsnow_walk.pgsnow_value #>> '{{}}', 'UTF8'), 'hex')
      ELSE """
    + _PG_CANONICAL_NUMBER
    + """
  END AS pgsnow_line
  FROM pgsnow_walk
  WHERE jsonb_typeof(pgsnow_walk.pgsnow_value) NOT IN ('object', 'array')
     OR pgsnow_walk.pgsnow_value IN ('{{}}'::jsonb, '[]'::jsonb)
) AS pgsnow_leaves)"""
)


def pg_canonical_json(document: sql.Composable) -> sql.Composable:
    """The canonical text of a jsonb ``document`` (pgsnow.canonical_json) computed in PostgreSQL
    with built-in functions only: no function to create, so it runs on a read replica too."""
    return sql.SQL(_PG_CANONICAL_JSON).format(
        document=document,
        digits=sql.SQL(str(canonical_json.SIGNIFICANT_DIGITS)),
        last_digit=sql.SQL(str(canonical_json.SIGNIFICANT_DIGITS - 1)),
        limit=sql.SQL(f"{canonical_json.EXACT_INTEGER_LIMIT:f}"),
        double_limit=sql.SQL(f"{canonical_json.DOUBLE_INTEGER_LIMIT:f}"),
        double_digits=sql.SQL(str(canonical_json.DOUBLE_MAX_DIGITS)),
        double_low=sql.SQL(f"{canonical_json.DOUBLE_RANGE[0]:f}"),
        double_high=sql.SQL(f"{canonical_json.DOUBLE_RANGE[1]:f}"),
    )


def json_function_name(database: str, control_schema: str) -> str:
    return quote_qualified(database, control_schema, JSON_FUNCTION)


def sf_create_json_function(database: str, control_schema: str) -> str:
    """The temporary Python UDF that computes pgsnow.canonical_json in Snowflake: this very
    module's source, so what Snowflake runs is what the test suite checks against PostgreSQL."""
    source = inspect.getsource(canonical_json)
    if "$$" in source:
        raise ValueError("pgsnow.canonical_json cannot be a $$-quoted UDF body")
    return (
        f"CREATE OR REPLACE TEMPORARY FUNCTION {json_function_name(database, control_schema)}(DOCUMENT VARCHAR)\n"
        "RETURNS VARCHAR\nLANGUAGE PYTHON\nSTRICT\nIMMUTABLE\n"
        f"RUNTIME_VERSION = '{JSON_FUNCTION_RUNTIME}'\nHANDLER = 'canonical_json'\n"
        f"AS $${source}$$"
    )


def _pg_float(x: sql.Composable) -> sql.Composable:
    # x rounded to 15 significant digits as <digits>e<exponent>, trailing zeros moved into the
    # exponent, so a floor(log10) that is off by one at a power of ten gives the same text.
    exponent = sql.SQL("floor(log(abs({})))::bigint").format(x)
    # floor(v + 0.5), not round(): PostgreSQL rounds float halves to even, Snowflake away from zero.
    digits = sql.SQL("floor(abs({0}) * power(10::float8, {1} - {2}) + 0.5)::bigint::text").format(
        x, sql.Literal(FLOAT_SIGNIFICANT_DIGITS - 1), exponent
    )
    return sql.SQL(
        "CASE WHEN {x} IS NULL THEN NULL WHEN {x} = 'NaN'::float8 THEN 'NaN' "
        "WHEN {x} = 'inf'::float8 THEN 'inf' WHEN {x} = '-inf'::float8 THEN '-inf' "
        "WHEN {x} = 0 THEN '0' WHEN abs({x}) < {tiny}::float8 THEN {tiny_token} "
        "ELSE (CASE WHEN {x} < 0 THEN '-' ELSE '' END) || rtrim({d}, '0') || 'e' "
        "|| ({e} - {lead} + length({d}) - length(rtrim({d}, '0')))::text END"
    ).format(
        x=x,
        tiny=sql.Literal(TINY_FLOAT_LIMIT),
        tiny_token=sql.Literal(TINY_FLOAT_TEXT),
        d=digits,
        e=exponent,
        lead=sql.Literal(FLOAT_SIGNIFICANT_DIGITS - 1),
    )


def _sf_float(x: str) -> str:
    exponent = f"CAST(FLOOR(LOG(10, ABS({x}))) AS BIGINT)"
    # CAST .. AS VARCHAR rather than TO_VARCHAR: one TO_VARCHAR changed how the emulator translated
    # a HEX_ENCODE in the same statement (docs/verify.md).
    digits = f"CAST(CAST(FLOOR(ABS({x}) * POWER(10, {FLOAT_SIGNIFICANT_DIGITS - 1} - {exponent}) + 0.5) AS BIGINT) AS VARCHAR)"
    return (
        f"CASE WHEN {x} IS NULL THEN NULL WHEN {x} = 'NaN'::FLOAT THEN 'NaN' "
        f"WHEN {x} = 'inf'::FLOAT THEN 'inf' WHEN {x} = '-inf'::FLOAT THEN '-inf' "
        f"WHEN {x} = 0 THEN '0' WHEN ABS({x}) < {TINY_FLOAT_LIMIT}::FLOAT THEN '{TINY_FLOAT_TEXT}' "
        f"ELSE (CASE WHEN {x} < 0 THEN '-' ELSE '' END) || RTRIM({digits}, '0') || 'e' "
        f"|| CAST({exponent} - {FLOAT_SIGNIFICANT_DIGITS - 1} + LENGTH({digits}) "
        f"- LENGTH(RTRIM({digits}, '0')) AS VARCHAR) END"
    )


def _pg_trimmed_decimal(text: sql.Composable) -> sql.Composable:
    # NUMBER(p,s) pads to its scale; plain decimal text without trailing zeros is the same on both sides.
    return sql.SQL("CASE WHEN position('.' IN {0}) > 0 THEN rtrim(rtrim({0}, '0'), '.') ELSE {0} END").format(
        text
    )


def _sf_trimmed_decimal(text: str) -> str:
    # A leading zero first: the local emulator prints NUMBER(p,p) as '.00123' and '-.5' (Snowflake
    # as '0.00123'), and '.00000' would trim to '' where PostgreSQL's '0.00000' trims to '0'.
    text = (
        f"CASE WHEN LEFT({text}, 1) = '.' THEN '0' || {text} "
        f"WHEN LEFT({text}, 2) = '-.' THEN '-0' || SUBSTR({text}, 2) ELSE {text} END"
    )
    return f"CASE WHEN POSITION('.' IN {text}) > 0 THEN RTRIM(RTRIM({text}, '0'), '.') ELSE {text} END"


def _pg_beyond_calendar(x: sql.Composable, first_day: str) -> sql.Composable:
    # What to_char cannot say: it gives NULL for ±infinity and drops the era of a BC date, so
    # those get their own text, which no Snowflake value (a date of years 1-9999) can have.
    return sql.SQL(
        "WHEN {x} = 'infinity' THEN 'infinity' WHEN {x} = '-infinity' THEN '-infinity' "
        "WHEN {x} < {first_day} THEN 'BC ' || {x}::text"
    ).format(x=x, first_day=sql.SQL(first_day))


def _pg_calendar(x: sql.Composable, pattern: str, first_day: str, suffix: str = "") -> sql.Composable:
    return sql.SQL(
        "CASE WHEN {x} IS NULL THEN NULL {beyond} ELSE to_char({value}, {pattern}){suffix} END"
    ).format(
        x=x,
        beyond=_pg_beyond_calendar(x, first_day),
        value=sql.SQL("{} AT TIME ZONE 'UTC'").format(x) if suffix else x,
        pattern=sql.Literal(pattern),
        suffix=sql.SQL(" || {}").format(sql.Literal(suffix)) if suffix else sql.SQL(""),
    )


def pg_canonical(column: Column, value: sql.Composable | None = None) -> sql.Composable:
    """The column's canonical text in PostgreSQL (NULL stays NULL), from its source value."""
    if value is None:
        value = pg_source_value(column) if json_compared(column) else _pg_value(column)
    x = value
    match column.kind:
        case ValueKind.INTEGER:
            return sql.SQL("{}::text").format(x)
        case ValueKind.DECIMAL:
            return _pg_trimmed_decimal(sql.SQL("{}::text").format(x))
        case ValueKind.FLOAT:
            return _pg_float(x)
        case ValueKind.BOOLEAN:
            return sql.SQL("CASE WHEN {0} THEN 'true' WHEN NOT {0} THEN 'false' END").format(x)
        case ValueKind.DATE:
            return _pg_calendar(x, "YYYY-MM-DD", "'0001-01-01'::date")
        case ValueKind.TIME:
            return sql.SQL("to_char({}, 'HH24:MI:SS.US')").format(x)
        case ValueKind.TIMESTAMP:
            return _pg_calendar(x, "YYYY-MM-DD HH24:MI:SS.US", "'0001-01-01'::timestamp")
        case ValueKind.TIMESTAMPTZ:
            return _pg_calendar(x, "YYYY-MM-DD HH24:MI:SS.US", "'0001-01-01 00:00:00+00'::timestamptz", "Z")
        case ValueKind.BINARY:
            return sql.SQL("encode({}, 'hex')").format(x)
        case ValueKind.JSON | ValueKind.VECTOR:
            return x  # pg_source_value already made it canonical
        case ValueKind.GEOMETRY | ValueKind.GEOGRAPHY:
            # The SRID and the exact 2D WKB (little-endian), as Snowflake's ST_SRID and ST_ASWKB give them.
            return sql.SQL("ST_SRID({0})::text || ':' || encode(ST_AsBinary({0}, 'NDR'), 'hex')").format(x)
        case _:
            return sql.SQL("{}::text").format(x)  # text, and the types staged as their text


def sf_canonical(column: Column, value: str | None = None) -> str:
    """The column's canonical text in Snowflake (NULL stays NULL), from its source value."""
    if value is None:
        value = sf_source_value(column) if json_compared(column) else quote_ident(column.snowflake_name)
    x = value
    match column.kind:
        case ValueKind.INTEGER:
            return f"CAST({x} AS VARCHAR)"
        case ValueKind.DECIMAL:
            # CAST, not TO_VARCHAR: see _sf_float.
            return _sf_trimmed_decimal(f"CAST({x} AS VARCHAR)")
        case ValueKind.FLOAT:
            return _sf_float(x)
        case ValueKind.BOOLEAN:
            return f"CASE WHEN {x} THEN 'true' WHEN NOT {x} THEN 'false' END"
        case ValueKind.DATE:
            return f"TO_VARCHAR({x}::DATE, 'YYYY-MM-DD')"
        case ValueKind.TIME:
            # TIMESTAMP_FROM_PARTS(date, time): the local emulator cannot format a bare TIME.
            return f"TO_VARCHAR(TIMESTAMP_FROM_PARTS(TO_DATE('1970-01-01'), {x}), 'HH24:MI:SS.FF6')"
        case ValueKind.TIMESTAMP:
            # The cast names the type for the local emulator, which formats by the known type.
            return f"TO_VARCHAR({x}::TIMESTAMP_NTZ, 'YYYY-MM-DD HH24:MI:SS.FF6')"
        case ValueKind.TIMESTAMPTZ:
            return (
                f"TO_VARCHAR(CONVERT_TIMEZONE('UTC', {x})::TIMESTAMP_NTZ, 'YYYY-MM-DD HH24:MI:SS.FF6') || 'Z'"
            )
        case ValueKind.BINARY:
            return f"LOWER(HEX_ENCODE({x}))"
        case ValueKind.JSON | ValueKind.VECTOR:
            return x  # sf_source_value already made it canonical
        case ValueKind.GEOMETRY | ValueKind.GEOGRAPHY:
            return f"CAST(ST_SRID({x}) AS VARCHAR) || ':' || LOWER(HEX_ENCODE(ST_ASWKB({x})))"
        case _:
            return x


def _escaped(kind: ValueKind) -> bool:
    return kind is ValueKind.TEXT  # a JSON token is an MD5


def pg_token(column: Column, value: sql.Composable | None = None) -> sql.Composable:
    """The column's token in the row text: canonical text, escaped for text and JSON, or NULL_TOKEN."""
    source = pg_source_value(column) if value is None else value
    text = source
    if _escaped(column.kind):
        text = sql.SQL("replace(replace({}, {}, {}), {}, {})").format(
            text,
            _pg_literal(ESCAPE),
            _pg_literal(ESCAPE + ESCAPE),
            _pg_literal(SEPARATOR),
            _pg_literal(ESCAPE + SEPARATOR),
        )
    return sql.SQL("coalesce({}, {})").format(text, _pg_literal(NULL_TOKEN))


def sf_token(column: Column, value: str | None = None) -> str:
    source = sf_source_value(column) if value is None else value
    text = source
    if _escaped(column.kind):
        text = (
            f"REPLACE(REPLACE({text}, {string_literal(ESCAPE)}, {string_literal(ESCAPE + ESCAPE)}), "
            f"{string_literal(SEPARATOR)}, {string_literal(ESCAPE + SEPARATOR)})"
        )
    return f"COALESCE({text}, {string_literal(NULL_TOKEN)})"


def pg_row_text(columns: Sequence[Column], values: Sequence[sql.Composable] | None = None) -> sql.Composable:
    refs = values if values is not None else [pg_source_value(c) for c in columns]
    # SEPARATOR has no quote or '%', so it is written as a literal in the statement text.
    joiner = sql.SQL(" || '" + SEPARATOR + "' || ")
    return joiner.join(pg_token(c, v) for c, v in zip(columns, refs, strict=True))


def sf_row_text(columns: Sequence[Column], values: Sequence[str] | None = None) -> str:
    refs = values if values is not None else [sf_source_value(c) for c in columns]
    return f" || {string_literal(SEPARATOR)} || ".join(
        sf_token(c, v) for c, v in zip(columns, refs, strict=True)
    )


def decode_key(text: str) -> tuple[str | None, ...]:
    """The values of a canonical key text (tokens joined by SEPARATOR); NULL_TOKEN is None."""
    values: list[str | None] = []
    current: list[str] = []
    is_null = False
    characters = iter(text)
    for character in characters:
        if character == ESCAPE:
            following = next(characters, "")
            if following == "N":
                is_null = True
            else:
                current.append(following)
        elif character == SEPARATOR:
            values.append(None if is_null else "".join(current))
            current, is_null = [], False
        else:
            current.append(character)
    values.append(None if is_null else "".join(current))
    return tuple(values)


def describe_key(text: str) -> str:
    values = ["NULL" if v is None else v for v in decode_key(text)]
    return values[0] if len(values) == 1 else "(" + ", ".join(values) + ")"


# ----------------------------------------------------------------------------- plans and regions


@dataclass(frozen=True)
class Watermark:
    """Incremental tables: rows with ``cursor_column`` > ``value`` are left out on both sides."""

    cursor_column: str
    value: str

    @classmethod
    def from_manifest(cls, manifest: RunManifest | None) -> Watermark | None:
        if manifest is None or not manifest.cursor_column or manifest.watermark_after is None:
            return None
        return cls(manifest.cursor_column, manifest.watermark_after)


@dataclass(frozen=True)
class KeyRange:
    """Rows whose single integer primary key is in [low, high]."""

    low: int
    high: int


@dataclass(frozen=True)
class HashPrefix:
    """Rows whose key hash (MD5 of the canonical key text) starts with ``prefix``."""

    prefix: str


Region = KeyRange | HashPrefix


@dataclass(frozen=True)
class Split:
    """How a region is cut into buckets: a range width, or more hash digits."""

    region: Region
    width: int = 0  # KeyRange
    digits: int = 0  # HashPrefix: total prefix length of the buckets

    def child(self, bucket: Any) -> Region:
        if isinstance(self.region, KeyRange):
            low = self.region.low + int(bucket) * self.width
            return KeyRange(low, min(self.region.high, low + self.width - 1))
        return HashPrefix(str(bucket))


@dataclass(frozen=True)
class VerifyPlan:
    """What is compared: the table, its columns (in order), key columns and watermark."""

    table: TableRef
    sf_database: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    watermark: Watermark | None = None
    sf_control_schema: str = DEFAULT_CONTROL_SCHEMA  # where the canonical-JSON UDF is created
    # Soft deletes (deletes "soft"): a row marked deleted in Snowflake is one PostgreSQL no longer
    # has, so only rows whose deletion mark is NULL are compared.
    soft_deleted: bool = False

    @property
    def has_json(self) -> bool:
        return any(json_compared(c) for c in self.columns)

    @property
    def key_columns(self) -> tuple[Column, ...]:
        by_name = {c.name: c for c in self.columns}
        return tuple(by_name[name] for name in self.primary_key)

    @property
    def key_positions(self) -> tuple[int, ...]:
        names = [c.name for c in self.columns]
        return tuple(names.index(name) for name in self.primary_key)

    @property
    def integer_key(self) -> Column | None:
        keys = self.key_columns
        return keys[0] if len(keys) == 1 and keys[0].kind is ValueKind.INTEGER else None

    @property
    def watermark_column(self) -> Column | None:
        if self.watermark is None:
            return None
        return next(c for c in self.columns if c.name == self.watermark.cursor_column)

    def watermark_value(self) -> Any:
        column = self.watermark_column
        assert self.watermark is not None and column is not None
        return int(self.watermark.value) if column.kind is ValueKind.INTEGER else self.watermark.value


Statement = tuple[Any, tuple[Any, ...]]  # (SQL, bound values)


# ----------------------------------------------------------------------------- PostgreSQL SQL
#
# Shape of every statement (one side shown; Snowflake's is the same):
#   SELECT <outer> FROM (SELECT <source values> AS pgsnow_c<i> FROM t WHERE <watermark, key range>)
#   AS pgsnow_source WHERE <hash prefix>


def _pg_refs(plan: VerifyPlan) -> list[sql.Composable]:
    return [sql.Identifier(f"pgsnow_c{i}") for i in range(len(plan.columns))]


def _pg_key_text(plan: VerifyPlan) -> sql.Composable:
    refs = _pg_refs(plan)
    if not plan.primary_key:
        return sql.SQL("md5({})").format(pg_row_text(plan.columns, refs))
    positions = plan.key_positions
    return pg_row_text([plan.columns[p] for p in positions], [refs[p] for p in positions])


def _pg_source(plan: VerifyPlan, region: Region | None) -> tuple[sql.Composable, tuple[Any, ...]]:
    """The inner SELECT (watermark and key range applied) and the outer hash-prefix condition."""
    inner: list[sql.Composable] = [sql.SQL("true")]
    params: list[Any] = []
    if (column := plan.watermark_column) is not None:
        inner.append(sql.SQL("({0} IS NULL OR {0} <= %s)").format(sql.Identifier(column.name)))
        params.append(plan.watermark_value())
    if isinstance(region, KeyRange):
        key = plan.integer_key
        assert key is not None
        inner.append(sql.SQL("{} BETWEEN %s AND %s").format(sql.Identifier(key.name)))
        params.extend([region.low, region.high])
    items = [
        sql.SQL("{} AS {}").format(pg_source_value(c), ref)
        for c, ref in zip(plan.columns, _pg_refs(plan), strict=True)
    ]
    if (key := plan.integer_key) is not None:
        items.append(sql.SQL("{} AS pgsnow_key").format(sql.Identifier(key.name)))
    projection = sql.SQL(", ").join(items)
    outer: sql.Composable = sql.SQL("true")
    if isinstance(region, HashPrefix) and region.prefix:
        outer = sql.SQL("substr(md5({}), 1, %s) = %s").format(_pg_key_text(plan))
        params.extend([len(region.prefix), region.prefix])
    source = sql.SQL("(SELECT {} FROM {} AS {} WHERE {}) AS pgsnow_source WHERE {}").format(
        projection,
        sql.Identifier(plan.table.schema, plan.table.table),
        sql.Identifier(SOURCE_ALIAS),
        sql.SQL(" AND ").join(inner),
        outer,
    )
    return source, tuple(params)


def pg_count_query(plan: VerifyPlan) -> Statement:
    """Row count, and the key's bounds for a single integer key."""
    conditions: list[sql.Composable] = [sql.SQL("true")]
    params: tuple[Any, ...] = ()
    if (column := plan.watermark_column) is not None:
        conditions.append(sql.SQL("({0} IS NULL OR {0} <= %s)").format(sql.Identifier(column.name)))
        params = (plan.watermark_value(),)
    key = plan.integer_key
    bounds = sql.SQL("min({0}), max({0})").format(sql.Identifier(key.name)) if key else sql.SQL("NULL, NULL")
    query = sql.SQL("SELECT count(*), {} FROM {} WHERE {}").format(
        bounds, sql.Identifier(plan.table.schema, plan.table.table), sql.SQL(" AND ").join(conditions)
    )
    return query, params


def _pg_bucket(plan: VerifyPlan, split: Split) -> tuple[sql.Composable, tuple[Any, ...]]:
    if isinstance(split.region, KeyRange):
        return sql.SQL("div(pgsnow_key::numeric - %s, %s)::bigint"), (split.region.low, split.width)
    return sql.SQL("substr(md5({}), 1, %s)").format(_pg_key_text(plan)), (split.digits,)


def pg_bucket_query(plan: VerifyPlan, split: Split) -> Statement:
    """Per bucket: the bucket, its row count and the MD5 of its sorted row hashes."""
    bucket, bucket_params = _pg_bucket(plan, split)
    source, source_params = _pg_source(plan, split.region)
    query = sql.SQL(
        "SELECT pgsnow_bucket, count(*), md5(string_agg(pgsnow_hash, '' ORDER BY pgsnow_hash COLLATE \"C\")) "
        "FROM (SELECT {} AS pgsnow_bucket, md5({}) AS pgsnow_hash FROM {}) AS pgsnow_rows "
        "GROUP BY pgsnow_bucket"
    ).format(bucket, pg_row_text(plan.columns, _pg_refs(plan)), source)
    return query, bucket_params + source_params


def pg_rows_query(plan: VerifyPlan, region: Region) -> Statement:
    """Key text and row hash of each row in a (small) region."""
    source, params = _pg_source(plan, region)
    query = sql.SQL("SELECT {}, md5({}) FROM {}").format(
        _pg_key_text(plan), pg_row_text(plan.columns, _pg_refs(plan)), source
    )
    return query, params


# ----------------------------------------------------------------------------- Snowflake SQL


def _sf_refs(plan: VerifyPlan) -> list[str]:
    return [f"PGSNOW_C{i}" for i in range(len(plan.columns))]


def _sf_key_text(plan: VerifyPlan) -> str:
    refs = _sf_refs(plan)
    if not plan.primary_key:
        return f"MD5({sf_row_text(plan.columns, refs)})"
    positions = plan.key_positions
    return sf_row_text([plan.columns[p] for p in positions], [refs[p] for p in positions])


def _sf_table(plan: VerifyPlan) -> str:
    return quote_qualified(plan.sf_database, plan.table.snowflake_schema, plan.table.snowflake_table)


def _sf_watermark(plan: VerifyPlan) -> tuple[list[str], list[Any]]:
    """The Snowflake rows compared: under the watermark, and not marked deleted (soft deletes)."""
    conditions: list[str] = []
    params: list[Any] = []
    if plan.soft_deleted:
        conditions.append(f"{quote_ident(SOFT_DELETE_COLUMN)} IS NULL")
    column = plan.watermark_column
    if column is not None:
        ident = quote_ident(column.snowflake_name)
        conditions.append(f"({ident} IS NULL OR {ident} <= %s)")
        params.append(plan.watermark_value())
    return conditions, params


def _sf_source(plan: VerifyPlan, region: Region | None) -> tuple[str, tuple[Any, ...]]:
    conditions, params = _sf_watermark(plan)
    if isinstance(region, KeyRange):
        key = plan.integer_key
        assert key is not None
        conditions.append(f"{quote_ident(key.snowflake_name)} BETWEEN %s AND %s")
        params.extend([region.low, region.high])
    function = json_function_name(plan.sf_database, plan.sf_control_schema)
    items = [
        f"{sf_source_value(c, function)} AS {ref}"
        for c, ref in zip(plan.columns, _sf_refs(plan), strict=True)
    ]
    if (key := plan.integer_key) is not None:
        items.append(f"{quote_ident(key.snowflake_name)} AS PGSNOW_KEY")
    projection = ", ".join(items)
    outer = "TRUE"
    if isinstance(region, HashPrefix) and region.prefix:
        outer = f"SUBSTR(MD5({_sf_key_text(plan)}), 1, %s) = %s"
        params.extend([len(region.prefix), region.prefix])
    where = " AND ".join(["TRUE", *conditions])
    return (
        f"(SELECT {projection} FROM {_sf_table(plan)} WHERE {where}) AS PGSNOW_SOURCE WHERE {outer}",
        tuple(params),
    )


def sf_count_query(plan: VerifyPlan) -> Statement:
    conditions, params = _sf_watermark(plan)
    key = plan.integer_key
    bounds = (
        f"MIN({quote_ident(key.snowflake_name)}), MAX({quote_ident(key.snowflake_name)})"
        if key
        else "NULL, NULL"
    )
    where = " AND ".join(["TRUE", *conditions])
    return f"SELECT COUNT(*), {bounds} FROM {_sf_table(plan)} WHERE {where}", tuple(params)


def _sf_bucket(plan: VerifyPlan, split: Split) -> tuple[str, tuple[Any, ...]]:
    if isinstance(split.region, KeyRange):
        key_ref = "PGSNOW_KEY"
        # An exact integer quotient: (x - MOD(x, w)) / w divides evenly, so no rounding of x / w
        # (Snowflake keeps 6 more decimals; the emulator divides in floating point) can move a row.
        offset = f"({key_ref} - %s)"
        low, width = split.region.low, split.width
        return f"CAST(({offset} - MOD({offset}, %s)) / %s AS BIGINT)", (low, low, width, width)
    return f"SUBSTR(MD5({_sf_key_text(plan)}), 1, %s)", (split.digits,)


def sf_bucket_query(plan: VerifyPlan, split: Split) -> Statement:
    bucket, bucket_params = _sf_bucket(plan, split)
    source, source_params = _sf_source(plan, split.region)
    query = (
        "SELECT PGSNOW_BUCKET, COUNT(*), MD5(LISTAGG(PGSNOW_HASH, '') WITHIN GROUP (ORDER BY PGSNOW_HASH)) "
        f"FROM (SELECT {bucket} AS PGSNOW_BUCKET, MD5({sf_row_text(plan.columns, _sf_refs(plan))}) AS PGSNOW_HASH "
        f"FROM {source}) GROUP BY PGSNOW_BUCKET"
    )
    return query, bucket_params + source_params


def sf_rows_query(plan: VerifyPlan, region: Region) -> Statement:
    source, params = _sf_source(plan, region)
    query = f"SELECT {_sf_key_text(plan)}, MD5({sf_row_text(plan.columns, _sf_refs(plan))}) FROM {source}"
    return query, params


# ----------------------------------------------------------------------------- results


@dataclass
class TableVerification:
    """The outcome for one table; ``to_dict`` is its JSON report."""

    table: TableRef
    source_rows: int = 0
    target_rows: int = 0
    missing: list[str] = field(default_factory=list)  # keys in PostgreSQL only
    extra: list[str] = field(default_factory=list)  # keys in Snowflake only
    different: list[str] = field(default_factory=list)  # keys whose row differs
    truncated: bool = False  # more differences exist than are listed
    buckets_compared: int = 0
    buckets_differing: int = 0
    queries: int = 0
    rows_fetched: int = 0
    watermark: Watermark | None = None
    keyed: bool = True  # False: no primary key, rows are named by their hash
    weak_checks: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def listed(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.different)

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.source_rows == self.target_rows
            and self.buckets_differing == 0
            and self.listed == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table.qualified,
            "ok": self.ok,
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "missing": self.missing,
            "extra": self.extra,
            "different": self.different,
            "truncated": self.truncated,
            "keyed": self.keyed,
            "buckets_compared": self.buckets_compared,
            "buckets_differing": self.buckets_differing,
            "queries": self.queries,
            "rows_fetched": self.rows_fetched,
            "watermark": (
                {"cursor_column": self.watermark.cursor_column, "value": self.watermark.value}
                if self.watermark
                else None
            ),
            "weak_checks": self.weak_checks,
            "error": self.error,
        }

    def summary(self) -> str:
        """One readable line, e.g. ``shop.orders  1000  999  MISMATCH  missing 1: 17``."""
        status = "OK" if self.ok else "MISMATCH"
        line = f"{self.table.qualified}  {self.source_rows}  {self.target_rows}  {status}"
        if self.error:
            return f"{line}  error: {self.error}"
        details = [
            f"{label} {len(keys)}{'+' if self.truncated else ''}: {', '.join(keys)}"
            for label, keys in (
                ("missing", self.missing),
                ("extra", self.extra),
                ("different", self.different),
            )
            if keys
        ]
        if self.watermark:
            details.append(f"up to {self.watermark.cursor_column} <= {self.watermark.value}")
        return "  ".join([line, *details])


@dataclass
class VerifyReport:
    tables: list[TableVerification]

    @property
    def ok(self) -> bool:
        return bool(self.tables) and all(t.ok for t in self.tables)

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "tables": [t.to_dict() for t in self.tables]}, indent=2)

    def summary_lines(self) -> list[str]:
        matching = sum(1 for t in self.tables if t.ok)
        lines = [t.summary() for t in self.tables]
        lines.append(f"verify: {matching} of {len(self.tables)} tables match")
        return lines


# ----------------------------------------------------------------------------- running


class _Sides:
    """Runs each side's statements, counting queries and fetched rows."""

    def __init__(self, pg_conn: PgConnection, sf_conn: Any, result: TableVerification) -> None:
        self._pg = pg_conn
        self._sf = sf_conn
        self._result = result

    def _count(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        self._result.queries += 1
        self._result.rows_fetched += len(rows)
        return rows

    def postgres(self, statement: Statement) -> list[tuple[Any, ...]]:
        query, params = statement
        with self._pg.cursor() as cur:
            cur.execute(query, params)
            return self._count(list(cur.fetchall()))

    def snowflake(self, statement: Statement) -> list[tuple[Any, ...]]:
        query, params = statement
        cur = self._sf.cursor()
        try:
            cur.execute(query, params or None)
            return self._count([tuple(row) for row in cur.fetchall()])
        finally:
            cur.close()


def _root_split(plan: VerifyPlan, rows: int, low: int | None, high: int | None) -> Split:
    buckets = max(ROOT_BUCKETS, math.ceil(rows / MAX_BUCKET_ROWS))
    if (
        plan.integer_key is not None
        and low is not None
        and high is not None
        and high - low < min(MAX_RANGE_SPAN, max(rows, 1) * MAX_RANGE_SPARSENESS)
    ):
        region = KeyRange(low, high)
        return Split(region, width=max(1, math.ceil((high - low + 1) / buckets)))
    digits = max(2, math.ceil(math.log(buckets, 16)))
    return Split(HashPrefix(""), digits=min(digits, _HEX_DIGITS))


def _sub_split(region: Region) -> Split:
    if isinstance(region, KeyRange):
        span = region.high - region.low + 1
        return Split(region, width=max(1, math.ceil(span / SUB_BUCKETS)))
    return Split(region, digits=min(len(region.prefix) + 2, _HEX_DIGITS))


def _is_leaf(region: Region, rows: int) -> bool:
    if rows <= LEAF_ROWS:
        return True
    if isinstance(region, KeyRange):
        return region.low == region.high
    return len(region.prefix) >= _HEX_DIGITS


def _bucket_map(rows: list[tuple[Any, ...]], integer: bool) -> dict[Any, tuple[int, str]]:
    return {(int(b) if integer else str(b)): (int(count), str(digest)) for b, count, digest in rows}


def _compare_leaf(
    sides: _Sides, plan: VerifyPlan, region: Region, result: TableVerification, limit: int
) -> None:
    source = sides.postgres(pg_rows_query(plan, region))
    target = sides.snowflake(sf_rows_query(plan, region))
    found: list[tuple[list[str], str]] = []
    if plan.primary_key:
        source_rows = {str(k): str(h) for k, h in source}
        target_rows = {str(k): str(h) for k, h in target}
        for key in sorted(source_rows.keys() - target_rows.keys()):
            found.append((result.missing, key))
        for key in sorted(target_rows.keys() - source_rows.keys()):
            found.append((result.extra, key))
        for key in sorted(source_rows.keys() & target_rows.keys()):
            if source_rows[key] != target_rows[key]:
                found.append((result.different, key))
    else:
        source_hashes = Counter(str(h) for _, h in source)
        target_hashes = Counter(str(h) for _, h in target)
        for digest, times in sorted((source_hashes - target_hashes).items()):
            found.extend((result.missing, f"row md5 {digest}") for _ in range(times))
        for digest, times in sorted((target_hashes - source_hashes).items()):
            found.extend((result.extra, f"row md5 {digest}") for _ in range(times))
    for target_list, key in found:
        if result.listed >= limit:
            result.truncated = True
            return
        target_list.append(describe_key(key) if plan.primary_key else key)


def _weak_checks(plan: VerifyPlan) -> list[str]:
    notes = [
        f"{c.name}: JSON numbers other than integers below 1e38 compared to "
        f"{canonical_json.SIGNIFICANT_DIGITS} significant digits"
        for c in plan.columns
        if c.kind is ValueKind.JSON
    ]
    notes.extend(
        f"{c.name}: float compared to {FLOAT_SIGNIFICANT_DIGITS} significant digits"
        for c in plan.columns
        if c.kind is ValueKind.FLOAT
    )
    return notes


def verify_plan(
    pg_conn: PgConnection, sf_conn: Any, plan: VerifyPlan, *, max_keys: int = DEFAULT_MAX_KEYS
) -> TableVerification:
    """Compare one table; the PostgreSQL side reads one snapshot when the connection allows it."""
    result = TableVerification(
        plan.table, watermark=plan.watermark, keyed=bool(plan.primary_key), weak_checks=_weak_checks(plan)
    )
    sides = _Sides(pg_conn, sf_conn, result)
    own_transaction = not pg_conn.autocommit and pg_conn.status == STATUS_READY
    try:
        if own_transaction:
            with pg_conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                # The extraction session's settings: real's shortest text (pg_source_value); UTC, ISO
                # dates and intervals, so text-form types and timestamps inside JSON documents (ranges,
                # composites) read as they were staged.
                from pgsnow.postgres import SESSION_SETTINGS

                for name, value in SESSION_SETTINGS.items():
                    cur.execute("SELECT set_config(%s, %s, true)", (name, value))
                # The canonical-JSON subqueries' row estimates (a recursive walk per value) push the
                # plan's cost past jit_above_cost: JIT compiled for seconds work that takes milliseconds.
                cur.execute("SET LOCAL jit = off")
        if plan.has_json:
            prepare_snowflake_session(sf_conn, plan.sf_database, plan.sf_control_schema)
        _verify(sides, plan, result, max_keys)
    except PgSnowError as exc:
        result.error = exc.message
    except Exception as exc:
        if not _is_database_error(exc):
            raise
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    finally:
        if own_transaction:
            pg_conn.rollback()
    return result


# Sessions that already have the canonical-JSON UDF: creating it is DDL, which in Snowflake commits
# the session's open transaction, so it is created once per session and can be created up front.
_PREPARED_SESSIONS: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def prepare_snowflake_session(
    sf_conn: Any, database: str, control_schema: str = DEFAULT_CONTROL_SCHEMA
) -> None:
    """Create the temporary canonical-JSON UDF in ``database.control_schema`` for this session,
    unless this session has it. Needs CREATE FUNCTION on that schema (``pgsnow snowflake-sql``
    grants it); a missing privilege is reported as such."""
    name = json_function_name(database, control_schema)
    prepared = _PREPARED_SESSIONS.setdefault(sf_conn, set())
    if name in prepared:
        return
    cur = sf_conn.cursor()
    try:
        cur.execute(sf_create_json_function(database, control_schema))
    except Exception as exc:
        if not _is_database_error(exc):
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerifyError(
            f"cannot create the temporary function {name} that compares JSON columns ({first_line}); "
            f"grant CREATE FUNCTION on schema {quote_qualified(database, control_schema)} to the role verify uses"
        ) from exc
    finally:
        cur.close()
    prepared.add(name)


def _is_database_error(exc: Exception) -> bool:
    import psycopg2
    import snowflake.connector.errors

    return isinstance(exc, psycopg2.Error | snowflake.connector.errors.Error)


def _verify(sides: _Sides, plan: VerifyPlan, result: TableVerification, max_keys: int) -> None:
    (source_count, source_low, source_high), *_ = sides.postgres(pg_count_query(plan))
    (target_count, target_low, target_high), *_ = sides.snowflake(sf_count_query(plan))
    result.source_rows, result.target_rows = int(source_count), int(target_count)
    if result.source_rows == 0 and result.target_rows == 0:
        return
    lows = [int(v) for v in (source_low, target_low) if v is not None]
    highs = [int(v) for v in (source_high, target_high) if v is not None]
    split = _root_split(
        plan,
        max(result.source_rows, result.target_rows),
        min(lows) if lows else None,
        max(highs) if highs else None,
    )
    pending: list[Split] = [split]
    while pending:
        split = pending.pop(0)
        integer = isinstance(split.region, KeyRange)
        source = _bucket_map(sides.postgres(pg_bucket_query(plan, split)), integer)
        target = _bucket_map(sides.snowflake(sf_bucket_query(plan, split)), integer)
        result.buckets_compared += len(source.keys() | target.keys())
        for bucket in sorted(source.keys() | target.keys()):
            source_bucket, target_bucket = source.get(bucket), target.get(bucket)
            if source_bucket == target_bucket:
                continue
            result.buckets_differing += 1
            if result.listed >= max_keys:
                result.truncated = True
                continue
            region = split.child(bucket)
            rows = max(source_bucket[0] if source_bucket else 0, target_bucket[0] if target_bucket else 0)
            if _is_leaf(region, rows):
                _compare_leaf(sides, plan, region, result, max_keys)
            else:
                pending.append(_sub_split(region))


def plan_from_postgres(
    pg_conn: PgConnection,
    table: TableRef,
    sf_database: str,
    *,
    manifest: RunManifest | None = None,
    sf_control_schema: str = DEFAULT_CONTROL_SCHEMA,
) -> VerifyPlan:
    """The plan for ``table``: the manifest's columns and watermark when given, else PostgreSQL's schema."""
    if manifest is not None:
        return VerifyPlan(
            table,
            sf_database,
            manifest.columns,
            manifest.primary_key,
            Watermark.from_manifest(manifest),
            sf_control_schema=sf_control_schema,
        )
    from pgsnow.postgres import describe_table

    schema = describe_table(pg_conn, table)
    return VerifyPlan(
        table, sf_database, schema.columns, schema.primary_key, sf_control_schema=sf_control_schema
    )


def has_soft_delete_column(sf_conn: Any, plan: VerifyPlan) -> bool:
    """Whether the Snowflake table marks deleted rows (``deletes: soft``, in any mode: incremental
    or cdc): the target itself says, whatever manifest or options the caller has at hand."""
    with sf_conn.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*) FROM {quote_ident(plan.sf_database)}.INFORMATION_SCHEMA.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND COLUMN_NAME = %s",
            (plan.table.snowflake_schema, plan.table.snowflake_table, SOFT_DELETE_COLUMN),
        )
        found = cursor.fetchone()
    return bool(found and found[0])


def verify_table(
    pg_conn: PgConnection,
    sf_conn: Any,
    table: TableRef,
    sf_database: str,
    *,
    manifest: RunManifest | None = None,
    max_keys: int = DEFAULT_MAX_KEYS,
    sf_control_schema: str = DEFAULT_CONTROL_SCHEMA,
) -> TableVerification:
    """Compare ``table`` in PostgreSQL with its copy in ``sf_database``; see the module docstring.
    ``sf_control_schema`` is pgsnow's schema there, where verify creates its temporary UDF."""
    try:
        plan = plan_from_postgres(
            pg_conn, table, sf_database, manifest=manifest, sf_control_schema=sf_control_schema
        )
    except PgSnowError as exc:
        if not pg_conn.autocommit:
            pg_conn.rollback()
        return TableVerification(table, error=exc.message)
    if not pg_conn.autocommit:
        pg_conn.rollback()  # end the catalog read's transaction so the comparison gets its own snapshot
    try:
        plan = replace(plan, soft_deleted=has_soft_delete_column(sf_conn, plan))
        return verify_plan(pg_conn, sf_conn, plan, max_keys=max_keys)
    finally:
        # Never leave the session idle in transaction: an open transaction holds back VACUUM and
        # every incremental extractor's safe watermark in this database.
        if not pg_conn.autocommit and not pg_conn.closed:
            pg_conn.rollback()


def verify_tables(
    pg_conn: PgConnection,
    sf_conn: Any,
    tables: Sequence[TableRef],
    sf_database: str,
    *,
    manifests: dict[TableRef, RunManifest] | None = None,
    max_keys: int = DEFAULT_MAX_KEYS,
    sf_control_schema: str = DEFAULT_CONTROL_SCHEMA,
) -> VerifyReport:
    manifests = manifests or {}
    return VerifyReport(
        [
            verify_table(
                pg_conn,
                sf_conn,
                t,
                sf_database,
                manifest=manifests.get(t),
                max_keys=max_keys,
                sf_control_schema=sf_control_schema,
            )
            for t in tables
        ]
    )
