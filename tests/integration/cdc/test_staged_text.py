"""Values spilled in the staged encoding (``pgsnow.cdc.staged_text``) stage exactly what the round
trip through PostgreSQL stages: the same slot read twice, once with ``staged_text`` and once in
pgoutput's text only, staged both ways, and the files' records compared value for value (NULL
kept apart from ""). The values are the awkward ones of every converted type."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from cdc_support import ChangeCaptureSource, change_capture_source
from csv_support import parse_csv_keeping_nulls
from psycopg2 import sql
from stack_support import new_source_schema

from pgsnow.cdc.reader import DrainedStream, open_stream, read_changes
from pgsnow.cdc.spilled_csv import EarlyCompression, spill_header
from pgsnow.cdc.stage import StagedSegment, connect_for_staging, stage_table
from pgsnow.config import ValuePolicy
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat

pytestmark = pytest.mark.integration

HEARTBEAT = "pgsnow.test.end"
COLUMNS = """
    id integer PRIMARY KEY,
    flag boolean,
    small smallint,
    big bigint,
    note text,
    code varchar(12),
    padded char(6),
    ratio real,
    measure double precision,
    day date,
    local_at timestamp,
    at timestamptz,
    at_ms timestamptz(3),
    raw bytea,
    ident uuid,
    doc jsonb,
    price numeric(12,2),
    fine numeric(38,10)
"""
# Rows every converted type stages as it is: quotes, commas, line breaks, empty vs NULL, unicode,
# floats at their edges, fractions of every length, the first and last years the contract holds.
ROWS = [
    (
        1,
        True,
        -32768,
        -9223372036854775808,
        'say "hi", then\nleave\r\n',
        "",
        "ab",
        1.1,
        0.1,
        "0001-01-01",
        "2026-12-07 10:00:00",
        "2026-12-07 10:00:00+00",
        "2026-12-07 10:00:00.1+00",
        b"",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        '{"a": "é\\u00e9", "b": [1, 2.50]}',
        "-0.05",
        "1234567890123456789012345678.0123456789",
    ),
    (
        2,
        False,
        32767,
        9223372036854775807,
        "",
        "x,y",
        "",
        float("inf"),
        float("-inf"),
        "9999-12-31",
        "9999-12-31 23:59:59.999999",
        "9999-12-31 23:59:59.999999+00",
        "1970-01-01 00:00:00.123+05:30",
        b'\x00"\n,\xff',
        "00000000-0000-0000-0000-000000000000",
        '"just a string"',
        "0.00",
        "0",
    ),
    (
        3,
        None,
        None,
        None,
        None,
        None,
        None,
        float("nan"),
        -0.0,
        None,
        None,
        None,
        None,
        None,
        None,
        "null",
        None,
        None,
    ),
    (
        4,
        True,
        0,
        0,
        "ünïcödé ✓ \\ backslash",
        "NULL",
        "  lead",
        3.4028235e38,
        5e-324,
        "2000-02-29",
        "1900-01-01 00:00:00.000001",
        "1900-01-01 00:00:00.000001-08",
        "2001-01-01 00:00:00+00",
        b"\\x",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "[]",
        "9999999999.99",
        "-0.0000000001",
    ),
]
# Values the contract does not stage as they are: the table's run takes the round trip from there.
UNSTAGEABLE_ROWS = [
    (10, "infinity", "2026-01-01", "NaN"),
    (11, "-infinity", "0044-03-15 BC", "1.00"),
    (12, "10000-01-01 00:00:00+00", "10000-01-01", "2.00"),
]


@pytest.fixture
def source() -> Iterator[tuple[str, TableRef]]:
    with new_source_schema("pgsnow_cdc_staged_text") as (dsn, schema):
        table = TableRef(schema, "values")
        execute(
            dsn, sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(schema, table.table), sql.SQL(COLUMNS))
        )
        yield dsn, table


def execute(dsn: str, statement: sql.Composable | str, params: Any = None) -> Any:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchone()[0] if cur.description else None
    finally:
        conn.close()


def insert(dsn: str, table: TableRef, rows: list[tuple[Any, ...]]) -> None:
    placeholders = sql.SQL(", ").join(sql.Placeholder() * len(rows[0]))
    for row in rows:
        execute(
            dsn,
            sql.SQL("INSERT INTO {} VALUES ({})").format(
                sql.Identifier(table.schema, table.table), placeholders
            ),
            row,
        )


def end_of_changes(dsn: str) -> int:
    """A non-transactional message after the changes: the reads stop there."""
    from pgsnow.changes import parse_lsn

    return parse_lsn(execute(dsn, "SELECT pg_logical_emit_message(false, %s, 'end')::text", (HEARTBEAT,)))


def read(
    cdc: ChangeCaptureSource,
    tables: TableRef | list[TableRef],
    end: int,
    spill_dir: Path,
    *,
    staged_text: bool = True,
    on_final: Any = None,
) -> DrainedStream:
    return read_changes(
        cdc.dsn,
        slot=cdc.slot,
        publication=cdc.publication,
        heartbeat_lsn=end,
        heartbeat_prefix=HEARTBEAT,
        tables=tables if isinstance(tables, list) else [tables],
        max_bytes=1 << 40,
        deadline=time.monotonic() + 120,
        spill_dir=spill_dir,
        staged_text=staged_text,
        on_final=on_final,
    )


def stage(dsn: str, stream: DrainedStream, work_dir: Path, **options: Any) -> StagedSegment:
    conn = connect_for_staging(dsn)
    try:
        return stage_table(
            conn,
            stream.segments,
            run_id="20261207T000000Z-test",
            prefix="staging",
            file_format=FileFormat.CSV,
            value_policy=options.pop("value_policy", ValuePolicy.FAIL),
            target_file_mb=options.pop("target_file_mb", 64),
            work_dir=work_dir,
            **options,
        )
    finally:
        conn.close()


def records(staged: StagedSegment) -> list[list[str | None]]:
    """Every file's records after its header, in file order."""
    found: list[list[str | None]] = []
    for local in staged.files:
        parsed = parse_csv_keeping_nulls(gzip.decompress(local.written.path.read_bytes()).decode())
        assert parsed[0][:2] == ["_pgsnow_op", "_pgsnow_lsn"]  # each file repeats the header
        assert len(parsed) - 1 == local.written.rows
        found += parsed[1:]
    return found


