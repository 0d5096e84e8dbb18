"""``pgsnow local up`` and ``pgsnow local sql`` as a user runs them, each in its own process.

The README's flow: start the stack, drop a file into the staging prefix, watch the loader load
it, query it with ``local sql`` while the stack runs (the running server answers: it holds the
DuckDB files), and again after the stack stopped (``local sql`` then opens the files itself).
Conditions a user can cause end in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

pytestmark = pytest.mark.integration

READY_LINE = "The loader is listening"
DROPPED_TABLE = "robust_drop"


def pgsnow(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgsnow.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(completed: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr, completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("pgsnow:")]
    assert len(errors) == 1, completed.stderr
    assert fragment in errors[0], errors[0]


class RunningStack:
    def __init__(self, process: subprocess.Popen[str], env: dict[str, str]) -> None:
        self.process = process
        self.env = env

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # as `kill` would; Ctrl-C (SIGINT) is the same path
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def local_up(tmp_path: Path) -> Iterator[RunningStack]:
    """``pgsnow local up`` in its own process, once it says the loader is listening."""
    process = subprocess.Popen(
        # A one-second batching window: the template's default (60 s) would only make the test wait.
        [
            sys.executable,
            "-m",
            "pgsnow.cli",
            "local",
            "up",
            "--data-dir",
            str(tmp_path / "stack"),
            "--loader-batching-window",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("POWERTOOLS_")},
    )
    assert process.stdout is not None
    env: dict[str, str] = {}
    for line in process.stdout:
        if line.startswith("  export "):
            name, _, value = line.removeprefix("  export ").rstrip("\n").partition("=")
            env[name] = value.strip("'")
        if READY_LINE in line:
            break
    stack = RunningStack(process, env)
    try:
        assert process.poll() is None and env, "pgsnow local up did not start"
        yield stack
    finally:
        stack.stop()


def drop_csv(stack: RunningStack, rows: list[tuple[int, str]]) -> None:
    """Put a gzip CSV into staging/public/<table>/ with the printed administrator's keys."""
    env = stack.env
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )
    body = "id,name\n" + "".join(f"{key},{name}\n" for key, name in rows)
    s3.put_object(
        Bucket=env["S3_STAGE_BUCKET"],
        Key=f"{env['S3_STAGE_PREFIX']}/public/{DROPPED_TABLE}/dropped.csv.gz",
        Body=gzip.compress(body.encode()),
    )


def test_local_sql_queries_the_running_stack_and_then_its_files(
    local_up: RunningStack, tmp_path: Path
) -> None:
    data_dir = str(tmp_path / "stack")
    count_sql = f'SELECT COUNT(*) AS N FROM PGSNOW_DEMO.PUBLIC."{DROPPED_TABLE.upper()}"'
    # Given a table made with `local sql` (a dropped file loads only into an existing table) and a
    # file dropped into the staging prefix for it while `local up` runs
    for statement in (
        "CREATE SCHEMA IF NOT EXISTS PGSNOW_DEMO.PUBLIC",
        f'CREATE TABLE PGSNOW_DEMO.PUBLIC."{DROPPED_TABLE.upper()}" ("ID" NUMBER(38,0), "NAME" VARCHAR)',
    ):
        created = pgsnow("local", "sql", statement, "--data-dir", data_dir)
        assert created.returncode == 0, created.stderr
    drop_csv(local_up, [(1, "ada"), (2, "grace"), (3, "edsger")])
    # When `local sql` queries it while the stack runs (the loader needs a moment)
    deadline = time.monotonic() + 90
    while True:
        completed = pgsnow("local", "sql", count_sql, "--data-dir", data_dir)
        if completed.stdout.splitlines() == ["N", "3"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    # Then the running server answers with the loaded rows
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == ["N", "3"]
    assert "Traceback" not in completed.stderr
    # And bad SQL is one line on stderr, while the stack keeps running
    assert_one_line_error(pgsnow("local", "sql", "SELEC oops", "--data-dir", data_dir), "syntax error")
    assert local_up.process.poll() is None
    # And a second stack on the same data dir is refused in one line (the first holds the files)
    assert_one_line_error(pgsnow("local", "up", "--data-dir", data_dir), "in use by another process")
    assert local_up.process.poll() is None

    # When the stack stops, `local sql` opens the persisted files itself and sees the same rows
    assert local_up.stop() == 0
    after = pgsnow("local", "sql", count_sql, "--data-dir", data_dir)
    assert after.returncode == 0, after.stderr
    assert after.stdout.splitlines() == ["N", "3"]


def test_local_sql_without_a_local_snowflake_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(
        pgsnow("local", "sql", "SELECT 1", "--data-dir", str(tmp_path / "nothing here")), "no local Snowflake"
    )


def test_local_sql_on_a_missing_table_is_one_line(tmp_path: Path) -> None:
    # Given a data dir with a local Snowflake in it (a query there creates its files)
    data_dir = tmp_path / "fresh"
    (data_dir / "snowflake").mkdir(parents=True)
    # When a table that does not exist is queried
    completed = pgsnow("local", "sql", "SELECT * FROM NO_SUCH_DB.PUBLIC.T", "--data-dir", str(data_dir))
    # Then one line says so
    assert_one_line_error(completed, "NO_SUCH_DB")
