"""Staged file writers: CSV gzip and Parquet, each counting rows, bytes and SHA-256 as it writes.

The encoding is the contract in docs/architecture.md. Writers write to a local file
(spooled to disk, never the whole batch in RAM); the checksum is of the exact bytes on
disk, which are the bytes uploaded to S3.

gzip level, measured on 30 MB of CSV (300K rows): level 1 took 0.07 s -> 3.75 MB,
level 3 0.10 s -> 3.70 MB, level 6 0.20 s -> 3.29 MB. COPY itself took 0.28 s, so level 6
would add ~70% to the CPU time of a single-threaded Lambda for 12% fewer bytes on an
in-region upload; we use level 1.

The gzip stream is written by ISA-L (``isal.igzip``, a 0.3 MB wheel), the same gzip format
any reader decompresses: on 58 MB of the benchmark's CSV in 1 MB blocks, zlib level 1 took
0.43 s -> 20.6 MB, ISA-L level 1 0.10 s -> 19.2 MB. Compression was the largest share of
the CSV path (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, cast

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from isal import igzip

from pgsnow.manifest import Column
from pgsnow.typemap import ValueKind

CSV_GZIP_LEVEL = 1
# isal ships no annotations for GzipFile; this is its (gzip.GzipFile-compatible) signature.
_open_gzip = cast(Callable[..., BinaryIO], igzip.GzipFile)
PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class WrittenFile:
    """A finished local file: what the manifest and the S3 metadata need to know about it."""

    path: Path
    batch: int
    rows: int
    bytes: int
    sha256: str
    # CSV only: the file's first and last records' keys (``CsvBatchSplitter``'s ``record_key``;
    # by default the records themselves), for the key/cursor ranges.
    first_key: object = None
    last_key: object = None


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
        self._gzip = _open_gzip(
            filename="", mode="wb", fileobj=self._hashing, compresslevel=compresslevel, mtime=0
        )
        self._gzip.write(header)
        self.rows = 0
        self._first: object = None
        self._last: object = None

    @property
    def compressed_bytes(self) -> int:
        """Bytes on disk so far (gzip buffers a little, so this trails the input slightly)."""
        return self._hashing.size

    @property
    def path(self) -> Path:
        return self._path

    def flush_written(self) -> int:
        """Push the compressed bytes so far into the file, so that another reader sees them; how many.
        The compressor's own buffer stays (flushing it would change the file's bytes)."""
        self._raw.flush()
        return self._hashing.size

    def write_record(self, record: bytes | memoryview) -> None:
        self.write_block(record, 1, bytes(record), bytes(record))

    def write_block(
        self, records: bytes | bytearray | memoryview, rows: int, first_key: object, last_key: object
    ) -> None:
        """Compress ``rows`` whole records at once: one zlib call and one hash update per block, not per row.

        ``first_key``/``last_key``: the keys of the block's first and last records (see WrittenFile)."""
        self._gzip.write(records)
        if self.rows == 0:
            self._first = first_key
        self._last = last_key
        self.rows += rows

    def close(self) -> WrittenFile:
        self._gzip.close()
        self._raw.close()
        return WrittenFile(
            self._path,
            self._batch,
            self.rows,
            self._hashing.size,
            self._hashing.sha256,
            self._first,
            self._last,
        )


# Records are buffered and compressed in blocks of about this many bytes: one GzipFile.write
# per ~1 MB instead of per ~100-byte row took pgsnow CSV from 0.54x to ~0.9x of `COPY | gzip -1`
# (docs/performance.md); bigger blocks gained nothing measurable.
CSV_BLOCK_BYTES = 1 << 20


