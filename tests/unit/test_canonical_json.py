"""``pgsnow.canonical_json``: the JSON text verify compares, written the same way from every spelling.

PostgreSQL (jsonb) and Snowflake (VARIANT, printed by TO_JSON) spell one JSON value differently;
each pair below is one value in two spellings and must give one canonical text, while a changed
value must not. tests/integration/test_verify_json.py checks PostgreSQL's SQL against this module.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from pgsnow.canonical_json import canonical_json, canonical_number

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "postgres, snowflake",
    [
        # jsonb orders keys by length then bytes; VARIANT alphabetically
        pytest.param('{"b": 1, "aa": 2}', '{"aa":2,"b":1}', id="key-order"),
        pytest.param('{"a": 1.10}', '{"a":1.1}', id="trailing-zero"),
        pytest.param('{"a": 0.0000000001}', '{"a":1.000000000000000e-10}', id="double-printed-with-exponent"),
        pytest.param("100", "1e2", id="integer-in-exponent-form"),
        pytest.param("100.00", "100", id="integral-decimal"),
        pytest.param("-0.0", "0", id="negative-zero"),
        pytest.param(
            "12345678901234567890123456789012345678",
            "12345678901234567890123456789012345678",
            id="38-digit-integer-exact",
        ),
        pytest.param("0.1234567890123456789", "1.234567890123457e-01", id="fraction-to-15-digits"),
        pytest.param("1" + "0" * 40, "1.000000000000000e+40", id="integer-beyond-1e38-as-double"),
        pytest.param('["x", [], {}, null, true]', '[ "x",[ ],{ },null,true ]', id="whitespace"),
        pytest.param('{"\\u00e9": "\\u2028"}', '{"é":"\u2028"}', id="unicode-escapes"),
    ],
)
def test_one_value_in_two_spellings_has_one_canonical_text(postgres: str, snowflake: str) -> None:
    assert canonical_json(postgres) == canonical_json(snowflake)


@pytest.mark.parametrize(
    "before, after",
    [
        pytest.param('{"a": 1.5}', '{"a": 1.6}', id="changed-number"),
        pytest.param('{"a": [1, 2]}', '{"a": [2, 1]}', id="array-order"),
        pytest.param('{"a": 1}', '{"a": "1"}', id="number-vs-string"),
        pytest.param('{"a": null}', "{}", id="null-member-vs-absent"),
        pytest.param('{"a": {}}', '{"a": []}', id="empty-object-vs-empty-array"),
        pytest.param('{"a": "x"}', '{"A": "x"}', id="key-case"),
        pytest.param('{"a": {"b": 1}}', '{"a.b": 1}', id="nesting-vs-dotted-key"),
        pytest.param('["a\\nb"]', '["a", "b"]', id="newline-in-string"),
        pytest.param("12345678901234567890", "12345678901234567891", id="big-integer-last-digit"),
        pytest.param("0.123456789012341", "0.123456789012342", id="fifteenth-digit"),
        pytest.param("true", "false", id="boolean"),
        pytest.param("null", '""', id="null-vs-empty-string"),
    ],
)
def test_a_changed_value_changes_the_canonical_text(before: str, after: str) -> None:
    assert canonical_json(before) != canonical_json(after)


def test_sql_null_stays_null_and_json_null_is_a_value() -> None:
    assert canonical_json(None) is None
    assert canonical_json("null") == ":n"


def test_the_text_is_one_sorted_ascii_line_per_leaf() -> None:
    text = canonical_json('{"b": [true, {}], "a": "é", "c": -12.50}')
    assert text is not None and text.isascii()
    assert text.split("\n") == sorted(text.split("\n"))
    assert text == "\n".join(
        [
            "k61.:sc3a9",  # "a": "é" as UTF-8 hex
            "k62.i0.:t",
            "k62.i1.:o",
            "k63.:d-125e-1",
        ]
    )


@pytest.mark.parametrize(
    "number, text",
    [
        pytest.param("0", "0", id="zero"),
        pytest.param("1200", "12e2", id="trailing-zeros-to-exponent"),
        pytest.param("-0.00125", "-125e-5", id="small-negative"),
        # within the range of doubles: the nearest double's 15 digits, halves to even as printf does
        pytest.param("0.1234567890123455", "123456789012345e-15", id="through-the-nearest-double"),
        pytest.param("123456789012344.5", "123456789012344e0", id="a-double-s-exact-half-to-even"),
        # beyond it: its own 15 digits, half away from zero
        pytest.param(
            "1.234567890123455E+400", "123456789012346e386", id="beyond-doubles-half-away-from-zero"
        ),
        pytest.param("-1.234567890123455E-400", "-123456789012346e-414", id="tiny-negative-beyond-doubles"),
        # integers: exact unless a double could have produced them
        pytest.param("12345678901234567", "123456789012346e2", id="integer-a-double-could-be"),
        pytest.param("12345678901234567890", "1234567890123456789e1", id="integer-longer-than-any-double"),
        pytest.param("9.9999999999999999", "1e1", id="rounding-carries-into-a-new-digit"),
        pytest.param("1E+400", "1e400", id="beyond-double-range"),
        pytest.param("1" + "0" * 40, "1e40", id="integer-beyond-number-38"),
        pytest.param("NaN", "NaN", id="nan"),
        pytest.param("-Infinity", "-inf", id="negative-infinity"),
    ],
)
def test_canonical_number(number: str, text: str) -> None:
    assert canonical_number(Decimal(number)) == text
