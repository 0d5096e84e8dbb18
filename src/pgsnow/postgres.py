"""PostgreSQL access for the extractor: connections, table description, value checks, reading.

Every query is composed with ``psycopg2.sql`` (identifiers) and bound parameters (values).
One extraction run happens in one read-only REPEATABLE READ transaction, so the
description, the value checks and every batch see the same snapshot.

Reading strategy, chosen by measurement (300K rows of int/text/numeric/timestamptz/float,
loopback PostgreSQL 15): ``COPY (SELECT <projection>) TO STDOUT WITH (FORMAT csv)`` took
0.28 s, a named cursor fetching the same text projection and writing CSV in Python took
0.68 s. So CSV is produced by the server with COPY; PostgreSQL sends one CopyData message
per row (protocol guarantee) and psycopg2 hands each message to ``write()``, which lets the
sink count rows and cut batches on row boundaries. Parquet is produced the same way: COPY
CSV (a cheaper projection, ``arrow_csv_select``) parsed by Arrow's CSV reader into typed
columns, never one Python object per value; on the benchmark's table that is ~2x the rows/s
of a named cursor building Python values (docs/performance.md). ``iter_rows`` (named cursor,
bounded chunks) remains for callers that want Python values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from pgsnow.config import ValuePolicy
from pgsnow.errors import PermanentError, PgSnowError, RetryableError
from pgsnow.identifiers import TableRef, check_no_collisions
from pgsnow.manifest import Column
from pgsnow.pg_json import json_document
from pgsnow.typemap import (
    UNBOUNDED_NUMERIC_PRECISION,
    UNBOUNDED_NUMERIC_SCALE,
    TypeShape,
    ValueKind,
    map_pg_type,
    unbounded_numeric_type,
)

Connection = psycopg2.extensions.connection

APPLICATION_NAME = "pgsnow"

# Session settings that make the server's text output match the staged encoding
# (docs/architecture.md): UTC, ISO dates, ISO 8601 intervals, shortest round-trip floats.
SESSION_SETTINGS: Mapping[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "1",
}

# Snowflake DATE/TIMESTAMP hold years 1..9999; PostgreSQL also has BC years and infinity.
MIN_YEAR, MAX_YEAR = 1, 9999


class SupportsExecute(Protocol):
    """The part of a psycopg2 connection this module uses (a real connection in every test)."""

    def cursor(self, name: str | None = None) -> Any: ...


def connect(dsn: str, *, statement_timeout_ms: int = 0) -> Connection:
    """Open a connection set up for extraction: UTC/ISO session, read-only REPEATABLE READ.

    The first statement of a run starts the transaction (and takes the snapshot); the
    caller ends it with ``rollback()`` when the run is over.
    """
    try:
        conn = psycopg2.connect(dsn, application_name=APPLICATION_NAME)
    except psycopg2.Error as exc:
        raise classify_pg_error(exc) from exc
    try:
        conn.autocommit = True
        conn.set_client_encoding("UTF8")  # through psycopg2, so it decodes with the same encoding
        with conn.cursor() as cur:
            for name, value in {**SESSION_SETTINGS, "statement_timeout": str(statement_timeout_ms)}.items():
                cur.execute("SELECT set_config(%s, %s, false)", (name, value))
        conn.set_session(
            isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
            readonly=True,
            autocommit=False,
        )
    except psycopg2.Error as exc:
        conn.close()
        raise classify_pg_error(exc) from exc
    return conn


# --- errors ---------------------------------------------------------------------------------------

# SQLSTATE classes/codes where trying again later can succeed.
_RETRYABLE_CLASSES = {"08", "53", "58"}  # connection, insufficient resources, system error
_RETRYABLE_CODES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57014",  # query_canceled (statement_timeout)
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "25006",  # read_only_sql_transaction on a replica being promoted
}
_PERMANENT_HINTS = {
    "42P01": "the table does not exist",
    "3F000": "the schema does not exist",
    "42501": "permission denied",
    "42703": "a column does not exist",
    "28P01": "authentication failed",
    "28000": "authorization failed",
}


def classify_pg_error(
    exc: BaseException, *, table: str | None = None, run_id: str | None = None
) -> PgSnowError:
    """Sort a psycopg2 error into retryable or permanent by SQLSTATE (the one place that does)."""
    sqlstate = getattr(exc, "pgcode", None)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if sqlstate is None:
        # No SQLSTATE: the connection failed or broke (refused, reset, closed): transient.
        if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
            return RetryableError(f"PostgreSQL connection problem: {first_line}", table=table, run_id=run_id)
        return PermanentError(f"PostgreSQL error: {first_line}", table=table, run_id=run_id)
    if sqlstate[:2] in _RETRYABLE_CLASSES or sqlstate in _RETRYABLE_CODES:
        return RetryableError(
            f"PostgreSQL {sqlstate}: {first_line}", table=table, run_id=run_id, sqlstate=sqlstate
        )
    hint = _PERMANENT_HINTS.get(sqlstate)
    message = (
        f"PostgreSQL {sqlstate} ({hint}): {first_line}" if hint else f"PostgreSQL {sqlstate}: {first_line}"
    )
    return PermanentError(message, table=table, run_id=run_id, sqlstate=sqlstate)


# --- choosing tables --------------------------------------------------------------------------------

# What selecting a schema replicates: ordinary tables and partitioned tables' roots. Left out,
# because their rows already arrive through a table that is selected (PostgreSQL reads a parent
# with its children unless told ONLY): partitions (relispartition) and children of legacy
# inheritance (a pg_inherits row). Views, materialized views and foreign tables hold no rows of
# their own to keep in step; each of these is replicated only when named (docs/extraction.md).
_SCHEMA_TABLES_SQL = """
SELECT c.relname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s
  AND c.relkind IN ('r', 'p')
  AND NOT c.relispartition
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid)
ORDER BY c.relname
"""


def list_schema_tables(conn: SupportsExecute, schema: str) -> list[TableRef]:
    """The tables that replicating ``schema`` means: each row of the schema once, through the
    table it was inserted into or the root of that table's partitions or inheritance tree."""
    with conn.cursor() as cur:
        cur.execute(_SCHEMA_TABLES_SQL, (schema,))
        return [TableRef(schema, name) for (name,) in cur.fetchall()]


