"""ALTER TABLE ... SWAP WITH and CREATE PIPE as text: parse what pgsnow sends (pure functions).

fakesnow's parser (DuckDB) has neither statement; the local Snowflake runs both itself. And which
table a CREATE TABLE or DROP TABLE names, so the local Snowflake can keep the time it was created
(INFORMATION_SCHEMA.TABLES.CREATED, ``sf_table_created``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlglot
import sqlglot.errors
from sqlglot import exp

from pgsnow.local.sf_copy_sql import CopyStatement, CopySyntaxError, parse_copy, resolve_identifier

# One Snowflake identifier: "quoted" (with "" inside) or bare.
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_NAME = rf"{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}}"
_SWAP = re.compile(
    rf"^\s*ALTER\s+TABLE\s+(?P<if_exists>IF\s+EXISTS\s+)?(?P<table>{_NAME})\s+SWAP\s+WITH\s+(?P<other>{_NAME})\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_CREATE_PIPE = re.compile(
    rf"^\s*CREATE\s+(?P<replace>OR\s+REPLACE\s+)?PIPE\s+(?P<if_not_exists>IF\s+NOT\s+EXISTS\s+)?"
    rf"(?P<name>{_NAME})(?P<options>.*?)\s+AS\s+(?P<copy>COPY\s+INTO\s.*?)\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_PIPE_OPTION = re.compile(
    r"\s*(?P<name>AUTO_INGEST|ERROR_INTEGRATION|AWS_SNS_TOPIC|INTEGRATION|COMMENT)\s*=\s*"
    r"(?P<value>'(?:[^']|'')*'|[A-Za-z0-9_\"$]+)",
    re.IGNORECASE,
)


def split_name(text: str) -> tuple[str, ...]:
    """``"db"."Sch".tbl`` -> ("db", "Sch", "TBL"): quoted parts exact, bare parts upper case."""
    parts = re.findall(_IDENT, text)
    return tuple(p[1:-1].replace('""', '"') if p.startswith('"') else p.upper() for p in parts)


@dataclass(frozen=True)
class SwapTables:
    table: tuple[str, ...]
    other: tuple[str, ...]
    if_exists: bool


def parse_swap_with(sql_text: str) -> SwapTables | None:
    match = _SWAP.match(sql_text)
    if not match:
        return None
    return SwapTables(split_name(match["table"]), split_name(match["other"]), bool(match["if_exists"]))


@dataclass(frozen=True)
class CreatePipe:
    parts: tuple[str, ...]
    replace: bool
    if_not_exists: bool
    auto_ingest: bool
    copy_sql: str
    copy: CopyStatement


def parse_create_pipe(sql_text: str) -> CreatePipe | None:
    """``CREATE [OR REPLACE] PIPE [IF NOT EXISTS] <name> [AUTO_INGEST = ...] AS COPY INTO ...``."""
    match = _CREATE_PIPE.match(sql_text)
    if not match:
        return None
    options = match["options"]
    auto_ingest = False
    position = 0
    while position < len(options.strip()):
        option = _PIPE_OPTION.match(options, position)
        if option is None:
            if options[position:].strip():
                raise CopySyntaxError(f"unsupported CREATE PIPE option: {options[position:].strip()[:40]!r}")
            break
        if option["name"].upper() == "AUTO_INGEST":
            auto_ingest = option["value"].upper() == "TRUE"
        position = option.end()
    copy_sql = match["copy"]
    copy = parse_copy(copy_sql)
    if copy is None:
        raise CopySyntaxError("a pipe's body must be COPY INTO <table>")
    if copy.files is not None:
        raise CopySyntaxError("a pipe's COPY cannot name FILES: Snowpipe gives them")
    return CreatePipe(
        parts=split_name(match["name"]),
        replace=bool(match["replace"]),
        if_not_exists=bool(match["if_not_exists"]),
        auto_ingest=auto_ingest,
        copy_sql=copy_sql,
        copy=copy,
    )


# What may be a CREATE TABLE or DROP TABLE (sqlglot parses only these: it is called for every
# statement): CREATE [OR REPLACE] [LOCAL|GLOBAL] [TEMP|TEMPORARY|VOLATILE|TRANSIENT] TABLE, DROP TABLE.
_TABLE_DDL = re.compile(
    r"^\s*(?:CREATE\s+(?:OR\s+REPLACE\s+)?(?:(?:LOCAL|GLOBAL)\s+)?"
    r"(?:(?:TEMP|TEMPORARY|VOLATILE|TRANSIENT)\s+)?TABLE|DROP\s+TABLE)\s",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TableDdl:
    """A CREATE TABLE (``created``) or DROP TABLE of one table, its name as written."""

    parts: tuple[str, ...]
    created: bool
    if_not_exists: bool = False


def parse_table_ddl(sql_text: str) -> TableDdl | None:
    """``CREATE [OR REPLACE] [TRANSIENT ...] TABLE [IF NOT EXISTS] <name> ...`` or ``DROP TABLE
    [IF EXISTS] <name>``; None for anything else."""
    if not _TABLE_DDL.match(sql_text):
        return None
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if (
        not isinstance(statement, exp.Create | exp.Drop)
        or str(statement.args.get("kind") or "").upper() != "TABLE"
    ):
        return None
    table = statement.this
    if isinstance(table, exp.Schema):  # CREATE TABLE t (columns): the name is inside the schema
        table = table.this
    if not isinstance(table, exp.Table):
        return None
    parts = tuple(
        resolve_identifier(part.this, quoted=bool(part.args.get("quoted")))
        for part in (table.args.get("catalog"), table.args.get("db"), table.this)
        if isinstance(part, exp.Identifier)
    )
    if not parts:
        return None
    if isinstance(statement, exp.Drop):
        return TableDdl(parts, created=False)
    return TableDdl(parts, created=True, if_not_exists=bool(statement.args.get("exists")))
