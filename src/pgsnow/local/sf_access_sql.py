"""Storage integrations, stage credentials and user keys as text: parse what pgsnow sends (pure functions).

``sf_access`` runs what is parsed here; nothing in this module touches DuckDB or AWS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlglot
import sqlglot.errors
from sqlglot import exp

from pgsnow.local.sf_copy_sql import resolve_identifier
from pgsnow.local.sf_credentials_sql import AccessSyntaxError


@dataclass(frozen=True)
class CreateStorageIntegration:
    """``CREATE [OR REPLACE] STORAGE INTEGRATION [IF NOT EXISTS] <name> TYPE = EXTERNAL_STAGE ...`` (S3)."""

    name: str
    replace: bool
    if_not_exists: bool
    enabled: bool
    role_arn: str
    external_id: str | None
    allowed_locations: tuple[str, ...]
    blocked_locations: tuple[str, ...]
    comment: str


# What ALTER STORAGE INTEGRATION ... SET may change; CREATE also takes the type and provider.
_ALTERABLE_PROPERTIES = frozenset(
    {
        "ENABLED",
        "STORAGE_AWS_ROLE_ARN",
        "STORAGE_AWS_EXTERNAL_ID",
        "STORAGE_ALLOWED_LOCATIONS",
        "STORAGE_BLOCKED_LOCATIONS",
        "COMMENT",
    }
)
_KNOWN_INTEGRATION_PROPERTIES = _ALTERABLE_PROPERTIES | {"TYPE", "STORAGE_PROVIDER"}


def _identifier_name(node: exp.Expression) -> str | None:
    if isinstance(node, exp.Table) and not node.args.get("db") and not node.args.get("catalog"):
        node = node.this
    if isinstance(node, exp.Identifier):
        return resolve_identifier(node.this, quoted=bool(node.args.get("quoted")))
    return None


def _literal_list(value: exp.Expression | None) -> tuple[str, ...]:
    if isinstance(value, exp.Paren):
        value = value.this
    items = value.expressions if isinstance(value, exp.Tuple) else [value]
    texts = []
    for item in items:
        if not isinstance(item, exp.Literal) or not item.is_string:
            raise AccessSyntaxError("storage locations must be quoted strings")
        texts.append(str(item.this))
    return tuple(texts)


def _text(value: exp.Expression | None) -> str:
    if isinstance(value, exp.Literal | exp.Var | exp.Identifier):
        return str(value.this)
    if isinstance(value, exp.Boolean):
        return "TRUE" if value.this else "FALSE"
    raise AccessSyntaxError(f"unexpected value {value.sql(dialect='snowflake') if value else None}")


def parse_create_storage_integration(sql_text: str) -> CreateStorageIntegration | None:
    """Parse an S3 storage integration; None for any other statement.

    Anything pgsnow cannot enforce as written (another provider, a missing role or allowed
    locations, an unknown property) is an ``AccessSyntaxError``, never ignored.
    """
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if (
        not isinstance(statement, exp.Create)
        or str(statement.args.get("kind") or "").upper() != "STORAGE INTEGRATION"
    ):
        return None
    name = _identifier_name(statement.this)
    if name is None:
        raise AccessSyntaxError("a storage integration name has one part")
    values: dict[str, exp.Expression | None] = {}
    properties = statement.args.get("properties")
    for prop in properties.expressions if properties else []:
        if isinstance(prop, exp.SchemaCommentProperty):  # sqlglot's node for COMMENT = '...'
            values["COMMENT"] = prop.this
            continue
        if not isinstance(prop, exp.Property):
            raise AccessSyntaxError(
                f"storage integration property {prop.sql(dialect='snowflake')} is not supported"
            )
        key = prop.name.upper()
        if key not in _KNOWN_INTEGRATION_PROPERTIES:
            raise AccessSyntaxError(f"storage integration property {key} is not supported locally")
        values[key] = prop.args.get("value")
    if "TYPE" not in values or _text(values["TYPE"]).upper() != "EXTERNAL_STAGE":
        raise AccessSyntaxError("a storage integration needs TYPE = EXTERNAL_STAGE")
    if "STORAGE_PROVIDER" not in values or _text(values["STORAGE_PROVIDER"]).upper() != "S3":
        raise AccessSyntaxError("locally a storage integration needs STORAGE_PROVIDER = 'S3'")
    if "ENABLED" not in values:
        raise AccessSyntaxError("missing required property ENABLED")
    if "STORAGE_AWS_ROLE_ARN" not in values:
        raise AccessSyntaxError("missing required property STORAGE_AWS_ROLE_ARN")
    if "STORAGE_ALLOWED_LOCATIONS" not in values:
        raise AccessSyntaxError("missing required property STORAGE_ALLOWED_LOCATIONS")
    allowed = _literal_list(values["STORAGE_ALLOWED_LOCATIONS"])
    blocked = (
        _literal_list(values["STORAGE_BLOCKED_LOCATIONS"]) if "STORAGE_BLOCKED_LOCATIONS" in values else ()
    )
    for location in (*allowed, *blocked):
        if location != "*" and not location.startswith("s3://"):
            raise AccessSyntaxError(f"storage location {location!r} is not an s3:// URL")
    external_id = _text(values["STORAGE_AWS_EXTERNAL_ID"]) if "STORAGE_AWS_EXTERNAL_ID" in values else None
    return CreateStorageIntegration(
        name=name,
        replace=bool(statement.args.get("replace")),
        if_not_exists=bool(statement.args.get("exists")),
        enabled=_text(values["ENABLED"]).upper() == "TRUE",
        role_arn=_text(values["STORAGE_AWS_ROLE_ARN"]),
        external_id=external_id,
        allowed_locations=allowed,
        blocked_locations=blocked,
        comment=_text(values["COMMENT"]) if "COMMENT" in values else "",
    )


@dataclass(frozen=True)
class AlterStorageIntegration:
    """``ALTER [STORAGE] INTEGRATION [IF EXISTS] <name> SET ...``; a property left None is unchanged."""

    name: str
    if_exists: bool
    enabled: bool | None = None
    role_arn: str | None = None
    external_id: str | None = None
    allowed_locations: tuple[str, ...] | None = None
    blocked_locations: tuple[str, ...] | None = None
    comment: str | None = None


# sqlglot has no ALTER INTEGRATION (it falls back to a Command), so the statement is read as text:
# a header, then `NAME = value` items separated by spaces, commas or new lines (Snowflake's SET).
_ALTER_INTEGRATION = re.compile(
    r"""^\s*ALTER\s+(?:STORAGE\s+)?INTEGRATION\s+(IF\s+EXISTS\s+)?("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)"""
    r"""\s+(SET|UNSET)\b(.*?)\s*;?\s*$""",
    re.IGNORECASE | re.DOTALL,
)
_SET_ITEM_NAME = re.compile(r"[\s,]*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
_QUOTED = re.compile(r"'((?:[^']|'')*)'")
_QUOTED_LIST = re.compile(r"\(\s*((?:'(?:[^']|'')*'\s*,?\s*)*)\)")
_WORD = re.compile(r"[A-Za-z0-9_]+")


def _unquote(text: str) -> str:
    return text.replace("''", "'")


def _set_items(text: str) -> dict[str, str | tuple[str, ...]]:
    """``NAME = 'text' | ('a', 'b') | WORD`` items, by upper-case name."""
    items: dict[str, str | tuple[str, ...]] = {}
    position = 0
    while text[position:].strip(" \t\r\n,"):
        name = _SET_ITEM_NAME.match(text, position)
        if not name:
            raise AccessSyntaxError(
                f"ALTER INTEGRATION ... SET expects NAME = value, not {text[position:].strip()!r}"
            )
        key = name.group(1).upper()
        position = name.end()
        value: str | tuple[str, ...]
        if (quoted := _QUOTED.match(text, position)) is not None:
            value, position = _unquote(quoted.group(1)), quoted.end()
        elif (listed := _QUOTED_LIST.match(text, position)) is not None:
            value = tuple(_unquote(v) for v in _QUOTED.findall(listed.group(1)))
            position = listed.end()
        elif (word := _WORD.match(text, position)) is not None:
            value, position = word.group(0), word.end()
        else:
            raise AccessSyntaxError(f"unexpected value for {key}")
        if key in items:
            raise AccessSyntaxError(f"property {key} is given twice")
        items[key] = value
    return items


def _locations(key: str, value: str | tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        raise AccessSyntaxError(f"{key} takes a list of quoted locations")
    if key == "STORAGE_ALLOWED_LOCATIONS" and not value:
        raise AccessSyntaxError("STORAGE_ALLOWED_LOCATIONS needs at least one location")
    for location in value:
        if location != "*" and not location.startswith("s3://"):
            raise AccessSyntaxError(f"storage location {location!r} is not an s3:// URL")
    return value


def _string(key: str, value: str | tuple[str, ...]) -> str:
    if isinstance(value, tuple):
        raise AccessSyntaxError(f"{key} takes a quoted string")
    return value


def parse_alter_storage_integration(sql_text: str) -> AlterStorageIntegration | None:
    """Parse ``ALTER [STORAGE] INTEGRATION [IF EXISTS] <name> SET <property> = <value> ...``.

    The properties a local integration has can be set; anything else (UNSET, SET TAG,
    STORAGE_AWS_OBJECT_ACL, USE_PRIVATELINK_ENDPOINT, another provider's) is an
    ``AccessSyntaxError``, never ignored. None for any other statement.
    """
    match = _ALTER_INTEGRATION.match(sql_text)
    if not match:
        return None
    if_exists, raw_name, action, rest = match.groups()
    if raw_name.startswith('"'):
        name = raw_name[1:-1].replace('""', '"')
    else:
        name = resolve_identifier(raw_name, quoted=False)
    if action.upper() != "SET":
        raise AccessSyntaxError("ALTER INTEGRATION ... UNSET is not supported locally")
    if re.match(r"\s*TAG\b", rest, re.IGNORECASE):
        raise AccessSyntaxError("ALTER INTEGRATION ... SET TAG is not supported locally")
    items = _set_items(rest)
    if not items:
        raise AccessSyntaxError("ALTER INTEGRATION ... SET needs at least one property")
    unknown = sorted(set(items) - _ALTERABLE_PROPERTIES)
    if unknown:
        raise AccessSyntaxError(f"storage integration property {unknown[0]} is not supported locally")
    enabled: bool | None = None
    if "ENABLED" in items:
        flag = _string("ENABLED", items["ENABLED"]).upper()
        if flag not in {"TRUE", "FALSE"}:
            raise AccessSyntaxError("ENABLED is TRUE or FALSE")
        enabled = flag == "TRUE"
    return AlterStorageIntegration(
        name=name,
        if_exists=bool(if_exists),
        enabled=enabled,
        role_arn=_string("STORAGE_AWS_ROLE_ARN", items["STORAGE_AWS_ROLE_ARN"])
        if "STORAGE_AWS_ROLE_ARN" in items
        else None,
        external_id=_string("STORAGE_AWS_EXTERNAL_ID", items["STORAGE_AWS_EXTERNAL_ID"])
        if "STORAGE_AWS_EXTERNAL_ID" in items
        else None,
        allowed_locations=_locations("STORAGE_ALLOWED_LOCATIONS", items["STORAGE_ALLOWED_LOCATIONS"])
        if "STORAGE_ALLOWED_LOCATIONS" in items
        else None,
        blocked_locations=_locations("STORAGE_BLOCKED_LOCATIONS", items["STORAGE_BLOCKED_LOCATIONS"])
        if "STORAGE_BLOCKED_LOCATIONS" in items
        else None,
        comment=_string("COMMENT", items["COMMENT"]) if "COMMENT" in items else None,
    )


def parse_describe_integration(sql_text: str) -> str | None:
    """``DESC[RIBE] [STORAGE] INTEGRATION <name>`` -> the name; None for anything else."""
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if not isinstance(statement, exp.Describe):
        return None
    if str(statement.args.get("kind") or "").upper() not in {"INTEGRATION", "STORAGE INTEGRATION"}:
        return None
    return _identifier_name(statement.this)


# sqlglot has no ALTER USER; the one form pgsnow needs is matched as text.
_ALTER_USER_KEY = re.compile(
    r"""^\s*ALTER\s+USER\s+(?:IF\s+EXISTS\s+)?("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)\s+SET\s+"""
    r"""RSA_PUBLIC_KEY\s*=\s*'((?:[^']|'')*)'\s*;?\s*$""",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SetUserPublicKey:
    """``ALTER USER <user> SET RSA_PUBLIC_KEY = '<base64 DER or PEM>'``."""

    user: str
    public_key: str


def parse_alter_user_public_key(sql_text: str) -> SetUserPublicKey | None:
    match = _ALTER_USER_KEY.match(sql_text)
    if not match:
        return None
    raw_user, key = match.groups()
    if raw_user.startswith('"'):
        user = raw_user[1:-1].replace('""', '"')
    else:
        user = resolve_identifier(raw_user, quoted=False)
    return SetUserPublicKey(user, key.replace("''", "'"))


def _directory(location: str) -> str:
    return location if location.endswith("/") else location + "/"


def location_allowed(url: str, allowed: tuple[str, ...], blocked: tuple[str, ...]) -> bool:
    """Whether an integration may read ``url``: under an allowed location, under no blocked one.

    Locations are prefixes ending at a path separator (``s3://b/p/`` covers ``s3://b/p/x.csv`` but
    not ``s3://b/px/``); ``'*'`` allows every location.
    """
    candidate = _directory(url)

    def covered(locations: tuple[str, ...]) -> bool:
        return any(loc == "*" or candidate.startswith(_directory(loc)) for loc in locations)

    return covered(allowed) and not covered(blocked)
