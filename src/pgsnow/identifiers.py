"""Table names, the allowlist and Snowflake identifier quoting.

Case policy (see docs/type-mapping.md): a plain lower-case PostgreSQL name
(``customers``, ``order_id``) becomes the upper-case Snowflake name
(``CUSTOMERS``) so users can query it unquoted; any other name (mixed case,
spaces, punctuation, unicode) keeps its exact case and is always quoted. Two
source names that map to the same Snowflake name are an error, never a silent
merge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pgsnow.errors import PermanentError, UnsafeIdentifierError

_PLAIN_LOWER = re.compile(r"^[a-z_][a-z0-9_$]*$")
# Names that may appear inside S3 keys must round-trip through a key
# unambiguously: no path separators, no control characters, no '..'.
_KEY_SAFE = re.compile(r"^[^\x00-\x1f/\\]+$")
MAX_IDENTIFIER_LENGTH = 255


def quote_ident(name: str) -> str:
    """Quote one Snowflake identifier, doubling embedded double quotes."""
    if not name:
        raise PermanentError("empty Snowflake identifier")
    if len(name) > MAX_IDENTIFIER_LENGTH:
        raise PermanentError(
            f"Snowflake identifier longer than {MAX_IDENTIFIER_LENGTH} characters: {name[:40]}..."
        )
    return '"' + name.replace('"', '""') + '"'


def quote_qualified(*parts: str) -> str:
    """Quote a dotted Snowflake name, e.g. database.schema.table."""
    return ".".join(quote_ident(p) for p in parts)


def snowflake_name(pg_name: str) -> str:
    """Map a PostgreSQL identifier to its Snowflake name under the case policy."""
    return pg_name.upper() if _PLAIN_LOWER.match(pg_name) else pg_name


def check_no_collisions(pg_names: Iterable[str], *, what: str, table: str | None = None) -> None:
    """Fail when two source names map to one Snowflake name."""
    seen: dict[str, str] = {}
    for name in pg_names:
        target = snowflake_name(name)
        if target in seen and seen[target] != name:
            raise PermanentError(
                f"{what} names {seen[target]!r} and {name!r} both map to Snowflake name {target!r}",
                table=table,
            )
        seen[target] = name


@dataclass(frozen=True, order=True)
class TableRef:
    """A PostgreSQL table, by schema and name (exact case, unquoted)."""

    schema: str
    table: str

    def __post_init__(self) -> None:
        for part in (self.schema, self.table):
            if not part or not _KEY_SAFE.match(part) or part in {".", ".."}:
                raise UnsafeIdentifierError(
                    f"unsafe table name part {part!r}", table=f"{self.schema}.{self.table}"
                )

    @classmethod
    def parse(cls, text: str) -> TableRef:
        """Parse ``schema.table``; a name without a schema is in ``public``."""
        text = text.strip()
        schema, dot, table = text.partition(".")
        if not dot:
            return cls("public", schema)
        return cls(schema, table)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def snowflake_schema(self) -> str:
        return snowflake_name(self.schema)

    @property
    def snowflake_table(self) -> str:
        return snowflake_name(self.table)

    def __str__(self) -> str:
        return self.qualified


class TableAllowlist:
    """The configured tables. Names from events and keys are checked here before any SQL runs."""

    def __init__(self, tables: Iterable[TableRef], *, allow_any: bool = False) -> None:
        self._tables = frozenset(tables)
        self._allow_any = allow_any

    @classmethod
    def parse(cls, text: str) -> TableAllowlist:
        """Parse ``schema.table,schema.table``; ``*`` allows every table (local use only)."""
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["*"]:
            return cls([], allow_any=True)
        return cls(TableRef.parse(t) for t in items)

    @property
    def tables(self) -> frozenset[TableRef]:
        return self._tables

    @property
    def allows_any(self) -> bool:
        return self._allow_any

    def check(self, ref: TableRef) -> TableRef:
        if self._allow_any or ref in self._tables:
            return ref
        raise UnsafeIdentifierError(
            f"table {ref.qualified!r} is not in the configured allowlist (PGSNOW_TABLES)", table=ref.qualified
        )
