"""No type refuses a table: one table with a column of every type the contract names (and an
extension type it does not), replicated in CSV and Parquet through the whole local pipeline.

Each format's copy must satisfy ``pgsnow verify``, the demo's cell-by-cell comparison (every
cell, read back through the connector), and this module's own expectations: what Snowflake holds
for the new types, written out here by hand from docs/type-mapping.md, so a mapping that both
sides got wrong the same way is still caught. The extension types (hstore, ltree, and cube, which
the contract does not name: "an extension type installed later") come from PostgreSQL's contrib;
the built-in types also run without them, so a server without contrib still proves those.

The unbounded-numeric tests show the scale chosen from the data, kept by later runs, and chosen
anew by a replace run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg2
import pytest
from psycopg2 import sql

from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.keys import FileFormat
from pgsnow.local.stack import SNOWFLAKE_DATABASE
from pgsnow.observability import SERVICE

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

COMPOSITE = "every_type_pair"
COMPOSITE_FIELDS = "label text, amount numeric, at timestamptz, span int4range, tags text[]"


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


@dataclass(frozen=True)
class Case:
    """One column: its type, two rows' SQL values (row 1 ordinary, row 2 the edges; row 3 is NULL
    everywhere), what Snowflake holds for them (docs/type-mapping.md; JSON parsed, numbers as
    Decimal), its Snowflake DATA_TYPE, and the extension its type needs."""

    name: str
    pg_type: str
    values: tuple[str, str]
    held: tuple[Any, Any] | None  # None: checked by verify and the cell-by-cell comparison only
    data_type: str | None = None
    extension: str | None = None


CASES = [
    # the types of the contract before this module's
    Case("qty", "smallint", ("7", "-32768"), None),
    Case("price", "numeric(10,2)", ("19.99", "-99999999.99"), None),
    Case(
        "ratio",
        "numeric",
        ("1.00::numeric(10,2) / 7", "-12345678.123456789012345678"),
        (Decimal("0.14285714285714285714"), Decimal("-12345678.123456789012345678")),
        "NUMBER",
    ),
    Case(
        "hundreds", "numeric(5,-2)", ("12300", "-9999900"), (Decimal("12300"), Decimal("-9999900")), "NUMBER"
    ),
    # numeric(3,5) (scale above precision) maps to NUMBER(5,5) (tests/unit/test_typemap.py); not
    # replicated here: the local emulator writes DECIMAL(5,5) as .00123, docs/snowflake-compatibility.md
    Case("score", "double precision", ("1.5", "'NaN'"), None),
    Case("note", "text", ("'hi'", "''"), None),
    Case("born", "date", ("'2024-02-29'", "'0001-01-01'"), None),
    Case("at", "timestamptz", ("'2024-03-31 01:30:00+00'", "'2024-10-27 01:00:00+00'"), None),
    Case("doc", "jsonb", ("""'{"k": [1, 2.5]}'""", "'null'"), None),
    Case("blob", "bytea", (r"'\x00ff'", r"'\x'"), None),
    Case("big", "bigint", ("9223372036854775807", "-9223372036854775808"), None),
    Case("small_ratio", "real", ("1.1", "'-Infinity'"), None),
    Case("flag", "boolean", ("true", "false"), None),
    Case("at_time", "time", ("'12:30:00.5'", "'00:00:00'"), None),
    Case("local_ts", "timestamp(3)", ("'2024-02-29 12:00:00.123'", "'9999-12-31 23:59:59.999'"), None),
    Case("plain_json", "json", ("""'{"b": 1, "a": [true, null]}'""", "'[]'"), None),
    Case("labels", "varchar(10)[]", ("'{a,NULL,\"b,c\"}'", "'{}'"), None),
    Case("grid", "integer[][]", ("'{{1,2},{3,4}}'", "'{}'"), None),
    Case("code", "character(4)", ("'ab'", "''"), ("ab", ""), "TEXT"),
    Case("label", "character varying(20)", ("'Zoë 🚀'", "''"), ("Zoë 🚀", ""), "TEXT"),
    Case("nm", "name", ("'a b'", "''"), ("a b", ""), "TEXT"),
    # types Snowflake has none of: PostgreSQL's text output in a VARCHAR
    Case(
        "u",
        "uuid",
        ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "'00000000-0000-0000-0000-000000000000'"),
        ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "00000000-0000-0000-0000-000000000000"),
        "TEXT",
    ),
    Case("addr", "inet", ("'192.168.0.1/24'", "'::1'"), ("192.168.0.1/24", "::1/128"), "TEXT"),
    Case("net", "cidr", ("'10.0.0.0/8'", "'::/0'"), ("10.0.0.0/8", "::/0"), "TEXT"),
    Case(
        "mac",
        "macaddr",
        ("'08:00:2b:01:02:03'", "'00:00:00:00:00:00'"),
        ("08:00:2b:01:02:03", "00:00:00:00:00:00"),
        "TEXT",
    ),
    Case("cash", "money", ("12.34", "-0.01"), None),  # its text follows lc_monetary
    Case(
        "span",
        "interval",
        ("'1 day 2 hours'", "'-1 year -2 mons +3 days -04:05:06.5'"),
        ("P1DT2H", "P-1Y-2M3DT-4H-5M-6.5S"),
        "TEXT",
    ),
    Case(
        "at_tz",
        "time with time zone",
        ("'10:00+02'", "'00:00:00+00'"),
        ("10:00:00+02", "00:00:00+00"),
        "TEXT",
    ),
    Case("x", "xml", ("'<a>1</a>'", "''"), ("<a>1</a>", ""), "TEXT"),
    Case("jp", "jsonpath", ("'$.a[*] ? (@ > 1)'", "'$'"), ('$."a"[*]?(@ > 1)', "$"), "TEXT"),
    # text-form types: PostgreSQL's text output in a VARCHAR
    Case("tsv", "tsvector", ("'a fat cat'", "''"), ("'a' 'cat' 'fat'", ""), "TEXT"),
    Case("tsq", "tsquery", ("'fat & !rat'", "'x:*'"), ("'fat' & !'rat'", "'x':*"), "TEXT"),
    Case("bits", "bit(4)", ("B'1010'", "B'0000'"), ("1010", "0000"), "TEXT"),
    Case("vbits", "bit varying", ("B'101'", "B''"), ("101", ""), "TEXT"),
    Case("pt", "point", ("'(1,2)'", "'(-1.5,0)'"), ("(1,2)", "(-1.5,0)"), "TEXT"),
    Case("ln", "line", ("'{1,-1,0}'", "'{0,1,-2}'"), ("{1,-1,0}", "{0,1,-2}"), "TEXT"),
    Case("ls", "lseg", ("'[(0,0),(1,1)]'", "'[(1,1),(1,1)]'"), ("[(0,0),(1,1)]", "[(1,1),(1,1)]"), "TEXT"),
    Case("bx", "box", ("'(1,1),(0,0)'", "'(0,0),(0,0)'"), ("(1,1),(0,0)", "(0,0),(0,0)"), "TEXT"),
    Case(
        "pth",
        "path",
        ("'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1))'"),
        ("[(0,0),(1,1),(2,0)]", "((0,0),(1,1))"),
        "TEXT",
    ),
    Case(
        "poly", "polygon", ("'((0,0),(1,1),(1,0))'", "'((0,0))'"), ("((0,0),(1,1),(1,0))", "((0,0))"), "TEXT"
    ),
    Case("circ", "circle", ("'<(0,0),2>'", "'<(1,1),0>'"), ("<(0,0),2>", "<(1,1),0>"), "TEXT"),
    Case("o", "oid", ("12345", "4294967295"), ("12345", "4294967295"), "TEXT"),
    Case("rc", "regclass", ("'pg_class'", "'pg_type'"), ("pg_class", "pg_type"), "TEXT"),
    Case("rt", "regtype", ("'integer'", "'pg_catalog.text'"), ("integer", "text"), "TEXT"),
    Case("rp", "regproc", ("'now'", "'pg_catalog.textlen'"), ("now", "textlen"), "TEXT"),
    Case("rpd", "regprocedure", ("'now()'", "'lower(text)'"), ("now()", "lower(text)"), "TEXT"),
    Case(
        "ro",
        "regoperator",
        ("'+(integer,integer)'", "'||(text,text)'"),
        ("+(integer,integer)", "||(text,text)"),
        "TEXT",
    ),
    Case("rn", "regnamespace", ("'pg_catalog'", "'public'"), ("pg_catalog", "public"), "TEXT"),
    Case("rcf", "regconfig", ("'english'", "'simple'"), ("english", "simple"), "TEXT"),
    Case("rd", "regdictionary", ("'simple'", "'english_stem'"), ("simple", "english_stem"), "TEXT"),
    Case("rr", "regrole", ("'pg_monitor'", "'pg_read_all_data'"), ("pg_monitor", "pg_read_all_data"), "TEXT"),
    Case("tx", "xid", ("'123'", "'0'"), ("123", "0"), "TEXT"),
    Case("tx8", "xid8", ("'123'", "'18446744073709551615'"), ("123", "18446744073709551615"), "TEXT"),
    Case("cmd", "cid", ("'5'", "'0'"), ("5", "0"), "TEXT"),
    Case("tuple", "tid", ("'(0,1)'", "'(4294967295,65535)'"), ("(0,1)", "(4294967295,65535)"), "TEXT"),
    Case("snap", "pg_snapshot", ("'10:20:10,14,15'", "'1:1:'"), ("10:20:10,14,15", "1:1:"), "TEXT"),
    Case("txsnap", "txid_snapshot", ("'10:20:10,14,15'", "'1:1:'"), ("10:20:10,14,15", "1:1:"), "TEXT"),
    Case("i2v", "int2vector", ("'1 2'", "''"), ("1 2", ""), "TEXT"),
    Case("oidv", "oidvector", ("'1 2'", "''"), ("1 2", ""), "TEXT"),
    Case("cur", "refcursor", ("'cur'", "''"), ("cur", ""), "TEXT"),
    Case("lsn", "pg_lsn", ("'16/B374D848'", "'0/0'"), ("16/B374D848", "0/0"), "TEXT"),
    Case(
        "mac8",
        "macaddr8",
        ("'08:00:2b:01:02:03:04:05'", "'ff:ff:ff:ff:ff:ff:ff:ff'"),
        ("08:00:2b:01:02:03:04:05", "ff:ff:ff:ff:ff:ff:ff:ff"),
        "TEXT",
    ),
    Case("ch", '"char"', ("'x'", r"E'\\'"), ("x", "\\"), "TEXT"),
    # arrays of text-form types: arrays of their text
    Case(
        "tsv_arr", "tsvector[]", ("ARRAY['a b'::tsvector, NULL]", "'{}'"), (["'a' 'b'", None], []), "VARIANT"
    ),
    Case("pt_arr", "point[]", ("ARRAY[point '(1,2)']", "'{}'"), (["(1,2)"], []), "VARIANT"),
    Case("vbit_arr", "bit varying[]", ("'{101,0}'", "'{}'"), (["101", "0"], []), "VARIANT"),
    # ranges: objects; 'infinity' bounds are values (not unbounded ends), so *_inf stays false
    Case(
        "i4r", "int4range", ("'[1,10)'", "'empty'"), (_range(1, 10, lower_inc=True), EMPTY_RANGE), "VARIANT"
    ),
    # int8range is discrete: (,100] is stored as (,101)
    Case(
        "i8r",
        "int8range",
        ("'(,100]'", "'(,)'"),
        (_range(None, 101, lower_inf=True), UNBOUNDED_RANGE),
        "VARIANT",
    ),
    Case(
        "nr",
        "numrange",
        ("'[1.5,2.25]'", "'(-1e30,1e-20]'"),
        (
            _range(Decimal("1.5"), Decimal("2.25"), lower_inc=True, upper_inc=True),
            _range(Decimal("-1e30"), Decimal("1e-20"), upper_inc=True),
        ),
        "VARIANT",
    ),
    Case(
        "dr",
        "daterange",
        ("'[2024-01-01,)'", "'[-infinity,infinity]'"),
        (
            _range("2024-01-01", None, lower_inc=True, upper_inf=True),
            _range("-infinity", "infinity", lower_inc=True, upper_inc=True),
        ),
        "VARIANT",
    ),
    Case(
        "tsr",
        "tsrange",
        ("'[2024-01-01 10:00,2024-01-02 00:00)'", "'(,2024-01-01)'"),
        (
            _range("2024-01-01T10:00:00", "2024-01-02T00:00:00", lower_inc=True),
            _range(None, "2024-01-01T00:00:00", lower_inf=True),
        ),
        "VARIANT",
    ),
    Case(
        "tstzr",
        "tstzrange",
        ("'[2024-01-01 10:00+02,infinity)'", "'empty'"),
        (_range("2024-01-01T08:00:00+00:00", "infinity", lower_inc=True), EMPTY_RANGE),
        "VARIANT",
    ),
    # multiranges: arrays of range objects
    Case(
        "i4mr",
        "int4multirange",
        ("'{[1,3),[5,7)}'", "'{}'"),
        ([_range(1, 3, lower_inc=True), _range(5, 7, lower_inc=True)], []),
        "VARIANT",
    ),
    Case(
        "nmr",
        "nummultirange",
        ("'{[1.5,2.5]}'", "'{(,)}'"),
        ([_range(Decimal("1.5"), Decimal("2.5"), lower_inc=True, upper_inc=True)], [UNBOUNDED_RANGE]),
        "VARIANT",
    ),
    Case(
        "dmr",
        "datemultirange",
        ("'{[2024-01-01,2024-02-01)}'", "'{[2024-01-01,2024-01-02),[2024-01-05,)}'"),
        (
            [_range("2024-01-01", "2024-02-01", lower_inc=True)],
            [
                _range("2024-01-01", "2024-01-02", lower_inc=True),
                _range("2024-01-05", None, lower_inc=True, upper_inf=True),
            ],
        ),
        "VARIANT",
    ),
    Case(
        "tstzmr",
        "tstzmultirange",
        ("'{[2024-01-01 00:00+00,2024-01-02 00:00+00)}'", "'{}'"),
        ([_range("2024-01-01T00:00:00+00:00", "2024-01-02T00:00:00+00:00", lower_inc=True)], []),
        "VARIANT",
    ),
    # a composite: an object by field name; a nested range stays its text, a nested array an array
    Case(
        "comp",
        f"{{schema}}.{COMPOSITE}",
        (
            """ROW('label, "quoted"', 1.5, '2024-01-01 00:00+00', '[1,5)', '{x,y}')""",
            "ROW(NULL, NULL, NULL, NULL, NULL)",
        ),
        (
            {
                "label": 'label, "quoted"',
                "amount": Decimal("1.5"),
                "at": "2024-01-01T00:00:00+00:00",
                "span": "[1,5)",
                "tags": ["x", "y"],
            },
            {"label": None, "amount": None, "at": None, "span": None, "tags": None},
        ),
        "VARIANT",
    ),
    # extension types from contrib
    Case(
        "lt",
        "public.ltree",
        ("'Top.Science.Astronomy'", "''"),
        ("Top.Science.Astronomy", ""),
        "TEXT",
        "ltree",
    ),
    Case(
        "lq",
        "public.lquery",
        ("'Top.*{1,2}.Astronomy'", "'*'"),
        ("Top.*{1,2}.Astronomy", "*"),
        "TEXT",
        "ltree",
    ),
    Case("ci", "public.citext", ("'MiXeD Case'", "''"), ("MiXeD Case", ""), "TEXT", "citext"),
    Case(
        "hs",
        "public.hstore",
        ("""'a=>1, b=>NULL, ""=>"empty key"'""", "''"),
        ({"": "empty key", "a": "1", "b": None}, {}),
        "VARIANT",
        "hstore",
    ),
    # not in the contract ("an extension type installed later"): its text, with a warning
    Case("unknown", "public.cube", ("'(1,2,3)'", "'(1),(2)'"), ("(1, 2, 3)", "(1),(2)"), "TEXT", "cube"),
    Case(
        "unknown_arr",
        "public.cube[]",
        ("ARRAY['(1,2)'::public.cube, NULL]", "'{}'"),
        (["(1, 2)", None], []),
        "VARIANT",
        "cube",
    ),
]
EXTENSIONS = sorted({c.extension for c in CASES if c.extension})


def _installed_extensions(pipeline: PipelineHarness) -> dict[str, str]:
    """Install the contrib extensions the cases need, in the shared database's public schema (kept:
    other modules may use them); the ones the server cannot install, with the reason."""
    missing = {}
    for name in EXTENSIONS:
        try:
            pipeline.run_sql(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA public").format(sql.Identifier(name))
            )
        except psycopg2.errors.UniqueViolation:
            pass  # another session installed it at the same moment: it is there
        except (psycopg2.errors.UndefinedFile, psycopg2.errors.FeatureNotSupported) as exc:
            missing[name] = str(exc).strip().splitlines()[0]
    return missing


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


def _create_every_type_table(pipeline: PipelineHarness, table: TableRef, cases: list[Case]) -> None:
    schema = sql.Identifier(pipeline.schema)
    pipeline.run_sql(
        sql.SQL(
            "DO $$ BEGIN CREATE TYPE {} AS (" + COMPOSITE_FIELDS + "); "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ).format(sql.Identifier(pipeline.schema, COMPOSITE))
    )
    columns = sql.SQL(", ").join(
        [sql.SQL("id integer PRIMARY KEY")]
        + [
            sql.SQL("{} " + c.pg_type.replace("{schema}", "{schema_name}")).format(
                sql.Identifier(c.name), schema_name=schema
            )
            for c in cases
        ]
    )
    target = sql.Identifier(table.schema, table.table)
    pipeline.run_sql(sql.SQL("CREATE TABLE {} ({})").format(target, columns))
    for row in (0, 1):
        values = sql.SQL(", ").join([sql.Literal(row + 1)] + [sql.SQL(c.values[row]) for c in cases])
        pipeline.run_sql(sql.SQL("INSERT INTO {} VALUES ({})").format(target, values))
    pipeline.run_sql(sql.SQL("INSERT INTO {} (id) VALUES (3)").format(target))


@pytest.mark.slow
@pytest.mark.parametrize(
    "with_extensions",
    [
        pytest.param(True, id="with-contrib-extensions"),
        # the built-in types alone, which every PostgreSQL has: never skipped
        pytest.param(False, id="built-in-types"),
    ],
)
@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_a_column_of_every_type_replicates_and_verifies(
    pipeline: PipelineHarness,
    file_format: FileFormat,
    with_extensions: bool,
    every_log_record: pytest.LogCaptureFixture,
) -> None:
    """Expected: the table replicates (no type refuses it); the type not in the contract (cube)
    arrives as its text with a warning in the manifest and the logs; verify finds the copy equal;
    every cell compares equal, and the new types hold what docs/type-mapping.md says."""
    # Given a table with a column of every type, three rows of ordinary, edge and NULL values
    cases = [c for c in CASES if c.extension is None]
    if with_extensions:
        missing = _installed_extensions(pipeline)
        if missing:
            pytest.skip(f"PostgreSQL cannot install contrib extensions {missing} (the built-in case runs)")
        cases = CASES
    table = pipeline.table(f"every_type_{file_format.value}_{'ext' if with_extensions else 'builtin'}")
    _create_every_type_table(pipeline, table, cases)

    # When it goes through the whole pipeline
    every_log_record.clear()
    manifest = pipeline.extract(table, file_format)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()

    # Then the type outside the contract (and the array of it) is named in the manifest's warnings
    # and in the logs; built-in types alone warn about nothing
    if with_extensions:
        assert len(manifest.warnings) == 2
        assert "column 'unknown'" in manifest.warnings[0] and "'cube'" in manifest.warnings[0]
        assert "column 'unknown_arr'" in manifest.warnings[1] and "array of 'cube'" in manifest.warnings[1]
        warned = {(r.name, r.levelno, r.getMessage()) for r in every_log_record.records}
        assert {(SERVICE, logging.WARNING, w) for w in manifest.warnings} <= warned
    else:
        assert manifest.warnings == ()
    # and the unbounded numeric column got the scale its values need
    assert next(c for c in manifest.columns if c.name == "ratio").snowflake_type == "NUMBER(38,20)"
    # and every file loaded, and verify finds the copy identical
    assert [d for d in recorder.deliveries if d.failed] == []
    result = pipeline.verify(table)
    assert result.ok, result.summary()
    assert (result.source_rows, result.target_rows) == (3, 3)
    # and every cell compares equal read back through the connector
    cells = pipeline.compare_cells(table)
    assert cells.ok, cells.detail
    assert (cells.source_rows, cells.snowflake_rows) == (3, 3)
    # and Snowflake's columns have the documented types and hold the documented values
    checked = [c for c in cases if c.held is not None]
    assert _snowflake_column_types(pipeline, table, [c.name for c in checked]) == {
        c.name.upper(): c.data_type for c in checked
    }
    held = _snowflake_values(pipeline, table, [c.name for c in checked])
    for case in checked:
        assert case.held is not None
        expected = (*case.held, None)
        if case.data_type == "VARIANT":
            assert tuple(_normalized(_parsed(v)) for v in held[case.name]) == tuple(
                _normalized(e) for e in expected
            ), case.name
        else:
            assert held[case.name] == expected, case.name

    # And verify tells a bound that is the value infinity from an unbounded end, and an empty
    # range from an unbounded one: changed in Snowflake, both rows are named
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    unbounded_above = _range("2024-01-01T08:00:00+00:00", None, lower_inc=True, upper_inf=True)
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(
            f'UPDATE {target} SET "TSTZR" = PARSE_JSON(%s) WHERE "ID" = 1', (json.dumps(unbounded_above),)
        )
        cur.execute(
            f'UPDATE {target} SET "I4R" = PARSE_JSON(%s) WHERE "ID" = 2', (json.dumps(UNBOUNDED_RANGE),)
        )
    changed = pipeline.verify(table)
    assert not changed.ok and changed.missing == [] and changed.extra == []
    assert sorted(changed.different) == ["1", "2"]


def _snowflake_column_types(pipeline: PipelineHarness, table: TableRef, names: list[str]) -> dict[str, str]:
    """DATA_TYPE of these columns of the Snowflake table, by Snowflake name."""
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(
            'SELECT "COLUMN_NAME", "DATA_TYPE" FROM '
            f'{quote_ident(SNOWFLAKE_DATABASE)}."INFORMATION_SCHEMA"."COLUMNS" '
            'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s',
            (table.snowflake_schema, table.snowflake_table),
        )
        found = {str(name): str(data_type) for name, data_type in cur.fetchall()}
    return {name.upper(): found[name.upper()] for name in names}


def _snowflake_values(
    pipeline: PipelineHarness, table: TableRef, names: list[str]
) -> dict[str, tuple[Any, ...]]:
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
    assert differing.different == ["2"]

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
