"""LOAD_METHOD=snowpipe: each table's pipe (made by the loader with its own COPY), files submitted
with insertFiles, confirmed with insertReport/loadHistoryScan, then recorded in the ledger.

The ledger row of a file is committed as loaded only after Snowpipe reported it LOADED. A file the
ledger holds as loaded is skipped and never submitted again. A file submitted by an attempt that
died before recording it is submitted again: Snowpipe's load metadata (14 days per pipe) does not
load the same path twice, and its earlier outcome is found with loadHistoryScan from the ledger's
SUBMITTED_AT.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from pgsnow.config import Settings
from pgsnow.errors import ConfigError, PermanentError
from pgsnow.keys import StagedObject
from pgsnow.ledger import LedgerRecord
from pgsnow.load.copy import Present, claim_files, elapsed_ms, log_failure
from pgsnow.load.outcomes import FileOutcome, LoadResult, LoadStatus, ObjectFacts
from pgsnow.load.session import LoadSession
from pgsnow.manifest import META_ROWS
from pgsnow.observability import logger
from pgsnow.setup_sql import pipe_name
from pgsnow.snowflake.load_sql import LoadColumn, build_table_pipe, stage_file_path
from pgsnow.snowpipe import PipeFileReport, SnowpipeClient, qualified_pipe_name, snowpipe_client_from_settings


class Pipes:
    """The loader's pipes and its Snowpipe REST client, both kept across batches."""

    def __init__(self, settings: Settings, client: SnowpipeClient | None = None) -> None:
        self.settings = settings
        self._client = client  # built from the Snowflake secret on first use when None
        self._ready: set[str] = set()

    def client(self) -> SnowpipeClient:
        if self._client is None:
            self._client = snowpipe_client_from_settings(
                self.settings.snowflake, self.settings.load.snowpipe_host
            )
        return self._client

    def forget(self) -> None:
        """Create the pipes again when next used (a table under them may have changed)."""
        self._ready.clear()

    def ensure(
        self, session: LoadSession, staged: StagedObject, columns: Sequence[LoadColumn], *, redefine: bool
    ) -> str:
        """The table's pipe (created by the loader with the loader's own COPY); its REST name.

        Redefined (CREATE OR REPLACE) when schema evolution changed the table, so the new columns load.
        """
        prefix = self.settings.load.snowpipe_name
        if not prefix:
            raise ConfigError(["SNOWPIPE_NAME is required when LOAD_METHOD=snowpipe"])
        name = qualified_pipe_name(session.database, session.control_schema, prefix, staged.table)
        if name not in self._ready or redefine:
            session.execute(
                build_table_pipe(
                    database=session.database,
                    control_schema=session.control_schema,
                    stage=self.settings.snowflake.stage,
                    pipe=pipe_name(prefix, staged.table),
                    staged=staged,
                    columns=columns,
                    replace=redefine,
                )
            )
            self._ready.add(name)
        return name

    def load(
        self,
        session: LoadSession,
        present: Present,
        columns: Sequence[LoadColumn],
        started: float,
        *,
        redefine_pipe: bool,
    ) -> list[FileOutcome]:
        """Claim, submit (insertFiles), confirm (insertReport/loadHistoryScan), then record."""
        pipe = self.ensure(session, present[0][0], columns, redefine=redefine_pipe)
        ledger = session.ledger(present[0][0].table)
        earliest: dt.datetime | None = None
        with session.transaction():
            outcomes, to_submit = claim_files(session, present, started)
            if to_submit:
                keys = [staged.key for staged, _ in to_submit]
                earliest = ledger.earliest_submission(keys)
                ledger.mark_submitted(keys)
        if to_submit:
            outcomes.update(self._submit_and_record(session, pipe, to_submit, earliest, started))
        _log_pipe_outcomes(outcomes.values())
        return [outcomes[staged.key] for staged, _ in present]

    def _submit_and_record(
        self,
        session: LoadSession,
        pipe: str,
        to_submit: Present,
        earliest: dt.datetime | None,
        started: float,
    ) -> dict[str, FileOutcome]:
        client = self.client()
        stage = self.settings.snowflake.stage
        paths = {
            staged.key: stage_file_path(session.database, session.control_schema, stage, staged)
            for staged, _ in to_submit
        }
        client.submit(pipe, [(paths[staged.key], facts.size) for staged, facts in to_submit])
        reports = client.confirm(pipe, paths.values(), submitted_since=earliest)
        load_ms = elapsed_ms(started)
        outcomes = {
            staged.key: _report_outcome(staged, facts, reports[paths[staged.key]], load_ms)
            for staged, facts in to_submit
        }
        records = [
            LedgerRecord(
                o.result.key,
                o.result.rows,
                status="PARTIALLY_LOADED" if o.result.status is LoadStatus.PARTIALLY_LOADED else "LOADED",
                errors_seen=o.result.errors_seen,
                first_error=o.result.first_error,
            )
            for o in outcomes.values()
            if o.result is not None
        ]
        if records:
            with session.transaction():
                session.ledger(to_submit[0][0].table).record_loads(records)
        return outcomes


def _report_outcome(
    staged: StagedObject, facts: ObjectFacts, report: PipeFileReport, load_ms: int
) -> FileOutcome:
    context = {"s3_key": staged.key, "table": staged.table.qualified, "run_id": staged.run_id}
    if report.status == "LOAD_FAILED":
        error = PermanentError(
            f"Snowpipe failed to load the file: {report.first_error or 'no message'}", **context
        )
        return FileOutcome(staged, error=error)
    partial = report.status == "PARTIALLY_LOADED"
    if not partial and facts.rows is not None and report.rows_inserted != facts.rows:
        error = PermanentError(
            f"Snowpipe loaded {report.rows_inserted} rows, the file's {META_ROWS} says {facts.rows}",
            **context,
        )
        return FileOutcome(staged, error=error)
    result = LoadResult(
        staged.key,
        staged.table.qualified,
        LoadStatus.PARTIALLY_LOADED if partial else LoadStatus.LOADED,
        report.rows_inserted,
        load_ms,
        staged.run_id,
        report.errors_seen if partial else 0,
        report.first_error if partial else None,
    )
    return FileOutcome(staged, result=result)


def _log_pipe_outcomes(outcomes: Iterable[FileOutcome]) -> None:
    for outcome in outcomes:
        if outcome.error is not None:
            log_failure(outcome.error, outcome.staged)
        elif outcome.result is not None and outcome.result.status is not LoadStatus.ALREADY_LOADED:
            logger.info(
                f"file {outcome.result.status.value} through Snowpipe",
                extra={
                    "table": outcome.result.table,
                    "s3_key": outcome.result.key,
                    "rows": outcome.result.rows,
                },
            )