# --- describing a table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSchema:
    table: TableRef
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    estimated_rows: int | None  # pg_class.reltuples; None when never analysed
    relkind: str = "r"  # pg_class.relkind: r table, p partitioned, v view, m matview, f foreign
    # Columns whose type (or array element type) is not in the type contract, staged as text.
    warnings: tuple[str, ...] = ()

    @property
    def has_ctid(self) -> bool:
        return self.relkind in {"r", "p", "m"}

    @property
    def is_partitioned(self) -> bool:
        """A partitioned table's root: its rows live in its partitions, whose ctids may repeat."""
        return self.relkind == "p"

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


_RELATION_SQL = """
SELECT c.oid, has_table_privilege(c.oid, 'SELECT'), c.reltuples::bigint, c.relkind
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""

# Columns in attnum order with the declared type and the type after resolving
# (possibly nested) domains; enums are reported as text.
_COLUMNS_SQL = """
WITH RECURSIVE resolved(attnum, typid, typmod, depth) AS (
    SELECT a.attnum, a.atttypid, a.atttypmod, 0
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = %(relid)s AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
    SELECT r.attnum, t.typbasetype, t.typtypmod, r.depth + 1
    FROM resolved r JOIN pg_catalog.pg_type t ON t.oid = r.typid
    WHERE t.typtype = 'd'
), base AS (
    SELECT DISTINCT ON (attnum) attnum, typid, typmod
    FROM resolved ORDER BY attnum, depth DESC
)
SELECT a.attname,
       pg_catalog.format_type(a.atttypid, a.atttypmod),
       CASE WHEN bt.typtype = 'e' THEN 'text'
            WHEN et.typtype = 'e' THEN 'text[]'
            ELSE pg_catalog.format_type(b.typid, b.typmod) END,
       NOT a.attnotnull,
       bt.typname,
       CASE WHEN bt.typtype = 'e' THEN 'b' ELSE bt.typtype::text END,
       -- the extension that owns the base type (citext, hstore, ltree...), NULL for built-in types
       (SELECT x.extname FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_extension x ON x.oid = d.refobjid
         WHERE d.classid = 'pg_catalog.pg_type'::regclass AND d.objid = b.typid
           AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
         LIMIT 1),
       -- an array's element, when it is a base type: its values are staged as to_jsonb renders them
       CASE WHEN et.typtype = 'b' THEN pg_catalog.format_type(et.oid, NULL) END,
       CASE WHEN et.typtype = 'b' THEN et.typname::text END,
       (SELECT x.extname FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_extension x ON x.oid = d.refobjid
         WHERE d.classid = 'pg_catalog.pg_type'::regclass AND d.objid = et.oid AND et.typtype = 'b'
           AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
         LIMIT 1)
FROM pg_catalog.pg_attribute a
JOIN base b ON b.attnum = a.attnum
JOIN pg_catalog.pg_type bt ON bt.oid = b.typid
LEFT JOIN pg_catalog.pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A'
WHERE a.attrelid = %(relid)s
ORDER BY a.attnum
"""

_PRIMARY_KEY_SQL = """
SELECT a.attname
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %(relid)s AND i.indisprimary
ORDER BY k.ord
"""


def describe_table(conn: SupportsExecute, table: TableRef) -> TableSchema:
    """Read a table's columns, types, nullability and primary key from pg_catalog."""
    with conn.cursor() as cur:
        cur.execute(_RELATION_SQL, (table.schema, table.table))
        relation = cur.fetchone()
        if relation is None:
            raise PermanentError(
                f"table {table.qualified!r} does not exist in PostgreSQL (or is not a table/view)",
                table=table.qualified,
                sqlstate="42P01",
            )
        relid, can_select, reltuples, relkind = relation
        if not can_select:
            raise PermanentError(
                f"the PostgreSQL user may not SELECT from {table.qualified!r}",
                table=table.qualified,
                sqlstate="42501",
            )
        cur.execute(_COLUMNS_SQL, {"relid": relid})
        rows = cur.fetchall()
        cur.execute(_PRIMARY_KEY_SQL, {"relid": relid})
        primary_key = tuple(r[0] for r in cur.fetchall())
    if not rows:
        raise PermanentError(f"table {table.qualified!r} has no columns", table=table.qualified)
    check_no_collisions((r[0] for r in rows), what="column", table=table.qualified)
    columns = []
    warnings = []
    for row in rows:
        name, pg_type, base_type, nullable, type_name, typtype, extension = row[:7]
        element_type, element_name, element_extension = row[7:]
        snowflake_type = map_pg_type(base_type, type_name=type_name, typtype=typtype, extension=extension)
        columns.append(Column.from_types(name, pg_type, base_type, snowflake_type, bool(nullable)))
        if snowflake_type.shape is TypeShape.FALLBACK:
            warnings.append(
                f"column {name!r} of {table.qualified} has type {base_type!r}, which is not in pgsnow's "
                "type contract: it is staged as its PostgreSQL text output in a VARCHAR"
            )
        elif element_type is not None:
            element = map_pg_type(element_type, type_name=element_name, extension=element_extension)
            if element.shape is TypeShape.FALLBACK:
                warnings.append(
                    f"column {name!r} of {table.qualified} is an array of {element_type!r}, which is not "
                    "in pgsnow's type contract: its elements are staged as their PostgreSQL text output "
                    "in a VARIANT array"
                )
    return TableSchema(
        table=table,
        columns=tuple(columns),
        primary_key=primary_key,
        estimated_rows=int(reltuples) if reltuples is not None and reltuples >= 0 else None,
        relkind=str(relkind),
        warnings=tuple(warnings),
    )


