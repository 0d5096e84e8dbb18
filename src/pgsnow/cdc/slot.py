"""The replication slot's health, and the refusal to drain a slot that lost changes.

A logical replication slot is the only thing that keeps the WAL pgsnow has not yet staged. When
it is dropped, lost in a failover, or invalidated because it held more WAL than
``max_slot_wal_keep_size`` allows (``wal_status = 'lost'``), the changes in between are gone:
draining a new slot from where it stands would skip them silently. ``check_slot`` raises
``SlotLostError`` instead, naming the tables affected and the command that re-snapshots them
(``pgsnow cdc resnapshot``, docs/change-capture.md "A lost slot").

``check_slot`` also refuses a slot pgsnow cannot read at all: not a logical ``pgoutput`` slot, or a
slot of another database (the replication connection decodes only its own database's WAL). Every
part that looks at the slot (the drain, the reader, ``pgsnow status``, ``pgsnow cdc resnapshot``)
reads it through ``slot_health``: this module is the one owner of the slot's row.

``pg_replication_slots`` grows columns between major versions (``conflicting`` in 16,
``invalidation_reason`` in 17), so the row is read as JSON and the optional columns are taken
when present.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg2

from pgsnow.changes import parse_lsn
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.postgres import classify_pg_error

LOST = "lost"  # wal_status of a slot whose WAL was removed: it can never be read again

PLUGIN = "pgoutput"

# One round trip: the slot's row (as JSON, whatever the server's version), when the server is a
# primary how much WAL it pins (current insert position - restart_lsn), and the database connected to.
_SLOT_QUERY = """
SELECT row_to_json(s)::text,
       CASE WHEN pg_is_in_recovery() OR s.restart_lsn IS NULL THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint END,
       current_database()
  FROM pg_catalog.pg_replication_slots AS s
 WHERE s.slot_name = %s
