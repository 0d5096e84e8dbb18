"""The change-apply SQL (pgsnow.snowflake.change_sql) and the applied position's (pgsnow.ledger), as
text; each statement also runs against the local Snowflake in
tests/integration/loader/test_apply_changes.py."""

from __future__ import annotations

import pytest

from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.ledger import (
    AppliedPosition,
    applied_position_key,
    build_advance_applied_position,
    build_forget_applied_position,
    build_insert_applied_position,
    build_select_applied_position,
)
from pgsnow.manifest import Column
from pgsnow.snowflake.change_sql import (
    ChangeMerge,
    ChangeScope,
    build_apply_truncate,
    build_fill_moved_rows,
    build_inspect_changes,
    build_merge_changes,
    change_work_columns,
)
from pgsnow.typemap import map_pg_type

pytestmark = pytest.mark.unit

TARGET = ("DB", "PUBLIC", "ITEMS")
WORK = ("DB", "PGSNOW", "_PGSNOW_CHANGES_1")
ITEMS = TableRef("public", "items")


def column(name: str, pg_type: str, nullable: bool = True) -> Column:
    return Column.from_types(name, pg_type, pg_type, map_pg_type(pg_type), nullable)


COLUMNS = (column("id", "bigint", False), column("name", "text"), column("doc", "text"))


def merge(
    *,
    soft: bool = False,
    unchanged: dict[str, tuple[str, ...]] | None = None,
    scope: ChangeScope | None = None,
) -> ChangeMerge:
    return ChangeMerge(
        target=TARGET,
        work=WORK,
        columns=COLUMNS,
        primary_key=("id",),
        scope=scope or ChangeScope(100),
        soft=soft,
        unchanged_lists=unchanged or {},
    )


def test_the_work_table_has_the_change_columns_then_the_data_columns_in_file_order() -> None:
    names = [c.snowflake_name for c in change_work_columns(COLUMNS)]
    assert names == [
        "_PGSNOW_OP",
        "_PGSNOW_LSN",
        "_PGSNOW_SEQ",
        "_PGSNOW_COMMITTED_AT",
        "_PGSNOW_UNCHANGED",
        "_PGSNOW_KEY_MOVED",
        "ID",
        "NAME",
        "DOC",
    ]
    assert [c.snowflake_type for c in change_work_columns(COLUMNS)][:4] == [
        "VARCHAR(134217728)",
        "NUMBER(20,0)",
        "NUMBER(38,0)",
        "TIMESTAMP_TZ(6)",
    ]
    with pytest.raises(PermanentError):
        change_work_columns((column("_pgsnow_op", "text"),))


def test_the_scope_is_at_or_after_the_applied_lsn_and_after_the_last_truncate() -> None:
    # at or after: the applied position is a run's end, where the next run's first commit can start
    assert ChangeScope(100).where() == ('"_PGSNOW_LSN" >= %s', (100,))
    sql, params = ChangeScope(100, (150, 3)).where("W")
    assert (
        sql
        == '"W"."_PGSNOW_LSN" >= %s AND ("W"."_PGSNOW_LSN" > %s OR ("W"."_PGSNOW_LSN" = %s AND "W"."_PGSNOW_SEQ" > %s))'
    )
    assert params == (100, 150, 150, 3)


def test_inspect_finds_the_last_truncate_the_unchanged_lists_and_the_key_moves_after_the_position() -> None:
    sql, params = build_inspect_changes(WORK, 100)
    assert 'WHERE "_PGSNOW_OP" = \'T\' AND "_PGSNOW_LSN" >= %s' in sql
    assert 'QUALIFY ROW_NUMBER() OVER (ORDER BY "_PGSNOW_LSN" DESC, "_PGSNOW_SEQ" DESC) = 1' in sql
    assert "SELECT DISTINCT 'U'" in sql and 'WHERE "_PGSNOW_KEY_MOVED" AND' in sql
    assert params == (100, 100, 100)