# --- the scale of unbounded numeric columns ------------------------------------------------------


def _staged_scale(col: Column) -> int:
    return UNBOUNDED_NUMERIC_SCALE if col.scale is None else col.scale


def with_numeric_scales(schema: TableSchema, scales: Mapping[str, int]) -> TableSchema:
    """The schema with these unbounded numeric columns given these NUMBER(38, s) scales."""
    columns = tuple(
        replace(
            c,
            snowflake_type=(mapped := unbounded_numeric_type(scales[c.name])).sql,
            precision=mapped.precision,
            scale=mapped.scale,
        )
        if c.is_unbounded_numeric and c.name in scales
        else c
        for c in schema.columns
    )
    return replace(schema, columns=columns)


def choose_numeric_scales(
    conn: SupportsExecute,
    schema: TableSchema,
    where: sql.Composable | None = None,
    params: Sequence[Any] = (),
    *,
    kept: Mapping[str, int] | None = None,
) -> TableSchema:
    """Give every unbounded numeric column its NUMBER(38, s) scale.

    A column in ``kept`` keeps that scale (the Snowflake table was created with it, and
    Snowflake cannot change a column's scale). Any other is chosen from the values the run
    stages (``where``), in one scan: the most digits after the point any value needs (trailing
    zeros do not count), at least UNBOUNDED_NUMERIC_SCALE, and at most what leaves room for
    the largest value's integer digits (values of 1e38 or more cannot fit any NUMBER and are
    left to the value rules). Without a value to choose from, UNBOUNDED_NUMERIC_SCALE.
    """
    kept = kept or {}
    chosen = dict(kept)
    measured = [c for c in schema.columns if c.is_unbounded_numeric and c.name not in kept]
    if measured:
        aggregates = []
        for col in measured:
            ident = sql.Identifier(col.name)
            # NaN sorts above Infinity: this keeps the finite values below 1e38 only.
            fits = sql.SQL("abs({}) < {}").format(ident, sql.Literal(10**UNBOUNDED_NUMERIC_PRECISION))
            aggregates.append(sql.SQL("max(min_scale({})) FILTER (WHERE {})").format(ident, fits))
            aggregates.append(
                sql.SQL("max(length(trunc(abs({}))::text)) FILTER (WHERE {} AND abs({}) >= 1)").format(
                    ident, fits, ident
                )
            )
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(aggregates), sql.Identifier(schema.table.schema, schema.table.table)
        )
        if where is not None:
            query = sql.SQL("{} WHERE {}").format(query, where)
        with conn.cursor() as cur:
            cur.execute(query, tuple(params) or None)
            found = cur.fetchone()
        for index, col in enumerate(measured):
            needed_scale, integer_digits = found[2 * index], found[2 * index + 1]
            scale = max(UNBOUNDED_NUMERIC_SCALE, int(needed_scale or 0))
            chosen[col.name] = min(scale, UNBOUNDED_NUMERIC_PRECISION - int(integer_digits or 0))
    return with_numeric_scales(schema, chosen)


# --- checking values Snowflake cannot hold ---------------------------------------------------------


@dataclass(frozen=True)
class _ValueRule:
    column: str
    problem: str
    # Values are sql.Literal (psycopg2's own quoting), not %s parameters: a '%' in a column
    # name would be read as a placeholder once parameters are passed.
    condition: sql.Composable
    # The value the ``clamp`` policy stages instead (NULL where nothing is nearer); None where no
    # value would be an honest stand-in (a cut-off text is a silent change): refused under clamp too.
    clamped: sql.Composable | None


_NULL = sql.SQL("NULL")


def _number_max(scale: int) -> str:
    """The greatest magnitude NUMBER(38, scale) holds: 38 - scale nines, the point, scale nines."""
    integer = "9" * (UNBOUNDED_NUMERIC_PRECISION - scale) or "0"
    return integer + ("." + "9" * scale if scale else "")


_CLAMP_RANGES: Mapping[ValueKind, tuple[str, str, str]] = {
    ValueKind.DATE: ("date", "0001-01-01", "9999-12-31"),
    ValueKind.TIMESTAMP: ("timestamp", "0001-01-01 00:00:00", "9999-12-31 23:59:59.999999"),
    ValueKind.TIMESTAMPTZ: ("timestamptz", "0001-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00"),
}

# The first moment of year MAX_YEAR + 1, per kind (the exclusive upper bound of the year rule).
_BEYOND_MAX_YEAR: Mapping[ValueKind, str] = {
    ValueKind.DATE: f"{MAX_YEAR + 1}-01-01",
    ValueKind.TIMESTAMP: f"{MAX_YEAR + 1}-01-01 00:00:00",
    ValueKind.TIMESTAMPTZ: f"{MAX_YEAR + 1}-01-01 00:00:00+00",
}


