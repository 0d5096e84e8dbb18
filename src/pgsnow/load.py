"""Load staged files into Snowflake exactly once, recorded in the load ledger.

A batch's files are grouped by target table and run; each group (at most 1000 files) is
loaded with ONE ``COPY ... FILES = (...)`` in one transaction that also claims and records
every file in the ledger, so a file is either loaded and recorded, or neither. When a
group fails for a reason that belongs to one file (a bad value, a changed file), its files
are retried one by one, so only the bad file fails and the rest of the batch loads.

Write modes (the run manifest's ``write_mode``): ``append`` COPYs into the target;
``merge`` COPYs into a work table and MERGEs the newest row per primary key; ``replace``
COPYs into a shadow table and swaps it with the target once the run is complete
(manifest ``staged`` and every file of it in the ledger). Deletes (``hard``/``soft``)
are applied from the run's key list at the same point, unless a newer run of the table has
reached the target first: then the run is superseded (its stale key list would delete the
newer run's rows). See docs/loading.md.

This module must not import pyarrow (the loader artifact does not ship it).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from snowflake.connector.errors import Error as SnowflakeDriverError

from pgsnow.config import DeleteMode, LoadMethod, Settings, WriteMode
from pgsnow.csv_records import parse_csv_record
from pgsnow.errors import ConfigError, PermanentError, PgSnowError, RetryableError, aws_error_code
from pgsnow.identifiers import TableRef, snowflake_name
from pgsnow.keys import FileFormat, StagedObject, applied_mark_key, is_run_id, manifest_key
from pgsnow.ledger import Ledger, LedgerClaim, LedgerRow
from pgsnow.manifest import META_ROWS, META_RUN_ID, META_SHA256, Column, RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.schema_evolution import ExistingColumn, plan_table_changes
from pgsnow.setup_sql import pipe_name
from pgsnow.snowflake import (
    MAX_FILES_PER_COPY,
    AwsCredentials,
    CredentialsSource,
    LoadColumn,
    UrlSource,
    aws_credentials_from,
    build_add_column,
    build_add_run_id_column,
    build_add_soft_delete_column,
    build_apply_deletes,
    build_copy_into,
    build_create_schema,
    build_create_shadow_table,
    build_create_table,
    build_create_temporary_stage,
    build_create_work_table,
    build_drop_not_null,
    build_drop_table,
    build_insert_rows,
    build_merge_from,
    build_query_tag,
    build_rename_table,
    build_select_column_types,
    build_select_table_comment,
    build_set_table_comment,
    build_swap_with,
    build_table_pipe,
    build_widen_column,
    classify_snowflake_error,
    load_columns_from_table,
    replace_run_tag,
    stage_file_path,
)
from pgsnow.snowpipe import PipeFileReport, SnowpipeClient, qualified_pipe_name, snowpipe_client_from_settings
from pgsnow.staging import ManifestNotFoundError, classify_s3_error, get_manifest
from pgsnow.typemap import ValueKind

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from snowflake.connector import SnowflakeConnection

_MISSING_S3_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
PGSNOW_COLUMN_PREFIX = "_PGSNOW_"  # pgsnow's own target columns (run id, soft delete): never a source's


class LoadStatus(StrEnum):
    LOADED = "loaded"
    ALREADY_LOADED = "already_loaded"
    PARTIALLY_LOADED = "partially_loaded"  # ON_ERROR = CONTINUE rejected some rows


class RunOutcome(StrEnum):
    """What became of a complete run's swap (replace) or deletes, recorded in the ledger's mark."""

    APPLIED = "applied"
    # A newer run of the table reached the target first: applying this run's key list (or
    # swapping in its table) would remove rows the newer run wrote, so it is not applied.
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class LoadResult:
    key: str
    table: str  # the source table, schema.table
    status: LoadStatus
    rows: int
    duration_ms: int
    run_id: str | None = None
    errors_seen: int = 0  # rows rejected (ON_ERROR = CONTINUE)
    first_error: str | None = None
    run_outcome: RunOutcome | None = None  # set on the files of the group that completed their run

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "table": self.table,
            "status": self.status.value,
            "rows": self.rows,
            "duration_ms": self.duration_ms,
            "run_id": self.run_id,
            "errors_seen": self.errors_seen,
            "first_error": self.first_error,
            "run_outcome": None if self.run_outcome is None else self.run_outcome.value,
        }


@dataclass(frozen=True)
class FileOutcome:
    """One file's outcome in a batch: a result, or the error that kept it from loading."""

    staged: StagedObject
    result: LoadResult | None = None
    error: PgSnowError | None = None


@dataclass(frozen=True)
class ObjectFacts:
    """What HEAD says about a staged object."""

    etag: str
    size: int
    run_id: str | None
    rows: int | None
    sha256: str | None


@dataclass
class _Loader:
    """One call's clients and what it has already done, so files from one run do it once."""

    settings: Settings
    database: str
    sf_conn: SnowflakeConnection
    s3: S3Client
    # The credentials method (no storage integration): the loader's AWS session, whose
    # credentials Snowflake reads S3 with. None: the stage as created (the local emulator).
    credentials_source: CredentialsSource | None = None
    snowpipe: SnowpipeClient | None = None  # LOAD_METHOD=snowpipe; built from the secret when None
    aws_credentials: AwsCredentials | None = None  # read once per batch from credentials_source
    ledger_ready: bool = False
    manifests: dict[tuple[TableRef, str], RunManifest] = field(default_factory=dict)
    tables_ready: set[tuple[str, str, str]] = field(default_factory=set)
    pipes_ready: set[str] = field(default_factory=set)
    run_id_columns_ready: set[tuple[str, str, str]] = field(default_factory=set)
    # Tables with a column the run does not send (the source dropped it): a pipe's COPY lists the
    # table's columns by position, so their files load with COPY (ensure_table fills this).
    tables_with_unsent_columns: set[tuple[str, str, str]] = field(default_factory=set)

    @property
    def control_schema(self) -> str:
        return self.settings.snowflake.control_schema

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.sf_conn, self.database, self.control_schema)

    def stage_credentials(self) -> AwsCredentials | None:
        """The credentials Snowflake reads S3 with, when pgsnow sends them (no integration)."""
        if self.settings.snowflake.storage_integration or self.credentials_source is None:
            return None
        if self.aws_credentials is None:
            self.aws_credentials = aws_credentials_from(self.credentials_source)
        return self.aws_credentials

    def url_source(self) -> UrlSource:
        """How Snowflake reads an object outside the stage (the deletes key list)."""
        integration = self.settings.snowflake.storage_integration
        if integration:
            return UrlSource(self.settings.bucket, storage_integration=integration)
        return UrlSource(self.settings.bucket, credentials=self.stage_credentials())


# Per Snowflake session, the credentials its temporary stage was created with (a fingerprint).
# Weak keys: a closed and dropped connection takes its entry with it.
_temporary_stage_credentials: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def load_staged_files(
    *,
    settings: Settings,
    sf_conn: SnowflakeConnection,
    s3: S3Client,
    objects: Sequence[StagedObject],
    aws_credentials: CredentialsSource | None = None,
    snowpipe: SnowpipeClient | None = None,
) -> list[LoadResult]:
    """Load the objects (grouped per table and run); the first file that failed raises."""
    outcomes = load_batch(
        settings=settings,
        sf_conn=sf_conn,
        s3=s3,
        objects=objects,
        aws_credentials=aws_credentials,
        snowpipe=snowpipe,
    )
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return [o.result for o in outcomes if o.result is not None]


