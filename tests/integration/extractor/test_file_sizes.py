"""Staged files cut by size, chunks sized by bytes, and the optional row cap (issue 14, item 1).

Real PostgreSQL and a moto server; EXTRACT_TARGET_FILE_MB=1 stands in for the default 128 so
the tables stay a few MB. A file is cut once it reaches the target: after the CSV block or the
Parquet row group that took it there, so it ends at most one of those over.
"""

from __future__ import annotations

import io
import uuid
from typing import Any

import psycopg2.extensions
import pyarrow.parquet as pq
import pytest
from psycopg2 import sql
from stack_support import new_bucket

from pgsnow.config import Component, ConfigError, Settings
from pgsnow.extract.files import CHUNK_FILES, FILES_PER_CHUNK
from pgsnow.extract.run import extract_table
from pgsnow.formats import CSV_BLOCK_BYTES
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat
from pgsnow.manifest import RunManifest, RunState, StagedFile
from pgsnow.postgres import connect

pytestmark = pytest.mark.integration

PREFIX = "staging"
TARGET = 1024 * 1024  # EXTRACT_TARGET_FILE_MB=1


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3, "pgsnow-sizes")


def make_table(admin: psycopg2.extensions.connection, schema: str, rows: int, row_text: str) -> TableRef:
    """``id`` plus ``payload`` = ``row_text`` (an expression of ``g``), analysed so the planner
    statistics know the table's size."""
    table = TableRef(schema, f"sizes_{uuid.uuid4().hex[:8]}")
    ident = sql.Identifier(table.schema, table.table)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, payload text)").format(ident))
        cur.execute(
            sql.SQL("INSERT INTO {} SELECT g, {} FROM generate_series(1, %s) g").format(
                ident, sql.SQL(row_text)
            ),
            (rows,),
        )
        cur.execute(sql.SQL("ANALYZE {}").format(ident))
    return table


# 32 hex digits (~18 staged bytes a row): a 20,000-row Parquet group is a third of the target, so
# a file holds several groups and is cut by size, not by a group's end.
HEX_ROW = "md5(g::text)"
# The same with 40 more bytes on disk that compress to almost nothing: staged bytes are about a
# quarter of the bytes on disk, as the first chunk's estimate assumes.
PADDED_ROW = "md5(g::text) || repeat('x', 40)"


def extract(s3: Any, bucket: str, pg_dsn: str, table: TableRef, fmt: str, **env: str) -> RunManifest:
    settings = Settings.from_env(
        {
            "S3_STAGE_BUCKET": bucket,
            "S3_STAGE_PREFIX": PREFIX,
            "PGSNOW_TABLES": table.qualified,
            "PGSNOW_PG_DSN": pg_dsn,
            "EXTRACT_TARGET_FILE_MB": "1",
            **env,
        },
        Component.EXTRACTOR,
    )
    conn = connect(pg_dsn)
    try:
        return extract_table(settings=settings, pg_conn=conn, s3=s3, table=table, file_format=FileFormat(fmt))
    finally:
        conn.close()


def staged_ids(s3: Any, bucket: str, files: tuple[StagedFile, ...]) -> list[int]:
    ids: list[int] = []
    for staged in files:
        body = s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read()
        if staged.file_format is FileFormat.PARQUET:
            ids += pq.read_table(io.BytesIO(body), columns=["id"]).column("id").to_pylist()
        else:
            import gzip

            lines = gzip.decompress(body).decode().splitlines()[1:]
            ids += [int(line.split(",", 1)[0]) for line in lines]
    return ids


def parquet_metadata(s3: Any, bucket: str, staged: StagedFile) -> pq.FileMetaData:
    body = s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read()
    return pq.ParquetFile(io.BytesIO(body)).metadata


