"""Very large values: they stage intact in both formats with bounded memory, and a value larger than
its Snowflake column follows the table's value policy (refused with its key by default).

The 100 MB extraction runs as ``pgsnow extract`` in a process of its own, whose peak RSS (VmHWM) is
read while it runs; the bound asserted is generous (the measured numbers are in
docs/performance.md, from bench/large_values.py). One extraction per format.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pyarrow.parquet as pq
import pytest
from psycopg2 import sql
from stack_support import new_bucket

from pgsnow.config import Component, Settings
from pgsnow.csv_records import csv_fields_at
from pgsnow.errors import PermanentError
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat
from pgsnow.local.aws import LocalAws
from pgsnow.postgres import MAX_BINARY_BYTES, MAX_VARCHAR_BYTES, MAX_VARIANT_BYTES

pytestmark = pytest.mark.integration

LARGE_MB = 100
# Peak RSS of the whole `pgsnow extract` process (interpreter and imports ~120 MB included) with two
# 100 MB values: measured ~440 MB (CSV) and ~830-930 MB (Parquet). Before the values were bounded,
# CSV took ~1040 MB and Parquet failed on any row over 1 MB.
PEAK_RSS_LIMIT_MB = {FileFormat.CSV: 700, FileFormat.PARQUET: 1400}


@pytest.fixture(scope="module")
def bucket(s3: Any) -> str:
    return new_bucket(s3, "pgsnow-large")


@pytest.fixture(scope="module")
def large_table(admin: psycopg2.extensions.connection, schema_name: str) -> TableRef:
    """Row 1: a 100 MB text value; row 2: a 100 MB jsonb document (an array of strings)."""
    table = TableRef(schema_name, "large_values")
    ident = sql.Identifier(table.schema, table.table)
    megabytes = LARGE_MB * 1024 * 1024
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, body text, doc jsonb)").format(ident))
        cur.execute(
            sql.SQL(
                "INSERT INTO {} SELECT 1, string_agg(md5(i::text), ''), '{{\"small\": true}}'"
                " FROM generate_series(1, %s) AS i"
            ).format(ident),
            (megabytes // 32,),
        )
        cur.execute(
            sql.SQL(
                "INSERT INTO {} SELECT 2, 'small', jsonb_agg(md5(i::text)) FROM generate_series(1, %s) AS i"
            ).format(ident),
            (megabytes // 36,),
        )
    return table


def _peak_rss_mb(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return None if line is None else int(line.split()[1]) // 1024


def run_extract(aws: LocalAws, bucket: str, pg_dsn: str, table: TableRef, file_format: FileFormat) -> int:
    """``pgsnow extract`` in its own process; its peak RSS in MB."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PGSNOW_", "S3_", "AWS_"))},
        **aws.env(),
        "S3_STAGE_BUCKET": bucket,
        "S3_FILE_FORMAT": file_format.value,
        "PGSNOW_TABLES": table.qualified,
        "PGSNOW_PG_DSN": pg_dsn,
        "POWERTOOLS_METRICS_DISABLED": "true",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "pgsnow.cli", "extract", table.qualified],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    while process.poll() is None:
        peak = max(peak, _peak_rss_mb(process.pid) or 0)
        time.sleep(0.05)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    return peak


def source_digests(admin: psycopg2.extensions.connection, table: TableRef) -> tuple[str, str]:
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL(
                "SELECT (SELECT md5(body) FROM {0} WHERE id = 1), (SELECT md5(doc::text) FROM {0} WHERE id = 2)"
            ).format(sql.Identifier(table.schema, table.table))
        )
        row = cur.fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def latest_files(s3: Any, bucket: str, table: TableRef, suffix: str) -> list[bytes]:
    prefix = f"staging/{table.schema}/{table.table}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return [s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in sorted(keys) if k.endswith(suffix)]


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_100_mb_values_stage_intact_with_bounded_memory(
    admin: psycopg2.extensions.connection,
    aws: LocalAws,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    large_table: TableRef,
    file_format: FileFormat,
) -> None:
    # Given a 100 MB text value and a 100 MB jsonb document, each in its own row
    body_md5, doc_md5 = source_digests(admin, large_table)
    # When `pgsnow extract` stages the table
    peak_mb = run_extract(aws, bucket, pg_dsn, large_table, file_format)
    # Then its memory stayed within a small multiple of the largest value
    assert peak_mb < PEAK_RSS_LIMIT_MB[file_format], f"peak RSS {peak_mb} MB"
    # And both values are staged whole
    if file_format is FileFormat.CSV:
        (body,) = latest_files(s3, bucket, large_table, ".csv.gz")
        records = gzip.decompress(body).split(b"\n", 1)[1]
        first_end = records.index(b'"\n2,') + 2
        staged_body = csv_fields_at(records[:first_end], [1])[0]
        staged_doc = csv_fields_at(records[first_end:], [2])[0]
    else:
        (body,) = latest_files(s3, bucket, large_table, ".parquet")
        rows = pq.read_table(io.BytesIO(body)).to_pylist()
        staged_body, staged_doc = rows[0]["body"], rows[1]["doc"]
    assert hashlib.md5(staged_body.encode()).hexdigest() == body_md5
    assert hashlib.md5(staged_doc.encode()).hexdigest() == doc_md5