def both_ways(
    cdc: ChangeCaptureSource, table: TableRef, tmp_path: Path, **options: Any
) -> tuple[DrainedStream, StagedSegment, StagedSegment]:
    end = end_of_changes(cdc.dsn)
    fast = read(cdc, table, end, tmp_path / "fast", staged_text=True)
    plain = read(cdc, table, end, tmp_path / "plain", staged_text=False)
    assert fast.changes == plain.changes and fast.end_lsn == plain.end_lsn
    assert not any(s.staged_text for s in plain.segments)
    (tmp_path / "out-fast").mkdir()
    (tmp_path / "out-plain").mkdir()
    staged_fast = stage(cdc.dsn, fast, tmp_path / "out-fast", **dict(options))
    staged_plain = stage(cdc.dsn, plain, tmp_path / "out-plain", **dict(options))
    return fast, staged_fast, staged_plain


def test_spilled_staged_text_stages_what_the_round_trip_stages(
    source: tuple[str, TableRef], tmp_path: Path
) -> None:
    dsn, table = source
    ident = sql.Identifier(table.schema, table.table)
    with change_capture_source(dsn, [(table.schema, table.table)]) as cdc:
        # Given inserts of every awkward value, an update in place, an update leaving a TOASTed value
        # unchanged, a key move and a delete
        insert(dsn, table, ROWS)
        execute(
            dsn,
            sql.SQL(
                "UPDATE {} SET note = (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400)) "
                "WHERE id = 1"
            ).format(ident),
        )
        execute(dsn, sql.SQL("UPDATE {} SET flag = NOT flag, price = price + 1 WHERE id = 1").format(ident))
        execute(dsn, sql.SQL("UPDATE {} SET id = 5 WHERE id = 2").format(ident))
        execute(dsn, sql.SQL("DELETE FROM {} WHERE id = 3").format(ident))
        fast, staged_fast, staged_plain = both_ways(cdc, table, tmp_path)
    # Then the staged-text read spilled it all in the staged encoding and staging used it as it is
    assert [s.staged_text for s in fast.segments] == [True]
    assert not staged_fast.round_trip and staged_plain.round_trip
    # And the files hold exactly what the round trip through PostgreSQL stages
    fast_records = records(staged_fast)
    assert len(fast_records) == fast.changes == 9  # 4 inserts, 2 updates, a key move (D + U), a delete
    assert fast_records == records(staged_plain)
    assert staged_fast.columns == staged_plain.columns
    assert staged_fast.primary_key == staged_plain.primary_key == ("id",)
    # (spot checks of the encoding itself, beyond the comparison)
    by_id = {(r[0], r[6]): r for r in fast_records}
    first = by_id[("I", "1")]
    assert first[3].endswith("Z") and first[3][10] == "T"  # _pgsnow_committed_at
    assert first[7:10] == ["true", "-32768", "-9223372036854775808"]
    assert first[19] == ""  # an empty bytea is "" (not NULL)
    assert by_id[("I", "2")][13:15] == ["inf", "-inf"]
    unchanged_update = [r for r in fast_records if r[0] == "U" and r[4]]
    assert [r[4] for r in unchanged_update] == ['["note"]']


