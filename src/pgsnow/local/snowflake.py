"""A local Snowflake: fakesnow's server, run in-process on loopback and extended by pgsnow.

fakesnow answers Snowflake's HTTP protocol and runs most SQL on DuckDB. pgsnow puts its own
query endpoint in front of fakesnow's and runs, itself, the statements whose semantics
matter to replication and which fakesnow does not reproduce faithfully:

* ``COPY INTO <table> ... FROM @stage | 's3://...'`` (``sf_copy_sql`` / ``sf_copy_run``);
* ``CREATE [OR REPLACE] [TEMPORARY] STAGE [IF NOT EXISTS] ... URL = 's3://...'`` with a storage
  integration or credentials; a TEMPORARY one is kept per session (``sf_stages``), and in a
  session that has one, ``SHOW STAGES`` and ``DROP STAGE`` too;
* ``ALTER SESSION SET/UNSET QUERY_TAG`` / ``LOCK_TIMEOUT`` and ``SHOW PARAMETERS LIKE`` either;
* ``CREATE`` / ``ALTER STORAGE INTEGRATION``, ``DESC INTEGRATION`` and
  ``ALTER USER ... SET RSA_PUBLIC_KEY`` (``sf_access`` / ``keypair``).

fakesnow's answers go back as they are, except that NULL row counts of a DML (an empty MERGE)
become zeros (``sf_dml_result``).

Each runs on the session's own DuckDB cursor (so it joins the session's transaction), and the
request is then handed to fakesnow as a ``SELECT`` of the result rows, so the response is
fakesnow's own. Every other statement goes to fakesnow untouched.

DuckDB reads ``s3://`` from the moto server through httpfs (installed from PyPI, see
``duckdb_setup``) with path-style URLs: through one S3 secret with the given keys, or, when a
Snowflake AWS identity is given, only with each stage's own credentials (``sf_access``).
Logins with a JWT (the connector's ``private_key=``) are checked against the user's registered
public key (``keypair``); password logins are accepted for users without one.

Usage::

    local = start_local_snowflake(s3_endpoint_url="http://127.0.0.1:5000")
    conn = snowflake.connector.connect(**local.connect_kwargs(database="DB", schema="PUBLIC"))
    ...
    local.stop()
"""

from __future__ import annotations

import datetime
import gzip
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import duckdb
import uvicorn
from fakesnow import info_schema, macros
from fakesnow.conn import FakeSnowflakeConnection
from fakesnow.instance import GLOBAL_DATABASE_NAME, FakeSnow
from fakesnow.transforms import show
from snowflake.connector.errors import ProgrammingError
from sqlglot import exp
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message

from pgsnow.errors import ConfigError
from pgsnow.local import sf_extension_types, sf_table_created, sf_transform_once
from pgsnow.local.duckdb_setup import load_httpfs, load_spatial
from pgsnow.local.keypair import INVALID_JWT_CODE, INVALID_JWT_MESSAGE, PublicKeys
from pgsnow.local.sf_access import (
    CREDENTIALS_WITH_INTEGRATION,
    ReadAccess,
    SnowflakeAwsIdentity,
    StageAccess,
    create_access_catalog,
)
from pgsnow.local.sf_access_sql import (
    parse_alter_storage_integration,
    parse_alter_user_public_key,
    parse_create_storage_integration,
    parse_describe_integration,
)
from pgsnow.local.sf_copy_run import (
    COPY_RESULT_COLUMNS,
    STAGES_TABLE,
    FileOutcome,
    PreparedCopy,
    apply_copy,
    prepare_copy,
    qualify_stage,
    source_prefix,
    stage_storage_integration,
    stage_url,
    syntax_error,
)
from pgsnow.local.sf_copy_sql import (
    CopyStatement,
    CopySyntaxError,
    ObjectName,
    StageSource,
    UrlSource,
    duck_ident,
    parse_copy,
    parse_copy_source,
)
from pgsnow.local.sf_credentials_sql import AccessSyntaxError
from pgsnow.local.sf_dml_result import ROW_COUNT_MARKER, zero_null_row_counts
from pgsnow.local.sf_fakesnow import server_module as fakesnow_server
from pgsnow.local.sf_function_sql import rewrite_trim_characters
from pgsnow.local.sf_session_sql import (
    KEPT_SESSION_PARAMETERS,
    CreateStage,
    ShowStages,
    like_matches,
    parse_alter_session,
    parse_create_stage,
    parse_drop_stage,
    parse_show_parameters,
    parse_show_stages,
)
from pgsnow.local.sf_stages import SessionStages, StageKey, TemporaryStage
from pgsnow.local.sf_table_sql import (
    CreatePipe,
    SwapTables,
    TableDdl,
    parse_create_pipe,
    parse_swap_with,
    parse_table_ddl,
)
from pgsnow.local.sf_udf import SessionFunctions, UdfError, parse_create_function

logger = logging.getLogger(__name__)

LOCAL_ACCOUNT = "pgsnow-local"
LOCAL_USER = "pgsnow"
LOCAL_PASSWORD = "pgsnow"  # noqa: S105 - the local server accepts any password for a user without a key
DATABASE_FILE_SUFFIX = ".db"  # fakesnow stores database X as <db_path>/X.db
GLOBAL_FILE_NAME = "_fs_global.duckdb"  # not *.db, so it can never be taken for a database
PIPES_TABLE = "_fs_global._fs_information_schema._pgsnow_pipes"
# fakesnow's per-table metadata kept by name (VARCHAR lengths, comments): a swap swaps it too.
_TABLE_EXT_TABLES = (
    (
        "_fs_global._fs_information_schema._fs_columns_ext",
        "ext_table_catalog",
        "ext_table_schema",
        "ext_table_name",
    ),
    (
        "_fs_global._fs_information_schema._fs_tables_ext",
        "ext_table_catalog",
        "ext_table_schema",
        "ext_table_name",
    ),
    (sf_table_created.CREATED_TABLE, "catalog", "schema_name", "name"),
)
S3_SECRET_NAME = "pgsnow_local_s3"  # noqa: S105 - a DuckDB object name, not a secret
STARTUP_TIMEOUT_SECONDS = 30.0
UNUSED_S3_ENDPOINT = "http://127.0.0.1:9"  # discard port: for a server that reads no stage


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str
    aws_access_key_id: str
    aws_secret_access_key: str
    region: str


# ---------------------------------------------------------------------------------------------
# DuckDB set-up


