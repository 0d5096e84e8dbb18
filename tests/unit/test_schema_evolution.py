"""pgsnow.schema_evolution.plan_table_changes: the compatibility rules, one case per change."""

from __future__ import annotations

import pytest

from pgsnow.errors import PermanentError
from pgsnow.manifest import Column
from pgsnow.schema_evolution import (
    MAX_VARCHAR,
    ExistingColumn,
    TableChanges,
    existing_from_published,
    plan_table_changes,
)
from pgsnow.typemap import TEXT_COLUMN_LENGTH, map_pg_type

pytestmark = pytest.mark.unit


def column(name: str, pg_type: str, *, nullable: bool = True) -> Column:
    return Column.from_types(name, pg_type, pg_type, map_pg_type(pg_type), nullable)


def existing(name: str, pg_type: str, *, nullable: bool = True) -> ExistingColumn:
    return existing_from_published(column(name, pg_type, nullable=nullable))


ID = column("id", "integer", nullable=False)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param(
            [existing("id", "integer", nullable=False)],
            [ID, column("note", "text")],
            TableChanges(added=(column("note", "text"),)),
            id="column-added",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False)],
            [ID, column("flag", "integer", nullable=False)],
            TableChanges(added=(column("flag", "integer", nullable=False),)),
            id="not-null-column-added",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("gone", "text")],
            [ID],
            TableChanges(dropped=("GONE",)),
            id="nullable-column-dropped",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("code", "text", nullable=False)],
            [ID],
            TableChanges(relaxed=("CODE",), dropped=("CODE",)),
            id="not-null-column-dropped",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("note", "text")],
            [ID, column("remark", "text")],
            TableChanges(added=(column("remark", "text"),), dropped=("NOTE",)),
            id="column-renamed",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("code", "text", nullable=False)],
            [ID, column("code", "text")],
            TableChanges(relaxed=("CODE",)),
            id="drop-not-null",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("code", "text")],
            [ID, column("code", "text", nullable=False)],
            TableChanges(kept_nullable=("CODE",)),
            id="set-not-null",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("n", "smallint")],
            [ID, column("n", "bigint")],
            TableChanges(),
            id="smallint-to-bigint",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("amount", "numeric(6,2)")],
            [ID, column("amount", "numeric(14,2)")],
            TableChanges(widened=(column("amount", "numeric(14,2)"),)),
            id="numeric-precision-up",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("amount", "numeric(14,2)")],
            [ID, column("amount", "numeric(6,2)")],
            TableChanges(),
            id="numeric-precision-down-held",
        ),
        pytest.param(
            [existing("id", "integer", nullable=False), existing("amount", "numeric(10,2)")],
            [
                ID,
                Column(
                    "amount", "numeric", "numeric", map_pg_type("numeric").kind, "NUMBER(38,2)", True, 38, 2
                ),
            ],
            TableChanges(
                widened=(
                    Column(
                        "amount",
                        "numeric",
                        "numeric",
                        map_pg_type("numeric").kind,
                        "NUMBER(38,2)",
                        True,
                        38,
                        2,
                    ),
                )
            ),
            id="numeric-to-unbounded-at-the-same-scale",
        ),
    ],
)
def test_changes_the_table_can_take(
    before: list[ExistingColumn], after: list[Column], expected: TableChanges
) -> None:
    assert plan_table_changes("public.t", before, after) == expected


def test_a_longer_varchar_widens_and_a_shorter_one_is_held() -> None:
    # Given a VARCHAR(10) column (a table created by hand or an older mapping)
    short = ExistingColumn("CODE", "TEXT", None, None, 10)
    longer = Column("code", "varchar(20)", "varchar(20)", map_pg_type("text").kind, "VARCHAR(20)", True)
    shorter = Column("code", "varchar(5)", "varchar(5)", map_pg_type("text").kind, "VARCHAR(5)", True)
    unbounded = column("code", "text")

    assert plan_table_changes("public.t", [short], [longer]).widened == (longer,)
    assert plan_table_changes("public.t", [short], [unbounded]).widened == (unbounded,)
    assert plan_table_changes(
        "public.t", [ExistingColumn("CODE", "TEXT", None, None, MAX_VARCHAR)], [shorter]
    ).empty


@pytest.mark.parametrize(
    ("before", "after", "words"),
    [
        pytest.param(
            "numeric(10,4)", "numeric(10,2)", ("NUMBER(10,4)", "NUMBER(10,2)", "scale"), id="scale-down"
        ),
        pytest.param("numeric(10,2)", "numeric", ("NUMBER(10,2)", "NUMBER(38,10)", "scale"), id="scale-up"),
        pytest.param(
            "timestamp without time zone",
            "timestamp with time zone",
            ("TIMESTAMP_NTZ", "TIMESTAMP_TZ(6)"),
            id="timestamp-to-timestamptz",
        ),
        pytest.param(
            "timestamp with time zone",
            "timestamp without time zone",
            ("TIMESTAMP_TZ", "TIMESTAMP_NTZ(6)"),
            id="timestamptz-to-timestamp",
        ),
        pytest.param("integer", "text", ("NUMBER(38,0)", "VARCHAR"), id="integer-to-text"),
        pytest.param("text", "integer", ("VARCHAR", "NUMBER(38,0)"), id="text-to-integer"),
        pytest.param("double precision", "numeric(10,2)", ("FLOAT", "NUMBER(10,2)"), id="float-to-numeric"),
        pytest.param("jsonb", "text", ("VARIANT", "VARCHAR"), id="json-to-text"),
    ],
)
def test_changes_the_table_cannot_take_are_refused_naming_the_column_and_both_types(
    before: str, after: str, words: tuple[str, ...]
) -> None:
    with pytest.raises(PermanentError) as refused:
        plan_table_changes(
            "public.t",
            [existing("id", "integer", nullable=False), existing("v", before)],
            [ID, column("v", after)],
        )
    assert refused.value.table == "public.t"
    assert "column V" in refused.value.message
    for word in words:
        assert word in refused.value.message
    assert "write_mode=replace" in refused.value.message


def test_one_incompatible_column_refuses_the_whole_plan() -> None:
    # Given a run that adds a column and changes another incompatibly, Then nothing is planned at all
    with pytest.raises(PermanentError, match="column V"):
        plan_table_changes(
            "public.t",
            [existing("id", "integer"), existing("v", "integer")],
            [column("id", "integer"), column("v", "text"), column("new", "text")],
        )


def test_information_schema_spellings_are_one_family() -> None:
    # INFORMATION_SCHEMA says TEXT for VARCHAR and NUMBER with precision/scale apart
    table = [
        ExistingColumn("N", "NUMBER", 38, 0, None),
        ExistingColumn("S", "TEXT", None, None, TEXT_COLUMN_LENGTH),
    ]
    assert plan_table_changes("public.t", table, [column("n", "bigint"), column("s", "text")]).empty


def test_a_text_column_of_snowflakes_default_length_is_widened_to_the_largest() -> None:
    # A table created before text columns were declared VARCHAR(134217728) holds 16 MB values
    table = [ExistingColumn("S", "TEXT", None, None, MAX_VARCHAR)]
    changes = plan_table_changes("public.t", table, [column("s", "text")])
    assert [c.snowflake_type for c in changes.widened] == [f"VARCHAR({TEXT_COLUMN_LENGTH})"]
