"""The one place that reads the environment.

``Settings.from_env(environ, component)`` builds one frozen, typed settings
object and reports *every* problem at once in a single ConfigError. Secrets are
never put in the environment of a deployed function: only the ARN of the
Secrets Manager secret is (``*_SECRET_ARN``); the plain ``PGSNOW_PG_DSN`` and
``SNOWFLAKE_PASSWORD`` exist for the local stack and tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from pgsnow.errors import ConfigError, PermanentError
from pgsnow.identifiers import TableAllowlist, TableRef
from pgsnow.keys import normalise_prefix

E = TypeVar("E", bound=StrEnum)

DEFAULT_CONTROL_SCHEMA = "PGSNOW"  # pgsnow's own schema in the Snowflake database (stage, ledger)


class Component(StrEnum):
    EXTRACTOR = "extractor"
    LOADER = "loader"
    CLEANUP = "cleanup"
    CHANGE_CAPTURE = (
        "change_capture"  # drains the replication slot (pgsnow.cdc; template ChangeCaptureFunction)
    )
    LOCAL = "local"  # CLI tools that may touch every part


class StagedFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"
    AUTO = "auto"


class CleanupMode(StrEnum):
    NEVER = "never"
    AFTER_EACH = "after_each"
    AFTER_ALL = "after_all"


# The specification's boolean spelling keeps working.
_CLEANUP_ALIASES = {"true": CleanupMode.AFTER_ALL, "false": CleanupMode.NEVER}


class ExtractMode(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"
    CDC = "cdc"  # change capture from the publication's logical replication slot (docs/change-capture.md)


class WriteMode(StrEnum):
    APPEND = "append"
    MERGE = "merge"
    REPLACE = "replace"


class DeleteMode(StrEnum):
    NONE = "none"
    HARD = "hard"
    SOFT = "soft"


class TruncateMode(StrEnum):
    """What a change-capture table does with a TRUNCATE in PostgreSQL (docs/change-capture.md)."""

    APPLY = "apply"  # empty the Snowflake table (hard deletes) or mark every row deleted (soft)
    REFUSE = "refuse"  # stop applying the table's changes with an error naming the TRUNCATE


class HeartbeatMethod(StrEnum):
    """How each change-capture run puts a marker into the WAL (docs/change-capture.md)."""

    MESSAGE = "message"  # pg_logical_emit_message (PostgreSQL 14+)
    TABLE = "table"  # an UPDATE of a heartbeat table in the publication (older servers)


class ValuePolicy(StrEnum):
    """What to do with a value Snowflake cannot hold (docs/type-mapping.md)."""

    FAIL = "fail"
    NULL = "null"
    CLAMP = "clamp"


class LoadMethod(StrEnum):
    COPY = "copy"
    INSERT = "insert"
    SNOWPIPE = "snowpipe"


class OnError(StrEnum):
    ABORT_STATEMENT = "ABORT_STATEMENT"
    SKIP_FILE = "SKIP_FILE"
    CONTINUE = "CONTINUE"


@dataclass(frozen=True)
class TableOptions:
    """Per-table replication options (``PGSNOW_TABLE_OPTIONS``); every table not listed gets the defaults.

    ``write_mode`` None means the default for the mode (``default_write_mode``): the defaults
    never duplicate a row, however often a table is run (docs/loading.md, "Write modes").
    """

    mode: ExtractMode = ExtractMode.FULL
    cursor_column: str | None = None  # incremental: the column that grows on insert/update
    lookback_seconds: int = 0  # incremental: re-read this far behind the stored watermark
    write_mode: WriteMode | None = None  # None: the mode's default (replace for full, merge for incremental)
    deletes: DeleteMode = DeleteMode.NONE
    value_policy: ValuePolicy = ValuePolicy.FAIL
    file_format: StagedFormat | None = None  # overrides S3_FILE_FORMAT for this table
    allow_duplicates: bool = False  # accept append, which copies rows again on every run
    truncate: TruncateMode = TruncateMode.APPLY  # cdc: what a TRUNCATE in PostgreSQL does

    @property
    def effective_write_mode(self) -> WriteMode:
        """The write mode chosen, or the mode's default when none was."""
        return self.write_mode or default_write_mode(self.mode)


