"""One benchmark contender per process: ``python contenders.py NAME --spec spec.json``.

The orchestrator (``run.py``) starts each contender in its own process, so the peak RSS it
reads from ``wait4`` belongs to that contender alone. Each contender writes the whole table
once and reports what it wrote to ``--result`` as JSON; its clock starts just before it
connects and stops when the last byte is written (interpreter start and imports excluded,
which is fairest to the heavy-import tools).

Third-party contenders run in the bench virtualenv (``.venv-bench``), pgsnow's in the
project's own (``.venv``); every import is therefore inside its contender.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Spec:
    """What the orchestrator tells a contender: where the table is, where to write."""

    dsn: str
    schema: str
    table: str
    out_dir: str
    s3_endpoint: str | None = None  # the moto server (pgsnow contenders stage to S3)
    bucket: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # pgsnow settings over the defaults
    # The moto server's administrator keys (it enforces IAM: pgsnow.local.aws)
    s3_access_key_id: str = "testing"
    s3_secret_access_key: str = "testing"


@dataclass
class Outcome:
    rows: int
    bytes: int
    files: int
    seconds: float
    # For a pipeline of several processes: the sum of their peaks (wait4 would give the largest).
    peak_rss_kb: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _files_under(directory: str, suffix: str) -> list[Path]:
    return sorted(p for p in Path(directory).rglob(f"*{suffix}") if p.is_file())


def _select_all(spec: Spec) -> str:
    # Names come from our own generator (bench/datagen.py); quoted all the same.
    return f'SELECT * FROM "{spec.schema}"."{spec.table}"'


def _uri(dsn: str, scheme: str = "postgresql") -> str:
    """A libpq key/value DSN as the postgresql:// URI that ADBC, connectorx and SQLAlchemy want."""
    from urllib.parse import quote

    from psycopg2.extensions import parse_dsn

    parts = parse_dsn(dsn)
    user = quote(parts.get("user", "postgres"))
    password = f":{quote(parts['password'])}" if "password" in parts else ""
    host = parts.get("host", "127.0.0.1")
    port = parts.get("port", "5432")
    return f"{scheme}://{user}{password}@{host}:{port}/{quote(parts.get('dbname', 'postgres'))}"


# --- baselines ---------------------------------------------------------------------------------------


def copy_gzip1(spec: Spec) -> Outcome:
    """psql's COPY (SELECT *) TO STDOUT piped into ``gzip -1``: the practical CSV limit."""
    path = Path(spec.out_dir) / f"{spec.table}.csv.gz"
    copy = f"COPY ({_select_all(spec)}) TO STDOUT WITH (FORMAT csv, HEADER true)"
    started = time.perf_counter()
    with path.open("wb") as target:
        psql = subprocess.Popen(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", spec.dsn, "-c", copy], stdout=subprocess.PIPE
        )
        gzip = subprocess.Popen(["gzip", "-1", "-c"], stdin=psql.stdout, stdout=target)
        assert psql.stdout is not None
        psql.stdout.close()  # gzip holds the read end now
        peaks = _watch_peak_rss_kb([psql, gzip])
        for process in (psql, gzip):
            if process.returncode != 0:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
    seconds = time.perf_counter() - started
    return Outcome(
        rows=_count_csv_records(path),
        bytes=path.stat().st_size,
        files=1,
        seconds=seconds,
        # The pipeline's processes run at the same time: their peaks add up (this driver excluded).
        peak_rss_kb=sum(peaks),
        details={"psql_peak_rss_kb": peaks[0], "gzip_peak_rss_kb": peaks[1]},
    )


def _watch_peak_rss_kb(processes: list[subprocess.Popen[bytes]]) -> list[int]:
    """Each process's VmHWM, polled until it exits.

    Not ``wait4``'s ru_maxrss: Linux carries the parent's peak across fork+exec, so every
    child would report at least its parent's size.
    """
    peaks = [0] * len(processes)
    while any(p.poll() is None for p in processes):
        for index, process in enumerate(processes):
            peaks[index] = max(peaks[index], _vm_hwm_kb(process.pid) or 0)
        time.sleep(0.02)
    return peaks


def _vm_hwm_kb(pid: int | str = "self") -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None  # already gone
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def _count_csv_records(path: Path) -> int:
    """Records in a gzip CSV with a header; the generated table has no newline inside a value."""
    import gzip

    lines = 0
    with gzip.open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines - 1


def copy_gzip1_python(spec: Spec) -> Outcome:
    """The same COPY through psycopg2 into zlib level 1 in ONE process: pgsnow CSV's ceiling."""
    import gzip

    import psycopg2

    path = Path(spec.out_dir) / f"{spec.table}.csv.gz"
    started = time.perf_counter()
    conn = psycopg2.connect(spec.dsn)
    try:
        with conn.cursor() as cur, gzip.open(path, "wb", compresslevel=1) as target:
            cur.copy_expert(f"COPY ({_select_all(spec)}) TO STDOUT WITH (FORMAT csv, HEADER true)", target)
            rows = cur.rowcount
    finally:
        conn.close()
    return Outcome(rows=rows, bytes=path.stat().st_size, files=1, seconds=time.perf_counter() - started)


