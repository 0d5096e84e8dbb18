"""Partitioned tables, inheritance, views and materialized views: what selecting a schema replicates.

A schema selection replicates each row once: ordinary tables and partitioned tables' roots (with
every partition's rows), never the partitions or inheritance children on their own, never views.
A partition, a view or a materialized view is replicated when named, with the defaults (full mode,
replace). Each run is checked by ``pgsnow verify``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from psycopg2 import sql

from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.local.stack import SNOWFLAKE_DATABASE
from pgsnow.postgres import connect, list_schema_tables

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def relations(pipeline: PipelineHarness) -> dict[str, TableRef]:
    """Every kind of relation in the module's schema, by role."""
    schema = sql.Identifier(pipeline.schema)
    names = {
        "readings": "readings",  # partitioned by list, two partitions
        "readings_eu": "readings_eu",
        "readings_us": "readings_us",
        "cities": "cities",  # legacy inheritance parent
        "capitals": "capitals",  # its child
        "plain": "plain",
        "plain_view": "plain_view",
        "plain_matview": "plain_matview",
    }
    statements = [
        "CREATE TABLE {s}.readings (id integer, region text, value numeric(10, 2), PRIMARY KEY (id, region)) "
        "PARTITION BY LIST (region)",
        "CREATE TABLE {s}.readings_eu PARTITION OF {s}.readings FOR VALUES IN ('eu')",
        "CREATE TABLE {s}.readings_us PARTITION OF {s}.readings FOR VALUES IN ('us')",
        "INSERT INTO {s}.readings SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, i * 1.5 "
        "FROM generate_series(1, 30) AS i",
        "CREATE TABLE {s}.cities (name text, population integer)",
        "CREATE TABLE {s}.capitals (country text) INHERITS ({s}.cities)",
        "INSERT INTO {s}.cities VALUES ('Lyon', 500000), ('Porto', 230000)",
        "INSERT INTO {s}.capitals VALUES ('Paris', 2100000, 'FR'), ('Lisbon', 545000, 'PT')",
        "CREATE TABLE {s}.plain (id integer PRIMARY KEY, label text)",
        "INSERT INTO {s}.plain SELECT i, 'label ' || i FROM generate_series(1, 12) AS i",
        "CREATE VIEW {s}.plain_view AS SELECT id, upper(label) AS label FROM {s}.plain WHERE id % 2 = 0",
        "CREATE MATERIALIZED VIEW {s}.plain_matview AS SELECT id % 3 AS bucket, count(*) AS n "
        "FROM {s}.plain GROUP BY 1",
    ]
    for statement in statements:
        pipeline.run_sql(sql.SQL(statement).format(s=schema))
    return {role: pipeline.table(name) for role, name in names.items()}


def source_count(pipeline: PipelineHarness, table: TableRef) -> int:
    with pipeline.setup_conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table.schema, table.table)))
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def assert_equal(pipeline: PipelineHarness, table: TableRef) -> None:
    result = pipeline.verify(table)
    assert result.ok, result.to_dict()
    assert pipeline.target_count(table) == source_count(pipeline, table)


def snowflake_tables(pipeline: PipelineHarness) -> set[str]:
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(
            f"SELECT TABLE_NAME FROM {quote_qualified(SNOWFLAKE_DATABASE, 'INFORMATION_SCHEMA', 'TABLES')} "
            "WHERE TABLE_SCHEMA = %s",
            (pipeline.table("x").snowflake_schema,),
        )
        return {str(row[0]) for row in cur.fetchall()}


def test_selecting_the_schema_lists_roots_and_tables_only(
    pipeline: PipelineHarness, relations: dict[str, TableRef]
) -> None:
    # When the schema is turned into a table list
    conn = connect(pipeline.source_dsn)
    try:
        selected = list_schema_tables(conn, pipeline.schema)
    finally:
        conn.rollback()
        conn.close()

    # Then it holds the partitioned root, the inheritance parent and the plain table: not the
    # partitions, not the inheritance child (their rows come through the parent), not the views
    assert selected == [relations["cities"], relations["plain"], relations["readings"]]


def test_a_selected_schema_replicates_each_row_once_through_the_roots(
    pipeline: PipelineHarness, relations: dict[str, TableRef]
) -> None:
    # Given the schema's selection
    conn = connect(pipeline.source_dsn)
    try:
        selected = list_schema_tables(conn, pipeline.schema)
    finally:
        conn.rollback()
        conn.close()

    # When each selected table is replicated with default options
    manifests = [pipeline.replicate(table) for table in selected]

    # Then the root holds every partition's rows and the parent its child's, each equal to
    # PostgreSQL's reading of it, and no partition, child or view became a table of its own
    assert {m.write_mode for m in manifests} == {"replace"}
    for table in selected:
        assert_equal(pipeline, table)
    assert pipeline.target_count(relations["readings"]) == 30
    assert pipeline.target_count(relations["cities"]) == 4
    assert snowflake_tables(pipeline) == {t.snowflake_table for t in selected}


