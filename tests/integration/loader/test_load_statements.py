"""What a batch costs in Snowflake statements, and which locks its transactions take, counted from
the statements the local Snowflake received (``LocalSnowflake.history``: what Snowflake's query
history would list, and bill).

A batch's files are grouped per (table, run): one COPY per group, one ledger claim (MERGE), one
look-up and one record per group, and no statement per file. Loads into different tables lock
disjoint sets of tables (docs/loading.md, "Locks"): Snowflake's UPDATE, DELETE and MERGE hold
their table's lock until the transaction ends, so two loads whose transactions write no common
table with those statements never wait on each other.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import snowflake.connector
import sqlglot
from load_support import ORDER_ROWS, csv_gz_bytes, manifest_columns, put_run_manifest, put_staged_file, query
from sqlglot import exp

from pgsnow.config import Settings, lock_timeout_for
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, StagedObject, data_key, parse_data_key
from pgsnow.ledger import ledger_table
from pgsnow.load.batch import Loader
from pgsnow.load.outcomes import LoadStatus
from pgsnow.local.snowflake import ExecutedStatement, LocalSnowflake
from pgsnow.local.stack import LOADER_TIMEOUT_S
from pgsnow.manifest import RunManifest, RunState
from pgsnow.runs import RunStore
from pgsnow.snowflake.connection import connect as pgsnow_connect

pytestmark = pytest.mark.integration

RUN = "20261201T080000000000Z"
TABLES = [TableRef("public", f"events_{n}") for n in range(3)]
DDL = ("CREATE", "DROP", "ALTER TABLE", "TRUNCATE", "UNDROP")
LOCKING = (exp.Update, exp.Delete, exp.Merge)  # Snowflake: these hold their table's lock until COMMIT


def stage_batch(s3: Any, settings: Settings, table_batches: dict[TableRef, range]) -> list[StagedObject]:
    """One tiny CSV file (one order, its id the batch number) per (table, batch), put in parallel."""
    jobs = [(table, batch) for table, batches in table_batches.items() for batch in batches]

    def put(job: tuple[TableRef, int]) -> StagedObject:
        table, batch = job
        key = data_key(settings.prefix, table, batch, RUN, FileFormat.CSV)
        row = (batch, *ORDER_ROWS[1][1:])
        put_staged_file(s3, settings, key, csv_gz_bytes([row]), rows=1, run_id=RUN)
        return parse_data_key(key, settings.prefix)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(put, jobs))


def spread(start: int, files: int) -> dict[TableRef, range]:
    """``files`` batches numbered from ``start``, spread over the three tables."""
    per_table = [files // len(TABLES) + (1 if n < files % len(TABLES) else 0) for n in range(len(TABLES))]
    batches, first = {}, start
    for table, count in zip(TABLES, per_table, strict=True):
        batches[table] = range(first, first + count)
        first += count
    return batches


def kind(statement: ExecutedStatement) -> str:
    """The statement's leading keywords (``COPY INTO``, ``MERGE INTO``, ``ALTER SESSION``, ...)."""
    words = statement.sql_text.split()
    return " ".join(words[:2]).upper() if words[0].upper() in {"ALTER", "COPY", "MERGE"} else words[0].upper()


def load_and_count(
    local_snowflake: LocalSnowflake, loader: Loader, sf_conn: Any, objects: Sequence[StagedObject]
) -> list[ExecutedStatement]:
    mark = local_snowflake.history.mark()
    outcomes = loader.load(sf_conn, objects)
    assert [o.error for o in outcomes if o.error is not None] == []
    assert {o.result.status for o in outcomes if o.result is not None} == {LoadStatus.LOADED}
    return local_snowflake.history.since(mark)


@pytest.fixture
def patient_conn(local_snowflake: LocalSnowflake, settings: Settings, sf_conn: Any) -> Iterator[Any]:
    """A session that waits for a long statement: the local Snowflake answers a COPY only when it
    has read every file (~0.2 s each from moto; longer on a busy machine), where Snowflake would
    answer "in progress" and the connector poll. The default 60 s socket timeout would give up."""
    kwargs = local_snowflake.connect_kwargs(database=settings.snowflake.database, schema="PUBLIC")
    conn = snowflake.connector.connect(**{**kwargs, "network_timeout": 900, "socket_timeout": 900})
    yield conn
    conn.close()


