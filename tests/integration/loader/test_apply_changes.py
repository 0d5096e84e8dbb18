"""Applying change runs (mode cdc) through the real loader: change files written per the contract
(pgsnow.changes), their manifests put through RunStore, files uploaded to moto and delivered to
the loader, applied in the local Snowflake over HTTP. docs/loading.md, "Applying changes (mode cdc)".
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import itertools
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from load_support import csv_field, put_staged_file, query

from pgsnow.changes import CHANGE_COLUMNS, ChangeRange, unchanged_text
from pgsnow.config import DeleteMode, ExtractMode, Settings, TableOptions, TruncateMode
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, manifest_key, parse_data_key
from pgsnow.ledger import AppliedPosition, Ledger
from pgsnow.load.batch import load_batch
from pgsnow.load.changes import apply_change_run
from pgsnow.load.objects import head_staged_object
from pgsnow.load.outcomes import LoadStatus
from pgsnow.load.session import LoadSession
from pgsnow.load.tables import Tables
from pgsnow.load.work_tables import WORK_TABLE_MAX_AGE, drop_abandoned_work_tables
from pgsnow.local.snowflake import LocalSnowflake
from pgsnow.manifest import Column, RunManifest, RunState, StagedFile
from pgsnow.runs import RunStore
from pgsnow.snowflake import change_sql
from pgsnow.snowflake.table_sql import SOFT_DELETE_COLUMN
from pgsnow.typemap import map_pg_type

pytestmark = pytest.mark.integration

ITEMS = TableRef("public", "items")
SLOT = "pgsnow_test"
ITEM_COLUMNS = [
    ("id", "bigint", False),
    ("name", "text", True),
    ("doc", "text", True),
    ("qty", "integer", True),
]
SNAPSHOT_LSN = 1000
COMMITTED = dt.datetime(2026, 12, 7, 8, 0, 0, tzinfo=dt.UTC)
_run_numbers = itertools.count(1)


def columns(extra: list[tuple[str, str, bool]] | None = None) -> tuple[Column, ...]:
    return tuple(
        Column.from_types(n, t, t, map_pg_type(t), nullable)
        for n, t, nullable in [*ITEM_COLUMNS, *(extra or [])]
    )


def new_run_id() -> str:
    return f"20261207T{next(_run_numbers):06d}000000Z"


def change(
    op: str,
    lsn: int,
    seq: int,
    values: tuple[Any, ...],
    *,
    unchanged: tuple[str, ...] = (),
    moved: bool = False,
) -> tuple[Any, ...]:
    committed = COMMITTED + dt.timedelta(seconds=lsn)
    return (op, lsn, seq, committed, unchanged_text(unchanged), moved, *values)


def put_file(
    s3: Any,
    settings: Settings,
    run_id: str,
    names: list[str],
    rows: list[tuple[Any, ...]],
    file_format: FileFormat,
    batch: int = 1,
    *,
    upload: bool = True,
) -> StagedFile:
    key = data_key(settings.prefix, ITEMS, batch, run_id, file_format)
    if file_format is FileFormat.CSV:
        lines = [",".join(names)] + [",".join(csv_field(v) for v in row) for row in rows]
        body = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    else:
        body = parquet_body(names, rows)
    if upload:
        put_staged_file(s3, settings, key, body, rows=len(rows), run_id=run_id)
    return StagedFile(key, batch, len(rows), len(body), hashlib.sha256(body).hexdigest(), file_format)


def parquet_body(names: list[str], rows: list[tuple[Any, ...]]) -> bytes:
    types = {
        "_pgsnow_op": pa.string(),
        "_pgsnow_lsn": pa.decimal128(20, 0),
        "_pgsnow_seq": pa.int64(),
        "_pgsnow_committed_at": pa.timestamp("us", tz="UTC"),
        "_pgsnow_unchanged": pa.string(),
        "_pgsnow_key_moved": pa.bool_(),
        "id": pa.int64(),
        "name": pa.string(),
        "doc": pa.string(),
        "qty": pa.int32(),
        "color": pa.string(),
    }
    values = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = [pa.array(list(v), type=types[n]) for n, v in zip(names, values, strict=True)]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, names=names), sink)
    return sink.getvalue()


@dataclasses.dataclass
class Source:
    """One change-capture table's staged runs, chained as the drain chains them."""

    s3: Any
    settings: Settings
    sf_conn: Any
    deletes: str = "hard"
    last_end: int = SNAPSHOT_LSN
    key: tuple[str, ...] = ("id",)

    def snapshot(self, rows: list[tuple[Any, ...]], file_format: FileFormat = FileFormat.CSV) -> list[Any]:
        run_id = new_run_id()
        names = [n for n, _, _ in ITEM_COLUMNS]
        staged = put_file(self.s3, self.settings, run_id, names, rows, file_format)
        manifest = RunManifest(
            run_id=run_id,
            table=ITEMS,
            mode="full",
            file_format=file_format,
            columns=columns(),
            primary_key=self.key,
            state=RunState.STAGED,
            started_at="2026-12-07T08:00:00Z",
            files=(staged,),
            write_mode="replace",
            changes=ChangeRange(SLOT, SNAPSHOT_LSN, SNAPSHOT_LSN, snapshot_lsn=SNAPSHOT_LSN),
        )
        RunStore(self.s3, self.settings.bucket).put_manifest(manifest)
        return self.deliver(manifest)

    def stage(
        self,
        changes: list[tuple[Any, ...]],
        *,
        end_lsn: int,
        after_lsn: int | None = None,
        file_format: FileFormat = FileFormat.CSV,
        extra: list[tuple[str, str, bool]] | None = None,
        upload: bool = True,
    ) -> RunManifest:
        """A change run (manifest then file, as the drain writes them)."""
        run_id = new_run_id()
        data = columns(extra)
        names = [*CHANGE_COLUMNS, *(c.name for c in data)]
        files = (put_file(self.s3, self.settings, run_id, names, changes, file_format, upload=False),)
        manifest = RunManifest(
            run_id=run_id,
            table=ITEMS,
            mode="cdc",
            file_format=file_format,
            columns=data,
            primary_key=self.key,
            state=RunState.STAGED,
            started_at="2026-12-07T08:00:00Z",
            files=files,
            write_mode="merge",
            deletes=self.deletes,
            changes=ChangeRange(SLOT, self.last_end if after_lsn is None else after_lsn, end_lsn),
        )
        RunStore(self.s3, self.settings.bucket).put_manifest(manifest)
        if upload:
            put_file(self.s3, self.settings, run_id, names, changes, file_format)
        self.last_end = end_lsn
        return manifest

    def stage_files(self, changes_per_file: list[list[tuple[Any, ...]]], *, end_lsn: int) -> RunManifest:
        """A change run of one file per entry (batches 1, 2, ...), its manifest only: the drain
        writes the manifest first, then uploads the files in batch order (``upload``)."""
        run_id = new_run_id()
        names = [*CHANGE_COLUMNS, *(c.name for c in columns())]
        files = tuple(
            put_file(self.s3, self.settings, run_id, names, rows, FileFormat.CSV, batch, upload=False)
            for batch, rows in enumerate(changes_per_file, start=1)
        )
        manifest = RunManifest(
            run_id=run_id,
            table=ITEMS,
            mode="cdc",
            file_format=FileFormat.CSV,
            columns=columns(),
            primary_key=self.key,
            state=RunState.STAGED,
            started_at="2026-12-07T08:00:00Z",
            files=files,
            write_mode="merge",
            deletes=self.deletes,
            changes=ChangeRange(SLOT, self.last_end, end_lsn),
        )
        RunStore(self.s3, self.settings.bucket).put_manifest(manifest)
        self.last_end = end_lsn
        return manifest

    def upload(
        self, manifest: RunManifest, changes: list[tuple[Any, ...]], extra: Any = None, batch: int = 1
    ) -> None:
        names = [*CHANGE_COLUMNS, *(c.name for c in columns(extra))]
        put_file(self.s3, self.settings, manifest.run_id, names, changes, manifest.file_format, batch)

    def deliver_files(self, manifest: RunManifest, batches: list[int]) -> list[Any]:
        """Deliver the events of some of the run's files (by batch number) in one loader batch."""
        return self.deliver_keys([manifest.files[batch - 1].key for batch in batches])

    def deliver(self, manifest: RunManifest) -> list[Any]:
        return self.deliver_keys([f.key for f in manifest.files])

    def deliver_keys(self, keys: list[str]) -> list[Any]:
        outcomes = load_batch(
            settings=self.settings,
            sf_conn=self.sf_conn,
            s3=self.s3,
            objects=[parse_data_key(key, self.settings.prefix) for key in keys],
        )
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        return [o.result for o in outcomes]

    def rows(self, *extra: str) -> list[tuple[Any, ...]]:
        names = ", ".join(f'"{n}"' for n in ("ID", "NAME", "DOC", "QTY", *extra))
        return [
            tuple(r)
            for r in query(self.sf_conn, f'SELECT {names} FROM {items_sql(self.settings)} ORDER BY "ID"')
        ]

    def position(self) -> AppliedPosition | None:
        db = self.settings.snowflake.database
        assert db is not None
        return Ledger(self.sf_conn, db, self.settings.snowflake.control_schema, ITEMS).applied_position()


