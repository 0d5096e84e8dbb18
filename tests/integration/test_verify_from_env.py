"""``pgsnow verify --from-env`` run as a command, configured the way the deployed functions are.

The command runs in a child process whose environment holds only what the template gives the
functions (``S3_STAGE_BUCKET``, ``PGSNOW_TABLES``, ``PGSNOW_TABLE_OPTIONS``, the PostgreSQL and
Snowflake secret ARNs, ``SNOWFLAKE_DATABASE``) plus the loopback endpoints: the moto server's
``AWS_*`` variables and ``SNOWFLAKE_HOST``/``PORT``/``PROTOCOL``. No ``PGSNOW_PG_DSN`` and no
``SNOWFLAKE_PASSWORD``: the PostgreSQL DSN comes from an RDS-format secret and Snowflake is
reached with the key pair in its secret, both in moto's Secrets Manager. Tables are replicated
by the real pipeline (extractor -> S3 -> SQS -> loader handler) on the shared ``pipeline`` stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from psycopg2 import sql
from stack_support import postgres_secret_arn

from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat
from pgsnow.local.stack import SNOWFLAKE_DATABASE
from pgsnow.manifest import RunManifest, RunState
from pgsnow.runs import RunStore
from pgsnow.snowpipe import private_key_pem

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

# What the child process keeps of this one's environment: enough to run Python, nothing pgsnow reads.
PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
ITEMS_COLUMNS = "id integer PRIMARY KEY, label text, amount numeric(10, 2)"
ITEMS_ROWS = "SELECT i, 'item ' || i, i * 1.5 FROM generate_series(1, {n}) AS i"
EVENTS_COLUMNS = "id bigint PRIMARY KEY, changed_at timestamptz NOT NULL, note text"
EVENTS_ROWS = (
    "SELECT i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 hour', 'event ' || i "
    "FROM generate_series(1, {n}) AS i"
)


# --------------------------------------------------------------------------- the deployed environment


@pytest.fixture(scope="module")
def deployed_env(pipeline: PipelineHarness) -> dict[str, str]:
    """The functions' variables, the two secrets created in moto's Secrets Manager."""
    secrets = pipeline.stack.aws.client("secretsmanager")
    pg_arn = postgres_secret_arn(secrets, pipeline.source_dsn)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # The local Snowflake checks key-pair logins: the key is registered as the deployed setup's
    # ALTER USER ... SET RSA_PUBLIC_KEY registers it.
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pipeline.stack.snowflake.register_public_key("pgsnow_loader", public_pem)
    sf_secret = {"account": "pgsnow", "user": "pgsnow_loader", "private_key": private_key_pem(key)}
    sf_arn = secrets.create_secret(
        Name=f"pgsnow/snowflake-{uuid.uuid4().hex[:8]}", SecretString=json.dumps(sf_secret)
    )["ARN"]
    local = pipeline.stack.env
    return {
        **pipeline.stack.aws.env(),
        "S3_STAGE_BUCKET": pipeline.bucket,
        "S3_STAGE_PREFIX": pipeline.prefix,
        "S3_FILE_FORMAT": "csv",
        "CLEANUP_S3_FILES": "after_all",
        "PGSNOW_PG_SECRET_ARN": pg_arn,
        "SNOWFLAKE_SECRET_ARN": sf_arn,
        "SNOWFLAKE_DATABASE": SNOWFLAKE_DATABASE,
        # Only the local Snowflake needs these; a deployed account is found by its name.
        "SNOWFLAKE_HOST": local["SNOWFLAKE_HOST"],
        "SNOWFLAKE_PORT": local["SNOWFLAKE_PORT"],
        "SNOWFLAKE_PROTOCOL": local["SNOWFLAKE_PROTOCOL"],
        "POWERTOOLS_SERVICE_NAME": "pgsnow",
        "POWERTOOLS_METRICS_NAMESPACE": "pgsnow",
    }


def run_verify(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``pgsnow verify --from-env ARGS`` in a child process that sees ``env`` and nothing else of pgsnow's."""
    inherited = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    return subprocess.run(
        [sys.executable, "-m", "pgsnow.cli", "verify", "--from-env", *args],
        env={**inherited, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def replicate(pipeline: PipelineHarness, table: TableRef, **env: str) -> RunManifest:
    """Extract ``table`` and let the queue deliver its files to the real loader handler."""
    manifest = pipeline.extract(table, FileFormat.CSV, **env)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    assert [d for d in recorder.deliveries if d.failed] == []
    assert pipeline.ledger_keys(table) == sorted(f.key for f in manifest.files)
    return manifest


def read_report(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return report


def assert_no_traceback(completed: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stdout, completed.stdout


# --------------------------------------------------------------------------- the three outcomes


def test_replicated_table_matches_exit_0_and_json_ok(
    pipeline: PipelineHarness, deployed_env: dict[str, str], tmp_path: Path
) -> None:
    # Given a table replicated by the pipeline, and the allowlist naming it (no table on the command line)
    table = pipeline.table("matching")
    pipeline.create_table(table, ITEMS_COLUMNS, ITEMS_ROWS.format(n=25))
    replicate(pipeline, table)
    report_file = tmp_path / "report.json"

    # When verify runs from the deployed environment
    completed = run_verify({**deployed_env, "PGSNOW_TABLES": table.qualified}, "--json", str(report_file))

    # Then it exits 0, prints the table as OK and writes an ok report
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert_no_traceback(completed)
    assert f"{table.qualified}  25  25  OK" in completed.stdout
    report = read_report(report_file)
    assert report["ok"] is True
    assert [t["table"] for t in report["tables"]] == [table.qualified]
    (result,) = report["tables"]
    assert result["ok"] is True
    assert (result["source_rows"], result["target_rows"]) == (25, 25)
    assert result["missing"] == result["extra"] == result["different"] == []
    assert result["error"] is None
    assert result["watermark"] is None  # a full run: nothing bounds the comparison


def test_row_changed_in_snowflake_exits_1_and_names_the_key(
    pipeline: PipelineHarness, deployed_env: dict[str, str], tmp_path: Path
) -> None:
    # Given a replicated table whose row 7 is then changed in Snowflake
    table = pipeline.table("changed")
    pipeline.create_table(table, ITEMS_COLUMNS, ITEMS_ROWS.format(n=25))
    replicate(pipeline, table)
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(f'UPDATE {target} SET "LABEL" = \'tampered\' WHERE "ID" = 7')
    report_file = tmp_path / "report.json"

    # When verify runs from the deployed environment, the table named on the command line
    completed = run_verify(
        {**deployed_env, "PGSNOW_TABLES": table.qualified}, table.qualified, "--json", str(report_file)
    )

    # Then it exits 1 and names key 7, in the summary and the JSON report
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert_no_traceback(completed)
    assert f"{table.qualified}  25  25  MISMATCH  different 1: 7" in completed.stdout
    report = read_report(report_file)
    assert report["ok"] is False
    (result,) = report["tables"]
    assert result["ok"] is False
    assert (result["missing"], result["extra"], result["different"]) == ([], [], ["7"])
    assert result["error"] is None


def test_incremental_table_is_verified_up_to_its_latest_manifest_watermark(
    pipeline: PipelineHarness, deployed_env: dict[str, str], tmp_path: Path
) -> None:
    # Given an incremental table replicated up to a watermark (its manifest loaded, in the bucket) ...
    table = pipeline.table("events_incremental")
    pipeline.create_table(table, EVENTS_COLUMNS, EVENTS_ROWS.format(n=20))
    options = json.dumps({table.qualified: {"mode": "incremental", "cursor_column": "changed_at"}})
    manifest = replicate(pipeline, table, PGSNOW_TABLE_OPTIONS=options)
    latest = RunStore(pipeline.s3(), pipeline.bucket).get_manifest(table, manifest.run_id)
    assert latest.state is RunState.LOADED
    assert latest.watermark_after is not None and latest.watermark_after.startswith("2024-01-01")
    # ... and a row committed after the run, beyond the watermark, that Snowflake has not got
    pipeline.run_sql(
        sql.SQL("INSERT INTO {} VALUES (21, '2024-01-01 21:00:00+00', 'late')").format(
            sql.Identifier(table.schema, table.table)
        )
    )
    unbounded = pipeline.verify(table)
    assert unbounded.missing == ["21"]  # without the watermark the late row is a difference
    report_file = tmp_path / "report.json"

    # When verify runs from the deployed environment (the table options as the functions get them)
    completed = run_verify(
        {**deployed_env, "PGSNOW_TABLES": table.qualified, "PGSNOW_TABLE_OPTIONS": options},
        "--json",
        str(report_file),
    )

    # Then it compares only up to the watermark: the late row is not reported and the table matches
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert_no_traceback(completed)
    assert f"up to changed_at <= {latest.watermark_after}" in completed.stdout
    (result,) = read_report(report_file)["tables"]
    assert result["ok"] is True
    assert (result["source_rows"], result["target_rows"]) == (20, 20)
    assert result["missing"] == result["extra"] == result["different"] == []
    assert result["watermark"] == {"cursor_column": "changed_at", "value": latest.watermark_after}


def test_a_newer_full_run_is_not_bounded_by_an_older_incremental_watermark(
    pipeline: PipelineHarness, deployed_env: dict[str, str], tmp_path: Path
) -> None:
    # Given a table loaded incrementally up to a watermark, then switched to full runs (merge) and
    # loaded again with a row beyond that watermark ...
    table = pipeline.table("events_went_full")
    pipeline.create_table(table, EVENTS_COLUMNS, EVENTS_ROWS.format(n=20))
    incremental = json.dumps(
        {table.qualified: {"mode": "incremental", "cursor_column": "changed_at", "write_mode": "merge"}}
    )
    older = replicate(pipeline, table, PGSNOW_TABLE_OPTIONS=incremental)
    assert older.watermark_after is not None
    pipeline.run_sql(
        sql.SQL("INSERT INTO {} VALUES (21, '2024-01-01 21:00:00+00', 'after the watermark')").format(
            sql.Identifier(table.schema, table.table)
        )
    )
    full = json.dumps({table.qualified: {"mode": "full", "write_mode": "merge"}})
    newer = pipeline.extract(table, FileFormat.CSV, PGSNOW_TABLE_OPTIONS=full)
    pipeline.loader()[1].run_until_idle()
    assert newer.run_id > older.run_id and newer.watermark_after is None
    assert pipeline.target_count(table) == 21
    # ... and then that row lost in Snowflake
    target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
    with pipeline.sf_conn.cursor() as cur:
        cur.execute(f'DELETE FROM {target} WHERE "ID" = 21')
    report_file = tmp_path / "report.json"

    # When verify runs from the deployed environment (now configured for full runs)
    completed = run_verify(
        {**deployed_env, "PGSNOW_TABLES": table.qualified, "PGSNOW_TABLE_OPTIONS": full},
        "--json",
        str(report_file),
    )

    # Then the whole table is compared (the newest loaded run has no watermark) and the row is missing
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert_no_traceback(completed)
    (result,) = read_report(report_file)["tables"]
    assert result["watermark"] is None
    assert (result["source_rows"], result["target_rows"]) == (21, 20)
    assert result["missing"] == ["21"]


# --------------------------------------------------------------------------- configuration problems


def _without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


CONFIG_PROBLEMS = [
    pytest.param(
        lambda env: {
            **env,
            "PGSNOW_PG_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:gone",
        },
        # pgsnow.runtime.read_secret_json names the secret and AWS's reason
        "cannot read secret arn:aws:secretsmanager:us-east-1:123456789012:secret:gone: ResourceNotFoundException",
        id="postgres-secret-missing",
    ),
    pytest.param(
        lambda env: {
            **env,
            "SNOWFLAKE_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:gone",
        },
        "cannot read the Snowflake secret: ResourceNotFoundException",
        id="snowflake-secret-missing",
    ),
    pytest.param(
        lambda env: _without(env, "SNOWFLAKE_SECRET_ARN"),
        "SNOWFLAKE_SECRET_ARN (or SNOWFLAKE_ACCOUNT for local runs) is required",
        id="snowflake-secret-unset",
    ),
    pytest.param(
        lambda env: _without(env, "PGSNOW_PG_SECRET_ARN"),
        "no PostgreSQL connection configured",
        id="postgres-secret-unset",
    ),
    pytest.param(
        lambda env: _without(env, "SNOWFLAKE_DATABASE"),
        "SNOWFLAKE_DATABASE is required",
        id="database-unset",
    ),
    pytest.param(
        lambda env: {**env, "S3_STAGE_BUCKET": f"pgsnow-nowhere-{uuid.uuid4().hex[:8]}"},
        "cannot read the run manifests in bucket pgsnow-nowhere-",
        id="bucket-missing",
    ),
    pytest.param(
        lambda env: {**env, "PG_STATEMENT_TIMEOUT_MS": "soon"},
        "PG_STATEMENT_TIMEOUT_MS must be an integer",
        id="bad-integer",
    ),
]


@pytest.fixture(scope="module")
def replicated(pipeline: PipelineHarness) -> TableRef:
    """A small table on both sides, so only the configuration can be at fault."""
    table = pipeline.table("configured")
    pipeline.create_table(table, ITEMS_COLUMNS, ITEMS_ROWS.format(n=3))
    replicate(pipeline, table)
    return table


@pytest.mark.parametrize("broken, expected", CONFIG_PROBLEMS)
def test_configuration_problem_is_a_clear_error_without_traceback(
    replicated: TableRef, deployed_env: dict[str, str], broken: Any, expected: str
) -> None:
    # Given the deployed environment with one thing wrong, for a table that exists on both sides
    env = broken({**deployed_env, "PGSNOW_TABLES": replicated.qualified})

    # When verify runs
    completed = run_verify(env)

    # Then it exits 2 (a configuration error) with one line saying what is wrong, and no traceback
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert_no_traceback(completed)
    assert completed.stderr.startswith("pgsnow: "), completed.stderr
    assert expected in completed.stderr, completed.stderr
    assert completed.stdout == ""


def test_no_tables_named_or_allowlisted_is_a_clear_error(deployed_env: dict[str, str]) -> None:
    # Given the allowlist "*" (any table) and no table named on the command line
    completed = run_verify({**deployed_env, "PGSNOW_TABLES": "*"})

    # Then verify cannot tell what to compare, and says so
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert_no_traceback(completed)
    assert "name the tables to verify, or set PGSNOW_TABLES" in completed.stderr
