"""A change-capture table's snapshot and its hand-off to the slot's stream (docs/guarantees.md,
"Change capture"; docs/extraction.md, "Snapshot of a change-capture table").

A table in mode ``cdc`` is invoked like any other (``{"schema_name", "table_name"}`` on its
schedule); ``snapshot_table`` decides what that invocation does:

1. **Not enrolled** (or its snapshot failed): enroll it. Check the table is in the publication
   and the slot exists and is not invalidated; read ``S = pg_current_wal_lsn()``; then wait until
   every transaction that held an xid when S was read has ended (their xid locks in ``pg_locks``;
   bounded by ``CDC_SNAPSHOT_WAIT_S``, past which a RetryableError names the oldest one). A
   transaction is committed in the WAL before it leaves the proc array, so without the wait a
   snapshot taken just after S could miss a change whose commit precedes S, and the stream
   (changes after S) would not bring it either. Then record the enrollment (``RunStore.write_enrollment``: the
   slot, S, the snapshot's run id; conditional, so of two invocations enrolling at once one
   wins) and start the snapshot: the table's full run (chunked, resumable, parallel), replace,
   every manifest carrying ``ChangeRange(slot, S, S, snapshot_lsn=S)``.
2. **Snapshot in progress**: continue it like any full run.
3. **Snapshot staged**: nothing to do (``SnapshotStaged``); another full run would roll rows
   back past changes already applied. The changes come from the slot's change-capture runs,
   and the loader applies them from S once the snapshot is loaded.

``reset_enrollment`` forgets the enrollment (``pgsnow cdc resnapshot``): the next invocation
enrolls the table again, at a new S, with a new snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg2

from pgsnow.changes import format_lsn, parse_lsn
from pgsnow.checkpoint import RunInProgressError
from pgsnow.config import ExtractMode, Settings
from pgsnow.errors import PermanentError, RetryableError
from pgsnow.extract.ranges import FanOut
from pgsnow.extract.run import extract_table
from pgsnow.extract.state import end_snapshot
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, enrollment_key, new_run_id
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.postgres import Connection, classify_pg_error
from pgsnow.runs import Enrollment, RunStore, StoredEnrollment
from pgsnow.timestamps import utc_iso

__all__ = [
    "Enrollment",
    "SnapshotStaged",
    "enroll_position",
    "reset_enrollment",
    "snapshot_table",
]

# Between two looks at whether the older transactions have ended: short at first (most end within
# milliseconds), then at most this long.
_MAX_POLL_S = 1.0
_FIRST_POLL_S = 0.05
# Kept from the invocation's remaining time after the wait: enough to record the enrollment and
# hand the snapshot to a continuation.
_ENROLL_RESERVE_S = 10.0
# The transactions that hold an xid now: each holds the lock on its own xid from its first write
# until after it has left the proc array (so until every later snapshot sees its outcome), prepared
# ones included (pid NULL). pg_locks shows every role's locks. Not pg_current_snapshot(): its xmax is
# the newest completed xid + 1, so a transaction that took an xid after that one is running but is
# neither listed in it nor below its xmax.
_HELD_XID = "l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted"  # a row l of pg_locks
_HELD_XIDS = f"FROM pg_locks l WHERE {_HELD_XID}"


@dataclass(frozen=True)
class SnapshotStaged:
    """The invocation of a table whose snapshot is staged: nothing to extract."""

    table: TableRef
    snapshot_lsn: int
    snapshot_run_id: str

    def report(self) -> dict[str, Any]:
        return {
            "table": self.table.qualified,
            "mode": ExtractMode.CDC.value,
            "snapshot_lsn": format_lsn(self.snapshot_lsn),
            "snapshot_run_id": self.snapshot_run_id,
            "note": "changes come from the slot's change-capture runs",
        }


def snapshot_table(
    *,
    settings: Settings,
    pg_conn: Connection,
    s3: Any,
    table: TableRef,
    run_id: str | None = None,
    file_format: FileFormat | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    remaining_ms: Callable[[], int] | None = None,
    owner: str | None = None,
    clock: Callable[[], float] = time.time,
    fan_out: FanOut | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> RunManifest | SnapshotStaged:
    """One invocation of the change-capture table ``table``: enroll it and start its snapshot,
    continue the snapshot (``run_id``: a continuation), or report that it is staged.

    The other arguments are ``extract_table``'s; ``sleep`` and ``monotonic`` pace and bound the
    wait for older transactions. Raises PermanentError when the table is not in mode cdc, not in
    the publication, or the slot is missing or invalidated; RetryableError when a transaction older
    than the snapshot position is still open after CDC_SNAPSHOT_WAIT_S; RunInProgressError when
    another invocation enrolls or extracts the table now.
    """
    settings.tables.check(table)
    if settings.table_options(table).mode is not ExtractMode.CDC:
        raise PermanentError(f"{table.qualified} is not in mode cdc", table=table.qualified)
    store = RunStore(s3, settings.bucket, clock=clock)
    stored = store.read_enrollment(table)
    if stored is not None and stored.enrollment.slot != settings.cdc.slot:
        raise PermanentError(
            f"{table.qualified} was enrolled through slot {stored.enrollment.slot!r}, but CDC_SLOT is "
            f"{settings.cdc.slot!r}: its changes since the snapshot are in the other slot; re-snapshot it "
            "through the new one (forget its enrollment and applied position: docs/change-capture.md, "
            "`pgsnow cdc resnapshot`)",
            table=table.qualified,
        )
    if stored is None and run_id is not None:
        raise PermanentError(
            f"run {run_id} of {table.qualified} continues a snapshot, but the table is not enrolled "
            "(its enrollment was reset): the next scheduled invocation enrolls it again",
            table=table.qualified,
            run_id=run_id,
        )
    # A continuation (run_id) goes on with the enrolled run; a scheduled invocation looks where it is.
    state = _snapshot_state(store, stored.enrollment) if stored is not None and run_id is None else None
    if stored is not None and state in {RunState.STAGED, RunState.LOADED}:
        return SnapshotStaged(table, stored.enrollment.snapshot_lsn, stored.enrollment.snapshot_run_id)
    if stored is None or state is RunState.FAILED:
        if stored is not None:
            logger.warning(
                "the table's snapshot failed; enrolling it again",
                extra={"table": table.qualified, "run_id": stored.enrollment.snapshot_run_id},
            )
        stored = _enroll(
            settings,
            pg_conn,
            store,
            table,
            replacing=stored,
            now=now,
            remaining_ms=remaining_ms,
            sleep=sleep,
            monotonic=monotonic,
        )
    enrollment = stored.enrollment
    return extract_table(
        settings=settings,
        pg_conn=pg_conn,
        s3=s3,
        table=table,
        file_format=file_format,
        run_id=run_id or enrollment.snapshot_run_id,
        now=now,
        remaining_ms=remaining_ms,
        owner=owner,
        clock=clock,
        fan_out=fan_out,
        snapshot=enrollment.changes,
    )


def reset_enrollment(store: RunStore, table: TableRef) -> None:
    """Forget the table's enrollment: its next invocation enrolls it again and takes a new snapshot
    (``pgsnow cdc resnapshot``). The applied position in Snowflake is the loader's to reset."""
    store.remove_enrollment(table)
    logger.info(
        "enrollment reset; the next invocation takes a new snapshot", extra={"table": table.qualified}
    )


