"""Peak memory of one extraction whose rows hold very large values: ``python bench/large_values.py``.

The table ``pgsnow_bench_large.values_<mb>`` has two rows: one with a ``<mb>`` MB text value,
one with a ``<mb>`` MB jsonb document (an array of strings), and small values elsewhere. Each
format is extracted once by ``pgsnow.extract.run.extract_table`` in a process of its own, staging
to a moto server (its own process, so the objects it keeps in memory are not counted). The
child reports its ``VmHWM`` (peak RSS) and its RSS just before extracting (interpreter and
imports); the difference is what the extraction itself needed. Results: docs/performance.md.

A measurement, not a test: nothing asserts a number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCHEMA = "pgsnow_bench_large"
BUCKET = "pgsnow-bench-large"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def create_table(dsn: str, megabytes: int) -> str:
    """The two-row table (kept when it already holds values of this size); its name."""
    import psycopg2
    from psycopg2 import sql

    name = f"values_{megabytes}"
    table = sql.Identifier(SCHEMA, name)
    md5_count = megabytes * 1024 * 1024 // 32  # 32 hex characters each
    json_count = megabytes * 1024 * 1024 // 36  # "<32 hex>", per element
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
            cur.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (id integer PRIMARY KEY, body text, doc jsonb)"
                ).format(table)
            )
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
            row = cur.fetchone()
            if row is not None and row[0] == 2:
                return name
            cur.execute(sql.SQL("TRUNCATE {}").format(table))
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT 1, string_agg(md5(i::text), ''), '{{\"small\": true}}'::jsonb"
                    " FROM generate_series(1, %s) AS i"
                ).format(table),
                (md5_count,),
            )
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT 2, 'small', jsonb_agg(md5(i::text)) FROM generate_series(1, %s) AS i"
                ).format(table),
                (json_count,),
            )
    finally:
        conn.close()
    return name


def extract_once(dsn: str, table_name: str, file_format: str) -> dict[str, object]:
    """In the child: extract the table once and report its memory."""
    import boto3

    from pgsnow.config import Component, Settings
    from pgsnow.extract.run import extract_table
    from pgsnow.identifiers import TableRef
    from pgsnow.keys import FileFormat
    from pgsnow.postgres import connect

    settings = Settings.from_env(
        {
            "S3_STAGE_BUCKET": BUCKET,
            "S3_FILE_FORMAT": file_format,
            "PGSNOW_TABLES": f"{SCHEMA}.{table_name}",
            "PGSNOW_PG_DSN": dsn,
        },
        component=Component.EXTRACTOR,
    )
    s3 = boto3.client("s3")
    before_kb = _status_kb("VmRSS")
    started = time.perf_counter()
    conn = connect(dsn)
    try:
        manifest = extract_table(
            settings=settings,
            pg_conn=conn,
            s3=s3,
            table=TableRef(SCHEMA, table_name),
            file_format=FileFormat(file_format),
        )
    finally:
        conn.close()
    return {
        "format": file_format,
        "rows": manifest.total_rows,
        "staged_bytes": sum(f.bytes for f in manifest.files),
        "seconds": round(time.perf_counter() - started, 1),
        "rss_before_mb": round(before_kb / 1024),
        "peak_rss_mb": round(_status_kb("VmHWM") / 1024),
        "extraction_mb": round((_status_kb("VmHWM") - before_kb) / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=test")
    parser.add_argument("--megabytes", type=int, default=100, help="size of each large value")
    parser.add_argument("--formats", default="csv,parquet")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # format, in the measured process
    parser.add_argument("--table", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(extract_once(args.dsn, args.table, args.child)))
        return 0

    from pgsnow.local.aws import start_local_aws

    table_name = create_table(args.dsn, args.megabytes)
    aws = start_local_aws()
    try:
        aws.client("s3").create_bucket(Bucket=BUCKET)
        environment = {**os.environ, **aws.env(), "POWERTOOLS_METRICS_DISABLED": "true"}
        for file_format in args.formats.split(","):
            completed = subprocess.run(
                [sys.executable, __file__, "--dsn", args.dsn, "--table", table_name, "--child", file_format],
                env=environment,
                capture_output=True,
                text=True,
                check=False,
            )
            if completed.returncode != 0:
                print(f"{file_format}: failed\n{completed.stderr[-3000:]}", file=sys.stderr)
                continue
            print(completed.stdout.strip().splitlines()[-1])
    finally:
        aws.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
