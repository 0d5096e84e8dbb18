"""``pgsnow snowflake-sql`` and ``pgsnow postgres-sql``: print the setup SQL of each side, in run order."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from pgsnow.cli_arguments import table_argument, table_list_argument
from pgsnow.config import HeartbeatMethod, LoadMethod
from pgsnow.identifiers import TableRef
from pgsnow.postgres_setup import DEFAULT_USER
from pgsnow.setup_sql import SetupOptions, build_setup_steps, render_setup_sql


def run_snowflake_sql(args: argparse.Namespace) -> int:
    options = SetupOptions(
        database=args.database,
        schema=args.schema,
        role=args.role,
        bucket=args.bucket,
        prefix=args.prefix,
        integration=args.integration,
        user=args.user,
        warehouse=args.warehouse,
        stage=args.stage,
        aws_role_arn=args.aws_role_arn,
        load_method=LoadMethod(args.load_method),
        pipe=args.pipe,
        pipe_tables=tuple(args.tables or ()),
    )
    sys.stdout.write(render_setup_sql(build_setup_steps(options)))
    return 0


def add_snowflake_sql_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = SetupOptions(database="", schema="", role="")
    parser = subparsers.add_parser(
        "snowflake-sql",
        help="print the Snowflake setup SQL (integration, stage, formats, ledger, pipes, role, grants, user)",
        description="Print, in the order to run them, the statements that prepare Snowflake for a "
        "deployed stack. Values in <angle brackets> are placeholders for the stack's outputs.",
    )
    parser.add_argument("--database", required=True, help="SNOWFLAKE_DATABASE")
    parser.add_argument(
        "--schema", required=True, help="control schema (SNOWFLAKE_CONTROL_SCHEMA), e.g. PGSNOW"
    )
    parser.add_argument("--role", required=True, help="role the loader runs as")
    parser.add_argument("--bucket", default=defaults.bucket, help="StageBucketName output")
    parser.add_argument("--prefix", default=defaults.prefix, help="S3StagePrefix")
    parser.add_argument(
        "--integration",
        default=defaults.integration,
        help="storage integration name; '' for the credentials method (no integration, docs/deploy.md)",
    )
    parser.add_argument("--user", default=defaults.user, help="key-pair service user")
    parser.add_argument("--warehouse", default=defaults.warehouse, help="warehouse the loader uses")
    parser.add_argument("--stage", default=defaults.stage, help="SNOWFLAKE_STAGE")
    parser.add_argument(
        "--aws-role-arn", default=defaults.aws_role_arn, help="SnowflakeStorageRoleArnToTrust output"
    )
    parser.add_argument(
        "--load-method", choices=[m.value for m in LoadMethod], default=defaults.load_method.value
    )
    parser.add_argument("--pipe", default=defaults.pipe, help="pipe name prefix (snowpipe mode)")
    parser.add_argument(
        "--tables", type=table_list_argument, help="schema.table,... to create pipes for (snowpipe)"
    )
    parser.set_defaults(run=run_snowflake_sql)


def run_postgres_sql(args: argparse.Namespace) -> int:
    from pgsnow.config import Settings
    from pgsnow.postgres import connect
    from pgsnow.postgres_setup import (
        PostgresSetupOptions,
        build_postgres_setup,
        cdc_tables,
        read_message_function_public,
        read_table_identities,
        render_postgres_setup,
    )

    # The tables, publication, slot and heartbeat come from the functions' own variables
    # (PGSNOW_TABLE_OPTIONS, CDC_*); the bucket is not needed to print PostgreSQL's side.
    environ = dict(os.environ)
    environ.setdefault("S3_STAGE_BUCKET", "unused-by-postgres-sql")
    settings = Settings.from_env(environ)
    cdc = settings.cdc
    tables = list(args.tables) if args.tables else cdc_tables(settings)
    options = PostgresSetupOptions(
        publication=args.publication or cdc.publication,
        slot=args.slot or cdc.slot,
        tables=tables,
        user=args.user,
        heartbeat=HeartbeatMethod(args.heartbeat) if args.heartbeat else cdc.heartbeat,
        heartbeat_table=args.heartbeat_table or TableRef.parse(cdc.heartbeat_table),
        aurora=not args.no_aurora,
    )
    if not args.dsn:
        sys.stdout.write(render_postgres_setup(build_postgres_setup(options)))
        return 0
    conn = connect(args.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            row = cur.fetchone()
        options = replace(
            options,
            database=str(row[0]) if row else None,
            identities=read_table_identities(conn, tables),
            message_function_public=read_message_function_public(conn),
        )
        sys.stdout.write(render_postgres_setup(build_postgres_setup(options), conn))
    finally:
        conn.rollback()
        conn.close()
    return 0


def add_postgres_sql_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "postgres-sql",
        help="print the PostgreSQL setup SQL for change capture (publication, slot, replica identity, user)",
        description="Print, in the order to run them, the statements that prepare PostgreSQL for the "
        "tables with mode cdc: the server setting (and Aurora's parameter group), replica identity, "
        "the publication, the replication slot and a least-privilege replication user. With --dsn the "
        "catalog is read: replica identity advice per table and names quoted by the server.",
    )
    parser.add_argument(
        "--dsn", help="read the catalog of this database (libpq DSN); without it, config only"
    )
    parser.add_argument(
        "--tables",
        type=table_list_argument,
        help="schema.table,... (default: mode cdc in PGSNOW_TABLE_OPTIONS)",
    )
    parser.add_argument("--publication", help="default: CDC_PUBLICATION")
    parser.add_argument("--slot", help="default: CDC_SLOT")
    parser.add_argument("--user", default=DEFAULT_USER, help="the replication user to create")
    parser.add_argument(
        "--heartbeat", choices=[h.value for h in HeartbeatMethod], help="default: CDC_HEARTBEAT"
    )
    parser.add_argument("--heartbeat-table", type=table_argument, help="default: CDC_HEARTBEAT_TABLE")
    parser.add_argument("--no-aurora", action="store_true", help="leave out the Aurora/RDS parameter advice")
    parser.set_defaults(run=run_postgres_sql)
