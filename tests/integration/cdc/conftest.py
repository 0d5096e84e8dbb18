"""Fixtures of the change-capture suites: the source DSN, an autocommit ``admin`` connection, a
schema of the module's own, the S3 client of the process's moto server (``aws``, from
tests/integration/conftest.py) and a fresh versioned bucket per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from stack_support import PG_DSN_DEFAULT, new_bucket, schema_in

from pgsnow.config import postgres_env
from pgsnow.local.aws import LocalAws


@pytest.fixture(scope="module")
def pg_dsn() -> str:
    return postgres_env().get("PGSNOW_PG_DSN") or PG_DSN_DEFAULT


@pytest.fixture(scope="module")
def admin(pg_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def schema_name(pg_dsn: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A schema of the module's own, dropped afterwards."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with schema_in(pg_dsn, f"pgsnow_{module}") as name:
        yield name


@pytest.fixture(scope="module")
def s3(aws: LocalAws) -> Any:
    return aws.client("s3")


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3, "pgsnow-drain", versioned=True)
