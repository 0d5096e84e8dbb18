"""Snowflake: the connection factory, the SQL the loader sends, and the one error classifier.

SQL is built by pure functions so each shape can be read and unit-tested as text.
Every identifier goes through ``quote_ident``/``quote_qualified``. Values are bound
with the connector's ``pyformat`` paramstyle (``%s`` placeholders, ``PARAMSTYLE``), the one
paramstyle of the project (the connector's default, and the same placeholder psycopg2
uses): the connector escapes each value, it is never formatted into the text by us. Things Snowflake cannot bind (stage paths, ``FILES = (...)``, the session
query tag, the credentials method's ``CREDENTIALS = (...)``) are built only from values we
parsed and validated, and are escaped as string literals on top of that. SQL that carries
credentials never reaches a log line or an error message (``redact_credentials``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pgsnow.config import OnError, SnowflakeSettings
from pgsnow.errors import ConfigError, PermanentError, PgSnowError, RetryableError, aws_error_code
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified, snowflake_name
from pgsnow.keys import FileFormat, StagedObject
from pgsnow.manifest import Column
from pgsnow.typemap import ValueKind

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from snowflake.connector import SnowflakeConnection

PARAMSTYLE = "pyformat"
MAX_FILES_PER_COPY = 1000  # Snowflake's limit for FILES = (...)

# Characters a stage sub-path may hold without quoting; anything else is moved into FILES.
_PLAIN_PATH_PART = re.compile(r"^[A-Za-z0-9_$.\-]+$")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


# --------------------------------------------------------------------------- connection


def connect(
    settings: SnowflakeSettings,
    *,
    secrets_client: SecretsManagerClient | None = None,
    **extra: Any,
) -> SnowflakeConnection:
    """Open a connection: key-pair auth from Secrets Manager when deployed, a password locally.

    ``extra`` is passed to the connector as is (tests use it for emulator session parameters).
    """
    import snowflake.connector

    kwargs = connection_kwargs(settings, secrets_client=secrets_client)
    kwargs.update(extra)
    try:
        return snowflake.connector.connect(**kwargs)
    except snowflake.connector.errors.Error as exc:
        raise classify_snowflake_error(exc) from exc


def connection_kwargs(
    settings: SnowflakeSettings, *, secrets_client: SecretsManagerClient | None = None
) -> dict[str, Any]:
    """The connector arguments for these settings (the secret is read here when configured)."""
    kwargs: dict[str, Any] = {
        "account": settings.account,
        "user": settings.user,
        "database": settings.database,
        # A current schema: fully qualified SQL does not need one, but the local emulator's MERGE does.
        "schema": settings.control_schema,
        "warehouse": settings.warehouse,
        "role": settings.role,
        "paramstyle": PARAMSTYLE,
        "autocommit": True,
        "application": "pgsnow",
        "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
    }
    if settings.secret_arn:
        if secrets_client is None:
            import boto3

            secrets_client = boto3.Session().client("secretsmanager")
        secret = read_key_pair_secret(secrets_client, settings.secret_arn)
        kwargs.update(secret)
    elif settings.password:
        kwargs["password"] = settings.password
    else:
        raise ConfigError(["Snowflake needs SNOWFLAKE_SECRET_ARN (key pair) or SNOWFLAKE_PASSWORD (local)"])
    if settings.host:
        kwargs["host"] = settings.host
        kwargs["protocol"] = settings.protocol
    if settings.port:
        kwargs["port"] = settings.port
    return {k: v for k, v in kwargs.items() if v is not None}


def read_key_pair_secret(client: SecretsManagerClient, secret_arn: str) -> dict[str, Any]:
    """account, user (and role, warehouse) and the loaded ``private_key`` from the Snowflake secret."""
    from botocore.exceptions import BotoCoreError, ClientError
    from cryptography.hazmat.primitives import serialization

    try:
        text = client.get_secret_value(SecretId=secret_arn)["SecretString"]
    except ClientError as exc:
        code = aws_error_code(exc)
        if code in {"ResourceNotFoundException", "AccessDeniedException", "InvalidRequestException"}:
            raise PermanentError(f"cannot read the Snowflake secret: {code}") from exc
        raise RetryableError(f"reading the Snowflake secret failed: {code or exc}") from exc
    except BotoCoreError as exc:
        raise RetryableError(f"reading the Snowflake secret failed: {type(exc).__name__}") from exc
    try:
        body = json.loads(text)
        passphrase = body.get("private_key_passphrase")
        private_key = serialization.load_pem_private_key(
            body["private_key"].encode(), password=passphrase.encode() if passphrase else None
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Never echo the secret: only the kind of problem.
        raise PermanentError(
            f"the Snowflake secret must be JSON with account, user and a PEM private_key ({type(exc).__name__})"
        ) from exc
    found = {"private_key": private_key}
    for name in ("account", "user", "role", "warehouse"):
        if body.get(name):
            found[name] = body[name]
    missing = [name for name in ("account", "user") if name not in found]
    if missing:
        raise PermanentError(f"the Snowflake secret is missing {', '.join(missing)}")
    return found


# --------------------------------------------------------------------------- SQL builders

Statement = tuple[str, tuple[Any, ...]]


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


def string_literal(value: str) -> str:
    """A Snowflake single-quoted string literal, for the few places that cannot be bound."""
    if _CONTROL_CHARS.search(value):
        raise PermanentError(f"control character in a value that must be written into SQL: {value[:40]!r}")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def build_create_schema(database: str, schema: str) -> str:
    return f"CREATE SCHEMA IF NOT EXISTS {quote_qualified(database, schema)}"


def build_create_table(database: str, columns: Sequence[Column], table: TableRef) -> str:
    """CREATE TABLE IF NOT EXISTS from the manifest's columns, NOT NULL where the source is."""
    if not columns:
        raise PermanentError("cannot create a table without columns", table=table.qualified)
    column_defs = ",\n  ".join(
        f"{quote_ident(c.snowflake_name)} {c.snowflake_type}{'' if c.nullable else ' NOT NULL'}"
        for c in columns
    )
    target = quote_qualified(database, table.snowflake_schema, table.snowflake_table)
    return f"CREATE TABLE IF NOT EXISTS {target} (\n  {column_defs}\n)"


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


