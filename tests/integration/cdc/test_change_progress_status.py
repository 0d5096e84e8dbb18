"""``pgsnow status``'s change-capture progress of a table, against the local stack: the real
snapshot (``snapshot_table``), the real drain (``drain_slot``) staging change runs from the local
PostgreSQL's slot, the real loader through the queue applying them in the local Snowflake, and the
status core function and CLI (text and ``--json``) reading the ledger's applied position and the
runs in the bucket.

A waiting run is produced as it happens in production: a later change run is staged whose
predecessor (the run ending at its ``after_lsn``) is failed, or whose manifest is gone, and the
loader's catch-up stops at it; a run the loader keeps failing on has its files dead-lettered.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cdc_support import change_capture_source, put_in_cdc_mode
from pipeline_support import PipelineHarness, RecordingLoader
from psycopg2 import sql
from stack_support import corrupt

from pgsnow.cdc.drain import drain_slot
from pgsnow.cdc.enroll import snapshot_table
from pgsnow.cdc.slot import resnapshot_command
from pgsnow.changes import format_lsn
from pgsnow.cli import main
from pgsnow.config import Component
from pgsnow.identifiers import TableRef
from pgsnow.keys import manifest_key
from pgsnow.load.changes import WaitReason
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import process_environment
from pgsnow.manifest import RunManifest, RunState
from pgsnow.postgres import connect
from pgsnow.runs import RunStore
from pgsnow.runtime import reset_runtime
from pgsnow.status import DEAD_LETTERED, SNAPSHOT_NOT_LOADED, ChangeProgress, collect_status

pytestmark = pytest.mark.integration


@dataclass
class ChangeCapturedTable:
    """One table in mode cdc on the shared stack: its slot, drain, loader and status."""

    pipeline: PipelineHarness
    table: TableRef
    env: dict[str, str]
    recorder: RecordingLoader
    dispatcher: SqsDispatcher

    @property
    def store(self) -> RunStore:
        return RunStore(self.pipeline.s3(), self.pipeline.bucket)

    def write(self, statement: str) -> None:
        """One transaction on the source table (``{}`` is the table)."""
        self.pipeline.run_sql(sql.SQL(statement).format(sql.Identifier(self.table.schema, self.table.table)))

    def snapshot(self) -> RunManifest:
        settings = self.pipeline.settings(Component.EXTRACTOR, **self.env)
        pg_conn = connect(self.pipeline.source_dsn)
        try:
            staged = snapshot_table(
                settings=settings,
                pg_conn=pg_conn,
                s3=self.pipeline.function_s3(Component.EXTRACTOR),
                table=self.table,
            )
        finally:
            pg_conn.close()
        assert isinstance(staged, RunManifest) and staged.state is RunState.STAGED
        return staged

    def drain(self) -> RunManifest:
        """One drain run; the change run it staged for the table."""
        outcome = drain_slot(
            self.pipeline.settings(Component.EXTRACTOR, **self.env),
            dsn=self.pipeline.source_dsn,
            s3=self.pipeline.function_s3(Component.EXTRACTOR),
        )
        assert outcome["confirmed"] and outcome["tables"].get(self.table.qualified), outcome
        return self.store.get_manifest(self.table, outcome["run_id"])

    def deliver(self) -> None:
        self.dispatcher.run_until_idle()

    def progress(self) -> ChangeProgress:
        """The status core function's progress of the table."""
        report = collect_status(
            settings=self.pipeline.settings(Component.LOCAL, **self.env),
            s3=self.pipeline.s3(),
            sqs=self.pipeline.sqs(),
            sf_conn=self.pipeline.sf_conn,
            table=self.table,
        )
        [status] = report.tables
        assert status.changes is not None
        return status.changes

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        """A ``pgsnow`` command as an operator runs it, with the functions' environment: its exit
        code, standard output and error."""
        capsys.readouterr()  # drop the log lines of earlier steps
        with process_environment({**self.pipeline.stack.env, **self.env}):
            code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        """``pgsnow status <table> [args]``."""
        code, out, _ = self.run(capsys, "status", self.table.qualified, *args)
        assert code == 0
        return out

    def resnapshot(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        """``pgsnow cdc resnapshot --slot <slot> --tables <table> [args]``."""
        slot = self.env["CDC_SLOT"]
        return self.run(capsys, "cdc", "resnapshot", "--slot", slot, "--tables", self.table.qualified, *args)

    def cli_json(self, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
        [table] = json.loads(self.cli(capsys, "--json"))["tables"]
        changes: dict[str, Any] = table["changes"]
        return changes


@pytest.fixture
def captured(pipeline: PipelineHarness, monkeypatch: pytest.MonkeyPatch) -> Iterator[ChangeCapturedTable]:
    table = pipeline.table(f"progress_{unique_suffix()}")
    pipeline.create_table(
        table, "id integer PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 5) g"
    )
    with change_capture_source(pipeline.source_dsn, [(table.schema, table.table)]) as source:
        # The loader handler reads the process's environment.
        env = put_in_cdc_mode(
            os.environ, monkeypatch, table, source, LOADER_DLQ_URL=pipeline.stack.resources.dlq_url
        )
        recorder, dispatcher = pipeline.loader()
        try:
            yield ChangeCapturedTable(pipeline, table, env, recorder, dispatcher)
        finally:
            pipeline.drain_queues()
            reset_runtime()


def unique_suffix() -> str:
    return uuid.uuid4().hex[:8]


def test_status_follows_the_changes_from_the_snapshot_to_a_run_waiting_for_its_failed_predecessor(
    captured: ChangeCapturedTable, capsys: pytest.CaptureFixture[str]
) -> None:
    table = captured.table
    # Given the table's snapshot staged, not loaded, and a change drained meanwhile
    snapshot = captured.snapshot()
    captured.write("UPDATE {} SET v = 'first' WHERE id = 1")
    first = captured.drain()
    # Then the change run waits for the snapshot, which status names
    before = captured.progress()
    assert (before.state, before.applied_lsn, before.runs_pending) == ("WAITING", None, 1)
    assert before.waiting is not None
    assert (before.waiting.run_id, before.waiting.reason) == (first.run_id, SNAPSHOT_NOT_LOADED)
    assert (before.waiting.waits_for, before.waiting.waits_for_state) == (snapshot.run_id, "staged")

    # When the loader takes the queue: the snapshot is loaded and the change run applied after it
    captured.deliver()
    # Then the table is caught up, applied through the change run's end
    assert first.changes is not None
    caught_up = captured.progress()
    assert (caught_up.state, caught_up.runs_pending, caught_up.waiting) == ("CAUGHT UP", 0, None)
    assert (caught_up.applied_lsn, caught_up.applied_run_id) == (
        format_lsn(first.changes.end_lsn),
        first.run_id,
    )
    assert not caught_up.applied_by_snapshot

    # And a re-snapshot of the table is refused: its change runs have no gap
    code, _, err = captured.resnapshot(capsys)
    assert code == 2 and "is healthy" in err and f"the change runs of {table.qualified} have no gap" in err

    # When a second change is drained and not delivered yet
    captured.write("UPDATE {} SET v = 'second' WHERE id = 2")
    second = captured.drain()
    # Then it is staged, not applied: the loader applies it when its event comes
    applying = captured.progress()
    assert (applying.state, applying.runs_pending, applying.waiting) == ("APPLYING", 1, None)
    assert (applying.oldest_pending_run_id, applying.oldest_pending_after_lsn) == (
        second.run_id,
        format_lsn(first.changes.end_lsn),
    )

    # When that run fails (its manifest says so) and a third change run, chained after it, is delivered
    base = captured.store.read_manifest_for_update(table, second.run_id)
    assert base is not None
    assert captured.store.write_manifest_if_unchanged(
        base, base.manifest.with_state(RunState.FAILED, error="a test failed it")
    )
    captured.write("UPDATE {} SET v = 'third' WHERE id = 3")
    third = captured.drain()
    captured.deliver()
    assert second.changes is not None and third.changes is not None
    assert third.changes.after_lsn == second.changes.end_lsn

    # Then the loader applied nothing more: the third run waits for the failed second, and status
    # (core, text and JSON) names both, the positions, and the command that re-snapshots the table
    assert [d for d in captured.recorder.deliveries if d.failed] == []
    waiting = captured.progress()
    assert (waiting.state, waiting.applied_run_id, waiting.runs_pending) == ("WAITING", first.run_id, 1)
    assert (waiting.oldest_pending_run_id, waiting.oldest_pending_after_lsn) == (
        third.run_id,
        format_lsn(second.changes.end_lsn),
    )
    assert waiting.waiting is not None
    assert (waiting.waiting.run_id, waiting.waiting.reason) == (
        third.run_id,
        WaitReason.PREDECESSOR_MISSING.value,
    )
    assert (waiting.waiting.waits_for, waiting.waiting.waits_for_state) == (second.run_id, "failed")
    command = resnapshot_command(captured.env["CDC_SLOT"], [table])
    assert "a test failed it" in waiting.waiting.action and command in waiting.waiting.action

    text = captured.cli(capsys)
    assert f"changes {table.qualified}: WAITING" in text
    assert f"  applied through       {format_lsn(first.changes.end_lsn)} (change run {first.run_id})" in text
    assert (
        f"  staged, not applied   1 run(s), oldest {third.run_id} after {format_lsn(second.changes.end_lsn)}"
        in text
    )
    assert f"  waiting run           {third.run_id} (after {format_lsn(second.changes.end_lsn)}," in text
    assert f"  why                   {WaitReason.PREDECESSOR_MISSING.value}" in text
    assert f"  waits for             run {second.run_id} (failed)" in text
    assert command in text

    as_json = captured.cli_json(capsys)
    assert as_json["state"] == "WAITING"
    assert (as_json["applied_lsn"], as_json["applied_run_id"]) == (
        format_lsn(first.changes.end_lsn),
        first.run_id,
    )
    assert (as_json["runs_pending"], as_json["oldest_pending_run_id"]) == (1, third.run_id)
    assert as_json["oldest_pending_after_lsn"] == format_lsn(second.changes.end_lsn)
    assert as_json["waiting"]["run_id"] == third.run_id
    assert as_json["waiting"]["after_lsn"] == format_lsn(second.changes.end_lsn)
    assert as_json["waiting"]["end_lsn"] == format_lsn(third.changes.end_lsn)
    assert as_json["waiting"]["reason"] == WaitReason.PREDECESSOR_MISSING.value
    assert (as_json["waiting"]["waits_for"], as_json["waiting"]["waits_for_state"]) == (
        second.run_id,
        "failed",
    )
    assert command in as_json["waiting"]["action"]

    # When the operator does what status says: the plan, then --execute, then the table's snapshot
    code, plan, _ = captured.resnapshot(capsys)
    assert code == 0
    assert f"{table.qualified}: run {third.run_id} waits for the change run ending at" in plan
    assert f"1. {table.qualified}: forget its enrollment" in plan
    assert f"2. {table.qualified}: start its snapshot" in plan
    assert "create the slot" not in plan  # the slot is healthy: left as it is
    code, done, _ = captured.resnapshot(capsys, "--execute")
    assert code == 0 and f"{table.qualified}: start its snapshot: pgsnow extract {table.qualified}" in done
    captured.write("UPDATE {} SET v = 'after the gap' WHERE id = 4")
    resnapshot = captured.snapshot()
    captured.deliver()
    # Then the table is caught up from its new snapshot, and Snowflake matches PostgreSQL again
    healed = captured.progress()
    assert (healed.state, healed.runs_pending, healed.waiting) == ("CAUGHT UP", 0, None)
    assert (healed.applied_run_id, healed.applied_by_snapshot) == (resnapshot.run_id, True)
    assert captured.pipeline.verify(table).ok


def test_a_run_whose_predecessors_manifest_is_gone_waits_for_a_run_no_manifest_names(
    captured: ChangeCapturedTable, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the table's snapshot loaded
    captured.snapshot()
    captured.deliver()
    # When a change run's manifest is deleted before the loader reached it, and the next run is delivered
    captured.write("UPDATE {} SET v = 'gone' WHERE id = 1")
    gone = captured.drain()
    captured.pipeline.s3().delete_object(
        Bucket=captured.pipeline.bucket, Key=manifest_key(captured.table, gone.run_id)
    )
    captured.write("UPDATE {} SET v = 'after' WHERE id = 2")
    after = captured.drain()
    captured.deliver()
    # Then the later run waits for a run ending at its after_lsn, and none is found
    assert gone.changes is not None and after.changes is not None
    progress = captured.progress()
    assert progress.state == "WAITING" and progress.applied_by_snapshot
    assert progress.waiting is not None
    assert (progress.waiting.run_id, progress.waiting.reason) == (
        after.run_id,
        WaitReason.PREDECESSOR_MISSING.value,
    )
    assert (progress.waiting.waits_for, progress.waiting.waits_for_state) == (None, "missing")
    assert progress.waiting.after_lsn == format_lsn(gone.changes.end_lsn)
    assert "no change run of the table ending at" in progress.waiting.action
    text = captured.cli(capsys)
    assert f"  waits for             a run ending at {format_lsn(gone.changes.end_lsn)}: none found" in text
    assert captured.cli_json(capsys)["waiting"]["waits_for_state"] == "missing"


def test_a_run_the_loader_keeps_failing_on_holds_back_the_runs_after_it(
    captured: ChangeCapturedTable, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the table's snapshot loaded
    captured.snapshot()
    captured.deliver()
    # When a change run's file cannot be loaded (its bytes replaced), so its messages end in the
    # dead-letter queue, and a later run is delivered too
    captured.write("UPDATE {} SET v = 'broken' WHERE id = 1")
    broken = captured.drain()
    corrupt(captured.pipeline.s3(), captured.pipeline.bucket, broken.files[0].key)
    captured.write("UPDATE {} SET v = 'held back' WHERE id = 2")
    held = captured.drain()
    captured.deliver()
    # Then status shows the failing run as the one everything waits at, from the dead-letter queue
    assert broken.files[0].key in captured.pipeline.dead_letter_keys()
    progress = captured.progress()
    assert (progress.state, progress.runs_pending, progress.oldest_pending_run_id) == (
        "WAITING",
        2,
        broken.run_id,
    )
    assert progress.waiting is not None
    assert progress.waiting.run_id == broken.run_id
    dead = sorted({broken.files[0].key, held.files[0].key} & set(captured.pipeline.dead_letter_keys()))
    assert progress.waiting.reason.startswith(DEAD_LETTERED) and dead[0] in progress.waiting.reason
    assert f'filter s3_key = "{dead[0]}"' in progress.waiting.action
    as_json = captured.cli_json(capsys)
    assert (as_json["state"], as_json["waiting"]["run_id"]) == ("WAITING", broken.run_id)


def test_a_run_with_a_file_not_in_s3_waits_for_it_and_names_the_key(
    captured: ChangeCapturedTable, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the table's snapshot loaded
    captured.snapshot()
    captured.deliver()
    # When a change run's file is gone from S3 before the loader reached it
    captured.write("UPDATE {} SET v = 'lost file' WHERE id = 1")
    run = captured.drain()
    key = run.files[0].key
    captured.pipeline.s3().delete_object(Bucket=captured.pipeline.bucket, Key=key)
    captured.deliver()
    # Then the run waits for its own file, which status names (no other run to wait for)
    progress = captured.progress()
    assert (progress.state, progress.oldest_pending_run_id) == ("WAITING", run.run_id)
    assert progress.waiting is not None
    assert (progress.waiting.run_id, progress.waiting.reason) == (run.run_id, WaitReason.FILE_MISSING.value)
    assert (progress.waiting.waits_for, progress.waiting.missing_files) == (None, [key])
    text = captured.cli(capsys)
    assert f"  not in S3             {key}" in text
    assert captured.cli_json(capsys)["waiting"]["missing_files"] == [key]