def items_sql(settings: Settings) -> str:
    return f'"{settings.snowflake.database}"."PUBLIC"."ITEMS"'


class S3Calls:
    """The S3 requests a client sends while counting (``with calls:``, except ``paused``), by
    operation, and the keys its listings returned (botocore's event hooks: what goes over the wire
    to the moto server)."""

    def __init__(self, s3: Any) -> None:
        self.s3 = s3
        self.by_operation: Counter[str] = Counter()
        self.listed: list[str] = []
        self.counting = True

    def _count(self, model: Any, **_: Any) -> None:
        if self.counting:
            self.by_operation[model.name] += 1

    def _listed(self, parsed: dict[str, Any], **_: Any) -> None:
        if self.counting:
            self.listed.extend(obj["Key"] for obj in parsed.get("Contents", []))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def __enter__(self) -> S3Calls:
        self.s3.meta.events.register("before-call.s3", self._count)
        self.s3.meta.events.register("after-call.s3.ListObjectsV2", self._listed)
        return self

    def __exit__(self, *_: object) -> None:
        self.s3.meta.events.unregister("before-call.s3", self._count)
        self.s3.meta.events.unregister("after-call.s3.ListObjectsV2", self._listed)


def with_options(settings: Settings, **options: Any) -> Settings:
    table_options = TableOptions(mode=ExtractMode.CDC, **options)
    return dataclasses.replace(settings, table_options_by_name={ITEMS: table_options})


