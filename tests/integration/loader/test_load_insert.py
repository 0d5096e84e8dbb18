"""LOAD_METHOD=insert: small CSV files are INSERTed with bound values in the ledger transaction,
cell-exact like the COPY path, against moto and the local Snowflake over HTTP."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from load_support import (
    ORDER_COLUMNS,
    ORDER_ROWS,
    ORDERS,
    csv_gz_bytes,
    ledger_rows,
    order_count,
    orders_sql,
    parquet_bytes,
    put_run_manifest,
    put_staged_file,
    query,
)

from pgsnow.config import LoadMethod, Settings
from pgsnow.keys import FileFormat, data_key, parse_data_key
from pgsnow.load.batch import load_staged_files
from pgsnow.load.insert import parse_csv_records
from pgsnow.load.outcomes import LoadStatus

pytestmark = pytest.mark.integration

RUN = "20261125T120000000000Z"


def insert_settings(settings: Settings, max_rows: int = 10_000) -> Settings:
    load = dataclasses.replace(settings.load, method=LoadMethod.INSERT, insert_max_rows=max_rows)
    return dataclasses.replace(settings, load=load)


def loaded_orders(sf_conn: Any, settings: Settings) -> list[tuple[Any, ...]]:
    """Every column of every row, NULL-checked in SQL (the emulator returns NULL timestamps as the epoch)."""
    names = ", ".join(f'"{n.upper()}"' for n, _, _ in ORDER_COLUMNS)
    flags = ", ".join(f'"{n.upper()}" IS NULL' for n, _, _ in ORDER_COLUMNS)
    rows = query(sf_conn, f'SELECT {names}, {flags} FROM {orders_sql(settings)} ORDER BY "ORDER_ID"')
    width = len(ORDER_COLUMNS)
    return [
        tuple(
            None if is_null else (json.loads(v) if i == 9 else bytes(v) if i == 10 else v)
            for i, (v, is_null) in enumerate(zip(row[:width], row[width:], strict=True))
        )
        for row in rows
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('a,b\n"1",\n', [("a", "b"), ("1", None)]),
        ('"",""\n', [("", "")]),
        ('"x ""q"", y","line\nbreak"\r\n', [('x "q", y', "line\nbreak")]),
        ("1,,3", [("1", None, "3")]),
        ("1,", [("1", None)]),
    ],
    ids=[
        "unquoted-empty-is-null",
        "quoted-empty-is-empty-string",
        "quotes-commas-newlines",
        "no-final-newline",
        "trailing-empty",
    ],
)
def test_csv_records_keep_null_apart_from_empty_string(
    text: str, expected: list[tuple[str | None, ...]]
) -> None:
    assert parse_csv_records(text) == expected


def test_a_small_csv_file_is_inserted_cell_exact(settings: Settings, s3: Any, sf_conn: Any) -> None:
    # Given LOAD_METHOD=insert and one small staged file with every value kind, NULLs and ''
    settings = insert_settings(settings)
    key = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    put_run_manifest(s3, settings)
    put_staged_file(s3, settings, key, csv_gz_bytes(ORDER_ROWS), rows=len(ORDER_ROWS))
    staged = parse_data_key(key, settings.prefix)

    # When it is delivered twice
    results = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])
    again = load_staged_files(settings=settings, sf_conn=sf_conn, s3=s3, objects=[staged])

    # Then it is inserted once, exactly as staged, and recorded in the ledger like a COPY
    assert [(r.status, r.rows) for r in results + again] == [
        (LoadStatus.LOADED, len(ORDER_ROWS)),
        (LoadStatus.ALREADY_LOADED, len(ORDER_ROWS)),
    ]
    assert loaded_orders(sf_conn, settings) == ORDER_ROWS
    assert [row[6:] for row in ledger_rows(sf_conn, settings)] == [(len(ORDER_ROWS), True)]


def test_inserted_and_copied_files_hold_the_same_values(settings: Settings, s3: Any, sf_conn: Any) -> None:
    # Given LOAD_METHOD=insert up to 1 row: a 1-row CSV (inserted), a 2-row CSV and a Parquet file (COPY)
    settings = insert_settings(settings, max_rows=1)
    put_run_manifest(s3, settings)
    small = data_key(settings.prefix, ORDERS, 1, RUN, FileFormat.CSV)
    large = data_key(settings.prefix, ORDERS, 2, RUN, FileFormat.CSV)
    put_staged_file(s3, settings, small, csv_gz_bytes(ORDER_ROWS[:1]), rows=1)
    put_staged_file(s3, settings, large, csv_gz_bytes(ORDER_ROWS[1:]), rows=2)
    shifted = [(row[0] + 10, *row[1:]) for row in ORDER_ROWS]
    parquet = data_key(settings.prefix, ORDERS, 3, RUN, FileFormat.PARQUET)
    put_staged_file(s3, settings, parquet, parquet_bytes(shifted), rows=len(shifted))

    # When the batch loads
    results = load_staged_files(
        settings=settings,
        sf_conn=sf_conn,
        s3=s3,
        objects=[parse_data_key(k, settings.prefix) for k in (small, large, parquet)],
    )

    # Then every file is loaded and recorded, and the table holds every value as staged
    assert [(r.key, r.status, r.rows) for r in results] == [
        (small, LoadStatus.LOADED, 1),
        (large, LoadStatus.LOADED, 2),
        (parquet, LoadStatus.LOADED, 3),
    ]
    assert loaded_orders(sf_conn, settings) == ORDER_ROWS + shifted
    assert order_count(sf_conn, settings) == 6
    assert all(row[7] for row in ledger_rows(sf_conn, settings))