def configure_s3(duck: duckdb.DuckDBPyConnection, s3: S3Settings, *, shared_secret: bool = True) -> None:
    """Let DuckDB read ``s3://`` from the moto server: httpfs from PyPI and, unless each read brings
    its own credentials (``shared_secret=False``), one path-style secret every read uses."""
    duck.execute("SET autoinstall_known_extensions = false")
    load_httpfs(duck)
    endpoint = urlparse(s3.endpoint_url)
    if not endpoint.hostname or not endpoint.port:
        raise ValueError(f"s3_endpoint_url needs a host and a port: {s3.endpoint_url!r}")
    if not shared_secret:
        # Every read must reach S3 with the stage's own credentials: a cached copy of an object
        # read earlier with other credentials would let a refused read succeed.
        duck.execute("SET enable_external_file_cache = false")
        return
    use_ssl = "true" if endpoint.scheme == "https" else "false"
    # CREATE SECRET takes no bound parameters; the values are quoted as literals.
    duck.execute(
        f"CREATE OR REPLACE SECRET {S3_SECRET_NAME} ("
        f" TYPE S3, KEY_ID {_literal(s3.aws_access_key_id)}, SECRET {_literal(s3.aws_secret_access_key)},"
        f" REGION {_literal(s3.region)}, ENDPOINT {_literal(f'{endpoint.hostname}:{endpoint.port}')},"
        f" URL_STYLE 'path', USE_SSL {use_ssl})"
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def persist_global_catalog(duck: duckdb.DuckDBPyConnection, data_dir: Path) -> None:
    """Keep fakesnow's cross-database catalog (stages, comments, users) in data_dir too."""
    path = data_dir / GLOBAL_FILE_NAME
    duck.execute(f"DETACH {GLOBAL_DATABASE_NAME}")
    duck.execute(f"ATTACH {_literal(str(path))} AS {GLOBAL_DATABASE_NAME}")
    duck.execute(info_schema.fs_global_creation_sql())
    duck.execute(show.fs_global_creation_sql())


def attach_existing_databases(duck: duckdb.DuckDBPyConnection, data_dir: Path) -> list[str]:
    """Attach every database a previous run stored, so qualified names work before any USE."""
    attached = []
    for path in sorted(data_dir.glob(f"*{DATABASE_FILE_SUFFIX}")):
        name = path.name[: -len(DATABASE_FILE_SUFFIX)]
        duck.execute(f"ATTACH IF NOT EXISTS {_literal(str(path))} AS {duck_ident(name)}")
        duck.execute(info_schema.per_db_creation_sql(name))
        duck.execute(macros.creation_sql(name))
        attached.append(name)
    return attached


def build_fakesnow(s3: S3Settings, data_dir: Path | None, *, shared_secret: bool = True) -> FakeSnow:
    """One FakeSnow for all sessions; its DuckDB database holds the S3 secrets every cursor uses."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    sf_table_created.install()  # before any database is created or attached
    fs = FakeSnow(db_path=data_dir)
    configure_s3(fs.duck_conn, s3, shared_secret=shared_secret)
    if data_dir is not None:
        persist_global_catalog(fs.duck_conn, data_dir)
        attach_existing_databases(fs.duck_conn, data_dir)
    # Snowflake's VECTOR, GEOMETRY and GEOGRAPHY on DuckDB (sf_extension_types); spatial from PyPI.
    load_spatial(fs.duck_conn)
    sf_extension_types.install()
    sf_transform_once.install()  # one copy of each statement per rewrite, not one per pass
    fs.duck_conn.execute(sf_extension_types.columns_view_sql())
    create_access_catalog(fs.duck_conn)
    return fs


# ---------------------------------------------------------------------------------------------
# result rows handed to fakesnow


def _sql_value(value: Any, null_type: str) -> str:
    if value is None:
        return f"CAST(NULL AS {null_type})"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime.datetime):
        # Typed, so the column keeps its timestamp type (SHOW STAGES' created_on).
        return f"CAST({exp.Literal.string(value.isoformat()).sql(dialect='snowflake')} AS {null_type})"
    return exp.Literal.string(str(value)).sql(dialect="snowflake")


def rows_as_select(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> str:
    """A Snowflake ``SELECT`` returning exactly these rows (column name, type), for fakesnow to answer."""
    aliases = ", ".join(f"{_sql_value(None, t)} AS {duck_ident(name)}" for name, t in columns)
    if not rows:
        return f"SELECT {aliases} WHERE FALSE"
    selects = [
        "SELECT "
        + ", ".join(
            f"{_sql_value(value, t)} AS {duck_ident(name)}"
            for value, (name, t) in zip(row, columns, strict=True)
        )
        for row in rows
    ]
    return " UNION ALL ".join(selects)


_COPY_RESULT_TYPES = (
    "VARCHAR",
    "VARCHAR",
    "NUMBER",
    "NUMBER",
    "NUMBER",
    "NUMBER",
    "VARCHAR",
    "NUMBER",
    "NUMBER",
    "VARCHAR",
)
COPY_RESULT_SHAPE = tuple(zip(COPY_RESULT_COLUMNS, _COPY_RESULT_TYPES, strict=True))
NO_FILES_SQL = rows_as_select([("status", "VARCHAR")], [("Copy executed with 0 files processed.",)])
SUCCESS_SQL = rows_as_select([("status", "VARCHAR")], [("Statement executed successfully.",)])


def _status_sql(message: str) -> str:
    return rows_as_select([("status", "VARCHAR")], [(message,)])


# ---------------------------------------------------------------------------------------------
# the extensions


@dataclass(frozen=True)
class ExecutedStatement:
    """One statement a session sent, as the client sent it (before any local translation)."""

    session: str
    sql_text: str
    bound: bool  # the statement came with bind values


class QueryHistory:
    """Every statement the server received, in order: what Snowflake's QUERY_HISTORY would list.

    Tests and ``make bench-load`` count statements and transactions from it (``since`` a mark),
    so what is counted is what a Snowflake account would have been sent and billed for.
    """

    def __init__(self) -> None:
        self._statements: list[ExecutedStatement] = []
        self._lock = threading.Lock()

    def record(self, statement: ExecutedStatement) -> None:
        with self._lock:
            self._statements.append(statement)

    def mark(self) -> int:
        """A position to count from (``since(mark)``)."""
        with self._lock:
            return len(self._statements)

    def since(self, mark: int = 0) -> list[ExecutedStatement]:
        with self._lock:
            return list(self._statements[mark:])


@dataclass
class LocalSnowflakeState:
    """What one running local Snowflake shares between requests."""

    fs: FakeSnow
    data_dir: Path | None
    access: StageAccess
    public_keys: PublicKeys
    tokens: set[str] = field(default_factory=set)
    session_parameters: dict[str, dict[str, str]] = field(default_factory=dict)
    session_functions: dict[str, SessionFunctions] = field(default_factory=dict)
    temporary_stages: dict[str, SessionStages] = field(default_factory=dict)
    # Sessions whose DuckDB connection has the geospatial accessors (sf_extension_types).
    prepared_sessions: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    history: QueryHistory = field(default_factory=QueryHistory)

    def intercept(
        self, token: str, conn: FakeSnowflakeConnection, sql_text: str, *, describe_only: bool
    ) -> str | None:
        """Run sql_text when it is ours; return the SELECT fakesnow should answer with, or None to pass it on."""
        if change := parse_alter_session(sql_text):
            if not describe_only:
                params = self.session_parameters.setdefault(token, {})
                if change.value is None:
                    params.pop(change.name, None)
                else:
                    params[change.name] = change.value
            return SUCCESS_SQL
        if (pattern := parse_show_parameters(sql_text)) is not None:
            return self._show_parameters(token, pattern)
        try:
            if (
                access_sql := self._intercept_access(conn, sql_text, describe_only=describe_only)
            ) is not None:
                return access_sql
            stage = parse_create_stage(sql_text)
        except AccessSyntaxError as error:
            raise syntax_error(error) from None
        if stage:
            return _status_sql("") if describe_only else self._create_stage(token, conn, stage)
        if (temporary := self.temporary_stages.get(token)) and (
            stage_sql := self._intercept_temporary_stages(
                conn, temporary, sql_text, describe_only=describe_only
            )
        ) is not None:
            return stage_sql
        if swap := parse_swap_with(sql_text):
            return _status_sql("") if describe_only else self._swap(conn, swap)
        try:
            function = parse_create_function(sql_text)
            if function is not None:
                if describe_only:
                    return _status_sql("")
                _commit_open_transaction(conn)  # DDL commits the open transaction, as in Snowflake
                functions = self.session_functions.setdefault(token, SessionFunctions())
                return _status_sql(functions.create(conn._duck_conn, function, conn.database, conn.schema))
        except UdfError as error:
            raise ProgrammingError(
                msg=f"SQL compilation error:\n{error}", errno=2003, sqlstate="42601"
            ) from None
        try:
            pipe = parse_create_pipe(sql_text)
        except CopySyntaxError as error:
            raise syntax_error(error) from None
        if pipe:
            return _status_sql("") if describe_only else self._create_pipe(conn, pipe)
        try:
            statement = parse_copy(sql_text)
        except CopySyntaxError as error:
            if self._reads_internal_stage(conn, sql_text, self.temporary_stages.get(token)):
                return None  # fakesnow's COPY from an internal stage, as before
            raise syntax_error(error) from None
        if statement is None:
            return None
        temporary = self.temporary_stages.get(token)
        prefix = self._source_prefix(conn, statement, temporary)
        if prefix is None:
            return None  # an internal stage: fakesnow's own COPY handles those
        if describe_only:
            return rows_as_select(COPY_RESULT_SHAPE, [])
        return self._copy(conn, statement, prefix, temporary)

    # -- integrations and user keys

    def _intercept_access(
        self, conn: FakeSnowflakeConnection, sql_text: str, *, describe_only: bool
    ) -> str | None:
        if integration := parse_create_storage_integration(sql_text):
            if describe_only:
                return _status_sql("")
            _commit_open_transaction(conn)  # DDL commits the open transaction, as in Snowflake
            return _status_sql(self.access.create_integration(conn._duck_conn, integration))
        if alter := parse_alter_storage_integration(sql_text):
            if describe_only:
                return _status_sql("")
            _commit_open_transaction(conn)  # DDL commits the open transaction, as in Snowflake
            return _status_sql(self.access.alter_integration(conn._duck_conn, alter))
        if (name := parse_describe_integration(sql_text)) is not None:
            columns = [
                (c, "VARCHAR") for c in ("property", "property_type", "property_value", "property_default")
            ]
            if describe_only:
                return rows_as_select(columns, [])
            return rows_as_select(columns, self.access.describe_rows(conn._duck_conn, name))
        if key := parse_alter_user_public_key(sql_text):
            if not describe_only:
                try:
                    self.public_keys.register(key.user, key.public_key)
                except ValueError as error:
                    raise ProgrammingError(
                        msg=f"Invalid RSA public key: {error}", errno=3097, sqlstate="22023"
                    ) from None
            return SUCCESS_SQL
        return None

    # -- COPY INTO

    def _temporary_stage(
        self, conn: FakeSnowflakeConnection, source: StageSource, temporary: SessionStages | None
    ) -> TemporaryStage | None:
        """The session's temporary stage of that name: it takes precedence over a permanent one."""
        if not temporary:
            return None
        return temporary.get(qualify_stage(source, conn.database, conn.schema))

    def _read_access(
        self,
        conn: FakeSnowflakeConnection,
        statement: CopyStatement,
        prefix: str,
        temporary: SessionStages | None,
    ) -> ReadAccess | None:
        """How this COPY authenticates to S3: the stage's integration/credentials, or the statement's."""
        if not self.access.enforced:
            return None
        duck = conn._duck_conn
        if isinstance(statement.source, UrlSource):
            return self.access.read_access(
                duck, integration=statement.storage_integration, credentials=statement.credentials, url=prefix
            )
        if statement.storage_integration is not None or statement.credentials is not None:
            raise ProgrammingError(
                msg="SQL compilation error:\nSTORAGE_INTEGRATION and CREDENTIALS belong to the stage, "
                "not to a COPY from a named stage.",
                errno=1003,
                sqlstate="42000",
            )
        if (session_stage := self._temporary_stage(conn, statement.source, temporary)) is not None:
            return self.access.read_access(
                duck,
                integration=session_stage.storage_integration,
                credentials=session_stage.credentials,
                url=prefix,
            )
        key = list(qualify_stage(statement.source, conn.database, conn.schema))
        integration = stage_storage_integration(duck, statement.source, conn.database, conn.schema)
        return self.access.read_access(
            duck, integration=integration, credentials=self.access.stage_credentials(duck, key), url=prefix
        )

    def _prepare(
        self,
        conn: FakeSnowflakeConnection,
        statement: CopyStatement,
        prefix: str,
        temporary: SessionStages | None,
    ) -> PreparedCopy:
        """Phase 1 of a COPY, reading with the credentials the stage or statement gives."""
        access = self._read_access(conn, statement, prefix, temporary)
        # Files are read on a cursor of their own, outside the session's transaction, so a
        # conversion error cannot poison that transaction.
        reader = self.fs.duck_conn.cursor()
        try:
            with self.access.reading(reader, access, prefix):
                return prepare_copy(
                    statement,
                    session=conn._duck_conn,
                    reader=reader,
                    prefix=prefix,
                    database=conn.database,
                    schema=conn.schema,
                    check_url=access.check_location if access is not None else None,
                )
        finally:
            reader.close()

    def _source_prefix(
        self, conn: FakeSnowflakeConnection, statement: CopyStatement, temporary: SessionStages | None
    ) -> str | None:
        if isinstance(statement.source, StageSource):
            session_stage = self._temporary_stage(conn, statement.source, temporary)
            base = (
                session_stage.url
                if session_stage is not None
                else stage_url(conn._duck_conn, statement.source, conn.database, conn.schema)
            )
            if not base.startswith("s3://"):
                return None
            return source_prefix(base, statement.source.sub_path)
        if not statement.source.url.startswith("s3://"):
            return None
        return statement.source.url

    def _reads_internal_stage(
        self, conn: FakeSnowflakeConnection, sql_text: str, temporary: SessionStages | None
    ) -> bool:
        source = parse_copy_source(sql_text)
        if not isinstance(source, StageSource):
            return False
        try:
            if self._temporary_stage(conn, source, temporary) is not None:
                return False  # the session's temporary stages are all external
            base = stage_url(conn._duck_conn, source, conn.database, conn.schema)
        except ProgrammingError:
            return False
        return not base.startswith("s3://")

    def _copy(
        self,
        conn: FakeSnowflakeConnection,
        statement: CopyStatement,
        prefix: str,
        temporary: SessionStages | None,
    ) -> str:
        session = conn._duck_conn
        prepared = self._prepare(conn, statement, prefix, temporary)
        if not prepared.outcomes:
            return NO_FILES_SQL
        _run_in_session_transaction(conn, lambda: apply_copy(prepared, session))
        return rows_as_select(COPY_RESULT_SHAPE, [o.result_row() for o in prepared.outcomes])

    def copy_files(self, conn: FakeSnowflakeConnection, statement: CopyStatement) -> list[FileOutcome]:
        """Run a COPY (e.g. a pipe's, with Snowpipe's files) on a session; the per-file outcomes.

        Only permanent stages: a pipe outlives any session, so no session's temporary stage applies.
        """
        prefix = self._source_prefix(conn, statement, None)
        if prefix is None:
            raise ProgrammingError(
                msg="a pipe must read an external stage or s3:// URL", errno=1003, sqlstate="42000"
            )
        prepared = self._prepare(conn, statement, prefix, None)
        if prepared.outcomes:
            _run_in_session_transaction(conn, lambda: apply_copy(prepared, conn._duck_conn))
        return list(prepared.outcomes)

    # -- ALTER TABLE ... SWAP WITH

    def _swap(self, conn: FakeSnowflakeConnection, swap: SwapTables) -> str:
        """Exchange two tables' names (and fakesnow's by-name metadata) in one DuckDB transaction.

        Readers on other sessions see the old or the new table, never neither: DuckDB's catalog
        changes become visible at commit. As in Snowflake, it commits an open transaction first.
        """
        table = _qualify_table(conn, swap.table)
        other = _qualify_table(conn, swap.other)
        if table[:2] != other[:2]:
            raise ProgrammingError(
                msg="SQL compilation error:\nlocally, SWAP WITH needs both tables in one schema",
                errno=1003,
                sqlstate="0A000",
            )
        duck = conn._duck_conn
        _commit_open_transaction(conn)
        for name in (table, other):
            found = duck.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_catalog = ? AND table_schema = ? "
                "AND table_name = ? AND table_type = 'BASE TABLE'",
                list(name),
            ).fetchone()
            if found is None:
                raise ProgrammingError(
                    msg=f"SQL compilation error:\nObject '{'.'.join(name)}' does not exist or not authorized.",
                    errno=2003,
                    sqlstate="42S02",
                )
        catalog, schema = duck_ident(table[0]), duck_ident(table[1])
        parked = f"__pgsnow_swap_{secrets.token_hex(6)}"
        steps = [(table[2], parked), (other[2], table[2]), (parked, other[2])]
        duck.begin()
        try:
            for old, new in steps:
                duck.execute(f"ALTER TABLE {catalog}.{schema}.{duck_ident(old)} RENAME TO {duck_ident(new)}")
            duck.commit()
        except BaseException:
            duck.rollback()
            raise
        # DuckDB writes one attached database per transaction, so fakesnow's by-name metadata
        # (in _fs_global) follows in a second one; only VARCHAR lengths/comments read it.
        duck.begin()
        try:
            for old, new in steps:
                for ext_table, cat_col, schema_col, name_col in _TABLE_EXT_TABLES:
                    duck.execute(
                        f"UPDATE {ext_table} SET {name_col} = ? WHERE {cat_col} = ? AND {schema_col} = ? "
                        f"AND {name_col} = ?",
                        [new, table[0], table[1], old],
                    )
            duck.commit()
        except BaseException:
            duck.rollback()
            raise
        return _status_sql("Statement executed successfully.")

    # -- INFORMATION_SCHEMA.TABLES.CREATED (sf_table_created)

    def before_table_ddl(
        self, conn: FakeSnowflakeConnection, ddl: TableDdl
    ) -> tuple[tuple[str, str, str], bool] | None:
        """The table a CREATE or DROP TABLE names, and whether it will be created (False: dropped)
        if the statement succeeds; None when it changes no record (IF NOT EXISTS of an existing
        table, or a name this session cannot qualify: fakesnow refuses it)."""
        try:
            key = _qualify_table(conn, ddl.parts)
        except ProgrammingError:
            return None
        if ddl.if_not_exists and sf_table_created.table_exists(conn._duck_conn, key):
            return None
        return key, ddl.created

    def after_table_ddl(self, key: tuple[str, str, str], created: bool) -> None:
        cursor = self.fs.duck_conn.cursor()
        try:
            if created:
                sf_table_created.record_created(cursor, key, datetime.datetime.now(datetime.UTC))
            else:
                sf_table_created.forget_created(cursor, key)
        finally:
            cursor.close()

    # -- CREATE PIPE

    def _create_pipe(self, conn: FakeSnowflakeConnection, pipe: CreatePipe) -> str:
        catalog, schema, name = _qualify_table(conn, pipe.parts)
        duck = conn._duck_conn
        _commit_open_transaction(conn)
        duck.execute(
            f"CREATE TABLE IF NOT EXISTS {PIPES_TABLE} (database_name VARCHAR, schema_name VARCHAR, "
            "name VARCHAR, copy_sql VARCHAR, auto_ingest BOOLEAN, created_on TIMESTAMPTZ, "
            "PRIMARY KEY (database_name, schema_name, name))"
        )
        key = [catalog, schema, name]

        def insert_pipe() -> None:
            duck.execute(
                f"INSERT INTO {PIPES_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
                [*key, pipe.copy_sql, pipe.auto_ingest, datetime.datetime.now(datetime.UTC)],
            )

        existing = _put_catalog_row(
            duck, PIPES_TABLE, key, if_not_exists=pipe.if_not_exists, replace=pipe.replace, insert=insert_pipe
        )
        return existing or _status_sql(f"Pipe {name} successfully created.")

    def pipe_copy_sql(self, database: str, schema: str, name: str) -> str | None:
        """The COPY of a pipe created through this server, or None."""
        cursor = self.fs.duck_conn.cursor()
        try:
            row = cursor.execute(
                f"SELECT copy_sql FROM {PIPES_TABLE} WHERE database_name = ? AND schema_name = ? AND name = ?",
                [database, schema, name],
            ).fetchone()
        except duckdb.CatalogException:
            return None
        finally:
            cursor.close()
        return None if row is None else str(row[0])

    # -- CREATE STAGE

    def _create_stage(self, token: str, conn: FakeSnowflakeConnection, stage: CreateStage) -> str:
        parts = stage.parts
        database, schema = conn.database, conn.schema
        if len(parts) == 3:
            catalog, stage_schema, name = parts
        elif len(parts) == 2 and database:
            catalog, stage_schema, name = database, parts[0], parts[1]
        elif len(parts) == 1 and database and schema:
            catalog, stage_schema, name = database, schema, parts[0]
        else:
            raise ProgrammingError(
                msg="Cannot perform CREATE STAGE. This session does not have a current database. "
                "Call 'USE DATABASE', or use a qualified name.",
                errno=90105,
                sqlstate="22000",
            )
        duck = conn._duck_conn
        _commit_open_transaction(conn)  # DDL commits the open transaction, as in Snowflake
        if self.access.enforced:
            self._check_stage_access(duck, stage)
        if stage.temporary:
            return self._create_temporary_stage(token, (catalog, stage_schema, name), stage)
        key = [catalog, stage_schema, name]

        def insert_stage() -> None:
            duck.execute(
                f"INSERT INTO {STAGES_TABLE} (created_on, name, database_name, schema_name, url, has_credentials, "
                "has_encryption_key, owner, comment, region, type, cloud, notification_channel, "
                "storage_integration, endpoint, owner_role_type, directory_enabled) "
                "VALUES (?, ?, ?, ?, ?, ?, 'N', 'SYSADMIN', '', NULL, ?, 'AWS', NULL, ?, NULL, 'ROLE', 'N')",
                [
                    datetime.datetime.now(datetime.UTC),
                    name,
                    catalog,
                    stage_schema,
                    stage.url,
                    "Y" if stage.has_credentials else "N",
                    "EXTERNAL",
                    stage.storage_integration,
                ],
            )
            self.access.store_stage_credentials(duck, key, stage.credentials)

        existing = _put_catalog_row(
            duck,
            STAGES_TABLE,
            key,
            if_not_exists=stage.if_not_exists,
            replace=stage.replace,
            insert=insert_stage,
        )
        return existing or _status_sql(f"Stage area {name} successfully created.")

    def _create_temporary_stage(self, token: str, key: StageKey, stage: CreateStage) -> str:
        """Keep the stage in this session only; a permanent stage of that name is hidden, not replaced."""
        with self.lock:
            stages = self.temporary_stages.setdefault(token, SessionStages())
        name = key[2]
        if stages.get(key) is not None and not stage.replace:
            if stage.if_not_exists:
                return _status_sql(f"{name} already exists, statement succeeded.")
            raise ProgrammingError(
                msg=f"SQL compilation error:\nObject '{name}' already exists.", errno=2002, sqlstate="42710"
            )
        stages.put(
            TemporaryStage(
                key=key,
                url=stage.url,
                storage_integration=stage.storage_integration,
                credentials=stage.credentials,
                created_on=datetime.datetime.now(datetime.UTC),
            )
        )
        return _status_sql(f"Stage area {name} successfully created.")

    def _intercept_temporary_stages(
        self, conn: FakeSnowflakeConnection, temporary: SessionStages, sql_text: str, *, describe_only: bool
    ) -> str | None:
        """SHOW STAGES and DROP STAGE in a session that has temporary stages; None to pass it on."""
        if (show := parse_show_stages(sql_text)) is not None:
            return self._show_stages(conn, temporary, show, describe_only=describe_only)
        drop = parse_drop_stage(sql_text)
        if drop is None:
            return None
        try:
            key = _qualify_stage_name(conn, drop.parts)
        except ProgrammingError:
            return None  # no current database or schema: fakesnow answers as for any stage
        if temporary.get(key) is None:
            return None  # a permanent stage: fakesnow drops it
        if not describe_only:
            temporary.drop(key)
        return _status_sql(f"{key[2]} successfully dropped.")

    def _show_stages(
        self,
        conn: FakeSnowflakeConnection,
        temporary: SessionStages,
        show: ShowStages,
        *,
        describe_only: bool,
    ) -> str:
        """fakesnow's permanent stages in scope, less those this session's temporary stages hide, plus those."""
        database, schema = _stage_scope(conn, show)
        conditions = [
            f"{column} = ?"
            for column, value in (("database_name", database), ("schema_name", schema))
            if value
        ]
        cursor = conn._duck_conn.execute(
            f"SELECT * FROM {STAGES_TABLE} WHERE {' AND '.join(conditions) or 'TRUE'}",
            [value for value in (database, schema) if value],
        )
        names = [d[0] for d in cursor.description or []]
        permanent = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        columns = [(n, "TIMESTAMP_TZ" if n == "created_on" else "VARCHAR") for n in names]
        if describe_only:
            return rows_as_select(columns, [])
        session_rows = [
            stage.show_row()
            for stage in temporary.all()
            if database in (None, stage.key[0]) and schema in (None, stage.key[1])
        ]
        hidden = {(r["database_name"], r["schema_name"], r["name"]) for r in session_rows}
        rows = session_rows + [
            r for r in permanent if (r["database_name"], r["schema_name"], r["name"]) not in hidden
        ]
        if show.like is not None:
            rows = [r for r in rows if like_matches(show.like, str(r["name"]))]
        # SHOW lists by name, as Snowflake does.
        rows.sort(key=lambda r: (str(r["database_name"]), str(r["schema_name"]), str(r["name"])))
        return rows_as_select(columns, [[r[n] for n in names] for r in rows])

    def _check_stage_access(self, duck: duckdb.DuckDBPyConnection, stage: CreateStage) -> None:
        """What Snowflake checks at CREATE STAGE: one way to authenticate, and an integration that allows the URL."""
        if stage.storage_integration is not None and stage.credentials is not None:
            raise ProgrammingError(msg=CREDENTIALS_WITH_INTEGRATION, errno=2030, sqlstate="42601")
        if stage.storage_integration is not None:
            self.access.usable_integration(duck, stage.storage_integration, stage.url)

    # -- session parameters

    def _show_parameters(self, token: str, pattern: str) -> str:
        params = self.session_parameters.get(token, {})
        rows = [
            (
                name,
                params.get(name, kept.default),
                kept.default,
                "SESSION" if name in params else "",
                kept.description,
                kept.type,
            )
            for name, kept in sorted(KEPT_SESSION_PARAMETERS.items())
            if like_matches(pattern, name)
        ]
        columns = [(c, "VARCHAR") for c in ("key", "value", "default", "level", "description", "type")]
        return rows_as_select(columns, rows)


