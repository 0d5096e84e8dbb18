"""Incremental, chunked and resumable extraction against real servers (PostgreSQL on loopback, moto over HTTP).

Covers issue 3's done-when cases: a late-committing transaction's rows arrive in the next run;
an extraction stopped at the deadline (or interrupted) resumes and stages exactly the source
rows once; two concurrent runs of one table: one proceeds, one is refused; value policies
null/clamp; an injected table name is refused before any SQL.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg2
import psycopg2.extensions
import pyarrow.parquet as pq
import pytest
from psycopg2 import sql
from stack_support import new_bucket

from pgsnow.checkpoint import RunInProgressError
from pgsnow.config import Component, Settings
from pgsnow.errors import RetryableError, UnsafeIdentifierError
from pgsnow.extract.files import FILES_PER_CHUNK
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, lease_key
from pgsnow.local.aws import LocalAws
from pgsnow.local.dispatcher import LambdaContext
from pgsnow.local.stack import load_function_handler
from pgsnow.manifest import RunManifest, RunState
from pgsnow.postgres import connect
from pgsnow.runs import RunStore
from pgsnow.runtime import Runtime, extractor_runtime, reset_runtime

pytestmark = pytest.mark.integration

PREFIX = "staging"


# pg_dsn, admin, schema_name, aws, s3, pg_conn: stack_support


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3, "pgsnow-runs")


def new_table(admin: psycopg2.extensions.connection, schema_name: str, prefix: str, columns: str) -> TableRef:
    table = TableRef(schema_name, f"{prefix}_{uuid.uuid4().hex[:8]}")
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE {} ({})").format(
                sql.Identifier(table.schema, table.table), sql.SQL(columns)
            )
        )
    return table


def fill_table(admin: psycopg2.extensions.connection, table: TableRef, select_list: str, rows: int) -> None:
    """Insert ``rows`` rows: ``SELECT {select_list} FROM generate_series(1, rows) g``."""
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} SELECT {} FROM generate_series(1, %s) g").format(
                sql.Identifier(table.schema, table.table), sql.SQL(select_list)
            ),
            (rows,),
        )


def settings_for(bucket: str, pg_dsn: str, table: TableRef, **env: str) -> Settings:
    return Settings.from_env(
        {
            "S3_STAGE_BUCKET": bucket,
            "S3_STAGE_PREFIX": PREFIX,
            "PGSNOW_TABLES": table.qualified,
            "PGSNOW_PG_DSN": pg_dsn,
            **env,
        },
        Component.EXTRACTOR,
    )


def staged_rows(s3: Any, bucket: str, manifest: RunManifest) -> list[dict[str, str | None]]:
    """Every data row of a run's files, as text (NULL kept apart from '')."""
    rows: list[dict[str, str | None]] = []
    for staged in manifest.files:
        body = s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read()
        if staged.file_format is FileFormat.PARQUET:
            table = pq.read_table(io.BytesIO(body))
            rows += [{k: None if v is None else str(v) for k, v in r.items()} for r in table.to_pylist()]
            continue
        text = gzip.decompress(body).decode()
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        for record in reader:
            rows.append(dict(zip(header, [v if v != "" else None for v in record], strict=True)))
    return rows


def insert_orders(
    admin: psycopg2.extensions.connection, table: TableRef, ids: range, updated_at: str
) -> None:
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (id, note, updated_at) SELECT g, 'n' || g, %s FROM generate_series(%s, %s) g"
            ).format(sql.Identifier(table.schema, table.table)),
            (updated_at, ids.start, ids.stop - 1),
        )


INCREMENTAL_COLUMNS = "id integer PRIMARY KEY, note text, updated_at timestamptz NOT NULL DEFAULT now()"


def incremental_options(table: TableRef, **extra: Any) -> str:
    return json.dumps({table.qualified: {"mode": "incremental", "cursor_column": "updated_at", **extra}})


