"""The orphan sweeper: staged files nobody loaded, found on a schedule and given a second chance.

An orphan is a staged data file older than ``CLEANUP_ORPHAN_AGE_MINUTES`` that the load
ledger does not show loaded: its notification was lost, its load failed (the message went
to the dead-letter queue), or its run failed. Each pass, per orphan:

1. never re-enqueued: send the loader queue (``LOADER_QUEUE_URL``) a synthetic
   ``ObjectCreated`` notification shaped like S3's, and tag the object
   ``pgsnow-reenqueued-at``;
2. re-enqueued longer than the orphan age ago and still not loaded: it is *abandoned*:
   tagged ``pgsnow-abandoned-at`` (the first time) and listed in the pass's report
   object ``_pgsnow/reports/orphans/{timestamp}.json`` and in the logs and metrics;
3. abandoned longer than ``S3_STAGE_RETENTION_DAYS`` ago: removed (archived first when
   ``CLEANUP_ARCHIVE_PREFIX`` is set). Its data was reported every pass for the whole
   retention period, which is as long as the bucket lifecycle would have kept it anyway.

Loaded files left behind (a cleanup that claimed a file and stopped before removing it,
or a hand-dropped file with no run) are removed when the cleanup mode removes anything;
loaded files of runs cleanup has not claimed are left to cleanup's own rules.

Each pass also drops the work tables loads left in the control schema (a load stopped between
its work table's CREATE and DROP), once they are older than any load can be
(``pgsnow.load.work_tables.drop_abandoned_work_tables``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import quote_plus

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.cleanup import (
    archive_root,
    bucket_is_versioned,
    remove_loaded_file,
)
from pgsnow.config import CleanupMode, Settings
from pgsnow.errors import ConfigError, PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import StagedObject, new_run_id, parse_data_key, table_prefix
from pgsnow.ledger import LedgerRow, keys_by_table, ledger_rows
from pgsnow.load.work_tables import drop_abandoned_work_tables
from pgsnow.observability import logger
from pgsnow.runs import RunStore
from pgsnow.staging import classify_s3_error
from pgsnow.timestamps import utc_iso

TAG_REENQUEUED_AT = "pgsnow-reenqueued-at"
TAG_ABANDONED_AT = "pgsnow-abandoned-at"
SWEEPER_CONFIGURATION_ID = "pgsnow-orphan-sweeper"


class OrphanStatus(StrEnum):
    REENQUEUED = "reenqueued"  # sent to the loader queue this pass
    WAITING = "waiting"  # re-enqueued recently: the loader may still be on it
    ABANDONED = "abandoned"  # re-enqueued and still not loaded: reported
    DELETED = "deleted"  # abandoned for longer than the retention period: removed
    UNLOADABLE = "unloadable"  # its key is not a stageable file of an allowlisted table


@dataclass(frozen=True)
class Orphan:
    key: str
    table: str | None
    run_id: str | None
    size: int
    last_modified: str
    status: OrphanStatus
    reenqueued_at: str | None = None
    abandoned_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "table": self.table,
            "run_id": self.run_id,
            "size": self.size,
            "last_modified": self.last_modified,
            "status": self.status.value,
            "reenqueued_at": self.reenqueued_at,
            "abandoned_at": self.abandoned_at,
        }


@dataclass
class SweepResult:
    scanned: int = 0  # staged objects older than the orphan age
    orphans: list[Orphan] = field(default_factory=list)
    deleted_keys: list[str] = field(default_factory=list)  # loaded leftovers and expired abandoned files
    deleted_bytes: int = 0
    report_key: str | None = None
    work_tables_dropped: list[str] = field(default_factory=list)  # left behind by stopped loads

    def with_status(self, status: OrphanStatus) -> list[Orphan]:
        return [o for o in self.orphans if o.status is status]

    def counts_by_table(self) -> dict[str, Counter[str]]:
        """Per table: orphans found, and how many of them had each status."""
        counts: dict[str, Counter[str]] = {}
        for orphan in self.orphans:
            table = counts.setdefault(orphan.table or "unknown", Counter())
            table["found"] += 1
            table[orphan.status.value] += 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "orphans": len(self.orphans),
            **{status.value: len(self.with_status(status)) for status in OrphanStatus},
            "files_deleted": len(self.deleted_keys),
            "bytes_deleted": self.deleted_bytes,
            "report_key": self.report_key,
            "work_tables_dropped": len(self.work_tables_dropped),
        }


def build_object_created_event(
    *, bucket: str, key: str, size: int, etag: str, version_id: str | None, region: str, now: datetime
) -> dict[str, Any]:
    """An S3 ``ObjectCreated`` notification for an existing object, shaped as S3 sends it to SQS."""
    obj: dict[str, Any] = {
        "key": quote_plus(key, safe="/"),  # S3 URL-encodes keys in events, '+' for spaces
        "size": size,
        "eTag": etag.strip('"'),
        "sequencer": f"{int(now.timestamp() * 1_000_000):016X}",
    }
    if version_id is not None:
        obj["versionId"] = version_id
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": region,
                "eventTime": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z",
                "eventName": "ObjectCreated:Put",
                "userIdentity": {"principalId": SWEEPER_CONFIGURATION_ID},
                "requestParameters": {"sourceIPAddress": "127.0.0.1"},
                "responseElements": {"x-amz-request-id": SWEEPER_CONFIGURATION_ID},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": SWEEPER_CONFIGURATION_ID,
                    "bucket": {
                        "name": bucket,
                        "ownerIdentity": {"principalId": SWEEPER_CONFIGURATION_ID},
                        "arn": f"arn:aws:s3:::{bucket}",
                    },
                    "object": obj,
                },
            }
        ]
    }


def _parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _list_staged(s3: Any, settings: Settings, tables: list[TableRef] | None) -> list[dict[str, Any]]:
    prefixes = (
        [table_prefix(settings.prefix, t) for t in tables] if tables is not None else [settings.prefix + "/"]
    )
    paginator = s3.get_paginator("list_objects_v2")
    return [
        obj
        for prefix in prefixes
        for page in paginator.paginate(Bucket=settings.bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]


def _tags(s3: Any, bucket: str, key: str) -> dict[str, str]:
    response = s3.get_object_tagging(Bucket=bucket, Key=key)
    return {t["Key"]: t["Value"] for t in response.get("TagSet", [])}


def _put_tags(s3: Any, bucket: str, key: str, tags: dict[str, str]) -> None:
    s3.put_object_tagging(
        Bucket=bucket, Key=key, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]}
    )


def _parse_staged(key: str, settings: Settings) -> StagedObject | None:
    try:
        staged = parse_data_key(key, settings.prefix)
        settings.tables.check(staged.table)
    except PermanentError:
        return None
    return staged


def sweep_orphans(
    *,
    settings: Settings,
    s3: Any,
    sqs: Any,
    sf_conn: Any,
    tables: list[TableRef] | None = None,
    now: datetime | None = None,
) -> SweepResult:
    """One sweeper pass (see the module docstring); ``now`` lets tests play later passes."""
    now = now or datetime.now(UTC)
    age = timedelta(minutes=settings.cleanup.orphan_age_minutes)
    retention = timedelta(days=settings.cleanup.retention_days)
    bucket = settings.bucket
    result = SweepResult()
    result.work_tables_dropped = drop_abandoned_work_tables(settings=settings, sf_conn=sf_conn, now=now)
    old = [obj for obj in _list_staged(s3, settings, tables) if obj["LastModified"] <= now - age]
    result.scanned = len(old)
    if not old:
        return result
    ledger = ledger_rows(sf_conn, settings, keys_by_table([obj["Key"] for obj in old], settings.prefix))
    versioned = bucket_is_versioned(s3, bucket)
    archive = archive_root(settings)
    try:
        for obj in old:
            key, staged = obj["Key"], _parse_staged(obj["Key"], settings)
            row = ledger.get(key)
            if row is not None and row.matches(sha256=None, etag=str(obj.get("ETag", ""))):
                _remove_loaded_leftover(
                    claimed_before=now - age,
                    settings=settings,
                    s3=s3,
                    staged=staged,
                    row=row,
                    versioned=versioned,
                    archive=archive,
                    result=result,
                )
                continue
            result.orphans.append(
                _handle_orphan(
                    settings=settings,
                    s3=s3,
                    sqs=sqs,
                    obj=obj,
                    staged=staged,
                    now=now,
                    age=age,
                    retention=retention,
                    versioned=versioned,
                    archive=archive,
                    result=result,
                )
            )
    except ClientError as exc:
        raise classify_s3_error(exc) from exc
    except BotoCoreError as exc:
        raise classify_s3_error(exc) from exc
    if result.orphans:
        result.report_key = _write_report(s3, bucket, result, now)
    for orphan in result.with_status(OrphanStatus.ABANDONED) + result.with_status(OrphanStatus.UNLOADABLE):
        logger.warning("staged file still not loaded", extra={**orphan.as_dict(), "s3_key": orphan.key})
    logger.info("orphan sweep finished", extra=result.as_dict())
    return result


def _remove_loaded_leftover(
    *,
    claimed_before: datetime,
    settings: Settings,
    s3: Any,
    staged: StagedObject | None,
    row: LedgerRow,
    versioned: bool,
    archive: str | None,
    result: SweepResult,
) -> None:
    """A loaded file still staged: remove it if cleanup already claimed it, or it belongs to no run."""
    if staged is None or settings.cleanup_mode is CleanupMode.NEVER:
        return
    if staged.run_id is not None:
        current = RunStore(s3, settings.bucket).read_manifest_for_update(staged.table, staged.run_id)
        if current is not None and staged.key not in current.manifest.cleaned:
            return  # cleanup's rules decide (after_all waits for the whole run)
        claimed_at = current.last_modified if current is not None else None
        if claimed_at is not None and claimed_at > claimed_before:
            return  # a cleanup claimed it recently and may be removing it right now
    removed = remove_loaded_file(s3, settings.bucket, staged.key, row, versioned=versioned, archive=archive)
    if removed is not None:
        result.deleted_keys.append(staged.key)
        result.deleted_bytes += removed


def _handle_orphan(
    *,
    settings: Settings,
    s3: Any,
    sqs: Any,
    obj: dict[str, Any],
    staged: StagedObject | None,
    now: datetime,
    age: timedelta,
    retention: timedelta,
    versioned: bool,
    archive: str | None,
    result: SweepResult,
) -> Orphan:
    bucket, key, size = settings.bucket, obj["Key"], int(obj.get("Size", 0))
    tags = _tags(s3, bucket, key)
    reenqueued_at, abandoned_at = (
        _parse_iso(tags.get(TAG_REENQUEUED_AT)),
        _parse_iso(tags.get(TAG_ABANDONED_AT)),
    )

    def orphan(status: OrphanStatus) -> Orphan:
        return Orphan(
            key=key,
            table=staged.table.qualified if staged else None,
            run_id=staged.run_id if staged else None,
            size=size,
            last_modified=utc_iso(obj["LastModified"], "seconds"),
            status=status,
            reenqueued_at=tags.get(TAG_REENQUEUED_AT),
            abandoned_at=tags.get(TAG_ABANDONED_AT),
        )

    if staged is not None and reenqueued_at is None:
        _reenqueue(settings, s3, sqs, obj, now)
        tags[TAG_REENQUEUED_AT] = utc_iso(now, "seconds")
        _put_tags(s3, bucket, key, tags)
        return orphan(OrphanStatus.REENQUEUED)
    if staged is not None and reenqueued_at is not None and reenqueued_at > now - age:
        return orphan(OrphanStatus.WAITING)
    if abandoned_at is None:
        tags[TAG_ABANDONED_AT] = utc_iso(now, "seconds")
        _put_tags(s3, bucket, key, tags)
        return orphan(OrphanStatus.ABANDONED if staged is not None else OrphanStatus.UNLOADABLE)
    if abandoned_at <= now - retention:
        _remove_abandoned(s3=s3, bucket=bucket, key=key, obj=obj, versioned=versioned, archive=archive)
        result.deleted_keys.append(key)
        result.deleted_bytes += size
        return orphan(OrphanStatus.DELETED)
    return orphan(OrphanStatus.ABANDONED if staged is not None else OrphanStatus.UNLOADABLE)


def _reenqueue(settings: Settings, s3: Any, sqs: Any, obj: dict[str, Any], now: datetime) -> None:
    queue_url = settings.cleanup.queue_url
    if queue_url is None:
        raise ConfigError(["LOADER_QUEUE_URL is needed to re-enqueue orphaned staged files"])
    head = s3.head_object(Bucket=settings.bucket, Key=obj["Key"])
    event = build_object_created_event(
        bucket=settings.bucket,
        key=obj["Key"],
        size=int(head.get("ContentLength", obj.get("Size", 0))),
        etag=str(head.get("ETag", obj.get("ETag", ""))),
        version_id=head.get("VersionId"),
        region=str(s3.meta.region_name or "us-east-1"),
        now=now,
    )
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(event))
    logger.info("re-enqueued orphaned staged file", extra={"s3_key": obj["Key"], "bytes": obj.get("Size")})


def _remove_abandoned(
    *, s3: Any, bucket: str, key: str, obj: dict[str, Any], versioned: bool, archive: str | None
) -> None:
    """Remove the abandoned current version (the one that was tagged and reported), archiving it first."""
    head = s3.head_object(Bucket=bucket, Key=key)
    version_id = head.get("VersionId") if versioned else None
    source: dict[str, str] = {"Bucket": bucket, "Key": key}
    if version_id:
        source["VersionId"] = version_id
    if archive is not None:
        s3.copy(source, bucket, f"{archive}/{key}")
    if version_id:
        s3.delete_object(Bucket=bucket, Key=key)  # a marker hides any older version, as cleanup does
        s3.delete_object(Bucket=bucket, Key=key, VersionId=version_id)
    else:
        s3.delete_object(Bucket=bucket, Key=key)
    logger.warning("removed abandoned staged file", extra={"s3_key": key, "bytes": obj.get("Size")})


def _write_report(s3: Any, bucket: str, result: SweepResult, now: datetime) -> str:
    report = {
        "generated_at": utc_iso(now, "seconds"),
        "summary": result.as_dict(),
        "per_table": {table: dict(counts) for table, counts in result.counts_by_table().items()},
        "orphans": [o.as_dict() for o in result.orphans],
    }
    return RunStore(s3, bucket).put_orphan_report(new_run_id(now), report)
