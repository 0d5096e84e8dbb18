"""``pgsnow status [schema.table] [--json]``: replication status from the bucket, the ledger and the DLQ.

Configured by the environment like the functions (S3_STAGE_BUCKET, SNOWFLAKE_*,
LOADER_DLQ_URL); ``pgsnow local up`` prints the variables for the local stack. When a table has
mode cdc, PostgreSQL is read too (PGSNOW_PG_DSN or PGSNOW_PG_SECRET_ARN) for the slot's section;
the table's change progress comes from its ledger and the bucket (``pgsnow.status.change_progress``).
"""

from __future__ import annotations

import argparse
from typing import Any

from pgsnow.cli_arguments import table_argument


def add_status_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="per table: last run, state, files staged/loaded/failed, rows, watermark, lag, and a cdc "
        "table's applied position and the change run that waits; the DLQ; the CDC slot",
    )
    parser.add_argument("table", nargs="?", type=table_argument, help="schema.table (default: every table)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run_status_command)


def run_status_command(args: argparse.Namespace) -> int:
    import boto3

    from pgsnow.config import Component, Settings
    from pgsnow.errors import ConfigError, PgSnowError
    from pgsnow.postgres import connect as connect_postgres
    from pgsnow.postgres_setup import cdc_tables
    from pgsnow.runtime import postgres_dsn
    from pgsnow.snowflake.connection import connect
    from pgsnow.status import collect_status

    settings = Settings.from_env(component=Component.LOCAL)
    if not settings.snowflake.database:
        raise ConfigError(["SNOWFLAKE_DATABASE is required to read the load ledger"])
    # A session of its own reads the credentials in the environment now; boto3's default session
    # would keep the ones it found first in this process.
    session = boto3.Session()
    # The slot's section reads pg_replication_slots: only when a table has mode cdc. A database
    # out of reach shows the slot UNKNOWN with the reason; the rest of the report still stands.
    pg_conn: Any = None
    pg_error: str | None = None
    if cdc_tables(settings):
        try:
            pg_conn = connect_postgres(
                postgres_dsn(settings, None if settings.postgres.dsn else session.client("secretsmanager"))
            )
        except PgSnowError as exc:
            pg_error = exc.message
    sf_conn: Any = connect(settings.snowflake)
    try:
        report = collect_status(
            settings=settings,
            s3=session.client("s3"),
            sqs=session.client("sqs") if settings.cleanup.dlq_url else None,
            sf_conn=sf_conn,
            table=args.table,
            pg_conn=pg_conn,
            pg_error=pg_error,
        )
    finally:
        sf_conn.close()
        if pg_conn is not None:
            pg_conn.close()
    print(report.to_json() if args.json else "\n".join(report.format_lines()))
    return 0