def test_a_value_not_staged_as_it_is_sends_the_run_the_round_trip(
    source: tuple[str, TableRef], tmp_path: Path
) -> None:
    dsn, table = source
    ident = sql.Identifier(table.schema, table.table)
    with change_capture_source(dsn, [(table.schema, table.table)]) as cdc:
        # Given rows in staged text (a bytea among them), then values the contract refuses
        insert(dsn, table, ROWS[:2])
        for row_id, at, day, price in UNSTAGEABLE_ROWS:
            execute(
                dsn,
                sql.SQL("INSERT INTO {} (id, at, day, price, raw) VALUES (%s, %s, %s, %s, '\\x01ff')").format(
                    ident
                ),
                (row_id, at, day, price),
            )
        insert(dsn, table, [(20, *ROWS[3][1:])])
        # When both reads are staged under the null policy (the refused values become NULL)
        fast, staged_fast, staged_plain = both_ways(cdc, table, tmp_path, value_policy=ValuePolicy.NULL)
    # Then the table's segment turned to pgoutput's text at the first refused value
    assert [s.staged_text for s in fast.segments] == [True, False]
    assert [s.rows for s in fast.segments] == [2, 4]
    # And the run took the round trip, the converted rows read back (bytea hex decoded) to the same files
    assert staged_fast.round_trip
    fast_records = records(staged_fast)
    assert fast_records == records(staged_plain)
    nulled = [r for r in fast_records if r[6] in {"10", "11", "12"}]
    # (day, at, price): infinite and out-of-range dates and times, and NaN, are NULL
    assert [(r[15], r[17], r[22]) for r in nulled] == [
        ("2026-01-01", None, None),
        (None, None, "1.00"),
        (None, None, "2.00"),
    ]
    assert {r[19] for r in nulled} == {"01ff"}


def test_staged_text_files_are_cut_at_row_boundaries(source: tuple[str, TableRef], tmp_path: Path) -> None:
    dsn, table = source
    ident = sql.Identifier(table.schema, table.table)
    with change_capture_source(dsn, [(table.schema, table.table)]) as cdc:
        # Given ~4 MB of changes, most of them hex (about half compressible), in one large transaction and many small ones
        execute(
            dsn,
            sql.SQL(
                "INSERT INTO {} (id, note) SELECT g, (SELECT string_agg(md5(random()::text), '\n') "
                "FROM generate_series(1, 60 + g * 0)) FROM generate_series(1, 2000) g"
            ).format(ident),
        )
        for row_id in range(3000, 3040):
            execute(
                dsn,
                sql.SQL("INSERT INTO {} (id, note) VALUES (%s, repeat('x\"', 20000))").format(ident),
                (row_id,),
            )
        # When staged with files of about 1 MB
        fast, staged_fast, staged_plain = both_ways(cdc, table, tmp_path, target_file_mb=1)
    # Then the files end on rows (each parses whole, header first) and hold every row once, in order
    assert not staged_fast.round_trip
    assert len(staged_fast.files) >= 2
    assert [f.written.batch for f in staged_fast.files] == list(range(1, len(staged_fast.files) + 1))
    assert sum(f.written.rows for f in staged_fast.files) == fast.changes == 2040
    assert records(staged_fast) == records(staged_plain)


