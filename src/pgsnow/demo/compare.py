"""Compare a PostgreSQL table with its Snowflake copy: row counts and every cell.

Both sides are streamed in primary-key order and merged like a sort-merge
join, so memory stays bounded by the chunk size and a missing or extra row
does not shift every later comparison. Each value is first normalised to a
canonical form chosen by its column's value kind (``pgsnow.typemap``):
decimals compare exactly, timestamptz values as UTC instants, JSON as parsed
documents (JSON ``null`` is not SQL NULL), bytes as bytes, and NaN equals NaN;
vectors element by element as 32-bit floats, geometries as their SRID and exact
2D WKB.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from snowflake.connector import SnowflakeConnection
from snowflake.connector.errors import ProgrammingError

from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified, snowflake_name
from pgsnow.pg_json import json_document
from pgsnow.typemap import TypeShape, ValueKind

DEFAULT_CHUNK_ROWS = 10_000
_MAX_SHOWN_CHARS = 80
# PostgreSQL character types: ordered by their own value, the others (uuid, inet...) by their text.
_CHARACTER_TYPES = ("text", "character varying", "character", "bpchar", "name", "citext")


class _JsonNull:
    """JSON ``null`` as a value, so it differs from SQL NULL (None)."""

    _instance: _JsonNull | None = None

    def __new__(cls) -> _JsonNull:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "JSON null"


JSON_NULL = _JsonNull()
_NAN = "NaN"  # canonical float NaN, so NaN == NaN


@dataclass(frozen=True)
class TableComparison:
    table: TableRef
    source_rows: int
    snowflake_rows: int
    ok: bool
    detail: str


@dataclass(frozen=True)
class ComparedColumn:
    name: str  # PostgreSQL name, exact case
    base_type: str
    kind: ValueKind
    shape: TypeShape = TypeShape.SCALAR

    @property
    def snowflake_name(self) -> str:
        return snowflake_name(self.name)

    @property
    def is_timestamp(self) -> bool:
        return self.kind in {ValueKind.TIMESTAMP, ValueKind.TIMESTAMPTZ}

    @property
    def is_character(self) -> bool:
        return self.base_type.startswith(_CHARACTER_TYPES)


@dataclass(frozen=True)
class TableShape:
    columns: tuple[ComparedColumn, ...]
    primary_key: tuple[str, ...]


def read_table_shape(pg_conn: PgConnection, table: TableRef) -> TableShape:
    """Columns (with domains and enums resolved to their base type, typed as the extractor types
    them) and the primary key."""
    from pgsnow.postgres import describe_table

    try:
        described = describe_table(pg_conn, table)
    except PermanentError as exc:
        raise LookupError(f"table {table.qualified} not found in PostgreSQL: {exc.message}") from exc
    columns = tuple(ComparedColumn(c.name, c.base_type, c.kind, c.shape) for c in described.columns)
    with pg_conn.cursor() as cur:
        cur.execute(
            """
            SELECT a.attname
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
            WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary
            ORDER BY k.position
            """,
            (table.schema, table.table),
        )
        primary_key = tuple(row[0] for row in cur.fetchall())
    if not columns:
        raise LookupError(f"table {table.qualified} not found in PostgreSQL")
    return TableShape(columns, primary_key)


def _parse_json(value: Any) -> Any:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    parsed = json.loads(text, parse_float=Decimal)
    return JSON_NULL if parsed is None else _canonical_json(parsed)


def _canonical_json(value: Any) -> Any:
    """Numbers compare by value (1.10 == 1.1 == 1.1e0); containers recursively."""
    if isinstance(value, dict):
        return {k: _canonical_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical_json(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | Decimal):
        return Decimal(value).normalize()
    return value


def _canonical_float(value: Any) -> Any:
    number = float(value)
    return _NAN if math.isnan(number) else number


def _canonical_instant(value: Any) -> Any:
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    return value


def _canonical_bytes(value: Any) -> Any:
    if isinstance(value, str):
        return bytes.fromhex(value)
    return bytes(value)


def _canonical_vector(value: Any) -> tuple[float, ...]:
    """A vector's elements as the float4 values they are (a JSON array text, or a list of floats)."""
    elements = json.loads(value) if isinstance(value, str) else value
    return tuple(struct.unpack("<f", struct.pack("<f", float(e)))[0] for e in elements)


