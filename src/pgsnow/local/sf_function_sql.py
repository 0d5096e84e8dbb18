"""Snowflake functions fakesnow translates unfaithfully, rewritten into an equivalent it runs right.

``RTRIM(x, '0')``, ``LTRIM(x, chars)`` and ``TRIM(x, chars)``: fakesnow (0.11.14) wraps the
operand of every TRIM in a ``CAST(... AS VARCHAR)`` (Snowflake casts implicitly) but builds the new
TRIM without its characters and side, so ``RTRIM('3.00', '0')`` runs as ``TRIM(CAST('3.00' AS
TEXT))`` and returns ``'3.00'``. A TRIM whose operand already is such a cast is left as written, so
the rewrite adds that cast itself: the same meaning in Snowflake, and fakesnow keeps the rest.
"""

from __future__ import annotations

import re

import sqlglot
import sqlglot.errors
from sqlglot import exp

_TRIM_CALL = re.compile(r"TRIM\s*\(", re.IGNORECASE)
_VARCHAR_TYPES = (exp.DataType.Type.VARCHAR, exp.DataType.Type.TEXT)


def _is_varchar_cast(node: exp.Expression) -> bool:
    return isinstance(node, exp.Cast) and node.to.this in _VARCHAR_TYPES


def rewrite_trim_characters(sql_text: str) -> str:
    """``sql_text`` with each TRIM/LTRIM/RTRIM that names characters given a VARCHAR-cast operand.

    Statements without such a call (nearly all) are returned unchanged, character for character;
    so is anything sqlglot cannot parse as one Snowflake statement.
    """
    if not _TRIM_CALL.search(sql_text):
        return sql_text
    try:
        statements = sqlglot.parse(sql_text, read="snowflake")
    except sqlglot.errors.SqlglotError:
        return sql_text
    if len(statements) != 1 or statements[0] is None:
        return sql_text
    statement = statements[0]
    needs_cast = [
        node
        for node in statement.find_all(exp.Trim)
        if node.args.get("expression") is not None and not _is_varchar_cast(node.this)
    ]
    if not needs_cast:
        return sql_text
    for node in needs_cast:  # in place: a nested TRIM stays in the tree and gets its cast too
        node.set("this", exp.Cast(this=node.this, to=exp.DataType(this=exp.DataType.Type.VARCHAR)))
    return statement.sql(dialect="snowflake")