def _qualify_table(conn: FakeSnowflakeConnection, parts: tuple[str, ...]) -> tuple[str, str, str]:
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2 and conn.database:
        return conn.database, parts[0], parts[1]
    if len(parts) == 1 and conn.database and conn.schema:
        return conn.database, conn.schema, parts[0]
    raise ProgrammingError(
        msg="This session does not have a current database or schema. Use a qualified name.",
        errno=90105,
        sqlstate="22000",
    )


def _qualify_stage_name(conn: FakeSnowflakeConnection, parts: tuple[str, ...]) -> StageKey:
    return qualify_stage(StageSource(ObjectName(parts)), conn.database, conn.schema)


def _stage_scope(conn: FakeSnowflakeConnection, show: ShowStages) -> tuple[str | None, str | None]:
    """The (database, schema) a SHOW STAGES lists; None for any.

    Without IN it is the current database and schema, as fakesnow answers for other sessions
    (Snowflake itself would list the whole current database).
    """
    if show.scope_kind == "ACCOUNT":
        return None, None
    if show.scope_kind == "DATABASE":
        return (show.scope[-1] if show.scope else conn.database), None
    if show.scope_kind == "SCHEMA" and show.scope:
        return (show.scope[0] if len(show.scope) > 1 else conn.database), show.scope[-1]
    return conn.database, conn.schema


