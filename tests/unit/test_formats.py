"""Staged file writers: batch splitting, checksums, gzip determinism, Arrow types and conversions."""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgsnow.formats import (
    CsvBatchSplitter,
    CsvGzipWriter,
    ParquetWriter,
    WrittenFile,
    arrow_schema,
    arrow_type,
)
from pgsnow.manifest import Column
from pgsnow.typemap import map_pg_type

pytestmark = pytest.mark.unit

HEADER = b"id,note\n"


def column(name: str, pg_type: str, nullable: bool = True) -> Column:
    return Column.from_types(name, pg_type, pg_type, map_pg_type(pg_type), nullable)


def split(records: list[bytes], batch_rows: int, tmp_path: Path) -> list[WrittenFile]:
    files: list[WrittenFile] = []
    splitter = CsvBatchSplitter(
        batch_rows=batch_rows, path_for_batch=lambda n: tmp_path / f"b{n}.csv.gz", on_file=files.append
    )
    for data in [HEADER, *records]:
        splitter.write(data)
    splitter.finish()
    assert splitter.rows == len(records)
    return files


@pytest.mark.parametrize(
    ("record_count", "batch_rows", "expected_rows"),
    [
        pytest.param(0, 3, [0], id="empty-table-one-header-only-file"),
        pytest.param(1, 3, [1], id="one-row"),
        pytest.param(6, 3, [3, 3], id="exact-multiple"),
        pytest.param(7, 3, [3, 3, 1], id="remainder"),
        pytest.param(5, 1, [1, 1, 1, 1, 1], id="one-row-per-file"),
    ],
)
def test_csv_splitter_cuts_on_record_boundaries(
    tmp_path: Path, record_count: int, batch_rows: int, expected_rows: list[int]
) -> None:
    # Given records, some with embedded newlines (one COPY message each)
    records = [f'{i},"multi\nline {i}"\n'.encode() for i in range(record_count)]

    # When they are split
    files = split(records, batch_rows, tmp_path)

    # Then each file has the header and its share of the records, and the counts are right
    assert [f.rows for f in files] == expected_rows
    assert [f.batch for f in files] == list(range(1, len(files) + 1))
    position = 0
    for written in files:
        content = gzip.decompress(written.path.read_bytes())
        assert content == HEADER + b"".join(records[position : position + written.rows])
        position += written.rows


def test_checksum_and_size_are_of_the_bytes_on_disk(tmp_path: Path) -> None:
    (written,) = split([b"1,a\n", b"2,b\n"], 10, tmp_path)
    on_disk = written.path.read_bytes()
    assert (written.bytes, written.sha256) == (len(on_disk), hashlib.sha256(on_disk).hexdigest())


def test_gzip_output_is_deterministic(tmp_path: Path) -> None:
    # A retried run must upload identical bytes for the same rows (no timestamp or name in the header).
    first = CsvGzipWriter(tmp_path / "one.csv.gz", 1, HEADER)
    second = CsvGzipWriter(tmp_path / "two.csv.gz", 1, HEADER)
    for writer in (first, second):
        writer.write_record(b"1,x\n")
    assert first.close().sha256 == second.close().sha256


@pytest.mark.parametrize(
    ("pg_type", "expected"),
    [
        pytest.param("smallint", pa.int16(), id="smallint"),
        pytest.param("integer", pa.int32(), id="integer"),
        pytest.param("bigint", pa.int64(), id="bigint"),
        pytest.param("numeric(12,2)", pa.decimal128(12, 2), id="numeric-p-s"),
        pytest.param("numeric", pa.decimal128(38, 10), id="numeric-unbounded"),
        pytest.param("real", pa.float64(), id="real"),
        pytest.param("double precision", pa.float64(), id="double"),
        pytest.param("text", pa.string(), id="text"),
        pytest.param("uuid", pa.string(), id="uuid"),
        pytest.param("boolean", pa.bool_(), id="boolean"),
        pytest.param("date", pa.date32(), id="date"),
        pytest.param("time without time zone", pa.time64("us"), id="time"),
        pytest.param("timestamp without time zone", pa.timestamp("us"), id="timestamp"),
        pytest.param("timestamp with time zone", pa.timestamp("us", tz="UTC"), id="timestamptz"),
        pytest.param("jsonb", pa.string(), id="jsonb"),
        pytest.param("integer[]", pa.string(), id="array"),
        pytest.param("bytea", pa.binary(), id="bytea"),
    ],
)
def test_arrow_type_per_postgres_type(pg_type: str, expected: pa.DataType) -> None:
    assert arrow_type(column("c", pg_type)) == expected


def test_parquet_writer_converts_values_exactly(tmp_path: Path) -> None:
    # Given columns of every converted kind and rows as psycopg2 returns them
    columns = [
        column("id", "integer", nullable=False),
        column("amount", "numeric(12,2)"),
        column("big", "numeric"),
        column("at", "timestamp with time zone"),
        column("local", "timestamp without time zone"),
        column("day", "date"),
        column("tod", "time without time zone"),
        column("blob", "bytea"),
    ]
    plus_two = timezone(timedelta(hours=2))
    rows = [
        (
            1,
            Decimal("-1234567890.12"),
            Decimal("123456789012345678901234567.1234567891"),
            datetime(2024, 6, 1, 12, 0, 0, 500000, tzinfo=plus_two),
            datetime(2024, 1, 2, 3, 4, 5, 678901),
            date(2024, 2, 29),
            time(23, 59, 59, 999999),
            memoryview(b"\x00\xff"),
        ),
        (2, None, None, None, None, None, None, None),
    ]

    # When they are written as two row groups
    writer = ParquetWriter(tmp_path / "b1.parquet", 1, columns)
    writer.write_rows(rows[:1])
    writer.write_rows(rows[1:])
    written = writer.close()

    # Then the file reads back exactly, timestamptz in UTC, with checksum/size of the file
    table = pq.read_table(written.path)
    assert table.schema == arrow_schema(columns)
    assert table.to_pylist()[0] == {
        "id": 1,
        "amount": Decimal("-1234567890.12"),
        "big": Decimal("123456789012345678901234567.1234567891"),
        "at": datetime(2024, 6, 1, 10, 0, 0, 500000, tzinfo=UTC),
        "local": datetime(2024, 1, 2, 3, 4, 5, 678901),
        "day": date(2024, 2, 29),
        "tod": time(23, 59, 59, 999999),
        "blob": b"\x00\xff",
    }
    assert set(table.to_pylist()[1].values()) == {2, None}
    assert pq.ParquetFile(written.path).metadata.num_row_groups == 2
    on_disk = written.path.read_bytes()
    assert (written.rows, written.bytes, written.sha256) == (
        2,
        len(on_disk),
        hashlib.sha256(on_disk).hexdigest(),
    )


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(Decimal("1.234"), id="digits-beyond-scale"),
        pytest.param(Decimal("12345678901.00"), id="too-many-integer-digits"),
        pytest.param(Decimal("NaN"), id="nan"),
    ],
)
def test_parquet_writer_never_rounds_decimals(tmp_path: Path, value: Decimal) -> None:
    writer = ParquetWriter(tmp_path / "b1.parquet", 1, [column("amount", "numeric(12,2)")])
    with pytest.raises((pa.ArrowInvalid, ValueError)):
        writer.write_rows([(value,)])
    writer.close()
