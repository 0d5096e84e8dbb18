"""The records of a table's extraction state: the lease, a run's checkpoint, the watermark and the
published columns, with their JSON forms.

``pgsnow.runs.RunStore`` reads and writes them under ``_pgsnow/state/{schema}/{table}/`` and
describes the protocol (docs/extraction.md too):

* ``Lease``: who may extract the table now (``lease.json``, written conditionally), or one range
  of a parallel run (``runs/{run_id}/ranges/{n}.lease.json``);
* ``RunCheckpoint``: the chunks a run finished with their files, the chunk in progress (its
  fixed key range), and what the run decided at its start (file format, watermark before, safe
  point) (``runs/{run_id}.json``); a parallel run's checkpoint lists its key ranges
  (``RangeRecord``), and each range has a checkpoint of its own, a ``RunCheckpoint`` with ``range``
  set (``runs/{run_id}/ranges/{n}.json``);
* ``Watermark``: the incremental cursor value the next run starts from (``watermark.json``);
* ``PublishedColumns``: the columns (with their Snowflake types) of the table's last staged run
  (``columns.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from pgsnow.errors import PermanentError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat
from pgsnow.manifest import (  # the manifest's own encodings of files and columns
    Column,
    StagedFile,
    _file_from_json,
    _file_to_json,
    column_from_json,
    column_to_json,
)

STATE_VERSION = 1


@dataclass(frozen=True)
class PublishedColumns:
    """The columns of a table's last staged run, as its manifest described them."""

    run_id: str
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    def to_json(self) -> bytes:
        return json.dumps(
            {"run_id": self.run_id, "columns": [column_to_json(c) for c in self.columns]}
        ).encode()

    @classmethod
    def from_json(cls, text: bytes, *, s3_key: str) -> PublishedColumns:
        try:
            body = json.loads(text)
            return cls(str(body["run_id"]), tuple(column_from_json(c) for c in body["columns"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"malformed published columns state: {exc!r}", s3_key=s3_key) from exc


class RunInProgressError(RetryableError):
    """Another invocation holds the table's lease: this one must not extract it now."""


class LeaseLostError(RetryableError):
    """The lease changed under its holder (it expired and was taken over): stop writing."""


# The owner a parallel run's table lease names while its ranges are extracted: no single
# invocation holds it; every range worker extends it, and the worker that finishes the run's
# last range takes it over (conditionally: exactly one does) to finish the run.
RANGES_OWNER = "parallel-ranges"


@dataclass(frozen=True)
class Lease:
    table: TableRef
    run_id: str
    owner: str | None  # None: handed off, free for the run's continuation (or anyone resuming it)
    expires_at: float  # epoch seconds
    etag: str
    range_index: int | None = None  # the lease of one range of a parallel run, not the table's

    def body(self) -> bytes:
        return json.dumps(
            {"run_id": self.run_id, "owner": self.owner, "expires_at": self.expires_at}, sort_keys=True
        ).encode()

    @classmethod
    def from_json(cls, table: TableRef, text: bytes, *, etag: str, range_index: int | None = None) -> Lease:
        body = json.loads(text)
        return cls(
            table, str(body["run_id"]), body.get("owner"), float(body["expires_at"]), etag, range_index
        )


@dataclass(frozen=True)
class RangeRecord:
    """One key range of a parallel run: ``after < order key <= through`` (None: open end), fixed
    when the run is planned and extracted by one worker at a time."""

    index: int
    after: tuple[str, ...] | None
    through: tuple[str, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "after": list(self.after) if self.after is not None else None,
            "through": list(self.through) if self.through is not None else None,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RangeRecord:
        return cls(int(body["index"]), _key(body.get("after")), _key(body.get("through")))


def _key(value: Any) -> tuple[str, ...] | None:
    return tuple(str(v) for v in value) if value is not None else None


@dataclass(frozen=True)
class ChunkRecord:
    """One primary-key (or cursor+key) range of a run; ``after``/``through`` are key values as text."""

    index: int
    after: tuple[str, ...] | None
    through: tuple[str, ...] | None  # None: the run's last chunk runs to the end
    files: tuple[StagedFile, ...] = ()
    resume_after: tuple[str, ...] | None = None  # order key of the last row of the last file written

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "after": list(self.after) if self.after is not None else None,
            "through": list(self.through) if self.through is not None else None,
            "files": [_file_to_json(f) for f in self.files],
            "resume_after": list(self.resume_after) if self.resume_after is not None else None,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ChunkRecord:
        return cls(
            index=int(body["index"]),
            after=_key(body.get("after")),
            through=_key(body.get("through")),
            files=tuple(_file_from_json(f) for f in body.get("files", [])),
            resume_after=_key(body.get("resume_after")),
        )


@dataclass(frozen=True)
class RunCheckpoint:
    run_id: str
    table: TableRef
    mode: str
    file_format: FileFormat
    order_key: tuple[str, ...]
    state: str = "extracting"  # then staged or failed, like the manifest
    watermark_before: str | None = None
    lower_cursor: str | None = None  # the run's `>=` bound (watermark minus lookback)
    safe_point: str | None = None  # incremental: the watermark may not pass this
    finished: tuple[ChunkRecord, ...] = ()
    in_progress: ChunkRecord | None = None  # fixed before its first file is written
    invocations: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    ranges: tuple[RangeRecord, ...] = ()  # a parallel run: its key ranges, each extracted by a worker
    range: RangeRecord | None = None  # the checkpoint of one range of a parallel run

    @property
    def files(self) -> tuple[StagedFile, ...]:
        """Every file staged so far, the chunk in progress included, in key order."""
        chunks = (*self.finished, *((self.in_progress,) if self.in_progress else ()))
        return tuple(f for chunk in chunks for f in chunk.files)

    @property
    def next_after(self) -> tuple[str, ...] | None:
        if self.finished:
            return self.finished[-1].through
        return self.range.after if self.range is not None else None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": STATE_VERSION,
                "run_id": self.run_id,
                "table": {"schema": self.table.schema, "name": self.table.table},
                "mode": self.mode,
                "file_format": self.file_format.value,
                "order_key": list(self.order_key),
                "state": self.state,
                "watermark_before": self.watermark_before,
                "lower_cursor": self.lower_cursor,
                "safe_point": self.safe_point,
                "finished": [c.to_json() for c in self.finished],
                "in_progress": self.in_progress.to_json() if self.in_progress else None,
                "invocations": self.invocations,
                "timings": self.timings,
                "ranges": [r.to_json() for r in self.ranges],
                "range": self.range.to_json() if self.range is not None else None,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: bytes, *, s3_key: str) -> RunCheckpoint:
        try:
            body = json.loads(text)
            if body.get("format_version") != STATE_VERSION:
                raise PermanentError(f"unsupported checkpoint format_version {body.get('format_version')!r}")
            return cls(
                run_id=body["run_id"],
                table=TableRef(body["table"]["schema"], body["table"]["name"]),
                mode=body["mode"],
                file_format=FileFormat(body["file_format"]),
                order_key=tuple(body["order_key"]),
                state=str(body.get("state", "extracting")),
                watermark_before=body.get("watermark_before"),
                lower_cursor=body.get("lower_cursor"),
                safe_point=body.get("safe_point"),
                finished=tuple(ChunkRecord.from_json(c) for c in body.get("finished", [])),
                in_progress=ChunkRecord.from_json(body["in_progress"]) if body.get("in_progress") else None,
                invocations=int(body.get("invocations", 1)),
                timings={str(k): float(v) for k, v in (body.get("timings") or {}).items()},
                ranges=tuple(RangeRecord.from_json(r) for r in body.get("ranges") or []),
                range=RangeRecord.from_json(body["range"]) if body.get("range") else None,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"malformed checkpoint: {exc!r}", s3_key=s3_key) from exc

    def evolve(self, **changes: Any) -> RunCheckpoint:
        return replace(self, **changes)


@dataclass(frozen=True)
class Watermark:
    cursor_column: str
    value: str  # the cursor value as PostgreSQL text
    run_id: str

    def to_json(self) -> bytes:
        return json.dumps(
            {"cursor_column": self.cursor_column, "value": self.value, "run_id": self.run_id}
        ).encode()

    @classmethod
    def from_json(cls, text: bytes) -> Watermark:
        body = json.loads(text)
        return cls(str(body["cursor_column"]), str(body["value"]), str(body["run_id"]))
