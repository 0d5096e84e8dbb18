"""Extraction state in S3: the per-table lease, the per-run checkpoint and the committed watermark.

Everything lives under ``_pgsnow/state/{schema}/{table}/`` (outside the staging prefix, so the
loader's notification never sees it):

* ``lease.json``: who may extract the table now. Created with ``If-None-Match: *`` and renewed,
  handed off or released with ``If-Match: <etag>`` (S3 conditional writes), so two runs for the
  same table can never both hold it. A holder that dies leaves a lease that expires; the next
  invocation takes it over (again with ``If-Match``) and resumes the unfinished run.
* ``runs/{run_id}.json``: the run's checkpoint: the chunks finished so far with their files,
  the chunk in progress (its fixed key range), and what the run decided at its start (file
  format, watermark before, safe point). Only the lease holder writes it.
* ``watermark.json``: the incremental cursor value the next run starts from; advanced only
  after the run's manifest is ``staged``.
* ``columns.json``: the columns (with their Snowflake types) of the table's last staged run,
  written with that run's manifest. The next run compares its own columns with these before
  staging anything (schema drift, the scale an unbounded ``numeric`` column was given).

docs/extraction.md describes the protocol.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.errors import PermanentError, RetryableError, aws_error_code
from pgsnow.identifiers import TableRef
from pgsnow.keys import CONTROL_PREFIX, FileFormat
from pgsnow.manifest import (  # the manifest's own encodings of files and columns
    Column,
    StagedFile,
    _file_from_json,
    _file_to_json,
    column_from_json,
    column_to_json,
)
from pgsnow.staging import classify_s3_error

STATE_VERSION = 1


def state_prefix(table: TableRef) -> str:
    return f"{CONTROL_PREFIX}/state/{table.schema}/{table.table}/"


def lease_key(table: TableRef) -> str:
    return state_prefix(table) + "lease.json"


def checkpoint_key(table: TableRef, run_id: str) -> str:
    return state_prefix(table) + f"runs/{run_id}.json"


def watermark_key(table: TableRef) -> str:
    return state_prefix(table) + "watermark.json"


def published_columns_key(table: TableRef) -> str:
    return state_prefix(table) + "columns.json"


@dataclass(frozen=True)
class PublishedColumns:
    """The columns of a table's last staged run, as its manifest described them."""

    run_id: str
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


class RunInProgressError(RetryableError):
    """Another invocation holds the table's lease: this one must not extract it now."""


class LeaseLostError(RetryableError):
    """The lease changed under its holder (it expired and was taken over): stop writing."""


