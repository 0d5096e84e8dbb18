"""The demo's sample shop: a deterministic, generated dataset full of awkward values.

Everything is generated server-side with ``generate_series`` and expressions of
the row number, so the same scale always produces byte-identical content (no
``random()``) and 200K order lines take a couple of seconds, not minutes.

The awkward values are the ones that break replication pipelines: text with
delimiters, quotes, line breaks, tabs, emoji, CJK, U+2028 and the literal
``\\N``; NULL next to ``''`` in one column; bigint extremes; numeric(38,10) at
full width; timestamptz values entered in several zones and on DST edges;
JSON ``null`` next to SQL NULL; NaN and infinities; empty and NULL bytea.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

ProgressCallback = Callable[[str], None]

SAMPLE_TABLES = ("customers", "products", "orders", "order_lines")

# Base row counts at scale 1.0; order_lines = orders * LINES_PER_ORDER.
BASE_CUSTOMERS = 5_000
BASE_PRODUCTS = 1_000
BASE_ORDERS = 50_000
LINES_PER_ORDER = 4

# Cycled through every text column, so awkward values appear all over the
# table, not only in a few hand-written rows. NULL and '' sit side by side.
TRICKY_TEXTS: tuple[str | None, ...] = (
    "plain",
    "",
    None,
    "comma, separated, value",
    'he said "hello"',
    '"',
    '""',
    "line one\nline two",
    "windows\r\nline end",
    "tab\there",
    "\\N",
    "back\\slash",
    "emoji 🐘❄️👩‍💻",
    "CJK 東京 北京 서울",
    "accents: café naïve Zoë Ångström",
    "line\u2028separator and para\u2029graph",
    "  leading and trailing spaces  ",
    "NULL",
    "null",
    "semi;colon|pipe",
    "'single quotes'",
    ",",
    "\n",
)

# Timestamps entered in different zones, including DST gaps and overlaps; the
# stored timestamptz is an instant, so these exercise the UTC staging rule.
TIMESTAMPTZ_INPUTS: tuple[str, ...] = (
    "2024-03-10 02:30:00 America/New_York",  # in the spring-forward gap
    "2024-11-03 01:30:00 America/New_York",  # ambiguous fall-back hour
    "2024-11-03 01:30:00-04",
    "2024-11-03 01:30:00-05",
    "2024-03-31 02:30:00 Europe/Berlin",
    "2024-10-27 02:30:00 Europe/Berlin",
    "2023-12-31 23:59:59.999999+14",
    "2024-01-01 00:00:00-12",
    "2024-06-30 12:00:00 Asia/Kolkata",
    "2024-06-30 12:00:00 Australia/Lord_Howe",
    "1969-12-31 23:59:59.999999 UTC",
    "1970-01-01 00:00:00 UTC",
    "2000-02-29 12:34:56.789012 Asia/Kathmandu",
)


def _text_array(values: tuple[str | None, ...]) -> sql.Composed:
    """An ARRAY[...]::text[] literal with every element bound, NULLs included."""
    return sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(sql.Literal(v) for v in values))


def _pick(array: sql.Composable, index_expr: str, length: int) -> sql.Composed:
    """Element ``1 + (index_expr mod length)`` of a SQL array (deterministic cycling)."""
    return sql.SQL("({})[1 + (({}) % {})]").format(array, sql.SQL(index_expr), sql.Literal(length))


_CUSTOMERS_TABLE = """
    CREATE TABLE {customers} (
        customer_id bigint PRIMARY KEY,
        external_id uuid NOT NULL,
        full_name text NOT NULL,
        email text,
        note text,
        is_active boolean,
        loyalty_points bigint,
        signup_date date,
        created_at timestamptz,
        last_login timestamp,
        preferences jsonb
    )
