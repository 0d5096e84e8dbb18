"""The Snowflake setup a deployment needs, as SQL to run once, in order (``pgsnow snowflake-sql``).

Each step is a ``SetupStep`` (a title, why it is there, its statements). Every identifier goes
through ``quote_ident``; the few values written into SQL (URLs, the role ARN, the public key
placeholder) go through ``string_literal``. The stage, file formats and pipes come from
``pgsnow.snowflake``, so the SQL printed here is the SQL the loader expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pgsnow.config import LoadMethod
from pgsnow.errors import ConfigError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.keys import KEY_LISTS_PREFIX, FileFormat, normalise_prefix
from pgsnow.snowflake.load_sql import build_create_file_format, build_create_pipe, build_create_stage
from pgsnow.snowflake.sql_text import string_literal
from pgsnow.snowflake.table_sql import build_create_schema

PUBLIC_KEY_PLACEHOLDER = "<contents of rsa_key.pub without the BEGIN/END lines>"
FILE_FORMAT_NAMES = {FileFormat.CSV: "PGSNOW_CSV", FileFormat.PARQUET: "PGSNOW_PARQUET"}


@dataclass(frozen=True)
class SetupOptions:
    database: str
    schema: str  # the control schema: stage, file formats, ledger, pipes
    role: str
    bucket: str = "<StageBucketName output>"
    prefix: str = "staging"
    integration: str = "PGSNOW_S3"
    user: str = "PGSNOW_LOADER"
    warehouse: str = "PGSNOW_WH"
    stage: str = "PGSNOW_STAGE"
    aws_role_arn: str = "<SnowflakeStorageRoleArnToTrust output>"
    load_method: LoadMethod = LoadMethod.COPY
    pipe: str = "PGSNOW_PIPE"
    pipe_tables: Sequence[TableRef] = field(default_factory=tuple)


@dataclass(frozen=True)
class SetupStep:
    title: str
    note: str
    statements: tuple[str, ...]


def pipe_name(prefix: str, table: TableRef) -> str:
    """One pipe per table: a pipe's COPY has one target. Named ``{prefix}_{SCHEMA}_{TABLE}``."""
    return f"{prefix}_{table.snowflake_schema}_{table.snowflake_table}"


def allowed_locations(bucket: str, prefix: str) -> tuple[str, ...]:
    """What the storage integration lets Snowflake read: the stage (data files) and the key lists
    of runs with deletes, which the loader COPYs by URL from outside the stage (docs/loading.md)."""
    return (f"s3://{bucket}/{normalise_prefix(prefix)}/", f"s3://{bucket}/{KEY_LISTS_PREFIX}/")


def build_table_pipe_copy(options: SetupOptions, table: TableRef) -> str:
    """The pipe's COPY: the table's folder of the stage, CSV columns by position (the manifest's order)."""
    stage = quote_qualified(options.database, options.schema, options.stage)
    path = f"{table.schema}/{table.table}/"
    target = quote_qualified(options.database, table.snowflake_schema, table.snowflake_table)
    file_format = quote_qualified(options.database, options.schema, FILE_FORMAT_NAMES[FileFormat.CSV])
    return (
        f"COPY INTO {target}\n"
        f"  FROM @{stage}/{path}\n"
        f"  FILE_FORMAT = (FORMAT_NAME = {file_format})\n"
        "  ON_ERROR = ABORT_STATEMENT"
    )


