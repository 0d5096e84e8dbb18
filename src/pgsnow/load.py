"""Load staged files into Snowflake: one COPY per file, recorded in the load ledger.

For each file: HEAD the object (its pgsnow metadata and ETag), find the columns (the
run's manifest, or the existing table for a hand-dropped file), create the schema and
table when the manifest says what they are, then in ONE transaction claim the key in
the ledger, COPY the file, check Snowflake's result against the file's row count,
record the rows and commit. Any failure rolls the whole transaction back, so a file is
either loaded and recorded, or neither; a failure never comes back as a result.

This module must not import pyarrow (the loader artifact does not ship it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from snowflake.connector.errors import Error as SnowflakeDriverError

from pgsnow.config import Settings
from pgsnow.errors import ConfigError, PermanentError, PgSnowError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import StagedObject, manifest_key
from pgsnow.manifest import META_ROWS, META_RUN_ID, META_SHA256, RunManifest
from pgsnow.observability import logger
from pgsnow.snowflake import (
    LedgerClaim,
    LoadColumn,
    build_claim_file,
    build_copy_into,
    build_create_ledger,
    build_create_schema,
    build_create_table,
    build_query_tag,
    build_record_load,
    build_select_ledger_entry,
    build_select_table_columns,
    classify_snowflake_error,
    load_columns_from_table,
)
from pgsnow.staging import ManifestNotFoundError, classify_s3_error, get_manifest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from snowflake.connector import SnowflakeConnection

_MISSING_S3_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class LoadStatus(StrEnum):
    LOADED = "loaded"
    ALREADY_LOADED = "already_loaded"


@dataclass(frozen=True)
class LoadResult:
    key: str
    table: str  # the source table, schema.table
    status: LoadStatus
    rows: int
    duration_ms: int
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "table": self.table,
            "status": self.status.value,
            "rows": self.rows,
            "duration_ms": self.duration_ms,
            "run_id": self.run_id,
        }


@dataclass(frozen=True)
class ObjectFacts:
    """What HEAD says about a staged object."""

    etag: str
    size: int
    run_id: str | None
    rows: int | None
    sha256: str | None


@dataclass(frozen=True)
class LedgerEntry:
    etag: str | None
    sha256: str | None
    rows_loaded: int | None
    is_loaded: bool


@dataclass
class _Loader:
    """One call's clients and what it has already done, so files from one run do it once."""

    settings: Settings
    database: str
    sf_conn: SnowflakeConnection
    s3: S3Client
    ledger_ready: bool = False
    manifests: dict[tuple[TableRef, str], RunManifest] = field(default_factory=dict)
    tables_ready: set[tuple[TableRef, str]] = field(default_factory=set)

    @property
    def control_schema(self) -> str:
        return self.settings.snowflake.control_schema


def load_staged_files(
    *, settings: Settings, sf_conn: SnowflakeConnection, s3: S3Client, objects: Sequence[StagedObject]
) -> list[LoadResult]:
    """Load each staged object in order; the first failure raises (earlier files stay loaded)."""
    if not settings.snowflake.database:
        raise ConfigError(["SNOWFLAKE_DATABASE is required to load"])
    loader = _Loader(settings, settings.snowflake.database, sf_conn, s3)
    return [_load_one(loader, staged) for staged in objects]


def _load_one(loader: _Loader, staged: StagedObject) -> LoadResult:
    started = time.monotonic()
    context = {"table": staged.table.qualified, "s3_key": staged.key, "run_id": staged.run_id}
    try:
        if not loader.ledger_ready:
            ensure_ledger(loader.sf_conn, loader.database, loader.control_schema)
            loader.ledger_ready = True
        facts = head_staged_object(loader.s3, loader.settings.bucket, staged)
        if facts is None:
            return _result_for_missing_object(loader, staged, started)
        columns = _columns_for(loader, staged)
        _execute(loader.sf_conn, build_query_tag(run_id=staged.run_id, table=staged.table, s3_key=staged.key))
        status, rows = _load_in_transaction(loader, staged, facts, columns)
    except PgSnowError as exc:
        classify_snowflake_error(exc, **context)  # adds the file's context to our own error
        raise
    except (SnowflakeDriverError, OSError) as exc:
        raise classify_snowflake_error(exc, **context) from exc
    result = LoadResult(staged.key, staged.table.qualified, status, rows, _elapsed_ms(started), staged.run_id)
    logger.info(
        f"file {status.value}",
        extra={**context, "rows": rows, "bytes": facts.size, "duration_ms": result.duration_ms},
    )
    return result


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def ensure_ledger(sf_conn: SnowflakeConnection, database: str, control_schema: str) -> None:
    _execute(sf_conn, build_create_schema(database, control_schema))
    _execute(sf_conn, build_create_ledger(database, control_schema))