"""

_CUSTOMERS_ROWS = """
    INSERT INTO {customers}
    SELECT i,
           md5('customer' || i)::uuid,
           'Customer ' || i || ' ' || coalesce({name_text}, 'x'),
           CASE WHEN i % 11 = 0 THEN NULL WHEN i % 13 = 0 THEN '' ELSE 'c' || i || '@example.com' END,
           {note_text},
           CASE i % 3 WHEN 0 THEN true WHEN 1 THEN false END,
           (i * 7919) % 100000 - 50000,
           date '2015-01-01' + (i * 7 % 3650),
           CASE WHEN i % 17 = 0 THEN NULL ELSE {zone_ts}::timestamptz
                + make_interval(secs => i * 3607.123457) END,
           CASE WHEN i % 19 = 0 THEN NULL ELSE timestamp '2020-02-29 23:59:59.999999'
                + make_interval(secs => i * 86.000001) END,
           CASE i % 6
                WHEN 0 THEN NULL
                WHEN 1 THEN 'null'::jsonb
                WHEN 2 THEN jsonb_build_object('theme', 'dark', 'i', i, 'text', {json_text})
                WHEN 3 THEN jsonb_build_array(i, i * 1.5, 'x', NULL, true, jsonb_build_object())
                WHEN 4 THEN jsonb_build_object('nested', jsonb_build_object('deep',
                            jsonb_build_array(jsonb_build_object('k', i), '[]'::jsonb)), 'n', NULL)
                ELSE to_jsonb({json_text})
           END
    FROM generate_series(1, {count}) AS i
"""

# Extreme values a generated row would never reach.
_CUSTOMERS_EXTREMES = """
    INSERT INTO {customers} VALUES
      (-9223372036854775808, '00000000-0000-0000-0000-000000000000', 'Min Bigint', '', '',
       NULL, -9223372036854775808, '0001-01-01', '1900-01-01 00:00:00+00', '1900-01-01 00:00:00',
       '{{"a": null, "b": [null, {{}}], "c": ""}}'),
      (9223372036854775807, 'ffffffff-ffff-ffff-ffff-ffffffffffff', 'Max Bigint', NULL, NULL,
       true, 9223372036854775807, '2999-12-31', '2099-12-31 23:59:59.999999+00',
       '2099-12-31 23:59:59.999999', '"just a string"'),
      (0, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'Zero', 'zero@example.com', '\\N',
       false, 0, '2000-02-29', '2000-02-29 12:00:00-08', '2000-02-29 12:00:00',
       '[1.10, 2.000, -0.5e-3, 12345678901234567890]')
"""

_PRODUCTS_TABLE = """
    CREATE TABLE {products} (
        product_id integer PRIMARY KEY,
        sku varchar(32) NOT NULL,
        name text NOT NULL,
        description text,
        unit_price numeric(12,2) NOT NULL,
        weight_kg numeric(38,10),
        rating double precision,
        discontinued boolean,
        launched_on date,
        thumbnail bytea,
        attributes jsonb
    )
"""

_PRODUCTS_ROWS = """
    INSERT INTO {products}
    SELECT i,
           'SKU-' || lpad(i::text, 6, '0'),
           'Product ' || i,
           {description_text},
           round(((i * 7907) % 100000) / 100.0 + 0.01, 2),
           CASE WHEN i % 10 = 0 THEN NULL
                ELSE round(((i * 104729) % 1000000007) / 1000000.0 + i / 1e10, 10) END,
           CASE i % 9
                WHEN 0 THEN NULL
                WHEN 1 THEN (i % 50) / 10.0 + 0.1
                ELSE i / 7.0 END,
           CASE i % 4 WHEN 0 THEN NULL WHEN 1 THEN true ELSE false END,
           date '2010-01-01' + (i * 13 % 5000),
           CASE i % 5 WHEN 0 THEN NULL WHEN 1 THEN ''::bytea
                ELSE decode(md5('product' || i), 'hex') END,
           CASE i % 4
                WHEN 0 THEN NULL
                WHEN 1 THEN jsonb_build_object('color', {json_text}, 'sizes', jsonb_build_array('S','M'))
                WHEN 2 THEN '{{}}'::jsonb
                ELSE 'null'::jsonb END
    FROM generate_series(1, {count}) AS i
