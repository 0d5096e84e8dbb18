"""Parallel backfill benchmark: one table extracted by 1, 2 and 4 workers, next to a single-worker run.

Called by bench/run.py (``--parallel-workers``); each measurement runs in its own process:

    python bench/parallel.py --spec spec.json --result result.json

``workers`` 0 is the single-worker run (``extract_table`` with no fan-out). ``workers`` N
plans the run as the extractor does (``extract_table`` with a ``FanOut``: key ranges of
``range_rows`` from the table's statistics), then N worker processes take the ranges one at a
time, as the range queue's event source with MaximumConcurrency N would, each calling the
extractor's own ``extract_range`` with its own PostgreSQL connection and S3 client; the worker
that stages the last range finishes the run. A process pool stands in for SQS and Lambda: the
measurement is of the extraction, not of the queue. Seconds run from the plan's start to the
run's staged manifest.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ParallelMeasurement:
    workers: int  # 0: the single-worker run (no ranges)
    ranges: int
    rows: int
    files: int
    bytes: int
    seconds: float
    error: str | None = None

    @property
    def label(self) -> str:
        return "single worker (no ranges)" if self.workers == 0 else f"{self.workers} worker(s)"

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def run_parallel(
    schema: str,
    table: str,
    *,
    expected_rows: int,
    dsn: str,
    s3_endpoint: str,
    bucket: str,
    work_dir: Path,
    workers: list[int],
    range_rows: int,
    file_format: str = "csv",
    env: dict[str, str] | None = None,
    empty_bucket: Any = None,
) -> list[ParallelMeasurement]:
    """The single-worker run, then one run per worker count, each in its own process."""
    results = []
    for count in [0, *workers]:
        spec = {
            "dsn": dsn,
            "schema": schema,
            "table": table,
            "s3_endpoint": s3_endpoint,
            "bucket": bucket,
            "workers": count,
            "range_rows": range_rows,
            "file_format": file_format,
        }
        spec_path, result_path = work_dir / "parallel-spec.json", work_dir / "parallel-result.json"
        spec_path.write_text(json.dumps(spec))
        result_path.unlink(missing_ok=True)
        done = subprocess.run(
            [sys.executable, str(Path(__file__)), "--spec", str(spec_path), "--result", str(result_path)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not result_path.exists():
            last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            results.append(ParallelMeasurement(count, 0, 0, 0, 0, 0.0, error=last))
        else:
            outcome = json.loads(result_path.read_text())
            error = (
                None
                if outcome["rows"] == expected_rows
                else f"{outcome['rows']} rows, expected {expected_rows}"
            )
            results.append(ParallelMeasurement(**outcome, error=error))
        print(render_parallel(results[-1:], results[0])[-1], flush=True)
        if empty_bucket is not None:
            empty_bucket()
    return results


def render_parallel(results: list[ParallelMeasurement], single: ParallelMeasurement) -> list[str]:
    """A markdown table: each run's time and its speed-up over the single worker."""
    lines = [
        "| parallel backfill (CSV) | ranges | rows/s | files | seconds | speed-up vs single worker |",
        "|---|---|---|---|---|---|",
    ]
    for m in results:
        if m.error:
            lines.append(f"| {m.label} | | | | | failed: {m.error} |")
            continue
        speed_up = f"{single.seconds / m.seconds:.2f}x" if single.seconds and not single.error else "n/a"
        lines.append(
            f"| {m.label} | {m.ranges or '-'} | {m.rows_per_s:,.0f} | {m.files} | {m.seconds:.1f} | {speed_up} |"
        )
    return lines


# --- in the measuring process -----------------------------------------------------------------------------


def _settings(spec: dict[str, Any], workers: int) -> Any:
    from pgsnow.config import Component, Settings

    return Settings.from_env(
        {
            "S3_STAGE_BUCKET": spec["bucket"],
            "S3_FILE_FORMAT": spec["file_format"],
            "PGSNOW_TABLES": f"{spec['schema']}.{spec['table']}",
            "PGSNOW_PG_DSN": spec["dsn"],
            "EXTRACT_MAX_WORKERS": str(max(workers, 1)),
            "EXTRACT_RANGE_ROWS": str(spec["range_rows"]),
            # Not sent to: the ranges go to the process pool (FanOut's sender below).
            "EXTRACT_RANGE_QUEUE_URL": "bench://process-pool",
        },
        component=Component.EXTRACTOR,
    )


@functools.cache
def _s3(endpoint: str) -> Any:
    """One client per process, as a warm Lambda container keeps one."""
    import boto3
    from botocore.config import Config

    # Keys from the environment: the moto server's administrator's (bench/run.py passes them).
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def _extract_one_range(spec: dict[str, Any], run_id: str, index: int) -> dict[str, Any]:
    """One worker invocation: the extractor's extract_range on its own connection and client."""
    from pgsnow.extract.worker import extract_range
    from pgsnow.identifiers import TableRef
    from pgsnow.postgres import connect

    conn = connect(spec["dsn"])
    try:
        result = extract_range(
            settings=_settings(spec, spec["workers"]),
            pg_conn=conn,
            s3=_s3(spec["s3_endpoint"]),
            table=TableRef(spec["schema"], spec["table"]),
            run_id=run_id,
            index=index,
        )
    finally:
        conn.close()
    manifest = result.manifest
    return {
        "finished": manifest is not None,
        "rows": manifest.total_rows if manifest else 0,
        "files": len(manifest.files) if manifest else 0,
        "bytes": sum(f.bytes for f in manifest.files) if manifest else 0,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from pgsnow.extract.ranges import FanOut
    from pgsnow.extract.run import extract_table
    from pgsnow.identifiers import TableRef
    from pgsnow.keys import FileFormat
    from pgsnow.postgres import connect

    workers = int(spec["workers"])
    table = TableRef(spec["schema"], spec["table"])
    bodies: list[dict[str, Any]] = []
    fan_out = FanOut(bodies.extend) if workers else None
    started = time.perf_counter()
    conn = connect(spec["dsn"])
    try:
        manifest = extract_table(
            settings=_settings(spec, workers),
            pg_conn=conn,
            s3=_s3(spec["s3_endpoint"]),
            table=table,
            file_format=FileFormat(spec["file_format"]),
            fan_out=fan_out,
        )
    finally:
        conn.close()
    outcome = {
        "workers": workers,
        "ranges": len(bodies),
        "rows": manifest.total_rows,
        "files": len(manifest.files),
        "bytes": sum(f.bytes for f in manifest.files),
    }
    if bodies:
        # Forked with no connection of ours open: each worker opens its own.
        _s3.cache_clear()
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = pool.starmap(
                _extract_one_range, [(spec, body["run_id"], body["range"]) for body in bodies], chunksize=1
            )
        (finished,) = [d for d in done if d["finished"]]
        outcome.update(rows=finished["rows"], files=finished["files"], bytes=finished["bytes"])
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    outcome = measure(json.loads(args.spec.read_text()))
    args.result.write_text(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
