"""``pgsnow verify [schema.table ...]``: compare PostgreSQL with Snowflake, exit 0 only when all match.

Locally (the default) it reads the local PostgreSQL (``--pg-dsn``, default: the demo's
database on the local server) and the local Snowflake persisted in ``--data-dir``. With
``--from-env`` it connects the way the functions do, from ``Settings.from_env`` (PostgreSQL
and Snowflake secrets, the allowlist), and reads each incremental table's latest manifest
for its watermark.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pgsnow.cli_arguments import table_argument
from pgsnow.errors import PermanentError, RetryableError, aws_error_code
from pgsnow.identifiers import TableRef
from pgsnow.manifest import RunManifest, RunState
from pgsnow.verify import DEFAULT_MAX_KEYS, VerifyReport, verify_tables

if TYPE_CHECKING:
    from pgsnow.runs import RunStore

DEMO_SCHEMA = "shop"
DEFAULT_DATA_DIR = Path(".pgsnow")  # as the other commands

T = TypeVar("T")


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def add_verify_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="compare tables in PostgreSQL and Snowflake by row hashes; exit 0 only when all match",
        description="Compare row counts and per-row fingerprints (computed in each database, no rows "
        "pulled) and list the keys that are missing, extra or different.",
    )
    parser.add_argument(
        "tables",
        nargs="*",
        type=table_argument,
        help="schema.table (default: the demo's tables, or PGSNOW_TABLES)",
    )
    parser.add_argument("--json", type=Path, dest="json_file", help="write the JSON report to this file")
    parser.add_argument("--pg-dsn", help="PostgreSQL to read (default: the local server, demo database)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where local state is kept")
    parser.add_argument(
        "--from-env", action="store_true", help="connect as configured by the environment (deployed setup)"
    )
    parser.add_argument("--max-keys", type=int, default=DEFAULT_MAX_KEYS, help="keys listed per table")
    parser.set_defaults(run=run_verify_command)


def print_report(report: VerifyReport, json_file: Path | None) -> int:
    """Print the summary, write the JSON report when asked; the exit code."""
    for line in report.summary_lines():
        print(line)
    for table in report.tables:
        for note in table.weak_checks:
            print(f"  note {table.table.qualified}: {note}", file=sys.stderr)
    if json_file is not None:
        json_file.write_text(report.to_json() + "\n", encoding="utf-8")
    return 0 if report.ok else 1


def run_verify_command(args: argparse.Namespace) -> int:
    report = _verify_from_env(args) if args.from_env else _verify_locally(args)
    return print_report(report, args.json_file)


def _verify_locally(args: argparse.Namespace) -> VerifyReport:
    import snowflake.connector

    from pgsnow.demo.pipeline import DEMO_DATABASE, list_schema_tables
    from pgsnow.local.postgres import create_database, start_local_postgres
    from pgsnow.local.snowflake import open_local_snowflake
    from pgsnow.local.stack import SNOWFLAKE_DATABASE
    from pgsnow.postgres import connect
    from pgsnow.snowflake.sql_text import PARAMSTYLE

    _progress("starting PostgreSQL")
    postgres = start_local_postgres(args.pg_dsn, args.data_dir / "pgdata")
    try:
        dsn = args.pg_dsn or create_database(postgres.dsn, DEMO_DATABASE)
        tables: list[TableRef] = args.tables or list_schema_tables(dsn, DEMO_SCHEMA)
        _progress("connecting to the local Snowflake")
        # The running `pgsnow local up` when there is one (it holds the files), else on the files.
        with open_local_snowflake(args.data_dir / "snowflake", SNOWFLAKE_DATABASE) as connect_kwargs:
            sf_conn = snowflake.connector.connect(**connect_kwargs, paramstyle=PARAMSTYLE)
            pg_conn = connect(dsn)
            try:
                _progress(f"verifying {len(tables)} tables")
                return verify_tables(pg_conn, sf_conn, tables, SNOWFLAKE_DATABASE, max_keys=args.max_keys)
            finally:
                pg_conn.close()
                sf_conn.close()
    finally:
        postgres.stop()


def _verify_from_env(args: argparse.Namespace) -> VerifyReport:
    import boto3

    from pgsnow.config import Component, Settings
    from pgsnow.errors import ConfigError
    from pgsnow.postgres import connect
    from pgsnow.runs import RunStore
    from pgsnow.runtime import postgres_dsn
    from pgsnow.snowflake.connection import connect as snowflake_connect

    settings = Settings.from_env(component=Component.LOADER)
    tables: list[TableRef] = args.tables or sorted(settings.tables.tables)
    if not tables:
        raise ConfigError(["name the tables to verify, or set PGSNOW_TABLES"])
    database = settings.snowflake.database
    if not database:
        raise ConfigError(["SNOWFLAKE_DATABASE is needed to verify"])
    manifests = _aws_read(
        f"the run manifests in bucket {settings.bucket}",
        lambda: latest_manifests(RunStore(boto3.Session().client("s3"), settings.bucket), tables),
    )
    # read_secret_json reports an unreadable secret itself; this also covers creating the client
    # (no region configured, say), which happens before it.
    dsn = _aws_read("the PostgreSQL secret (PGSNOW_PG_SECRET_ARN)", lambda: postgres_dsn(settings))
    pg_conn = connect(dsn, statement_timeout_ms=settings.postgres.statement_timeout_ms)
    try:
        sf_conn = snowflake_connect(settings.snowflake)
        try:
            return verify_tables(
                pg_conn,
                sf_conn,
                tables,
                database,
                manifests=manifests,
                max_keys=args.max_keys,
                sf_control_schema=settings.snowflake.control_schema,
            )
        finally:
            sf_conn.close()
    finally:
        pg_conn.close()


def _aws_read(what: str, read: Callable[[], T]) -> T:
    """Run ``read``; an AWS refusal (no such bucket or secret, access denied) becomes a one-line error."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return read()
    except ClientError as exc:
        code = aws_error_code(exc) or type(exc).__name__
        raise PermanentError(f"cannot read {what}: {code}") from exc
    except BotoCoreError as exc:
        raise RetryableError(f"cannot read {what}: {type(exc).__name__}") from exc


def latest_manifests(store: RunStore, tables: list[TableRef]) -> dict[TableRef, RunManifest]:
    """Each table's newest loaded run manifest, when that run has a watermark (an incremental run).

    An older run's watermark is never used: once a newer run has loaded (a full reload, say, after
    the table left incremental mode), bounding the comparison by the old watermark would leave
    every row the newer run brought out of it.
    """
    found: dict[TableRef, RunManifest] = {}
    for table in tables:
        runs = store.manifests_newest_first(table)
        newest_loaded = next((m for m in runs if m.state is RunState.LOADED), None)
        if newest_loaded is not None and newest_loaded.watermark_after is not None:
            found[table] = newest_loaded
    return found