# Snowflake's largest values (docs.snowflake.com, "New maximum size limits for database objects",
# bundle 2025_03): VARCHAR and VARIANT 128 MB, BINARY 64 MB, but a BINARY column declared without a
# length (as pgsnow declares bytea, and as existing tables' BINARY columns cannot be widened) holds
# 8 MB. Text columns are declared VARCHAR(134217728) (pgsnow.typemap).
MAX_VARCHAR_BYTES = 134_217_728
MAX_VARIANT_BYTES = 134_217_728
MAX_BINARY_BYTES = 8_388_608
# A JSON value's text is at most this many times its stored (possibly compressed) size: LZ4's
# best ratio is about 255x and escaping can grow a string up to 6x. Only values stored larger than
# MAX_VARIANT_BYTES / this are written out as text to be measured: the scan stays cheap.
_JSON_TEXT_PER_STORED_BYTE = 1536


# Types staged as text whose text is short by construction: never checked for size.
_SHORT_TEXT_TYPES = ("uuid", "inet", "cidr", "macaddr", "money", "interval", "time with time zone", "name")
_DECLARED_LENGTH = re.compile(r"\((\d+)\)$")


def _text_may_exceed(base_type: str, limit: int) -> bool:
    """Whether a value of this text-like type can be longer than ``limit`` bytes (4 per character)."""
    if base_type.startswith(_SHORT_TEXT_TYPES):
        return False
    declared = _DECLARED_LENGTH.search(base_type)
    return declared is None or int(declared.group(1)) * 4 > limit


