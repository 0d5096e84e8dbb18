"""Full extraction of one table: PostgreSQL -> staged files in S3 + the run manifest.

Order of work (docs/architecture.md): allowlist check before any SQL; describe the table;
check every value fits its Snowflake type; manifest ``extracting`` (schema, no files);
one data file per ``batch_rows`` rows; manifest ``staged`` with every file. All reads
happen in one read-only REPEATABLE READ transaction (one snapshot), ended at the end of
the run so a warm Lambda's next run sees fresh data.

S3_FILE_FORMAT=auto: CSV up to AUTO_PARQUET_ABOVE_ROWS estimated rows (pg_class.reltuples),
Parquet above; a never-analysed table (no estimate) gets CSV, which works at any size.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from pgsnow.config import Settings, StagedFormat
from pgsnow.errors import PgSnowError
from pgsnow.formats import CsvBatchSplitter, ParquetWriter, WrittenFile
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, new_run_id
from pgsnow.manifest import RunManifest, RunState, StagedFile
from pgsnow.observability import logger
from pgsnow.postgres import (
    Connection,
    TableReader,
    TableSchema,
    check_values_fit,
    classify_pg_error,
    describe_table,
)
from pgsnow.staging import put_data_file, put_manifest

AUTO_PARQUET_ABOVE_ROWS = 100_000
FULL_MODE = "full"
# Rows per Parquet row group (and per fetch from the server-side cursor): bounds memory.
PARQUET_CHUNK_ROWS = 50_000


def choose_file_format(configured: StagedFormat, estimated_rows: int | None) -> FileFormat:
    """Resolve S3_FILE_FORMAT, including ``auto``, to the format of this run's files."""
    if configured is StagedFormat.PARQUET:
        return FileFormat.PARQUET
    if configured is StagedFormat.CSV:
        return FileFormat.CSV
    if estimated_rows is not None and estimated_rows > AUTO_PARQUET_ABOVE_ROWS:
        return FileFormat.PARQUET
    return FileFormat.CSV


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Uploader:
    """Uploads each finished local file, deletes it, and records it for the manifest."""

    settings: Settings
    s3: Any
    table: TableRef
    run_id: str
    file_format: FileFormat
    files: list[StagedFile]

    def __call__(self, written: WrittenFile) -> None:
        key = data_key(self.settings.prefix, self.table, written.batch, self.run_id, self.file_format)
        started = time.monotonic()
        put_data_file(
            self.s3,
            self.settings.bucket,
            key,
            written.path,
            run_id=self.run_id,
            batch=written.batch,
            rows=written.rows,
            sha256=written.sha256,
        )
        written.path.unlink(missing_ok=True)
        self.files.append(
            StagedFile(key, written.batch, written.rows, written.bytes, written.sha256, self.file_format)
        )
        logger.info(
            "staged data file",
            extra={
                "run_id": self.run_id,
                "table": self.table.qualified,
                "s3_key": key,
                "rows": written.rows,
                "bytes": written.bytes,
                "duration_ms": round((time.monotonic() - started) * 1000),
            },
        )


def _stage_csv(
    reader: TableReader, batch_rows: int, work_dir: Path, on_file: Callable[[WrittenFile], None]
) -> None:
    splitter = CsvBatchSplitter(
        batch_rows=batch_rows,
        path_for_batch=lambda batch: work_dir / f"batch{batch}.csv.gz",
        on_file=on_file,
    )
    reader.copy_csv(splitter)
    splitter.finish()


def _stage_parquet(
    reader: TableReader, batch_rows: int, work_dir: Path, on_file: Callable[[WrittenFile], None]
) -> None:
    chunk_rows = min(batch_rows, PARQUET_CHUNK_ROWS)
    writer: ParquetWriter | None = None
    batch = 0
    for chunk in reader.iter_rows(chunk_rows):
        position = 0
        while position < len(chunk):
            if writer is None:
                batch += 1
                writer = ParquetWriter(work_dir / f"batch{batch}.parquet", batch, reader.schema.columns)
            take = min(batch_rows - writer.rows, len(chunk) - position)
            writer.write_rows(chunk[position : position + take])
            position += take
            if writer.rows >= batch_rows:
                on_file(writer.close())
                writer = None
    if writer is None and batch == 0:
        # An empty table still stages one (row-less) file: the loader creates the target from it.
        writer = ParquetWriter(work_dir / "batch1.parquet", 1, reader.schema.columns)
    if writer is not None:
        on_file(writer.close())


