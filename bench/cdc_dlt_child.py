"""Child of bench/cdc.py, run by the dlt virtualenv's Python: dlt's pg_replication source, one slot, into DuckDB.

``pg_replication`` (dlt-hub/verified-sources) is importable from PYTHONPATH, where bench/cdc.py
put its files for this run. Prints one JSON line: seconds (pipeline.run), rows loaded, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import dlt
import duckdb
from dlt.sources.credentials import ConnectionStringCredentials
from pg_replication import replication_resource  # type: ignore[import-not-found]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--slot", required=True)
    parser.add_argument("--publication", required=True)
    parser.add_argument("--duckdb", required=True)
    parser.add_argument("--pipelines-dir", required=True)
    args = parser.parse_args()
    credentials = ConnectionStringCredentials(args.dsn)
    changes = replication_resource(slot_name=args.slot, pub_name=args.publication, credentials=credentials)
    pipeline = dlt.pipeline(
        pipeline_name="bench_cdc",
        destination=dlt.destinations.duckdb(args.duckdb),
        dataset_name="shop_changes",
        pipelines_dir=args.pipelines_dir,
    )
    started = time.perf_counter()
    pipeline.run(changes)
    seconds = time.perf_counter() - started
    rows = 0
    with duckdb.connect(args.duckdb) as db:
        for (table,) in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'shop_changes' "
            "AND table_name NOT LIKE '\\_dlt%' ESCAPE '\\'"
        ).fetchall():
            rows += db.execute(f'SELECT count(*) FROM shop_changes."{table}"').fetchone()[0]
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rows": rows,
                "dlt_version": dlt.__version__,
                "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


if __name__ == "__main__":
    main()