def _size_rule(col: Column, ident: sql.Identifier) -> _ValueRule | None:
    """A value longer than its Snowflake column can hold: refused by default, NULL under ``null``,
    and refused under ``clamp`` too (nothing shorter is the same value)."""
    if col.kind is ValueKind.TEXT and _text_may_exceed(col.base_type, MAX_VARCHAR_BYTES):
        what = f"a value over {MAX_VARCHAR_BYTES} bytes (Snowflake's largest VARCHAR)"
        # octet_length of a text value reads its stored length, without reading the value.
        too_long = sql.SQL("octet_length({}::text) > {}").format(ident, sql.Literal(MAX_VARCHAR_BYTES))
    elif col.kind is ValueKind.BINARY:
        what = f"a value over {MAX_BINARY_BYTES} bytes (Snowflake's BINARY column)"
        too_long = sql.SQL("octet_length({}) > {}").format(ident, sql.Literal(MAX_BINARY_BYTES))
    elif col.kind is ValueKind.JSON:
        what = f"a document over {MAX_VARIANT_BYTES} bytes as JSON text (Snowflake's largest VARIANT)"
        too_long = sql.SQL(
            "CASE WHEN pg_column_size({}) > {} THEN octet_length({}) > {} ELSE false END"
        ).format(
            ident,
            sql.Literal(MAX_VARIANT_BYTES // _JSON_TEXT_PER_STORED_BYTE),
            _json_text(col, ident),
            sql.Literal(MAX_VARIANT_BYTES),
        )
    else:
        return None
    return _ValueRule(col.name, what, too_long, None)


def _value_rules(schema: TableSchema) -> list[_ValueRule]:
    rules: list[_ValueRule] = []
    for col in schema.columns:
        ident = sql.Identifier(col.name)
        size_rule = _size_rule(col, ident)
        if size_rule is not None:
            rules.append(size_rule)
        if col.kind is ValueKind.DECIMAL:
            rules.append(
                _ValueRule(
                    col.name,
                    "numeric NaN",
                    sql.SQL("{} = {}::numeric").format(ident, sql.Literal("NaN")),
                    _NULL,  # NaN has no nearest number
                )
            )
            if col.is_unbounded_numeric:
                scale = _staged_scale(col)
                staged_as = f"NUMBER({UNBOUNDED_NUMERIC_PRECISION},{scale})"
                integer_digits = UNBOUNDED_NUMERIC_PRECISION - scale
                limit = sql.Literal(_number_max(scale))
                rules.append(
                    _ValueRule(
                        col.name,
                        f"a value of 1e{integer_digits} or more in magnitude (this unbounded numeric "
                        f"column is staged as {staged_as})",
                        sql.SQL("abs({}) >= {}").format(ident, sql.Literal(10**integer_digits)),
                        sql.SQL("CASE WHEN {0} > 0 THEN {1}::numeric ELSE -{1}::numeric END").format(
                            ident, limit
                        ),
                    )
                )
                rules.append(
                    _ValueRule(
                        col.name,
                        f"digits beyond scale {scale} (this unbounded numeric column is staged as "
                        f"{staged_as}, its scale chosen when the table was first created; never rounded)",
                        sql.SQL("{0} <> round({0}, {1})").format(ident, sql.Literal(scale)),
                        sql.SQL("round({}, {})").format(ident, sql.Literal(scale)),
                    )
                )
        elif col.kind in _CLAMP_RANGES:
            type_name, low, high = _CLAMP_RANGES[col.kind]
            low_value = sql.SQL("{}::{}").format(sql.Literal(low), sql.SQL(type_name))
            high_value = sql.SQL("{}::{}").format(sql.Literal(high), sql.SQL(type_name))
            beyond_value = sql.SQL("{}::{}").format(
                sql.Literal(_BEYOND_MAX_YEAR[col.kind]), sql.SQL(type_name)
            )
            nearest = sql.SQL("CASE WHEN {} < {} THEN {} ELSE {} END").format(
                ident, low_value, low_value, high_value
            )
            rules.append(
                _ValueRule(
                    col.name, "an infinite date/time", sql.SQL("NOT isfinite({})").format(ident), nearest
                )
            )
            rules.append(
                _ValueRule(
                    col.name,
                    f"a year outside {MIN_YEAR}..{MAX_YEAR} (BC or too far ahead; UTC for timestamptz)",
                    # Two comparisons, not extract(year ...): the same rows (UTC session) at half
                    # the cost of the numeric extract() per value on a full-table scan.
                    sql.SQL("({0} < {1} OR {0} >= {2})").format(ident, low_value, beyond_value),
                    nearest,
                )
            )
        elif col.kind is ValueKind.TIME:
            rules.append(
                _ValueRule(
                    col.name,
                    "time 24:00:00",
                    sql.SQL("{} = {}::time").format(ident, sql.Literal("24:00:00")),
                    sql.SQL("{}::time").format(sql.Literal("23:59:59.999999")),
                )
            )
        rules += _spatial_value_rules(col)
    return rules


_SPATIAL_KINDS = frozenset({ValueKind.GEOMETRY, ValueKind.GEOGRAPHY})
# Extension types staged as their own text output: vector '[1,2,3]', geometry/geography EWKB hex.
_TEXT_OUTPUT_KINDS = frozenset({ValueKind.VECTOR, *_SPATIAL_KINDS})


def _spatial_value_rules(col: Column) -> list[_ValueRule]:
    """PostGIS values Snowflake cannot hold as they are; the policies stage NULL for them.

    Snowflake's GEOMETRY and GEOGRAPHY are 2D ("altitude currently isn't supported"), refuse
    invalid shapes unless told to allow them, and GEOGRAPHY is WGS 84 (SRID 4326) only.
    """
    if col.kind not in _SPATIAL_KINDS:
        return []
    shape = sql.SQL("{}::geometry").format(sql.Identifier(col.name))
    rules = [
        _ValueRule(
            col.name,
            "a geometry with Z or M coordinates (Snowflake's geospatial types are 2D)",
            sql.SQL("ST_NDims({}) > 2").format(shape),
            _NULL,
        ),
        _ValueRule(
            col.name,
            "an invalid shape (ST_IsValid is false; Snowflake refuses invalid shapes)",
            # ST_IsValidDetail, not ST_IsValid: the same test without a NOTICE per bad row.
            sql.SQL("NOT (ST_IsValidDetail({})).valid").format(shape),
            _NULL,
        ),
    ]
    if col.kind is ValueKind.GEOGRAPHY:
        rules.append(
            _ValueRule(
                col.name,
                "a geography whose SRID is not 4326 (Snowflake's GEOGRAPHY is WGS 84 only)",
                sql.SQL("ST_SRID({}) <> 4326").format(sql.Identifier(col.name)),
                _NULL,
            )
        )
    return rules


def policy_expression(col: Column, schema: TableSchema, policy: ValuePolicy) -> sql.Composable:
    """The column as staged under the table's value policy (``fail`` stages it unchanged).

    ``null`` stages NULL for a value Snowflake cannot hold, ``clamp`` the nearest value it can
    (NULL for numeric NaN; a value too long has none: ``check_values_fit`` refuses it under clamp
    too); both are explicit, per-table choices (docs/type-mapping.md).
    """
    ident = sql.Identifier(col.name)
    if policy is ValuePolicy.FAIL:
        return ident
    rules = [
        r
        for r in _value_rules(schema)
        if r.column == col.name and (policy is ValuePolicy.NULL or r.clamped is not None)
    ]
    if not rules:
        return ident
    branches = sql.SQL(" ").join(
        sql.SQL("WHEN {} THEN {}").format(
            r.condition, _NULL if policy is ValuePolicy.NULL or r.clamped is None else r.clamped
        )
        for r in rules
    )
    return sql.SQL("(CASE {} ELSE {} END)").format(branches, ident)


def check_values_fit(
    conn: SupportsExecute,
    schema: TableSchema,
    where: sql.Composable | None = None,
    params: Sequence[Any] = (),
    *,
    columns: Collection[str] | None = None,
    policy: ValuePolicy = ValuePolicy.FAIL,
    order_key: Sequence[str] = (),
) -> None:
    """Fail before staging when a value cannot be staged exactly (never round, never clamp).

    ``order_key``: ``where`` bounds a key range; the scan then follows that key's index over the
    range (``ORDER BY`` it), where a plain ``LIMIT 1`` lets PostgreSQL read the whole table.

    One scan finds the first offending row over every rule at once (within ``where`` when
    given: the run's or the chunk's range); the error names the table, the column, the
    problem and the row's primary key (or ctid without one). Only ``columns`` are checked when
    given (the policy stages the others' values), plus, under ``clamp``, every rule that has no
    clamped value (a value too long for its column).
    """
    rules = [
        r
        for r in _value_rules(schema)
        if columns is None or r.column in columns or (policy is ValuePolicy.CLAMP and r.clamped is None)
    ]
    if not rules:
        return
    row_id: sql.Composable
    if schema.primary_key:
        row_id = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in schema.primary_key)
    elif schema.is_partitioned:
        # A ctid is unique only within one partition: name the partition with it.
        row_id = sql.SQL("tableoid::regclass::text || ' ctid ' || ctid::text")
    elif schema.has_ctid:
        row_id = sql.SQL("'ctid ' || ctid::text")
    else:
        row_id = sql.SQL("NULL::text")  # a view without a key: no way to point at the row
    flags = sql.SQL(", ").join(sql.SQL("coalesce({}, false)").format(r.condition) for r in rules)
    any_flag = sql.SQL(" OR ").join(sql.SQL("({})").format(r.condition) for r in rules)
    if where is not None:
        any_flag = sql.SQL("({}) AND ({})").format(where, any_flag)
    query = sql.SQL("SELECT {row_id}, {flags} FROM {table} WHERE {any_flag}{order} LIMIT 1").format(
        row_id=row_id,
        flags=flags,
        table=sql.Identifier(schema.table.schema, schema.table.table),
        any_flag=any_flag,
        order=sql.SQL(" ORDER BY {}").format(_order_by(schema, order_key)) if order_key else sql.SQL(""),
    )
    with conn.cursor() as cur:
        cur.execute(query, tuple(params) or None)
        found = cur.fetchone()
    if found is None:
        return
    key_width = len(schema.primary_key) or 1
    key_values, rule_flags = found[:key_width], found[key_width:]
    rule = next(r for r, flagged in zip(rules, rule_flags, strict=True) if flagged)
    where_text = (
        f"primary key ({', '.join(schema.primary_key)})=({', '.join(str(v) for v in key_values)})"
        if schema.primary_key
        else (f"{key_values[0]}" if schema.has_ctid else "a row")
    )
    raise PermanentError(
        f"column {rule.column!r} of {schema.table.qualified} has {rule.problem} at {where_text}; "
        "Snowflake cannot hold it exactly, so the table is not extracted "
        + (
            "(or set the table's value_policy to null or clamp)"
            if rule.clamped is not None
            else "(or set the table's value_policy to null to stage NULL in its place)"
        ),
        table=schema.table.qualified,
    )


