"""ALTER TABLE ... SWAP WITH and CREATE PIPE as text: parse what pgsnow sends (pure functions).

fakesnow's parser (DuckDB) has neither statement; the local Snowflake runs both itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgsnow.local.sf_copy_sql import CopyStatement, CopySyntaxError, parse_copy

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