"""


@dataclass(frozen=True)
class SlotHealth:
    """One slot as the server sees it; ``exists`` False (and the rest None) when there is none."""

    slot: str
    exists: bool
    active: bool = False
    active_pid: int | None = None
    wal_status: str | None = None  # reserved | extended | unreserved | lost
    confirmed_flush_lsn: int | None = None
    restart_lsn: int | None = None
    retained_wal_bytes: int | None = None
    safe_wal_size: int | None = None  # bytes left before max_slot_wal_keep_size invalidates it
    invalidation_reason: str | None = None  # PostgreSQL 17+ (16: "conflicting" only)
    plugin: str | None = None
    slot_type: str | None = None  # logical | physical
    database: str | None = None  # a logical slot's database
    current_database: str | None = None  # the database of the connection that read the row

    @property
    def lost(self) -> bool:
        """No longer usable: dropped, or its WAL removed (invalidated). A logical slot without a
        confirmed position is one whose invalidation removed it (PostgreSQL 15 shows no reason)."""
        return (
            not self.exists
            or self.wal_status == LOST
            or self.invalidation_reason is not None
            or (self.slot_type == "logical" and self.confirmed_flush_lsn is None)
        )

    @property
    def unusable(self) -> str | None:
        """Why pgsnow cannot read this (existing) slot at all, or None: not a pgoutput slot, or one
        of another database. Set-up mistakes, not lost changes: nothing needs a new snapshot."""
        if not self.exists:
            return None
        if self.slot_type not in (None, "logical") or self.plugin not in (None, PLUGIN):
            return (
                f"replication slot {self.slot!r} is a {self.slot_type} slot of {self.plugin!r}, not {PLUGIN}"
            )
        if self.database is not None and self.current_database not in (None, self.database):
            return (
                f"replication slot {self.slot!r} belongs to database {self.database!r}, not "
                f"{self.current_database!r}: connect to the slot's database"
            )
        return None

    @property
    def problem(self) -> str | None:
        """Why the slot cannot be drained, or None."""
        if not self.exists:
            return (
                f"replication slot {self.slot!r} does not exist (dropped, or lost in a failover; a new one "
                "is created with the statements `pgsnow postgres-sql` prints)"
            )
        if self.lost:
            reason = self.invalidation_reason or "its WAL was removed (max_slot_wal_keep_size)"
            return f"replication slot {self.slot!r} is invalidated: {reason}"
        return None


class SlotLostError(PermanentError):
    """The slot is gone or invalidated: changes were lost, the tables must be snapshotted again."""

    def __init__(self, health: SlotHealth, tables: Iterable[TableRef]) -> None:
        self.health = health
        self.tables = tuple(sorted(tables, key=lambda t: (t.schema, t.table)))
        names = ", ".join(t.qualified for t in self.tables) or "(none configured)"
        super().__init__(
            f"{health.problem}; changes to {names} since its last confirmed position cannot be read. "
            f"Nothing is drained until the tables are snapshotted again: run "
            f"`{resnapshot_command(health.slot, self.tables)}` (docs/change-capture.md, 'A lost slot')",
            table=names,
        )


def resnapshot_command(slot: str, tables: Iterable[TableRef] = ()) -> str:
    """The command that re-establishes change capture after ``slot`` was lost."""
    command = f"pgsnow cdc resnapshot --slot {slot}"
    names = ",".join(t.qualified for t in tables)
    return f"{command} --tables {names}" if names else command


def slot_health(conn: Any, slot: str) -> SlotHealth:
    """Read ``slot`` from ``pg_replication_slots`` (any role may: the view is public)."""
    with conn.cursor() as cur:
        cur.execute(_SLOT_QUERY, (slot,))
        row = cur.fetchone()
    if row is None:
        return SlotHealth(slot=slot, exists=False)
    return health_from_row(slot, _json_object(row[0]), row[1], current_database=row[2])


def health_from_row(
    slot: str,
    fields: dict[str, Any],
    retained_wal_bytes: int | None,
    *,
    current_database: str | None = None,
) -> SlotHealth:
    """A ``SlotHealth`` from the view's row as JSON (columns absent on older servers are None)."""
    reason = fields.get("invalidation_reason")
    if reason is None and fields.get("conflicting") is True:
        # PostgreSQL 16: a slot on a standby invalidated by a recovery conflict says only this.
        reason = "conflict with recovery"
    pid = fields.get("active_pid")
    safe = fields.get("safe_wal_size")
    return SlotHealth(
        slot=slot,
        exists=True,
        active=bool(fields.get("active")),
        active_pid=None if pid is None else int(pid),
        wal_status=fields.get("wal_status"),
        confirmed_flush_lsn=_lsn(fields.get("confirmed_flush_lsn")),
        restart_lsn=_lsn(fields.get("restart_lsn")),
        retained_wal_bytes=None if retained_wal_bytes is None else int(retained_wal_bytes),
        safe_wal_size=None if safe is None else int(safe),
        invalidation_reason=None if reason is None else str(reason),
        plugin=fields.get("plugin"),
        slot_type=fields.get("slot_type"),
        database=fields.get("database"),
        current_database=current_database,
    )


def check_slot(conn: Any, slot: str, tables: Iterable[TableRef], *, run_id: str | None = None) -> SlotHealth:
    """The slot's health; ``SlotLostError`` (naming ``tables``) when it is missing or invalidated,
    PermanentError when it is not a pgoutput slot of this database; the connection's own errors
    classified (``pgsnow.postgres.classify_pg_error``, naming ``run_id``).

    The drain calls this at the start of every run, and the reader before and after it takes the
    slot, so a lost slot is never replaced by a new one that silently starts after the changes it
    missed."""
    try:
        health = slot_health(conn, slot)
    except psycopg2.Error as exc:
        raise classify_pg_error(exc, run_id=run_id) from exc
    if health.lost:
        raise SlotLostError(health, tables)
    unusable = health.unusable
    if unusable is not None:
        raise PermanentError(unusable)
    return health


def _lsn(value: Any) -> int | None:
    return None if value is None else parse_lsn(str(value))


def _json_object(text: Any) -> dict[str, Any]:
    value = json.loads(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise PermanentError(f"pg_replication_slots row is not an object: {value!r}")
    return value
