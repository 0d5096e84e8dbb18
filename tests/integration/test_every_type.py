"""No type refuses a table: one table with a column of every type the contract names (and an
extension type it does not), replicated in CSV and Parquet through the whole local pipeline.

Each format's copy must satisfy ``pgsnow verify``, the demo's cell-by-cell comparison (every
cell, read back through the connector), and this module's own expectations: what Snowflake holds
for the new types, written out here by hand from docs/type-mapping.md, so a mapping that both
sides got wrong the same way is still caught. The extensions (hstore, ltree, and cube, which the
contract does not name: "an extension type installed later") come from PostgreSQL's contrib.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg2
import pytest
from psycopg2 import sql

from pgsnow.demo.compare import compare_table
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.keys import FileFormat
from pgsnow.local.stack import SNOWFLAKE_DATABASE
from pgsnow.observability import SERVICE
from pgsnow.postgres import connect

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from conftest import PipelineHarness

pytestmark = pytest.mark.integration

EXTENSIONS = ("hstore", "ltree", "cube")

COMPOSITE = "every_type_pair"
COMPOSITE_FIELDS = "label text, amount numeric, at timestamptz, span int4range, tags text[]"

COLUMNS = f"""
    id integer PRIMARY KEY, qty smallint, price numeric(10,2), ratio numeric, score double precision,
    note text, born date, at timestamptz, doc jsonb, blob bytea,
    tsv tsvector, tsq tsquery, lt public.ltree, bits bit(4), vbits bit varying, pt point, ln line,
    ls lseg, bx box, pth path, poly polygon, circ circle, o oid, rc regclass, lsn pg_lsn,
    mac8 macaddr8, ch "char",
    tsv_arr tsvector[], pt_arr point[], vbit_arr bit varying[],
    i4r int4range, i8r int8range, nr numrange, dr daterange, tsr tsrange, tstzr tstzrange,
    i4mr int4multirange, nmr nummultirange, dmr datemultirange, tstzmr tstzmultirange,
    hs public.hstore, comp {{schema}}.{COMPOSITE}, unknown public.cube, unknown_arr public.cube[]
