"""Applying a change-capture table's change runs (pgsnow.changes) exactly once, in order.

``catch_up`` is what any event of a table's change file (and the completion of the table's
snapshot) runs: it reads the table's applied position (``pgsnow.ledger``) and goes through the
table's change runs oldest first. A run whose changes are all at or before the position is
settled (its files recorded with 0 rows, so the run completes and cleanup removes them); a run
whose ``after_lsn`` is past the position waits for its predecessor (logged); a run with a file
not in S3 yet waits for that file's own event, unless a later run starts at or before the position
(then a drain died before finishing it and re-drained its changes: it is marked failed and
skipped); any other run is
applied by ``apply_change_run`` in ONE Snowflake transaction: claim its files in the ledger,
COPY them into a work table, apply its last TRUNCATE, fill moved rows' unchanged values, MERGE
the newest change per key, move the applied position (compare-and-set), record the files,
COMMIT. A table without a position (its snapshot is not loaded yet) is left alone: the
snapshot's completion starts it. docs/loading.md, "Applying changes (mode cdc)".
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from pgsnow.changes import unchanged_columns
from pgsnow.config import DeleteMode, TruncateMode
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import StagedObject, parse_data_key
from pgsnow.ledger import AppliedPosition, Ledger, LedgerClaim, LedgerRecord
from pgsnow.load.copy import Present, check_copy_results, elapsed_ms
from pgsnow.load.objects import head_staged_object
from pgsnow.load.session import LoadSession
from pgsnow.load.tables import Tables, Target
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.runs import RunStore
from pgsnow.snowflake.change_sql import (
    FOUND_MOVED,
    FOUND_TRUNCATE,
    FOUND_UNCHANGED,
    ChangeMerge,
    ChangeScope,
    build_apply_truncate,
    build_fill_moved_rows,
    build_inspect_changes,
    build_merge_changes,
    change_work_columns,
)
from pgsnow.snowflake.load_sql import LoadColumn, build_copy_into
from pgsnow.snowflake.table_sql import build_add_soft_delete_column, build_create_work_table, build_drop_table

CDC_MODE = "cdc"
# The ledger status of a change run's file that held no change after the applied position.
SETTLED_STATUS = "SUPERSEDED"


class ChangeRunState(StrEnum):
    APPLIED = "applied"  # applied now, by this call
    SETTLED = "settled"  # nothing after the applied position: files recorded with 0 rows
    SKIPPED = "skipped"  # failed or abandoned: superseded by a later run
    WAITING = "waiting"  # a predecessor or one of its files is missing


@dataclass(frozen=True)
class ChangeRunResult:
    run_id: str
    state: ChangeRunState
    rows: dict[str, int]  # per file key, rows COPY loaded (applied runs)
    reason: str | None = None


def is_change_run(manifest: RunManifest | None) -> bool:
    return manifest is not None and manifest.mode == CDC_MODE and manifest.changes is not None


@dataclass
class ChangeApplier:
    """Applies one table's change runs on a session. ``complete``: marks a run loaded
    (``completion.complete_run`` bound to the loader's settings), called after each run."""

    session: LoadSession
    tables: Tables
    complete: Callable[[TableRef, str], object]

    def ledger(self, table: TableRef) -> Ledger:
        return self.tables.ledgers.ensure(self.session.ledger(table))

    def catch_up(self, table: TableRef) -> list[ChangeRunResult]:
        """Apply (or settle) the table's staged change runs in order from its applied position."""
        ledger = self.ledger(table)
        position = ledger.applied_position()
        if position is None:
            logger.info("change runs wait for the table's snapshot", extra={"table": table.qualified})
            return []
        store = RunStore(self.session.s3, self.session.bucket)
        run_ids = store.run_ids(table)
        # Each manifest is read from S3 once per catch-up: the look-ahead for a replacing run
        # (``_replaced``) reads the same later manifests the loop reaches next.
        manifests: dict[str, RunManifest | None] = {}

        def manifest_of(run_id: str) -> RunManifest | None:
            if run_id not in manifests:
                found = store.read_manifest_for_update(table, run_id)
                manifests[run_id] = None if found is None else found.manifest
            return manifests[run_id]

        results: list[ChangeRunResult] = []
        for index, run_id in enumerate(run_ids):
            if not position.from_snapshot and run_id <= position.run_id:
                continue  # change runs are drained one after another: older ones are behind it
            manifest = manifest_of(run_id)
            if manifest is None or not is_change_run(manifest) or manifest.state is RunState.LOADED:
                continue
            later = run_ids[index + 1 :]

            def replaced(at: AppliedPosition, later: list[str] = later) -> bool:
                return _replaced((manifest_of(later_id) for later_id in later), at)

            result, position = self._one_run(manifest, position, replaced=replaced)
            results.append(result)
            if result.state is ChangeRunState.WAITING:
                break
        return results

    def _one_run(
        self, manifest: RunManifest, position: AppliedPosition, *, replaced: Callable[[AppliedPosition], bool]
    ) -> tuple[ChangeRunResult, AppliedPosition]:
        assert manifest.changes is not None
        table, run_id, changes = manifest.table, manifest.run_id, manifest.changes
        context = {
            "table": table.qualified,
            "run_id": run_id,
            "after_lsn": changes.after_lsn,
            "end_lsn": changes.end_lsn,
            "applied_lsn": position.lsn,
        }
        if manifest.state is RunState.FAILED:
            logger.info("change run failed: skipped (a later run holds its changes)", extra=context)
            return ChangeRunResult(run_id, ChangeRunState.SKIPPED, {}), position
        if manifest.state is not RunState.STAGED:
            return self._waiting(run_id, "its manifest is not staged yet", context), position
        if changes.end_lsn <= position.lsn:
            self._settle(manifest)
            self.complete(table, run_id)
            return ChangeRunResult(run_id, ChangeRunState.SETTLED, {}), position
        if changes.after_lsn > position.lsn:
            return self._waiting(run_id, "a preceding change run is missing", context), position
        present, missing = self._present_files(manifest)
        if missing:
            if replaced(position):
                logger.warning(
                    "change run abandoned (a file never arrived and a later run re-drained its changes): "
                    "marked failed",
                    extra={**context, "missing": missing[:5]},
                )
                self._mark_failed(manifest, f"abandoned: {len(missing)} file(s) never arrived")
                return ChangeRunResult(run_id, ChangeRunState.SKIPPED, {}, "abandoned"), position
            return self._waiting(run_id, "a file of the run is not in S3 yet", context), position
        applied = apply_change_run(self.session, self.tables, manifest, present, position)
        if applied is None:  # another loader moved the position first: read it again
            current = self.ledger(table).applied_position()
            if current is None:
                return self._waiting(run_id, "the applied position was removed", context), position
            return self._one_run(manifest, current, replaced=replaced)
        new_position, rows = applied
        self.complete(table, run_id)
        return ChangeRunResult(run_id, ChangeRunState.APPLIED, rows), new_position

    def _waiting(self, run_id: str, reason: str, context: dict[str, object]) -> ChangeRunResult:
        logger.warning(f"change run waits: {reason}", extra=context)
        return ChangeRunResult(run_id, ChangeRunState.WAITING, {}, reason)

    def _mark_failed(self, manifest: RunManifest, error: str) -> None:
        """A run a later run superseded: ``failed`` (its files stay for the sweeper), written only
        if the manifest did not change meanwhile (a lost write is only a later retry)."""
        store = RunStore(self.session.s3, self.session.bucket)
        base = store.read_manifest_for_update(manifest.table, manifest.run_id)
        if base is not None and base.manifest.state is RunState.STAGED:
            store.write_manifest_if_unchanged(base, base.manifest.with_state(RunState.FAILED, error=error))

    def _present_files(self, manifest: RunManifest) -> tuple[Present, list[str]]:
        present: Present = []
        missing: list[str] = []
        for staged_file in manifest.files:
            staged = parse_data_key(staged_file.key, self.session.settings.prefix)
            facts = head_staged_object(self.session.s3, self.session.bucket, staged)
            if facts is None:
                missing.append(staged_file.key)
            else:
                present.append((staged, facts))
        return present, missing

    def _settle(self, manifest: RunManifest) -> None:
        """Record every file of a run with nothing to apply as loaded with 0 rows."""
        table = manifest.table
        if not manifest.files:
            return
        ledger = self.ledger(table)
        with self.session.transaction():
            ledger.claim(
                [
                    LedgerClaim(f.key, None, f.sha256, manifest.run_id, table.schema, table.table)
                    for f in manifest.files
                ]
            )
            # A file another loader recorded (it applied the run) keeps its record.
            loaded = ledger.loaded_rows([f.key for f in manifest.files])
            settled = [
                LedgerRecord(f.key, 0, status=SETTLED_STATUS) for f in manifest.files if f.key not in loaded
            ]
            if settled:
                ledger.record_loads(settled)
        logger.info(
            "change run settled: its changes were applied already",
            extra={"table": table.qualified, "run_id": manifest.run_id},
        )


def _replaced(later: Iterable[RunManifest | None], position: AppliedPosition) -> bool:
    """Is there a later change run that applies from ``position`` without the one before it?
    (A drain that died before its state was written re-drains the same changes into a new run
    from the same ``after_lsn``.)"""
    return any(
        manifest is not None
        and manifest.changes is not None
        and is_change_run(manifest)
        and manifest.state is not RunState.FAILED
        and manifest.changes.after_lsn <= position.lsn
        for manifest in later
    )


def delete_mode(manifest: RunManifest, configured: DeleteMode) -> DeleteMode:
    """The run's deletes as its manifest says, else the table's option; a change table always
    applies deletes (hard unless soft)."""
    for value in (manifest.deletes, configured.value):
        if value in (DeleteMode.HARD.value, DeleteMode.SOFT.value):
            return DeleteMode(value)
    return DeleteMode.HARD


def apply_change_run(
    session: LoadSession,
    tables: Tables,
    manifest: RunManifest,
    present: Present,
    position: AppliedPosition,
) -> tuple[AppliedPosition, dict[str, int]] | None:
    """Apply one change run in ONE transaction; the new position and the rows per file, or None
    when another loader moved the position first (then nothing was applied here)."""
    assert manifest.changes is not None
    table = manifest.table
    target = tables.target(table)
    options = session.settings.table_options(table)
    soft = delete_mode(manifest, options.deletes) is DeleteMode.SOFT
    # DDL commits in Snowflake: the target's columns, the soft-delete column and the work table
    # exist before the transaction begins.
    tables.prepare(session.sf_conn, table, manifest.columns, target)
    if soft:
        session.execute(build_add_soft_delete_column(target))
    work_columns = change_work_columns(manifest.columns)
    work: Target = (
        session.database,
        session.control_schema,
        f"_PGSNOW_CHANGES_{uuid.uuid4().hex[:16].upper()}",
    )
    session.execute(build_create_work_table(work, work_columns))
    try:
        with session.transaction():
            return _apply_in_transaction(
                session,
                manifest,
                present,
                position,
                target=target,
                work=work,
                soft=soft,
                refuse_truncate=options.truncate is TruncateMode.REFUSE,
                columns=[LoadColumn.from_manifest(c) for c in work_columns],
            )
    except _LostRace:
        logger.info(
            "another loader applied the change run first: rolled back",
            extra={"table": table.qualified, "run_id": manifest.run_id},
        )
        return None
    finally:
        session.execute(build_drop_table(work))


def _apply_in_transaction(
    session: LoadSession,
    manifest: RunManifest,
    present: Present,
    position: AppliedPosition,
    *,
    target: Target,
    work: Target,
    soft: bool,
    refuse_truncate: bool,
    columns: list[LoadColumn],
) -> tuple[AppliedPosition, dict[str, int]] | None:
    assert manifest.changes is not None
    table, started = manifest.table, time.monotonic()
    ledger = session.ledger(table)
    # The claim writes the table's ledger and holds its lock until COMMIT, so the position read
    # after it is the committed one, and a concurrent apply of the table waits here.
    ledger.claim(
        [
            LedgerClaim(staged.key, facts.etag, facts.sha256, manifest.run_id, table.schema, table.table)
            for staged, facts in present
        ]
    )
    current = ledger.applied_position()
    if current != position:
        return None
    copy_rows = session.execute_dicts(
        build_copy_into(
            database=session.database,
            control_schema=session.control_schema,
            stage=session.settings.snowflake.stage,
            staged=[staged for staged, _ in present],
            columns=columns,
            target=work,
        )
    )
    checked = check_copy_results(copy_rows, present)
    failed = [c.error for c in checked if c.error is not None]
    if failed:
        raise failed[0]
    scope, unchanged, moved = _inspect(session, work, position.lsn)
    if scope.truncate_at is not None:
        if refuse_truncate:
            lsn, _ = scope.truncate_at
            raise PermanentError(
                f"TRUNCATE of {table.qualified} committed at LSN {lsn} and the table's option is "
                "truncate: refuse; nothing was applied. Re-snapshot the table (pgsnow cdc resnapshot) "
                "or set truncate: apply",
                table=table.qualified,
                run_id=manifest.run_id,
            )
        session.execute(*build_apply_truncate(target, work, scope, soft=soft))
    merge = ChangeMerge(
        target=target,
        work=work,
        columns=manifest.columns,
        primary_key=manifest.primary_key,
        scope=scope,
        soft=soft,
        unchanged_lists=unchanged,
    )
    filled = 0
    while merge.filled and filled < moved:
        # One pass per move of the longest chain of moves of one row in the run (usually one).
        count = session.execute_count(*build_fill_moved_rows(merge))
        if count == 0:
            break
        filled += count
    session.execute(*build_merge_changes(merge))
    new = AppliedPosition(manifest.changes.end_lsn, manifest.run_id)
    if not ledger.advance(position, new):
        raise _LostRace()
    rows = {staged.key: c.rows_loaded for (staged, _), c in zip(present, checked, strict=True)}
    ledger.record_loads([LedgerRecord(key, count) for key, count in rows.items()])
    logger.info(
        "change run applied",
        extra={
            "table": table.qualified,
            "run_id": manifest.run_id,
            "end_lsn": new.lsn,
            "rows": sum(rows.values()),
            "duration_ms": elapsed_ms(started),
        },
    )
    return new, rows


class _LostRace(PermanentError):
    """The compare-and-set lost: the transaction rolls back (another loader applied the run)."""

    def __init__(self) -> None:
        super().__init__("another loader moved the applied position during the apply")


def _inspect(
    session: LoadSession, work: Target, applied_lsn: int
) -> tuple[ChangeScope, dict[str, tuple[str, ...]], int]:
    truncate_at: tuple[int, int] | None = None
    lists: dict[str, list[str]] = {}
    moved = 0
    for found, lsn, seq, text in session.execute(*build_inspect_changes(work, applied_lsn)):
        if found == FOUND_TRUNCATE:
            truncate_at = (int(lsn), int(seq))
        elif found == FOUND_UNCHANGED and text is not None:
            for name in unchanged_columns(str(text)):
                lists.setdefault(name, []).append(str(text))
        elif found == FOUND_MOVED:
            moved = int(lsn or 0)
    return ChangeScope(applied_lsn, truncate_at), {k: tuple(v) for k, v in lists.items()}, moved


def staged_objects(manifest: RunManifest, prefix: str) -> list[StagedObject]:
    return [parse_data_key(f.key, prefix) for f in manifest.files]
