"""A batch of staged files: grouped per (table, run, format), one COPY per group, and the group
retried file by file when it failed for a reason that belongs to one file.

``Loader`` holds what lasts across batches (clients, prepared tables, pipes, the credentials
its session's temporary stage was made with); ``load`` runs one batch on a connection.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from snowflake.connector.errors import Error as SnowflakeDriverError

from pgsnow.config import DeleteMode, LoadMethod, Settings, WriteMode
from pgsnow.errors import ConfigError, PermanentError, PgSnowError
from pgsnow.identifiers import TableRef
from pgsnow.keys import StagedObject
from pgsnow.load.changes import ChangeApplier, is_change_run
from pgsnow.load.completion import complete_run
from pgsnow.load.copy import CopyJob, Present, already_loaded, elapsed_ms, log_failure
from pgsnow.load.objects import head_staged_object, manifest_mismatch, read_run_manifest
from pgsnow.load.outcomes import FileOutcome, LoadResult, LoadStatus
from pgsnow.load.session import LoadSession
from pgsnow.load.tables import Tables, Target
from pgsnow.load.through_snowpipe import Pipes
from pgsnow.load.work_tables import work_table
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.runs import VersionedManifest
from pgsnow.snowflake.error_classifier import classify_snowflake_error
from pgsnow.snowflake.load_sql import (
    MAX_FILES_PER_COPY,
    AwsCredentials,
    CredentialsSource,
    LoadColumn,
    aws_credentials_from,
    build_create_temporary_stage,
    build_query_tag,
)
from pgsnow.snowflake.table_sql import MERGE_WORK_TABLE, build_create_schema
from pgsnow.snowpipe import SnowpipeClient

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from snowflake.connector import SnowflakeConnection


# Per Snowflake session, the credentials its temporary stage was created with (a fingerprint): a
# property of the session, whichever loader used it. Weak keys: a closed and dropped connection
# takes its entry with it.
_temporary_stage_credentials: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def group_files(objects: Sequence[StagedObject]) -> list[list[StagedObject]]:
    """Distinct objects grouped by (table, run, format), runs oldest first, at most 1000 per group."""
    groups: dict[tuple[str, str, str, str, bool], list[StagedObject]] = {}
    seen: set[str] = set()
    for staged in objects:
        if staged.key in seen:
            continue  # the same key twice in one batch loads once
        seen.add(staged.key)
        group_key = (
            staged.run_id or "",
            staged.table.schema,
            staged.table.table,
            staged.file_format.value,
            staged.gzip,
        )
        groups.setdefault(group_key, []).append(staged)
    ordered: list[list[StagedObject]] = []
    for group_key in sorted(groups):
        files = groups[group_key]
        ordered.extend(files[i : i + MAX_FILES_PER_COPY] for i in range(0, len(files), MAX_FILES_PER_COPY))
    return ordered


class Loader:
    """Loads batches of staged files; built once per container and kept across batches.

    ``credentials_source`` is the loader's AWS session (anything with boto3.Session's
    ``get_credentials()``). Without SNOWFLAKE_STORAGE_INTEGRATION, Snowflake reads S3 with its
    current credentials: through a temporary stage of this session named like the permanent
    stage, and in the key list's COPY (docs/deploy.md, "credentials method"). With an
    integration it is not used. ``snowpipe`` is the Snowpipe REST client for
    ``LOAD_METHOD=snowpipe`` (built from the Snowflake secret when not given).
    """

    def __init__(
        self,
        settings: Settings,
        s3: S3Client,
        *,
        credentials_source: CredentialsSource | None = None,
        snowpipe: SnowpipeClient | None = None,
    ) -> None:
        if not settings.snowflake.database:
            raise ConfigError(["SNOWFLAKE_DATABASE is required to load"])
        self.settings = settings
        self.database = settings.snowflake.database
        self.s3 = s3
        self.credentials_source = credentials_source
        self.tables = Tables(self.database)
        self.pipes = Pipes(settings, snowpipe)
        self.control_schema_ready = False

    def load(self, sf_conn: SnowflakeConnection, objects: Sequence[StagedObject]) -> list[FileOutcome]:
        """Load every object, one COPY per (table, run) group; one outcome per object, in order.
        Then mark the runs the batch completed ``loaded``."""
        session = LoadSession(self.settings, self.database, sf_conn, self.s3)
        batch = _Batch(self, session)
        by_key: dict[str, FileOutcome] = {}
        for group in group_files(objects):
            for outcome in batch.load_group_or_each(group):
                by_key[outcome.staged.key] = outcome
        return self._complete_runs(batch, [by_key[o.key] for o in objects])

    def _complete_runs(self, batch: _Batch, outcomes: list[FileOutcome]) -> list[FileOutcome]:
        """``complete_run`` once for each run the batch loaded a file of; the outcome of its swap or
        deletes is reported on its files. A failed swap or deletes fails the run's files of this
        batch, so their messages return to the queue and the next delivery applies it again."""
        runs = sorted(
            {
                (o.staged.table, o.staged.run_id)
                for o in outcomes
                if o.error is None
                and o.staged.run_id
                # A change file that waits was not loaded: its run is not complete (and a change
                # run is completed by the apply that loads its files, not here).
                and not (o.result is not None and o.result.status is LoadStatus.WAITING)
            }
        )
        for table, run_id in runs:
            if (table, run_id) in batch.completed:
                continue  # a change run the apply completed already (no swap or deletes to report)
            try:
                completed = complete_run(
                    settings=self.settings,
                    sf_conn=batch.session.sf_conn,
                    s3=self.s3,
                    table=table,
                    run_id=run_id,
                    credentials_source=self.credentials_source,
                    tables=self.tables,
                )
            except (PgSnowError, SnowflakeDriverError, OSError) as exc:
                failure = classify_snowflake_error(exc, table=table.qualified, run_id=run_id)
                outcomes = _fail_run(outcomes, table, run_id, failure, applies=batch.applies(table, run_id))
                continue
            if completed.outcome is not None:
                outcomes = [
                    o.with_run_outcome(completed.outcome)
                    if (o.staged.table, o.staged.run_id) == (table, run_id)
                    else o
                    for o in outcomes
                ]
        return outcomes

    def forget(self, staged: StagedObject) -> None:
        """After a failure that may mean someone changed or dropped the file's table (or the ledger,
        or a pipe) underneath: prepare them again on the retry."""
        targets = [self.tables.target(staged.table)]
        if staged.run_id is not None:
            targets.append(self.tables.shadow(staged.table, staged.run_id))
        self.tables.forget(*targets)
        self.tables.ledgers.forget(staged.table)
        self.pipes.forget()
        self.control_schema_ready = False


@dataclass
class _Batch:
    """One batch's session and what it read once: run manifests, the AWS credentials."""

    loader: Loader
    session: LoadSession
    # As read, with the version a conditional rewrite needs (a change run's completion uses it).
    manifests: dict[tuple[Any, str], VersionedManifest] = field(default_factory=dict)
    aws_credentials: AwsCredentials | None = None
    # Runs this batch's change applies marked ``loaded`` (load.changes): not completed again.
    completed: set[tuple[TableRef, str]] = field(default_factory=set)

    def load_group_or_each(self, group: list[StagedObject]) -> list[FileOutcome]:
        try:
            return self._load_group(group)
        except PgSnowError as exc:
            if len(group) == 1 or exc.retryable:
                log_failure(exc, group[0])
                return [FileOutcome(staged, error=_for_file(exc, staged, len(group))) for staged in group]
            logger.warning(
                "group load failed; loading its files one by one",
                extra={"table": group[0].table.qualified, "files": len(group), "error": exc.message},
            )
        return [outcome for staged in group for outcome in self.load_group_or_each([staged])]

    def _load_group(self, group: list[StagedObject]) -> list[FileOutcome]:
        started = time.monotonic()
        first = group[0]
        s3_key = first.key if len(group) == 1 else None
        try:
            if not self.loader.control_schema_ready:
                self.session.execute(build_create_schema(self.session.database, self.session.control_schema))
                self.loader.control_schema_ready = True
            # The table's own ledger (DDL: before the group's transaction), once per container.
            self.loader.tables.ledgers.ensure(self.session.ledger(first.table))
            outcomes: dict[str, FileOutcome] = {}
            present: Present = []
            for staged in group:
                facts = head_staged_object(self.session.s3, self.session.bucket, staged)
                if facts is None:
                    outcomes[staged.key] = self._outcome_for_missing_object(staged, started)
                elif staged.run_id is not None and (
                    mismatch := manifest_mismatch(self.manifest(staged), staged, facts)
                ):
                    outcomes[staged.key] = FileOutcome(staged, error=mismatch)
                else:
                    present.append((staged, facts))
            if present:
                for outcome in self._copy_group(present, started):
                    outcomes[outcome.staged.key] = outcome
        except PgSnowError as exc:
            self.loader.forget(first)
            # adds the group's context to our own error
            classify_snowflake_error(exc, table=first.table.qualified, s3_key=s3_key, run_id=first.run_id)
            raise
        except (SnowflakeDriverError, OSError) as exc:
            self.loader.forget(first)
            raise classify_snowflake_error(
                exc, table=first.table.qualified, s3_key=s3_key, run_id=first.run_id
            ) from exc
        return [outcomes[staged.key] for staged in group]

    def manifest(self, staged: StagedObject) -> RunManifest:
        assert staged.run_id is not None
        cache_key = (staged.table, staged.run_id)
        if cache_key not in self.manifests:
            self.manifests[cache_key] = read_run_manifest(
                self.session.s3, self.session.bucket, staged.table, staged.run_id
            )
        return self.manifests[cache_key].manifest

    def _outcome_for_missing_object(self, staged: StagedObject, started: float) -> FileOutcome:
        """A redelivered event for a file already loaded and cleaned up is fine; anything else is not."""
        entry = self.session.ledger(staged.table).loaded_row(staged.key)
        if entry is not None:
            return already_loaded(staged, entry.rows_loaded, started)
        error = PermanentError(
            "the staged object no longer exists and was never loaded",
            s3_key=staged.key,
            table=staged.table.qualified,
            run_id=staged.run_id,
        )
        log_failure(error, staged)
        return FileOutcome(staged, error=error)

    def _copy_group(self, present: Present, started: float) -> list[FileOutcome]:
        """Prepare the group's target (DDL, before its transaction), then load it."""
        session, tables = self.session, self.loader.tables
        first = present[0][0]
        table, target = first.table, tables.target(first.table)
        manifest = None if first.run_id is None else self.manifest(first)
        if is_change_run(manifest):
            self._ensure_temporary_stage()  # DDL: before the apply's transaction
            return self._apply_changes(present, started)
        write_mode = WriteMode.APPEND if manifest is None else WriteMode(manifest.write_mode)
        copy_target, table_altered = target, False
        if manifest is None:
            columns = tables.dropped_file_columns(
                session.sf_conn,
                session.s3,
                session.bucket,
                first,
                allow_create=session.settings.load.allow_create_for_dropped_files,
            )
        else:
            columns = [LoadColumn.from_manifest(c) for c in manifest.columns]
            if write_mode is WriteMode.REPLACE:
                copy_target = tables.shadow(table, manifest.run_id)
                tables.prepare(session.sf_conn, table, manifest.columns, copy_target)
            else:
                table_altered = tables.prepare(session.sf_conn, table, manifest.columns, target)
                if write_mode is WriteMode.MERGE and not manifest.cursor_column:
                    tables.ensure_run_id_column(session.sf_conn, target)
        # A pipe's COPY has the run's columns in the run's order; a hand-dropped file has its own
        # (its header's), so it loads with COPY like any other file. So does a run that leaves out
        # a column of the table (a pipe made before the source dropped it would put the run's
        # values into the wrong columns).
        through_snowpipe = (
            session.settings.load.method is LoadMethod.SNOWPIPE
            and write_mode is WriteMode.APPEND
            and manifest is not None
            and copy_target not in tables.with_unsent_columns
        )
        if not through_snowpipe:
            self._ensure_temporary_stage()  # DDL: before the group's transaction
        session.execute(
            build_query_tag(
                run_id=first.run_id,
                table=table,
                s3_key=first.key if len(present) == 1 else f"{len(present)} files",
            )
        )
        if through_snowpipe:
            return self.loader.pipes.load(session, present, columns, started, redefine_pipe=table_altered)
        return self._copy(
            present,
            columns=columns,
            copy_target=copy_target,
            target=target,
            manifest=manifest,
            started=started,
        )

    def _copy(
        self,
        present: Present,
        *,
        columns: Sequence[LoadColumn],
        copy_target: Target,
        target: Target,
        manifest: RunManifest | None,
        started: float,
    ) -> list[FileOutcome]:
        session = self.session
        if manifest is None or WriteMode(manifest.write_mode) is not WriteMode.MERGE:
            return CopyJob(session, present, columns, copy_target, target, None, manifest, started).run()
        # DDL commits a transaction in Snowflake, so the work table exists before ours begins.
        with work_table(session, MERGE_WORK_TABLE, manifest.columns) as merge_from:
            return CopyJob(session, present, columns, merge_from, target, merge_from, manifest, started).run()

    def _apply_changes(self, present: Present, started: float) -> list[FileOutcome]:
        """A change run's files (mode cdc): apply the table's change runs in order from its applied
        position (load.changes), then report each file: loaded by this apply, loaded before, or
        waiting (its run is applied when what it waits for arrives)."""
        session, loader = self.session, self.loader
        table = present[0][0].table

        def complete(found: VersionedManifest) -> object:
            run_table, run_id = found.manifest.table, found.manifest.run_id
            completed = complete_run(
                settings=session.settings,
                sf_conn=session.sf_conn,
                s3=session.s3,
                table=run_table,
                run_id=run_id,
                credentials_source=loader.credentials_source,
                tables=loader.tables,
                base=found,
            )
            if completed.state is RunState.LOADED:
                self.completed.add((run_table, run_id))
            return completed

        # The delivered files' manifests and HEADs are not read again by the catch-up (a run this
        # batch completed is: its manifest changed since).
        known = {
            run_id: found
            for (of_table, run_id), found in self.manifests.items()
            if of_table == table and (of_table, run_id) not in self.completed
        }
        results = ChangeApplier(session, loader.tables, complete).catch_up(
            table, known_manifests=known, known_files=present
        )
        applied_now = {key: rows for result in results for key, rows in result.rows.items()}
        # Only the files this call did not apply can have been loaded before (one look-up, or none).
        earlier = [staged.key for staged, _ in present if staged.key not in applied_now]
        recorded = session.ledger(table).loaded_rows(earlier) if earlier else {}
        outcomes = []
        for staged, _ in present:
            if staged.key in applied_now:
                status, rows = LoadStatus.LOADED, applied_now[staged.key]
            elif staged.key in recorded:
                status, rows = LoadStatus.ALREADY_LOADED, recorded[staged.key].rows_loaded or 0
            else:
                status, rows = LoadStatus.WAITING, 0
            result = LoadResult(staged.key, table.qualified, status, rows, elapsed_ms(started), staged.run_id)
            outcomes.append(FileOutcome(staged, result=result))
        return outcomes

    def applies(self, table: TableRef, run_id: str) -> bool:
        """Does completing this run swap a table in or delete rows (as its manifest says)?"""
        found = self.manifests.get((table, run_id))
        manifest = None if found is None else found.manifest
        return (
            manifest is not None
            and not is_change_run(manifest)
            and (
                WriteMode(manifest.write_mode) is WriteMode.REPLACE
                or DeleteMode(manifest.deletes) is not DeleteMode.NONE
            )
        )

    def stage_credentials(self) -> AwsCredentials | None:
        """The credentials Snowflake reads S3 with, when pgsnow sends them (no integration)."""
        source = self.loader.credentials_source
        if self.session.settings.snowflake.storage_integration or source is None:
            return None
        if self.aws_credentials is None:
            self.aws_credentials = aws_credentials_from(source)
        return self.aws_credentials

    def _ensure_temporary_stage(self) -> None:
        """The credentials method: (re)create this session's temporary stage when the loader's AWS
        credentials are not the ones it holds (first use, rotated, refreshed near expiry).

        Snowpipe is refused without an integration (config): a pipe reads after we return.
        """
        credentials = self.stage_credentials()
        if credentials is None:
            return
        session, stages = self.session, _temporary_stage_credentials
        if stages.get(session.sf_conn) == credentials.fingerprint:
            return
        settings = session.settings
        session.execute_with_credentials(
            build_create_temporary_stage(
                session.database,
                session.control_schema,
                settings.snowflake.stage,
                bucket=settings.bucket,
                prefix=settings.prefix,
                credentials=credentials,
            ),
            credentials,
        )
        stages[session.sf_conn] = credentials.fingerprint
        logger.info(
            "temporary stage created with the loader's AWS credentials",
            extra={"stage": settings.snowflake.stage},
        )


