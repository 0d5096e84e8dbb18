"""The canonical text of a JSON value, as ``pgsnow verify`` compares JSON columns.

PostgreSQL's jsonb and Snowflake's VARIANT hold the same JSON value but print it differently:
jsonb orders keys by length, VARIANT alphabetically; jsonb keeps ``1.10`` and ``0.0000000001``
as written, VARIANT may print ``1.1`` or ``1.000000000000000e-10``. So neither side's text is
compared. Both compute this canonical text instead: one line per leaf, sorted,

    <path>:<leaf>

where the path is a sequence of ``k<hex of the key's UTF-8 bytes>.`` and ``i<index>.`` steps
and the leaf is ``n`` (null), ``t``/``f``, ``s<hex of the string's UTF-8 bytes>``, ``o``/``a``
(an empty object/array), or ``d<number>``. A number is written as ``<digits>e<exponent>`` with
no leading or trailing zeros in the digits (``0`` for zero), exactly when it is an integer that
Snowflake keeps exact and no double could have produced, otherwise as the 15 significant digits
of its nearest double (beyond the range of doubles: its own, rounded half away from zero), which
a double Snowflake may have stored instead still gives. "No
double could have produced it": below 10**38 (NUMBER's limit) and either below 2**53 (where an
integral double comes from an integral value) or with more than 17 significant digits (a double
prints at most 17). Every character of the text is ASCII: sorting by code point and by byte agree.

This module runs in three places, so it uses the standard library only and never two dollar signs in a row (it is
sent as a dollar-quoted UDF body):
in-process (tests, ``pgsnow.demo``), in Snowflake as the body of the temporary Python UDF that
``pgsnow.verify`` creates, and in the local emulator, which runs the UDF body it is sent.
PostgreSQL computes the same text in SQL (``pgsnow.verify.pg_canonical_json``); the test suite
checks the two against each other on generated values.
"""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

SIGNIFICANT_DIGITS = 15
EXACT_INTEGER_LIMIT = Decimal(10) ** 38  # NUMBER(38, 0)
DOUBLE_INTEGER_LIMIT = Decimal(2) ** 53  # from here on every double is an integer
DOUBLE_MAX_DIGITS = 17  # significant digits a double needs at most
DOUBLE_RANGE = (Decimal("1e-300"), Decimal("1e300"))  # compared through a double inside this range
_ROUNDING = Context(prec=SIGNIFICANT_DIGITS, rounding=ROUND_HALF_UP)


def canonical_json(text: str | None) -> str | None:
    """The canonical text of the JSON document ``text``; None for None (SQL NULL)."""
    if text is None:
        return None
    value = json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=Decimal)
    lines: list[str] = []
    _walk(value, "", lines)
    lines.sort()
    return "\n".join(lines)


def canonical_number(number: Decimal) -> str:
    if number.is_nan():
        return "NaN"
    if number.is_infinite():
        return "inf" if number > 0 else "-inf"
    if number.is_zero():
        return "0"
    significant = len("".join(map(str, number.as_tuple().digits)).strip("0"))
    exact = (
        number == number.to_integral_value()
        and abs(number) < EXACT_INTEGER_LIMIT
        and (abs(number) < DOUBLE_INTEGER_LIMIT or significant > DOUBLE_MAX_DIGITS)
    )
    if exact:
        value = number
    elif DOUBLE_RANGE[0] <= abs(number) <= DOUBLE_RANGE[1]:
        # Through the nearest double, then its 15 significant digits (half to even, as C's
        # printf("%.15g") and PostgreSQL's float8-to-numeric cast): the same digits whether this
        # side holds the exact decimal or a double of it.
        value = Decimal(format(float(number), f".{SIGNIFICANT_DIGITS}g"))
    else:
        value = _ROUNDING.plus(number)  # no double holds it: its own 15 digits, half away from zero
    sign, digits, exponent = value.as_tuple()
    text = "".join(map(str, digits)).lstrip("0")
    kept = text.rstrip("0")
    assert isinstance(exponent, int)  # finite
    return ("-" if sign else "") + kept + "e" + str(exponent + len(text) - len(kept))


def _hex(text: str) -> str:
    return text.encode("utf-8").hex()


def _walk(value: Any, path: str, lines: list[str]) -> None:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            _walk(child, path + "k" + _hex(key) + ".", lines)
    elif isinstance(value, list) and value:
        for index, child in enumerate(value):
            _walk(child, path + "i" + str(index) + ".", lines)
    else:
        lines.append(path + ":" + _leaf(value))


def _leaf(value: Any) -> str:
    if value is None:
        return "n"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, str):
        return "s" + _hex(value)
    if isinstance(value, dict):
        return "o"
    if isinstance(value, list):
        return "a"
    return "d" + canonical_number(value)