# --- incremental: late commits ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_late_committing_transaction_is_captured_by_the_next_run(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any, fmt: FileFormat
) -> None:
    # Given an incremental table with committed rows, and a second connection whose transaction
    # started earlier (its now() is older) and inserts rows it has not committed yet
    table = new_table(admin, schema_name, "late", INCREMENTAL_COLUMNS)
    late = psycopg2.connect(pg_dsn)
    try:
        with late.cursor() as cur:
            cur.execute(
                sql.SQL("INSERT INTO {} (id, note) VALUES (100, 'late')").format(
                    sql.Identifier(table.schema, table.table)
                )
            )  # updated_at = now() = this transaction's start, before the rows below
        time.sleep(0.05)  # wall clock is the subject: the rows below get a later now() than the late one
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("INSERT INTO {} (id, note) SELECT g, 'n' || g FROM generate_series(1, 5) g").format(
                    sql.Identifier(table.schema, table.table)
                )
            )
        settings = settings_for(bucket, pg_dsn, table, PGSNOW_TABLE_OPTIONS=incremental_options(table))

        # When the first run (a backfill) extracts while the late transaction is still open
        first = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table, file_format=fmt)

        # Then it staged the five committed rows, and its watermark stops at or before the open
        # transaction's start (other sessions' older open transactions hold it back further)
        assert sorted(int(str(r["id"])) for r in staged_rows(s3, bucket, first)) == [1, 2, 3, 4, 5]
        assert first.watermark_before is None and first.mode == "incremental"
        with admin.cursor() as cur:
            cur.execute(
                "SELECT xact_start::text FROM pg_stat_activity WHERE pid = %s", (late.get_backend_pid(),)
            )
            late_start = cur.fetchone()[0]
        assert first.watermark_after is not None and first.watermark_after <= late_start

        # When the late transaction commits, and the next run extracts
        late.commit()
        second = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table, file_format=fmt)

        # Then the late row arrives (the five rows after the watermark come again; the loader's merge dedups)
        second_ids = sorted(int(str(r["id"])) for r in staged_rows(s3, bucket, second))
        assert 100 in second_ids
        assert second.watermark_before == first.watermark_after
        assert second.watermark_after is not None and second.watermark_after >= first.watermark_after
    finally:
        late.close()


def test_incremental_run_reads_only_rows_at_or_after_the_watermark_minus_lookback(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given rows at three distinct times and a 1-hour lookback
    table = new_table(admin, schema_name, "lookback", INCREMENTAL_COLUMNS)
    insert_orders(admin, table, range(1, 4), "2024-01-01 00:00:00+00")
    insert_orders(admin, table, range(4, 7), "2024-01-02 00:00:00+00")
    options = incremental_options(table, lookback_seconds=3600)
    settings = settings_for(bucket, pg_dsn, table, PGSNOW_TABLE_OPTIONS=options)
    first = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)
    assert first.watermark_after == "2024-01-02 00:00:00+00"

    # When rows are added 30 minutes before and one day after the watermark, and the next run extracts
    insert_orders(admin, table, range(7, 8), "2024-01-01 23:30:00+00")
    insert_orders(admin, table, range(8, 9), "2024-01-03 00:00:00+00")
    second = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)

    # Then the run read cursor >= watermark - 1h: the boundary ties, the row inside the lookback and the new one
    assert sorted(int(str(r["id"])) for r in staged_rows(s3, bucket, second)) == [4, 5, 6, 7, 8]
    assert second.watermark_after == "2024-01-03 00:00:00+00"
    assert all(f.cursor_range is not None for f in second.files)


# --- chunks, deadline and resume ----------------------------------------------------------------------


@pytest.fixture
def handler_env(monkeypatch: pytest.MonkeyPatch, aws: LocalAws, bucket: str, pg_dsn: str) -> Iterator[Any]:
    """Configure the real extractor handler for a table; yields a function that sets the env and
    returns the handler and its runtime."""

    def configure(table: TableRef, **env: str) -> Any:
        for name, value in {
            **aws.env(),
            "S3_STAGE_BUCKET": bucket,
            "S3_STAGE_PREFIX": PREFIX,
            "PGSNOW_TABLES": table.qualified,
            "PGSNOW_PG_DSN": pg_dsn,
            "AWS_LAMBDA_FUNCTION_NAME": "pgsnow-test-extractor",
            # short_context(30) is then always inside the margin: each invocation stops after a file
            "EXTRACT_DEADLINE_MARGIN_S": "60",
            **env,
        }.items():
            monkeypatch.setenv(name, value)
        reset_runtime()  # a new runtime: settings, clients and PostgreSQL connection from this environment
        return load_function_handler("extractor"), extractor_runtime()

    yield configure
    reset_runtime()


