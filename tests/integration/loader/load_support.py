"""Staging helpers of the loader suites: the orders table's columns and rows, its files encoded
as docs/architecture.md says the extractor writes them, and queries of the loaded result."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pgsnow.config import Settings
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, key_list_key
from pgsnow.ledger import ledger_name
from pgsnow.manifest import (
    META_BATCH,
    META_ROWS,
    META_RUN_ID,
    META_SHA256,
    Column,
    RunManifest,
    RunState,
    StagedFile,
)
from pgsnow.runs import RunStore
from pgsnow.typemap import map_pg_type

RUN = "20261125T120000000000Z"
ORDERS = TableRef("public", "orders")

# (name, PostgreSQL type, nullable): one column per value kind.
ORDER_COLUMNS = [
    ("order_id", "bigint", False),
    ("amount", "numeric(12,2)", True),
    ("ratio", "double precision", True),
    ("note", "text", True),
    ("paid", "boolean", True),
    ("order_day", "date", True),
    ("order_time", "time without time zone", True),
    ("created", "timestamp without time zone", True),
    ("created_tz", "timestamp with time zone", True),
    ("payload", "jsonb", True),
    ("blob", "bytea", True),
]

# Python values per row, in ORDER_COLUMNS order; None is NULL.
ORDER_ROWS: list[tuple[Any, ...]] = [
    (
        1,
        Decimal("12.34"),
        0.1,
        'comma, "quote" and\nnewline é',
        True,
        dt.date(2026, 11, 25),
        dt.time(12, 30, 45, 123456),
        dt.datetime(2026, 11, 25, 12, 0, 0, 1),
        dt.datetime(2026, 11, 25, 11, 0, 0, 500000, tzinfo=dt.UTC),
        {"a": [1, 2], "b": "x"},
        b"\x00\xffpg",
    ),
    (2, None, None, None, None, None, None, None, None, None, None),
    (3, Decimal("-0.01"), -2.5e10, "", False, dt.date(1999, 1, 1), dt.time(0, 0), None, None, [], b""),
]


def manifest_columns() -> tuple[Column, ...]:
    return tuple(Column.from_types(n, t, t, map_pg_type(t), nullable) for n, t, nullable in ORDER_COLUMNS)


# --------------------------------------------------------------------------- encoding per docs/architecture.md


def csv_field(value: Any) -> str:
    if value is None:
        return ""  # NULL is an unquoted empty field
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, bytes):
        text = value.hex()
    elif isinstance(value, dt.datetime) and value.tzinfo is not None:
        text = value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    elif isinstance(value, dt.datetime):
        text = value.isoformat(sep=" ")
    elif isinstance(value, dt.date | dt.time | Decimal):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, dict | list):
        text = json.dumps(value)
    else:
        text = str(value)
    return '"' + text.replace('"', '""') + '"'  # quoted, so an empty string is ""


def csv_gz_bytes(rows: list[tuple[Any, ...]], header: list[str] | None = None) -> bytes:
    names = header or [n for n, _, _ in ORDER_COLUMNS]
    lines = [",".join(names)] + [",".join(csv_field(v) for v in row) for row in rows]
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0)


def parquet_bytes(rows: list[tuple[Any, ...]]) -> bytes:
    types = [
        pa.int64(),
        pa.decimal128(12, 2),
        pa.float64(),
        pa.string(),
        pa.bool_(),
        pa.date32(),
        pa.time64("us"),
        pa.timestamp("us"),
        pa.timestamp("us", tz="UTC"),
        pa.string(),
        pa.binary(),
    ]
    columns = list(zip(*rows, strict=True))
    arrays = []
    for (name, _, _), arrow_type, values in zip(ORDER_COLUMNS, types, columns, strict=True):
        encoded = tuple(None if v is None else json.dumps(v) for v in values) if name == "payload" else values
        arrays.append(pa.array(encoded, type=arrow_type))
    table = pa.Table.from_arrays(arrays, names=[n for n, _, _ in ORDER_COLUMNS])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def put_staged_file(
    s3: Any, settings: Settings, key: str, body: bytes, *, rows: int | None, run_id: str | None = RUN
) -> None:
    metadata = {META_SHA256: hashlib.sha256(body).hexdigest()}
    if run_id is not None:
        metadata |= {META_RUN_ID: run_id, META_BATCH: "1"}
    if rows is not None:
        metadata[META_ROWS] = str(rows)
    s3.put_object(Bucket=settings.bucket, Key=key, Body=body, Metadata=metadata)


def put_run_manifest(s3: Any, settings: Settings, table: TableRef = ORDERS, run_id: str = RUN) -> None:
    manifest = RunManifest(
        run_id=run_id,
        table=table,
        mode="full",
        file_format=FileFormat.CSV,
        columns=manifest_columns(),
        primary_key=("order_id",),
        state=RunState.EXTRACTING,
        started_at="2026-11-25T12:00:00Z",
    )
    RunStore(s3, settings.bucket).put_manifest(manifest)


def query(sf_conn: Any, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    with sf_conn.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def orders_sql(settings: Settings) -> str:
    return f'"{settings.snowflake.database}"."PUBLIC"."ORDERS"'


def ledger_sql(settings: Settings, table: TableRef = ORDERS) -> str:
    """The table's load ledger, quoted (pgsnow.ledger names it)."""
    return ledger_name(settings.snowflake.database or "", settings.snowflake.control_schema, table)


