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

A pass reads only runs that may still have work: it lists the pending-run index
(``_pgsnow/pending/``, one marker per run, written before the run's first manifest by
``RunStore.put_manifest``), never every manifest, and removes a run's marker once the run is
settled (``is_settled``: failed, or loaded with nothing left to remove). A bucket written by a
release without the index gets it once, from a full listing (``index_pending_runs``). So a
pass costs what is pending, not what exists.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.config import CleanupMode, Settings
from pgsnow.errors import ConfigError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import CONTROL_PREFIX, normalise_prefix
from pgsnow.ledger import LedgerRow, ledger_rows, loaded_files
from pgsnow.load.completion import complete_run
from pgsnow.load.tables import Tables
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.runs import PendingRun, RunStore
from pgsnow.snowflake.load_sql import CredentialsSource
from pgsnow.staging import raise_unless_missing, staged_checksum

# How often a cleanup re-reads a manifest another writer changed under it before giving up.
_CLAIM_ATTEMPTS = 5
# For this long after a pass first built the pending-run index, passes also index manifests
# written since (listed, not read): an extractor of the previous release, which marks nothing,
# may still start a run while the stack is being updated (a Lambda runs at most 15 minutes).
INDEX_SETTLING = timedelta(hours=1)
# Slack between S3's LastModified and this function's clock.
_CLOCK_SLACK = timedelta(minutes=5)
# A marker whose run has no manifest is removed once this old: the extractor marks a run just
# before writing its first manifest, so a younger one may be about to get it (a run resumed
# later marks itself again); an older one stopped there, or its manifest expired.
MARKER_WITHOUT_MANIFEST_AGE = timedelta(hours=1)


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
    # Nothing is left for a later pass (``is_settled``): the pass removes the run's pending marker.
    settled: bool = False

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
    head = s3.head_object(Bucket=bucket, Key=key, VersionId=version["VersionId"], ChecksumMode="ENABLED")
    return ledger.matches(sha256=staged_checksum(head), etag=str(head.get("ETag", "")))


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
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    if not ledger.matches(sha256=staged_checksum(head), etag=str(head.get("ETag", ""))):
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
    *,
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    table: TableRef,
    run_id: str,
    versioned: bool | None = None,
) -> CleanupResult:
    """Claim (in the manifest's ``cleaned`` list, a conditional write) and remove what the mode allows.

    ``versioned``: whether the bucket keeps versions, when the caller already asked (once per pass).
    """
    bucket = settings.bucket
    store = RunStore(s3, bucket)
    archive = archive_root(settings)
    for _attempt in range(_CLAIM_ATTEMPTS):
        base = store.read_manifest_for_update(table, run_id)
        if base is None:
            return CleanupResult(table.qualified, run_id, RunState.FAILED, 0, 0, settled=True)
        manifest = base.manifest
        ledger = ledger_rows(sf_conn, settings, {table: [f.key for f in manifest.files]})
        loaded = loaded_files(manifest, ledger)
        result = CleanupResult(
            manifest.table.qualified,
            run_id,
            manifest.state,
            len(manifest.files),
            len(loaded),
            settled=is_settled(settings, manifest),
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
        result.settled = is_settled(settings, updated)  # a claimed file left behind is the sweeper's
        if versioned is None:
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
    prepared: Tables | None = None,
    versioned: bool | None = None,
) -> CleanupResult:
    """Complete the run (read afresh from the bucket) if all its files are loaded, then apply the
    cleanup mode to its files.

    Completion is the loader's own step (``pgsnow.load.completion.complete_run``: a run's deletes,
    then state ``loaded``), so a run whose last file loaded before its manifest said ``staged`` is
    completed here. A replace run's swap is left to the loader (``swap=False``). ``aws_credentials``:
    this function's AWS session, whose credentials Snowflake reads a deletes key list with when
    there is no storage integration. ``prepared``: the pass's memory of the tables and ledgers it
    has prepared (so a table's ledger is made ready once per pass, not once per run);
    ``versioned``: the bucket's versioning, asked once per pass.
    """
    table, run_id = manifest.table, manifest.run_id
    completed = complete_run(
        settings=settings,
        sf_conn=sf_conn,
        s3=s3,
        table=table,
        run_id=run_id,
        credentials_source=aws_credentials,
        tables=prepared,
        swap=False,
    )
    if completed.state is None:  # the manifest is gone: nothing is left to do
        return CleanupResult(table.qualified, run_id, RunState.FAILED, 0, 0, settled=True)
    if settings.cleanup_mode is CleanupMode.NEVER or completed.state not in (
        RunState.STAGED,
        RunState.LOADED,
    ):
        # `extracting`: the file list is not final yet; `failed`: its files stay for the sweeper.
        return CleanupResult(
            table.qualified,
            run_id,
            completed.state,
            completed.files_total,
            completed.files_loaded,
            settled=completed.state is RunState.FAILED
            or (completed.state is RunState.LOADED and settings.cleanup_mode is CleanupMode.NEVER),
        )
    return remove_loaded_files(
        settings=settings, s3=s3, sf_conn=sf_conn, table=table, run_id=run_id, versioned=versioned
    )


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


