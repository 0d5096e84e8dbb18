"""``CREDENTIALS = (AWS_KEY_ID = ... AWS_SECRET_KEY = ... [AWS_TOKEN = ...])`` as text (pure functions).

Both ``CREATE STAGE`` and a COPY from an ``'s3://...'`` URL may carry the clause; kept apart from
``sf_copy_sql`` and ``sf_access_sql`` so that each can use it without importing the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class AccessSyntaxError(ValueError):
    """A statement the local Snowflake recognises but refuses as written (a compilation error)."""


@dataclass(frozen=True)
class AwsCredentials:
    """``CREDENTIALS = (AWS_KEY_ID = ... AWS_SECRET_KEY = ... [AWS_TOKEN = ...])``; never printed."""

    key_id: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


# The clause's items are `NAME = 'value'` separated by spaces; sqlglot cannot parse that inside a
# COPY, so it is taken out of the text before the COPY is parsed.
_CREDENTIALS_CLAUSE = re.compile(r"\bCREDENTIALS\s*=\s*\(((?:[^')]|'(?:[^']|'')*')*)\)", re.IGNORECASE)
_CREDENTIAL_ITEM = re.compile(r"\s*([A-Za-z_]+)\s*=\s*'((?:[^']|'')*)'\s*,?")


def credentials_from_items(items: dict[str, str]) -> AwsCredentials:
    unknown = set(items) - {"AWS_KEY_ID", "AWS_SECRET_KEY", "AWS_TOKEN"}
    if unknown:
        raise AccessSyntaxError(f"CREDENTIALS option {sorted(unknown)[0]} is not supported locally")
    if not items.get("AWS_KEY_ID") or not items.get("AWS_SECRET_KEY"):
        raise AccessSyntaxError("CREDENTIALS needs AWS_KEY_ID and AWS_SECRET_KEY")
    return AwsCredentials(items["AWS_KEY_ID"], items["AWS_SECRET_KEY"], items.get("AWS_TOKEN") or None)


def split_credentials(sql_text: str) -> tuple[str, AwsCredentials | None]:
    """The statement without its ``CREDENTIALS = (...)`` clause, and the credentials it gave."""
    match = _CREDENTIALS_CLAUSE.search(sql_text)
    if not match:
        return sql_text, None
    body = match.group(1)
    items: dict[str, str] = {}
    position = 0
    while position < len(body.rstrip()):
        item = _CREDENTIAL_ITEM.match(body, position)
        if not item:
            raise AccessSyntaxError("CREDENTIALS items are NAME = 'value'")
        items[item.group(1).upper()] = item.group(2).replace("''", "'")
        position = item.end()
    remaining = sql_text[: match.start()] + sql_text[match.end() :]
    return remaining, credentials_from_items(items)
