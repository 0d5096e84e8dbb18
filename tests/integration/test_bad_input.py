"""Hostile and broken input: a clear error, and nothing partial.

Real servers only (conftest.py's ``pipeline``). Each case states what pgsnow does with the
input and checks it: refused before any SQL, dead-lettered after SQS's retries while the
rest of the run loads, or — where pgsnow has no check — what ``verify`` then reports.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import uuid
from typing import TYPE_CHECKING, Any

import psycopg2
import pytest
import snowflake.connector.errors
from psycopg2 import sql

from pgsnow.config import Component, Settings
from pgsnow.errors import ConfigError, UnsafeIdentifierError
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key
from pgsnow.manifest import RunState
from pgsnow.runs import RunStore
from pgsnow.staging import put_data_file

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

GOOD_COLUMNS = "id integer PRIMARY KEY, note text, amount numeric(10, 2)"
GOOD_ROWS = "SELECT g, 'row ' || g, g + 0.25 FROM generate_series(1, {n}) g"


def staged_pair(
    pipeline: PipelineHarness, name: str, rows: int = 10, options: dict[str, Any] | None = None
) -> tuple[TableRef, Any]:
    table = pipeline.table(name)
    pipeline.create_table(table, GOOD_COLUMNS, GOOD_ROWS.format(n=rows))
    env = {"PGSNOW_TABLE_OPTIONS": json.dumps({table.qualified: options})} if options else {}
    return table, pipeline.extract(table, EXTRACT_BATCH_ROWS=str(rows // 2), **env)


def s3_event_body(bucket: str, key: str) -> str:
    """An S3 ObjectCreated notification as S3 sends it (the key URL-encoded)."""
    from urllib.parse import quote_plus

    record = {
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key, safe="/"), "size": 10}},
    }
    return json.dumps({"Records": [record]})


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("schema", "table"),
    [
        pytest.param("public", "not_listed", id="outside-allowlist"),
        pytest.param("public", 'x"; DROP TABLE y; --', id="quote-and-semicolon"),
        pytest.param("public.other", "t", id="dot-in-schema"),
        pytest.param("ünï", "tâble", id="unicode-not-listed"),
    ],
)
def test_extractor_refuses_unlisted_or_hostile_names_before_any_sql(
    pipeline: PipelineHarness, schema: str, table: str
) -> None:
    """Expected: UnsafeIdentifierError naming the table, raised before any SQL (the PostgreSQL
    connection given is closed: any statement would fail differently) and before any S3 call."""
    settings = pipeline.settings(Component.EXTRACTOR, PGSNOW_TABLES=f"{pipeline.schema}.listed")
    closed = psycopg2.connect(pipeline.source_dsn)
    closed.close()

    with pytest.raises(UnsafeIdentifierError) as refused:
        extract_table(settings=settings, pg_conn=closed, s3=None, table=TableRef(schema, table))

    assert refused.value.table == f"{schema}.{table}"
    assert "allowlist" in refused.value.message


@pytest.mark.parametrize(
    ("schema", "table"),
    [
        pytest.param("..", "t", id="dot-dot"),
        pytest.param("public", "a/b", id="slash"),
        pytest.param("public", "tab\nle", id="control-character"),
        pytest.param("", "t", id="empty"),
    ],
)
def test_malformed_names_cannot_even_be_named(schema: str, table: str) -> None:
    """Expected: a TableRef with '..', '/', control characters or an empty part is refused."""
    with pytest.raises(UnsafeIdentifierError):
        TableRef(schema, table)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param('Odd"Name;x', id="quote-semicolon-mixed-case"),
        pytest.param("Order Details", id="space"),
    ],
)
def test_allowlisted_weird_but_legal_names_replicate(pipeline: PipelineHarness, name: str) -> None:
    """Expected: a table named ``Odd"Name;x`` (quote, semicolon, mixed case) or ``Order Details``
    (a space) in a schema named with non-ASCII letters, when allowlisted, replicates cell-exact
    (verify passes)."""
    schema = f"ünï_{uuid.uuid4().hex[:6]}"
    table = TableRef(schema, name)
    pipeline.run_sql(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        pipeline.create_table(table, GOOD_COLUMNS, GOOD_ROWS.format(n=4))
        pipeline.extract(table, PGSNOW_TABLES=table.qualified)
        recorder, dispatcher = pipeline.loader()
        dispatcher.run_until_idle()

        assert [d for d in recorder.deliveries if d.failed] == []
        result = pipeline.verify(table)
        assert result.ok, result.summary()
        assert result.target_rows == 4
    finally:
        pipeline.run_sql(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


# --------------------------------------------------------------------------- keys


def test_hostile_keys_are_refused_and_dead_lettered(pipeline: PipelineHarness) -> None:
    """Expected: notifications for keys with '..', an absolute path, or a pgsnow file of one table
    put under another table's prefix (whose Snowflake table does not exist) fail on every delivery
    (a permanent error each time) and SQS moves them to the dead-letter queue; nothing loads."""
    # Given objects at hostile keys, and their notifications
    table, manifest = staged_pair(pipeline, "key_source")
    good_name = manifest.files[0].key.rsplit("/", 1)[1]
    keys = [
        f"{pipeline.prefix}/{table.schema}/../{table.table}/{good_name}",
        f"/{pipeline.prefix}/{table.schema}/{table.table}/{good_name}",
        f"{pipeline.prefix}/{table.schema}/never_created_{uuid.uuid4().hex[:6]}/{good_name}",
    ]
    body = pipeline.s3().get_object(Bucket=pipeline.bucket, Key=manifest.files[0].key)["Body"].read()
    for key in keys:
        pipeline.s3().put_object(Bucket=pipeline.bucket, Key=key, Body=body)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()  # the real notifications (the run's files; any hostile key S3 sent)
    pipeline.send_bodies([s3_event_body(pipeline.bucket, key) for key in keys])

    # When the queue is drained into the loader
    dispatcher.run_until_idle()

    # Then each hostile key failed on each of its deliveries and was dead-lettered
    dead = pipeline.dead_letter_keys()
    for key in keys:
        deliveries = recorder.for_key(key)
        assert deliveries and all(d.failed for d in deliveries), key
        assert key in dead, key
    # And the run's own files loaded exactly once: the table is exact
    result = pipeline.verify(table)
    assert result.ok, result.summary()


# --------------------------------------------------------------------------- broken files


def _truncated_gzip(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _corrupt_parquet(good: bytes) -> bytes:
    return b"PAR1" + bytes(range(256)) * 4 + b"PAR1"


def _wrong_column_count(good: bytes) -> bytes:
    return gzip.compress(b"id,note,amount\n99,x,1.25,extra\n98,y\n", mtime=0)


@pytest.mark.parametrize(
    ("file_format", "damage"),
    [
        pytest.param(FileFormat.CSV, _truncated_gzip, id="truncated-gzip"),
        pytest.param(FileFormat.PARQUET, _corrupt_parquet, id="corrupt-parquet"),
        pytest.param(FileFormat.CSV, _wrong_column_count, id="csv-wrong-column-count"),
    ],
)
def test_broken_file_is_dead_lettered_and_leaves_nothing(
    pipeline: PipelineHarness, file_format: FileFormat, damage: Any
) -> None:
    """Expected: a broken file added to a real run fails each delivery, is dead-lettered, leaves no
    rows and no ledger row; the run's good files load and verify passes for the source rows."""
    # Given a staged run, and a broken third file of the same run
    table = pipeline.table(f"broken_{file_format.value}_{uuid.uuid4().hex[:4]}")
    pipeline.create_table(table, GOOD_COLUMNS, GOOD_ROWS.format(n=6))
    manifest = pipeline.extract(table, file_format)
    good = pipeline.s3().get_object(Bucket=pipeline.bucket, Key=manifest.files[0].key)["Body"].read()
    broken = damage(good)
    bad_key = data_key(pipeline.prefix, table, 99, manifest.run_id, file_format)
    put_data_file(
        pipeline.s3(),
        pipeline.bucket,
        bad_key,
        broken,
        run_id=manifest.run_id,
        batch=99,
        rows=2,
        sha256=hashlib.sha256(broken).hexdigest(),
    )
    recorder, dispatcher = pipeline.loader()

    # When the queue is drained
    dispatcher.run_until_idle()

    # Then the broken file failed every delivery and was dead-lettered, leaving no ledger row
    assert [d.failed for d in recorder.for_key(bad_key)] == [True, True]
    assert bad_key in pipeline.dead_letter_keys()
    assert pipeline.ledger_keys(table) == sorted(f.key for f in manifest.files)
    result = pipeline.verify(table)
    assert result.ok, result.summary()
    assert result.target_rows == 6


