"""One group's COPY (and MERGE) transaction: claim every file in its table's ledger, load, check
what COPY reports against each file's row count, record, commit. A file is loaded and recorded,
or neither. The group costs the same statements whatever its size (docs/loading.md): the claim,
the look-up, the COPY (a merge run's MERGE), the record, the COMMIT."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pgsnow.errors import PermanentError, PgSnowError
from pgsnow.keys import StagedObject
from pgsnow.ledger import LedgerClaim, LedgerRecord
from pgsnow.load.insert import insert_file, is_insertable
from pgsnow.load.outcomes import FileOutcome, LoadResult, LoadStatus, ObjectFacts
from pgsnow.load.session import LoadSession
from pgsnow.load.tables import Target
from pgsnow.manifest import META_ROWS, RunManifest
from pgsnow.observability import logger
from pgsnow.snowflake.load_sql import LoadColumn, build_copy_into
from pgsnow.snowflake.table_sql import build_merge_from

Present = list[tuple[StagedObject, ObjectFacts]]  # the group's files that exist, with their facts


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def log_failure(exc: PgSnowError, staged: StagedObject) -> None:
    logger.error(f"load failed: {exc.message}", extra={**exc.context(), "s3_key": exc.s3_key or staged.key})


def already_loaded(staged: StagedObject, rows: int | None, started: float) -> FileOutcome:
    result = LoadResult(
        staged.key,
        staged.table.qualified,
        LoadStatus.ALREADY_LOADED,
        rows or 0,
        elapsed_ms(started),
        staged.run_id,
    )
    return FileOutcome(staged, result=result)


def claim_files(
    session: LoadSession, present: Present, started: float
) -> tuple[dict[str, FileOutcome], Present]:
    """Claim the group's keys in its table's ledger (inside the caller's transaction): one MERGE
    for every key, one look-up of those already loaded.

    Returns the ``already_loaded`` outcomes of files the ledger shows loaded with this content, and
    the files still to load; changed content under a loaded key is a PermanentError (the group
    then loads file by file, so only that file fails).
    """
    table = present[0][0].table
    ledger = session.ledger(table)
    ledger.claim(
        [
            LedgerClaim(staged.key, facts.etag, facts.sha256, facts.run_id, table.schema, table.table)
            for staged, facts in present
        ]
    )
    loaded = ledger.loaded_rows([staged.key for staged, _ in present])
    done: dict[str, FileOutcome] = {}
    to_load: Present = []
    for staged, facts in present:
        entry = loaded.get(staged.key)
        if entry is None:
            to_load.append((staged, facts))
            continue
        if not entry.matches(sha256=facts.sha256, etag=facts.etag):
            raise PermanentError(
                "changed file under a loaded key: the key was loaded with other content "
                f"(etag {entry.etag}, sha256 {entry.sha256}); stage changed data under a new key",
                s3_key=staged.key,
            )
        done[staged.key] = already_loaded(staged, entry.rows_loaded, started)
    return done, to_load


@dataclass(frozen=True)
class CopyJob:
    """One group's load: where its COPY goes (the target, a shadow or a merge work table)."""

    session: LoadSession
    present: Present
    columns: Sequence[LoadColumn]
    copy_target: Target
    target: Target
    work_table: Target | None
    manifest: RunManifest | None
    started: float

    def run(self) -> list[FileOutcome]:
        """Claim, COPY (and MERGE), record and commit the group's files in ONE transaction."""
        with self.session.transaction():
            done, to_load = claim_files(self.session, self.present, self.started)
            outcomes = list(done.values())
            if to_load:
                outcomes += self._load(to_load)
        _log_outcomes(outcomes)
        return outcomes

    def _load(self, to_load: Present) -> list[FileOutcome]:
        copy_started = time.monotonic()
        copy_rows = self._insert_or_copy(to_load)
        copy_ms = elapsed_ms(copy_started)
        checked = check_copy_results(copy_rows, to_load)
        # An empty work table has nothing to merge: skip the statement (it would only cost
        # warehouse time) rather than send a MERGE that changes no row.
        loaded_rows = sum(c.rows_loaded for c in checked if c.error is None)
        if self.work_table is not None and self.manifest is not None and loaded_rows > 0:
            self.session.execute(
                *build_merge_from(
                    target=self.target,
                    source=self.work_table,
                    columns=self.manifest.columns,
                    primary_key=self.manifest.primary_key,
                    cursor_column=self.manifest.cursor_column,
                    run_id=self.manifest.run_id,
                )
            )
        outcomes = [
            _outcome(staged, file_check, copy_ms)
            for (staged, _), file_check in zip(to_load, checked, strict=True)
        ]
        # One statement records every loaded file of the group (a file COPY skipped stays claimed only).
        records = [
            LedgerRecord(
                o.result.key,
                o.result.rows,
                status="PARTIALLY_LOADED" if o.result.errors_seen else "LOADED",
                errors_seen=o.result.errors_seen,
                first_error=o.result.first_error,
            )
            for o in outcomes
            if o.result is not None
        ]
        if records:
            self.session.ledger(to_load[0][0].table).record_loads(records)
        return outcomes

    def _insert_or_copy(self, to_load: Present) -> list[dict[str, Any]]:
        """Load the files (in the caller's transaction); one COPY-shaped result row per file."""
        session, settings = self.session, self.session.settings
        inserted = [s for s, f in to_load if is_insertable(settings.load, s, f, self.manifest)]
        copied = [s for s, f in to_load if not is_insertable(settings.load, s, f, self.manifest)]
        result_rows = [
            insert_file(
                session.sf_conn,
                session.s3,
                session.bucket,
                staged,
                columns=self.columns,
                target=self.copy_target,
            )
            for staged in inserted
        ]
        if copied:
            copy_sql = build_copy_into(
                database=session.database,
                control_schema=session.control_schema,
                stage=settings.snowflake.stage,
                staged=copied,
                columns=self.columns,
                on_error=settings.load.on_error.value,
                target=self.copy_target,
            )
            result_rows += session.execute_dicts(copy_sql)
        return result_rows


def _outcome(staged: StagedObject, file_check: FileCheck, copy_ms: int) -> FileOutcome:
    if file_check.error is not None:
        return FileOutcome(staged, error=file_check.error)
    result = LoadResult(
        staged.key,
        staged.table.qualified,
        LoadStatus.PARTIALLY_LOADED if file_check.errors_seen else LoadStatus.LOADED,
        file_check.rows_loaded,
        copy_ms,
        staged.run_id,
        file_check.errors_seen,
        file_check.first_error,
    )
    return FileOutcome(staged, result=result)


def _log_outcomes(outcomes: Sequence[FileOutcome]) -> None:
    for outcome in outcomes:
        if outcome.result is not None:
            level = logger.warning if outcome.result.errors_seen else logger.info
            level(
                f"file {outcome.result.status.value}",
                extra={
                    "table": outcome.result.table,
                    "s3_key": outcome.result.key,
                    "run_id": outcome.result.run_id,
                    "rows": outcome.result.rows,
                    "errors_seen": outcome.result.errors_seen,
                    "first_error": outcome.result.first_error,
                    "duration_ms": outcome.result.duration_ms,
                },
            )
        elif outcome.error is not None:
            log_failure(outcome.error, outcome.staged)


@dataclass(frozen=True)
class FileCheck:
    """Snowflake's COPY result for one file, checked against the file's own row count."""

    rows_loaded: int = 0
    errors_seen: int = 0
    first_error: str | None = None
    error: PgSnowError | None = None  # the file was not loaded (SKIP_FILE): it fails on its own


def check_copy_results(result: Sequence[dict[str, Any]], files: Present) -> list[FileCheck]:
    """One check per file, in order. A file missing from the result, or a loaded file whose
    row count differs from its metadata, fails the whole statement (the caller rolls back)."""
    by_name: dict[str, dict[str, Any]] = {}
    for result_row in result:
        if "rows_loaded" in result_row:
            by_name[str(result_row.get("file", ""))] = result_row
    checks = []
    for staged, facts in files:
        context = {"s3_key": staged.key, "table": staged.table.qualified, "run_id": staged.run_id}
        matching = [
            r
            for name, r in by_name.items()
            if name.endswith("/" + staged.file_name) or name == staged.file_name
        ]
        if not matching:
            summary = "; ".join(str(r.get("status", r)) for r in result) or "no result rows"
            raise PermanentError(f"COPY did not report this file: {summary}", **context)
        checks.append(_check_file(matching[0], facts, context))
    return checks


def _check_file(row: dict[str, Any], facts: ObjectFacts, context: dict[str, Any]) -> FileCheck:
    status = str(row.get("status", "")).upper()
    rows_loaded = int(row.get("rows_loaded") or 0)
    rows_parsed = int(row.get("rows_parsed") or 0)
    errors_seen = int(row.get("errors_seen") or 0)
    first_error = row.get("first_error")
    if status == "LOADED":
        if rows_parsed != rows_loaded:
            raise PermanentError(f"COPY parsed {rows_parsed} rows but loaded {rows_loaded}", **context)
        if facts.rows is not None and rows_loaded != facts.rows:
            raise PermanentError(
                f"COPY loaded {rows_loaded} rows, the file's {META_ROWS} says {facts.rows}", **context
            )
        return FileCheck(rows_loaded)
    if status == "PARTIALLY_LOADED":
        rejected = errors_seen or max(rows_parsed - rows_loaded, 0)
        return FileCheck(rows_loaded, rejected, str(first_error) if first_error else None)
    if status == "LOAD_FAILED":
        return FileCheck(
            error=PermanentError(
                f"COPY skipped the file (LOAD_FAILED): {first_error or 'no message'}", **context
            )
        )
    raise PermanentError(f"COPY status {status}: {first_error or 'no error message'}", **context)
