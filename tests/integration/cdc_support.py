"""Change-capture building blocks for tests: a publication and a logical replication slot of a test's own.

Slots are cluster-wide and pin WAL until dropped, so every test's slot has a unique name and is
dropped afterwards (its walsender terminated first, if a drain left one behind).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2.errors
from psycopg2 import sql
from stack_support import autocommit_connection, unique_name


@dataclass(frozen=True)
class ChangeCaptureSource:
    dsn: str
    publication: str
    slot: str


@contextmanager
def change_capture_source(
    dsn: str, tables: Sequence[tuple[str, str]], *, prefix: str = "pgsnow_test_"
) -> Iterator[ChangeCaptureSource]:
    """A publication over ``tables`` (schema, table) and a pgoutput slot, both dropped afterwards."""
    publication = unique_name(f"{prefix}pub_")
    slot = unique_name(f"{prefix}slot_")
    with autocommit_connection(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)").format(
                sql.Identifier(publication),
                sql.SQL(", ").join(sql.Identifier(schema, table) for schema, table in tables),
            )
        )
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    try:
        yield ChangeCaptureSource(dsn=dsn, publication=publication, slot=slot)
    finally:
        drop_change_capture_source(dsn, publication=publication, slot=slot)


def drop_change_capture_source(dsn: str, *, publication: str, slot: str) -> None:
    with autocommit_connection(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid IS NOT NULL",
            (slot,),
        )
        for attempt in range(50):  # a terminated walsender releases its slot a moment later
            try:
                cur.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                    (slot,),
                )
                break
            except psycopg2.errors.ObjectInUse:
                if attempt == 49:
                    raise
                time.sleep(0.2)
        cur.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)))
