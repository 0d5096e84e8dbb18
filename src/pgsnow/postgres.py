"""PostgreSQL access for the extractor: connections, table description, value checks, reading.

Every query is composed with ``psycopg2.sql`` (identifiers) and bound parameters (values).
One extraction run happens in one read-only REPEATABLE READ transaction, so the
description, the value checks and every batch see the same snapshot.

Reading strategy, chosen by measurement (300K rows of int/text/numeric/timestamptz/float,
loopback PostgreSQL 15): ``COPY (SELECT <projection>) TO STDOUT WITH (FORMAT csv)`` took
0.28 s, a named cursor fetching the same text projection and writing CSV in Python took
0.68 s. So CSV is produced by the server with COPY; PostgreSQL sends one CopyData message
per row (protocol guarantee) and psycopg2 hands each message to ``write()``, which lets the
sink count rows and cut batches on row boundaries. Parquet needs typed Python values to
build Arrow arrays, so it reads with a named (server-side) cursor in bounded chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from pgsnow.errors import PermanentError, PgSnowError, RetryableError
from pgsnow.identifiers import TableRef, check_no_collisions
from pgsnow.manifest import Column
from pgsnow.typemap import ValueKind, map_pg_type

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
# Unbounded numeric is staged as NUMBER(38,10): at most 28 integer digits.
UNBOUNDED_NUMERIC_LIMIT = 10**28


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


# --- describing a table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSchema:
    table: TableRef
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    estimated_rows: int | None  # pg_class.reltuples; None when never analysed
    relkind: str = "r"  # pg_class.relkind: r table, p partitioned, v view, m matview, f foreign

    @property
    def has_ctid(self) -> bool:
        return self.relkind in {"r", "p", "m"}

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
       NOT a.attnotnull
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
    for name, pg_type, base_type, nullable in rows:
        try:
            snowflake_type = map_pg_type(base_type)
        except PermanentError as exc:
            raise PermanentError(f"column {name!r}: {exc.message}", table=table.qualified) from exc
        columns.append(Column.from_types(name, pg_type, base_type, snowflake_type, bool(nullable)))
    return TableSchema(
        table=table,
        columns=tuple(columns),
        primary_key=primary_key,
        estimated_rows=int(reltuples) if reltuples is not None and reltuples >= 0 else None,
        relkind=str(relkind),
    )


# --- checking values Snowflake cannot hold ---------------------------------------------------------


@dataclass(frozen=True)
class _ValueRule:
    column: str
    problem: str
    # Values are sql.Literal (psycopg2's own quoting), not %s parameters: a '%' in a column
    # name would be read as a placeholder once parameters are passed.
    condition: sql.Composable


def _value_rules(schema: TableSchema) -> list[_ValueRule]:
    rules: list[_ValueRule] = []
    for col in schema.columns:
        ident = sql.Identifier(col.name)
        if col.kind is ValueKind.DECIMAL:
            rules.append(
                _ValueRule(
                    col.name, "numeric NaN", sql.SQL("{} = {}::numeric").format(ident, sql.Literal("NaN"))
                )
            )
            if col.base_type == "numeric":
                rules.append(
                    _ValueRule(
                        col.name,
                        "a value of 1e28 or more in magnitude (unbounded numeric is staged as NUMBER(38,10))",
                        sql.SQL("abs({}) >= {}").format(ident, sql.Literal(UNBOUNDED_NUMERIC_LIMIT)),
                    )
                )
                rules.append(
                    _ValueRule(
                        col.name,
                        "digits beyond scale 10 (unbounded numeric is staged as NUMBER(38,10); never rounded)",
                        sql.SQL("{0} <> round({0}, {1})").format(ident, sql.Literal(10)),
                    )
                )
        elif col.kind in {ValueKind.DATE, ValueKind.TIMESTAMP, ValueKind.TIMESTAMPTZ}:
            rules.append(
                _ValueRule(col.name, "an infinite date/time", sql.SQL("NOT isfinite({})").format(ident))
            )
            rules.append(
                _ValueRule(
                    col.name,
                    f"a year outside {MIN_YEAR}..{MAX_YEAR} (BC or too far ahead; UTC for timestamptz)",
                    sql.SQL("extract(year FROM {}) NOT BETWEEN {} AND {}").format(
                        ident, sql.Literal(MIN_YEAR), sql.Literal(MAX_YEAR)
                    ),
                )
            )
        elif col.kind is ValueKind.TIME:
            rules.append(
                _ValueRule(
                    col.name, "time 24:00:00", sql.SQL("{} = {}::time").format(ident, sql.Literal("24:00:00"))
                )
            )
    return rules


def check_values_fit(conn: SupportsExecute, schema: TableSchema) -> None:
    """Fail before extracting when a value cannot be staged exactly (never round, never clamp).

    One scan finds the first offending row over every rule at once; the error names the
    table, the column, the problem and the row's primary key (or ctid without one).
    """
    rules = _value_rules(schema)
    if not rules:
        return
    row_id: sql.Composable
    if schema.primary_key:
        row_id = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in schema.primary_key)
    elif schema.has_ctid:
        row_id = sql.SQL("ctid::text")
    else:
        row_id = sql.SQL("NULL::text")  # a view without a key: no way to point at the row
    flags = sql.SQL(", ").join(sql.SQL("coalesce({}, false)").format(r.condition) for r in rules)
    any_flag = sql.SQL(" OR ").join(sql.SQL("({})").format(r.condition) for r in rules)
    query = sql.SQL("SELECT {row_id}, {flags} FROM {table} WHERE {any_flag} LIMIT 1").format(
        row_id=row_id,
        flags=flags,
        table=sql.Identifier(schema.table.schema, schema.table.table),
        any_flag=any_flag,
    )
    with conn.cursor() as cur:
        cur.execute(query)
        found = cur.fetchone()
    if found is None:
        return
    key_width = len(schema.primary_key) or 1
    key_values, rule_flags = found[:key_width], found[key_width:]
    rule = next(r for r, flagged in zip(rules, rule_flags, strict=True) if flagged)
    where = (
        f"primary key ({', '.join(schema.primary_key)})=({', '.join(str(v) for v in key_values)})"
        if schema.primary_key
        else (f"ctid {key_values[0]}" if schema.has_ctid else "a row")
    )
    raise PermanentError(
        f"column {rule.column!r} of {schema.table.qualified} has {rule.problem} at {where}; "
        "Snowflake cannot hold it exactly, so the table is not extracted",
        table=schema.table.qualified,
    )


# --- reading ------------------------------------------------------------------------------------------


def _csv_expression(col: Column) -> sql.Composable:
    """One column rendered as text in the staged CSV encoding (NULL stays NULL)."""
    ident = sql.Identifier(col.name)
    match col.kind:
        case ValueKind.TIMESTAMPTZ:
            return sql.SQL("""to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""").format(
                ident
            )
        case ValueKind.BINARY:
            return sql.SQL("encode({}, 'hex')").format(ident)
        case ValueKind.BOOLEAN:
            return sql.SQL("CASE {} WHEN true THEN 'true' WHEN false THEN 'false' END").format(ident)
        case ValueKind.FLOAT:
            # PostgreSQL spells infinities 'Infinity'; Snowflake's CSV parser wants inf/-inf.
            return sql.SQL(
                "CASE WHEN {0} = 'Infinity' THEN 'inf' WHEN {0} = '-Infinity' THEN '-inf' ELSE {0}::text END"
            ).format(ident)
        case ValueKind.JSON:
            return _json_text(col, ident)
        case ValueKind.DECIMAL if col.base_type == "numeric":
            # Unbounded numeric: trailing zeros past scale 10 (1.500000000000) are dropped;
            # check_values_fit has already proved round() loses nothing.
            return sql.SQL("(CASE WHEN scale({0}) > 10 THEN round({0}, 10) ELSE {0} END)::text").format(ident)
        case _:
            # integer, numeric (plain digits, never exponent), text-like, date/time in ISO style.
            return sql.SQL("{}::text").format(ident)


def _json_text(col: Column, ident: sql.Identifier) -> sql.Composable:
    if col.base_type.endswith("[]"):
        return sql.SQL("to_jsonb({})::text").format(ident)
    return sql.SQL("{}::text").format(ident)


def _typed_expression(col: Column) -> sql.Composable:
    """One column as a value psycopg2 turns into the Python type the Parquet writer expects."""
    ident = sql.Identifier(col.name)
    if col.kind is ValueKind.JSON:
        return _json_text(col, ident)
    if col.kind is ValueKind.TEXT:
        return sql.SQL("{}::text").format(ident)  # enums, uuid, inet, interval... as text
    return ident


def _select(schema: TableSchema, expression: Any) -> sql.Composed:
    projection = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(expression(c), sql.Identifier(c.name)) for c in schema.columns
    )
    query = sql.SQL("SELECT {} FROM {}").format(
        projection, sql.Identifier(schema.table.schema, schema.table.table)
    )
    if schema.primary_key:
        # Qualified, because a bare name would sort by the projected (text) output column.
        table = schema.table
        order = sql.SQL(", ").join(sql.Identifier(table.schema, table.table, k) for k in schema.primary_key)
        query = sql.SQL("{} ORDER BY {}").format(query, order)
    return query


def csv_select(schema: TableSchema) -> sql.Composed:
    return _select(schema, _csv_expression)


def typed_select(schema: TableSchema) -> sql.Composed:
    return _select(schema, _typed_expression)


class CopyRowSink(Protocol):
    """Receives COPY output: the header row first, then exactly one CSV record per call."""

    def write(self, data: bytes) -> int | None: ...


class TableReader:
    """Streams one table, inside the caller's snapshot transaction, with bounded memory."""

    def __init__(self, conn: Connection, schema: TableSchema, *, cursor_name: str = "pgsnow_extract") -> None:
        self._conn = conn
        self._schema = schema
        self._cursor_name = cursor_name

    @property
    def schema(self) -> TableSchema:
        return self._schema

    def copy_csv(self, sink: CopyRowSink) -> None:
        """Stream the table as RFC 4180 CSV with a header: NULL unquoted empty, '' as ``""``."""
        query = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true, ENCODING 'UTF8')").format(
            csv_select(self._schema)
        )
        with self._conn.cursor() as cur:
            cur.copy_expert(query, sink)

    def iter_rows(self, chunk_rows: int) -> Iterator[Sequence[tuple[Any, ...]]]:
        """Yield lists of typed rows (at most ``chunk_rows`` each) from a server-side cursor."""
        with self._conn.cursor(name=self._cursor_name) as cur:
            cur.itersize = chunk_rows
            cur.execute(typed_select(self._schema))
            while chunk := cur.fetchmany(chunk_rows):
                yield chunk
