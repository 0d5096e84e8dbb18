"""SQL that reads staged files: the stage (or the session's temporary stage with the loader's
credentials), COPY, the Snowpipe pipe, and the INSERT of ``LOAD_METHOD=insert``.

Every path converts a staged value into its column the same way (``LoadColumn``): COPY's
SELECT expressions, a pipe's COPY (the loader's COPY without FILES) and INSERT's casts.
Stage paths, ``FILES = (...)`` and ``CREDENTIALS = (...)`` cannot be bound: they are built only
from names ``keys.parse_data_key`` parsed and credentials ``AwsCredentials`` validated, each
written as a string literal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pgsnow.config import OnError
from pgsnow.errors import ConfigError, PermanentError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified, snowflake_name
from pgsnow.keys import FileFormat, StagedObject
from pgsnow.manifest import Column
from pgsnow.snowflake.sql_text import placeholder_list, string_literal
from pgsnow.typemap import ValueKind

MAX_FILES_PER_COPY = 1000  # Snowflake's limit for FILES = (...)


# Characters a stage sub-path may hold without quoting; anything else is moved into FILES.
_PLAIN_PATH_PART = re.compile(r"^[A-Za-z0-9_$.\-]+$")


@dataclass(frozen=True)
class LoadColumn:
    """A target column and how its staged value is turned into the column's value."""

    source_name: str  # name in the staged file (the PostgreSQL name, exact case)
    snowflake_name: str
    kind: ValueKind
    snowflake_type: str

    @classmethod
    def from_manifest(cls, column: Column) -> LoadColumn:
        return cls(column.name, column.snowflake_name, column.kind, column.snowflake_type)


# INFORMATION_SCHEMA.COLUMNS.DATA_TYPE -> how a staged value is converted into it.
_KIND_BY_DATA_TYPE: Mapping[str, ValueKind] = {
    "VARIANT": ValueKind.JSON,
    "OBJECT": ValueKind.JSON,
    "ARRAY": ValueKind.JSON,
    "BINARY": ValueKind.BINARY,
    "BOOLEAN": ValueKind.BOOLEAN,
    "DATE": ValueKind.DATE,
    "TIME": ValueKind.TIME,
    "TIMESTAMP_NTZ": ValueKind.TIMESTAMP,
    "TIMESTAMP_TZ": ValueKind.TIMESTAMPTZ,
    "TIMESTAMP_LTZ": ValueKind.TIMESTAMPTZ,
    "FLOAT": ValueKind.FLOAT,
    "NUMBER": ValueKind.DECIMAL,
    "GEOMETRY": ValueKind.GEOMETRY,
    "GEOGRAPHY": ValueKind.GEOGRAPHY,
}


def load_columns_from_table(rows: Sequence[tuple[str, str]]) -> list[LoadColumn]:
    """LoadColumns for an existing table from (COLUMN_NAME, DATA_TYPE) rows.

    The staged file's column name is the inverse of the case policy: an upper-case
    name is looked for as its lower-case PostgreSQL spelling (``ORDER_ID`` -> ``order_id``).
    """
    columns = []
    for name, data_type in rows:
        lowered = name.lower()
        source_name = lowered if snowflake_name(lowered) == name else name
        kind = _KIND_BY_DATA_TYPE.get(data_type.upper(), ValueKind.TEXT)
        sf_type = "VARCHAR" if data_type.upper() == "TEXT" else data_type.upper()
        columns.append(LoadColumn(source_name, name, kind, sf_type))
    return columns


# --------------------------------------------------------------------------- stages and their credentials


def build_create_stage(
    database: str,
    control_schema: str,
    stage: str,
    *,
    bucket: str,
    prefix: str,
    storage_integration: str | None,
    replace: bool = False,
) -> str:
    """The external stage over the staging prefix (``s3://{bucket}/{prefix}/``); ``replace`` makes
    it ``CREATE OR REPLACE`` (kept otherwise, so a setup can be re-run).

    It authenticates with the storage integration. Without one (the credentials method) no
    permanent stage is needed: the loader reads through ``build_create_temporary_stage``.
    """
    url = f"s3://{bucket}/{prefix.strip('/')}/"
    integration = f" STORAGE_INTEGRATION = {quote_ident(storage_integration)}" if storage_integration else ""
    create = "CREATE OR REPLACE STAGE" if replace else "CREATE STAGE IF NOT EXISTS"
    return f"{create} {quote_qualified(database, control_schema, stage)} URL = {string_literal(url)}{integration}"


