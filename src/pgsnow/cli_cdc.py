"""``pgsnow cdc resnapshot``: re-establish change capture after its slot was lost.

A slot that was dropped, lost in a failover or invalidated (``max_slot_wal_keep_size``) took
changes with it that nothing can read again; the drain refuses it (``pgsnow.cdc.slot.check_slot``)
instead of silently starting a new slot after the gap. This command is the way out, for the
tables of that slot (docs/change-capture.md, "A lost slot"), in this order:

1. forget each table's enrollment and the position its changes were applied through, so from now
   on the loader applies none of its change runs and the drain none of its changes until the
   table's new snapshot is in (done first: a drain run between a new slot and a forgotten
   position would chain changes onto the old position, across the gap);
2. drop the lost slot if the server still lists it, and create it again (``pgoutput``);
3. start each table's snapshot: the extractor's ordinary full run, which enrolls the table at a
   position of the new slot and hands over to its changes (docs/guarantees.md, "Change capture").

Without ``--execute`` it prints the plan and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pgsnow.cli_arguments import table_list_argument
from pgsnow.identifiers import TableRef


@dataclass(frozen=True)
class ResnapshotStep:
    what: str  # one line for the operator
    command: str | None = None  # SQL or a command line that does it by hand


def resnapshot_steps(
    *, slot: str, tables: Sequence[TableRef], slot_listed: bool, extractor_function: str | None
) -> list[ResnapshotStep]:
    """What ``pgsnow cdc resnapshot`` does, in order (printed, and done with ``--execute``)."""
    from psycopg2 import sql

    from pgsnow.postgres_setup import render_composable

    steps = [
        ResnapshotStep(
            f"{t.qualified}: forget its enrollment and the position its changes were applied through"
        )
        for t in tables
    ]
    if slot_listed:
        steps.append(
            ResnapshotStep(
                f"drop the lost slot {slot}",
                render_composable(sql.SQL("SELECT pg_drop_replication_slot({})").format(sql.Literal(slot)))
                + ";",
            )
        )
    steps.append(
        ResnapshotStep(
            f"create the slot {slot} again",
            render_composable(
                sql.SQL("SELECT pg_create_logical_replication_slot({}, {})").format(
                    sql.Literal(slot), sql.Literal("pgoutput")
                )
            )
            + ";",
        )
    )
    for table in tables:
        steps.append(
            ResnapshotStep(
                f"{table.qualified}: start its snapshot", snapshot_command(table, extractor_function)
            )
        )
    return steps


def snapshot_command(table: TableRef, extractor_function: str | None) -> str:
    """The invocation that starts ``table``'s full run: the deployed extractor, or ``pgsnow extract``."""
    if extractor_function is None:
        return f"pgsnow extract {table.qualified}"
    payload = json.dumps({"schema_name": table.schema, "table_name": table.table}, separators=(",", ":"))
    return (
        f"aws lambda invoke --function-name {extractor_function} --invocation-type Event "
        f"--cli-binary-format raw-in-base64-out --payload '{payload}' /dev/null"
    )


def add_cdc_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cdc = subparsers.add_parser("cdc", help="change capture operations (docs/change-capture.md)")
    commands = cdc.add_subparsers(dest="cdc_command", required=True, metavar="COMMAND")
    resnapshot = commands.add_parser(
        "resnapshot",
        help="after a lost slot: forget the tables' positions, create the slot again, snapshot them",
        description="Re-establish change capture after its replication slot was dropped, lost in a "
        "failover or invalidated. Prints the plan; with --execute it does it. Configured by the "
        "environment like `pgsnow status` (S3_STAGE_BUCKET, SNOWFLAKE_*, PGSNOW_PG_DSN or "
        "PGSNOW_PG_SECRET_ARN, PGSNOW_TABLE_OPTIONS).",
    )
    resnapshot.add_argument("--slot", required=True, help="the lost slot (CDC_SLOT)")
    resnapshot.add_argument(
        "--tables", type=table_list_argument, help="schema.table,... (default: every table with mode cdc)"
    )
    resnapshot.add_argument(
        "--extractor-function",
        help="the deployed extractor (ExtractorFunctionName output) to invoke for each snapshot; "
        "without it the snapshots are `pgsnow extract` commands to run",
    )
    resnapshot.add_argument("--execute", action="store_true", help="do it (default: print the plan only)")
    resnapshot.set_defaults(run=run_resnapshot_command)