def load_batch(
    *,
    settings: Settings,
    sf_conn: SnowflakeConnection,
    s3: S3Client,
    objects: Sequence[StagedObject],
    aws_credentials: CredentialsSource | None = None,
    snowpipe: SnowpipeClient | None = None,
) -> list[FileOutcome]:
    """Load every object, one COPY per (table, run) group; one outcome per object, in order.

    ``aws_credentials`` is the loader's AWS session (anything with boto3.Session's
    ``get_credentials()``). Without SNOWFLAKE_STORAGE_INTEGRATION, Snowflake reads S3 with its
    current credentials: through a temporary stage of this session named like the permanent
    stage, and in the key list's COPY (docs/deploy.md, "credentials method"). With an
    integration it is not used. ``snowpipe`` is the Snowpipe REST client for
    ``LOAD_METHOD=snowpipe`` (built from the Snowflake secret when not given).
    """
    if not settings.snowflake.database:
        raise ConfigError(["SNOWFLAKE_DATABASE is required to load"])
    loader = _Loader(
        settings,
        settings.snowflake.database,
        sf_conn,
        s3,
        credentials_source=aws_credentials,
        snowpipe=snowpipe,
    )
    by_key: dict[str, FileOutcome] = {}
    for group in group_files(objects):
        for outcome in _load_group_or_each(loader, group):
            by_key[outcome.staged.key] = outcome
    return [by_key[o.key] for o in objects]


def group_files(objects: Sequence[StagedObject]) -> list[list[StagedObject]]:
    """Distinct objects grouped by (table, run, format), runs oldest first, at most 1000 per group."""
    groups: dict[tuple[str, str, str, str, bool], list[StagedObject]] = {}
    seen: set[str] = set()
    for staged in objects:
        if staged.key in seen:
            continue  # the same key twice in one batch loads once
        seen.add(staged.key)
        group_key = (
            staged.run_id or "",
            staged.table.schema,
            staged.table.table,
            staged.file_format.value,
            staged.gzip,
        )
        groups.setdefault(group_key, []).append(staged)
    ordered: list[list[StagedObject]] = []
    for group_key in sorted(groups):
        files = groups[group_key]
        ordered.extend(files[i : i + MAX_FILES_PER_COPY] for i in range(0, len(files), MAX_FILES_PER_COPY))
    return ordered


def _load_group_or_each(loader: _Loader, group: list[StagedObject]) -> list[FileOutcome]:
    try:
        return _load_group(loader, group)
    except PgSnowError as exc:
        if len(group) == 1 or exc.retryable:
            first = group[0]
            _log_failure(exc, first)
            return [FileOutcome(staged, error=_for_file(exc, staged, len(group))) for staged in group]
        logger.warning(
            "group load failed; loading its files one by one",
            extra={"table": group[0].table.qualified, "files": len(group), "error": exc.message},
        )
    return [outcome for staged in group for outcome in _load_group_or_each(loader, [staged])]


def _for_file(exc: PgSnowError, staged: StagedObject, group_size: int) -> PgSnowError:
    if group_size == 1:
        exc.s3_key = exc.s3_key or staged.key
        exc.table = exc.table or staged.table.qualified
        exc.run_id = exc.run_id or staged.run_id
    return exc


def _log_failure(exc: PgSnowError, staged: StagedObject) -> None:
    logger.error(f"load failed: {exc.message}", extra={**exc.context(), "s3_key": exc.s3_key or staged.key})


def _load_group(loader: _Loader, group: list[StagedObject]) -> list[FileOutcome]:
    started = time.monotonic()
    first = group[0]
    s3_key = first.key if len(group) == 1 else None
    try:
        if not loader.ledger_ready:
            _execute(loader.sf_conn, build_create_schema(loader.database, loader.control_schema))
            loader.ledger.create()
            loader.ledger_ready = True
        outcomes: dict[str, FileOutcome] = {}
        present: list[tuple[StagedObject, ObjectFacts]] = []
        for staged in group:
            facts = head_staged_object(loader.s3, loader.settings.bucket, staged)
            if facts is None:
                outcomes[staged.key] = _outcome_for_missing_object(loader, staged, started)
            elif mismatch := _manifest_mismatch(loader, staged, facts):
                outcomes[staged.key] = FileOutcome(staged, error=mismatch)
            else:
                present.append((staged, facts))
        if present:
            for outcome in _copy_group(loader, present, started):
                outcomes[outcome.staged.key] = outcome
    except PgSnowError as exc:
        # adds the group's context to our own error
        classify_snowflake_error(exc, table=first.table.qualified, s3_key=s3_key, run_id=first.run_id)
        raise
    except (SnowflakeDriverError, OSError) as exc:
        raise classify_snowflake_error(
            exc, table=first.table.qualified, s3_key=s3_key, run_id=first.run_id
        ) from exc
    return [outcomes[staged.key] for staged in group]


def _manifest_mismatch(loader: _Loader, staged: StagedObject, facts: ObjectFacts) -> PermanentError | None:
    """A file its run's manifest lists must be the file the extractor wrote: same size, same SHA-256.

    The loader never downloads data files (COPY reads them in Snowflake), so the check is
    against what S3 reports: the size and the checksum the extractor stored as object
    metadata. An object overwritten by hand under a listed key loses or changes both.
    """
    if staged.run_id is None:
        return None
    listed = _manifest(loader, staged).file_for_key(staged.key)
    if listed is None:
        return None  # still extracting: the manifest lists files only once the run is staged
    problems = []
    if facts.sha256 != listed.sha256:
        problems.append(f"{META_SHA256} is {facts.sha256!r}, the manifest says {listed.sha256!r}")
    if facts.size != listed.bytes:
        problems.append(f"size is {facts.size} bytes, the manifest says {listed.bytes}")
    if not problems:
        return None
    return PermanentError(
        "staged file does not match its run's manifest: " + "; ".join(problems),
        table=staged.table.qualified,
        s3_key=staged.key,
        run_id=staged.run_id,
    )


def _claim_file(
    loader: _Loader, staged: StagedObject, facts: ObjectFacts, started: float
) -> FileOutcome | None:
    """Claim the key in the ledger (inside the caller's transaction).

    Returns the ``already_loaded`` outcome when the ledger shows this content loaded, None when
    the file still has to be loaded; changed content under a loaded key is a PermanentError.
    """
    loader.ledger.claim(
        LedgerClaim(
            staged.key, facts.etag, facts.sha256, facts.run_id, staged.table.schema, staged.table.table
        )
    )
    entry = loader.ledger.loaded_row(staged.key)
    if entry is None:
        return None
    if not entry.matches(sha256=facts.sha256, etag=facts.etag):
        raise PermanentError(
            "changed file under a loaded key: the key was loaded with other content "
            f"(etag {entry.etag}, sha256 {entry.sha256}); stage changed data under a new key",
            s3_key=staged.key,
        )
    result = LoadResult(
        staged.key,
        staged.table.qualified,
        LoadStatus.ALREADY_LOADED,
        entry.rows_loaded or 0,
        _elapsed_ms(started),
        staged.run_id,
    )
    return FileOutcome(staged, result=result)


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


