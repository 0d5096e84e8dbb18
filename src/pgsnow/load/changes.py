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

The rule is in pure pieces that ``pgsnow status`` shares (``preview_catch_up``: what catch-up
would do now, without doing it): ``ChangeChain`` (which runs catch-up takes up, in order, each
manifest read once), ``decide_change_run`` (what it does with one run) and ``position_after``
(where applying a run leaves the position).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pgsnow.changes import unchanged_columns
from pgsnow.config import DeleteMode, TruncateMode
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import StagedObject, parse_data_key
from pgsnow.ledger import AppliedPosition, Ledger, LedgerClaim, LedgerRecord
from pgsnow.load.copy import Present, check_copy_results, elapsed_ms
from pgsnow.load.objects import head_staged_object
from pgsnow.load.outcomes import ObjectFacts
from pgsnow.load.session import LoadSession
from pgsnow.load.tables import Tables, Target
from pgsnow.load.work_tables import work_table
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.runs import RunStore, VersionedManifest
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
from pgsnow.snowflake.table_sql import CHANGES_WORK_TABLE, build_add_soft_delete_column

CDC_MODE = "cdc"
# The ledger status of a change run's file that held no change after the applied position.
SETTLED_STATUS = "SUPERSEDED"


# Predecessors looked for back from a waiting run (``ChangeChain.ending_at``): a table's previous
# change run is normally the run right before it.
_PREDECESSOR_LOOKBACK = 50


class ChangeRunState(StrEnum):
    APPLIED = "applied"  # applied now, by this call
    SETTLED = "settled"  # nothing after the applied position: files recorded with 0 rows
    SKIPPED = "skipped"  # failed or abandoned: superseded by a later run
    WAITING = "waiting"  # a predecessor or one of its files is missing


class WaitReason(StrEnum):
    """Why catch-up stops at a run (logged as ``change run waits: <reason>``)."""

    NOT_STAGED = "its manifest is not staged yet"
    PREDECESSOR_MISSING = "a preceding change run is missing"
    FILE_MISSING = "a file of the run is not in S3 yet"
    POSITION_REMOVED = "the applied position was removed"


class ChangeRunStep(StrEnum):
    """What catch-up does with one change run (``decide_change_run``)."""

    SKIP = "skip"  # failed: a later run holds its changes
    SETTLE = "settle"  # every change is before the applied position: recorded with 0 rows
    WAIT = "wait"  # stop here (``WaitReason``)
    ABANDON = "abandon"  # a file never arrived and a later run re-drained its changes: mark failed
    APPLY = "apply"


@dataclass(frozen=True)
class ChangeRunDecision:
    step: ChangeRunStep
    wait: WaitReason | None = None
    missing: tuple[str, ...] = ()  # keys of the run's files not in S3 (WAIT on a file, ABANDON)


@dataclass(frozen=True)
class ChangeRunResult:
    run_id: str
    state: ChangeRunState
    rows: dict[str, int]  # per file key, rows COPY loaded (applied runs)
    reason: str | None = None


def is_change_run(manifest: RunManifest | None) -> bool:
    return manifest is not None and manifest.mode == CDC_MODE and manifest.changes is not None


def decide_change_run(
    manifest: RunManifest,
    position: AppliedPosition,
    *,
    missing_files: Callable[[], Sequence[str]],
    replaced: Callable[[AppliedPosition], bool],
) -> ChangeRunDecision:
    """What catch-up does with this change run at ``position`` (the table in docs/loading.md,
    "Catch-up, per table"). ``missing_files``: the run's files not in S3 (asked only when the rest
    of the rule lets the run apply); ``replaced``: is there a later run that applies from the
    position without this one (``ChangeChain.walk`` gives it)."""
    assert manifest.changes is not None
    changes = manifest.changes
    if manifest.state is RunState.FAILED:
        return ChangeRunDecision(ChangeRunStep.SKIP)
    if manifest.state is not RunState.STAGED:
        return ChangeRunDecision(ChangeRunStep.WAIT, WaitReason.NOT_STAGED)
    if changes.end_lsn <= position.lsn:
        return ChangeRunDecision(ChangeRunStep.SETTLE)
    if changes.after_lsn > position.lsn:
        return ChangeRunDecision(ChangeRunStep.WAIT, WaitReason.PREDECESSOR_MISSING)
    missing = tuple(missing_files())
    if missing:
        if replaced(position):
            return ChangeRunDecision(ChangeRunStep.ABANDON, missing=missing)
        return ChangeRunDecision(ChangeRunStep.WAIT, WaitReason.FILE_MISSING, missing)
    return ChangeRunDecision(ChangeRunStep.APPLY)


