"""Extraction benchmark: pgsnow against the practical limits and dlt, side by side in one run.

    .venv/bin/python bench/run.py [--rows 2000000] [--scale-rows 400000] [--profile]

Generates (or reuses) the deterministic table ``pgsnow_bench.mixed_<rows>`` (bench/datagen.py),
starts a moto server on loopback in this process, then runs every contender in its own
process (bench/contenders.py) and reads its peak RSS from ``wait4``. Third-party contenders
run with the bench virtualenv's Python (``--bench-python``), pgsnow's with the project's.
Writes ``bench/results/latest.json`` and ``latest.md`` (the table docs/performance.md quotes).
This is a measurement, never a pass/fail test: the targets are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))  # a script directory, not a package: datagen sits beside us

from datagen import BenchTable, ensure_table  # noqa: E402
from parallel import ParallelMeasurement, render_parallel, run_parallel  # noqa: E402

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
BENCH_BUCKET = "pgsnow-bench"
PGSNOW_CONTENDERS = ("pgsnow_csv", "pgsnow_parquet")
ALL_CONTENDERS = (
    "copy_gzip1",
    "copy_gzip1_python",
    "adbc_parquet",
    "pgsnow_csv",
    "pgsnow_parquet",
    "dlt_pyarrow",
    "dlt_connectorx",
)
RSS_LIMIT_MB = 256
SCALE_LIMIT = 1.2
REPEAT_ONLY_BELOW_S = 30.0


@dataclass(frozen=True)
class Measurement:
    contender: str
    table_rows: int
    rows: int
    bytes: int
    files: int
    seconds: float
    wall_seconds: float  # including interpreter start and imports
    peak_rss_mb: float
    table_mb: float
    details: dict[str, Any]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def table_mb_per_s(self) -> float:
        """Source MB (pg_table_size) moved per second: comparable across output formats."""
        return self.table_mb / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_row(self) -> float:
        return self.bytes / self.rows if self.rows else 0.0


def _python_for(contender: str, bench_python: str) -> str:
    return sys.executable if contender in PGSNOW_CONTENDERS else bench_python


def run_contender(
    contender: str,
    table: BenchTable,
    *,
    dsn: str,
    bench_python: str,
    s3: Any,
    s3_endpoint: str,
    work_dir: Path,
    pgsnow_src: Path | None = None,
    wrapper: list[str] | None = None,
    cprofile: Path | None = None,
) -> Measurement:
    """Run one contender in its own process; its peak RSS is that process's (tree's) own."""
    out_dir = work_dir / contender
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    spec_path, result_path = work_dir / "spec.json", work_dir / "result.json"
    result_path.unlink(missing_ok=True)
    spec = {
        "dsn": dsn,
        "schema": table.schema,
        "table": table.name,
        "out_dir": str(out_dir),
        "s3_endpoint": s3_endpoint,
        "bucket": BENCH_BUCKET,
    }
    spec_path.write_text(json.dumps(spec))
    command = [_python_for(contender, bench_python), str(BENCH_DIR / "contenders.py"), contender]
    command += ["--spec", str(spec_path), "--result", str(result_path)]
    if cprofile is not None:
        command += ["--cprofile", str(cprofile)]
    if wrapper:
        command = wrapper + command
    env = {**os.environ, "POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_METRICS_DISABLED": "true"}
    if pgsnow_src is not None:
        # Ahead of the editable install of the working tree: measure the committed code.
        env["PYTHONPATH"] = str(pgsnow_src)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read() if process.stderr else ""
    exit_code = os.waitstatus_to_exitcode(status)
    table_mb = table.heap_bytes / 1e6
    try:
        if exit_code != 0 or not result_path.exists():
            last = (stderr.strip().splitlines() or [f"exit code {exit_code}"])[-1]
            return Measurement(contender, table.rows, 0, 0, 0, 0.0, wall, 0.0, table_mb, {}, error=last)
        outcome = json.loads(result_path.read_text())
        # The contender's own VmHWM: wait4's ru_maxrss would include this (big) process's
        # size, which Linux carries into a child across fork+exec.
        peak_kb = outcome.get("peak_rss_kb") or usage.ru_maxrss
        error = None
        if outcome["rows"] != table.rows:
            error = f"wrote {outcome['rows']} rows, the table has {table.rows}"
        return Measurement(
            contender=contender,
            table_rows=table.rows,
            rows=outcome["rows"],
            bytes=outcome["bytes"],
            files=outcome["files"],
            seconds=outcome["seconds"],
            wall_seconds=wall,
            peak_rss_mb=peak_kb / 1024,
            table_mb=table_mb,
            details=outcome.get("details", {}),
            error=error,
        )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        _empty_bucket(s3)


def run_repeated(contender: str, table: BenchTable, repeat: int, **kwargs: Any) -> Measurement:
    """Best time of up to ``repeat`` runs (timings wobble by ~20%); the highest peak RSS of them."""
    runs = [run_contender(contender, table, **kwargs)]
    # A long run's noise is small next to its length; repeating dlt's pyarrow backend would
    # add minutes to the benchmark for nothing.
    while len(runs) < repeat and runs[-1].ok and runs[-1].seconds < REPEAT_ONLY_BELOW_S:
        runs.append(run_contender(contender, table, **kwargs))
    failed = [m for m in runs if not m.ok]
    if failed:
        return failed[0]
    best = min(runs, key=lambda m: m.seconds)
    details = {**best.details, "runs_seconds": [round(m.seconds, 2) for m in runs]}
    return replace(best, peak_rss_mb=max(m.peak_rss_mb for m in runs), details=details)


def _empty_bucket(s3: Any) -> None:
    """Delete every object version, so the moto server's memory does not grow run after run."""
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=BENCH_BUCKET):
        doomed = [
            {"Key": v["Key"], "VersionId": v["VersionId"]}
            for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
        ]
        if doomed:
            s3.delete_objects(Bucket=BENCH_BUCKET, Delete={"Objects": doomed})


