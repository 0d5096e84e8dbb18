"""Stream a logical replication slot into per-table spill files, with bounded memory, confirming nothing.

``open_stream(dsn, slot=..., publication=...)`` connects as a replication client (psycopg2's
``LogicalReplicationConnection``), checks the slot, and starts ``pgoutput`` (protocol 1, text
values, ``messages 'true'``) from the slot's confirmed position, which it reads back once the slot
is ours (``ReplicationSession.start_lsn``). ``ReplicationSession.read(...)`` then reads until the
first of:

* ``"heartbeat"``: a non-transactional logical message with the heartbeat prefix at an LSN
  ``>= heartbeat_lsn`` (the drain emitted it before reading; everything committed before it has
  been received, and nothing after it has). ``end_lsn`` = max(its LSN, the last commit's end).
* ``"bytes"``: ``bytes_read >= max_bytes`` at a commit. A transaction is never cut: one larger
  than the budget is read whole (to disk). ``end_lsn`` = that commit's end LSN.
* ``"deadline"``: ``clock() >= deadline``. The transaction in progress is discarded (its rows are
  truncated off the spill files); ``end_lsn`` = the last commit's end LSN, or ``start_lsn``.

``end_lsn`` is the position that is safe to confirm once the spilled changes are durable: the
next reader starting there receives exactly the transactions after the last one spilled, those
whose commit record starts at or after it; the first may start exactly there, as the commit LSN
the spill gives its changes (``pgsnow.changes``, "Chaining").
``heartbeat_lsn`` None reads to the byte budget or the deadline only.

**Spill files.** One PostgreSQL COPY CSV file per table and relation shape (``SpilledChanges``),
in ``spill_dir``; no header; NULL is an unquoted empty field and ``""`` the empty string.
Columns: ``pgsnow.changes.CHANGE_COLUMNS`` then the relation's columns, either

* in **staged text** (``SpilledChanges.staged_text``): when every column is of a type
  ``pgsnow.cdc.staged_text`` converts, each value is written in the staged CSV encoding as it
  arrives (quoted only where the encoding needs it), and a row boundary is recorded about every
  ``CUT_EVERY_BYTES`` (``SpilledChanges.cuts``: where staging may cut files). A value it refuses
  ends the segment: the table's rows from there on go to a new segment of
* **pgoutput's text**: every non-NULL value quoted, as the server sent it.

In both:

* ``_pgsnow_op`` ``I``/``U``/``D``/``T``; ``_pgsnow_lsn`` the transaction's commit LSN (integer);
  ``_pgsnow_seq`` from 1 within the transaction (over every spilled row of it, so within one
  table the sequence is increasing, with gaps); ``_pgsnow_committed_at`` ISO-8601 UTC
  (``YYYY-MM-DDTHH:MI:SS.ffffffZ``, the staged encoding of a timestamptz);
  ``_pgsnow_unchanged`` ``pgsnow.changes.unchanged_text`` of the columns pgoutput sent as
  unchanged TOAST (``'u'``; their fields are NULL) or NULL; ``_pgsnow_key_moved`` ``true`` on the
  ``U`` half of a key-changing update, ``false`` otherwise.
* An update whose replica identity values changed (pgoutput's ``K``/``O`` old tuple differs from
  the new tuple in a key column) is two rows: ``D`` of the old identity at seq n, then ``U`` of
  the new row at seq n + 1 with ``_pgsnow_key_moved`` true. Under ``REPLICA IDENTITY FULL``
  every column is part of the identity, so every update that changes a value is written so.
* A delete carries the old identity (key columns, NULL elsewhere; the whole row under FULL).
* A truncate is one ``T`` row per truncated table, every table column NULL.

A ``Relation`` message with a different column list (schema drift) starts a new segment for the
table, and one with another name (a rename) a segment of the table so named, if it is one of
``tables``; ``DrainedStream.segments`` are in the order they were started, so a table's segments are
in commit order. Tables not in ``tables`` are skipped. Rows go to disk as they arrive (a buffered
file per segment, at most ``MAX_OPEN_SPILL_FILES`` open at once); nothing per transaction is kept in
memory but counters and file offsets, so memory is bounded whatever the transaction size and the
number of tables. Inserts, updates and deletes go from the payload's bytes to the spill without
decoding their text (a tuple reader compiled per column list, ``staged_text.compile_tuple_reader``,
or ``protocol.tuple_csv`` / ``tuple_bytes``); the other messages through ``decode_message``.
``on_final`` reports each committed row boundary of a staged-text spill (the drain compresses
up to it during the read: ``pgsnow.cdc.spilled_csv``).

**Never confirming.** The reader never sends a flush position: the drain confirms ``end_lsn``
(``ReplicationSession.confirm``) only after the staged files and manifests are durable in S3.
psycopg2 sends status updates by itself (every ``status_interval`` and whenever the server asks
for a reply) carrying its own ``flush_lsn``, and it moves that ``flush_lsn`` forward to a
keep-alive's ``wal_end`` only while no XLogData message has been received since the last explicit
flush (psycopg2 #913/#943). In this session that can happen only before the first data message,
and is harmless then: the walsender's keep-alive ``wal_end`` is the end of the WAL it has decoded
and sent, and the stream is ordered, so a keep-alive received before any data covers only WAL whose
transactions were not for us (other databases, unpublished tables, empty). Once a data message
has arrived, psycopg2's flush position stays where it was until ``confirm``. The status interval
is long (``STATUS_INTERVAL_S``) and the server's replies to its own keep-alive requests keep the
connection alive while reading; ``keep_alive`` sends a status update without moving anything for
the drain's staging phase (past ``wal_sender_timeout``).

Errors: the slot active (another consumer; sqlstate 55006) is ``SlotBusyError`` (retryable: the
next scheduled run will try again); the slot missing or invalidated is ``pgsnow.cdc.slot``'s
``SlotLostError`` (permanent, naming the command that re-snapshots the affected tables), and a slot
that is not pgoutput's or is of another database a PermanentError (``pgsnow.cdc.slot.check_slot``,
the one owner of the slot's row).
"""

