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

from pgsnow.csv_records import csv_fields_at, parse_csv_record
from pgsnow.formats import (
    CopyPipe,
    CsvBatchSplitter,
    CsvGzipWriter,
    ParquetWriter,
    PipeAbandonedError,
    WrittenFile,
    arrow_schema,
    arrow_type,
    open_arrow_csv,
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


# --- block-buffered CSV, the COPY pipe and Arrow's CSV parsing (the fast paths) --------------------


@pytest.mark.parametrize(
    ("block_bytes", "batch_rows"),
    [
        pytest.param(1, 3, id="block-per-record"),
        pytest.param(25, 4, id="blocks-span-records"),
        pytest.param(1 << 20, 4, id="one-block-per-file"),
        pytest.param(25, 1, id="one-row-per-file"),
    ],
)
def test_csv_blocks_never_cross_a_batch_cut(tmp_path: Path, block_bytes: int, batch_rows: int) -> None:
    # Given 10 records and blocks smaller, around and larger than a file's records
    records = [f'{i},"note\n{i}"\n'.encode() for i in range(10)]
    files: list[WrittenFile] = []
    splitter = CsvBatchSplitter(
        batch_rows=batch_rows,
        path_for_batch=lambda n: tmp_path / f"b{n}.csv.gz",
        on_file=files.append,
        block_bytes=block_bytes,
    )

    # When they are written one COPY message at a time
    for data in [HEADER, *records]:
        splitter.write(data)
    splitter.finish()

    # Then every file holds exactly batch_rows records (the last the rest), with its first and last record
    expected = [batch_rows] * (10 // batch_rows) + ([10 % batch_rows] if 10 % batch_rows else [])
    assert [f.rows for f in files] == expected
    position = 0
    for written in files:
        mine = records[position : position + written.rows]
        assert gzip.decompress(written.path.read_bytes()) == HEADER + b"".join(mine)
        assert (written.first_key, written.last_key) == (mine[0], mine[-1])
        position += written.rows
    assert splitter.rows == 10 and splitter.header == HEADER


def test_csv_size_roll_cuts_after_a_block_on_a_record_boundary(tmp_path: Path) -> None:
    # Given ~400 KB of poorly compressible records and a 64 KB size target checked after each 16 KB block
    import random

    noise = random.Random(7)
    records = [
        bytes(noise.randrange(33, 127) for _ in range(200)).replace(b",", b";") + b"\n" for _ in range(2000)
    ]
    files: list[WrittenFile] = []
    splitter = CsvBatchSplitter(
        batch_rows=10**6,
        path_for_batch=lambda n: tmp_path / f"b{n}.csv.gz",
        on_file=files.append,
        max_bytes=64 * 1024,
        block_bytes=16 * 1024,
    )

    # When they are written
    for data in [HEADER, *records]:
        splitter.write(data)
    splitter.finish()

    # Then the stream rolled into several files, each (but the last) past the target, every record once, in order
    assert len(files) > 2
    assert all(f.bytes >= 64 * 1024 for f in files[:-1])
    content = b"".join(gzip.decompress(f.path.read_bytes())[len(HEADER) :] for f in files)
    assert content == b"".join(records)
    assert sum(f.rows for f in files) == 2000


@pytest.mark.parametrize(
    "through",
    [
        pytest.param("pipe", id="records-written-to-the-pipe"),
        pytest.param("record_sink", id="records-written-to-its-buffered-sink"),
    ],
)
def test_copy_pipe_passes_every_byte_in_order_across_threads(through: str) -> None:
    import threading

    # Given a writer thread sending 2,000 records through small blocks and a short queue
    pipe = CopyPipe(block_bytes=64, max_blocks=2)
    records = [f"{i},row {i}\n".encode() for i in range(2000)]

    def produce() -> None:
        if through == "pipe":
            for record in records:
                pipe.write(record)
        else:
            sink = pipe.record_sink()
            for record in records:
                sink.write(record)
            sink.flush()
        pipe.close()

    writer = threading.Thread(target=produce)
    writer.start()

    # When the reader reads in odd sizes until the end
    received = bytearray()
    while chunk := pipe.read(37):
        received += chunk
    writer.join()

    # Then it got exactly the records, in order
    assert bytes(received) == b"".join(records)
    assert pipe.bytes_written == len(received)


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param("abandon", id="reader-abandons-writer-raises"),
        pytest.param("fail", id="copy-fails-reader-raises"),
    ],
)
def test_copy_pipe_stops_the_other_side(stop: str) -> None:
    pipe = CopyPipe(block_bytes=1, max_blocks=1)
    pipe.write(b"1\n")  # one block queued: the queue is full
    if stop == "abandon":
        # When the reader abandons the pipe, the writer's next write raises (aborting the COPY)
        pipe.abandon()
        with pytest.raises(PipeAbandonedError):
            pipe.write(b"2\n")
    else:
        # When the COPY fails, the reader raises instead of seeing a clean (truncated) end
        pipe.close(failed=True)
        with pytest.raises(PipeAbandonedError):
            pipe.read(10)
        # And what a buffered sink still holds can never reach the ended stream
        with pytest.raises(PipeAbandonedError):
            pipe.write(b"3\n")


