"""pgsnow.cdc.protocol on hand-built pgoutput (protocol 1) messages, one per message type, built from
the field layout of PostgreSQL's "Logical Replication Message Formats". The same decoder on bytes a
real slot produced is in tests/integration/cdc/test_reader.py (it needs the server)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from pgsnow.cdc.protocol import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    RelationColumn,
    Truncate,
    TypeMessage,
    Update,
    decode_message,
    tuple_csv,
)
from pgsnow.errors import PermanentError

pytestmark = pytest.mark.unit

# 2026-12-07 07:00:00.123456 UTC in microseconds since 2000-01-01 UTC.
COMMIT_TIME = datetime(2026, 12, 7, 7, 0, 0, 123456, tzinfo=UTC)
PG_MICROS = int((COMMIT_TIME - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds()) * 1_000_000 + 123456


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(*values: object) -> bytes:
    out = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED:
            out.append(b"u")
        elif isinstance(value, bytes):  # a binary value
            out.append(b"b" + struct.pack("!i", len(value)) + value)
        else:
            data = str(value).encode()
            out.append(b"t" + struct.pack("!i", len(data)) + data)
    return b"".join(out)


def test_begin_and_commit() -> None:
    begin = decode_message(b"B" + struct.pack("!QqI", 0x16_B374D848, PG_MICROS, 4242))
    assert begin == Begin(final_lsn=0x16_B374D848, commit_time=COMMIT_TIME, xid=4242)
    commit = decode_message(b"C" + struct.pack("!BQQq", 0, 0x16_B374D848, 0x16_B374D880, PG_MICROS))
    assert commit == Commit(commit_lsn=0x16_B374D848, end_lsn=0x16_B374D880, commit_time=COMMIT_TIME)
    assert commit.commit_time.tzinfo is UTC


def test_relation_with_key_flags_and_typmods() -> None:
    payload = (
        b"R"
        + struct.pack("!I", 16384)
        + cstring("shop")
        + cstring("Order Items")
        + b"d"
        + struct.pack("!h", 3)
        + b"\x01"
        + cstring("id")
        + struct.pack("!Ii", 20, -1)
        + b"\x00"
        + cstring("price")
        + struct.pack("!Ii", 1700, (12 << 16 | 2) + 4)
        + b"\x00"
        + cstring("naïve")
        + struct.pack("!Ii", 1043, 44)
    )
    assert decode_message(payload) == Relation(
        oid=16384,
        namespace="shop",
        name="Order Items",
        replica_identity="d",
        columns=(
            RelationColumn("id", 20, -1, is_key=True),
            RelationColumn("price", 1700, (12 << 16 | 2) + 4, is_key=False),
            RelationColumn("naïve", 1043, 44, is_key=False),
        ),
    )


def test_relation_in_pg_catalog_has_empty_namespace() -> None:
    payload = b"R" + struct.pack("!I", 1) + cstring("") + cstring("t") + b"f" + struct.pack("!h", 0)
    message = decode_message(payload)
    assert isinstance(message, Relation)
    assert (message.namespace, message.replica_identity, message.columns) == ("", "f", ())


def test_insert_keeps_null_apart_from_empty_string_and_decodes_utf8() -> None:
    payload = b"I" + struct.pack("!I", 16384) + b"N" + tuple_data(1, None, "", 'žluťoučký "kůň"\n', "a,b")
    assert decode_message(payload) == Insert(16384, ("1", None, "", 'žluťoučký "kůň"\n', "a,b"))


def test_update_with_unchanged_toast_and_no_old_tuple() -> None:
    payload = b"U" + struct.pack("!I", 7) + b"N" + tuple_data(3, UNCHANGED, 5)
    message = decode_message(payload)
    assert message == Update(7, key=None, old=None, new=("3", UNCHANGED, "5"))
    assert isinstance(message, Update)
    assert message.new[1] is UNCHANGED
    assert message.new[1] is not None


def test_update_with_key_and_with_old_tuple() -> None:
    keyed = b"U" + struct.pack("!I", 7) + b"K" + tuple_data(2, None) + b"N" + tuple_data(10, "")
    assert decode_message(keyed) == Update(7, key=("2", None), old=None, new=("10", ""))
    full = b"U" + struct.pack("!I", 7) + b"O" + tuple_data(2, "x") + b"N" + tuple_data(2, "y")
    assert decode_message(full) == Update(7, key=None, old=("2", "x"), new=("2", "y"))


def test_delete_by_key_and_by_old_tuple() -> None:
    assert decode_message(b"D" + struct.pack("!I", 9) + b"K" + tuple_data(4, None)) == Delete(
        9, key=("4", None), old=None
    )
    assert decode_message(b"D" + struct.pack("!I", 9) + b"O" + tuple_data(4, "z")) == Delete(
        9, key=None, old=("4", "z")
    )


def test_truncate_options() -> None:
    payload = b"T" + struct.pack("!iB", 2, 3) + struct.pack("!II", 100, 200)
    assert decode_message(payload) == Truncate((100, 200), cascade=True, restart_identity=True)
    plain = b"T" + struct.pack("!iB", 1, 0) + struct.pack("!I", 100)
    assert decode_message(plain) == Truncate((100,), cascade=False, restart_identity=False)


def test_logical_message_transactional_and_not() -> None:
    content = b'{"run": "r1"}\x00binary'
    payload = b"M" + struct.pack("!BQ", 0, 0x1_00000010) + cstring("pgsnow.heartbeat")
    payload += struct.pack("!i", len(content)) + content
    assert decode_message(payload) == LogicalMessage(False, 0x1_00000010, "pgsnow.heartbeat", content)
    transactional = b"M" + struct.pack("!BQ", 1, 5) + cstring("p") + struct.pack("!i", 0)
    assert decode_message(transactional) == LogicalMessage(True, 5, "p", b"")


def test_origin_and_type() -> None:
    assert decode_message(b"O" + struct.pack("!Q", 77) + cstring("node_a")) == Origin(77, "node_a")
    assert decode_message(b"Y" + struct.pack("!I", 50001) + cstring("shop") + cstring("mood")) == TypeMessage(
        50001, "shop", "mood"
    )


def test_binary_value_is_refused_naming_it() -> None:
    payload = b"I" + struct.pack("!I", 1) + b"N" + tuple_data(1, b"\x00\x01")
    with pytest.raises(PermanentError, match="binary value \\(column 2\\)"):
        decode_message(payload)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "malformed"),
        (b"S" + b"\0" * 20, "not part of protocol version 1"),  # stream start (protocol 2)
        (
            b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", 10) + b"abc",
            "cut short",
        ),
        (b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"x", "unknown value kind"),
        (
            b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", 1) + b"\xff",
            "malformed",
        ),
        (b"B" + b"\0" * 5, "malformed"),
        (b"R" + struct.pack("!I", 1) + b"no terminator", "malformed"),
        (b"U" + struct.pack("!I", 1) + b"X" + tuple_data(1), "expected 'N'"),
        (b"D" + struct.pack("!I", 1) + b"N" + tuple_data(1), "expected 'K' or 'O'"),
    ],
)
def test_malformed_messages_are_permanent_errors(payload: bytes, match: str) -> None:
    with pytest.raises(PermanentError, match=match):
        decode_message(payload)


def test_tuple_csv_writes_copy_csv_fields_from_the_raw_bytes() -> None:
    part = tuple_data(1, None, "", 'say "hi",\nbye', UNCHANGED, "žluť")
    payload = b"I" + struct.pack("!I", 1) + b"N" + part + b"trailing"
    fields, count, unchanged, end = tuple_csv(payload, 6)
    # NULL and unchanged: unquoted empty; "" quoted; quotes doubled; UTF-8 bytes as sent.
    assert fields == b'"1",,"","say ""hi"",\nbye",,"\xc5\xbelu\xc5\xa5"'
    assert (count, unchanged, payload[end:]) == (6, [4], b"trailing")
    assert tuple_csv(b"\x00\x00", 0) == (b"", 0, None, 2)


def test_tuple_csv_refuses_binary_and_short_values() -> None:
    with pytest.raises(PermanentError, match="binary value \\(column 1\\)"):
        tuple_csv(tuple_data(b"\x01"), 0)
    with pytest.raises(PermanentError, match="cut short"):
        tuple_csv(struct.pack("!h", 1) + b"t" + struct.pack("!i", 10) + b"abc", 0)
