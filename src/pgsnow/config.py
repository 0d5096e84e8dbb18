"""The one place that reads the environment.

``Settings.from_env(environ, component)`` builds one frozen, typed settings
object and reports *every* problem at once in a single ConfigError. Secrets are
never put in the environment of a deployed function: only the ARN of the
Secrets Manager secret is (``*_SECRET_ARN``); the plain ``PGSNOW_PG_DSN`` and
``SNOWFLAKE_PASSWORD`` exist for the local stack and tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from pgsnow.errors import ConfigError, PermanentError
from pgsnow.identifiers import TableAllowlist
from pgsnow.keys import normalise_prefix

E = TypeVar("E", bound=StrEnum)


class Component(StrEnum):
    EXTRACTOR = "extractor"
    LOADER = "loader"
    CLEANUP = "cleanup"
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


@dataclass(frozen=True)
class Settings:
    component: Component
    bucket: str
    prefix: str
    file_format: StagedFormat
    cleanup_mode: CleanupMode
    tables: TableAllowlist
    batch_rows: int
    postgres: PostgresSettings
    snowflake: SnowflakeSettings

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, component: Component = Component.LOCAL
    ) -> Settings:
        env = os.environ if environ is None else environ
        problems: list[str] = []

        def get(name: str, default: str | None = None) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() != "" else default

        def require(name: str, *, needed_by: set[Component]) -> str | None:
            value = get(name)
            if value is None and component in needed_by:
                problems.append(f"{name} is required for the {component.value}")
            return value

        def as_int(name: str, default: int, minimum: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                problems.append(f"{name} must be an integer, got {raw!r}")
                return default
            if value < minimum:
                problems.append(f"{name} must be >= {minimum}, got {value}")
            return value

        def as_enum(name: str, enum: type[E], default: E, aliases: Mapping[str, E]) -> E:
            raw = (get(name) or default.value).lower()
            if raw in aliases:
                return aliases[raw]
            try:
                return enum(raw)
            except ValueError:
                allowed = sorted([e.value for e in enum] + list(aliases))
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
                return default

        everyone = {Component.EXTRACTOR, Component.LOADER, Component.CLEANUP, Component.LOCAL}
        bucket = require("S3_STAGE_BUCKET", needed_by=everyone) or ""
        prefix = "staging"
        try:
            prefix = normalise_prefix(get("S3_STAGE_PREFIX", "staging") or "staging")
        except PermanentError as exc:
            problems.append(f"S3_STAGE_PREFIX: {exc.message}")
        file_format = as_enum("S3_FILE_FORMAT", StagedFormat, StagedFormat.CSV, {})
        cleanup_mode = as_enum("CLEANUP_S3_FILES", CleanupMode, CleanupMode.AFTER_ALL, _CLEANUP_ALIASES)

        tables_text = get("PGSNOW_TABLES")
        if tables_text is None and component is Component.EXTRACTOR:
            problems.append(
                "PGSNOW_TABLES (the table allowlist, e.g. public.customers,public.orders) is required"
            )
        tables = TableAllowlist([])
        try:
            tables = TableAllowlist.parse(tables_text or "")
        except PermanentError as exc:
            problems.append(f"PGSNOW_TABLES: {exc.message}")

        batch_rows = as_int("EXTRACT_BATCH_ROWS", 100_000, 1)

        pg_dsn, pg_secret = get("PGSNOW_PG_DSN"), get("PGSNOW_PG_SECRET_ARN")
        if component is Component.EXTRACTOR and not (pg_dsn or pg_secret):
            problems.append(
                "PGSNOW_PG_SECRET_ARN (or PGSNOW_PG_DSN for local runs) is required for the extractor"
            )
        postgres = PostgresSettings(pg_dsn, pg_secret, as_int("PG_STATEMENT_TIMEOUT_MS", 0, 0))

        sf_secret = get("SNOWFLAKE_SECRET_ARN")
        sf_needed = {Component.LOADER}
        account = get("SNOWFLAKE_ACCOUNT")
        if component in sf_needed and not (sf_secret or account):
            problems.append(
                "SNOWFLAKE_SECRET_ARN (or SNOWFLAKE_ACCOUNT for local runs) is required for the loader"
            )
        database = require("SNOWFLAKE_DATABASE", needed_by=sf_needed)
        port_raw = get("SNOWFLAKE_PORT")
        port = None
        if port_raw is not None:
            port = as_int("SNOWFLAKE_PORT", 443, 1)
        protocol = (get("SNOWFLAKE_PROTOCOL", "https") or "https").lower()
        if protocol not in {"http", "https"}:
            problems.append(f"SNOWFLAKE_PROTOCOL must be http or https, got {protocol!r}")
        snowflake = SnowflakeSettings(
            account=account,
            user=get("SNOWFLAKE_USER"),
            password=get("SNOWFLAKE_PASSWORD"),
            secret_arn=sf_secret,
            database=database,
            warehouse=get("SNOWFLAKE_WAREHOUSE"),
            role=get("SNOWFLAKE_ROLE"),
            stage=get("SNOWFLAKE_STAGE", "PGSNOW_STAGE") or "PGSNOW_STAGE",
            control_schema=get("SNOWFLAKE_CONTROL_SCHEMA", "PGSNOW") or "PGSNOW",
            storage_integration=get("SNOWFLAKE_STORAGE_INTEGRATION"),
            host=get("SNOWFLAKE_HOST"),
            port=port,
            protocol=protocol,
        )

        if problems:
            raise ConfigError(problems)
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
        )


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