# --------------------------------------------------------------------------- schema evolution


def build_select_column_types(database: str, schema: str, table: str) -> Statement:
    """An existing table's columns with precision/scale/length and nullability ('YES'/'NO'),
    for schema evolution and hand-dropped files."""
    sql = (
        'SELECT "COLUMN_NAME", "DATA_TYPE", "NUMERIC_PRECISION", "NUMERIC_SCALE", "CHARACTER_MAXIMUM_LENGTH", '
        '"IS_NULLABLE"\n'
        f'FROM {quote_ident(database)}."INFORMATION_SCHEMA"."COLUMNS"\n'
        'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s\n'
        'ORDER BY "ORDINAL_POSITION"'
    )
    return sql, (schema, table)


def build_add_column(table: tuple[str, str, str], column: Column) -> str:
    """A new source column; always nullable, because existing rows have no value for it."""
    target = quote_qualified(*table)
    return f"ALTER TABLE {target} ADD COLUMN {quote_ident(column.snowflake_name)} {column.snowflake_type}"


def build_drop_not_null(table: tuple[str, str, str], column_name: str) -> str:
    """Make a NOT NULL column nullable: the source dropped it, or dropped its NOT NULL."""
    return f"ALTER TABLE {quote_qualified(*table)} ALTER COLUMN {quote_ident(column_name)} DROP NOT NULL"


def build_widen_column(table: tuple[str, str, str], column: Column) -> str:
    target = quote_qualified(*table)
    return (
        f"ALTER TABLE {target} ALTER COLUMN {quote_ident(column.snowflake_name)} "
        f"SET DATA TYPE {column.snowflake_type}"
    )


