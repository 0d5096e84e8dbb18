"""What the extractor's Runtime owns besides its clients: the continuation of a run."""

from __future__ import annotations

import boto3
import pytest

from pgsnow.config import Component, Settings
from pgsnow.errors import PermanentError
from pgsnow.runtime import Runtime

pytestmark = pytest.mark.unit

ENV = {"S3_STAGE_BUCKET": "stage-bucket", "PGSNOW_TABLES": "public.orders", "PGSNOW_PG_DSN": "dbname=x"}


def extractor_runtime_for(env: dict[str, str]) -> Runtime:
    settings = Settings.from_env(env, component=Component.EXTRACTOR)
    return Runtime(settings=settings, session=boto3.Session(region_name="us-east-1"))


def test_a_continuation_goes_to_the_invoker_the_local_stack_or_a_test_set() -> None:
    runtime = extractor_runtime_for(ENV)
    payloads: list[dict[str, str]] = []
    runtime.continuation_invoker = payloads.append

    runtime.invoke_continuation({"schema_name": "public", "table_name": "orders", "run_id": "r"})

    assert payloads == [{"schema_name": "public", "table_name": "orders", "run_id": "r"}]


def test_without_a_function_name_a_continuation_is_refused_before_any_aws_client() -> None:
    # Given an extractor runtime outside Lambda (no AWS_LAMBDA_FUNCTION_NAME) and no invoker set
    runtime = extractor_runtime_for(ENV)

    # When the run asks to be continued, Then it is a permanent error naming the missing variable
    with pytest.raises(PermanentError, match="AWS_LAMBDA_FUNCTION_NAME"):
        runtime.invoke_continuation({"schema_name": "public", "table_name": "orders", "run_id": "r"})
    # And no Lambda client was built
    assert "lambda" not in runtime._clients
