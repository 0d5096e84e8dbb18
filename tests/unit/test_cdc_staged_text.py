"""pgsnow.cdc.staged_text: each converter's staged form of pgoutput's text, and what it refuses (the
run then takes the round trip). tests/integration/cdc/test_staged_text.py compares whole runs
with the round trip on a real slot; these pin every edge of each converter."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from pgsnow.cdc.staged_text import (
    CONVERTIBLE_PAYLOAD_BYTES,
    as_is,
    header_line,
    quoted,
    relation_converters,
    staged_fields,
)
from pgsnow.postgres import MAX_BINARY_BYTES


@dataclass(frozen=True)
class Col:
    type_oid: int
    type_modifier: int = -1


def converter(oid: int, modifier: int = -1):  # type: ignore[no-untyped-def]
    found = relation_converters([Col(oid, modifier)])
    assert found is not None
    return found[0]


def numeric_typmod(precision: int, scale: int) -> int:
    return ((precision << 16) | (scale & 0x7FF)) + 4


@pytest.mark.parametrize(
    ("oid", "value", "staged"),
    [
        (16, b"t", b"true"),
        (16, b"f", b"false"),
        (1184, b"2026-12-07 10:00:00+00", b"2026-12-07T10:00:00.000000Z"),
        (1184, b"2026-12-07 10:00:00.5+00", b"2026-12-07T10:00:00.500000Z"),
        (1184, b"2026-12-07 10:00:00.123456+00", b"2026-12-07T10:00:00.123456Z"),
        (1184, b"0001-01-01 00:00:00+00", b"0001-01-01T00:00:00.000000Z"),
        (1114, b"2026-12-07 10:00:00.25", b"2026-12-07 10:00:00.25"),
        (1082, b"9999-12-31", b"9999-12-31"),
        (701, b"Infinity", b"inf"),
        (701, b"-Infinity", b"-inf"),
        (701, b"NaN", b"NaN"),
        (700, b"-0", b"-0"),
        (17, b"\\x", b'""'),
        (17, b"\\x00ff", b'"00ff"'),
        (1042, b"ab    ", b'"ab"'),
        (1042, b'  "a" ', b'"  ""a"""'),
        (25, b'a"b,\nc', b'"a""b,\nc"'),
        (25, b"", b'""'),
        (3802, b'{"a": 1}', b'"{""a"": 1}"'),
        (20, b"-9223372036854775808", b"-9223372036854775808"),
        (2950, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ],
)
def test_staged_form(oid: int, value: bytes, staged: bytes) -> None:
    assert converter(oid)(value) == staged


@pytest.mark.parametrize(
    ("oid", "value"),
    [
        (1184, b"infinity"),
        (1184, b"-infinity"),
        (1184, b"0044-03-15 10:00:00+00 BC"),
        (1184, b"10000-01-01 00:00:00+00"),
        (1114, b"infinity"),
        (1114, b"0044-03-15 10:00:00 BC"),
        (1114, b"10000-01-01 00:00:00"),
        (1082, b"infinity"),
        (1082, b"-infinity"),
        (1082, b"0044-03-15 BC"),
        (1082, b"10000-01-01"),
        (16, b"maybe"),
        (17, b"plain"),
    ],
)
def test_values_the_contract_does_not_stage_as_they_are_are_refused(oid: int, value: bytes) -> None:
    assert converter(oid)(value) is None


def test_bounded_numeric_refuses_nan_only() -> None:
    convert = converter(1700, numeric_typmod(12, 2))
    assert convert(b"-12.50") == b"-12.50"
    assert convert(b"NaN") is None


@pytest.mark.parametrize(
    "columns",
    [
        [Col(1700)],  # unbounded numeric: its scale is chosen from the run's values
        [Col(1700, numeric_typmod(39, 2))],  # wider than NUMBER(38)
        [Col(1700, numeric_typmod(5, -2))],  # negative scale
        [Col(1700, numeric_typmod(3, 5))],  # scale above precision
        [Col(114)],  # json: staged as jsonb's text
        [Col(1007)],  # integer[]
        [Col(1083)],  # time
        [Col(23), Col(99999)],  # an enum, domain or extension type among others
    ],
)
def test_relations_with_other_types_are_spilled_as_pgoutput_text(columns: list[Col]) -> None:
    assert relation_converters(columns) is None


def tuple_data(*values: bytes | str | None) -> bytes:
    """pgoutput TupleData: 't' values, 'n' for None, 'u' for the string "u"."""
    out = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value == "u":
            out += b"u"
        else:
            assert isinstance(value, bytes)
            out += b"t" + struct.pack("!i", len(value)) + value
    return out


def test_staged_fields_of_a_tuple() -> None:
    converters = relation_converters([Col(23), Col(25), Col(16), Col(25)])
    assert converters is not None
    fields = staged_fields(tuple_data(b"7", b'x"y', None, "u"), 0, converters)
    assert fields is not None
    joined, count, unchanged, end = fields
    assert joined == b'7,"x""y",,'
    assert (count, unchanged) == (4, [3])
    assert end == len(tuple_data(b"7", b'x"y', None, "u"))
    # one refused value refuses the tuple
    assert staged_fields(tuple_data(b"7", b"", b"yes", None), 0, converters) is None
    # a tuple of another width is left to the plain path, which names the mismatch
    assert staged_fields(tuple_data(b"7"), 0, converters) is None


def test_the_inline_converters_are_the_functions_they_stand_for() -> None:
    assert as_is(b"12") == b"12"
    assert quoted(b'a"') == b'"a"""'


def test_no_value_in_a_convertible_message_exceeds_a_size_limit() -> None:
    assert CONVERTIBLE_PAYLOAD_BYTES <= MAX_BINARY_BYTES


def test_header_line_quotes_names_as_copy_does() -> None:
    assert header_line(["_pgsnow_op", "a,b", 'q"', "line\nbreak", "plain name"]) == (
        b'_pgsnow_op,"a,b","q""","line\nbreak",plain name\n'
    )


def test_a_compiled_tuple_reader_leaves_a_cut_short_tuple_to_the_general_path() -> None:
    from pgsnow.cdc.staged_text import compile_tuple_reader

    converters = relation_converters([Col(23), Col(25)])
    assert converters is not None
    read_tuple = compile_tuple_reader(converters)
    whole = tuple_data(b"7", b"abc")
    assert read_tuple(whole, 0) == (b'7,"abc"', len(whole))
    assert read_tuple(whole[:-2], 0) is None  # the text value runs past the end
    assert staged_fields(whole[:-2], 0, converters) is None