def last_flush_bytes(s3: Any, bucket: str, staged: StagedFile) -> int:
    """How far a file may go past the target: its last Parquet row group with the footer, or one
    CSV block (compressed, at most its raw size)."""
    if staged.file_format is FileFormat.CSV:
        return CSV_BLOCK_BYTES
    meta = parquet_metadata(s3, bucket, staged)
    footer = meta.serialized_size + 8  # the footer, its length and the closing magic
    last = meta.row_group(meta.num_row_groups - 1)
    return sum(last.column(i).total_compressed_size for i in range(last.num_columns)) + footer


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_without_a_row_cap_files_are_cut_by_size(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, fmt: str
) -> None:
    # Given 200,000 rows (several MB staged) and no EXTRACT_BATCH_ROWS or EXTRACT_CHUNK_ROWS
    table = make_table(admin, schema_name, 200_000, HEX_ROW)
    # When the table is staged with a 1 MB target
    manifest = extract(s3, bucket, pg_dsn, table, fmt)

    # Then one chunk holds every file, and each but the last reached the target and stopped
    # within one flush unit of it
    files = manifest.files
    assert len(files) >= 3
    assert {f.chunk for f in files} == {0}
    for staged in files[:-1]:
        assert TARGET <= staged.bytes <= TARGET + last_flush_bytes(s3, bucket, staged), staged
        if staged.file_format is FileFormat.PARQUET:  # cut by size, not at a row group's end
            assert parquet_metadata(s3, bucket, staged).num_row_groups >= 2
    assert files[-1].bytes <= TARGET + last_flush_bytes(s3, bucket, files[-1])
    # And every row is staged once, in key order
    assert staged_ids(s3, bucket, files) == list(range(1, 200_001))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_row_cap_cuts_files_when_set_and_sizes_chunks(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, fmt: str
) -> None:
    # Given 100 rows and EXTRACT_BATCH_ROWS=5 (far below the 1 MB target)
    table = make_table(admin, schema_name, 100, HEX_ROW)
    manifest = extract(s3, bucket, pg_dsn, table, fmt, EXTRACT_BATCH_ROWS="5")

    # Then files hold exactly 5 rows, and a chunk holds CHUNK_FILES of them (8 x 5 = 40 rows)
    assert [f.rows for f in manifest.files] == [5] * 20
    per_chunk = [sum(1 for f in manifest.files if f.chunk == c) for c in range(3)]
    assert per_chunk == [CHUNK_FILES, CHUNK_FILES, 20 - 2 * CHUNK_FILES]
    assert [f.batch for f in manifest.files][CHUNK_FILES] == FILES_PER_CHUNK + 1
    assert staged_ids(s3, bucket, manifest.files) == list(range(1, 101))


def files_by_chunk(manifest: RunManifest) -> dict[int, list[StagedFile]]:
    chunks: dict[int, list[StagedFile]] = {}
    for staged in manifest.files:
        chunks.setdefault(staged.chunk or 0, []).append(staged)
    return chunks


def test_chunks_sized_by_bytes_hold_several_full_files_and_a_resumed_run_stages_each_row_once(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str
) -> None:
    # Given 800,000 rows (~16 MB of gzip CSV), chunks sized by bytes (no EXTRACT_CHUNK_ROWS), and
    # an invocation that stops for its deadline after its 10th file, in the middle of a chunk
    rows = 800_000
    table = make_table(admin, schema_name, rows, PADDED_ROW)
    stop_after = 10

    def remaining_ms() -> int:
        staged = s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/").get("KeyCount", 0)
        return 0 if staged >= stop_after else 10**9

    settings = Settings.from_env(
        {
            "S3_STAGE_BUCKET": bucket,
            "S3_STAGE_PREFIX": PREFIX,
            "PGSNOW_TABLES": table.qualified,
            "PGSNOW_PG_DSN": pg_dsn,
            "EXTRACT_TARGET_FILE_MB": "1",
        },
        Component.EXTRACTOR,
    )
    conn = connect(pg_dsn)
    try:
        first = extract_table(
            settings=settings,
            pg_conn=conn,
            s3=s3,
            table=table,
            file_format=FileFormat.CSV,
            remaining_ms=remaining_ms,
        )
        # When the next invocation resumes the run
        resumed = extract_table(
            settings=settings,
            pg_conn=conn,
            s3=s3,
            table=table,
            file_format=FileFormat.CSV,
            run_id=first.run_id,
        )
    finally:
        conn.close()

    # Then the first invocation handed on (the file it was writing when the 10th upload ended is
    # uploaded before it stops) and the second finished the run
    assert (first.state, len(first.files)) == (RunState.EXTRACTING, stop_after + 1)
    assert resumed.state is RunState.STAGED
    # And there are several chunks, each holding several files, only its last short of the target
    chunks = files_by_chunk(resumed)
    assert len(chunks) >= 3
    for files in chunks.values():
        assert all(f.bytes >= TARGET for f in files[:-1])
    # And the first chunk (sized from PostgreSQL's bytes on disk) and the second (from the run's
    # own staged bytes per row) each hold about CHUNK_FILES files
    assert CHUNK_FILES // 2 <= len(chunks[0]) <= 2 * CHUNK_FILES
    assert CHUNK_FILES - 1 <= len(chunks[1]) <= CHUNK_FILES + 1
    # And batches run 1, 2, ... within each chunk, with every row staged once, in key order
    for index, files in chunks.items():
        assert [f.batch for f in files] == [index * FILES_PER_CHUNK + n for n in range(1, len(files) + 1)]
    assert staged_ids(s3, bucket, resumed.files) == list(range(1, rows + 1))
    assert s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")["KeyCount"] == len(resumed.files)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"EXTRACT_BATCH_ROWS": "1", "EXTRACT_CHUNK_ROWS": "10000"},
            "would cut a chunk into more than 9999 files",
            id="cap-too-small-for-chunk",
        ),
        pytest.param(
            {"EXTRACT_TARGET_FILE_MB": "5000"}, "EXTRACT_TARGET_FILE_MB must be <= 4096", id="target"
        ),
        pytest.param({"EXTRACT_BATCH_ROWS": "-1"}, "EXTRACT_BATCH_ROWS must be >= 0", id="negative-cap"),
    ],
)
def test_sizes_that_cannot_work_are_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"S3_STAGE_BUCKET": "b", **env}, Component.LOCAL)
    assert message in str(raised.value)