def _resolve_commit(ref: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def export_pgsnow(ref: str, work_dir: Path) -> Path | None:
    """``src/`` of git ``ref`` in a scratch directory (None: use the working tree as installed).

    Other engineers edit the working tree while the benchmark runs; a commit is what a
    result can be pinned to.
    """
    if ref == "worktree":
        return None
    target = work_dir / "pgsnow-src"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", ref, "src/pgsnow"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "src"


def warm_cache(dsn: str, table: BenchTable) -> None:
    """Read the whole table once so the first contender does not pay for cold pages."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            # A sum over a wide text column touches the heap and TOAST pages of every row.
            cur.execute(f'SELECT count(*), sum(length(t::text)) FROM "{table.schema}"."{table.name}" AS t')
            cur.fetchone()
    finally:
        conn.close()


# --- profiling -------------------------------------------------------------------------------------------


def profile_pgsnow(
    contender: str,
    table: BenchTable,
    *,
    dsn: str,
    bench_python: str,
    s3: Any,
    s3_endpoint: str,
    work_dir: Path,
    pgsnow_src: Path | None,
    top: int,
) -> str:
    """Where a pgsnow contender's time goes: py-spy when it can attach, else cProfile."""
    py_spy = Path(bench_python).with_name("py-spy")
    common = {
        "dsn": dsn,
        "bench_python": bench_python,
        "s3": s3,
        "s3_endpoint": s3_endpoint,
        "work_dir": work_dir,
        "pgsnow_src": pgsnow_src,
    }
    if py_spy.exists():
        collapsed = work_dir / f"{contender}.collapsed"
        wrapper = [
            str(py_spy),
            "record",
            "--format",
            "raw",
            "--rate",
            "200",
            "--output",
            str(collapsed),
            "--",
        ]
        measured = run_contender(contender, table, wrapper=wrapper, **common)
        if measured.ok and collapsed.exists():
            return _py_spy_report(collapsed, top, measured)
    stats_path = work_dir / f"{contender}.pstats"
    measured = run_contender(contender, table, cprofile=stats_path, **common)
    return _cprofile_report(stats_path, top, measured)


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "write_rows (pgsnow/formats.py:242)"; keep function and file:line.
    frame = frame.replace(str(REPO_ROOT) + "/", "")
    return frame.split("site-packages/")[-1] if "site-packages/" in frame else frame


def _py_spy_report(collapsed: Path, top: int, measured: Measurement) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        if not any(f.startswith("extract_table ") for f in frames):
            continue  # interpreter start, imports, boto3 client setup: not the extraction
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            # Function level (no line number) for the inclusive view.
            inclusive[frame.rsplit(":", 1)[0] + ")" if ":" in frame else frame] += count
    lines = [
        f"py-spy (sampling, 200 Hz) of {measured.contender} on {measured.table_rows:,} rows: "
        f"{measured.seconds:.1f} s, {total} samples inside extract_table",
        "",
        "| own time | where (function, file:line) |",
        "|---:|---|",
    ]
    lines += [f"| {100 * n / total:.1f}% | `{name}` |" for name, n in own.most_common(top)]
    lines += ["", "| inclusive | function |", "|---:|---|"]
    interesting = [(name, n) for name, n in inclusive.most_common() if "pgsnow/" in name or "pyarrow" in name]
    lines += [f"| {100 * n / total:.1f}% | `{name}` |" for name, n in interesting[:top]]
    return "\n".join(lines)


def _cprofile_report(stats_path: Path, top: int, measured: Measurement) -> str:
    if not stats_path.exists():
        return f"profiling failed: {measured.error}"
    stats = pstats.Stats(str(stats_path))
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    total = sum(v[2] for _, v in rows) or 1.0
    lines = [
        f"cProfile of {measured.contender} on {measured.table_rows:,} rows ({measured.seconds:.1f} s profiled)",
        "",
        "| own time | calls | function |",
        "|---:|---:|---|",
    ]
    for (filename, line, function), (_, calls, own, _, _) in rows[:top]:
        where = _frame_name(f"{function} ({filename}:{line})")
        lines.append(f"| {100 * own / total:.1f}% | {calls:,} | `{where}` |")
    return "\n".join(lines)


# --- report ----------------------------------------------------------------------------------------------


def _versions(bench_python: str, dsn: str, pgsnow_ref: str) -> dict[str, str]:
    probe = (
        "import importlib.metadata as m, json, sys; "
        "names = ['dlt', 'connectorx', 'adbc-driver-postgresql', 'pyarrow', 'psycopg2-binary', 'sqlalchemy']; "
        "print(json.dumps({n: m.version(n) for n in names} | {'python': sys.version.split()[0]}))"
    )
    bench = json.loads(
        subprocess.run([bench_python, "-c", probe], capture_output=True, text=True, check=True).stdout
    )
    import importlib.metadata as metadata

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            server_version = str(cur.fetchone()[0])
            cur.execute("SHOW shared_buffers")
            shared_buffers = str(cur.fetchone()[0])
    finally:
        conn.close()
    commit = subprocess.run(
        [
            "git",
            "-C",
            str(REPO_ROOT),
            "rev-parse",
            "--short",
            "HEAD" if pgsnow_ref == "worktree" else pgsnow_ref,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    gzip_version = subprocess.run(
        ["gzip", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    return {
        "pgsnow commit": commit if pgsnow_ref != "worktree" else f"working tree on {commit}",
        "pgsnow python": platform.python_version(),
        "pgsnow pyarrow": metadata.version("pyarrow"),
        "pgsnow psycopg2": metadata.version("psycopg2-binary"),
        "boto3 (pgsnow)": metadata.version("boto3"),
        "moto (S3 stand-in)": metadata.version("moto"),
        "bench python": bench.pop("python"),
        **{f"{name} (bench venv)": version for name, version in bench.items()},
        "PostgreSQL": f"{server_version} (shared_buffers {shared_buffers}, loopback TCP)",
        "gzip": gzip_version,
    }


def _machine(load_at_start: tuple[float, float, float]) -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{memory_kb / 1024 / 1024:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        # Other work on the machine skews every contender; this says how busy it was.
        "load average (1/5/15 min)": f"at start {_load_text(load_at_start)}, at end {_load_text(os.getloadavg())}",
    }


def _load_text(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{value:.1f}" for value in load)


def _ratio(results: dict[str, Measurement], numerator: str, denominator: str) -> float | None:
    a, b = results.get(numerator), results.get(denominator)
    if a is None or b is None or not a.ok or not b.ok or not b.rows_per_s:
        return None
    return a.rows_per_s / b.rows_per_s


def targets(
    main: dict[str, Measurement], scale: dict[str, Measurement]
) -> list[tuple[str, str, str, bool | None]]:
    """(target, required, measured, met) for every target of issue 3; met None = not measured."""
    checks: list[tuple[str, str, str, bool | None]] = []

    def ratio_check(label: str, numerator: str, denominator: str, required: float) -> None:
        value = _ratio(main, numerator, denominator)
        measured = "not measured" if value is None else f"{value:.2f}x"
        checks.append((label, f">= {required}x", measured, None if value is None else value >= required))

    ratio_check("pgsnow CSV.gz vs COPY | gzip -1 (rows/s)", "pgsnow_csv", "copy_gzip1", 0.8)
    ratio_check("pgsnow Parquet vs ADBC -> Parquet (rows/s)", "pgsnow_parquet", "adbc_parquet", 0.8)
    ratio_check("pgsnow Parquet vs dlt pyarrow (rows/s)", "pgsnow_parquet", "dlt_pyarrow", 5.0)
    for name in PGSNOW_CONTENDERS:
        big = main.get(name)
        if big is not None and big.ok:
            checks.append(
                (
                    f"{name} peak RSS",
                    f"<= {RSS_LIMIT_MB} MB",
                    f"{big.peak_rss_mb:.0f} MB",
                    big.peak_rss_mb <= RSS_LIMIT_MB,
                )
            )
        small = scale.get(name)
        if big is not None and small is not None and big.ok and small.ok:
            growth = big.peak_rss_mb / small.peak_rss_mb
            checks.append(
                (
                    f"{name} RSS at {big.table_rows:,} / at {small.table_rows:,} rows",
                    f"<= {SCALE_LIMIT}x",
                    f"{growth:.2f}x ({big.peak_rss_mb:.0f} / {small.peak_rss_mb:.0f} MB)",
                    growth <= SCALE_LIMIT,
                )
            )
    return checks


def _results_table(measurements: list[Measurement]) -> list[str]:
    lines = [
        "| contender | table rows | rows/s | source MB/s | output MB | bytes/row | files | peak RSS MB | seconds (wall) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in measurements:
        if not m.ok:
            lines.append(f"| {m.contender} | {m.table_rows:,} | failed: {m.error} | | | | | | |")
            continue
        lines.append(
            f"| {m.contender} | {m.table_rows:,} | {m.rows_per_s:,.0f} | {m.table_mb_per_s:.1f} | "
            f"{m.bytes / 1e6:.1f} | {m.bytes_per_row:.1f} | {m.files} | {m.peak_rss_mb:.0f} | "
            f"{m.seconds:.1f} ({m.wall_seconds:.1f}) |"
        )
    return lines


def render_markdown(
    main: dict[str, Measurement],
    scale: dict[str, Measurement],
    table: BenchTable,
    machine: dict[str, str],
    versions: dict[str, str],
    profiles: list[tuple[str, str]],
) -> str:
    lines = [
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on `{table.qualified}` "
        f"({table.rows:,} rows, {table.heap_bytes / 1e6:.0f} MB in PostgreSQL).",
        "",
        *_results_table(list(main.values()) + list(scale.values())),
        "",
        "| target (issue 3) | required | measured | met |",
        "|---|---|---|---|",
    ]
    for label, required, measured, met in targets(main, scale):
        verdict = "not measured" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {label} | {required} | {measured} | {verdict} |")
    lines += ["", "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in machine.items()]]
    lines += ["", "| software | version |", "|---|---|", *[f"| {k} | {v} |" for k, v in versions.items()]]
    for contender, profile in profiles:
        lines += ["", f"### Profile: {contender}", "", profile]
    return "\n".join(lines) + "\n"


def _run_parallel(
    args: argparse.Namespace,
    table: BenchTable,
    workers: list[int],
    work_dir: Path,
    common: dict[str, Any],
    aws_env: dict[str, str],
) -> list[ParallelMeasurement]:
    """The main table extracted by one worker, then by each count of range workers (bench/parallel.py),
    with the moto server's administrator keys (IAM is enforced there)."""
    env = {**os.environ, **aws_env, "POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_METRICS_DISABLED": "true"}
    if common.get("pgsnow_src") is not None:
        env["PYTHONPATH"] = str(common["pgsnow_src"])
    warm_cache(args.dsn, table)
    return run_parallel(
        table.schema,
        table.name,
        expected_rows=table.rows,
        dsn=args.dsn,
        s3_endpoint=common["s3_endpoint"],
        bucket=BENCH_BUCKET,
        work_dir=work_dir,
        workers=workers,
        range_rows=args.range_rows,
        env=env,
        empty_bucket=lambda: _empty_bucket(common["s3"]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the main table")
    parser.add_argument(
        "--scale-rows", type=int, default=400_000, help="rows of the memory-scaling table (0: skip)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs per contender; the best time is kept")
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL to generate and read the table in")
    parser.add_argument("--contenders", default=",".join(ALL_CONTENDERS), help="comma-separated subset")
    parser.add_argument(
        "--bench-python",
        default=str(REPO_ROOT / ".venv-bench" / "bin" / "python"),
        help="the bench venv's python",
    )
    parser.add_argument(
        "--pgsnow-ref",
        default="HEAD",
        help="git commit of pgsnow to measure, or 'worktree' for uncommitted code",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile pgsnow CSV and Parquet (on the scale table)"
    )
    parser.add_argument("--top", type=int, default=15, help="hotspots to list in the profile")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument(
        "--parallel-workers",
        default="1,2,4",
        help="parallel backfill: worker counts to run next to the single worker ('' to skip)",
    )
    parser.add_argument("--range-rows", type=int, default=250_000, help="parallel backfill: rows per range")
    args = parser.parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(ALL_CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")

    from pgsnow.local.aws import start_local_aws

    load_at_start = os.getloadavg()
    # Pinned once: other engineers commit while the benchmark runs.
    pgsnow_ref = args.pgsnow_ref if args.pgsnow_ref == "worktree" else _resolve_commit(args.pgsnow_ref)
    table = ensure_table(args.dsn, args.rows)
    scale_table = ensure_table(args.dsn, args.scale_rows) if args.scale_rows else None
    aws = start_local_aws()
    s3 = aws.client("s3")
    s3.create_bucket(Bucket=BENCH_BUCKET)
    common = {"dsn": args.dsn, "bench_python": args.bench_python, "s3": s3, "s3_endpoint": aws.endpoint_url}
    main_results: dict[str, Measurement] = {}
    scale_results: dict[str, Measurement] = {}
    profiles: list[tuple[str, str]] = []  # (contender, report)
    parallel: list[ParallelMeasurement] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pgsnow-bench-") as tmp:
            work_dir = Path(tmp)
            common["pgsnow_src"] = export_pgsnow(pgsnow_ref, work_dir)
            warm_cache(args.dsn, table)
            for contender in contenders:
                measured = run_repeated(contender, table, args.repeat, work_dir=work_dir, **common)
                main_results[contender] = measured
                print(_results_table([measured])[-1], flush=True)
            worker_counts = [int(n) for n in args.parallel_workers.split(",") if n.strip()]
            if worker_counts:
                parallel = _run_parallel(args, table, worker_counts, work_dir, common, aws.env())
            if scale_table is not None:
                warm_cache(args.dsn, scale_table)
                for contender in [c for c in contenders if c in PGSNOW_CONTENDERS]:
                    measured = run_repeated(contender, scale_table, args.repeat, work_dir=work_dir, **common)
                    scale_results[contender] = measured
                    print(_results_table([measured])[-1], flush=True)
            if args.profile:
                for contender in [c for c in contenders if c in PGSNOW_CONTENDERS]:
                    profile = profile_pgsnow(
                        contender, scale_table or table, work_dir=work_dir, top=args.top, **common
                    )
                    profiles.append((contender, profile))
    finally:
        aws.stop()

    markdown = render_markdown(
        main_results,
        scale_results,
        table,
        _machine(load_at_start),
        _versions(args.bench_python, args.dsn, pgsnow_ref),
        profiles,
    )
    if parallel:
        markdown += "\n" + "\n".join(render_parallel(parallel, parallel[0])) + "\n"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "latest.md").write_text(markdown)
    payload = {
        "table": asdict(table),
        "results": [asdict(m) | {"rows_per_s": m.rows_per_s} for m in main_results.values()],
        "scale_results": [asdict(m) | {"rows_per_s": m.rows_per_s} for m in scale_results.values()],
        "targets": [
            {"target": t, "required": r, "measured": v, "met": met}
            for t, r, v, met in targets(main_results, scale_results)
        ],
        "parallel": [asdict(m) | {"rows_per_s": m.rows_per_s} for m in parallel],
    }
    (args.results_dir / "latest.json").write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
