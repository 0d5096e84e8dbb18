"""What one invocation of a run works with, and when it must stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

from pgsnow.checkpoint import Lease, RunCheckpoint
from pgsnow.config import Settings, TableOptions
from pgsnow.identifiers import TableRef
from pgsnow.observability import logger
from pgsnow.postgres import Connection, RowRange, TableSchema
from pgsnow.runs import RunStore

# Without a Lambda context (CLI, tests) a lease lasts this long unless renewed.
DEFAULT_LEASE_S = 16 * 60


class StopForDeadline(Exception):
    """Raised after a staged file when the deadline is near; aborts the COPY/cursor in progress."""


@dataclass(frozen=True)
class Deadline:
    """When to stop: ``remaining_ms`` (the Lambda context's) below ``margin_s``; never without one."""

    remaining_ms: Callable[[], int] | None = None
    margin_s: float = 60

    def near(self) -> bool:
        return self.remaining_ms is not None and self.remaining_ms() < self.margin_s * 1000

    def lease_ttl_s(self) -> float:
        if self.remaining_ms is None:
            return DEFAULT_LEASE_S
        return self.remaining_ms() / 1000 + 60  # a dead holder's lease outlives its deadline by a minute


@dataclass
class Invocation:
    """What this invocation works with before its run is opened (the lease it acquired)."""

    settings: Settings
    s3: Any
    store: RunStore
    pg_conn: Connection
    table: TableRef
    options: TableOptions
    lease: Lease
    deadline: Deadline
    work_dir: Path


@dataclass
class ExtractionRun(Invocation):
    """The invocation's open run (mutable: the checkpoint advances file by file, and every save
    renews the lease)."""

    schema: TableSchema
    checkpoint: RunCheckpoint
    run_filter: sql.Composable | None = None
    filter_params: tuple[Any, ...] = ()
    staged_this_invocation: int = 0

    @classmethod
    def open(
        cls,
        invocation: Invocation,
        schema: TableSchema,
        checkpoint: RunCheckpoint,
        run_filter: sql.Composable | None,
        filter_params: tuple[Any, ...],
    ) -> ExtractionRun:
        """The run of ``checkpoint``, saved (which renews the invocation's lease)."""
        inherited = {f.name: getattr(invocation, f.name) for f in fields(Invocation)}
        run = cls(
            **inherited,
            schema=schema,
            checkpoint=checkpoint,
            run_filter=run_filter,
            filter_params=filter_params,
        )
        run.save(checkpoint)
        return run

    @property
    def run_id(self) -> str:
        return self.checkpoint.run_id

    def rows(self, after: tuple[str, ...] | None, through: tuple[str, ...] | None) -> RowRange:
        return RowRange(self.checkpoint.order_key, after, through, self.run_filter, self.filter_params)

    def save(self, checkpoint: RunCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.store.save_checkpoint(checkpoint)
        self.lease = self.store.renew_lease(self.lease, ttl_s=self.deadline.lease_ttl_s())


def end_snapshot(pg_conn: Connection) -> None:
    """Close the read-only transaction; a broken connection is the caller's to replace."""
    if pg_conn.closed:
        return
    try:
        pg_conn.rollback()
    except psycopg2.Error:
        logger.warning("could not end the PostgreSQL transaction; the connection will be replaced")
        pg_conn.close()
