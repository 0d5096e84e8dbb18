"""``pgsnow snowflake-sql``: print the Snowflake setup SQL of a deployment, in run order."""

from __future__ import annotations

import argparse
import sys

from pgsnow.cli_arguments import table_list_argument
from pgsnow.config import LoadMethod
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
