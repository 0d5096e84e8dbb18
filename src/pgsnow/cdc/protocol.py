"""A decoder for PostgreSQL's ``pgoutput`` logical replication messages, protocol version 1.

The specification is PostgreSQL's "Logical Replication Message Formats" (protocol chapter). The
drain asks for ``proto_version '1'`` and text values (never ``binary 'true'``), so every column
value is one of:

* ``'t'``: a text value, decoded from UTF-8 (the replication connection's client encoding) to
  ``str``; ``""`` stays ``""``.
* ``'n'``: NULL, decoded to ``None``.
* ``'u'``: an unchanged TOASTed value the server did not send, decoded to the ``UNCHANGED``
  sentinel. It only appears in the new tuple of an update and means "the row keeps its current
  value", never NULL.
* ``'b'``: a binary value; we never ask for it, so it is a ``PermanentError`` naming it.

Version 1 has no streamed (in-progress) transactions: the server sends a transaction only once it
has committed, whole, as ``Begin``, its changes (and ``Relation``/``Type`` messages describing
relations and types before their first use in the session), ``Commit``. Non-transactional logical
decoding messages (``pg_logical_emit_message(false, ...)``) arrive between transactions.

``decode_message(payload)`` is the one entry point. It is on the drain's hot path (every row of
every change passes through it), so it reads with precompiled ``struct`` unpackers at offsets into
the payload and builds each value with a single slice-and-decode.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from pgsnow.errors import PermanentError

__all__ = [
    "UNCHANGED",
    "Begin",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Origin",
    "PgOutputMessage",
    "Relation",
    "RelationColumn",
    "Truncate",
    "TupleValues",
    "TypeMessage",
    "Unchanged",
    "Update",
    "decode_message",
    "pg_timestamp",
    "tuple_bytes",
    "tuple_csv",
]


class Unchanged:
    """The type of ``UNCHANGED``: pgoutput's ``'u'``, an unchanged TOASTed value that was not sent."""

    __slots__ = ()
    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()

TupleValues = tuple[str | Unchanged | None, ...]

# PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def pg_timestamp(microseconds: int) -> datetime:
    """A PostgreSQL ``TimestampTz`` (microseconds since 2000-01-01 UTC) as an aware UTC datetime."""
    return _PG_EPOCH + timedelta(microseconds=microseconds)


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # the LSN of the transaction's commit record (= Commit.commit_lsn)
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int  # the LSN of the commit record
    end_lsn: int  # the end of the commit record: confirming it skips this transaction next time
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool  # part of the replica identity (every column under REPLICA IDENTITY FULL)


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str  # "" means pg_catalog (the protocol's spelling)
    name: str
    replica_identity: str  # pg_class.relreplident: d(efault), n(othing), f(ull), i(ndex)
    columns: tuple[RelationColumn, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True, slots=True)
class TypeMessage:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: TupleValues


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    key: TupleValues | None  # 'K': the old replica identity (other columns None)
    old: TupleValues | None  # 'O': the whole old row (REPLICA IDENTITY FULL)
    new: TupleValues


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    key: TupleValues | None
    old: TupleValues | None


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int  # the end of the message's WAL record (what pg_logical_emit_message returned)
    prefix: str
    content: bytes


PgOutputMessage = (
    Begin | Commit | Origin | Relation | TypeMessage | Insert | Update | Delete | Truncate | LogicalMessage
)

_u8 = struct.Struct("!B").unpack_from
_i16 = struct.Struct("!h").unpack_from
_i32 = struct.Struct("!i").unpack_from
_u32 = struct.Struct("!I").unpack_from
_begin = struct.Struct("!QqI").unpack_from
_commit = struct.Struct("!BQQq").unpack_from
_message_head = struct.Struct("!BQ").unpack_from
_truncate_head = struct.Struct("!iB").unpack_from
_column_tail = struct.Struct("!Ii").unpack_from