def test_copy_pipe_feeds_arrow_a_record_many_times_its_block_size() -> None:
    import threading

    # Given records around one whose text is 40 blocks long (Arrow's reader refuses a record that
    # spans more than two of its reads, so the pipe hands it over whole)
    block = 1024
    columns = [column("id", "integer", nullable=False), column("body", "text")]
    big = "x" * (40 * block)
    records = [b'1,"a"\n', f'2,"{big}"\n'.encode(), b'3,"b"\n']
    pipe = CopyPipe(block_bytes=block, max_blocks=2)

    def produce() -> None:
        sink = pipe.record_sink()
        for record in records:
            sink.write(record)
        sink.flush()
        pipe.close()

    writer = threading.Thread(target=produce)
    writer.start()
    # When Arrow parses the stream with a block size far below the record's
    reader = open_arrow_csv(pipe, columns, block_bytes=block)
    assert reader is not None
    table = reader.read_all()
    writer.join()
    # Then every record arrives whole
    assert table.column(0).to_pylist() == [1, 2, 3]
    assert table.column(1).to_pylist() == ["a", big, "b"]


def read_arrow(data: bytes, columns: list[Column], trailing: int = 0) -> pa.Table:
    import io

    reader = open_arrow_csv(io.BytesIO(data), columns, trailing)
    assert reader is not None
    return reader.read_all()


def test_arrow_csv_keeps_null_apart_from_empty_and_reads_postgres_text() -> None:
    # Given COPY CSV as PostgreSQL writes it for the Parquet projection (UTC session, native output)
    columns = [
        column("note", "text"),
        column("ratio", "double precision"),
        column("flag", "boolean"),
        column("at", "timestamp with time zone"),
        column("amount", "numeric(12,2)"),
        column("tod", "time without time zone"),
    ]
    data = (
        b'"",NaN,t,2024-06-01 10:00:00.5+00,-1234567890.12,23:59:59.999999,7\n'
        b",Infinity,f,0001-01-01 00:00:00+00,0.00,00:00:00,8\n"
        b'"a,""b""\nc",-Infinity,,9999-12-31 23:59:59.999999+00,,12:00:00,9\n'
        b"NULL,-0,t,2024-02-29 23:00:00+00,1.50,01:02:03,10\n"
    )

    # When Arrow parses it with the staged types (plus one trailing key column)
    table = read_arrow(data, columns, trailing=1)

    # Then NULL is only the unquoted empty field, every other text is a value, types are exact
    rows = table.to_pylist()
    assert [r["c0"] for r in rows] == ["", None, 'a,"b"\nc', "NULL"]
    ratios = [r["c1"] for r in rows]
    assert ratios[0] != ratios[0] and ratios[1:3] == [float("inf"), float("-inf")]
    assert str(ratios[3]) == "-0.0"
    assert [r["c2"] for r in rows] == [True, False, None, True]
    assert rows[0]["c3"] == datetime(2024, 6, 1, 10, 0, 0, 500000, tzinfo=UTC)
    assert rows[1]["c3"] == datetime(1, 1, 1, tzinfo=UTC)
    assert rows[2]["c3"] == datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert [r["c4"] for r in rows] == [Decimal("-1234567890.12"), Decimal("0.00"), None, Decimal("1.50")]
    assert rows[0]["c5"] == time(23, 59, 59, 999999)
    assert [r["c6"] for r in rows] == ["7", "8", "9", "10"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"1.234", id="digits-beyond-scale"),
        pytest.param(b"12345678901.00", id="too-many-integer-digits"),
        pytest.param(b"NaN", id="nan"),
    ],
)
def test_arrow_csv_never_rounds_decimals(text: bytes) -> None:
    with pytest.raises(pa.ArrowInvalid):
        read_arrow(text + b"\n", [column("amount", "numeric(12,2)")])