from __future__ import annotations

import contextlib
import select
import struct
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psycopg2
import psycopg2.errors
import psycopg2.extras

from pgsnow.cdc.protocol import (
    UNCHANGED,
    Begin,
    Commit,
    LogicalMessage,
    Relation,
    Truncate,
    Unchanged,
    decode_message,
    tuple_bytes,
    tuple_csv,
)
from pgsnow.cdc.slot import SlotHealth, SlotLostError, check_slot, slot_health
from pgsnow.cdc.staged_text import (
    CONVERTIBLE_PAYLOAD_BYTES,
    Converter,
    compile_tuple_reader,
    relation_converters,
    staged_fields,
    staged_values,
)
from pgsnow.changes import format_lsn, unchanged_text
from pgsnow.errors import PermanentError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.observability import logger
from pgsnow.postgres import APPLICATION_NAME, classify_pg_error

__all__ = [
    "HEARTBEAT_PREFIX",
    "DrainedStream",
    "ReplicationSession",
    "SlotBusyError",
    "SpilledChanges",
    "open_stream",
    "read_changes",
]

HEARTBEAT_PREFIX = "pgsnow.heartbeat"
# pgoutput's Insert, Update and Delete message tags ('I', 'U', 'D').
_ROW_CHANGE_TAGS = frozenset((0x49, 0x55, 0x44))
# How long closing a session waits for the server to release the slot (``ReplicationSession.close``).
RELEASE_WAIT_S = 10.0

# Session settings of the walsender, which runs the output functions: stable text for every type,
# parsed back by PostgreSQL itself when the drain converts the spilled values to the type contract.
REPLICATION_SESSION_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO,YMD -c extra_float_digits=3 -c IntervalStyle=postgres "
    "-c bytea_output=hex"
)
# psycopg2's periodic status update carries its own flush position; rare is better (module docstring).
STATUS_INTERVAL_S = 3600
# How long an idle wait for the next message lasts at most before the deadline is checked again.
_IDLE_WAIT_S = 1.0
# Spill files open at once, each with its write buffer: memory and file descriptors (Lambda allows
# 1,024) stay bounded whatever the number of tables; the least recently opened file is closed first
# and reopened where it was left when its table has rows again.
MAX_OPEN_SPILL_FILES = 64
_WRITE_BUFFER_BYTES = 256 * 1024
# A segment in staged text records a row boundary about every this many bytes: where staging may cut
# its files (``stage``: a file ends on a row, near EXTRACT_TARGET_FILE_MB) without reading the rows.
CUT_EVERY_BYTES = 1 << 20
_u32 = struct.Struct("!I").unpack_from
RawValues = list[bytes | Unchanged | None]
# on_final(spill path, relation, offset, rows): the staged-text spill's rows up to ``offset`` are
# committed and written out; they will not change (``pgsnow.cdc.spilled_csv.EarlyCompression``).
FinalRows = Callable[[Path, Relation, int, int], None]
_OBJECT_IN_USE = "55006"
_UNDEFINED_OBJECT = "42704"


class SlotBusyError(RetryableError):
    """The slot is active: another consumer is reading it (one consumer at a time)."""


@dataclass(frozen=True)
class SpilledChanges:
    """One table's changes under one relation shape, in commit order (format: module docstring)."""

    table: TableRef
    relation: Relation
    path: Path
    rows: int
    first_commit_lsn: int
    last_commit_lsn: int
    # Every value already in the staged CSV encoding (``pgsnow.cdc.staged_text``), or pgoutput's text.
    staged_text: bool = False
    # Row boundaries (byte offset, rows before it), increasing; the file's end is the last boundary.
    cuts: tuple[tuple[int, int], ...] = ()
    size: int = 0  # bytes


