"""SQL that applies a change run (pgsnow.changes) from its work table to the target table.

The loader COPYs a run's change files into a transient work table whose columns are the change
columns followed by the run's data columns (``change_work_columns``), then, in one transaction:
``build_inspect_changes`` (the last TRUNCATE, the unchanged-column lists, the key moves),
``build_apply_truncate`` when there is a TRUNCATE, ``build_fill_moved_rows`` when a moved row
left a column unchanged, and ``build_merge_changes``. Every statement considers only the run's
changes not yet applied (``ChangeScope``: commit LSN at or after the applied position), and after
its last TRUNCATE.

Unchanged TOASTed values: a column named in a change's ``_pgsnow_unchanged`` takes its value
from the newest earlier change of the same key in the run that carried it (an insert always
does), else from the target row. Done with a gap fill: per column, a running count of the
changes that carried it partitions the key's changes into groups, each led by a change that
carried the column, and ``FIRST_VALUE`` over the group gives every change its value; a count of
0 means no change of the run carried it, so the target's value is kept.

Pure functions, unit-tested as text (tests/unit/test_change_sql.py); every name is quoted and
every value bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pgsnow.changes import (
    CHANGE_COLUMN_TYPES,
    CHANGE_COLUMNS,
    COMMITTED_AT_COLUMN,
    KEY_MOVED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SEQ_COLUMN,
    UNCHANGED_COLUMN,
    Operation,
)
from pgsnow.errors import PermanentError
from pgsnow.identifiers import quote_ident, quote_qualified, snowflake_name
from pgsnow.manifest import Column
from pgsnow.snowflake.sql_text import Statement, placeholder_list
from pgsnow.snowflake.table_sql import SOFT_DELETE_COLUMN
from pgsnow.typemap import map_pg_type

Target = tuple[str, str, str]

OP = quote_ident(snowflake_name(OP_COLUMN))
LSN = quote_ident(snowflake_name(LSN_COLUMN))
SEQ = quote_ident(snowflake_name(SEQ_COLUMN))
COMMITTED_AT = quote_ident(snowflake_name(COMMITTED_AT_COLUMN))
UNCHANGED = quote_ident(snowflake_name(UNCHANGED_COLUMN))
KEY_MOVED = quote_ident(snowflake_name(KEY_MOVED_COLUMN))
DELETED_AT = quote_ident(SOFT_DELETE_COLUMN)

# What the inspection reports, one row per finding (build_inspect_changes).
FOUND_TRUNCATE = "T"
FOUND_UNCHANGED = "U"
FOUND_MOVED = "M"


def change_columns() -> tuple[Column, ...]:
    """The change columns as manifest columns (their staged types are fixed by the contract)."""
    return tuple(
        Column.from_types(
            name,
            CHANGE_COLUMN_TYPES[name],
            CHANGE_COLUMN_TYPES[name],
            map_pg_type(CHANGE_COLUMN_TYPES[name]),
            True,
        )
        for name in CHANGE_COLUMNS
    )


def change_work_columns(data_columns: Sequence[Column]) -> tuple[Column, ...]:
    """A change file's columns, in the file's order: the change columns, then the data columns."""
    clash = [c.name for c in data_columns if c.name in CHANGE_COLUMNS]
    if clash:
        raise PermanentError(f"a source column is named like a change column: {', '.join(clash)}")
    return (*change_columns(), *data_columns)


@dataclass(frozen=True)
class ChangeScope:
    """Which of the work table's changes count: those whose commit LSN is at or after the applied
    position, and after the run's last TRUNCATE (its LSN and sequence) when it has one.

    At or after, not after: the applied position is a run's ``end_lsn``, the end of its last commit
    record (the position the drain confirms to the slot), and the next record can be the commit
    of the next transaction, whose commit LSN (where its commit record starts) is then exactly
    that position (pgsnow.changes, "Chaining")."""

    applied_lsn: int
    truncate_at: tuple[int, int] | None = None

    def where(self, alias: str | None = None) -> Statement:
        prefix = "" if alias is None else f"{quote_ident(alias)}."
        sql = f"{prefix}{LSN} >= %s"
        params: tuple[int, ...] = (self.applied_lsn,)
        if self.truncate_at is not None:
            sql += f" AND ({prefix}{LSN} > %s OR ({prefix}{LSN} = %s AND {prefix}{SEQ} > %s))"
            lsn, seq = self.truncate_at
            params += (lsn, lsn, seq)
        return sql, params


def build_inspect_changes(work: Target, applied_lsn: int) -> Statement:
    """What the run holds at or after the applied position (``ChangeScope``), in one look: the last TRUNCATE (``T``,
    LSN, seq), each distinct ``_pgsnow_unchanged`` list (``U``, its text) and the number of key
    moves that left a column unchanged (``M``, count)."""
    table = quote_qualified(*work)
    sql = (
        'SELECT "FOUND", "LSN", "SEQ", "UNCHANGED" FROM (\n'
        f'  SELECT \'{FOUND_TRUNCATE}\' AS "FOUND", {LSN} AS "LSN", {SEQ} AS "SEQ", '
        'CAST(NULL AS VARCHAR) AS "UNCHANGED"\n'
        f"  FROM {table} WHERE {OP} = '{Operation.TRUNCATE.value}' AND {LSN} >= %s\n"
        f"  QUALIFY ROW_NUMBER() OVER (ORDER BY {LSN} DESC, {SEQ} DESC) = 1\n"
        "  UNION ALL\n"
        f"  SELECT DISTINCT '{FOUND_UNCHANGED}', CAST(NULL AS NUMBER(38,0)), CAST(NULL AS NUMBER(38,0)), {UNCHANGED}\n"
        f"  FROM {table} WHERE {UNCHANGED} IS NOT NULL AND {LSN} >= %s\n"
        "  UNION ALL\n"
        f"  SELECT '{FOUND_MOVED}', COUNT(*), CAST(NULL AS NUMBER(38,0)), CAST(NULL AS VARCHAR)\n"
        f"  FROM {table} WHERE {KEY_MOVED} AND {UNCHANGED} IS NOT NULL AND {LSN} >= %s\n"
        ")"
    )
    return sql, (applied_lsn, applied_lsn, applied_lsn)


def build_apply_truncate(target: Target, work: Target, scope: ChangeScope, *, soft: bool) -> Statement:
    """The run's last TRUNCATE: every target row deleted (hard), or every row not yet deleted
    marked with the TRUNCATE's commit time (soft)."""
    if scope.truncate_at is None:
        raise PermanentError("no TRUNCATE to apply", table=".".join(target))
    if not soft:
        return f"DELETE FROM {quote_qualified(*target)}", ()
    lsn, seq = scope.truncate_at
    sql = (
        f"UPDATE {quote_qualified(*target)} SET {DELETED_AT} = (\n"
        f"  SELECT MAX({COMMITTED_AT}) FROM {quote_qualified(*work)} WHERE {LSN} = %s AND {SEQ} = %s)\n"
        f"WHERE {DELETED_AT} IS NULL"
    )
    return sql, (lsn, seq)