def build_setup_steps(options: SetupOptions) -> list[SetupStep]:
    """Every step, in the order to run them."""
    _check_options(options)
    db, ctl = options.database, options.schema
    steps = [
        *([] if _uses_credentials(options) else _integration_steps(options)),
        *_database_and_stage_steps(options),
        SetupStep(
            "File formats",
            "The options the loader's COPY gives inline, named for pipes and for people querying the stage.",
            tuple(build_create_file_format(db, ctl, name, fmt) for fmt, name in FILE_FORMAT_NAMES.items()),
        ),
    ]
    if options.load_method is LoadMethod.SNOWPIPE:
        steps.append(
            SetupStep(
                "Pipes (LOAD_METHOD=snowpipe)",
                "Run after the first load created each target table (a pipe checks its table exists).",
                tuple(
                    build_create_pipe(db, ctl, pipe_name(options.pipe, t), build_table_pipe_copy(options, t))
                    for t in options.pipe_tables
                ),
            )
        )
    steps.append(
        SetupStep(
            "Role for the loader",
            "Everything pgsnow does in Snowflake runs as this role.",
            (f"CREATE ROLE IF NOT EXISTS {quote_ident(options.role)}",),
        )
    )
    steps.append(
        SetupStep(
            "Grants",
            "Least privilege: the loader creates and owns the target schemas and tables it loads.",
            _grants(options),
        )
    )
    steps.append(_user_step(options))
    return steps


def _uses_credentials(options: SetupOptions) -> bool:
    """The credentials method: no storage integration; the loader's own temporary credentials."""
    return not options.integration.strip()


def _check_options(options: SetupOptions) -> None:
    problems = [
        f"{name} must not be empty"
        for name, value in (
            ("database", options.database),
            ("schema", options.schema),
            ("role", options.role),
        )
        if not value.strip()
    ]
    if options.load_method is LoadMethod.SNOWPIPE and not options.pipe_tables:
        problems.append("--load-method snowpipe needs --tables (one pipe per table)")
    if options.load_method is LoadMethod.SNOWPIPE and _uses_credentials(options):
        problems.append(
            "--load-method snowpipe needs --integration: Snowpipe reads after the loader returned, when "
            "the loader's temporary credentials (the credentials method) may have expired"
        )
    if problems:
        raise ConfigError(problems)


def _integration_steps(options: SetupOptions) -> list[SetupStep]:
    locations = ", ".join(
        string_literal(url) for url in allowed_locations(options.bucket, normalise_prefix(options.prefix))
    )
    integration = quote_ident(options.integration)
    return [
        SetupStep(
            "Storage integration (ACCOUNTADMIN)",
            "Lets Snowflake read only the staging prefix and the run key lists, through the role the "
            "stack creates. The ALTER brings an integration created by an older pgsnow up to date; "
            "it keeps the integration's IAM user and external ID (CREATE OR REPLACE would not).",
            (
                f"CREATE STORAGE INTEGRATION IF NOT EXISTS {integration}\n"
                "  TYPE = EXTERNAL_STAGE\n"
                "  STORAGE_PROVIDER = 'S3'\n"
                "  ENABLED = TRUE\n"
                f"  STORAGE_AWS_ROLE_ARN = {string_literal(options.aws_role_arn)}\n"
                f"  STORAGE_ALLOWED_LOCATIONS = ({locations})",
                f"ALTER STORAGE INTEGRATION {integration} SET STORAGE_ALLOWED_LOCATIONS = ({locations})",
            ),
        ),
        SetupStep(
            "Read the two template parameters",
            "STORAGE_AWS_IAM_USER_ARN -> SnowflakeIamUserArn, STORAGE_AWS_EXTERNAL_ID -> SnowflakeExternalId; "
            "redeploy the stack with both before creating the stage.",
            (f"DESC INTEGRATION {integration}",),
        ),
    ]


def _database_and_stage_steps(options: SetupOptions) -> list[SetupStep]:
    db, ctl = options.database, options.schema
    steps = [
        SetupStep(
            "Database and control schema",
            "The loader creates each target schema and table itself from the run manifest.",
            (f"CREATE DATABASE IF NOT EXISTS {quote_ident(db)}", build_create_schema(db, ctl)),
        )
    ]
    # The credentials method: each loader session creates its own TEMPORARY stage of this
    # name with its own credentials; a permanent one could hold no credentials that last.
    if not _uses_credentials(options):
        stage = build_create_stage(
            db,
            ctl,
            options.stage,
            bucket=options.bucket,
            prefix=normalise_prefix(options.prefix),
            storage_integration=options.integration,
        )
        steps.append(
            SetupStep(
                "External stage over the staging prefix",
                "SNOWFLAKE_STAGE; the loader's COPY reads from it.",
                (stage,),
            )
        )
    return steps


