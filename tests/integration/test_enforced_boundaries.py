"""Deletes, replace and merge runs through the boundaries AWS and Snowflake enforce.

Every function runs as its template role (moto with IAM on), and the local Snowflake reads S3
only as a deployed Snowflake could: through the storage integration (the template's storage
role, the integration's allowed locations) or with the loader's own temporary credentials (the
credentials method). Each run, in CSV and Parquet, must pass ``pgsnow verify``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pgsnow.config import Component
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat
from pgsnow.local.aws import REPO_TEMPLATE
from pgsnow.local.stack import SNOWFLAKE_DATABASE
from pgsnow.observability import SERVICE

if TYPE_CHECKING:  # the fixtures' types, from this directory's conftest.py
    from pipeline_support import PipelineHarness, RecordingLoader

pytestmark = pytest.mark.integration

FORMATS = [pytest.param(FileFormat.CSV, id="csv"), pytest.param(FileFormat.PARQUET, id="parquet")]
# (write_mode, deletes): a run with deletes in both modes, a replace run and a merge run.
RUNS = [
    pytest.param("merge", "hard", id="merge-hard-deletes"),
    pytest.param("merge", "soft", id="merge-soft-deletes"),
    pytest.param("replace", "none", id="replace"),
    pytest.param("merge", "none", id="merge"),
]


# Excluded from the search: the local servers' own logs, and the AWS SDK's wire logs, which at
# DEBUG print every signed request header and the AssumeRole answer by design (pgsnow never turns
# them on; Lambda's default level is INFO). Everything pgsnow and the Snowflake connector log is searched.
NOT_THE_FUNCTIONS_LOGS = ("fakesnow", "uvicorn", "pgsnow.local", "botocore", "boto3", "s3transfer")


def replicate(
    pipeline: PipelineHarness,
    table: TableRef,
    file_format: FileFormat,
    options: dict[str, Any],
    *,
    failing: bool = False,
) -> RecordingLoader:
    """One extractor run (as the extractor role), delivered through the queue to the loader handler,
    which must fail no delivery unless ``failing``."""
    pipeline.extract(
        table,
        file_format,
        s3=pipeline.stack.function_client(Component.EXTRACTOR, "s3"),
        PGSNOW_TABLE_OPTIONS=json.dumps({table.qualified: options}),
    )
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    if not failing:
        failed = [d for d in recorder.deliveries if d.failed]
        assert failed == [], f"the loader failed deliveries: {failed}"
    return recorder


def soft_deleted_ids(pipeline: PipelineHarness, table: TableRef) -> list[int]:
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(f'SELECT "ID" FROM {target} WHERE "_PGSNOW_DELETED_AT" IS NOT NULL ORDER BY 1')
        return [int(row[0]) for row in cur.fetchall()]


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize(("write_mode", "deletes"), RUNS)
def test_runs_verify_through_the_enforced_boundaries(
    pipeline_by_storage_access: PipelineHarness, file_format: FileFormat, write_mode: str, deletes: str
) -> None:
    pipeline = pipeline_by_storage_access
    table = pipeline.table(f"orders_{write_mode}_{deletes}_{file_format.value}")
    pipeline.create_table(
        table,
        "id integer PRIMARY KEY, item text NOT NULL, amount numeric(10,2), payload jsonb",
        "SELECT g, 'item ' || g, g * 1.25, jsonb_build_object('g', g) FROM generate_series(1, 40) AS g",
    )
    options = {"mode": "full", "write_mode": write_mode, "deletes": deletes}

    # Given a first run replicated and verified
    replicate(pipeline, table, file_format, options)
    assert pipeline.verify(table).ok

    # When rows are updated, inserted and (where the run removes rows: deletes or replace) deleted
    # in PostgreSQL, and the table is run again
    target = f"{pipeline.schema}.{table.table}"
    removes_rows = deletes != "none" or write_mode == "replace"
    pipeline.run_sql(f"UPDATE {target} SET item = 'changed', amount = -amount WHERE id % 7 = 0")
    if removes_rows:
        pipeline.run_sql(f"DELETE FROM {target} WHERE id IN (3, 17, 40)")
    pipeline.run_sql(f"INSERT INTO {target} VALUES (41, 'new', 1.00, '[1, 2]'), (42, 'new', NULL, NULL)")
    replicate(pipeline, table, file_format, options)

    # Then Snowflake matches PostgreSQL (soft deletes: the deleted rows are kept, marked deleted)
    if deletes == "soft":
        assert soft_deleted_ids(pipeline, table) == [3, 17, 40]
        assert pipeline.target_count(table) == 42
    else:
        result = pipeline.verify(table)
        assert result.ok, result
        assert pipeline.target_count(table) == (39 if removes_rows else 42)


def test_the_loaders_credentials_appear_in_no_log_line(
    pipeline_by_storage_access: PipelineHarness,
    every_log_record: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    pipeline = pipeline_by_storage_access
    loader_credentials = (
        pipeline.stack.function_session(Component.LOADER).get_credentials().get_frozen_credentials()
    )
    secrets = [loader_credentials.secret_key, loader_credentials.token]
    table = pipeline.table("credentials_in_logs")
    pipeline.create_table(table, "id integer PRIMARY KEY", "SELECT generate_series(1, 5)")

    # When a run with deletes goes through the whole pipeline at DEBUG level everywhere
    every_log_record.clear()
    replicate(pipeline, table, FileFormat.CSV, {"mode": "full", "write_mode": "merge", "deletes": "hard"})

    # Then the run loaded, and no log record of the functions or the connector, and nothing printed,
    # holds the loader's secret key or session token (the servers' own logs are not the functions')
    assert pipeline.verify(table).ok
    client_records = [r for r in every_log_record.records if not r.name.startswith(NOT_THE_FUNCTIONS_LOGS)]
    assert any(r.name.startswith("snowflake.connector") for r in client_records)
    assert any(r.name == SERVICE and r.getMessage() == "run applied" for r in client_records)
    for record in client_records:
        text = f"{record.getMessage()} {record.args!r} {record.__dict__!r} {record.exc_text or ''}"
        assert not any(secret in text for secret in secrets), record.name
    printed = capfd.readouterr()
    assert not any(secret in printed.out + printed.err for secret in secrets)


# --------------------------------------------------------------------------- Snowflake's side, narrowed on purpose


def storage_role_without_key_lists(tmp_path: Path) -> dict[str, Any]:
    """Stack options: a copy of template.yaml whose SnowflakeStorageRole may read the stage but not
    the run key lists."""
    text = REPO_TEMPLATE.read_text(encoding="utf-8")
    grant = '                  - !Sub "${StageBucket.Arn}/_pgsnow/keys/*"\n'
    assert text.count(grant) == 1
    path = tmp_path / "template.yaml"
    path.write_text(text.replace(grant, ""), encoding="utf-8")
    return {"template_path": path}


def integration_without_key_lists(_tmp_path: Path) -> dict[str, Any]:
    """Stack options: an integration whose allowed locations are the staging prefix alone."""
    return {"storage_allowed_prefixes": ["staging/"]}


@pytest.mark.parametrize(
    ("narrowed_pipeline", "refusal"),
    [
        pytest.param(
            integration_without_key_lists, "not allowed", id="integration-without-the-key-list-location"
        ),
        pytest.param(
            storage_role_without_key_lists, "Access Denied", id="storage-role-without-the-key-list-grant"
        ),
    ],
    indirect=["narrowed_pipeline"],
)
def test_deletes_need_the_key_lists_inside_snowflakes_boundaries(
    narrowed_pipeline: PipelineHarness, refusal: str, every_log_record: pytest.LogCaptureFixture
) -> None:
    # Given a stack whose integration allows only the staging prefix, or whose storage role (from an
    # edited template) may not read the key lists, and a table with three rows
    pipeline = narrowed_pipeline
    table = pipeline.table("orders")
    pipeline.create_table(table, "id integer PRIMARY KEY, label text", "VALUES (1, 'a'), (2, 'b'), (3, 'c')")

    # When a run with deletes is replicated
    recorder = replicate(
        pipeline,
        table,
        FileFormat.CSV,
        {"mode": "full", "write_mode": "merge", "deletes": "hard"},
        failing=True,
    )

    # Then the data file loads (the stage is allowed) but the key list's COPY is refused as
    # Snowflake refuses it, and the file's message ends in the dead-letter queue
    assert [d for d in recorder.deliveries if d.failed], (
        "the loader accepted a key list Snowflake may not read"
    )
    assert pipeline.target_count(table) == 3
    assert pipeline.dead_letter_keys()
    failure_logs = [
        r.getMessage() for r in every_log_record.records if r.getMessage().startswith("record failed")
    ]
    assert failure_logs and all(refusal in line for line in failure_logs), failure_logs[:1]