BIG = "toast " * 500
SNAPSHOT_ROWS = [(1, "one", BIG, 10), (2, "two", "doc2", 20), (3, "three", None, 30)]


@pytest.fixture
def source(settings: Settings, s3: Any, sf_conn: Any) -> Source:
    return Source(s3, with_options(settings, deletes=DeleteMode.HARD), sf_conn)


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_insert_update_delete_in_one_run_and_unchanged_toast_keeps_the_target_value(
    source: Source, file_format: FileFormat
) -> None:
    # Given the table's snapshot at LSN 1000 is loaded (nothing to apply yet)
    source.snapshot(SNAPSHOT_ROWS, file_format)
    assert source.position() == AppliedPosition(SNAPSHOT_LSN, source.position().run_id, True)  # type: ignore[union-attr]

    # When a run inserts 4, updates it, deletes it; updates 1 leaving its TOASTed doc unchanged;
    # deletes 2; inserts 5 then updates it leaving doc unchanged (the insert carried it)
    run = source.stage(
        [
            change("I", 1100, 1, (4, "four", "doc4", 40)),
            change("U", 1100, 2, (4, "four!", "doc4", 41)),
            change("U", 1200, 1, (1, "uno", None, 11), unchanged=("doc",)),
            change("D", 1200, 2, (2, None, None, None)),
            change("D", 1300, 1, (4, None, None, None)),
            change("I", 1300, 2, (5, "five", "doc5", 50)),
            change("U", 1400, 1, (5, "cinco", None, 55), unchanged=("doc",)),
        ],
        end_lsn=1500,
        file_format=file_format,
    )
    results = source.deliver(run)

    # Then the newest change per key wins, doc is never NULL, and the position is the run's end
    assert [r.status for r in results] == [LoadStatus.LOADED]
    assert source.rows() == [(1, "uno", BIG, 11), (3, "three", None, 30), (5, "cinco", "doc5", 55)]
    assert source.position() == AppliedPosition(1500, run.run_id)
    assert (
        RunStore(source.s3, source.settings.bucket).get_manifest(ITEMS, run.run_id).state is RunState.LOADED
    )


