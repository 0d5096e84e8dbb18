"""S3 facts about staged files and run manifests: HEAD, the manifest check, a CSV header."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.csv_records import parse_csv_record
from pgsnow.errors import PermanentError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.keys import StagedObject, manifest_key
from pgsnow.load.outcomes import ObjectFacts
from pgsnow.manifest import META_ROWS, META_RUN_ID, RunManifest
from pgsnow.runs import RunStore, VersionedManifest
from pgsnow.staging import classify_s3_error, denied_because_missing, is_missing_object, staged_checksum

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

HEADER_READ_BYTES = 1024 * 1024  # a header row is read from the file's first MiB (ranged GET)


def head_staged_object(s3: S3Client, bucket: str, staged: StagedObject) -> ObjectFacts | None:
    """The object's ETag, size, pgsnow metadata and checksum; None when the object does not exist."""
    try:
        # ChecksumMode: S3's own checksum too, which identifies a file streamed while it was written.
        response = s3.head_object(Bucket=bucket, Key=staged.key, ChecksumMode="ENABLED")
    except ClientError as exc:
        # A 403 may only mean "not there" to a caller that may not list the key (staging module).
        if is_missing_object(exc) or denied_because_missing(s3, bucket, staged.key, exc):
            return None
        raise classify_s3_error(exc, s3_key=staged.key) from exc
    except BotoCoreError as exc:
        raise classify_s3_error(exc, s3_key=staged.key) from exc
    metadata = {k.lower(): v for k, v in response.get("Metadata", {}).items()}
    rows_text = metadata.get(META_ROWS)
    rows: int | None = None
    if rows_text is not None:
        if not rows_text.strip().isdigit():
            raise PermanentError(
                f"object metadata {META_ROWS}={rows_text!r} is not a row count", s3_key=staged.key
            )
        rows = int(rows_text)
    meta_run_id = metadata.get(META_RUN_ID)
    if staged.run_id and meta_run_id and meta_run_id != staged.run_id:
        raise PermanentError(
            f"object metadata {META_RUN_ID}={meta_run_id!r} does not match the key's run id",
            s3_key=staged.key,
            run_id=staged.run_id,
        )
    return ObjectFacts(
        etag=str(response.get("ETag", "")).strip('"'),
        size=int(response.get("ContentLength", 0)),
        run_id=meta_run_id or staged.run_id,
        rows=rows,
        sha256=staged_checksum(response),
    )


def read_run_manifest(s3: S3Client, bucket: str, table: TableRef, run_id: str) -> VersionedManifest:
    """The run's manifest, with the version its completion's conditional write needs (so the
    batch reads it once). Missing means the extractor has not written it yet: retry later."""
    found = RunStore(s3, bucket).read_manifest_for_update(table, run_id)
    if found is None:
        raise RetryableError(
            "the run's manifest is not in the bucket (yet)",
            table=table.qualified,
            s3_key=manifest_key(table, run_id),
            run_id=run_id,
        )
    manifest = found.manifest
    if manifest.table != table or manifest.run_id != run_id:
        raise PermanentError(
            f"manifest is for {manifest.table.qualified} run {manifest.run_id}",
            s3_key=manifest_key(table, run_id),
            run_id=run_id,
        )
    return found


def manifest_mismatch(
    manifest: RunManifest, staged: StagedObject, facts: ObjectFacts
) -> PermanentError | None:
    """A file its run's manifest lists must be the file the extractor wrote: same size, same checksum.

    The loader never downloads data files (COPY reads them in Snowflake), so the check is
    against what S3 reports: the size and the checksum (``pgsnow.staging.staged_checksum``: the
    SHA-256 the extractor stored as object metadata, or S3's own SHA-256 checksum of a file
    streamed while it was written). An object overwritten by hand under a listed key loses or
    changes both.
    """
    listed = manifest.file_for_key(staged.key)
    if listed is None:
        return None  # still extracting: the manifest lists files only once the run is staged
    problems = []
    if facts.sha256 != listed.sha256:
        problems.append(f"its checksum is {facts.sha256!r}, the manifest says {listed.sha256!r}")
    if facts.size != listed.bytes:
        problems.append(f"size is {facts.size} bytes, the manifest says {listed.bytes}")
    if not problems:
        return None
    return PermanentError(
        "staged file does not match its run's manifest: " + "; ".join(problems),
        table=staged.table.qualified,
        s3_key=staged.key,
        run_id=staged.run_id,
    )


def read_csv_header(s3: S3Client, bucket: str, staged: StagedObject) -> list[str]:
    """The header row of a staged CSV (gzip or plain), read from the first bytes only."""
    try:
        body = s3.get_object(Bucket=bucket, Key=staged.key, Range=f"bytes=0-{HEADER_READ_BYTES - 1}")[
            "Body"
        ].read()
    except (ClientError, BotoCoreError) as exc:
        raise classify_s3_error(exc, s3_key=staged.key) from exc
    try:
        if staged.gzip:
            # Only the start of the stream: the rest of the file is never downloaded.
            body = zlib.decompressobj(wbits=31).decompress(body, HEADER_READ_BYTES)
        # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first name.
        first_line = body.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8-sig")
    except (zlib.error, UnicodeDecodeError) as exc:
        raise PermanentError(f"the CSV file's header row cannot be read: {exc}", s3_key=staged.key) from exc
    header = parse_csv_record(first_line)
    if not header or any(not name for name in header):
        raise PermanentError("the CSV file has no usable header row", s3_key=staged.key)
    return header
