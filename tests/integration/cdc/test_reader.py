"""pgsnow.cdc.reader (and pgsnow.cdc.protocol on real bytes) against the local PostgreSQL: a slot
and publication of each test's own (cdc_support.change_capture_source, dropped afterwards), in a
schema of its own. Spill files are read back the way the drain reads them: PostgreSQL COPY CSV
into a table of the change columns' types, so NULL vs "" is checked by the server itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from cdc_support import ChangeCaptureSource, change_capture_source
from psycopg2 import sql
from stack_support import new_source_schema

from pgsnow.cdc import reader
from pgsnow.cdc.protocol import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Relation,
    Truncate,
    TypeMessage,
    Update,
    decode_message,
)
from pgsnow.cdc.reader import (
    DrainedStream,
    SlotBusyError,
    SpilledChanges,
    open_stream,
    read_changes,
)
from pgsnow.cdc.slot import SlotLostError
from pgsnow.changes import CHANGE_COLUMN_TYPES, CHANGE_COLUMNS, parse_lsn
from pgsnow.identifiers import TableRef

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 120  # a read that gets nowhere fails the test instead of hanging it
ROW_COLUMNS = "op, seq, moved, unchanged, id, name, big, n"


@pytest.fixture
def source() -> Iterator[tuple[str, str]]:
    """(DSN of database ``test``, a schema of the test's own with table ``items``)."""
    with new_source_schema("pgsnow_cdc_reader") as (dsn, schema):
        execute(
            dsn,
            sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, name text, big text, n integer)").format(
                sql.Identifier(schema, "items")
            ),
        )
        yield dsn, schema


def execute(dsn: str, *statements: sql.Composable | str, params: Sequence[Any] = ()) -> Any:
    """Run each statement in its own transaction (autocommit); the first column of the last row."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            result = None
            for statement in statements:
                cur.execute(statement, params or None)
                result = cur.fetchone()[0] if cur.description else None
            return result
    finally:
        conn.close()


def items(schema: str) -> sql.Composable:
    return sql.Identifier(schema, "items")


def heartbeat(dsn: str, content: str = "hb") -> int:
    return parse_lsn(
        execute(dsn, "SELECT pg_logical_emit_message(false, 'pgsnow.heartbeat', %s)::text", params=(content,))
    )


def wal_lsn(dsn: str) -> int:
    return parse_lsn(execute(dsn, "SELECT pg_current_wal_insert_lsn()::text"))


def confirmed_flush(dsn: str, slot: str) -> int:
    return parse_lsn(
        execute(
            dsn,
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            params=(slot,),
        )
    )


def read(
    src: ChangeCaptureSource,
    tables: Sequence[TableRef],
    spill_dir: Path,
    *,
    heartbeat_lsn: int | None,
    max_bytes: int = 2**40,
) -> DrainedStream:
    return read_changes(
        src.dsn,
        slot=src.slot,
        publication=src.publication,
        heartbeat_lsn=heartbeat_lsn,
        tables=tables,
        max_bytes=max_bytes,
        deadline=time.monotonic() + READ_TIMEOUT_S,
        spill_dir=spill_dir,
    )


def spilled(dsn: str, segment: SpilledChanges) -> list[dict[str, Any]]:
    """The segment's rows as PostgreSQL's COPY CSV reads them (change columns typed, table columns
    text), in file order."""
    columns = [
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(CHANGE_COLUMN_TYPES[name]))
        for name in CHANGE_COLUMNS
    ] + [sql.SQL("{} text").format(sql.Identifier(c.name)) for c in segment.relation.columns]
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE TEMP TABLE spill (_line serial, {})").format(sql.SQL(", ").join(columns))
            )
            names = sql.SQL(", ").join(
                sql.Identifier(n) for n in (*CHANGE_COLUMNS, *(c.name for c in segment.relation.columns))
            )
            with segment.path.open("rb") as f:
                cur.copy_expert(
                    sql.SQL("COPY spill ({}) FROM STDIN WITH (FORMAT csv)").format(names).as_string(conn), f
                )
            cur.execute("SELECT * FROM spill ORDER BY _line")
            header = [d.name for d in cur.description]
            rows = [dict(zip(header, row, strict=True)) for row in cur.fetchall()]
        conn.rollback()
    finally:
        conn.close()
    return rows


def short(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(op, seq, key moved, unchanged, id, name, big, n) of each row, ``big`` shortened to its length."""
    return [
        (
            r["_pgsnow_op"],
            r["_pgsnow_seq"],
            r["_pgsnow_key_moved"],
            r["_pgsnow_unchanged"],
            r["id"],
            r["name"],
            None if r["big"] is None else len(r["big"]),
            r["n"],
        )
        for r in rows
    ]