# What the CREDENTIALS clause accepts. AWS access key ids are letters and digits; secret keys and
# session tokens are base64 text. Checked before the values are written into SQL (they cannot be
# bound), and the check never echoes a value.
_AWS_KEY_ID = re.compile(r"^[A-Za-z0-9]{1,128}$")
_AWS_SECRET = re.compile(r"^[A-Za-z0-9/+=]{1,256}$")
_AWS_TOKEN = re.compile(r"^[A-Za-z0-9/+=]{1,4096}$")


@dataclass(frozen=True, repr=False)
class AwsCredentials:
    """Temporary AWS credentials Snowflake reads S3 with (the credentials method, no integration).

    ``repr`` shows only the key id's first characters, so a stray log of the object is harmless.
    """

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __post_init__(self) -> None:
        problems = [
            name
            for name, value, pattern in (
                ("access key id", self.access_key_id, _AWS_KEY_ID),
                ("secret access key", self.secret_access_key, _AWS_SECRET),
                ("session token", self.session_token or "x", _AWS_TOKEN),
            )
            if not pattern.match(value)
        ]
        if problems:
            raise PermanentError(f"the AWS credentials for the stage are malformed: {', '.join(problems)}")

    def __repr__(self) -> str:
        return f"AwsCredentials(access_key_id={self.access_key_id[:4]!r}...)"

    @property
    def fingerprint(self) -> str:
        """Tells two sets of credentials apart without keeping the secret parts in the clear."""
        text = f"{self.access_key_id}\n{self.session_token or ''}\n{self.secret_access_key}"
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def secret_values(self) -> tuple[str, ...]:
        """The parts that must never reach a log line or an error message."""
        return tuple(v for v in (self.secret_access_key, self.session_token) if v)


class _FrozenCredentials(Protocol):
    access_key: str
    secret_key: str
    token: str | None


class _BotoCredentials(Protocol):
    def get_frozen_credentials(self) -> _FrozenCredentials: ...


class CredentialsSource(Protocol):
    """Anything with boto3.Session's ``get_credentials()``: the loader's own AWS session."""

    def get_credentials(self) -> _BotoCredentials | None: ...


def aws_credentials_from(source: CredentialsSource) -> AwsCredentials:
    """The session's current credentials, frozen (one consistent key, secret and token).

    botocore refreshes refreshable credentials within 15 minutes of their expiry when they are
    read, so credentials near expiry come back as new ones (and the stage is re-created).
    """
    credentials = source.get_credentials()
    if credentials is None:
        raise PermanentError(
            "no AWS credentials for the Snowflake stage: set SNOWFLAKE_STORAGE_INTEGRATION or run the "
            "loader with an AWS role"
        )
    frozen = credentials.get_frozen_credentials()
    return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token or None)


def build_credentials_clause(credentials: AwsCredentials) -> str:
    """``CREDENTIALS = (...)``: built from validated values only, each a string literal."""
    token = f" AWS_TOKEN = {string_literal(credentials.session_token)}" if credentials.session_token else ""
    return (
        f"CREDENTIALS = (AWS_KEY_ID = {string_literal(credentials.access_key_id)} "
        f"AWS_SECRET_KEY = {string_literal(credentials.secret_access_key)}{token})"
    )


def build_create_temporary_stage(
    database: str, control_schema: str, stage: str, *, bucket: str, prefix: str, credentials: AwsCredentials
) -> str:
    """The credentials method: the session's own stage over the staging prefix.

    A TEMPORARY stage belongs to this session only and, named like the permanent stage, hides it
    for this session, so the loader's COPY text is the same with or without an integration, and
    concurrent loader containers (each its own session) never replace each other's credentials.
    """
    url = f"s3://{bucket}/{prefix.strip('/')}/"
    return (
        f"CREATE OR REPLACE TEMPORARY STAGE {quote_qualified(database, control_schema, stage)}"
        f" URL = {string_literal(url)} {build_credentials_clause(credentials)}"
    )


# --------------------------------------------------------------------------- COPY