def is_settled(settings: Settings, manifest: RunManifest) -> bool:
    """Nothing is left for any pass: failed (its files are the sweeper's), or loaded with no file the
    mode removes left unclaimed. Only completion writes ``loaded``, after the extractor's last
    write; a run whose manifest is written again after ``failed`` (resumed, when the extractor
    stopped before its checkpoint said so) is marked again first, and the pass removes only the
    marker versions it listed."""
    if manifest.state is RunState.FAILED:
        return True
    return manifest.state is RunState.LOADED and not needs_cleanup(settings, manifest)


def index_pending_runs(settings: Settings, store: RunStore, tables: Iterable[TableRef] | None = None) -> int:
    """Mark pending every run with work whose manifest a release without the index wrote; how many.

    The upgrade path, a no-op once the index is settled: the first whole-bucket pass on a bucket
    with no index record lists and reads every manifest (what every pass cost before), marks the
    runs still ``extracting`` or with work left, and records the index as built
    (``_pgsnow/pending-index.json``). For ``INDEX_SETTLING`` after that, passes list the manifests
    again but read only those written since (an extractor of the previous release may still be
    running). A pass for given tables before the record exists indexes only those tables.
    """
    built_at = store.pending_index_built_at()
    if built_at is not None and store.now() - built_at >= INDEX_SETTLING:
        return 0
    since = None if built_at is None else built_at - _CLOCK_SLACK
    marked = 0
    for manifest in store.iter_manifests(tables, modified_since=since):
        if manifest.state is RunState.EXTRACTING or needs_cleanup(settings, manifest):
            store.mark_pending(manifest.table, manifest.run_id, if_absent=True)
            marked += 1
    if tables is None and built_at is None:
        store.record_pending_index_built()
    logger.info(
        "pending-run index built" if built_at is None else "pending-run index settling",
        extra={"runs": marked, "tables": None if tables is None else [t.qualified for t in tables]},
    )
    return marked


def _clean_pending_run(
    *,
    settings: Settings,
    store: RunStore,
    s3: Any,
    sf_conn: Any,
    pending: PendingRun,
    aws_credentials: CredentialsSource | None,
    prepared: Tables | None,
    versioned: bool,
) -> tuple[CleanupResult | None, bool]:
    """The run's cleanup (None when it had nothing to do), and whether its marker may go."""
    found = store.read_manifest_for_update(pending.table, pending.run_id)
    if found is None:
        return None, store.now() - pending.marked_at >= MARKER_WITHOUT_MANIFEST_AGE
    manifest = found.manifest
    if not needs_cleanup(settings, manifest):
        return None, is_settled(settings, manifest)
    result = cleanup_run(
        settings=settings,
        s3=s3,
        sf_conn=sf_conn,
        manifest=manifest,
        aws_credentials=aws_credentials,
        prepared=prepared,
        versioned=versioned,
    )
    return result, result.settled


def cleanup_pending_runs(
    *,
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    tables: Iterable[TableRef] | None = None,
    aws_credentials: CredentialsSource | None = None,
    clock: Callable[[], float] = time.time,
) -> list[CleanupResult]:
    """One cleanup pass over every run that may have work left (the scheduled cleanup function's job).

    Reads the pending-run index (one LIST per 1,000 pending runs), each pending run's manifest, and
    cleans those with work; then removes the markers of runs now settled (one request per 1,000).
    ``clock``: the time the pass compares the index's and markers' ages with.
    """
    started = time.monotonic()
    tables = list(tables) if tables is not None else None
    store = RunStore(s3, settings.bucket, clock=clock)
    index_pending_runs(settings, store, tables)
    pending = store.pending_runs(tables)
    database = settings.snowflake.database
    prepared = Tables(database) if database else None
    versioned = bool(pending) and bucket_is_versioned(s3, settings.bucket)
    results: list[CleanupResult] = []
    settled: list[PendingRun] = []
    for run in pending:
        result, done = _clean_pending_run(
            settings=settings,
            store=store,
            s3=s3,
            sf_conn=sf_conn,
            pending=run,
            aws_credentials=aws_credentials,
            prepared=prepared,
            versioned=versioned,
        )
        if result is not None:
            results.append(result)
        if done:
            settled.append(run)
    refused = store.remove_pending(settled)
    if refused:
        # The runs stay indexed (a later pass reads them again): cost, not correctness.
        logger.error(
            "could not remove pending-run markers", extra={"runs": len(refused), "s3_key": refused[0]}
        )
    logger.info(
        "cleanup finished",
        extra={
            "runs": len(results),
            "pending": len(pending),
            "settled": len(settled),
            "files_deleted": sum(len(r.deleted_keys) for r in results),
            "bytes": sum(r.deleted_bytes for r in results),
            "duration_ms": int((time.monotonic() - started) * 1000),
        },
    )
    return results