# --------------------------------------------------------------------------- S3


def head_staged_object(s3: S3Client, bucket: str, staged: StagedObject) -> ObjectFacts | None:
    """The object's ETag, size and pgsnow metadata; None when the object does not exist."""
    try:
        response = s3.head_object(Bucket=bucket, Key=staged.key)
    except ClientError as exc:
        if aws_error_code(exc) in _MISSING_S3_CODES:
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


# --------------------------------------------------------------------------- Snowflake


def _execute(
    sf_conn: SnowflakeConnection, sql: str, params: Sequence[Any] | None = None
) -> list[tuple[Any, ...]]:
    with sf_conn.cursor() as cursor:
        cursor.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()]


def _execute_with_credentials(
    sf_conn: SnowflakeConnection, sql: str, credentials: AwsCredentials | None
) -> list[dict[str, Any]]:
    """Run a statement that carries credentials (CREDENTIALS = (...)).

    A failure becomes our error with every credential value redacted from its message, raised
    outside the ``except`` so that the driver's error (whose ``query`` holds the statement) is
    neither its cause nor its context: tracebacks and logs never see the statement.
    """
    if credentials is None:
        return _execute_dicts(sf_conn, sql)
    try:
        return _execute_dicts(sf_conn, sql)
    except (SnowflakeDriverError, OSError) as exc:
        failure = classify_snowflake_error(exc, secrets=credentials.secret_values)
    raise failure