# --------------------------------------------------------------------------- write modes


def build_create_work_table(target: tuple[str, str, str], columns: Sequence[Column]) -> str:
    """A transient table with the target's columns (no NOT NULL: a work table only stages rows).

    Transient, not temporary: it is fully qualified in the control schema, and the name is
    unique per load, so concurrent loaders never share one.
    """
    column_defs = ", ".join(f"{quote_ident(c.snowflake_name)} {c.snowflake_type}" for c in columns)
    return f"CREATE OR REPLACE TRANSIENT TABLE {quote_qualified(*target)} ({column_defs})"


def build_create_shadow_table(shadow: tuple[str, str, str], columns: Sequence[Column]) -> str:
    """The new table a replace run loads into, swapped with the target when the run is complete."""
    column_defs = ", ".join(
        f"{quote_ident(c.snowflake_name)} {c.snowflake_type}{'' if c.nullable else ' NOT NULL'}"
        for c in columns
    )
    return f"CREATE TABLE IF NOT EXISTS {quote_qualified(*shadow)} ({column_defs})"


def build_drop_table(table: tuple[str, str, str]) -> str:
    return f"DROP TABLE IF EXISTS {quote_qualified(*table)}"


RUN_ID_COLUMN = "_PGSNOW_RUN_ID"  # merge targets without a cursor column: the run that wrote the row


def build_add_run_id_column(target: tuple[str, str, str]) -> str:
    return f"ALTER TABLE {quote_qualified(*target)} ADD COLUMN IF NOT EXISTS {quote_ident(RUN_ID_COLUMN)} VARCHAR"


def build_merge_from(
    *,
    target: tuple[str, str, str],
    source: tuple[str, str, str],
    columns: Sequence[Column],
    primary_key: Sequence[str],
    cursor_column: str | None,
    run_id: str | None = None,
) -> Statement:
    """One MERGE of a work table into the target: newest row per key wins.

    The work table is de-duplicated by primary key keeping the highest cursor value; with a
    cursor an existing row is only overwritten by a row at least as new, so an older run
    delivered late cannot roll a row back. Without a cursor the run id (a UTC start time, so
    runs sort by age) plays that part: the target keeps it per row in RUN_ID_COLUMN (see
    ``build_add_run_id_column``), and a row is only overwritten by a run at least as new.
    """
    if not primary_key:
        raise PermanentError("merge needs a primary key", table=".".join(target))
    by_name = {c.name: c for c in columns}
    missing = [
        name for name in (*primary_key, *([cursor_column] if cursor_column else [])) if name not in by_name
    ]
    if missing:
        raise PermanentError(f"merge key/cursor column(s) not in the manifest: {', '.join(missing)}")
    keys = [quote_ident(by_name[name].snowflake_name) for name in primary_key]
    cursor = quote_ident(by_name[cursor_column].snowflake_name) if cursor_column else None
    run_guard = cursor is None and run_id is not None
    order = f"{cursor} DESC NULLS LAST" if cursor else keys[0]
    names = [quote_ident(c.snowflake_name) for c in columns]
    written = [*names, quote_ident(RUN_ID_COLUMN)] if run_guard else names
    on = " AND ".join(f'"TARGET".{k} = "SOURCE".{k}' for k in keys)
    updates = ", ".join(f'{n} = "SOURCE".{n}' for n in written if n not in keys)
    newest = cursor if cursor else (quote_ident(RUN_ID_COLUMN) if run_guard else None)
    newer = f' AND ("TARGET".{newest} IS NULL OR "SOURCE".{newest} >= "TARGET".{newest})' if newest else ""
    source_values = ", ".join('"SOURCE".' + n for n in written)
    matched = f"WHEN MATCHED{newer} THEN UPDATE SET {updates}\n" if updates else ""
    run_value = f", %s AS {quote_ident(RUN_ID_COLUMN)}" if run_guard else ""
    statement = (
        f'MERGE INTO {quote_qualified(*target)} AS "TARGET"\n'
        f"USING (SELECT *{run_value} FROM {quote_qualified(*source)}\n"
        f'       QUALIFY ROW_NUMBER() OVER (PARTITION BY {", ".join(keys)} ORDER BY {order}) = 1) AS "SOURCE"\n'
        f"ON {on}\n"
        f"{matched}"
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(written)})\n"
        f"VALUES ({source_values})"
    )
    return statement, ((run_id,) if run_guard else ())


