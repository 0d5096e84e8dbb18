"""Temporary Python UDFs for the local Snowflake: ``CREATE TEMPORARY FUNCTION ... LANGUAGE PYTHON``.

fakesnow has no user-defined functions. pgsnow needs one kind: a session's temporary scalar
Python function (``pgsnow verify`` creates one to compare JSON columns). The local Snowflake runs
the handler code it is sent, as Snowflake does, registered as a DuckDB Python function on the
session's own DuckDB connection (so it lives and dies with the session, like TEMPORARY).

Snowflake resolves a qualified call ``db.schema.f(x)``; DuckDB's Python functions have no schema,
so a call naming a function this session created is rewritten to its bare name before fakesnow
translates the statement (``rewrite_function_calls``). Scope, kept narrow on purpose: in-line
Python handlers using the standard library (no PACKAGES or IMPORTS), VARCHAR/NUMBER/FLOAT/BOOLEAN
arguments and results; anything else is refused with a clear error rather than run differently.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import duckdb
from duckdb.func import FunctionNullHandling
from duckdb.sqltypes import BIGINT, BOOLEAN, DOUBLE, VARCHAR, DuckDBPyType

from pgsnow.local.sf_table_sql import split_name

# Numbers the DuckDB functions registered by every session of every server in this process.
_REGISTRATIONS = itertools.count(1)
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_NAME = rf"{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}}"
_CREATE_FUNCTION = re.compile(
    rf"^\s*CREATE\s+(?P<replace>OR\s+REPLACE\s+)?(?P<temporary>(?:TEMP|TEMPORARY)\s+)?(?:SECURE\s+)?"
    rf"FUNCTION\s+(?P<if_not_exists>IF\s+NOT\s+EXISTS\s+)?(?P<name>{_NAME})\s*\((?P<arguments>(?:[^()]|\([^()]*\))*)\)"
    r"\s*RETURNS\s+(?P<returns>[A-Za-z_][A-Za-z0-9_]*(?:\s*\([0-9,\s]*\))?)(?P<options>.*?)"
    r"\s+AS\s+\$\$(?P<body>.*)\$\$\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_OPTION_TEXT = re.compile(
    r"(?P<name>RUNTIME_VERSION|HANDLER|LANGUAGE)\s*=?\s*'?(?P<value>[A-Za-z0-9_.]+)'?", re.I
)
_UNSUPPORTED_OPTIONS = re.compile(r"\b(PACKAGES|IMPORTS|EXTERNAL_ACCESS_INTEGRATIONS|SECRETS)\b", re.I)
_TYPES: dict[str, DuckDBPyType] = {
    "VARCHAR": VARCHAR,
    "STRING": VARCHAR,
    "TEXT": VARCHAR,
    "NUMBER": BIGINT,
    "INT": BIGINT,
    "INTEGER": BIGINT,
    "BIGINT": BIGINT,
    "FLOAT": DOUBLE,
    "DOUBLE": DOUBLE,
    "BOOLEAN": BOOLEAN,
}


class UdfError(ValueError):
    """A CREATE FUNCTION the local Snowflake refuses; the message says why."""


@dataclass(frozen=True)
class CreateFunction:
    parts: tuple[str, ...]
    argument_types: tuple[str, ...]
    return_type: str
    language: str
    handler: str
    body: str
    replace: bool
    temporary: bool
    if_not_exists: bool
    strict: bool
    immutable: bool


def _base_type(text: str) -> str:
    return re.sub(r"\(.*\)", "", text).strip().upper()


def parse_create_function(sql_text: str) -> CreateFunction | None:
    """The CREATE FUNCTION in ``sql_text``, or None for any other statement."""
    match = _CREATE_FUNCTION.match(sql_text)
    if not match:
        return None
    options = match["options"]
    found = {m["name"].upper(): m["value"] for m in _OPTION_TEXT.finditer(options)}
    if _UNSUPPORTED_OPTIONS.search(options):
        raise UdfError("the local Snowflake runs in-line Python handlers without PACKAGES or IMPORTS")
    # top-level commas only: NUMBER(38, 0) is one argument's type
    arguments = [a.strip() for a in re.split(r",(?![^()]*\))", match["arguments"]) if a.strip()]
    argument_types = tuple(_base_type(a.split(None, 1)[1]) if " " in a else "" for a in arguments)
    upper = options.upper()
    return CreateFunction(
        parts=split_name(match["name"]),
        argument_types=argument_types,
        return_type=_base_type(match["returns"]),
        language=found.get("LANGUAGE", "SQL").upper(),
        handler=found.get("HANDLER", ""),
        body=match["body"],
        replace=bool(match["replace"]),
        temporary=bool(match["temporary"]),
        if_not_exists=bool(match["if_not_exists"]),
        strict="STRICT" in upper or "RETURNS NULL ON NULL INPUT" in upper,
        immutable="IMMUTABLE" in upper,
    )


def _duck_type(name: str, what: str) -> DuckDBPyType:
    if name not in _TYPES:
        raise UdfError(f"the local Snowflake does not support {what} type {name or '(none)'} in a Python UDF")
    return _TYPES[name]


@dataclass
class SessionFunctions:
    """The temporary functions one session created: full name -> the name registered in DuckDB."""

    names: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def create(
        self,
        duck: duckdb.DuckDBPyConnection,
        statement: CreateFunction,
        database: str | None,
        schema: str | None,
    ) -> str:
        """Register the function; the status message Snowflake answers with."""
        if statement.language != "PYTHON":
            raise UdfError(f"the local Snowflake runs Python UDFs only, not {statement.language}")
        if not statement.temporary:
            raise UdfError("the local Snowflake keeps no permanent UDFs: create it TEMPORARY")
        full = _qualified(statement.parts, database, schema)
        bare = full[2]
        found = duck.execute(
            "SELECT 1 FROM information_schema.schemata WHERE lower(catalog_name) = lower(?) "
            "AND lower(schema_name) = lower(?)",
            [full[0], full[1]],
        ).fetchone()
        if found is None:
            raise UdfError(f"Schema '{full[0]}.{full[1]}' does not exist or not authorized.")
        parameters = [_duck_type(t, "argument") for t in statement.argument_types]
        returns = _duck_type(statement.return_type, "return")
        namespace: dict[str, Any] = {"__name__": f"pgsnow_local_udf_{bare.lower()}"}
        try:
            exec(compile(statement.body, f"<UDF {'.'.join(full)}>", "exec"), namespace)  # noqa: S102 - the handler code Snowflake would run
        except Exception as exc:
            raise UdfError(f"the handler code of {'.'.join(full)} does not run: {exc}") from exc
        handler = namespace.get(statement.handler)
        if not callable(handler):
            raise UdfError(f"HANDLER {statement.handler!r} is not a function defined in the UDF body")
        if full in self.names:
            if statement.if_not_exists and not statement.replace:
                return f"Function {bare} already exists, statement succeeded."
            if not statement.replace:
                raise UdfError(f"Function '{bare}' already exists.")
        # DuckDB keeps a registered name in its catalog even after remove_function, and the
        # sessions of one server share its DuckDB catalog, so each creation gets an internal name
        # no other session has taken, and calls are rewritten to the newest one.
        internal = f"PGSNOW_UDF_{next(_REGISTRATIONS)}_{re.sub(r'[^A-Za-z0-9_]', '_', bare)}"
        try:
            duck.create_function(
                internal,
                handler,
                list(parameters),
                returns,
                null_handling=FunctionNullHandling.DEFAULT
                if statement.strict
                else FunctionNullHandling.SPECIAL,
                side_effects=not statement.immutable,
            )
        except duckdb.Error as exc:
            raise UdfError(f"the local Snowflake cannot register {bare}: {exc}") from exc
        self.names[full] = internal
        return f"Function {bare} successfully created."

    def rewrite_calls(self, sql_text: str, database: str | None, schema: str | None) -> str:
        """Calls that name a function of this session (qualified or not) call its DuckDB function."""
        if not self.names:
            return sql_text

        def bare_name(match: re.Match[str]) -> str:
            parts = split_name(match["name"])
            try:
                full = _qualified(parts, database, schema)
            except UdfError:
                return match[0]
            return self.names[full] + "(" if full in self.names else match[0]

        return re.sub(rf"(?P<name>{_NAME})\s*\(", bare_name, sql_text)


def _qualified(parts: tuple[str, ...], database: str | None, schema: str | None) -> tuple[str, str, str]:
    """A function's full name, completed from the session's current database and schema."""
    context = (database, schema)[: 3 - len(parts)] if len(parts) < 3 else ()
    if any(part is None for part in context):
        raise UdfError("this session has no current database or schema: qualify the function's name")
    full = tuple(str(part) for part in (*context, *parts))
    if len(full) != 3:
        raise UdfError(f"not a function name: {'.'.join(parts)}")
    return full[0], full[1], full[2]