@dataclass(frozen=True)
class DrainedStream:
    start_lsn: int  # the slot's confirmed_flush_lsn when reading began
    end_lsn: int  # the position that is safe to confirm once the segments are durable
    stop_reason: str  # "heartbeat" | "bytes" | "deadline"
    segments: tuple[SpilledChanges, ...]
    transactions: int
    changes: int
    bytes_read: int
    last_heartbeat: str | None  # content of the last heartbeat message received (lag measure)


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class _SpillWriter:
    """One segment's spill file: rows appended as they arrive, cut back to the last commit on demand."""

    __slots__ = (
        "announced",
        "committed",
        "converters",
        "cuts",
        "file",
        "first",
        "key_indexes",
        "last",
        "ncolumns",
        "next_cut",
        "oid",
        "path",
        "pending",
        "read_tuple",
        "relation",
        "rows",
        "table",
        "unchanged_names",
        "written",
    )

    def __init__(
        self,
        oid: int,
        table: TableRef,
        relation: Relation,
        path: Path,
        converters: tuple[Converter, ...] | None,
    ) -> None:
        self.oid = oid  # the relation's: _StreamState.current[oid] is this segment while it is current
        self.table = table
        self.relation = relation
        self.converters = converters  # values in staged text (None: pgoutput's text)
        self.read_tuple = compile_tuple_reader(converters) if converters is not None else None
        self.cuts: list[tuple[int, int]] = []  # only in staged text (SpilledChanges.cuts)
        self.announced = 0  # how many of ``cuts`` were reported final (_StreamState.on_final)
        self.next_cut = CUT_EVERY_BYTES if converters is not None else 2**62
        self.ncolumns = len(relation.columns)
        self.key_indexes = tuple(i for i, c in enumerate(relation.columns) if c.is_key)
        self.unchanged_names: dict[tuple[int, ...], bytes] = {}  # _pgsnow_unchanged fields, by indexes
        self.path = path
        self.file: IO[bytes] | None = None  # open while in _StreamState.open_files
        self.written = 0  # bytes written (through the buffer)
        self.committed = 0  # bytes of whole committed transactions
        self.rows = 0  # committed rows
        self.pending = 0  # rows of the transaction in progress
        self.first = 0
        self.last = 0

    def staged_tuple(self, payload: bytes, pos: int) -> bytes | None:
        """The tuple at ``pos`` as staged fields by the compiled reader; None when the segment is in
        pgoutput's text, the message could hold a value over a size limit, or the general path
        must decide (an unchanged TOAST value, a value not staged as it is)."""
        if self.read_tuple is None or len(payload) > CONVERTIBLE_PAYLOAD_BYTES:
            return None
        staged = self.read_tuple(payload, pos)
        return None if staged is None else staged[0]

    def write(self, data: bytes) -> None:
        self.file.write(data)  # type: ignore[union-attr]  # _StreamState.writer opened it
        self.written += len(data)
        self.pending += 1
        if self.written >= self.next_cut:
            self.cut()

    def cut(self) -> None:
        """Record the row boundary at the end of what is written (once: a boundary recorded twice
        would make staging start a file there and leave it empty)."""
        if not self.cuts or self.cuts[-1][0] != self.written:
            self.cuts.append((self.written, self.rows + self.pending))
        self.next_cut = self.written + CUT_EVERY_BYTES

    def commit(self, commit_lsn: int) -> None:
        self.rows += self.pending
        self.pending = 0
        self.committed = self.written
        if not self.first:
            self.first = commit_lsn
        self.last = commit_lsn

    def open(self) -> None:
        """Create the file, or reopen it at the end of what was written (it was closed for others)."""
        self.file = self.path.open("r+b" if self.written else "wb", buffering=_WRITE_BUFFER_BYTES)
        self.file.seek(self.written)

    def discard_pending(self) -> None:
        """Cut the file back to its last committed transaction."""
        if self.file is None:
            self.open()
        assert self.file is not None
        self.file.flush()
        self.file.truncate(self.committed)
        self.file.seek(self.committed)
        self.written = self.committed
        self.pending = 0
        while self.cuts and self.cuts[-1][0] > self.committed:
            self.cuts.pop()
        if self.converters is not None:
            self.next_cut = (self.cuts[-1][0] if self.cuts else 0) + CUT_EVERY_BYTES

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def result(self) -> SpilledChanges:
        staged_text = self.converters is not None
        cuts = self.cuts if not self.cuts or self.cuts[-1][0] < self.written else self.cuts[:-1]
        return SpilledChanges(
            self.table,
            self.relation,
            self.path,
            self.rows,
            self.first,
            self.last,
            staged_text=staged_text,
            cuts=(*cuts, (self.written, self.rows)) if staged_text else (),
            size=self.written,
        )