"""

_PRODUCTS_EXTREMES = """
    INSERT INTO {products} VALUES
      (-2147483648, 'SKU-MIN', 'Min int', NULL, -9999999999.99,
       -9999999999999999999999999999.9999999999, 'NaN', NULL, '1970-01-01', '\\x00ff'::bytea, NULL),
      (2147483647, 'SKU-MAX', 'Max int', '', 9999999999.99,
       9999999999999999999999999999.9999999999, 'Infinity', true, '2038-01-19', '\\x'::bytea,
       '{{"price": 1e-10, "big": 123456789012345678901234567890}}'),
      (0, 'SKU-ZERO', 'Zero', '\\N', 0.00, 0.0000000001, '-Infinity', false, NULL, NULL,
       '[]')
"""

_ORDERS_TABLE = """
    CREATE TABLE {orders} (
        order_id bigint PRIMARY KEY,
        customer_id bigint NOT NULL,
        ordered_at timestamptz NOT NULL,
        delivered_on date,
        status text NOT NULL,
        shipping_address text,
        total numeric(12,2),
        gift boolean,
        metadata jsonb
    )
"""

_ORDERS_ROWS = """
    INSERT INTO {orders}
    SELECT i,
           1 + (i * 31) % {customers},
           {zone_ts}::timestamptz + make_interval(mins => i * 7, secs => (i % 1000) / 1000.0),
           CASE WHEN i % 5 = 0 THEN NULL ELSE date '2023-01-01' + (i % 700) END,
           (ARRAY['new', 'paid', 'shipped', 'delivered', 'cancelled'])[1 + i % 5],
           {address_text},
           CASE WHEN i % 23 = 0 THEN NULL ELSE round(((i * 6151) % 5000000) / 100.0, 2) END,
           CASE i % 7 WHEN 0 THEN NULL WHEN 1 THEN true ELSE false END,
           CASE i % 5
                WHEN 0 THEN NULL
                WHEN 1 THEN 'null'::jsonb
                WHEN 2 THEN jsonb_build_object('channel', 'web', 'coupon', NULL, 'n', i)
                WHEN 3 THEN jsonb_build_object('items', jsonb_build_array(i % 10, i % 3), 'note',
                            {json_text})
                ELSE jsonb_build_array() END
    FROM generate_series(1, {count}) AS i
"""

_ORDER_LINES_TABLE = """
    CREATE TABLE {order_lines} (
        order_id bigint NOT NULL,
        line_no integer NOT NULL,
        product_id integer NOT NULL,
        quantity integer NOT NULL,
        unit_price numeric(12,2) NOT NULL,
        discount numeric(38,10),
        note text,
        PRIMARY KEY (order_id, line_no)
    )
"""

_ORDER_LINES_ROWS = """
    INSERT INTO {order_lines}
    SELECT o, l,
           1 + (o * 17 + l * 101) % {products},
           1 + (o + l) % 9,
           round(((o * 7 + l * 13) % 100000) / 100.0, 2),
           CASE WHEN (o + l) % 4 = 0 THEN NULL ELSE ((o * l) % 1000) / 3.0::numeric(38,10) END,
           {note_text}
    FROM generate_series(1, {orders}) AS o, generate_series(1, {lines}) AS l
