"""pgsnow postgres-sql: the change-capture setup of PostgreSQL as text, in run order, and its CLI.

The same script runs against the real server in tests/integration/cdc/test_postgres_setup.py."""

from __future__ import annotations

import re

import pytest
from psycopg2 import sql

from pgsnow.cli import main
from pgsnow.config import HeartbeatMethod
from pgsnow.errors import ConfigError
from pgsnow.identifiers import TableRef
from pgsnow.postgres_setup import (
    PostgresSetupOptions,
    TableIdentity,
    build_postgres_setup,
    render_composable,
    render_postgres_setup,
    setup_statements,
)

pytestmark = pytest.mark.unit

ORDERS = TableRef("shop", "orders")
EVENTS = TableRef("shop", "events")  # no primary key
LINES = TableRef("shop", "lines")  # partitioned


def options(**overrides: object) -> PostgresSetupOptions:
    base: dict[str, object] = {"publication": "pgsnow_pub", "slot": "pgsnow_slot", "tables": [ORDERS, EVENTS]}
    return PostgresSetupOptions(**{**base, **overrides})  # type: ignore[arg-type]


def statements(setup: PostgresSetupOptions) -> list[str]:
    return setup_statements(build_postgres_setup(setup))


def first_index(all_statements: list[str], pattern: str) -> int:
    return next(i for i, s in enumerate(all_statements) if re.search(pattern, s))


def test_statements_come_in_run_order() -> None:
    # Given tables, one without a primary key (from the catalog)
    identities = {
        ORDERS: TableIdentity(ORDERS, exists=True, has_primary_key=True),
        EVENTS: TableIdentity(EVENTS, exists=True, has_primary_key=False),
    }
    ordered = statements(options(identities=identities, heartbeat=HeartbeatMethod.TABLE))
    # When each kind of statement is located
    positions = [
        first_index(ordered, pattern)
        for pattern in (
            r"^SHOW wal_level$",
            # replica identity before the publication: PostgreSQL refuses UPDATE/DELETE on a
            # published table without one
            r"^ALTER TABLE .* REPLICA IDENTITY FULL$",
            r"^CREATE TABLE IF NOT EXISTS \"public\".\"pgsnow_heartbeat\"",
            r"^CREATE PUBLICATION",
            r"^SELECT pg_create_logical_replication_slot",
            r"^CREATE ROLE",
            r"^GRANT CONNECT, TEMPORARY ON DATABASE",
            r"^GRANT USAGE ON SCHEMA",
            r"^GRANT SELECT ON TABLE",
        )
    ]
    # Then they come in the order they must run
    assert positions == sorted(positions)


def test_publication_slot_and_grants_name_every_table() -> None:
    text = render_postgres_setup(build_postgres_setup(options(database="shopdb")))
    assert (
        'CREATE PUBLICATION "pgsnow_pub" FOR TABLE "shop"."events", "shop"."orders" '
        "WITH (publish_via_partition_root = true);" in text
    )
    assert "SELECT pg_create_logical_replication_slot('pgsnow_slot', 'pgoutput');" in text
    assert 'CREATE ROLE "pgsnow_replication" WITH LOGIN REPLICATION;' in text
    assert 'GRANT CONNECT, TEMPORARY ON DATABASE "shopdb" TO "pgsnow_replication";' in text
    assert 'GRANT USAGE ON SCHEMA "shop" TO "pgsnow_replication";' in text
    assert 'GRANT SELECT ON TABLE "shop"."events", "shop"."orders" TO "pgsnow_replication";' in text
    # adding a table later is shown, as a comment
    assert '--   ALTER PUBLICATION "pgsnow_pub" ADD TABLE "<schema>"."<table>";' in text
    # Aurora's parameter and the WAL cap are explained
    assert "rds.logical_replication,ParameterValue=1" in text
    assert "max_slot_wal_keep_size" in text


def test_without_a_catalog_every_table_gets_the_advice_and_no_statement() -> None:
    text = render_postgres_setup(build_postgres_setup(options()))
    assert (
        'shop.orders: primary key (default) if it has one; otherwise run ALTER TABLE "shop"."orders"' in text
    )
    assert not [s for s in statements(options()) if "REPLICA IDENTITY" in s]
    assert "ON DATABASE <database>" in text