class CsvBatchSplitter:
    """A COPY sink that cuts the stream into files of at most ``batch_rows`` records and about ``max_bytes``.

    PostgreSQL sends the header first and then one CopyData message per row, and psycopg2
    passes each message to ``write`` unchanged, so every call after the first is exactly one
    CSV record (embedded newlines included). Records are counted as they arrive and buffered
    into blocks of ``block_bytes``; a block never crosses a file cut, so every file still
    ends on a record boundary with exactly ``batch_rows`` records (the last: the rest). The
    size roll is checked after each block. Each file repeats the header. An empty table
    still yields one header-only file, so the loader creates (and, in later write modes,
    empties) the target table from a run that staged no rows.

    Memory: a record of ``block_bytes`` or more is compressed as it arrives, never copied into
    the block buffer, and no record is kept once written: ``record_key(header, record)`` reads
    what the caller needs of each block's first and last record (by default the record itself).
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
        block_bytes: int = CSV_BLOCK_BYTES,
        record_key: Callable[[bytes, bytes], object] | None = None,
    ) -> None:
        self._batch_rows = batch_rows
        self._record_key = record_key
        self._max_bytes = max_bytes
        self._block_bytes = block_bytes
        self._path_for_batch = path_for_batch
        self._on_file = on_file
        self._next_batch = first_batch
        self._compresslevel = compresslevel
        self._header: bytes | None = None
        self._current: CsvGzipWriter | None = None
        self._buffer = bytearray()
        self._buffered_rows = 0
        self._block_first: bytes = b""
        self._block_last: bytes = b""
        # Records the current file may still take before it is cut at batch_rows.
        self._room = batch_rows
        self._flushed_rows = 0

    @property
    def rows(self) -> int:
        """Records received so far (staged or still buffered)."""
        return self._flushed_rows + self._buffered_rows

    @property
    def header(self) -> bytes | None:
        """The COPY header row, once it has arrived."""
        return self._header

    def write(self, data: bytes) -> int:
        # Called once per row: keep it to a few operations (the per-row cost bounds CSV speed).
        if self._header is None:
            self._header = bytes(data)
            return len(data)
        if len(data) >= self._block_bytes:
            # A large record is its own block, compressed from the caller's bytes (no copy).
            self._flush_block()
            self._block_first = self._block_last = data
            self._buffered_rows = 1
            self._flush_block(data)
            self._after_block()
            return len(data)
        if not self._buffered_rows:
            self._block_first = data
        self._buffer += data
        self._buffered_rows += 1
        self._block_last = data
        if self._buffered_rows >= self._room:
            self._flush_block()
            self._finish_file()
        elif len(self._buffer) >= self._block_bytes:
            self._flush_block()
            self._after_block()
        return len(data)

    def _after_block(self) -> None:
        """Cut the file when it is full (batch_rows) or big enough (max_bytes)."""
        current = self._current
        if current is None:
            return
        if self._room <= 0 or (self._max_bytes is not None and current.compressed_bytes >= self._max_bytes):
            self._finish_file()

    def finish(self) -> None:
        """Flush the last partial file, after COPY has returned."""
        self._flush_block()
        if self._current is None and self.rows == 0 and self._header is not None:
            self._current = self._open_file()
        if self._current is not None:
            self._finish_file()

    def _open_file(self) -> CsvGzipWriter:
        assert self._header is not None
        batch = self._next_batch
        self._next_batch += 1
        return CsvGzipWriter(
            self._path_for_batch(batch), batch, self._header, compresslevel=self._compresslevel
        )

    def _key(self, record: bytes) -> object:
        assert self._header is not None
        return record if self._record_key is None else self._record_key(self._header, record)

    def _flush_block(self, records: bytes | None = None) -> None:
        """Write the buffered block (or ``records``, one record passed through) to the current file."""
        if not self._buffered_rows:
            return
        if self._current is None:
            self._current = self._open_file()
        first_key = self._key(self._block_first) if self._current.rows == 0 else None
        last_key = self._key(self._block_last)
        self._current.write_block(
            self._buffer if records is None else records, self._buffered_rows, first_key, last_key
        )
        self._flushed_rows += self._buffered_rows
        self._room -= self._buffered_rows
        self._buffer = bytearray()
        self._buffered_rows = 0
        self._block_first = self._block_last = b""  # keep no record once it is written

    def _finish_file(self) -> None:
        assert self._current is not None
        written = self._current.close()
        self._current = None
        self._room = self._batch_rows
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


# The C buffer in front of CopyPipe.write: small, so the pipe still grows its block as before.
SINK_BUFFER_BYTES = 64 * 1024


class CopyPipe:
    """COPY output written on one thread, read as a byte stream on another (Arrow's CSV reader).

    The writer side is a COPY sink that buffers whole records into blocks of about
    ``block_bytes`` and queues at most ``max_blocks * block_bytes`` of them (or one block of any
    size when the queue is empty), so memory stays bounded when the reader is slower than
    PostgreSQL. Every block ends at a record boundary and ``read`` hands out whole blocks, even
    one larger than asked for (a record bigger than ``block_bytes``): Arrow's streaming CSV reader
    refuses a record that spans more than two of its reads, and accepts a read larger than its
    block size. ``close`` ends the stream (or marks it failed: the reader then raises instead of
    seeing a clean end); ``abandon`` lets the reader stop early: the writer's next ``write``
    raises ``PipeAbandonedError``, which aborts the COPY.
    """

    def __init__(self, *, block_bytes: int = CSV_BLOCK_BYTES, max_blocks: int = 4) -> None:
        self._block_bytes = block_bytes
        self._max_queued_bytes = block_bytes * max_blocks
        self._buffer = bytearray()
        self._blocks: deque[bytes] = deque()
        self._queued_bytes = 0
        self._changed = threading.Condition()
        self._ended = False
        self._failed = False
        self.abandoned = False
        self.bytes_written = 0
        self.closed = False  # the file-object protocol Arrow checks (the reader side is never closed)

    # --- writer side (the COPY thread) ---

    def record_sink(self) -> io.BufferedWriter:
        """A COPY sink for this pipe that takes each record in C and hands it on in blocks.

        psycopg2 calls ``write`` once per record while holding the GIL; through
        ``io.BufferedWriter`` that call never enters Python, and ``write`` below runs once
        per block. BufferedWriter passes on whole records only (what it holds is flushed before
        a record that does not fit, and a record larger than its buffer goes on directly).
        Call ``flush`` after the COPY returns, then ``close``.
        """
        return io.BufferedWriter(_PipeBlockSink(self), buffer_size=SINK_BUFFER_BYTES)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Take whole records (one or more)."""
        if self._ended:
            raise PipeAbandonedError("the stream has ended")
        size = len(data)
        if size >= self._block_bytes:
            # A large record is its own block: copied once (the caller's buffer is reused), never
            # accumulated into the buffer first.
            if self._buffer:
                self._push(bytes(self._buffer))
                self._buffer = bytearray()
            self._push(bytes(data))
            return size
        self._buffer += data
        if len(self._buffer) >= self._block_bytes:
            self._push(bytes(self._buffer))
            self._buffer = bytearray()
        return size

    def _push(self, block: bytes) -> None:
        with self._changed:
            while (
                self._blocks
                and self._queued_bytes + len(block) > self._max_queued_bytes
                and not self.abandoned
            ):
                self._changed.wait()
            if self.abandoned:
                raise PipeAbandonedError("the reader stopped")
            self._blocks.append(block)
            self._queued_bytes += len(block)
            self.bytes_written += len(block)
            self._changed.notify_all()

    def close(self, *, failed: bool = False) -> None:
        """End the stream after the last record (or, ``failed``, after an error)."""
        if not failed and self._buffer:
            self._push(bytes(self._buffer))
            self._buffer = bytearray()
        with self._changed:
            self._ended = True
            self._failed = failed
            self._changed.notify_all()

    # --- reader side ---

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """The next whole block (``size`` is not a limit: see the class docstring); b"" at the end."""
        with self._changed:
            while not self._blocks and not self._ended and not self.abandoned:
                self._changed.wait()
            if self._failed:
                raise PipeAbandonedError("the COPY feeding this stream failed")
            if not self._blocks:
                return b""
            block = self._blocks.popleft()
            self._queued_bytes -= len(block)
            self._changed.notify_all()
            return block

    def abandon(self) -> None:
        """The reader stops: release the writer (its next write raises) and drop what is queued."""
        with self._changed:
            self.abandoned = True
            self._blocks.clear()
            self._queued_bytes = 0
            self._changed.notify_all()


class PipeAbandonedError(Exception):
    """The other end of a ``CopyPipe`` stopped (reader abandoned it, or the COPY failed)."""


class _PipeBlockSink(io.RawIOBase):
    """The raw stream under ``CopyPipe.record_sink``: receives the BufferedWriter's blocks."""

    def __init__(self, pipe: CopyPipe) -> None:
        super().__init__()
        self._pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._pipe.write(data)


# Arrow's CSV parser reads bytea as the hex text PostgreSQL sent; the writer decodes it.
def _arrow_csv_type(column: Column) -> pa.DataType:
    return pa.string() if column.kind is ValueKind.BINARY else arrow_type(column)


def open_arrow_csv(
    source: Any, columns: Sequence[Column], trailing_text: int = 0, *, block_bytes: int = CSV_BLOCK_BYTES
) -> pa_csv.CSVStreamingReader | None:
    """Parse header-less COPY CSV (``TableReader.copy_arrow_csv``) into typed record batches.

    ``columns`` as staged, then ``trailing_text`` extra text columns (the order key, for file
    ranges). NULL is the unquoted empty field only and a quoted ``""`` is the empty string,
    as PostgreSQL writes them; every other text (``NaN``, ``null``...) is a value. None when
    the stream is empty (Arrow refuses a CSV without a single line).
    """
    names = [f"c{i}" for i in range(len(columns) + trailing_text)]
    types = {name: _arrow_csv_type(c) for name, c in zip(names, columns, strict=False)}
    types.update({name: pa.string() for name in names[len(columns) :]})
    try:
        return pa_csv.open_csv(
            source,
            # One parsing thread: with PostgreSQL and the COPY thread on a 2-core Lambda, more
            # threads only read ahead (40 MB more peak RSS at 2M rows, no faster).
            read_options=pa_csv.ReadOptions(column_names=names, block_size=block_bytes, use_threads=False),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types=types,
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                true_values=["t"],
                false_values=["f"],
            ),
        )
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            return None
        raise