def test_a_batch_costs_statements_per_table_never_per_file(
    local_snowflake: LocalSnowflake, settings: Settings, s3: Any, patient_conn: Any
) -> None:
    sf_conn = patient_conn
    # Given three tables of one run each, already loaded once by this loader (tables and ledgers made)
    for table in TABLES:
        put_run_manifest(s3, settings, table, RUN)
    loader = Loader(settings, s3)
    first = load_and_count(local_snowflake, loader, sf_conn, stage_batch(s3, settings, spread(1, 3)))
    assert any(kind(s).startswith(DDL) for s in first)  # the first batch made the tables and ledgers

    # When a batch of 500 files spread over the three tables arrives, and then one of 30
    big = load_and_count(local_snowflake, loader, sf_conn, stage_batch(s3, settings, spread(100, 500)))
    small = load_and_count(local_snowflake, loader, sf_conn, stage_batch(s3, settings, spread(1000, 30)))

    # Then the 500 files cost 3 COPY and at most 3 MERGE, and no DDL: nothing changed
    counts = Counter(kind(s) for s in big)
    assert counts["COPY INTO"] == 3
    assert counts["MERGE INTO"] <= 3
    assert [s.sql_text for s in big if kind(s).startswith(DDL)] == []
    # and no statement per file: 30 files cost exactly the same statements as 500
    assert [kind(s) for s in big] == [kind(s) for s in small]
    # (per table: query tag, autocommit off, claim MERGE, look-up, COPY, record UPDATE, COMMIT, autocommit on)
    assert len(big) <= 8 * len(TABLES), Counter(kind(s) for s in big)
    # and every file's row arrived once
    for table, batches in spread(100, 500).items():
        target = f'"{settings.snowflake.database}"."PUBLIC"."{table.table.upper()}"'
        (count,) = query(sf_conn, f'SELECT COUNT(*) FROM {target} WHERE "ORDER_ID" BETWEEN 100 AND 599')[0]
        assert count == len(batches)


# --------------------------------------------------------------------------- locks


def transactions(statements: Sequence[ExecutedStatement]) -> list[list[str]]:
    """Each explicit transaction's statements (autocommit off ... COMMIT/ROLLBACK), per session."""
    found: list[list[str]] = []
    open_by_session: dict[str, list[str]] = {}
    for statement in statements:
        text = statement.sql_text.strip()
        upper = text.upper()
        if upper.startswith("ALTER SESSION SET AUTOCOMMIT=FALSE"):
            open_by_session[statement.session] = []
        elif upper in {"COMMIT", "ROLLBACK"} and statement.session in open_by_session:
            found.append(open_by_session.pop(statement.session))
        elif statement.session in open_by_session:
            open_by_session[statement.session].append(text)
    return found


def locked_tables(transaction: Sequence[str]) -> set[str]:
    """The tables a transaction's UPDATE, DELETE and MERGE statements write (sqlglot parses them)."""
    locked = set()
    for text in transaction:
        if text.split()[0].upper() not in {"UPDATE", "DELETE", "MERGE"}:
            continue
        parsed = sqlglot.parse_one(text.replace("%s", "NULL"), read="snowflake")
        assert isinstance(parsed, LOCKING), text
        target = parsed.this
        table = target if isinstance(target, exp.Table) else target.find(exp.Table)
        assert table is not None, text
        locked.add(".".join(part.name for part in table.parts))
    return locked


def session_locks(statements: Sequence[ExecutedStatement]) -> dict[str, set[str]]:
    """Per session, every table its transactions lock."""
    by_session: dict[str, list[ExecutedStatement]] = {}
    for statement in statements:
        by_session.setdefault(statement.session, []).append(statement)
    return {
        session: set().union(*(locked_tables(t) for t in transactions(ss)))
        for session, ss in by_session.items()
    }


def put_manifest(s3: Any, settings: Settings, table: TableRef, write_mode: str) -> None:
    manifest = RunManifest(
        run_id=RUN,
        table=table,
        mode="full",
        file_format=FileFormat.CSV,
        columns=manifest_columns(),
        primary_key=("order_id",),
        state=RunState.EXTRACTING,
        started_at="2026-12-01T08:00:00Z",
        write_mode=write_mode,
        cursor_column="created" if write_mode == "merge" else None,
    )
    RunStore(s3, settings.bucket).put_manifest(manifest)


def connect(local_snowflake: LocalSnowflake, settings: Settings) -> Any:
    return snowflake.connector.connect(
        **local_snowflake.connect_kwargs(database=settings.snowflake.database, schema="PUBLIC")
    )