def _commit_open_transaction(conn: FakeSnowflakeConnection) -> None:
    if not conn._autocommit and conn._in_transaction:
        conn._duck_conn.commit()
        conn._in_transaction = False


def _run_in_session_transaction(conn: FakeSnowflakeConnection, work: Callable[[], None]) -> None:
    """Run DML the way fakesnow runs it: in the session's transaction, or atomically under autocommit."""
    duck = conn._duck_conn
    if conn._autocommit:
        duck.begin()
        try:
            work()
        except BaseException:
            duck.rollback()
            raise
        duck.commit()
        return
    if not conn._in_transaction:
        duck.begin()
        conn._in_transaction = True
    work()


# ---------------------------------------------------------------------------------------------
# HTTP


def _error_response(error: ProgrammingError) -> JSONResponse:
    code = f"{error.errno:06d}"
    return JSONResponse(
        {
            "data": {"errorCode": code, "sqlState": error.sqlstate},
            "code": code,
            "message": error.msg,
            "success": False,
        }
    )


async def _read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if request.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def _with_body(request: Request, body_json: dict[str, Any]) -> Request:
    body = json.dumps(body_json).encode()
    if request.headers.get("Content-Encoding") == "gzip":
        body = gzip.compress(body)
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def _succeeded(answered: Response) -> bool:
    if not isinstance(answered, JSONResponse):
        return False
    try:
        return bool(json.loads(bytes(answered.body)).get("success"))
    except ValueError:
        return False


