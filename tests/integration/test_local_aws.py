"""The local AWS side against a moto server over HTTP: staging resources and S3 -> SQS delivery."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest

from pgsnow.errors import ConfigError, PermanentError, RetryableError
from pgsnow.local.aws import (
    DEFAULT_QUEUE_NOTIFICATIONS,
    MOTO_KEY_BUFFER_BYTES,
    REPO_TEMPLATE,
    LocalAws,
    QueueNotificationRule,
    StagingResources,
    create_staging_resources,
    notification_rules_from_template,
)
from pgsnow.runtime import read_secret_json

pytestmark = pytest.mark.integration


@pytest.fixture
def staging(aws: LocalAws) -> StagingResources:
    return create_staging_resources(aws, bucket=f"pgsnow-{uuid.uuid4().hex[:12]}", visibility_timeout=2)


def receive_all(aws: LocalAws, queue_url: str) -> list[dict[str, Any]]:
    """Every message currently on the queue (deleted as read), bodies parsed."""
    sqs = aws.client("sqs")
    bodies: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get(
            "Messages", []
        )
        if not messages:
            return bodies
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def event_keys(bodies: list[dict[str, Any]]) -> list[str]:
    return [record["s3"]["object"]["key"] for body in bodies for record in body.get("Records", [])]


def test_server_is_reachable_over_http(aws: LocalAws) -> None:
    assert aws.endpoint_url.startswith("http://127.0.0.1:")
    assert aws.env() == {
        "AWS_ENDPOINT_URL": aws.endpoint_url,
        "AWS_ACCESS_KEY_ID": aws.access_key_id,
        "AWS_SECRET_ACCESS_KEY": aws.secret_access_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    assert aws.access_key_id.startswith("AKIA")  # the local administrator's key, not a placeholder
    assert "Buckets" in aws.client("s3").list_buckets()


def test_the_moto_process_keeps_staged_sized_objects_in_memory(aws: LocalAws) -> None:
    """Its objects up to MOTO_KEY_BUFFER_BYTES are not rolled over to disk (docs/local-fidelity.md),
    and an object past moto's own 5 MB threshold reads back whole."""
    environ = Path(f"/proc/{aws._process.pid}/environ").read_bytes().split(b"\0")
    assert f"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE={MOTO_KEY_BUFFER_BYTES}".encode() in environ
    s3 = aws.client("s3")
    bucket = f"pgsnow-buffer-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    body = uuid.uuid4().bytes * (7 << 16)  # 7 MiB
    s3.put_object(Bucket=bucket, Key="big", Body=body)
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == body


def test_staging_resources_match_the_template(aws: LocalAws, staging: StagingResources) -> None:
    s3, sqs = aws.client("s3"), aws.client("sqs")

    assert s3.get_bucket_versioning(Bucket=staging.bucket)["Status"] == "Enabled"
    attributes = sqs.get_queue_attributes(QueueUrl=staging.queue_url, AttributeNames=["All"])["Attributes"]
    assert attributes["VisibilityTimeout"] == "2"
    assert json.loads(attributes["RedrivePolicy"]) == {
        "deadLetterTargetArn": staging.dlq_arn,
        "maxReceiveCount": 3,
    }
    assert json.loads(attributes["Policy"])["Statement"][0]["Principal"] == {"Service": "s3.amazonaws.com"}

    configured = s3.get_bucket_notification_configuration(Bucket=staging.bucket)["QueueConfigurations"]
    rules = {
        (tuple(c["Events"]), *(r["Value"] for r in c["Filter"]["Key"]["FilterRules"])) for c in configured
    }
    # The whole prefix: S3's suffix filters are case-sensitive, the loader decides by the key
    assert rules == {(("s3:ObjectCreated:*",), "staging/")}
    assert {c["QueueArn"] for c in configured} == {staging.queue_arn}


def test_the_repo_template_is_the_source_when_present(staging: StagingResources) -> None:
    assert REPO_TEMPLATE.is_file(), "template.yaml is part of the repo"
    assert staging.notification_source == f"template:{REPO_TEMPLATE}"
    assert notification_rules_from_template(REPO_TEMPLATE) == DEFAULT_QUEUE_NOTIFICATIONS, (
        "the built-in fallback rules must stay the same as the template's"
    )


