"""The Northwind and Chinook scripts, read from ``../shared/datasets`` next to the repository or
from ``PGSNOW_DATASETS_DIR``, and loaded with ``psql -v ON_ERROR_STOP=1``: chinook.sql creates
and switches to its own database, so those lines are removed from a temporary copy first."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS_DIR = Path(os.environ.get("PGSNOW_DATASETS_DIR", REPO_ROOT.parent / "shared" / "datasets"))
# chinook.sql's own DROP/CREATE DATABASE and \c lines: the test picks the database.
_DATABASE_SWITCHING = re.compile(r"^\s*(DROP DATABASE|CREATE DATABASE|\\c(onnect)?\s)", re.IGNORECASE)


def load_sql_file(dsn: str, script: Path, work_dir: Path) -> None:
    """Run a SQL script with psql into ``dsn``, without letting it switch databases."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.fail("psql is not on PATH; it is needed to load the dataset scripts")
    cleaned = work_dir / script.name
    with script.open(encoding="utf-8") as source, cleaned.open("w", encoding="utf-8") as target:
        for line in source:
            target.write("-- removed by pgsnow tests: " + line if _DATABASE_SWITCHING.match(line) else line)
    completed = subprocess.run(
        [psql, "-v", "ON_ERROR_STOP=1", "-q", "-X", "-d", dsn, "-f", str(cleaned)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if completed.returncode != 0:
        pytest.fail(f"loading {script} failed: {completed.stderr[-2000:]}")


def dataset_script(name: str) -> Path:
    if not DATASETS_DIR.is_dir():
        pytest.skip(
            f"dataset directory {DATASETS_DIR} is absent (set PGSNOW_DATASETS_DIR to run these tests)"
        )
    script = DATASETS_DIR / name / f"{name}.sql"
    if not script.is_file():
        pytest.fail(f"{DATASETS_DIR} exists but {script} is missing")
    return script
