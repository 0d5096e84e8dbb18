"""Helpers of the staged-file lifecycle suites (cleanup modes, cleanup lifecycle, status): stage
a run as the extractor's role, load its keys as the loader's role, drain the queue, and inspect
staged objects (versions, tags, existence). The fixtures are in conftest.py."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError
from psycopg2.extensions import connection as PgConnection

from pgsnow.config import Component, Settings
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, parse_data_key
from pgsnow.load.batch import load_staged_files
from pgsnow.load.outcomes import LoadStatus
from pgsnow.local.stack import LocalStack
from pgsnow.manifest import RunManifest

ROWS_PER_FILE = 2
SOURCE_ROWS = [(n, f"item {n}") for n in range(1, 7)]  # three files of two rows
FILES_PER_RUN = 3
ORPHAN_AGE_MINUTES = 5
RETENTION_DAYS = 2


def drain(sqs: Any, queue_url: str) -> int:
    """Receive and delete every visible message: the notifications are lost (PurgeQueue allows one a minute)."""
    drained = 0
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get(
        "Messages", []
    ):
        for message in messages:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        drained += len(messages)
    return drained


def settings_with(stack: LocalStack, **env: str) -> Settings:
    return Settings.from_env({**stack.env, **env}, component=Component.CLEANUP)


def stage_run(stack: LocalStack, pg_conn: PgConnection, table: TableRef) -> RunManifest:
    """One extractor run of ``table``, as the extractor's role."""
    manifest = extract_table(
        settings=stack.settings(Component.EXTRACTOR),
        pg_conn=pg_conn,
        s3=stack.function_client(Component.EXTRACTOR, "s3"),
        table=table,
        file_format=FileFormat.CSV,
    )
    # (not a test module: no assertion rewriting here, so the message says what was found)
    assert len(manifest.files) == FILES_PER_RUN, [f.key for f in manifest.files]
    return manifest


def load_keys(stack: LocalStack, sf_conn: Any, keys: list[str]) -> None:
    """Load ``keys`` as the loader's role."""
    settings = stack.settings(Component.LOADER)
    s3 = stack.function_client(Component.LOADER, "s3")
    results = load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[parse_data_key(k, settings.prefix) for k in keys]
    )
    assert [r.status for r in results] == [LoadStatus.LOADED] * len(keys), results


def versions(s3: Any, bucket: str, key: str) -> tuple[int, int]:
    """(data versions, delete markers) of exactly ``key``."""
    listing = s3.list_object_versions(Bucket=bucket, Prefix=key)
    data = sum(1 for v in listing.get("Versions", []) if v["Key"] == key)
    markers = sum(1 for m in listing.get("DeleteMarkers", []) if m["Key"] == key)
    return data, markers


def exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in {"404", "NoSuchKey"}:
            return False
        raise
    return True


def tags(s3: Any, bucket: str, key: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}
