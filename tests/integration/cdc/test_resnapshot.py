"""``pgsnow cdc resnapshot`` against the local server: the plan for a dropped slot, the refusal of a
healthy one, the slot re-created as pgoutput, and what ``--execute`` forgets: the table's applied
position in its ledger (the local Snowflake, through the real connector) and its change chain in the
slot's drain state (moto S3), after which the drain's next run of the table starts a new chain.
(Forgetting the enrollment is pgsnow.cdc.enroll.reset_enrollment; the test of --execute checks it too.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import snowflake.connector
from cdc_support import ChangeCaptureSource, change_capture_source, drop_change_capture_source
from drain_support import cdc_manifests, cdc_settings
from psycopg2 import sql
from stack_support import PG_DSN_DEFAULT, autocommit_connection, unique_name

from pgsnow.cdc.drain import drain_slot
from pgsnow.cdc.slot import slot_health
from pgsnow.cli import main
from pgsnow.cli_cdc import forget_positions, recreate_slot, reset_change_chains
from pgsnow.config import Settings, postgres_env
from pgsnow.identifiers import TableRef
from pgsnow.ledger import AppliedPosition, Ledger
from pgsnow.local.aws import LocalAws
from pgsnow.local.snowflake import LocalSnowflake, start_local_snowflake
from pgsnow.runs import DrainState, Enrollment, RunStore
from pgsnow.snowflake.table_sql import build_create_schema

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
        f"1. {table.qualified}: forget its enrollment, the position its changes were applied through "
        "and its change chain"
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


@pytest.fixture(scope="module")
def local_snowflake(aws: LocalAws) -> Iterator[LocalSnowflake]:
    server = start_local_snowflake(
        s3_endpoint_url=aws.endpoint_url,
        aws_access_key_id=aws.access_key_id,
        aws_secret_access_key=aws.secret_access_key,
    )
    yield server
    server.stop()


@pytest.fixture
def settings(bucket: str, source: ChangeCaptureSource, table: TableRef) -> Settings:
    """Change capture of ``table`` through the test's slot, with a Snowflake database of its own."""
    return cdc_settings(
        bucket,
        source.dsn,
        source,
        [table],
        SNOWFLAKE_ACCOUNT="local",
        SNOWFLAKE_USER="pgsnow",
        SNOWFLAKE_PASSWORD="local",
        SNOWFLAKE_DATABASE=unique_name("DB_RESNAP_").upper(),
    )


@pytest.fixture
def sf_conn(local_snowflake: LocalSnowflake, settings: Settings) -> Iterator[Any]:
    database = settings.snowflake.database
    assert database is not None
    conn = snowflake.connector.connect(**local_snowflake.connect_kwargs(database=database, schema="PUBLIC"))
    with conn.cursor() as cursor:
        cursor.execute(build_create_schema(database, settings.snowflake.control_schema))
    yield conn
    conn.close()


def test_execute_forgets_the_enrollment_applied_position_and_change_chain_of_the_affected_tables_only(
    source: ChangeCaptureSource,
    table: TableRef,
    settings: Settings,
    sf_conn: Any,
    s3: Any,
    bucket: str,
    local_snowflake: LocalSnowflake,
) -> None:
    # Given the table and another one applied through positions of the lost slot, and the slot's
    # drain state chaining both tables' change runs from there
    other = TableRef(table.schema, "not_resnapshotted")
    for name, lsn in ((table, 0x7000), (other, 0x6000)):
        ledger = Ledger.of(sf_conn, settings, name)
        ledger.create()
        assert ledger.advance(None, AppliedPosition(lsn, "20261207T000000Z-old"))
    store = RunStore(s3, bucket)
    store.save_drain_state(
        DrainState(
            slot=source.slot,
            confirmed_lsn=0xFFFF_FFFF_0000,  # far ahead: without the reset the next run chains from its start
            tables={table.qualified: 0xFFFF_FFFF_0000, other.qualified: 0x6000},
        )
    )
    for name in (table, other):
        assert store.write_enrollment(
            Enrollment(name, source.slot, 0x5000, "2026-12-07T00:00:00Z", "20261207T000000000000Z"),
            replacing=None,
        )
    # When resnapshot --execute forgets the table's positions
    forget_positions(
        settings=settings,
        slot=source.slot,
        tables=[table],
        s3=s3,
        sf_conn_factory=lambda _: snowflake.connector.connect(
            **local_snowflake.connect_kwargs(database=settings.snowflake.database, schema="PUBLIC")
        ),
    )
    saved = store.load_drain_state(source.slot)
    # Then the table is no longer enrolled (its next invocation takes a new snapshot) and the loader
    # has no position for it (it applies nothing until the new snapshot sets one); the other table
    # keeps its enrollment and position, and the drain state keeps everything but the table's chain
    assert store.read_enrollment(table) is None and store.read_enrollment(other) is not None
    assert Ledger.of(sf_conn, settings, table).applied_position() is None
    assert Ledger.of(sf_conn, settings, other).applied_position() == AppliedPosition(
        0x6000, "20261207T000000Z-old"
    )
    assert saved is not None
    state = store.load_drain_state(source.slot)
    assert state is not None and state.tables == {other.qualified: 0x6000}
    assert state.confirmed_lsn == 0xFFFF_FFFF_0000
    # And the drain's next run of the table starts a new chain (after_lsn 0, "first run")
    with autocommit_connection(source.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (id) VALUES (1)").format(sql.Identifier(table.schema, table.table))
        )
    outcome = drain_slot(settings, dsn=source.dsn, s3=s3)
    assert outcome["tables"] == {table.qualified: 1}
    (manifest,) = cdc_manifests(store, table)
    assert manifest.changes is not None and manifest.changes.after_lsn == 0


def test_reset_change_chains_without_a_drain_state_writes_nothing(
    source: ChangeCaptureSource, table: TableRef, s3: Any, bucket: str
) -> None:
    store = RunStore(s3, bucket)
    assert reset_change_chains(store, source.slot, [table]) is None
    assert store.load_drain_state(source.slot) is None


class Died(Exception):
    """The drain's process dying before it confirmed (the fault tests' seam)."""


def die() -> None:
    raise Died


def test_a_reset_chain_stays_reset_when_the_next_run_repairs_a_run_that_died(
    source: ChangeCaptureSource, table: TableRef, settings: Settings, s3: Any, bucket: str
) -> None:
    ident = sql.Identifier(table.schema, table.table)
    store = RunStore(s3, bucket)
    with autocommit_connection(source.dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} (id) VALUES (1)").format(ident))
        drain_slot(settings, dsn=source.dsn, s3=s3)  # the table's chain starts
        # Given a run that staged the table's changes (chained on the first run) and died unconfirmed
        cur.execute(sql.SQL("INSERT INTO {} (id) VALUES (2)").format(ident))
        with pytest.raises(Died):
            drain_slot(settings, dsn=source.dsn, s3=s3, before_confirm=die)
    first, dead = cdc_manifests(store, table)
    assert dead.changes is not None and first.changes is not None
    assert dead.changes.after_lsn == first.changes.end_lsn > 0
    # When the table's chain is reset (pgsnow cdc resnapshot) and the next run repairs the dead one
    reset_change_chains(store, source.slot, [table])
    drain_slot(settings, dsn=source.dsn, s3=s3)
    # Then the re-read run starts a new chain rather than the dead run's
    _, _, new = cdc_manifests(store, table)
    assert new.changes is not None and new.changes.after_lsn == 0
