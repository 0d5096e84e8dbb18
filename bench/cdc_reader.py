"""CPU per change of the drain's reader alone: pgoutput messages → spill files, in this process.

The CDC benchmark (bench/cdc.py) times the whole drain against ``pg_recvlogical``; its reading
phase overlaps the server's decoding, so its wall time hides how much of it is the reader's own
Python. This one takes the messages out of the equation: the demo workload's changes are peeked
from a slot once (``pg_logical_slot_peek_binary_changes``, pgoutput protocol 1, the drain's
options), then fed to ``ReplicationSession.read`` from memory, timed in process CPU seconds (a
busy machine changes them less than wall time), ``--repeat`` times, best kept. Both spill forms
are timed: pgoutput's text (``staged_text=False``) and the staged encoding the drain uses.

    .venv/bin/python bench/cdc_reader.py [--transactions 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2

from pgsnow.demo.dataset import SAMPLE_TABLES, create_sample_shop
from pgsnow.demo.workload import Workload

DATABASE = "pgsnow_bench_cdc_reader"
SCHEMA = "shop"
HEARTBEAT = "pgsnow.bench.end"


class _Message:
    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class _MessagesFromMemory:
    """What ``ReplicationSession.read`` uses of psycopg2's ReplicationCursor: ``read_message``."""

    def __init__(self, payloads: list[bytes]) -> None:
        self._messages = iter([_Message(p) for p in payloads])

    def read_message(self) -> _Message | None:
        return next(self._messages, None)


def peek_changes(dsn: str, transactions: int) -> tuple[list[bytes], int]:
    """The workload's pgoutput messages and the end message's LSN, from a slot made for the purpose."""
    from pgsnow.changes import parse_lsn

    create_sample_shop(dsn, SCHEMA, scale=0.2)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    slot, publication = f"pgsnow_bench_reader_{os.getpid()}", f"pgsnow_bench_reader_pub_{os.getpid()}"
    try:
        with conn.cursor() as cur:
            tables = ", ".join(f"{SCHEMA}.{t}" for t in SAMPLE_TABLES)
            cur.execute(f"CREATE PUBLICATION {publication} FOR TABLE {tables}")
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            Workload(dsn, SCHEMA, rate=1e9, max_transactions=transactions).run(3600)
            cur.execute("SELECT pg_logical_emit_message(true, %s, 'end')::text", (HEARTBEAT,))
            end = parse_lsn(cur.fetchone()[0])
            cur.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
                "'publication_names', %s, 'messages', 'true')",
                (slot, publication),
            )
            payloads = [bytes(row[0]) for row in cur.fetchall()]
    finally:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            cur.execute(f"DROP PUBLICATION IF EXISTS {publication}")
        conn.close()
    return payloads, end


def time_read(payloads: list[bytes], end: int, *, staged_text: bool, work_dir: Path) -> tuple[float, int]:
    from pgsnow.cdc.reader import ReplicationSession
    from pgsnow.identifiers import TableRef

    session = ReplicationSession(
        slot="bench",
        publication="bench",
        connection=None,
        cursor=_MessagesFromMemory(payloads),
        control=None,
        start_lsn=0,
    )
    spill = Path(tempfile.mkdtemp(dir=work_dir))
    started = time.process_time()
    stream = session.read(
        heartbeat_lsn=end,
        heartbeat_prefix=HEARTBEAT,
        tables=[TableRef(SCHEMA, t) for t in SAMPLE_TABLES],
        max_bytes=1 << 40,
        deadline=time.monotonic() + 3600,
        spill_dir=spill,
        staged_text=staged_text,
    )
    return time.process_time() - started, stream.changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--pg-dsn", default=os.environ.get("PGSNOW_PG_DSN", "host=127.0.0.1 user=postgres dbname=postgres")
    )
    args = parser.parse_args(argv)
    from pgsnow.local.postgres import create_database

    dsn = create_database(args.pg_dsn, DATABASE, drop_existing=True)
    payloads, end = peek_changes(dsn, args.transactions)
    result: dict[str, Any] = {"messages": len(payloads), "bytes": sum(len(p) for p in payloads)}
    with tempfile.TemporaryDirectory(prefix="pgsnow-bench-reader-") as work:
        for staged_text in (False, True):
            best, changes = min(
                time_read(payloads, end, staged_text=staged_text, work_dir=Path(work))
                for _ in range(args.repeat)
            )
            name = "staged_text" if staged_text else "pgoutput_text"
            result[name] = {
                "cpu_seconds": round(best, 3),
                "changes": changes,
                "us_per_change": round(best / changes * 1e6, 2),
            }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
