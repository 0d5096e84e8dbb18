"""Snowflake functions fakesnow translates unfaithfully, rewritten into an equivalent it runs right.

``RTRIM(x, '0')``, ``LTRIM(x, chars)`` and ``TRIM(x, chars)``: fakesnow (0.11.14) wraps the
operand of every TRIM in a ``CAST(... AS VARCHAR)`` (Snowflake casts implicitly) but builds the new
TRIM without its characters and side, so ``RTRIM('3.00', '0')`` runs as ``TRIM(CAST('3.00' AS
TEXT))`` and returns ``'3.00'``. A TRIM whose operand already is such a cast is left as written, so
the rewrite adds that cast itself: the same meaning in Snowflake, and fakesnow keeps the rest.

The rewrite inserts text around the operand and changes nothing else in the statement (no
re-generation through sqlglot, which would re-spell other parts of a long statement).
"""

from __future__ import annotations

import re

import sqlglot.errors
from sqlglot.dialects.snowflake import Snowflake
from sqlglot.tokenizer_core import Token, TokenType

_TRIM_CALL = re.compile(r"TRIM\s*\(", re.IGNORECASE)
_TRIM_FUNCTIONS = frozenset({"TRIM", "LTRIM", "RTRIM"})
_OPENING = frozenset({TokenType.L_PAREN, TokenType.L_BRACKET, TokenType.L_BRACE})
_CLOSING = frozenset({TokenType.R_PAREN, TokenType.R_BRACKET, TokenType.R_BRACE})
_VARCHAR_TYPES = frozenset({"VARCHAR", "TEXT", "STRING"})
_CAST_OPEN = "CAST("
_CAST_CLOSE = " AS VARCHAR)"


def _first_argument(tokens: list[Token], open_index: int) -> tuple[int, int] | None:
    """Token indexes [first, last] of the first argument of the call opened at ``open_index``,
    when the call has a second argument; None for a one-argument call or an unbalanced one."""
    depth = 0
    for index in range(open_index + 1, len(tokens)):
        token_type = tokens[index].token_type
        if token_type in _OPENING:
            depth += 1
        elif token_type in _CLOSING:
            if depth == 0:
                return None
            depth -= 1
        elif token_type is TokenType.COMMA and depth == 0:
            return (open_index + 1, index - 1) if index > open_index + 1 else None
    return None


def _is_varchar_cast(tokens: list[Token], first: int, last: int) -> bool:
    """``CAST(<anything> AS VARCHAR)`` and nothing else: fakesnow keeps such a TRIM intact."""
    if last - first < 4 or tokens[first].text.upper() != "CAST":
        return False
    if (
        tokens[first + 1].token_type is not TokenType.L_PAREN
        or tokens[last].token_type is not TokenType.R_PAREN
    ):
        return False
    if tokens[last - 1].text.upper() not in _VARCHAR_TYPES or tokens[last - 2].text.upper() != "AS":
        return False
    depth = 0
    for index in range(first + 1, last):  # the CAST's own parenthesis must close at ``last``
        token_type = tokens[index].token_type
        depth += token_type in _OPENING
        depth -= token_type in _CLOSING
        if depth == 0:
            return False
    return True


def rewrite_trim_characters(sql_text: str) -> str:
    """``sql_text`` with each ``TRIM/LTRIM/RTRIM(x, chars)`` given a VARCHAR-cast operand.

    Statements without such a call (nearly all) are returned unchanged, character for character;
    so is anything the Snowflake tokenizer cannot read.
    """
    if not _TRIM_CALL.search(sql_text):
        return sql_text
    try:
        tokens = Snowflake().tokenize(sql_text)
    except sqlglot.errors.SqlglotError:
        return sql_text
    insertions: list[tuple[int, str]] = []
    for index, token in enumerate(tokens[:-1]):
        if token.text.upper() not in _TRIM_FUNCTIONS or tokens[index + 1].token_type is not TokenType.L_PAREN:
            continue
        argument = _first_argument(tokens, index + 1)
        if argument is None or _is_varchar_cast(tokens, *argument):
            continue
        first, last = argument
        insertions.append((tokens[first].start, _CAST_OPEN))
        insertions.append((tokens[last].end + 1, _CAST_CLOSE))
    rewritten = sql_text
    # From the end, so earlier offsets stay valid; nested calls never insert at the same offset.
    for offset, text in sorted(insertions, key=lambda item: item[0], reverse=True):
        rewritten = rewritten[:offset] + text + rewritten[offset:]
    return rewritten
