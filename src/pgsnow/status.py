"""``pgsnow status``: where each table's replication stands, from the manifests, the ledger and the DLQ.

Per table: the last run, its state, its files staged / loaded / failed, rows staged and
loaded, the watermark Snowflake has reached, and the lag (how old the newest fully loaded
run's data is). The state shown is the manifest's, except that a ``staged`` run with a
file in the dead-letter queue shows ``failed`` (it will not finish on its own) and one whose
files are all in the ledger shows ``loaded`` even before cleanup has rewritten its manifest.
The dead-letter queue is read without consuming it (messages received with visibility 0).

A table in ``mode: cdc`` also shows its change-capture progress (``ChangeProgress``): the position
its changes are applied through (its ledger, ``read_applied_position``), the change runs staged and
not applied yet, and the run the loader cannot apply now, with what it waits for and what to do.
It is the loader's own catch-up rule run without acting (``pgsnow.load.changes.preview_catch_up``),
so status says what the loader would do, and why, without its logs: a run whose predecessor (the
run ending at its ``after_lsn``) is failed or gone, a run with a file not in S3, change runs waiting
for the table's snapshot, and (status adds this from the dead-letter queue) a run the loader keeps
failing on, which every later run waits behind.

When a table has ``mode: cdc``, the report also has the change-capture slot (``CDC_SLOT``): the
WAL it retains, the position confirmed to it, how long ago that was and how far behind the
staged changes are (from the drain's state object, ``_pgsnow/cdc/{slot}/state.json``, read through
its owner ``RunStore.load_drain_state``), whether a
drain holds it now, and its ``wal_status``. A lost slot shows ``LOST`` and the command that
re-snapshots its tables (docs/change-capture.md, "Operations").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from itertools import islice
from typing import Any
from urllib.parse import unquote_plus

from pgsnow.cdc.drain import heartbeat_lag_s
from pgsnow.cdc.slot import SlotHealth, resnapshot_command, slot_health
from pgsnow.changes import format_lsn
from pgsnow.config import ExtractMode, Settings
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import run_started_at, table_prefix
from pgsnow.ledger import AppliedPosition, ledger_rows, loaded_files, read_applied_position
from pgsnow.load.changes import (
    ChangeChain,
    ChangeRunDecision,
    ChangeRunStep,
    WaitReason,
    is_change_run,
    preview_catch_up,
)
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.postgres_setup import cdc_tables
from pgsnow.runs import DrainState, RunStore

_DLQ_PEEK_LIMIT = 200  # messages: enough to name what is stuck without draining a flooded queue
_LOADED_RUN_LOOKBACK = 50  # runs read back from the newest to find the last fully loaded one
# Change runs whose files status looks at (one HEAD each) ahead of the loader: a backlog longer
# than this is counted, and the run that would wait past it is found by the loader, not by status.
_PREVIEW_RUNS = 50
_MISSING_KEYS_SHOWN = 5
# The reason shown for the run the loader applies next when it keeps failing on the table's change
# runs (files of them are in the dead-letter queue): status's own addition to the loader's rule.
DEAD_LETTERED = (
    "the loader fails to apply the table's change runs from here: file(s) in the dead-letter queue"
)
SNAPSHOT_NOT_LOADED = "the table's snapshot is not loaded yet"
CHANGES_DOC = 'docs/change-capture.md, "A change run that waits"'


@dataclass(frozen=True)
class DeadLetters:
    count: int  # the queue's ApproximateNumberOfMessages
    keys: list[str]  # S3 keys named by the messages read (at most _DLQ_PEEK_LIMIT messages)

    def keys_for(self, table: TableRef, prefix: str) -> set[str]:
        root = table_prefix(prefix, table)
        return {k for k in self.keys if k.startswith(root)}


@dataclass(frozen=True)
class WaitingRun:
    """The change run the loader cannot apply now (every later run waits behind it)."""

    run_id: str | None  # None: no change run is staged yet (the table waits for its snapshot)
    after_lsn: str | None
    end_lsn: str | None
    reason: str  # the loader's (``WaitReason``), SNAPSHOT_NOT_LOADED, or DEAD_LETTERED
    # The run it waits for: its predecessor (the change run ending at its after_lsn), or the
    # table's snapshot run; None when it waits for files of its own, or there is no such run.
    waits_for: str | None
    waits_for_state: str | None  # that run's manifest state; "missing" when no manifest was found
    missing_files: list[str]  # keys of its files not in S3 (the first few)
    action: str  # what to do


@dataclass(frozen=True)
class ChangeProgress:
    """Where a change-capture table's changes stand in Snowflake."""

    state: str  # CAUGHT UP | APPLYING (runs the loader will apply) | WAITING | NO SNAPSHOT
    applied_lsn: str | None  # the position its changes are applied through (X/Y); None before its snapshot
    applied_run_id: str | None  # the run that set it
    applied_by_snapshot: bool  # the position is the snapshot's (no change run applied since)
    runs_pending: int  # change runs staged and not applied yet
    oldest_pending_run_id: str | None
    oldest_pending_after_lsn: str | None
    waiting: WaitingRun | None = None


