"""What the local Snowflake enforces at an external stage: integrations, credentials, allowed locations.

Snowflake reads a customer's bucket as the customer allowed it, never with a key of its own:

* a stage (or a COPY from an ``'s3://...'`` URL) with ``STORAGE_INTEGRATION = <i>`` is read with
  temporary credentials from ``sts:AssumeRole`` on the integration's ``STORAGE_AWS_ROLE_ARN``,
  called as Snowflake's own AWS user with the integration's external ID; the URL must lie under
  one of the integration's ``STORAGE_ALLOWED_LOCATIONS`` and under none of its blocked ones;
* one with ``CREDENTIALS = (AWS_KEY_ID ... AWS_SECRET_KEY ... [AWS_TOKEN ...])`` is read with them;
* one with neither is read anonymously, which a private bucket refuses.

The emulator does the same once ``start_local_snowflake`` is given the Snowflake AWS identity
(``SnowflakeAwsIdentity``: the IAM user DESC INTEGRATION reports and whose keys call STS). Without
one, nothing is enforced and every read goes through the one DuckDB S3 secret, as before.

Integrations are account-level objects, kept next to fakesnow's stages in ``_fs_global`` (so they
persist with ``data_dir``), and a stage's credentials in a table beside fakesnow's stage table.

DuckDB takes S3 credentials only from secrets of the one database all sessions share, so a read
with a stage's credentials creates a secret scoped to the bucket, reads, and drops it, all under
one lock: two sessions reading with different credentials at once would otherwise pick up each
other's secret. Enforced reads are therefore serialised; that is a local cost only.
"""

from __future__ import annotations

import datetime
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import boto3
import duckdb
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from snowflake.connector.errors import ProgrammingError

from pgsnow.local.sf_access_sql import AlterStorageIntegration, CreateStorageIntegration, location_allowed
from pgsnow.local.sf_credentials_sql import AwsCredentials

INTEGRATIONS_TABLE = "_fs_global._fs_information_schema._pgsnow_integrations"
STAGE_CREDENTIALS_TABLE = "_fs_global._fs_information_schema._pgsnow_stage_credentials"
READ_SECRET_NAME = "pgsnow_local_stage_read"  # noqa: S105 - a DuckDB object name, not a secret
# Without a Snowflake identity DESC INTEGRATION still answers; this user stands for Snowflake's.
PLACEHOLDER_IAM_USER_ARN = "arn:aws:iam::123456789012:user/pgsnow-local-snowflake"
# Temporary credentials are renewed this long before they expire, so a read never starts with
# credentials that lapse halfway through it.
CREDENTIAL_RENEWAL_MARGIN = datetime.timedelta(minutes=5)
ROLE_SESSION_NAME = "pgsnow-local-snowflake"

# Texts Snowflake gives for these failures. "Error assuming AWS_ROLE" and the CREDENTIALS one are
# Snowflake's as reported by its users; the others are close approximations (docs say which).
ASSUME_ROLE_FAILED = (
    "SQL execution error: Error assuming AWS_ROLE.\n"
    "Please verify the role and externalId are configured correctly in your AWS policy."
)
CREDENTIALS_WITH_INTEGRATION = (
    "SQL compilation error:\nCREDENTIALS property is not allowed on stages that use a storage integration "
    "or within COPY commands that use a storage integration."
)
# Snowflake's reply to an ALTER that succeeds.
ALTERED = "Statement executed successfully."
ACCESS_DENIED = (
    "Failure using stage area. Cause: [Access Denied (Status Code: 403; Error Code: AccessDenied)]"
)


@dataclass(frozen=True)
class SnowflakeAwsIdentity:
    """Snowflake's own AWS principal: the IAM user a storage role trusts, and its access keys."""

    user_arn: str
    access_key_id: str
    secret_access_key: str = field(repr=False)


@dataclass(frozen=True)
class StorageIntegration:
    name: str
    enabled: bool
    role_arn: str
    external_id: str
    allowed_locations: tuple[str, ...]
    blocked_locations: tuple[str, ...]
    comment: str
    created_on: datetime.datetime