def extract_table(
    *,
    settings: Settings,
    pg_conn: Connection,
    s3: Any,
    table: TableRef,
    file_format: FileFormat | None = None,
    run_id: str | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RunManifest:
    """Stage every row of ``table`` and return the ``staged`` manifest.

    ``file_format`` None means settings.file_format (``auto`` resolved from the row estimate).
    Raises UnsafeIdentifierError (before any SQL) for a table outside the allowlist,
    PermanentError for data Snowflake cannot hold, RetryableError for transient failures.
    """
    settings.tables.check(table)
    started_at = now()
    run_id = run_id or new_run_id(started_at)
    started = time.monotonic()
    log_context = {"run_id": run_id, "table": table.qualified}
    manifest: RunManifest | None = None
    files: list[StagedFile] = []
    try:
        schema: TableSchema = describe_table(pg_conn, table)
        check_values_fit(pg_conn, schema)
        chosen = file_format or choose_file_format(settings.file_format, schema.estimated_rows)
        manifest = RunManifest(
            run_id=run_id,
            table=table,
            mode=FULL_MODE,
            file_format=chosen,
            columns=schema.columns,
            primary_key=schema.primary_key,
            state=RunState.EXTRACTING,
            started_at=_iso(started_at),
        )
        put_manifest(s3, settings.bucket, manifest)
        logger.info("extracting", extra={**log_context, "file_format": chosen.value})

        uploader = _Uploader(settings, s3, table, run_id, chosen, files)
        reader = TableReader(pg_conn, schema)
        with tempfile.TemporaryDirectory(prefix="pgsnow-") as work_dir:
            stage = _stage_csv if chosen is FileFormat.CSV else _stage_parquet
            stage(reader, settings.batch_rows, Path(work_dir), uploader)

        staged = manifest.with_state(RunState.STAGED, files=tuple(files), finished_at=_iso(now()))
        put_manifest(s3, settings.bucket, staged)
    except psycopg2.Error as exc:
        error = classify_pg_error(exc, table=table.qualified, run_id=run_id)
        _record_failure(s3, bucket=settings.bucket, manifest=manifest, files=files, now=now, error=error)
        raise error from exc
    except PgSnowError as exc:
        exc.table = exc.table or table.qualified
        exc.run_id = exc.run_id or run_id
        _record_failure(s3, bucket=settings.bucket, manifest=manifest, files=files, now=now, error=exc)
        raise
    except Exception as exc:
        # Anything else (disk full, an Arrow conversion) still must not leave the run
        # looking like it is in progress; the error itself propagates unchanged.
        _record_failure(s3, bucket=settings.bucket, manifest=manifest, files=files, now=now, error=exc)
        raise
    finally:
        _end_snapshot(pg_conn)

    total_bytes = sum(f.bytes for f in staged.files)
    duration_ms = round((time.monotonic() - started) * 1000)
    logger.info(
        "staged table",
        extra={
            **log_context,
            "rows": staged.total_rows,
            "bytes": total_bytes,
            "files": len(staged.files),
            "duration_ms": duration_ms,
        },
    )
    return staged


def _end_snapshot(pg_conn: Connection) -> None:
    """Close the read-only transaction; a broken connection is the caller's to replace."""
    if pg_conn.closed:
        return
    try:
        pg_conn.rollback()
    except psycopg2.Error:
        logger.warning("could not end the PostgreSQL transaction; the connection will be replaced")
        pg_conn.close()


def _record_failure(
    s3: Any,
    *,
    bucket: str,
    manifest: RunManifest | None,
    files: list[StagedFile],
    now: Callable[[], datetime],
    error: BaseException,
) -> None:
    """Rewrite a started run's manifest as ``failed`` (with the files staged so far)."""
    if manifest is None:
        return  # nothing was written yet
    failed = manifest.with_state(RunState.FAILED, files=tuple(files), finished_at=_iso(now()))
    context = {"run_id": manifest.run_id, "table": manifest.table.qualified, "error": type(error).__name__}
    try:
        put_manifest(s3, bucket, failed)
    except PgSnowError as put_error:
        logger.warning("could not mark the run failed", extra={**context, "put_error": put_error.message})
        return
    # The error's message travels with the exception; the log names only its type
    # (database messages can quote row contents).
    logger.error("extraction failed; manifest marked failed", extra={**context, "files": len(files)})