def test_changes_spill_as_specified(source: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = source
    execute(dsn, sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY)").format(sql.Identifier(schema, "other")))
    big = execute(dsn, "SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g")  # 12.8 KB
    with change_capture_source(dsn, [(schema, "items"), (schema, "other")]) as src:
        started_at = execute(dsn, "SELECT now()")
        before_first = wal_lsn(dsn)
        execute(
            dsn, sql.SQL("INSERT INTO {} VALUES (1, 'a', NULL, 1), (2, '', NULL, 2)").format(items(schema))
        )
        after_first = wal_lsn(dsn)
        execute(
            dsn,
            sql.SQL("UPDATE {} SET name = 'b\"q,\n' WHERE id = 1").format(items(schema)),
            sql.SQL("UPDATE {} SET id = 10 WHERE id = 2").format(items(schema)),  # primary key moves
            sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(schema, "other")),  # not read
        )
        execute(dsn, sql.SQL("INSERT INTO {} VALUES (3, 'x', %s, 0)").format(items(schema)), params=(big,))
        execute(dsn, sql.SQL("UPDATE {} SET n = 5 WHERE id = 3").format(items(schema)))  # big unchanged
        execute(
            dsn,
            sql.SQL("DELETE FROM {} WHERE id = 1").format(items(schema)),
            sql.SQL("TRUNCATE {}").format(items(schema)),
        )
        stop_at = heartbeat(dsn, "run 1")
        finished_at = execute(dsn, "SELECT now()")

        stream = read(src, [TableRef(schema, "items")], tmp_path, heartbeat_lsn=stop_at)

    assert (stream.stop_reason, stream.last_heartbeat) == ("heartbeat", "run 1")
    assert stream.end_lsn >= stop_at > stream.start_lsn
    assert (stream.transactions, stream.changes) == (8, 9)  # 'other' is read, not spilled
    [segment] = stream.segments
    assert segment.table == TableRef(schema, "items")
    assert [(c.name, c.type_oid, c.is_key) for c in segment.relation.columns] == [
        ("id", 23, True),
        ("name", 25, False),
        ("big", 25, False),
        ("n", 23, False),
    ]
    rows = spilled(dsn, segment)
    assert short(rows) == [
        ("I", 1, False, None, "1", "a", None, "1"),
        ("I", 2, False, None, "2", "", None, "2"),  # "" stays "", NULL stays NULL
        ("U", 1, False, None, "1", 'b"q,\n', None, "1"),
        ("D", 1, False, None, "2", None, None, None),  # the old key only
        ("U", 2, True, None, "10", "", None, "2"),
        ("I", 1, False, None, "3", "x", len(big), "0"),
        ("U", 1, False, '["big"]', "3", "x", None, "5"),  # unchanged TOAST: NULL field, named
        ("D", 1, False, None, "1", None, None, None),
        ("T", 1, False, None, None, None, None, None),
    ]
    assert rows[5]["big"] == big
    assert segment.rows == len(rows)
    # One commit LSN per transaction, increasing; the first is the real one (inside its WAL span).
    lsns = [int(r["_pgsnow_lsn"]) for r in rows]
    assert before_first < lsns[0] < after_first
    assert lsns[0] == lsns[1] and lsns[3] == lsns[4]
    assert sorted(set(lsns)) == list(dict.fromkeys(lsns))
    assert len(set(lsns)) == 7
    assert (segment.first_commit_lsn, segment.last_commit_lsn) == (lsns[0], lsns[-1])
    assert stream.start_lsn < lsns[0] and lsns[-1] < stream.end_lsn
    times: list[datetime] = [r["_pgsnow_committed_at"] for r in rows]
    assert all(started_at <= t <= finished_at for t in times)
    assert times == sorted(times)


