"""SQL for target tables: schema and table DDL, column look-ups, schema evolution and the write
modes (work and shadow tables, MERGE, swap, deletes); at the end, the load ledger's statements
(moving to ``pgsnow.ledger``).

Pure functions: each shape is read and unit-tested as text (tests/unit/test_snowflake_sql.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.manifest import Column
from pgsnow.snowflake.sql_text import Statement, string_literal


def build_create_schema(database: str, schema: str) -> str:
    return f"CREATE SCHEMA IF NOT EXISTS {quote_qualified(database, schema)}"


def build_create_table(database: str, columns: Sequence[Column], table: TableRef) -> str:
    """CREATE TABLE IF NOT EXISTS from the manifest's columns, NOT NULL where the source is."""
    if not columns:
        raise PermanentError("cannot create a table without columns", table=table.qualified)
    column_defs = ",\n  ".join(
        f"{quote_ident(c.snowflake_name)} {c.snowflake_type}{'' if c.nullable else ' NOT NULL'}"
        for c in columns
    )
    target = quote_qualified(database, table.snowflake_schema, table.snowflake_table)
    return f"CREATE TABLE IF NOT EXISTS {target} (\n  {column_defs}\n)"


def build_select_table_columns(database: str, schema: str, table: str) -> Statement:
    """Columns of an existing target table, in order (for hand-dropped files without a manifest)."""
    sql = (
        'SELECT "COLUMN_NAME", "DATA_TYPE"\n'
        f'FROM {quote_ident(database)}."INFORMATION_SCHEMA"."COLUMNS"\n'
        'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s\n'
        'ORDER BY "ORDINAL_POSITION"'
    )
    return sql, (schema, table)


# --------------------------------------------------------------------------- schema evolution


def build_select_column_types(database: str, schema: str, table: str) -> Statement:
    """An existing table's columns with precision/scale/length and nullability ('YES'/'NO'),
    for schema evolution and hand-dropped files."""
    sql = (
        'SELECT "COLUMN_NAME", "DATA_TYPE", "NUMERIC_PRECISION", "NUMERIC_SCALE", "CHARACTER_MAXIMUM_LENGTH", '
        '"IS_NULLABLE"\n'
        f'FROM {quote_ident(database)}."INFORMATION_SCHEMA"."COLUMNS"\n'
        'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s\n'
        'ORDER BY "ORDINAL_POSITION"'
    )
    return sql, (schema, table)


def build_add_column(table: tuple[str, str, str], column: Column) -> str:
    """A new source column; always nullable, because existing rows have no value for it."""
    target = quote_qualified(*table)
    return f"ALTER TABLE {target} ADD COLUMN {quote_ident(column.snowflake_name)} {column.snowflake_type}"


def build_drop_not_null(table: tuple[str, str, str], column_name: str) -> str:
    """Make a NOT NULL column nullable: the source dropped it, or dropped its NOT NULL."""
    return f"ALTER TABLE {quote_qualified(*table)} ALTER COLUMN {quote_ident(column_name)} DROP NOT NULL"


def build_widen_column(table: tuple[str, str, str], column: Column) -> str:
    target = quote_qualified(*table)
    return (
        f"ALTER TABLE {target} ALTER COLUMN {quote_ident(column.snowflake_name)} "
        f"SET DATA TYPE {column.snowflake_type}"
    )


# --------------------------------------------------------------------------- write modes


# Work tables: each made for one load's transaction, in the control schema, before it and dropped
# after it (``pgsnow.load.work_tables`` owns them). A name is one of these prefixes and 16 random
# hex digits, so a sweep can find those a load left behind.
MERGE_WORK_TABLE = "_PGSNOW_MERGE_"  # a merge run's group: COPY into it, MERGE from it
KEYS_WORK_TABLE = "_PGSNOW_KEYS_"  # a run's deletes: its key list
CHANGES_WORK_TABLE = "_PGSNOW_CHANGES_"  # a change run's changes
WORK_TABLE_PREFIXES = (MERGE_WORK_TABLE, KEYS_WORK_TABLE, CHANGES_WORK_TABLE)