# --------------------------------------------------------------------------- S3


def head_staged_object(s3: S3Client, bucket: str, staged: StagedObject) -> ObjectFacts | None:
    """The object's ETag, size and pgsnow metadata; None when the object does not exist."""
    try:
        response = s3.head_object(Bucket=bucket, Key=staged.key)
    except ClientError as exc:
        if _s3_code(exc) in _MISSING_S3_CODES:
            return None
        raise classify_s3_error(exc, s3_key=staged.key) from exc
    except BotoCoreError as exc:
        raise classify_s3_error(exc, s3_key=staged.key) from exc
    metadata = {k.lower(): v for k, v in response.get("Metadata", {}).items()}
    rows_text = metadata.get(META_ROWS)
    rows: int | None = None
    if rows_text is not None:
        if not rows_text.strip().isdigit():
            raise PermanentError(
                f"object metadata {META_ROWS}={rows_text!r} is not a row count", s3_key=staged.key
            )
        rows = int(rows_text)
    meta_run_id = metadata.get(META_RUN_ID)
    if staged.run_id and meta_run_id and meta_run_id != staged.run_id:
        raise PermanentError(
            f"object metadata {META_RUN_ID}={meta_run_id!r} does not match the key's run id",
            s3_key=staged.key,
            run_id=staged.run_id,
        )
    return ObjectFacts(
        etag=str(response.get("ETag", "")).strip('"'),
        size=int(response.get("ContentLength", 0)),
        run_id=meta_run_id or staged.run_id,
        rows=rows,
        sha256=metadata.get(META_SHA256),
    )


def read_run_manifest(s3: S3Client, bucket: str, table: TableRef, run_id: str) -> RunManifest:
    """The run's manifest. Missing means the extractor has not written it yet: retry later."""
    try:
        manifest = get_manifest(s3, bucket, table, run_id)
    except ManifestNotFoundError as exc:
        raise RetryableError(
            "the run's manifest is not in the bucket (yet)",
            table=table.qualified,
            s3_key=exc.s3_key,
            run_id=run_id,
        ) from exc
    if manifest.table != table or manifest.run_id != run_id:
        raise PermanentError(
            f"manifest is for {manifest.table.qualified} run {manifest.run_id}",
            s3_key=manifest_key(table, run_id),
            run_id=run_id,
        )
    return manifest


def _s3_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# --------------------------------------------------------------------------- Snowflake


def _execute(
    sf_conn: SnowflakeConnection, sql: str, params: Sequence[Any] | None = None
) -> list[tuple[Any, ...]]:
    with sf_conn.cursor() as cursor:
        cursor.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()]


