"""The benchmark's table: a deterministic mixed-type table generated inside PostgreSQL.

Every value is a pure function of the row's ``id`` (no random()), so two runs on any
machine produce the same table, and a smaller table is exactly the first N rows of a
bigger one. A table that already holds the expected rows from this generator version is
reused: generating 2M rows costs about half a minute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

SCHEMA = "pgsnow_bench"
# Bump when the column list or the value formulas change, so old tables are regenerated.
GENERATOR_VERSION = "mixed-v2"

# Column name -> (PostgreSQL type, expression of the series value ``id``).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("id", "bigint NOT NULL", "id"),
    ("account_id", "integer NOT NULL", "((id * 2654435761) % 100000)::integer"),
    ("quantity", "smallint", "(id % 500)::smallint"),
    ("amount", "numeric(12,2) NOT NULL", "(((id * 7919) % 100000000) / 100.0)::numeric(12,2)"),
    ("unit_price", "numeric(18,6)", "CASE WHEN id % 11 = 0 THEN NULL ELSE (id % 99991) / 7.0 END"),
    ("ratio", "double precision", "(id % 100003) / 3.0"),
    (
        "customer_name",
        "text NOT NULL",
        "'customer ' || id || ' ' || repeat(chr(97 + (id % 26)::int), (id % 24)::int)",
    ),
    (
        "status",
        "varchar(16) NOT NULL",
        "(ARRAY['new','paid','shipped','delivered','returned'])[1 + (id % 5)::int]",
    ),
    ("note", "text", "CASE WHEN id % 3 = 0 THEN NULL ELSE 'note, \"quoted\" ' || md5(id::text) END"),
    (
        "created_at",
        "timestamptz NOT NULL",
        "timestamptz '2020-01-01 00:00:00+00' + id * interval '37.000123 seconds'",
    ),
    ("updated_at", "timestamp", "timestamp '2021-06-01 00:00:00' + id * interval '41 seconds'"),
    ("ship_date", "date", "date '2020-01-01' + (id % 2000)::int"),
    ("is_active", "boolean NOT NULL", "id % 7 <> 0"),
    (
        "attributes",
        "jsonb",
        "jsonb_build_object('channel', (ARRAY['web','store','phone'])[1 + (id % 3)::int], "
        "'score', id % 1000, 'tags', jsonb_build_array('t' || (id % 13), 't' || (id % 17)))",
    ),
    ("external_ref", "uuid NOT NULL", "md5('ref' || id)::uuid"),
)


@dataclass(frozen=True)
class BenchTable:
    schema: str
    name: str
    rows: int
    heap_bytes: int  # pg_table_size: heap + TOAST, what a scan reads

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def table_name(rows: int) -> str:
    return f"mixed_{rows}"


def _comment(rows: int) -> str:
    return f"{GENERATOR_VERSION} rows={rows}"


def ensure_table(dsn: str, rows: int, *, log: bool = True) -> BenchTable:
    """Create ``pgsnow_bench.mixed_<rows>`` unless this generator version already made it."""
    name = table_name(rows)
    ident = sql.Identifier(SCHEMA, name)
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT obj_description(to_regclass(%s), 'pg_class')",
                (f'"{SCHEMA}"."{name}"',),
            )
            found = cur.fetchone()
            if found is None or found[0] != _comment(rows):
                started = time.monotonic()
                _generate(cur, ident, rows)
                if log:
                    print(f"generated {SCHEMA}.{name} ({rows:,} rows) in {time.monotonic() - started:.1f} s")
            cur.execute("SELECT pg_table_size(%s::regclass)", (f'"{SCHEMA}"."{name}"',))
            heap_bytes = int(cur.fetchone()[0])
    finally:
        conn.close()
    return BenchTable(SCHEMA, name, rows, heap_bytes)


def _generate(cur: psycopg2.extensions.cursor, ident: sql.Identifier, rows: int) -> None:
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
    cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
    definitions = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(column), sql.SQL(pg_type)) for column, pg_type, _ in COLUMNS
    )
    cur.execute(sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY (id))").format(ident, definitions))
    projection = sql.SQL(", ").join(sql.SQL(expression) for _, _, expression in COLUMNS)
    cur.execute(
        # The row count is a Literal, not a parameter: the expressions contain '%' (modulo).
        sql.SQL("INSERT INTO {} SELECT {} FROM generate_series(1::bigint, {}) AS id").format(
            ident, projection, sql.Literal(rows)
        )
    )
    cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(ident))
    cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(ident, sql.Literal(_comment(rows))))
