"""Parallel backfill: a large run split into key ranges, one SQS message per range (docs/extraction.md).

``plan_ranges`` cuts the key space of a full run (or an incremental table's first run, the
backfill) into ranges of about ``EXTRACT_RANGE_ROWS`` rows from the table's statistics, without
reading the table: quantiles of the leading key column's ``pg_stats.histogram_bounds``, each
turned into a real key with one index lookup (the last key at or below it). A table without
statistics, without a primary key or estimated at one range or less stays single-worker.

``FanOut`` sends the messages (the extractor's ``Runtime.send_range_messages``: SQS, whose
event source runs up to ``EXTRACT_MAX_WORKERS`` workers at once); ``pgsnow.extract.worker``
extracts one range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from psycopg2 import sql

from pgsnow.checkpoint import RangeRecord
from pgsnow.events import RangeRequest
from pgsnow.identifiers import TableRef
from pgsnow.observability import logger
from pgsnow.postgres import SupportsExecute, TableSchema

# More ranges than this only adds messages and checkpoints: the histogram has at most
# default_statistics_target (100 unless raised) buckets anyway.
MAX_RANGES = 1000

_HISTOGRAM_SQL = sql.SQL(
    "SELECT s.histogram_bounds::text::text[] FROM pg_catalog.pg_stats s "
    "WHERE s.schemaname = %s AND s.tablename = %s AND s.attname = %s AND s.histogram_bounds IS NOT NULL "
    # A partitioned table's statistics cover its partitions (inherited); a plain table has one row.
    "ORDER BY s.inherited DESC LIMIT 1"
)


def plan_ranges(
    conn: SupportsExecute, schema: TableSchema, order_key: Sequence[str], range_rows: int
) -> tuple[RangeRecord, ...]:
    """The run's key ranges (at least two), or () when it should stay single-worker."""
    estimated = schema.estimated_rows
    if not order_key or estimated is None or estimated <= range_rows:
        return ()
    bounds = _histogram_bounds(conn, schema.table, order_key[0])
    wanted = min(math.ceil(estimated / range_rows), MAX_RANGES, max(len(bounds) - 1, 0))
    if wanted < 2:
        logger.info(
            "no statistics to split the run by (ANALYZE the table): extracting with one worker",
            extra={"table": schema.table.qualified, "rows": estimated},
        )
        return ()
    cuts = [bounds[round(i * (len(bounds) - 1) / wanted)] for i in range(1, wanted)]
    boundaries: list[tuple[str, ...]] = []
    for value in cuts:
        key = _last_key_at_or_below(conn, schema, order_key, value)
        if key is not None and (not boundaries or key != boundaries[-1]):
            boundaries.append(key)
    if not boundaries:
        return ()
    edges: list[tuple[str, ...] | None] = [None, *boundaries, None]
    return tuple(RangeRecord(i, edges[i], edges[i + 1]) for i in range(len(edges) - 1))


def _histogram_bounds(conn: SupportsExecute, table: TableRef, column: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(_HISTOGRAM_SQL, (table.schema, table.table, column))
        row = cur.fetchone()
    return [str(v) for v in row[0]] if row is not None and row[0] else []


def _last_key_at_or_below(
    conn: SupportsExecute, schema: TableSchema, order_key: Sequence[str], value: str
) -> tuple[str, ...] | None:
    """The highest order key whose leading column is ``<= value`` (an index lookup), as text."""
    target = sql.Identifier(schema.table.schema, schema.table.table)
    columns = [sql.Identifier(schema.table.schema, schema.table.table, k) for k in order_key]
    query = sql.SQL("SELECT {} FROM {} WHERE {} <= %s ORDER BY {} LIMIT 1").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(c) for c in columns),
        target,
        columns[0],
        sql.SQL(", ").join(sql.SQL("{} DESC").format(c) for c in columns),
    )
    with conn.cursor() as cur:
        cur.execute(query, (value,))
        row = cur.fetchone()
    return None if row is None else tuple(str(v) for v in row)


class FanOut:
    """Hands a parallel run's ranges to the workers: one message per range through ``send``
    (the extractor's ``Runtime.send_range_messages``). Remembers which runs it handed on, so the
    handler knows an ``extracting`` run needs no continuation of its own."""

    def __init__(self, send: Callable[[list[dict[str, Any]]], None]) -> None:
        self._send = send
        self.dispatched: set[str] = set()

    def send(self, table: TableRef, run_id: str, indexes: Sequence[int]) -> None:
        self._send([RangeRequest(table, run_id, i).body() for i in indexes])
        self.dispatched.add(run_id)
        logger.info(
            "ranges sent to the workers",
            extra={"run_id": run_id, "table": table.qualified, "ranges": len(indexes)},
        )
