"""Run completion, the one step (``complete_run``) that ends a run, for the loader (after each
batch, once per run it touched) and the scheduled cleanup pass alike.

A run is complete when its manifest is ``staged`` (or ``loaded``) and the ledger holds every file
it lists, with the listed checksum. Then, in this order: a replace run's shadow table is swapped
in, or a run's deletes are applied, exactly once (the ledger mark ``keys.applied_mark_key``
records the outcome, in the same transaction as the deletes); and only then is the manifest
marked ``loaded`` (a conditional write), the one completion marker cleanup and ``pgsnow status``
read. A run older than a run the target already holds is SUPERSEDED, never applied: its key list
would delete rows the newer run wrote (docs/loading.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pgsnow.config import DeleteMode, Settings, WriteMode
from pgsnow.errors import ConfigError, PermanentError, PgSnowError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, StagedObject, applied_mark_key, is_run_id
from pgsnow.ledger import AppliedPosition, Ledger, LedgerClaim, LedgerRecord, LedgerRow, loaded_files
from pgsnow.load.outcomes import RunOutcome
from pgsnow.load.session import LoadSession, url_source_for
from pgsnow.load.tables import Tables, Target, read_columns
from pgsnow.load.work_tables import work_table
from pgsnow.manifest import Column, RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.runs import RunStore, VersionedManifest
from pgsnow.snowflake.load_sql import CredentialsSource, LoadColumn, UrlSource, build_copy_into
from pgsnow.snowflake.table_sql import (
    KEYS_WORK_TABLE,
    build_add_soft_delete_column,
    build_apply_deletes,
    build_create_schema,
    build_drop_table,
    build_rename_table,
    build_select_table_comment,
    build_set_table_comment,
    build_swap_with,
    replace_run_tag,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from snowflake.connector import SnowflakeConnection


_WRITE_ATTEMPTS = 5  # how often a manifest another writer changed is read again


@dataclass(frozen=True)
class CompletedRun:
    """What ``complete_run`` found and did. ``state`` is None when the run has no manifest."""

    table: TableRef
    run_id: str
    state: RunState | None
    files_total: int = 0
    files_loaded: int = 0
    outcome: RunOutcome | None = None  # a replace run's swap or a run's deletes


def complete_run(
    *,
    settings: Settings,
    sf_conn: SnowflakeConnection,
    s3: S3Client,
    table: TableRef,
    run_id: str,
    credentials_source: CredentialsSource | None = None,
    tables: Tables | None = None,
    swap: bool = True,
    base: VersionedManifest | None = None,
) -> CompletedRun:
    """Complete the run if all its files are loaded: apply its swap or deletes, then mark it ``loaded``.

    Reads the manifest once per attempt (with the version its conditional write needs; not on the
    first attempt when ``base`` is given) and the ledger once (every listed file and the run's mark). Safe to call concurrently and again: the
    mark makes the apply happen once, and the state write is conditional. Without a storage
    integration Snowflake reads the deletes key list with ``credentials_source``'s credentials.
    ``tables``: the loader's prepared tables (forgotten when swapped). ``swap=False`` (the cleanup
    pass) leaves a replace run's swap, and so its ``loaded`` marker, to the loader: a SWAP is DDL,
    so unlike the deletes it cannot share the ledger claim's transaction, and two completions of
    one replace run at the same moment could both swap. ``base``: the manifest as the caller
    read it (the batch's read, for a change run it applied), used by the first attempt; a write
    it loses to another writer reads the manifest again, as always.
    """
    if not settings.snowflake.database:
        raise ConfigError(["SNOWFLAKE_DATABASE is needed to complete runs"])
    session = LoadSession(settings, settings.snowflake.database, sf_conn, s3)
    applier = _RunApplier(
        session, tables or Tables(session.database), lambda: url_source_for(settings, credentials_source)
    )
    store = RunStore(s3, settings.bucket)
    assert base is None or (base.manifest.table, base.manifest.run_id) == (table, run_id)
    for attempt in range(_WRITE_ATTEMPTS):
        if attempt > 0 or base is None:
            base = store.read_manifest_for_update(table, run_id)
        if base is None:
            return CompletedRun(table, run_id, None)
        manifest = base.manifest
        if manifest.state not in (RunState.STAGED, RunState.LOADED):
            # `extracting`: the file list is not final yet; `failed`: its files stay for the sweeper.
            return CompletedRun(table, run_id, manifest.state, len(manifest.files))
        mark = applied_mark_key(table, run_id)
        ledger = applier.ledger(table).loaded_rows([*(f.key for f in manifest.files), mark])
        loaded = len(loaded_files(manifest, ledger))
        found = CompletedRun(table, run_id, manifest.state, len(manifest.files), loaded)
        if loaded < len(manifest.files) or (not swap and _swap_pending(manifest, ledger.get(mark))):
            return found
        found = replace(found, outcome=applier.apply(manifest, ledger.get(mark)))
        if (
            found.outcome is RunOutcome.APPLIED
            and manifest.changes is not None
            and manifest.changes.is_snapshot
        ):
            # The cleanup pass (swap=False) sets the position only: its session may have no stage
            # to COPY change files through; the next change file's event applies them.
            applier.start_change_capture(manifest, credentials_source, catch_up=swap)
        if manifest.state is RunState.LOADED:
            return found
        written = _mark_loaded(store, base)
        if written is not False:
            return found if written is None else replace(found, state=RunState.LOADED)
        # Another writer (a cleanup's claim, or another completion) changed the manifest: read it again.
    raise RetryableError(
        f"the manifest kept changing during {_WRITE_ATTEMPTS} completion attempts",
        table=table.qualified,
        run_id=run_id,
    )


def _swap_pending(manifest: RunManifest, mark: LedgerRow | None) -> bool:
    return WriteMode(manifest.write_mode) is WriteMode.REPLACE and mark is None


def _mark_loaded(store: RunStore, base: VersionedManifest) -> bool | None:
    """Write state ``loaded`` if the manifest is still ``base``; None when S3 refused the write.

    A refused write only delays the marker (the next completion, or the cleanup pass, writes it),
    so it is logged, never a load failure.
    """
    try:
        return store.write_manifest_if_unchanged(base, base.manifest.with_state(RunState.LOADED))
    except PgSnowError as exc:
        logger.warning(f"could not mark the run loaded: {exc.message}", extra=exc.context())
        return None


@dataclass(frozen=True)
class _RunApplier:
    """Applies a complete run's swap or deletes on one session."""

    session: LoadSession
    tables: Tables
    url_source: Callable[[], UrlSource]

    def ledger(self, table: TableRef) -> Ledger:
        """The table's ledger, created (with the legacy ledger's rows) once per ``tables``."""
        return self.tables.ledgers.ensure(self.session.ledger(table))

    def apply(self, manifest: RunManifest, mark: LedgerRow | None) -> RunOutcome | None:
        """The recorded outcome when the run's mark exists, else the swap or the deletes (if any)."""
        if mark is not None:
            return _recorded_outcome(mark)
        if manifest.mode == "cdc":
            return None  # a change run is applied as its files load (load.changes), not here
        mark_key = applied_mark_key(manifest.table, manifest.run_id)
        if WriteMode(manifest.write_mode) is WriteMode.REPLACE:
            return self._finish_replace_run(manifest, mark_key)
        if DeleteMode(manifest.deletes) is not DeleteMode.NONE:
            return self._apply_deletes(manifest, mark_key)
        return None

    def start_change_capture(
        self, manifest: RunManifest, credentials_source: CredentialsSource | None, *, catch_up: bool
    ) -> None:
        """A change-capture table's snapshot is in: its changes apply from the snapshot's LSN.

        The applied position is set to (snapshot LSN, this run) unless it is already at or past
        it (this completion ran before, and change runs may have been applied since); a
        re-snapshot removes the position first (``Ledger.forget_applied_position``). Then the
        table's waiting change runs are applied (load.changes) when ``catch_up``.
        """
        from pgsnow.load.changes import ChangeApplier  # load.changes completes runs through this module

        assert manifest.changes is not None and manifest.changes.snapshot_lsn is not None
        table, snapshot_lsn = manifest.table, manifest.changes.snapshot_lsn
        ledger = self.ledger(table)
        new = AppliedPosition(snapshot_lsn, manifest.run_id, from_snapshot=True)
        with self.session.transaction():
            current = ledger.applied_position()
            if current is None or current.lsn < snapshot_lsn:
                ledger.advance(current, new)
                logger.info(
                    "change capture starts from the snapshot",
                    extra={"table": table.qualified, "run_id": manifest.run_id, "snapshot_lsn": snapshot_lsn},
                )
            elif current.lsn > snapshot_lsn and current.run_id < manifest.run_id:
                logger.warning(
                    "a snapshot older than the applied position was loaded: re-snapshot the table "
                    "with pgsnow cdc resnapshot (which resets the position first)",
                    extra={"table": table.qualified, "run_id": manifest.run_id, "applied_lsn": current.lsn},
                )
        if not catch_up:
            return
        settings = self.session.settings

        def complete(found: VersionedManifest) -> object:
            return complete_run(
                settings=settings,
                sf_conn=self.session.sf_conn,
                s3=self.session.s3,
                table=found.manifest.table,
                run_id=found.manifest.run_id,
                credentials_source=credentials_source,
                tables=self.tables,
                base=found,
            )

        ChangeApplier(self.session, self.tables, complete).catch_up(table)

    def _newer_run(self, table: TableRef, run_id: str, *, applied_only: bool) -> str | None:
        """The newest run of the table newer than ``run_id`` that reached the target, if any.

        A ledger RUN_ID that is not a run id (object metadata of a hand-dropped file) is ignored.
        """
        runs = self.ledger(table).newer_runs(run_id=run_id, applied_only=applied_only)
        newer = sorted(run for run in runs if is_run_id(run))
        return newer[-1] if newer else None

    def _record_run_outcome(self, manifest: RunManifest, mark: str, outcome: RunOutcome) -> None:
        """Write the run's mark into the ledger (in the caller's transaction, if any)."""
        table = manifest.table
        ledger = self.session.ledger(table)  # ensured by complete_run, before any transaction
        ledger.claim([LedgerClaim(mark, None, None, manifest.run_id, table.schema, table.table)])
        ledger.record_loads([LedgerRecord(mark, manifest.total_rows, status=outcome.value.upper())])

    def _finish_replace_run(self, manifest: RunManifest, mark: str) -> RunOutcome:
        """Swap the run's shadow table in, unless a newer replace run was swapped in already.

        SWAP and DROP are DDL (each commits), so unlike the deletes this check cannot share a
        transaction with the swap; two replace runs of one table completing in the same instant
        can still race. The tag keeps a retry after a crash from swapping the old data back in.
        """
        session, table, run_id = self.session, manifest.table, manifest.run_id
        target, shadow = self.tables.target(table), self.tables.shadow(table, run_id)
        newer = self._newer_run(table, run_id, applied_only=True)
        if newer is not None:
            session.execute(build_drop_table(shadow))  # the stale run's table, never swapped in
            self.tables.forget(shadow)
            self._record_run_outcome(manifest, mark, RunOutcome.SUPERSEDED)
            _log_superseded(manifest, newer)
            return RunOutcome.SUPERSEDED
        if read_columns(session.sf_conn, shadow):
            self._swap_in(run_id, target, shadow)
        self._record_run_outcome(manifest, mark, RunOutcome.APPLIED)
        logger.info(
            "run applied",
            extra={"table": table.qualified, "run_id": run_id, "write_mode": manifest.write_mode},
        )
        return RunOutcome.APPLIED

    def _swap_in(self, run_id: str, target: Target, shadow: Target) -> None:
        session = self.session
        if read_columns(session.sf_conn, target):
            # The shadow is tagged with its run before the swap, and the tag travels with the
            # data: a retry after a crash between SWAP and DROP finds it on the target and only
            # drops the shadow (the old data), instead of swapping the old data back in.
            tag = replace_run_tag(run_id)
            rows = session.execute(*build_select_table_comment(*target))
            comment = str(rows[0][0]) if rows and rows[0][0] is not None else None
            if comment != tag:
                session.execute(build_set_table_comment(shadow, tag))
                session.execute(build_swap_with(target, shadow))
            session.execute(build_drop_table(shadow))  # now the old table
        else:
            session.execute(build_create_schema(target[0], target[1]))
            session.execute(build_rename_table(shadow, target))
        self.tables.forget(target, shadow)

    def _apply_deletes(self, manifest: RunManifest, mark: str) -> RunOutcome:
        """Delete (hard) or mark (soft) target rows whose key is not in the run's full key list.

        One transaction claims the run's mark, checks that no newer run of the table has reached the
        target, applies the key list and records the outcome. The claim is a MERGE on the table's
        ledger, which every load of a file of the table also begins with, so a concurrent load of a newer run's file
        either commits before this check (and is seen: SUPERSEDED) or waits until the deletes are
        committed (and its rows then land after them).
        """
        if manifest.key_list is None:
            raise PermanentError(
                f"deletes={manifest.deletes} but the manifest has no key_list",
                table=manifest.table.qualified,
                run_id=manifest.run_id,
            )
        session = self.session
        by_name = {c.name: c for c in manifest.columns}
        key_columns = [by_name[name] for name in manifest.primary_key]
        soft = DeleteMode(manifest.deletes) is DeleteMode.SOFT
        # DDL commits in Snowflake, so the column and the keys table exist before the transaction.
        if soft:
            session.execute(build_add_soft_delete_column(self.tables.target(manifest.table)))
        with work_table(session, KEYS_WORK_TABLE, key_columns) as keys_table:
            url_source = self.url_source()
            with session.transaction():
                return self._apply_deletes_in_transaction(
                    manifest,
                    mark,
                    key_columns=key_columns,
                    keys_table=keys_table,
                    url_source=url_source,
                    soft=soft,
                )

    def _apply_deletes_in_transaction(
        self,
        manifest: RunManifest,
        mark: str,
        *,
        key_columns: Sequence[Column],
        keys_table: Target,
        url_source: UrlSource,
        soft: bool,
    ) -> RunOutcome:
        session, table = self.session, manifest.table
        ledger = session.ledger(table)  # ensured by complete_run: no DDL inside the transaction
        ledger.claim([LedgerClaim(mark, None, None, manifest.run_id, table.schema, table.table)])
        entry = ledger.loaded_row(mark)
        if entry is not None:
            return _recorded_outcome(entry)  # another loader finished the run while we waited
        newer = self._newer_run(table, manifest.run_id, applied_only=False)
        if newer is not None:
            self._record_run_outcome(manifest, mark, RunOutcome.SUPERSEDED)
            _log_superseded(manifest, newer)
            return RunOutcome.SUPERSEDED
        session.execute_with_credentials(
            build_copy_into(
                database=session.database,
                control_schema=session.control_schema,
                stage=session.settings.snowflake.stage,
                staged=_key_list_file(manifest),
                columns=[LoadColumn.from_manifest(c) for c in key_columns],
                target=keys_table,
                url_source=url_source,
            ),
            url_source.credentials,
        )
        session.execute(
            build_apply_deletes(
                target=self.tables.target(table),
                keys_table=keys_table,
                key_columns=[c.snowflake_name for c in key_columns],
                soft=soft,
            )
        )
        self._record_run_outcome(manifest, mark, RunOutcome.APPLIED)
        logger.info(
            "run applied",
            extra={"table": table.qualified, "run_id": manifest.run_id, "deletes": manifest.deletes},
        )
        return RunOutcome.APPLIED


def _key_list_file(manifest: RunManifest) -> StagedObject:
    assert manifest.key_list is not None
    key = manifest.key_list.key
    return StagedObject(
        key=key,
        table=manifest.table,
        file_name=key.rsplit("/", 1)[1],
        file_format=FileFormat.CSV,
        gzip=key.endswith(".gz"),
        run_id=manifest.run_id,
        batch=None,
    )


def _recorded_outcome(entry: LedgerRow) -> RunOutcome:
    return RunOutcome.SUPERSEDED if entry.status == "SUPERSEDED" else RunOutcome.APPLIED


def _log_superseded(manifest: RunManifest, newer: str) -> None:
    logger.warning(
        "run superseded: a newer run of the table reached the target first, so this run's "
        + (
            "table is not swapped in"
            if WriteMode(manifest.write_mode) is WriteMode.REPLACE
            else "deletes are not applied"
        ),
        extra={"table": manifest.table.qualified, "run_id": manifest.run_id, "newer_run_id": newer},
    )
