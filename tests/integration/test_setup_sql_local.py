"""The parts of `pgsnow snowflake-sql` the local Snowflake can run, run against it over HTTP.

The local emulator has no storage integrations, users, roles, grants, named file formats or
pipes (docs/snowflake-compatibility.md); those steps are checked as text in
tests/unit/test_setup_sql.py. What it can run - database, control schema, stage - is
run here, then used the way the loader uses it: a file staged under the prefix loads through
the stage. (The loader creates each table's load ledger itself: pgsnow.ledger.)
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import snowflake.connector
from moto.server import ThreadedMotoServer

from pgsnow.local.snowflake import LocalSnowflake, start_local_snowflake
from pgsnow.setup_sql import SetupOptions, build_setup_steps

pytestmark = pytest.mark.integration

BUCKET = "pgsnow-snowflake-stage-it-0123abcd"
PREFIX = "staging"
RUNNABLE_LOCALLY = ("CREATE DATABASE", "CREATE SCHEMA", "CREATE STAGE", "CREATE TABLE")


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3(moto_endpoint: str) -> Any:
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def local(moto_endpoint: str) -> Iterator[LocalSnowflake]:
    server = start_local_snowflake(s3_endpoint_url=moto_endpoint)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def conn(local: LocalSnowflake) -> Iterator[snowflake.connector.SnowflakeConnection]:
    connection = snowflake.connector.connect(**local.connect_kwargs())
    yield connection
    connection.close()


def test_setup_objects_run_locally_and_serve_a_load(conn: Any, s3: Any) -> None:
    # Given the setup statements for a deployment of this bucket and prefix
    setup = SetupOptions(
        database="SETUP_IT", schema="PGSNOW", role="PGSNOW_LOADER", bucket=BUCKET, prefix=PREFIX
    )
    runnable = [
        statement
        for step in build_setup_steps(setup)
        for statement in step.statements
        if statement.startswith(RUNNABLE_LOCALLY)
    ]
    assert [s.split(" ")[1] for s in runnable] == ["DATABASE", "SCHEMA", "STAGE"]
    cursor = conn.cursor()
    # When they are run twice (a re-run of the script must be harmless)
    for statement in runnable + runnable:
        cursor.execute(statement)
    # And a file staged under the prefix is loaded through the stage
    key = f"{PREFIX}/public/orders/public_orders_batch1_20261125T120000000000Z.csv.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(b"id,note\n1,first\n2,\n"))
    cursor.execute('CREATE SCHEMA IF NOT EXISTS "SETUP_IT"."PUBLIC"')
    cursor.execute('CREATE TABLE "SETUP_IT"."PUBLIC"."ORDERS" ("ID" NUMBER(38,0), "NOTE" VARCHAR)')
    cursor.execute(
        'COPY INTO "SETUP_IT"."PUBLIC"."ORDERS" FROM @"SETUP_IT"."PGSNOW"."PGSNOW_STAGE"/public/orders/ '
        "FILES = ('public_orders_batch1_20261125T120000000000Z.csv.gz') "
        "FILE_FORMAT = (TYPE = CSV SKIP_HEADER = 1 FIELD_OPTIONALLY_ENCLOSED_BY = '\"')"
    )
    # Then the rows arrived
    cursor.execute('SELECT "ID", "NOTE" FROM "SETUP_IT"."PUBLIC"."ORDERS" ORDER BY "ID"')
    assert cursor.fetchall() == [(1, "first"), (2, None)]
