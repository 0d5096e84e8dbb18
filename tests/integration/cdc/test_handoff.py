"""The hand-off from a change-capture table's snapshot to the slot's stream, end to end under
concurrent writes (docs/guarantees.md, section 9): the local stack's PostgreSQL, moto server and
local Snowflake, the real drain (``pgsnow.cdc.drain.drain_slot``) and the real loader through the
queue.

A writer thread inserts, updates (TOASTed values changed and left unchanged) and deletes rows,
one change or several per transaction, for the whole time the table is enrolled, snapshot in
small chunks across many invocations, drained after each invocation and loaded while the
snapshot is still being read. Then the writer stops, the slot is drained up to a position after
its last commit and the queue is delivered: `pgsnow verify` matches and the table's applied
position is past every change the writer made.

Runs once the drain (branch cdc-drain) and the apply (branch cdc-apply) are merged.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import psycopg2
import pytest
from cdc_support import change_capture_source, put_in_cdc_mode
from pipeline_support import PipelineHarness
from psycopg2 import sql

from pgsnow.cdc.enroll import snapshot_table
from pgsnow.changes import parse_lsn
from pgsnow.config import Component
from pgsnow.identifiers import TableRef
from pgsnow.ledger import Ledger
from pgsnow.manifest import RunManifest, RunState
from pgsnow.postgres import connect
from pgsnow.runs import RunStore
from pgsnow.runtime import reset_runtime

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_ROWS = 200
CHUNK_ROWS = 20  # 10+ chunks: the snapshot spans many reads, each in its own snapshot


def big_value(rng: random.Random) -> str:
    """A value stored out of line (the column's storage is EXTERNAL): pgoutput leaves it out of an
    update that does not change it."""
    return "".join(f"{rng.getrandbits(128):032x}" for _ in range(100))


@dataclass
class Writer:
    """Writes to the table from its own connection until stopped; counts what it committed."""

    dsn: str
    table: TableRef
    seed: int = 15
    stop: threading.Event = field(default_factory=threading.Event)
    committed: int = 0
    last_lsn: int = 0
    error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(self.seed)
        ident = sql.Identifier(self.table.schema, self.table.table)
        next_id = SEED_ROWS + 1
        conn = psycopg2.connect(self.dsn)
        try:
            while not self.stop.is_set():
                with conn.cursor() as cur:
                    for _ in range(rng.choice((1, 1, 1, 3))):  # a transaction of one change, or of three
                        op = rng.random()
                        key = rng.randint(1, next_id)
                        if op < 0.30:
                            cur.execute(
                                sql.SQL("INSERT INTO {} VALUES (%s, 0, %s, %s)").format(ident),
                                (next_id, f"new {next_id}", big_value(rng)),
                            )
                            next_id += 1
                        elif op < 0.70:  # leaves the TOASTed value as it is
                            cur.execute(
                                sql.SQL("UPDATE {} SET n = n + 1, note = %s WHERE id = %s").format(ident),
                                (f"updated {rng.getrandbits(32)}", key),
                            )
                        elif op < 0.80:
                            cur.execute(
                                sql.SQL("UPDATE {} SET big = %s WHERE id = %s").format(ident),
                                (big_value(rng), key),
                            )
                        else:
                            cur.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(ident), (key,))
                    conn.commit()
                    cur.execute("SELECT pg_current_wal_lsn()::text")
                    self.last_lsn = parse_lsn(cur.fetchone()[0])
                    conn.commit()
                self.committed += 1
                self.stop.wait(0.02)  # slower than the snapshot reads, or its last chunk is never reached
        except BaseException as exc:  # reported by the test, which joins the thread
            self.error = exc
        finally:
            conn.close()


class StopsAfter:
    """A remaining-time function: plenty for ``calls`` looks, then inside the deadline margin, so
    each snapshot invocation stages a few files and hands the run on."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def __call__(self) -> int:
        self.calls -= 1
        return 900_000 if self.calls >= 0 else 1_000


@pytest.fixture
def handoff_table(pipeline: PipelineHarness) -> TableRef:
    table = pipeline.table(f"handoff_{random.getrandbits(32):08x}")
    ident = sql.Identifier(table.schema, table.table)
    pipeline.run_sql(
        sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, n integer NOT NULL, note text, big text)").format(
            ident
        )
    )
    pipeline.run_sql(sql.SQL("ALTER TABLE {} ALTER COLUMN big SET STORAGE EXTERNAL").format(ident))
    pipeline.run_sql(
        sql.SQL(
            "INSERT INTO {} SELECT g, 0, 'seed ' || g,"
            " (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 100) i)"
            " FROM generate_series(1, %s) g"
        ).format(ident),
        (SEED_ROWS,),
    )
    return table