def build_swap_with(table: tuple[str, str, str], other: tuple[str, str, str]) -> str:
    """Atomically exchange two tables: readers see the old table or the new one, never a mix."""
    return f"ALTER TABLE {quote_qualified(*table)} SWAP WITH {quote_qualified(*other)}"


def replace_run_tag(run_id: str) -> str:
    """The comment a replace run's shadow table carries into the target when they are swapped."""
    return f"pgsnow replace run {run_id}"


def build_set_table_comment(table: tuple[str, str, str], comment: str) -> str:
    return f"ALTER TABLE {quote_qualified(*table)} SET COMMENT = {string_literal(comment)}"


def build_select_table_comment(database: str, schema: str, table: str) -> Statement:
    """The table's comment: SWAP WITH exchanges it with the rest of the table's metadata."""
    sql = (
        f'SELECT "COMMENT" FROM {quote_ident(database)}."INFORMATION_SCHEMA"."TABLES"\n'
        'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s'
    )
    return sql, (schema, table)


def build_rename_table(table: tuple[str, str, str], new: tuple[str, str, str]) -> str:
    return f"ALTER TABLE {quote_qualified(*table)} RENAME TO {quote_qualified(*new)}"


SOFT_DELETE_COLUMN = "_PGSNOW_DELETED_AT"


def build_add_soft_delete_column(target: tuple[str, str, str]) -> str:
    return (
        f"ALTER TABLE {quote_qualified(*target)} ADD COLUMN IF NOT EXISTS "
        f"{quote_ident(SOFT_DELETE_COLUMN)} TIMESTAMP_TZ(6)"
    )


def build_apply_deletes(
    *, target: tuple[str, str, str], keys_table: tuple[str, str, str], key_columns: Sequence[str], soft: bool
) -> str:
    """Delete (or mark deleted) the target rows whose primary key is not in the run's full key list."""
    if not key_columns:
        raise PermanentError("deletes need a primary key", table=".".join(target))
    match = " AND ".join(f'"KEYS".{quote_ident(k)} = "TARGET".{quote_ident(k)}' for k in key_columns)
    gone = f'NOT EXISTS (SELECT 1 FROM {quote_qualified(*keys_table)} AS "KEYS" WHERE {match})'
    if soft:
        column = quote_ident(SOFT_DELETE_COLUMN)
        return (
            f'UPDATE {quote_qualified(*target)} AS "TARGET" SET {column} = CURRENT_TIMESTAMP()\n'
            f'WHERE "TARGET".{column} IS NULL AND {gone}'
        )
    return f'DELETE FROM {quote_qualified(*target)} AS "TARGET"\nWHERE {gone}'


def build_insert_rows(target: tuple[str, str, str], columns: Sequence[LoadColumn]) -> str:
    """LOAD_METHOD=insert: rows of bound CSV field texts, converted like the CSV COPY converts them.

    One ``VALUES`` row of ``%s`` placeholders: ``cursor.executemany`` (pyformat) repeats it for
    every row of the batch, binding each value (the connector escapes it), in ONE statement.
    """
    names = ", ".join(quote_ident(c.snowflake_name) for c in columns)
    values = ", ".join(
        _insert_expression(c, quote_ident(f"COLUMN{i}")) for i, c in enumerate(columns, start=1)
    )
    placeholders = ", ".join(["%s"] * len(columns))
    return f"INSERT INTO {quote_qualified(*target)} ({names})\nSELECT {values}\nFROM VALUES ({placeholders})"