def test_early_compression_during_the_read_writes_the_files_staging_would(
    source: tuple[str, TableRef], tmp_path: Path
) -> None:
    dsn, table = source
    ident = sql.Identifier(table.schema, table.table)
    with change_capture_source(dsn, [(table.schema, table.table)]) as cdc:
        # Given ~3 MB of changes over many transactions (each reported final at its commit)
        for start in range(0, 3000, 100):
            execute(
                dsn,
                sql.SQL(
                    "INSERT INTO {} (id, note) SELECT g, (SELECT string_agg(md5(g::text || s::text), ',') "
                    "FROM generate_series(1, 30) s) FROM generate_series(%s, %s) g"
                ).format(ident),
                (start + 1, start + 100),
            )
        end = end_of_changes(dsn)
        early = EarlyCompression(tmp_path / "early", max_bytes=1 << 20)
        try:
            stream = read(cdc, table, end, tmp_path / "spill", on_final=early.final_rows)
            (tmp_path / "out").mkdir()
            # When the run is staged with what was compressed during the read
            staged_early = stage(cdc.dsn, stream, tmp_path / "out", target_file_mb=1, early=early)
        finally:
            early.close()
        (tmp_path / "out-again").mkdir()
        staged_again = stage(cdc.dsn, stream, tmp_path / "out-again", target_file_mb=1)
    # Then staging used the early files, which hold the same rows, cut the same way
    assert all((tmp_path / "early") in f.written.path.parents for f in staged_early.files)
    assert len(staged_early.files) >= 2
    assert [(f.written.rows, f.written.batch) for f in staged_early.files] == [
        (f.written.rows, f.written.batch) for f in staged_again.files
    ]
    assert records(staged_early) == records(staged_again)
    assert sum(f.written.rows for f in staged_early.files) == stream.changes == 3000


def test_early_compression_takes_a_bounded_number_of_segments(
    source: tuple[str, TableRef], tmp_path: Path
) -> None:
    dsn, first = source
    tables = [TableRef(first.schema, name) for name in ("one", "two", "three")]
    for table in tables:
        execute(
            dsn,
            sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, note text)").format(
                sql.Identifier(table.schema, table.table)
            ),
        )
    with change_capture_source(dsn, [(t.schema, t.table) for t in tables]) as cdc:
        # Given three tables with over 1 MB of committed changes each (row boundaries reported final)
        for table in tables:
            execute(
                dsn,
                sql.SQL(
                    "INSERT INTO {} SELECT g, (SELECT string_agg(md5(g::text || s::text), ',') "
                    "FROM generate_series(1, 30) s) FROM generate_series(1, 1500) g"
                ).format(sql.Identifier(table.schema, table.table)),
            )
        end = end_of_changes(dsn)
        # When the slot is read with early compression that takes two segments at most
        early = EarlyCompression(tmp_path / "early", max_bytes=1 << 20, max_segments=2)
        try:
            stream = read(cdc, tables, end, tmp_path / "spill", on_final=early.final_rows)
            # Then only two segments were started early (each keeps a spill and a file open)
            assert len(list((tmp_path / "early").iterdir())) == 2
            # And staging each table still writes the files staging alone writes, the third by itself
            staged = []
            for segment in stream.segments:
                out = tmp_path / f"out-{segment.table.table}"
                out.mkdir()
                alone = replace(stream, segments=(segment,))
                staged.append(stage(cdc.dsn, alone, out, target_file_mb=1, early=early))
        finally:
            early.close()
        for index, segment in enumerate(stream.segments):
            (tmp_path / f"again-{index}").mkdir()
            alone = replace(stream, segments=(segment,))
            again = stage(cdc.dsn, alone, tmp_path / f"again-{index}", target_file_mb=1)
            assert records(staged[index]) == records(again)
            assert len(records(again)) == segment.rows == 1500
    from_early = [all((tmp_path / "early") in f.written.path.parents for f in s.files) for s in staged]
    assert sorted(from_early) == [False, True, True]