# --- reading ------------------------------------------------------------------------------------------


def _csv_expression(col: Column, source: sql.Composable) -> sql.Composable:
    """One column rendered as text in the staged CSV encoding (NULL stays NULL)."""
    match col.kind:
        case ValueKind.TIMESTAMPTZ:
            return sql.SQL("""to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""").format(
                source
            )
        case ValueKind.BINARY:
            return sql.SQL("encode({}, 'hex')").format(source)
        case ValueKind.BOOLEAN:
            return sql.SQL("CASE {} WHEN true THEN 'true' WHEN false THEN 'false' END").format(source)
        case ValueKind.FLOAT:
            # PostgreSQL spells infinities 'Infinity'; Snowflake's CSV parser wants inf/-inf.
            return sql.SQL(
                "CASE WHEN {0} = 'Infinity' THEN 'inf' WHEN {0} = '-Infinity' THEN '-inf' ELSE {0}::text END"
            ).format(source)
        case ValueKind.JSON:
            return _json_text(col, source)
        case ValueKind.DECIMAL if col.is_unbounded_numeric:
            # Unbounded numeric: trailing zeros past the column's scale (1.500000000000) are dropped;
            # check_values_fit (or the value policy) has made round() lose nothing.
            scale = sql.Literal(_staged_scale(col))
            return sql.SQL("(CASE WHEN scale({0}) > {1} THEN round({0}, {1}) ELSE {0} END)::text").format(
                source, scale
            )
        case _:
            # integer, numeric (plain digits, never exponent), text-like, date/time in ISO style.
            return sql.SQL("{}::text").format(source)


def _json_text(col: Column, source: sql.Composable) -> sql.Composable:
    if col.shape is not TypeShape.SCALAR:
        return sql.SQL("({})::text").format(json_document(col.shape, source))
    if col.base_type == "json":
        # Staged as its jsonb text: Snowflake's VARIANT keeps neither key order nor spacing anyway,
        # but PARSE_JSON refuses duplicate keys and makes exponent-notation numbers doubles
        # (1.2345678901234567890e20 would lose digits); jsonb keeps the last of duplicate keys (as
        # PostgreSQL itself reads json) and writes numbers in plain notation, which Snowflake keeps
        # exact up to 38 digits. jsonb cannot hold the escape \u0000, so such a value stays as written.
        return sql.SQL(
            "CASE WHEN strpos({0}::text, '\\u0000') > 0 THEN {0}::text ELSE {0}::jsonb::text END"
        ).format(source)
    return sql.SQL("{}::text").format(source)


def _typed_expression(col: Column, source: sql.Composable) -> sql.Composable:
    """One column as a value psycopg2 turns into the Python type the Parquet writer expects."""
    if col.kind is ValueKind.JSON:
        return _json_text(col, source)
    if col.kind is ValueKind.TEXT or col.kind in _TEXT_OUTPUT_KINDS:
        return sql.SQL("{}::text").format(source)  # enums, uuid, inet, interval, vector, EWKB... as text
    return source


def _arrow_csv_expression(col: Column, source: sql.Composable) -> sql.Composable:
    """One column as text that Arrow's CSV parser turns into the column's Parquet type.

    The cheapest text that parses exactly: PostgreSQL's own output where Arrow reads it
    (booleans t/f, floats incl. NaN/Infinity, timestamptz as ``...+00`` in the UTC session),
    so the server skips the CSV encoding's ``to_char``/``CASE`` work. Text-like values go
    through ``::text`` as in the typed path (``inet::text`` keeps the netmask, ``char(n)``
    drops its padding); bytea as hex, decoded by the writer.
    """
    match col.kind:
        case ValueKind.BINARY:
            return sql.SQL("encode({}, 'hex')").format(source)
        case ValueKind.JSON | ValueKind.DECIMAL:
            return _csv_expression(col, source)
        case ValueKind.TEXT:
            return sql.SQL("{}::text").format(source)
        case _:
            return source


