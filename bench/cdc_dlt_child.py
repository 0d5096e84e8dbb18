"""Child of bench/cdc.py, run by the dlt virtualenv's Python: dlt's pg_replication source, one slot.

``pg_replication`` (dlt-hub/verified-sources) is importable from PYTHONPATH, where bench/cdc.py
put its files for this run. The destination is DuckDB or the local filesystem (JSONL). Prints one
JSON line: seconds (pipeline.run), rows normalized per table, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import dlt
from dlt.sources.credentials import ConnectionStringCredentials
from pg_replication import replication_resource  # type: ignore[import-not-found]


def peak_rss_kb() -> int:
    """Peak resident set (VmHWM; ``ru_maxrss`` survives ``execve`` and would be the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--slot", required=True)
    parser.add_argument("--publication", required=True)
    parser.add_argument("--destination", choices=["duckdb", "filesystem"], default="filesystem")
    parser.add_argument(
        "--target", required=True, help="DuckDB file, or the filesystem destination's directory"
    )
    parser.add_argument("--pipelines-dir", required=True)
    args = parser.parse_args()
    credentials = ConnectionStringCredentials(args.dsn)
    changes = replication_resource(slot_name=args.slot, pub_name=args.publication, credentials=credentials)
    pipeline = dlt.pipeline(
        pipeline_name="bench_cdc",
        destination=dlt.destinations.duckdb(args.target)
        if args.destination == "duckdb"
        else dlt.destinations.filesystem(f"file://{args.target}"),
        dataset_name="shop_changes",
        pipelines_dir=args.pipelines_dir,
    )
    started = time.perf_counter()
    pipeline.run(changes)
    seconds = time.perf_counter() - started
    trace = pipeline.last_trace
    normalized = trace.last_normalize_info if trace is not None else None
    rows = {
        k: v for k, v in (normalized.row_counts if normalized else {}).items() if not k.startswith("_dlt")
    }
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rows": rows,
                "dlt_version": dlt.__version__,
                "max_rss_kb": peak_rss_kb(),
            }
        )
    )


if __name__ == "__main__":
    main()
