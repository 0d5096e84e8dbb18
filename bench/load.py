"""Load-side benchmark: what batching the loader's event source saves, next to one COPY per file.

The local stack (``pgsnow.local.stack``) runs the real loader handler behind the local SQS poller
(``pgsnow.local.dispatcher``), which gathers batches as Lambda's does. For each scenario, runs of
a few tables are staged as the extractor stages them (manifest ``extracting``, data files with
their metadata through the extractor's own role, then manifest ``staged``), every upload
notified to the queue by the bucket, while the poller runs in the background with:

* baseline: BatchSize 1, no window - the design card's one COPY (and one transaction) per file;
* batched: the template's defaults (LoaderBatchSize, LoaderBatchingWindowSeconds).

Counted from what the local Snowflake received (``LocalSnowflake.history``): statements,
transactions (COMMIT), COPY and MERGE statements, per invocation. Latency: from a file's upload
to the moment its rows are visible in the target table (polled every ``--poll`` seconds, so
each value is late by up to one poll). Nothing here asserts a time; the targets (files per COPY
for a backfill, MERGE per table per batch) are printed as met or not met.

    .venv/bin/python bench/load.py [--files 2000] [--tables 4] [--baseline-files 200]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgsnow.cli import quiet_function_logs
from pgsnow.config import Component
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat, data_key, new_run_id
from pgsnow.local.stack import (
    LOADER_BATCH_SIZE,
    LOADER_BATCHING_WINDOW_S,
    LOADER_TIMEOUT_S,
    SNOWFLAKE_DATABASE,
    LocalStack,
    load_function_handler,
    start_stack,
)
from pgsnow.manifest import Column, RunManifest, RunState, StagedFile
from pgsnow.runs import RunStore
from pgsnow.staging import put_data_file
from pgsnow.timestamps import utc_iso
from pgsnow.typemap import map_pg_type

RESULTS = Path(__file__).resolve().parent / "results"
WATCH_MARK = "/* pgsnow-bench-watch */"  # the watcher's own queries, left out of every count
COLUMNS = (("id", "bigint", False), ("file_no", "integer", False), ("payload", "text", True))
COPY_FILES = re.compile(r"FILES\s*=\s*\(([^)]*)\)", re.IGNORECASE)
MERGE_TARGET = re.compile(r'^\s*MERGE\s+INTO\s+((?:"(?:[^"]|"")*"\.?)+)', re.IGNORECASE)


@dataclass(frozen=True)
class Scenario:
    name: str
    batch_size: int
    batching_window_s: int
    files: int


@dataclass
class Invocation:
    records: int
    first: int  # history marks around the invocation
    last: int


@dataclass
class ScenarioResult:
    name: str
    batch_size: int
    batching_window_s: int
    files: int
    tables: int
    rows: int
    invocations: int
    statements: int
    transactions: int
    copies: int
    merges: int
    files_per_copy_mean: float
    files_per_copy_max: int
    merges_per_table_per_batch_max: int  # MERGE into a target table
    ledger_merges_per_batch_max: int  # MERGE into the control schema (the load ledger)
    statement_kinds: dict[str, int]
    latency_s: dict[str, float]
    files_visible: int
    seconds: float
    per_1000_files: dict[str, float] = field(default_factory=dict)


def staged_body(file_no: int, rows: int) -> bytes:
    """One small CSV file as the extractor writes it (header, RFC 4180, gzip)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([name for name, _, _ in COLUMNS])
    for row in range(rows):
        writer.writerow([file_no * rows + row, file_no, f"file {file_no} row {row}, with a comma"])
    return gzip.compress(text.getvalue().encode(), compresslevel=1, mtime=0)


def manifest_columns() -> tuple[Column, ...]:
    return tuple(Column.from_types(n, t, t, map_pg_type(t), nullable) for n, t, nullable in COLUMNS)


def statement_kind(sql_text: str) -> str:
    words = sql_text.split(None, 4)
    upper = [w.upper() for w in words]
    if upper[:3] == ["CREATE", "OR", "REPLACE"]:
        return " ".join(upper[:4])
    if upper and upper[0] in {"COPY", "MERGE", "CREATE", "DROP", "ALTER", "INSERT"}:
        return " ".join(upper[:2])
    return upper[0] if upper else ""


