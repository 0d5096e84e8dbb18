"""The ``pgsnow`` command line.

Each subcommand is one ``add_*_command(subparsers)`` function that adds its
parser and sets ``run`` to a ``(args) -> exit code`` function. To add a
subcommand, write such a function and append it to ``COMMANDS``; nothing else
in this module changes. Results go to stdout; progress and errors to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pgsnow.cli_arguments import table_argument, table_list_argument
from pgsnow.cli_cdc import add_cdc_commands
from pgsnow.cli_setup import add_postgres_sql_command, add_snowflake_sql_command
from pgsnow.cli_status import add_status_command
from pgsnow.cli_verify import add_verify_command
from pgsnow.errors import ConfigError, PermanentError, PgSnowError

CommandRegistrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
DEFAULT_DATA_DIR = Path(".pgsnow")


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def format_report(rows: Sequence[tuple[str, int | None, int | None, str, str]]) -> list[str]:
    """One aligned line per table: ``schema.table source_rows snowflake_rows OK|MISMATCH|FAILED [reason]``.

    Counts not known (a table that failed before it was compared) are shown as ``-``; the reason
    follows every status but OK."""
    if not rows:
        return []
    shown = [
        (name, "-" if source is None else str(source), "-" if target is None else str(target), status, reason)
        for name, source, target, status, reason in rows
    ]
    name_width = max(len(name) for name, *_ in shown)
    source_width = max(len(source) for _, source, *_ in shown)
    target_width = max(len(target) for _, _, target, *_ in shown)
    status_width = max(len(status) for *_, status, _ in shown)
    lines = []
    for name, source, target, status, reason in shown:
        line = f"{name:<{name_width}}  {source:>{source_width}}  {target:>{target_width}}  {status}"
        if status != "OK" and reason:
            line = f"{line:<{name_width + source_width + target_width + status_width + 6}}  {reason}"
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------- demo


def add_demo_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="replicate tables through the local pipeline and compare every cell",
        description="Start the local stack, replicate each table (the sample shop when nothing is named) "
        "and print one line per table: schema.table source_rows snowflake_rows OK|MISMATCH|FAILED and, "
        "unless OK, why. A table that fails does not stop the others; the exit code is 1 if any table "
        "is not OK.",
    )
    parser.add_argument("--pg-dsn", help="PostgreSQL to read (default: the local server or an embedded one)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--schema", help="replicate every table of this schema")
    which.add_argument(
        "--tables", type=table_list_argument, help="replicate these tables: schema.table,schema.table"
    )
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv", help="staged file format")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where local state is kept")
    parser.add_argument(
        "--scale", type=_positive_float, default=1.0, help="sample shop size (1.0 = 200K lines)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the functions' JSON logs")
    parser.add_argument(
        "--cdc",
        action="store_true",
        help="change capture: the sample shop's tables in mode cdc, snapshotted, then drained from a "
        "replication slot while a workload inserts, updates (large TOASTed values too) and deletes; "
        "then drained until caught up and verified",
    )
    parser.add_argument(
        "--cdc-cycles", type=int, default=3, help="--cdc: change-capture runs while the workload writes"
    )
    parser.add_argument(
        "--cdc-interval", type=_positive_float, default=5.0, help="--cdc: seconds between those runs"
    )
    parser.add_argument(
        "--cdc-rate", type=_positive_float, default=200.0, help="--cdc: the workload's changes per second"
    )
    _add_storage_access(parser)
    parser.set_defaults(run=run_demo_command)


def _add_storage_access(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-access",
        choices=["integration", "credentials"],
        default="integration",
        help="how the local Snowflake may read the bucket: a storage integration (its role and allowed "
        "locations) or the loader's own temporary credentials (no integration; docs/deploy.md)",
    )


def quiet_function_logs(verbose: bool) -> None:
    """The functions' JSON logs go to stdout in Lambda; a command's stdout is its report, so here
    they go to stderr, and only warnings and errors unless ``verbose``. The SQL parser's notes
    about statements the local Snowflake handles itself are not the user's concern."""
    from pgsnow.observability import logger

    for handler in logging.getLogger(logger.name).handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    logging.getLogger("sqlglot").setLevel(logging.ERROR)
    if not verbose:
        logger.setLevel(logging.WARNING)


def run_demo_command(args: argparse.Namespace) -> int:
    from pgsnow.demo.pipeline import TableStatus, run_demo

    quiet_function_logs(args.verbose)
    if args.cdc:
        return run_cdc_demo_command(args)
    results = run_demo(
        pg_dsn=args.pg_dsn,
        tables=args.tables,
        schema=args.schema,
        file_format=args.format,
        data_dir=args.data_dir,
        progress=_progress,
        scale=args.scale,
        verify=True,  # pgsnow verify's check is part of each table's status
        storage_access=args.storage_access,
    )
    for line in format_report(
        [(r.table.qualified, r.source_rows, r.snowflake_rows, r.status.value, r.detail) for r in results]
    ):
        print(line)
    counts = {status: sum(1 for r in results if r.status is status) for status in TableStatus}
    print(
        f"demo: {counts[TableStatus.OK]} of {len(results)} tables OK, "
        f"{counts[TableStatus.MISMATCH]} mismatched, {counts[TableStatus.FAILED]} failed"
    )
    return 0 if results and all(r.ok for r in results) else 1


