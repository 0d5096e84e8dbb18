"""``pgsnow demo --cdc``: the sample shop replicated by change capture while a workload writes to it.

The whole path runs for real: the local PostgreSQL (logical decoding), a publication and slot of
the demo's own, the extractor enrolling and snapshotting each table, the change-capture function
(its handler, as ``ChangeCaptureFunction`` with its template role) draining the slot while the
workload commits, the loader applying the change files in the local Snowflake, and
``pgsnow.verify`` comparing every table at the end. The workload must have made the changes
change capture gets wrong (updates that leave a TOASTed value unchanged, deletes, primary-key
updates), and the slot must be gone afterwards (a leftover slot pins WAL).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from pgsnow.demo.dataset import SAMPLE_TABLES
from pgsnow.demo.pipeline import change_capture_names, demo_cdc_database, run_cdc_demo
from pgsnow.local.postgres import start_local_postgres

pytestmark = pytest.mark.integration


def test_demo_cdc_replicates_the_shop_under_a_workload(tmp_path: Path) -> None:
    # Given the sample shop at a small scale, in mode cdc, and a workload writing while change
    # capture and the loader run twice
    outcome = run_cdc_demo(data_dir=tmp_path, scale=0.01, cycles=2, cycle_seconds=2.0, rate=150.0)

    # Then every table matches its source, cell by cell and by pgsnow verify
    assert [r.table.qualified for r in outcome.tables] == [f"shop.{name}" for name in SAMPLE_TABLES]
    failures = [f"{r.table.qualified} {r.status.value}: {r.detail}" for r in outcome.tables if not r.ok]
    assert not failures, failures
    assert all(r.verification is not None and r.verification.ok for r in outcome.tables)
    # ... after a workload that made the hard kinds of change
    done = outcome.workload
    assert done.unchanged_toast_updates > 0
    assert done.toast_writes > 0
    assert done.deletes > 0
    assert done.pk_updates > 0
    assert done.inserts > 0
    # ... drained by the change-capture function more than once
    assert outcome.change_capture_runs >= 3

    # And the demo's slot and publication are gone
    admin = start_local_postgres(environ={})
    publication, slot = change_capture_names(tmp_path)
    assert (publication, slot) == (outcome.publication, outcome.slot)
    database = demo_cdc_database(tmp_path)
    conn = psycopg2.connect(admin.dsn, dbname=database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            assert cur.fetchone() == (0,)
            cur.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", (publication,))
            assert cur.fetchone() == (0,)
    finally:
        conn.close()
        drop = psycopg2.connect(admin.dsn)  # the test's own source database is not kept
        drop.autocommit = True
        with drop.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        drop.close()


def test_demo_cdc_refuses_a_table_selection(tmp_path: Path) -> None:
    # demo --cdc replicates the sample shop only: a selection is refused before anything starts
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgsnow.cli",
            "demo",
            "--cdc",
            "--tables",
            "public.t",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--cdc" in done.stderr and "sample shop" in done.stderr
    assert not any(tmp_path.iterdir())  # no stack was started