def short_context(remaining_s: float) -> LambdaContext:
    return LambdaContext(
        function_name="pgsnow-test-extractor",
        invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:pgsnow-test-extractor",
        memory_limit_in_mb=1024,
        deadline_monotonic=time.monotonic() + remaining_s,
    )


def invoke_with_continuations(handler: Any, runtime: Runtime, table: TableRef) -> list[dict[str, Any]]:
    """The schedule's invocation for ``table``, then every continuation it asks for, in turn, each
    with a context inside the deadline margin; their results in order."""
    continuations: list[dict[str, str]] = []
    runtime.continuation_invoker = continuations.append  # instead of lambda:InvokeFunction
    results = [handler({"schema_name": table.schema, "table_name": table.table}, short_context(30))]
    while continuations:
        results.append(handler(continuations.pop(0), short_context(30)))
    return results


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_deadline_stops_after_each_file_and_continuations_finish_the_run_exactly(
    admin: Any, schema_name: str, s3: Any, bucket: str, handler_env: Any, fmt: str
) -> None:
    # Given 23 rows, chunks of 10 rows, files of 4 rows, and a context always inside the deadline margin
    table = new_table(admin, schema_name, "deadline", "id integer PRIMARY KEY, note text")
    fill_table(admin, table, "g, 'row ' || g", 23)
    handler, runtime = handler_env(table, EXTRACT_CHUNK_ROWS="10", EXTRACT_BATCH_ROWS="4", S3_FILE_FORMAT=fmt)
    # When the schedule invokes it, and every continuation it asks for is invoked in turn
    results = invoke_with_continuations(handler, runtime, table)

    # Then each invocation staged one file and handed on; the last one staged the manifest
    run_id = results[0]["run_id"]
    assert all(r["run_id"] == run_id for r in results)
    assert [r["state"] for r in results] == ["extracting"] * (len(results) - 1) + ["staged"]
    manifest = RunStore(s3, bucket).get_manifest(table, run_id)
    # chunks 0..2 hold 10, 10, 3 rows: files of 4, 4, 2 | 4, 4, 2 | 3, at batch chunk * 10000 + n
    assert [f.rows for f in manifest.files] == [4, 4, 2, 4, 4, 2, 3]
    assert [f.batch for f in manifest.files] == [
        1,
        2,
        3,
        FILES_PER_CHUNK + 1,
        FILES_PER_CHUNK + 2,
        FILES_PER_CHUNK + 3,
        2 * FILES_PER_CHUNK + 1,
    ]
    assert [f.chunk for f in manifest.files] == [0, 0, 0, 1, 1, 1, 2]
    assert manifest.files[0].key_range == ("1", "4") and manifest.files[-1].key_range == ("21", "23")
    # one invocation per file, plus the last, which found the final chunk already read to its end
    assert len(results) == len(manifest.files) + 1
    # And the staged data is exactly the source rows, each once, across every key
    ids = [int(str(r["id"])) for r in staged_rows(s3, bucket, manifest)]
    assert ids == list(range(1, 24))
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")["KeyCount"]
    assert listed == len(manifest.files)
    # And the lease is gone: the table is free for the next run
    assert RunStore(s3, bucket).current_lease(table) is None


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_continuations_keep_the_numeric_scale_the_run_chose(
    admin: Any, schema_name: str, s3: Any, bucket: str, handler_env: Any, fmt: str
) -> None:
    # Given an unbounded numeric column of ratios with 20 decimals, staged over several invocations
    table = new_table(admin, schema_name, "ratios", "id integer PRIMARY KEY, v numeric")
    fill_table(admin, table, "g, g::numeric(10,2) / 7", 9)
    handler, runtime = handler_env(table, EXTRACT_CHUNK_ROWS="4", EXTRACT_BATCH_ROWS="4", S3_FILE_FORMAT=fmt)
    # When the run stops before its deadline after each file and its continuations resume it
    results = invoke_with_continuations(handler, runtime, table)

    # Then every continuation resumed the same run with the scale its first invocation chose
    assert len(results) > 2 and results[-1]["state"] == "staged"
    manifest = RunStore(s3, bucket).get_manifest(table, results[0]["run_id"])
    assert [c.snowflake_type for c in manifest.columns if c.name == "v"] == ["NUMBER(38,20)"]
    # and every value is staged exactly as PostgreSQL holds it
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT v::text FROM {} ORDER BY id").format(sql.Identifier(table.schema, table.table))
        )
        source = [Decimal(v) for (v,) in cur.fetchall()]
    assert max(-v.as_tuple().exponent for v in source) == 20  # type: ignore[operator]
    assert [Decimal(str(r["v"])) for r in staged_rows(s3, bucket, manifest)] == source


