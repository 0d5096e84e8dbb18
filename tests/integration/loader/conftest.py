"""Fixtures of the loader suites (test_load*, test_snowpipe): one local Snowflake server per test
process (one per xdist worker), reading the process's one moto server (``aws``, from
tests/integration/conftest.py), and per test a bucket and a Snowflake
database of its own (``settings``), so tests share the servers and nothing else. Staging helpers
are in load_support.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import snowflake.connector

from pgsnow.config import Component, Settings
from pgsnow.local.aws import LocalAws
from pgsnow.local.snowflake import LocalSnowflake, start_local_snowflake
from pgsnow.snowflake.load_sql import build_create_stage
from pgsnow.snowflake.table_sql import build_create_schema


@pytest.fixture(scope="session")
def local_snowflake(aws: LocalAws) -> Iterator[LocalSnowflake]:
    server = start_local_snowflake(
        s3_endpoint_url=aws.endpoint_url,
        aws_access_key_id=aws.access_key_id,
        aws_secret_access_key=aws.secret_access_key,
    )
    yield server
    server.stop()


@pytest.fixture
def settings(aws: LocalAws) -> Settings:
    """Loader settings for a fresh bucket and database, so tests share nothing."""
    suffix = uuid.uuid4().hex[:10]
    bucket = f"pgsnow-load-{suffix}"
    aws.client("s3").create_bucket(Bucket=bucket)
    env = {
        "S3_STAGE_BUCKET": bucket,
        "S3_STAGE_PREFIX": "staging",
        "PGSNOW_TABLES": "*",
        "SNOWFLAKE_ACCOUNT": "local",
        "SNOWFLAKE_USER": "pgsnow",
        "SNOWFLAKE_PASSWORD": "local",
        "SNOWFLAKE_DATABASE": f"DB_{suffix.upper()}",
    }
    return Settings.from_env(env, component=Component.LOADER)


@pytest.fixture
def s3(aws: LocalAws) -> Any:
    return aws.client("s3")


@pytest.fixture
def sf_conn(local_snowflake: LocalSnowflake, settings: Settings) -> Iterator[Any]:
    """A connection to the settings' database, with the control schema and the stage in place."""
    database = settings.snowflake.database
    assert database is not None
    conn = snowflake.connector.connect(**local_snowflake.connect_kwargs(database=database, schema="PUBLIC"))
    control = settings.snowflake.control_schema
    with conn.cursor() as cursor:
        cursor.execute(build_create_schema(database, control))
        cursor.execute(
            build_create_stage(
                database,
                control,
                settings.snowflake.stage,
                bucket=settings.bucket,
                prefix=settings.prefix,
                storage_integration=None,
            )
        )
    yield conn
    conn.close()
