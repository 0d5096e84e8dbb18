"""The S3 side of staging: data files with their metadata, and how S3 errors are classified.

Data files are uploaded from a local temp file with ``upload_file`` (multipart above
the transfer threshold, so memory stays bounded for large batches). Every data file
carries the META_* user metadata of pgsnow.manifest so the loader can check a file's row
count and checksum on its own, except a file uploaded while it was still being written
(``pgsnow.streamed_upload``): its metadata was set before its content existed, and S3's own SHA-256
checksum of its parts identifies it instead (``staged_checksum``). Run manifests and the other
``_pgsnow/`` objects are ``pgsnow.runs``'s.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.errors import PermanentError, PgSnowError, RetryableError, aws_error_code
from pgsnow.keys import FileFormat
from pgsnow.manifest import META_BATCH, META_ROWS, META_RUN_ID, META_SHA256

CSV_CONTENT_TYPE = "text/csv; charset=utf-8"
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"

# A data file is uploaded in 8 MB parts (boto3's default part size), this many at once. Each part
# in flight is held in memory by its thread: boto3's default of 10 peaked 17 MB higher than 4 while
# a 128 MB CSV file uploaded (docs/performance.md); 4 parts at once still upload a file faster than
# the extractor writes the next one.
UPLOAD_CONFIG = TransferConfig(max_concurrency=4)

# S3's answers for a key (or version) that is not there.
MISSING_OBJECT_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
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


def classify_s3_error(exc: ClientError | BotoCoreError, *, s3_key: str | None = None) -> PgSnowError:
    """Throttling, timeouts and 5xx are retryable; denied access or a missing bucket is not."""
    if isinstance(exc, BotoCoreError):
        return RetryableError(f"S3 request failed: {exc}", s3_key=s3_key)
    code = aws_error_code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _RETRYABLE_S3_CODES or status >= 500:
        return RetryableError(f"S3 {code or status}: {exc}", s3_key=s3_key)
    return PermanentError(f"S3 {code or status}: {exc}", s3_key=s3_key)


def is_missing_object(exc: ClientError | BotoCoreError) -> bool:
    return isinstance(exc, ClientError) and aws_error_code(exc) in MISSING_OBJECT_CODES


# What S3 answers a GET of a missing key when the caller may not list it (below).
ACCESS_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden"})


def denied_because_missing(s3: Any, bucket: str, key: str, exc: ClientError | BotoCoreError) -> bool:
    """Whether an access-denied answer to a GET of ``key`` only means the key does not exist.

    S3 answers a GET of a missing key with 403, not 404, when the caller lacks ``s3:ListBucket``
    ("Amazon S3 returns 403 (access denied)" if you don't have the s3:ListBucket permission,
    GetObject reference). pgsnow's roles hold ListBucket only under an ``s3:prefix`` condition,
    which a GET does not carry, so S3 may answer either way. The key is then looked for by a
    listing of exactly its prefix (which the roles may make): not there means missing; there
    means a real refusal, raised as such by the caller.
    """
    if not isinstance(exc, ClientError) or aws_error_code(exc) not in ACCESS_DENIED_CODES:
        return False
    try:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except (ClientError, BotoCoreError):
        return False  # the listing is refused too: report the GET's own refusal
    return not any(entry.get("Key") == key for entry in listed.get("Contents", ()))


def raise_unless_missing(exc: ClientError | BotoCoreError, *, s3_key: str) -> None:
    """Return when S3 answered that the object is not there; otherwise raise the classified error."""
    if not is_missing_object(exc):
        raise classify_s3_error(exc, s3_key=s3_key) from exc


# How a staged file's checksum reads when S3 computed it over the file's parts (a multipart upload
# made with ChecksumAlgorithm=SHA256): S3's base64 composite, which depends on the part sizes, so
# it is never mistaken for the hex SHA-256 of the whole file that the other files carry.
PARTS_CHECKSUM_PREFIX = "sha256-parts:"


def parts_checksum(part_digests: Sequence[bytes]) -> str:
    """The checksum S3 reports for a multipart object from its parts' SHA-256 digests (the SHA-256
    of their concatenation, base64: S3 user guide, "Checking object integrity"), as pgsnow writes it."""
    combined = hashlib.sha256(b"".join(part_digests)).digest()
    return PARTS_CHECKSUM_PREFIX + base64.b64encode(combined).decode("ascii")


def staged_checksum(head: Mapping[str, Any]) -> str | None:
    """A staged object's checksum, as its run's manifest lists it, from a HEAD made with
    ``ChecksumMode=ENABLED``; None when the object carries neither kind.

    The extractor's ``pgsnow-sha256`` metadata when it is there. Otherwise S3's SHA-256 checksum:
    of a multipart object (its ETag ends in ``-<parts>``), S3's composite over the parts, whose
    ``-<parts>`` suffix is dropped (the part count is implied by the digest; moto leaves it out);
    of an object uploaded whole with a SHA-256 checksum, the file's SHA-256, in hex as the metadata.
    """
    metadata = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
    if metadata.get(META_SHA256):
        return str(metadata[META_SHA256])
    reported = head.get("ChecksumSHA256")
    if not reported:
        return None
    digest = str(reported).split("-", 1)[0]
    if "-" in str(head.get("ETag", "")):
        return PARTS_CHECKSUM_PREFIX + digest
    try:
        return base64.b64decode(digest, validate=True).hex()
    except ValueError:
        return None


def data_file_metadata(*, run_id: str, batch: int, rows: int, sha256: str) -> dict[str, str]:
    return {META_RUN_ID: run_id, META_BATCH: str(batch), META_ROWS: str(rows), META_SHA256: sha256}


def content_headers(key: str) -> dict[str, str]:
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
    headers = content_headers(key)
    metadata = data_file_metadata(run_id=run_id, batch=batch, rows=rows, sha256=sha256)
    try:
        if isinstance(body, Path):
            s3.upload_file(
                str(body), bucket, key, ExtraArgs={"Metadata": metadata, **headers}, Config=UPLOAD_CONFIG
            )
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata, **headers)
    except (ClientError, BotoCoreError) as exc:
        error = classify_s3_error(exc, s3_key=key)
        error.run_id = run_id
        raise error from exc