@dataclass(frozen=True)
class TableStatus:
    table: str
    last_run_id: str | None
    state: str
    files_staged: int
    files_loaded: int
    files_failed: int
    rows_staged: int
    rows_loaded: int
    watermark: str | None
    last_loaded_run_id: str | None
    lag_seconds: int | None
    error: str | None = None
    changes: ChangeProgress | None = None  # mode cdc only


@dataclass(frozen=True)
class SlotStatus:
    """A change-capture slot: the server's view and the drain's state object's."""

    slot: str
    state: str  # OK | INACTIVE (no drain holds it now: normal between runs) | AT RISK | LOST | UNKNOWN
    active: bool
    wal_status: str | None
    retained_wal_bytes: int | None
    confirmed_lsn: str | None  # the slot's confirmed_flush_lsn (X/Y)
    confirmed_at: str | None  # when the drain last confirmed (its state object), ISO 8601
    seconds_since_confirmation: int | None
    lag_seconds: int | None  # age of the newest heartbeat the drain staged through
    tables: list[str]
    resnapshot_command: str | None = None  # set when LOST
    error: str | None = None


@dataclass
class StatusReport:
    tables: list[TableStatus] = field(default_factory=list)
    dead_letters: DeadLetters | None = None
    slots: list[SlotStatus] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tables": [asdict(t) for t in self.tables],
            "dead_letter_queue": asdict(self.dead_letters) if self.dead_letters else None,
            "slots": [asdict(s) for s in self.slots],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def format_lines(self) -> list[str]:
        header = ("TABLE", "LAST RUN", "STATE", "STAGED", "LOADED", "FAILED", "ROWS", "WATERMARK", "LAG")
        rows = [
            (
                t.table,
                t.last_run_id or "-",
                t.state,
                str(t.files_staged),
                str(t.files_loaded),
                str(t.files_failed),
                f"{t.rows_loaded}/{t.rows_staged}",
                t.watermark or "-",
                format_lag(t.lag_seconds),
            )
            for t in self.tables
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]
        ]
        for table in self.tables:
            if table.changes is not None:
                lines.append("")
                lines.extend(format_change_lines(table.table, table.changes))
        if self.dead_letters is not None:
            lines.append("")
            lines.append(f"dead-letter queue: {self.dead_letters.count} message(s)")
            lines.extend(f"  {key}" for key in self.dead_letters.keys)
        for slot in self.slots:
            lines.append("")
            lines.extend(format_slot_lines(slot))
        return lines


