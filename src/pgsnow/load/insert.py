"""LOAD_METHOD=insert: small CSV files of a run INSERTed with bound values, like COPY converts them.

The loader ships no Parquet reader and no CSV module that tells NULL from ``""``, so it parses
the CSV itself (``parse_csv_records``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.config import LoadMethod, LoadSettings
from pgsnow.errors import PermanentError
from pgsnow.keys import FileFormat, StagedObject
from pgsnow.load.outcomes import ObjectFacts
from pgsnow.manifest import RunManifest
from pgsnow.snowflake.load_sql import LoadColumn, build_insert_rows
from pgsnow.staging import classify_s3_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from snowflake.connector import SnowflakeConnection

INSERT_ROWS_PER_STATEMENT = 1000  # rows per multi-row INSERT (one statement, bound values)


def is_insertable(
    load: LoadSettings, staged: StagedObject, facts: ObjectFacts, manifest: RunManifest | None
) -> bool:
    """LOAD_METHOD=insert takes a CSV file of a run (its manifest gives exact column types) whose
    row count (object metadata) is known and at most LOAD_INSERT_MAX_ROWS. Parquet files, larger
    files and hand-dropped files go through COPY (the loader ships no Parquet reader)."""
    return (
        load.method is LoadMethod.INSERT
        and manifest is not None
        and staged.file_format is FileFormat.CSV
        and facts.rows is not None
        and facts.rows <= load.insert_max_rows
    )


def insert_file(
    sf_conn: SnowflakeConnection,
    s3: S3Client,
    bucket: str,
    staged: StagedObject,
    *,
    columns: Sequence[LoadColumn],
    target: tuple[str, str, str],
) -> dict[str, Any]:
    """INSERT one CSV file's rows (in the caller's transaction); a COPY-shaped result row."""
    rows = read_csv_rows(s3, bucket, staged, len(columns))
    statement = build_insert_rows(target, columns)
    with sf_conn.cursor() as cursor:
        for start in range(0, len(rows), INSERT_ROWS_PER_STATEMENT):
            cursor.executemany(statement, rows[start : start + INSERT_ROWS_PER_STATEMENT])
    return {"file": staged.file_name, "status": "LOADED", "rows_parsed": len(rows), "rows_loaded": len(rows)}


def read_csv_rows(
    s3: S3Client, bucket: str, staged: StagedObject, width: int
) -> list[tuple[str | None, ...]]:
    """A staged CSV's data rows (header skipped): an unquoted empty field is None (NULL), ``""`` is ''."""
    try:
        body = s3.get_object(Bucket=bucket, Key=staged.key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise classify_s3_error(exc, s3_key=staged.key) from exc
    try:
        text = (zlib.decompress(body, wbits=31) if staged.gzip else body).decode("utf-8")
    except (zlib.error, UnicodeDecodeError) as exc:
        raise PermanentError(f"the CSV file cannot be read: {exc}", s3_key=staged.key) from exc
    records = parse_csv_records(text)[1:]  # SKIP_HEADER = 1
    for number, record in enumerate(records, start=2):
        if len(record) != width:
            raise PermanentError(
                f"line {number} has {len(record)} fields, the table has {width} columns", s3_key=staged.key
            )
    return records


def parse_csv_records(text: str) -> list[tuple[str | None, ...]]:
    """RFC 4180 records with FIELD_OPTIONALLY_ENCLOSED_BY='"' and EMPTY_FIELD_AS_NULL semantics.

    Python's csv module cannot tell an unquoted empty field (NULL) from ``""`` (an empty
    string) before 3.12, so the records are split here.
    """
    records: list[tuple[str | None, ...]] = []
    fields: list[str | None] = []
    position, length = 0, len(text)
    while position < length:
        if text[position] == '"':
            position = _read_quoted_field(text, position, fields)
        else:
            end = position
            while end < length and text[end] not in ",\n\r":
                end += 1
            fields.append(text[position:end] or None)
            position = end
        if position >= length or text[position] in "\r\n":
            records.append(tuple(fields))
            fields = []
            position += 2 if text.startswith("\r\n", position) else 1
        elif text[position] == ",":
            position += 1
            if position >= length:
                fields.append(None)
                records.append(tuple(fields))
                fields = []
        else:
            raise PermanentError(f"unexpected character after a quoted CSV field at offset {position}")
    return records


def _read_quoted_field(text: str, position: int, fields: list[str | None]) -> int:
    """Append the quoted field that starts at ``position`` (``""`` is one quote); where it ends."""
    chunks: list[str] = []
    position += 1
    while True:
        end = text.find('"', position)
        if end < 0:
            raise PermanentError("unterminated quoted field in the CSV file")
        chunks.append(text[position:end])
        if text.startswith('""', end):
            chunks.append('"')
            position = end + 2
            continue
        fields.append("".join(chunks))
        return end + 1
