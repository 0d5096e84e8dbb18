"""The slot's health and ``pgsnow status``'s slot section against a real slot on the local server
and the drain's state object in a moto bucket; a dropped slot is refused with the resnapshot command."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg2
import psycopg2.extras
import pytest
from cdc_support import ChangeCaptureSource, change_capture_source, drop_change_capture_source
from psycopg2 import sql
from stack_support import PG_DSN_DEFAULT, autocommit_connection, unique_name

from pgsnow.cdc.slot import SlotLostError, check_slot, resnapshot_command, slot_health
from pgsnow.changes import format_lsn
from pgsnow.config import Settings, postgres_env
from pgsnow.identifiers import TableRef
from pgsnow.local.aws import LocalAws
from pgsnow.status import StatusReport, collect_slot_statuses, drain_state_key

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 7, 8, 0, 0, tzinfo=UTC)


@pytest.fixture
def dsn() -> str:
    return postgres_env().get("PGSNOW_PG_DSN") or PG_DSN_DEFAULT


@pytest.fixture
def table(dsn: str) -> Iterator[TableRef]:
    schema = unique_name("pgsnow_slotstatus_")
    with autocommit_connection(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        cur.execute(
            sql.SQL("CREATE TABLE {}.items (id int PRIMARY KEY, v text)").format(sql.Identifier(schema))
        )
    yield TableRef(schema, "items")
    with autocommit_connection(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def source(dsn: str, table: TableRef) -> Iterator[ChangeCaptureSource]:
    with change_capture_source(dsn, [(table.schema, table.table)]) as created:
        yield created


@pytest.fixture
def bucket(aws: LocalAws) -> str:
    name = unique_name("pgsnow-slot-status-")
    aws.client("s3").create_bucket(Bucket=name)
    return name


def settings_for(bucket: str, table: TableRef, slot: str) -> Settings:
    return Settings.from_env(
        {
            "S3_STAGE_BUCKET": bucket,
            "PGSNOW_TABLES": table.qualified,
            "PGSNOW_TABLE_OPTIONS": json.dumps({table.qualified: {"mode": "cdc"}}),
            "CDC_SLOT": slot,
        }
    )


def insert_rows(dsn: str, table: TableRef, count: int) -> None:
    with autocommit_connection(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} SELECT g, repeat('x', 100) FROM generate_series(1, %s) g").format(
                sql.Identifier(table.schema, table.table)
            ),
            (count,),
        )


def test_health_of_a_new_slot_and_the_wal_it_retains(source: ChangeCaptureSource, table: TableRef) -> None:
    # Given a slot nobody drains
    with autocommit_connection(source.dsn) as conn:
        before = check_slot(conn, source.slot, [table])
        # When changes are written
        insert_rows(source.dsn, table, 2000)
        after = slot_health(conn, source.slot)
    # Then the slot is healthy, not held, pgoutput, and its retained WAL grew while its position did not
    assert before.exists and not before.lost and not before.active and before.plugin == "pgoutput"
    assert before.wal_status in {"reserved", "extended"}
    assert before.confirmed_flush_lsn is not None and before.restart_lsn is not None
    assert after.confirmed_flush_lsn == before.confirmed_flush_lsn
    assert before.retained_wal_bytes is not None and after.retained_wal_bytes is not None
    assert after.retained_wal_bytes > before.retained_wal_bytes


def test_status_shows_the_slot_with_the_drain_state(
    source: ChangeCaptureSource, table: TableRef, aws: LocalAws, bucket: str
) -> None:
    # Given the drain's state object (confirmed 90 s before NOW, heartbeat from 120 s before)
    s3 = aws.client("s3")
    state = {
        "confirmed_lsn": "0/0",
        "confirmed_at": "2026-12-07T07:58:30+00:00",
        "last_heartbeat": {"at": "2026-12-07T07:58:00Z", "lsn": "0/0"},
        "tables": {},
        "future_field": [1, 2],
    }
    s3.put_object(Bucket=bucket, Key=drain_state_key(source.slot), Body=json.dumps(state).encode())
    settings = settings_for(bucket, table, source.slot)
    # When status reads the slot
    with autocommit_connection(source.dsn) as conn:
        [status] = collect_slot_statuses(settings=settings, s3=s3, pg_conn=conn, now=NOW)
        health = slot_health(conn, source.slot)
    # Then it combines the server's view and the drain's
    assert status.slot == source.slot
    assert status.state == "INACTIVE"  # between runs no drain holds it
    assert health.confirmed_flush_lsn is not None
    assert status.confirmed_lsn == format_lsn(health.confirmed_flush_lsn)
    assert status.seconds_since_confirmation == 90
    assert status.lag_seconds == 120
    assert status.retained_wal_bytes is not None and status.retained_wal_bytes >= 0
    assert status.tables == [table.qualified]
    report = StatusReport(slots=[status])
    text = "\n".join(report.format_lines())
    assert f"slot {source.slot}: INACTIVE" in text and "lag                   2m00s" in text
    assert json.loads(report.to_json())["slots"][0]["lag_seconds"] == 120


def test_a_held_slot_is_active_with_its_consumer(
    source: ChangeCaptureSource, table: TableRef, aws: LocalAws, bucket: str
) -> None:
    # Given a replication connection streaming the slot (as a drain does)
    replication = psycopg2.connect(
        source.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    try:
        with replication.cursor() as stream:
            stream.start_replication(
                slot_name=source.slot,
                decode=False,
                options={"proto_version": "1", "publication_names": source.publication},
            )
            # When status reads the slot (the walsender marks it active once it starts streaming)
            with autocommit_connection(source.dsn) as conn:
                health = slot_health(conn, source.slot)
                for _ in range(3000):  # bounded: a broken stream fails the assertion below, not a hang
                    if health.active:
                        break
                    stream.read_message()  # lets the server finish starting the stream
                    time.sleep(0.01)
                    health = slot_health(conn, source.slot)
                [status] = collect_slot_statuses(
                    settings=settings_for(bucket, table, source.slot),
                    s3=aws.client("s3"),
                    pg_conn=conn,
                    now=NOW,
                )
    finally:
        replication.close()
    # Then it is held, by a walsender, and shown OK
    assert health.active and health.active_pid is not None
    assert status.state == "OK" and status.active


def test_status_without_a_drain_state_still_shows_the_slot(
    source: ChangeCaptureSource, table: TableRef, aws: LocalAws, bucket: str
) -> None:
    with autocommit_connection(source.dsn) as conn:
        [status] = collect_slot_statuses(
            settings=settings_for(bucket, table, source.slot), s3=aws.client("s3"), pg_conn=conn, now=NOW
        )
    assert status.state == "INACTIVE" and status.confirmed_at is None and status.lag_seconds is None


def test_a_dropped_slot_is_lost_refused_and_shown_with_the_resnapshot_command(
    source: ChangeCaptureSource, table: TableRef, aws: LocalAws, bucket: str
) -> None:
    # Given the slot was dropped (as in a failover to a server without it)
    drop_change_capture_source(source.dsn, publication=source.publication, slot=source.slot)
    command = resnapshot_command(source.slot, [table])
    with autocommit_connection(source.dsn) as conn:
        # When the drain checks it, it refuses, naming the tables and the command
        with pytest.raises(SlotLostError) as refused:
            check_slot(conn, source.slot, [table])
        # and status shows LOST with the command
        [status] = collect_slot_statuses(
            settings=settings_for(bucket, table, source.slot), s3=aws.client("s3"), pg_conn=conn, now=NOW
        )
    assert table.qualified in str(refused.value) and command in str(refused.value)
    assert not refused.value.retryable
    assert status.state == "LOST" and status.resnapshot_command == command
    assert command == f"pgsnow cdc resnapshot --slot {source.slot} --tables {table.qualified}"
    assert f"re-snapshot its tables: {command}" in "\n".join(StatusReport(slots=[status]).format_lines())


def test_an_unreachable_database_shows_the_slot_unknown_from_the_drain_state(
    table: TableRef, aws: LocalAws, bucket: str
) -> None:
    s3 = aws.client("s3")
    state = {"confirmed_lsn": "0/5000", "confirmed_at": "2026-12-07T07:59:00Z"}
    s3.put_object(Bucket=bucket, Key=drain_state_key("lost_db_slot"), Body=json.dumps(state).encode())
    [status] = collect_slot_statuses(
        settings=settings_for(bucket, table, "lost_db_slot"), s3=s3, pg_conn=None, now=NOW, pg_error="refused"
    )
    assert (status.state, status.confirmed_lsn, status.seconds_since_confirmation) == (
        "UNKNOWN",
        "0/5000",
        60,
    )
    assert "PostgreSQL not reachable: refused" in "\n".join(StatusReport(slots=[status]).format_lines())
