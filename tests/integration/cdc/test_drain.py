"""The change-capture run against real servers: PostgreSQL (wal_level=logical) and a moto S3 server.

Staging (``pgsnow.cdc.stage``) is tested from hand-written spill files; the drain (``drain_slot``)
on a real slot of the test's own (``cdc_support.change_capture_source``).
"""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pyarrow.parquet as pq
import pytest
from drain_support import (
    HandColumn,
    HandRelation,
    HandSegment,
    read_csv_object,
    relation_of,
    run_sql,
    write_spill,
)
from psycopg2 import sql

from pgsnow.cdc.stage import connect_for_staging, stage_table, upload_files
from pgsnow.changes import CHANGE_COLUMNS
from pgsnow.config import ValuePolicy
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key

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
    # Given a spill of inserts, an update with an unchanged TOAST column and a delete (out of order on disk)
    segment = hand_segment(admin, typed_table, tmp_path, [SPILL[2], SPILL[0], SPILL[3], SPILL[1]])
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