class _StreamState:
    """What one read keeps: relations, open segments, the transaction's counters, totals."""

    def __init__(
        self,
        tables: Collection[TableRef],
        spill_dir: Path,
        *,
        staged_text: bool = True,
        on_final: FinalRows | None = None,
    ) -> None:
        self.wanted_names = {(t.schema, t.table): t for t in tables}
        self.spill_dir = spill_dir
        self.staged_text = staged_text
        self.on_final = on_final
        self.relations: dict[int, Relation] = {}
        self.wanted: dict[int, TableRef | None] = {}
        self.current: dict[int, _SpillWriter] = {}  # by relation oid: the segment rows go to
        self.segments: list[_SpillWriter] = []
        self.open_files: deque[_SpillWriter] = deque()  # writers with an open file, oldest first
        self.touched: dict[int, _SpillWriter] = {}  # segments written in the transaction (by id)
        self.in_transaction = False
        self.commit_lsn = 0
        self.head = b""  # b",<commit lsn>," for the rows of the transaction in progress
        self.committed_at = b""
        self.seq = 0
        self.transactions = 0
        self.changes = 0
        self.pending_changes = 0
        self.last_commit_end = 0

    # --- relations and segments ---

    def relation(self, message: Relation) -> None:
        self.relations[message.oid] = message
        table = self.wanted_names.get((message.namespace or "pg_catalog", message.name))
        self.wanted[message.oid] = table
        writer = self.current.get(message.oid)
        # Described again with the same name and columns (a cache invalidation): the segment goes on
        # as it is. A rename must not: the relation's rows now belong to the table of its new name
        # (or to none), even when the columns are the same (two tables swapped by renames).
        if writer is not None and (writer.table != table or writer.relation.columns != message.columns):
            del self.current[message.oid]  # schema drift (or a rename): the next row starts a new segment

    def writer(self, oid: int) -> _SpillWriter | None:
        writer = self.current.get(oid)
        if writer is None:
            table = self.wanted.get(oid)
            if table is None:
                if oid not in self.relations:
                    raise PermanentError(f"pgoutput sent a change of relation {oid} before describing it")
                return None
            relation = self.relations[oid]
            converters = relation_converters(relation.columns) if self.staged_text else None
            writer = self._new_segment(oid, table, relation, converters)
        if writer.file is None:
            if len(self.open_files) >= MAX_OPEN_SPILL_FILES:
                self.open_files.popleft().close()
            writer.open()
            self.open_files.append(writer)
        self.touched[id(writer)] = writer
        return writer

    def _new_segment(
        self, oid: int, table: TableRef, relation: Relation, converters: tuple[Converter, ...] | None
    ) -> _SpillWriter:
        path = self.spill_dir / f"{len(self.segments):05d}-{table.schema}.{table.table}.csv"
        writer = _SpillWriter(oid, table, relation, path, converters)
        self.segments.append(writer)
        self.current[oid] = writer
        return writer

    def plain_text(self, writer: _SpillWriter) -> _SpillWriter:
        """The table's segment in pgoutput's text from here on: a value of ``writer``'s is not staged
        as it is (``staged_text``), so the run takes the round trip through PostgreSQL (``stage``)."""
        oid = writer.oid
        writer.cut()  # its end: staging reads the segment up to here
        plain = self._new_segment(oid, writer.table, writer.relation, None)
        return self.writer(oid) or plain

    # --- transactions ---

    def begin(self, message: Begin) -> None:
        self.in_transaction = True
        self.commit_lsn = message.final_lsn
        self.head = b",%d," % message.final_lsn
        # The staged encoding of a timestamptz (``staged_text``), which PostgreSQL reads back too.
        self.committed_at = message.commit_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
        self.seq = 0

    def commit(self, message: Commit) -> None:
        if not self.in_transaction or message.commit_lsn != self.commit_lsn:
            raise PermanentError(
                f"pgoutput commit at {format_lsn(message.commit_lsn)} does not match its begin "
                f"({format_lsn(self.commit_lsn)})"
            )
        on_final = self.on_final
        for writer in self.touched.values():
            writer.commit(message.commit_lsn)
            if on_final is not None and len(writer.cuts) > writer.announced:
                self._announce(writer, on_final)
        self.touched.clear()
        self.in_transaction = False
        self.transactions += 1
        self.changes += self.pending_changes
        self.pending_changes = 0
        self.last_commit_end = message.end_lsn

    @staticmethod
    def _announce(writer: _SpillWriter, on_final: FinalRows) -> None:
        """Report the segment's new row boundaries of committed rows (all of them: at a commit every
        row written is committed), flushed so that another reader of the file sees them."""
        if writer.file is not None:
            writer.file.flush()
        for offset, rows in writer.cuts[writer.announced :]:
            on_final(writer.path, writer.relation, offset, rows)
        writer.announced = len(writer.cuts)

    def discard_transaction(self) -> None:
        """Drop the rows of the transaction in progress (the deadline came first)."""
        for writer in self.touched.values():
            writer.discard_pending()
        self.touched.clear()
        self.in_transaction = False
        self.pending_changes = 0

    # --- rows ---

    def write_row(
        self,
        writer: _SpillWriter,
        op: bytes,
        fields: bytes,
        count: int,
        *,
        unchanged: list[int] | None = None,
        moved: bool = False,
    ) -> None:
        """One spill row: the change columns, then ``fields`` (``count`` CSV fields of the table)."""
        columns = writer.relation.columns
        if count != len(columns):
            raise PermanentError(
                f"pgoutput sent {count} values for {len(columns)} columns", table=writer.table.qualified
            )
        self.seq += 1
        names = b""
        if unchanged:
            indexes = tuple(unchanged)
            names = writer.unchanged_names.get(indexes, b"")
            if not names:
                text = unchanged_text(columns[i].name for i in indexes)
                names = writer.unchanged_names[indexes] = _quoted(text).encode() if text else b""
        writer.write(
            b"%s%s%d,%s,%s,%s,%s\n"
            % (op, self.head, self.seq, self.committed_at, names, b"true" if moved else b"false", fields)
        )
        self.pending_changes += 1

    def _values_row(
        self, writer: _SpillWriter, op: bytes, values: RawValues, *, moved: bool = False, convertible: bool
    ) -> None:
        """A row from a tuple's values as bytes (``protocol.tuple_bytes``): an update with its old key or row."""
        converters = writer.converters
        if converters is not None:
            staged = staged_values(values, converters) if convertible else None
            if staged is not None:
                self.write_row(writer, op, staged[0], len(values), unchanged=staged[1], moved=moved)
                return
            writer = self.plain_text(writer)
        text = b",".join(
            [b'"' + v.replace(b'"', b'""') + b'"' if isinstance(v, bytes) else b"" for v in values]
        )
        unchanged = [i for i, v in enumerate(values) if v is UNCHANGED] or None
        self.write_row(writer, op, text, len(values), unchanged=unchanged, moved=moved)

    def _fields(
        self, writer: _SpillWriter, payload: bytes, pos: int
    ) -> tuple[_SpillWriter, bytes, int, list[int] | None]:
        """The tuple at ``pos`` as the writer's fields; the table's segment turns to pgoutput's text
        when a value is not staged as it is (the writer to use is returned)."""
        converters = writer.converters
        if converters is not None:
            staged = (
                staged_fields(payload, pos, converters) if len(payload) <= CONVERTIBLE_PAYLOAD_BYTES else None
            )
            if staged is not None:
                fields, count, unchanged, _ = staged
                return writer, fields, count, unchanged
            writer = self.plain_text(writer)
        fields, count, unchanged, _ = tuple_csv(payload, pos)
        return writer, fields, count, unchanged

    def new_tuple_payload(self, op: bytes, payload: bytes) -> None:
        """An insert, or an update that kept its identity (no old key or row): from the payload's
        bytes straight to the spill. The hot path of a stream, so it is one call per row: no message
        object, the common case written inline (what ``write_row`` does)."""
        oid = _u32(payload, 1)[0]
        writer = self.current.get(oid)
        if writer is None or writer.file is None:
            writer = self.writer(oid)
            if writer is None:
                return
        if not writer.pending:  # its first row of the transaction: commit or discard it with the rest
            self.touched[id(writer)] = writer
        staged = writer.staged_tuple(payload, 6)
        if staged is None:  # pgoutput's text, an unchanged TOAST value, or a value not staged as it is
            writer, fields, count, unchanged = self._fields(writer, payload, 6)
            if unchanged or count != writer.ncolumns:
                self.write_row(writer, op, fields, count, unchanged=unchanged)
                return
        else:
            fields = staged
        self.seq += 1
        data = b"%s%s%d,%s,,false,%s\n" % (op, self.head, self.seq, self.committed_at, fields)
        writer.file.write(data)  # type: ignore[union-attr]  # open: checked above
        writer.written += len(data)
        writer.pending += 1
        if writer.written >= writer.next_cut:
            writer.cut()
        self.pending_changes += 1

    def old_tuple_payload(self, payload: bytes) -> None:
        """A delete: its old key (or, under REPLICA IDENTITY FULL, old row) from the payload's bytes
        straight to the spill, as ``new_tuple_payload`` does for inserts."""
        if payload[5] not in (0x4B, 0x4F):  # 'K' or 'O'
            raise PermanentError(f"pgoutput delete: expected 'K' or 'O', got {payload[5:6]!r}")
        writer = self.writer(_u32(payload, 1)[0])
        if writer is None:
            return
        staged = writer.staged_tuple(payload, 6)
        if staged is not None:
            self.write_row(writer, b"D", staged, writer.ncolumns)
            return
        writer, fields, count, unchanged = self._fields(writer, payload, 6)
        if unchanged:  # pgoutput never sends an unchanged value in an old tuple
            raise PermanentError(
                "pgoutput delete with an unchanged TOAST value", table=writer.table.qualified
            )
        self.write_row(writer, b"D", fields, count)

    def update_payload(self, payload: bytes) -> None:
        """An update that carries its old key (the key changed) or, under REPLICA IDENTITY FULL, its
        old row: a key move is two rows, the old key's ``D`` then the new row's ``U`` (pgsnow.changes)."""
        writer = self.writer(_u32(payload, 1)[0])
        if writer is None:
            return
        old, pos = tuple_bytes(payload, 6)
        if payload[pos] != 0x4E:  # 'N'
            raise PermanentError(f"pgoutput update: expected 'N', got {payload[pos : pos + 1]!r}")
        new, _ = tuple_bytes(payload, pos + 1)
        convertible = len(payload) <= CONVERTIBLE_PAYLOAD_BYTES
        moved = len(old) == len(new) and any(
            new[i] is not UNCHANGED and new[i] != old[i] for i in writer.key_indexes
        )
        # Staged text straight from the payload (the compiled reader), when every value allows.
        new_fields = writer.staged_tuple(payload, pos + 1)
        old_fields = writer.staged_tuple(payload, 6) if moved and new_fields is not None else None
        if new_fields is not None and (old_fields is not None or not moved):
            if old_fields is not None:
                self.write_row(writer, b"D", old_fields, writer.ncolumns)
            self.write_row(writer, b"U", new_fields, writer.ncolumns, moved=moved)
            return
        if moved:
            # The row's identity changed: the old key goes, the new one arrives (pgsnow.changes).
            self._values_row(writer, b"D", old, convertible=convertible)
            self._values_row(self._segment_of(writer), b"U", new, moved=True, convertible=convertible)
            return
        self._values_row(writer, b"U", new, convertible=convertible)

    def _segment_of(self, writer: _SpillWriter) -> _SpillWriter:
        """The segment ``writer``'s table writes to now (``plain_text`` may have started another)."""
        return self.writer(writer.oid) or writer

    def truncate(self, message: Truncate) -> None:
        for oid in message.relation_oids:
            writer = self.writer(oid)
            if writer is not None:
                count = len(writer.relation.columns)
                self.write_row(writer, b"T", b"," * (count - 1) if count else b"", count)

    def finish(self) -> tuple[SpilledChanges, ...]:
        results = []
        for writer in self.segments:
            writer.close()
            if writer.rows:
                results.append(writer.result())
            else:  # started by the discarded transaction only
                writer.path.unlink(missing_ok=True)
        return tuple(results)

    def abandon(self) -> None:
        for writer in self.segments:
            with contextlib.suppress(OSError):
                writer.close()


