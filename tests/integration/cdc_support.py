"""Change-capture building blocks for tests: a publication and a logical replication slot of a test's own.

Slots are cluster-wide and pin WAL until dropped, so every test's slot has a unique name and is
dropped afterwards (its walsender terminated first, if a drain left one behind).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from psycopg2 import sql
from stack_support import autocommit_connection, unique_name

from pgsnow.identifiers import TableRef
from pgsnow.runtime import reset_runtime


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
    """Drop the slot (its walsender terminated first) and the publication: what ``pgsnow demo --cdc``
    does with its own (``pgsnow.demo.pipeline.drop_change_capture_source``)."""
    from pgsnow.demo.pipeline import drop_change_capture_source as drop_source

    drop_source(dsn, publication, slot)


def put_in_cdc_mode(
    stack_env: MutableMapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
    table: TableRef,
    source: ChangeCaptureSource,
    **extra: str,
) -> dict[str, str]:
    """``table`` in mode cdc over ``source``'s publication and slot (and ``extra``), set in the local
    stack's environment for its handlers until the test ends; the same variables, for ``settings``.
    The cached runtime is reset so that the handlers read them."""
    env = {
        "PGSNOW_TABLE_OPTIONS": json.dumps({table.qualified: {"mode": "cdc"}}),
        "CDC_PUBLICATION": source.publication,
        "CDC_SLOT": source.slot,
        **extra,
    }
    for name, value in env.items():
        monkeypatch.setitem(stack_env, name, value)
    reset_runtime()
    return env