def run_resnapshot_command(args: argparse.Namespace) -> int:
    import boto3
    import psycopg2

    from pgsnow.cdc.slot import slot_health
    from pgsnow.config import Component, Settings
    from pgsnow.errors import ConfigError, PermanentError
    from pgsnow.postgres import classify_pg_error
    from pgsnow.postgres_setup import cdc_tables
    from pgsnow.runtime import postgres_dsn
    from pgsnow.snowflake.connection import connect as connect_snowflake

    settings = Settings.from_env(component=Component.LOCAL)
    tables = list(args.tables) if args.tables else cdc_tables(settings)
    if not tables:
        raise ConfigError(['no table has mode "cdc": name the slot\'s tables with --tables'])
    session = boto3.Session()
    try:
        # Autocommit: slot functions cannot run inside the extractor's read-only transactions.
        pg_conn = psycopg2.connect(
            postgres_dsn(settings, None if settings.postgres.dsn else session.client("secretsmanager"))
        )
        pg_conn.autocommit = True
    except psycopg2.Error as exc:
        raise classify_pg_error(exc) from exc
    try:
        health = slot_health(pg_conn, args.slot)
        if not health.lost:
            raise PermanentError(
                f"replication slot {args.slot!r} is healthy (wal_status {health.wal_status}): no change was "
                "lost, nothing to re-snapshot"
            )
        steps = resnapshot_steps(
            slot=args.slot,
            tables=tables,
            slot_listed=health.exists,
            extractor_function=args.extractor_function,
        )
        print(health.problem)
        print(
            "re-establishing change capture:" if args.execute else "plan (run again with --execute to do it):"
        )
        for number, step in enumerate(steps, start=1):
            print(f"{number}. {step.what}" + (f"\n   {step.command}" if step.command else ""))
        if not args.execute:
            return 0
        forget_positions(
            settings=settings, tables=tables, s3=session.client("s3"), sf_conn_factory=connect_snowflake
        )
        recreate_slot(pg_conn, args.slot, drop_first=health.exists)
    finally:
        pg_conn.close()
    for table in tables:
        if args.extractor_function:
            session.client("lambda").invoke(
                FunctionName=args.extractor_function,
                InvocationType="Event",
                Payload=json.dumps({"schema_name": table.schema, "table_name": table.table}).encode(),
            )
            print(f"{table.qualified}: snapshot started ({args.extractor_function})")
        else:
            print(f"{table.qualified}: start its snapshot: {snapshot_command(table, None)}")
    print("done: each table's changes are applied again once its snapshot is loaded")
    return 0


def forget_positions(*, settings: Any, tables: Sequence[TableRef], s3: Any, sf_conn_factory: Any) -> None:
    """Forget each table's enrollment (the handoff's, in the bucket) and applied position (its ledger)."""
    import importlib

    from pgsnow.ledger import Ledger
    from pgsnow.runs import RunStore

    # pgsnow.cdc.enroll (enrollment) and Ledger.forget_applied_position (apply) come from the
    # change-capture work merged alongside this command; looked up at run time so this module
    # type-checks on its own. Replace with direct calls once both are in.
    enroll = importlib.import_module("pgsnow.cdc.enroll")
    store = RunStore(s3, settings.bucket)
    sf_conn = sf_conn_factory(settings.snowflake)
    try:
        for table in tables:
            enroll.reset_enrollment(store, table)
            operator.methodcaller("forget_applied_position")(Ledger.of(sf_conn, settings, table))
            print(f"{table.qualified}: enrollment and applied position forgotten")
    finally:
        sf_conn.close()


def recreate_slot(pg_conn: Any, slot: str, *, drop_first: bool) -> None:
    """Drop the lost slot (if listed) and create it again, as pgoutput."""
    with pg_conn.cursor() as cur:
        if drop_first:
            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    print(f"slot {slot} created")