class ReplicationSession:
    """An open replication stream of one slot: read it once, keep it alive, then confirm (the drain).

    Use as a context manager (or call ``close``). Closing without ``confirm`` leaves the slot where
    it was: the next session reads the same changes again.
    """

    def __init__(
        self,
        *,
        slot: str,
        publication: str,
        connection: Any,
        cursor: Any,
        control: Any,
        start_lsn: int,
        tables: Collection[TableRef] = (),
    ) -> None:
        self.slot = slot
        self.publication = publication
        self.tables = tuple(tables)  # named by SlotLostError should the slot be lost meanwhile
        self.start_lsn = start_lsn
        self.messages = 0  # messages received so far by ``read`` (progress measures)
        self.changes_read = 0  # of which insert, update, delete and truncate messages, of any table
        self._connection = connection
        self._cursor = cursor
        self._control = control  # a normal connection, to read the slot's row
        self._read = False

    def __enter__(self) -> ReplicationSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self, *, release_wait_s: float = RELEASE_WAIT_S) -> None:
        """Close the stream, then wait (bounded) until the server has let go of the slot: the
        walsender exits a moment after the connection closes, and until it has, the slot still
        shows active, so the next scheduled run would take it for another consumer and skip."""
        walsender: int | None = None
        with contextlib.suppress(psycopg2.Error):
            walsender = self._connection.get_backend_pid()
        for resource in (self._cursor, self._connection):
            with contextlib.suppress(psycopg2.Error):
                resource.close()
        try:
            deadline = time.monotonic() + release_wait_s
            while walsender is not None and time.monotonic() < deadline:
                if slot_health(self._control, self.slot).active_pid != walsender:
                    break
                time.sleep(0.02)
        except psycopg2.Error:
            pass  # the control connection is gone too: nothing to wait with
        finally:
            with contextlib.suppress(psycopg2.Error):
                self._control.close()

    def read(
        self,
        *,
        heartbeat_lsn: int | None,
        tables: Collection[TableRef],
        max_bytes: int,
        deadline: float,
        spill_dir: Path,
        heartbeat_prefix: str = HEARTBEAT_PREFIX,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_commit_lsn: int | None = None,
        staged_text: bool = True,
        on_final: FinalRows | None = None,
    ) -> DrainedStream:
        """Read the stream into ``spill_dir`` until the heartbeat, the byte budget or the deadline
        (``clock()`` is ``time.monotonic`` unless a test passes its own; see the module docstring).

        ``heartbeat_commit_lsn``: a heartbeat *table* (CDC_HEARTBEAT=table) ends the read at the first
        commit at or after this position (taken inside the heartbeat's transaction, before it committed).

        ``staged_text``: a table whose every column is of a type ``pgsnow.cdc.staged_text`` converts
        is spilled in the staged encoding (the drain); off, every value stays pgoutput's text (the
        tests compare the two). ``on_final``: called (on this thread) with each row boundary of a
        staged-text spill once the rows before it are committed."""
        if self._read:
            raise PermanentError("a replication session is read once; open a new one to read again")
        self._read = True
        spill_dir.mkdir(parents=True, exist_ok=True)
        state = _StreamState(tables, spill_dir, staged_text=staged_text, on_final=on_final)
        cursor = self._cursor
        bytes_read = 0
        last_heartbeat: str | None = None
        heartbeat_reached = 0  # the LSN of the heartbeat that ends the read, once received
        stop_reason = ""
        end_lsn = self.start_lsn
        try:
            while True:
                if clock() >= deadline:
                    stop_reason = "deadline"
                    if state.in_transaction:
                        state.discard_transaction()
                    end_lsn = max(self.start_lsn, state.last_commit_end)
                    break
                try:
                    received = cursor.read_message()
                    if received is None:
                        select.select(
                            [self._connection], [], [], max(0.0, min(_IDLE_WAIT_S, deadline - clock()))
                        )
                        continue
                except psycopg2.Error as exc:
                    raise classify_pg_error(exc) from exc
                self.messages += 1
                payload = received.payload
                bytes_read += len(payload)
                tag = payload[0] if payload else 0
                # Row changes, the bulk of a stream: from payload bytes to the spill, not decoded.
                if tag in _ROW_CHANGE_TAGS:
                    self.changes_read += 1
                    try:
                        if tag == 0x44:  # 'D': the old key (or row)
                            state.old_tuple_payload(payload)
                        elif payload[5:6] == b"N":  # 'I', or a 'U' that keeps its identity: the new tuple
                            state.new_tuple_payload(b"I" if tag == 0x49 else b"U", payload)
                        elif tag == 0x55:  # 'U' with the old key or row first
                            state.update_payload(payload)
                        else:
                            raise PermanentError(f"pgoutput insert of {len(payload)} bytes has no new tuple")
                    except (struct.error, IndexError) as exc:
                        raise PermanentError(
                            f"pgoutput message of {len(payload)} bytes is malformed: {exc}"
                        ) from exc
                    continue
                message = decode_message(payload)
                if isinstance(message, Begin):
                    state.begin(message)
                elif isinstance(message, Commit):
                    state.commit(message)
                    if heartbeat_reached:
                        stop_reason, end_lsn = "heartbeat", max(heartbeat_reached, state.last_commit_end)
                        break
                    if heartbeat_commit_lsn is not None and message.commit_lsn >= heartbeat_commit_lsn:
                        # A heartbeat table's row (CDC_HEARTBEAT=table): its transaction commits at or
                        # after the bound, and every transaction that committed before it is received.
                        stop_reason, end_lsn = "heartbeat", state.last_commit_end
                        break
                    if bytes_read >= max_bytes:
                        stop_reason, end_lsn = "bytes", state.last_commit_end
                        break
                elif isinstance(message, Relation):
                    state.relation(message)
                elif isinstance(message, Truncate):
                    self.changes_read += 1
                    state.truncate(message)
                elif isinstance(message, LogicalMessage) and message.prefix == heartbeat_prefix:
                    last_heartbeat = message.content.decode(errors="replace")
                    if heartbeat_lsn is not None and message.lsn >= heartbeat_lsn:
                        heartbeat_reached = message.lsn
                        # The drain's heartbeat is transactional (its commit flushes the WAL at once, so
                        # the walsender sends it without waiting for the WAL writer): stop at its commit.
                        # A non-transactional one arrives between transactions and ends the read here.
                        if not state.in_transaction:
                            stop_reason, end_lsn = "heartbeat", max(message.lsn, state.last_commit_end)
                            break
                # Origin and Type messages describe nothing the spill needs.
            segments = state.finish()
        except BaseException:
            state.abandon()
            raise
        stream = DrainedStream(
            start_lsn=self.start_lsn,
            end_lsn=end_lsn,
            stop_reason=stop_reason,
            segments=segments,
            transactions=state.transactions,
            changes=state.changes,
            bytes_read=bytes_read,
            last_heartbeat=last_heartbeat,
        )
        logger.info(
            "change capture: slot read",
            extra={
                "slot": self.slot,
                "start_lsn": format_lsn(stream.start_lsn),
                "end_lsn": format_lsn(stream.end_lsn),
                "stop_reason": stop_reason,
                "transactions": stream.transactions,
                "rows": stream.changes,
                "bytes": bytes_read,
                "segments": len(segments),
            },
        )
        return stream

    def keep_alive(self) -> None:
        """Send a status update that moves nothing (psycopg2 sends its own flush position, which no
        data message has moved: module docstring), so the server does not time the session out."""
        try:
            self._cursor.send_feedback(force=True)
        except psycopg2.Error as exc:
            raise classify_pg_error(exc) from exc

    def confirm(self, lsn: int, *, wait_s: float = 30.0) -> int:
        """Confirm ``lsn`` to the slot (the WAL before it may go) and wait until the server shows it;
        returns the slot's confirmed_flush_lsn. Only the drain calls this, once the run is durable."""
        if lsn < self.start_lsn:
            raise PermanentError(
                f"cannot confirm {format_lsn(lsn)} before the slot's position {format_lsn(self.start_lsn)} "
                f"(slot {self.slot})"
            )
        try:
            self._cursor.send_feedback(flush_lsn=lsn, reply=True, force=True)
        except psycopg2.Error as exc:
            raise classify_pg_error(exc) from exc
        give_up = time.monotonic() + wait_s
        while True:
            confirmed = _confirmed_lsn(check_slot(self._control, self.slot, self.tables), self.tables)
            if confirmed >= lsn:
                return int(confirmed)
            if time.monotonic() >= give_up:
                raise RetryableError(
                    f"slot {self.slot} shows {format_lsn(confirmed)} {wait_s:g} s after confirming {format_lsn(lsn)}"
                )
            time.sleep(0.05)