def test_arrow_csv_empty_stream_is_none() -> None:
    import io

    assert open_arrow_csv(io.BytesIO(b""), [column("id", "integer")]) is None


def test_parquet_writer_from_arrow_decodes_bytea_and_drops_trailing_columns(tmp_path: Path) -> None:
    # Given parsed COPY CSV: an id, a bytea as hex, and a trailing key column
    columns = [column("id", "integer", nullable=False), column("blob", "bytea")]
    table = read_arrow(b'1,00ff,1\n2,,2\n3,"",3\n', columns, trailing=1)

    # When it is written as one row group
    writer = ParquetWriter(tmp_path / "b1.parquet", 1, columns)
    writer.write_arrow(table)
    written = writer.close()

    # Then the file has the staged schema, raw bytes, NULL vs empty bytes, and its checksum
    read = pq.read_table(written.path)
    assert read.schema == arrow_schema(columns)
    assert read.to_pylist() == [
        {"id": 1, "blob": b"\x00\xff"},
        {"id": 2, "blob": None},
        {"id": 3, "blob": b""},
    ]
    on_disk = written.path.read_bytes()
    assert (written.rows, written.bytes, written.sha256) == (
        3,
        len(on_disk),
        hashlib.sha256(on_disk).hexdigest(),
    )


def test_parquet_compressed_bytes_grow_with_each_row_group_and_end_at_the_file_size(tmp_path: Path) -> None:
    # Given a Parquet writer (the size roll reads compressed_bytes after each row group)
    columns = [column("id", "integer", nullable=False), column("note", "text")]
    writer = ParquetWriter(tmp_path / "b1.parquet", 1, columns)
    sizes = [writer.compressed_bytes]

    # When three row groups are written
    for start in (1, 4, 7):
        records = b"".join(f'{i},"row {i}",{i}\n'.encode() for i in range(start, start + 3))
        writer.write_arrow(read_arrow(records, columns, trailing=1))
        sizes.append(writer.compressed_bytes)
    written = writer.close()

    # Then each row group adds bytes, the footer comes last, and the file is what was counted
    assert sizes == sorted(set(sizes)) and written.bytes > sizes[-1]
    assert pq.ParquetFile(written.path).num_row_groups == 3
    assert (written.rows, written.bytes) == (9, written.path.stat().st_size)


CSV_FIELD_CASES = [
    pytest.param(b"1,abc,\n", [0], ["1"], id="first-unquoted"),
    pytest.param(b"1,abc,\n", [2], [""], id="last-empty-before-newline"),
    pytest.param(b'7,"a,b\nc",9\n', [2, 0], ["9", "7"], id="after-a-quoted-comma-and-newline"),
    pytest.param(b'"x""y",2\n', [0], ['x"y'], id="escaped-quote"),
    pytest.param(b'1,"' + b'""' * 1000 + b'",42\r\n', [2], ["42"], id="after-many-escapes-crlf"),
    pytest.param('"café 🐘",2\n'.encode(), [0, 1], ["café 🐘", "2"], id="utf8"),
]


@pytest.mark.parametrize(("record", "positions", "expected"), CSV_FIELD_CASES)
def test_csv_fields_at_reads_only_the_wanted_fields(
    record: bytes, positions: list[int], expected: list[str]
) -> None:
    assert csv_fields_at(record, positions) == expected
    # the same fields the full parser reads
    full = parse_csv_record(record.decode("utf-8"))
    assert [full[p] for p in positions] == expected


def test_a_record_larger_than_a_block_is_written_whole_and_only_its_key_is_kept(tmp_path: Path) -> None:
    # Given a splitter with 1 KB blocks, keeping each record's first field as its key
    files: list[WrittenFile] = []
    splitter = CsvBatchSplitter(
        batch_rows=10,
        path_for_batch=lambda n: tmp_path / f"b{n}.csv.gz",
        on_file=files.append,
        block_bytes=1024,
        record_key=lambda _header, record: tuple(csv_fields_at(record, [0])),
    )
    big = b'2,"' + b"x" * 100_000 + b'"\n'
    # When a small record, one of 100 blocks and another small one arrive
    for data in [HEADER, b'1,"a"\n', big, b'3,"b"\n']:
        splitter.write(data)
    splitter.finish()
    # Then one file holds them all, in order, with the first and last keys
    assert len(files) == 1
    assert gzip.decompress(files[0].path.read_bytes()) == HEADER + b'1,"a"\n' + big + b'3,"b"\n'
    assert (files[0].rows, files[0].first_key, files[0].last_key) == (3, ("1",), ("3",))
