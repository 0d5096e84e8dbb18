"""Fixtures for the opt-in end-to-end suite against a deployed stack and a real Snowflake account.

Configured by environment variables (docs/deploy.md, step 7):

* ``PGSNOW_E2E_STACK`` - the CloudFormation stack name (its outputs name everything else)
* ``PGSNOW_E2E_TABLE`` - ``schema.table``, one of the stack's ReplicatedTables, with rows, small
  enough to extract in one invocation (the test follows one run)
* ``PGSNOW_E2E_SNOWFLAKE_SECRET_ARN`` - the key-pair secret (read with the caller's credentials)
* ``AWS_REGION`` / ``AWS_PROFILE`` - as for the AWS CLI

Without the first three every test here is skipped, with that reason: this is the one suite
that needs resources the loopback servers cannot stand in for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from pgsnow.config import Component, Settings
from pgsnow.identifiers import TableRef

REQUIRED = ("PGSNOW_E2E_STACK", "PGSNOW_E2E_TABLE", "PGSNOW_E2E_SNOWFLAKE_SECRET_ARN")


@dataclass(frozen=True)
class Deployment:
    stack: str
    outputs: dict[str, str]
    table: TableRef
    snowflake_secret_arn: str
    session: Any  # boto3.Session

    def client(self, service: str) -> Any:
        return self.session.client(service)


@pytest.fixture(scope="session")
def deployment() -> Deployment:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        pytest.skip(f"e2e suite not configured: set {', '.join(missing)} (docs/deploy.md, step 7)")
    session = boto3.Session()
    stack = os.environ["PGSNOW_E2E_STACK"]
    (described,) = session.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
    return Deployment(
        stack=stack,
        outputs=outputs,
        table=TableRef.parse(os.environ["PGSNOW_E2E_TABLE"]),
        snowflake_secret_arn=os.environ["PGSNOW_E2E_SNOWFLAKE_SECRET_ARN"],
        session=session,
    )


@pytest.fixture(scope="session")
def settings(deployment: Deployment) -> Settings:
    """The loader's settings, rebuilt from the stack's outputs (so the test reads what the loader reads)."""
    outputs = deployment.outputs
    return Settings.from_env(
        {
            "S3_STAGE_BUCKET": outputs["StageBucketName"],
            "S3_STAGE_PREFIX": outputs["StagePrefix"],
            "SNOWFLAKE_SECRET_ARN": deployment.snowflake_secret_arn,
            "SNOWFLAKE_DATABASE": outputs["SnowflakeDatabase"],
            "SNOWFLAKE_CONTROL_SCHEMA": outputs["SnowflakeControlSchema"],
            "SNOWFLAKE_STAGE": outputs["SnowflakeStage"],
            "PGSNOW_TABLES": deployment.table.qualified,
        },
        component=Component.LOADER,
    )


@pytest.fixture(scope="session")
def snowflake_conn(deployment: Deployment, settings: Settings) -> Iterator[Any]:
    from pgsnow.snowflake.connection import connect

    conn = connect(settings.snowflake, secrets_client=deployment.client("secretsmanager"))
    yield conn
    conn.close()
