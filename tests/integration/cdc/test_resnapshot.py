"""``pgsnow cdc resnapshot`` against the local server: the plan for a dropped slot, the refusal of a
healthy one, and the slot re-created as pgoutput. (Forgetting enrollments and applied positions
belongs to the handoff and apply work; it is exercised where they are.)"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from cdc_support import ChangeCaptureSource, change_capture_source, drop_change_capture_source
from psycopg2 import sql
from stack_support import PG_DSN_DEFAULT, autocommit_connection, unique_name

from pgsnow.cdc.slot import slot_health
from pgsnow.cli import main
from pgsnow.cli_cdc import recreate_slot
from pgsnow.config import postgres_env
from pgsnow.identifiers import TableRef

pytestmark = pytest.mark.integration


@pytest.fixture
def table() -> Iterator[TableRef]:
    dsn = postgres_env().get("PGSNOW_PG_DSN") or PG_DSN_DEFAULT
    schema = unique_name("pgsnow_resnapshot_")
    with autocommit_connection(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        cur.execute(sql.SQL("CREATE TABLE {}.items (id int PRIMARY KEY)").format(sql.Identifier(schema)))
    yield TableRef(schema, "items")
    with autocommit_connection(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def source(table: TableRef) -> Iterator[ChangeCaptureSource]:
    dsn = postgres_env().get("PGSNOW_PG_DSN") or PG_DSN_DEFAULT
    with change_capture_source(dsn, [(table.schema, table.table)]) as created:
        yield created


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, source: ChangeCaptureSource, table: TableRef) -> None:
    monkeypatch.setenv("S3_STAGE_BUCKET", "pgsnow-resnapshot-unused")
    monkeypatch.setenv("PGSNOW_PG_DSN", source.dsn)
    monkeypatch.setenv("PGSNOW_TABLES", table.qualified)
    monkeypatch.setenv("PGSNOW_TABLE_OPTIONS", json.dumps({table.qualified: {"mode": "cdc"}}))


@pytest.mark.usefixtures("environment")
def test_plan_for_a_dropped_slot_changes_nothing(
    source: ChangeCaptureSource, table: TableRef, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the slot was dropped
    drop_change_capture_source(source.dsn, publication=source.publication, slot=source.slot)
    # When the plan is asked for (no --execute)
    assert (
        main(["cdc", "resnapshot", "--slot", source.slot, "--extractor-function", "pgsnow-dev-extractor"])
        == 0
    )
    out = capsys.readouterr().out
    # Then it names the tables' steps in order, and nothing was created
    lines = [line.strip() for line in out.splitlines()]
    forget = lines.index(
        f"1. {table.qualified}: forget its enrollment and the position its changes were applied through"
    )
    create = lines.index(f"2. create the slot {source.slot} again")
    snapshot = lines.index(f"3. {table.qualified}: start its snapshot")
    assert forget < create < snapshot
    assert f"SELECT pg_create_logical_replication_slot('{source.slot}', 'pgoutput');" in lines
    assert "--function-name pgsnow-dev-extractor --invocation-type Event" in out
    assert "drop the lost slot" not in out  # the server does not list it
    with autocommit_connection(source.dsn) as conn:
        assert not slot_health(conn, source.slot).exists


@pytest.mark.usefixtures("environment")
def test_a_healthy_slot_is_not_resnapshotted(
    source: ChangeCaptureSource, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cdc", "resnapshot", "--slot", source.slot, "--execute"]) == 2
    assert "is healthy" in capsys.readouterr().err
    with autocommit_connection(source.dsn) as conn:
        assert slot_health(conn, source.slot).exists


def test_the_slot_is_created_again_as_pgoutput(source: ChangeCaptureSource) -> None:
    drop_change_capture_source(source.dsn, publication=source.publication, slot=source.slot)
    with autocommit_connection(source.dsn) as conn:
        recreate_slot(conn, source.slot, drop_first=False)
        health = slot_health(conn, source.slot)
    # (the fixture drops it again afterwards)
    assert health.exists and health.plugin == "pgoutput" and not health.lost
