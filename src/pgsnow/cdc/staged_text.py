"""pgoutput's text values written straight in the staged CSV encoding, for the common built-in types.

The staged encoding of a value is what ``pgsnow.postgres.csv_select`` makes of it (the full runs'
type contract, docs/type-mapping.md). For most built-in types that is PostgreSQL's own text output,
which is exactly what pgoutput sends in the walsender's session (``reader.REPLICATION_SESSION_OPTIONS``:
UTC, ISO dates, shortest exact floats, hex bytea); the rest differ by a fixed rewrite (booleans
``t``→``true``, timestamptz ``... +00``→``...Z`` with six fraction digits, bytea without its ``\\x``,
infinite floats ``inf``). So the reader writes those values in their staged form as they arrive,
and a table whose run is all such values is staged by compressing its spill, without the round trip
through a temp table that every other value takes (``stage``; the round trip was over half of a
drain's time on the CDC benchmark).

A value the type contract does not stage as it is — an infinite or BC date, a year past 9999,
numeric NaN, anything over Snowflake's size limits — is **not** converted here: the converter says
so (``None``), the reader starts a segment of plain pgoutput text for the table from that row on,
and the table's run goes through PostgreSQL, whose value rules and value policy decide (``stage``).
Converted values remain valid PostgreSQL input (``stage`` COPYs a converted segment into a temp
table when its run takes the round trip; bytea is read back as text and hex-decoded there).

A column of any other type (unbounded numeric, whose scale is chosen from the data; json, whose
text is rewritten as jsonb's; arrays, enums, domains, extension types...) makes the relation's
values plain pgoutput text (``relation_converters`` returns None). Which one applies is decided
by type OID: built-in OIDs are fixed in PostgreSQL's catalog (``pg_type.dat``) and never change.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from typing import Protocol

from pgsnow.cdc.protocol import UNCHANGED, Unchanged, tuple_bytes
from pgsnow.errors import PermanentError
from pgsnow.postgres import MAX_BINARY_BYTES
from pgsnow.typemap import UNBOUNDED_NUMERIC_PRECISION, TypeShape, ValueKind

__all__ = [
    "CONVERTIBLE_PAYLOAD_BYTES",
    "Converter",
    "as_is",
    "compile_tuple_reader",
    "header_line",
    "is_bytea",
    "kinds_agree",
    "quoted",
    "relation_converters",
    "staged_fields",
    "staged_values",
]

# A converter: the value's bytes (pgoutput text) to its staged CSV field, or None when the type
# contract does not stage it as it is (the run then takes the round trip through PostgreSQL).
Converter = Callable[[bytes], bytes | None]


def as_is(value: bytes) -> bytes | None:
    """The value unquoted and unchanged: text that never holds a comma, quote or line break and is
    never empty (integers, bounded numerics, uuid, ISO dates and timestamps)."""
    return value


def quoted(value: bytes) -> bytes | None:
    """The value quoted, quotes doubled: text, where "" is the empty string (NULL stays unquoted)."""
    return b'"' + value.replace(b'"', b'""') + b'"'


def _boolean(value: bytes) -> bytes | None:
    return b"true" if value == b"t" else b"false" if value == b"f" else None


def _float(value: bytes) -> bytes | None:
    # PostgreSQL spells infinities 'Infinity'; the staged CSV (Snowflake's parser) wants inf/-inf.
    if value == b"Infinity":
        return b"inf"
    if value == b"-Infinity":
        return b"-inf"
    return value


def _bounded_numeric(value: bytes) -> bytes | None:
    # A numeric(p, s) column with p <= 38 holds nothing NUMBER(p, s) cannot, except NaN (value rule).
    return None if value == b"NaN" else value


def _date(value: bytes) -> bytes | None:
    # ISO 'YYYY-MM-DD' is 10 bytes for years 1..9999; BC ('... BC'), 'infinity' and years past
    # 9999 are not (they are the date value rules' business).
    return value if len(value) == 10 else None


def _timestamp(value: bytes) -> bytes | None:
    # 'YYYY-MM-DD HH:MI:SS[.ffffff]' for years 1..9999: a '-' at 4 and a space at 10.
    if len(value) < 19 or value[4] != 0x2D or value[10] != 0x20 or value.endswith(b" BC"):
        return None
    return value


def _timestamptz(value: bytes) -> bytes | None:
    # In the walsender's UTC session: 'YYYY-MM-DD HH:MI:SS[.f...]+00'. Staged as
    # to_char(v AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'): six fraction digits, T, Z.
    if len(value) < 22 or value[4] != 0x2D or value[10] != 0x20 or not value.endswith(b"+00"):
        return None  # infinity, BC (' BC' follows the offset), a year past 9999
    size = len(value) - 3
    if size == 19:
        return value[:10] + b"T" + value[11:19] + b".000000Z"
    return value[:10] + b"T" + value[11:size] + b"0" * (29 - len(value)) + b"Z"


def _bytea(value: bytes) -> bytes | None:
    # bytea_output=hex: '\x0a0b'; staged as encode(v, 'hex'), quoted so that an empty value is ""
    # (the empty string), not NULL.
    if value[:2] != b"\\x":
        return None
    return b'"' + value[2:] + b'"'


def _bpchar(value: bytes) -> bytes | None:
    # char(n) is staged as ::text, which drops the padding spaces; pgoutput sends them.
    return b'"' + value.rstrip(b" ").replace(b'"', b'""') + b'"'


# Built-in type OIDs (PostgreSQL's pg_type.dat).
_BY_OID: dict[int, Converter] = {
    16: _boolean,  # boolean
    20: as_is,  # bigint
    21: as_is,  # smallint
    23: as_is,  # integer
    25: quoted,  # text
    1043: quoted,  # character varying
    1042: _bpchar,  # character(n)
    700: _float,  # real
    701: _float,  # double precision
    1082: _date,  # date
    1114: _timestamp,  # timestamp without time zone
    1184: _timestamptz,  # timestamp with time zone
    17: _bytea,  # bytea
    2950: as_is,  # uuid
    3802: quoted,  # jsonb (staged as its ::text, which is its output)
}
_NUMERIC_OID = 1700
_BYTEA_OID = 17
_VARHDRSZ = 4
# The kind the type contract gives each (``pgsnow.typemap``): what the converters above assume.
_KIND_BY_OID: dict[int, ValueKind] = {
    16: ValueKind.BOOLEAN,
    20: ValueKind.INTEGER,
    21: ValueKind.INTEGER,
    23: ValueKind.INTEGER,
    25: ValueKind.TEXT,
    1043: ValueKind.TEXT,
    1042: ValueKind.TEXT,
    700: ValueKind.FLOAT,
    701: ValueKind.FLOAT,
    1082: ValueKind.DATE,
    1114: ValueKind.TIMESTAMP,
    1184: ValueKind.TIMESTAMPTZ,
    17: ValueKind.BINARY,
    2950: ValueKind.TEXT,
    3802: ValueKind.JSON,
    _NUMERIC_OID: ValueKind.DECIMAL,
}


def _numeric_converter(type_modifier: int) -> Converter | None:
    if type_modifier < _VARHDRSZ:
        return None  # unbounded: its NUMBER scale is chosen from the run's values (stage)
    precision = ((type_modifier - _VARHDRSZ) >> 16) & 0xFFFF
    scale = (type_modifier - _VARHDRSZ) & 0xFFFF
    if not 1 <= precision <= UNBOUNDED_NUMERIC_PRECISION or scale > precision:  # scale < 0 reads > 0x7FF
        return None
    return _bounded_numeric


class _Column(Protocol):
    @property
    def type_oid(self) -> int: ...
    @property
    def type_modifier(self) -> int: ...


def relation_converters(columns: Sequence[_Column]) -> tuple[Converter, ...] | None:
    """Each column's converter, or None when any column's type is not one written here."""
    converters: list[Converter] = []
    for column in columns:
        if column.type_oid == _NUMERIC_OID:
            converter = _numeric_converter(column.type_modifier)
        else:
            converter = _BY_OID.get(column.type_oid)
        if converter is None:
            return None
        converters.append(converter)
    return tuple(converters)


class _StagedColumn(Protocol):
    """What ``kinds_agree`` reads of a ``pgsnow.manifest.Column``."""

    @property
    def kind(self) -> ValueKind: ...
    @property
    def shape(self) -> TypeShape: ...
    @property
    def is_unbounded_numeric(self) -> bool: ...


def kinds_agree(relation_columns: Sequence[_Column], staged_columns: Sequence[_StagedColumn]) -> bool:
    """Whether the type contract stages every column as the kind its converter assumed (the staged
    columns as ``describe_table`` reads them); a staged-text spill is used as it is only then."""
    if len(relation_columns) != len(staged_columns):
        return False
    return all(
        _KIND_BY_OID.get(r.type_oid) is c.kind and c.shape is TypeShape.SCALAR and not c.is_unbounded_numeric
        for r, c in zip(relation_columns, staged_columns, strict=True)
    )


def is_bytea(column: _Column) -> bool:
    """A staged-text spill holds bytea as bare hex, which PostgreSQL reads back with decode(.., 'hex')."""
    return column.type_oid == _BYTEA_OID


# A message up to this size cannot hold a value over one of Snowflake's size limits (the smallest
# is BINARY's 8 MB); a larger one's values are not converted (the value rules measure them).
CONVERTIBLE_PAYLOAD_BYTES = MAX_BINARY_BYTES


_i16 = struct.Struct("!h").unpack_from
_i32 = struct.Struct("!i").unpack_from


def staged_values(
    values: Sequence[bytes | Unchanged | None], converters: Sequence[Converter]
) -> tuple[bytes, list[int] | None] | None:
    """A tuple's values (``protocol.tuple_bytes``) as staged CSV fields and the indexes of its
    unchanged TOAST values, or None when one is not staged as it is (or the widths differ)."""
    if len(values) != len(converters):
        return None  # the plain path reports the mismatch
    fields: list[bytes] = []
    unchanged: list[int] | None = None
    for index, (value, convert) in enumerate(zip(values, converters, strict=True)):
        if isinstance(value, bytes):
            field = convert(value)
            if field is None:
                return None
            fields.append(field)
        else:
            fields.append(b"")  # NULL, or an unchanged TOAST value (listed)
            if value is UNCHANGED:
                unchanged = [*(unchanged or []), index]
    return b",".join(fields), unchanged


def staged_fields(
    buf: bytes, pos: int, converters: Sequence[Converter]
) -> tuple[bytes, int, list[int] | None, int] | None:
    """A TupleData part at ``pos`` as staged CSV fields (``protocol.tuple_csv``'s shape), or None
    when one of its values is not staged as it is (module docstring). The general path, for what
    the compiled readers leave (``compile_tuple_reader``): unchanged TOAST values, refusals."""
    try:
        values, end = tuple_bytes(buf, pos)
    except PermanentError:
        return None  # the plain path names what is wrong
    staged = staged_values(values, converters)
    if staged is None:
        return None
    return staged[0], len(values), staged[1], end


# A compiled tuple reader: (fields, position after the tuple), or None when the general loop must
# decide (an unchanged TOAST value, a refused value, another column count).
TupleReader = Callable[[bytes, int], tuple[bytes, int] | None]


@functools.lru_cache(maxsize=256)
def compile_tuple_reader(converters: tuple[Converter, ...]) -> TupleReader:
    """``staged_fields`` unrolled for one column list: straight-line code per column, no per-value
    loop, index or dispatch. Generated (as ``dataclasses`` generates ``__init__``) because the drain
    runs it once per change and the loop's own overhead was most of its cost: measured with
    bench/cdc_reader.py, CPU per change of the staged read fell from 7.1 us to 5.6 us.
    Only the bytes layout is generated; each value is converted by the same functions as above."""
    lines = [
        "def read_tuple(buf, pos):",
        f"    if _i16(buf, pos)[0] != {len(converters)}:",
        "        return None",
    ]
    lines.append("    pos += 2")
    names = {}
    for index, converter in enumerate(converters):
        field = f"f{index}"
        lines += [
            "    kind = buf[pos]",
            "    if kind == 0x74:",
            "        start = pos + 5",
            "        pos = start + _i32(buf, pos + 1)[0]",
        ]
        if converter is quoted:
            lines.append(f"        {field} = b'\"' + buf[start:pos].replace(b'\"', b'\"\"') + b'\"'")
        elif converter is as_is:
            lines.append(f"        {field} = buf[start:pos]")
        else:
            names[f"convert{index}"] = converter
            lines += [
                f"        {field} = convert{index}(buf[start:pos])",
                f"        if {field} is None:",
                "            return None",
            ]
        lines += [
            "    elif kind == 0x6E:",
            f"        {field} = b''",
            "        pos += 1",
            "    else:",
            "        return None",
        ]
    # A value running past the message's end: the general path names it (a slice would just be short).
    lines += ["    if pos > len(buf):", "        return None"]
    joined = ", ".join(f"f{i}" for i in range(len(converters)))
    lines.append(f"    return b','.join(({joined},)), pos" if converters else "    return b'', pos")
    namespace: dict[str, object] = {"_i16": _i16, "_i32": _i32, **names}
    exec("\n".join(lines), namespace)  # noqa: S102  # generated from the fixed template above only
    return namespace["read_tuple"]  # type: ignore[return-value]


_NEEDS_QUOTES = (",", '"', "\n", "\r")


def header_line(names: Sequence[str]) -> bytes:
    """The CSV header PostgreSQL's ``COPY ... (FORMAT csv, HEADER true)`` writes for these names."""
    fields = []
    for name in names:
        if not name or any(c in name for c in _NEEDS_QUOTES) or name == "\\.":
            fields.append('"' + name.replace('"', '""') + '"')
        else:
            fields.append(name)
    return (",".join(fields) + "\n").encode()