def _grants(options: SetupOptions) -> tuple[str, ...]:
    db, ctl, role = options.database, options.schema, quote_ident(options.role)
    control = quote_qualified(db, ctl)
    snowpipe = options.load_method is LoadMethod.SNOWPIPE
    pipes = (
        [quote_qualified(db, ctl, pipe_name(options.pipe, t)) for t in options.pipe_tables]
        if snowpipe
        else []
    )
    formats = [quote_qualified(db, ctl, name) for name in FILE_FORMAT_NAMES.values()]
    return (
        f"GRANT USAGE ON WAREHOUSE {quote_ident(options.warehouse)} TO ROLE {role}",
        f"GRANT USAGE, CREATE SCHEMA ON DATABASE {quote_ident(db)} TO ROLE {role}",
        # CREATE TABLE: the loader creates each target table's load ledger (pgsnow.ledger) in the
        # control schema, and merge runs use transient work tables there.
        # CREATE FUNCTION: `pgsnow verify` compares JSON columns with a temporary UDF there.
        f"GRANT USAGE, CREATE TABLE, CREATE FUNCTION ON SCHEMA {control} TO ROLE {role}",
        *(
            # The credentials method: the loader creates its session's temporary stage.
            [f"GRANT CREATE STAGE ON SCHEMA {control} TO ROLE {role}"]
            if _uses_credentials(options)
            else [
                f"GRANT USAGE ON INTEGRATION {quote_ident(options.integration)} TO ROLE {role}",
                f"GRANT USAGE ON STAGE {quote_qualified(db, ctl, options.stage)} TO ROLE {role}",
            ]
        ),
        *(f"GRANT USAGE ON FILE FORMAT {name} TO ROLE {role}" for name in formats),
        # The loader creates a missing table's pipe itself (docs/loading.md).
        *([f"GRANT CREATE PIPE ON SCHEMA {control} TO ROLE {role}"] if snowpipe else []),
        *(f"GRANT OPERATE, MONITOR ON PIPE {pipe} TO ROLE {role}" for pipe in pipes),
    )


def _user_step(options: SetupOptions) -> SetupStep:
    user, role = quote_ident(options.user), quote_ident(options.role)
    namespace = f"{options.database}.{options.schema}"
    return SetupStep(
        "Key-pair user",
        "Generate the key pair with openssl (docs/deploy.md); the private key goes into the "
        "Snowflake secret in Secrets Manager, never here.",
        (
            f"CREATE USER IF NOT EXISTS {user}\n"
            "  TYPE = SERVICE\n"
            f"  DEFAULT_ROLE = {role}\n"
            f"  DEFAULT_WAREHOUSE = {quote_ident(options.warehouse)}\n"
            f"  DEFAULT_NAMESPACE = {string_literal(namespace)}\n"
            f"  RSA_PUBLIC_KEY = {string_literal(PUBLIC_KEY_PLACEHOLDER)}",
            f"GRANT ROLE {role} TO USER {user}",
        ),
    )


def render_setup_sql(steps: Sequence[SetupStep]) -> str:
    """A script: each step numbered, with its note as a comment, statements ending in ``;``."""
    lines: list[str] = ["-- pgsnow Snowflake setup: run each step in order (docs/deploy.md)."]
    for number, step in enumerate(steps, start=1):
        lines += ["", f"-- {number}. {step.title}", f"-- {step.note}"]
        lines += [f"{statement};" for statement in step.statements]
    return "\n".join(lines) + "\n"
