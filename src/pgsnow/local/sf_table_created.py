"""INFORMATION_SCHEMA.TABLES.CREATED in the local Snowflake: when each table was created.

fakesnow's INFORMATION_SCHEMA.TABLES says ``CREATED = 1970-01-01`` for every table (DuckDB keeps
no creation time). pgsnow reads CREATED to tell a work table a load left behind from one a load is
using (``pgsnow.load.work_tables``), so the local Snowflake keeps it:

* each CREATE TABLE that succeeds (plain, ``OR REPLACE``, or ``IF NOT EXISTS`` when the table did
  not exist) records the time in ``CREATED_TABLE`` (``record_created``), and a DROP TABLE that
  succeeds removes it (``forget_created``); an ``ALTER TABLE ... SWAP WITH`` swaps it with the rest
  of a table's by-name metadata;
* every database's INFORMATION_SCHEMA.TABLES view (fakesnow's, created per database by
  ``info_schema.per_db_creation_sql``) takes CREATED from there (``install``), 1970-01-01 as
  before for a table with no record (made before this server kept them, or renamed since).

docs/snowflake-compatibility.md lists it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from string import Template
from typing import Any

from fakesnow import info_schema

CREATED_TABLE = "_fs_global._fs_information_schema._pgsnow_tables_created"
_CREATE_CREATED_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {CREATED_TABLE} (catalog VARCHAR, schema_name VARCHAR, name VARCHAR, "
    "created TIMESTAMPTZ, PRIMARY KEY (catalog, schema_name, name))"
)
# fakesnow's view, and the lines that change in it.
_FAKESNOW_CREATED = 'to_timestamp(0)::timestamptz AS "CREATED",'
_FAKESNOW_WHERE = "where tables.database_name = '${catalog}'"
_INSTALLED_MARKER = "_pgsnow_table_created"


def tables_view_sql(catalog: str) -> str:
    """fakesnow's INFORMATION_SCHEMA.TABLES view of ``catalog``, CREATED from ``CREATED_TABLE``
    (created or replaced, so databases kept from an earlier start get it too)."""
    original = info_schema.SQL_CREATE_INFORMATION_SCHEMA_TABLES_VIEW.template
    if _FAKESNOW_CREATED not in original or _FAKESNOW_WHERE not in original:
        raise RuntimeError("fakesnow's INFORMATION_SCHEMA.TABLES view changed; update sf_table_created")
    view = (
        original.replace("create view if not exists", "create or replace view", 1)
        .replace(
            _FAKESNOW_CREATED,
            'coalesce(_pgsnow_created.created, to_timestamp(0)::timestamptz) AS "CREATED",',
            1,
        )
        .replace(
            _FAKESNOW_WHERE,
            f"left join {CREATED_TABLE} _pgsnow_created on\n"
            "    tables.database_name = _pgsnow_created.catalog AND\n"
            "    tables.schema_name = _pgsnow_created.schema_name AND\n"
            "    tables.table_name = _pgsnow_created.name\n" + _FAKESNOW_WHERE,
            1,
        )
    )
    return Template(view).substitute(catalog=catalog)


def install() -> None:
    """Make every database fakesnow creates or attaches (``per_db_creation_sql``, process-wide and
    idempotent) get the view that reads CREATED, and the table it reads."""
    current: Callable[[str], str] = info_schema.per_db_creation_sql
    if getattr(current, _INSTALLED_MARKER, False):
        return

    def per_db_creation_sql(catalog: str) -> str:
        return f"{current(catalog)}\n{_CREATE_CREATED_TABLE};\n{tables_view_sql(catalog)};"

    setattr(per_db_creation_sql, _INSTALLED_MARKER, True)
    info_schema.per_db_creation_sql = per_db_creation_sql


def table_exists(duck: Any, key: tuple[str, str, str]) -> bool:
    found = duck.execute(
        "SELECT 1 FROM duckdb_tables() WHERE database_name = ? AND schema_name = ? AND table_name = ?",
        list(key),
    ).fetchone()
    return found is not None


def record_created(duck: Any, key: tuple[str, str, str], at: datetime.datetime) -> None:
    """A CREATE TABLE of ``key`` succeeded ``at``: its CREATED from now on."""
    duck.execute(_CREATE_CREATED_TABLE)
    duck.execute(
        f"INSERT INTO {CREATED_TABLE} VALUES (?, ?, ?, ?) "
        "ON CONFLICT (catalog, schema_name, name) DO UPDATE SET created = excluded.created",
        [*key, at],
    )


def forget_created(duck: Any, key: tuple[str, str, str]) -> None:
    """A DROP TABLE of ``key`` succeeded: a table made later under the name is a new one."""
    duck.execute(_CREATE_CREATED_TABLE)
    duck.execute(f"DELETE FROM {CREATED_TABLE} WHERE catalog = ? AND schema_name = ? AND name = ?", list(key))