def format_change_lines(table: str, progress: ChangeProgress) -> list[str]:
    """A change-capture table's section of the text report."""
    if progress.applied_lsn is None:
        applied = f"- ({SNAPSHOT_NOT_LOADED})"
    else:
        by = "snapshot run" if progress.applied_by_snapshot else "change run"
        applied = f"{progress.applied_lsn} ({by} {progress.applied_run_id})"
    pending = f"{progress.runs_pending} run(s)"
    if progress.oldest_pending_run_id is not None:
        pending += f", oldest {progress.oldest_pending_run_id} after {progress.oldest_pending_after_lsn}"
    lines = [
        f"changes {table}: {progress.state}",
        f"  applied through       {applied}",
        f"  staged, not applied   {pending}",
    ]
    waiting = progress.waiting
    if waiting is None:
        return lines
    if waiting.run_id is not None:
        lines.append(
            f"  waiting run           {waiting.run_id} (after {waiting.after_lsn}, to {waiting.end_lsn})"
        )
    lines.append(f"  why                   {waiting.reason}")
    if waiting.waits_for is not None:
        lines.append(f"  waits for             run {waiting.waits_for} ({waiting.waits_for_state})")
    elif waiting.waits_for_state == "missing":
        lines.append(f"  waits for             a run ending at {waiting.after_lsn}: none found")
    lines.extend(f"  not in S3             {key}" for key in waiting.missing_files)
    lines.append(f"  to do                 {waiting.action}")
    return lines


def format_slot_lines(slot: SlotStatus) -> list[str]:
    """The slot's section of the text report."""
    lines = [f"slot {slot.slot}: {slot.state}"]
    if slot.state == "UNKNOWN":
        lines.append(f"  {slot.error}")
        lines.append(f"  confirmed LSN (drain state)  {slot.confirmed_lsn or '-'}")
        lines.append(f"  since confirmation           {format_lag(slot.seconds_since_confirmation)}")
        return lines
    if slot.state == "LOST":
        lines.append(f"  {slot.error}")
        lines.append(f"  re-snapshot its tables: {slot.resnapshot_command}")
        return lines
    lines += [
        f"  retained WAL          {format_bytes(slot.retained_wal_bytes)}",
        f"  confirmed LSN         {slot.confirmed_lsn or '-'}",
        f"  since confirmation    {format_lag(slot.seconds_since_confirmation)}",
        f"  lag                   {format_lag(slot.lag_seconds)}",
        f"  active                {'yes' if slot.active else 'no'}",
        f"  wal_status            {slot.wal_status or '-'}",
        f"  tables                {', '.join(slot.tables) or '-'}",
    ]
    if slot.error:
        lines.append(f"  {slot.error}")
    return lines