@pytest.mark.parametrize(
    ("identity", "expected_comment", "expected_statement"),
    [
        (TableIdentity(ORDERS, True, has_primary_key=True), "shop.orders: primary key (default)", None),
        (
            TableIdentity(ORDERS, True, has_primary_key=False),
            "shop.orders: no primary key: FULL",
            'ALTER TABLE "shop"."orders" REPLICA IDENTITY FULL',
        ),
        (
            TableIdentity(ORDERS, True, replica_identity="f"),
            "shop.orders: REPLICA IDENTITY FULL (already)",
            None,
        ),
        (
            TableIdentity(ORDERS, True, has_primary_key=True, replica_identity="n"),
            "shop.orders: REPLICA IDENTITY NOTHING",
            'ALTER TABLE "shop"."orders" REPLICA IDENTITY DEFAULT',
        ),
        (
            TableIdentity(
                ORDERS,
                True,
                has_primary_key=False,
                replica_identity="d",
                partitions_without_key=(TableRef("shop", "orders_2026"),),
            ),
            "partition shop.orders_2026 has no primary key",
            'ALTER TABLE "shop"."orders_2026" REPLICA IDENTITY FULL',
        ),
    ],
    ids=["primary-key", "no-key-full", "already-full", "nothing-with-key", "partition-leaf"],
)
def test_replica_identity_advice_follows_the_catalog(
    identity: TableIdentity, expected_comment: str, expected_statement: str | None
) -> None:
    setup = options(tables=[ORDERS], identities={ORDERS: identity})
    text = render_postgres_setup(build_postgres_setup(setup))
    assert expected_comment in text
    identity_statements = [s for s in statements(setup) if "REPLICA IDENTITY" in s]
    if expected_statement is None:
        assert identity_statements == []
    else:
        assert expected_statement in identity_statements


def test_heartbeat_table_is_created_published_and_granted() -> None:
    setup = options(heartbeat=HeartbeatMethod.TABLE, heartbeat_table=TableRef("ops", "beat"))
    text = render_postgres_setup(build_postgres_setup(setup))
    assert 'CREATE TABLE IF NOT EXISTS "ops"."beat"' in text
    assert 'FOR TABLE "shop"."events", "shop"."orders", "ops"."beat" WITH' in text
    assert 'GRANT USAGE ON SCHEMA "ops", "shop"' in text
    assert 'GRANT SELECT, INSERT, UPDATE ON TABLE "ops"."beat" TO "pgsnow_replication";' in text


def test_emit_message_granted_only_when_the_server_revoked_it_from_public() -> None:
    grant = 'GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text) TO "pgsnow_replication"'
    assert grant not in statements(options(message_function_public=True))
    assert grant in statements(options(message_function_public=False))


def test_names_and_values_are_quoted() -> None:
    # Given names with quotes in them
    setup = options(publication='pub"x', slot="it's", user='u"1', tables=[TableRef('we"ird', "t'1")])
    text = render_postgres_setup(build_postgres_setup(setup))
    # Then identifiers double their double quotes and literals their single quotes
    assert 'CREATE PUBLICATION "pub""x" FOR TABLE "we""ird"."t\'1"' in text
    assert "pg_create_logical_replication_slot('it''s', 'pgoutput')" in text
    assert 'CREATE ROLE "u""1" WITH LOGIN REPLICATION;' in text


@pytest.mark.parametrize(
    ("composable", "expected"),
    [
        (sql.Literal("a'b"), "'a''b'"),
        (sql.Literal("a\\b"), "E'a\\\\b'"),
        (sql.Literal(7), "7"),
        (sql.Literal(True), "true"),
        (sql.Identifier("s", 'a"b'), '"s"."a""b"'),
    ],
    ids=["quote", "backslash", "int", "bool", "identifier"],
)
def test_render_without_a_connection(composable: sql.Composable, expected: str) -> None:
    assert render_composable(composable) == expected


def test_a_table_missing_from_the_catalog_is_a_config_error() -> None:
    setup = options(tables=[ORDERS], identities={ORDERS: TableIdentity(ORDERS, exists=False)})
    with pytest.raises(ConfigError, match=r"shop\.orders is not in this database"):
        build_postgres_setup(setup)


def test_no_cdc_table_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match='no table has mode "cdc"'):
        build_postgres_setup(options(tables=[]))


def test_cli_prints_the_script_from_the_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a configuration with one cdc table (and no bucket: not needed for this)
    monkeypatch.delenv("S3_STAGE_BUCKET", raising=False)
    monkeypatch.setenv("PGSNOW_TABLES", "shop.orders,shop.customers")
    monkeypatch.setenv("PGSNOW_TABLE_OPTIONS", '{"shop.orders": {"mode": "cdc"}}')
    monkeypatch.setenv("CDC_PUBLICATION", "shop_pub")
    monkeypatch.setenv("CDC_SLOT", "shop_slot")
    # When the command runs without a DSN
    assert main(["postgres-sql", "--no-aurora"]) == 0
    out = capsys.readouterr().out
    # Then the script covers the cdc table only, under the configured names
    assert 'CREATE PUBLICATION "shop_pub" FOR TABLE "shop"."orders" WITH' in out
    assert "pg_create_logical_replication_slot('shop_slot', 'pgoutput')" in out
    assert "customers" not in out
    assert "rds.logical_replication" not in out
