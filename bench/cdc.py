"""Change-capture benchmark: pgsnow's drain next to pg_recvlogical and dlt's pg_replication, one run.

Throughput. The sample shop is created in its own database, a publication covers its tables and
three pgoutput slots are created one after the other with nothing written in between, so they
hold the same changes. The demo workload (``pgsnow.demo.workload``: inserts, > 8 KB TOASTed
writes, updates leaving them unchanged, deletes, key moves, transactions of 1 to 200 changes)
then commits ``--transactions`` transactions. Each contender reads the same changes from its
own slot:

* ``pg_recvlogical`` (PostgreSQL's client) streams its slot to ``/dev/null`` up to the end
  position: the limit of the server's decoding on this machine;
* pgsnow: the change-capture function's handler (``extractor/app.py: change_capture_handler``)
  in a child process with the ``ChangeCaptureFunction`` role's credentials, run until its slot
  has confirmed the end position: reads the stream, spills (in the staged encoding where the types
  allow, else converting through PostgreSQL), writes
  CSV.gz/Parquet, uploads to the moto server's bucket, writes manifests and state, confirms.
  Its peak RSS is the child's (``ru_maxrss``);
* dlt's ``pg_replication`` verified source (not in the ``dlt`` package: its files are taken from a
  mirror of dlt-hub/verified-sources into a temporary directory at run time, never committed) in a
  separate virtualenv, loading into DuckDB.

The rate is the workload's committed row changes over each contender's wall time (same
numerator for all). Commit-to-visible delay: the tables in mode cdc, enrolled and snapshotted,
the change-capture function every 60 s and the loader behind the template's event-source
batching, while the workload inserts orders stamped ``clock_timestamp()``; the local Snowflake is
polled every ``--poll`` seconds for the new orders. Results go to ``bench/results/cdc-latest.json``.

    .venv/bin/python bench/cdc.py [--transactions 2000] [--latency-minutes 4] [--dlt-python PATH]

``PGSNOW_BENCH_PROFILE=FILE`` runs pgsnow's drain child under cProfile and writes its stats to FILE
(the rates are then not comparable: the profiler slows the Python side).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

from pgsnow.demo.workload import KINDS

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
# A git directory (bare mirror or a checkout's .git) of github.com/dlt-hub/verified-sources.
DLT_SOURCES_MIRROR = Path(
    os.environ.get("DLT_VERIFIED_SOURCES", "/work/.mirror/dlt-hub+verified-sources/repo")
)
if (DLT_SOURCES_MIRROR / ".git").is_dir():  # a checkout: its git directory
    DLT_SOURCES_MIRROR = DLT_SOURCES_MIRROR / ".git"
DLT_SOURCE_PATH = "sources/pg_replication"
BENCH_DATABASE = "pgsnow_bench_cdc"
SCHEMA = "shop"
# The workload's kinds of change without those pgoutput sends unchanged TOASTed values in.
NO_UNCHANGED_TOAST = tuple(k for k in KINDS if k not in ("keep_toast", "move_customer_key"))
TARGETS = {"vs_pg_recvlogical": 0.5, "vs_dlt": 5.0, "drain_peak_rss_mb": 256}


@dataclass
class Contender:
    name: str
    seconds: float | None = None
    changes_per_s: float | None = None
    peak_rss_mb: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux keeps that across
    ``execve``, so a child started from a large parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def lsn_int(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def fetch_one(dsn: str, query: str | sql.Composable, params: tuple[Any, ...] = ()) -> Any:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    conn.close()
    return row[0] if row else None


def autocommit(dsn: str, query: str | sql.Composable, params: tuple[Any, ...] = ()) -> None:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(query, params)
    finally:
        conn.close()


# ----------------------------------------------------------------------------- contenders


def run_pg_recvlogical(dsn: str, slot: str, publication: str, end_lsn: str, changes: int) -> Contender:
    binary = shutil.which("pg_recvlogical")
    if binary is None:
        return Contender(
            "pg_recvlogical", error="pg_recvlogical is not installed (Debian: postgresql-client)"
        )
    command = [
        binary,
        "-d",
        dsn,
        "--slot",
        slot,
        "--start",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={publication}",
        "--endpos",
        end_lsn,
        "--no-loop",
        "-f",
        "/dev/null",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return Contender("pg_recvlogical", error=f"exit {done.returncode}: {done.stderr.strip()[:300]}")
    return Contender(
        "pg_recvlogical",
        seconds=seconds,
        changes_per_s=changes / seconds,
        detail={"command": " ".join(command[:1] + command[3:])},
    )


def run_pgsnow(stack: Any, slot: str, publication: str, end_lsn: str, changes: int) -> Contender:
    """The change-capture handler in a child process, as its own Lambda would run it."""
    from pgsnow.local.change_capture import CHANGE_CAPTURE_RESOURCE
    from pgsnow.local.iam import FUNCTION_RESOURCES

    component = next((c for c, rid in FUNCTION_RESOURCES.items() if rid == CHANGE_CAPTURE_RESOURCE), None)
    if component is None or component not in stack.sessions:
        return Contender("pgsnow", error="the local stack has no ChangeCaptureFunction role (template)")
    frozen = stack.function_session(component).get_credentials().get_frozen_credentials()
    env = {
        **os.environ,
        **stack.env,
        "CDC_SLOT": slot,
        "CDC_PUBLICATION": publication,
        "AWS_ACCESS_KEY_ID": frozen.access_key,
        "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
        "AWS_SESSION_TOKEN": frozen.token or "",
        "POWERTOOLS_LOG_LEVEL": os.environ.get("PGSNOW_BENCH_LOG_LEVEL", "WARNING"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    profile = (
        ["-m", "cProfile", "-o", os.environ["PGSNOW_BENCH_PROFILE"]]
        if os.environ.get("PGSNOW_BENCH_PROFILE")
        else []
    )
    command = [sys.executable, *profile, str(Path(__file__).resolve()), "--drain-child", "--end-lsn", end_lsn]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return Contender("pgsnow", error=f"exit {done.returncode}: {done.stderr.strip()[-600:]}")
    if os.environ.get("PGSNOW_BENCH_LOG"):
        Path(os.environ["PGSNOW_BENCH_LOG"]).write_text(done.stdout)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    drain_seconds = report["seconds"]
    return Contender(
        "pgsnow",
        seconds=drain_seconds,
        changes_per_s=changes / drain_seconds,
        peak_rss_mb=report["max_rss_kb"] / 1024,
        detail={
            "process_seconds_with_imports": round(seconds, 2),
            "rss_before_drain_mb": round(report["rss_before_kb"] / 1024, 1),
            "runs": report["runs"],
            "staged_changes": sum(int(o.get("changes") or 0) for o in report["outcomes"]),
            "files": sum(int(o.get("files") or 0) for o in report["outcomes"]),
            "bytes": sum(int(o.get("bytes") or 0) for o in report["outcomes"]),
            "stop_reasons": [o.get("stop_reason") for o in report["outcomes"]],
            "phase_seconds": [o.get("phase_seconds") for o in report["outcomes"]],
        },
    )


def drain_child(end_lsn: str) -> int:
    """Child process: invoke the change-capture handler until the slot has confirmed ``end_lsn``."""
    from pgsnow.local.change_capture import (
        CHANGE_CAPTURE_HANDLER,
        CHANGE_CAPTURE_MEMORY_MB,
        CHANGE_CAPTURE_TIMEOUT_S,
        FUNCTION_NAME,
        schedule_event,
    )
    from pgsnow.local.dispatcher import LambdaContext
    from pgsnow.local.stack import load_function_handler

    handler = load_function_handler("extractor", CHANGE_CAPTURE_HANDLER)
    dsn, slot, target = os.environ["PGSNOW_PG_DSN"], os.environ["CDC_SLOT"], lsn_int(end_lsn)
    rss_before = peak_rss_kb()
    outcomes: list[dict[str, Any]] = []
    started = time.perf_counter()
    for _ in range(100):
        context = LambdaContext.for_invocation(
            FUNCTION_NAME, memory_mb=CHANGE_CAPTURE_MEMORY_MB, timeout_s=CHANGE_CAPTURE_TIMEOUT_S
        )
        outcomes.append(
            dict(handler(schedule_event("arn:aws:events:us-east-1:123456789012:rule/bench"), context))
        )
        confirmed = fetch_one(
            dsn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
        if confirmed is not None and lsn_int(confirmed) >= target:
            break
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "runs": len(outcomes),
                "outcomes": outcomes,
                "rss_before_kb": rss_before,
                "max_rss_kb": peak_rss_kb(),
            },
            default=str,
        )
    )
    return 0


def dsn_url(dsn: str) -> str:
    """A libpq DSN as the URL dlt's credentials parse (``postgresql://user:password@host:port/db``)."""
    from urllib.parse import quote

    parts = psycopg2.extensions.parse_dsn(dsn)
    user = quote(parts.get("user", "postgres"), safe="")
    password = f":{quote(parts['password'], safe='')}" if parts.get("password") else ""
    return (
        f"postgresql://{user}{password}@{parts.get('host', '127.0.0.1')}:{parts.get('port', '5432')}"
        f"/{quote(parts.get('dbname', 'postgres'), safe='')}"
    )


