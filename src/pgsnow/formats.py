"""Staged file writers: CSV gzip and Parquet, each counting rows, bytes and SHA-256 as it writes.

The encoding is the contract in docs/architecture.md. Writers write to a local file
(spooled to disk, never the whole batch in RAM); the checksum is of the exact bytes on
disk, which are the bytes uploaded to S3.

gzip level, measured on 30 MB of CSV (300K rows): level 1 took 0.07 s -> 3.75 MB,
level 3 0.10 s -> 3.70 MB, level 6 0.20 s -> 3.29 MB. COPY itself took 0.28 s, so level 6
would add ~70% to the CPU time of a single-threaded Lambda for 12% fewer bytes on an
in-region upload; we use level 1.
"""

from __future__ import annotations

import builtins
import gzip
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pgsnow.manifest import Column
from pgsnow.typemap import ValueKind

CSV_GZIP_LEVEL = 1
PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class WrittenFile:
    """A finished local file: what the manifest and the S3 metadata need to know about it."""

    path: Path
    batch: int
    rows: int
    bytes: int
    sha256: str
    # CSV only: the file's first and last records as PostgreSQL wrote them (key/cursor ranges).
    first_record: builtins.bytes | None = None
    last_record: builtins.bytes | None = None


class _HashingFile:
    """A write-only binary stream that hashes and counts what passes through to the real file."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._target.write(data)

    def flush(self) -> None:
        self._target.flush()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        # The writer on top may call close(); the owner closes the real file.
        self.closed = True

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


class CsvGzipWriter:
    """Write one gzip CSV file from COPY records (already encoded by PostgreSQL)."""

    def __init__(self, path: Path, batch: int, header: bytes, *, compresslevel: int = CSV_GZIP_LEVEL) -> None:
        self._path = path
        self._batch = batch
        self._raw = path.open("wb")
        self._hashing = _HashingFile(self._raw)
        # mtime=0 and no file name: the same rows always give the same bytes (and checksum).
        self._gzip = gzip.GzipFile(
            filename="", mode="wb", fileobj=self._hashing, compresslevel=compresslevel, mtime=0
        )
        self._gzip.write(header)
        self.rows = 0
        self._first: bytes | None = None
        self._last: bytes | memoryview | None = None

    @property
    def compressed_bytes(self) -> int:
        """Bytes on disk so far (gzip buffers a little, so this trails the input slightly)."""
        return self._hashing.size

    def write_record(self, record: bytes | memoryview) -> None:
        self._gzip.write(record)
        if self._first is None:
            self._first = bytes(record)
        self._last = record
        self.rows += 1

    def close(self) -> WrittenFile:
        self._gzip.close()
        self._raw.close()
        last = bytes(self._last) if self._last is not None else None
        return WrittenFile(
            self._path, self._batch, self.rows, self._hashing.size, self._hashing.sha256, self._first, last
        )


class CsvBatchSplitter:
    """A COPY sink that cuts the stream into files of at most ``batch_rows`` records and about ``max_bytes``.

    PostgreSQL sends the header first and then one CopyData message per row, and psycopg2
    passes each message to ``write`` unchanged, so every call after the first is exactly one
    CSV record (embedded newlines included). Each file repeats the header. An empty table
    still yields one header-only file, so the loader creates (and, in later write modes,
    empties) the target table from a run that staged no rows.
    """

    def __init__(
        self,
        *,
        batch_rows: int,
        path_for_batch: Callable[[int], Path],
        on_file: Callable[[WrittenFile], None],
        first_batch: int = 1,
        compresslevel: int = CSV_GZIP_LEVEL,
        max_bytes: int | None = None,
    ) -> None:
        self._batch_rows = batch_rows
        self._max_bytes = max_bytes
        self._path_for_batch = path_for_batch
        self._on_file = on_file
        self._next_batch = first_batch
        self._compresslevel = compresslevel
        self._header: bytes | None = None
        self._current: CsvGzipWriter | None = None
        self.rows = 0

    def write(self, data: bytes) -> int:
        if self._header is None:
            self._header = bytes(data)
            return len(data)
        if self._current is None:
            batch = self._next_batch
            self._next_batch += 1
            self._current = CsvGzipWriter(
                self._path_for_batch(batch), batch, self._header, compresslevel=self._compresslevel
            )
        self._current.write_record(data)
        self.rows += 1
        if self._current.rows >= self._batch_rows or (
            self._max_bytes is not None and self._current.compressed_bytes >= self._max_bytes
        ):
            self._finish_file()
        return len(data)

    def finish(self) -> None:
        """Flush the last partial file, after COPY has returned."""
        if self._current is None and self.rows == 0 and self._header is not None:
            self._current = CsvGzipWriter(
                self._path_for_batch(self._next_batch),
                self._next_batch,
                self._header,
                compresslevel=self._compresslevel,
            )
            self._next_batch += 1
        if self._current is not None:
            self._finish_file()

    def _finish_file(self) -> None:
        assert self._current is not None
        written = self._current.close()
        self._current = None
        self._on_file(written)


# --- Parquet ---------------------------------------------------------------------------------------


def arrow_type(column: Column) -> pa.DataType:
    """The Parquet (Arrow) type of a column under the staged encoding."""
    base = column.base_type
    match column.kind:
        case ValueKind.INTEGER:
            return {"smallint": pa.int16(), "integer": pa.int32()}.get(base, pa.int64())
        case ValueKind.DECIMAL:
            assert column.precision is not None and column.scale is not None
            return pa.decimal128(column.precision, column.scale)
        case ValueKind.FLOAT:
            # `real` too: psycopg2 parses PostgreSQL's shortest text ('1.1') into a double, which is
            # what CSV stages and what Snowflake's FLOAT holds; float32 would widen to 1.100000023841858.
            return pa.float64()
        case ValueKind.BOOLEAN:
            return pa.bool_()
        case ValueKind.DATE:
            return pa.date32()
        case ValueKind.TIME:
            return pa.time64("us")
        case ValueKind.TIMESTAMP:
            return pa.timestamp("us")
        case ValueKind.TIMESTAMPTZ:
            return pa.timestamp("us", tz="UTC")
        case ValueKind.BINARY:
            return pa.binary()
        case _:
            return pa.string()  # text and JSON text


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, arrow_type(c), nullable=c.nullable) for c in columns])


def _to_binary(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _to_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _check_decimal(value: Decimal | None) -> Decimal | None:
    # Arrow refuses to rescale with loss; NaN would need a null we must not invent.
    if value is not None and not value.is_finite():
        raise ValueError(f"non-finite numeric {value}")
    return value


_CONVERTERS: dict[ValueKind, Callable[[Any], Any]] = {
    ValueKind.BINARY: _to_binary,
    ValueKind.TIMESTAMPTZ: _to_utc,
    ValueKind.DECIMAL: _check_decimal,
}


class ParquetWriter:
    """Write one Parquet file; each ``write_rows`` call becomes one row group."""

    def __init__(self, path: Path, batch: int, columns: Sequence[Column]) -> None:
        self._path = path
        self._batch = batch
        self._columns = tuple(columns)
        self._schema = arrow_schema(columns)
        self._raw = path.open("wb")
        self._hashing = _HashingFile(self._raw)
        self._writer = pq.ParquetWriter(self._hashing, self._schema, compression=PARQUET_COMPRESSION)
        self.rows = 0

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        arrays = []
        for index, column in enumerate(self._columns):
            convert = _CONVERTERS.get(column.kind)
            values = [row[index] for row in rows]  # rows may carry trailing extras: ignored
            if convert is not None:
                values = [convert(v) for v in values]
            arrays.append(pa.array(values, type=self._schema.field(index).type))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self._schema))
        self.rows += len(rows)

    @property
    def compressed_bytes(self) -> int:
        """Bytes on disk so far: every finished row group (the footer comes at close)."""
        return self._hashing.size

    def close(self) -> WrittenFile:
        self._writer.close()
        self._raw.close()
        return WrittenFile(self._path, self._batch, self.rows, self._hashing.size, self._hashing.sha256)