def format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def format_lag(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def keys_in_message(body: str) -> list[str]:
    """The S3 keys an S3 notification body names; ``[]`` for anything else."""
    try:
        document = json.loads(body)
    except ValueError:
        return []
    records = document.get("Records") if isinstance(document, dict) else None
    keys = []
    for record in records if isinstance(records, list) else []:
        try:
            keys.append(unquote_plus(str(record["s3"]["object"]["key"])))
        except (KeyError, TypeError):
            continue
    return keys


def read_dead_letters(sqs: Any, dlq_url: str) -> DeadLetters:
    """Count the dead-letter queue and name the keys in it, leaving every message in place."""
    attributes = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
    count = int(attributes["Attributes"].get("ApproximateNumberOfMessages", 0))
    seen: dict[str, list[str]] = {}
    empty_polls = 0
    while empty_polls < 2 and len(seen) < _DLQ_PEEK_LIMIT:
        messages = sqs.receive_message(
            QueueUrl=dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        ).get("Messages", [])
        new = [m for m in messages if m["MessageId"] not in seen]
        for message in new:
            seen[message["MessageId"]] = keys_in_message(message.get("Body", ""))
        empty_polls = 0 if new else empty_polls + 1
    keys = sorted({key for keys in seen.values() for key in keys})
    return DeadLetters(count=max(count, len(seen)), keys=keys)


def table_status(
    *,
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    table: TableRef,
    dead_letters: DeadLetters | None,
    now: datetime,
) -> TableStatus:
    runs = RunStore(s3, settings.bucket).manifests_newest_first(table)
    last = next(runs, None)
    if last is None:
        return TableStatus(table.qualified, None, "never run", 0, 0, 0, 0, 0, None, None, None)
    ledger = ledger_rows(sf_conn, settings, {table: [f.key for f in last.files]})
    loaded = loaded_files(last, ledger)
    dead = dead_letters.keys_for(table, settings.prefix) if dead_letters else set()
    failed = [f for f in last.files if f.key in dead and f not in loaded]
    state = last.state.value
    if last.state is RunState.STAGED and failed:
        state = RunState.FAILED.value
    elif last.state is RunState.STAGED and len(loaded) == len(last.files):
        state = RunState.LOADED.value

    last_loaded: RunManifest | None = last if state == RunState.LOADED.value else None
    if last_loaded is None:
        earlier = islice(runs, _LOADED_RUN_LOOKBACK - 1)
        last_loaded = next((m for m in earlier if m.state is RunState.LOADED), None)
    lag = None if last_loaded is None else int((now - run_started_at(last_loaded.run_id)).total_seconds())
    watermark = None
    if last_loaded is not None:
        watermark = last_loaded.watermark_after or last_loaded.watermark_before
    error = last.error
    if failed and not error:
        error = f"{len(failed)} file(s) in the dead-letter queue"
    return TableStatus(
        table=table.qualified,
        last_run_id=last.run_id,
        state=state,
        files_staged=len(last.files),
        files_loaded=len(loaded),
        files_failed=len(failed),
        rows_staged=last.total_rows,
        rows_loaded=sum(ledger[f.key].rows_loaded or 0 for f in loaded),
        watermark=watermark,
        last_loaded_run_id=None if last_loaded is None else last_loaded.run_id,
        lag_seconds=lag,
        error=error,
    )


def change_progress(
    *,
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    table: TableRef,
    dead_letters: DeadLetters | None,
) -> ChangeProgress:
    """A change-capture table's progress: its applied position (its ledger), and the loader's
    catch-up from there as it would go now (``preview_catch_up``: the same rule, nothing done)."""
    store = RunStore(s3, settings.bucket)
    position = read_applied_position(sf_conn, settings, table)
    if position is None:
        return _before_snapshot(store, table, settings)
    preview = preview_catch_up(store, s3, settings.prefix, table, position, max_steps=_PREVIEW_RUNS)
    # A failed delivery of any pending run's file ran the same catch-up, which applies the first run
    # it can first: that run is the one the loader fails on (the error may name either file).
    dead = dead_letters.keys_for(table, settings.prefix) if dead_letters else set()
    dead &= {f.key for m in preview.pending for f in m.files}
    waiting: WaitingRun | None = None
    for manifest, decision in preview.steps:
        if decision.step is ChangeRunStep.APPLY and dead:
            waiting = _dead_lettered(manifest, dead)
            break
        if decision.step is ChangeRunStep.WAIT:
            waiting = _waiting_run(
                manifest, decision, position=position, chain=preview.chain, settings=settings, table=table
            )
    pending = preview.pending
    state = "WAITING" if waiting is not None else ("APPLYING" if pending else "CAUGHT UP")
    return _progress(state, position, pending, waiting)


def change_gap(progress: ChangeProgress) -> str | None:
    """Why a change-capture table's changes cannot go on without a new snapshot, or None: the run
    catch-up waits at waits for a predecessor that failed or is gone (the changes between are in no
    staged run), or for files of its own that are not in S3. ``pgsnow cdc resnapshot`` re-snapshots
    such a table on a healthy slot."""
    waiting = progress.waiting
    if waiting is None:
        return None
    if waiting.reason == WaitReason.PREDECESSOR_MISSING.value and waiting.waits_for_state in {
        RunState.FAILED.value,
        "missing",
    }:
        predecessor = (
            "none found"
            if waiting.waits_for is None
            else f"run {waiting.waits_for}, {waiting.waits_for_state}"
        )
        return (
            f"run {waiting.run_id} waits for the change run ending at {waiting.after_lsn} ({predecessor}): "
            f"the changes from {progress.applied_lsn} to {waiting.after_lsn} are in no staged run"
        )
    if waiting.reason == WaitReason.FILE_MISSING.value:
        return f"run {waiting.run_id} waits for file(s) not in S3 ({', '.join(waiting.missing_files)})"
    return None


def _progress(
    state: str, position: AppliedPosition | None, pending: list[RunManifest], waiting: WaitingRun | None
) -> ChangeProgress:
    oldest = pending[0] if pending else None
    return ChangeProgress(
        state=state,
        applied_lsn=None if position is None else format_lsn(position.lsn),
        applied_run_id=None if position is None else position.run_id,
        applied_by_snapshot=position is not None and position.from_snapshot,
        runs_pending=len(pending),
        oldest_pending_run_id=None if oldest is None else oldest.run_id,
        oldest_pending_after_lsn=None if oldest is None else _after(oldest),
        waiting=waiting,
    )


def _after(manifest: RunManifest) -> str | None:
    return None if manifest.changes is None else format_lsn(manifest.changes.after_lsn)


def _end(manifest: RunManifest) -> str | None:
    return None if manifest.changes is None else format_lsn(manifest.changes.end_lsn)


def _before_snapshot(store: RunStore, table: TableRef, settings: Settings) -> ChangeProgress:
    """No applied position: the loader applies nothing until the table's snapshot is loaded (it
    sets the position); every staged change run waits for it."""
    manifests = {run_id: store.read_manifest_for_update(table, run_id) for run_id in store.run_ids(table)}
    pending = [
        found.manifest
        for found in manifests.values()
        if found is not None and is_change_run(found.manifest) and found.manifest.state is RunState.STAGED
    ]
    stored = store.read_enrollment(table)
    snapshot_run = None if stored is None else stored.enrollment.snapshot_run_id
    found = None if snapshot_run is None else manifests.get(snapshot_run)
    snapshot = None if found is None else found.manifest
    snapshot_state = (
        None if snapshot_run is None else ("no manifest yet" if snapshot is None else snapshot.state.value)
    )
    if snapshot_run is None:
        action = (
            "the table is not enrolled: start its snapshot (its extractor schedule, or "
            f"`pgsnow extract {table.qualified}`); its changes are applied from the snapshot's position on"
        )
    elif snapshot is not None and snapshot.state is RunState.STAGED:
        action = (
            f"the snapshot run {snapshot_run} is staged: the loader sets the position when its files are "
            "loaded (a file in the dead-letter queue stops it: redrive it once its cause is fixed)"
        )
    elif snapshot is None or snapshot.state is RunState.EXTRACTING:
        action = (
            f"the snapshot run {snapshot_run} is being read: the table's invocations finish it, then the "
            "loader sets the position when its files are loaded"
        )
    elif snapshot.state is RunState.FAILED:
        action = (
            f"the snapshot run {snapshot_run} failed ({snapshot.error or 'no reason recorded'}): the "
            "table's next extractor invocation enrolls it again and takes a new snapshot"
        )
    else:
        action = (
            f"the snapshot run {snapshot_run} is loaded but the table has no applied position (removed "
            f"from its ledger): re-snapshot it: {resnapshot_command(settings.cdc.slot, [table])}"
        )
    oldest = pending[0] if pending else None
    waiting = WaitingRun(
        run_id=None if oldest is None else oldest.run_id,
        after_lsn=None if oldest is None else _after(oldest),
        end_lsn=None if oldest is None else _end(oldest),
        reason=SNAPSHOT_NOT_LOADED,
        waits_for=snapshot_run,
        waits_for_state=snapshot_state,
        missing_files=[],
        action=action,
    )
    return _progress("WAITING" if pending else "NO SNAPSHOT", None, pending, waiting)


def _dead_lettered(manifest: RunManifest, dead: set[str]) -> WaitingRun:
    keys = sorted(dead)
    return WaitingRun(
        run_id=manifest.run_id,
        after_lsn=_after(manifest),
        end_lsn=_end(manifest),
        reason=f"{DEAD_LETTERED} ({keys[0]}{', ...' if len(keys) > 1 else ''})",
        waits_for=None,
        waits_for_state=None,
        missing_files=[],
        action=(
            f'find the loader\'s error (Logs Insights: filter s3_key = "{keys[0]}"), fix its cause, then '
            'redrive the dead-letter queue (docs/operations.md, "Files not loading"); this run is applied '
            "first, and the change runs after it wait for it"
        ),
    )


def _waiting_run(
    manifest: RunManifest,
    decision: ChangeRunDecision,
    *,
    position: AppliedPosition,
    chain: ChangeChain,
    settings: Settings,
    table: TableRef,
) -> WaitingRun:
    """The run catch-up would wait at, what it waits for (its predecessor: the change run ending at
    its ``after_lsn``) and what to do, by the loader's reason."""
    assert manifest.changes is not None
    after = format_lsn(manifest.changes.after_lsn)
    applied = format_lsn(position.lsn)
    resnapshot = resnapshot_command(settings.cdc.slot, [table])
    waits_for: str | None = None
    waits_for_state: str | None = None
    missing = list(decision.missing[:_MISSING_KEYS_SHOWN])
    if decision.wait is WaitReason.PREDECESSOR_MISSING:
        predecessor = chain.ending_at(manifest.changes.after_lsn, before=manifest.run_id)
        if predecessor is None:
            waits_for_state = "missing"
            action = (
                f"no change run of the table ending at {after} was found (its manifest was deleted or "
                f"has expired): the changes between {applied} and {after} are in no staged run and "
                f"cannot be applied; re-snapshot the table: {resnapshot} ({CHANGES_DOC})"
            )
        else:
            waits_for, waits_for_state = predecessor.run_id, predecessor.state.value
            if predecessor.state is RunState.FAILED:
                action = (
                    f"its predecessor failed ({predecessor.error or 'no reason recorded'}) and no later run "
                    f"holds its changes (between {applied} and {after}): they cannot be applied; "
                    f"re-snapshot the table: {resnapshot} ({CHANGES_DOC})"
                )
            else:
                action = (
                    f"its predecessor is {predecessor.state.value} but the loader's catch-up does not reach "
                    f"it from the applied position ({applied}, run {position.run_id}); deliver its files "
                    f"again (redrive), or re-snapshot the table: {resnapshot} ({CHANGES_DOC})"
                )
    elif decision.wait is WaitReason.FILE_MISSING:
        action = (
            "its file(s) are not in S3: while the drain uploads them, their events apply the run; if "
            "its drain run died, the next one re-reads these changes and this run is skipped; if the "
            f"files were deleted, its changes cannot be applied: re-snapshot the table: {resnapshot} "
            f"({CHANGES_DOC})"
        )
    else:
        action = (
            f"its manifest is {manifest.state.value}, not staged: the drain writes a change run's "
            "manifest staged before its files, so it was written by something else; check it "
            f"({CHANGES_DOC})"
        )
    return WaitingRun(
        run_id=manifest.run_id,
        after_lsn=after,
        end_lsn=format_lsn(manifest.changes.end_lsn),
        reason=(decision.wait or WaitReason.NOT_STAGED).value,
        waits_for=waits_for,
        waits_for_state=waits_for_state,
        missing_files=missing,
        action=action,
    )


def read_drain_state(store: RunStore, slot: str) -> DrainState | None:
    """The drain's state object (``RunStore.load_drain_state``, its one owner), or None when there
    is none (no run yet) or it cannot be read: status shows what it can rather than fail."""
    try:
        return store.load_drain_state(slot)
    except PermanentError as exc:
        logger.warning(
            "the drain state is unreadable; the slot is shown without it", extra={"error": str(exc)}
        )
        return None


def slot_status(
    *, health: SlotHealth, state: DrainState | None, tables: list[TableRef], now: datetime
) -> SlotStatus:
    """Combine the server's view of the slot with the drain's state object."""
    names = [t.qualified for t in tables]
    if health.lost:
        return SlotStatus(
            slot=health.slot,
            state="LOST",
            active=health.active,
            wal_status=health.wal_status,
            retained_wal_bytes=health.retained_wal_bytes,
            confirmed_lsn=None
            if health.confirmed_flush_lsn is None
            else format_lsn(health.confirmed_flush_lsn),
            confirmed_at=None if state is None else state.confirmed_at,
            seconds_since_confirmation=_age(None if state is None else state.confirmed_at, now),
            lag_seconds=None,
            tables=names,
            resnapshot_command=resnapshot_command(health.slot, tables),
            error=health.problem,
        )
    confirmed_at = None if state is None else state.confirmed_at
    lag = None if state is None else heartbeat_lag_s(state.last_heartbeat, now)
    error = None
    if (
        state is not None
        and health.confirmed_flush_lsn is not None
        and state.confirmed_lsn > health.confirmed_flush_lsn
    ):
        error = (
            f"the drain staged through {format_lsn(state.confirmed_lsn)} but has not confirmed it yet "
            "(the next run will)"
        )
    if health.wal_status == "unreserved":
        label = "AT RISK"
        error = (
            "the slot retains more WAL than max_wal_size/max_slot_wal_keep_size keep: it will be invalidated"
        )
    else:
        label = "OK" if health.active else "INACTIVE"
    return SlotStatus(
        slot=health.slot,
        state=label,
        active=health.active,
        wal_status=health.wal_status,
        retained_wal_bytes=health.retained_wal_bytes,
        confirmed_lsn=None if health.confirmed_flush_lsn is None else format_lsn(health.confirmed_flush_lsn),
        confirmed_at=confirmed_at,
        seconds_since_confirmation=_age(confirmed_at, now),
        lag_seconds=None if lag is None else max(0, int(lag)),
        tables=names,
        error=error,
    )


def _age(iso: str | None, now: datetime) -> int | None:
    """Whole seconds from an ISO 8601 time to ``now`` (None when absent or unreadable)."""
    if iso is None:
        return None
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0, int((now - then).total_seconds()))