@dataclass(frozen=True)
class RowRange:
    """Which rows one read covers, in keyset order: ``after < (order key) <= through``, plus a filter.

    Bounds are the key's values as text (PostgreSQL's own output in the extraction session),
    bound as untyped literals that the server reads back as the columns' types.
    """

    order_key: tuple[str, ...] = ()
    after: tuple[str, ...] | None = None
    through: tuple[str, ...] | None = None
    filter: sql.Composable | None = None  # e.g. the incremental run's lower cursor bound
    filter_params: tuple[Any, ...] = ()

    def condition(self) -> tuple[sql.Composable | None, tuple[Any, ...]]:
        parts: list[sql.Composable] = []
        params: list[Any] = []
        if self.filter is not None:
            parts.append(self.filter)
            params += self.filter_params
        key = sql.SQL(", ").join(sql.Identifier(k) for k in self.order_key)
        for bound, operator in ((self.after, ">"), (self.through, "<=")):
            if bound is None:
                continue
            placeholders = sql.SQL(", ").join(sql.Placeholder() * len(bound))
            parts.append(sql.SQL("ROW({}) {} ROW({})").format(key, sql.SQL(operator), placeholders))
            params += bound
        if not parts:
            return None, ()
        return sql.SQL(" AND ").join(sql.SQL("({})").format(p) for p in parts), tuple(params)


def _order_by(schema: TableSchema, order_key: Sequence[str], descending: bool = False) -> sql.Composable:
    # Qualified, because a bare name would sort by the projected (text) output column.
    table = schema.table
    direction = sql.SQL(" DESC" if descending else "")
    return sql.SQL(", ").join(
        sql.SQL("{}{}").format(sql.Identifier(table.schema, table.table, k), direction) for k in order_key
    )


def build_select(
    schema: TableSchema,
    expression: Callable[[Column, sql.Composable], sql.Composable],
    *,
    policy: ValuePolicy = ValuePolicy.FAIL,
    rows: RowRange | None = None,
    trailing_text: Sequence[str] = (),
) -> tuple[sql.Composed, tuple[Any, ...]]:
    """SELECT every column (under the value policy) of the rows in ``rows``, in key order.

    ``trailing_text`` appends these columns again as plain text after the staged ones (the
    Parquet path reads its file's key and cursor ranges from them; they are not written).
    """
    rows = rows or RowRange(order_key=schema.primary_key)
    projection = [
        sql.SQL("{} AS {}").format(
            expression(c, policy_expression(c, schema, policy)), sql.Identifier(c.name)
        )
        for c in schema.columns
    ]
    projection += [sql.SQL("{}::text").format(sql.Identifier(name)) for name in trailing_text]
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(projection), sql.Identifier(schema.table.schema, schema.table.table)
    )
    condition, params = rows.condition()
    if condition is not None:
        query = sql.SQL("{} WHERE {}").format(query, condition)
    if rows.order_key:
        query = sql.SQL("{} ORDER BY {}").format(query, _order_by(schema, rows.order_key))
    return query, params


def csv_select(schema: TableSchema, **options: Any) -> tuple[sql.Composed, tuple[Any, ...]]:
    return build_select(schema, _csv_expression, **options)


def typed_select(schema: TableSchema, **options: Any) -> tuple[sql.Composed, tuple[Any, ...]]:
    return build_select(schema, _typed_expression, **options)


def arrow_csv_select(schema: TableSchema, **options: Any) -> tuple[sql.Composed, tuple[Any, ...]]:
    return build_select(schema, _arrow_csv_expression, **options)


def next_chunk_end(
    conn: SupportsExecute, schema: TableSchema, rows: RowRange, chunk_rows: int
) -> tuple[str, ...] | None:
    """The order key (as text) of the ``chunk_rows``-th row after ``rows.after``; None when no row is left.

    An index-only keyset walk (LIMIT, never OFFSET): the chunk's end is fixed before the chunk
    is read, so a retried chunk covers exactly the same key range.
    """
    condition, params = rows.condition()
    key = sql.SQL(", ").join(sql.Identifier(k) for k in rows.order_key)
    inner = sql.SQL("SELECT {} FROM {}").format(key, sql.Identifier(schema.table.schema, schema.table.table))
    if condition is not None:
        inner = sql.SQL("{} WHERE {}").format(inner, condition)
    inner = sql.SQL("{} ORDER BY {} LIMIT {}").format(
        inner, _order_by(schema, rows.order_key), sql.Literal(chunk_rows)
    )
    outer_order = sql.SQL(", ").join(
        sql.SQL("{} DESC").format(sql.Identifier("chunk", k)) for k in rows.order_key
    )
    texts = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("chunk", k)) for k in rows.order_key)
    query = sql.SQL("SELECT {} FROM ({}) AS chunk ORDER BY {} LIMIT 1").format(texts, inner, outer_order)
    with conn.cursor() as cur:
        cur.execute(query, params or None)
        found = cur.fetchone()
    return None if found is None else tuple(str(v) for v in found)