_CSV_FORMAT_OPTIONS = (
    "TYPE = CSV COMPRESSION = {compression} FIELD_DELIMITER = ',' SKIP_HEADER = 1",
    "FIELD_OPTIONALLY_ENCLOSED_BY = '\"' ESCAPE_UNENCLOSED_FIELD = NONE",
    "NULL_IF = () EMPTY_FIELD_AS_NULL = TRUE",
)
# A COPY's inline options continue under the first one, inside ``FILE_FORMAT = (``.
_INLINE_OPTIONS_BREAK = "\n" + " " * len("  FILE_FORMAT = (")


def csv_file_format(compression: str, *, separator: str = _INLINE_OPTIONS_BREAK) -> str:
    """The CSV options every load reads staged CSV with (as the extractor writes it)."""
    return separator.join(_CSV_FORMAT_OPTIONS).format(compression=compression)


@dataclass(frozen=True)
class UrlSource:
    """Read from an ``s3://`` URL instead of the named stage (the deletes key list).

    With a storage integration the COPY names it; without one the COPY carries the loader's
    temporary credentials (the credentials method). Credentials are never logged:
    ``redact_credentials`` strips them from SQL before it reaches a log line or an error.
    """

    bucket: str
    storage_integration: str | None = None
    credentials: AwsCredentials | None = None


def build_copy_into(
    *,
    database: str,
    control_schema: str,
    stage: str,
    staged: StagedObject | Sequence[StagedObject],
    columns: Sequence[LoadColumn],
    on_error: str = "ABORT_STATEMENT",
    target: tuple[str, str, str] | None = None,
    url_source: UrlSource | None = None,
    name_files: bool = True,
    force: bool = True,
) -> str:
    """COPY staged files of one table into it, in the shape of docs/architecture.md.

    ``staged`` comes from ``keys.parse_data_key`` (validated and allowlisted by the caller),
    so the stage path and FILES literal are built only from names we parsed. Several files
    (one table, one format, at most ``MAX_FILES_PER_COPY``) go into one ``FILES = (...)``.
    ``target`` (database, schema, table) loads into another table with the same columns
    (merge staging, replace shadow); ``url_source`` reads ``s3://`` instead of the stage.

    ``name_files=False`` leaves FILES out, so the COPY reads what its location holds, and
    ``force=False`` leaves out FORCE = TRUE, so it keeps Snowflake's load metadata: the shape of
    a pipe's COPY (Snowpipe names the files, and the loader's ledger, not FORCE, decides whether
    a file is loaded again).

    From a URL the COPY is Snowflake's standard load, not a transformation: its documented
    grammar takes ``FROM (SELECT ...)`` only from a stage, and puts the location's
    STORAGE_INTEGRATION or CREDENTIALS right after the location, before FILES. Columns then load
    by position, so ``target`` must have the file's columns in the file's order (the deletes
    keys table is created from the key columns, as the key list is written).
    """
    files = [staged] if isinstance(staged, StagedObject) else list(staged)
    _check_copy(files, columns, on_error)
    first = files[0]
    target_name = (
        quote_qualified(*target)
        if target
        else quote_qualified(database, first.table.snowflake_schema, first.table.snowflake_table)
    )
    file_format = (
        csv_file_format("GZIP" if first.gzip else "NONE")
        if first.file_format is FileFormat.CSV
        else "TYPE = PARQUET"
    )
    if url_source is not None:
        location = string_literal(f"s3://{url_source.bucket}/{_dir_of(first.key)}")
        head = f"COPY INTO {target_name}\n  FROM {location}\n{_url_auth(url_source)}"
        file_names = [item.file_name for item in files]
    else:
        location, file_names = _stage_location_of(database, control_schema, stage, files)
        column_list = ", ".join(quote_ident(c.snowflake_name) for c in columns)
        if first.file_format is FileFormat.CSV:
            expressions = [_csv_select_expression(i, c) for i, c in enumerate(columns, start=1)]
        else:
            expressions = [_parquet_select_expression(c) for c in columns]
        head = f"COPY INTO {target_name} ({column_list})\n  FROM (SELECT {', '.join(expressions)} FROM {location})\n"
    files_line = (
        f"  FILES = ({', '.join(string_literal(name) for name in file_names)})\n" if name_files else ""
    )
    force_option = " FORCE = TRUE" if force else ""
    return f"{head}{files_line}  FILE_FORMAT = ({file_format})\n  ON_ERROR = {on_error}{force_option}"