def _insert_expression(column: LoadColumn, value: str) -> str:
    if (extension := _extension_type_expression(column, value)) is not None:
        return extension
    if column.kind is ValueKind.JSON:
        return f"PARSE_JSON({value})"
    if column.kind is ValueKind.BINARY:
        return f"TO_BINARY({value}, 'HEX')"
    return f"CAST({value} AS {column.snowflake_type})"


# --------------------------------------------------------------------------- setup objects (text)


def build_create_file_format(database: str, control_schema: str, name: str, file_format: FileFormat) -> str:
    """A named file format with the options the loader's COPY gives inline (for pipes and people)."""
    options = (
        CSV_FILE_FORMAT.format(compression="AUTO").replace("\n                 ", " ")
        if file_format is FileFormat.CSV
        else "TYPE = PARQUET"
    )
    return f"CREATE FILE FORMAT IF NOT EXISTS {quote_qualified(database, control_schema, name)} {options}"


def build_create_pipe(database: str, control_schema: str, pipe: str, copy_sql: str) -> str:
    """A pipe whose COPY is ``build_copy_into``'s shape without FILES (Snowpipe names the files).

    AUTO_INGEST stays FALSE: the loader calls insertFiles itself, so the ledger sees every file.
    """
    without_files = re.sub(r"\n  FILES = \([^\n]*\)", "", copy_sql)
    without_force = without_files.replace(" FORCE = TRUE", "")
    return f"CREATE PIPE IF NOT EXISTS {quote_qualified(database, control_schema, pipe)} AUTO_INGEST = FALSE AS\n{without_force}"


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
    conversions as ``build_copy_into``) over the table's folder of the stage."""
    sql = build_create_pipe(
        database,
        control_schema,
        pipe,
        build_copy_into(
            database=database, control_schema=control_schema, stage=stage, staged=staged, columns=columns
        ),
    )
    if replace:
        sql = sql.replace("CREATE PIPE IF NOT EXISTS", "CREATE OR REPLACE PIPE", 1)
    return sql


def stage_file_path(database: str, control_schema: str, stage: str, staged: StagedObject) -> str:
    """The file's path relative to its table's stage location: what insertFiles names."""
    return _stage_location(database, control_schema, stage, staged)[1]


def build_select_table_columns(database: str, schema: str, table: str) -> Statement:
    """Columns of an existing target table, in order (for hand-dropped files without a manifest)."""
    sql = (
        'SELECT "COLUMN_NAME", "DATA_TYPE"\n'
        f'FROM {quote_ident(database)}."INFORMATION_SCHEMA"."COLUMNS"\n'
        'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s\n'
        'ORDER BY "ORDINAL_POSITION"'
    )
    return sql, (schema, table)


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


CSV_FILE_FORMAT = (
    "TYPE = CSV COMPRESSION = {compression} FIELD_DELIMITER = ',' SKIP_HEADER = 1\n"
    "                 FIELD_OPTIONALLY_ENCLOSED_BY = '\"' ESCAPE_UNENCLOSED_FIELD = NONE\n"
    "                 NULL_IF = () EMPTY_FIELD_AS_NULL = TRUE"
)


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
    value = f"${position}"
    if (extension := _extension_type_expression(column, value)) is not None:
        return extension
    if column.kind is ValueKind.JSON:
        return f"PARSE_JSON({value})"
    if column.kind is ValueKind.BINARY:
        return f"TO_BINARY({value}, 'HEX')"
    return value


def _parquet_select_expression(column: LoadColumn) -> str:
    value = f"$1:{quote_ident(column.source_name)}"
    if (extension := _extension_type_expression(column, f"{value}::VARCHAR")) is not None:
        return extension
    if column.kind is ValueKind.JSON:
        return f"PARSE_JSON({value}::VARCHAR)"
    return f"{value}::{column.snowflake_type}"


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