def test_manifest_listing_a_missing_file_leaves_the_run_open_and_verify_names_the_rows(
    pipeline: PipelineHarness,
) -> None:
    """Expected: a file listed by the manifest but gone from S3 before loading fails permanently
    ("no longer exists and was never loaded") and is dead-lettered; the run never becomes
    ``loaded``; verify reports exactly that file's rows as missing."""
    # Given a run of two files of five rows, the second deleted before its notification is handled.
    # The run merges, so each loaded file's rows show in the target at once (a replace run, the
    # full mode's default, would keep the target unchanged until every listed file is loaded).
    table, manifest = staged_pair(pipeline, "missing_file", options={"write_mode": "merge"})
    first, second = manifest.files
    pipeline.s3().delete_object(Bucket=pipeline.bucket, Key=second.key)
    recorder, dispatcher = pipeline.loader()

    # When the queue is drained
    dispatcher.run_until_idle()

    # Then the missing file was dead-lettered, the run stays staged, and verify names the rows
    assert [d.failed for d in recorder.for_key(second.key)] == [True, True]
    assert second.key in pipeline.dead_letter_keys()
    assert pipeline.ledger_keys(table) == [first.key]
    assert (
        RunStore(pipeline.s3(), pipeline.bucket).get_manifest(table, manifest.run_id).state is RunState.STAGED
    )
    result = pipeline.verify(table)
    assert not result.ok
    assert sorted(int(k) for k in result.missing) == [6, 7, 8, 9, 10]
    assert result.extra == result.different == []


