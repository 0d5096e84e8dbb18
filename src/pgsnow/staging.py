"""The S3 side of staging: data files with their metadata, and run manifests.

Data files are uploaded from a local temp file with ``upload_file`` (multipart above
the transfer threshold, so memory stays bounded for large batches). Every data file
carries the META_* user metadata of pgsnow.manifest so the loader can check a file's row
count and checksum on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.errors import PermanentError, PgSnowError, RetryableError, aws_error_code
from pgsnow.identifiers import TableRef
from pgsnow.keys import KEY_LISTS_PREFIX, FileFormat, manifest_key
from pgsnow.manifest import META_BATCH, META_ROWS, META_RUN_ID, META_SHA256, RunManifest

MANIFEST_CONTENT_TYPE = "application/json"
CSV_CONTENT_TYPE = "text/csv; charset=utf-8"
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"

_RETRYABLE_S3_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}


class ManifestNotFoundError(PermanentError):
    """No manifest object for this (table, run)."""


def classify_s3_error(exc: ClientError | BotoCoreError, *, s3_key: str | None = None) -> PgSnowError:
    """Throttling, timeouts and 5xx are retryable; denied access or a missing bucket is not."""
    if isinstance(exc, BotoCoreError):
        return RetryableError(f"S3 request failed: {exc}", s3_key=s3_key)
    code = aws_error_code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _RETRYABLE_S3_CODES or status >= 500:
        return RetryableError(f"S3 {code or status}: {exc}", s3_key=s3_key)
    return PermanentError(f"S3 {code or status}: {exc}", s3_key=s3_key)


def data_file_metadata(*, run_id: str, batch: int, rows: int, sha256: str) -> dict[str, str]:
    return {META_RUN_ID: run_id, META_BATCH: str(batch), META_ROWS: str(rows), META_SHA256: sha256}


def _content_headers(key: str) -> dict[str, str]:
    lowered = key.lower()
    if lowered.endswith("." + FileFormat.PARQUET.extension):
        return {"ContentType": PARQUET_CONTENT_TYPE}
    if lowered.endswith(".gz"):
        # Verified: DuckDB httpfs (fakesnow) and boto3 read the stored gzip bytes as they are.
        return {"ContentType": CSV_CONTENT_TYPE, "ContentEncoding": "gzip"}
    return {"ContentType": CSV_CONTENT_TYPE}


def put_data_file(
    s3: Any,
    bucket: str,
    key: str,
    body: Path | bytes,
    *,
    run_id: str,
    batch: int,
    rows: int,
    sha256: str,
) -> None:
    """Upload one staged data file with its pgsnow metadata (path: streamed/multipart; bytes: one PUT)."""
    headers = _content_headers(key)
    metadata = data_file_metadata(run_id=run_id, batch=batch, rows=rows, sha256=sha256)
    try:
        if isinstance(body, Path):
            s3.upload_file(str(body), bucket, key, ExtraArgs={"Metadata": metadata, **headers})
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata, **headers)
    except (ClientError, BotoCoreError) as exc:
        error = classify_s3_error(exc, s3_key=key)
        error.run_id = run_id
        raise error from exc


def key_list_key(table: TableRef, run_id: str) -> str:
    """Where a run's full primary-key list goes (outside the staging prefix: never loaded as data).

    Snowflake reads it by URL, so the storage integration's allowed locations
    (``setup_sql.allowed_locations``) and the template's SnowflakeStorageRole cover
    ``KEY_LISTS_PREFIX`` too.
    """
    return f"{KEY_LISTS_PREFIX}/{table.schema}/{table.table}/{run_id}.csv.gz"


def put_manifest(s3: Any, bucket: str, manifest: RunManifest) -> str:
    """Write (or overwrite) a run's manifest; returns its key."""
    key = manifest_key(manifest.table, manifest.run_id)
    try:
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=manifest.to_json().encode("utf-8"),
            ContentType=MANIFEST_CONTENT_TYPE,
        )
    except (ClientError, BotoCoreError) as exc:
        error = classify_s3_error(exc, s3_key=key)
        error.run_id = manifest.run_id
        raise error from exc
    return key


def get_manifest(s3: Any, bucket: str, table: TableRef, run_id: str) -> RunManifest:
    """Read a run's manifest; ManifestNotFoundError when there is none."""
    key = manifest_key(table, run_id)
    try:
        response = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if aws_error_code(exc) in {"NoSuchKey", "404"}:
            raise ManifestNotFoundError(
                "no manifest for this run", table=table.qualified, s3_key=key, run_id=run_id
            ) from exc
        raise classify_s3_error(exc, s3_key=key) from exc
    except BotoCoreError as exc:
        raise classify_s3_error(exc, s3_key=key) from exc
    return RunManifest.from_json(response["Body"].read(), s3_key=key)
