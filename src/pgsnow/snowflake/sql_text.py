"""What every Snowflake SQL builder shares: the statement type, the one paramstyle and its
placeholders, and string literals for the few values that cannot be bound.

Values are bound with the connector's ``pyformat`` paramstyle (``%s`` placeholders,
``PARAMSTYLE``), the one paramstyle of the project (the connector's default, and the same
placeholder psycopg2 uses): the connector escapes each value, it is never formatted into the
text by us.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pgsnow.errors import PermanentError

PARAMSTYLE = "pyformat"
PLACEHOLDER = "%s"

# A statement and the values bound to its placeholders.
Statement = tuple[str, tuple[Any, ...]]

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def placeholder_list(values: Sequence[object], *, empty_error: str) -> str:
    """``%s, %s, ...``: one placeholder per value, for ``IN (...)`` or a ``VALUES (...)`` row.

    No values is ``PermanentError(empty_error)``: ``IN ()`` is not SQL.
    """
    if not values:
        raise PermanentError(empty_error)
    return ", ".join([PLACEHOLDER] * len(values))


def string_literal(value: str) -> str:
    """A Snowflake single-quoted string literal, for the few places that cannot be bound."""
    if _CONTROL_CHARS.search(value):
        raise PermanentError(f"control character in a value that must be written into SQL: {value[:40]!r}")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