def collect_slot_statuses(
    *, settings: Settings, s3: Any, pg_conn: Any, now: datetime, pg_error: str | None = None
) -> list[SlotStatus]:
    """The change-capture slot (CDC_SLOT) when any table has mode cdc; [] otherwise. With
    ``pg_error`` (PostgreSQL could not be reached) the slot is shown UNKNOWN with that reason."""
    tables = cdc_tables(settings)
    if not tables:
        return []
    slot = settings.cdc.slot
    store = RunStore(s3, settings.bucket)
    if pg_error is not None:
        state = read_drain_state(store, slot)
        confirmed_at = None if state is None else state.confirmed_at
        return [
            SlotStatus(
                slot=slot,
                state="UNKNOWN",
                active=False,
                wal_status=None,
                retained_wal_bytes=None,
                confirmed_lsn=None if state is None else format_lsn(state.confirmed_lsn),
                confirmed_at=confirmed_at,
                seconds_since_confirmation=_age(confirmed_at, now),
                lag_seconds=None,
                tables=[t.qualified for t in tables],
                error=f"PostgreSQL not reachable: {pg_error}",
            )
        ]
    return [
        slot_status(
            health=slot_health(pg_conn, slot),
            state=read_drain_state(store, slot),
            tables=tables,
            now=now,
        )
    ]