def _with_zero_row_counts(answered: Response) -> Response:
    """fakesnow's answer, with a DML's NULL row counts made zeros (``sf_dml_result``)."""
    body = bytes(answered.body)
    if not isinstance(answered, JSONResponse) or ROW_COUNT_MARKER not in body:
        return answered
    answer = json.loads(body)
    if not zero_null_row_counts(answer):
        return answered
    return JSONResponse(answer, status_code=answered.status_code)


def _token(request: Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    # The connector sends: Snowflake Token="<token>"
    prefix = 'Snowflake Token="'
    if auth.startswith(prefix) and auth.endswith('"'):
        return auth[len(prefix) : -1]
    return None


def _put_catalog_row(
    duck: duckdb.DuckDBPyConnection,
    table: str,
    key: list[str],
    *,
    if_not_exists: bool,
    replace: bool,
    insert: Callable[[], None],
) -> str | None:
    """CREATE [OR REPLACE] <object> [IF NOT EXISTS] on a local catalog table, in one transaction:
    the "already exists" status when the object exists and IF NOT EXISTS says to keep it, an error
    when it exists and may not be replaced, else None once its old row is gone and ``insert`` ran."""
    name = key[2]
    where = "database_name = ? AND schema_name = ? AND name = ?"
    duck.begin()
    try:
        exists = duck.execute(f"SELECT 1 FROM {table} WHERE {where}", key).fetchone() is not None
        if exists and if_not_exists and not replace:
            duck.commit()
            return _status_sql(f"{name} already exists, statement succeeded.")
        if exists and not replace:
            raise ProgrammingError(
                msg=f"SQL compilation error:\nObject '{name}' already exists.",
                errno=2002,
                sqlstate="42710",
            )
        duck.execute(f"DELETE FROM {table} WHERE {where}", key)
        insert()
        duck.commit()
    except BaseException:
        duck.rollback()
        raise
    return None


class _Endpoints:
    """pgsnow's login (our FakeSnow), query extensions and session end, in front of fakesnow's."""

    def __init__(self, state: LocalSnowflakeState) -> None:
        self.state = state

    async def login(self, request: Request) -> Response:
        body_json = await _read_json(request)
        if not _login_accepted(self.state, body_json["data"]):
            # Snowflake answers a bad key-pair login with HTTP 200 and success false; the
            # connector raises DatabaseError(errno=390144) from it.
            return JSONResponse(
                {
                    "data": None,
                    "code": INVALID_JWT_CODE,
                    "message": INVALID_JWT_MESSAGE,
                    "success": False,
                    "headers": None,
                }
            )
        parameters: dict[str, Any] = body_json["data"].get("SESSION_PARAMETERS", {})
        autocommit = bool(parameters.get("AUTOCOMMIT", True))
        database = _login_name(request.query_params.get("databaseName"))
        schema = _login_name(request.query_params.get("schemaName"))
        conn = await run_in_threadpool(
            self.state.fs.connect,
            database,
            schema,
            nop_regexes=parameters.get("nop_regexes"),
            autocommit=autocommit,
        )
        token = secrets.token_urlsafe(32)
        with self.state.lock:
            self.state.tokens.add(token)
        fakesnow_server.sessions[token] = conn
        return JSONResponse(
            {
                "data": {
                    "token": token,
                    "parameters": [
                        {"name": "AUTOCOMMIT", "value": autocommit},
                        {"name": "CLIENT_SESSION_KEEP_ALIVE_HEARTBEAT_FREQUENCY", "value": 3600},
                        # Keep array bindings inline: the local server has no internal stage upload.
                        {"name": "CLIENT_STAGE_ARRAY_BINDING_THRESHOLD", "value": 0},
                    ],
                    "sessionInfo": {"databaseName": database, "schemaName": schema},
                },
                "success": True,
            }
        )

    async def query(self, request: Request) -> Response:
        token = _token(request)
        conn = fakesnow_server.sessions.get(token) if token else None
        if token is None or conn is None:
            passed_on: Response = await fakesnow_server.query_request(request)
            return passed_on
        body_json = await _read_json(request)
        sql_text = body_json.get("sqlText", "")
        if not body_json.get("describeOnly"):
            self.state.history.record(ExecutedStatement(token, sql_text, bool(body_json.get("bindings"))))
        if token not in self.state.prepared_sessions:
            await run_in_threadpool(sf_extension_types.prepare_session, conn._duck_conn)
            self.state.prepared_sessions.add(token)
        if not body_json.get("bindings"):
            try:
                replacement = await run_in_threadpool(
                    self.state.intercept,
                    token,
                    conn,
                    sql_text,
                    describe_only=bool(body_json.get("describeOnly")),
                )
            except ProgrammingError as error:
                logger.info("local snowflake statement failed: %s", error.msg)
                return _error_response(error)
            if replacement is not None:
                body_json["sqlText"] = replacement
        table_ddl = None if body_json.get("describeOnly") else parse_table_ddl(sql_text)
        created = (
            None
            if table_ddl is None
            else await run_in_threadpool(self.state.before_table_ddl, conn, table_ddl)
        )
        if body_json.get("sqlText") == sql_text:
            if functions := self.state.session_functions.get(token):
                sql_text = functions.rewrite_calls(sql_text, conn.database, conn.schema)
            body_json["sqlText"] = rewrite_trim_characters(sql_text)
        answered: Response = await fakesnow_server.query_request(_with_body(request, body_json))
        if created is not None and _succeeded(answered):
            await run_in_threadpool(self.state.after_table_ddl, *created)
        return _with_zero_row_counts(answered)

    async def session(self, request: Request) -> Response:
        token = _token(request)
        if token and request.query_params.get("delete"):
            with self.state.lock:
                self.state.tokens.discard(token)
                self.state.session_parameters.pop(token, None)
                self.state.session_functions.pop(token, None)
                self.state.prepared_sessions.discard(token)
                # The session's temporary stages end with it, as in Snowflake.
                self.state.temporary_stages.pop(token, None)
        ended: Response = await fakesnow_server.session(request)
        return ended


def build_app(state: LocalSnowflakeState) -> Starlette:
    """fakesnow's routes, with pgsnow's login (our FakeSnow) and query extensions in front."""
    endpoints = _Endpoints(state)
    passthrough: dict[str, Callable[[Request], Awaitable[Response] | Response]] = {
        route.path: route.endpoint for route in fakesnow_server.routes if isinstance(route, Route)
    }
    routes = [
        Route("/session/v1/login-request", endpoints.login, methods=["POST"]),
        Route("/session", endpoints.session, methods=["POST"]),
        Route("/queries/v1/query-request", endpoints.query, methods=["POST"]),
        Route("/queries/v1/abort-request", passthrough["/queries/v1/abort-request"], methods=["POST"]),
        Route("/monitoring/queries/{sfqid}", passthrough["/monitoring/queries/{sfqid}"], methods=["GET"]),
    ]
    return Starlette(routes=routes)


def _login_accepted(state: LocalSnowflakeState, data: dict[str, Any]) -> bool:
    """Key-pair logins must carry a JWT the user's registered key verifies; passwords are not checked.

    The connector sends ``AUTHENTICATOR = SNOWFLAKE_JWT`` and the token in ``TOKEN`` when given
    ``private_key=``; a password login has no authenticator (or ``SNOWFLAKE``).
    """
    if str(data.get("AUTHENTICATOR") or "").upper() != "SNOWFLAKE_JWT":
        return True
    user = str(data.get("LOGIN_NAME") or "")
    # The emulator answers to any account name, so the token must name the account the client
    # logs in to (the stack's SNOWFLAKE_ACCOUNT need not be LOCAL_ACCOUNT).
    account = str(data.get("ACCOUNT_NAME") or LOCAL_ACCOUNT)
    return state.public_keys.verify(str(data.get("TOKEN") or ""), user=user, account=account) is not None


def _login_name(name: str | None) -> str | None:
    if not name:
        return None
    return name[1:-1] if name.startswith('"') and name.endswith('"') else name.upper()


# ---------------------------------------------------------------------------------------------
# the running server


def local_connect_kwargs(
    host: str,
    port: int,
    database: str | None = None,
    schema: str | None = None,
    *,
    user: str = LOCAL_USER,
    private_key: bytes | None = None,
) -> dict[str, Any]:
    """Connector arguments for the local Snowflake at ``host:port``; with ``private_key`` (DER
    PKCS#8) a key-pair login instead of a password."""
    credentials: dict[str, Any] = (
        {"password": LOCAL_PASSWORD}
        if private_key is None
        else {"private_key": private_key, "authenticator": "SNOWFLAKE_JWT"}
    )
    kwargs: dict[str, Any] = {
        "account": LOCAL_ACCOUNT,
        "user": user,
        **credentials,
        "host": host,
        "port": port,
        "protocol": "http",
        # No telemetry uploads, and fail fast rather than retry against a loopback server.
        "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
        "network_timeout": 30,
        "login_timeout": 30,
    }
    if database is not None:
        kwargs["database"] = database
    if schema is not None:
        kwargs["schema"] = schema
    return kwargs


# A server with a data_dir records where it listens in this file there, so another process (``pgsnow
# local sql`` while ``pgsnow local up`` runs) talks to it instead of opening the DuckDB files, which
# the server holds locked.
SERVER_RECORD_FILE = "server.json"


def _write_server_record(data_dir: Path, host: str, port: int) -> None:
    record = {"pid": os.getpid(), "host": host, "port": port}
    temporary = data_dir / f".{SERVER_RECORD_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps(record), encoding="utf-8")
    temporary.replace(data_dir / SERVER_RECORD_FILE)


def _remove_server_record(data_dir: Path, port: int) -> None:
    """Remove the record if it is still this server's (another may have started since)."""
    path = data_dir / SERVER_RECORD_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("pid") == os.getpid() and record.get("port") == port:
            path.unlink()
    except (OSError, ValueError):
        return


def running_server(data_dir: Path) -> tuple[str, int] | None:
    """Where the local Snowflake serving ``data_dir`` listens, if one is running (its process alive
    and its port answering); None otherwise, including for a record left by a process that died."""
    try:
        record = json.loads((data_dir / SERVER_RECORD_FILE).read_text(encoding="utf-8"))
        pid, host, port = int(record["pid"]), str(record["host"]), int(record["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    try:
        with socket.create_connection((host, port), timeout=2):
            return host, port
    except OSError:
        return None


@contextmanager
def open_local_snowflake(data_dir: Path, database: str | None = None) -> Iterator[dict[str, Any]]:
    """Connector arguments for the local Snowflake persisted in ``data_dir``: the running server's when
    one serves it (``pgsnow local up``), else a server started here on its files for the duration.

    ConfigError when ``data_dir`` holds no local Snowflake, or when its files are locked by a process
    that serves no recorded address (``start_local_snowflake``)."""
    if not data_dir.is_dir():
        raise ConfigError(
            [
                f"no local Snowflake in {data_dir} (run `pgsnow local up` or `pgsnow demo` first, or pass --data-dir)"
            ]
        )
    found = running_server(data_dir)
    if found is not None:
        yield local_connect_kwargs(*found, database=database)
        return
    # Plain queries read only the persisted tables; no S3 endpoint is needed, so none is given a real one.
    local = start_local_snowflake(s3_endpoint_url=UNUSED_S3_ENDPOINT, data_dir=data_dir)
    try:
        yield local.connect_kwargs(database=database)
    finally:
        local.stop()


@dataclass(frozen=True)
class LocalSnowflake:
    """A running local Snowflake; connect with ``snowflake.connector.connect(**connect_kwargs())``."""

    host: str
    port: int
    data_dir: Path | None
    _server: uvicorn.Server = field(repr=False, compare=False)
    _thread: threading.Thread = field(repr=False, compare=False)
    _state: LocalSnowflakeState = field(repr=False, compare=False)

    def connect_kwargs(
        self,
        database: str | None = None,
        schema: str | None = None,
        *,
        user: str = LOCAL_USER,
        private_key: bytes | None = None,
    ) -> dict[str, Any]:
        """Connector arguments; with ``private_key`` (DER PKCS#8) a key-pair login instead of a password."""
        return local_connect_kwargs(
            self.host, self.port, database, schema, user=user, private_key=private_key
        )

    @property
    def history(self) -> QueryHistory:
        """Every statement the server received (what ``QUERY_HISTORY`` would list), in order."""
        return self._state.history

    @property
    def public_keys(self) -> PublicKeys:
        """Each user's registered public key; what ``ALTER USER ... SET RSA_PUBLIC_KEY`` sets."""
        return self._state.public_keys

    def register_public_key(self, user: str, public_key_pem: str | bytes) -> str:
        """``ALTER USER <user> SET RSA_PUBLIC_KEY = ...``; returns the key's fingerprint."""
        return self._state.public_keys.register(user, public_key_pem)

    def stop(self) -> None:
        """Stop serving, close every session and the DuckDB database (flushing data_dir)."""
        self._server.should_exit = True
        self._thread.join(timeout=STARTUP_TIMEOUT_SECONDS)
        with self._state.lock:
            tokens = list(self._state.tokens)
            self._state.tokens.clear()
            self._state.temporary_stages.clear()
        for token in tokens:
            conn = fakesnow_server.sessions.pop(token, None)
            if conn is not None and not conn.is_closed():
                conn.close()
        duck = self._state.fs.duck_conn
        if self.data_dir is not None:
            duck.execute("CHECKPOINT")
            _remove_server_record(self.data_dir, self.port)
        duck.close()


def start_local_snowflake(
    *,
    s3_endpoint_url: str,
    aws_access_key_id: str = "testing",
    aws_secret_access_key: str = "testing",  # noqa: S107 - moto's conventional dummy key
    region: str = "us-east-1",
    data_dir: Path | None = None,
    port: int = 0,
    snowflake_aws_identity: SnowflakeAwsIdentity | None = None,
) -> LocalSnowflake:
    """Start the local Snowflake on 127.0.0.1 (port 0: any free port) in a background thread.

    Without ``snowflake_aws_identity`` every COPY reads S3 with the given access keys. With it,
    the emulator enforces what Snowflake does at an external stage (``sf_access``): reads use only
    the stage's integration (AssumeRole at ``s3_endpoint_url``, which must also serve STS) or
    credentials, and the access keys above are not used at all.
    """
    s3 = S3Settings(s3_endpoint_url, aws_access_key_id, aws_secret_access_key, region)
    access = StageAccess(LOCAL_ACCOUNT, s3_endpoint_url, region, snowflake_aws_identity)
    try:
        fs = build_fakesnow(s3, data_dir, shared_secret=snowflake_aws_identity is None)
    except duckdb.IOException as exc:
        # Another process (a running `pgsnow local up`, say) holds the database files.
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(
            [f"the local Snowflake in {data_dir} is in use by another process: {first_line}"]
        ) from exc
    state = LocalSnowflakeState(fs, data_dir, access, PublicKeys(LOCAL_ACCOUNT))
    host = "127.0.0.1"
    # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on each accepted connection (it checks the
    # socket's proto): without it every response's body waits out the client's delayed ACK of its
    # headers, about 40 ms a statement.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    bound_port = int(listener.getsockname()[1])
    config = uvicorn.Config(build_app(state), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name=f"local-snowflake:{bound_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            state.fs.duck_conn.close()
            raise RuntimeError(f"local Snowflake did not start on {host}:{bound_port}")
        time.sleep(0.02)
    logger.info("local Snowflake listening on %s:%s (data_dir=%s)", host, bound_port, data_dir)
    if data_dir is not None:
        _write_server_record(data_dir, host, bound_port)
    return LocalSnowflake(host, bound_port, data_dir, server, thread, state)