def build_select_work_tables(database: str, schema: str, *, created_before: datetime) -> Statement:
    """The work tables (``WORK_TABLE_PREFIXES``) of ``schema`` created before ``created_before``,
    oldest first, with their creation time: Snowflake's INFORMATION_SCHEMA.TABLES and its
    ``CREATED`` column."""
    starts = " OR ".join('STARTSWITH("TABLE_NAME", %s)' for _ in WORK_TABLE_PREFIXES)
    sql = (
        'SELECT "TABLE_NAME", "CREATED"\n'
        f'FROM {quote_ident(database)}."INFORMATION_SCHEMA"."TABLES"\n'
        'WHERE "TABLE_SCHEMA" = %s AND "TABLE_TYPE" = \'BASE TABLE\' AND "CREATED" < %s\n'
        f"AND ({starts})\n"
        'ORDER BY "CREATED", "TABLE_NAME"'
    )
    return sql, (schema, created_before, *WORK_TABLE_PREFIXES)


def build_create_work_table(target: tuple[str, str, str], columns: Sequence[Column]) -> str:
    """A transient table with the target's columns (no NOT NULL: a work table only stages rows).

    Transient, not temporary: it is fully qualified in the control schema, and the name is
    unique per load, so concurrent loaders never share one.
    """
    column_defs = ", ".join(f"{quote_ident(c.snowflake_name)} {c.snowflake_type}" for c in columns)
    return f"CREATE OR REPLACE TRANSIENT TABLE {quote_qualified(*target)} ({column_defs})"


def build_create_shadow_table(shadow: tuple[str, str, str], columns: Sequence[Column]) -> str:
    """The new table a replace run loads into, swapped with the target when the run is complete."""
    column_defs = ", ".join(
        f"{quote_ident(c.snowflake_name)} {c.snowflake_type}{'' if c.nullable else ' NOT NULL'}"
        for c in columns
    )
    return f"CREATE TABLE IF NOT EXISTS {quote_qualified(*shadow)} ({column_defs})"


def build_drop_table(table: tuple[str, str, str]) -> str:
    return f"DROP TABLE IF EXISTS {quote_qualified(*table)}"


RUN_ID_COLUMN = "_PGSNOW_RUN_ID"  # merge targets without a cursor column: the run that wrote the row


def build_add_run_id_column(target: tuple[str, str, str]) -> str:
    return f"ALTER TABLE {quote_qualified(*target)} ADD COLUMN IF NOT EXISTS {quote_ident(RUN_ID_COLUMN)} VARCHAR"


def build_merge_from(
    *,
    target: tuple[str, str, str],
    source: tuple[str, str, str],
    columns: Sequence[Column],
    primary_key: Sequence[str],
    cursor_column: str | None,
    run_id: str | None = None,
) -> Statement:
    """One MERGE of a work table into the target: newest row per key wins.

    The work table is de-duplicated by primary key keeping the highest cursor value; with a
    cursor an existing row is only overwritten by a row at least as new, so an older run
    delivered late cannot roll a row back. Without a cursor the run id (a UTC start time, so
    runs sort by age) plays that part: the target keeps it per row in RUN_ID_COLUMN (see
    ``build_add_run_id_column``), and a row is only overwritten by a run at least as new.
    """
    if not primary_key:
        raise PermanentError("merge needs a primary key", table=".".join(target))
    by_name = {c.name: c for c in columns}
    missing = [
        name for name in (*primary_key, *([cursor_column] if cursor_column else [])) if name not in by_name
    ]
    if missing:
        raise PermanentError(f"merge key/cursor column(s) not in the manifest: {', '.join(missing)}")
    keys = [quote_ident(by_name[name].snowflake_name) for name in primary_key]
    cursor = quote_ident(by_name[cursor_column].snowflake_name) if cursor_column else None
    run_guard = cursor is None and run_id is not None
    order = f"{cursor} DESC NULLS LAST" if cursor else keys[0]
    names = [quote_ident(c.snowflake_name) for c in columns]
    written = [*names, quote_ident(RUN_ID_COLUMN)] if run_guard else names
    on = " AND ".join(f'"TARGET".{k} = "SOURCE".{k}' for k in keys)
    updates = ", ".join(f'{n} = "SOURCE".{n}' for n in written if n not in keys)
    newest = cursor if cursor else (quote_ident(RUN_ID_COLUMN) if run_guard else None)
    newer = f' AND ("TARGET".{newest} IS NULL OR "SOURCE".{newest} >= "TARGET".{newest})' if newest else ""
    source_values = ", ".join('"SOURCE".' + n for n in written)
    matched = f"WHEN MATCHED{newer} THEN UPDATE SET {updates}\n" if updates else ""
    run_value = f", %s AS {quote_ident(RUN_ID_COLUMN)}" if run_guard else ""
    statement = (
        f'MERGE INTO {quote_qualified(*target)} AS "TARGET"\n'
        f"USING (SELECT *{run_value} FROM {quote_qualified(*source)}\n"
        f'       QUALIFY ROW_NUMBER() OVER (PARTITION BY {", ".join(keys)} ORDER BY {order}) = 1) AS "SOURCE"\n'
        f"ON {on}\n"
        f"{matched}"
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(written)})\n"
        f"VALUES ({source_values})"
    )
    return statement, ((run_id,) if run_guard else ())