@dataclass(frozen=True)
class ChangeMerge:
    """What the apply statements need to know of a run: its data columns, key and unchanged lists.

    ``unchanged_lists``: per PostgreSQL column name, the distinct ``_pgsnow_unchanged`` texts of
    the run that name it (``build_inspect_changes``); only those columns are gap-filled.
    """

    target: Target
    work: Target
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    scope: ChangeScope
    soft: bool
    unchanged_lists: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        if not self.primary_key:
            raise PermanentError(
                "change capture needs a key: a primary key, or REPLICA IDENTITY FULL (every column)",
                table=".".join(self.target),
            )
        names = {c.name for c in self.columns}
        missing = [name for name in self.primary_key if name not in names]
        if missing:
            raise PermanentError(f"key column(s) not in the change file: {', '.join(missing)}")

    @property
    def by_name(self) -> dict[str, Column]:
        return {c.name: c for c in self.columns}

    @property
    def keys(self) -> list[str]:
        return [quote_ident(self.by_name[name].snowflake_name) for name in self.primary_key]

    @property
    def filled(self) -> list[Column]:
        """The data columns some change of the run left unchanged (never a key column)."""
        key = set(self.primary_key)
        return [c for c in self.columns if self.unchanged_lists.get(c.name) and c.name not in key]

    def key_match(self, left: str, right: str) -> str:
        """Key equality; a nullable key column (REPLICA IDENTITY FULL) matches NULL to NULL."""
        parts = []
        for name in self.primary_key:
            column = self.by_name[name]
            ident = quote_ident(column.snowflake_name)
            op = "IS NOT DISTINCT FROM" if column.nullable else "="
            parts.append(f"{quote_ident(left)}.{ident} {op} {quote_ident(right)}.{ident}")
        return " AND ".join(parts)

    def carried(self, column: Column) -> Statement:
        """True on a change that carried the column's value (a delete carries none)."""
        texts = self.unchanged_lists[column.name]
        sql = (
            f"IFF({OP} <> '{Operation.DELETE.value}' AND ({UNCHANGED} IS NULL OR "
            f"{UNCHANGED} NOT IN ({placeholder_list(texts, empty_error='no unchanged lists')})), 1, 0)"
        )
        return sql, texts

    def filled_changes(self, *, newest_only: bool, pending_moves: bool = False) -> Statement:
        """The scope's changes with every filled column's value (``_PGSNOW_V{i}``) and whether the
        target's value is kept (``_PGSNOW_K{i}``, no change of the run carried it); with
        ``newest_only`` the newest change per key only; with ``pending_moves``, ``_PGSNOW_PENDING``
        is 1 from a key's moved change whose unchanged values are not filled yet on."""
        table = quote_qualified(*self.work)
        keys = ", ".join(self.keys)
        order = f"{LSN}, {SEQ}"
        scope_sql, scope_params = self.scope.where()
        groups: list[str] = []
        params: list[str] = []
        for i, column in enumerate(self.filled):
            carried_sql, carried_params = self.carried(column)
            groups.append(
                f"SUM({carried_sql}) OVER (PARTITION BY {keys} ORDER BY {order} "
                f'ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS "_PGSNOW_G{i}"'
            )
            params.extend(carried_params)
        values = []
        for i, column in enumerate(self.filled):
            ident = quote_ident(column.snowflake_name)
            values.append(
                f'FIRST_VALUE({ident}) OVER (PARTITION BY {keys}, "_PGSNOW_G{i}" ORDER BY {order}) AS "_PGSNOW_V{i}", '
                f'("_PGSNOW_G{i}" = 0) AS "_PGSNOW_K{i}"'
            )
        if pending_moves:
            groups.append(
                f"MAX(IFF({KEY_MOVED} AND {UNCHANGED} IS NOT NULL, 1, 0)) OVER (PARTITION BY {keys} "
                f'ORDER BY {order} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS "_PGSNOW_PENDING"'
            )
        inner = ", ".join(["*", *groups])
        outer = ", ".join(["*", *values])
        newest = (
            f"\nQUALIFY ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY {LSN} DESC, {SEQ} DESC) = 1"
            if newest_only
            else ""
        )
        sql = f'SELECT {outer} FROM (SELECT {inner} FROM {table} WHERE {scope_sql}) AS "CHANGES"{newest}'
        return sql, (*params, *scope_params)

    def value(self, column: Column, source: str, kept: str | None) -> str:
        """The column's new value from ``source``; a filled column's value, or ``kept`` when no
        change of the run carried it (None: the filled value as it is)."""
        ident = quote_ident(column.snowflake_name)
        if column not in self.filled:
            return f"{quote_ident(source)}.{ident}"
        i = self.filled.index(column)
        filled = f'{quote_ident(source)}."_PGSNOW_V{i}"'
        if kept is None:
            return filled
        return f'IFF({quote_ident(source)}."_PGSNOW_K{i}", {kept}, {filled})'


