"""End-to-end against a deployed stack: the same checks as the local pipeline suite, for real.

Security properties are read back from the live resources; then one extraction is run and
followed through S3, SQS and the loader into Snowflake, and a redelivered notification must
load nothing twice. Opt-in: see conftest.py (skipped when not configured).
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote_plus

import pytest

from pgsnow.config import Settings
from pgsnow.keys import parse_data_key
from pgsnow.ledger import ledger_name

pytestmark = pytest.mark.e2e

LOAD_TIMEOUT_S = 600
POLL_S = 10


# ---------------------------------------------------------------- deployed security properties


def test_bucket_is_encrypted_versioned_private_and_tls_only(deployment: Any) -> None:
    s3 = deployment.client("s3")
    bucket = deployment.outputs["StageBucketName"]
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert [r["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in rules] == ["AES256"]
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(
        block[k]
        for k in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
    )
    ownership = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
    assert ownership == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    assert any(
        s["Effect"] == "Deny" and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
        for s in policy["Statement"]
    )


def test_bucket_notifies_the_queue_for_the_staging_prefix(deployment: Any) -> None:
    # No suffix filter: S3 matches suffixes case-sensitively and FILE.CSV.GZ must load too;
    # the loader decides by the key (docs/loading.md, "Notifications")
    s3 = deployment.client("s3")
    configuration = s3.get_bucket_notification_configuration(Bucket=deployment.outputs["StageBucketName"])
    queue_configurations = configuration["QueueConfigurations"]
    prefix = deployment.outputs["StagePrefix"] + "/"
    filters = set()
    for queue_configuration in queue_configurations:
        assert queue_configuration["QueueArn"] == deployment.outputs["StageQueueArn"]
        rules = {r["Name"].lower(): r["Value"] for r in queue_configuration["Filter"]["Key"]["FilterRules"]}
        filters.add((rules["prefix"], rules.get("suffix")))
    assert filters == {(prefix, None)}


def test_queue_is_encrypted_and_redrives_after_five_receives(deployment: Any) -> None:
    sqs = deployment.client("sqs")
    attributes = sqs.get_queue_attributes(
        QueueUrl=deployment.outputs["StageQueueUrl"], AttributeNames=["All"]
    )["Attributes"]
    assert attributes["SqsManagedSseEnabled"] == "true"
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == deployment.outputs["StageDeadLetterQueueArn"]
    assert int(redrive["maxReceiveCount"]) >= 5
    loader = deployment.client("lambda").get_function_configuration(
        FunctionName=deployment.outputs["LoaderFunctionName"]
    )
    assert int(attributes["VisibilityTimeout"]) >= 6 * loader["Timeout"]


# ---------------------------------------------------------------- the pipeline


def ledger_rows(conn: Any, settings: Settings, keys: list[str]) -> dict[str, int]:
    """S3 key -> rows loaded, for the keys the ledger holds."""
    if not keys:
        return {}
    # Every key is the deployment table's: its ledger (pgsnow.ledger names it).
    ledger = ledger_name(
        settings.snowflake.database or "",
        settings.snowflake.control_schema,
        parse_data_key(keys[0], settings.prefix).table,
    )
    placeholders = ", ".join(["%s"] * len(keys))
    cursor = conn.cursor()
    cursor.execute(f'SELECT "S3_KEY", "ROWS_LOADED" FROM {ledger} WHERE "S3_KEY" IN ({placeholders})', keys)
    return {key: int(rows or 0) for key, rows in cursor.fetchall()}


def wait_for_ledger(conn: Any, settings: Settings, keys: list[str]) -> dict[str, int]:
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    loaded = ledger_rows(conn, settings, keys)
    while len(loaded) < len(keys) and time.monotonic() < deadline:
        time.sleep(POLL_S)
        loaded = ledger_rows(conn, settings, keys)
    return loaded


@pytest.fixture(scope="module")
def extraction(deployment: Any) -> dict[str, Any]:
    """One synchronous extractor invocation for the configured table, and the keys it staged."""
    lambda_client = deployment.client("lambda")
    response = lambda_client.invoke(
        FunctionName=deployment.outputs["ExtractorFunctionName"],
        InvocationType="RequestResponse",
        Payload=json.dumps({"schema_name": deployment.table.schema, "table_name": deployment.table.table}),
    )
    result: dict[str, Any] = json.loads(response["Payload"].read())
    assert "FunctionError" not in response, result
    s3 = deployment.client("s3")
    listed = s3.list_objects_v2(
        Bucket=deployment.outputs["StageBucketName"],
        Prefix=f"{deployment.outputs['StagePrefix']}/{deployment.table.schema}/{deployment.table.table}/",
    )
    result["keys"] = [
        o["Key"]
        for o in listed.get("Contents", [])
        if parse_data_key(o["Key"], deployment.outputs["StagePrefix"]).run_id == result["run_id"]
    ]
    return result


def test_extracted_run_is_loaded_with_every_row(
    deployment: Any, extraction: dict[str, Any], snowflake_conn: Any, settings: Settings
) -> None:
    # Given a run the extractor staged (the cleanup may already have removed loaded files)
    assert extraction["state"] in {"staged", "loaded"}
    keys: list[str] = extraction["keys"]
    if keys:
        # When the loader has had time to process the notifications
        loaded = wait_for_ledger(snowflake_conn, settings, keys)
        # Then every staged file is in the ledger and the rows add up to the run's rows
        assert set(loaded) == set(keys)
    assert extraction["files"] >= 1
    manifest_rows = extraction["rows"]
    ledger = ledger_name(
        settings.snowflake.database or "", settings.snowflake.control_schema, deployment.table
    )
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        cursor = snowflake_conn.cursor()
        cursor.execute(
            f'SELECT COUNT(*), COALESCE(SUM("ROWS_LOADED"), 0) FROM {ledger} WHERE "RUN_ID" = %s',
            (extraction["run_id"],),
        )
        files, rows = cursor.fetchone()
        if files >= extraction["files"] or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    assert (files, rows) == (extraction["files"], manifest_rows)


def test_redelivered_notification_loads_nothing_twice(
    deployment: Any, extraction: dict[str, Any], snowflake_conn: Any, settings: Settings
) -> None:
    # Given a file of the run that the ledger holds
    keys: list[str] = extraction["keys"]
    if not keys:
        pytest.fail("the cleanup removed the run's files before the test could redeliver one; run again")
    loaded = wait_for_ledger(snowflake_conn, settings, keys[:1])
    assert keys[0] in loaded
    # When its S3 notification is delivered to the queue again
    body = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": deployment.outputs["StageBucketName"]},
                    "object": {"key": quote_plus(keys[0])},
                },
            }
        ]
    }
    deployment.client("sqs").send_message(
        QueueUrl=deployment.outputs["StageQueueUrl"], MessageBody=json.dumps(body)
    )
    time.sleep(60)
    # Then the ledger still holds it once, with the same rows, and nothing was dead-lettered for it
    assert ledger_rows(snowflake_conn, settings, keys[:1]) == {keys[0]: loaded[keys[0]]}
    attributes = deployment.client("sqs").get_queue_attributes(
        QueueUrl=deployment.outputs["StageDeadLetterQueueUrl"], AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    assert int(attributes["ApproximateNumberOfMessages"]) == 0