def _hex_to_binary(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return pa.array([None if v is None else bytes.fromhex(v) for v in values.to_pylist()], pa.binary())


# Kinds whose values have no fixed size (a single value can be hundreds of MB).
_UNBOUNDED_KINDS = frozenset({ValueKind.TEXT, ValueKind.JSON, ValueKind.BINARY})


class ParquetWriter:
    """Write one Parquet file; each ``write_rows`` call becomes one row group."""

    def __init__(self, path: Path, batch: int, columns: Sequence[Column]) -> None:
        self._path = path
        self._batch = batch
        self._columns = tuple(columns)
        self._schema = arrow_schema(columns)
        # A native Arrow file: pyarrow writes every page without taking the GIL or calling
        # Python (through a Python file object, the writes and their hashing were ~7% of the
        # Parquet path's main thread). The file is hashed once, read back, when it is closed.
        self._raw = pa.OSFile(str(path), "wb")
        self._writer = pq.ParquetWriter(
            self._raw,
            self._schema,
            compression=PARQUET_COMPRESSION,
            # No min/max statistics for text and binary: nothing reads them from a staging file, and
            # for a large value they cost several copies of it (two 100 MB values: ~450 MB of peak
            # RSS, docs/performance.md).
            write_statistics=[c.name for c in self._columns if c.kind not in _UNBOUNDED_KINDS],
        )
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

    def write_arrow(self, table: pa.Table) -> None:
        """Write one row group from ``open_arrow_csv`` columns (extra trailing columns are ignored)."""
        if table.num_rows == 0:
            return
        arrays = []
        for index, column in enumerate(self._columns):
            values = table.column(index)
            if column.kind is ValueKind.BINARY:
                values = _hex_to_binary(values)
            arrays.append(values)
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self._schema))
        self.rows += table.num_rows

    @property
    def compressed_bytes(self) -> int:
        """Bytes on disk so far: every finished row group (the footer comes at close)."""
        return int(self._raw.tell())

    def close(self) -> WrittenFile:
        self._writer.close()
        size = int(self._raw.tell())
        self._raw.close()
        return WrittenFile(self._path, self._batch, self.rows, size, file_sha256(self._path))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read back (hashlib hashes large reads without holding the GIL)."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
