"""Remove staged files once the load ledger shows them loaded; complete runs first.

Cleanup never trusts a notification or a guess: a file is removed only when the
Snowflake load ledger (written in the same transaction as its COPY) records
that exact key with the same checksum the manifest lists. Modes
(``CLEANUP_S3_FILES``):

* ``never``: keep everything; the bucket lifecycle expires staged files after
  the retention period.
* ``after_each``: remove each file of a run as soon as the ledger shows it.
* ``after_all``: remove a run's files only when every file of its manifest is in
  the ledger (the specification's recommended mode).

Each pass first completes the run with the loader's own step
(``pgsnow.load.completion.complete_run``, whatever the mode): when every file of a
``staged`` manifest is loaded, its deletes are applied, then the manifest moves to
``loaded``, which is what later cleanup passes and ``pgsnow status`` read (a replace
run's swap, and so its ``loaded``, is left to the loader). Cleanup itself decides
only which files to remove.

Two cleanups at once: before removing anything, a cleanup records the keys it is
about to remove in the manifest's ``cleaned`` list with a conditional write
(``If-Match`` on the manifest's ETag: ``pgsnow.runs.RunStore.write_manifest_if_unchanged``,
atomic in S3). Only the writer that
wins removes the files; the other re-reads the manifest and finds nothing left to
do. A crash between the claim and the removal leaves loaded files that the orphan
sweeper (``pgsnow.sweeper``) removes later.

On a versioned bucket a removal deletes, by VersionId, every version of the key
whose ETag is the one the ledger recorded (the bytes that were loaded), so no
loaded data lingers behind a delete marker; when the current version was one of
them it first places one delete marker, so the key reads as gone even if an older
version that pgsnow did not load exists (that one is not ours to destroy). A stop between
the two leaves a loaded version behind the marker until the bucket's noncurrent-version
expiry removes it. With
``CLEANUP_ARCHIVE_PREFIX`` the loaded version is first copied under that prefix.
See docs/cleanup.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.config import CleanupMode, Settings
from pgsnow.errors import ConfigError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import CONTROL_PREFIX, normalise_prefix
from pgsnow.ledger import LedgerRow, ledger_rows, loaded_files
from pgsnow.load.completion import complete_run
from pgsnow.manifest import META_SHA256, RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.runs import RunStore
from pgsnow.snowflake.load_sql import CredentialsSource
from pgsnow.staging import raise_unless_missing

# How often a cleanup re-reads a manifest another writer changed under it before giving up.
_CLAIM_ATTEMPTS = 5


@dataclass
class CleanupResult:
    table: str
    run_id: str
    state: RunState
    files_total: int
    files_loaded: int
    deleted_keys: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    archive_prefix: str | None = None  # set when files were copied there before removal

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "run_id": self.run_id,
            "state": self.state.value,
            "files_total": self.files_total,
            "files_loaded": self.files_loaded,
            "files_deleted": len(self.deleted_keys),
            "bytes_deleted": self.deleted_bytes,
            "archive_prefix": self.archive_prefix,
        }


# --------------------------------------------------------------------------- removing one file


def bucket_is_versioned(s3: Any, bucket: str) -> bool:
    status = s3.get_bucket_versioning(Bucket=bucket).get("Status")
    return status in {"Enabled", "Suspended"}


def archive_root(settings: Settings) -> str | None:
    """CLEANUP_ARCHIVE_PREFIX, checked: an archive inside the staging prefix would be loaded again."""
    raw = settings.cleanup.archive_prefix
    if raw is None:
        return None
    root = normalise_prefix(raw)
    for inside in (settings.prefix, CONTROL_PREFIX):
        if root == inside or root.startswith(inside + "/"):
            raise ConfigError(
                [f"CLEANUP_ARCHIVE_PREFIX {raw!r} must be outside the staging prefix and {CONTROL_PREFIX}/"]
            )
    return root


def _versions_of(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    """Every version (newest first) of exactly ``key``, with IsLatest, ETag, Size."""
    paginator = s3.get_paginator("list_object_versions")
    return [
        version
        for page in paginator.paginate(Bucket=bucket, Prefix=key)
        for version in page.get("Versions", [])
        if version["Key"] == key
    ]


def _is_loaded_version(s3: Any, bucket: str, key: str, version: dict[str, Any], ledger: LedgerRow) -> bool:
    if ledger.etag:
        return str(version.get("ETag", "")).strip('"') == ledger.etag.strip('"')
    head = s3.head_object(Bucket=bucket, Key=key, VersionId=version["VersionId"])
    sha256 = {k.lower(): v for k, v in head.get("Metadata", {}).items()}.get(META_SHA256)
    return ledger.matches(sha256=sha256, etag=str(head.get("ETag", "")))


def remove_loaded_file(
    s3: Any, bucket: str, key: str, ledger: LedgerRow, *, versioned: bool, archive: str | None
) -> int | None:
    """Remove the loaded content of ``key``; the bytes removed, or None when none of it was there.

    Only content the ledger identifies (its ETag, else its SHA-256) is touched: a different
    object now under the key was never loaded and stays.
    """
    try:
        if not versioned:
            return _remove_unversioned(s3, bucket, key, ledger, archive)
        ours = [v for v in _versions_of(s3, bucket, key) if _is_loaded_version(s3, bucket, key, v, ledger)]
        if not ours:
            return None
        if archive is not None:
            s3.copy(
                {"Bucket": bucket, "Key": key, "VersionId": ours[0]["VersionId"]}, bucket, f"{archive}/{key}"
            )
        if any(v.get("IsLatest") for v in ours):
            # The marker first, while the key still exists (some stores only mark existing keys):
            # the key reads as gone even if an older version that was never loaded is kept.
            s3.delete_object(Bucket=bucket, Key=key)
        s3.delete_objects(
            Bucket=bucket,
            Delete={"Objects": [{"Key": key, "VersionId": v["VersionId"]} for v in ours], "Quiet": True},
        )
        return int(ours[0].get("Size", 0))
    except (ClientError, BotoCoreError) as exc:
        raise_unless_missing(exc, s3_key=key)
        return None


def _remove_unversioned(s3: Any, bucket: str, key: str, ledger: LedgerRow, archive: str | None) -> int | None:
    head = s3.head_object(Bucket=bucket, Key=key)
    sha256 = {k.lower(): v for k, v in head.get("Metadata", {}).items()}.get(META_SHA256)
    if not ledger.matches(sha256=sha256, etag=str(head.get("ETag", ""))):
        return None
    if archive is not None:
        s3.copy({"Bucket": bucket, "Key": key}, bucket, f"{archive}/{key}")
    s3.delete_object(Bucket=bucket, Key=key)
    return int(head.get("ContentLength", 0))


# --------------------------------------------------------------------------- one run


def _wants_removal(settings: Settings, all_loaded: bool) -> bool:
    mode = settings.cleanup_mode
    return mode is CleanupMode.AFTER_EACH or (mode is CleanupMode.AFTER_ALL and all_loaded)


def remove_loaded_files(
    *, settings: Settings, s3: Any, sf_conn: Any, table: TableRef, run_id: str
) -> CleanupResult:
    """Claim (in the manifest's ``cleaned`` list, a conditional write) and remove what the mode allows."""
    bucket = settings.bucket
    store = RunStore(s3, bucket)
    archive = archive_root(settings)
    for _attempt in range(_CLAIM_ATTEMPTS):
        base = store.read_manifest_for_update(table, run_id)
        if base is None:
            return CleanupResult(table.qualified, run_id, RunState.FAILED, 0, 0)
        manifest = base.manifest
        ledger = ledger_rows(sf_conn, settings, {table: [f.key for f in manifest.files]})
        loaded = loaded_files(manifest, ledger)
        result = CleanupResult(
            manifest.table.qualified, run_id, manifest.state, len(manifest.files), len(loaded)
        )
        already_claimed = set(manifest.cleaned)
        to_remove = (
            [f for f in loaded if f.key not in already_claimed]
            if _wants_removal(settings, len(loaded) == len(manifest.files))
            else []
        )
        if not to_remove:
            return result
        updated = manifest.with_state(
            manifest.state, cleaned=manifest.cleaned + tuple(f.key for f in to_remove)
        )
        if not store.write_manifest_if_unchanged(base, updated):
            continue  # another cleanup (or the loader) changed the manifest: decide again from its version
        versioned = bucket_is_versioned(s3, bucket)
        result.archive_prefix = archive
        for staged in to_remove:
            removed = remove_loaded_file(
                s3, bucket, staged.key, ledger[staged.key], versioned=versioned, archive=archive
            )
            if removed is not None:
                result.deleted_keys.append(staged.key)
                result.deleted_bytes += staged.bytes
        logger.info("cleanup pass", extra=result.as_dict())
        return result
    raise RetryableError(
        f"the manifest kept changing during {_CLAIM_ATTEMPTS} cleanup attempts",
        table=table.qualified,
        run_id=run_id,
    )


def cleanup_run(
    *,
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    manifest: RunManifest,
    aws_credentials: CredentialsSource | None = None,
) -> CleanupResult:
    """Complete the run (read afresh from the bucket) if all its files are loaded, then apply the
    cleanup mode to its files.

    Completion is the loader's own step (``pgsnow.load.completion.complete_run``: a run's deletes,
    then state ``loaded``), so a run whose last file loaded before its manifest said ``staged`` is
    completed here. A replace run's swap is left to the loader (``swap=False``). ``aws_credentials``:
    this function's AWS session, whose credentials Snowflake reads a deletes key list with when
    there is no storage integration.
    """
    table, run_id = manifest.table, manifest.run_id
    completed = complete_run(
        settings=settings,
        sf_conn=sf_conn,
        s3=s3,
        table=table,
        run_id=run_id,
        credentials_source=aws_credentials,
        swap=False,
    )
    if completed.state is None:
        return CleanupResult(table.qualified, run_id, RunState.FAILED, 0, 0)
    if settings.cleanup_mode is CleanupMode.NEVER or completed.state not in (
        RunState.STAGED,
        RunState.LOADED,
    ):
        # `extracting`: the file list is not final yet; `failed`: its files stay for the sweeper.
        return CleanupResult(
            table.qualified, run_id, completed.state, completed.files_total, completed.files_loaded
        )
    return remove_loaded_files(settings=settings, s3=s3, sf_conn=sf_conn, table=table, run_id=run_id)


# --------------------------------------------------------------------------- every run


def needs_cleanup(settings: Settings, manifest: RunManifest) -> bool:
    """A staged run (maybe complete now), or a loaded one whose files the mode removes and are not yet claimed."""
    if manifest.state is RunState.STAGED:
        return True
    return (
        manifest.state is RunState.LOADED
        and settings.cleanup_mode is not CleanupMode.NEVER
        and any(f.key not in set(manifest.cleaned) for f in manifest.files)
    )


def cleanup_pending_runs(
    *,
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    tables: Iterable[TableRef] | None = None,
    aws_credentials: CredentialsSource | None = None,
) -> list[CleanupResult]:
    """One cleanup pass over every run that may have work left (the scheduled cleanup function's job)."""
    started = time.monotonic()
    results = [
        cleanup_run(settings=settings, s3=s3, sf_conn=sf_conn, manifest=m, aws_credentials=aws_credentials)
        for m in RunStore(s3, settings.bucket).iter_manifests(tables)
        if needs_cleanup(settings, m)
    ]
    logger.info(
        "cleanup finished",
        extra={
            "runs": len(results),
            "files_deleted": sum(len(r.deleted_keys) for r in results),
            "bytes": sum(r.deleted_bytes for r in results),
            "duration_ms": int((time.monotonic() - started) * 1000),
        },
    )
    return results
