"""One large transaction through the change-capture run, reporting the drain's peak RSS.

    python bench/cdc_big_transaction.py --gigabytes 2

commits one transaction of about ``--gigabytes`` of row data (inserts of ~1 KB rows) into a table
in a publication and slot of its own, then runs ``pgsnow.cdc.drain.drain_slot`` once in this
process, staging to a moto server of its own, and prints one JSON line: changes drained, seconds,
MB/s and the process's peak RSS (``peak_rss_mb``: the drain's own, the insert runs in PostgreSQL).
The table, publication, slot and bucket it created are dropped afterwards.

The integration suite (tests/integration/cdc/test_drain_faults.py) runs it at 0.2 GB on a table,
slot and bucket of the test's own (``--table``, ``--slot``, ``--publication``, ``--bucket``,
``--s3-endpoint``; credentials from the environment).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import boto3
import psycopg2
from psycopg2 import sql

from pgsnow.cdc.drain import drain_slot
from pgsnow.config import Component, Settings
from pgsnow.identifiers import TableRef

ROW_TEXT_CHARS = 960  # 30 md5 hex digests: below the TOAST threshold, so the WAL holds every byte


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=0.3, help="row data in the one transaction")
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=test")
    parser.add_argument("--table", help="schema.table (id int primary key, name text) in --publication")
    parser.add_argument("--slot")
    parser.add_argument("--publication")
    parser.add_argument("--bucket")
    parser.add_argument("--s3-endpoint")
    parser.add_argument("--max-mb", type=int, default=4096, help="CDC_MAX_MB (above the transaction)")
    return parser.parse_args()


def _own_source(stack: ExitStack, dsn: str) -> tuple[TableRef, str, str]:
    """A table, publication and slot of this run's own, dropped when ``stack`` closes."""
    suffix = uuid.uuid4().hex[:8]
    table = TableRef("public", f"pgsnow_bench_cdc_{suffix}")
    publication, slot = f"pgsnow_bench_pub_{suffix}", f"pgsnow_bench_slot_{suffix}"
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    ident = sql.Identifier(table.schema, table.table)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text)").format(ident))
        cur.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(publication), ident))
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))

    def drop() -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            cur.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
            cur.execute(sql.SQL("DROP TABLE {}").format(ident))
        conn.close()

    stack.callback(drop)
    return table, publication, slot


def _own_bucket(stack: ExitStack) -> tuple[Any, str]:
    from pgsnow.local.aws import start_local_aws

    local = start_local_aws()
    stack.callback(local.stop)
    s3 = local.client("s3")
    bucket = f"pgsnow-bench-cdc-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (Linux; its own, where ``ru_maxrss`` carries a forking
    parent's peak across execve), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    args = _arguments()
    with ExitStack() as stack:
        if args.table:
            table, publication, slot = TableRef.parse(args.table), args.publication, args.slot
        else:
            table, publication, slot = _own_source(stack, args.dsn)
        if args.bucket:
            s3, bucket = boto3.client("s3", endpoint_url=args.s3_endpoint), args.bucket
        else:
            s3, bucket = _own_bucket(stack)
        rows = max(1, int(args.gigabytes * 1e9 / ROW_TEXT_CHARS))
        conn = psycopg2.connect(args.dsn)
        with conn, conn.cursor() as cur:  # one transaction, committed on leaving
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, %s) g"
                ).format(sql.Identifier(table.schema, table.table)),
                (rows,),
            )
        conn.close()
        settings = Settings.from_env(
            {
                "S3_STAGE_BUCKET": bucket,
                "PGSNOW_TABLES": table.qualified,
                "PGSNOW_TABLE_OPTIONS": json.dumps({table.qualified: {"mode": "cdc"}}),
                "PGSNOW_PG_DSN": args.dsn,
                "S3_FILE_FORMAT": "csv",
                "CDC_SLOT": slot,
                "CDC_PUBLICATION": publication,
                "CDC_MAX_MB": str(args.max_mb),
            },
            Component.EXTRACTOR,
        )
        rss_before = peak_rss_mb()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="pgsnow-bench-cdc-") as work:
            outcome = drain_slot(settings, dsn=args.dsn, s3=s3, work_dir=Path(work))
        seconds = time.monotonic() - started
    report = {
        "gigabytes": args.gigabytes,
        "rows_written": rows,
        "changes": outcome["changes"],
        "files": outcome["files"],
        "staged_bytes": outcome["bytes"],
        "confirmed": outcome["confirmed"],
        "seconds": round(seconds, 2),
        "changes_per_s": round(outcome["changes"] / seconds),
        "row_mb_per_s": round(rows * ROW_TEXT_CHARS / 1e6 / seconds, 1),
        "rss_before_drain_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