def test_file_that_does_not_match_its_manifest_is_refused_and_nothing_loads(
    pipeline: PipelineHarness,
) -> None:
    """Expected: a staged file replaced under its key (even carrying the original pgsnow
    metadata) no longer matches the size/SHA-256 its run's manifest lists, so the loader
    refuses it as permanent: dead-lettered after the retries, no rows, no ledger row."""
    # Given a staged file replaced (same key, same metadata and row count) with other values
    table = pipeline.table("wrong_checksum")
    pipeline.create_table(table, GOOD_COLUMNS, GOOD_ROWS.format(n=3))
    manifest = pipeline.extract(table)
    (staged,) = manifest.files
    original = pipeline.s3().head_object(Bucket=pipeline.bucket, Key=staged.key)
    tampered = gzip.compress(b"id,note,amount\n1,row 1,1.25\n2,tampered,2.25\n3,row 3,3.25\n", mtime=0)
    assert hashlib.sha256(tampered).hexdigest() != original["Metadata"]["pgsnow-sha256"]
    pipeline.receive_notifications(table, 1)  # the original upload's notification
    pipeline.s3().put_object(
        Bucket=pipeline.bucket,
        Key=staged.key,
        Body=tampered,
        Metadata=original["Metadata"],
        ContentType=original.get("ContentType", "application/gzip"),
    )
    recorder, dispatcher = pipeline.loader()

    # When its notification is delivered
    dispatcher.run_until_idle()

    # Then every delivery failed, the message is dead-lettered, and nothing reached Snowflake
    assert [d.failed for d in recorder.for_key(staged.key)] == [True, True]
    assert staged.key in pipeline.dead_letter_keys()
    assert pipeline.ledger_keys(table) == []
    try:
        rows = pipeline.target_count(table)
    except snowflake.connector.errors.ProgrammingError:
        rows = 0  # refused before the target table was even created
    assert rows == 0


# --------------------------------------------------------------------------- configuration


def test_configuration_reports_every_problem_at_once(pipeline: PipelineHarness) -> None:
    """Expected: one ConfigError listing unknown modes, bad numbers, a table option for an
    unlisted table and the missing secrets together, not just the first."""
    environ = {
        "S3_STAGE_BUCKET": pipeline.bucket,
        "PGSNOW_TABLES": "public.orders",
        "S3_FILE_FORMAT": "xml",
        "LOAD_METHOD": "carrier_pigeon",
        "LOAD_ON_ERROR": "ignore_everything",
        "CLEANUP_S3_FILES": "sometimes",
        "EXTRACT_CHUNK_ROWS": "-5",
        "PGSNOW_TABLE_OPTIONS": json.dumps(
            {"public.orders": {"mode": "sometimes", "write_mode": "upsert"}, "public.ghost": {}}
        ),
    }

    with pytest.raises(ConfigError) as refused:
        Settings.from_env(environ, component=Component.LOADER)
    with pytest.raises(ConfigError) as refused_extractor:
        Settings.from_env(environ, component=Component.EXTRACTOR)

    text = " | ".join(refused.value.problems)
    for name in (
        "S3_FILE_FORMAT",
        "LOAD_METHOD",
        "LOAD_ON_ERROR",
        "CLEANUP_S3_FILES",
        "EXTRACT_CHUNK_ROWS",
        "public.ghost",
        "SNOWFLAKE",
    ):
        assert name in text, (name, text)
    assert len(refused.value.problems) >= 7
    assert any("PGSNOW_PG_SECRET_ARN" in p for p in refused_extractor.value.problems)