def test_snapshot_and_stream_converge_under_concurrent_writes(
    pipeline: PipelineHarness, handoff_table: TableRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = handoff_table
    with change_capture_source(pipeline.source_dsn, [(table.schema, table.table)]) as source:
        # Given the table in mode cdc, with its publication and slot, for the stack's handlers too
        env = put_in_cdc_mode(
            pipeline.stack.env,
            monkeypatch,
            table,
            source,
            EXTRACT_CHUNK_ROWS=str(CHUNK_ROWS),
            EXTRACT_BATCH_ROWS=str(CHUNK_ROWS),
        )
        try:
            _converge(pipeline, table, env, source.slot)
        finally:
            reset_runtime()


def _converge(pipeline: PipelineHarness, table: TableRef, env: dict[str, str], slot: str) -> None:
    from pgsnow.cdc.drain import drain_slot  # branch cdc-drain

    settings = pipeline.settings(Component.EXTRACTOR, **env)
    s3 = pipeline.function_s3(Component.EXTRACTOR)
    store = RunStore(pipeline.s3(), pipeline.bucket)
    recorder, dispatcher = pipeline.loader()
    pg_conn = connect(pipeline.source_dsn)
    writing = Writer(pipeline.source_dsn, table)
    thread = threading.Thread(target=writing.run, name="handoff-writer")
    thread.start()
    try:
        # When, while the writer writes, the table is enrolled and its snapshot read a few files per
        # invocation, the slot drained after each invocation, the queue delivered now and then
        run_id: str | None = None
        invocations = 0
        written_at_start = writing.committed
        while True:
            outcome = snapshot_table(
                settings=settings,
                pg_conn=pg_conn,
                s3=s3,
                table=table,
                run_id=run_id,
                remaining_ms=StopsAfter(8),
            )
            invocations += 1
            assert isinstance(outcome, RunManifest)
            drain_slot(settings, dsn=pipeline.source_dsn, s3=s3)
            if invocations % 3 == 0:
                dispatcher.run_until_idle()  # change runs staged before the snapshot is loaded wait for it
            if outcome.state is RunState.STAGED:
                break
            run_id = outcome.run_id
            assert invocations < 100
        written_during_snapshot = writing.committed - written_at_start
        for _ in range(3):  # the stream goes on after the snapshot is staged and loaded
            drain_slot(settings, dsn=pipeline.source_dsn, s3=s3)
            dispatcher.run_until_idle()
    finally:
        writing.stop.set()
        thread.join(60)
        pg_conn.close()
    assert writing.error is None, writing.error
    # the snapshot really was read across many invocations while transactions committed
    assert invocations >= 5 and written_during_snapshot > 20

    # When the writer has stopped: drain through a position after its last commit, deliver the queue
    for _ in range(20):
        result = drain_slot(settings, dsn=pipeline.source_dsn, s3=s3)
        if parse_lsn(result["end_lsn"]) >= writing.last_lsn and result["confirmed"]:
            break
    else:
        pytest.fail(f"the slot was not drained past {writing.last_lsn}")
    dispatcher.run_until_idle()

    # Then no delivery failed, Snowflake matches PostgreSQL, and every change after S is applied
    assert [d for d in recorder.deliveries if d.failed] == []
    verification = pipeline.verify(table)
    assert verification.ok, verification
    enrollment = store.read_enrollment(table)
    assert enrollment is not None and enrollment.enrollment.slot == slot
    snapshot = store.get_manifest(table, enrollment.enrollment.snapshot_run_id)
    assert (
        snapshot.changes is not None and snapshot.changes.snapshot_lsn == enrollment.enrollment.snapshot_lsn
    )
    position = Ledger.of(
        pipeline.sf_conn, pipeline.settings(Component.LOADER, **env), table
    ).applied_position()
    assert position is not None and position.lsn >= writing.last_lsn


def test_a_transaction_committed_right_after_a_runs_last_commit_is_applied(
    pipeline: PipelineHarness, handoff_table: TableRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain's run ends at the end of its last commit record (the heartbeat's), the position it
    confirms; a transaction whose commit record comes right after it commits exactly there (its
    commit LSN is where that record starts) and is the next run's first. It must be applied, not
    taken for one the previous run applied (the hand-off test lost such a transaction once)."""
    import pgsnow.cdc.drain as drain

    table = handoff_table
    ident = sql.Identifier(table.schema, table.table)
    with change_capture_source(pipeline.source_dsn, [(table.schema, table.table)]) as source:
        env = put_in_cdc_mode(pipeline.stack.env, monkeypatch, table, source)
        settings = pipeline.settings(Component.EXTRACTOR, **env)
        s3 = pipeline.function_s3(Component.EXTRACTOR)
        store = RunStore(pipeline.s3(), pipeline.bucket)
        recorder, dispatcher = pipeline.loader()
        pg_conn = connect(pipeline.source_dsn)
        writer = psycopg2.connect(pipeline.source_dsn)
        real_heartbeat = drain.emit_heartbeat
        try:
            # Given the table's snapshot loaded
            outcome = snapshot_table(settings=settings, pg_conn=pg_conn, s3=s3, table=table)
            assert isinstance(outcome, RunManifest) and outcome.state is RunState.STAGED
            dispatcher.run_until_idle()

            # When a drain reads a change of the table and ends at its heartbeat's commit, and a
            # transaction that wrote before the heartbeat commits right after it (other sessions of
            # the server may write in between: then try again)
            adjacent = 0
            for attempt in range(1, 6):
                with writer.cursor() as cur:
                    cur.execute(
                        sql.SQL("UPDATE {} SET note = %s WHERE id = %s").format(ident),
                        (f"in the run, attempt {attempt}", attempt + 50),
                    )
                    writer.commit()
                    cur.execute(
                        sql.SQL("UPDATE {} SET n = n + 1, note = %s WHERE id IN (%s, %s)").format(ident),
                        (f"right after the run, attempt {attempt}", attempt, attempt + 100),
                    )

                def heartbeat_then_commit(*args: object, **kwargs: object) -> drain.HeartbeatBound:
                    bound = real_heartbeat(*args, **kwargs)  # type: ignore[arg-type]
                    writer.commit()
                    return bound

                monkeypatch.setattr(drain, "emit_heartbeat", heartbeat_then_commit)
                ended = drain.drain_slot(settings, dsn=pipeline.source_dsn, s3=s3)
                monkeypatch.setattr(drain, "emit_heartbeat", real_heartbeat)
                assert ended["confirmed"] and ended["tables"].get(table.qualified) == 1, ended
                drained = drain.drain_slot(settings, dsn=pipeline.source_dsn, s3=s3)
                assert drained["confirmed"] and drained["tables"].get(table.qualified) == 2, drained
                run = store.get_manifest(table, drained["run_id"])
                assert run.changes is not None and run.changes.after_lsn == parse_lsn(ended["end_lsn"])
                adjacent += run.changes.first_commit_lsn == run.changes.after_lsn
                dispatcher.run_until_idle()
                if adjacent:
                    break
        finally:
            writer.close()
            pg_conn.close()
            reset_runtime()

    # Then the transaction was the next run's first, committed exactly at the previous run's end,
    # and it is applied: Snowflake matches PostgreSQL
    assert adjacent, "no attempt committed the transaction right after the run's last commit"
    assert [d for d in recorder.deliveries if d.failed] == []
    verification = pipeline.verify(table)
    assert verification.ok, verification
