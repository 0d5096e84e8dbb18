"""Run completion: once every file of a run is loaded, swap in a replace run's table or apply its
deletes, exactly once (a ledger mark under ``keys.applied_mark_key`` records the outcome).

A run older than a run the target already holds is SUPERSEDED, never applied: its key list would
delete rows the newer run wrote (docs/loading.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgsnow.config import DeleteMode, Settings, WriteMode
from pgsnow.errors import PermanentError, PgSnowError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, StagedObject, applied_mark_key, is_run_id
from pgsnow.ledger import LedgerClaim, LedgerRow
from pgsnow.load.objects import read_run_manifest
from pgsnow.load.outcomes import FileOutcome, RunOutcome
from pgsnow.load.session import LoadSession
from pgsnow.load.tables import Tables, Target, read_columns
from pgsnow.manifest import Column, RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.snowflake import (
    LoadColumn,
    UrlSource,
    build_add_soft_delete_column,
    build_apply_deletes,
    build_copy_into,
    build_create_schema,
    build_create_work_table,
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


@dataclass(frozen=True)
class RunCompletion:
    """Applies complete runs on one session; ``url_source`` says how Snowflake reads a key list."""

    session: LoadSession
    tables: Tables
    url_source: Callable[[], UrlSource]

    def finish_run_if_complete(self, table: TableRef, run_id: str) -> RunOutcome | None:
        """Swap in a replace run's table or apply its deletes once the run is complete; None until then.

        Complete means: the manifest (read again, not cached) is ``staged`` or ``loaded``, and every
        file it lists is loaded in the ledger. A redelivered last file does not swap or delete twice.
        """
        session = self.session
        manifest = read_run_manifest(session.s3, session.bucket, table, run_id)
        if manifest.state not in (RunState.STAGED, RunState.LOADED):
            return None
        keys = [f.key for f in manifest.files]
        if set(keys) - set(session.ledger.loaded_rows(keys)):
            return None
        mark = applied_mark_key(table, run_id)
        entry = session.ledger.loaded_row(mark)
        if entry is not None:
            return _recorded_outcome(entry)
        if WriteMode(manifest.write_mode) is WriteMode.REPLACE:
            return self._finish_replace_run(manifest, mark)
        if DeleteMode(manifest.deletes) is not DeleteMode.NONE:
            return self._apply_deletes(manifest, mark)
        return None

    def _newer_run(self, table: TableRef, run_id: str, *, applied_only: bool) -> str | None:
        """The newest run of the table newer than ``run_id`` that reached the target, if any.

        A ledger RUN_ID that is not a run id (object metadata of a hand-dropped file) is ignored.
        """
        runs = self.session.ledger.newer_runs(
            schema_name=table.schema, table_name=table.table, run_id=run_id, applied_only=applied_only
        )
        newer = sorted(run for run in runs if is_run_id(run))
        return newer[-1] if newer else None

    def _record_run_outcome(self, manifest: RunManifest, mark: str, outcome: RunOutcome) -> None:
        """Write the run's mark into the ledger (in the caller's transaction, if any)."""
        table = manifest.table
        self.session.ledger.claim(LedgerClaim(mark, None, None, manifest.run_id, table.schema, table.table))
        self.session.ledger.record_load(mark, manifest.total_rows, status=outcome.value.upper())

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
        target, applies the key list and records the outcome. The claim is a MERGE on the ledger,
        which every load of a file also begins with, so a concurrent load of a newer run's file
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
        keys_table = (
            session.database,
            session.control_schema,
            f"_PGSNOW_KEYS_{uuid.uuid4().hex[:16].upper()}",
        )
        soft = DeleteMode(manifest.deletes) is DeleteMode.SOFT
        # DDL commits in Snowflake, so the column and the keys table exist before the transaction.
        if soft:
            session.execute(build_add_soft_delete_column(self.tables.target(manifest.table)))
        session.execute(build_create_work_table(keys_table, key_columns))
        try:
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
        finally:
            session.execute(build_drop_table(keys_table))

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
        session.ledger.claim(LedgerClaim(mark, None, None, manifest.run_id, table.schema, table.table))
        entry = session.ledger.loaded_row(mark)
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


def settle_completed_runs(
    *, settings: Settings, sf_conn: SnowflakeConnection, s3: S3Client, outcomes: Sequence[FileOutcome]
) -> dict[tuple[TableRef, str], str]:
    """Mark each run that this batch may have finished as ``loaded`` (manifest state).

    Run completion is what cleanup and ``pgsnow status`` read. The scheduled cleanup pass settles
    runs too, so a failure here only delays it: it is logged, never turned into a load failure.
    """
    from pgsnow.cleanup import mark_run_complete_if_loaded

    runs = {
        (o.staged.table, o.staged.run_id) for o in outcomes if o.error is None and o.staged.run_id is not None
    }
    states: dict[tuple[TableRef, str], str] = {}
    for table, run_id in sorted(runs):
        try:
            state = mark_run_complete_if_loaded(
                settings=settings, s3=s3, sf_conn=sf_conn, table=table, run_id=run_id
            )
        except PgSnowError as exc:
            logger.warning(f"could not settle run: {exc.message}", extra=exc.context())
            continue
        states[(table, run_id)] = state.value
    return states
