"""What a load reports: one outcome per file, the run's outcome, and what HEAD said of a file."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from pgsnow.errors import PgSnowError
from pgsnow.keys import StagedObject


class LoadStatus(StrEnum):
    LOADED = "loaded"
    ALREADY_LOADED = "already_loaded"
    PARTIALLY_LOADED = "partially_loaded"  # ON_ERROR = CONTINUE rejected some rows
    # A change file (mode cdc) whose run waits for a predecessor or another of its files: done
    # with this event; the run is applied when the one it waits for arrives (load.changes).
    WAITING = "waiting"


class RunOutcome(StrEnum):
    """What became of a complete run's swap (replace) or deletes, recorded in the ledger's mark."""

    APPLIED = "applied"
    # A newer run of the table reached the target first: applying this run's key list (or
    # swapping in its table) would remove rows the newer run wrote, so it is not applied.
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class LoadResult:
    key: str
    table: str  # the source table, schema.table
    status: LoadStatus
    rows: int
    duration_ms: int
    run_id: str | None = None
    errors_seen: int = 0  # rows rejected (ON_ERROR = CONTINUE)
    first_error: str | None = None
    run_outcome: RunOutcome | None = None  # set on the files of the batch that completed their run

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "table": self.table,
            "status": self.status.value,
            "rows": self.rows,
            "duration_ms": self.duration_ms,
            "run_id": self.run_id,
            "errors_seen": self.errors_seen,
            "first_error": self.first_error,
            "run_outcome": None if self.run_outcome is None else self.run_outcome.value,
        }


@dataclass(frozen=True)
class FileOutcome:
    """One file's outcome in a batch: a result, or the error that kept it from loading."""

    staged: StagedObject
    result: LoadResult | None = None
    error: PgSnowError | None = None

    def with_run_outcome(self, run_outcome: RunOutcome) -> FileOutcome:
        if self.result is None:
            return self
        return replace(self, result=replace(self.result, run_outcome=run_outcome))


@dataclass(frozen=True)
class ObjectFacts:
    """What HEAD says about a staged object."""

    etag: str
    size: int
    run_id: str | None
    rows: int | None
    sha256: str | None