def _execute_dicts(sf_conn: SnowflakeConnection, sql: str) -> list[dict[str, Any]]:
    """Rows as dicts keyed by lower-case column name (COPY's result columns)."""
    with sf_conn.cursor() as cursor:
        cursor.execute(sql)
        names = [d[0].lower() for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _columns_for(loader: _Loader, staged: StagedObject) -> list[LoadColumn]:
    """Target columns: from the run's manifest (creating the table), or from the existing table."""
    database, table = loader.database, staged.table
    if staged.run_id is None:
        rows = _execute(
            loader.sf_conn,
            *build_select_table_columns(database, table.snowflake_schema, table.snowflake_table),
        )
        if not rows:
            raise PermanentError(
                "a file without a pgsnow run id can only load into an existing table, and "
                f"{database}.{table.snowflake_schema}.{table.snowflake_table} does not exist",
                table=table.qualified,
                s3_key=staged.key,
            )
        return load_columns_from_table([(str(name), str(data_type)) for name, data_type in rows])

    cache_key = (table, staged.run_id)
    manifest = loader.manifests.get(cache_key)
    if manifest is None:
        manifest = read_run_manifest(loader.s3, loader.settings.bucket, table, staged.run_id)
        loader.manifests[cache_key] = manifest
    if cache_key not in loader.tables_ready:
        _execute(loader.sf_conn, build_create_schema(database, table.snowflake_schema))
        _execute(loader.sf_conn, build_create_table(database, manifest.columns, table))
        loader.tables_ready.add(cache_key)
    return [LoadColumn.from_manifest(c) for c in manifest.columns]


def _result_for_missing_object(loader: _Loader, staged: StagedObject, started: float) -> LoadResult:
    """A redelivered event for a file already loaded and cleaned up is fine; anything else is not."""
    entry = _ledger_entry(loader.sf_conn, loader.database, loader.control_schema, staged.key)
    if entry is not None and entry.is_loaded:
        return LoadResult(
            staged.key,
            staged.table.qualified,
            LoadStatus.ALREADY_LOADED,
            entry.rows_loaded or 0,
            _elapsed_ms(started),
            staged.run_id,
        )
    raise PermanentError("the staged object no longer exists and was never loaded", s3_key=staged.key)


def _ledger_entry(
    sf_conn: SnowflakeConnection, database: str, control_schema: str, key: str
) -> LedgerEntry | None:
    rows = _execute(sf_conn, *build_select_ledger_entry(database, control_schema, key))
    if not rows:
        return None
    etag, sha256, rows_loaded, is_loaded = rows[0]
    return LedgerEntry(etag, sha256, None if rows_loaded is None else int(rows_loaded), bool(is_loaded))


def _same_content(entry: LedgerEntry, facts: ObjectFacts) -> bool:
    if entry.sha256 and facts.sha256:
        return entry.sha256 == facts.sha256
    return entry.etag == facts.etag


def _load_in_transaction(
    loader: _Loader, staged: StagedObject, facts: ObjectFacts, columns: Sequence[LoadColumn]
) -> tuple[LoadStatus, int]:
    sf_conn, database, control_schema = loader.sf_conn, loader.database, loader.control_schema
    claim = LedgerClaim(
        s3_key=staged.key,
        etag=facts.etag,
        sha256=facts.sha256,
        run_id=facts.run_id,
        schema_name=staged.table.schema,
        table_name=staged.table.table,
    )
    copy_sql = build_copy_into(
        database=database,
        control_schema=control_schema,
        stage=loader.settings.snowflake.stage,
        staged=staged,
        columns=columns,
    )
    sf_conn.autocommit(False)
    try:
        _execute(sf_conn, *build_claim_file(database, control_schema, claim))
        entry = _ledger_entry(sf_conn, database, control_schema, staged.key)
        if entry is not None and entry.is_loaded:
            sf_conn.rollback()
            if _same_content(entry, facts):
                return LoadStatus.ALREADY_LOADED, entry.rows_loaded or 0
            raise PermanentError(
                "changed file under a loaded key: the key was loaded with other content "
                f"(etag {entry.etag}, sha256 {entry.sha256}); stage changed data under a new key",
                s3_key=staged.key,
            )
        rows_loaded = check_copy_result(_execute_dicts(sf_conn, copy_sql), staged, facts)
        _execute(sf_conn, *build_record_load(database, control_schema, staged.key, rows_loaded))
        sf_conn.commit()
        return LoadStatus.LOADED, rows_loaded
    except BaseException:
        _rollback_keeping_the_original_error(sf_conn)
        raise
    finally:
        sf_conn.autocommit(True)


def _rollback_keeping_the_original_error(sf_conn: SnowflakeConnection) -> None:
    # A rollback that fails (e.g. the connection dropped) must not hide why we rolled back;
    # Snowflake aborts an open transaction when its session ends anyway.
    try:
        sf_conn.rollback()
    except SnowflakeDriverError as exc:
        logger.warning("rollback failed", extra={"error": str(exc)})


def check_copy_result(result: Sequence[dict[str, Any]], staged: StagedObject, facts: ObjectFacts) -> int:
    """The rows loaded, after checking Snowflake's COPY result for exactly our file, fully loaded."""
    context = {"s3_key": staged.key, "table": staged.table.qualified, "run_id": staged.run_id}
    if len(result) != 1 or "rows_loaded" not in result[0]:
        summary = "; ".join(str(row.get("status", row)) for row in result) or "no result rows"
        raise PermanentError(f"COPY did not load exactly this one file: {summary}", **context)
    row = result[0]
    file_name = str(row.get("file", ""))
    if file_name and not file_name.endswith(staged.file_name):
        raise PermanentError(f"COPY reported file {file_name!r}, not this key", **context)
    status = str(row.get("status", "")).upper()
    rows_loaded = int(row["rows_loaded"] or 0)
    rows_parsed = int(row.get("rows_parsed") or 0)
    if status != "LOADED":
        raise PermanentError(
            f"COPY status {status}: {row.get('first_error') or 'no error message'}", **context
        )
    if rows_parsed != rows_loaded:
        raise PermanentError(f"COPY parsed {rows_parsed} rows but loaded {rows_loaded}", **context)
    if facts.rows is not None and rows_loaded != facts.rows:
        raise PermanentError(
            f"COPY loaded {rows_loaded} rows, the file's {META_ROWS} says {facts.rows}", **context
        )
    return rows_loaded