# --------------------------------------------------------------------------- stage credentials

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
) -> str:
    """COPY staged files of one table into it, in the shape of docs/architecture.md.

    ``staged`` comes from ``keys.parse_data_key`` (validated and allowlisted by the caller),
    so the stage path and FILES literal are built only from names we parsed. Several files
    (one table, one format, at most ``MAX_FILES_PER_COPY``) go into one ``FILES = (...)``.
    ``target`` (database, schema, table) loads into another table with the same columns
    (merge staging, replace shadow); ``url_source`` reads ``s3://`` instead of the stage.

    From a URL the COPY is Snowflake's standard load, not a transformation: its documented
    grammar takes ``FROM (SELECT ...)`` only from a stage, and puts the location's
    STORAGE_INTEGRATION or CREDENTIALS right after the location, before FILES. Columns then load
    by position, so ``target`` must have the file's columns in the file's order (the deletes
    keys table is created from the key columns, as the key list is written).
    """
    files = [staged] if isinstance(staged, StagedObject) else list(staged)
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
    target_name = (
        quote_qualified(*target)
        if target
        else quote_qualified(database, first.table.snowflake_schema, first.table.snowflake_table)
    )
    column_list = ", ".join(quote_ident(c.snowflake_name) for c in columns)
    file_format = (
        CSV_FILE_FORMAT.format(compression="GZIP" if first.gzip else "NONE")
        if first.file_format is FileFormat.CSV
        else "TYPE = PARQUET"
    )
    if url_source is not None:
        location = string_literal(f"s3://{url_source.bucket}/{_dir_of(first.key)}")
        return (
            f"COPY INTO {target_name}\n"
            f"  FROM {location}\n"
            f"{_url_auth(url_source)}"
            f"  FILES = ({', '.join(string_literal(item.file_name) for item in files)})\n"
            f"  FILE_FORMAT = ({file_format})\n"
            f"  ON_ERROR = {on_error} FORCE = TRUE"
        )
    located = [_stage_location(database, control_schema, stage, item) for item in files]
    if len({location for location, _ in located}) != 1:
        located = [(f"@{quote_qualified(database, control_schema, stage)}/", _stage_path(i)) for i in files]
    location = located[0][0]
    file_paths = [path for _, path in located]
    if first.file_format is FileFormat.CSV:
        expressions = [_csv_select_expression(i, c) for i, c in enumerate(columns, start=1)]
    else:
        expressions = [_parquet_select_expression(c) for c in columns]
    return (
        f"COPY INTO {target_name} ({column_list})\n"
        f"  FROM (SELECT {', '.join(expressions)} FROM {location})\n"
        f"  FILES = ({', '.join(string_literal(p) for p in file_paths)})\n"
        f"  FILE_FORMAT = ({file_format})\n"
        f"  ON_ERROR = {on_error} FORCE = TRUE"
    )


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