def test_truncate_deletes_every_row_hard_or_marks_the_undeleted_ones_with_its_commit_time() -> None:
    scope = ChangeScope(100, (150, 2))
    assert build_apply_truncate(TARGET, WORK, scope, soft=False) == ('DELETE FROM "DB"."PUBLIC"."ITEMS"', ())
    sql, params = build_apply_truncate(TARGET, WORK, scope, soft=True)
    assert sql.startswith('UPDATE "DB"."PUBLIC"."ITEMS" SET "_PGSNOW_DELETED_AT" = (')
    assert sql.endswith('WHERE "_PGSNOW_DELETED_AT" IS NULL') and params == (150, 2)
    with pytest.raises(PermanentError):
        build_apply_truncate(TARGET, WORK, ChangeScope(100), soft=False)


def test_merge_takes_the_newest_change_per_key_and_deletes_hard() -> None:
    sql, params = build_merge_changes(merge())
    assert sql.startswith('MERGE INTO "DB"."PUBLIC"."ITEMS" AS "TARGET"\nUSING (SELECT "NEWEST"."_PGSNOW_OP"')
    assert (
        'QUALIFY ROW_NUMBER() OVER (PARTITION BY "ID" ORDER BY "_PGSNOW_LSN" DESC, "_PGSNOW_SEQ" DESC) = 1'
        in sql
    )
    assert 'ON "TARGET"."ID" = "SOURCE"."_PGSNOW_R0"' in sql
    assert 'WHEN MATCHED AND "SOURCE"."_PGSNOW_OP" = \'D\' THEN DELETE\n' in sql
    assert 'THEN UPDATE SET "NAME" = "SOURCE"."_PGSNOW_R1", "DOC" = "SOURCE"."_PGSNOW_R2"\n' in sql
    assert 'WHEN NOT MATCHED AND "SOURCE"."_PGSNOW_OP" <> \'D\' THEN INSERT ("ID", "NAME", "DOC")' in sql
    assert "FIRST_VALUE" not in sql  # no unchanged column, no fill
    assert params == (100,)


def test_merge_soft_marks_deletes_with_the_commit_time_and_an_upsert_clears_the_mark() -> None:
    sql, _ = build_merge_changes(merge(soft=True))
    assert '"NEWEST"."_PGSNOW_COMMITTED_AT" AS "_PGSNOW_DELETE_AT"' in sql
    assert (
        'WHEN MATCHED AND "SOURCE"."_PGSNOW_OP" = \'D\' AND "TARGET"."_PGSNOW_DELETED_AT" IS NULL '
        'THEN UPDATE SET "_PGSNOW_DELETED_AT" = "SOURCE"."_PGSNOW_DELETE_AT"'
    ) in sql
    assert "LEFT JOIN" not in sql  # no unchanged column: the target is not joined
    assert '"DOC" = "SOURCE"."_PGSNOW_R2", "_PGSNOW_DELETED_AT" = NULL' in sql
    assert 'VALUES ("SOURCE"."_PGSNOW_R0", "SOURCE"."_PGSNOW_R1", "SOURCE"."_PGSNOW_R2", NULL)' in sql


def test_an_unchanged_column_is_gap_filled_from_the_run_else_kept_from_the_target() -> None:
    sql, params = build_merge_changes(
        merge(unchanged={"doc": ('["doc"]', '["doc","name"]')}, scope=ChangeScope(100, (150, 2)))
    )
    assert (
        'SUM(IFF("_PGSNOW_OP" <> \'D\' AND ("_PGSNOW_UNCHANGED" IS NULL OR "_PGSNOW_UNCHANGED" NOT IN (%s, %s)), 1, 0)) '
        'OVER (PARTITION BY "ID" ORDER BY "_PGSNOW_LSN", "_PGSNOW_SEQ" ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS "_PGSNOW_G0"'
    ) in sql
    assert (
        'FIRST_VALUE("DOC") OVER (PARTITION BY "ID", "_PGSNOW_G0" ORDER BY "_PGSNOW_LSN", "_PGSNOW_SEQ") AS "_PGSNOW_V0"'
        in sql
    )
    assert 'IFF("NEWEST"."_PGSNOW_K0", "CURRENT"."DOC", "NEWEST"."_PGSNOW_V0") AS "_PGSNOW_R2"' in sql
    assert params == ('["doc"]', '["doc","name"]', 100, 150, 150, 2)