"""


@dataclass(frozen=True)
class ShopSize:
    """Row counts of the generated tables at one scale (order_lines = orders * LINES_PER_ORDER)."""

    customers: int
    products: int
    orders: int

    @classmethod
    def at_scale(cls, scale: float) -> ShopSize:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        return cls(
            customers=max(30, math.ceil(BASE_CUSTOMERS * scale)),
            products=max(30, math.ceil(BASE_PRODUCTS * scale)),
            orders=max(30, math.ceil(BASE_ORDERS * scale)),
        )


def _shop_statements(schema: str, size: ShopSize) -> list[tuple[str, sql.Composable]]:
    """Each table's statements, as (table name, statement); "schema" for the schema's own."""
    texts = _text_array(TRICKY_TEXTS)
    n_texts = len(TRICKY_TEXTS)
    zones = _text_array(TIMESTAMPTZ_INPUTS)
    n_zones = len(TIMESTAMPTZ_INPUTS)
    ident = sql.Identifier(schema)
    customers, products, orders, order_lines = (sql.Identifier(schema, name) for name in SAMPLE_TABLES)
    return [
        ("schema", sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident)),
        ("schema", sql.SQL("CREATE SCHEMA {}").format(ident)),
        ("customers", sql.SQL(_CUSTOMERS_TABLE).format(customers=customers)),
        (
            "customers",
            sql.SQL(_CUSTOMERS_ROWS).format(
                customers=customers,
                name_text=_pick(texts, "i * 5", n_texts),
                note_text=_pick(texts, "i", n_texts),
                json_text=_pick(texts, "i * 3", n_texts),
                zone_ts=_pick(zones, "i", n_zones),
                count=sql.Literal(size.customers),
            ),
        ),
        ("customers", sql.SQL(_CUSTOMERS_EXTREMES).format(customers=customers)),
        ("products", sql.SQL(_PRODUCTS_TABLE).format(products=products)),
        (
            "products",
            sql.SQL(_PRODUCTS_ROWS).format(
                products=products,
                description_text=_pick(texts, "i * 7", n_texts),
                json_text=_pick(texts, "i", n_texts),
                count=sql.Literal(size.products),
            ),
        ),
        ("products", sql.SQL(_PRODUCTS_EXTREMES).format(products=products)),
        ("orders", sql.SQL(_ORDERS_TABLE).format(orders=orders)),
        (
            "orders",
            sql.SQL(_ORDERS_ROWS).format(
                orders=orders,
                customers=sql.Literal(size.customers),
                zone_ts=_pick(zones, "i * 3", n_zones),
                address_text=_pick(texts, "i * 11", n_texts),
                json_text=_pick(texts, "i * 13", n_texts),
                count=sql.Literal(size.orders),
            ),
        ),
        ("order_lines", sql.SQL(_ORDER_LINES_TABLE).format(order_lines=order_lines)),
        (
            "order_lines",
            sql.SQL(_ORDER_LINES_ROWS).format(
                order_lines=order_lines,
                products=sql.Literal(size.products),
                orders=sql.Literal(size.orders),
                lines=sql.Literal(LINES_PER_ORDER),
                note_text=_pick(texts, "o * 3 + l", n_texts),
            ),
        ),
    ]


def create_sample_shop(
    dsn: str, schema: str = "shop", *, scale: float = 1.0, progress: ProgressCallback | None = None
) -> dict[str, int]:
    """Drop and recreate ``schema`` with the sample shop; return the row count of each table."""
    statements = _shop_statements(schema, ShopSize.at_scale(scale))
    report = progress or (lambda _message: None)
    counts: dict[str, int] = {}
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        # The session zone changes how zone-less literals parse; pin it so
        # every run stores the same instants.
        cur.execute("SET TIME ZONE 'UTC'")
        current = ""
        started = time.monotonic()
        for step, statement in statements:
            if step != current:
                if current and current != "schema":
                    report(f"created {schema}.{current} in {time.monotonic() - started:.1f}s")
                current, started = step, time.monotonic()
            cur.execute(statement)
        report(f"created {schema}.{current} in {time.monotonic() - started:.1f}s")
        for name in SAMPLE_TABLES:
            table = sql.Identifier(schema, name)
            cur.execute(sql.SQL("ANALYZE {}").format(table))
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
            row = cur.fetchone()
            counts[name] = int(row[0]) if row else 0
    conn.close()
    return counts
