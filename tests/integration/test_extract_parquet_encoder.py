"""Parquet file cuts while row groups are encoded on the encoder thread (extract.parquet_stager).

The main thread slices the next row group before the encoder has finished the previous one;
these tests pin that the cuts (by row count and by size) and the bytes are what a serial
writer would give: deterministic, every row once, in key order.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pyarrow.parquet as pq
import pytest
from psycopg2 import sql

import pgsnow.extract.parquet_stager as parquet_stager
from pgsnow.config import Component, Settings, postgres_env
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat
from pgsnow.local.aws import LocalAws
from pgsnow.postgres import connect

pytestmark = pytest.mark.integration

PG_DSN_DEFAULT = "host=127.0.0.1 port=5432 user=postgres dbname=test"
TABLE_ROWS = 40_000
GROUP_ROWS = 2_000


@pytest.fixture(scope="module")
def pg_dsn() -> str:
    return postgres_env().get("PGSNOW_PG_DSN") or PG_DSN_DEFAULT


@pytest.fixture(scope="module")
def table(pg_dsn: str) -> Iterator[TableRef]:
    """40K rows of hex digests: ~2.5 MB of Parquet, so a 1 MB target cuts files by size."""
    schema_name = f"pgsnow_encoder_{uuid.uuid4().hex[:10]}"
    ref = TableRef(schema_name, "digests")
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema_name)))
        cur.execute(
            sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, digest text, other text)").format(
                sql.Identifier(ref.schema, ref.table)
            )
        )
        cur.execute(
            sql.SQL(
                "INSERT INTO {} SELECT i, md5(i::text) || md5((i * 7)::text), md5((i * 13)::text)"
                " FROM generate_series(%s, 1, -1) AS i"
            ).format(sql.Identifier(ref.schema, ref.table)),
            (TABLE_ROWS,),
        )
    yield ref
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema_name)))
    admin.close()


@pytest.fixture(scope="module")
def s3(aws: LocalAws) -> Any:
    return aws.client("s3")


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = connect(pg_dsn)
    yield conn
    conn.close()


def settings_for(s3: Any, pg_dsn: str, table: TableRef, batch_rows: int) -> Settings:
    bucket = f"pgsnow-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return Settings.from_env(
        {
            "S3_STAGE_BUCKET": bucket,
            "S3_STAGE_PREFIX": "staging",
            "PGSNOW_TABLES": table.qualified,
            "PGSNOW_PG_DSN": pg_dsn,
            "EXTRACT_BATCH_ROWS": str(batch_rows),
            "EXTRACT_TARGET_FILE_MB": "1",
            "S3_FILE_FORMAT": "parquet",
        },
        Component.EXTRACTOR,
    )


@pytest.mark.parametrize(
    ("batch_rows", "expected_file_rows"),
    [
        pytest.param(100_000, [20_000, 20_000], id="cut-by-size-only"),
        pytest.param(7_000, [7_000] * 5 + [5_000], id="cut-by-rows-groups-straddle"),
        # The size cut lands one short group before the row cut: the next group must wait for it.
        pytest.param(21_001, [20_000, 20_000], id="size-cut-just-before-the-row-cut"),
    ],
)
def test_parquet_cuts_are_deterministic_while_groups_encode_in_the_background(
    monkeypatch: pytest.MonkeyPatch,
    s3: Any,
    pg_dsn: str,
    pg_conn: psycopg2.extensions.connection,
    table: TableRef,
    batch_rows: int,
    expected_file_rows: list[int],
) -> None:
    # Given row groups of 2,000 rows, a 1 MB target size and the batch size of the case
    monkeypatch.setattr(parquet_stager, "PARQUET_CHUNK_ROWS", GROUP_ROWS)

    # When the table is extracted twice, by two runs into two buckets
    manifests = []
    for _ in range(2):
        settings = settings_for(s3, pg_dsn, table, batch_rows)
        manifests.append(
            (
                settings.bucket,
                extract_table(
                    settings=settings, pg_conn=pg_conn, s3=s3, table=table, file_format=FileFormat.PARQUET
                ),
            )
        )

    # Then both runs staged the same files, byte for byte
    (bucket, manifest), (_, again) = manifests
    assert [(f.rows, f.bytes, f.sha256) for f in manifest.files] == [
        (f.rows, f.bytes, f.sha256) for f in again.files
    ]
    # And every file but the last was cut at batch_rows, or after a whole row group once it reached 1 MB
    for staged in manifest.files[:-1]:
        assert staged.rows == batch_rows or (staged.rows % GROUP_ROWS == 0 and staged.bytes >= 1024 * 1024), (
            staged
        )
    assert [f.rows for f in manifest.files] == expected_file_rows
    # And every row is there once, in key order, in row groups that never cross a file
    ids: list[int] = []
    for staged in manifest.files:
        body = s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read()
        parquet = pq.ParquetFile(io.BytesIO(body))
        assert parquet.metadata.num_rows == staged.rows
        assert all(
            parquet.metadata.row_group(g).num_rows <= GROUP_ROWS for g in range(parquet.num_row_groups)
        )
        ids += parquet.read(columns=["id"]).column("id").to_pylist()
    assert ids == list(range(1, TABLE_ROWS + 1))