def test_loads_into_different_tables_lock_no_common_table(
    local_snowflake: LocalSnowflake, settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given two loaders (two Lambda containers), each with its own Snowflake session, that have
    # loaded a first file of their own table: a merge run's table and an append run's table
    merged, appended = TABLES[0], TABLES[1]
    put_manifest(s3, settings, merged, "merge")
    put_manifest(s3, settings, appended, "append")
    sessions = [connect(local_snowflake, settings) for _ in range(2)]
    loaders = [Loader(settings, s3) for _ in range(2)]
    for loader, conn, table in zip(loaders, sessions, (merged, appended), strict=True):
        load_and_count(local_snowflake, loader, conn, stage_batch(s3, settings, {table: range(1, 2)}))

    # When each loads a batch of its own table at the same time
    batches = [stage_batch(s3, settings, {table: range(10, 30)}) for table in (merged, appended)]
    start = threading.Barrier(2)
    errors: list[str] = []

    def load(loader: Loader, conn: Any, batch: list[StagedObject]) -> None:
        start.wait()
        outcomes = loader.load(conn, batch)
        errors.extend(o.error.message for o in outcomes if o.error is not None)

    mark = local_snowflake.history.mark()
    threads = [
        threading.Thread(target=load, args=args) for args in zip(loaders, sessions, batches, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    locks = session_locks(local_snowflake.history.since(mark))
    assert errors == []

    # Then the tables each session's transactions lock (UPDATE, DELETE, MERGE hold their table's
    # lock until COMMIT in Snowflake) are disjoint: neither load can wait on the other
    assert len(locks) == 2
    merge_locks, append_locks = (locks[s] for s in sorted(locks, key=lambda s: -len(locks[s])))
    database = settings.snowflake.database
    assert merge_locks == {
        f"{database}.PGSNOW.{ledger_table(merged)}",
        f"{database}.PUBLIC.{merged.table.upper()}",
    }
    assert append_locks == {f"{database}.PGSNOW.{ledger_table(appended)}"}
    assert merge_locks.isdisjoint(append_locks)

    # And two loads of one table do share a lock, its ledger's: the lock that makes a concurrent
    # delivery of the same file wait for the first load's commit (exactly once)
    mark = local_snowflake.history.mark()
    for loader, conn, batch in zip(loaders, sessions, ((100, 101), (102, 103)), strict=True):
        load_and_count(local_snowflake, loader, conn, stage_batch(s3, settings, {appended: range(*batch)}))
    same_table = list(session_locks(local_snowflake.history.since(mark)).values())
    assert len(same_table) == 2
    assert same_table[0] & same_table[1] == {f"{database}.PGSNOW.{ledger_table(appended)}"}
    for conn in sessions:
        conn.close()


# --------------------------------------------------------------------------- the session's set-up


def test_a_functions_session_sets_its_lock_timeout_once_before_its_loads(
    local_snowflake: LocalSnowflake, settings: Settings, s3: Any, sf_conn: Any
) -> None:
    # Given the loader's Snowflake settings as its function builds them from LOADER_TIMEOUT_S (the
    # template's loader Timeout, which the local stack tells it too)
    snowflake_settings = dataclasses.replace(
        settings.snowflake, lock_timeout_s=lock_timeout_for(LOADER_TIMEOUT_S)
    )

    # When a session is opened the way every function opens its own, and loads two batches of a run
    mark = local_snowflake.history.mark()
    session = pgsnow_connect(
        snowflake_settings,
        **local_snowflake.connect_kwargs(database=settings.snowflake.database, schema="PUBLIC"),
    )
    try:
        put_run_manifest(s3, settings, TABLES[0], RUN)
        loader = Loader(settings, s3)
        for start in (1, 10):
            load_and_count(
                local_snowflake,
                loader,
                session,
                stage_batch(s3, settings, {TABLES[0]: range(start, start + 2)}),
            )
        shown = query(session, "SHOW PARAMETERS LIKE 'LOCK_TIMEOUT' IN SESSION")
    finally:
        session.close()

    # Then its first statement set LOCK_TIMEOUT, once, to a third of the function's timeout
    received = local_snowflake.history.since(mark)
    statements = [s.sql_text for s in received if s.session == received[0].session]
    setups = [s for s in statements if s.startswith("ALTER SESSION SET LOCK_TIMEOUT")]
    assert statements[0] == setups[0] == f"ALTER SESSION SET LOCK_TIMEOUT = {LOADER_TIMEOUT_S // 3}"
    assert len(setups) == 1
    assert [tuple(row[:2]) for row in shown] == [("LOCK_TIMEOUT", str(LOADER_TIMEOUT_S // 3))]