@dataclass(frozen=True)
class Lease:
    table: TableRef
    run_id: str
    owner: str | None  # None: handed off, free for the run's continuation (or anyone resuming it)
    expires_at: float  # epoch seconds
    etag: str

    def body(self) -> bytes:
        return json.dumps(
            {"run_id": self.run_id, "owner": self.owner, "expires_at": self.expires_at}, sort_keys=True
        ).encode()


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
        def key(value: Any) -> tuple[str, ...] | None:
            return tuple(str(v) for v in value) if value is not None else None

        return cls(
            index=int(body["index"]),
            after=key(body.get("after")),
            through=key(body.get("through")),
            files=tuple(_file_from_json(f) for f in body.get("files", [])),
            resume_after=key(body.get("resume_after")),
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

    @property
    def files(self) -> tuple[StagedFile, ...]:
        """Every file staged so far, the chunk in progress included, in key order."""
        chunks = (*self.finished, *((self.in_progress,) if self.in_progress else ()))
        return tuple(f for chunk in chunks for f in chunk.files)

    @property
    def next_after(self) -> tuple[str, ...] | None:
        return self.finished[-1].through if self.finished else None

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


def _precondition_failed(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # 409 ConditionalRequestConflict: a concurrent conditional write on the same key won.
    return aws_error_code(exc) in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {412, 409}


class StateStore:
    """Reads and writes a table's extraction state in the staging bucket."""

    def __init__(self, s3: Any, bucket: str, *, clock: Callable[[], float] = time.time) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._clock = clock

    # --- objects ---

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._s3.get_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if aws_error_code(exc) in {"NoSuchKey", "404"}:
                return None
            raise classify_s3_error(exc, s3_key=key) from exc
        except BotoCoreError as exc:
            raise classify_s3_error(exc, s3_key=key) from exc
        return response["Body"].read(), str(response["ETag"])

    def _put(self, key: str, body: bytes, **condition: str) -> str:
        """PUT, optionally conditional; returns the new ETag. A failed condition raises ClientError."""
        try:
            response = self._s3.put_object(
                Bucket=self._bucket, Key=key, Body=body, ContentType="application/json", **condition
            )
        except ClientError as exc:
            if condition and _precondition_failed(exc):
                raise
            raise classify_s3_error(exc, s3_key=key) from exc
        except BotoCoreError as exc:
            raise classify_s3_error(exc, s3_key=key) from exc
        return str(response["ETag"])

    # --- the lease ---

    def current_lease(self, table: TableRef) -> Lease | None:
        found = self._get(lease_key(table))
        if found is None:
            return None
        body, etag = found
        parsed = json.loads(body)
        return Lease(table, str(parsed["run_id"]), parsed.get("owner"), float(parsed["expires_at"]), etag)

    def acquire_lease(self, table: TableRef, *, run_id: str, owner: str, ttl_s: float, resume: bool) -> Lease:
        """Take the table's lease for ``run_id`` (a new run) or, with ``resume``, for the run it names.

        Succeeds when there is no lease, when the lease expired (its holder died: its run is
        resumed), or when it was handed off (``owner`` None) and ``resume`` is set or it names
        ``run_id``. Otherwise raises RunInProgressError: another invocation is extracting the table.
        """
        expires_at = self._clock() + ttl_s
        key = lease_key(table)
        fresh = Lease(table, run_id, owner, expires_at, "")
        try:
            etag = self._put(key, fresh.body(), IfNoneMatch="*")
            return replace(fresh, etag=etag)
        except ClientError:
            pass  # a lease exists: see whose
        current = self.current_lease(table)
        if current is None:  # released in between: try once more from scratch
            try:
                etag = self._put(key, fresh.body(), IfNoneMatch="*")
                return replace(fresh, etag=etag)
            except ClientError as exc:
                raise RunInProgressError(
                    f"run in progress for {table.qualified}", table=table.qualified, s3_key=key
                ) from exc
        expired = current.expires_at <= self._clock()
        handed_off = current.owner is None and (resume or current.run_id == run_id)
        if not (expired or handed_off):
            raise RunInProgressError(
                f"run in progress for {table.qualified}: run {current.run_id} holds the extraction lease "
                f"for {max(0.0, current.expires_at - self._clock()):.0f} more seconds",
                table=table.qualified,
                run_id=current.run_id,
                s3_key=key,
            )
        # Taking over continues the run the lease names: its checkpoint says where it stopped.
        taken = Lease(table, current.run_id, owner, expires_at, "")
        try:
            etag = self._put(key, taken.body(), IfMatch=current.etag)
        except ClientError as exc:
            raise RunInProgressError(
                f"run in progress for {table.qualified}: another invocation took the lease first",
                table=table.qualified,
                run_id=current.run_id,
                s3_key=key,
            ) from exc
        return replace(taken, etag=etag)

    def renew_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        """Extend the lease; LeaseLostError if it is no longer ours."""
        return self._rewrite_lease(lease, owner=lease.owner, ttl_s=ttl_s)

    def hand_off_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        """Leave the lease to the run's continuation: no owner, so the next invocation resuming it may take it."""
        return self._rewrite_lease(lease, owner=None, ttl_s=ttl_s)

    def _rewrite_lease(self, lease: Lease, *, owner: str | None, ttl_s: float) -> Lease:
        renewed = replace(lease, owner=owner, expires_at=self._clock() + ttl_s)
        try:
            etag = self._put(lease_key(lease.table), renewed.body(), IfMatch=lease.etag)
        except ClientError as exc:
            raise LeaseLostError(
                f"the extraction lease of {lease.table.qualified} was taken over; stopping",
                table=lease.table.qualified,
                run_id=lease.run_id,
            ) from exc
        return replace(renewed, etag=etag)

    def release_lease(self, lease: Lease) -> None:
        """Delete the lease if it is still ours (a lease taken over meanwhile is left alone)."""
        try:
            self._s3.delete_object(Bucket=self._bucket, Key=lease_key(lease.table), IfMatch=lease.etag)
        except ClientError as exc:
            if _precondition_failed(exc) or aws_error_code(exc) in {"NoSuchKey", "404"}:
                return
            raise classify_s3_error(exc, s3_key=lease_key(lease.table)) from exc
        except BotoCoreError as exc:
            raise classify_s3_error(exc, s3_key=lease_key(lease.table)) from exc

    # --- checkpoints and watermarks ---

    def load_checkpoint(self, table: TableRef, run_id: str) -> RunCheckpoint | None:
        key = checkpoint_key(table, run_id)
        found = self._get(key)
        return None if found is None else RunCheckpoint.from_json(found[0], s3_key=key)

    def save_checkpoint(self, checkpoint: RunCheckpoint) -> None:
        self._put(checkpoint_key(checkpoint.table, checkpoint.run_id), checkpoint.to_json().encode())

    def load_watermark(self, table: TableRef) -> Watermark | None:
        found = self._get(watermark_key(table))
        if found is None:
            return None
        body = json.loads(found[0])
        return Watermark(str(body["cursor_column"]), str(body["value"]), str(body["run_id"]))

    def save_watermark(self, table: TableRef, watermark: Watermark) -> None:
        body = {
            "cursor_column": watermark.cursor_column,
            "value": watermark.value,
            "run_id": watermark.run_id,
        }
        self._put(watermark_key(table), json.dumps(body).encode())

    def load_published_columns(self, table: TableRef) -> PublishedColumns | None:
        """The columns of the table's last staged run; None before its first."""
        key = published_columns_key(table)
        found = self._get(key)
        if found is None:
            return None
        try:
            body = json.loads(found[0])
            return PublishedColumns(str(body["run_id"]), tuple(column_from_json(c) for c in body["columns"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"malformed published columns state: {exc!r}", s3_key=key) from exc

    def save_published_columns(self, table: TableRef, published: PublishedColumns) -> None:
        body = {"run_id": published.run_id, "columns": [column_to_json(c) for c in published.columns]}
        self._put(published_columns_key(table), json.dumps(body).encode())