_CREDENTIALS_CLAUSE = re.compile(r"CREDENTIALS\s*=\s*\([^)]*\)?", re.IGNORECASE)
_CREDENTIAL_VALUE = re.compile(r"(AWS_(?:KEY_ID|SECRET_KEY|TOKEN)\s*=\s*)'[^']*'?", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_credentials(text: str, secrets: Sequence[str] = ()) -> str:
    """Text safe to log: any CREDENTIALS clause (or a piece of one) and the given secret values
    replaced. Error messages pass through here too, since a server may echo the statement."""
    redacted = _CREDENTIALS_CLAUSE.sub(f"CREDENTIALS = ({REDACTED})", text)
    redacted = _CREDENTIAL_VALUE.sub(rf"\g<1>{REDACTED}", redacted)
    for secret in secrets:
        if secret:
            redacted = redacted.replace(secret, REDACTED)
    return redacted


def build_query_tag(*, run_id: str | None, table: TableRef, s3_key: str) -> str:
    """Tag the session's queries with the run and table (visible in QUERY_HISTORY).

    ALTER SESSION takes no bind variables, so the tag is a JSON literal of validated names.
    """
    tag = json.dumps({"app": "pgsnow", "run_id": run_id, "table": table.qualified, "s3_key": s3_key})
    return f"ALTER SESSION SET QUERY_TAG = {string_literal(tag)}"


# --------------------------------------------------------------------------- errors

# Snowflake error numbers (errno) that are transient whatever their sqlstate.
_RETRYABLE_ERRNOS = frozenset(
    {
        604,  # statement cancelled by timeout
        606,  # no active warehouse (suspended / resuming)
        608,  # warehouse cannot be resumed right now
        625,  # too many waiters for a lock
        630,  # statement reached its statement or warehouse timeout
        390114,  # authentication token expired: reconnect
        # connector network errors
        250001,
        250002,
        250003,
        250005,
        251011,
        251012,
        252007,
        252010,
        252013,
    }
)
# sqlstate classes / codes that are transient.
_RETRYABLE_SQLSTATE_CLASSES = ("08", "40", "53", "57")  # connection, txn conflict, resources, operator
# sqlstate classes that retrying cannot fix.
_PERMANENT_SQLSTATE_CLASSES = ("0A", "21", "22", "23", "42", "28", "02")


def classify_snowflake_error(
    exc: BaseException,
    *,
    table: str | None = None,
    s3_key: str | None = None,
    run_id: str | None = None,
    secrets: Sequence[str] = (),
) -> PgSnowError:
    """The ONE place a Snowflake failure is sorted into retryable or permanent.

    The message never carries credentials: a CREDENTIALS clause the server quoted is redacted,
    and so is each of ``secrets`` (the values the failed statement carried) wherever it appears.
    """
    if isinstance(exc, PgSnowError):
        exc.table = exc.table or table
        exc.s3_key = exc.s3_key or s3_key
        exc.run_id = exc.run_id or run_id
        return exc
    from snowflake.connector import errors as sf_errors

    context: dict[str, Any] = {"table": table, "s3_key": s3_key, "run_id": run_id}
    if not isinstance(exc, sf_errors.Error):
        if isinstance(exc, (OSError, TimeoutError)):
            return RetryableError(
                redact_credentials(f"Snowflake connection failed: {type(exc).__name__}: {exc}", secrets),
                **context,
            )
        return PermanentError(
            redact_credentials(
                f"unexpected error talking to Snowflake: {type(exc).__name__}: {exc}", secrets
            ),
            **context,
        )

    errno = exc.errno
    sqlstate = exc.sqlstate if exc.sqlstate and exc.sqlstate != "n/a" else None
    # The server's message may quote the statement, CREDENTIALS and all.
    message = redact_credentials(f"Snowflake error {errno}: {exc.raw_msg or exc.msg}", secrets)
    context["sqlstate"] = sqlstate
    if errno in _RETRYABLE_ERRNOS:
        return RetryableError(message, **context)
    if sqlstate and sqlstate.startswith(_RETRYABLE_SQLSTATE_CLASSES):
        return RetryableError(message, **context)
    if sqlstate and sqlstate.startswith(_PERMANENT_SQLSTATE_CLASSES):
        return PermanentError(message, **context)
    transient_http = (
        sf_errors.HttpError,
        sf_errors.InternalServerError,
        sf_errors.ServiceUnavailableError,
        sf_errors.GatewayTimeoutError,
        sf_errors.RequestTimeoutError,
        sf_errors.BadGatewayError,
        sf_errors.TooManyRequests,
        sf_errors.OtherHTTPRetryableError,
        sf_errors.RequestExceedMaxRetryError,
        sf_errors.TokenExpiredError,
    )
    if isinstance(exc, (sf_errors.OperationalError, sf_errors.InterfaceError, *transient_http)):
        return RetryableError(message, **context)
    return PermanentError(message, **context)
