"""Delete staged files once the load ledger shows them loaded.

Cleanup never trusts a notification or a guess: a file is deleted only when the
Snowflake load ledger (written in the same transaction as its COPY) records
that exact key with the same checksum the manifest lists. Modes
(``CLEANUP_S3_FILES``):

* ``never``: keep everything; the bucket lifecycle expires staged files after
  the retention period.
* ``after_each``: delete each file of a run as soon as the ledger shows it.
* ``after_all``: delete a run's files only when every file of its manifest is in
  the ledger (the specification's recommended mode).

When every file of a ``staged`` manifest is loaded, the manifest moves to
``loaded`` (whatever the mode), which is what later cleanup passes and status
reports read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pgsnow.config import CleanupMode, Settings
from pgsnow.errors import ConfigError
from pgsnow.identifiers import TableRef
from pgsnow.keys import CONTROL_PREFIX
from pgsnow.manifest import RunManifest, RunState
from pgsnow.observability import logger
from pgsnow.snowflake import ledger_name
from pgsnow.staging import put_manifest

# Snowflake caps the number of expressions in an IN list; stay well below it.
_LEDGER_QUERY_CHUNK = 500
_S3_DELETE_CHUNK = 1000  # DeleteObjects accepts at most 1000 keys


@dataclass
class CleanupResult:
    table: str
    run_id: str
    state: RunState
    files_total: int
    files_loaded: int
    deleted_keys: list[str] = field(default_factory=list)
    deleted_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "run_id": self.run_id,
            "state": self.state.value,
            "files_total": self.files_total,
            "files_loaded": self.files_loaded,
            "files_deleted": len(self.deleted_keys),
            "bytes_deleted": self.deleted_bytes,
        }


def build_ledger_lookup(database: str, control_schema: str, key_count: int) -> str:
    """SELECT the loaded ledger rows for ``key_count`` bound keys (``%s`` placeholders, pyformat).

    Only rows with LOADED_AT set count: the claim and the load commit together, so a
    committed row without it cannot exist, but a reader must not rely on that.
    """
    placeholders = ", ".join(["%s"] * key_count)
    return (
        f'SELECT "S3_KEY", "SHA256" FROM {ledger_name(database, control_schema)}\n'
        f'WHERE "S3_KEY" IN ({placeholders}) AND "LOADED_AT" IS NOT NULL'
    )


def loaded_checksums(sf_conn: Any, settings: Settings, keys: Sequence[str]) -> dict[str, str | None]:
    """Map each key the ledger records as loaded to the checksum it recorded."""
    database = settings.snowflake.database
    if database is None:
        raise ConfigError(["SNOWFLAKE_DATABASE is needed to read the load ledger"])
    found: dict[str, str | None] = {}
    cursor = sf_conn.cursor()
    try:
        for start in range(0, len(keys), _LEDGER_QUERY_CHUNK):
            chunk = list(keys[start : start + _LEDGER_QUERY_CHUNK])
            cursor.execute(
                build_ledger_lookup(database, settings.snowflake.control_schema, len(chunk)), chunk
            )
            for s3_key, sha256 in cursor.fetchall():
                found[s3_key] = sha256
    finally:
        cursor.close()
    return found


def cleanup_run(*, settings: Settings, s3: Any, sf_conn: Any, manifest: RunManifest) -> CleanupResult:
    """Apply the cleanup mode to one run; mark the run loaded when all its files are."""
    result = CleanupResult(manifest.table.qualified, manifest.run_id, manifest.state, len(manifest.files), 0)
    if manifest.state is not RunState.STAGED:
        # `extracting`: the file list is not final yet; `loaded`/`failed`: nothing left to decide here.
        return result
    ledger = loaded_checksums(sf_conn, settings, [f.key for f in manifest.files]) if manifest.files else {}
    # A ledger row with another checksum means the object under that key is not the file we listed:
    # not ours to delete, and not proof that this run's file was loaded.
    loaded = [f for f in manifest.files if f.key in ledger and ledger[f.key] in (None, f.sha256)]
    result.files_loaded = len(loaded)
    all_loaded = len(loaded) == len(manifest.files)

    deletable = []
    if settings.cleanup_mode is CleanupMode.AFTER_EACH or (
        settings.cleanup_mode is CleanupMode.AFTER_ALL and all_loaded
    ):
        deletable = loaded
    if deletable:
        result.deleted_keys = _delete_keys(s3, settings.bucket, [f.key for f in deletable])
        deleted = set(result.deleted_keys)
        result.deleted_bytes = sum(f.bytes for f in deletable if f.key in deleted)

    if all_loaded:
        put_manifest(s3, settings.bucket, manifest.with_state(RunState.LOADED))
        result.state = RunState.LOADED
    logger.info("cleanup pass", extra=result.as_dict())
    return result


def _delete_keys(s3: Any, bucket: str, keys: list[str]) -> list[str]:
    deleted: list[str] = []
    for start in range(0, len(keys), _S3_DELETE_CHUNK):
        chunk = keys[start : start + _S3_DELETE_CHUNK]
        response = s3.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": False}
        )
        deleted.extend(d["Key"] for d in response.get("Deleted", []))
        for error in response.get("Errors", []):
            logger.warning(
                "could not delete staged file", extra={"s3_key": error.get("Key"), "code": error.get("Code")}
            )
    return deleted


def iter_manifests(s3: Any, bucket: str, tables: Iterable[TableRef] | None = None) -> Iterable[RunManifest]:
    """Every run manifest in the bucket (or for the given tables), oldest run first per table."""
    prefixes = (
        [f"{CONTROL_PREFIX}/manifests/{t.schema}/{t.table}/" for t in tables]
        if tables is not None
        else [f"{CONTROL_PREFIX}/manifests/"]
    )
    paginator = s3.get_paginator("list_objects_v2")
    for prefix in prefixes:
        keys = sorted(
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
            if obj["Key"].endswith(".json")
        )
        for key in keys:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            yield RunManifest.from_json(body, s3_key=key)


def cleanup_pending_runs(
    *, settings: Settings, s3: Any, sf_conn: Any, tables: Iterable[TableRef] | None = None
) -> list[CleanupResult]:
    """One cleanup pass over every staged run (the scheduled cleanup function's job)."""
    started = time.monotonic()
    results = [
        cleanup_run(settings=settings, s3=s3, sf_conn=sf_conn, manifest=m)
        for m in iter_manifests(s3, settings.bucket, tables)
        if m.state is RunState.STAGED
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