def test_setting_the_notification_sends_a_test_event(aws: LocalAws, staging: StagingResources) -> None:
    bodies = receive_all(aws, staging.queue_url)
    assert [body.get("Event") for body in bodies] == ["s3:TestEvent"]
    assert bodies[0]["Bucket"] == staging.bucket
    assert "Records" not in bodies[0]


@pytest.mark.parametrize(
    ("key", "notified"),
    [
        pytest.param(
            "staging/public/orders/public_orders_batch1_20261125T120000000000Z.csv.gz", True, id="csv-gz"
        ),
        pytest.param("staging/public/orders/hand_dropped.csv", True, id="plain-csv"),
        pytest.param("staging/public/orders/part-0.parquet", True, id="parquet"),
        pytest.param("staging/public/orders/my file é ü.csv.gz", True, id="space-and-unicode"),
        pytest.param("staging/public/orders/a+b&c=d.csv.gz", True, id="reserved-characters"),
        pytest.param("elsewhere/public/orders/x.csv.gz", False, id="outside-prefix"),
        pytest.param("_pgsnow/manifests/public/orders/20261125T120000000000Z.json", False, id="manifest"),
        pytest.param("staging/public/orders/EXPORT.CSV.GZ", True, id="upper-case-extension"),
        # The loader ignores these (pgsnow.events); S3 cannot filter suffixes case-insensitively
        pytest.param("staging/public/orders/notes.txt", True, id="non-data-suffix"),
    ],
)
def test_upload_notifies_for_every_object_under_the_prefix(
    aws: LocalAws, staging: StagingResources, key: str, notified: bool
) -> None:
    # Given the staging resources, with the setup test event drained
    receive_all(aws, staging.queue_url)

    # When an object is uploaded
    aws.client("s3").put_object(Bucket=staging.bucket, Key=key, Body=b"id\n1\n")

    # Then exactly the objects under the prefix produce one S3 event, with the key URL-encoded
    bodies = receive_all(aws, staging.queue_url)
    if not notified:
        assert bodies == []
        return
    assert len(bodies) == 1
    (record,) = bodies[0]["Records"]
    assert record["eventSource"] == "aws:s3"
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["awsRegion"] == aws.region
    assert record["s3"]["bucket"]["name"] == staging.bucket
    assert record["s3"]["object"]["size"] == len(b"id\n1\n")
    encoded = record["s3"]["object"]["key"]
    assert unquote_plus(encoded) == key
    assert " " not in encoded and encoded.isascii()


def test_keys_with_spaces_and_unicode_arrive_encoded(aws: LocalAws, staging: StagingResources) -> None:
    receive_all(aws, staging.queue_url)
    aws.client("s3").put_object(
        Bucket=staging.bucket, Key="staging/public/orders/my file é.csv.gz", Body=b"x"
    )

    (key,) = event_keys(receive_all(aws, staging.queue_url))

    assert "my+file+%C3%A9.csv.gz" in key  # space as '+', UTF-8 percent-encoded, like real S3


def test_prefix_argument_moves_the_filter(aws: LocalAws) -> None:
    # Given staging resources under another prefix
    resources = create_staging_resources(
        aws, bucket=f"pgsnow-{uuid.uuid4().hex[:12]}", prefix="/landing/zone/"
    )
    receive_all(aws, resources.queue_url)
    s3 = aws.client("s3")

    # When files land inside and outside it
    s3.put_object(Bucket=resources.bucket, Key="landing/zone/public/t/a.parquet", Body=b"x")
    s3.put_object(Bucket=resources.bucket, Key="staging/public/t/b.parquet", Body=b"x")

    # Then only the one inside notifies
    assert resources.prefix == "landing/zone"
    assert [unquote_plus(k) for k in event_keys(receive_all(aws, resources.queue_url))] == [
        "landing/zone/public/t/a.parquet"
    ]