def test_early_compression_is_left_unused_when_staging_would_write_other_files(tmp_path: Path) -> None:
    # Given a spill compressed early under one header
    spill = tmp_path / "spill.csv"
    spill.write_bytes(b"I,1,1,2026-12-07T00:00:00.000000Z,,false,1\n" * 10)
    relation = _Relation("public", "items", (_Column("id"),))
    early = EarlyCompression(tmp_path / "early", max_bytes=1 << 20)
    try:
        early.final_rows(spill, relation, spill.stat().st_size, 10)
        segment = _Segment(spill, 10, ((spill.stat().st_size, 10),))
        # When staging describes the table's columns differently, its early files are not used
        assert early.files_for(segment, b"other,header\n") is None
        assert not list((tmp_path / "early").rglob("*.csv.gz"))  # and are deleted
        # And a spill that cannot be read fails staging with the reason, not silently
        missing = tmp_path / "gone.csv"
        early.final_rows(missing, relation, 10, 1)
        with pytest.raises(FileNotFoundError):
            early.files_for(_Segment(missing, 1, ((10, 1),)), spill_header(relation))
    finally:
        early.close()
    # And a table it was not asked to compress (it stages Parquet, say) is left to staging
    only_others = EarlyCompression(
        tmp_path / "early-others", max_bytes=1 << 20, tables={("public", "others")}
    )
    try:
        only_others.final_rows(spill, relation, spill.stat().st_size, 10)
        assert only_others.files_for(segment, spill_header(relation)) is None
    finally:
        only_others.close()


@dataclass(frozen=True)
class _Column:
    name: str


@dataclass(frozen=True)
class _Relation:
    namespace: str
    name: str
    columns: tuple[_Column, ...]


@dataclass(frozen=True)
class _Segment:
    path: Path
    rows: int
    cuts: tuple[tuple[int, int], ...]


def test_a_refused_value_in_a_transaction_the_deadline_discards_leaves_the_spill_as_it_was(
    source: tuple[str, TableRef], tmp_path: Path
) -> None:
    dsn, table = source
    ident = sql.Identifier(table.schema, table.table)
    with change_capture_source(dsn, [(table.schema, table.table)]) as cdc:
        # Given a committed row large enough to fill a 1 MB file (a row boundary recorded at its end),
        # then a transaction whose first row the contract refuses (an infinite date)
        execute(
            dsn,
            sql.SQL(
                "INSERT INTO {} (id, note) SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 100000) g"
            ).format(ident),
        )
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("INSERT INTO {} (id, day) VALUES (2, 'infinity')").format(ident))
            cur.execute(sql.SQL("INSERT INTO {} (id, day) VALUES (3, '2026-01-01')").format(ident))
        conn.close()
        # When both reads stop at a deadline inside that transaction (it is discarded) and are staged
        staged: dict[bool, StagedSegment] = {}
        for staged_text in (True, False):
            spill_dir = tmp_path / f"spill-{staged_text}"
            with open_stream(dsn, slot=cdc.slot, publication=cdc.publication) as session:
                stream = session.read(
                    heartbeat_lsn=None,
                    tables=[table],
                    max_bytes=1 << 40,
                    deadline=1.0,
                    spill_dir=spill_dir,
                    clock=lambda s=session: 2.0 if s.changes_read >= 2 else 0.0,
                    staged_text=staged_text,
                )
            assert (stream.stop_reason, stream.changes) == ("deadline", 1)
            assert [p.name for p in spill_dir.iterdir()] == [stream.segments[0].path.name]
            (tmp_path / f"out-{staged_text}").mkdir()
            staged[staged_text] = stage(cdc.dsn, stream, tmp_path / f"out-{staged_text}", target_file_mb=1)
    # Then the staged-text spill is staged as it is, into the files the round trip writes: the
    # discarded segment of pgoutput's text left no trace, nor its boundary an empty file
    assert not staged[True].round_trip
    assert (
        [f.written.rows for f in staged[True].files] == [f.written.rows for f in staged[False].files] == [1]
    )
    assert records(staged[True]) == records(staged[False])