def default_write_mode(mode: ExtractMode) -> WriteMode:
    """What a run writes when the table's options choose no ``write_mode``.

    A full run re-reads the whole table, so ``replace`` makes Snowflake equal to that snapshot,
    deleted rows included (a merge would keep rows deleted in PostgreSQL); an incremental run
    reads only changed rows plus the ones it re-reads at the watermark, so ``merge`` (on the
    primary key, which incremental extraction requires) folds them in without a duplicate.
    """
    return WriteMode.REPLACE if mode is ExtractMode.FULL else WriteMode.MERGE


def cdc_problem(options: TableOptions) -> str | None:
    """Why options cannot go with ``mode: cdc``, or None.

    A change-capture table is written by its changes, applied by primary key (newest first), after a
    full snapshot that replaces the table: no write mode applies, and its deletes are applied,
    hard (the default) or soft.
    """
    if options.mode is not ExtractMode.CDC:
        return None
    if options.write_mode is not None:
        return "mode cdc applies each change by primary key: leave write_mode unset"
    if options.deletes is DeleteMode.NONE:
        return 'mode cdc applies deletes: choose deletes "hard" (the default) or "soft"'
    if options.cursor_column or options.lookback_seconds:
        return "cursor_column and lookback_seconds are for mode incremental, not cdc"
    return None


def duplication_problem(options: TableOptions) -> str | None:
    """Why these options would copy rows into Snowflake more than once, or None when they cannot.

    Only ``append`` can: a full run appends every row again on each run (and the extractor runs
    on a schedule), an incremental run appends again the rows it re-reads at the watermark
    (``cursor >= watermark``, so rows at the boundary are read by two runs) and within the lookback.
    ``allow_duplicates`` is the explicit way to want that anyway.
    """
    if options.effective_write_mode is not WriteMode.APPEND or options.allow_duplicates:
        return None
    if options.mode is ExtractMode.FULL:
        why = "every full run appends every row again, so the second run (e.g. the next scheduled one) duplicates the table"
        choose = 'choose write_mode "replace" (or "merge" on the primary key), or leave write_mode unset'
    else:
        reread = (
            f"the rows within lookback_seconds={options.lookback_seconds} and at the watermark"
            if options.lookback_seconds
            else "the rows at the watermark (the next run reads cursor >= watermark)"
        )
        why = f"every incremental run reads {reread} again, and append copies them a second time"
        choose = 'choose write_mode "merge" (on the primary key), or leave write_mode unset'
    return (
        f"write_mode append with mode {options.mode.value} duplicates rows: {why}; {choose}, "
        'or set "allow_duplicates": true to accept the duplicates'
    )


_TABLE_OPTION_FIELDS: dict[str, type] = {
    "mode": ExtractMode,
    "cursor_column": str,
    "lookback_seconds": int,
    "write_mode": WriteMode,
    "deletes": DeleteMode,
    "value_policy": ValuePolicy,
    "file_format": StagedFormat,
    "allow_duplicates": bool,
    "truncate": TruncateMode,
}


