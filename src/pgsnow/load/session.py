"""Statements on the loader's Snowflake connection: rows back, credentials redacted, and the one
transaction (autocommit off, commit, rollback that keeps the original error, autocommit back)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from snowflake.connector.errors import Error as SnowflakeDriverError

from pgsnow.config import Settings
from pgsnow.identifiers import TableRef
from pgsnow.ledger import Ledger
from pgsnow.observability import logger
from pgsnow.snowflake.error_classifier import classify_snowflake_error
from pgsnow.snowflake.load_sql import AwsCredentials, CredentialsSource, UrlSource, aws_credentials_from

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from snowflake.connector import SnowflakeConnection


@dataclass(frozen=True)
class LoadSession:
    """What one batch talks to: the settings, the Snowflake connection, S3, the tables' ledgers."""

    settings: Settings
    database: str
    sf_conn: SnowflakeConnection
    s3: S3Client

    @property
    def control_schema(self) -> str:
        return self.settings.snowflake.control_schema

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    def ledger(self, table: TableRef) -> Ledger:
        """``table``'s ledger (the caller makes sure it exists: ``ledger.Ledgers.ensure``)."""
        return Ledger(self.sf_conn, self.database, self.control_schema, table)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return execute(self.sf_conn, sql, params)

    def execute_dicts(self, sql: str) -> list[dict[str, Any]]:
        return execute_dicts(self.sf_conn, sql)

    def execute_count(self, sql: str, params: Sequence[Any] | None = None) -> int:
        """Run a DML statement; the number of rows it changed."""
        with self.sf_conn.cursor() as cursor:
            cursor.execute(sql, params)
            return int(cursor.rowcount or 0)

    def execute_with_credentials(self, sql: str, credentials: AwsCredentials | None) -> list[dict[str, Any]]:
        return execute_with_credentials(self.sf_conn, sql, credentials)

    def transaction(self) -> AbstractContextManager[None]:
        return transaction(self.sf_conn)


def execute(
    sf_conn: SnowflakeConnection, sql: str, params: Sequence[Any] | None = None
) -> list[tuple[Any, ...]]:
    with sf_conn.cursor() as cursor:
        cursor.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()]


def execute_dicts(sf_conn: SnowflakeConnection, sql: str) -> list[dict[str, Any]]:
    """Rows as dicts keyed by lower-case column name (COPY's result columns)."""
    with sf_conn.cursor() as cursor:
        cursor.execute(sql)
        names = [d[0].lower() for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def execute_with_credentials(
    sf_conn: SnowflakeConnection, sql: str, credentials: AwsCredentials | None
) -> list[dict[str, Any]]:
    """Run a statement that carries credentials (CREDENTIALS = (...)).

    A failure becomes our error with every credential value redacted from its message, raised
    outside the ``except`` so that the driver's error (whose ``query`` holds the statement) is
    neither its cause nor its context: tracebacks and logs never see the statement.
    """
    if credentials is None:
        return execute_dicts(sf_conn, sql)
    try:
        return execute_dicts(sf_conn, sql)
    except (SnowflakeDriverError, OSError) as exc:
        failure = classify_snowflake_error(exc, secrets=credentials.secret_values)
    raise failure


def url_source_for(settings: Settings, credentials_source: CredentialsSource | None) -> UrlSource:
    """How Snowflake reads an object outside the stage (a run's deletes key list): through the
    storage integration, else with the credentials of the caller's AWS session (none: the stage's)."""
    integration = settings.snowflake.storage_integration
    if integration:
        return UrlSource(settings.bucket, storage_integration=integration)
    credentials = None if credentials_source is None else aws_credentials_from(credentials_source)
    return UrlSource(settings.bucket, credentials=credentials)


@contextmanager
def transaction(sf_conn: SnowflakeConnection) -> Iterator[None]:
    """One Snowflake transaction: committed when the block ends, rolled back when it raises.

    DDL commits in Snowflake, so a block must send none (create tables before it begins).
    """
    sf_conn.autocommit(False)
    try:
        yield
        sf_conn.commit()
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