def test_interrupted_run_is_resumed_by_the_next_invocation_with_the_same_keys(
    admin: Any,
    schema_name: str,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a 30-row table, chunks of 10, files of 5, and an S3 upload that fails transiently on the 4th file
    table = new_table(admin, schema_name, "interrupted", "id integer PRIMARY KEY, note text")
    fill_table(admin, table, "g, 'row ' || g", 30)
    settings = settings_for(bucket, pg_dsn, table, EXTRACT_CHUNK_ROWS="10", EXTRACT_BATCH_ROWS="5")
    import pgsnow.extract.files as extract_files

    real_put = extract_files.put_data_file
    calls = {"n": 0}

    def flaky_put(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RetryableError("S3 SlowDown (injected)")
        real_put(*args, **kwargs)

    monkeypatch.setattr(extract_files, "put_data_file", flaky_put)

    # When the first invocation fails mid-run
    with pytest.raises(RetryableError):
        extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)

    # Then its manifest is still extracting (resumable), with a handed-off lease naming the run
    lease = RunStore(s3, bucket).current_lease(table)
    assert lease is not None and lease.owner is None
    assert RunStore(s3, bucket).get_manifest(table, lease.run_id).state is RunState.EXTRACTING

    # When the next scheduled invocation (no run id) runs
    monkeypatch.setattr(extract_files, "put_data_file", real_put)
    manifest = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)

    # Then it resumed the same run after the last checkpointed file, and the data is exactly the source
    assert manifest.run_id == lease.run_id and manifest.state is RunState.STAGED
    assert [f.batch for f in manifest.files] == [1, 2, 10001, 10002, 20001, 20002]
    ids = [int(str(r["id"])) for r in staged_rows(s3, bucket, manifest)]
    assert ids == list(range(1, 31))


def test_run_whose_holder_died_is_resumed_after_the_lease_expires(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given a run that stopped at the deadline after its first file and whose continuation never came,
    # its lease renewed by an owner that then died (not handed off)
    table = new_table(admin, schema_name, "died", "id integer PRIMARY KEY")
    fill_table(admin, table, "g", 12)
    settings = settings_for(bucket, pg_dsn, table, EXTRACT_BATCH_ROWS="5", EXTRACT_DEADLINE_MARGIN_S="60")
    stopped = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table, remaining_ms=lambda: 1000)
    assert stopped.state is RunState.EXTRACTING and len(stopped.files) == 1
    store = RunStore(s3, bucket)
    handed = store.current_lease(table)
    assert handed is not None
    store.renew_lease(store._rewrite_lease(handed, owner="dead-invocation", ttl_s=600), ttl_s=600)

    # When a new invocation comes while the dead owner's lease is live, and again after it expired
    with pytest.raises(RunInProgressError, match="run in progress"):
        extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)
    later = time.time() + 3600
    finished = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table, clock=lambda: later)

    # Then the expired lease was taken over and the same run finished with every row once
    assert finished.run_id == stopped.run_id and finished.state is RunState.STAGED
    assert [int(str(r["id"])) for r in staged_rows(s3, bucket, finished)] == list(range(1, 13))