"""

# Row 1 ordinary values; row 2 the edges (empty ranges and multiranges, unbounded and infinite
# bounds, empty tsvector/bit string/hstore/arrays, a composite of NULLs, extreme numbers);
# row 3 NULL everywhere.
ROWS = r"""
VALUES
 (1, 7, 19.99, 1.00::numeric(10,2) / 7, 1.5, 'hi', '2024-02-29', '2024-03-31 01:30:00+00',
  '{"k": [1, 2.5]}', '\x00ff',
  'a fat cat', 'fat & !rat', 'Top.Science.Astronomy', B'1010', B'101', '(1,2)', '{1,-1,0}',
  '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(0,0),2>', 12345,
  'pg_class', '16/B374D848', '08:00:2b:01:02:03:04:05', 'x',
  ARRAY['a b'::tsvector, NULL], ARRAY[point '(1,2)'], '{101,0}',
  '[1,10)', '(,100]', '[1.5,2.25]', '[2024-01-01,)', '[2024-01-01 10:00,2024-01-02 00:00)',
  '[2024-01-01 10:00+02,infinity)',
  '{[1,3),[5,7)}', '{[1.5,2.5]}', '{[2024-01-01,2024-02-01)}', '{[2024-01-01 00:00+00,2024-01-02 00:00+00)}',
  'a=>1, b=>NULL, ""=>"empty key"', ROW('label, "quoted"', 1.5, '2024-01-01 00:00+00', '[1,5)', '{x,y}'),
  '(1,2,3)', ARRAY['(1,2)'::public.cube, NULL]),
 (2, -32768, -99999999.99, -12345678.123456789012345678, 'NaN', '', '0001-01-01', '2024-10-27 01:00:00+00',
  'null', '\x',
  '', 'x:*', '', B'0000', B'', '(-1.5,0)', '{0,1,-2}', '[(1,1),(1,1)]', '(0,0),(0,0)', '((0,0),(1,1))',
  '((0,0))', '<(1,1),0>', 4294967295, 'pg_type', '0/0', 'ff:ff:ff:ff:ff:ff:ff:ff', E'\\',
  '{}', '{}', '{}',
  'empty', '(,)', '(-1e30,1e-20]', '[-infinity,infinity]', '(,2024-01-01)', 'empty',
  '{}', '{(,)}', '{[2024-01-01,2024-01-02),[2024-01-05,)}', '{}',
  '', ROW(NULL, NULL, NULL, NULL, NULL), '(1),(2)', '{}'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
"""


def _range(
    lower: Any = None,
    upper: Any = None,
    *,
    lower_inc: bool = False,
    upper_inc: bool = False,
    lower_inf: bool = False,
    upper_inf: bool = False,
    empty: bool = False,
) -> dict[str, Any]:
    return {
        "empty": empty,
        "lower": lower,
        "upper": upper,
        "lower_inc": lower_inc,
        "upper_inc": upper_inc,
        "lower_inf": lower_inf,
        "upper_inf": upper_inf,
    }


EMPTY_RANGE = _range(empty=True)
UNBOUNDED_RANGE = _range(lower_inf=True, upper_inf=True)

# What Snowflake holds for the types this module is about, per row (docs/type-mapping.md):
# text-form types as PostgreSQL's text output, JSON documents parsed (numbers as Decimal).
EXPECTED: dict[str, tuple[Any, Any, Any]] = {
    "ratio": (Decimal("0.14285714285714285714"), Decimal("-12345678.123456789012345678"), None),
    "tsv": ("'a' 'cat' 'fat'", "", None),
    "tsq": ("'fat' & !'rat'", "'x':*", None),
    "lt": ("Top.Science.Astronomy", "", None),
    "bits": ("1010", "0000", None),
    "vbits": ("101", "", None),
    "pt": ("(1,2)", "(-1.5,0)", None),
    "ln": ("{1,-1,0}", "{0,1,-2}", None),
    "ls": ("[(0,0),(1,1)]", "[(1,1),(1,1)]", None),
    "bx": ("(1,1),(0,0)", "(0,0),(0,0)", None),
    "pth": ("[(0,0),(1,1),(2,0)]", "((0,0),(1,1))", None),
    "poly": ("((0,0),(1,1),(1,0))", "((0,0))", None),
    "circ": ("<(0,0),2>", "<(1,1),0>", None),
    "o": ("12345", "4294967295", None),
    "rc": ("pg_class", "pg_type", None),
    "lsn": ("16/B374D848", "0/0", None),
    "mac8": ("08:00:2b:01:02:03:04:05", "ff:ff:ff:ff:ff:ff:ff:ff", None),
    "ch": ("x", "\\", None),
    "tsv_arr": (["'a' 'b'", None], [], None),
    "pt_arr": (["(1,2)"], [], None),
    "vbit_arr": (["101", "0"], [], None),
    "i4r": (_range(1, 10, lower_inc=True), EMPTY_RANGE, None),
    # int8range is discrete: (,100] is stored as (,101)
    "i8r": (_range(None, 101, lower_inf=True), UNBOUNDED_RANGE, None),
    "nr": (
        _range(Decimal("1.5"), Decimal("2.25"), lower_inc=True, upper_inc=True),
        _range(Decimal("-1e30"), Decimal("1e-20"), upper_inc=True),
        None,
    ),
    # 'infinity' bounds are values (not unbounded ends): their text, and *_inf stays false
    "dr": (
        _range("2024-01-01", None, lower_inc=True, upper_inf=True),
        _range("-infinity", "infinity", lower_inc=True, upper_inc=True),
        None,
    ),
    "tsr": (
        _range("2024-01-01T10:00:00", "2024-01-02T00:00:00", lower_inc=True),
        _range(None, "2024-01-01T00:00:00", lower_inf=True),
        None,
    ),
    "tstzr": (_range("2024-01-01T08:00:00+00:00", "infinity", lower_inc=True), EMPTY_RANGE, None),
    "i4mr": ([_range(1, 3, lower_inc=True), _range(5, 7, lower_inc=True)], [], None),
    "nmr": (
        [_range(Decimal("1.5"), Decimal("2.5"), lower_inc=True, upper_inc=True)],
        [UNBOUNDED_RANGE],
        None,
    ),
    "dmr": (
        [_range("2024-01-01", "2024-02-01", lower_inc=True)],
        [
            _range("2024-01-01", "2024-01-02", lower_inc=True),
            _range("2024-01-05", None, lower_inc=True, upper_inf=True),
        ],
        None,
    ),
    "tstzmr": ([_range("2024-01-01T00:00:00+00:00", "2024-01-02T00:00:00+00:00", lower_inc=True)], [], None),
    "hs": ({"": "empty key", "a": "1", "b": None}, {}, None),
    # by field name; a nested range stays its text, a nested array an array
    "comp": (
        {
            "label": 'label, "quoted"',
            "amount": Decimal("1.5"),
            "at": "2024-01-01T00:00:00+00:00",
            "span": "[1,5)",
            "tags": ["x", "y"],
        },
        {"label": None, "amount": None, "at": None, "span": None, "tags": None},
        None,
    ),
    "unknown": ("(1, 2, 3)", "(1),(2)", None),
    "unknown_arr": (["(1, 2)", None], [], None),
}

SNOWFLAKE_TYPES = {
    "ratio": "NUMBER",
    **dict.fromkeys(
        ["tsv", "tsq", "lt", "bits", "vbits", "pt", "ln", "ls", "bx", "pth", "poly", "circ"], "TEXT"
    ),
    **dict.fromkeys(["o", "rc", "lsn", "mac8", "ch", "unknown"], "TEXT"),
    **dict.fromkeys(["tsv_arr", "pt_arr", "vbit_arr", "i4r", "i8r", "nr", "dr", "tsr", "tstzr"], "VARIANT"),
    **dict.fromkeys(["i4mr", "nmr", "dmr", "tstzmr", "hs", "comp", "unknown_arr"], "VARIANT"),
}


def _install_extensions(pipeline: PipelineHarness) -> None:
    """The contrib extensions this module needs, in the shared database's public schema (kept:
    other modules may use them). Skips only when the server has no such extension to install."""
    for name in EXTENSIONS:
        try:
            pipeline.run_sql(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA public").format(sql.Identifier(name))
            )
        except psycopg2.errors.UniqueViolation:
            pass  # another session installed it at the same moment: it is there
        except (psycopg2.errors.UndefinedFile, psycopg2.errors.FeatureNotSupported) as exc:
            pytest.skip(f"PostgreSQL has no {name} extension to install: {str(exc).strip()}")


def _parsed(value: Any) -> Any:
    if value is None or not isinstance(value, str):
        return value
    return json.loads(value, parse_float=Decimal, parse_int=Decimal)


def _normalized(value: Any) -> Any:
    """Numbers as Decimal by value (1.5 == 1.50), containers recursively."""
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return Decimal(value).normalize()


@pytest.mark.slow
@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_a_column_of_every_type_replicates_and_verifies(
    pipeline: PipelineHarness, file_format: FileFormat, every_log_record: pytest.LogCaptureFixture
) -> None:
    """Expected: the table replicates (no type refuses it); the type not in the contract (cube)
    arrives as its text with a warning in the manifest and the logs; verify finds the copy equal;
    every cell compares equal, and the new types hold what docs/type-mapping.md says."""
    # Given a table with a column of every type, three rows of ordinary, edge and NULL values
    _install_extensions(pipeline)
    composite = sql.Identifier(pipeline.schema, COMPOSITE)
    pipeline.run_sql(
        sql.SQL(
            "DO $$ BEGIN CREATE TYPE {} AS (" + COMPOSITE_FIELDS + "); "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ).format(composite)
    )
    table = pipeline.table(f"every_type_{file_format.value}")
    columns = COLUMNS.replace("{schema}", sql.Identifier(pipeline.schema).as_string(pipeline.setup_conn))
    pipeline.create_table(table, columns, ROWS.replace("{", "{{").replace("}", "}}"))  # sql.SQL placeholders

    # When it goes through the whole pipeline
    every_log_record.clear()
    manifest = pipeline.extract(table, file_format)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()

    # Then the type outside the contract (and the array of it) is named in the manifest's warnings
    # and in the logs
    assert len(manifest.warnings) == 2
    assert "column 'unknown'" in manifest.warnings[0] and "'cube'" in manifest.warnings[0]
    assert "column 'unknown_arr'" in manifest.warnings[1] and "array of 'cube'" in manifest.warnings[1]
    warned = {(r.name, r.levelno, r.getMessage()) for r in every_log_record.records}
    assert {(SERVICE, logging.WARNING, w) for w in manifest.warnings} <= warned
    # and the unbounded numeric column got the scale its values need
    assert next(c for c in manifest.columns if c.name == "ratio").snowflake_type == "NUMBER(38,20)"
    # and every file loaded, and verify finds the copy identical
    assert [d for d in recorder.deliveries if d.failed] == []
    result = pipeline.verify(table)
    assert result.ok, result.summary()
    assert (result.source_rows, result.target_rows) == (3, 3)
    # and every cell compares equal read back through the connector
    pg_conn = connect(pipeline.source_dsn)
    try:
        cells = compare_table(pg_conn, pipeline.sf_conn, table, SNOWFLAKE_DATABASE)
    finally:
        pg_conn.close()
    assert cells.ok, cells.detail
    assert (cells.source_rows, cells.snowflake_rows) == (3, 3)
    # and Snowflake's columns have the documented types and hold the documented values
    assert _snowflake_column_types(pipeline, table) == {
        name.upper(): data_type for name, data_type in SNOWFLAKE_TYPES.items()
    }
    held = _snowflake_values(pipeline, table)
    for name, expected in EXPECTED.items():
        kind = SNOWFLAKE_TYPES[name]
        actual = tuple(_normalized(_parsed(v)) if kind == "VARIANT" else v for v in held[name])
        assert actual == tuple(_normalized(e) if kind != "TEXT" else e for e in expected), name


def _snowflake_column_types(pipeline: PipelineHarness, table: TableRef) -> dict[str, str]:
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(
            f'SELECT "COLUMN_NAME", "DATA_TYPE" FROM {quote_ident(SNOWFLAKE_DATABASE)}."INFORMATION_SCHEMA"."COLUMNS" '
            'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s',
            (table.snowflake_schema, table.snowflake_table),
        )
        found = {str(name): str(data_type) for name, data_type in cur.fetchall()}
    return {name.upper(): found[name.upper()] for name in SNOWFLAKE_TYPES}


def _snowflake_values(pipeline: PipelineHarness, table: TableRef) -> dict[str, tuple[Any, ...]]:
    names = list(EXPECTED)
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(f'SELECT {", ".join(quote_ident(n.upper()) for n in names)} FROM {target} ORDER BY "ID"')
        rows = cur.fetchall()
    return {name: tuple(row[i] for row in rows) for i, name in enumerate(names)}


# --- unbounded numeric: the scale comes from the data -------------------------------------------------

RATIO = Decimal("0.14285714285714285714")  # numeric(10,2) 1.00 / 7: 20 digits after the point
FINER = Decimal("0.1234567890123456789012345")  # 25 digits after the point


def _held_numbers(pipeline: PipelineHarness, table: TableRef) -> dict[int, Decimal]:
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(f'SELECT "ID", "V" FROM {target}')
        return {int(key): value for key, value in cur.fetchall()}


def _snowflake_number_type(pipeline: PipelineHarness, table: TableRef) -> tuple[int, int]:
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(
            'SELECT "NUMERIC_PRECISION", "NUMERIC_SCALE" FROM '
            f'{quote_ident(SNOWFLAKE_DATABASE)}."INFORMATION_SCHEMA"."COLUMNS" '
            'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s AND "COLUMN_NAME" = \'V\'',
            (table.snowflake_schema, table.snowflake_table),
        )
        precision, scale = cur.fetchone()
    return int(precision), int(scale)


def _replicate(pipeline: PipelineHarness, table: TableRef, file_format: FileFormat, **options: str) -> Any:
    manifest = pipeline.extract(
        table,
        file_format,
        PGSNOW_TABLE_OPTIONS=json.dumps({table.qualified: {"write_mode": "merge", **options}}),
    )
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    assert [d for d in recorder.deliveries if d.failed] == []
    return manifest


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_unbounded_numeric_gets_its_scale_from_the_first_run_and_keeps_it(
    pipeline: PipelineHarness, file_format: FileFormat
) -> None:
    """Expected: a computed ratio with 20 decimals loads exactly into the NUMBER(38,20) the first
    run chose; a later run whose value needs scale 25 is refused by default (naming the key), is
    rounded to the kept scale under clamp (and verify names that row), and a replace run, which
    creates the table anew, chooses scale 25 and loads it exactly."""
    # Given an unbounded numeric column holding numeric(10,2) 1.00 / 7
    table = pipeline.table(f"ratio_{file_format.value}")
    pipeline.create_table(table, "id integer PRIMARY KEY, v numeric", "VALUES (1, 1.00::numeric(10,2) / 7)")

    # When its first run is replicated
    first = _replicate(pipeline, table, file_format)

    # Then the column is NUMBER(38,20) and holds the ratio exactly; verify agrees
    assert [c.snowflake_type for c in first.columns if c.name == "v"] == ["NUMBER(38,20)"]
    assert _snowflake_number_type(pipeline, table) == (38, 20)
    assert _held_numbers(pipeline, table) == {1: RATIO}
    assert pipeline.verify(table).ok

    # Given a later row needing scale 25
    pipeline.run_sql(
        sql.SQL("INSERT INTO {} VALUES (2, %s)").format(sql.Identifier(table.schema, table.table)), (FINER,)
    )

    # When the next run extracts it with the default policy, it is refused, naming the key
    with pytest.raises(PermanentError) as refused:
        pipeline.extract(
            table, file_format, PGSNOW_TABLE_OPTIONS=json.dumps({table.qualified: {"write_mode": "merge"}})
        )
    assert "digits beyond scale 20" in refused.value.message and "(id)=(2)" in refused.value.message
    assert _held_numbers(pipeline, table) == {1: RATIO}

    # When it runs under clamp, the value is rounded to the kept scale, and verify names that row
    clamped = _replicate(pipeline, table, file_format, value_policy="clamp")
    assert [c.snowflake_type for c in clamped.columns if c.name == "v"] == ["NUMBER(38,20)"]
    assert _held_numbers(pipeline, table) == {1: RATIO, 2: round(FINER, 20)}
    differing = pipeline.verify(table)
    assert not differing.ok and differing.missing == [] and differing.extra == []
    assert len(differing.different) == 1 and "2" in differing.different[0]

    # When a replace run recreates the table, the scale is chosen anew and both values are exact
    replaced = _replicate(pipeline, table, file_format, write_mode="replace")
    assert [c.snowflake_type for c in replaced.columns if c.name == "v"] == ["NUMBER(38,25)"]
    assert _snowflake_number_type(pipeline, table) == (38, 25)
    assert _held_numbers(pipeline, table) == {1: RATIO, 2: FINER}
    assert pipeline.verify(table).ok


def test_unbounded_numeric_of_an_empty_first_run_gets_scale_10(pipeline: PipelineHarness) -> None:
    """Expected: with no value to choose from, the documented default NUMBER(38,10)."""
    table = pipeline.table("ratio_empty")
    pipeline.create_table(table, "id integer PRIMARY KEY, v numeric")
    manifest = pipeline.extract(table)
    assert [c.snowflake_type for c in manifest.columns if c.name == "v"] == ["NUMBER(38,10)"]