def test_a_moved_row_takes_its_unchanged_values_from_the_delete_of_its_old_key() -> None:
    sql, params = build_fill_moved_rows(merge(unchanged={"doc": ('["doc"]',)}))
    assert sql.startswith(
        'UPDATE "DB"."PGSNOW"."_PGSNOW_CHANGES_1" AS "MOVED"\nSET "DOC" = IFF("MOVED"."_PGSNOW_UNCHANGED" IN (%s)'
    )
    assert '"_PGSNOW_UNCHANGED" = NULL' in sql
    # a D whose key was itself the new key of a move not filled yet waits for the next pass
    assert 'MAX(IFF("_PGSNOW_KEY_MOVED" AND "_PGSNOW_UNCHANGED" IS NOT NULL, 1, 0))' in sql
    assert '"OLD"."_PGSNOW_PENDING" = 0' in sql
    assert 'LEFT JOIN "DB"."PUBLIC"."ITEMS" AS "TARGET" ON "TARGET"."ID" = "OLD"."ID"' in sql
    assert (
        'AND "MOVED"."_PGSNOW_LSN" = "OLD"."_PGSNOW_LSN" AND "MOVED"."_PGSNOW_SEQ" = "OLD"."_PGSNOW_SEQ" + 1'
        in sql
    )
    assert params == ('["doc"]', '["doc"]', 100, 100)
    with pytest.raises(PermanentError):
        build_fill_moved_rows(merge())


def test_a_table_without_a_key_is_refused_and_nullable_key_columns_match_null() -> None:
    with pytest.raises(PermanentError, match="REPLICA IDENTITY FULL"):
        ChangeMerge(TARGET, WORK, COLUMNS, (), ChangeScope(0), False, {})
    full = ChangeMerge(TARGET, WORK, COLUMNS, ("id", "name", "doc"), ChangeScope(0), False, {})
    sql, _ = build_merge_changes(full)
    assert (
        'ON "TARGET"."ID" = "SOURCE"."_PGSNOW_R0" AND "TARGET"."NAME" IS NOT DISTINCT FROM "SOURCE"."_PGSNOW_R1"'
        in sql
    )
    assert (
        'WHEN MATCHED AND "SOURCE"."_PGSNOW_OP" <> \'D\'' not in sql
    )  # every column is key: nothing to update
    assert "LEFT JOIN" not in sql  # duplicate rows never join one change twice


def test_the_applied_position_is_one_reserved_ledger_row_moved_by_compare_and_set() -> None:
    key = applied_position_key(ITEMS)
    assert key == "_pgsnow/cdc/applied/public/items"
    sql, params = build_select_applied_position("DB", "PGSNOW", ITEMS)
    assert sql.endswith('WHERE "S3_KEY" = %s') and params == (key,)
    sql, params = build_insert_applied_position("DB", "PGSNOW", ITEMS, AppliedPosition(5, "R1", True))
    # Inserted only when missing, by a MERGE (it takes the ledger's lock; an INSERT would not)
    assert sql.startswith('MERGE INTO "DB"."PGSNOW"."LOAD_LEDGER__PUBLIC__ITEMS"')
    assert 'ON "LEDGER"."S3_KEY" = "POSITION"."S3_KEY"' in sql
    assert "WHEN NOT MATCHED THEN INSERT" in sql and "WHEN MATCHED" not in sql
    assert params == (key, "R1", "public", "items", 5, "SNAPSHOT")
    sql, params = build_advance_applied_position(
        "DB", "PGSNOW", ITEMS, AppliedPosition(5, "R1", True), AppliedPosition(9, "R2")
    )
    assert sql.endswith('WHERE "S3_KEY" = %s AND "ROWS_LOADED" = %s AND "RUN_ID" = %s')
    assert params == (9, "R2", "POSITION", key, 5, "R1")
    assert build_forget_applied_position("DB", "PGSNOW", ITEMS)[1] == (key,)