def test_new_relation_shape_starts_a_new_segment(source: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = source
    with change_capture_source(dsn, [(schema, "items")]) as src:
        execute(
            dsn,
            sql.SQL("INSERT INTO {} VALUES (1, 'a', NULL, 1)").format(items(schema)),
            sql.SQL("ALTER TABLE {} ADD COLUMN note varchar(20)").format(items(schema)),
            sql.SQL("INSERT INTO {} VALUES (2, 'b', NULL, 2, 'new')").format(items(schema)),
            sql.SQL("UPDATE {} SET note = 'old' WHERE id = 1").format(items(schema)),
        )
        stream = read(src, [TableRef(schema, "items")], tmp_path, heartbeat_lsn=heartbeat(dsn))

    first, second = stream.segments
    assert first.relation.column_names == ("id", "name", "big", "n")
    assert second.relation.column_names == ("id", "name", "big", "n", "note")
    assert second.relation.columns[-1].type_modifier == 20 + 4  # varchar(20): typmod includes the header
    assert [(r["_pgsnow_op"], r["id"]) for r in spilled(dsn, first)] == [("I", "1")]
    assert [(r["_pgsnow_op"], r["id"], r["note"]) for r in spilled(dsn, second)] == [
        ("I", "2", "new"),
        ("U", "1", "old"),
    ]
    assert first.last_commit_lsn < second.first_commit_lsn


def test_tables_swapped_by_renames_keep_their_rows_apart(source: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = source
    execute(
        dsn,
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
            sql.Identifier(schema, "spare"), items(schema)
        ),
    )
    tables = [TableRef(schema, "items"), TableRef(schema, "spare")]
    with change_capture_source(dsn, [(schema, "items"), (schema, "spare")]) as src:
        # Given a row in each of two tables of the same columns, then the tables swapped by renames
        # (pgoutput describes each again under its new name, with the same columns)
        execute(
            dsn,
            sql.SQL("INSERT INTO {} VALUES (1, 'items before', NULL, 1)").format(items(schema)),
            sql.SQL("INSERT INTO {} VALUES (2, 'spare before', NULL, 2)").format(
                sql.Identifier(schema, "spare")
            ),
            sql.SQL("ALTER TABLE {} RENAME TO swapping").format(items(schema)),
            sql.SQL("ALTER TABLE {} RENAME TO items").format(sql.Identifier(schema, "spare")),
            sql.SQL("ALTER TABLE {} RENAME TO spare").format(sql.Identifier(schema, "swapping")),
            sql.SQL("INSERT INTO {} VALUES (3, 'items after', NULL, 3)").format(items(schema)),
            sql.SQL("INSERT INTO {} VALUES (4, 'spare after', NULL, 4)").format(
                sql.Identifier(schema, "spare")
            ),
        )
        # When the slot is read
        stream = read(src, tables, tmp_path, heartbeat_lsn=heartbeat(dsn))
    # Then each row is spilled under the name its table had when it was written
    by_table: dict[str, list[str]] = {}
    for segment in stream.segments:
        by_table.setdefault(segment.table.table, []).extend(r["name"] for r in spilled(dsn, segment))
    assert by_table == {"items": ["items before", "items after"], "spare": ["spare before", "spare after"]}


def test_stops_at_the_heartbeat_and_never_confirms(source: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = source
    table = TableRef(schema, "items")
    with change_capture_source(dsn, [(schema, "items")]) as src:
        execute(dsn, sql.SQL("INSERT INTO {} VALUES (1, 'before', NULL, 1)").format(items(schema)))
        first_stop = heartbeat(dsn, "first")
        execute(dsn, sql.SQL("INSERT INTO {} VALUES (2, 'after', NULL, 2)").format(items(schema)))
        second_stop = heartbeat(dsn, "second")
        slot_before = confirmed_flush(dsn, src.slot)

        stream = read(src, [table], tmp_path / "1", heartbeat_lsn=first_stop)
        assert (stream.stop_reason, stream.last_heartbeat) == ("heartbeat", "first")
        assert stream.end_lsn == first_stop
        assert [r["name"] for r in spilled(dsn, stream.segments[0])] == ["before"]
        assert confirmed_flush(dsn, src.slot) == slot_before == stream.start_lsn

        # Nothing was confirmed: the next reader gets the same changes again, then the later ones.
        again = read(src, [table], tmp_path / "2", heartbeat_lsn=second_stop)
        assert again.start_lsn == stream.start_lsn
        assert (again.stop_reason, again.last_heartbeat) == ("heartbeat", "second")
        assert [r["name"] for r in spilled(dsn, again.segments[0])] == ["before", "after"]
        assert confirmed_flush(dsn, src.slot) == slot_before


def test_confirm_moves_the_slot_to_the_end(source: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = source
    table = TableRef(schema, "items")
    with change_capture_source(dsn, [(schema, "items")]) as src:
        execute(dsn, sql.SQL("INSERT INTO {} VALUES (1, 'one', NULL, 1)").format(items(schema)))
        stop = heartbeat(dsn)
        with open_stream(dsn, slot=src.slot, publication=src.publication) as session:
            stream = session.read(
                heartbeat_lsn=stop,
                tables=[table],
                max_bytes=2**40,
                deadline=time.monotonic() + READ_TIMEOUT_S,
                spill_dir=tmp_path / "1",
            )
            session.keep_alive()
            assert confirmed_flush(dsn, src.slot) == stream.start_lsn  # keep-alive moves nothing
            assert session.confirm(stream.end_lsn) == stream.end_lsn
        assert confirmed_flush(dsn, src.slot) == stream.end_lsn
        execute(dsn, sql.SQL("INSERT INTO {} VALUES (2, 'two', NULL, 2)").format(items(schema)))
        after = read(src, [table], tmp_path / "2", heartbeat_lsn=heartbeat(dsn))
    assert after.start_lsn == stream.end_lsn
    assert [r["name"] for r in spilled(dsn, after.segments[0])] == ["two"]


def test_byte_budget_cuts_at_a_commit_and_reads_a_larger_transaction_whole(
    source: tuple[str, str], tmp_path: Path
) -> None:
    dsn, schema = source
    table = TableRef(schema, "items")
    with change_capture_source(dsn, [(schema, "items")]) as src:
        execute(
            dsn,
            sql.SQL(
                "INSERT INTO {} SELECT g, repeat('x', 100), NULL, g FROM generate_series(1, 1000) g"
            ).format(items(schema)),
            sql.SQL("INSERT INTO {} VALUES (1001, 'second', NULL, 0)").format(items(schema)),
            sql.SQL("INSERT INTO {} VALUES (1002, 'third', NULL, 0)").format(items(schema)),
        )
        stop = heartbeat(dsn)

        cut = read(src, [table], tmp_path / "cut", heartbeat_lsn=stop, max_bytes=10_000)
        assert cut.stop_reason == "bytes"
        assert cut.bytes_read > 100_000  # far past the budget: the transaction was read whole
        assert (cut.transactions, cut.changes) == (1, 1000)
        [segment] = cut.segments
        rows = spilled(dsn, segment)
        assert [int(r["id"]) for r in rows] == list(range(1, 1001))

        # end_lsn lies between the first transaction and the second: reading on from there
        # (what a confirm would do) gets exactly the rest.
        whole = read(src, [table], tmp_path / "whole", heartbeat_lsn=stop)
        second_commit = parse_lsn_of(spilled(dsn, whole.segments[0])[1000])
        assert segment.last_commit_lsn < cut.end_lsn <= second_commit
        assert (whole.stop_reason, whole.transactions, whole.changes) == ("heartbeat", 3, 1002)


def parse_lsn_of(row: dict[str, Any]) -> int:
    return int(row["_pgsnow_lsn"])


def test_deadline_discards_the_transaction_in_progress(source: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = source
    execute(dsn, sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY)").format(sql.Identifier(schema, "extra")))
    tables = [TableRef(schema, "items"), TableRef(schema, "extra")]
    with change_capture_source(dsn, [(schema, "items"), (schema, "extra")]) as src:
        execute(dsn, sql.SQL("INSERT INTO {} VALUES (1, 'committed', NULL, 1)").format(items(schema)))
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:  # one transaction: extra first, then ten items
            cur.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(schema, "extra")))
            for i in range(10):
                cur.execute(
                    sql.SQL("INSERT INTO {} VALUES (%s, 'partial', NULL, 0)").format(items(schema)), (i + 2,)
                )
        conn.close()

        with open_stream(dsn, slot=src.slot, publication=src.publication) as session:
            # The deadline passes once 3 changes have been read: the first transaction's insert,
            # then inside the second one, the extra row and the first items row, so both tables'
            # spill files hold rows of the transaction that is cut.
            stream = session.read(
                heartbeat_lsn=None,
                tables=tables,
                max_bytes=2**40,
                deadline=1.0,
                spill_dir=tmp_path,
                clock=lambda: 2.0 if session.changes_read >= 3 else 0.0,
            )
    assert stream.stop_reason == "deadline"
    assert (stream.transactions, stream.changes) == (1, 1)
    [segment] = stream.segments  # the extra table's segment came from the discarded transaction only
    assert segment.table == TableRef(schema, "items")
    rows = spilled(dsn, segment)
    assert [(r["_pgsnow_op"], r["id"], r["name"]) for r in rows] == [("I", "1", "committed")]
    assert segment.path.read_bytes().endswith(b"\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [segment.path.name]
    assert stream.end_lsn > segment.last_commit_lsn > stream.start_lsn


def test_deadline_with_nothing_read_ends_at_the_start(source: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = source
    with change_capture_source(dsn, [(schema, "items")]) as src:
        stream = read_changes(
            dsn,
            slot=src.slot,
            publication=src.publication,
            heartbeat_lsn=None,
            tables=[TableRef(schema, "items")],
            max_bytes=2**40,
            deadline=time.monotonic() + 0.5,
            spill_dir=tmp_path,
        )
    assert (stream.stop_reason, stream.end_lsn, stream.segments) == ("deadline", stream.start_lsn, ())


def test_one_consumer_at_a_time(source: tuple[str, str]) -> None:
    dsn, schema = source
    with change_capture_source(dsn, [(schema, "items")]) as src:
        with open_stream(dsn, slot=src.slot, publication=src.publication):
            with pytest.raises(SlotBusyError, match=src.slot) as caught:
                open_stream(dsn, slot=src.slot, publication=src.publication)
            assert caught.value.retryable
        # The first consumer is gone: the slot can be read again (its walsender may take a moment
        # to release it after the disconnect).
        for attempt in range(100):
            try:
                open_stream(dsn, slot=src.slot, publication=src.publication).close()
                break
            except SlotBusyError:
                if attempt == 99:
                    raise
                time.sleep(0.1)


def test_missing_slot_names_the_slot_and_the_setup_command(source: tuple[str, str]) -> None:
    dsn, _ = source
    with pytest.raises(SlotLostError, match=r"pgsnow_no_such_slot.*pgsnow postgres-sql") as caught:
        open_stream(
            dsn,
            slot="pgsnow_no_such_slot",
            publication="pgsnow_no_such_publication",
            tables=[TableRef("shop", "orders")],
        )
    assert not caught.value.retryable
    # The one SlotLostError of pgsnow.cdc.slot: the tables and the command that re-snapshots them.
    assert "pgsnow cdc resnapshot --slot pgsnow_no_such_slot --tables shop.orders" in str(caught.value)


def test_decoder_on_bytes_a_real_slot_produced(source: tuple[str, str]) -> None:
    """The messages pgoutput itself wrote (through the SQL interface, which returns the same
    payloads the walsender streams), decoded and checked against the catalog and the statements."""
    dsn, schema = source
    execute(
        dsn,
        sql.SQL("CREATE TYPE {} AS ENUM ('sad', 'happy')").format(sql.Identifier(schema, "mood")),
        sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, mood {}, label varchar(12), doc text)").format(
            sql.Identifier(schema, "typed"), sql.Identifier(schema, "mood")
        ),
        sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(items(schema)),
    )
    doc = execute(dsn, "SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g")
    typed = sql.Identifier(schema, "typed")
    with change_capture_source(dsn, [(schema, "typed"), (schema, "items")]) as src:
        execute(
            dsn,
            sql.SQL("INSERT INTO {} (mood, label, doc) VALUES ('happy', '', %s), (NULL, 'ünï', NULL)").format(
                typed
            ),
            params=(doc,),
        )
        execute(dsn, sql.SQL("UPDATE {} SET label = 'x' WHERE id = 1").format(typed))  # doc unchanged TOAST
        execute(dsn, sql.SQL("UPDATE {} SET id = 5 WHERE id = 2").format(typed))  # key changes: 'K'
        execute(dsn, sql.SQL("DELETE FROM {} WHERE id = 5").format(typed))
        execute(dsn, sql.SQL("INSERT INTO {} VALUES (1, 'a', NULL, 1)").format(items(schema)))
        execute(dsn, sql.SQL("UPDATE {} SET n = 2").format(items(schema)))  # REPLICA IDENTITY FULL: 'O'
        execute(dsn, sql.SQL("TRUNCATE {}, {} RESTART IDENTITY CASCADE").format(typed, items(schema)))
        stop = heartbeat(dsn, "captured")
        # A non-transactional message commits nothing, so nothing flushes it; the SQL interface reads
        # flushed WAL only (the walsender waits for the WAL writer; this waits for it too).
        for _ in range(600):
            if parse_lsn(execute(dsn, "SELECT pg_current_wal_flush_lsn()::text")) >= stop:
                break
            time.sleep(0.05)
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                    "'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
                    (src.slot, src.publication),
                )
                payloads = [bytes(row[0]) for row in cur.fetchall()]
                cur.execute(
                    "SELECT attname, atttypid::int, atttypmod FROM pg_attribute "
                    "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                    (f'"{schema}"."typed"',),
                )
                catalog = cur.fetchall()
                cur.execute("SELECT %s::regtype::oid::int", (f'"{schema}"."mood"',))
                mood_oid = cur.fetchone()[0]
        finally:
            conn.close()

    # Non-transactional messages reach every slot of the database: keep ours, not other tests' heartbeats.
    decoded = [decode_message(p) for p in payloads]
    messages = [m for m in decoded if not isinstance(m, LogicalMessage) or m.lsn == stop]
    kinds = [type(m).__name__ for m in messages]
    assert kinds[:23] == [
        "Begin", "TypeMessage", "Relation", "Insert", "Insert", "Commit",
        "Begin", "Update", "Commit",
        "Begin", "Update", "Commit",
        "Begin", "Delete", "Commit",
        "Begin", "Relation", "Insert", "Commit",
        "Begin", "Update", "Commit",
        "Begin",
    ]  # fmt: skip
    # TRUNCATE gives the tables new files, so pgoutput describes them again before the Truncate.
    assert set(kinds[23:-3]) <= {"TypeMessage", "Relation"}
    assert kinds[-3:] == ["Truncate", "Commit", "LogicalMessage"]
    begins = [m for m in messages if isinstance(m, Begin)]
    commits = [m for m in messages if isinstance(m, Commit)]
    assert [b.final_lsn for b in begins] == [c.commit_lsn for c in commits]
    assert all(c.commit_lsn < c.end_lsn for c in commits)
    assert [b.commit_time for b in begins] == [c.commit_time for c in commits]
    assert messages[1] == TypeMessage(mood_oid, schema, "mood")
    relation = messages[2]
    assert isinstance(relation, Relation)
    assert (relation.namespace, relation.name, relation.replica_identity) == (schema, "typed", "d")
    assert [(c.name, c.type_oid, c.type_modifier) for c in relation.columns] == catalog
    assert [c.is_key for c in relation.columns] == [True, False, False, False]
    assert messages[3] == Insert(relation.oid, ("1", "happy", "", doc))
    assert messages[4] == Insert(relation.oid, ("2", None, "ünï", None))
    assert messages[7] == Update(relation.oid, None, None, ("1", "happy", "x", UNCHANGED))
    assert messages[10] == Update(relation.oid, ("2", None, None, None), None, ("5", None, "ünï", None))
    assert messages[13] == Delete(relation.oid, ("5", None, None, None), None)
    full = messages[16]
    assert isinstance(full, Relation)
    assert full.replica_identity == "f" and all(c.is_key for c in full.columns)
    assert messages[20] == Update(full.oid, None, ("1", "a", None, "1"), ("1", "a", None, "2"))
    truncate = messages[-3]
    assert isinstance(truncate, Truncate)
    assert sorted(truncate.relation_oids) == sorted([relation.oid, full.oid])
    assert (truncate.cascade, truncate.restart_identity) == (True, True)
    assert messages[-1] == LogicalMessage(False, stop, "pgsnow.heartbeat", b"captured")


# A child process reads a 300 MB transaction; what is measured is its own peak RSS. Linux keeps
# getrusage's ru_maxrss across execve, so in a child forked from pytest it starts at pytest's size;
# the kernel's high-water mark of the child's own memory (VmHWM) is the measure, getrusage is shown.
_MEMORY_PROBE = """
import json, resource, sys, time
from pathlib import Path
from pgsnow.cdc.reader import read_changes
from pgsnow.identifiers import TableRef

def hwm_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

dsn, slot, publication, stop, schema, spill = sys.argv[1:]
before = hwm_kb()
stream = read_changes(dsn, slot=slot, publication=publication, heartbeat_lsn=int(stop),
                      tables=[TableRef(schema, "items")], max_bytes=2**40,
                      deadline=time.monotonic() + 1200, spill_dir=Path(spill))
print(json.dumps({"before_kb": before, "peak_kb": hwm_kb(),
                  "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rows": stream.changes, "bytes_read": stream.bytes_read, "stop": stream.stop_reason,
                  "file_bytes": sum(s.path.stat().st_size for s in stream.segments)}))
"""


@pytest.mark.slow
def test_a_300_mb_transaction_spills_with_bounded_memory(source: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = source
    rows = 300_000
    with change_capture_source(dsn, [(schema, "items")]) as src:
        execute(
            dsn,
            sql.SQL(
                "INSERT INTO {} SELECT g, repeat(md5(g::text), 32), NULL, g FROM generate_series(1, %s) g"
            ).format(items(schema)),
            params=(rows,),
        )
        stop = heartbeat(dsn)
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                _MEMORY_PROBE,
                dsn,
                src.slot,
                src.publication,
                str(stop),
                schema,
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ.copy(),
            timeout=1200,
        )
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    print(result)
    assert (result["stop"], result["rows"]) == ("heartbeat", rows)
    assert result["bytes_read"] > 300 * 2**20
    assert result["file_bytes"] > 300 * 2**20
    assert result["peak_kb"] <= 256 * 1024
    assert result["peak_kb"] - result["before_kb"] <= 64 * 1024


def test_replica_identity_full_update_and_delete_carry_the_old_row(
    source: tuple[str, str], tmp_path: Path
) -> None:
    """Under REPLICA IDENTITY FULL every column is part of the identity: an update that changes a
    value is the old row's D then the new row's U (key moved), and a delete carries the whole row."""
    dsn, schema = source
    execute(dsn, sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(items(schema)))
    with change_capture_source(dsn, [(schema, "items")]) as src:
        execute(
            dsn,
            sql.SQL("INSERT INTO {} VALUES (1, 'a', NULL, 1)").format(items(schema)),
            sql.SQL("UPDATE {} SET n = 2 WHERE id = 1").format(items(schema)),
            sql.SQL("UPDATE {} SET n = n WHERE id = 1").format(items(schema)),  # changes nothing
            sql.SQL("DELETE FROM {} WHERE id = 1").format(items(schema)),
        )
        stream = read(src, [TableRef(schema, "items")], tmp_path, heartbeat_lsn=heartbeat(dsn))
    [segment] = stream.segments
    assert segment.relation.replica_identity == "f"
    assert short(spilled(dsn, segment)) == [
        ("I", 1, False, None, "1", "a", None, "1"),
        ("D", 1, False, None, "1", "a", None, "1"),
        ("U", 2, True, None, "1", "a", None, "2"),
        ("U", 1, False, None, "1", "a", None, "2"),
        ("D", 1, False, None, "1", "a", None, "2"),
    ]


def test_more_tables_than_open_spill_files(
    source: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spill files are closed and reopened when more tables have rows than files may be open."""
    dsn, schema = source
    monkeypatch.setattr(reader, "MAX_OPEN_SPILL_FILES", 2)
    names = ["items", "t2", "t3"]
    for name in names[1:]:
        execute(dsn, sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY)").format(sql.Identifier(schema, name)))
    with change_capture_source(dsn, [(schema, name) for name in names]) as src:
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:  # one transaction, the tables' rows interleaved
            for i in range(1, 4):
                cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, 'x', NULL, 0)").format(items(schema)), (i,))
                for name in names[1:]:
                    cur.execute(
                        sql.SQL("INSERT INTO {} VALUES (%s)").format(sql.Identifier(schema, name)), (i,)
                    )
        conn.close()
        execute(dsn, sql.SQL("INSERT INTO {} VALUES (4)").format(sql.Identifier(schema, "t2")))
        stream = read(src, [TableRef(schema, name) for name in names], tmp_path, heartbeat_lsn=heartbeat(dsn))
    by_table = {s.table.table: s for s in stream.segments}
    assert sorted(by_table) == sorted(names)
    for name in names:
        rows = spilled(dsn, by_table[name])
        expected = ["1", "2", "3", "4"] if name == "t2" else ["1", "2", "3"]
        assert [r["id"] for r in rows] == expected
        assert [r["_pgsnow_seq"] for r in rows][:3] == [names.index(name) + 1 + 3 * k for k in range(3)]