def run_cdc_demo_command(args: argparse.Namespace) -> int:
    from pgsnow.demo.pipeline import TableStatus, run_cdc_demo

    if args.tables or args.schema:
        raise ConfigError(["demo --cdc replicates the sample shop: --tables and --schema do not apply"])
    outcome = run_cdc_demo(
        pg_dsn=args.pg_dsn,
        file_format=args.format,
        data_dir=args.data_dir,
        progress=_progress,
        scale=args.scale,
        cycles=args.cdc_cycles,
        cycle_seconds=args.cdc_interval,
        rate=args.cdc_rate,
        storage_access=args.storage_access,
    )
    results = outcome.tables
    for line in format_report(
        [(r.table.qualified, r.source_rows, r.snowflake_rows, r.status.value, r.detail) for r in results]
    ):
        print(line)
    done = outcome.workload
    print(
        f"workload: {done.transactions} transactions, {done.inserts} inserts, {done.updates} updates "
        f"({done.unchanged_toast_updates} with a TOASTed value unchanged, {done.pk_updates} key moves), "
        f"{done.deletes} deletes; {outcome.change_capture_runs} change-capture runs"
    )
    counts = {status: sum(1 for r in results if r.status is status) for status in TableStatus}
    print(
        f"demo --cdc: {counts[TableStatus.OK]} of {len(results)} tables OK, "
        f"{counts[TableStatus.MISMATCH]} mismatched, {counts[TableStatus.FAILED]} failed"
    )
    return 0 if outcome.ok else 1


# ----------------------------------------------------------------------------- local


def add_local_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    local = subparsers.add_parser("local", help="the local stack: PostgreSQL, moto, Snowflake emulator")
    local_commands = local.add_subparsers(dest="local_command", required=True, metavar="COMMAND")

    up = local_commands.add_parser("up", help="run the stack and the loader until Ctrl-C")
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    up.add_argument("--pg-dsn")
    _add_storage_access(up)
    up.add_argument(
        "--loader-batch-size",
        type=int,
        default=None,
        help="notifications per loader invocation (default: the template's LoaderBatchSize)",
    )
    up.add_argument(
        "--loader-batching-window",
        type=int,
        default=None,
        help="seconds the loader's event source gathers a batch (default: LoaderBatchingWindowSeconds)",
    )
    up.set_defaults(run=run_local_up)

    query = local_commands.add_parser(
        "sql", help="run SQL on the persisted local Snowflake and print the rows"
    )
    query.add_argument("statement", help='e.g. "SELECT COUNT(*) FROM PGSNOW_DEMO.SHOP.ORDERS"')
    query.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    query.set_defaults(run=run_local_sql)


