"""``pgsnow demo --schema S`` run as a user runs it: one schema built here, its stdout and exit code checked.

One table that cannot be replicated must not stop the others: every table gets one report line
(OK, MISMATCH or FAILED with its reason), the rest are replicated, and the exit code says that
something failed. The standard output is the report and nothing else (no metrics, no JSON logs).

To cover another kind of table, add a ``SchemaTable`` to ``DEMO_TABLES``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from pgsnow.local.postgres import create_database, start_local_postgres

pytestmark = pytest.mark.integration

DEMO_SCHEMA = "demo_cli"


@dataclass(frozen=True)
class SchemaTable:
    name: str
    statements: tuple[str, ...]  # create and fill the table in DEMO_SCHEMA
    status: str | None  # what the demo must report; None: a schema selection leaves it out
    reason: str = ""  # a fragment of the reason it must give


DEMO_TABLES = [
    SchemaTable(
        "plain",
        (
            "CREATE TABLE demo_cli.plain (id integer PRIMARY KEY, note text)",
            "INSERT INTO demo_cli.plain SELECT i, 'note ' || i FROM generate_series(1, 20) AS i",
        ),
        "OK",
    ),
    # Snowflake's DATE cannot hold infinity: refused by default (value_policy fail), with its key.
    SchemaTable(
        "endless",
        (
            "CREATE TABLE demo_cli.endless (id integer PRIMARY KEY, valid_until date)",
            "INSERT INTO demo_cli.endless VALUES (1, '2024-01-01'), (2, 'infinity')",
        ),
        "FAILED",
        "(id)=(2)",
    ),
    # A partitioned table replicates once, through its root, with every partition's rows; its
    # partitions are not selected on their own (docs/extraction.md).
    SchemaTable(
        "events",
        (
            "CREATE TABLE demo_cli.events (id integer, at date, note text, PRIMARY KEY (id, at))"
            " PARTITION BY RANGE (at)",
            "CREATE TABLE demo_cli.events_2024 PARTITION OF demo_cli.events"
            " FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
            "CREATE TABLE demo_cli.events_2025 PARTITION OF demo_cli.events"
            " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
            "INSERT INTO demo_cli.events SELECT i, DATE '2024-06-01' + i * 3, 'e' || i"
            " FROM generate_series(1, 150) AS i",
        ),
        "OK",
    ),
    SchemaTable("events_2024", (), None),
    SchemaTable("events_2025", (), None),
    # A view replicates only when named.
    SchemaTable(
        "recent_events",
        ("CREATE VIEW demo_cli.recent_events AS SELECT * FROM demo_cli.events WHERE at >= '2025-01-01'",),
        None,
    ),
    # Types the contract once refused: text forms, a range, a composite (docs/type-mapping.md).
    SchemaTable(
        "odd",
        (
            "CREATE TYPE demo_cli.money_amount AS (currency text, cents bigint)",
            "CREATE TABLE demo_cli.odd (id integer PRIMARY KEY, words tsvector, span int4range,"
            " spot point, flags bit(4), price demo_cli.money_amount)",
            "INSERT INTO demo_cli.odd VALUES"
            " (1, to_tsvector('simple', 'the fat cat'), '[1,5)', '(1,2)', B'1010', ROW('EUR', 1999)),"
            " (2, NULL, 'empty', NULL, NULL, NULL), (3, '', '(,7]', '(0.5,-3)', B'0000', ROW(NULL, 0))",
        ),
        "OK",
    ),
    # char(n) padding is dropped (docs/type-mapping.md): five blanks arrive as '' and that is equal.
    SchemaTable(
        "padded",
        (
            "CREATE TABLE demo_cli.padded (id integer PRIMARY KEY, code char(5))",
            "INSERT INTO demo_cli.padded VALUES (1, '     '), (2, 'ab'), (3, NULL)",
        ),
        "OK",
    ),
    # NUMBER(p,p): the local Snowflake prints 0.00123 as '.00123'; verify's canonical text is '0.00123'.
    SchemaTable(
        "fractions",
        (
            "CREATE TABLE demo_cli.fractions (id integer PRIMARY KEY, share numeric(5,5))",
            "INSERT INTO demo_cli.fractions VALUES (1, 0.00123), (2, -0.5), (3, 0), (4, NULL)",
        ),
        "OK",
    ),
]


@pytest.fixture(scope="module")
def demo_schema_dsn() -> str:
    admin = start_local_postgres(environ={})
    dsn = create_database(admin.dsn, "pgsnow_test_demo_cli", drop_existing=True)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {DEMO_SCHEMA}")
        for table in DEMO_TABLES:
            for statement in table.statements:
                cur.execute(statement)
    conn.close()
    return dsn


def test_demo_reports_every_table_and_replicates_all_but_the_failing_one(
    demo_schema_dsn: str, tmp_path: Path
) -> None:
    # Given a schema where one table cannot be replicated, and metrics not switched off by the caller
    environment = {k: v for k, v in os.environ.items() if not k.startswith("POWERTOOLS_")}
    # When the demo runs over the whole schema, as a user runs it
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgsnow.cli",
            "demo",
            "--pg-dsn",
            demo_schema_dsn,
            "--schema",
            DEMO_SCHEMA,
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        check=False,
    )
    # Then stdout is the report only: one line per table, then the summary
    lines = completed.stdout.splitlines()
    assert not [line for line in lines if line.lstrip().startswith(("{", "["))], completed.stdout
    by_table = {line.split()[0]: line for line in lines[:-1]}
    selected = [t for t in DEMO_TABLES if t.status is not None]
    assert sorted(by_table) == sorted(f"{DEMO_SCHEMA}.{t.name}" for t in selected), completed.stdout
    for table in selected:
        line = by_table[f"{DEMO_SCHEMA}.{table.name}"]
        assert line.split()[3] == table.status, line
        assert table.reason in line, line
    # The partitioned root holds every partition's rows, in PostgreSQL and in Snowflake
    assert by_table[f"{DEMO_SCHEMA}.events"].split()[1:3] == ["150", "150"], by_table
    failed = sum(1 for t in selected if t.status == "FAILED")
    assert lines[-1].startswith(f"demo: {sum(1 for t in selected if t.status == 'OK')} of {len(selected)}")
    assert lines[-1].endswith(f"{failed} failed")
    # And the exit code says that not every table made it, without a traceback
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
