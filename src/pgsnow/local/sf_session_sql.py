"""CREATE STAGE and session parameters as text: parse what pgsnow sends (pure functions)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlglot
import sqlglot.errors
from sqlglot import exp

from pgsnow.local.sf_copy_sql import resolve_identifier
from pgsnow.local.sf_credentials_sql import AwsCredentials, credentials_from_items


def object_name_text(value: exp.Expression) -> str:
    """A one-part object name as Snowflake stores it (sqlglot gives an unquoted one as a Var)."""
    if isinstance(value, exp.Identifier):
        return resolve_identifier(value.this, quoted=bool(value.args.get("quoted")))
    return resolve_identifier(value.name, quoted=False)


@dataclass(frozen=True)
class CreateStage:
    """``CREATE [OR REPLACE] STAGE [IF NOT EXISTS] <name> URL = 's3://...' ...``."""

    parts: tuple[str, ...]
    url: str
    replace: bool
    if_not_exists: bool
    storage_integration: str | None
    credentials: AwsCredentials | None
    temporary: bool

    @property
    def has_credentials(self) -> bool:
        return self.credentials is not None


def parse_create_stage(sql_text: str) -> CreateStage | None:
    """Parse an external-stage CREATE; None for anything else (internal stages stay with fakesnow).

    Raises ``AccessSyntaxError`` for a CREDENTIALS clause without a key id and secret key.
    """
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if not isinstance(statement, exp.Create) or str(statement.args.get("kind") or "").upper() != "STAGE":
        return None
    parts = _name_parts(statement.this)
    if parts is None:
        return None
    url = ""
    storage_integration: str | None = None
    credentials: AwsCredentials | None = None
    temporary = False
    properties = statement.args.get("properties")
    for prop in properties.expressions if properties else []:
        if isinstance(prop, exp.TemporaryProperty):
            temporary = True
        elif isinstance(prop, exp.CredentialsProperty):
            credentials = credentials_from_items(
                {
                    item.name.upper(): str(item.args["value"].this)
                    for item in prop.expressions
                    if isinstance(item, exp.Property) and isinstance(item.args.get("value"), exp.Literal)
                }
            )
        elif isinstance(prop, exp.Property):
            name = prop.name.upper()
            value = prop.args.get("value")
            if name == "URL" and isinstance(value, exp.Literal):
                url = str(value.this)
            elif name == "STORAGE_INTEGRATION" and value is not None:
                storage_integration = object_name_text(value)
    if not url.startswith("s3://"):
        return None
    return CreateStage(
        parts=parts,
        url=url,
        replace=bool(statement.args.get("replace")),
        if_not_exists=bool(statement.args.get("exists")),
        storage_integration=storage_integration,
        credentials=credentials,
        temporary=temporary,
    )


@dataclass(frozen=True)
class SessionParameterChange:
    """``ALTER SESSION SET <name> = '<value>'`` (value None for UNSET)."""

    name: str
    value: str | None


@dataclass(frozen=True)
class KeptParameter:
    """A session parameter the local Snowflake keeps itself, as SHOW PARAMETERS describes it."""

    type: str  # "STRING" (a quoted value) or "NUMBER" (a whole number)
    default: str
    description: str


# The session parameters pgsnow keeps itself; any other ALTER SESSION stays with fakesnow.
# LOCK_TIMEOUT is kept and shown only: DuckDB never waits for a lock (a conflicting write fails at
# once), so no statement reaches it locally (docs/snowflake-compatibility.md).
KEPT_SESSION_PARAMETERS = {
    "QUERY_TAG": KeptParameter(
        "STRING", "", "String (up to 4096 characters) used to tag statements executed by the session"
    ),
    "LOCK_TIMEOUT": KeptParameter(
        "NUMBER",
        "43200",
        "Number of seconds to wait while trying to lock a resource, before timing out and aborting the statement.",
    ),
}


def parse_alter_session(sql_text: str) -> SessionParameterChange | None:
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if not isinstance(statement, exp.Alter) or str(statement.args.get("kind") or "").upper() != "SESSION":
        return None
    actions = statement.args.get("actions") or []
    if len(actions) != 1 or not isinstance(actions[0], exp.AlterSession):
        return None
    action = actions[0]
    items = action.args.get("expressions") or []
    if len(items) != 1 or not isinstance(items[0], exp.SetItem):
        return None
    item = items[0].this
    if action.args.get("unset"):
        name = item.name.upper() if isinstance(item, exp.Identifier | exp.Column) else ""
        return SessionParameterChange(name, None) if name in KEPT_SESSION_PARAMETERS else None
    if isinstance(item, exp.EQ) and isinstance(item.this, exp.Column | exp.Identifier):
        name = item.this.name.upper()
        value = item.expression
        kept = KEPT_SESSION_PARAMETERS.get(name)
        if kept is None or not isinstance(value, exp.Literal):
            return None
        if kept.type == "STRING" and value.is_string:
            return SessionParameterChange(name, str(value.this))
        if kept.type == "NUMBER" and not value.is_string and str(value.this).isdigit():
            return SessionParameterChange(name, str(int(value.this)))
    return None


_SHOW_PARAMETERS = re.compile(
    r"^\s*SHOW\s+PARAMETERS\s+LIKE\s+'((?:[^']|'')*)'(?:\s+IN\s+SESSION)?\s*;?\s*$", re.IGNORECASE
)


def parse_show_parameters(sql_text: str) -> str | None:
    """``SHOW PARAMETERS LIKE '<pattern>' [IN SESSION]`` -> the LIKE pattern, when it can only match kept ones."""
    match = _SHOW_PARAMETERS.match(sql_text)
    if not match:
        return None
    pattern = match.group(1).replace("''", "'")
    if not any(like_matches(pattern, name) for name in KEPT_SESSION_PARAMETERS):
        return None
    return pattern


def like_matches(pattern: str, name: str) -> bool:
    """SQL LIKE, case-insensitive as in SHOW commands."""
    regex = "^" + "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern) + "$"
    return re.match(regex, name, re.IGNORECASE) is not None


def _name_parts(table: exp.Expression) -> tuple[str, ...] | None:
    """A dotted object name as Snowflake stores its parts; None when a part is not a plain identifier."""
    if not isinstance(table, exp.Table):
        return None
    parts: list[str] = []
    for part in (table.args.get("catalog"), table.args.get("db"), table.this):
        if part is None:
            continue
        if not isinstance(part, exp.Identifier):
            return None
        parts.append(resolve_identifier(part.this, quoted=bool(part.args.get("quoted"))))
    return tuple(parts)


@dataclass(frozen=True)
class ShowStages:
    """``SHOW STAGES [LIKE '<pattern>'] [IN ACCOUNT | DATABASE [<db>] | SCHEMA [<db>.]<schema> | <db>.<schema>]``.

    ``scope_kind`` is None without IN; ``scope`` holds the name after it, as stored.
    """

    like: str | None
    scope_kind: str | None
    scope: tuple[str, ...]


def parse_show_stages(sql_text: str) -> ShowStages | None:
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if not isinstance(statement, exp.Show) or statement.name.upper() != "STAGES":
        return None
    like = statement.args.get("like")
    pattern = str(like.this) if isinstance(like, exp.Literal) else None
    kind = str(statement.args.get("scope_kind") or "").upper() or None
    scope: tuple[str, ...] = ()
    if (table := statement.args.get("scope")) is not None:
        parts = _name_parts(table)
        if parts is None:
            return None
        scope = parts
    # sqlglot reads `IN <db>.<schema>` (no keyword) as a TABLE scope; it names a schema.
    return ShowStages(pattern, "SCHEMA" if kind == "TABLE" else kind, scope)


@dataclass(frozen=True)
class DropStage:
    """``DROP STAGE [IF EXISTS] <name>``."""

    parts: tuple[str, ...]
    if_exists: bool


def parse_drop_stage(sql_text: str) -> DropStage | None:
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if not isinstance(statement, exp.Drop) or str(statement.args.get("kind") or "").upper() != "STAGE":
        return None
    parts = _name_parts(statement.this)
    if parts is None:
        return None
    return DropStage(parts, bool(statement.args.get("exists")))