def build_swap_with(table: tuple[str, str, str], other: tuple[str, str, str]) -> str:
    """Atomically exchange two tables: readers see the old table or the new one, never a mix."""
    return f"ALTER TABLE {quote_qualified(*table)} SWAP WITH {quote_qualified(*other)}"


def replace_run_tag(run_id: str) -> str:
    """The comment a replace run's shadow table carries into the target when they are swapped."""
    return f"pgsnow replace run {run_id}"


def build_set_table_comment(table: tuple[str, str, str], comment: str) -> str:
    return f"ALTER TABLE {quote_qualified(*table)} SET COMMENT = {string_literal(comment)}"


def build_select_table_comment(database: str, schema: str, table: str) -> Statement:
    """The table's comment: SWAP WITH exchanges it with the rest of the table's metadata."""
    sql = (
        f'SELECT "COMMENT" FROM {quote_ident(database)}."INFORMATION_SCHEMA"."TABLES"\n'
        'WHERE "TABLE_SCHEMA" = %s AND "TABLE_NAME" = %s'
    )
    return sql, (schema, table)


def build_rename_table(table: tuple[str, str, str], new: tuple[str, str, str]) -> str:
    return f"ALTER TABLE {quote_qualified(*table)} RENAME TO {quote_qualified(*new)}"


SOFT_DELETE_COLUMN = "_PGSNOW_DELETED_AT"


def build_add_soft_delete_column(target: tuple[str, str, str]) -> str:
    return (
        f"ALTER TABLE {quote_qualified(*target)} ADD COLUMN IF NOT EXISTS "
        f"{quote_ident(SOFT_DELETE_COLUMN)} TIMESTAMP_TZ(6)"
    )


def build_apply_deletes(
    *, target: tuple[str, str, str], keys_table: tuple[str, str, str], key_columns: Sequence[str], soft: bool
) -> str:
    """Delete (or mark deleted) the target rows whose primary key is not in the run's full key list."""
    if not key_columns:
        raise PermanentError("deletes need a primary key", table=".".join(target))
    match = " AND ".join(f'"KEYS".{quote_ident(k)} = "TARGET".{quote_ident(k)}' for k in key_columns)
    gone = f'NOT EXISTS (SELECT 1 FROM {quote_qualified(*keys_table)} AS "KEYS" WHERE {match})'
    if soft:
        column = quote_ident(SOFT_DELETE_COLUMN)
        return (
            f'UPDATE {quote_qualified(*target)} AS "TARGET" SET {column} = CURRENT_TIMESTAMP()\n'
            f'WHERE "TARGET".{column} IS NULL AND {gone}'
        )
    return f'DELETE FROM {quote_qualified(*target)} AS "TARGET"\nWHERE {gone}'
