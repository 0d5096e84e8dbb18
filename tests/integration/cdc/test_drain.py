"""The change-capture run against real servers: PostgreSQL (wal_level=logical) and a moto S3 server.

Staging (``pgsnow.cdc.stage``) is tested from hand-written spill files; the drain (``drain_slot``)
on a real slot of the test's own (``cdc_support.change_capture_source``).
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pyarrow.parquet as pq
import pytest
from cdc_support import change_capture_source
from drain_support import (
    HandColumn,
    HandRelation,
    HandSegment,
    cdc_manifests,
    cdc_settings,
    read_csv_object,
    relation_of,
    run_sql,
    slot_position,
    write_spill,
)
from psycopg2 import sql
from stack_support import postgres_secret_arn, unique_name

from pgsnow.cdc.drain import drain_slot
from pgsnow.cdc.reader import HEARTBEAT_PREFIX, open_stream
from pgsnow.cdc.slot import SlotLostError
from pgsnow.cdc.stage import connect_for_staging, stage_table, upload_files
from pgsnow.changes import CHANGE_COLUMNS, parse_lsn
from pgsnow.config import HeartbeatMethod, ValuePolicy
from pgsnow.errors import PermanentError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key
from pgsnow.local.aws import LocalAws
from pgsnow.local.dispatcher import LambdaContext
from pgsnow.local.stack import load_function_handler
from pgsnow.manifest import RunState
from pgsnow.postgres_setup import PostgresSetupOptions, heartbeat_table_step
from pgsnow.runs import DrainState, RunStore
from pgsnow.runtime import reset_runtime
from pgsnow.timestamps import utc_iso

pytestmark = pytest.mark.integration

PREFIX = "staging"
RUN_ID = "20261207T080000000000Z"


@pytest.fixture(scope="module")
def typed_table(admin: psycopg2.extensions.connection, schema_name: str) -> TableRef:
    table = TableRef(schema_name, "Orders")
    run_sql(
        admin,
        sql.SQL(
            "CREATE TABLE {} (id integer PRIMARY KEY, note text, amount numeric(12,2), "
            "at timestamptz, raw bytea, doc jsonb, flag boolean)"
        ).format(sql.Identifier(table.schema, table.table)),
    )
    return table


# op, lsn, seq, committed_at, unchanged, key_moved, id, note, amount, at, raw, doc, flag
SPILL = [
    [
        "I",
        "100",
        "1",
        "2026-12-07 08:00:00+00",
        None,
        "f",
        "1",
        "first",
        "12.50",
        "2026-12-07 07:00:00+01",
        "\\x00ff",
        '{"b": 1, "a": [1, 2]}',
        "t",
    ],
    ["I", "100", "2", "2026-12-07 08:00:00+00", None, "f", "2", "", None, None, None, None, None],
    [
        "U",
        "200",
        "1",
        "2026-12-07 08:00:01+00",
        '["note"]',
        "f",
        "1",
        None,
        "13.00",
        "2026-12-07 07:00:00+01",
        "\\x00ff",
        '{"a": [1, 2], "b": 1}',
        "f",
    ],
    ["D", "200", "2", "2026-12-07 08:00:01+00", None, "f", "2", None, None, None, None, None, None],
]


def stage(
    pg_dsn: str, segments: list[HandSegment], tmp_path: Path, file_format: FileFormat, **options: Any
) -> Any:
    conn = connect_for_staging(pg_dsn)
    try:
        return stage_table(
            conn,
            segments,
            run_id=RUN_ID,
            prefix=PREFIX,
            file_format=file_format,
            value_policy=options.pop("value_policy", ValuePolicy.FAIL),
            target_file_mb=options.pop("target_file_mb", 64),
            work_dir=tmp_path,
            **options,
        )
    finally:
        conn.close()


def hand_segment(
    admin: psycopg2.extensions.connection, table: TableRef, tmp_path: Path, rows: list[list[str | None]]
) -> HandSegment:
    path = tmp_path / "spill.csv"
    write_spill(path, rows)
    lsns = [int(str(r[1])) for r in rows]
    return HandSegment(table, relation_of(admin, table), path, len(rows), min(lsns), max(lsns))


def test_stage_csv_from_a_spill_file(
    admin: psycopg2.extensions.connection,
    typed_table: TableRef,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    # Given a spill of inserts, an update with an unchanged TOAST column and a delete, in stream order
    # (the reader spills as the stream goes; staging keeps that order without sorting)
    segment = hand_segment(admin, typed_table, tmp_path, SPILL)
    # When it is staged as CSV and uploaded
    staged = stage(pg_dsn, [segment], tmp_path, FileFormat.CSV)
    upload_files(s3, bucket, staged.files, run_id=RUN_ID)
    # Then one file holds the change columns then the table's, in (lsn, seq) order, in the type contract
    assert [c.name for c in staged.columns] == ["id", "note", "amount", "at", "raw", "doc", "flag"]
    assert staged.primary_key == ("id",)
    assert [c.nullable for c in staged.columns] == [True] * 7  # no source nullability given
    assert len(staged.files) == 1
    assert staged.files[0].key == data_key(PREFIX, typed_table, 1, RUN_ID, FileFormat.CSV)
    records = read_csv_object(s3, bucket, staged.files[0].key)
    assert records[0] == [*CHANGE_COLUMNS, "id", "note", "amount", "at", "raw", "doc", "flag"]
    assert records[1:] == [
        [
            "I",
            "100",
            "1",
            "2026-12-07T08:00:00.000000Z",
            None,
            "false",
            "1",
            "first",
            "12.50",
            "2026-12-07T06:00:00.000000Z",
            "00ff",
            '{"a": [1, 2], "b": 1}',
            "true",
        ],
        [
            "I",
            "100",
            "2",
            "2026-12-07T08:00:00.000000Z",
            None,
            "false",
            "2",
            "",
            None,
            None,
            None,
            None,
            None,
        ],
        [
            "U",
            "200",
            "1",
            "2026-12-07T08:00:01.000000Z",
            '["note"]',
            "false",
            "1",
            None,
            "13.00",
            "2026-12-07T06:00:00.000000Z",
            "00ff",
            '{"a": [1, 2], "b": 1}',
            "false",
        ],
        [
            "D",
            "200",
            "2",
            "2026-12-07T08:00:01.000000Z",
            None,
            "false",
            "2",
            None,
            None,
            None,
            None,
            None,
            None,
        ],
    ]
    head = s3.head_object(Bucket=bucket, Key=staged.files[0].key)
    assert head["Metadata"]["pgsnow-rows"] == "4"
    assert head["Metadata"]["pgsnow-run-id"] == RUN_ID
    assert not staged.files[0].written.path.exists()  # the local copy is removed once uploaded


def test_stage_parquet_from_a_spill_file(
    admin: psycopg2.extensions.connection,
    typed_table: TableRef,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    segment = hand_segment(admin, typed_table, tmp_path, SPILL)
    staged = stage(pg_dsn, [segment], tmp_path, FileFormat.PARQUET)
    upload_files(s3, bucket, staged.files, run_id=RUN_ID)
    assert [f.key for f in staged.files] == [data_key(PREFIX, typed_table, 1, RUN_ID, FileFormat.PARQUET)]
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=staged.files[0].key)["Body"].read()))
    assert table.column_names == [*CHANGE_COLUMNS, "id", "note", "amount", "at", "raw", "doc", "flag"]
    rows = table.to_pylist()
    assert [(r["_pgsnow_op"], r["_pgsnow_lsn"], r["_pgsnow_seq"]) for r in rows] == [
        ("I", Decimal(100), 1),
        ("I", Decimal(100), 2),
        ("U", Decimal(200), 1),
        ("D", Decimal(200), 2),
    ]
    assert rows[0]["raw"] == b"\x00\xff" and rows[0]["amount"] == Decimal("12.50") and rows[0]["flag"] is True
    assert rows[1]["note"] == "" and rows[2]["note"] is None and rows[2]["_pgsnow_unchanged"] == '["note"]'
    assert rows[0]["at"].isoformat() == "2026-12-07T06:00:00+00:00"


def test_files_are_cut_at_the_target_size(
    admin: psycopg2.extensions.connection, schema_name: str, pg_dsn: str, tmp_path: Path
) -> None:
    table = TableRef(schema_name, "wide")
    run_sql(
        admin,
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, body text)").format(
            sql.Identifier(table.schema, table.table)
        ),
    )
    import os

    rows = [
        [
            "I",
            str(1000 + i // 10),
            str(i % 10 + 1),
            "2026-12-07 08:00:00+00",
            None,
            "f",
            str(i),
            os.urandom(600).hex(),
        ]
        for i in range(6000)
    ]
    segment = hand_segment(admin, table, tmp_path, rows)
    # CSV is cut by size (after each 1 MB block); Parquet after the row group that reaches the target
    # (20K rows here: one group), so it is cut by the row cap, as a full run's files are.
    for file_format, options in ((FileFormat.CSV, {}), (FileFormat.PARQUET, {"batch_rows": 2500})):
        staged = stage(pg_dsn, [segment], tmp_path, file_format, target_file_mb=1, **options)
        assert len(staged.files) >= 3  # ~3.6 MB of gzipped hex (random bytes) at 1 MB per file
        assert sum(f.written.rows for f in staged.files) == 6000
        assert [f.written.batch for f in staged.files] == list(range(1, len(staged.files) + 1))


def test_a_value_snowflake_cannot_hold_names_the_table(
    admin: psycopg2.extensions.connection, schema_name: str, pg_dsn: str, tmp_path: Path
) -> None:
    table = TableRef(schema_name, "floats")
    run_sql(
        admin,
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, n numeric)").format(
            sql.Identifier(table.schema, table.table)
        ),
    )
    rows: list[list[str | None]] = [["I", "5", "1", "2026-12-07 08:00:00+00", None, "f", "1", "NaN"]]
    segment = hand_segment(admin, table, tmp_path, rows)
    with pytest.raises(PermanentError, match=f"{schema_name}.floats"):
        stage(pg_dsn, [segment], tmp_path, FileFormat.CSV)
    staged = stage(pg_dsn, [segment], tmp_path, FileFormat.CSV, value_policy=ValuePolicy.NULL)
    assert staged.files[0].written.rows == 1


def test_older_segments_are_staged_in_the_newest_columns(
    admin: psycopg2.extensions.connection, schema_name: str, pg_dsn: str, s3: Any, bucket: str, tmp_path: Path
) -> None:
    # Given a table whose column "extra" was added and "gone" dropped mid-run: an older segment
    # spilled as (id, gone, note) and the newest as (id, note, extra)
    table = TableRef(schema_name, "drifted")
    run_sql(
        admin,
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, note text, extra int)").format(
            sql.Identifier(table.schema, table.table)
        ),
    )
    newest = relation_of(admin, table)
    by_name = {c.name: c for c in newest.columns}
    older = HandRelation((by_name["id"], HandColumn("gone", 25, -1, False), by_name["note"]))
    old_path, new_path = tmp_path / "old.csv", tmp_path / "new.csv"
    at = "2026-12-07 08:00:00+00"
    write_spill(
        old_path,
        [
            ["I", "10", "1", at, None, "f", "1", "dropped", "a"],
            ["U", "20", "1", at, None, "f", "1", "dropped", "b"],
            ["U", "20", "2", at, '["note"]', "f", "1", "dropped", None],
        ],
    )
    write_spill(new_path, [["U", "20", "3", at, None, "f", "1", "c", "7"]])
    segments = [
        HandSegment(table, older, old_path, 3, 10, 20),
        HandSegment(table, newest, new_path, 1, 20, 20),
    ]
    # When both are staged as one table's files
    staged = stage(pg_dsn, segments, tmp_path, FileFormat.CSV)
    upload_files(s3, bucket, staged.files, run_id=RUN_ID)
    # Then one file in the newest columns: the older updates mark "extra" unchanged, "gone" is left out
    assert [c.name for c in staged.columns] == ["id", "note", "extra"]
    records = read_csv_object(s3, bucket, staged.files[0].key)
    assert records[0][len(CHANGE_COLUMNS) :] == ["id", "note", "extra"]
    assert [(r[0], r[2], r[4], r[6:]) for r in records[1:]] == [
        ("I", "1", None, ["1", "a", None]),
        ("U", "1", '["extra"]', ["1", "b", None]),
        ("U", "2", '["note", "extra"]', ["1", None, None]),
        ("U", "3", None, ["1", "c", "7"]),
    ]


# --- drain_slot on a real slot ------------------------------------------------------------------------


@pytest.fixture
def shop(admin: psycopg2.extensions.connection, schema_name: str) -> Iterator[tuple[TableRef, Any]]:
    """A table of the test's own, in a publication and a slot of the test's own (dropped afterwards)."""
    table = TableRef(schema_name, unique_name("items_", 6))
    run_sql(
        admin,
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text, price numeric(10,2))").format(
            sql.Identifier(table.schema, table.table)
        ),
    )
    with change_capture_source(admin.dsn, [(table.schema, table.table)]) as source:
        yield table, source


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_run_stages_changes_then_confirms(
    admin: psycopg2.extensions.connection,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
    fmt: str,
) -> None:
    table, source = shop
    ident = sql.Identifier(table.schema, table.table)
    settings = cdc_settings(bucket, pg_dsn, source, [table], fmt=fmt)
    # Given inserts, an update and a delete committed after the slot was created
    run_sql(admin, sql.SQL("INSERT INTO {} VALUES (1, 'apple', 1.50), (2, 'pear', 2.00)").format(ident))
    run_sql(admin, sql.SQL("UPDATE {} SET price = 1.75 WHERE id = 1").format(ident))
    run_sql(admin, sql.SQL("DELETE FROM {} WHERE id = 2").format(ident))
    before, _ = slot_position(admin, source.slot)
    # When the slot is drained
    outcome = drain_slot(settings, dsn=pg_dsn, s3=s3)
    # Then the run stopped at its heartbeat and the slot's position is the run's end
    assert outcome["stop_reason"] == "heartbeat" and outcome["confirmed"] is True
    assert outcome["tables"] == {table.qualified: 4} and outcome["changes"] == 4
    confirmed, _ = slot_position(admin, source.slot)
    assert confirmed == parse_lsn(outcome["end_lsn"]) > before
    assert parse_lsn(outcome["start_lsn"]) == before
    # And one manifest: mode cdc, staged, merge, its ChangeRange from 0 (the table's first) to the end
    store = RunStore(s3, bucket)
    (manifest,) = cdc_manifests(store, table)
    assert (manifest.mode, manifest.state, manifest.write_mode, manifest.deletes) == (
        "cdc",
        RunState.STAGED,
        "merge",
        "hard",
    )
    assert manifest.run_id == outcome["run_id"]
    assert manifest.changes is not None
    assert (manifest.changes.slot, manifest.changes.after_lsn, manifest.changes.end_lsn) == (
        source.slot,
        0,
        confirmed,
    )
    assert [c.name for c in manifest.columns] == ["id", "name", "price"]
    assert manifest.columns[0].nullable is False  # the source's NOT NULL (primary key)
    assert manifest.primary_key == ("id",)
    (staged,) = manifest.files
    # And the file holds the changes in commit order, in the type contract
    if fmt == "csv":
        records = read_csv_object(s3, bucket, staged.key)
        rows = [(r[0], r[6], r[7], r[8]) for r in records[1:]]
        lsns = [int(str(r[1])) for r in records[1:]]
        prices: list[Any] = ["1.50", "2.00", "1.75", None]
    else:
        body = s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read()
        data = pq.read_table(io.BytesIO(body)).to_pylist()
        rows = [(r["_pgsnow_op"], str(r["id"]), r["name"], r["price"]) for r in data]
        lsns = [int(r["_pgsnow_lsn"]) for r in data]
        prices = [Decimal("1.50"), Decimal("2.00"), Decimal("1.75"), None]
    assert rows == [
        ("I", "1", "apple", prices[0]),
        ("I", "2", "pear", prices[1]),
        ("U", "1", "apple", prices[2]),
        ("D", "2", None, prices[3]),
    ]
    assert lsns == sorted(lsns) and lsns[0] == lsns[1] < lsns[2] < lsns[3]
    assert manifest.changes.first_commit_lsn == lsns[0] and manifest.changes.last_commit_lsn == lsns[3]
    # And the drain state says where the next run starts
    state = store.load_drain_state(source.slot)
    assert state is not None
    assert state.confirmed_lsn == confirmed and state.last_run_finished
    assert state.tables == {table.qualified: confirmed}
    # (stored as pgsnow status reads it: pg_lsn text, the heartbeat an object with its time)
    body = json.loads(
        s3.get_object(Bucket=bucket, Key=f"_pgsnow/cdc/{source.slot}/state.json")["Body"].read()
    )
    assert body["confirmed_lsn"] == outcome["end_lsn"] and body["confirmed_at"]
    assert body["last_heartbeat"]["run_id"] == outcome["run_id"] and body["last_heartbeat"]["at"]


def test_runs_chain_and_idle_runs_advance_the_slot(
    admin: psycopg2.extensions.connection,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
) -> None:
    table, source = shop
    ident = sql.Identifier(table.schema, table.table)
    settings = cdc_settings(bucket, pg_dsn, source, [table])
    store = RunStore(s3, bucket)
    run_sql(admin, sql.SQL("INSERT INTO {} VALUES (1, 'a', 1)").format(ident))
    first = drain_slot(settings, dsn=pg_dsn, s3=s3)
    # Given a run with no change (idle): it still moves the slot past its heartbeat, and stages nothing
    idle = drain_slot(settings, dsn=pg_dsn, s3=s3)
    assert idle["changes"] == 0 and idle["files"] == 0 and idle["confirmed"]
    assert parse_lsn(idle["end_lsn"]) > parse_lsn(first["end_lsn"])
    # When the table changes again, its next run chains from its previous run's end (not the idle one's)
    run_sql(admin, sql.SQL("UPDATE {} SET name = 'b' WHERE id = 1").format(ident))
    drain_slot(settings, dsn=pg_dsn, s3=s3)
    first_manifest, second_manifest = cdc_manifests(store, table)
    assert first_manifest.changes is not None and second_manifest.changes is not None
    assert second_manifest.changes.after_lsn == first_manifest.changes.end_lsn == parse_lsn(first["end_lsn"])


def test_a_hundred_idle_runs_keep_the_slot_moving(
    admin: psycopg2.extensions.connection,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
) -> None:
    table, source = shop
    settings = cdc_settings(bucket, pg_dsn, source, [table])
    confirmed, _ = slot_position(admin, source.slot)
    restart_before = restart_lsn(admin, source.slot)
    for run in range(100):
        if run == 50:
            # The slot's restart_lsn moves to a running-transactions record it has decoded (the server
            # logs one every 15 s when busy, and at a checkpoint): make one now rather than wait.
            run_sql(admin, "CHECKPOINT")
        outcome = drain_slot(settings, dsn=pg_dsn, s3=s3)
        now_confirmed, _ = slot_position(admin, source.slot)
        assert now_confirmed > confirmed  # every run, idle or not, advances the slot
        assert now_confirmed == parse_lsn(outcome["end_lsn"])
        confirmed = now_confirmed
    # The WAL the slot keeps is released as it goes: its restart_lsn moves (alone on this machine the
    # slot kept ~1 MB, at most ~3 MB, over 100 idle runs). How far it can move is the server's rule,
    # not the drain's: the oldest transaction running anywhere in the cluster holds it back, and other
    # tests run long ones at the same time, so no byte bound is asserted here.
    assert restart_lsn(admin, source.slot) > restart_before


def restart_lsn(admin: psycopg2.extensions.connection, slot: str) -> int:
    with admin.cursor() as cur:
        cur.execute("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        return parse_lsn(cur.fetchone()[0])


def test_two_invocations_at_once_one_drains_the_other_skips(
    admin: psycopg2.extensions.connection,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
) -> None:
    table, source = shop
    settings = cdc_settings(bucket, pg_dsn, source, [table])
    run_sql(
        admin, sql.SQL("INSERT INTO {} VALUES (1, 'a', 1)").format(sql.Identifier(table.schema, table.table))
    )
    second: list[dict[str, Any]] = []
    # Given a run holding the slot (it is between its state and its confirmation) when a second starts
    outcome = drain_slot(
        settings,
        dsn=pg_dsn,
        s3=s3,
        before_confirm=lambda: second.append(drain_slot(settings, dsn=pg_dsn, s3=s3)),
    )
    # Then the second returned "slot busy" cleanly and the first finished; one manifest, one file
    assert second == [{"skipped": "slot busy"}]
    assert outcome["confirmed"] and outcome["tables"] == {table.qualified: 1}
    (manifest,) = cdc_manifests(RunStore(s3, bucket), table)
    assert len(manifest.files) == 1
    # And a consumer holding the slot makes a run skip too (the race after the slot check)
    with open_stream(pg_dsn, slot=source.slot, publication=source.publication):
        assert drain_slot(settings, dsn=pg_dsn, s3=s3) == {"skipped": "slot busy"}


def test_a_missing_slot_is_a_permanent_error_with_the_resnapshot_command_and_the_slot_lost_metric(
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    table, source = shop
    settings = cdc_settings(bucket, pg_dsn, source, [table], CDC_SLOT="pgsnow_no_such_slot")
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    capsys.readouterr()
    with pytest.raises(SlotLostError, match="pgsnow cdc resnapshot --slot pgsnow_no_such_slot") as raised:
        drain_slot(settings, dsn=pg_dsn, s3=s3)
    assert table.qualified in str(raised.value) and not raised.value.retryable
    # The SlotLost metric the SlotLostAlarm watches (EMF on stdout, as CloudWatch receives it)
    documents = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    names = [d["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"] for d in documents]
    assert names == ["SlotLost"] and documents[0]["SlotLost"] == [1.0]


def test_the_change_capture_handler_drains_on_a_schedule_event(
    admin: psycopg2.extensions.connection,
    aws: LocalAws,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table, source = shop
    run_sql(
        admin, sql.SQL("INSERT INTO {} VALUES (7, 'x', 1)").format(sql.Identifier(table.schema, table.table))
    )
    for name, value in {
        **aws.env(),
        "S3_STAGE_BUCKET": bucket,
        "PGSNOW_TABLES": table.qualified,
        "PGSNOW_TABLE_OPTIONS": json.dumps({table.qualified: {"mode": "cdc"}}),
        "PGSNOW_PG_SECRET_ARN": postgres_secret_arn(aws.client("secretsmanager"), pg_dsn),
        "CDC_SLOT": source.slot,
        "CDC_PUBLICATION": source.publication,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PGSNOW_PG_DSN", raising=False)
    reset_runtime()
    try:
        load_function_handler("extractor")
        handler = sys.modules["pgsnow_function_extractor_app"].change_capture_handler
        event = json.loads(
            (Path(__file__).resolve().parents[3] / "events" / "change_capture.json").read_text()
        )
        context = LambdaContext(
            function_name="pgsnow-test-change-capture",
            invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:pgsnow-test-change-capture",
            memory_limit_in_mb=1024,
            deadline_monotonic=time.monotonic() + 900,
        )
        outcome = handler(event, context)
    finally:
        reset_runtime()
    assert outcome["tables"] == {table.qualified: 1} and outcome["confirmed"]
    assert slot_position(admin, source.slot)[0] == parse_lsn(outcome["end_lsn"])


def test_the_drain_state_round_trips_and_refuses_a_second_writer(s3: Any, bucket: str) -> None:
    store = RunStore(s3, bucket)
    assert store.load_drain_state("pgsnow_state_test") is None
    # Given a state written the first time (absent before) and read back
    first = store.save_drain_state(
        DrainState("pgsnow_state_test", 2**32 + 5, "20261207T080000000000Z", False, {"public.t": 7})
    )
    loaded = store.load_drain_state("pgsnow_state_test")
    assert loaded is not None
    assert (loaded.confirmed_lsn, loaded.last_run_id, loaded.last_run_finished, loaded.tables) == (
        2**32 + 5,
        "20261207T080000000000Z",
        False,
        {"public.t": 7},
    )
    body = json.loads(
        s3.get_object(Bucket=bucket, Key="_pgsnow/cdc/pgsnow_state_test/state.json")["Body"].read()
    )
    assert body["confirmed_lsn"] == "1/5" and body["tables"] == {"public.t": "0/7"}
    # When another writer saves over it, a save from the older read is refused
    store.save_drain_state(replace(loaded, last_run_finished=True))
    with pytest.raises(RetryableError, match="changed by another invocation"):
        store.save_drain_state(replace(first, confirmed_lsn=9))
    # And a name that is not a slot name never becomes a key
    with pytest.raises(PermanentError, match="not a replication slot name"):
        store.load_drain_state("../escape")


def test_the_byte_budget_cuts_at_a_commit_and_the_next_run_goes_on(
    admin: psycopg2.extensions.connection,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
) -> None:
    table, source = shop
    ident = sql.Identifier(table.schema, table.table)
    settings = cdc_settings(bucket, pg_dsn, source, [table], CDC_MAX_MB="1")
    store = RunStore(s3, bucket)
    # Given three transactions of ~0.6 MB of change data each
    for batch in range(3):
        run_sql(
            admin,
            sql.SQL("INSERT INTO {} SELECT g, repeat('x', 600), 1 FROM generate_series(%s, %s) g").format(
                ident
            ),
            (batch * 1000 + 1, batch * 1000 + 1000),
        )
    # When the budget (1 MB) is reached, the run stops at that commit: two whole transactions (their
    # changes; the transaction count also takes in other tests' heartbeats, which reach every slot)
    cut = drain_slot(settings, dsn=pg_dsn, s3=s3)
    assert cut["stop_reason"] == "bytes" and cut["changes"] == 2000
    assert slot_position(admin, source.slot)[0] == parse_lsn(cut["end_lsn"])
    # And the next run reads the third and then its heartbeat, chained after the first
    rest = drain_slot(settings, dsn=pg_dsn, s3=s3)
    assert rest["stop_reason"] == "heartbeat" and rest["changes"] == 1000
    first, second = cdc_manifests(store, table)
    assert first.changes is not None and second.changes is not None
    assert second.changes.after_lsn == first.changes.end_lsn
    assert first.total_rows + second.total_rows == 3000


def test_a_run_behind_reports_the_age_of_the_newest_heartbeat_it_read_as_the_lag_alarm_watches(
    admin: psycopg2.extensions.connection,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    table, source = shop
    ident = sql.Identifier(table.schema, table.table)
    settings = cdc_settings(bucket, pg_dsn, source, [table], CDC_MAX_MB="1")
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    # The service the template gives every function (POWERTOOLS_SERVICE_NAME: AppName in Globals)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "pgsnow")
    # Given a heartbeat written 20 minutes ago and ~1.2 MB of changes after it, in one transaction
    # (other tests' heartbeats reach every slot; none can come between these two)
    written_at = datetime.now(UTC) - timedelta(minutes=20)
    old = json.dumps({"run_id": "20261207T080000000000Z", "at": utc_iso(written_at)})
    with admin.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT pg_logical_emit_message(true, %s, %s)", (HEARTBEAT_PREFIX, old))
        cur.execute(
            sql.SQL("INSERT INTO {} SELECT g, repeat('x', 600), 1 FROM generate_series(1, 2000) g").format(
                ident
            )
        )
        cur.execute("COMMIT")
    capsys.readouterr()
    # When a run stops at the byte budget (1 MB) before its own heartbeat: it is behind
    behind = drain_slot(settings, dsn=pg_dsn, s3=s3)
    # And the next run reaches its own
    caught_up = drain_slot(settings, dsn=pg_dsn, s3=s3)
    # Then each records ReplicationLagSeconds per invocation (the `service` dimension only, as
    # ReplicationLagAlarm watches it): the first the old heartbeat's age, above the alarm's default
    # 900 s; the second its own duration, under a minute (ChangeCaptureLagAlarmSeconds' MinValue)
    assert (behind["stop_reason"], caught_up["stop_reason"]) == ("bytes", "heartbeat")
    documents = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    lags = [
        (d["ReplicationLagSeconds"], d["_aws"]["CloudWatchMetrics"][0]["Dimensions"], d["service"])
        for d in documents
        if "ReplicationLagSeconds" in d
    ]
    assert lags == [
        ([behind["heartbeat_lag_s"]], [["service"]], "pgsnow"),
        ([caught_up["heartbeat_lag_s"]], [["service"]], "pgsnow"),
    ]
    assert 1200 <= behind["heartbeat_lag_s"] < 1200 + 60
    assert 0 <= caught_up["heartbeat_lag_s"] < 60


def test_toast_key_moves_and_truncates_reach_the_change_file(
    admin: psycopg2.extensions.connection,
    pg_dsn: str,
    s3: Any,
    bucket: str,
    shop: tuple[TableRef, Any],
) -> None:
    table, source = shop
    ident = sql.Identifier(table.schema, table.table)
    settings = cdc_settings(bucket, pg_dsn, source, [table])
    # Given a large TOASTed value, an update of another column, a primary-key move and a truncate
    run_sql(admin, sql.SQL("ALTER TABLE {} ALTER COLUMN name SET STORAGE EXTERNAL").format(ident))
    big = "".join(f"{i:08d}" for i in range(4000))  # 32 KB, stored out of line uncompressed
    run_sql(admin, sql.SQL("INSERT INTO {} VALUES (1, %s, 1)").format(ident), (big,))
    run_sql(admin, sql.SQL("UPDATE {} SET price = 2 WHERE id = 1").format(ident))
    run_sql(admin, sql.SQL("UPDATE {} SET id = 5 WHERE id = 1").format(ident))
    run_sql(admin, sql.SQL("TRUNCATE {}").format(ident))
    outcome = drain_slot(settings, dsn=pg_dsn, s3=s3)
    (manifest,) = cdc_manifests(RunStore(s3, bucket), table)
    records = read_csv_object(s3, bucket, manifest.files[0].key)
    rows = [(r[0], r[4], r[5], r[6], None if r[7] is None else len(r[7]), r[8]) for r in records[1:]]
    # Then the file says which values were not sent (kept by the loader), the move as D + U, the truncate as T
    assert rows == [
        ("I", None, "false", "1", 32000, "1.00"),
        ("U", '["name"]', "false", "1", None, "2.00"),
        ("D", None, "false", "1", None, None),
        ("U", '["name"]', "true", "5", None, "2.00"),
        ("T", None, "false", None, None, None),
    ]
    assert outcome["changes"] == 5


def test_a_table_heartbeat_advances_the_slot_for_servers_without_messages(
    admin: psycopg2.extensions.connection,
    schema_name: str,
    pg_dsn: str,
    s3: Any,
    bucket: str,
) -> None:
    # Given CDC_HEARTBEAT=table (PostgreSQL < 14): a heartbeat table in the publication
    table = TableRef(schema_name, unique_name("items_", 6))
    heartbeat = TableRef(schema_name, unique_name("heartbeat_", 6))
    run_sql(
        admin,
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text)").format(
            sql.Identifier(*table_parts(table))
        ),
    )
    run_sql(
        admin,
        # the table `pgsnow postgres-sql` creates for CDC_HEARTBEAT=table
        heartbeat_table_step(
            PostgresSetupOptions(
                publication="unused",
                slot="unused",
                tables=(table,),
                heartbeat=HeartbeatMethod.TABLE,
                heartbeat_table=heartbeat,
            )
        ).statements[0],
    )
    with change_capture_source(admin.dsn, [table_parts(table), table_parts(heartbeat)]) as source:
        settings = cdc_settings(
            bucket, pg_dsn, source, [table], CDC_HEARTBEAT="table", CDC_HEARTBEAT_TABLE=heartbeat.qualified
        )
        run_sql(admin, sql.SQL("INSERT INTO {} VALUES (1, 'a')").format(sql.Identifier(*table_parts(table))))
        before, _ = slot_position(admin, source.slot)
        # When runs drain (each ends at the commit of its own heartbeat row)
        first = drain_slot(settings, dsn=pg_dsn, s3=s3)
        second = drain_slot(settings, dsn=pg_dsn, s3=s3)
        # Then the change is staged, the heartbeat row is not (not a CDC table), and the slot moves each run
        assert first["tables"] == {table.qualified: 1} and first["stop_reason"] == "heartbeat"
        assert second["changes"] == 0
        after_first = parse_lsn(first["end_lsn"])
        assert before < after_first < parse_lsn(second["end_lsn"]) == slot_position(admin, source.slot)[0]
        with admin.cursor() as cur:
            cur.execute(sql.SQL("SELECT run_id FROM {}").format(sql.Identifier(*table_parts(heartbeat))))
            assert cur.fetchall() == [(second["run_id"],)]


def table_parts(table: TableRef) -> tuple[str, str]:
    return table.schema, table.table