def test_two_concurrent_runs_one_proceeds_one_is_refused(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given a table locked by another session, so the first run blocks once it holds the lease
    table = new_table(admin, schema_name, "concurrent", "id integer PRIMARY KEY")
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} VALUES (1), (2)").format(sql.Identifier(table.schema, table.table))
        )
    settings = settings_for(bucket, pg_dsn, table)
    locker = psycopg2.connect(pg_dsn)
    outcome: dict[str, Any] = {}
    try:
        with locker.cursor() as cur:
            cur.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(table.schema, table.table)
                )
            )

        def first_run() -> None:
            conn = connect(pg_dsn)
            try:
                outcome["first"] = extract_table(settings=settings, pg_conn=conn, s3=s3, table=table)
            finally:
                conn.close()

        thread = threading.Thread(target=first_run)
        thread.start()
        for _ in range(100):
            if s3.list_objects_v2(Bucket=bucket, Prefix=lease_key(table))["KeyCount"]:
                break
            time.sleep(0.05)

        # When a second run for the same table starts meanwhile
        with pytest.raises(RunInProgressError, match="run in progress") as refused:
            extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)
    finally:
        locker.rollback()
        locker.close()
    thread.join(timeout=60)

    # Then the second was refused (retryable) without touching the first, which completes
    assert refused.value.retryable and refused.value.table == table.qualified
    first = outcome["first"]
    assert first.state is RunState.STAGED and first.total_rows == 2
    assert refused.value.run_id == first.run_id


# --- value policies, key list, refusals ---------------------------------------------------------------


POLICY_CASES = [
    pytest.param("numeric", "NaN", "null", None, id="null-numeric-nan"),
    # 1e38 and more fit no NUMBER(38, s); the column's scale is chosen from the other values (none: 10)
    pytest.param("numeric", "1e38", "null", None, id="null-numeric-too-large"),
    pytest.param("timestamp", "infinity", "null", None, id="null-timestamp-infinity"),
    pytest.param("numeric", "1e38", "clamp", "9" * 28 + "." + "9" * 10, id="clamp-numeric-too-large"),
    pytest.param(
        "numeric", "-Infinity", "clamp", "-" + "9" * 28 + "." + "9" * 10, id="clamp-numeric-minus-inf"
    ),
    # 39 significant digits: the chosen scale, 37, leaves the integer digit its room; rounded to it
    pytest.param(
        "numeric", "1." + "1" * 38, "clamp", "1." + "1" * 37, id="clamp-numeric-rounds-to-38-digits"
    ),
    pytest.param("numeric", "NaN", "clamp", None, id="clamp-numeric-nan-is-null"),
    pytest.param(
        "timestamp", "infinity", "clamp", "9999-12-31 23:59:59.999999", id="clamp-timestamp-infinity"
    ),
    pytest.param("date", "0044-03-15 BC", "clamp", "0001-01-01", id="clamp-date-bc"),
    pytest.param("time", "24:00:00", "clamp", "23:59:59.999999", id="clamp-time-24"),
]


@pytest.mark.parametrize(("pg_type", "bad_value", "policy", "expected"), POLICY_CASES)
def test_value_policies_stage_null_or_the_nearest_value(
    admin: Any,
    schema_name: str,
    s3: Any,
    bucket: str,
    pg_dsn: str,
    pg_conn: Any,
    pg_type: str,
    bad_value: str,
    policy: str,
    expected: str | None,
) -> None:
    # Given a row holding a value Snowflake cannot hold, next to a good row, and the table's policy
    table = new_table(admin, schema_name, "policy", f"id integer PRIMARY KEY, v {pg_type}")
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} VALUES (1, NULL), (42, %s)").format(
                sql.Identifier(table.schema, table.table)
            ),
            (bad_value,),
        )
    options = json.dumps({table.qualified: {"value_policy": policy}})
    settings = settings_for(bucket, pg_dsn, table, PGSNOW_TABLE_OPTIONS=options)

    # When it is extracted as CSV
    manifest = extract_table(
        settings=settings, pg_conn=pg_conn, s3=s3, table=table, file_format=FileFormat.CSV
    )

    # Then the bad value is staged as the policy says, the run is staged
    by_id = {r["id"]: r["v"] for r in staged_rows(s3, bucket, manifest)}
    assert by_id == {"1": None, "42": expected}