_TRUNCATE_CASCADE, _TRUNCATE_RESTART_IDENTITY = 1, 2


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated string at ``pos`` and the offset after its terminator."""
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode(), end + 1


def _tuple_data(buf: bytes, pos: int) -> tuple[TupleValues, int]:
    """A TupleData part at ``pos``: its values (text decoded) and the offset after it."""
    values, pos = tuple_bytes(buf, pos)
    return tuple(v.decode() if isinstance(v, bytes) else v for v in values), pos


def tuple_bytes(buf: bytes, pos: int) -> tuple[list[bytes | Unchanged | None], int]:
    """A TupleData part at ``pos`` with its text values left as the bytes the server sent (the
    drain converts or quotes them without decoding); NULL is None, unchanged TOAST ``UNCHANGED``."""
    (count,) = _i16(buf, pos)
    pos += 2
    values: list[bytes | Unchanged | None] = []
    append = values.append
    for index in range(count):
        kind = buf[pos]
        if kind == 0x74:  # 't'
            start = pos + 5
            pos = start + _i32(buf, pos + 1)[0]
            append(buf[start:pos])
        elif kind == 0x6E:  # 'n'
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u'
            append(UNCHANGED)
            pos += 1
        else:
            raise _value_kind_error(kind, index)
    if pos > len(buf):
        raise PermanentError("pgoutput tuple data is cut short")
    return values, pos


def _value_kind_error(kind: int, index: int) -> PermanentError:
    """The refusal of a TupleData value that is neither text, NULL nor unchanged TOAST (both readers)."""
    if kind == 0x62:  # 'b': only sent when binary output is asked for, which the drain never does
        return PermanentError(
            f"pgoutput sent a binary value (column {index + 1}); the drain asks for text values only"
        )
    return PermanentError(f"pgoutput tuple data: unknown value kind {kind:#x} (column {index + 1})")


def tuple_csv(buf: bytes, pos: int) -> tuple[bytes, int, list[int] | None, int]:
    """A TupleData part at ``pos`` straight to PostgreSQL COPY CSV fields, without decoding the text.

    Returns the comma-joined fields (a text value quoted with its quotes doubled; NULL and an
    unchanged TOASTed value as an unquoted empty field), the number of columns, the indexes of the
    unchanged ('u') columns (None when there are none) and the offset after the part. The values
    stay the bytes the server sent (UTF-8: the replication connection's client encoding), which
    spares a decode and an encode per value on the drain's hot path.
    """
    (count,) = _i16(buf, pos)
    pos += 2
    fields: list[bytes] = []
    append = fields.append
    unchanged: list[int] | None = None
    for index in range(count):
        kind = buf[pos]
        if kind == 0x74:  # 't'
            start = pos + 5
            pos = start + _i32(buf, pos + 1)[0]
            append(b'"' + buf[start:pos].replace(b'"', b'""') + b'"')
        elif kind == 0x6E:  # 'n'
            append(b"")
            pos += 1
        elif kind == 0x75:  # 'u'
            append(b"")
            pos += 1
            if unchanged is None:
                unchanged = []
            unchanged.append(index)
        else:
            raise _value_kind_error(kind, index)
    if pos > len(buf):
        raise PermanentError("pgoutput tuple data is cut short")
    return b",".join(fields), count, unchanged, pos


def _insert(buf: bytes) -> Insert:
    (oid,) = _u32(buf, 1)
    if buf[5] != 0x4E:  # 'N'
        raise PermanentError(f"pgoutput insert: expected 'N', got {buf[5:6]!r}")
    new, _ = _tuple_data(buf, 6)
    return Insert(oid, new)


def _update(buf: bytes) -> Update:
    (oid,) = _u32(buf, 1)
    pos = 5
    key = old = None
    part = buf[pos]
    if part == 0x4B:  # 'K'
        key, pos = _tuple_data(buf, pos + 1)
        part = buf[pos]
    elif part == 0x4F:  # 'O'
        old, pos = _tuple_data(buf, pos + 1)
        part = buf[pos]
    if part != 0x4E:  # 'N'
        raise PermanentError(f"pgoutput update: expected 'N', got {bytes([part])!r}")
    new, _ = _tuple_data(buf, pos + 1)
    return Update(oid, key, old, new)


def _delete(buf: bytes) -> Delete:
    (oid,) = _u32(buf, 1)
    part = buf[5]
    values, _ = _tuple_data(buf, 6)
    if part == 0x4B:
        return Delete(oid, values, None)
    if part == 0x4F:
        return Delete(oid, None, values)
    raise PermanentError(f"pgoutput delete: expected 'K' or 'O', got {bytes([part])!r}")


def _begin_message(buf: bytes) -> Begin:
    final_lsn, commit_time, xid = _begin(buf, 1)
    return Begin(final_lsn, pg_timestamp(commit_time), xid)


def _commit_message(buf: bytes) -> Commit:
    _flags, commit_lsn, end_lsn, commit_time = _commit(buf, 1)
    return Commit(commit_lsn, end_lsn, pg_timestamp(commit_time))


def _relation(buf: bytes) -> Relation:
    (oid,) = _u32(buf, 1)
    namespace, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    identity = chr(buf[pos])
    (count,) = _i16(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column, pos = _cstring(buf, pos + 1)
        type_oid, typmod = _column_tail(buf, pos)
        pos += 8
        columns.append(RelationColumn(column, type_oid, typmod, bool(flags & 1)))
    return Relation(oid, namespace, name, identity, tuple(columns))


def _type(buf: bytes) -> TypeMessage:
    (oid,) = _u32(buf, 1)
    namespace, pos = _cstring(buf, 5)
    name, _ = _cstring(buf, pos)
    return TypeMessage(oid, namespace, name)


def _origin(buf: bytes) -> Origin:
    (lsn,) = struct.unpack_from("!Q", buf, 1)
    name, _ = _cstring(buf, 9)
    return Origin(lsn, name)


def _truncate(buf: bytes) -> Truncate:
    count, options = _truncate_head(buf, 1)
    oids = struct.unpack_from(f"!{count}I", buf, 6)
    return Truncate(
        tuple(oids), bool(options & _TRUNCATE_CASCADE), bool(options & _TRUNCATE_RESTART_IDENTITY)
    )


def _logical_message(buf: bytes) -> LogicalMessage:
    flags, lsn = _message_head(buf, 1)
    prefix, pos = _cstring(buf, 10)
    (length,) = _i32(buf, pos)
    start = pos + 4
    content = buf[start : start + length]
    if len(content) != length:
        raise PermanentError("pgoutput logical message is cut short")
    return LogicalMessage(bool(flags & 1), lsn, prefix, content)


_DECODERS: dict[int, Callable[[bytes], PgOutputMessage]] = {
    0x49: _insert,  # 'I'
    0x55: _update,  # 'U'
    0x44: _delete,  # 'D'
    0x42: _begin_message,  # 'B'
    0x43: _commit_message,  # 'C'
    0x52: _relation,  # 'R'
    0x59: _type,  # 'Y'
    0x4F: _origin,  # 'O'
    0x54: _truncate,  # 'T'
    0x4D: _logical_message,  # 'M'
}


def decode_message(payload: bytes) -> PgOutputMessage:
    """Decode one pgoutput (protocol 1) message: the payload of one XLogData message."""
    try:
        tag = payload[0]
        if tag == 0x49 and payload[5] == 0x4E:  # 'I' ... 'N': the most common message, inline
            return Insert(_u32(payload, 1)[0], _tuple_data(payload, 6)[0])
        decoder = _DECODERS.get(tag)
        if decoder is not None:
            return decoder(payload)
    except (struct.error, IndexError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        kind = payload[:1].decode("latin-1")
        raise PermanentError(
            f"pgoutput {kind!r} message of {len(payload)} bytes is malformed: {exc}"
        ) from exc
    raise PermanentError(
        f"pgoutput message type {payload[:1]!r} is not part of protocol version 1 "
        "(streamed or two-phase transactions need a higher version, which the drain does not ask for)"
    )