def position_after(manifest: RunManifest) -> AppliedPosition:
    """The applied position once this change run is applied: its end, set by it."""
    assert manifest.changes is not None
    return AppliedPosition(manifest.changes.end_lsn, manifest.run_id)


@dataclass
class ChangeChain:
    """A table's runs as catch-up goes through them from ``position``: listed once, each manifest
    read from S3 at most once (the look-ahead for a replacing run reads the same later manifests
    the walk reaches next), none that ``known`` holds (the manifests the caller read already, by
    run id, with their version).

    ``from_position``: list only the runs after the position's run (S3's StartAfter), when the
    position is a change run's: change runs are drained one after another, so those up to it are
    behind it, and a table's manifests stay for the metadata retention (the drain may write one a
    minute: listing them all costs a LIST per 1,000). A position the snapshot set lists them all: a
    change run that started before the snapshot's run may hold changes after its LSN."""

    store: RunStore
    table: TableRef
    position: AppliedPosition  # where catch-up stands: moved by the walker as it applies runs
    known: Mapping[str, VersionedManifest] = field(default_factory=dict)
    from_position: bool = False
    run_ids: list[str] = field(init=False)
    _manifests: dict[str, VersionedManifest | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        after = None if not self.from_position or self.position.from_snapshot else self.position.run_id
        self.run_ids = self.store.run_ids(self.table, after=after)
        self._manifests.update(self.known)

    def versioned(self, run_id: str) -> VersionedManifest | None:
        """The run's manifest as read, with the version a conditional rewrite of it needs."""
        if run_id not in self._manifests:
            self._manifests[run_id] = self.store.read_manifest_for_update(self.table, run_id)
        return self._manifests[run_id]

    def manifest(self, run_id: str) -> RunManifest | None:
        found = self.versioned(run_id)
        return None if found is None else found.manifest

    def walk(self) -> Iterator[tuple[RunManifest, Callable[[AppliedPosition], bool]]]:
        """The change runs catch-up takes up, oldest first, each with its ``replaced`` look-ahead
        (``self.position`` is read before each run: applying the runs before it moves it)."""
        for index, run_id in enumerate(self.run_ids):
            current = self.position
            if not current.from_snapshot and run_id <= current.run_id:
                continue  # change runs are drained one after another: older ones are behind it
            if run_id == current.run_id:
                continue  # the snapshot that set the position (a full run)
            manifest = self.manifest(run_id)
            if manifest is None or not is_change_run(manifest) or manifest.state is RunState.LOADED:
                continue
            later = self.run_ids[index + 1 :]

            def replaced(at: AppliedPosition, later: list[str] = later) -> bool:
                return _replaced((self.manifest(later_id) for later_id in later), at)

            yield manifest, replaced

    def ending_at(self, lsn: int, *, before: str) -> RunManifest | None:
        """The newest change run older than run ``before`` whose changes end at ``lsn`` (a waiting
        run's predecessor), looking back at most ``_PREDECESSOR_LOOKBACK`` runs."""
        older = [run_id for run_id in self.run_ids if run_id < before][-_PREDECESSOR_LOOKBACK:]
        for run_id in reversed(older):
            manifest = self.manifest(run_id)
            changes = None if manifest is None or not is_change_run(manifest) else manifest.changes
            if changes is not None and changes.end_lsn == lsn:
                return manifest
        return None


KnownFiles = Mapping[str, tuple[StagedObject, ObjectFacts]]  # by key: files whose HEAD was read


def present_files(
    s3: Any,
    bucket: str,
    prefix: str,
    manifest: RunManifest,
    *,
    known: KnownFiles | None = None,
    every_missing: bool = True,
) -> tuple[Present, list[str]]:
    """The run's files in S3 (with their facts, in the manifest's order) and the keys of those that
    are not (yet).

    A file in ``known`` is not looked up again; the others get one HEAD each, newest batch first.
    Without ``every_missing`` the look-up stops at the first file missing (the loader's catch-up
    needs only to know whether one is): a run's files are uploaded in batch order, so until the
    last one arrives, each earlier file's event costs one HEAD here instead of one per file of the
    run (which made a run of k files, each delivered on its own, cost k*k HEADs).
    """
    known = known or {}
    found: dict[str, tuple[StagedObject, ObjectFacts]] = {}
    missing: list[str] = []
    for staged_file in reversed(manifest.files):
        if staged_file.key in known:
            found[staged_file.key] = known[staged_file.key]
            continue
        staged = parse_data_key(staged_file.key, prefix)
        facts = head_staged_object(s3, bucket, staged)
        if facts is not None:
            found[staged_file.key] = (staged, facts)
            continue
        missing.append(staged_file.key)
        if not every_missing:
            break
    present = [found[f.key] for f in manifest.files if f.key in found]
    return present, missing[::-1]


@dataclass(frozen=True)
class CatchUpPreview:
    """What catch-up would do now, done by nobody (``pgsnow status``).

    ``steps``: each run it would take up, oldest first, with its decision, up to and including the
    run it would wait at (a run it would apply moves the position on, as applying it would);
    ``pending``: every staged change run not yet loaded that it would take up, the ones after the
    wait included; ``chain``: the table's runs, for finding a waiting run's predecessor.
    """

    steps: list[tuple[RunManifest, ChangeRunDecision]]
    pending: list[RunManifest]
    chain: ChangeChain


def preview_catch_up(
    store: RunStore,
    s3: Any,
    prefix: str,
    table: TableRef,
    position: AppliedPosition,
    *,
    max_steps: int,
) -> CatchUpPreview:
    """Catch-up's walk from ``position`` with every decision and no action: the same ``ChangeChain``
    and ``decide_change_run``. Files are looked at (HEAD) for at most ``max_steps`` runs; past them
    the runs are only counted as pending."""
    chain = ChangeChain(store, table, position)
    steps: list[tuple[RunManifest, ChangeRunDecision]] = []
    pending: list[RunManifest] = []
    deciding = True

    def missing_of(manifest: RunManifest) -> Callable[[], list[str]]:
        return lambda: present_files(s3, store.bucket, prefix, manifest)[1]

    for manifest, replaced in chain.walk():
        if manifest.state is RunState.STAGED:
            pending.append(manifest)
        if not deciding:
            continue
        decision = decide_change_run(
            manifest, chain.position, missing_files=missing_of(manifest), replaced=replaced
        )
        steps.append((manifest, decision))
        if decision.step is ChangeRunStep.APPLY:
            chain.position = position_after(manifest)  # as applying it would
        deciding = decision.step is not ChangeRunStep.WAIT and len(steps) < max_steps
    return CatchUpPreview(steps, pending, chain)


@dataclass
class ChangeApplier:
    """Applies one table's change runs on a session. ``complete``: marks a run loaded
    (``completion.complete_run`` bound to the loader's settings, given the manifest as read here
    so it does not read it again), called after each run."""

    session: LoadSession
    tables: Tables
    complete: Callable[[VersionedManifest], object]

    def ledger(self, table: TableRef) -> Ledger:
        return self.tables.ledgers.ensure(self.session.ledger(table))

    def catch_up(
        self,
        table: TableRef,
        *,
        known_manifests: Mapping[str, VersionedManifest] | None = None,
        known_files: Sequence[tuple[StagedObject, ObjectFacts]] = (),
    ) -> list[ChangeRunResult]:
        """Apply (or settle) the table's staged change runs in order from its applied position.

        ``known_manifests`` (per run id) and ``known_files`` are what the caller read from S3
        already (the batch: the delivered files' run manifest and HEADs), so they are not read
        again."""
        ledger = self.ledger(table)
        position = ledger.applied_position()
        if position is None:
            logger.info("change runs wait for the table's snapshot", extra={"table": table.qualified})
            return []
        store = RunStore(self.session.s3, self.session.bucket)
        chain = ChangeChain(store, table, position, known=known_manifests or {}, from_position=True)
        known = {staged.key: (staged, facts) for staged, facts in known_files}
        results: list[ChangeRunResult] = []
        for manifest, replaced in chain.walk():
            found = chain.versioned(manifest.run_id)
            assert found is not None  # the walk read it
            result, chain.position = self._one_run(found, chain.position, replaced=replaced, known=known)
            results.append(result)
            if result.state is ChangeRunState.WAITING:
                break
        return results

    def _one_run(
        self,
        found: VersionedManifest,
        position: AppliedPosition,
        *,
        replaced: Callable[[AppliedPosition], bool],
        known: KnownFiles,
    ) -> tuple[ChangeRunResult, AppliedPosition]:
        manifest = found.manifest
        assert manifest.changes is not None
        table, run_id, changes = manifest.table, manifest.run_id, manifest.changes
        context = {
            "table": table.qualified,
            "run_id": run_id,
            "after_lsn": changes.after_lsn,
            "end_lsn": changes.end_lsn,
            "applied_lsn": position.lsn,
        }
        present: Present = []
        s3, bucket, prefix = self.session.s3, self.session.bucket, self.session.settings.prefix

        def missing_files() -> list[str]:
            # Whether a file is missing is all the rule needs (the look-up stops at the first).
            found_files, missing = present_files(
                s3, bucket, prefix, manifest, known=known, every_missing=False
            )
            present.extend(found_files)
            return missing

        decision = decide_change_run(manifest, position, missing_files=missing_files, replaced=replaced)
        if decision.step is ChangeRunStep.SKIP:
            logger.info("change run failed: skipped (a later run holds its changes)", extra=context)
            return ChangeRunResult(run_id, ChangeRunState.SKIPPED, {}), position
        if decision.step is ChangeRunStep.SETTLE:
            self._settle(manifest)
            self.complete(found)
            return ChangeRunResult(run_id, ChangeRunState.SETTLED, {}), position
        if decision.step is ChangeRunStep.ABANDON:
            # Every missing file, for the log and the run's error (the files found are not looked
            # up again).
            seen = {**known, **{staged.key: (staged, facts) for staged, facts in present}}
            _, missing = present_files(s3, bucket, prefix, manifest, known=seen)
            logger.warning(
                "change run abandoned (a file never arrived and a later run re-drained its changes): "
                "marked failed",
                extra={**context, "missing": missing[:5]},
            )
            self._mark_failed(found, f"abandoned: {len(missing)} file(s) never arrived")
            return ChangeRunResult(run_id, ChangeRunState.SKIPPED, {}, "abandoned"), position
        if decision.step is ChangeRunStep.WAIT:
            assert decision.wait is not None
            return self._waiting(run_id, decision.wait, context), position
        applied = apply_change_run(self.session, self.tables, manifest, present, position)
        if applied is None:  # another loader moved the position first: read it again
            current = self.ledger(table).applied_position()
            if current is None:
                return self._waiting(run_id, WaitReason.POSITION_REMOVED, context), position
            return self._one_run(found, current, replaced=replaced, known=known)
        new_position, rows = applied
        self.complete(found)
        return ChangeRunResult(run_id, ChangeRunState.APPLIED, rows), new_position

    def _waiting(self, run_id: str, reason: WaitReason, context: dict[str, object]) -> ChangeRunResult:
        logger.warning(f"change run waits: {reason.value}", extra=context)
        return ChangeRunResult(run_id, ChangeRunState.WAITING, {}, reason.value)

    def _mark_failed(self, found: VersionedManifest, error: str) -> None:
        """A run a later run superseded: ``failed`` (its files stay for the sweeper), written only
        if the manifest did not change since it was read (a lost write is only a later retry)."""
        store = RunStore(self.session.s3, self.session.bucket)
        store.write_manifest_if_unchanged(found, found.manifest.with_state(RunState.FAILED, error=error))

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
    try:
        with work_table(session, CHANGES_WORK_TABLE, work_columns) as work, session.transaction():
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
    new = position_after(manifest)
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