def ledger_rows(sf_conn: Any, settings: Settings, table: TableRef = ORDERS) -> list[tuple[Any, ...]]:
    ledger = ledger_sql(settings, table)
    return query(
        sf_conn,
        f'SELECT "S3_KEY", "ETAG", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME", "ROWS_LOADED", '
        f'"LOADED_AT" IS NOT NULL FROM {ledger} ORDER BY "S3_KEY"',
    )


def order_count(sf_conn: Any, settings: Settings) -> int:
    return int(query(sf_conn, f"SELECT COUNT(*) FROM {orders_sql(settings)}")[0][0])


RUN_1 = "20261125T120000000000Z"
RUN_2 = "20261126T120000000000Z"
ROW_BY_ID = {row[0]: row for row in ORDER_ROWS}


def stage_run(
    s3: Any,
    settings: Settings,
    run_id: str,
    order_ids: list[int],
    deletes: str,
    state: RunState = RunState.STAGED,
) -> str:
    """A complete (staged) run: one data file with these orders, its full key list, its manifest."""
    rows = [ROW_BY_ID[i] for i in order_ids]
    key = data_key(settings.prefix, ORDERS, 1, run_id, FileFormat.CSV)
    body = csv_gz_bytes(rows)
    put_staged_file(s3, settings, key, body, rows=len(rows), run_id=run_id)
    keys_body = csv_gz_bytes([(i,) for i in order_ids], header=["order_id"])
    keys_key = key_list_key(ORDERS, run_id)
    s3.put_object(Bucket=settings.bucket, Key=keys_key, Body=keys_body)
    manifest = RunManifest(
        run_id=run_id,
        table=ORDERS,
        mode="full",
        file_format=FileFormat.CSV,
        columns=manifest_columns(),
        primary_key=("order_id",),
        state=state,
        started_at="2026-11-25T12:00:00Z",
        files=(StagedFile(key, 1, len(rows), len(body), hashlib.sha256(body).hexdigest(), FileFormat.CSV),),
        write_mode="merge",
        deletes=deletes,
        key_list=StagedFile(
            keys_key, 0, len(order_ids), len(keys_body), hashlib.sha256(keys_body).hexdigest(), FileFormat.CSV
        ),
    )
    RunStore(s3, settings.bucket).put_manifest(manifest)
    return key
