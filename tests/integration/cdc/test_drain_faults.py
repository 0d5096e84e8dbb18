"""Faults of the change-capture run: it dies before confirming, the deadline cuts a transaction, and
a large transaction drains with bounded memory. Real PostgreSQL (a slot of the test's own) and moto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest
from cdc_support import change_capture_source
from drain_support import cdc_manifests, cdc_settings, read_csv_object, run_sql, slot_position
from psycopg2 import sql
from stack_support import unique_name

from pgsnow.cdc.drain import drain_slot
from pgsnow.changes import parse_lsn
from pgsnow.identifiers import TableRef
from pgsnow.manifest import RunState
from pgsnow.runs import RunStore

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[3] / "bench" / "cdc_big_transaction.py"


class Died(Exception):
    """The invocation 'dies' here (the Lambda would be killed; the process state is lost)."""


@pytest.fixture
def shop(admin: psycopg2.extensions.connection, schema_name: str) -> Iterator[tuple[TableRef, Any]]:
    table = TableRef(schema_name, unique_name("items_", 6))
    run_sql(
        admin,
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text)").format(
            sql.Identifier(table.schema, table.table)
        ),
    )
    with change_capture_source(admin.dsn, [(table.schema, table.table)]) as source:
        yield table, source


def die() -> None:
    raise Died


def test_dies_after_files_before_confirming_the_next_run_replays_and_supersedes(
    admin: psycopg2.extensions.connection, pg_dsn: str, s3: Any, bucket: str, shop: tuple[TableRef, Any]
) -> None:
    table, source = shop
    ident = sql.Identifier(table.schema, table.table)
    settings = cdc_settings(bucket, pg_dsn, source, [table])
    store = RunStore(s3, bucket)
    run_sql(admin, sql.SQL("INSERT INTO {} VALUES (1, 'a')").format(ident))
    drain_slot(settings, dsn=pg_dsn, s3=s3)  # a first run, so the table's chain does not start at 0
    confirmed_before, _ = slot_position(admin, source.slot)
    # Given a run that staged its files, manifest and state, then died before confirming
    run_sql(admin, sql.SQL("INSERT INTO {} VALUES (2, 'b')").format(ident))
    run_sql(admin, sql.SQL("UPDATE {} SET name = 'c' WHERE id = 1").format(ident))
    with pytest.raises(Died):
        drain_slot(settings, dsn=pg_dsn, s3=s3, before_confirm=die)
    _, dead = cdc_manifests(store, table)
    assert dead.state is RunState.STAGED and dead.files
    # Then the slot did not move
    assert slot_position(admin, source.slot)[0] == confirmed_before
    # When the next run starts
    run_sql(admin, sql.SQL("DELETE FROM {} WHERE id = 2").format(ident))
    replay = drain_slot(settings, dsn=pg_dsn, s3=s3)
    # Then it re-read the dead run's changes (and the newer one), from the same position
    assert parse_lsn(replay["start_lsn"]) == confirmed_before
    assert replay["tables"] == {table.qualified: 3} and replay["confirmed"]
    first, dead, new = cdc_manifests(store, table)
    # And the dead run's manifest is failed, naming the run that re-read its changes
    assert dead.state is RunState.FAILED
    assert dead.error == f"superseded: the run died before confirming; run {new.run_id} re-read its changes"
    # And the new manifest chains from where the dead one did: the same after_lsn
    assert first.changes is not None and dead.changes is not None and new.changes is not None
    assert new.changes.after_lsn == dead.changes.after_lsn == first.changes.end_lsn
    assert new.changes.end_lsn == slot_position(admin, source.slot)[0]
    records = read_csv_object(s3, bucket, new.files[0].key)
    assert [(r[0], r[6], r[7]) for r in records[1:]] == [("I", "2", "b"), ("U", "1", "c"), ("D", "2", None)]
    state = store.load_drain_state(source.slot)
    assert state is not None and state.last_run_id == new.run_id and state.last_run_finished


def test_dies_before_its_state_is_written_the_next_run_supersedes_it_too(
    admin: psycopg2.extensions.connection, pg_dsn: str, s3: Any, bucket: str, shop: tuple[TableRef, Any]
) -> None:
    table, source = shop
    settings = cdc_settings(bucket, pg_dsn, source, [table])
    store = RunStore(s3, bucket)
    run_sql(
        admin, sql.SQL("INSERT INTO {} VALUES (1, 'a')").format(sql.Identifier(table.schema, table.table))
    )
    # Given a run that died while uploading (its manifest written, the state still "unfinished")
    original = store.save_drain_state

    def fail_on_finish(state: Any, **kwargs: Any) -> Any:
        if state.last_run_finished:
            raise Died
        return original(state, **kwargs)

    store_patch = pytest.MonkeyPatch()
    store_patch.setattr(RunStore, "save_drain_state", lambda self, state, **kw: fail_on_finish(state, **kw))
    try:
        with pytest.raises(Died):
            drain_slot(settings, dsn=pg_dsn, s3=s3)
    finally:
        store_patch.undo()
    (dead,) = cdc_manifests(store, table)
    state = store.load_drain_state(source.slot)
    assert state is not None and state.last_run_id == dead.run_id and not state.last_run_finished
    # When the next run drains
    drain_slot(settings, dsn=pg_dsn, s3=s3)
    # Then the dead run is failed and the replay starts the table's chain where the dead one did (0)
    dead, new = cdc_manifests(store, table)
    assert dead.state is RunState.FAILED and new.state is RunState.STAGED
    assert new.changes is not None and new.changes.after_lsn == 0


def test_a_deadline_in_the_middle_of_a_transaction_stages_none_of_it(
    admin: psycopg2.extensions.connection, pg_dsn: str, s3: Any, bucket: str, shop: tuple[TableRef, Any]
) -> None:
    table, source = shop
    ident = sql.Identifier(table.schema, table.table)
    settings = cdc_settings(bucket, pg_dsn, source, [table])
    store = RunStore(s3, bucket)
    # Given a small transaction, then one of 2000 inserts
    run_sql(admin, sql.SQL("INSERT INTO {} VALUES (0, 'small')").format(ident))
    run_sql(admin, sql.SQL("INSERT INTO {} SELECT g, 'big' FROM generate_series(1, 2000) g").format(ident))
    # When the deadline passes after 1000 messages (within the big transaction's inserts)
    ticks = iter(range(10**9))

    def clock() -> float:
        return float("inf") if next(ticks) >= 1000 else 0.0

    cut = drain_slot(settings, dsn=pg_dsn, s3=s3, clock=clock)
    # Then only the small transaction is staged and confirmed, nothing of the big one
    assert cut["stop_reason"] == "deadline" and cut["tables"] == {table.qualified: 1}
    (manifest,) = cdc_manifests(store, table)
    records = read_csv_object(s3, bucket, manifest.files[0].key)
    assert [(r[0], r[6], r[7]) for r in records[1:]] == [("I", "0", "small")]
    assert manifest.changes is not None and manifest.changes.last_commit_lsn is not None
    assert slot_position(admin, source.slot)[0] == parse_lsn(cut["end_lsn"])
    assert parse_lsn(cut["end_lsn"]) > manifest.changes.last_commit_lsn
    # And the next run reads the big transaction whole, chained after the cut run
    whole = drain_slot(settings, dsn=pg_dsn, s3=s3)
    assert whole["tables"] == {table.qualified: 2000}
    _, second = cdc_manifests(store, table)
    assert second.changes is not None and second.changes.after_lsn == manifest.changes.end_lsn
    assert sum(f.rows for f in second.files) == 2000


def test_a_200_mb_transaction_drains_within_256_mb(
    admin: psycopg2.extensions.connection, pg_dsn: str, aws: Any, bucket: str, shop: tuple[TableRef, Any]
) -> None:
    table, source = shop
    # The drain in a process of its own (bench/cdc_big_transaction.py), so its peak RSS is its own.
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "src"),
        "AWS_ACCESS_KEY_ID": aws.access_key_id,
        "AWS_SECRET_ACCESS_KEY": aws.secret_access_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_METRICS_DISABLED": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--gigabytes",
            "0.2",
            "--dsn",
            pg_dsn,
            "--table",
            table.qualified,
            "--slot",
            source.slot,
            "--publication",
            source.publication,
            "--bucket",
            bucket,
            "--s3-endpoint",
            aws.endpoint_url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["changes"] == report["rows_written"] and report["confirmed"]
    assert report["peak_rss_mb"] <= 256, report
