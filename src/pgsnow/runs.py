"""The run store: every object a run keeps under ``_pgsnow/`` in the staging bucket.

``RunStore`` is the only code that reads, lists and (conditionally) writes these objects;
their keys come from ``pgsnow.keys`` (the layout is described there). One GET and one PUT
serve them all: a GET returns the body with the ETag (and version) a conditional rewrite
needs, a conditional PUT (``If-Match: <etag>`` or ``If-None-Match: *``) answers ``None``
when another writer got there first. S3 applies both atomically, so of two writers with the
same base exactly one wins (the local stack's moto server is made atomic too, in
``pgsnow.local.moto_server``). Every other S3 failure becomes a classified PgSnowError
(``staging.classify_s3_error``) naming the key.

What it keeps:

* **Run manifests** (``pgsnow.manifest.RunManifest``), one per (table, run): written by the
  extractor, read by the loader, settled by cleanup with ``write_manifest_if_unchanged``
  (the state ``loaded`` and the ``cleaned`` list), listed in run order (run ids are UTC start
  times, so key order is run order) by ``pgsnow status`` and ``pgsnow verify`` (and by cleanup
  only to build the pending-run index of a bucket that has none).
* **The extraction lease** (``lease.json``): who may extract the table now. Created with
  ``If-None-Match: *`` and renewed, handed off or released with ``If-Match``, so two runs for
  the same table can never both hold it. A holder that dies leaves a lease that expires; the
  next invocation takes it over (again with ``If-Match``) and resumes the unfinished run.
* **Run checkpoints** (``runs/{run_id}.json``): the chunks a run finished, the chunk in
  progress and what the run decided at its start (``pgsnow.checkpoint.RunCheckpoint``). Only
  the lease holder writes it.
* **Parallel runs' ranges**: each key range of a parallel run has its own checkpoint and its own
  lease (``runs/{run_id}/ranges/{n}.json`` and ``.lease.json``), so one worker at a time extracts
  a range and resumes it after its last staged file. Meanwhile the table's lease names the run
  with the owner ``RANGES_OWNER``: every worker extends it (``extend_ranges_lease``), and the
  worker that finishes the last range takes it over (``take_over_from_ranges``, ``If-Match``:
  exactly one does) to finish the run.
* **The watermark** (``watermark.json``): the incremental cursor value the next run starts
  from; advanced only after the run's manifest is ``staged``.
* **Published columns** (``columns.json``): the columns of the table's last staged run,
  written with its manifest; the next run compares its own columns with these (schema drift,
  the scale an unbounded ``numeric`` column was given).
* **The pending-run index** (``pending/{schema}/{table}/{run_id}``): one small marker per run
  that may still have cleanup work, written *before* each manifest write of a run that has not
  failed, so no staged run is ever unindexed; listed (versions and all) by the cleanup pass
  instead of every manifest, and removed by it once the run is settled: by the VersionIds it
  listed, so no delete marker accumulates under the prefix, and a marker written since (its run
  wrote its manifest again) stays. ``pending-index.json`` records when
  a pass first built the index from the manifests of a bucket that had none (docs/cleanup.md).
* **Drain states** (``cdc/{slot}/state.json``, ``DrainState``): per replication slot, the position
  its change-capture runs confirmed, the last run and whether it finished, and each table's last
  change-run end (the next run's ``ChangeRange.after_lsn``). Written with ``If-Match`` (or
  ``If-None-Match: *`` the first time): the slot has one consumer, and a second writer is refused.
* **Key lists** (deletes: a run's full primary-key list, read by Snowflake by URL) and the
  orphan sweeper's **reports**.

docs/extraction.md describes the lease and checkpoint protocol, docs/cleanup.md the settling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.changes import ChangeRange, format_lsn, parse_lsn
from pgsnow.checkpoint import (
    RANGES_OWNER,
    Lease,
    LeaseLostError,
    PublishedColumns,
    RunCheckpoint,
    RunInProgressError,
    Watermark,
)
from pgsnow.errors import PermanentError, RetryableError, aws_error_code
from pgsnow.identifiers import TableRef
from pgsnow.keys import (
    MANIFESTS_PREFIX,
    PENDING_INDEX_KEY,
    PENDING_PREFIX,
    checkpoint_key,
    drain_state_key,
    enrollment_key,
    key_list_key,
    lease_key,
    manifest_key,
    manifests_prefix,
    orphan_report_key,
    parse_pending_key,
    pending_key,
    pending_prefix,
    published_columns_key,
    range_checkpoint_key,
    range_lease_key,
    watermark_key,
)
from pgsnow.manifest import RunManifest, RunState
from pgsnow.staging import classify_s3_error, denied_because_missing, put_data_file, raise_unless_missing
from pgsnow.timestamps import utc_iso

JSON_CONTENT_TYPE = "application/json"
# S3's answers to a conditional write that lost: the object changed, or a concurrent write is in flight.
_CONDITION_FAILED_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_CONDITION_FAILED_STATUSES = frozenset({412, 409})
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many (key, version) entries
PENDING_INDEX_VERSION = 1


class ManifestNotFoundError(PermanentError):
    """No manifest object for this (table, run)."""


@dataclass(frozen=True)
class VersionedManifest:
    """A manifest as read, with what a conditional rewrite of it needs."""

    manifest: RunManifest
    etag: str
    version_id: str | None  # None on an unversioned bucket
    last_modified: datetime | None = None


@dataclass(frozen=True)
class PendingRun:
    """A pending-run marker as listed: its run, when it was written, and every version of it
    (removed by VersionId, so no delete marker is left under the prefix)."""

    table: TableRef
    run_id: str
    marked_at: datetime
    version_ids: tuple[str, ...]


@dataclass(frozen=True)
class Enrollment:
    """A change-capture table's hand-off (docs/guarantees.md, "Change capture"): its snapshot run
    ``snapshot_run_id`` holds every change committed at or before ``snapshot_lsn``; the slot's
    change runs bring the ones after."""

    table: TableRef
    slot: str
    snapshot_lsn: int
    enrolled_at: str
    snapshot_run_id: str

    @property
    def changes(self) -> ChangeRange:
        """The snapshot's place in the slot's stream, carried by each of its manifests."""
        lsn = self.snapshot_lsn
        return ChangeRange(self.slot, after_lsn=lsn, end_lsn=lsn, snapshot_lsn=lsn)

    def to_json(self) -> bytes:
        body = {
            "schema": self.table.schema,
            "table": self.table.table,
            "slot": self.slot,
            "snapshot_lsn": format_lsn(self.snapshot_lsn),
            "enrolled_at": self.enrolled_at,
            "snapshot_run_id": self.snapshot_run_id,
        }
        return json.dumps(body, indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, text: bytes, *, s3_key: str) -> Enrollment:
        try:
            body = json.loads(text)
            return cls(
                TableRef(str(body["schema"]), str(body["table"])),
                str(body["slot"]),
                parse_lsn(str(body["snapshot_lsn"])),
                str(body["enrolled_at"]),
                str(body["snapshot_run_id"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"unreadable enrollment: {exc}", s3_key=s3_key) from exc


@dataclass(frozen=True)
class StoredEnrollment:
    """An enrollment as read, with the ETag that replacing it needs."""

    enrollment: Enrollment
    etag: str


@dataclass(frozen=True)
class _StoredObject:
    body: bytes
    etag: str
    version_id: str | None
    last_modified: datetime | None


@dataclass(frozen=True)
class DrainState:
    """What a slot's change-capture runs keep between invocations (docs/extraction.md, "Change
    capture runs"). LSNs are integers here and ``pg_lsn`` text in the object."""

    slot: str
    confirmed_lsn: int  # the position the last finished run confirmed to the slot (0: none yet)
    last_run_id: str | None = None
    last_run_finished: bool = True  # False: that run died before confirming (its manifests are superseded)
    tables: dict[str, int] = field(default_factory=dict)  # "schema.table" -> its last change run's end_lsn
    # The last heartbeat message the slot delivered ({"run_id", "at"}; JSON text here, an object in S3).
    last_heartbeat: str | None = None
    confirmed_at: str | None = None  # when the position was last confirmed (UTC ISO-8601)
    etag: str | None = None  # the stored object's ETag (not written): the base of the next save

    def to_json(self) -> bytes:
        body = {
            "slot": self.slot,
            "confirmed_lsn": format_lsn(self.confirmed_lsn),
            "last_run_id": self.last_run_id,
            "last_run_finished": self.last_run_finished,
            "tables": {name: format_lsn(lsn) for name, lsn in sorted(self.tables.items())},
            "last_heartbeat": _json_value(self.last_heartbeat),
            "confirmed_at": self.confirmed_at,
        }
        return json.dumps(body, indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, text: bytes, *, etag: str | None, s3_key: str) -> DrainState:
        try:
            body = json.loads(text)
            return cls(
                slot=str(body["slot"]),
                confirmed_lsn=parse_lsn(str(body["confirmed_lsn"])),
                last_run_id=body.get("last_run_id"),
                last_run_finished=bool(body.get("last_run_finished", True)),
                tables={str(k): parse_lsn(str(v)) for k, v in (body.get("tables") or {}).items()},
                last_heartbeat=_json_text(body.get("last_heartbeat")),
                confirmed_at=body.get("confirmed_at"),
                etag=etag,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PermanentError(f"unreadable drain state: {exc}", s3_key=s3_key) from exc


def _json_value(text: str | None) -> Any:
    """A heartbeat's JSON text as the value it holds (``pgsnow status`` reads its ``at``)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _condition_failed(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return aws_error_code(exc) in _CONDITION_FAILED_CODES or status in _CONDITION_FAILED_STATUSES


class RunStore:
    """The ``_pgsnow/`` objects of one staging bucket (see the module docstring)."""

    def __init__(self, s3: Any, bucket: str, *, clock: Callable[[], float] = time.time) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._clock = clock

    @property
    def bucket(self) -> str:
        return self._bucket

    # --------------------------------------------------------------------- one GET, one PUT

    def _get(self, key: str) -> _StoredObject | None:
        """The object with its ETag and version; None when there is none."""
        try:
            response = self._s3.get_object(Bucket=self._bucket, Key=key)
            body = response["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            if denied_because_missing(self._s3, self._bucket, key, exc):
                return None
            raise_unless_missing(exc, s3_key=key)
            return None
        version = response.get("VersionId")
        return _StoredObject(
            body,
            str(response["ETag"]),
            None if version in (None, "null") else version,
            response.get("LastModified"),
        )

    def _put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_absent: bool = False,
        run_id: str | None = None,
    ) -> str | None:
        """PUT a JSON object, optionally only if it is still ``if_match`` (an ETag) or absent.

        Returns the new ETag, or None when the condition failed (another writer got there first).
        """
        condition = {"IfMatch": if_match} if if_match is not None else {}
        if if_absent:
            condition["IfNoneMatch"] = "*"
        try:
            response = self._s3.put_object(
                Bucket=self._bucket, Key=key, Body=body, ContentType=JSON_CONTENT_TYPE, **condition
            )
        except ClientError as exc:
            if condition and _condition_failed(exc):
                return None
            error = classify_s3_error(exc, s3_key=key)
            error.run_id = run_id
            raise error from exc
        except BotoCoreError as exc:
            error = classify_s3_error(exc, s3_key=key)
            error.run_id = run_id
            raise error from exc
        return str(response["ETag"])

    def _list_objects(self, prefix: str, *, start_after: str | None = None) -> list[tuple[str, datetime]]:
        """(key, LastModified) of every object under ``prefix`` (after ``start_after``, when given),
        sorted by key. A failed listing raises botocore's error as it is: the CLI reports it by its
        AWS code (no such bucket, access denied)."""
        paginator = self._s3.get_paginator("list_objects_v2")
        after = {} if start_after is None else {"StartAfter": start_after}
        return sorted(
            (obj["Key"], obj["LastModified"])
            for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix, **after)
            for obj in page.get("Contents", [])
        )

    # --------------------------------------------------------------------- run manifests

    def put_manifest(self, manifest: RunManifest) -> str:
        """Write (or overwrite) a run's manifest; returns its key.

        A run that has not failed is first marked pending, so cleanup's index holds every run
        before its manifest can say ``staged``. A failed run keeps the marker its first manifest
        write left: cleanup removes it (its files are the sweeper's).
        """
        if manifest.state is not RunState.FAILED:
            self.mark_pending(manifest.table, manifest.run_id)
        key = manifest_key(manifest.table, manifest.run_id)
        self._put(key, manifest.to_json().encode("utf-8"), run_id=manifest.run_id)
        return key

    def get_manifest(self, table: TableRef, run_id: str) -> RunManifest:
        """Read a run's manifest; ManifestNotFoundError (naming its key) when there is none."""
        found = self.read_manifest_for_update(table, run_id)
        if found is None:
            raise ManifestNotFoundError(
                "no manifest for this run",
                table=table.qualified,
                s3_key=manifest_key(table, run_id),
                run_id=run_id,
            )
        return found.manifest

    def read_manifest_for_update(self, table: TableRef, run_id: str) -> VersionedManifest | None:
        """The run's manifest with the ETag (and version) a conditional rewrite needs; None if gone."""
        key = manifest_key(table, run_id)
        found = self._get(key)
        if found is None:
            return None
        manifest = RunManifest.from_json(found.body, s3_key=key)
        return VersionedManifest(manifest, found.etag, found.version_id, found.last_modified)

    def write_manifest_if_unchanged(self, base: VersionedManifest, updated: RunManifest) -> bool:
        """Replace the manifest only if it is still ``base``; False when another writer got there first."""
        key = manifest_key(updated.table, updated.run_id)
        etag = self._put(key, updated.to_json().encode("utf-8"), if_match=base.etag, run_id=updated.run_id)
        return etag is not None

    def run_ids(self, table: TableRef, *, after: str | None = None) -> list[str]:
        """The table's runs that have a manifest, oldest first; with ``after``, only the runs
        after that one (S3 lists from there: a table's manifests stay for the metadata retention,
        and a change-capture table's drain writes up to one a minute, so listing them all costs a
        LIST per 1,000)."""
        prefix = manifests_prefix(table)
        start_after = None if after is None else manifest_key(table, after)
        return [
            key.removeprefix(prefix).removesuffix(".json")
            for key, _ in self._list_objects(prefix, start_after=start_after)
            if key.endswith(".json")
        ]

    def manifests_newest_first(self, table: TableRef) -> Iterator[RunManifest]:
        """The table's manifests from its newest run back, each read only when asked for."""
        for run_id in reversed(self.run_ids(table)):
            found = self.read_manifest_for_update(table, run_id)
            if found is not None:  # None: removed since the listing
                yield found.manifest

    def iter_manifests(
        self, tables: Iterable[TableRef] | None = None, *, modified_since: datetime | None = None
    ) -> Iterator[RunManifest]:
        """Every run manifest in the bucket (or of the given tables), oldest run first per table.

        ``modified_since``: only those written at or after it (the listing says when; the others
        are listed, not read).
        """
        prefixes = [manifests_prefix(t) for t in tables] if tables is not None else [MANIFESTS_PREFIX]
        for prefix in prefixes:
            for key, last_modified in self._list_objects(prefix):
                if not key.endswith(".json") or (
                    modified_since is not None and last_modified < modified_since
                ):
                    continue
                found = self._get(key)
                if found is not None:  # None: removed since the listing
                    yield RunManifest.from_json(found.body, s3_key=key)

    def tables_with_manifests(self) -> list[TableRef]:
        """Every (schema, table) that has a manifest folder."""
        paginator = self._s3.get_paginator("list_objects_v2")
        tables = []
        for schema_page in paginator.paginate(Bucket=self._bucket, Prefix=MANIFESTS_PREFIX, Delimiter="/"):
            for schema_prefix in schema_page.get("CommonPrefixes", []):
                for table_page in paginator.paginate(
                    Bucket=self._bucket, Prefix=schema_prefix["Prefix"], Delimiter="/"
                ):
                    for table_prefix in table_page.get("CommonPrefixes", []):
                        folder = table_prefix["Prefix"].removeprefix(MANIFESTS_PREFIX).rstrip("/")
                        schema, table = folder.split("/", 1)
                        tables.append(TableRef(schema, table))
        return sorted(tables, key=lambda t: (t.schema, t.table))

    # --------------------------------------------------------------------- the pending-run index

    def mark_pending(self, table: TableRef, run_id: str, *, if_absent: bool = False) -> None:
        """Mark the run pending (again: a new version). Unconditional by default, so a cleanup pass
        that read an older state of the run and removes the versions it listed leaves this one;
        ``if_absent`` (indexing existing manifests) adds no version to a marker that exists."""
        body = json.dumps({"schema": table.schema, "table": table.table, "run_id": run_id}).encode("utf-8")
        self._put(pending_key(table, run_id), body, if_absent=if_absent, run_id=run_id)

    def pending_runs(self, tables: Iterable[TableRef] | None = None) -> list[PendingRun]:
        """Every run marked pending (of the given tables), in key order: one LIST per 1,000 versions.

        Listed with their versions, so a marker can be removed for good (by VersionId). A key
        whose newest entry is a delete marker (removed by hand) is not pending.
        """
        prefixes = [pending_prefix(t) for t in tables] if tables is not None else [PENDING_PREFIX]
        paginator = self._s3.get_paginator("list_object_versions")
        entries: dict[str, list[dict[str, Any]]] = {}
        for prefix in prefixes:
            for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
                for version in page.get("Versions", []):
                    entries.setdefault(version["Key"], []).append(version)
                for marker in page.get("DeleteMarkers", []):
                    entries.setdefault(marker["Key"], []).append({**marker, "_delete_marker": True})
        runs = []
        for key in sorted(entries):
            parsed = parse_pending_key(key)
            latest = next((e for e in entries[key] if e.get("IsLatest")), None)
            if parsed is None or latest is None or latest.get("_delete_marker"):
                continue
            version_ids = tuple(str(e.get("VersionId") or "null") for e in entries[key])
            runs.append(PendingRun(parsed[0], parsed[1], latest["LastModified"], version_ids))
        return runs

    def remove_pending(self, runs: Iterable[PendingRun]) -> list[str]:
        """Remove these markers, every listed version (a version written since stays: its run was
        marked again). One request per 1,000 versions; returns the keys S3 refused."""
        objects: list[dict[str, str]] = []
        for run in runs:
            key = pending_key(run.table, run.run_id)
            for version_id in run.version_ids:
                # "null": the bucket is not versioned (a plain delete removes the object)
                objects.append(
                    {"Key": key} if version_id == "null" else {"Key": key, "VersionId": version_id}
                )
        refused: list[str] = []
        for start in range(0, len(objects), _DELETE_BATCH):
            batch = objects[start : start + _DELETE_BATCH]
            try:
                response = self._s3.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise classify_s3_error(exc, s3_key=batch[0]["Key"]) from exc
            refused.extend(str(error.get("Key")) for error in response.get("Errors", []))
        return sorted(set(refused))

    def pending_index_built_at(self) -> datetime | None:
        """When a cleanup pass first built the pending-run index from the manifests; None before."""
        found = self._get(PENDING_INDEX_KEY)
        if found is None:
            return None
        try:
            body = json.loads(found.body)
            return datetime.fromisoformat(str(body["built_at"]).replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(
                f"malformed pending-run index record: {exc!r}", s3_key=PENDING_INDEX_KEY
            ) from exc

    def record_pending_index_built(self) -> None:
        """Record (once: ``If-None-Match``) that the pending-run index holds every run with work."""
        body = {"format_version": PENDING_INDEX_VERSION, "built_at": utc_iso(self.now())}
        self._put(PENDING_INDEX_KEY, json.dumps(body).encode("utf-8"), if_absent=True)

    def now(self) -> datetime:
        """The store's clock, as a UTC datetime (to compare with S3's LastModified)."""
        return datetime.fromtimestamp(self._clock(), UTC)

    # --------------------------------------------------------------------- the extraction lease

    @staticmethod
    def _lease_key(table: TableRef, run_id: str, range_index: int | None) -> str:
        return lease_key(table) if range_index is None else range_lease_key(table, run_id, range_index)

    def current_lease(
        self, table: TableRef, *, run_id: str = "", range_index: int | None = None
    ) -> Lease | None:
        """The table's lease, or with ``range_index`` the lease of that range of run ``run_id``."""
        found = self._get(self._lease_key(table, run_id, range_index))
        if found is None:
            return None
        return Lease.from_json(table, found.body, etag=found.etag, range_index=range_index)

    def acquire_lease(
        self,
        table: TableRef,
        *,
        run_id: str,
        owner: str,
        ttl_s: float,
        resume: bool,
        range_index: int | None = None,
    ) -> Lease:
        """Take the table's lease for ``run_id`` (a new run) or, with ``resume``, for the run it names;
        with ``range_index``, the lease of that range of run ``run_id`` instead.

        Succeeds when there is no lease, when the lease expired (its holder died: its run is
        resumed), or when it was handed off (``owner`` None) and ``resume`` is set or it names
        ``run_id``. Otherwise raises RunInProgressError: another invocation is extracting the table.
        """
        expires_at = self._clock() + ttl_s
        key = self._lease_key(table, run_id, range_index)
        fresh = Lease(table, run_id, owner, expires_at, "", range_index)
        etag = self._put(key, fresh.body(), if_absent=True)
        if etag is not None:
            return replace(fresh, etag=etag)
        current = self.current_lease(
            table, run_id=run_id, range_index=range_index
        )  # a lease exists: see whose
        if current is None:  # released in between: try once more from scratch
            etag = self._put(key, fresh.body(), if_absent=True)
            if etag is None:
                raise RunInProgressError(
                    f"run in progress for {table.qualified}", table=table.qualified, s3_key=key
                )
            return replace(fresh, etag=etag)
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
        taken = Lease(table, current.run_id, owner, expires_at, "", range_index)
        etag = self._put(key, taken.body(), if_match=current.etag)
        if etag is None:
            raise RunInProgressError(
                f"run in progress for {table.qualified}: another invocation took the lease first",
                table=table.qualified,
                run_id=current.run_id,
                s3_key=key,
            )
        return replace(taken, etag=etag)

    def renew_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        """Extend the lease; LeaseLostError if it is no longer ours."""
        return self._rewrite_lease(lease, owner=lease.owner, ttl_s=ttl_s)

    def hand_off_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        """Leave the lease to the run's continuation: no owner, so the next invocation resuming it may take it."""
        return self._rewrite_lease(lease, owner=None, ttl_s=ttl_s)

    def hand_to_ranges(self, lease: Lease, *, ttl_s: float) -> Lease:
        """A parallel run's planner leaves the table's lease to the run's range workers
        (owner ``RANGES_OWNER``): other runs of the table stay refused until the run ends."""
        return self._rewrite_lease(lease, owner=RANGES_OWNER, ttl_s=ttl_s)

    def extend_ranges_lease(self, table: TableRef, run_id: str, *, ttl_s: float) -> None:
        """A range worker keeps its parallel run's table lease alive (when less than half of
        ``ttl_s`` is left). Several workers may try at once: losing the conditional write means
        another one just extended it. LeaseLostError when the lease no longer names the run (it
        failed, or expired and another run took the table)."""
        current = self.current_lease(table)
        if current is None or current.run_id != run_id:
            raise LeaseLostError(
                f"run {run_id} no longer holds the extraction lease of {table.qualified}",
                table=table.qualified,
                run_id=run_id,
            )
        if current.owner != RANGES_OWNER or current.expires_at - self._clock() > ttl_s / 2:
            return  # the run's finisher holds it, or it has time left
        self._put(
            lease_key(table),
            replace(current, expires_at=self._clock() + ttl_s).body(),
            if_match=current.etag,
            run_id=run_id,
        )

    def take_over_from_ranges(
        self, table: TableRef, run_id: str, *, owner: str, ttl_s: float
    ) -> Lease | None:
        """The table's lease for ``owner`` to finish parallel run ``run_id``, if it is still its
        ranges' (or it expired: the last finisher died); None when another invocation has it."""
        current = self.current_lease(table)
        if current is None or current.run_id != run_id:
            return None
        if current.owner != RANGES_OWNER and current.expires_at > self._clock():
            return None
        taken = Lease(table, run_id, owner, self._clock() + ttl_s, "")
        etag = self._put(lease_key(table), taken.body(), if_match=current.etag, run_id=run_id)
        return None if etag is None else replace(taken, etag=etag)

    def _rewrite_lease(self, lease: Lease, *, owner: str | None, ttl_s: float) -> Lease:
        renewed = replace(lease, owner=owner, expires_at=self._clock() + ttl_s)
        etag = self._put(
            self._lease_key(lease.table, lease.run_id, lease.range_index), renewed.body(), if_match=lease.etag
        )
        if etag is None:
            raise LeaseLostError(
                f"the extraction lease of {lease.table.qualified} was taken over; stopping",
                table=lease.table.qualified,
                run_id=lease.run_id,
            )
        return replace(renewed, etag=etag)

    def release_lease(self, lease: Lease) -> None:
        """Delete the lease if it is still ours (a lease taken over meanwhile is left alone)."""
        key = self._lease_key(lease.table, lease.run_id, lease.range_index)
        try:
            self._s3.delete_object(Bucket=self._bucket, Key=key, IfMatch=lease.etag)
        except ClientError as exc:
            if not _condition_failed(exc):  # taken over meanwhile: not ours to delete
                raise_unless_missing(exc, s3_key=key)
        except BotoCoreError as exc:
            raise classify_s3_error(exc, s3_key=key) from exc

    # --------------------------------------------------------------------- checkpoints, watermarks, columns

    def load_checkpoint(
        self, table: TableRef, run_id: str, range_index: int | None = None
    ) -> RunCheckpoint | None:
        """The run's checkpoint, or with ``range_index`` that range's; None when there is none yet."""
        key = (
            checkpoint_key(table, run_id)
            if range_index is None
            else range_checkpoint_key(table, run_id, range_index)
        )
        found = self._get(key)
        return None if found is None else RunCheckpoint.from_json(found.body, s3_key=key)

    def save_checkpoint(self, checkpoint: RunCheckpoint) -> None:
        """Write the run's checkpoint, or its range's when ``checkpoint.range`` is set."""
        if checkpoint.range is None:
            key = checkpoint_key(checkpoint.table, checkpoint.run_id)
        else:
            key = range_checkpoint_key(checkpoint.table, checkpoint.run_id, checkpoint.range.index)
        self._put(key, checkpoint.to_json().encode(), run_id=checkpoint.run_id)

    def load_watermark(self, table: TableRef) -> Watermark | None:
        found = self._get(watermark_key(table))
        if found is None:
            return None
        return Watermark.from_json(found.body)

    def save_watermark(self, table: TableRef, watermark: Watermark) -> None:
        self._put(watermark_key(table), watermark.to_json(), run_id=watermark.run_id)

    def load_published_columns(self, table: TableRef) -> PublishedColumns | None:
        """The columns of the table's last staged run; None before its first."""
        key = published_columns_key(table)
        found = self._get(key)
        return None if found is None else PublishedColumns.from_json(found.body, s3_key=key)

    def save_published_columns(self, table: TableRef, published: PublishedColumns) -> None:
        self._put(published_columns_key(table), published.to_json(), run_id=published.run_id)

    # --------------------------------------------------------------------- change-capture enrollments

    def read_enrollment(self, table: TableRef) -> StoredEnrollment | None:
        """The table's enrollment with its ETag; None when it is not enrolled."""
        key = enrollment_key(table)
        found = self._get(key)
        if found is None:
            return None
        return StoredEnrollment(Enrollment.from_json(found.body, s3_key=key), found.etag)

    def write_enrollment(
        self, enrollment: Enrollment, *, replacing: StoredEnrollment | None
    ) -> StoredEnrollment | None:
        """Record the enrollment if the table has none (``replacing`` None) or still has ``replacing``,
        and return it as stored; None when another invocation recorded one first."""
        etag = self._put(
            enrollment_key(enrollment.table),
            enrollment.to_json(),
            if_match=None if replacing is None else replacing.etag,
            if_absent=replacing is None,
            run_id=enrollment.snapshot_run_id,
        )
        return None if etag is None else StoredEnrollment(enrollment, etag)

    def remove_enrollment(self, table: TableRef) -> None:
        """Forget the table's enrollment (none is fine): its next invocation enrolls it again."""
        key = enrollment_key(table)
        try:
            self._s3.delete_object(Bucket=self._bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise_unless_missing(exc, s3_key=key)

    # --------------------------------------------------------------------- drain states (cdc)

    def load_drain_state(self, slot: str) -> DrainState | None:
        """The slot's drain state (with the ETag a save needs); None before its first run."""
        key = drain_state_key(slot)
        found = self._get(key)
        return None if found is None else DrainState.from_json(found.body, etag=found.etag, s3_key=key)

    def save_drain_state(self, state: DrainState, *, run_id: str | None = None) -> DrainState:
        """Write ``state`` over the object it was read as (``state.etag``; absent when None); returns
        it with its new ETag. RetryableError when another writer changed it since: a second consumer
        of the slot, which must not interleave its state with this one's."""
        key = drain_state_key(state.slot)
        etag = self._put(
            key, state.to_json(), if_match=state.etag, if_absent=state.etag is None, run_id=run_id
        )
        if etag is None:
            raise RetryableError(
                f"the drain state of slot {state.slot!r} was changed by another invocation",
                s3_key=key,
                run_id=run_id,
            )
        return replace(state, etag=etag)

    # --------------------------------------------------------------------- key lists, reports

    def put_key_list(self, table: TableRef, run_id: str, path: Path, *, rows: int, sha256: str) -> str:
        """Upload a run's full primary-key list (gzip CSV, with a data file's metadata); returns its key."""
        key = key_list_key(table, run_id)
        put_data_file(self._s3, self._bucket, key, path, run_id=run_id, batch=0, rows=rows, sha256=sha256)
        return key

    def put_orphan_report(self, report_id: str, report: dict[str, Any]) -> str:
        """Write one orphan sweeper pass's report; returns its key."""
        key = orphan_report_key(report_id)
        self._put(key, json.dumps(report, indent=2).encode("utf-8"))
        return key