def enroll_position(
    settings: Settings,
    pg_conn: Connection,
    table: TableRef,
    *,
    remaining_ms: Callable[[], int] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> int:
    """The snapshot position S of ``table``: checked, read, and waited for.

    Every transaction whose commit record precedes S is visible to every snapshot taken after this
    returns: each transaction that was running when S was read has ended. Each query runs in a
    transaction of its own, so each check sees the current state and the run that follows takes
    its snapshot afterwards.
    """
    cdc = settings.cdc
    try:
        _check_publication(pg_conn, cdc.publication, table)
        _check_slot(pg_conn, cdc.slot, table)
        position = parse_lsn(str(_one(pg_conn, "SELECT pg_current_wal_lsn()::text")))
        # Listed after S was read: a transaction whose commit record precedes S holds its xid's lock
        # until it has left the proc array, so it is listed unless every snapshot already sees it.
        running: list[str] = _one(
            pg_conn, f"SELECT coalesce(array_agg(l.transactionid::text), '{{}}') {_HELD_XIDS}"
        )
        _wait_for_transactions(
            pg_conn,
            table,
            running,
            position=position,
            limit_s=_wait_limit_s(settings, remaining_ms),
            sleep=sleep,
            monotonic=monotonic,
        )
    except psycopg2.Error as exc:
        raise classify_pg_error(exc, table=table.qualified) from exc
    finally:
        end_snapshot(pg_conn)
    return position


def _enroll(
    settings: Settings,
    pg_conn: Connection,
    store: RunStore,
    table: TableRef,
    *,
    replacing: StoredEnrollment | None,
    now: Callable[[], datetime],
    remaining_ms: Callable[[], int] | None,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
) -> StoredEnrollment:
    """Find S, then record the enrollment (before the snapshot's first manifest)."""
    started = monotonic()
    position = enroll_position(
        settings, pg_conn, table, remaining_ms=remaining_ms, sleep=sleep, monotonic=monotonic
    )
    enrolled_at = now()
    enrollment = Enrollment(table, settings.cdc.slot, position, utc_iso(enrolled_at), new_run_id(enrolled_at))
    # Conditional (absent, or still ``replacing``): of two invocations enrolling at once, one wins.
    stored = store.write_enrollment(enrollment, replacing=replacing)
    if stored is None:
        raise RunInProgressError(
            f"{table.qualified} was enrolled by another invocation meanwhile; it takes the snapshot",
            table=table.qualified,
            s3_key=enrollment_key(table),
        )
    logger.info(
        "enrolled change-capture table",
        extra={
            "table": table.qualified,
            "run_id": enrollment.snapshot_run_id,
            "slot": enrollment.slot,
            "snapshot_lsn": format_lsn(position),
            "duration_ms": round((monotonic() - started) * 1000),
        },
    )
    return stored


def _snapshot_state(store: RunStore, enrollment: Enrollment) -> RunState | None:
    """Where the enrollment's snapshot run is: None before its first checkpoint."""
    checkpoint = store.load_checkpoint(enrollment.table, enrollment.snapshot_run_id)
    return None if checkpoint is None else RunState(checkpoint.state)


def _wait_limit_s(settings: Settings, remaining_ms: Callable[[], int] | None) -> float:
    """CDC_SNAPSHOT_WAIT_S, or less when the invocation's deadline comes first. Not the extraction's
    deadline margin: once the enrollment is recorded, a run that starts near the deadline stops at
    once and its continuation takes the snapshot."""
    limit = float(settings.cdc.snapshot_wait_s)
    if remaining_ms is not None:
        limit = min(limit, max(0.0, remaining_ms() / 1000 - _ENROLL_RESERVE_S))
    return limit


def _one(pg_conn: Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the query's one row, in a transaction of its own."""
    try:
        with pg_conn.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
    finally:
        end_snapshot(pg_conn)
    return None if row is None else row[0]


def _check_publication(pg_conn: Connection, publication: str, table: TableRef) -> None:
    """The table is published (as itself: with publish_via_partition_root a partitioned table
    appears under its own name, its partitions do not)."""
    found = _one(
        pg_conn,
        "SELECT (SELECT count(*) FROM pg_publication WHERE pubname = %s)::int * 2"
        " + (SELECT count(*) FROM pg_publication_tables"
        "    WHERE pubname = %s AND schemaname = %s AND tablename = %s)::int",
        (publication, publication, table.schema, table.table),
    )
    if found == 3:
        return
    problem = (
        f"publication {publication!r} (CDC_PUBLICATION) does not exist"
        if found < 2
        else f"{table.qualified} is not in publication {publication!r} (CDC_PUBLICATION)"
    )
    raise PermanentError(
        f"cannot enroll {table.qualified} for change capture: {problem}; `pgsnow postgres-sql` prints "
        "the statements that publish the change-capture tables",
        table=table.qualified,
    )


def _check_slot(pg_conn: Connection, slot: str, table: TableRef) -> None:
    """The slot exists in this database, decodes with pgoutput and has not been invalidated. It must
    exist before S is read: the stream holds every change committed after its consistent point."""
    found = _one(
        pg_conn,
        "SELECT to_jsonb(s) || jsonb_build_object('current_database', current_database())"
        " FROM pg_replication_slots s WHERE slot_name = %s",
        (slot,),
    )
    where = f"cannot enroll {table.qualified} for change capture: replication slot {slot!r} (CDC_SLOT)"
    if found is None:
        raise PermanentError(
            f"{where} does not exist; `pgsnow postgres-sql` prints the statement that creates it",
            table=table.qualified,
        )
    if found.get("slot_type") != "logical" or found.get("plugin") != "pgoutput":
        raise PermanentError(
            f"{where} is a {found.get('slot_type')} slot of plugin {found.get('plugin')!r}; it must be a "
            "logical slot of plugin pgoutput",
            table=table.qualified,
        )
    if found.get("database") != found.get("current_database"):
        raise PermanentError(
            f"{where} belongs to database {found.get('database')!r}, not {found.get('current_database')!r}",
            table=table.qualified,
        )
    # wal_status 'lost' (max_slot_wal_keep_size); PostgreSQL 16+ also says conflicting, 17+ why.
    if found.get("wal_status") == "lost" or found.get("conflicting") or found.get("invalidation_reason"):
        raise PermanentError(
            f"{where} has been invalidated (wal_status {found.get('wal_status')!r}, "
            f"{found.get('invalidation_reason') or 'WAL removed'}): the changes it no longer holds are "
            f"lost to it; create it again and re-snapshot its tables with `pgsnow cdc resnapshot --slot {slot}`",
            table=table.qualified,
        )


def _wait_for_transactions(
    pg_conn: Connection,
    table: TableRef,
    running: list[str],
    *,
    position: int,
    limit_s: float,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
) -> None:
    """Until every transaction of ``running`` (xids listed after S was read) has ended."""
    started = monotonic()
    pause = _FIRST_POLL_S
    while running and _one(
        pg_conn, f"SELECT count(*) {_HELD_XIDS} AND l.transactionid::text = ANY(%s)", (running,)
    ):
        waited = monotonic() - started
        if waited >= limit_s:
            raise RetryableError(
                f"enrolling {table.qualified} for change capture: {_oldest_blocker(pg_conn, running)} began "
                f"before the snapshot position {format_lsn(position)} and is still open after {waited:.0f} s "
                "(CDC_SNAPSHOT_WAIT_S, or the invocation's deadline): the snapshot waits until every "
                "transaction running at that position has ended; the next invocation tries again",
                table=table.qualified,
            )
        sleep(min(pause, max(0.0, limit_s - waited)))
        pause = min(pause * 2, _MAX_POLL_S)


def _oldest_blocker(pg_conn: Connection, running: list[str]) -> str:
    """The oldest transaction of ``running`` still open, named by its backend (or its prepared
    transaction's gid)."""
    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT l.transactionid::text, l.pid,"
            "       extract(epoch FROM clock_timestamp() - a.xact_start)::bigint, a.state, p.gid"
            " FROM pg_locks l"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
            " LEFT JOIN pg_prepared_xacts p ON p.transaction = l.transactionid"
            f" WHERE {_HELD_XID} AND l.transactionid::text = ANY(%s)"
            " ORDER BY age(l.transactionid) DESC LIMIT 1",
            (running,),
        )
        row = cur.fetchone()
    end_snapshot(pg_conn)
    if row is None:
        return "a transaction"  # it ended just now
    xid, pid, age_s, state, gid = row
    if gid is not None:
        return f"prepared transaction {gid!r} (xid {xid}): COMMIT PREPARED or ROLLBACK PREPARED it"
    if age_s is not None:
        return f"transaction {xid} of backend pid {pid} (open {age_s} s, {state})"
    return f"transaction {xid} of backend pid {pid} (its details are hidden from this role: grant pg_read_all_stats)"