def parse_table_options(text: str, problems: list[str]) -> dict[TableRef, TableOptions]:
    """Parse the JSON object ``{"schema.table": {"mode": "incremental", ...}}``; report problems, never raise."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        problems.append(f"PGSNOW_TABLE_OPTIONS is not valid JSON: {exc}")
        return {}
    if not isinstance(raw, dict):
        problems.append("PGSNOW_TABLE_OPTIONS must be a JSON object keyed by schema.table")
        return {}
    options: dict[TableRef, TableOptions] = {}
    for name, body in raw.items():
        where = f"PGSNOW_TABLE_OPTIONS[{name!r}]"
        try:
            table = TableRef.parse(name)
        except PermanentError as exc:
            problems.append(f"{where}: {exc.message}")
            continue
        if not isinstance(body, dict):
            problems.append(f"{where} must be an object")
            continue
        values: dict[str, Any] = {}
        for key, value in body.items():
            kind = _TABLE_OPTION_FIELDS.get(key)
            if kind is None:
                problems.append(
                    f"{where}: unknown option {key!r} (known: {', '.join(sorted(_TABLE_OPTION_FIELDS))})"
                )
                continue
            try:
                if kind is bool:
                    if not isinstance(value, bool):
                        raise ValueError(value)
                    values[key] = value
                elif kind is int:
                    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                        raise ValueError(value)
                    values[key] = value
                elif kind is str:
                    if not isinstance(value, str) or not value:
                        raise ValueError(value)
                    values[key] = value
                else:
                    values[key] = kind(str(value).lower())
            except ValueError:
                allowed = (
                    ", ".join(e.value for e in kind)
                    if issubclass(kind, StrEnum)
                    else ("true or false" if kind is bool else kind.__name__)
                )
                problems.append(f"{where}: {key} must be {allowed}, got {value!r}")
        if values.get("mode") is ExtractMode.CDC and "deletes" not in values:
            values["deletes"] = (
                DeleteMode.HARD
            )  # a change-capture table mirrors deletes unless told otherwise
        table_options = TableOptions(**values)
        if (cdc := cdc_problem(table_options)) is not None:
            problems.append(f"{where}: {cdc}")
        if table_options.mode is ExtractMode.INCREMENTAL and not table_options.cursor_column:
            problems.append(f"{where}: incremental mode needs cursor_column")
        if (duplication := duplication_problem(table_options)) is not None:
            problems.append(f"{where}: {duplication}")
        options[table] = table_options
    return options


@dataclass(frozen=True)
class PostgresSettings:
    dsn: str | None  # local/test only; deployed functions use secret_arn
    secret_arn: str | None
    statement_timeout_ms: int


@dataclass(frozen=True)
class SnowflakeSettings:
    account: str | None
    user: str | None
    password: str | None  # local/test only
    secret_arn: str | None
    database: str | None
    warehouse: str | None
    role: str | None
    stage: str  # external stage over the staging prefix, in control_schema
    control_schema: str  # where pgsnow keeps its stage and ledger
    storage_integration: str | None
    host: str | None  # set for the local fakesnow server
    port: int | None
    protocol: str
    # The session's LOCK_TIMEOUT in seconds (``lock_timeout_for`` the function's Lambda timeout);
    # None: Snowflake's own (43,200 s), for sessions outside a function (the CLI).
    lock_timeout_s: int | None = None


# Each function that talks to Snowflake is told its own Lambda Timeout by a variable of its own
# (template.yaml sets it from the FunctionTimeouts mapping its Timeout reads; the local stack gives
# each function its template environment, this variable included).
FUNCTION_TIMEOUT_VARIABLES = {Component.LOADER: "LOADER_TIMEOUT_S", Component.CLEANUP: "CLEANUP_TIMEOUT_S"}
# A lock wait may take this share of the function's time (a third): a statement that waits on a lock
# another transaction holds gives up (a RetryableError, its files go back to the queue) while the
# invocation still has the time to load the rest of its batch and report, instead of waiting out
# Snowflake's default LOCK_TIMEOUT of 12 hours until Lambda ends it unreported.
LOCK_TIMEOUT_SHARE = 3


def lock_timeout_for(function_timeout_s: int) -> int:
    """The session LOCK_TIMEOUT (seconds) of a function that has ``function_timeout_s``."""
    return max(1, function_timeout_s // LOCK_TIMEOUT_SHARE)


# A staged file's size is bounded by the extractor's /tmp (two files are on disk at once: one
# uploading, one being written; Lambda's ephemeral storage is at most 10,240 MB).
MAX_TARGET_FILE_MB = 4096
# A chunk's n-th file is batch ``chunk * 10000 + n`` (pgsnow.extract.files): at most 9999 files.
MAX_FILES_PER_CHUNK = 9_999


@dataclass(frozen=True)
class ExtractSettings:
    target_file_mb: int  # cut staged files once they reach this compressed size
    chunk_rows: int | None  # rows per checkpointed key-range chunk; None: sized by bytes
    deadline_margin_s: int  # stop cleanly this long before the Lambda deadline
    function_name: str | None = None  # the runtime's AWS_LAMBDA_FUNCTION_NAME: continuations invoke it
    # Parallel backfill (docs/extraction.md): a full run of a table estimated above two ranges is
    # split into key ranges of about range_rows rows, one SQS message each on range_queue_url,
    # extracted by up to max_workers concurrent invocations (the event source's MaximumConcurrency).
    max_workers: int = 1
    range_rows: int = 5_000_000
    range_queue_url: str | None = None

    @property
    def parallel(self) -> bool:
        """Whether runs may be split into ranges for concurrent workers."""
        return self.max_workers > 1 and bool(self.range_queue_url)


@dataclass(frozen=True)
class CdcSettings:
    """Change capture from one publication through one logical replication slot (docs/change-capture.md)."""

    publication: str = "pgsnow"  # CDC_PUBLICATION
    slot: str = "pgsnow"  # CDC_SLOT: the slot's one consumer is the change-capture function
    max_bytes: int = 512 * 1024 * 1024  # CDC_MAX_MB: stop draining once this much change data is read
    heartbeat: HeartbeatMethod = HeartbeatMethod.MESSAGE  # CDC_HEARTBEAT
    heartbeat_table: str = "public.pgsnow_heartbeat"  # CDC_HEARTBEAT_TABLE (heartbeat "table")
    snapshot_wait_s: int = 300  # CDC_SNAPSHOT_WAIT_S: longest wait for older transactions before a snapshot


@dataclass(frozen=True)
class LoadSettings:
    method: LoadMethod
    on_error: OnError
    insert_max_rows: int  # LOAD_METHOD=insert: files up to this many rows are inserted directly
    snowpipe_name: str | None  # pipe in the control schema (LOAD_METHOD=snowpipe)
    snowpipe_host: str | None  # Snowpipe REST host; defaults to the account's
    allow_create_for_dropped_files: bool  # a hand-dropped file may create its table


@dataclass(frozen=True)
class CleanupSettings:
    archive_prefix: str | None  # move instead of delete
    orphan_age_minutes: int  # staged files older than this with no ledger row are orphans
    retention_days: int  # s3_stage_retention_days: the bucket lifecycle's expiry
    queue_url: str | None  # the loader's queue (orphans are re-enqueued there)
    dlq_url: str | None  # the dead-letter queue (pgsnow status reads it)


@dataclass(frozen=True)
class Settings:
    component: Component
    bucket: str
    prefix: str
    file_format: StagedFormat
    cleanup_mode: CleanupMode
    tables: TableAllowlist
    batch_rows: int | None  # EXTRACT_BATCH_ROWS: an optional row cap per staged file (None: off)
    postgres: PostgresSettings
    snowflake: SnowflakeSettings
    extract: ExtractSettings = ExtractSettings(128, None, 60)
    load: LoadSettings = LoadSettings(LoadMethod.COPY, OnError.ABORT_STATEMENT, 10_000, None, None, False)
    cleanup: CleanupSettings = CleanupSettings(None, 60, 7, None, None)
    table_options_by_name: Mapping[TableRef, TableOptions] = field(default_factory=dict)
    cdc: CdcSettings = CdcSettings()

    def table_options(self, table: TableRef) -> TableOptions:
        """The table's options, or the defaults when PGSNOW_TABLE_OPTIONS does not list it."""
        return self.table_options_by_name.get(table, TableOptions())

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, component: Component = Component.LOCAL
    ) -> Settings:
        env = _EnvReader(os.environ if environ is None else environ, component)
        everyone = {
            Component.EXTRACTOR,
            Component.LOADER,
            Component.CLEANUP,
            Component.CHANGE_CAPTURE,
            Component.LOCAL,
        }
        bucket = env.require("S3_STAGE_BUCKET", needed_by=everyone) or ""
        prefix = "staging"
        try:
            prefix = normalise_prefix(env.get("S3_STAGE_PREFIX", "staging") or "staging")
        except PermanentError as exc:
            env.problems.append(f"S3_STAGE_PREFIX: {exc.message}")
        file_format = env.as_enum("S3_FILE_FORMAT", StagedFormat, StagedFormat.CSV, {})
        cleanup_mode = env.as_enum("CLEANUP_S3_FILES", CleanupMode, CleanupMode.AFTER_ALL, _CLEANUP_ALIASES)
        tables = _read_tables(env)
        batch_rows, extract = _read_extract(env)
        postgres = _read_postgres(env)
        snowflake = _read_snowflake(env)
        load = _read_load(env, snowflake)
        cleanup = CleanupSettings(
            archive_prefix=env.get("CLEANUP_ARCHIVE_PREFIX"),
            orphan_age_minutes=env.as_int("CLEANUP_ORPHAN_AGE_MINUTES", 60, 1),
            retention_days=env.as_int("S3_STAGE_RETENTION_DAYS", 7, 1),
            queue_url=env.get("LOADER_QUEUE_URL"),
            dlq_url=env.get("LOADER_DLQ_URL"),
        )
        table_options = _read_table_options(env, tables)
        cdc = _read_cdc(env)
        if env.problems:
            raise ConfigError(env.problems)
        return cls(
            component=component,
            bucket=bucket,
            prefix=prefix,
            file_format=file_format,
            cleanup_mode=cleanup_mode,
            tables=tables,
            batch_rows=batch_rows,
            postgres=postgres,
            snowflake=snowflake,
            extract=extract,
            load=load,
            cleanup=cleanup,
            table_options_by_name=table_options,
            cdc=cdc,
        )


