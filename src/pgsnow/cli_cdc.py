"""``pgsnow cdc resnapshot``: re-establish change capture after its slot was lost, or after a gap
in one table's change runs.

A slot that was dropped, lost in a failover or invalidated (``max_slot_wal_keep_size``) took
changes with it that nothing can read again; the drain refuses it (``pgsnow.cdc.slot.check_slot``)
instead of silently starting a new slot after the gap. This command is the way out, for the
tables of that slot (docs/change-capture.md, "A lost slot"), in this order:

1. forget each table's enrollment, the position its changes were applied through (its ledger,
   ``Ledger.forget_applied_position``) and its change chain (its entry in the slot's drain state,
   ``RunStore``), so from now on the loader applies none of its change runs and the drain none of
   its changes until the table's new snapshot is in, and its next change run starts a new chain
   (done first: a drain run between a new slot and a forgotten position would chain changes onto
   the old position, across the gap);
2. drop the lost slot if the server still lists it, and create it again (``pgoutput``);
3. start each table's snapshot: the extractor's ordinary full run, which enrolls the table at a
   position of the new slot and hands over to its changes (docs/guarantees.md, "Change capture").

A healthy slot is refused, except for the tables named with ``--tables`` whose own change runs
have a gap: a run the loader waits at for a predecessor that failed or is gone, or for files not in
S3 (``pgsnow status`` shows it: ``pgsnow.status.change_gap``). Their changes in the gap are in no
staged run, so only a new snapshot brings the table back; steps 1 and 3 are done for them, and the
slot is left as it is (docs/change-capture.md, "A change run that waits").

Without ``--execute`` it prints the plan and changes nothing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pgsnow.cli_arguments import table_list_argument
from pgsnow.identifiers import TableRef

if TYPE_CHECKING:
    from pgsnow.config import Settings
    from pgsnow.runs import DrainState, RunStore


@dataclass(frozen=True)
class ResnapshotStep:
    what: str  # one line for the operator
    command: str | None = None  # SQL or a command line that does it by hand


def resnapshot_steps(
    *,
    slot: str,
    tables: Sequence[TableRef],
    slot_listed: bool,
    extractor_function: str | None,
    recreate_slot: bool = True,
) -> list[ResnapshotStep]:
    """What ``pgsnow cdc resnapshot`` does, in order (printed, and done with ``--execute``).
    ``recreate_slot``: False for a healthy slot (tables whose change runs have a gap)."""
    from psycopg2 import sql

    from pgsnow.postgres_setup import render_composable

    steps = [
        ResnapshotStep(
            f"{t.qualified}: forget its enrollment, the position its changes were applied through "
            "and its change chain"
        )
        for t in tables
    ]
    if recreate_slot and slot_listed:
        steps.append(
            ResnapshotStep(
                f"drop the lost slot {slot}",
                render_composable(sql.SQL("SELECT pg_drop_replication_slot({})").format(sql.Literal(slot)))
                + ";",
            )
        )
    if recreate_slot:
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
        help="after a lost slot (or a gap in a table's change runs): forget the tables' positions, "
        "create the slot again, snapshot them",
        description="Re-establish change capture after its replication slot was dropped, lost in a "
        "failover or invalidated; with a healthy slot, re-snapshot the tables named with --tables "
        "whose change runs have a gap (pgsnow status shows the run that waits for a failed or "
        "missing predecessor), leaving the slot as it is. "
        "Prints the plan; with --execute it does it. Configured by the "
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
        # A healthy slot: only tables named with --tables, each with a gap of its own, are re-snapshotted.
        gaps = change_gaps(settings, session.client("s3"), tables) if args.tables and not health.lost else {}
        if not health.lost and (not args.tables or set(gaps) != set(tables)):
            without = [t.qualified for t in tables if t not in gaps] if args.tables else []
            raise PermanentError(
                f"replication slot {args.slot!r} is healthy (wal_status {health.wal_status}): no change was "
                "lost, nothing to re-snapshot"
                + (
                    f"; the change runs of {', '.join(without)} have no gap (pgsnow status)"
                    if without
                    else ""
                )
                + ". A table whose change runs have a gap (pgsnow status: a run waiting for a failed or "
                "missing predecessor, or for files not in S3) is re-snapshotted alone with --tables"
            )
        steps = resnapshot_steps(
            slot=args.slot,
            tables=tables,
            slot_listed=health.exists,
            extractor_function=args.extractor_function,
            recreate_slot=health.lost,
        )
        if health.lost:
            print(health.problem)
        for table, gap in gaps.items():
            print(f"{table.qualified}: {gap}")
        print(
            "re-establishing change capture:" if args.execute else "plan (run again with --execute to do it):"
        )
        for number, step in enumerate(steps, start=1):
            print(f"{number}. {step.what}" + (f"\n   {step.command}" if step.command else ""))
        if not args.execute:
            return 0
        forget_positions(
            settings=settings,
            slot=args.slot,
            tables=tables,
            s3=session.client("s3"),
            sf_conn_factory=connect_snowflake,
        )
        if health.lost:
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


def change_gaps(settings: Settings, s3: Any, tables: Sequence[TableRef]) -> dict[TableRef, str]:
    """The tables whose change runs have a gap only a new snapshot closes, each with why
    (``pgsnow.status.change_gap`` of its progress: the loader's own catch-up rule)."""
    from pgsnow.snowflake.connection import connect as connect_snowflake
    from pgsnow.status import change_gap, change_progress

    gaps: dict[TableRef, str] = {}
    sf_conn = connect_snowflake(settings.snowflake)
    try:
        for table in tables:
            progress = change_progress(
                settings=settings, s3=s3, sf_conn=sf_conn, table=table, dead_letters=None
            )
            gap = change_gap(progress)
            if gap is not None:
                gaps[table] = gap
    finally:
        sf_conn.close()
    return gaps


def forget_positions(
    *, settings: Settings, slot: str, tables: Sequence[TableRef], s3: Any, sf_conn_factory: Any
) -> None:
    """Forget each table's enrollment (the hand-off's, in the bucket), applied position (its
    ledger) and change chain (the slot's drain state)."""
    from pgsnow.cdc.enroll import reset_enrollment
    from pgsnow.runs import RunStore

    store = RunStore(s3, settings.bucket)
    sf_conn = sf_conn_factory(settings.snowflake)
    try:
        for table in tables:
            reset_enrollment(store, table)
            forget_applied_positions(sf_conn, settings, [table])
            print(f"{table.qualified}: enrollment and applied position forgotten")
    finally:
        sf_conn.close()
    if reset_change_chains(store, slot, tables) is not None:
        print(f"slot {slot}: the change chains of {', '.join(t.qualified for t in tables)} reset")


def forget_applied_positions(sf_conn: Any, settings: Settings, tables: Sequence[TableRef]) -> None:
    """Remove each table's applied position from its ledger: the loader applies none of its change
    runs until its next snapshot is loaded and sets the position again."""
    from pgsnow.ledger import Ledger

    for table in tables:
        Ledger.of(sf_conn, settings, table).forget_applied_position()


def reset_change_chains(store: RunStore, slot: str, tables: Sequence[TableRef]) -> DrainState | None:
    """Drop ``tables``' entries from ``slot``'s drain state (their last change run's end), so the
    drain's next change run of each starts a new chain (``after_lsn`` 0) rather than chaining onto
    a position of the lost slot. Returns the saved state; None when the slot has no drain state.
    A drain writing the state meanwhile makes the save fail (RetryableError): run the command again."""
    state = store.load_drain_state(slot)
    if state is None:
        return None
    forgotten = {t.qualified for t in tables}
    kept = {name: lsn for name, lsn in state.tables.items() if name not in forgotten}
    return store.save_drain_state(replace(state, tables=kept))


def recreate_slot(pg_conn: Any, slot: str, *, drop_first: bool) -> None:
    """Drop the lost slot (if listed) and create it again, as pgoutput."""
    with pg_conn.cursor() as cur:
        if drop_first:
            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    print(f"slot {slot} created")