_CANONICAL: dict[ValueKind, Callable[[Any], Any]] = {
    ValueKind.INTEGER: int,
    ValueKind.DECIMAL: lambda v: Decimal(str(v)) if isinstance(v, float) else Decimal(v),
    ValueKind.FLOAT: _canonical_float,
    ValueKind.TEXT: str,
    ValueKind.BOOLEAN: bool,
    ValueKind.DATE: lambda v: v,
    ValueKind.TIME: lambda v: v,
    ValueKind.TIMESTAMP: lambda v: v,
    ValueKind.TIMESTAMPTZ: _canonical_instant,
    ValueKind.JSON: _parse_json,
    ValueKind.BINARY: _canonical_bytes,
    ValueKind.VECTOR: _canonical_vector,
    ValueKind.GEOMETRY: str,  # 'srid:wkb hex', the same text from both sides
    ValueKind.GEOGRAPHY: str,
}
_SPATIAL = (ValueKind.GEOMETRY, ValueKind.GEOGRAPHY)


def canonical_value(kind: ValueKind, value: Any) -> Any:
    """The form two equal values share, whichever database they came from."""
    if kind is ValueKind.JSON:
        return _parse_json(value)
    if value is None:
        return None
    return _CANONICAL[kind](value)


def _pg_select_list(columns: Sequence[ComparedColumn]) -> sql.Composed:
    items: list[sql.Composable] = []
    for column in columns:
        ident = sql.Identifier(column.name)
        if column.kind is ValueKind.JSON and column.shape is not TypeShape.SCALAR:
            items.append(sql.SQL("({})::text").format(json_document(column.shape, ident)))
        elif column.kind in {ValueKind.JSON, ValueKind.TEXT}:
            # ::text as the extractor stages it: char(n) without its blank padding, other types' text
            items.append(sql.SQL("{}::text").format(ident))
        elif column.kind is ValueKind.VECTOR:
            items.append(sql.SQL("{}::real[]").format(ident))
        elif column.kind in _SPATIAL:
            items.append(
                sql.SQL("ST_SRID({0})::text || ':' || encode(ST_AsBinary({0}, 'NDR'), 'hex')").format(ident)
            )
        else:
            items.append(ident)
    return sql.SQL(", ").join(items)


def _pg_order_by(columns: Sequence[ComparedColumn]) -> sql.Composed:
    # Byte order ("C") for text, which is how Snowflake and Python order strings.
    items: list[sql.Composable] = []
    for column in columns:
        ident = sql.Identifier(column.name)
        if column.kind is ValueKind.TEXT:
            template = '{} COLLATE "C"' if column.is_character else '{}::text COLLATE "C"'
            items.append(sql.SQL(template + " NULLS LAST").format(ident))
        else:
            items.append(sql.SQL("{} NULLS LAST").format(ident))
    return sql.SQL(", ").join(items)


def _ordering_columns(shape: TableShape) -> tuple[list[ComparedColumn], bool]:
    """The primary key, or (no key) every orderable column, and whether rows are keyed."""
    by_name = {c.name: c for c in shape.columns}
    if shape.primary_key:
        return [by_name[name] for name in shape.primary_key], True
    unorderable = {ValueKind.JSON, ValueKind.FLOAT, ValueKind.VECTOR, *_SPATIAL}
    orderable = [c for c in shape.columns if c.kind not in unorderable]
    return orderable, False


def _stream_postgres(
    pg_conn: PgConnection, table: TableRef, shape: TableShape, chunk_rows: int
) -> Iterator[tuple[Any, ...]]:
    ordering, _ = _ordering_columns(shape)
    query = sql.SQL("SELECT {} FROM {}.{} ORDER BY {}").format(
        _pg_select_list(shape.columns),
        sql.Identifier(table.schema),
        sql.Identifier(table.table),
        _pg_order_by(ordering),
    )
    kinds = [c.kind for c in shape.columns]
    # A server-side cursor keeps memory bounded; WITH HOLD lets it live in autocommit mode.
    with pg_conn.cursor(name=f"pgsnow_compare_{id(table)}", withhold=pg_conn.autocommit) as cur:
        cur.itersize = chunk_rows
        cur.execute(query)
        for row in cur:
            yield tuple(canonical_value(kind, value) for kind, value in zip(kinds, row, strict=True))