def adbc_parquet(spec: Spec) -> Outcome:
    """adbc-driver-postgresql (binary COPY into Arrow batches) streamed into a zstd Parquet file."""
    import adbc_driver_postgresql.dbapi as adbc
    import pyarrow.parquet as pq

    path = Path(spec.out_dir) / f"{spec.table}.parquet"
    rows = 0
    started = time.perf_counter()
    with adbc.connect(_uri(spec.dsn)) as conn, conn.cursor() as cur:
        cur.execute(_select_all(spec))
        reader = cur.fetch_record_batch()
        with pq.ParquetWriter(path, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
    seconds = time.perf_counter() - started
    schema = pq.read_schema(path)
    return Outcome(
        rows=rows,
        bytes=path.stat().st_size,
        files=1,
        seconds=seconds,
        details={"arrow_types": {f.name: str(f.type) for f in schema}},
    )


# --- pgsnow ----------------------------------------------------------------------------------------------


def _pgsnow(spec: Spec, file_format: str) -> Outcome:
    """pgsnow.extract.run.extract_table, staging to the moto server over loopback HTTP."""
    import boto3
    from botocore.config import Config

    from pgsnow.config import Component, Settings
    from pgsnow.extract.run import extract_table
    from pgsnow.identifiers import TableRef
    from pgsnow.keys import FileFormat
    from pgsnow.postgres import connect

    assert spec.s3_endpoint is not None and spec.bucket is not None
    settings = Settings.from_env(
        {
            "S3_STAGE_BUCKET": spec.bucket,
            "S3_FILE_FORMAT": file_format,
            "PGSNOW_TABLES": f"{spec.schema}.{spec.table}",
            "PGSNOW_PG_DSN": spec.dsn,
            **spec.env,
        },
        component=Component.EXTRACTOR,
    )
    s3 = boto3.client(
        "s3",
        endpoint_url=spec.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=spec.s3_access_key_id,
        aws_secret_access_key=spec.s3_secret_access_key,
        config=Config(s3={"addressing_style": "path"}),
    )
    started = time.perf_counter()
    conn = connect(spec.dsn)
    try:
        manifest = extract_table(
            settings=settings,
            pg_conn=conn,
            s3=s3,
            table=TableRef(spec.schema, spec.table),
            file_format=FileFormat(file_format),
        )
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    return Outcome(
        rows=manifest.total_rows,
        bytes=sum(f.bytes for f in manifest.files),
        files=len(manifest.files),
        seconds=seconds,
        details={
            "batch_rows": settings.batch_rows,
            "target_file_mb": settings.extract.target_file_mb,
            "file_bytes": [f.bytes for f in manifest.files],  # in key order: the last is the rest
            "file_chunks": [f.chunk for f in manifest.files],
            "chunks": len({f.chunk for f in manifest.files}),
            "pgsnow_from": str(Path(extract_table.__code__.co_filename)),
        },
    )


def pgsnow_csv(spec: Spec) -> Outcome:
    return _pgsnow(spec, "csv")


def pgsnow_parquet(spec: Spec) -> Outcome:
    return _pgsnow(spec, "parquet")


# --- dlt -------------------------------------------------------------------------------------------------


def _dlt(spec: Spec, backend: str) -> Outcome:
    """dlt's sql_database source (``sql_table``) into a local filesystem destination as Parquet."""
    # No telemetry, no home-directory state: everything dlt keeps goes under out_dir.
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    os.environ["DLT_DATA_DIR"] = str(Path(spec.out_dir) / "dlt-data")
    import dlt
    from dlt.sources.sql_database import sql_table

    destination_dir = Path(spec.out_dir) / "destination"
    started = time.perf_counter()
    resource = sql_table(
        credentials=_uri(spec.dsn, "postgresql+psycopg2"),
        table=spec.table,
        schema=spec.schema,
        backend=backend,
    )
    pipeline = dlt.pipeline(
        pipeline_name=f"bench_{backend}",
        destination=dlt.destinations.filesystem(bucket_url=destination_dir.as_uri()),
        dataset_name="bench",
        pipelines_dir=str(Path(spec.out_dir) / "pipelines"),
    )
    pipeline.run(resource, loader_file_format="parquet")
    seconds = time.perf_counter() - started
    row_counts = pipeline.last_trace.last_normalize_info.row_counts
    files = _files_under(str(destination_dir / "bench" / spec.table), ".parquet")
    return Outcome(
        rows=int(row_counts.get(spec.table, 0)),
        bytes=sum(f.stat().st_size for f in files),
        files=len(files),
        seconds=seconds,
        details={"dlt_version": dlt.__version__},
    )


def dlt_pyarrow(spec: Spec) -> Outcome:
    return _dlt(spec, "pyarrow")


def dlt_connectorx(spec: Spec) -> Outcome:
    return _dlt(spec, "connectorx")


CONTENDERS: dict[str, Callable[[Spec], Outcome]] = {
    "copy_gzip1": copy_gzip1,
    "copy_gzip1_python": copy_gzip1_python,
    "adbc_parquet": adbc_parquet,
    "pgsnow_csv": pgsnow_csv,
    "pgsnow_parquet": pgsnow_parquet,
    "dlt_pyarrow": dlt_pyarrow,
    "dlt_connectorx": dlt_connectorx,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(CONTENDERS))
    parser.add_argument("--spec", required=True, type=Path, help="JSON of a Spec")
    parser.add_argument("--result", required=True, type=Path, help="where to write the Outcome as JSON")
    parser.add_argument("--cprofile", type=Path, help="run under cProfile and dump the stats here")
    args = parser.parse_args(argv)
    spec = Spec(**json.loads(args.spec.read_text()))
    contender = CONTENDERS[args.name]
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        outcome = profiler.runcall(contender, spec)
        profiler.dump_stats(args.cprofile)
    else:
        outcome = contender(spec)
    if outcome.peak_rss_kb is None:
        # This process's own high-water mark (threads included; set at exec, so not inherited).
        outcome.peak_rss_kb = _vm_hwm_kb()
    args.result.write_text(json.dumps(asdict(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