def _execute_dicts(sf_conn: SnowflakeConnection, sql: str) -> list[dict[str, Any]]:
    """Rows as dicts keyed by lower-case column name (COPY's result columns)."""
    with sf_conn.cursor() as cursor:
        cursor.execute(sql)
        names = [d[0].lower() for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


# --------------------------------------------------------------------------- targets and schema


def _manifest(loader: _Loader, staged: StagedObject) -> RunManifest:
    assert staged.run_id is not None
    cache_key = (staged.table, staged.run_id)
    manifest = loader.manifests.get(cache_key)
    if manifest is None:
        manifest = read_run_manifest(loader.s3, loader.settings.bucket, staged.table, staged.run_id)
        loader.manifests[cache_key] = manifest
    return manifest


def _target(loader: _Loader, table: TableRef) -> tuple[str, str, str]:
    return (loader.database, table.snowflake_schema, table.snowflake_table)


def _shadow(loader: _Loader, table: TableRef, run_id: str) -> tuple[str, str, str]:
    """The table a replace run loads into; same schema as the target (SWAP WITH needs no move)."""
    return (loader.database, table.snowflake_schema, f"{table.snowflake_table}__PGSNOW_REPLACE_{run_id}")


def _ensure_run_id_column(loader: _Loader, target: tuple[str, str, str]) -> None:
    """Merge without a cursor column orders rows by the run that wrote them (build_merge_from).
    DDL commits in Snowflake, so this runs before the group's transaction, once per table."""
    if target in loader.run_id_columns_ready:
        return
    _execute(loader.sf_conn, build_add_run_id_column(target))
    loader.run_id_columns_ready.add(target)


def _table_comment(loader: _Loader, table: tuple[str, str, str]) -> str | None:
    rows = _execute(loader.sf_conn, *build_select_table_comment(*table))
    return str(rows[0][0]) if rows and rows[0][0] is not None else None


def _existing_columns(loader: _Loader, target: tuple[str, str, str]) -> list[ExistingColumn]:
    rows = _execute(loader.sf_conn, *build_select_column_types(*target))
    return [
        ExistingColumn(
            str(name),
            str(data_type),
            None if precision is None else int(precision),
            None if scale is None else int(scale),
            None if length is None else int(length),
            str(is_nullable).upper() != "NO",
        )
        for name, data_type, precision, scale, length, is_nullable in rows
    ]


def ensure_table(
    loader: _Loader, table: TableRef, columns: Sequence[Column], target: tuple[str, str, str]
) -> bool:
    """Create the target from the manifest's columns, or evolve it: add new columns, widen types.

    Every change is checked before any ALTER runs, so an incompatible change alters nothing.
    True when an existing table was altered (a pipe over it must be redefined).
    """
    if target in loader.tables_ready:
        return False
    altered = False
    existing = _existing_columns(loader, target)
    if not existing:
        _execute(loader.sf_conn, build_create_schema(target[0], target[1]))
        if target == _target(loader, table):
            _execute(loader.sf_conn, build_create_table(loader.database, columns, table))
        else:
            _execute(loader.sf_conn, build_create_shadow_table(target, columns))
    else:
        try:
            changes = plan_table_changes(table.qualified, existing, columns)
        except PermanentError as exc:
            exc.message += "; nothing was loaded"
            raise
        context = {"table": table.qualified}
        for column in changes.added:
            logger.info("adding a new source column", extra={**context, "column": column.snowflake_name})
            _execute(loader.sf_conn, build_add_column(target, column))
        for column in changes.widened:
            logger.info(
                "widening a column",
                extra={**context, "column": column.snowflake_name, "type": column.snowflake_type},
            )
            _execute(loader.sf_conn, build_widen_column(target, column))
        for name in changes.relaxed:
            # NOT NULL in the table, but the run sends no value (the source dropped the column) or
            # a nullable one (the source dropped NOT NULL): every load would fail otherwise.
            logger.info("making a column nullable (DROP NOT NULL)", extra={**context, "column": name})
            _execute(loader.sf_conn, build_drop_not_null(target, name))
        altered = not changes.empty
        if any(not name.startswith(PGSNOW_COLUMN_PREFIX) for name in changes.dropped):
            loader.tables_with_unsent_columns.add(target)
    loader.tables_ready.add(target)
    return altered


def _dropped_file_columns(loader: _Loader, staged: StagedObject) -> list[LoadColumn]:
    """A file without a run: the existing table's columns (a CSV's matched by its header's names),
    or a new all-VARCHAR table from a CSV header."""
    database, table = loader.database, staged.table
    existing = _existing_columns(loader, _target(loader, table))
    if existing:
        if staged.file_format is FileFormat.PARQUET:
            # COPY reads Parquet columns by name ($1:"name"); the loader ships no Parquet reader.
            return _table_load_columns(existing)
        header = read_csv_header(loader.s3, loader.settings.bucket, staged)
        return columns_for_csv_header(staged, header, existing)
    if not loader.settings.load.allow_create_for_dropped_files:
        raise PermanentError(
            "a file without a pgsnow run id can only load into an existing table, and "
            f"{database}.{table.snowflake_schema}.{table.snowflake_table} does not exist "
            "(set LOAD_CREATE_TABLES_FOR_DROPPED_FILES=true to create it)",
            table=table.qualified,
            s3_key=staged.key,
        )
    if staged.file_format is not FileFormat.CSV:
        raise PermanentError(
            "only a CSV file can create its table (the loader reads its header; it ships no Parquet reader)",
            table=table.qualified,
            s3_key=staged.key,
        )
    header = read_csv_header(loader.s3, loader.settings.bucket, staged)
    columns = [Column(name, "text", "text", ValueKind.TEXT, "VARCHAR", True) for name in header]
    ensure_table(loader, table, columns, _target(loader, table))
    return [LoadColumn.from_manifest(c) for c in columns]


def _table_load_columns(existing: Sequence[ExistingColumn]) -> list[LoadColumn]:
    """The table's columns as COPY loads them. A NUMBER keeps its precision and scale: a Parquet
    value is cast to the column's own type (``::NUMBER`` alone would be scale 0 and round)."""
    columns = load_columns_from_table([(c.name, c.data_type) for c in existing])
    return [
        replace(loaded, snowflake_type=column.type_text) if loaded.kind is ValueKind.DECIMAL else loaded
        for column, loaded in zip(existing, columns, strict=True)
    ]


def columns_for_csv_header(
    staged: StagedObject, header: Sequence[str], existing: Sequence[ExistingColumn]
) -> list[LoadColumn]:
    """The table's columns in the order a hand-dropped CSV's header names them.

    A header name matches the column it names under the naming policy (``order_id`` and
    ``ORDER_ID`` both name ``ORDER_ID``; ``Note`` names only ``"Note"``), in any order. A name the
    table does not have is refused (nothing is loaded, rather than a value silently dropped or
    put in the wrong column); a column the header leaves out loads as NULL, unless it is NOT NULL.
    """
    context = {"table": staged.table.qualified, "s3_key": staged.key}
    loadable = dict(zip((c.name for c in existing), _table_load_columns(existing), strict=True))
    chosen: list[LoadColumn] = []
    unknown: list[str] = []
    named: dict[str, str] = {}
    for field_name in header:
        target = snowflake_name(field_name)
        if target not in loadable:
            unknown.append(field_name)
            continue
        if target in named:
            raise PermanentError(
                f"the CSV header names column {target} twice ({named[target]!r} and {field_name!r}); "
                "nothing was loaded",
                **context,
            )
        named[target] = field_name
        chosen.append(replace(loadable[target], source_name=field_name))
    if unknown:
        raise PermanentError(
            "the CSV header names columns the table does not have: "
            + ", ".join(repr(name) for name in unknown)
            + f" (the table has {', '.join(loadable)}); nothing was loaded",
            **context,
        )
    required = [c.name for c in existing if c.name not in named and not c.nullable]
    if required:
        raise PermanentError(
            f"the CSV header leaves out NOT NULL columns {', '.join(required)}; nothing was loaded",
            **context,
        )
    return chosen


HEADER_READ_BYTES = 1024 * 1024  # a header row is read from the file's first MiB (ranged GET)


def read_csv_header(s3: S3Client, bucket: str, staged: StagedObject) -> list[str]:
    """The header row of a staged CSV (gzip or plain), read from the first bytes only."""
    try:
        body = s3.get_object(Bucket=bucket, Key=staged.key, Range=f"bytes=0-{HEADER_READ_BYTES - 1}")[
            "Body"
        ].read()
    except (ClientError, BotoCoreError) as exc:
        raise classify_s3_error(exc, s3_key=staged.key) from exc
    try:
        if staged.gzip:
            # Only the start of the stream: the rest of the file is never downloaded.
            body = zlib.decompressobj(wbits=31).decompress(body, HEADER_READ_BYTES)
        # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first name.
        first_line = body.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8-sig")
    except (zlib.error, UnicodeDecodeError) as exc:
        raise PermanentError(f"the CSV file's header row cannot be read: {exc}", s3_key=staged.key) from exc
    header = parse_csv_record(first_line)
    if not header or any(not name for name in header):
        raise PermanentError("the CSV file has no usable header row", s3_key=staged.key)
    return header


# --------------------------------------------------------------------------- ledger


def _outcome_for_missing_object(loader: _Loader, staged: StagedObject, started: float) -> FileOutcome:
    """A redelivered event for a file already loaded and cleaned up is fine; anything else is not."""
    entry = loader.ledger.loaded_row(staged.key)
    if entry is not None:
        result = LoadResult(
            staged.key,
            staged.table.qualified,
            LoadStatus.ALREADY_LOADED,
            entry.rows_loaded or 0,
            _elapsed_ms(started),
            staged.run_id,
        )
        return FileOutcome(staged, result=result)
    error = PermanentError(
        "the staged object no longer exists and was never loaded",
        s3_key=staged.key,
        table=staged.table.qualified,
        run_id=staged.run_id,
    )
    _log_failure(error, staged)
    return FileOutcome(staged, error=error)


# --------------------------------------------------------------------------- one group


def _copy_group(
    loader: _Loader, present: list[tuple[StagedObject, ObjectFacts]], started: float
) -> list[FileOutcome]:
    """Claim, COPY (and MERGE), record and commit the group's files in ONE transaction."""
    sf_conn, database, control_schema = loader.sf_conn, loader.database, loader.control_schema
    first = present[0][0]
    table = first.table
    write_mode, deletes = WriteMode.APPEND, DeleteMode.NONE
    manifest: RunManifest | None = None
    table_altered = False
    if first.run_id is None:
        columns = _dropped_file_columns(loader, first)
        copy_target = _target(loader, table)
    else:
        manifest = _manifest(loader, first)
        write_mode, deletes = WriteMode(manifest.write_mode), DeleteMode(manifest.deletes)
        columns = [LoadColumn.from_manifest(c) for c in manifest.columns]
        if write_mode is WriteMode.REPLACE:
            copy_target = _shadow(loader, table, first.run_id)
            ensure_table(loader, table, manifest.columns, copy_target)
        else:
            table_altered = ensure_table(loader, table, manifest.columns, _target(loader, table))
            copy_target = _target(loader, table)
            if write_mode is WriteMode.MERGE and not manifest.cursor_column:
                _ensure_run_id_column(loader, copy_target)
    work_table: tuple[str, str, str] | None = None
    if write_mode is WriteMode.MERGE and manifest is not None:
        # DDL commits a transaction in Snowflake, so the work table exists before ours begins.
        work_table = (database, control_schema, f"_PGSNOW_MERGE_{uuid.uuid4().hex[:16].upper()}")
        _execute(sf_conn, build_create_work_table(work_table, manifest.columns))
        copy_target = work_table
    # A pipe's COPY has the run's columns in the run's order; a hand-dropped file has its own
    # (its header's), so it loads with COPY like any other file.
    # So does a run that leaves out a column of the table (a pipe made before the source dropped it
    # would put the run's values into the wrong columns).
    through_snowpipe = (
        loader.settings.load.method is LoadMethod.SNOWPIPE
        and write_mode is WriteMode.APPEND
        and manifest is not None
        and copy_target not in loader.tables_with_unsent_columns
    )
    if not through_snowpipe:
        _ensure_temporary_stage(loader)  # DDL: before the group's transaction
    _execute(
        sf_conn,
        build_query_tag(
            run_id=first.run_id,
            table=table,
            s3_key=first.key if len(present) == 1 else f"{len(present)} files",
        ),
    )
    if through_snowpipe:
        outcomes = _load_through_snowpipe(loader, present, columns, started, redefine_pipe=table_altered)
        if manifest is not None and deletes is not DeleteMode.NONE:
            outcomes = _with_run_outcome(outcomes, finish_run_if_complete(loader, table, manifest.run_id))
        return outcomes
    try:
        outcomes = _copy_in_transaction(
            loader,
            present=present,
            columns=columns,
            copy_target=copy_target,
            work_table=work_table,
            manifest=manifest,
            started=started,
        )
    finally:
        if work_table is not None:
            _execute(sf_conn, build_drop_table(work_table))
    if manifest is not None and (write_mode is WriteMode.REPLACE or deletes is not DeleteMode.NONE):
        outcomes = _with_run_outcome(outcomes, finish_run_if_complete(loader, table, manifest.run_id))
    return outcomes


def _ensure_temporary_stage(loader: _Loader) -> None:
    """The credentials method: (re)create this session's temporary stage when the loader's AWS
    credentials are not the ones it holds (first use, rotated, refreshed near expiry).

    Snowpipe is refused without an integration (config): a pipe reads after we return.
    """
    credentials = loader.stage_credentials()
    if credentials is None:
        return
    if _temporary_stage_credentials.get(loader.sf_conn) == credentials.fingerprint:
        return
    settings = loader.settings
    _execute_with_credentials(
        loader.sf_conn,
        build_create_temporary_stage(
            loader.database,
            loader.control_schema,
            settings.snowflake.stage,
            bucket=settings.bucket,
            prefix=settings.prefix,
            credentials=credentials,
        ),
        credentials,
    )
    _temporary_stage_credentials[loader.sf_conn] = credentials.fingerprint
    logger.info(
        "temporary stage created with the loader's AWS credentials",
        extra={"stage": settings.snowflake.stage},
    )


def _with_run_outcome(outcomes: list[FileOutcome], run_outcome: RunOutcome | None) -> list[FileOutcome]:
    """Report the run's outcome on the results of the group that completed it."""
    if run_outcome is None:
        return outcomes
    return [
        o if o.result is None else replace(o, result=replace(o.result, run_outcome=run_outcome))
        for o in outcomes
    ]


def _copy_in_transaction(
    loader: _Loader,
    *,
    present: list[tuple[StagedObject, ObjectFacts]],
    columns: Sequence[LoadColumn],
    copy_target: tuple[str, str, str],
    work_table: tuple[str, str, str] | None,
    manifest: RunManifest | None,
    started: float,
) -> list[FileOutcome]:
    sf_conn = loader.sf_conn
    first = present[0][0]
    outcomes: list[FileOutcome] = []
    sf_conn.autocommit(False)
    try:
        to_load: list[tuple[StagedObject, ObjectFacts]] = []
        for staged, facts in present:
            if (done := _claim_file(loader, staged, facts, started)) is not None:
                outcomes.append(done)
            else:
                to_load.append((staged, facts))
        if to_load:
            copy_started = time.monotonic()
            copy_rows = _insert_or_copy(loader, to_load, columns, copy_target, manifest)
            copy_ms = _elapsed_ms(copy_started)
            checked = check_copy_results(copy_rows, to_load)
            # An empty work table has nothing to merge: skip the statement (it would only cost
            # warehouse time) rather than send a MERGE that changes no row.
            loaded_rows = sum(c.rows_loaded for c in checked if c.error is None)
            if work_table is not None and manifest is not None and loaded_rows > 0:
                _execute(
                    sf_conn,
                    *build_merge_from(
                        target=_target(loader, first.table),
                        source=work_table,
                        columns=manifest.columns,
                        primary_key=manifest.primary_key,
                        cursor_column=manifest.cursor_column,
                        run_id=manifest.run_id,
                    ),
                )
            for (staged, _), file_check in zip(to_load, checked, strict=True):
                if file_check.error is not None:
                    outcomes.append(FileOutcome(staged, error=file_check.error))
                    continue
                status = "PARTIALLY_LOADED" if file_check.errors_seen else "LOADED"
                loader.ledger.record_load(
                    staged.key,
                    file_check.rows_loaded,
                    status=status,
                    errors_seen=file_check.errors_seen,
                    first_error=file_check.first_error,
                )
                result = LoadResult(
                    staged.key,
                    staged.table.qualified,
                    LoadStatus.PARTIALLY_LOADED if file_check.errors_seen else LoadStatus.LOADED,
                    file_check.rows_loaded,
                    copy_ms,
                    staged.run_id,
                    file_check.errors_seen,
                    file_check.first_error,
                )
                outcomes.append(FileOutcome(staged, result=result))
        sf_conn.commit()
    except BaseException:
        _rollback_keeping_the_original_error(sf_conn)
        raise
    finally:
        sf_conn.autocommit(True)
    for outcome in outcomes:
        if outcome.result is not None:
            level = logger.warning if outcome.result.errors_seen else logger.info
            level(
                f"file {outcome.result.status.value}",
                extra={
                    "table": outcome.result.table,
                    "s3_key": outcome.result.key,
                    "run_id": outcome.result.run_id,
                    "rows": outcome.result.rows,
                    "errors_seen": outcome.result.errors_seen,
                    "first_error": outcome.result.first_error,
                    "duration_ms": outcome.result.duration_ms,
                },
            )
        elif outcome.error is not None:
            _log_failure(outcome.error, outcome.staged)
    return outcomes


# --------------------------------------------------------------------------- LOAD_METHOD=insert

INSERT_ROWS_PER_STATEMENT = 1000  # rows per multi-row INSERT (one statement, bound values)


def _is_insertable(
    loader: _Loader, staged: StagedObject, facts: ObjectFacts, manifest: RunManifest | None
) -> bool:
    """LOAD_METHOD=insert takes a CSV file of a run (its manifest gives exact column types) whose
    row count (object metadata) is known and at most LOAD_INSERT_MAX_ROWS. Parquet files, larger
    files and hand-dropped files go through COPY (the loader ships no Parquet reader)."""
    return (
        loader.settings.load.method is LoadMethod.INSERT
        and manifest is not None
        and staged.file_format is FileFormat.CSV
        and facts.rows is not None
        and facts.rows <= loader.settings.load.insert_max_rows
    )


def _insert_or_copy(
    loader: _Loader,
    to_load: list[tuple[StagedObject, ObjectFacts]],
    columns: Sequence[LoadColumn],
    target: tuple[str, str, str],
    manifest: RunManifest | None,
) -> list[dict[str, Any]]:
    """Load the files (in the caller's transaction); one COPY-shaped result row per file."""
    inserted = [(s, f) for s, f in to_load if _is_insertable(loader, s, f, manifest)]
    copied = [(s, f) for s, f in to_load if not _is_insertable(loader, s, f, manifest)]
    result_rows = [_insert_file(loader, staged, columns, target) for staged, _ in inserted]
    if copied:
        copy_sql = build_copy_into(
            database=loader.database,
            control_schema=loader.control_schema,
            stage=loader.settings.snowflake.stage,
            staged=[staged for staged, _ in copied],
            columns=columns,
            on_error=loader.settings.load.on_error.value,
            target=target,
        )
        result_rows += _execute_dicts(loader.sf_conn, copy_sql)
    return result_rows


def _insert_file(
    loader: _Loader, staged: StagedObject, columns: Sequence[LoadColumn], target: tuple[str, str, str]
) -> dict[str, Any]:
    """INSERT one CSV file's rows with bound values, converted like the COPY converts them."""
    rows = read_csv_rows(loader.s3, loader.settings.bucket, staged, len(columns))
    statement = build_insert_rows(target, columns)
    with loader.sf_conn.cursor() as cursor:
        for start in range(0, len(rows), INSERT_ROWS_PER_STATEMENT):
            cursor.executemany(statement, rows[start : start + INSERT_ROWS_PER_STATEMENT])
    return {"file": staged.file_name, "status": "LOADED", "rows_parsed": len(rows), "rows_loaded": len(rows)}


def read_csv_rows(
    s3: S3Client, bucket: str, staged: StagedObject, width: int
) -> list[tuple[str | None, ...]]:
    """A staged CSV's data rows (header skipped): an unquoted empty field is None (NULL), ``""`` is ''."""
    try:
        body = s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise classify_s3_error(exc, s3_key=staged.key) from exc
    try:
        text = (zlib.decompress(body, wbits=31) if staged.gzip else body).decode("utf-8")
    except (zlib.error, UnicodeDecodeError) as exc:
        raise PermanentError(f"the CSV file cannot be read: {exc}", s3_key=staged.key) from exc
    records = parse_csv_records(text)[1:]  # SKIP_HEADER = 1
    for number, record in enumerate(records, start=2):
        if len(record) != width:
            raise PermanentError(
                f"line {number} has {len(record)} fields, the table has {width} columns", s3_key=staged.key
            )
    return records


def parse_csv_records(text: str) -> list[tuple[str | None, ...]]:
    """RFC 4180 records with FIELD_OPTIONALLY_ENCLOSED_BY='"' and EMPTY_FIELD_AS_NULL semantics.

    Python's csv module cannot tell an unquoted empty field (NULL) from ``""`` (an empty
    string) before 3.12, so the records are split here.
    """
    records: list[tuple[str | None, ...]] = []
    fields: list[str | None] = []
    position, length = 0, len(text)
    while position < length:
        if text[position] == '"':
            chunks: list[str] = []
            position += 1
            while True:
                end = text.find('"', position)
                if end < 0:
                    raise PermanentError("unterminated quoted field in the CSV file")
                chunks.append(text[position:end])
                if text.startswith('""', end):
                    chunks.append('"')
                    position = end + 2
                    continue
                position = end + 1
                break
            fields.append("".join(chunks))
        else:
            end = position
            while end < length and text[end] not in ",\n\r":
                end += 1
            fields.append(text[position:end] or None)
            position = end
        if position >= length or text[position] in "\r\n":
            records.append(tuple(fields))
            fields = []
            if text.startswith("\r\n", position):
                position += 2
            else:
                position += 1
        elif text[position] == ",":
            position += 1
            if position >= length:
                fields.append(None)
                records.append(tuple(fields))
                fields = []
        else:
            raise PermanentError(f"unexpected character after a quoted CSV field at offset {position}")
    return records


# --------------------------------------------------------------------------- LOAD_METHOD=snowpipe


def _snowpipe_client(loader: _Loader) -> SnowpipeClient:
    if loader.snowpipe is None:
        loader.snowpipe = snowpipe_client_from_settings(
            loader.settings.snowflake, loader.settings.load.snowpipe_host
        )
    return loader.snowpipe


def _ensure_pipe(
    loader: _Loader, staged: StagedObject, columns: Sequence[LoadColumn], *, redefine: bool
) -> str:
    """The table's pipe (created by the loader with the loader's own COPY); its REST name.

    Redefined (CREATE OR REPLACE) when schema evolution changed the table, so the new columns load.
    """
    prefix = loader.settings.load.snowpipe_name
    if not prefix:
        raise ConfigError(["SNOWPIPE_NAME is required when LOAD_METHOD=snowpipe"])
    name = qualified_pipe_name(loader.database, loader.control_schema, prefix, staged.table)
    if name not in loader.pipes_ready or redefine:
        _execute(
            loader.sf_conn,
            build_table_pipe(
                database=loader.database,
                control_schema=loader.control_schema,
                stage=loader.settings.snowflake.stage,
                pipe=pipe_name(prefix, staged.table),
                staged=staged,
                columns=columns,
                replace=redefine,
            ),
        )
        loader.pipes_ready.add(name)
    return name


def _load_through_snowpipe(
    loader: _Loader,
    present: list[tuple[StagedObject, ObjectFacts]],
    columns: Sequence[LoadColumn],
    started: float,
    *,
    redefine_pipe: bool,
) -> list[FileOutcome]:
    """Claim, submit (insertFiles), confirm (insertReport/loadHistoryScan), then record.

    The ledger row of a file is committed as loaded only after Snowpipe reported it LOADED.
    A file the ledger holds as loaded is skipped and never submitted again. A file submitted by
    an attempt that died before recording it is submitted again: Snowpipe's load metadata
    (14 days per pipe) does not load the same path twice, and its earlier outcome is found with
    loadHistoryScan from the ledger's SUBMITTED_AT.
    """
    sf_conn, database, control_schema = loader.sf_conn, loader.database, loader.control_schema
    settings = loader.settings.snowflake
    pipe = _ensure_pipe(loader, present[0][0], columns, redefine=redefine_pipe)
    outcomes: dict[str, FileOutcome] = {}
    to_submit: list[tuple[StagedObject, ObjectFacts]] = []
    earliest: dt.datetime | None = None
    sf_conn.autocommit(False)
    try:
        for staged, facts in present:
            if (done := _claim_file(loader, staged, facts, started)) is not None:
                outcomes[staged.key] = done
            else:
                to_submit.append((staged, facts))
        if to_submit:
            keys = [staged.key for staged, _ in to_submit]
            earliest = loader.ledger.earliest_submission(keys)
            loader.ledger.mark_submitted(keys)
        sf_conn.commit()
    except BaseException:
        _rollback_keeping_the_original_error(sf_conn)
        raise
    finally:
        sf_conn.autocommit(True)
    if not to_submit:
        return [outcomes[staged.key] for staged, _ in present]
    client = _snowpipe_client(loader)
    paths = {
        staged.key: stage_file_path(database, control_schema, settings.stage, staged)
        for staged, _ in to_submit
    }
    client.submit(pipe, [(paths[staged.key], facts.size) for staged, facts in to_submit])
    reports = client.confirm(pipe, paths.values(), submitted_since=earliest)
    load_ms = _elapsed_ms(started)
    sf_conn.autocommit(False)
    try:
        for staged, facts in to_submit:
            outcome = _record_snowpipe_report(loader, staged, facts, reports[paths[staged.key]], load_ms)
            outcomes[staged.key] = outcome
        sf_conn.commit()
    except BaseException:
        _rollback_keeping_the_original_error(sf_conn)
        raise
    finally:
        sf_conn.autocommit(True)
    for outcome in outcomes.values():
        if outcome.error is not None:
            _log_failure(outcome.error, outcome.staged)
        elif outcome.result is not None and outcome.result.status is not LoadStatus.ALREADY_LOADED:
            logger.info(
                f"file {outcome.result.status.value} through Snowpipe",
                extra={
                    "table": outcome.result.table,
                    "s3_key": outcome.result.key,
                    "rows": outcome.result.rows,
                },
            )
    return [outcomes[staged.key] for staged, _ in present]


def _record_snowpipe_report(
    loader: _Loader, staged: StagedObject, facts: ObjectFacts, report: PipeFileReport, load_ms: int
) -> FileOutcome:
    context = {"s3_key": staged.key, "table": staged.table.qualified, "run_id": staged.run_id}
    if report.status == "LOAD_FAILED":
        error = PermanentError(
            f"Snowpipe failed to load the file: {report.first_error or 'no message'}", **context
        )
        return FileOutcome(staged, error=error)
    partial = report.status == "PARTIALLY_LOADED"
    if not partial and facts.rows is not None and report.rows_inserted != facts.rows:
        error = PermanentError(
            f"Snowpipe loaded {report.rows_inserted} rows, the file's {META_ROWS} says {facts.rows}",
            **context,
        )
        return FileOutcome(staged, error=error)
    loader.ledger.record_load(
        staged.key,
        report.rows_inserted,
        status=report.status,
        errors_seen=report.errors_seen if partial else 0,
        first_error=report.first_error if partial else None,
    )
    result = LoadResult(
        staged.key,
        staged.table.qualified,
        LoadStatus.PARTIALLY_LOADED if partial else LoadStatus.LOADED,
        report.rows_inserted,
        load_ms,
        staged.run_id,
        report.errors_seen if partial else 0,
        report.first_error if partial else None,
    )
    return FileOutcome(staged, result=result)


def _rollback_keeping_the_original_error(sf_conn: SnowflakeConnection) -> None:
    # A rollback that fails (e.g. the connection dropped) must not hide why we rolled back;
    # Snowflake aborts an open transaction when its session ends anyway.
    try:
        sf_conn.rollback()
    except SnowflakeDriverError as exc:
        logger.warning("rollback failed", extra={"error": str(exc)})


@dataclass(frozen=True)
class FileCheck:
    """Snowflake's COPY result for one file, checked against the file's own row count."""

    rows_loaded: int = 0
    errors_seen: int = 0
    first_error: str | None = None
    error: PgSnowError | None = None  # the file was not loaded (SKIP_FILE): it fails on its own


def check_copy_results(
    result: Sequence[dict[str, Any]], files: Sequence[tuple[StagedObject, ObjectFacts]]
) -> list[FileCheck]:
    """One check per file, in order. A file missing from the result, or a loaded file whose
    row count differs from its metadata, fails the whole statement (the caller rolls back)."""
    by_name: dict[str, dict[str, Any]] = {}
    for result_row in result:
        if "rows_loaded" in result_row:
            by_name[str(result_row.get("file", ""))] = result_row
    checks = []
    for staged, facts in files:
        context = {"s3_key": staged.key, "table": staged.table.qualified, "run_id": staged.run_id}
        matching = [
            r
            for name, r in by_name.items()
            if name.endswith("/" + staged.file_name) or name == staged.file_name
        ]
        row = matching[0] if matching else None
        if row is None:
            summary = "; ".join(str(r.get("status", r)) for r in result) or "no result rows"
            raise PermanentError(f"COPY did not report this file: {summary}", **context)
        status = str(row.get("status", "")).upper()
        rows_loaded = int(row.get("rows_loaded") or 0)
        rows_parsed = int(row.get("rows_parsed") or 0)
        errors_seen = int(row.get("errors_seen") or 0)
        first_error = row.get("first_error")
        if status == "LOADED":
            if rows_parsed != rows_loaded:
                raise PermanentError(f"COPY parsed {rows_parsed} rows but loaded {rows_loaded}", **context)
            if facts.rows is not None and rows_loaded != facts.rows:
                raise PermanentError(
                    f"COPY loaded {rows_loaded} rows, the file's {META_ROWS} says {facts.rows}", **context
                )
            checks.append(FileCheck(rows_loaded))
        elif status == "PARTIALLY_LOADED":
            rejected = errors_seen or max(rows_parsed - rows_loaded, 0)
            checks.append(FileCheck(rows_loaded, rejected, str(first_error) if first_error else None))
        elif status == "LOAD_FAILED":
            checks.append(
                FileCheck(
                    error=PermanentError(
                        f"COPY skipped the file (LOAD_FAILED): {first_error or 'no message'}", **context
                    )
                )
            )
        else:
            raise PermanentError(f"COPY status {status}: {first_error or 'no error message'}", **context)
    return checks


# --------------------------------------------------------------------------- run completion


def finish_run_if_complete(loader: _Loader, table: TableRef, run_id: str) -> RunOutcome | None:
    """Swap in a replace run's table or apply its deletes once the run is complete; None until then.

    Complete means: the manifest (read again, not cached) is ``staged`` or ``loaded``, and every
    file it lists is loaded in the ledger. A ledger row under ``_pgsnow/applied/...``
    (``applied_mark_key``) records the outcome, so a redelivered last file does not swap or
    delete twice. A run older than a run the target already holds is SUPERSEDED, never applied:
    its key list would delete rows the newer run wrote (docs/loading.md).
    """
    manifest = read_run_manifest(loader.s3, loader.settings.bucket, table, run_id)
    if manifest.state not in (RunState.STAGED, RunState.LOADED):
        return None
    keys = [f.key for f in manifest.files]
    if set(keys) - set(loader.ledger.loaded_rows(keys)):
        return None
    mark = applied_mark_key(table, run_id)
    entry = loader.ledger.loaded_row(mark)
    if entry is not None:
        return _recorded_outcome(entry)
    if WriteMode(manifest.write_mode) is WriteMode.REPLACE:
        return _finish_replace_run(loader, manifest, mark)
    if DeleteMode(manifest.deletes) is not DeleteMode.NONE:
        return _apply_deletes(loader, manifest, mark)
    return None


def _recorded_outcome(entry: LedgerRow) -> RunOutcome:
    return RunOutcome.SUPERSEDED if entry.status == "SUPERSEDED" else RunOutcome.APPLIED


def _newer_run(loader: _Loader, table: TableRef, run_id: str, *, applied_only: bool) -> str | None:
    """The newest run of the table newer than ``run_id`` that reached the target, if any.

    A ledger RUN_ID that is not a run id (object metadata of a hand-dropped file) is ignored.
    """
    runs = loader.ledger.newer_runs(
        schema_name=table.schema, table_name=table.table, run_id=run_id, applied_only=applied_only
    )
    newer = sorted(run for run in runs if is_run_id(run))
    return newer[-1] if newer else None


def _record_run_outcome(loader: _Loader, manifest: RunManifest, mark: str, outcome: RunOutcome) -> None:
    """Write the run's mark into the ledger (in the caller's transaction, if any)."""
    table = manifest.table
    loader.ledger.claim(LedgerClaim(mark, None, None, manifest.run_id, table.schema, table.table))
    loader.ledger.record_load(mark, manifest.total_rows, status=outcome.value.upper())


def _log_superseded(manifest: RunManifest, newer: str) -> None:
    logger.warning(
        "run superseded: a newer run of the table reached the target first, so this run's "
        + (
            "table is not swapped in"
            if WriteMode(manifest.write_mode) is WriteMode.REPLACE
            else "deletes are not applied"
        ),
        extra={"table": manifest.table.qualified, "run_id": manifest.run_id, "newer_run_id": newer},
    )


def _finish_replace_run(loader: _Loader, manifest: RunManifest, mark: str) -> RunOutcome:
    """Swap the run's shadow table in, unless a newer replace run was swapped in already.

    SWAP and DROP are DDL (each commits), so unlike the deletes this check cannot share a
    transaction with the swap; two replace runs of one table completing in the same instant
    can still race. The tag keeps a retry after a crash from swapping the old data back in.
    """
    sf_conn, table, run_id = loader.sf_conn, manifest.table, manifest.run_id
    target = _target(loader, table)
    shadow = _shadow(loader, table, run_id)
    newer = _newer_run(loader, table, run_id, applied_only=True)
    if newer is not None:
        _execute(sf_conn, build_drop_table(shadow))  # the stale run's table, never swapped in
        loader.tables_ready.discard(shadow)
        _record_run_outcome(loader, manifest, mark, RunOutcome.SUPERSEDED)
        _log_superseded(manifest, newer)
        return RunOutcome.SUPERSEDED
    if _existing_columns(loader, shadow):
        if _existing_columns(loader, target):
            # The shadow is tagged with its run before the swap, and the tag travels with the
            # data: a retry after a crash between SWAP and DROP finds it on the target and only
            # drops the shadow (the old data), instead of swapping the old data back in.
            tag = replace_run_tag(run_id)
            if _table_comment(loader, target) != tag:
                _execute(sf_conn, build_set_table_comment(shadow, tag))
                _execute(sf_conn, build_swap_with(target, shadow))
            _execute(sf_conn, build_drop_table(shadow))  # now the old table
        else:
            _execute(sf_conn, build_create_schema(target[0], target[1]))
            _execute(sf_conn, build_rename_table(shadow, target))
        loader.tables_ready.discard(target)
        loader.tables_ready.discard(shadow)
    _record_run_outcome(loader, manifest, mark, RunOutcome.APPLIED)
    logger.info(
        "run applied", extra={"table": table.qualified, "run_id": run_id, "write_mode": manifest.write_mode}
    )
    return RunOutcome.APPLIED


def _apply_deletes(loader: _Loader, manifest: RunManifest, mark: str) -> RunOutcome:
    """Delete (hard) or mark (soft) target rows whose key is not in the run's full key list.

    One transaction claims the run's mark, checks that no newer run of the table has reached the
    target, applies the key list and records the outcome. The claim is a MERGE on the ledger,
    which every load of a file also begins with, so a concurrent load of a newer run's file
    either commits before this check (and is seen: SUPERSEDED) or waits until the deletes are
    committed (and its rows then land after them).
    """
    if manifest.key_list is None:
        raise PermanentError(
            f"deletes={manifest.deletes} but the manifest has no key_list",
            table=manifest.table.qualified,
            run_id=manifest.run_id,
        )
    sf_conn, database, control_schema = loader.sf_conn, loader.database, loader.control_schema
    by_name = {c.name: c for c in manifest.columns}
    key_columns = [by_name[name] for name in manifest.primary_key]
    keys_table = (database, control_schema, f"_PGSNOW_KEYS_{uuid.uuid4().hex[:16].upper()}")
    key_file = StagedObject(
        key=manifest.key_list.key,
        table=manifest.table,
        file_name=manifest.key_list.key.rsplit("/", 1)[1],
        file_format=FileFormat.CSV,
        gzip=manifest.key_list.key.endswith(".gz"),
        run_id=manifest.run_id,
        batch=None,
    )
    target = _target(loader, manifest.table)
    soft = DeleteMode(manifest.deletes) is DeleteMode.SOFT
    # DDL commits in Snowflake, so the column and the keys table exist before the transaction.
    if soft:
        _execute(sf_conn, build_add_soft_delete_column(target))
    _execute(sf_conn, build_create_work_table(keys_table, key_columns))
    try:
        url_source = loader.url_source()
        sf_conn.autocommit(False)
        try:
            outcome = _apply_deletes_in_transaction(
                loader,
                manifest,
                mark=mark,
                key_file=key_file,
                key_columns=key_columns,
                keys_table=keys_table,
                url_source=url_source,
                soft=soft,
            )
            sf_conn.commit()
        except BaseException:
            _rollback_keeping_the_original_error(sf_conn)
            raise
        finally:
            sf_conn.autocommit(True)
    finally:
        _execute(sf_conn, build_drop_table(keys_table))
    return outcome


def _apply_deletes_in_transaction(
    loader: _Loader,
    manifest: RunManifest,
    *,
    mark: str,
    key_file: StagedObject,
    key_columns: Sequence[Column],
    keys_table: tuple[str, str, str],
    url_source: UrlSource,
    soft: bool,
) -> RunOutcome:
    sf_conn, database, control_schema = loader.sf_conn, loader.database, loader.control_schema
    table = manifest.table
    loader.ledger.claim(LedgerClaim(mark, None, None, manifest.run_id, table.schema, table.table))
    entry = loader.ledger.loaded_row(mark)
    if entry is not None:
        return _recorded_outcome(entry)  # another loader finished the run while we waited
    newer = _newer_run(loader, table, manifest.run_id, applied_only=False)
    if newer is not None:
        _record_run_outcome(loader, manifest, mark, RunOutcome.SUPERSEDED)
        _log_superseded(manifest, newer)
        return RunOutcome.SUPERSEDED
    _execute_with_credentials(
        sf_conn,
        build_copy_into(
            database=database,
            control_schema=control_schema,
            stage=loader.settings.snowflake.stage,
            staged=key_file,
            columns=[LoadColumn.from_manifest(c) for c in key_columns],
            target=keys_table,
            url_source=url_source,
        ),
        url_source.credentials,
    )
    _execute(
        sf_conn,
        build_apply_deletes(
            target=_target(loader, table),
            keys_table=keys_table,
            key_columns=[c.snowflake_name for c in key_columns],
            soft=soft,
        ),
    )
    _record_run_outcome(loader, manifest, mark, RunOutcome.APPLIED)
    logger.info(
        "run applied",
        extra={"table": table.qualified, "run_id": manifest.run_id, "deletes": manifest.deletes},
    )
    return RunOutcome.APPLIED


def settle_completed_runs(
    *, settings: Settings, sf_conn: SnowflakeConnection, s3: S3Client, outcomes: Sequence[FileOutcome]
) -> dict[tuple[TableRef, str], str]:
    """Mark each run that this batch may have finished as ``loaded`` (manifest state).

    Run completion is what cleanup and ``pgsnow status`` read. The scheduled cleanup pass settles
    runs too, so a failure here only delays it: it is logged, never turned into a load failure.
    """
    from pgsnow.cleanup import mark_run_complete_if_loaded

    runs = {
        (o.staged.table, o.staged.run_id) for o in outcomes if o.error is None and o.staged.run_id is not None
    }
    states: dict[tuple[TableRef, str], str] = {}
    for table, run_id in sorted(runs):
        try:
            state = mark_run_complete_if_loaded(
                settings=settings, s3=s3, sf_conn=sf_conn, table=table, run_id=run_id
            )
        except PgSnowError as exc:
            logger.warning(f"could not settle run: {exc.message}", extra=exc.context())
            continue
        states[(table, run_id)] = state.value
    return states