def estimate_rows(conn: SupportsExecute, schema: TableSchema, rows: RowRange) -> int | None:
    """The planner's row estimate for a range (cheap; no scan); reltuples when there is no filter."""
    condition, params = rows.condition()
    if condition is None:
        return schema.estimated_rows
    query = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {} WHERE {}").format(
        sql.Identifier(schema.table.schema, schema.table.table), condition
    )
    with conn.cursor() as cur:
        cur.execute(query, params or None)
        plan = cur.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


# A relation's bytes on disk (heap + TOAST) and rows, summed over its leaf partitions (a
# partitioned root holds none itself; pg_partition_tree lists nothing for a plain table, hence
# the UNION).
_ROW_BYTES_SQL = """
WITH t AS (
    SELECT c.oid FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = %s AND c.relname = %s
)
SELECT sum(pg_catalog.pg_table_size(c.oid))::float8, sum(greatest(c.reltuples, 0))::float8
  FROM pg_catalog.pg_class c
 WHERE c.oid IN (SELECT oid FROM t UNION SELECT p.relid FROM t, pg_catalog.pg_partition_tree(t.oid) p)
   -- leaves only: an analysed partitioned parent (PostgreSQL 14+) counts its partitions' rows too
   AND c.relkind NOT IN ('p', 'I')
"""


def estimate_row_bytes(conn: SupportsExecute, table: TableRef) -> float | None:
    """Bytes per row on disk from the statistics (no scan); None when never analysed or empty."""
    with conn.cursor() as cur:
        cur.execute(_ROW_BYTES_SQL, (table.schema, table.table))
        found = cur.fetchone()
    if found is None or not found[0] or not found[1]:
        return None
    return float(found[0]) / float(found[1])


@dataclass(frozen=True)
class SafePoint:
    """The latest moment below which no still-invisible transaction can have written a row."""

    moment: str  # timestamptz text, UTC
    sees_all_sessions: bool  # False: pg_stat_activity hid other roles' transactions


_SAFE_POINT_SQL = """
SELECT least(
           statement_timestamp(),
           (SELECT min(a.xact_start) FROM pg_catalog.pg_stat_activity a
             WHERE a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
               AND a.backend_type = 'client backend'
               -- a transaction in another database cannot write this table
               AND a.datname = current_database())
       )::text,
       pg_has_role('pg_read_all_stats', 'USAGE')
"""


def read_safe_point(conn: Connection) -> SafePoint:
    """Read the safe point in its own transaction, which the caller ends *before* its snapshot.

    Any transaction still invisible to a snapshot taken after this either was open when
    pg_stat_activity was read (so its ``xact_start``, which is its ``now()``, is counted) or
    began after this statement started (so its ``now()`` is later than ``statement_timestamp()``).
    """
    with conn.cursor() as cur:
        cur.execute(_SAFE_POINT_SQL)
        row = cur.fetchone()
    conn.rollback()
    assert row is not None  # an aggregate-free SELECT of two expressions returns one row
    moment, sees_all = row
    return SafePoint(str(moment), bool(sees_all))


class CopyRowSink(Protocol):
    """Receives COPY output: the header row first, then exactly one CSV record per call."""

    def write(self, data: bytes) -> int | None: ...


class TableReader:
    """Streams rows of one table, inside the caller's snapshot transaction, with bounded memory."""

    def __init__(
        self,
        conn: Connection,
        schema: TableSchema,
        *,
        policy: ValuePolicy = ValuePolicy.FAIL,
        cursor_name: str = "pgsnow_extract",
    ) -> None:
        self._conn = conn
        self._schema = schema
        self._policy = policy
        self._cursor_name = cursor_name

    @property
    def schema(self) -> TableSchema:
        return self._schema

    def copy_csv(self, sink: CopyRowSink, rows: RowRange | None = None) -> None:
        """Stream rows as RFC 4180 CSV with a header: NULL unquoted empty, '' as ``""``."""
        select, params = csv_select(self._schema, policy=self._policy, rows=rows)
        with self._conn.cursor() as cur:
            # COPY takes no parameters: bind them into the statement text with psycopg2's quoting.
            inner = cur.mogrify(select, params or None).decode("utf-8")
            query = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true, ENCODING 'UTF8')").format(
                sql.SQL(inner)
            )
            cur.copy_expert(query, sink)

    def copy_arrow_csv(
        self, sink: CopyRowSink, rows: RowRange | None = None, trailing_text: Sequence[str] = ()
    ) -> None:
        """Stream rows as header-less CSV for Arrow's parser (``formats.open_arrow_csv``): NULL vs '' as in copy_csv.

        Runs on its own thread in the Parquet path while the caller parses; the caller uses
        the connection for nothing else until this returns.
        """
        select, params = arrow_csv_select(
            self._schema, policy=self._policy, rows=rows, trailing_text=trailing_text
        )
        with self._conn.cursor() as cur:
            inner = cur.mogrify(select, params or None).decode("utf-8")
            query = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, ENCODING 'UTF8')").format(sql.SQL(inner))
            cur.copy_expert(query, sink)

    def iter_rows(
        self, chunk_rows: int, rows: RowRange | None = None, trailing_text: Sequence[str] = ()
    ) -> Iterator[Sequence[tuple[Any, ...]]]:
        """Yield lists of typed rows (at most ``chunk_rows`` each) from a server-side cursor."""
        select, params = typed_select(
            self._schema, policy=self._policy, rows=rows, trailing_text=trailing_text
        )
        with self._conn.cursor(name=self._cursor_name) as cur:
            cur.itersize = chunk_rows
            cur.execute(select, params or None)
            while chunk := cur.fetchmany(chunk_rows):
                yield chunk