def describe_stack(stack: Any) -> list[str]:
    """What a person needs to use the running stack from another shell."""
    env = stack.env
    example_key = f"{stack.resources.prefix}/public/my_table/my_file.csv.gz"
    lines = [
        f"PostgreSQL      {stack.pg_dsn}",
        f"S3/SQS (moto)   {stack.aws.endpoint_url}  access key {env['AWS_ACCESS_KEY_ID']}"
        f" secret {env['AWS_SECRET_ACCESS_KEY']}  (the local administrator; IAM is enforced)",
        *(f"{component.value + ' role':<16}{role.arn}" for component, role in stack.roles.items()),
        f"bucket          s3://{stack.resources.bucket}/{stack.resources.prefix}/",
        f"queue           {stack.resources.queue_url}",
        f"dead letters    {stack.resources.dlq_url}",
        f"Snowflake       http://{env['SNOWFLAKE_HOST']}:{env['SNOWFLAKE_PORT']}"
        f"  user {env['SNOWFLAKE_USER']} password {env['SNOWFLAKE_PASSWORD']}"
        f" database {env['SNOWFLAKE_DATABASE']}",
        "Snowflake reads S3 "
        + (
            f"through storage integration {env['SNOWFLAKE_STORAGE_INTEGRATION']} (the template's storage role)"
            if env.get("SNOWFLAKE_STORAGE_INTEGRATION")
            else "with the loader role's temporary credentials (no storage integration)"
        ),
        "",
        "Drop a file (the loader picks it up):",
        f"  aws s3 cp --endpoint-url {stack.aws.endpoint_url} my_file.csv.gz s3://{stack.resources.bucket}/{example_key}",
        "",
        "Environment for the pgsnow commands (each function's handler gets only the variables",
        "its template gives it, with these values: docs/local-fidelity.md):",
    ]
    lines.extend(f"  export {name}={_shell_quote(value)}" for name, value in sorted(env.items()))
    return lines


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_local_up(args: argparse.Namespace) -> int:
    from pgsnow.local.dispatcher import check_batching
    from pgsnow.local.range_workers import range_workers_for
    from pgsnow.local.stack import (
        LOADER_BATCH_SIZE,
        LOADER_BATCHING_WINDOW_S,
        StorageAccess,
        load_function_handler,
        start_stack,
    )

    batch_size = LOADER_BATCH_SIZE if args.loader_batch_size is None else args.loader_batch_size
    window = LOADER_BATCHING_WINDOW_S if args.loader_batching_window is None else args.loader_batching_window
    try:
        check_batching(batch_size, window)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from exc

    quiet_function_logs(verbose=True)  # the loader's log is what `local up` shows, on stderr
    # `kill` (SIGTERM) stops the stack as Ctrl-C does: servers stopped, files flushed and unlocked.
    signal.signal(signal.SIGTERM, _interrupt)
    stack = start_stack(
        pg_dsn=args.pg_dsn,
        data_dir=args.data_dir,
        progress=_progress,
        storage_access=StorageAccess(args.storage_access),
    )
    try:
        # Each function's handler runs as its own template role (pgsnow.local.iam).
        with stack.handlers():
            dispatcher = stack.loader_dispatcher(batch_size=batch_size, batching_window_s=window)
            dispatcher.start()
            # Parallel backfill: the range queue, delivered to concurrent extractor invocations.
            range_workers = range_workers_for(stack, load_function_handler("extractor"))
            range_workers.start()
            try:
                for line in describe_stack(stack):
                    print(line)
                print("\nThe loader is listening. Ctrl-C stops everything.", flush=True)
                threading.Event().wait()
            except KeyboardInterrupt:
                print("stopping", file=sys.stderr)
            finally:
                range_workers.stop()
                dispatcher.stop()
    finally:
        stack.stop()
    return 0


def run_local_sql(args: argparse.Namespace) -> int:
    """Through the running ``pgsnow local up`` when there is one (it holds the files), else on the files."""
    import snowflake.connector
    from snowflake.connector.errors import Error as SnowflakeError

    from pgsnow.local.snowflake import open_local_snowflake

    with open_local_snowflake(args.data_dir / "snowflake") as connect_kwargs:
        try:
            conn = snowflake.connector.connect(**connect_kwargs)
            try:
                cur = conn.cursor()
                cur.execute(args.statement)
                if cur.description:
                    print("\t".join(column[0] for column in cur.description))
                    for row in cur:
                        print("\t".join("NULL" if value is None else str(value) for value in row))
            finally:
                conn.close()
        except SnowflakeError as exc:
            raise PermanentError(" ".join(str(exc.msg or exc).split())) from exc
    return 0


# ----------------------------------------------------------------------------- extract


def add_extract_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "extract", help="stage one table to S3 once, configured by the environment (like the extractor)"
    )
    parser.add_argument("table", type=table_argument, help="schema.table (must be in PGSNOW_TABLES)")
    parser.set_defaults(run=run_extract_command)


def run_extract_command(args: argparse.Namespace) -> int:
    import json

    import boto3

    from pgsnow.cdc.enroll import SnapshotStaged, snapshot_table
    from pgsnow.config import Component, ExtractMode, Settings
    from pgsnow.extract.run import extract_table
    from pgsnow.postgres import connect
    from pgsnow.runtime import postgres_dsn

    settings = Settings.from_env(component=Component.EXTRACTOR)
    pg_conn = connect(postgres_dsn(settings), statement_timeout_ms=settings.postgres.statement_timeout_ms)
    s3 = boto3.Session().client("s3")
    try:
        if settings.table_options(args.table).mode is ExtractMode.CDC:
            # A change-capture table: enrolled and snapshot as the extractor function does it.
            outcome = snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=args.table)
            if isinstance(outcome, SnapshotStaged):
                print(json.dumps(outcome.report()))
                return 0
            manifest = outcome
        else:
            manifest = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=args.table)
    finally:
        pg_conn.close()
    print(
        f"{manifest.table.qualified} run {manifest.run_id}: {len(manifest.files)} "
        f"{manifest.file_format.value} files, {manifest.total_rows} rows in s3://{settings.bucket}/{settings.prefix}/"
    )
    return 0


# ----------------------------------------------------------------------------- entry point

COMMANDS: list[CommandRegistrar] = [
    add_demo_command,
    add_local_commands,
    add_extract_command,
    add_status_command,
    add_snowflake_sql_command,
    add_postgres_sql_command,
    add_cdc_commands,
    add_verify_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgsnow",
        description="Replicate PostgreSQL tables into Snowflake through S3; run it all locally.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        exit_code: int = args.run(args)
    except PgSnowError as exc:
        print(f"pgsnow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pgsnow: interrupted", file=sys.stderr)
        return 130
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