def build_fill_moved_rows(merge: ChangeMerge) -> Statement:
    """A moved row (``_pgsnow_key_moved``, the U right after the D of its old key) takes the values
    it left unchanged from its old key: the old key's newest earlier change in the run that
    carried them, else the old key's target row. Its unchanged list is then cleared, so the
    MERGE sees it as a change that carried every column.

    A row moved again in the same run (old key itself the new key of an earlier move) is filled
    only once the earlier move is: the caller repeats the statement while it fills rows
    (one pass per move of the longest chain)."""
    if not merge.filled:
        raise PermanentError("no unchanged column to fill", table=".".join(merge.target))
    filled_sql, filled_params = merge.filled_changes(newest_only=False, pending_moves=True)
    old_values = ", ".join(
        merge.value(c, "OLD", '"TARGET".' + quote_ident(c.snowflake_name)) + f' AS "_PGSNOW_O{i}"'
        for i, c in enumerate(merge.filled)
    )
    sets: list[str] = []
    set_params: list[str] = []
    for i, column in enumerate(merge.filled):
        ident = quote_ident(column.snowflake_name)
        texts = merge.unchanged_lists[column.name]
        sets.append(
            f'{ident} = IFF("MOVED".{UNCHANGED} IN ({placeholder_list(texts, empty_error="no lists")}), '
            f'"OLD"."_PGSNOW_O{i}", "MOVED".{ident})'
        )
        set_params.extend(texts)
    scope_sql, scope_params = merge.scope.where("MOVED")
    sql = (
        f'UPDATE {quote_qualified(*merge.work)} AS "MOVED"\n'
        f"SET {', '.join(sets)}, {UNCHANGED} = NULL\n"
        f'FROM (SELECT "OLD".{LSN}, "OLD".{SEQ}, {old_values}\n'
        f'      FROM ({filled_sql}) AS "OLD"\n'
        f'      LEFT JOIN {quote_qualified(*merge.target)} AS "TARGET" ON {merge.key_match("TARGET", "OLD")}\n'
        f'      WHERE "OLD".{OP} = \'{Operation.DELETE.value}\' AND "OLD"."_PGSNOW_PENDING" = 0) AS "OLD"\n'
        f'WHERE "MOVED".{KEY_MOVED} AND "MOVED".{UNCHANGED} IS NOT NULL AND {scope_sql}\n'
        f'AND "MOVED".{LSN} = "OLD".{LSN} AND "MOVED".{SEQ} = "OLD".{SEQ} + 1'
    )
    return sql, (*set_params, *filled_params, *scope_params)


