"""The change-capture contract: what a change file holds and how a table's change runs chain.

The drain (``pgsnow.cdc``) writes it, the loader's apply (``pgsnow.load.changes``) reads it; this
module is the one place both take it from (docs/change-capture.md).

**A change file** is a staged data file (CSV gzip or Parquet, the same type contract as a table's
rows: docs/architecture.md) whose columns are ``CHANGE_COLUMNS`` followed by the table's columns as
PostgreSQL's relation message named them at the time of the change:

* ``_pgsnow_op``: ``I`` insert, ``U`` update, ``D`` delete, ``T`` truncate. A delete carries the
  old primary key in the key columns and NULL elsewhere (the replica identity's columns, all of
  them under ``REPLICA IDENTITY FULL``); a truncate carries NULL in every table column.
* ``_pgsnow_lsn``: the commit LSN of the change's transaction, as an unsigned 64-bit integer
  (PostgreSQL's ``pg_lsn`` ``X/Y`` is ``X * 2**32 + Y``).
* ``_pgsnow_seq``: the change's place in its transaction, from 1; a row's newest change is the one
  with the greatest ``(_pgsnow_lsn, _pgsnow_seq)``.
* ``_pgsnow_committed_at``: the transaction's commit time (UTC).
* ``_pgsnow_unchanged``: NULL, or a JSON array of the PostgreSQL names of the columns whose values
  pgoutput did not send because they are unchanged TOASTed values (their fields are NULL in the
  file and mean "keep the current value", never NULL).
* ``_pgsnow_key_moved``: true on the update that gave a row a new primary key. The drain writes it
  as two changes: ``D`` of the old key at seq n, then this ``U`` of the new key at seq n + 1, so an
  unchanged TOASTed value of the moved row is found on the old key.

Rows of a file are written in ``(_pgsnow_lsn, _pgsnow_seq)`` order, but the apply orders by those
columns itself and never relies on a file's order; a transaction is never split between runs (the
drain cuts only at commits).

**Chaining.** Each change run of a table has a manifest of mode ``cdc`` with a ``ChangeRange``
of two positions in the WAL, as the slot counts them: ``end_lsn`` is the position the drain
confirms to the slot (the end of the last commit record it read), and a position P is past a
transaction when its commit LSN (where its commit record starts) is before P. So a run holds every
change whose commit LSN is at or after ``after_lsn`` and before ``end_lsn``; the first transaction
of the next run may commit exactly at ``end_lsn`` (its commit record follows the run's last one).
``after_lsn`` is the ``end_lsn`` of the table's previous change run (0 for its first), so a
table's change runs chain without a gap whatever other tables did in between. The loader keeps
per table the position it has applied through and applies a run when ``after_lsn <= applied <
end_lsn`` (only changes whose commit LSN is at or after ``applied``), in run order; a run with
``end_lsn <= applied`` (delivered twice, or re-drained after a run that died before confirming)
changes nothing.

A table's snapshot (its first full run, replace) carries ``ChangeRange.snapshot_lsn``: the
snapshot holds every change committed at or before it, and applying starts there (a change
committed exactly at it is applied again, which changes nothing)
(docs/guarantees.md, "Change capture").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pgsnow.errors import PermanentError

OP_COLUMN = "_pgsnow_op"
LSN_COLUMN = "_pgsnow_lsn"
SEQ_COLUMN = "_pgsnow_seq"
COMMITTED_AT_COLUMN = "_pgsnow_committed_at"
UNCHANGED_COLUMN = "_pgsnow_unchanged"
KEY_MOVED_COLUMN = "_pgsnow_key_moved"

CHANGE_COLUMNS = (OP_COLUMN, LSN_COLUMN, SEQ_COLUMN, COMMITTED_AT_COLUMN, UNCHANGED_COLUMN, KEY_MOVED_COLUMN)
# The PostgreSQL types the change columns are staged as (the type contract maps them like any column).
CHANGE_COLUMN_TYPES = {
    OP_COLUMN: "text",
    LSN_COLUMN: "numeric(20,0)",
    SEQ_COLUMN: "bigint",
    COMMITTED_AT_COLUMN: "timestamp with time zone",
    UNCHANGED_COLUMN: "text",
    KEY_MOVED_COLUMN: "boolean",
}

MAX_LSN = 2**64 - 1


class Operation(StrEnum):
    INSERT = "I"
    UPDATE = "U"
    DELETE = "D"
    TRUNCATE = "T"


def parse_lsn(text: str) -> int:
    """``pg_lsn`` text (``16/B374D848``) as an integer."""
    high, sep, low = text.strip().partition("/")
    try:
        if not sep:
            raise ValueError(text)
        value = (int(high, 16) << 32) | int(low, 16)
    except ValueError as exc:
        raise PermanentError(f"not a pg_lsn: {text!r}") from exc
    if not 0 <= value <= MAX_LSN or int(low, 16) >= 2**32:
        raise PermanentError(f"not a pg_lsn: {text!r}")
    return value


def format_lsn(value: int) -> str:
    """An integer LSN as PostgreSQL writes it (``16/B374D848``)."""
    if not 0 <= value <= MAX_LSN:
        raise PermanentError(f"not an LSN: {value!r}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def unchanged_text(columns: Iterable[str]) -> str | None:
    """The ``_pgsnow_unchanged`` field for these column names (None when there are none)."""
    names = list(columns)
    return json.dumps(names, separators=(",", ":")) if names else None


def unchanged_columns(text: str | None) -> tuple[str, ...]:
    """The column names of a ``_pgsnow_unchanged`` field."""
    if not text:
        return ()
    names = json.loads(text)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PermanentError(f"{UNCHANGED_COLUMN} must be a JSON array of column names, got {text!r}")
    return tuple(names)


@dataclass(frozen=True)
class ChangeRange:
    """Where a manifest sits in its slot's stream (docs/change-capture.md).

    A change run (manifest mode ``cdc``): its changes' commit LSNs are in ``[after_lsn, end_lsn)``
    (positions the slot confirms: "Chaining" above), and
    ``first_commit_lsn``/``last_commit_lsn`` are the first and last commit it holds (None when
    it holds none). A snapshot (mode ``full``): ``snapshot_lsn`` is the position it is complete
    through; ``after_lsn``/``end_lsn`` are then both that position.
    """

    slot: str
    after_lsn: int
    end_lsn: int
    first_commit_lsn: int | None = None
    last_commit_lsn: int | None = None
    snapshot_lsn: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.after_lsn <= self.end_lsn <= MAX_LSN:
            raise PermanentError(f"change range after {self.after_lsn} end {self.end_lsn} is not a range")

    @property
    def is_snapshot(self) -> bool:
        return self.snapshot_lsn is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "after_lsn": format_lsn(self.after_lsn),
            "end_lsn": format_lsn(self.end_lsn),
            "first_commit_lsn": None if self.first_commit_lsn is None else format_lsn(self.first_commit_lsn),
            "last_commit_lsn": None if self.last_commit_lsn is None else format_lsn(self.last_commit_lsn),
            "snapshot_lsn": None if self.snapshot_lsn is None else format_lsn(self.snapshot_lsn),
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ChangeRange:
        def lsn(name: str) -> int | None:
            value = body.get(name)
            return None if value is None else parse_lsn(str(value))

        after, end = lsn("after_lsn"), lsn("end_lsn")
        if after is None or end is None:
            raise PermanentError("a change range needs after_lsn and end_lsn")
        return cls(
            slot=str(body["slot"]),
            after_lsn=after,
            end_lsn=end,
            first_commit_lsn=lsn("first_commit_lsn"),
            last_commit_lsn=lsn("last_commit_lsn"),
            snapshot_lsn=lsn("snapshot_lsn"),
        )
