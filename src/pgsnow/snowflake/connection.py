"""The Snowflake connection: ``connect`` with key-pair auth from Secrets Manager when deployed,
a password locally, and the connector arguments both build from the settings; the session's
set-up (``session_sql``) runs once per connection."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pgsnow.config import SnowflakeSettings
from pgsnow.errors import ConfigError, PermanentError, RetryableError, aws_error_code
from pgsnow.snowflake.error_classifier import classify_snowflake_error
from pgsnow.snowflake.session_sql import session_setup_sql
from pgsnow.snowflake.sql_text import PARAMSTYLE

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from snowflake.connector import SnowflakeConnection


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
        conn = snowflake.connector.connect(**kwargs)
    except snowflake.connector.errors.Error as exc:
        raise classify_snowflake_error(exc) from exc
    try:
        # Every session a function opens (its loads, full runs and change runs alike, and their
        # completion) is set up here, once, before its first statement.
        with conn.cursor() as cursor:
            for statement in session_setup_sql(settings):
                cursor.execute(statement)
    except snowflake.connector.errors.Error as exc:
        conn.close()
        raise classify_snowflake_error(exc) from exc
    return conn


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