def test_falls_back_to_builtin_rules_only_without_a_template(aws: LocalAws, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        create_staging_resources(
            aws, bucket=f"pgsnow-{uuid.uuid4().hex[:12]}", template_path=tmp_path / "nope.yaml"
        )

    template = tmp_path / "template.yaml"
    template.write_text("Resources:\n  Bucket:\n    Type: AWS::S3::Bucket\n")
    with pytest.raises(ConfigError, match="declares no bucket"):
        create_staging_resources(aws, bucket=f"pgsnow-{uuid.uuid4().hex[:12]}", template_path=template)


TEMPLATE_WITH_TAGS = """
Transform: AWS::Serverless-2016-10-31
Parameters:
  Prefix: {Type: String, Default: incoming}
  Suffix: {Type: String, Default: .parquet}
Conditions:
  Always: !Equals [a, a]
Resources:
  Queue:
    Type: AWS::SQS::Queue
  Other:
    Type: AWS::S3::Bucket
  Bucket:
    Type: AWS::S3::Bucket
    Properties:
      BucketName: !Sub "${AWS::StackName}-stage"
      NotificationConfiguration:
        QueueConfigurations:
          - Event: s3:ObjectCreated:Put
            Queue: !GetAtt Queue.Arn
            Filter:
              S3Key:
                Rules:
                  - {Name: prefix, Value: !Sub "${Prefix}/"}
                  - {Name: Suffix, Value: !Ref Suffix}
          - Event: s3:ObjectCreated:*
            Queue: !GetAtt [Queue, Arn]
            Filter:
              S3Key:
                Rules:
                  - {Name: suffix, Value: !Join ["", [".", "csv"]]}
"""


def test_template_with_cloudformation_tags_is_read(aws: LocalAws, tmp_path: Path) -> None:
    # Given a template using !Ref, !Sub, !GetAtt, !Join and !Equals
    template = tmp_path / "template.yaml"
    template.write_text(TEMPLATE_WITH_TAGS)

    # When its rules are read and applied
    assert notification_rules_from_template(template) == (
        QueueNotificationRule(events=("s3:ObjectCreated:Put",), prefix="incoming/", suffix=".parquet"),
        QueueNotificationRule(events=("s3:ObjectCreated:*",), prefix=None, suffix=".csv"),
    )
    resources = create_staging_resources(
        aws, bucket=f"pgsnow-{uuid.uuid4().hex[:12]}", template_path=template
    )

    # Then the prefix filter follows the prefix argument, the rest follows the template
    assert resources.notification_source == f"template:{template}"
    assert resources.notification_rules == (
        QueueNotificationRule(events=("s3:ObjectCreated:Put",), prefix="staging/", suffix=".parquet"),
        QueueNotificationRule(events=("s3:ObjectCreated:*",), prefix="staging/", suffix=".csv"),
    )
    receive_all(aws, resources.queue_url)
    aws.client("s3").put_object(Bucket=resources.bucket, Key="staging/s/t/a.csv.gz", Body=b"x")
    aws.client("s3").put_object(Bucket=resources.bucket, Key="staging/s/t/a.csv", Body=b"x")
    assert [unquote_plus(k) for k in event_keys(receive_all(aws, resources.queue_url))] == [
        "staging/s/t/a.csv"
    ]


def test_a_missing_secret_is_a_permanent_error_naming_it(aws: LocalAws) -> None:
    # A handler configured with a secret that does not exist fails with a clear, permanent error
    # (not a raw botocore traceback), so the event is dead-lettered instead of retried forever.
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:pgsnow/no-such-secret"
    with pytest.raises(PermanentError, match=r"no-such-secret.*ResourceNotFoundException"):
        read_secret_json(aws.client("secretsmanager"), missing)


def test_a_secret_that_is_not_a_json_object_is_refused(aws: LocalAws) -> None:
    client = aws.client("secretsmanager")
    arn = client.create_secret(Name=f"pgsnow/list-{uuid.uuid4().hex[:8]}", SecretString="[1, 2]")["ARN"]
    with pytest.raises(PermanentError, match="does not hold a JSON object"):
        read_secret_json(client, arn)


def test_an_unreachable_secrets_manager_is_retryable() -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "secretsmanager",
        endpoint_url="http://127.0.0.1:9",  # the discard port: nothing listens
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(RetryableError, match="cannot reach Secrets Manager"):
        read_secret_json(client, "arn:aws:secretsmanager:us-east-1:123456789012:secret:any")
