"""Fixtures of the extractor suites (test_extract, test_extract_runs, test_large_values), which
need only PostgreSQL and a moto server: the source DSN, an autocommit ``admin`` connection, a
schema of the module's own, the S3 client of the process's moto server (``aws``, from
tests/integration/conftest.py), and the extractor's connection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql
from stack_support import PG_DSN_DEFAULT, unique_name

from pgsnow.config import postgres_env
from pgsnow.local.aws import LocalAws
from pgsnow.postgres import connect


@pytest.fixture(scope="module")
def pg_dsn() -> str:
    """PGSNOW_PG_DSN when set (read through pgsnow.config), else the loopback server's test database."""
    return postgres_env().get("PGSNOW_PG_DSN") or PG_DSN_DEFAULT


@pytest.fixture(scope="module")
def admin(pg_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def schema_name(admin: psycopg2.extensions.connection, request: pytest.FixtureRequest) -> Iterator[str]:
    """A schema of the module's own, ``pgsnow_<module without test_>_<10 hex>``, dropped afterwards."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    name = unique_name(f"pgsnow_{module}_", 10)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def s3(aws: LocalAws) -> Any:
    return aws.client("s3")


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    """The extractor's connection (not autocommit: a run reads one snapshot)."""
    conn = connect(pg_dsn)
    yield conn
    conn.close()