# --- values larger than their Snowflake column ----------------------------------------------------

OVERSIZE_CASES = [
    pytest.param("bytea", f"SELECT decode(repeat('ab', {MAX_BINARY_BYTES + 1}), 'hex')", id="bytea-over-8mb"),
    pytest.param("text", f"SELECT repeat('x', {MAX_VARCHAR_BYTES + 1})", id="text-over-128mb"),
    pytest.param(
        "jsonb", f"SELECT jsonb_build_array(repeat('x', {MAX_VARIANT_BYTES}))", id="jsonb-text-over-128mb"
    ),
]


@pytest.fixture(scope="module")
def oversize_tables(admin: psycopg2.extensions.connection, schema_name: str) -> dict[str, TableRef]:
    """Per type: row 1 small, row 7 larger than Snowflake's column for it."""
    tables = {}
    with admin.cursor() as cur:
        for case in OVERSIZE_CASES:
            pg_type, value_sql = case.values
            table = TableRef(schema_name, f"oversize_{pg_type}")
            ident = sql.Identifier(table.schema, table.table)
            cur.execute(
                sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, v {})").format(ident, sql.SQL(pg_type))
            )
            cur.execute(sql.SQL("INSERT INTO {} VALUES (1, NULL)").format(ident))
            cur.execute(sql.SQL("INSERT INTO {} SELECT 7, ({})").format(ident, sql.SQL(value_sql)))
            tables[pg_type] = table
    return tables


def settings_for(bucket: str, pg_dsn: str, table: TableRef, policy: str | None) -> Settings:
    env = {"S3_STAGE_BUCKET": bucket, "PGSNOW_TABLES": table.qualified, "PGSNOW_PG_DSN": pg_dsn}
    if policy is not None:
        env["PGSNOW_TABLE_OPTIONS"] = json.dumps({table.qualified: {"value_policy": policy}})
    return Settings.from_env(env, Component.EXTRACTOR)


@pytest.mark.parametrize("policy", [None, "clamp"], ids=["default-fail", "clamp"])
@pytest.mark.parametrize(("pg_type", "value_sql"), OVERSIZE_CASES)
def test_a_value_too_large_for_its_column_is_refused_with_its_key(
    oversize_tables: dict[str, TableRef],
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: Any,
    pg_type: str,
    value_sql: str,
    policy: str | None,
) -> None:
    # Given a row whose value no Snowflake column of its type can hold (clamp has no nearer value:
    # cutting a text short would change it silently)
    table = oversize_tables[pg_type]
    # When the table is extracted, then nothing is staged and the error names the column and the key
    with pytest.raises(PermanentError) as refused:
        extract_table(
            settings=settings_for(bucket, pg_dsn, table, policy),
            pg_conn=pg_conn,
            s3=s3,
            table=table,
            file_format=FileFormat.CSV,
        )
    assert "column 'v'" in refused.value.message and "(id)=(7)" in refused.value.message
    assert "value_policy to null" in refused.value.message


@pytest.mark.parametrize(("pg_type", "value_sql"), OVERSIZE_CASES[:1])
def test_a_value_too_large_stages_null_under_the_null_policy(
    oversize_tables: dict[str, TableRef],
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: Any,
    pg_type: str,
    value_sql: str,
) -> None:
    table = oversize_tables[pg_type]
    manifest = extract_table(
        settings=settings_for(bucket, pg_dsn, table, "null"),
        pg_conn=pg_conn,
        s3=s3,
        table=table,
        file_format=FileFormat.CSV,
    )
    (staged,) = manifest.files
    body = gzip.decompress(s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read())
    assert body == b"id,v\n1,\n7,\n"