@dataclass(frozen=True)
class ReadAccess:
    """How one COPY reads S3: with these credentials, checked against this integration's locations."""

    credentials: AwsCredentials
    integration: StorageIntegration | None = None

    def check_location(self, url: str) -> None:
        if self.integration is not None:
            check_allowed(self.integration, url)


def access_denied() -> ProgrammingError:
    return ProgrammingError(msg=ACCESS_DENIED, errno=91003, sqlstate="22000")


def check_allowed(integration: StorageIntegration, url: str) -> None:
    if not location_allowed(url, integration.allowed_locations, integration.blocked_locations):
        raise ProgrammingError(
            msg=f"SQL execution error: Location '{url}' is not allowed by integration '{integration.name}'. "
            "Please use DESC INTEGRATION to check out allowed and blocked locations.",
            errno=3074,
            sqlstate="42601",
        )


def create_access_catalog(duck: duckdb.DuckDBPyConnection) -> None:
    """The integrations and stage-credentials tables in ``_fs_global`` (idempotent)."""
    duck.execute(
        f"CREATE TABLE IF NOT EXISTS {INTEGRATIONS_TABLE} (name VARCHAR PRIMARY KEY, enabled BOOLEAN, "
        "role_arn VARCHAR, external_id VARCHAR, allowed_locations VARCHAR[], blocked_locations VARCHAR[], "
        "comment VARCHAR, created_on TIMESTAMPTZ)"
    )
    duck.execute(
        f"CREATE TABLE IF NOT EXISTS {STAGE_CREDENTIALS_TABLE} (database_name VARCHAR, schema_name VARCHAR, "
        "name VARCHAR, aws_key_id VARCHAR, aws_secret_key VARCHAR, aws_token VARCHAR, "
        "PRIMARY KEY (database_name, schema_name, name))"
    )


def generated_external_id(account: str) -> str:
    """An external ID in the shape Snowflake generates (``<ACCOUNT>_SFCRole=<n>_<random>``)."""
    locator = "".join(c for c in account.upper() if c.isalnum())
    return f"{locator}_SFCRole=2_{secrets.token_urlsafe(21)}"


def _integration_from_row(row: tuple[Any, ...]) -> StorageIntegration:
    return StorageIntegration(
        name=str(row[0]),
        enabled=bool(row[1]),
        role_arn=str(row[2]),
        external_id=str(row[3]),
        allowed_locations=tuple(row[4] or ()),
        blocked_locations=tuple(row[5] or ()),
        comment=str(row[6] or ""),
        created_on=row[7],
    )


def _list_or_none(values: tuple[str, ...] | None) -> list[str] | None:
    return None if values is None else list(values)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass
class StageAccess:
    """The local Snowflake's S3 access: integrations, the STS credential cache and the read lock."""

    account: str
    endpoint_url: str
    region: str
    identity: SnowflakeAwsIdentity | None
    _cache: dict[tuple[str, str], tuple[AwsCredentials, datetime.datetime]] = field(default_factory=dict)
    _cache_lock: threading.Lock = field(default_factory=threading.Lock)
    _read_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def enforced(self) -> bool:
        return self.identity is not None

    @property
    def iam_user_arn(self) -> str:
        return self.identity.user_arn if self.identity else PLACEHOLDER_IAM_USER_ARN

    # -- integrations

    def create_integration(self, duck: duckdb.DuckDBPyConnection, statement: CreateStorageIntegration) -> str:
        """Run CREATE STORAGE INTEGRATION on an autocommit DuckDB cursor; the status text."""
        duck.begin()
        try:
            exists = _integration_exists(duck, statement.name)
            if exists and statement.if_not_exists and not statement.replace:
                duck.commit()
                return f"{statement.name} already exists, statement succeeded."
            if exists and not statement.replace:
                raise ProgrammingError(
                    msg=f"SQL compilation error:\nObject '{statement.name}' already exists.",
                    errno=2002,
                    sqlstate="42710",
                )
            duck.execute(f"DELETE FROM {INTEGRATIONS_TABLE} WHERE name = ?", [statement.name])
            duck.execute(
                f"INSERT INTO {INTEGRATIONS_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    statement.name,
                    statement.enabled,
                    statement.role_arn,
                    statement.external_id or generated_external_id(self.account),
                    list(statement.allowed_locations),
                    list(statement.blocked_locations),
                    statement.comment,
                    datetime.datetime.now(datetime.UTC),
                ],
            )
            duck.commit()
        except BaseException:
            duck.rollback()
            raise
        return f"Integration {statement.name} successfully created."

    def alter_integration(self, duck: duckdb.DuckDBPyConnection, statement: AlterStorageIntegration) -> str:
        """Run ALTER STORAGE INTEGRATION ... SET on an autocommit DuckDB cursor; the status text.

        Only the properties given change. The IAM user and the external ID stay (unless the
        statement sets STORAGE_AWS_EXTERNAL_ID), as Snowflake keeps them on ALTER, so the storage
        role's trust policy written from DESC INTEGRATION still holds.
        """
        changes = {
            column: value
            for column, value in (
                ("enabled", statement.enabled),
                ("role_arn", statement.role_arn),
                ("external_id", statement.external_id),
                ("allowed_locations", _list_or_none(statement.allowed_locations)),
                ("blocked_locations", _list_or_none(statement.blocked_locations)),
                ("comment", statement.comment),
            )
            if value is not None
        }
        duck.begin()
        try:
            exists = _integration_exists(duck, statement.name)
            if not exists and statement.if_exists:
                duck.commit()
                return ALTERED
            if not exists:
                self.integration(duck, statement.name)  # raises Snowflake's "does not exist" error
            assignments = ", ".join(f"{column} = ?" for column in changes)
            duck.execute(
                f"UPDATE {INTEGRATIONS_TABLE} SET {assignments} WHERE name = ?",
                [*changes.values(), statement.name],
            )
            duck.commit()
        except BaseException:
            duck.rollback()
            raise
        return ALTERED

    def integration(self, duck: duckdb.DuckDBPyConnection, name: str) -> StorageIntegration:
        row = duck.execute(f"SELECT * FROM {INTEGRATIONS_TABLE} WHERE name = ?", [name]).fetchone()
        if row is None:
            raise ProgrammingError(
                msg=f"SQL compilation error:\nIntegration '{name}' does not exist or not authorized.",
                errno=2003,
                sqlstate="02000",
            )
        return _integration_from_row(row)

    def describe_rows(self, duck: duckdb.DuckDBPyConnection, name: str) -> list[tuple[str, str, str, str]]:
        """DESC INTEGRATION's rows: property, property_type, property_value, property_default."""
        found = self.integration(duck, name)
        return [
            ("ENABLED", "Boolean", "true" if found.enabled else "false", "false"),
            ("STORAGE_PROVIDER", "String", "S3", ""),
            ("STORAGE_ALLOWED_LOCATIONS", "List", ",".join(found.allowed_locations), "[]"),
            ("STORAGE_BLOCKED_LOCATIONS", "List", ",".join(found.blocked_locations), "[]"),
            ("STORAGE_AWS_IAM_USER_ARN", "String", self.iam_user_arn, ""),
            ("STORAGE_AWS_ROLE_ARN", "String", found.role_arn, ""),
            ("STORAGE_AWS_EXTERNAL_ID", "String", found.external_id, ""),
            ("COMMENT", "String", found.comment, ""),
        ]

    def usable_integration(self, duck: duckdb.DuckDBPyConnection, name: str, url: str) -> StorageIntegration:
        """The integration a stage or COPY names, when it exists, is enabled and allows ``url``."""
        found = self.integration(duck, name)
        if not found.enabled:
            raise ProgrammingError(
                msg=f"SQL execution error: Integration '{name}' is disabled.", errno=3073, sqlstate="42601"
            )
        check_allowed(found, url)
        return found

    # -- stages

    def store_stage_credentials(
        self, duck: duckdb.DuckDBPyConnection, key: list[str], credentials: AwsCredentials | None
    ) -> None:
        """Keep (or forget) a stage's credentials, in the caller's open transaction."""
        duck.execute(
            f"DELETE FROM {STAGE_CREDENTIALS_TABLE} WHERE database_name = ? AND schema_name = ? AND name = ?",
            key,
        )
        if credentials is not None:
            duck.execute(
                f"INSERT INTO {STAGE_CREDENTIALS_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
                [*key, credentials.key_id, credentials.secret_key, credentials.token],
            )

    def stage_credentials(self, duck: duckdb.DuckDBPyConnection, key: list[str]) -> AwsCredentials | None:
        row = duck.execute(
            f"SELECT aws_key_id, aws_secret_key, aws_token FROM {STAGE_CREDENTIALS_TABLE} "
            "WHERE database_name = ? AND schema_name = ? AND name = ?",
            key,
        ).fetchone()
        return None if row is None else AwsCredentials(str(row[0]), str(row[1]), row[2])

    # -- reads

    def read_access(
        self,
        duck: duckdb.DuckDBPyConnection,
        *,
        integration: str | None,
        credentials: AwsCredentials | None,
        url: str,
    ) -> ReadAccess | None:
        """How a read of ``url`` authenticates; None when nothing is enforced (the shared secret reads)."""
        if not self.enforced:
            return None
        if integration is not None and credentials is not None:
            raise ProgrammingError(msg=CREDENTIALS_WITH_INTEGRATION, errno=2030, sqlstate="42601")
        if integration is not None:
            found = self.usable_integration(duck, integration, url)
            return ReadAccess(self.assume_role(found), found)
        if credentials is not None:
            return ReadAccess(credentials)
        # An anonymous request to a private bucket: S3 answers 403, and so does Snowflake.
        raise access_denied()

    def assume_role(self, integration: StorageIntegration) -> AwsCredentials:
        """Temporary credentials for the integration's role, from the cache while they last."""
        assert self.identity is not None
        key = (integration.role_arn, integration.external_id)
        now = datetime.datetime.now(datetime.UTC)
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and cached[1] - CREDENTIAL_RENEWAL_MARGIN > now:
                return cached[0]
        sts = boto3.client(
            "sts",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.identity.access_key_id,
            aws_secret_access_key=self.identity.secret_access_key,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}),
        )
        try:
            answer = sts.assume_role(
                RoleArn=integration.role_arn,
                RoleSessionName=ROLE_SESSION_NAME,
                ExternalId=integration.external_id,
            )
        except (ClientError, BotoCoreError):
            raise ProgrammingError(msg=ASSUME_ROLE_FAILED, errno=3144, sqlstate="42601") from None
        given = answer["Credentials"]
        credentials = AwsCredentials(given["AccessKeyId"], given["SecretAccessKey"], given["SessionToken"])
        expiration = given["Expiration"]
        with self._cache_lock:
            self._cache[key] = (credentials, expiration)
        return credentials

    @contextmanager
    def reading(
        self, reader: duckdb.DuckDBPyConnection, access: ReadAccess | None, url: str
    ) -> Iterator[None]:
        """Let ``reader`` read ``url``'s bucket with ``access``'s credentials for the duration."""
        if access is None:
            yield
            return
        bucket = urlparse(url).netloc
        endpoint = urlparse(self.endpoint_url)
        use_ssl = "true" if endpoint.scheme == "https" else "false"
        credentials = access.credentials
        token = f", SESSION_TOKEN {_literal(credentials.token)}" if credentials.token else ""
        with self._read_lock:
            # CREATE SECRET takes no bound parameters; every value is quoted as a literal.
            reader.execute(
                f"CREATE OR REPLACE SECRET {READ_SECRET_NAME} (TYPE S3,"
                f" KEY_ID {_literal(credentials.key_id)}, SECRET {_literal(credentials.secret_key)}{token},"
                f" REGION {_literal(self.region)}, ENDPOINT {_literal(f'{endpoint.hostname}:{endpoint.port}')},"
                f" URL_STYLE 'path', USE_SSL {use_ssl}, SCOPE {_literal(f's3://{bucket}/')})"
            )
            try:
                yield
            finally:
                reader.execute(f"DROP SECRET IF EXISTS {READ_SECRET_NAME}")


def _integration_exists(duck: duckdb.DuckDBPyConnection, name: str) -> bool:
    return duck.execute(f"SELECT 1 FROM {INTEGRATIONS_TABLE} WHERE name = ?", [name]).fetchone() is not None