def _for_file(exc: PgSnowError, staged: StagedObject, group_size: int) -> PgSnowError:
    if group_size == 1:
        exc.s3_key = exc.s3_key or staged.key
        exc.table = exc.table or staged.table.qualified
        exc.run_id = exc.run_id or staged.run_id
    return exc


def _fail_run(
    outcomes: list[FileOutcome], table: TableRef, run_id: str, exc: PgSnowError, *, applies: bool
) -> list[FileOutcome]:
    """A run whose completion failed. Its swap or deletes must be applied by a later delivery, so
    its files fail; a run with nothing to apply only waits for its ``loaded`` marker (the next
    completion, or the cleanup pass, writes it), so its files stand."""
    if not applies:
        logger.warning(f"could not complete run: {exc.message}", extra=exc.context())
        return outcomes
    of_run = [o for o in outcomes if (o.staged.table, o.staged.run_id) == (table, run_id)]
    log_failure(exc, of_run[0].staged)
    return [FileOutcome(o.staged, error=exc) if o in of_run and o.error is None else o for o in outcomes]


def load_batch(
    *,
    settings: Settings,
    sf_conn: SnowflakeConnection,
    s3: S3Client,
    objects: Sequence[StagedObject],
    aws_credentials: CredentialsSource | None = None,
    snowpipe: SnowpipeClient | None = None,
) -> list[FileOutcome]:
    """Load every object with a loader of its own (nothing remembered from an earlier call)."""
    loader = Loader(settings, s3, credentials_source=aws_credentials, snowpipe=snowpipe)
    return loader.load(sf_conn, objects)


def load_staged_files(
    *,
    settings: Settings,
    sf_conn: SnowflakeConnection,
    s3: S3Client,
    objects: Sequence[StagedObject],
    aws_credentials: CredentialsSource | None = None,
    snowpipe: SnowpipeClient | None = None,
) -> list[LoadResult]:
    """``load_batch``'s results, where the first file that failed raises."""
    outcomes = load_batch(
        settings=settings,
        sf_conn=sf_conn,
        s3=s3,
        objects=objects,
        aws_credentials=aws_credentials,
        snowpipe=snowpipe,
    )
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return [o.result for o in outcomes if o.result is not None]