def collect_status(
    *,
    settings: Settings,
    s3: Any,
    sqs: Any | None,
    sf_conn: Any,
    table: TableRef | None = None,
    now: datetime | None = None,
    pg_conn: Any | None = None,
    pg_error: str | None = None,
) -> StatusReport:
    """The status of one table, or of every table with a manifest, plus the dead-letter queue and,
    given a PostgreSQL connection, the change-capture slot."""
    now = now or datetime.now(UTC)
    dead_letters = None
    if sqs is not None and settings.cleanup.dlq_url:
        dead_letters = read_dead_letters(sqs, settings.cleanup.dlq_url)
    tables = [table] if table is not None else RunStore(s3, settings.bucket).tables_with_manifests()
    return StatusReport(
        tables=[
            _with_changes(
                table_status(
                    settings=settings, s3=s3, sf_conn=sf_conn, table=t, dead_letters=dead_letters, now=now
                ),
                settings=settings,
                s3=s3,
                sf_conn=sf_conn,
                table=t,
                dead_letters=dead_letters,
            )
            for t in tables
        ],
        dead_letters=dead_letters,
        slots=[]
        if pg_conn is None and pg_error is None
        else collect_slot_statuses(settings=settings, s3=s3, pg_conn=pg_conn, now=now, pg_error=pg_error),
    )


def _with_changes(
    status: TableStatus,
    *,
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    table: TableRef,
    dead_letters: DeadLetters | None,
) -> TableStatus:
    """The table's status with its change-capture progress when it is in mode cdc."""
    if settings.table_options(table).mode is not ExtractMode.CDC:
        return status
    progress = change_progress(
        settings=settings, s3=s3, sf_conn=sf_conn, table=table, dead_letters=dead_letters
    )
    return replace(status, changes=progress)