def build_merge_changes(merge: ChangeMerge) -> Statement:
    """The newest change per key by (LSN, seq) into the target: D deletes (hard) or marks the row
    deleted at the commit time (soft); I and U upsert (soft: and clear the mark). A column the
    change left unchanged takes its filled value, or keeps the target's.

    Every value is resolved in the source (which joins the target for the kept values, only when
    a column was left unchanged: never for a key of every column, whose duplicate rows would
    otherwise join one change twice), so the WHEN clauses only copy source columns.
    """
    newest_sql, params = merge.filled_changes(newest_only=True)
    current = [
        merge.value(c, "NEWEST", '"CURRENT".' + quote_ident(c.snowflake_name)) + f' AS "_PGSNOW_R{i}"'
        for i, c in enumerate(merge.columns)
    ]
    if merge.soft:
        current.append(f'"NEWEST".{COMMITTED_AT} AS "_PGSNOW_DELETE_AT"')
    join = (
        f'\n  LEFT JOIN {quote_qualified(*merge.target)} AS "CURRENT" ON {merge.key_match("CURRENT", "NEWEST")}'
        if merge.filled
        else ""
    )
    source_sql = f'SELECT "NEWEST".{OP}, {", ".join(current)}\n  FROM ({newest_sql}) AS "NEWEST"{join}'

    key_names = set(merge.primary_key)
    resolved = {c.name: f'"SOURCE"."_PGSNOW_R{i}"' for i, c in enumerate(merge.columns)}
    key_match = " AND ".join(
        f'"TARGET".{quote_ident(merge.by_name[name].snowflake_name)} '
        f"{'IS NOT DISTINCT FROM' if merge.by_name[name].nullable else '='} {resolved[name]}"
        for name in merge.primary_key
    )
    updates = [
        f"{quote_ident(c.snowflake_name)} = {resolved[c.name]}"
        for c in merge.columns
        if c.name not in key_names
    ]
    names = [quote_ident(c.snowflake_name) for c in merge.columns]
    values = [resolved[c.name] for c in merge.columns]
    delete = f"WHEN MATCHED AND \"SOURCE\".{OP} = '{Operation.DELETE.value}'"
    if merge.soft:
        # A row deleted already keeps its first deletion time (the clause does not match it).
        delete += (
            f' AND "TARGET".{DELETED_AT} IS NULL THEN UPDATE SET {DELETED_AT} = "SOURCE"."_PGSNOW_DELETE_AT"'
        )
        updates.append(f"{DELETED_AT} = NULL")
        names.append(DELETED_AT)
        values.append("NULL")
    else:
        delete += " THEN DELETE"
    upsert = f"\"SOURCE\".{OP} <> '{Operation.DELETE.value}'"
    matched = f"WHEN MATCHED AND {upsert} THEN UPDATE SET {', '.join(updates)}\n" if updates else ""
    sql = (
        f'MERGE INTO {quote_qualified(*merge.target)} AS "TARGET"\n'
        f'USING ({source_sql}) AS "SOURCE"\n'
        f"ON {key_match}\n"
        f"{delete}\n"
        f"{matched}"
        f"WHEN NOT MATCHED AND {upsert} THEN INSERT ({', '.join(names)})\n"
        f"VALUES ({', '.join(values)})"
    )
    return sql, params