def test_key_list_is_staged_when_deletes_are_tracked(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given a table with a composite key and deletes=hard
    table = new_table(admin, schema_name, "keys", "a integer, b text, v text, PRIMARY KEY (a, b)")
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} VALUES (2, 'x', 'v'), (1, 'y', 'v'), (1, 'x', NULL)").format(
                sql.Identifier(table.schema, table.table)
            )
        )
    options = json.dumps({table.qualified: {"deletes": "hard", "write_mode": "merge"}})
    settings = settings_for(bucket, pg_dsn, table, PGSNOW_TABLE_OPTIONS=options)

    # When it is extracted
    manifest = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)

    # Then the manifest references a key list under _pgsnow/keys holding every key, in key order
    assert manifest.key_list is not None and manifest.deletes == "hard" and manifest.write_mode == "merge"
    assert manifest.key_list.key == f"_pgsnow/keys/{table.schema}/{table.table}/{manifest.run_id}.csv.gz"
    body = gzip.decompress(s3.get_object(Bucket=bucket, Key=manifest.key_list.key)["Body"].read()).decode()
    assert body.splitlines() == ["a,b", "1,x", "1,y", "2,x"]
    assert manifest.key_list.rows == 3


@pytest.mark.parametrize(
    "name",
    [
        pytest.param('orders"; DROP TABLE x; --', id="quote-and-semicolon"),
        pytest.param("orders/../../etc", id="path"),
        pytest.param("other_table", id="not-allowlisted"),
    ],
)
def test_injected_or_unlisted_table_is_refused_before_any_sql_or_s3(
    schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any, name: str
) -> None:
    # Given an allowlist naming one table
    settings = settings_for(bucket, pg_dsn, TableRef(schema_name, "orders"))

    # When a run is asked for another name
    with pytest.raises(UnsafeIdentifierError):
        extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=TableRef(schema_name, name))

    # Then no SQL ran and nothing (not even a lease) was written
    assert pg_conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_unbounded_numeric_exact_in_parquet_under_clamp(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given an unbounded numeric column with a too-large value and an exact one, policy clamp
    table = new_table(admin, schema_name, "pq_clamp", "id integer PRIMARY KEY, v numeric")
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} VALUES (1, 12345.6789), (2, 1e40)").format(
                sql.Identifier(table.schema, table.table)
            )
        )
    options = json.dumps({table.qualified: {"value_policy": "clamp"}})
    settings = settings_for(bucket, pg_dsn, table, PGSNOW_TABLE_OPTIONS=options)

    # When it is extracted as Parquet
    manifest = extract_table(
        settings=settings, pg_conn=pg_conn, s3=s3, table=table, file_format=FileFormat.PARQUET
    )

    # Then the exact value is exact and the large one is NUMBER(38,10)'s greatest
    body = s3.get_object(Bucket=bucket, Key=manifest.files[0].key)["Body"].read()
    values = pq.read_table(io.BytesIO(body)).column("v").to_pylist()
    assert values == [Decimal("12345.6789000000"), Decimal("9" * 28 + "." + "9" * 10)]


def test_a_staged_run_publishes_its_columns_for_the_next_run(
    admin: Any, schema_name: str, s3: Any, bucket: str, pg_dsn: str, pg_conn: Any
) -> None:
    # Given a table extracted once
    table = new_table(admin, schema_name, "shape", "id integer PRIMARY KEY, price numeric(10,2) NOT NULL")
    settings = settings_for(bucket, pg_dsn, table)
    store = RunStore(s3, bucket)
    assert store.load_published_columns(table) is None
    first = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)

    # Then the table's state holds that run's columns, exactly as its manifest describes them
    published = store.load_published_columns(table)
    assert published is not None and published.run_id == first.run_id
    assert published.columns == first.columns
    assert (
        published.column("price") is not None and published.column("price").snowflake_type == "NUMBER(10,2)"
    )

    # And the next run, after a column is added, replaces them with its own
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN note text").format(sql.Identifier(table.schema, table.table))
        )
    second = extract_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)
    published = store.load_published_columns(table)
    assert published is not None and published.run_id == second.run_id
    assert [c.name for c in published.columns] == ["id", "price", "note"]