def test_soft_deletes_mark_the_row_with_the_commit_time_and_a_reinsert_clears_it(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    source = Source(s3, with_options(settings, deletes=DeleteMode.SOFT), sf_conn, deletes="soft")
    source.snapshot(SNAPSHOT_ROWS)
    run = source.stage(
        [
            change("D", 1100, 1, (2, None, None, None)),
            change("D", 1100, 2, (3, None, None, None)),
            change("I", 1200, 1, (3, "three again", "d3", 33)),
        ],
        end_lsn=1200,
    )
    source.deliver(run)
    rows = query(
        sf_conn,
        f'SELECT "ID", "NAME", TO_VARCHAR("{SOFT_DELETE_COLUMN}") FROM {items_sql(settings)} ORDER BY "ID"',
    )
    deleted_at = (COMMITTED + dt.timedelta(seconds=1100)).strftime("%Y-%m-%d %H:%M:%S")
    assert [(r[0], r[1], r[2] is not None) for r in rows] == [
        (1, "one", False),
        (2, "two", True),
        (3, "three again", False),
    ]
    assert str(rows[1][2]).startswith(deleted_at)


def test_a_primary_key_move_deletes_the_old_key_and_keeps_its_unchanged_toast_value(source: Source) -> None:
    source.snapshot(SNAPSHOT_ROWS)
    # UPDATE items SET id = 7, name = 'moved' WHERE id = 1 (doc, TOASTed, unchanged); then an
    # update of 2 and a move of 2 to 8 in a later transaction of the same run: 8 takes doc from
    # that earlier change of key 2, not from the target
    run = source.stage(
        [
            change("D", 1100, 1, (1, None, None, None)),
            change("U", 1100, 2, (7, "moved", None, 10), unchanged=("doc",), moved=True),
            change("U", 1200, 1, (2, "two", "doc2 new", 21)),
            change("D", 1300, 1, (2, None, None, None)),
            change("U", 1300, 2, (8, "eight", None, 21), unchanged=("doc",), moved=True),
        ],
        end_lsn=1300,
    )
    source.deliver(run)
    assert source.rows() == [(3, "three", None, 30), (7, "moved", BIG, 10), (8, "eight", "doc2 new", 21)]


@pytest.mark.parametrize("deletes", ["hard", "soft"])
def test_truncate_applies_and_only_later_changes_count(
    settings: Settings, s3: Any, sf_conn: Any, deletes: str
) -> None:
    source = Source(s3, with_options(settings, deletes=DeleteMode(deletes)), sf_conn, deletes=deletes)
    source.snapshot(SNAPSHOT_ROWS)
    run = source.stage(
        [
            change("U", 1100, 1, (1, "before", None, 1), unchanged=("doc",)),
            change("T", 1200, 1, (None, None, None, None)),
            change("I", 1300, 1, (9, "nine", "d9", 90)),
        ],
        end_lsn=1300,
    )
    source.deliver(run)
    if deletes == "hard":
        assert source.rows() == [(9, "nine", "d9", 90)]
    else:
        flags = query(
            sf_conn,
            f'SELECT "ID", "NAME", "{SOFT_DELETE_COLUMN}" IS NOT NULL FROM {items_sql(settings)} ORDER BY "ID"',
        )
        # the update before the TRUNCATE is not applied: the truncate removed the row anyway
        assert [tuple(r) for r in flags] == [
            (1, "one", True),
            (2, "two", True),
            (3, "three", True),
            (9, "nine", False),
        ]


def test_truncate_refused_applies_nothing_and_names_the_lsn(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    source = Source(
        s3, with_options(settings, truncate=TruncateMode.REFUSE, deletes=DeleteMode.HARD), sf_conn
    )
    source.snapshot(SNAPSHOT_ROWS)
    before = source.position()
    run = source.stage(
        [change("U", 1100, 1, (1, "x", "y", 1)), change("T", 1200, 3, (None, None, None, None))], end_lsn=1200
    )
    with pytest.raises(PermanentError) as raised:
        source.deliver(run)
    assert "public.items" in raised.value.message and "LSN 1200" in raised.value.message
    assert source.rows() == [(1, "one", BIG, 10), (2, "two", "doc2", 20), (3, "three", None, 30)]
    assert source.position() == before


def test_a_run_delivered_twice_applies_once_and_a_replayed_overlapping_run_applies_only_newer_changes(
    source: Source,
) -> None:
    source.snapshot(SNAPSHOT_ROWS)
    # (a run's end is the end of its last commit record: past that commit's LSN, its start)
    first = source.stage([change("U", 1100, 1, (1, "a", "doc a", 1))], end_lsn=1150)
    source.deliver(first)
    # A later direct UPDATE of the target shows whether a redelivery writes again
    query(source.sf_conn, f'UPDATE {items_sql(source.settings)} SET "QTY" = 99 WHERE "ID" = 1')
    again = source.deliver(first)
    assert [r.status for r in again] == [LoadStatus.ALREADY_LOADED]
    assert source.rows()[0] == (1, "a", "doc a", 99)

    # A drain that died before confirming re-reads from an older position: its run overlaps the
    # applied one (after 1000 <= applied 1150 < end 1350); only the changes from 1150 on apply
    replay = source.stage(
        [
            change("U", 1100, 1, (1, "a", "doc a", 1)),
            change("U", 1300, 1, (2, "b", None, 2), unchanged=("doc",)),
        ],
        end_lsn=1350,
        after_lsn=1000,
    )
    source.deliver(replay)
    assert source.rows()[:2] == [(1, "a", "doc a", 99), (2, "b", "doc2", 2)]
    assert source.position() == AppliedPosition(1350, replay.run_id)

    # A run wholly behind the position changes nothing: its file is settled with 0 rows, the run
    # is marked loaded (so cleanup removes it)
    behind = source.stage([change("U", 1300, 1, (2, "old", "old", 0))], end_lsn=1350, after_lsn=1150)
    assert [(r.status, r.rows) for r in source.deliver(behind)] == [(LoadStatus.ALREADY_LOADED, 0)]
    assert source.rows()[1] == (2, "b", "doc2", 2)
    assert (
        RunStore(source.s3, source.settings.bucket).get_manifest(ITEMS, behind.run_id).state
        is RunState.LOADED
    )


def test_a_change_committed_exactly_at_the_previous_runs_end_is_applied(source: Source) -> None:
    # Given a run whose end is the end of its last commit record (1150), applied
    source.snapshot(SNAPSHOT_ROWS)
    first = source.stage([change("U", 1100, 1, (1, "first", "d1", 1))], end_lsn=1150)
    source.deliver(first)
    assert source.position() == AppliedPosition(1150, first.run_id)

    # When the next run's first transaction committed right there: its commit record is the next
    # record, so its commit LSN (where that record starts) is the previous run's end (the drain
    # reads this when a writer's commit follows the run's last commit, the heartbeat's, at once)
    second = source.stage(
        [
            change("U", 1150, 1, (2, "at the end", None, 2), unchanged=("doc",)),
            change("D", 1150, 2, (3, None, None, None)),
        ],
        end_lsn=1200,
    )
    assert second.changes is not None and second.changes.after_lsn == 1150
    source.deliver(second)

    # Then its changes are applied, not taken for applied ones
    assert source.rows() == [(1, "first", "d1", 1), (2, "at the end", "doc2", 2)]
    assert source.position() == AppliedPosition(1200, second.run_id)


def test_runs_delivered_out_of_order_wait_for_their_predecessor_then_apply_in_order(source: Source) -> None:
    source.snapshot(SNAPSHOT_ROWS)
    first_changes = [change("U", 1100, 1, (1, "first", "d", 1))]
    first = source.stage(first_changes, end_lsn=1100, upload=False)  # manifest written, file not yet
    second = source.stage([change("U", 1200, 1, (1, "second", None, 2), unchanged=("doc",))], end_lsn=1200)

    # The second run's file arrives first: nothing is applied, the file waits
    waiting = source.deliver(second)
    assert [r.status for r in waiting] == [LoadStatus.WAITING]
    assert source.rows()[0] == (1, "one", BIG, 10)

    # The first run's file arrives: both apply, in order (the second's unchanged doc is the first's)
    source.upload(first, first_changes)
    loaded = source.deliver(first)
    assert [r.status for r in loaded] == [LoadStatus.LOADED]
    assert source.rows()[0] == (1, "second", "d", 2)
    assert source.position() == AppliedPosition(1200, second.run_id)
    store = RunStore(source.s3, source.settings.bucket)
    assert store.get_manifest(ITEMS, second.run_id).state is RunState.LOADED


def test_change_runs_staged_before_the_snapshot_wait_for_it(source: Source) -> None:
    # Given a change run whose file arrives before the table's snapshot is loaded
    run = source.stage([change("U", 1100, 1, (2, "later", "d2", 2))], end_lsn=1100)
    assert [r.status for r in source.deliver(run)] == [LoadStatus.WAITING]
    # When the snapshot is loaded, it is applied from the snapshot's LSN
    source.snapshot(SNAPSHOT_ROWS)
    assert source.rows()[1] == (2, "later", "d2", 2)
    assert source.position() == AppliedPosition(1100, run.run_id)


def test_the_loader_dying_mid_apply_applies_nothing_and_redelivery_applies_once(
    source: Source, local_snowflake: LocalSnowflake, monkeypatch: pytest.MonkeyPatch
) -> None:
    source.snapshot(SNAPSHOT_ROWS)
    run = source.stage(
        [
            change("I", 1100, 1, (4, "four", "d4", 4)),
            change("U", 1100, 2, (1, "uno", None, 11), unchanged=("doc",)),
        ],
        end_lsn=1100,
    )
    real_merge = change_sql.build_merge_changes

    def failing_statement(merge: change_sql.ChangeMerge) -> tuple[str, tuple[Any, ...]]:
        return 'SELECT * FROM "NO_SUCH_TABLE_MID_APPLY"', ()

    monkeypatch.setattr("pgsnow.load.changes.build_merge_changes", failing_statement)
    with pytest.raises(PermanentError):
        source.deliver(run)
    assert source.rows() == [(1, "one", BIG, 10), (2, "two", "doc2", 20), (3, "three", None, 30)]
    assert source.position() is not None and source.position().lsn == SNAPSHOT_LSN  # type: ignore[union-attr]

    monkeypatch.setattr("pgsnow.load.changes.build_merge_changes", real_merge)
    mark = local_snowflake.history.mark()
    assert [r.status for r in source.deliver(run)] == [LoadStatus.LOADED]
    statements = local_snowflake.history.since(mark)
    assert [r.status for r in source.deliver(run)] == [LoadStatus.ALREADY_LOADED]
    assert source.rows() == [
        (1, "uno", BIG, 11),
        (2, "two", "doc2", 20),
        (3, "three", None, 30),
        (4, "four", "d4", 4),
    ]
    print(
        f"statements for one applied change run after a failure (delivery, apply, completion): {len(statements)}"
    )

    # The steady state: the next run of the table, on a loader that prepared everything before
    steady = source.stage([change("U", 1200, 1, (4, "four!", None, 5), unchanged=("doc",))], end_lsn=1200)
    manifest_reads: list[str] = []

    def count_manifest_read(params: dict[str, Any], **_: Any) -> None:
        if params.get("Key", "").endswith(f"{steady.run_id}.json"):
            manifest_reads.append(params["Key"])

    source.s3.meta.events.register("before-parameter-build.s3.GetObject", count_manifest_read)
    mark = local_snowflake.history.mark()
    try:
        source.deliver(steady)
    finally:
        source.s3.meta.events.unregister("before-parameter-build.s3.GetObject", count_manifest_read)
    statements = local_snowflake.history.since(mark)
    print(f"statements for one applied change run, steady state: {len(statements)}")
    for statement in statements:
        print("  ", statement.sql_text.split("\n")[0][:100])
    assert source.rows()[-1] == (4, "four!", "d4", 5)
    # Work done once: the run's files are looked up in the ledger once (by its completion) and its
    # manifest read from S3 once, by the batch (the catch-up and the completion are handed it).
    lookups = [s for s in statements if s.sql_text.startswith('SELECT "S3_KEY"')]
    assert len(lookups) == 1
    assert len(manifest_reads) == 1, manifest_reads


@pytest.mark.parametrize("files", [1, 4, 8])
def test_a_change_run_of_k_files_costs_s3_requests_in_proportion_to_k(source: Source, files: int) -> None:
    # Given the table's snapshot and a first change run applied (the applied position is a run's)
    source.snapshot(SNAPSHOT_ROWS)
    source.deliver(source.stage([change("U", 1100, 1, (1, "first", "d", 1))], end_lsn=1100))

    def changes(lsn: int) -> list[list[tuple[Any, ...]]]:
        return [[change("U", lsn, batch, (2, f"v{batch}", "d", batch))] for batch in range(1, files + 1)]

    # When a run of k files is uploaded and its k events arrive in one batch
    together = source.stage_files(changes(1200), end_lsn=1200)
    for batch, rows in enumerate(changes(1200), start=1):
        source.upload(together, rows, batch=batch)
    with S3Calls(source.s3) as calls:
        assert {r.status for r in source.deliver(together)} == {LoadStatus.LOADED}

    # Then: one HEAD per file, the manifest read once (and written once: loaded), the manifests
    # listed from the applied run on (not the table's whole history)
    print(f"k={files}, one batch: {sum(calls.by_operation.values())} requests {dict(calls.by_operation)}")
    assert calls.by_operation == Counter(
        {"HeadObject": files, "GetObject": 1, "ListObjectsV2": 1, "PutObject": 1}
    )
    assert calls.listed == [manifest_key(ITEMS, together.run_id)]
    assert source.rows()[1] == (2, f"v{files}", "d", files)

    # When the next run's files are uploaded one at a time, each event delivered on its own
    one_by_one = source.stage_files(changes(1300), end_lsn=1300)
    with S3Calls(source.s3) as calls:
        for batch, rows in enumerate(changes(1300), start=1):
            with calls.paused():
                source.upload(one_by_one, rows, batch=batch)
            statuses = [r.status for r in source.deliver_files(one_by_one, [batch])]
            assert statuses == [LoadStatus.LOADED if batch == files else LoadStatus.WAITING]

    # Then each early event costs its own HEAD and one for the run's last file (missing yet), the
    # last event one per file: at most 3k HEADs, not k*k; the manifest read once per event
    print(f"k={files}, one by one: {sum(calls.by_operation.values())} requests {dict(calls.by_operation)}")
    assert calls.by_operation["HeadObject"] <= 3 * files
    assert calls.by_operation["GetObject"] == files
    assert calls.by_operation["ListObjectsV2"] == files
    assert calls.by_operation["PutObject"] == 1
    assert source.position() == AppliedPosition(1300, one_by_one.run_id)


def work_tables(source: Source) -> list[str]:
    """The work tables in the control schema (INFORMATION_SCHEMA.TABLES)."""
    return [
        str(name)
        for (name,) in query(
            source.sf_conn,
            f'SELECT "TABLE_NAME" FROM "{source.settings.snowflake.database}"."INFORMATION_SCHEMA"."TABLES" '
            f"WHERE \"TABLE_SCHEMA\" = '{source.settings.snowflake.control_schema}' "
            "AND STARTSWITH(\"TABLE_NAME\", '_PGSNOW_') ORDER BY 1",
        )
    ]


def test_a_work_table_a_stopped_apply_left_is_dropped_once_no_load_can_be_using_it(
    source: Source, local_snowflake: LocalSnowflake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a change run applied by a loader stopped before its work table's DROP (a Lambda ended
    # at its timeout runs no ``finally``)
    settings, sf_conn = source.settings, source.sf_conn
    source.snapshot(SNAPSHOT_ROWS)
    run = source.stage([change("U", 1100, 1, (1, "applied", "d", 1))], end_lsn=1100)
    mark = local_snowflake.history.mark()
    with monkeypatch.context() as stopped:
        stopped.setattr("pgsnow.load.work_tables.build_drop_table", lambda table: "SELECT 1")
        source.deliver(run)
    (left,) = work_tables(source)
    assert left.startswith("_PGSNOW_CHANGES_")
    # made TRANSIENT (no Fail-safe storage is kept for it), the statement sent once
    created = [
        s.sql_text
        for s in local_snowflake.history.since(mark)
        if s.sql_text.startswith(
            f'CREATE OR REPLACE TRANSIENT TABLE "{settings.snowflake.database}"."PGSNOW"."{left}"'
        )
    ]
    assert len(created) == 1

    # When the cleanup pass's sweep runs at once, and again once the table is older than any load
    at_once = drop_abandoned_work_tables(settings=settings, sf_conn=sf_conn)
    past_any_load = datetime.now(UTC) + WORK_TABLE_MAX_AGE + timedelta(minutes=1)
    later = drop_abandoned_work_tables(settings=settings, sf_conn=sf_conn, now=past_any_load)

    # Then a table a load may still be using is kept, the abandoned one dropped, and nothing else:
    # the applied run, the table's ledger and position stand
    assert (at_once, later) == ([], [left])
    assert work_tables(source) == []
    assert source.rows()[0] == (1, "applied", "d", 1)
    assert source.position() == AppliedPosition(1100, run.run_id)


def test_a_run_with_a_new_column_adds_it(source: Source) -> None:
    source.snapshot(SNAPSHOT_ROWS)
    extra = [("color", "text", True)]
    run = source.stage(
        [
            change("U", 1100, 1, (1, "one", None, 10, "red"), unchanged=("doc",)),
            change("I", 1100, 2, (6, "six", "d6", 6, "blue")),
        ],
        end_lsn=1100,
        extra=extra,
        file_format=FileFormat.PARQUET,
    )
    source.deliver(run)
    assert source.rows("COLOR") == [
        (1, "one", BIG, 10, "red"),
        (2, "two", "doc2", 20, None),
        (3, "three", None, 30, None),
        (6, "six", "d6", 6, "blue"),
    ]
    # An older-shaped run (without the new column) still applies by name and leaves it alone
    older = source.stage([change("U", 1200, 1, (6, "six!", "d6", 7))], end_lsn=1200)
    source.deliver(older)
    assert source.rows("COLOR")[-1] == (6, "six!", "d6", 7, "blue")


def test_two_loaders_applying_the_same_run_apply_it_once(source: Source) -> None:
    # Given two loaders that both read the table's position at the snapshot
    source.snapshot(SNAPSHOT_ROWS)
    stale = source.position()
    assert stale is not None
    run = source.stage([change("U", 1100, 1, (3, "three", "d3", 31))], end_lsn=1100)

    # When one applies the run, then the other tries to apply it from the position it read
    source.deliver(run)
    query(source.sf_conn, f'UPDATE {items_sql(source.settings)} SET "QTY" = 0 WHERE "ID" = 3')
    settings = source.settings
    assert settings.snowflake.database is not None
    session = LoadSession(settings, settings.snowflake.database, source.sf_conn, source.s3)
    staged = parse_data_key(run.files[0].key, settings.prefix)
    facts = head_staged_object(source.s3, settings.bucket, staged)
    assert facts is not None
    lost = apply_change_run(session, Tables(settings.snowflake.database), run, [(staged, facts)], stale)

    # Then the second apply rolled back (the compare-and-set lost), changing nothing
    assert lost is None
    assert source.rows()[2] == (3, "three", "d3", 0)
    assert source.position() == AppliedPosition(1100, run.run_id)
    ledger = Ledger(source.sf_conn, settings.snowflake.database, settings.snowflake.control_schema, ITEMS)
    assert ledger.advance(stale, AppliedPosition(1200, "X")) is False
    # The first position is inserted once: a second insert (another completion of the snapshot)
    # changes nothing and reports that it lost
    assert ledger.advance(None, AppliedPosition(SNAPSHOT_LSN, "Y", from_snapshot=True)) is False
    assert source.position() == AppliedPosition(1100, run.run_id)
    ledger.forget_applied_position()
    first = AppliedPosition(SNAPSHOT_LSN, "Z", from_snapshot=True)
    assert ledger.advance(None, first) is True
    assert ledger.advance(None, AppliedPosition(1, "W", from_snapshot=True)) is False
    assert source.position() == first


def test_a_run_whose_file_never_arrived_is_skipped_once_a_later_run_exists(source: Source) -> None:
    source.snapshot(SNAPSHOT_ROWS)
    # A drain died after the manifest and before its file; the retry re-drained the same changes
    abandoned = source.stage([change("U", 1100, 1, (1, "lost", "x", 0))], end_lsn=1100, upload=False)
    retry = source.stage([change("U", 1100, 1, (1, "kept", "y", 1))], end_lsn=1150, after_lsn=SNAPSHOT_LSN)
    source.deliver(retry)
    assert source.rows()[0] == (1, "kept", "y", 1)
    store = RunStore(source.s3, source.settings.bucket)
    assert store.get_manifest(ITEMS, abandoned.run_id).state is RunState.FAILED
    assert store.get_manifest(ITEMS, retry.run_id).state is RunState.LOADED


def test_an_abandoned_run_of_several_files_names_every_file_that_never_arrived(source: Source) -> None:
    # Given a run of three files whose drain died after uploading the first (its events looked up
    # the run's files newest first and stopped at the first one missing), and the retry's run
    source.snapshot(SNAPSHOT_ROWS)
    lost = [[change("U", 1100, batch, (1, f"lost {batch}", "x", 0))] for batch in (1, 2, 3)]
    abandoned = source.stage_files(lost, end_lsn=1100)
    source.upload(abandoned, lost[0], batch=1)
    assert [r.status for r in source.deliver_files(abandoned, [1])] == [LoadStatus.WAITING]
    retry = source.stage([change("U", 1100, 1, (1, "kept", "y", 1))], end_lsn=1150, after_lsn=SNAPSHOT_LSN)

    # When the retry's file is delivered
    source.deliver(retry)

    # Then the abandoned run is failed, naming both missing files, and the retry applied
    failed = RunStore(source.s3, source.settings.bucket).get_manifest(ITEMS, abandoned.run_id)
    assert (failed.state, failed.error) == (RunState.FAILED, "abandoned: 2 file(s) never arrived")
    assert source.rows()[0] == (1, "kept", "y", 1)


def test_a_row_moved_twice_in_one_run_keeps_its_unchanged_toast_value(source: Source) -> None:
    source.snapshot(SNAPSHOT_ROWS)
    run = source.stage(
        [
            change("D", 1100, 1, (1, None, None, None)),
            change("U", 1100, 2, (7, "seven", None, 10), unchanged=("doc",), moved=True),
            change("D", 1200, 1, (7, None, None, None)),
            change("U", 1200, 2, (8, "eight", None, 10), unchanged=("doc",), moved=True),
        ],
        end_lsn=1200,
    )
    source.deliver(run)
    assert source.rows() == [(2, "two", "doc2", 20), (3, "three", None, 30), (8, "eight", BIG, 10)]


def test_a_table_without_a_primary_key_is_keyed_by_every_column(
    settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # REPLICA IDENTITY FULL: a delete carries the whole old row, an update is a move of the row
    source = Source(
        s3, with_options(settings, deletes=DeleteMode.HARD), sf_conn, key=("id", "name", "doc", "qty")
    )
    source.snapshot(SNAPSHOT_ROWS)
    run = source.stage(
        [
            change("D", 1100, 1, (3, "three", None, 30)),  # NULL in a key column still matches
            change("D", 1200, 1, (2, "two", "doc2", 20)),
            change("U", 1200, 2, (2, "two", "doc2", 22), moved=True),
        ],
        end_lsn=1200,
    )
    source.deliver(run)
    assert source.rows() == [(1, "one", BIG, 10), (2, "two", "doc2", 22)]