class Watcher:
    """Polls the target tables and notes when each file's rows are all visible."""

    def __init__(
        self, stack: LocalStack, expected: dict[TableRef, int], rows_per_file: int, poll_s: float
    ) -> None:
        self.conn = stack.snowflake_connection()
        self.expected = expected  # files per table
        self.rows_per_file = rows_per_file
        self.poll_s = poll_s
        self.visible_at: dict[tuple[TableRef, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for table, files in self.expected.items():
                if sum(1 for seen, _ in self.visible_at if seen == table) >= files:
                    continue  # all visible: stop asking (every query takes the emulator's time)
                name = quote_qualified(SNOWFLAKE_DATABASE, table.schema.upper(), table.table.upper())
                try:
                    with self.conn.cursor() as cursor:
                        cursor.execute(f'SELECT "FILE_NO", COUNT(*) FROM {name} GROUP BY 1 {WATCH_MARK}')
                        rows = cursor.fetchall()
                except Exception:  # the table does not exist before its first group loads
                    continue
                now = time.monotonic()
                for file_no, count in rows:
                    if int(count) >= self.rows_per_file:
                        self.visible_at.setdefault((table, int(file_no)), now)
            self._stop.wait(self.poll_s)


def run_scenario(
    stack: LocalStack,
    scenario: Scenario,
    *,
    table_count: int,
    rows_per_file: int,
    write_mode: str,
    poll_s: float,
    timeout_s: float,
) -> ScenarioResult:
    history = stack.snowflake.history
    tables = [TableRef(f"bench_{scenario.name}", f"t{i}") for i in range(table_count)]
    s3 = stack.function_client(Component.EXTRACTOR, "s3")
    store = RunStore(s3, stack.resources.bucket)
    prefix = stack.resources.prefix
    runs = {}
    for table in tables:
        runs[table] = RunManifest(
            run_id=new_run_id(),
            table=table,
            mode="full",
            file_format=FileFormat.CSV,
            columns=manifest_columns(),
            primary_key=("id",),
            state=RunState.EXTRACTING,
            started_at=utc_iso(datetime.now(UTC)),
            write_mode=write_mode,
        )
        store.put_manifest(runs[table])

    invocations: list[Invocation] = []
    loader = load_function_handler("loader")

    def counted(event: dict[str, Any], context: Any) -> Any:
        first = history.mark()
        try:
            return loader(event, context)
        finally:
            invocations.append(Invocation(len(event["Records"]), first, history.mark()))

    dispatcher = stack.loader_dispatcher(
        batch_size=scenario.batch_size, batching_window_s=scenario.batching_window_s, handler=counted
    )
    expected = Counter(tables[file_no % table_count] for file_no in range(scenario.files))
    watcher = Watcher(stack, dict(expected), rows_per_file, poll_s)
    mark = history.mark()
    started = time.monotonic()
    uploaded_at: dict[tuple[TableRef, int], float] = {}
    staged: dict[TableRef, list[StagedFile]] = {table: [] for table in tables}
    watcher.start()
    dispatcher.start()
    try:
        # Given a backfill: every table's files uploaded as fast as they are made
        for file_no in range(scenario.files):
            table = tables[file_no % table_count]
            run = runs[table]
            body = staged_body(file_no, rows_per_file)
            sha256 = hashlib.sha256(body).hexdigest()
            key = data_key(prefix, table, file_no, run.run_id, FileFormat.CSV)
            put_data_file(
                s3,
                stack.resources.bucket,
                key,
                body,
                run_id=run.run_id,
                batch=file_no,
                rows=rows_per_file,
                sha256=sha256,
            )
            uploaded_at[(table, file_no)] = time.monotonic()
            staged[table].append(StagedFile(key, file_no, rows_per_file, len(body), sha256, FileFormat.CSV))
        for table in tables:
            store.put_manifest(
                runs[table].with_state(
                    RunState.STAGED, files=tuple(staged[table]), finished_at=utc_iso(datetime.now(UTC))
                )
            )
        # When the loader runs until every file's rows are visible
        deadline = started + timeout_s
        while len(watcher.visible_at) < scenario.files and time.monotonic() < deadline:
            time.sleep(poll_s)
    finally:
        dispatcher.stop()
        watcher.stop()
    seconds = time.monotonic() - started

    statements = [s for s in history.since(mark) if WATCH_MARK not in s.sql_text]
    kinds = Counter(statement_kind(s.sql_text) for s in statements)
    copy_sizes = [
        match.group(1).count(",") + 1
        for s in statements
        if statement_kind(s.sql_text) == "COPY INTO" and (match := COPY_FILES.search(s.sql_text))
    ]
    # Per invocation, MERGE statements by target: the benchmark's tables (the data) apart from
    # the control schema's (the ledger).
    target_names = {quote_qualified(SNOWFLAKE_DATABASE, t.schema.upper(), t.table.upper()) for t in tables}
    data_merges_per_table_per_batch = ledger_merges_per_batch = 0
    every = history.since(0)
    for invocation in invocations:
        targets = Counter(
            match.group(1)
            for s in every[invocation.first : invocation.last]
            if WATCH_MARK not in s.sql_text and (match := MERGE_TARGET.match(s.sql_text))
        )
        data = [count for target, count in targets.items() if target in target_names]
        ledger = sum(count for target, count in targets.items() if target not in target_names)
        data_merges_per_table_per_batch = max([data_merges_per_table_per_batch, *data])
        ledger_merges_per_batch = max(ledger_merges_per_batch, ledger)
    latencies = sorted(
        watcher.visible_at[item] - uploaded_at[item] for item in uploaded_at if item in watcher.visible_at
    )
    copies = kinds["COPY INTO"]
    result = ScenarioResult(
        name=scenario.name,
        batch_size=scenario.batch_size,
        batching_window_s=scenario.batching_window_s,
        files=scenario.files,
        tables=table_count,
        rows=scenario.files * rows_per_file,
        invocations=len(invocations),
        statements=len(statements),
        transactions=kinds["COMMIT"],
        copies=copies,
        merges=kinds["MERGE INTO"],
        files_per_copy_mean=round(sum(copy_sizes) / len(copy_sizes), 1) if copy_sizes else 0.0,
        files_per_copy_max=max(copy_sizes, default=0),
        merges_per_table_per_batch_max=data_merges_per_table_per_batch,
        ledger_merges_per_batch_max=ledger_merges_per_batch,
        statement_kinds=dict(kinds.most_common()),
        latency_s=latency_summary(latencies),
        files_visible=len(latencies),
        seconds=round(seconds, 1),
    )
    # Per 1,000 files loaded (a run cut short by --timeout loaded fewer than it staged).
    per = 1000 / max(1, len(latencies))
    result.per_1000_files = {
        "statements": round(result.statements * per, 1),
        "transactions": round(result.transactions * per, 1),
        "copies": round(result.copies * per, 1),
        "merges": round(result.merges * per, 1),
        "invocations": round(result.invocations * per, 1),
    }
    return result


def latency_summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    p95 = (
        statistics.quantiles(latencies, n=20, method="inclusive")[-1] if len(latencies) > 1 else latencies[0]
    )
    return {
        "median": round(statistics.median(latencies), 2),
        "p95": round(p95, 2),
        "max": round(latencies[-1], 2),
    }


def ratio(baseline: float, batched: float) -> str:
    if not batched:
        return "-"
    return f"{baseline / batched:.1f}x"


def report(baseline: ScenarioResult, batched: ScenarioResult) -> list[str]:
    def row(label: str, a: Any, b: Any, r: str = "") -> str:
        return f"| {label} | {a} | {b} | {r} |"

    bp, tp = baseline.per_1000_files, batched.per_1000_files
    lines = [
        f"| | baseline: one COPY per file (BatchSize {baseline.batch_size}) "
        f"| batched (BatchSize {batched.batch_size}, window {batched.batching_window_s} s) | baseline / batched |",
        "|---|---|---|---|",
        row("files (tables)", f"{baseline.files} ({baseline.tables})", f"{batched.files} ({batched.tables})"),
        row("files visible", baseline.files_visible, batched.files_visible),
        row(
            "invocations per 1,000 files",
            bp["invocations"],
            tp["invocations"],
            ratio(bp["invocations"], tp["invocations"]),
        ),
        row(
            "statements per 1,000 files",
            bp["statements"],
            tp["statements"],
            ratio(bp["statements"], tp["statements"]),
        ),
        row(
            "transactions (COMMIT) per 1,000 files",
            bp["transactions"],
            tp["transactions"],
            ratio(bp["transactions"], tp["transactions"]),
        ),
        row("COPY per 1,000 files", bp["copies"], tp["copies"], ratio(bp["copies"], tp["copies"])),
        row("MERGE per 1,000 files", bp["merges"], tp["merges"], ratio(bp["merges"], tp["merges"])),
        row(
            "files per COPY (mean / max)",
            f"{baseline.files_per_copy_mean} / {baseline.files_per_copy_max}",
            f"{batched.files_per_copy_mean} / {batched.files_per_copy_max}",
        ),
        row(
            "MERGE into a target table, per table per batch (max)",
            baseline.merges_per_table_per_batch_max,
            batched.merges_per_table_per_batch_max,
        ),
        row(
            "MERGE into the load ledger, per batch (max)",
            baseline.ledger_merges_per_batch_max,
            batched.ledger_merges_per_batch_max,
        ),
        row(
            "upload to rows visible, median / p95 (s)",
            f"{baseline.latency_s.get('median')} / {baseline.latency_s.get('p95')}",
            f"{batched.latency_s.get('median')} / {batched.latency_s.get('p95')}",
        ),
        row("wall time (s)", baseline.seconds, batched.seconds),
    ]
    return lines


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=RESULTS
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="files staged with the default batching")
    parser.add_argument(
        "--baseline-files",
        type=int,
        default=200,
        help="files staged one COPY per file (fewer: the baseline loads about one file a second locally)",
    )
    parser.add_argument("--tables", type=int, default=4, help="tables the files are spread over")
    parser.add_argument("--rows-per-file", type=int, default=10)
    parser.add_argument("--write-mode", choices=["merge", "replace", "append"], default="merge")
    parser.add_argument("--batch-size", type=int, default=LOADER_BATCH_SIZE)
    parser.add_argument("--batching-window", type=int, default=LOADER_BATCHING_WINDOW_S)
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between visibility polls")
    parser.add_argument("--timeout", type=float, default=3600, help="per scenario, in seconds")
    parser.add_argument("--pg-dsn", help="PostgreSQL for the stack (default: the local one)")
    parser.add_argument("--output", type=Path, default=RESULTS / "load-latest.json")
    parser.add_argument("--verbose", action="store_true", help="the loader's info logs, on stderr")
    args = parser.parse_args(argv)
    quiet_function_logs(verbose=args.verbose)
    if args.write_mode == "append":
        parser.error("append needs allow_duplicates; the benchmark loads runs with merge or replace")

    scenarios = [
        Scenario("baseline", 1, 0, args.baseline_files),
        Scenario("batched", args.batch_size, args.batching_window, args.files),
    ]
    results: list[ScenarioResult] = []
    with tempfile.TemporaryDirectory(prefix="pgsnow-bench-load-") as data_dir:
        stack = start_stack(
            pg_dsn=args.pg_dsn,
            data_dir=Path(data_dir),
            # As the template's queue: six loader timeouts plus the batching window.
            visibility_timeout=6 * LOADER_TIMEOUT_S + args.batching_window,
            progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True),
        )
        try:
            with stack.handlers():
                for scenario in scenarios:
                    print(
                        f"{scenario.name}: {scenario.files} files, BatchSize {scenario.batch_size}",
                        file=sys.stderr,
                    )
                    results.append(
                        run_scenario(
                            stack,
                            scenario,
                            table_count=args.tables,
                            rows_per_file=args.rows_per_file,
                            write_mode=args.write_mode,
                            poll_s=args.poll,
                            timeout_s=args.timeout,
                        )
                    )
        finally:
            stack.stop()

    baseline, batched = results
    lines = report(baseline, batched)
    met_copy = batched.files_per_copy_mean >= 100
    met_merge = batched.merges_per_table_per_batch_max <= 1
    lines += [
        "",
        f"target files per COPY >= 100 for a backfill: {'met' if met_copy else 'NOT met'} ({batched.files_per_copy_mean})",
        f"target MERGE into a table per table per batch <= 1: {'met' if met_merge else 'NOT met'} ({batched.merges_per_table_per_batch_max})",
    ]
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": git_commit(),
                "arguments": {k: str(v) for k, v in vars(args).items()},
                "scenarios": [asdict(r) for r in results],
                "table": lines,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"\nwritten: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