def _check_copy(files: Sequence[StagedObject], columns: Sequence[LoadColumn], on_error: str) -> None:
    """One COPY loads 1..MAX_FILES_PER_COPY safely named files of one table and one format."""
    if not files:
        raise PermanentError("no files to COPY")
    first = files[0]
    if not columns:
        raise PermanentError("no columns to load", table=first.table.qualified, s3_key=first.key)
    if len(files) > MAX_FILES_PER_COPY:
        raise PermanentError(f"one COPY takes at most {MAX_FILES_PER_COPY} files, got {len(files)}")
    for item in files:
        if "/" in item.file_name or item.file_name in {".", ".."}:
            raise PermanentError("unsafe staged file name", s3_key=item.key)
        if (item.table, item.file_format, item.gzip) != (first.table, first.file_format, first.gzip):
            raise PermanentError("one COPY loads files of one table and one format", s3_key=item.key)
    if on_error not in {e.value for e in OnError}:
        raise ConfigError(
            [f"ON_ERROR must be one of {', '.join(e.value for e in OnError)}, got {on_error!r}"]
        )


def _stage_location_of(
    database: str, control_schema: str, stage: str, files: Sequence[StagedObject]
) -> tuple[str, list[str]]:
    """(stage location, FILES paths relative to it) of files of one table: the table's folder,
    or the stage root when the table's names cannot be a bare stage path (``_stage_location``)."""
    located = [_stage_location(database, control_schema, stage, item) for item in files]
    if len({location for location, _ in located}) != 1:
        located = [(f"@{quote_qualified(database, control_schema, stage)}/", _stage_path(i)) for i in files]
    return located[0][0], [path for _, path in located]


def _dir_of(key: str) -> str:
    return key.rsplit("/", 1)[0] + "/"


def _stage_path(staged: StagedObject) -> str:
    return f"{staged.table.schema}/{staged.table.table}/{staged.file_name}"


def _url_auth(source: UrlSource) -> str:
    if source.storage_integration:
        return f"  STORAGE_INTEGRATION = {quote_ident(source.storage_integration)}\n"
    if source.credentials is not None:
        return f"  {build_credentials_clause(source.credentials)}\n"
    return ""


def _stage_location(database: str, control_schema: str, stage: str, staged: StagedObject) -> tuple[str, str]:
    """(stage location, file path for FILES) for a staged object.

    The documented shape is ``@stage/{schema}/{table}/`` with FILES = ('{file}'). A schema or
    table name with characters a bare stage path cannot carry (spaces, quotes, unicode) is moved
    into the FILES literal instead, which names the same object relative to the stage root.
    """
    stage_ref = "@" + quote_qualified(database, control_schema, stage)
    parts = (staged.table.schema, staged.table.table)
    if all(_PLAIN_PATH_PART.match(p) and p not in {".", ".."} for p in parts):
        return f"{stage_ref}/{parts[0]}/{parts[1]}/", staged.file_name
    return f"{stage_ref}/", f"{parts[0]}/{parts[1]}/{staged.file_name}"


def stage_file_path(database: str, control_schema: str, stage: str, staged: StagedObject) -> str:
    """The file's path relative to its table's stage location: what insertFiles names."""
    return _stage_location(database, control_schema, stage, staged)[1]


def _extension_type_expression(column: LoadColumn, text: str) -> str | None:
    """The staged text of a vector or PostGIS value as its Snowflake value; None for other kinds.

    Snowflake loads no VECTOR column directly from a file: the documented route is an ARRAY cast
    to the VECTOR (the array's length must equal the dimension, or the cast fails: never a
    silent truncation). Geometries are staged as EWKB hex, which TO_GEOMETRY/TO_GEOGRAPHY read
    with the SRID the EWKB carries.
    """
    match column.kind:
        case ValueKind.VECTOR:
            return f"PARSE_JSON({text})::ARRAY::{column.snowflake_type}"
        case ValueKind.GEOMETRY:
            return f"TO_GEOMETRY({text})"
        case ValueKind.GEOGRAPHY:
            return f"TO_GEOGRAPHY({text})"
    return None


def _csv_select_expression(position: int, column: LoadColumn) -> str:
    return _from_csv_text(column, f"${position}", cast=False)


