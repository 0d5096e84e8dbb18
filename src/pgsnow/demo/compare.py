"""Compare a PostgreSQL table with its Snowflake copy: row counts and every cell.

Every cell is read in ``pgsnow verify``'s canonical form, so value normalisation has one
implementation: the canonical text of its value kind (``verify.pg_canonical`` and
``verify.sf_canonical``, computed in each database), and for JSON documents and vectors the
canonical JSON text (``pgsnow.canonical_json``, the function verify's Snowflake UDF runs) of the
document ``verify.pg_json_document`` / ``verify.sf_json_document`` read. JSON ``null`` is not SQL
NULL, and char(n) padding is dropped, exactly as verify compares them.

What this read adds to verify's check (the demo runs both, and needs both):

- floats are compared exactly, as the doubles each side holds (NaN equals NaN), where verify
  compares them to ``verify.FLOAT_SIGNIFICANT_DIGITS`` significant digits;
- a difference is named down to the cell: the first differing key, its column and both values,
  where verify names the keys whose rows differ.

Both sides are streamed in key order (byte order of the canonical text, the same in PostgreSQL's
"C" collation, Snowflake and Python) and merged like a sort-merge join, so memory stays bounded
by the chunk size and a missing or extra row does not shift every later comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from snowflake.connector import SnowflakeConnection
from snowflake.connector.errors import ProgrammingError

from pgsnow.canonical_json import canonical_json
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.manifest import Column
from pgsnow.postgres import TableSchema
from pgsnow.typemap import ValueKind
from pgsnow.verify import (
    SOURCE_ALIAS,
    json_compared,
    pg_canonical,
    pg_json_document,
    sf_canonical,
    sf_json_document,
)

DEFAULT_CHUNK_ROWS = 10_000
_MAX_SHOWN_CHARS = 80
_NAN = "NaN"  # an exact float's NaN, so NaN == NaN
# Kinds a keyless table is not ordered by: their text differs between the sides until it is made
# canonical here (JSON), or they are compared as doubles.
_UNORDERED_KINDS = frozenset({ValueKind.JSON, ValueKind.FLOAT, ValueKind.VECTOR})


@dataclass(frozen=True)
class TableComparison:
    table: TableRef
    source_rows: int
    snowflake_rows: int
    ok: bool
    detail: str


def read_table_shape(pg_conn: PgConnection, table: TableRef) -> TableSchema:
    """Columns (with domains and enums resolved to their base type, typed as the extractor types
    them) and the primary key."""
    from pgsnow.postgres import describe_table

    try:
        schema = describe_table(pg_conn, table)
    except PermanentError as exc:
        raise LookupError(f"table {table.qualified} not found in PostgreSQL: {exc.message}") from exc
    if not schema.columns:
        raise LookupError(f"table {table.qualified} not found in PostgreSQL")
    return schema


def _exact_float(value: Any) -> Any:
    number = float(value)
    return _NAN if math.isnan(number) else number


def _cell_value(column: Column, value: Any) -> Any:
    """What is compared of a cell as read: its canonical text, a JSON document's canonical text,
    or a float as the double it is."""
    if value is None:
        return None
    if column.kind is ValueKind.FLOAT:
        return _exact_float(value)
    if json_compared(column):
        return canonical_json(value)
    return value


def _pg_cell(column: Column) -> sql.Composable:
    if column.kind is ValueKind.FLOAT:
        return sql.Identifier(column.name)
    if json_compared(column):
        return sql.SQL("({})::text").format(pg_json_document(column))
    return pg_canonical(column, sql.Identifier(column.name))


def _sf_cell(column: Column) -> str:
    ident = quote_ident(column.snowflake_name)
    if column.kind is ValueKind.FLOAT:
        return ident
    if json_compared(column):
        return sf_json_document(column)
    return sf_canonical(column, ident)


def _ordering_positions(shape: TableSchema) -> tuple[list[int], bool]:
    """The primary key's column positions, or (no key) every orderable column's, and whether rows are keyed."""
    names = [c.name for c in shape.columns]
    if shape.primary_key:
        return [names.index(name) for name in shape.primary_key], True
    return [i for i, c in enumerate(shape.columns) if c.kind not in _UNORDERED_KINDS], False


def _pg_order_item(column: Column, position: int) -> sql.Composable:
    ref = sql.Identifier(f"pgsnow_c{position}")
    # Byte order ("C") for text, which is how Snowflake and Python order strings.
    template = "{} NULLS LAST" if column.kind is ValueKind.FLOAT else '{} COLLATE "C" NULLS LAST'
    return sql.SQL(template).format(ref)


def _stream_postgres(
    pg_conn: PgConnection, table: TableRef, shape: TableSchema, chunk_rows: int
) -> Iterator[tuple[Any, ...]]:
    ordering, _ = _ordering_positions(shape)
    cells = [
        sql.SQL("{} AS {}").format(_pg_cell(c), sql.Identifier(f"pgsnow_c{i}"))
        for i, c in enumerate(shape.columns)
    ]
    order_by = [_pg_order_item(shape.columns[p], p) for p in ordering]
    query = sql.SQL("SELECT * FROM (SELECT {} FROM {} AS {}) AS pgsnow_cells {}").format(
        sql.SQL(", ").join(cells),
        sql.Identifier(table.schema, table.table),
        sql.Identifier(SOURCE_ALIAS),
        sql.SQL("ORDER BY {}").format(sql.SQL(", ").join(order_by)) if order_by else sql.SQL(""),
    )
    # A server-side cursor keeps memory bounded; WITH HOLD lets it live in autocommit mode.
    with pg_conn.cursor(name=f"pgsnow_compare_{id(table)}", withhold=pg_conn.autocommit) as cur:
        cur.itersize = chunk_rows
        cur.execute(query)
        for row in cur:
            yield _row_values(shape.columns, row)


def _stream_snowflake(
    sf_conn: SnowflakeConnection, table: TableRef, sf_database: str, shape: TableSchema, chunk_rows: int
) -> Iterator[tuple[Any, ...]]:
    ordering, _ = _ordering_positions(shape)
    order_by = f" ORDER BY {', '.join(f'{p + 1} NULLS LAST' for p in ordering)}" if ordering else ""
    query = (
        f"SELECT {', '.join(_sf_cell(c) for c in shape.columns)} "
        f"FROM {quote_qualified(sf_database, table.snowflake_schema, table.snowflake_table)}{order_by}"
    )
    cur = sf_conn.cursor()
    try:
        cur.execute(query)
        while rows := cur.fetchmany(chunk_rows):
            for row in rows:
                yield _row_values(shape.columns, row)
    finally:
        cur.close()


def _row_values(columns: Sequence[Column], row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(_cell_value(column, value) for column, value in zip(columns, row, strict=True))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."


@dataclass
class _Merge:
    """The two sides' rows merged in key order, counting rows and differences."""

    names: list[str]
    key_positions: list[int]
    keyed: bool
    source_rows: int = 0
    snowflake_rows: int = 0
    changed_rows: int = 0
    missing_rows: int = 0  # in PostgreSQL, not in Snowflake
    extra_rows: int = 0  # in Snowflake, not in PostgreSQL
    first: str = ""

    @property
    def any(self) -> bool:
        return bool(self.changed_rows or self.missing_rows or self.extra_rows)

    def _note(self, text: str) -> None:
        if not self.first:
            self.first = text

    def _describe_key(self, row: tuple[Any, ...], row_number: int) -> str:
        if not self.keyed:
            return f"row {row_number} (in sorted order)"
        return "(" + ", ".join(f"{self.names[p]}={row[p]}" for p in self.key_positions) + ")"

    def _step(self, pg_row: tuple[Any, ...] | None, sf_row: tuple[Any, ...] | None) -> int:
        """0: the same row on both sides; -1: PostgreSQL's row comes first; 1: Snowflake's."""
        if pg_row is None or sf_row is None:
            return -1 if pg_row is not None else 1
        if not self.keyed:
            return 0
        pg_key = tuple(pg_row[p] for p in self.key_positions)
        sf_key = tuple(sf_row[p] for p in self.key_positions)
        return 0 if pg_key == sf_key else (-1 if pg_key < sf_key else 1)

    def run(self, pg_rows: Iterator[tuple[Any, ...]], sf_rows: Iterator[tuple[Any, ...]]) -> None:
        pg_row, sf_row = next(pg_rows, None), next(sf_rows, None)
        while pg_row is not None or sf_row is not None:
            step = self._step(pg_row, sf_row)
            if step == 0 and pg_row is not None and sf_row is not None:
                self.source_rows += 1
                self.snowflake_rows += 1
                self._compare_cells(pg_row, sf_row)
                pg_row, sf_row = next(pg_rows, None), next(sf_rows, None)
            elif step < 0 and pg_row is not None:
                self.source_rows += 1
                self.missing_rows += 1
                where = self._describe_key(pg_row, self.source_rows)
                self._note(f"first difference: {where} is missing from Snowflake")
                pg_row = next(pg_rows, None)
            elif sf_row is not None:
                self.snowflake_rows += 1
                self.extra_rows += 1
                self._note(
                    f"first difference: {self._describe_key(sf_row, self.snowflake_rows)} is in Snowflake only"
                )
                sf_row = next(sf_rows, None)

    def _compare_cells(self, pg_row: tuple[Any, ...], sf_row: tuple[Any, ...]) -> None:
        for position, (expected, actual) in enumerate(zip(pg_row, sf_row, strict=True)):
            if expected != actual:
                self.changed_rows += 1
                self._note(
                    f"first difference at {self._describe_key(pg_row, self.source_rows)}, "
                    f"column {self.names[position]}: postgres={_shown(expected)} snowflake={_shown(actual)}"
                )
                return

    def comparison(self, table: TableRef) -> TableComparison:
        if not self.any:
            return TableComparison(
                table, self.source_rows, self.snowflake_rows, True, "all rows and cells match"
            )
        summary = (
            f"{self.changed_rows} changed, {self.missing_rows} missing from Snowflake, "
            f"{self.extra_rows} only in Snowflake"
        )
        return TableComparison(
            table, self.source_rows, self.snowflake_rows, False, f"{self.first}; {summary}"
        )


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
    key_positions, keyed = _ordering_positions(shape)
    merge = _Merge([c.name for c in shape.columns], key_positions, keyed)
    try:
        merge.run(
            _stream_postgres(pg_conn, table, shape, chunk_rows),
            _stream_snowflake(sf_conn, table, sf_database, shape, chunk_rows),
        )
    except ProgrammingError as exc:
        return TableComparison(
            table, merge.source_rows, merge.snowflake_rows, False, f"cannot read Snowflake table: {exc.msg}"
        )
    return merge.comparison(table)