def _stream_snowflake(
    sf_conn: SnowflakeConnection, table: TableRef, sf_database: str, shape: TableShape, chunk_rows: int
) -> Iterator[tuple[Any, ...]]:
    ordering, _ = _ordering_columns(shape)
    select_items = [_sf_select_item(c) for c in shape.columns]
    order_items = [f"{quote_ident(c.snowflake_name)} NULLS LAST" for c in ordering]
    query = (
        f"SELECT {', '.join(select_items)} "
        f"FROM {quote_qualified(sf_database, table.snowflake_schema, table.snowflake_table)} "
        f"ORDER BY {', '.join(order_items)}"
    )
    kinds = [c.kind for c in shape.columns]
    cur = sf_conn.cursor()
    try:
        cur.execute(query)
        while rows := cur.fetchmany(chunk_rows):
            for row in rows:
                yield tuple(canonical_value(kind, value) for kind, value in zip(kinds, row, strict=True))
    finally:
        cur.close()


def _sf_select_item(column: ComparedColumn) -> str:
    ident = quote_ident(column.snowflake_name)
    if column.kind is ValueKind.VECTOR:
        return f"{ident}::ARRAY"  # a VECTOR is read as the ARRAY of its elements
    if column.kind in _SPATIAL:
        return f"CAST(ST_SRID({ident}) AS VARCHAR) || ':' || LOWER(HEX_ENCODE(ST_ASWKB({ident})))"
    return ident


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."


@dataclass
class _Differences:
    changed_rows: int = 0
    missing_rows: int = 0  # in PostgreSQL, not in Snowflake
    extra_rows: int = 0  # in Snowflake, not in PostgreSQL
    first: str = ""

    @property
    def any(self) -> bool:
        return bool(self.changed_rows or self.missing_rows or self.extra_rows)

    def note(self, text: str) -> None:
        if not self.first:
            self.first = text


def compare_table(
    pg_conn: PgConnection,
    sf_conn: SnowflakeConnection,
    table: TableRef,
    sf_database: str,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> TableComparison:
    """Compare row counts and every cell of ``table`` in PostgreSQL and in Snowflake."""
    shape = read_table_shape(pg_conn, table)
    ordering, keyed = _ordering_columns(shape)
    key_positions = [shape.columns.index(c) for c in ordering]
    names = [c.name for c in shape.columns]

    def describe_key(row: tuple[Any, ...], row_number: int) -> str:
        if not keyed:
            return f"row {row_number} (in sorted order)"
        return "(" + ", ".join(f"{names[p]}={_shown(row[p])}" for p in key_positions) + ")"

    source_rows = snowflake_rows = 0
    differences = _Differences()
    try:
        pg_rows = _stream_postgres(pg_conn, table, shape, chunk_rows)
        sf_rows = _stream_snowflake(sf_conn, table, sf_database, shape, chunk_rows)
        pg_row, sf_row = next(pg_rows, None), next(sf_rows, None)
        while pg_row is not None or sf_row is not None:
            if pg_row is not None and sf_row is not None:
                if keyed:
                    pg_key = tuple(pg_row[p] for p in key_positions)
                    sf_key = tuple(sf_row[p] for p in key_positions)
                    step = 0 if pg_key == sf_key else (-1 if pg_key < sf_key else 1)
                else:
                    step = 0
            else:
                step = -1 if pg_row is not None else 1
            if step == 0 and pg_row is not None and sf_row is not None:
                source_rows += 1
                snowflake_rows += 1
                for position, (expected, actual) in enumerate(zip(pg_row, sf_row, strict=True)):
                    if expected != actual:
                        differences.changed_rows += 1
                        differences.note(
                            f"first difference at {describe_key(pg_row, source_rows)}, column {names[position]}: "
                            f"postgres={_shown(expected)} snowflake={_shown(actual)}"
                        )
                        break
                pg_row, sf_row = next(pg_rows, None), next(sf_rows, None)
            elif step < 0 and pg_row is not None:
                source_rows += 1
                differences.missing_rows += 1
                differences.note(
                    f"first difference: {describe_key(pg_row, source_rows)} is missing from Snowflake"
                )
                pg_row = next(pg_rows, None)
            elif sf_row is not None:
                snowflake_rows += 1
                differences.extra_rows += 1
                differences.note(
                    f"first difference: {describe_key(sf_row, snowflake_rows)} is in Snowflake only"
                )
                sf_row = next(sf_rows, None)
    except ProgrammingError as exc:
        return TableComparison(
            table, source_rows, snowflake_rows, False, f"cannot read Snowflake table: {exc.msg}"
        )

    if not differences.any:
        return TableComparison(table, source_rows, snowflake_rows, True, "all rows and cells match")
    summary = (
        f"{differences.changed_rows} changed, {differences.missing_rows} missing from Snowflake, "
        f"{differences.extra_rows} only in Snowflake"
    )
    return TableComparison(table, source_rows, snowflake_rows, False, f"{differences.first}; {summary}")