def _from_csv_text(column: LoadColumn, text: str, *, cast: bool) -> str:
    """The column's value from the text of its CSV field (the COPY's ``$n``, INSERT's bound value).

    JSON, binary and the extension types need a function; for the other kinds a COPY converts
    the text into the target column itself, while INSERT's ``SELECT ... FROM VALUES`` has only
    text and needs the ``cast``.
    """
    if (extension := _extension_type_expression(column, text)) is not None:
        return extension
    if column.kind is ValueKind.JSON:
        return f"PARSE_JSON({text})"
    if column.kind is ValueKind.BINARY:
        return f"TO_BINARY({text}, 'HEX')"
    return f"CAST({text} AS {column.snowflake_type})" if cast else text


def _parquet_select_expression(column: LoadColumn) -> str:
    value = f"$1:{quote_ident(column.source_name)}"
    if (extension := _extension_type_expression(column, f"{value}::VARCHAR")) is not None:
        return extension
    if column.kind is ValueKind.JSON:
        return f"PARSE_JSON({value}::VARCHAR)"
    return f"{value}::{column.snowflake_type}"


def build_query_tag(*, run_id: str | None, table: TableRef, s3_key: str) -> str:
    """Tag the session's queries with the run and table (visible in QUERY_HISTORY).

    ALTER SESSION takes no bind variables, so the tag is a JSON literal of validated names.
    """
    tag = json.dumps({"app": "pgsnow", "run_id": run_id, "table": table.qualified, "s3_key": s3_key})
    return f"ALTER SESSION SET QUERY_TAG = {string_literal(tag)}"


# --------------------------------------------------------------------------- Snowpipe


def build_create_file_format(database: str, control_schema: str, name: str, file_format: FileFormat) -> str:
    """A named file format with the options the loader's COPY gives inline (for pipes and people)."""
    options = csv_file_format("AUTO", separator=" ") if file_format is FileFormat.CSV else "TYPE = PARQUET"
    return f"CREATE FILE FORMAT IF NOT EXISTS {quote_qualified(database, control_schema, name)} {options}"


def build_create_pipe(
    database: str, control_schema: str, pipe: str, copy_sql: str, *, replace: bool = False
) -> str:
    """A pipe over ``copy_sql``, a COPY without FILES (Snowpipe names the files) and without
    FORCE; ``replace`` makes it ``CREATE OR REPLACE`` (kept otherwise).

    AUTO_INGEST stays FALSE: the loader calls insertFiles itself, so the ledger sees every file.
    """
    create = "CREATE OR REPLACE PIPE" if replace else "CREATE PIPE IF NOT EXISTS"
    return f"{create} {quote_qualified(database, control_schema, pipe)} AUTO_INGEST = FALSE AS\n{copy_sql}"


def build_table_pipe(
    *,
    database: str,
    control_schema: str,
    stage: str,
    pipe: str,
    staged: StagedObject,
    columns: Sequence[LoadColumn],
    replace: bool = False,
) -> str:
    """LOAD_METHOD=snowpipe: the table's pipe, whose COPY is the loader's own (same columns and
    conversions as ``build_copy_into``) over the table's folder of the stage, naming no files."""
    copy_sql = build_copy_into(
        database=database,
        control_schema=control_schema,
        stage=stage,
        staged=staged,
        columns=columns,
        name_files=False,
        force=False,
    )
    return build_create_pipe(database, control_schema, pipe, copy_sql, replace=replace)


# --------------------------------------------------------------------------- LOAD_METHOD=insert


def build_insert_rows(target: tuple[str, str, str], columns: Sequence[LoadColumn]) -> str:
    """LOAD_METHOD=insert: rows of bound CSV field texts, converted like the CSV COPY converts them.

    One ``VALUES`` row of ``%s`` placeholders: ``cursor.executemany`` (pyformat) repeats it for
    every row of the batch, binding each value (the connector escapes it), in ONE statement.
    """
    names = ", ".join(quote_ident(c.snowflake_name) for c in columns)
    values = ", ".join(
        _from_csv_text(c, quote_ident(f"COLUMN{i}"), cast=True) for i, c in enumerate(columns, start=1)
    )
    placeholders = placeholder_list(columns, empty_error="no columns to insert")
    return f"INSERT INTO {quote_qualified(*target)} ({names})\nSELECT {values}\nFROM VALUES ({placeholders})"