def _confirmed_lsn(health: SlotHealth, tables: Collection[TableRef]) -> int:
    # check_slot refuses a logical slot without a confirmed position as lost: this is the type's guard.
    if health.confirmed_flush_lsn is None:
        raise SlotLostError(health, tables)
    return health.confirmed_flush_lsn


def _publication_names(publication: str) -> str:
    # pgoutput splits publication_names as a list of identifiers: quote ours so case and commas survive.
    return '"' + publication.replace('"', '""') + '"'


def open_stream(
    dsn: str, *, slot: str, publication: str, tables: Collection[TableRef] = ()
) -> ReplicationSession:
    """Start streaming ``slot`` (pgoutput, protocol 1) from its confirmed position. ``tables`` (the
    slot's CDC tables) are named, with the command that re-snapshots them, should the slot be lost."""
    try:
        control = psycopg2.connect(dsn, application_name=APPLICATION_NAME)
        control.autocommit = True
    except psycopg2.Error as exc:
        raise classify_pg_error(exc) from exc
    connection = cursor = None
    try:
        if check_slot(control, slot, tables).active_pid is not None:
            raise SlotBusyError(f"replication slot {slot!r} is active: another consumer is reading it")
        try:
            connection = psycopg2.connect(
                dsn,
                connection_factory=psycopg2.extras.LogicalReplicationConnection,
                application_name=f"{APPLICATION_NAME}-cdc",
                client_encoding="UTF8",  # the server converts text values to it: the spill is UTF-8
                options=REPLICATION_SESSION_OPTIONS,
            )
            cursor = connection.cursor()
            cursor.start_replication(
                slot_name=slot,
                decode=False,
                status_interval=STATUS_INTERVAL_S,
                options={
                    "proto_version": "1",
                    "publication_names": _publication_names(publication),
                    "messages": "true",
                },
            )
        except psycopg2.Error as exc:
            code = getattr(exc, "pgcode", None)
            if code == _OBJECT_IN_USE:
                raise SlotBusyError(
                    f"replication slot {slot!r} is active: another consumer is reading it", sqlstate=code
                ) from exc
            if code == _UNDEFINED_OBJECT:
                # Dropped between the check and the start (a failover, an operator).
                raise SlotLostError(SlotHealth(slot=slot, exists=False), tables) from exc
            raise classify_pg_error(exc) from exc
        # The slot is ours now, so its confirmed position cannot move but by us: read it back.
        start_lsn = _confirmed_lsn(check_slot(control, slot, tables), tables)
    except BaseException:
        for resource in (cursor, connection, control):
            if resource is not None:
                with contextlib.suppress(psycopg2.Error):
                    resource.close()
        raise
    return ReplicationSession(
        slot=slot,
        publication=publication,
        connection=connection,
        cursor=cursor,
        control=control,
        start_lsn=start_lsn,
        tables=tables,
    )


def read_changes(
    dsn: str,
    *,
    slot: str,
    publication: str,
    heartbeat_lsn: int | None,
    tables: Collection[TableRef],
    max_bytes: int,
    deadline: float,
    spill_dir: Path,
    heartbeat_prefix: str = HEARTBEAT_PREFIX,
    heartbeat_commit_lsn: int | None = None,
    staged_text: bool = True,
    on_final: FinalRows | None = None,
) -> DrainedStream:
    """Open the stream, read it once, close it without confirming (tests, and a dry read)."""
    with open_stream(dsn, slot=slot, publication=publication, tables=tables) as session:
        return session.read(
            heartbeat_lsn=heartbeat_lsn,
            tables=tables,
            max_bytes=max_bytes,
            deadline=deadline,
            spill_dir=spill_dir,
            heartbeat_prefix=heartbeat_prefix,
            heartbeat_commit_lsn=heartbeat_commit_lsn,
            staged_text=staged_text,
            on_final=on_final,
        )