class _EnvReader:
    """Typed reads of one environment for one component, collecting every problem."""

    def __init__(self, env: Mapping[str, str], component: Component) -> None:
        self.env = env
        self.component = component
        self.problems: list[str] = []

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        return value.strip() if value is not None and value.strip() != "" else default

    def require(self, name: str, *, needed_by: set[Component]) -> str | None:
        value = self.get(name)
        if value is None and self.component in needed_by:
            self.problems.append(f"{name} is required for the {self.component.value}")
        return value

    def as_int(self, name: str, default: int, minimum: int) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name} must be an integer, got {raw!r}")
            return default
        if value < minimum:
            self.problems.append(f"{name} must be >= {minimum}, got {value}")
        return value

    def as_enum(self, name: str, enum: type[E], default: E, aliases: Mapping[str, E]) -> E:
        raw = (self.get(name) or default.value).lower()
        if raw in aliases:
            return aliases[raw]
        try:
            return enum(raw)
        except ValueError:
            allowed = sorted([e.value for e in enum] + list(aliases))
            self.problems.append(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
            return default


def _read_tables(env: _EnvReader) -> TableAllowlist:
    tables_text = env.get("PGSNOW_TABLES")
    if tables_text is None and env.component is Component.EXTRACTOR:
        env.problems.append(
            "PGSNOW_TABLES (the table allowlist, e.g. public.customers,public.orders) is required"
        )
    try:
        return TableAllowlist.parse(tables_text or "")
    except PermanentError as exc:
        env.problems.append(f"PGSNOW_TABLES: {exc.message}")
        return TableAllowlist([])


def _read_extract(env: _EnvReader) -> tuple[int | None, ExtractSettings]:
    """The file row cap (EXTRACT_BATCH_ROWS) and the extract settings; 0 or unset means off
    (files cut by size only) and chunks sized by bytes (pgsnow.extract.files.chunk_rows_for)."""
    target_mb = env.as_int("EXTRACT_TARGET_FILE_MB", 128, 1)
    if target_mb > MAX_TARGET_FILE_MB:
        env.problems.append(
            f"EXTRACT_TARGET_FILE_MB must be <= {MAX_TARGET_FILE_MB} (two files of that size are on "
            f"the extractor's disk at once), got {target_mb}"
        )
    batch_rows = env.as_int("EXTRACT_BATCH_ROWS", 0, 0) or None
    chunk_rows = env.as_int("EXTRACT_CHUNK_ROWS", 0, 0) or None
    if (
        batch_rows is not None
        and chunk_rows is not None
        and -(-chunk_rows // batch_rows) > MAX_FILES_PER_CHUNK
    ):
        env.problems.append(
            f"EXTRACT_CHUNK_ROWS {chunk_rows} / EXTRACT_BATCH_ROWS {batch_rows} would cut a chunk into more "
            f"than {MAX_FILES_PER_CHUNK} files: raise EXTRACT_BATCH_ROWS (or set it to 0) or lower "
            "EXTRACT_CHUNK_ROWS"
        )
    extract = ExtractSettings(
        target_file_mb=target_mb,
        chunk_rows=chunk_rows,
        deadline_margin_s=env.as_int("EXTRACT_DEADLINE_MARGIN_S", 60, 0),
        function_name=env.get("AWS_LAMBDA_FUNCTION_NAME"),
        max_workers=env.as_int("EXTRACT_MAX_WORKERS", 1, 1),
        range_rows=env.as_int("EXTRACT_RANGE_ROWS", 5_000_000, 1),
        range_queue_url=env.get("EXTRACT_RANGE_QUEUE_URL"),
    )
    return batch_rows, extract


def _read_cdc(env: _EnvReader) -> CdcSettings:
    defaults = CdcSettings()
    return CdcSettings(
        publication=env.get("CDC_PUBLICATION", defaults.publication) or defaults.publication,
        slot=env.get("CDC_SLOT", defaults.slot) or defaults.slot,
        max_bytes=env.as_int("CDC_MAX_MB", defaults.max_bytes // (1024 * 1024), 1) * 1024 * 1024,
        heartbeat=env.as_enum("CDC_HEARTBEAT", HeartbeatMethod, defaults.heartbeat, {}),
        heartbeat_table=env.get("CDC_HEARTBEAT_TABLE", defaults.heartbeat_table) or defaults.heartbeat_table,
        snapshot_wait_s=env.as_int("CDC_SNAPSHOT_WAIT_S", defaults.snapshot_wait_s, 0),
    )


def _read_postgres(env: _EnvReader) -> PostgresSettings:
    pg_dsn, pg_secret = env.get("PGSNOW_PG_DSN"), env.get("PGSNOW_PG_SECRET_ARN")
    if env.component is Component.EXTRACTOR and not (pg_dsn or pg_secret):
        env.problems.append(
            "PGSNOW_PG_SECRET_ARN (or PGSNOW_PG_DSN for local runs) is required for the extractor"
        )
    return PostgresSettings(pg_dsn, pg_secret, env.as_int("PG_STATEMENT_TIMEOUT_MS", 0, 0))


def _read_snowflake(env: _EnvReader) -> SnowflakeSettings:
    sf_secret = env.get("SNOWFLAKE_SECRET_ARN")
    sf_needed = {Component.LOADER}
    account = env.get("SNOWFLAKE_ACCOUNT")
    if env.component in sf_needed and not (sf_secret or account):
        env.problems.append(
            "SNOWFLAKE_SECRET_ARN (or SNOWFLAKE_ACCOUNT for local runs) is required for the loader"
        )
    database = env.require("SNOWFLAKE_DATABASE", needed_by=sf_needed)
    port = None
    if env.get("SNOWFLAKE_PORT") is not None:
        port = env.as_int("SNOWFLAKE_PORT", 443, 1)
    protocol = (env.get("SNOWFLAKE_PROTOCOL", "https") or "https").lower()
    if protocol not in {"http", "https"}:
        env.problems.append(f"SNOWFLAKE_PROTOCOL must be http or https, got {protocol!r}")
    timeout_variable = FUNCTION_TIMEOUT_VARIABLES.get(env.component)
    function_timeout_s = 0 if timeout_variable is None else env.as_int(timeout_variable, 0, 0)
    return SnowflakeSettings(
        account=account,
        user=env.get("SNOWFLAKE_USER"),
        password=env.get("SNOWFLAKE_PASSWORD"),
        secret_arn=sf_secret,
        database=database,
        warehouse=env.get("SNOWFLAKE_WAREHOUSE"),
        role=env.get("SNOWFLAKE_ROLE"),
        stage=env.get("SNOWFLAKE_STAGE", "PGSNOW_STAGE") or "PGSNOW_STAGE",
        control_schema=env.get("SNOWFLAKE_CONTROL_SCHEMA", DEFAULT_CONTROL_SCHEMA) or DEFAULT_CONTROL_SCHEMA,
        storage_integration=env.get("SNOWFLAKE_STORAGE_INTEGRATION"),
        host=env.get("SNOWFLAKE_HOST"),
        port=port,
        protocol=protocol,
        lock_timeout_s=lock_timeout_for(function_timeout_s) if function_timeout_s else None,
    )


def _read_load(env: _EnvReader, snowflake: SnowflakeSettings) -> LoadSettings:
    load_method = env.as_enum("LOAD_METHOD", LoadMethod, LoadMethod.COPY, {})
    raw_on_error = (env.get("LOAD_ON_ERROR") or OnError.ABORT_STATEMENT.value).upper()
    on_error = OnError.ABORT_STATEMENT
    try:
        on_error = OnError(raw_on_error)
    except ValueError:
        env.problems.append(
            f"LOAD_ON_ERROR must be one of {', '.join(e.value for e in OnError)}, got {raw_on_error!r}"
        )
    snowpipe_name = env.get("SNOWPIPE_NAME")
    snowpipe_loader = load_method is LoadMethod.SNOWPIPE and env.component is Component.LOADER
    if snowpipe_loader and not snowpipe_name:
        env.problems.append("SNOWPIPE_NAME is required when LOAD_METHOD=snowpipe")
    if snowpipe_loader and not snowflake.storage_integration:
        env.problems.append(
            "LOAD_METHOD=snowpipe needs SNOWFLAKE_STORAGE_INTEGRATION: without an integration the stage "
            "reads S3 with the loader's temporary AWS credentials, and Snowpipe loads after the loader "
            "has returned, when those credentials may have expired"
        )
    return LoadSettings(
        method=load_method,
        on_error=on_error,
        insert_max_rows=env.as_int("LOAD_INSERT_MAX_ROWS", 10_000, 1),
        snowpipe_name=snowpipe_name,
        snowpipe_host=env.get("SNOWPIPE_HOST"),
        allow_create_for_dropped_files=(
            env.get("LOAD_CREATE_TABLES_FOR_DROPPED_FILES", "false") or ""
        ).lower()
        in {"1", "true", "yes"},
    )


def _read_table_options(env: _EnvReader, tables: TableAllowlist) -> dict[TableRef, TableOptions]:
    options_text = env.get("PGSNOW_TABLE_OPTIONS")
    if not options_text:
        return {}
    table_options = parse_table_options(options_text, env.problems)
    if not tables.allows_any:
        for listed in table_options:
            if listed not in tables.tables:
                env.problems.append(
                    f"PGSNOW_TABLE_OPTIONS names {listed.qualified}, which is not in PGSNOW_TABLES"
                )
    return table_options


# libpq's own environment variables, mapped to DSN keywords (see the libpq docs, "Environment Variables").
LIBPQ_ENV_KEYWORDS = {
    "PGHOST": "host",
    "PGHOSTADDR": "hostaddr",
    "PGPORT": "port",
    "PGDATABASE": "dbname",
    "PGUSER": "user",
    "PGPASSWORD": "password",
    "PGSERVICE": "service",
    "PGSSLMODE": "sslmode",
    "PGCONNECT_TIMEOUT": "connect_timeout",
}


def postgres_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """PGSNOW_PG_DSN and the libpq ``PG*`` variables that are set, for tools that locate a local server."""
    env = os.environ if environ is None else environ
    wanted = {"PGSNOW_PG_DSN", *LIBPQ_ENV_KEYWORDS}
    return {name: value for name, value in env.items() if name in wanted and value.strip()}