def test_a_partition_attached_and_another_detached_between_runs(
    pipeline: PipelineHarness, relations: dict[str, TableRef]
) -> None:
    # Given a partitioned table of its own, replicated through its root
    schema = sql.Identifier(pipeline.schema)
    root = pipeline.table("sensor")
    for statement in (
        "CREATE TABLE {s}.sensor (id integer, site text, reading double precision, PRIMARY KEY (site, id)) "
        "PARTITION BY LIST (site)",
        "CREATE TABLE {s}.sensor_a PARTITION OF {s}.sensor FOR VALUES IN ('a')",
        "CREATE TABLE {s}.sensor_b PARTITION OF {s}.sensor FOR VALUES IN ('b')",
        "INSERT INTO {s}.sensor SELECT i, CASE WHEN i <= 10 THEN 'a' ELSE 'b' END, i / 4.0 "
        "FROM generate_series(1, 20) AS i",
    ):
        pipeline.run_sql(sql.SQL(statement).format(s=schema))
    pipeline.replicate(root)
    assert_equal(pipeline, root)

    # When a filled table is attached as a new partition and partition b is detached
    for statement in (
        "CREATE TABLE {s}.sensor_c (id integer, site text, reading double precision, PRIMARY KEY (site, id))",
        "INSERT INTO {s}.sensor_c SELECT i, 'c', i FROM generate_series(100, 104) AS i",
        "ALTER TABLE {s}.sensor ATTACH PARTITION {s}.sensor_c FOR VALUES IN ('c')",
        "ALTER TABLE {s}.sensor DETACH PARTITION {s}.sensor_b",
    ):
        pipeline.run_sql(sql.SQL(statement).format(s=schema))
    pipeline.replicate(root)

    # Then Snowflake holds the root as it reads now: a's and c's rows, none of b's
    assert_equal(pipeline, root)
    assert pipeline.target_count(root) == 15

    # When b is attached again and a detached, and the root runs once more
    for statement in (
        "ALTER TABLE {s}.sensor ATTACH PARTITION {s}.sensor_b FOR VALUES IN ('b')",
        "ALTER TABLE {s}.sensor DETACH PARTITION {s}.sensor_a",
    ):
        pipeline.run_sql(sql.SQL(statement).format(s=schema))
    pipeline.replicate(root)

    # Then it follows again
    assert_equal(pipeline, root)
    assert pipeline.target_count(root) == 15


def test_a_named_partition_replicates_on_its_own(
    pipeline: PipelineHarness, relations: dict[str, TableRef]
) -> None:
    # When a partition is named
    manifest = pipeline.replicate(relations["readings_eu"])

    # Then it becomes its own table holding the partition's rows only
    assert manifest.write_mode == "replace"
    assert_equal(pipeline, relations["readings_eu"])
    assert pipeline.target_count(relations["readings_eu"]) == 15


@pytest.mark.parametrize("role", ["plain_view", "plain_matview"])
def test_a_named_view_replicates_full_and_replaced(
    pipeline: PipelineHarness, relations: dict[str, TableRef], role: str
) -> None:
    # Given a view (or materialized view) named on its own, replicated with the defaults
    view = relations[role]
    first = pipeline.replicate(view)
    assert (first.mode, first.write_mode, first.primary_key) == ("full", "replace", ())
    assert_equal(pipeline, view)

    # When its rows change (a matview is refreshed) and it runs again
    first_new_id = 100 if role == "plain_view" else 200
    pipeline.run_sql(
        sql.SQL("INSERT INTO {} SELECT i, 'late ' || i FROM generate_series(%s, %s) AS i").format(
            sql.Identifier(pipeline.schema, "plain")
        ),
        (first_new_id, first_new_id + 5),
    )
    if role == "plain_matview":
        pipeline.run_sql(
            sql.SQL("REFRESH MATERIALIZED VIEW {}").format(sql.Identifier(view.schema, view.table))
        )
    pipeline.replicate(view)

    # Then Snowflake holds what the view reads now, not two copies
    assert_equal(pipeline, view)


@pytest.mark.parametrize(
    ("role", "options", "expected"),
    [
        pytest.param(
            "plain_view",
            {"mode": "incremental", "cursor_column": "id"},
            "needs a primary key (the keyset tie-breaker and the merge key); a view has none: use mode full",
            id="incremental-view",
        ),
        pytest.param(
            "plain_matview",
            {"mode": "incremental", "cursor_column": "bucket"},
            "a materialized view has none: use mode full",
            id="incremental-matview",
        ),
        pytest.param(
            "plain_view",
            {"write_mode": "merge"},
            "write_mode merge (chosen) needs a primary key to match rows by, and the view",
            id="merge-view",
        ),
    ],
)
def test_a_view_is_refused_what_needs_a_primary_key(
    pipeline: PipelineHarness,
    relations: dict[str, TableRef],
    role: str,
    options: dict[str, Any],
    expected: str,
) -> None:
    with pytest.raises(PermanentError) as raised:
        pipeline.extract(
            relations[role], PGSNOW_TABLE_OPTIONS=json.dumps({relations[role].qualified: options})
        )

    assert expected in raised.value.message


def test_a_value_snowflake_cannot_hold_is_located_by_partition_on_a_root_without_key(
    pipeline: PipelineHarness,
) -> None:
    # Given a partitioned table without a primary key whose second partition holds an infinite date
    # (a ctid is unique only within one partition)
    schema = sql.Identifier(pipeline.schema)
    for statement in (
        "CREATE TABLE {s}.logbook (day date, note text) PARTITION BY RANGE (day)",
        "CREATE TABLE {s}.logbook_old PARTITION OF {s}.logbook FOR VALUES FROM (MINVALUE) TO ('2000-01-01')",
        "CREATE TABLE {s}.logbook_new PARTITION OF {s}.logbook FOR VALUES FROM ('2000-01-01') TO (MAXVALUE)",
        "INSERT INTO {s}.logbook VALUES ('1999-12-31', 'old'), ('2020-01-01', 'fine'), ('infinity', 'bad')",
    ):
        pipeline.run_sql(sql.SQL(statement).format(s=schema))

    # When the root is extracted, then the error names the partition and the row's ctid in it
    with pytest.raises(PermanentError) as raised:
        pipeline.extract(pipeline.table("logbook"))

    assert f"an infinite date/time at {pipeline.schema}.logbook_new ctid (0,2)" in raised.value.message