def run_dlt(
    dsn: str, slot: str, publication: str, changes: int, dlt_python: Path, workdir: Path
) -> Contender:
    """dlt's pg_replication source (from the verified-sources mirror) loading into DuckDB."""
    if not dlt_python.is_file():
        return Contender(
            "dlt pg_replication", error=f"no dlt virtualenv at {dlt_python} (make bench-cdc creates one)"
        )
    if not (DLT_SOURCES_MIRROR / "HEAD").exists():
        return Contender(
            "dlt pg_replication", error=f"no mirror of dlt-hub/verified-sources at {DLT_SOURCES_MIRROR}"
        )
    package = workdir / "pg_replication"
    package.mkdir(parents=True)
    listing = subprocess.run(
        [
            "git",
            "--git-dir",
            str(DLT_SOURCES_MIRROR),
            "ls-tree",
            "--name-only",
            "HEAD",
            f"{DLT_SOURCE_PATH}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for path in listing.stdout.split():
        if path.endswith(".py"):
            body = subprocess.run(
                ["git", "--git-dir", str(DLT_SOURCES_MIRROR), "show", f"HEAD:{path}"],
                capture_output=True,
                check=True,
            ).stdout
            (package / Path(path).name).write_bytes(body)
    commit = subprocess.run(
        ["git", "--git-dir", str(DLT_SOURCES_MIRROR), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    child = Path(__file__).resolve().parent / "cdc_dlt_child.py"
    env = {
        **os.environ,
        "PYTHONPATH": str(workdir),
        "DLT_DATA_DIR": str(workdir / "dlt-data"),
        "DLT_PROJECT_DIR": str(workdir),
        "RUNTIME__LOG_LEVEL": "WARNING",
    }
    command = [
        str(dlt_python),
        str(child),
        "--dsn",
        dsn_url(dsn),
        "--slot",
        slot,
        "--publication",
        publication,
        "--destination",
        "filesystem",
        "--target",
        str(workdir / "files"),
        "--pipelines-dir",
        str(workdir / "pipelines"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=workdir)
    if done.returncode != 0:
        log = Path(tempfile.gettempdir()) / f"{workdir.name}-dlt.log"
        log.write_text(done.stderr)
        causes = [
            line.strip() for line in done.stderr.splitlines() if "exception:" in line or "Error:" in line
        ]
        return Contender(
            "dlt pg_replication",
            error=f"exit {done.returncode}: {' | '.join(causes[-3:]) or done.stderr.strip()[-400:]} (log: {log})",
        )
    if os.environ.get("PGSNOW_BENCH_LOG"):
        Path(os.environ["PGSNOW_BENCH_LOG"]).write_text(done.stdout)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return Contender(
        "dlt pg_replication",
        seconds=report["seconds"],
        changes_per_s=changes / report["seconds"],
        peak_rss_mb=report["max_rss_kb"] / 1024,
        detail={
            "verified_sources_commit": commit,
            "dlt": report.get("dlt_version"),
            "rows_loaded": sum(report.get("rows", {}).values()),
            "rows_by_table": report.get("rows"),
            "destination": "filesystem (JSONL)",
        },
    )


# ----------------------------------------------------------------------------- latency


def measure_latency(
    stack: Any,
    dsn: str,
    tables: list[Any],
    *,
    minutes: float,
    rate: float,
    poll_s: float,
    interval_s: float,
    progress: Any,
    scale: float,
) -> dict[str, Any]:
    """Commit-to-visible delay with the change-capture function every ``interval_s`` seconds."""
    from pgsnow.demo.dataset import create_sample_shop
    from pgsnow.demo.pipeline import (
        change_capture_names,
        create_change_capture_source,
        drop_change_capture_source,
        snapshot_table,
    )
    from pgsnow.demo.workload import NEW_KEY_BASE, Workload
    from pgsnow.identifiers import quote_qualified
    from pgsnow.local.stack import SNOWFLAKE_DATABASE

    publication, slot = change_capture_names(
        Path(tempfile.gettempdir()) / f"pgsnow-bench-cdc-latency-{os.getpid()}"
    )
    stack.env.update(
        {
            "PGSNOW_TABLE_OPTIONS": json.dumps({t.qualified: {"mode": "cdc"} for t in tables}),
            "CDC_PUBLICATION": publication,
            "CDC_SLOT": slot,
        }
    )
    progress("latency: creating the sample shop again (the throughput phases used up its rows)")
    create_sample_shop(dsn, SCHEMA, scale=scale)
    create_change_capture_source(dsn, publication, slot, tables)
    seen: dict[int, float] = {}
    stamped: dict[int, datetime] = {}
    try:
        with stack.handlers():
            dispatcher = stack.loader_dispatcher()
            for table in tables:
                progress(f"latency: enrolling {table.qualified} and loading its snapshot")
                snapshot_table(stack, table, dispatcher)
            # The deployed shape: the loader's event source batches (the template's window), the
            # change-capture schedule fires every interval.
            dispatcher.start()
            change_capture = stack.change_capture(interval_s=interval_s)
            workload = Workload(dsn, SCHEMA, rate=rate, seed=60)
            sf_conn = stack.snowflake_connection()
            orders = quote_qualified(SNOWFLAKE_DATABASE, SCHEMA, "orders")
            workload.start()
            change_capture.start()
            started = time.monotonic()
            try:
                while time.monotonic() - started < minutes * 60:
                    time.sleep(poll_s)
                    cur = sf_conn.cursor()
                    cur.execute(
                        f"SELECT order_id FROM {orders} WHERE order_id >= {NEW_KEY_BASE} AND status = 'new'"
                    )
                    now = time.time()
                    for (order_id,) in cur.fetchall():
                        seen.setdefault(int(order_id), now)
                    cur.close()
            finally:
                try:
                    workload.stop()
                finally:
                    try:
                        change_capture.stop()
                    finally:
                        dispatcher.stop()
                        sf_conn.close()
            runs = len(change_capture.outcomes)
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT order_id, ordered_at FROM {} WHERE order_id = ANY(%s)").format(
                    sql.Identifier(SCHEMA, "orders")
                ),
                (list(seen),),
            )
            stamped = {int(k): v for k, v in cur.fetchall()}
        conn.close()
    finally:
        drop_change_capture_source(dsn, publication, slot)
    delays = sorted(seen[k] - stamped[k].timestamp() for k in seen if k in stamped)
    if not delays:
        return {"error": "no stamped order became visible in Snowflake", "change_capture_runs": runs}
    p95 = delays[min(len(delays) - 1, round(0.95 * (len(delays) - 1)))]
    return {
        "interval_s": interval_s,
        "minutes": minutes,
        "rows_timed": len(delays),
        "change_capture_runs": runs,
        "median_s": round(statistics.median(delays), 1),
        "p95_s": round(p95, 1),
        "min_s": round(delays[0], 1),
        "max_s": round(delays[-1], 1),
        "poll_s": poll_s,
    }


# ----------------------------------------------------------------------------- throughput


def throughput_phase(
    stack: Any,
    dsn: str,
    publication: str,
    *,
    phase: str,
    kinds: tuple[str, ...],
    names: tuple[str, ...],
    args: argparse.Namespace,
    workdir: Path,
    progress: Any,
) -> dict[str, Any]:
    """One workload in a slot per contender (created together, so they hold the same changes)."""
    from pgsnow.demo.dataset import SAMPLE_TABLES, create_sample_shop
    from pgsnow.demo.pipeline import drop_change_capture_source
    from pgsnow.demo.workload import Workload
    from pgsnow.identifiers import TableRef

    tag = f"{len(phase)}_{os.getpid()}_{int(time.time())}"
    slots = {name: f"pgsnow_bench_{name}_{tag}" for name in names}
    contenders: list[Contender] = []
    tables = [TableRef(SCHEMA, name) for name in SAMPLE_TABLES]
    # Each phase starts from the same shop (recreated, so the publication is too).
    progress(f"{phase}: creating the sample shop (scale {args.scale})")
    create_sample_shop(dsn, SCHEMA, scale=args.scale)
    autocommit(
        dsn,
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)").format(
            sql.Identifier(publication),
            sql.SQL(", ").join(sql.Identifier(t.schema, t.table) for t in tables),
        ),
    )
    try:
        for slot in slots.values():  # nothing is written between them: the same changes in each
            autocommit(dsn, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        progress(f"{phase}: workload of {args.transactions} transactions")
        counts = Workload(dsn, SCHEMA, rate=1e9, max_transactions=args.transactions, kinds=kinds).run(3600)
        end_lsn = str(fetch_one(dsn, "SELECT pg_current_wal_lsn()::text"))
        first = next(iter(slots.values()))
        wal_bytes = int(
            fetch_one(
                dsn,
                "SELECT pg_wal_lsn_diff(%s::pg_lsn, restart_lsn) FROM pg_replication_slots WHERE slot_name = %s",
                (end_lsn, first),
            )
        )
        progress(f"{phase}: {counts.changes} changes, {wal_bytes / 2**20:.0f} MB of WAL")
        for name, slot in slots.items():
            progress(f"{phase}: {name}")
            if name == "recv":
                contender = run_pg_recvlogical(dsn, slot, publication, end_lsn, counts.changes)
            elif name == "pgsnow":
                contender = run_pgsnow(stack, slot, publication, end_lsn, counts.changes)
            else:
                contender = run_dlt(
                    dsn, slot, publication, counts.changes, args.dlt_python, workdir / f"dlt-{tag}"
                )
            progress(f"{phase}: {name}: {contender.changes_per_s or 0:.0f} changes/s {contender.error or ''}")
            contenders.append(contender)
    finally:
        for slot in slots.values():
            drop_change_capture_source(dsn, publication, slot)
    by_name = {c.name: c for c in contenders}
    ours = by_name.get("pgsnow")

    def ratio(other: str) -> float | None:
        theirs = by_name.get(other)
        if ours is None or theirs is None or not ours.changes_per_s or not theirs.changes_per_s:
            return None
        return round(ours.changes_per_s / theirs.changes_per_s, 2)

    return {
        "phase": phase,
        "kinds": list(kinds),
        "workload": {**counts.as_dict(), "wal_bytes": wal_bytes, "end_lsn": end_lsn},
        "contenders": [asdict(c) for c in contenders],
        "ratios": {"vs_pg_recvlogical": ratio("pg_recvlogical"), "vs_dlt": ratio("dlt pg_replication")},
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.2, help="sample shop size before the workload")
    parser.add_argument("--transactions", type=int, default=2000, help="workload transactions in the slots")
    parser.add_argument("--latency-minutes", type=float, default=4.0, help="0 skips the delay measurement")
    parser.add_argument(
        "--latency-rate", type=float, default=20.0, help="workload changes/s while timing delay"
    )
    parser.add_argument("--interval", type=float, default=60.0, help="change-capture schedule, in seconds")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between Snowflake polls")
    parser.add_argument("--dlt-python", type=Path, default=Path("/work/.venv-dlt/bin/python"))
    parser.add_argument("--pg-dsn", help="PostgreSQL (default: the local server)")
    parser.add_argument("--output", type=Path, default=RESULTS / "cdc-latest.json")
    parser.add_argument("--drain-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--end-lsn", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Absolute, not resolved: dlt runs in its own working directory, and resolving the venv's python
    # symlink would leave the venv.
    args.dlt_python = args.dlt_python.absolute()
    if args.drain_child:
        return drain_child(args.end_lsn)

    from pgsnow.cli import quiet_function_logs
    from pgsnow.demo.dataset import SAMPLE_TABLES
    from pgsnow.demo.pipeline import drop_change_capture_source
    from pgsnow.identifiers import TableRef
    from pgsnow.local.postgres import create_database
    from pgsnow.local.stack import start_stack

    quiet_function_logs(False)

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="pgsnow-bench-cdc-"))
    stack = start_stack(pg_dsn=args.pg_dsn, data_dir=workdir / "stack", progress=progress)
    suffix = f"{os.getpid()}"
    publication = f"pgsnow_bench_pub_{suffix}"
    dsn = create_database(stack.pg_dsn, BENCH_DATABASE, drop_existing=True)
    tables = [TableRef(SCHEMA, name) for name in SAMPLE_TABLES]
    phases: list[dict[str, Any]] = []
    latency: dict[str, Any] = {}
    try:
        server_version = str(fetch_one(dsn, "SHOW server_version"))
        stack.pg_dsn = dsn
        stack.env.update(
            {
                "PGSNOW_PG_DSN": dsn,
                "PGSNOW_TABLES": ",".join(t.qualified for t in tables),
                "PGSNOW_TABLE_OPTIONS": json.dumps({t.qualified: {"mode": "cdc"} for t in tables}),
            }
        )
        for phase, kinds, names in (
            ("full workload", KINDS, ("recv", "pgsnow", "dlt")),
            # dlt's pg_replication stops at the first unchanged TOASTed value (a ValueError in its
            # schema_types._to_dlt_val); so that it has a rate at all, the same again without them.
            ("without unchanged TOAST", NO_UNCHANGED_TOAST, ("recv", "pgsnow", "dlt")),
        ):
            phases.append(
                throughput_phase(
                    stack,
                    dsn,
                    publication,
                    phase=phase,
                    kinds=kinds,
                    names=names,
                    args=args,
                    workdir=workdir,
                    progress=progress,
                )
            )
        if args.latency_minutes > 0:
            progress(
                f"commit-to-visible delay: {args.latency_minutes} min, change capture every {args.interval:g} s"
            )
            try:
                latency = measure_latency(
                    stack,
                    dsn,
                    tables,
                    minutes=args.latency_minutes,
                    rate=args.latency_rate,
                    poll_s=args.poll,
                    interval_s=args.interval,
                    progress=progress,
                    scale=args.scale,
                )
            except Exception as exc:  # reported, not hidden: the throughput results still stand
                latency = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    finally:
        drop_change_capture_source(dsn, publication, f"pgsnow_bench_none_{suffix}")
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    result = {
        "run_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "postgres": server_version},
        "phases": phases,
        "targets": TARGETS,
        "latency": latency,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
