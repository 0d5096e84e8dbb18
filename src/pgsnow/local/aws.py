"""The local AWS side: a moto server over HTTP and the staging resources the SAM template declares.

``start_local_aws()`` runs moto's ``ThreadedMotoServer`` in this process on a loopback port;
everything talks to it over HTTP with ordinary boto3 clients (``LocalAws.client``), exactly
like the deployed code talks to AWS. moto keeps its state per *process*, so two servers in
one process share buckets and queues: use unique names.

``create_staging_resources()`` builds what ``template.yaml`` declares for the staging side:
a versioned bucket, a dead-letter queue, the loader queue with its RedrivePolicy, a queue
policy that lets S3 send, and the bucket notification. The notification rules (events,
prefix and suffix filters) are read from the repo's ``template.yaml`` when it is present, so
the local stack cannot drift from what is deployed; without a template they come from
``DEFAULT_QUEUE_NOTIFICATIONS`` below. ``StagingResources.notification_source`` says which
was used. The prefix filter always follows the ``prefix`` argument: in the template it is a
deploy-time parameter, here it is the caller's choice.

Like real S3, moto sends an ``s3:TestEvent`` message to the queue when the notification
configuration is set; it is left in the queue, because the loader must tolerate it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.config import Config

from pgsnow.errors import ConfigError
from pgsnow.keys import normalise_prefix

DEFAULT_REGION = "us-east-1"
# moto accepts any credentials; these make it obvious nothing real is being used.
LOCAL_ACCESS_KEY_ID = "testing"
LOCAL_SECRET_ACCESS_KEY = "testing"  # noqa: S105 - a placeholder moto accepts, not a secret
REPO_TEMPLATE = Path(__file__).resolve().parents[3] / "template.yaml"


@dataclass(frozen=True)
class QueueNotificationRule:
    """One S3 -> SQS notification: which events, for keys with this prefix and suffix."""

    events: tuple[str, ...]
    prefix: str | None
    suffix: str | None

    def to_s3(self, queue_arn: str, rule_id: str) -> dict[str, Any]:
        """The rule as one ``QueueConfigurations`` entry of ``put_bucket_notification_configuration``."""
        rules = [{"Name": "prefix", "Value": self.prefix}] if self.prefix is not None else []
        rules += [{"Name": "suffix", "Value": self.suffix}] if self.suffix is not None else []
        entry: dict[str, Any] = {"Id": rule_id, "QueueArn": queue_arn, "Events": list(self.events)}
        if rules:
            entry["Filter"] = {"Key": {"FilterRules": rules}}
        return entry


# S3 allows one suffix per rule, so each data-file suffix the loader accepts
# (pgsnow.keys: .csv.gz, .csv, .parquet) gets its own rule. Mirrors template.yaml.
DEFAULT_QUEUE_NOTIFICATIONS: tuple[QueueNotificationRule, ...] = tuple(
    QueueNotificationRule(events=("s3:ObjectCreated:*",), prefix="staging/", suffix=suffix)
    for suffix in (".csv.gz", ".csv", ".parquet")
)


@dataclass(frozen=True)
class LocalAws:
    """Where the moto server listens, and the fake credentials to use with it."""

    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str
    _server: Any = field(default=None, repr=False, compare=False)

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` pointed at the moto server."""
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
        )

    def env(self) -> dict[str, str]:
        """Environment for a process (a handler, the CLI) that should use this moto server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,  # what the Lambda runtime sets
        }

    def stop(self) -> None:
        """Stop the server if this process started it."""
        if self._server is not None:
            self._server.stop()


def start_local_aws(port: int = 0, host: str = "127.0.0.1") -> LocalAws:
    """Start a moto server in a background thread; ``port=0`` picks a free port."""
    from moto.server import ThreadedMotoServer

    # One access-log line per request drowns the test and CLI output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    return LocalAws(
        endpoint_url=f"http://{bound_host}:{bound_port}",
        region=DEFAULT_REGION,
        access_key_id=LOCAL_ACCESS_KEY_ID,
        secret_access_key=LOCAL_SECRET_ACCESS_KEY,
        _server=server,
    )


@dataclass(frozen=True)
class StagingResources:
    bucket: str
    queue_url: str
    queue_arn: str
    dlq_url: str
    dlq_arn: str
    prefix: str
    notification_rules: tuple[QueueNotificationRule, ...] = ()
    notification_source: str = "default"  # "template:<path>" or "default"


def create_staging_resources(
    aws: LocalAws,
    *,
    bucket: str,
    prefix: str = "staging",
    visibility_timeout: int = 30,
    max_receive_count: int = 3,
    template_path: Path | None = None,
) -> StagingResources:
    """Create the bucket, DLQ, queue (with redrive) and bucket notification the template declares.

    ``template_path=None`` uses the repo's ``template.yaml`` if it exists, else the built-in
    rules. An explicit ``template_path`` that does not exist, or a template without a
    bucket notification, is a ConfigError: the caller asked for the template's rules.
    """
    prefix = normalise_prefix(prefix)
    rules, source = _notification_rules(template_path)
    rules = tuple(_with_prefix(rule, f"{prefix}/") for rule in rules)

    s3 = aws.client("s3")
    sqs = aws.client("sqs")
    if aws.region == "us-east-1":
        s3.create_bucket(Bucket=bucket)
    else:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": aws.region})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})

    dlq_url = sqs.create_queue(QueueName=f"{bucket}-loader-dlq")["QueueUrl"]
    dlq_arn = _queue_arn(sqs, dlq_url)
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    queue_url = sqs.create_queue(
        QueueName=f"{bucket}-loader",
        Attributes={"VisibilityTimeout": str(visibility_timeout), "RedrivePolicy": json.dumps(redrive)},
    )["QueueUrl"]
    queue_arn = _queue_arn(sqs, queue_url)
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": _queue_policy(queue_arn, bucket)})

    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                rule.to_s3(queue_arn, f"pgsnow-loader-{index}") for index, rule in enumerate(rules, start=1)
            ]
        },
    )
    return StagingResources(
        bucket=bucket,
        queue_url=queue_url,
        queue_arn=queue_arn,
        dlq_url=dlq_url,
        dlq_arn=dlq_arn,
        prefix=prefix,
        notification_rules=rules,
        notification_source=source,
    )


def _queue_arn(sqs: Any, queue_url: str) -> str:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]
    return str(attributes["QueueArn"])


def _queue_policy(queue_arn: str, bucket: str) -> str:
    """The policy real S3 needs to deliver to the queue (moto does not check it)."""
    statement = {
        "Effect": "Allow",
        "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"}},
    }
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def _with_prefix(rule: QueueNotificationRule, prefix: str) -> QueueNotificationRule:
    return QueueNotificationRule(events=rule.events, prefix=prefix, suffix=rule.suffix)


def _notification_rules(template_path: Path | None) -> tuple[tuple[QueueNotificationRule, ...], str]:
    if template_path is None:
        if not REPO_TEMPLATE.is_file():
            return DEFAULT_QUEUE_NOTIFICATIONS, "default"
        template_path = REPO_TEMPLATE
    if not template_path.is_file():
        raise ConfigError([f"SAM template {template_path} does not exist"])
    rules = notification_rules_from_template(template_path)
    if not rules:
        raise ConfigError(
            [f"{template_path} declares no bucket NotificationConfiguration.QueueConfigurations"]
        )
    return rules, f"template:{template_path}"


# ---------------------------------------------------------------------------
# Reading template.yaml


class _CloudFormationLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no stubs
    """A safe YAML loader that turns CloudFormation short tags (``!Ref``, ``!Sub``...) into their long form."""


def _construct_intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if tag_suffix == "Ref":
        return {"Ref": value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{tag_suffix}": value}


_CloudFormationLoader.add_multi_constructor("!", _construct_intrinsic)

_SUB_PLACEHOLDER = re.compile(r"\$\{([^}!]+)\}")


def notification_rules_from_template(template_path: Path) -> tuple[QueueNotificationRule, ...]:
    """The S3 -> SQS notification rules of the first bucket in ``template_path`` that has any.

    Parameters resolve to their ``Default``; ``!Ref``, ``!Sub`` and ``!Join`` are understood.
    A rule whose event or suffix cannot be resolved is a ConfigError.
    """
    template = yaml.load(template_path.read_text(encoding="utf-8"), Loader=_CloudFormationLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(template, Mapping):
        raise ConfigError([f"{template_path} is not a CloudFormation template"])
    parameters = {
        str(name): str(spec["Default"])
        for name, spec in (template.get("Parameters") or {}).items()
        if isinstance(spec, Mapping) and "Default" in spec
    }
    for resource in (template.get("Resources") or {}).values():
        if not isinstance(resource, Mapping) or resource.get("Type") != "AWS::S3::Bucket":
            continue
        notification = (resource.get("Properties") or {}).get("NotificationConfiguration") or {}
        queue_configs = notification.get("QueueConfigurations") or []
        if queue_configs:
            return tuple(_rule_from_template(config, parameters, template_path) for config in queue_configs)
    return ()


def _rule_from_template(
    config: Mapping[str, Any], parameters: Mapping[str, str], template_path: Path
) -> QueueNotificationRule:
    event = _resolve(config.get("Event"), parameters)
    filter_rules: Sequence[Mapping[str, Any]] = ((config.get("Filter") or {}).get("S3Key") or {}).get(
        "Rules"
    ) or []
    found: dict[str, str | None] = {}
    for filter_rule in filter_rules:
        name = str(filter_rule.get("Name", "")).lower()
        found[name] = _resolve(filter_rule.get("Value"), parameters)
    problems = []
    if event is None:
        problems.append(f"{template_path}: a QueueConfiguration has an unresolvable Event")
    if "suffix" in found and found["suffix"] is None:
        problems.append(f"{template_path}: a QueueConfiguration has an unresolvable suffix filter")
    if problems:
        raise ConfigError(problems)
    assert event is not None
    return QueueNotificationRule(events=(event,), prefix=found.get("prefix"), suffix=found.get("suffix"))


def _resolve(value: Any, parameters: Mapping[str, str]) -> str | None:
    """A template value as text, or None when it depends on something only CloudFormation knows."""
    if isinstance(value, str | int | float):
        return str(value)
    if not isinstance(value, Mapping) or len(value) != 1:
        return None
    ((function, argument),) = value.items()
    if function == "Ref":
        return parameters.get(str(argument))
    if function == "Fn::Sub":
        text, variables = (argument, {}) if isinstance(argument, str) else (argument[0], argument[1])
        known = {**parameters, **{k: _resolve(v, parameters) for k, v in variables.items()}}
        names = _SUB_PLACEHOLDER.findall(text)
        if any(known.get(name) is None for name in names):
            return None
        return _SUB_PLACEHOLDER.sub(lambda match: str(known[match.group(1)]), text)
    if function == "Fn::Join" and isinstance(argument, list) and len(argument) == 2:
        parts = [_resolve(part, parameters) for part in argument[1]]
        return None if any(part is None for part in parts) else str(argument[0]).join(parts)  # type: ignore[arg-type]
    return None
