"""Incremental runs: the cursor column, the run's lower bound and the watermark it leaves.

An incremental run reads the rows whose cursor column is ``>=`` the stored watermark minus the
lookback (the first run, with no watermark, is a backfill), in ``(cursor, primary key)`` order.
Its watermark after is the highest cursor it staged, but never past the safe point read before
its snapshot: a transaction still open then may yet commit rows below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from pgsnow.checkpoint import RunCheckpoint
from pgsnow.config import ExtractMode, TableOptions
from pgsnow.errors import PermanentError
from pgsnow.extract.plan import KEYLESS_RELATIONS, RELATION_KINDS
from pgsnow.identifiers import TableRef
from pgsnow.postgres import Connection, TableSchema
from pgsnow.runs import RunStore
from pgsnow.typemap import ValueKind

_TIME_CURSOR_TYPES = {
    ValueKind.TIMESTAMPTZ: "timestamptz",
    ValueKind.TIMESTAMP: "timestamp",
    ValueKind.DATE: "date",
}
_CURSOR_KINDS = {*_TIME_CURSOR_TYPES, ValueKind.INTEGER, ValueKind.DECIMAL}


@dataclass(frozen=True)
class RunBounds:
    """Where a new run reads from: its order key, the watermark it starts from, its ``>=`` bound."""

    order_key: tuple[str, ...]
    watermark: str | None = None
    lower_cursor: str | None = None


def run_bounds(
    pg_conn: Connection, store: RunStore, table: TableRef, schema: TableSchema, options: TableOptions
) -> RunBounds:
    """A full run reads every row in primary-key order; an incremental one from its watermark on."""
    if options.mode is not ExtractMode.INCREMENTAL:
        return RunBounds(schema.primary_key)
    cursor = cursor_column(schema, options)
    order_key = (cursor, *schema.primary_key)
    stored = store.load_watermark(table)
    if stored is None or stored.cursor_column != cursor:
        return RunBounds(order_key)
    lower = lower_cursor(pg_conn, schema.column(cursor).kind, stored.value, options.lookback_seconds)
    return RunBounds(order_key, stored.value, lower)


def cursor_column(schema: TableSchema, options: TableOptions) -> str:
    name = options.cursor_column
    assert name is not None  # config refuses incremental without cursor_column
    if schema.relkind in KEYLESS_RELATIONS:
        raise PermanentError(
            f"incremental extraction of {schema.table.qualified} needs a primary key (the keyset "
            f"tie-breaker and the merge key); a {RELATION_KINDS[schema.relkind]} has none: "
            "use mode full (replace, the default)",
            table=schema.table.qualified,
        )
    column = next((c for c in schema.columns if c.name == name), None)
    where = f"{schema.table.qualified}.{name}"
    if column is None:
        raise PermanentError(f"cursor column {where} does not exist", table=schema.table.qualified)
    if column.kind not in _CURSOR_KINDS:
        raise PermanentError(
            f"cursor column {where} is {column.pg_type}; it must be a timestamp, date, integer or numeric",
            table=schema.table.qualified,
        )
    if column.nullable:
        raise PermanentError(
            f"cursor column {where} is nullable; rows with a NULL cursor could never be read incrementally "
            "(make it NOT NULL or use mode full)",
            table=schema.table.qualified,
        )
    if not schema.primary_key:
        raise PermanentError(
            f"incremental extraction of {schema.table.qualified} needs a primary key (the keyset tie-breaker)",
            table=schema.table.qualified,
        )
    return name


def run_filter(
    options: TableOptions, lower_cursor: str | None
) -> tuple[sql.Composable | None, tuple[Any, ...]]:
    """The run's row filter (``cursor >= lower bound``) and its bound value; none for a full run."""
    if lower_cursor is None or options.cursor_column is None:
        return None, ()
    return sql.SQL("{} >= %s").format(sql.Identifier(options.cursor_column)), (lower_cursor,)


def _scalar(conn: Connection, query: sql.Composable, params: Sequence[Any]) -> str:
    with conn.cursor() as cur:
        cur.execute(query, tuple(params))
        row = cur.fetchone()
    assert row is not None
    return str(row[0])


def lower_cursor(conn: Connection, kind: ValueKind, watermark: str, lookback_s: int) -> str:
    """The run's ``>=`` bound: the watermark minus the lookback (time cursors; numbers use the watermark)."""
    type_name = _TIME_CURSOR_TYPES.get(kind)
    if type_name is None or lookback_s == 0:
        return watermark
    query = sql.SQL("SELECT CAST(CAST(%s AS {0}) - make_interval(secs => %s) AS {0})::text").format(
        sql.SQL(type_name)
    )
    return _scalar(conn, query, (watermark, lookback_s))


def watermark_after(conn: Connection, checkpoint: RunCheckpoint, kind: ValueKind) -> str | None:
    """min(highest cursor staged, safe point): never past what a still-open transaction could write."""
    staged = [f for f in checkpoint.files if f.cursor_range is not None and f.rows > 0]
    if not staged:
        return checkpoint.watermark_before
    highest = staged[-1].cursor_range[1] if staged[-1].cursor_range else None
    type_name = _TIME_CURSOR_TYPES.get(kind)
    if highest is None or type_name is None or checkpoint.safe_point is None:
        return highest
    query = sql.SQL("SELECT least(CAST(%s AS {0}), CAST(CAST(%s AS timestamptz) AS {0}))::text").format(
        sql.SQL(type_name)
    )
    return _scalar(conn, query, (highest, checkpoint.safe_point))
