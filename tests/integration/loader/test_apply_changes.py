"""Applying change runs (mode cdc) through the real loader: change files written per the contract
(pgsnow.changes), their manifests put through RunStore, files uploaded to moto and delivered to
the loader, applied in the local Snowflake over HTTP. docs/loading.md, "Applying changes (mode cdc)".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import itertools
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from load_support import csv_field, put_staged_file, query

from pgsnow.changes import CHANGE_COLUMNS, ChangeRange, unchanged_text
from pgsnow.config import DeleteMode, ExtractMode, Settings, TableOptions, TruncateMode
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, parse_data_key
from pgsnow.ledger import AppliedPosition, Ledger
from pgsnow.load.batch import load_batch
from pgsnow.load.outcomes import LoadStatus
from pgsnow.local.snowflake import LocalSnowflake
from pgsnow.manifest import Column, RunManifest, RunState, StagedFile
from pgsnow.runs import RunStore
from pgsnow.snowflake import change_sql
from pgsnow.snowflake.table_sql import SOFT_DELETE_COLUMN
from pgsnow.typemap import map_pg_type

pytestmark = pytest.mark.integration

ITEMS = TableRef("public", "items")
SLOT = "pgsnow_test"
ITEM_COLUMNS = [("id", "bigint", False), ("name", "text", True), ("doc", "text", True), ("qty", "integer", True)]
SNAPSHOT_LSN = 1000
COMMITTED = dt.datetime(2026, 12, 7, 8, 0, 0, tzinfo=dt.UTC)
_run_numbers = itertools.count(1)


def columns(extra: list[tuple[str, str, bool]] | None = None) -> tuple[Column, ...]:
    return tuple(
        Column.from_types(n, t, t, map_pg_type(t), nullable) for n, t, nullable in [*ITEM_COLUMNS, *(extra or [])]
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
            primary_key=("id",),
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
            primary_key=("id",),
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

    def upload(self, manifest: RunManifest, changes: list[tuple[Any, ...]], extra: Any = None) -> None:
        names = [*CHANGE_COLUMNS, *(c.name for c in columns(extra))]
        put_file(self.s3, self.settings, manifest.run_id, names, changes, manifest.file_format)

    def deliver(self, manifest: RunManifest) -> list[Any]:
        outcomes = load_batch(
            settings=self.settings,
            sf_conn=self.sf_conn,
            s3=self.s3,
            objects=[parse_data_key(f.key, self.settings.prefix) for f in manifest.files],
        )
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        return [o.result for o in outcomes]

    def rows(self, *extra: str) -> list[tuple[Any, ...]]:
        names = ", ".join(f'"{n}"' for n in ("ID", "NAME", "DOC", "QTY", *extra))
        return [tuple(r) for r in query(self.sf_conn, f'SELECT {names} FROM {items_sql(self.settings)} ORDER BY "ID"')]

    def position(self) -> AppliedPosition | None:
        db = self.settings.snowflake.database
        assert db is not None
        return Ledger(self.sf_conn, db, self.settings.snowflake.control_schema, ITEMS).applied_position()


def items_sql(settings: Settings) -> str:
    return f'"{settings.snowflake.database}"."PUBLIC"."ITEMS"'


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
    assert RunStore(source.s3, source.settings.bucket).get_manifest(ITEMS, run.run_id).state is RunState.LOADED
