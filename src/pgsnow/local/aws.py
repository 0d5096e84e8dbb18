"""The local AWS side: a moto server over HTTP and the staging resources the SAM template declares.

``start_local_aws()`` runs a moto server in a process of its own (``pgsnow.local.moto_server``)
on a loopback port, with IAM enforced; everything talks to it over HTTP with ordinary boto3
clients, exactly like the deployed code talks to AWS. ``LocalAws.client`` signs as the local
administrator created at start-up; the functions' roles are in ``pgsnow.local.iam``. Each
server has its own state (its own process), so stacks do not share buckets or queues.

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

import copy
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.config import Config
from botocore.loaders import create_loader

from pgsnow.errors import ConfigError
from pgsnow.keys import normalise_prefix

DEFAULT_REGION = "us-east-1"
# Used only for the calls moto lets through before IAM enforcement starts (they create the
# local administrator); afterwards moto refuses them like any unknown key.
LOCAL_ACCESS_KEY_ID = "testing"
LOCAL_SECRET_ACCESS_KEY = "testing"  # noqa: S105 - a placeholder moto accepts, not a secret
REPO_TEMPLATE = Path(__file__).resolve().parents[3] / "template.yaml"
_SHARED_MODEL_LOADER = create_loader()


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


# Every object under the staging prefix: S3's suffix filters are case-sensitive, and the loader
# takes FILE.CSV.GZ too (pgsnow.keys decides, in any case). Mirrors template.yaml.
DEFAULT_QUEUE_NOTIFICATIONS: tuple[QueueNotificationRule, ...] = (
    QueueNotificationRule(events=("s3:ObjectCreated:*",), prefix="staging/", suffix=None),
)


@dataclass(frozen=True)
class LocalAws:
    """Where the moto server listens, and the local administrator's keys for it.

    IAM is enforced: a request signed with any other keys than the administrator's, a role's
    temporary credentials or another IAM user's keys is refused. ``client`` is for setting up and
    inspecting (the stack, tests); code under test uses a function role's session
    (``pgsnow.local.iam``).
    """

    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str
    admin_user_arn: str = ""
    _process: Any = field(default=None, repr=False, compare=False)
    _admin_sessions: list[LocalSession] = field(default_factory=list, repr=False, compare=False)
    _admin_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` pointed at the moto server, as the local administrator."""
        return self.admin_session().client(service)

    def admin_session(self) -> LocalSession:
        """The session with the local administrator's keys whose clients reach the moto server.

        One per server: a new session loads every service model again (~15 ms per file), and
        tests ask for administrator clients in loops."""
        with self._admin_lock:
            if not self._admin_sessions:
                self._admin_sessions.append(
                    LocalSession(
                        self.endpoint_url,
                        aws_access_key_id=self.access_key_id,
                        aws_secret_access_key=self.secret_access_key,
                        region_name=self.region,
                    )
                )
            return self._admin_sessions[0]

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
        if self._process is not None and self._process.poll() is None:
            # Closing its stdin is the server's signal to stop (pgsnow.local.moto_server).
            if self._process.stdin is not None:
                self._process.stdin.close()
            try:
                self._process.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()


class LocalSession(boto3.Session):
    """A boto3 Session whose clients go to the moto server, whatever the process environment says.

    Handlers build their clients with ``session.client(service)`` (pgsnow.runtime); the endpoint
    travels with the session, so a role's session cannot reach anything but the local server.
    """

    def __init__(self, endpoint_url: str, **session_options: Any) -> None:
        super().__init__(**session_options)
        # Every local session reads the service models through one loader: a loader of its own
        # would parse each model's JSON again (~15 ms per file) for every role and client.
        self._session.register_component("data_loader", _SHARED_MODEL_LOADER)
        self.endpoint_url = endpoint_url
        self._client_lock = threading.Lock()

    def client(self, service_name: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("endpoint_url", self.endpoint_url)
        kwargs.setdefault("config", client_config())
        # A session is not thread-safe while it makes clients (its clients are), and one session
        # serves the dispatcher's threads and the test's.
        with self._client_lock:
            return super().client(service_name, *args, **kwargs)  # type: ignore[call-overload]


def client_config() -> Config:
    """Path-style S3 addressing (moto on loopback has no bucket subdomains), standard retries."""
    return Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"})


# Objects up to this size stay in the moto process's memory (start_local_aws).
MOTO_KEY_BUFFER_BYTES = 256 << 20


def start_local_aws(port: int = 0, host: str = "127.0.0.1") -> LocalAws:
    """Start a moto server with IAM enforced, in a process of its own; ``port=0`` picks a free port.

    moto lets the first ``INITIAL_NO_AUTH_ACTION_COUNT`` requests through unchecked; exactly that
    many create the local administrator (a user with an ``Action: *`` inline policy and an
    access key). Every later request must be signed by an IAM identity allowed to make it.
    """
    environment = {
        # moto rolls an object's bytes over to a temporary file past 5 MB, which was a fifth of its
        # CPU storing a 54 MB change file; in memory, S3's answers are the same
        # (docs/local-fidelity.md). A value set by the caller wins.
        "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(MOTO_KEY_BUFFER_BYTES),
        **os.environ,
        "INITIAL_NO_AUTH_ACTION_COUNT": str(len(_ADMIN_BOOTSTRAP_CALLS)),
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "pgsnow.local.moto_server", "--host", host, "--port", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=environment,
        text=True,
    )
    try:
        bound_port = _read_port(process)
        endpoint_url = f"http://{host}:{bound_port}"
        admin_arn, key_id, secret = _create_admin(endpoint_url, DEFAULT_REGION)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return LocalAws(
        endpoint_url=endpoint_url,
        region=DEFAULT_REGION,
        access_key_id=key_id,
        secret_access_key=secret,
        admin_user_arn=admin_arn,
        _process=process,
    )


SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 10.0
LOCAL_ADMIN_USER = "pgsnow-local-admin"
# The calls _create_admin makes before enforcement starts; moto counts each one.
_ADMIN_BOOTSTRAP_CALLS = ("CreateUser", "PutUserPolicy", "CreateAccessKey")
_ADMIN_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def _read_port(process: subprocess.Popen[str]) -> int:
    """The port from the server's ``PORT <n>`` line; an error if it exits or stays silent."""
    assert process.stdout is not None
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(SERVER_START_TIMEOUT_S)
    line = ready[0].strip() if ready else ""
    if not line.startswith("PORT "):
        raise RuntimeError(
            f"the local moto server did not start (exit code {process.poll()}, first line {line!r})"
        )
    return int(line.split()[1])


def _create_admin(endpoint_url: str, region: str) -> tuple[str, str, str]:
    """Create the local administrator with the unchecked calls; (user ARN, key id, secret)."""
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=LOCAL_ACCESS_KEY_ID,
        aws_secret_access_key=LOCAL_SECRET_ACCESS_KEY,
        # A retried call would use up an unchecked call and leave a later one refused.
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    user_arn = str(iam.create_user(UserName=LOCAL_ADMIN_USER)["User"]["Arn"])
    iam.put_user_policy(UserName=LOCAL_ADMIN_USER, PolicyName="administrator", PolicyDocument=_ADMIN_POLICY)
    key = iam.create_access_key(UserName=LOCAL_ADMIN_USER)["AccessKey"]
    return user_arn, str(key["AccessKeyId"]), str(key["SecretAccessKey"])


# The template's ExtractRangeQueue: six extractor timeouts, so a range is redelivered only when
# its worker died, never while it is still extracting.
RANGE_VISIBILITY_TIMEOUT_S = 5400


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
    # The extractor's range queue (parallel backfill) and its dead-letter queue.
    range_queue_url: str = ""
    range_queue_arn: str = ""
    range_dlq_url: str = ""
    range_dlq_arn: str = ""


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

    range_dlq_url = sqs.create_queue(QueueName=f"{bucket}-extract-ranges-dlq")["QueueUrl"]
    range_dlq_arn = _queue_arn(sqs, range_dlq_url)
    range_redrive = {"deadLetterTargetArn": range_dlq_arn, "maxReceiveCount": str(max_receive_count)}
    range_queue_url = sqs.create_queue(
        QueueName=f"{bucket}-extract-ranges",
        Attributes={
            "VisibilityTimeout": str(RANGE_VISIBILITY_TIMEOUT_S),
            "RedrivePolicy": json.dumps(range_redrive),
        },
    )["QueueUrl"]

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
        range_queue_url=range_queue_url,
        range_queue_arn=_queue_arn(sqs, range_queue_url),
        range_dlq_url=range_dlq_url,
        range_dlq_arn=range_dlq_arn,
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
    template = load_template(template_path)
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
    return TemplateResolver(parameters).text(value)


def load_template(template_path: Path) -> Mapping[str, Any]:
    """``template_path`` parsed, with the short intrinsic tags in their long form.

    A stack start reads the template four times and parsing takes ~0.2 s each, so the parse is
    kept per text; every caller gets its own copy, free to change."""
    text = template_path.read_text(encoding="utf-8")
    template = _parsed_templates.get(text)
    if template is None:
        template = yaml.load(text, Loader=_CloudFormationLoader)  # noqa: S506 - a SafeLoader subclass
        if not isinstance(template, Mapping):
            raise ConfigError([f"{template_path} is not a CloudFormation template"])
        _parsed_templates[text] = template
    return copy.deepcopy(template)


_parsed_templates: dict[str, Mapping[str, Any]] = {}


class Unresolvable(Exception):
    """A template value needs something only CloudFormation knows (or the caller did not give)."""


class _NoValue:
    """``AWS::NoValue``: the property or list item is dropped."""


NO_VALUE = _NoValue()


class TemplateResolver:
    """Resolves CloudFormation intrinsics in a template value, the way a deployment would.

    ``references`` answers ``Ref`` (parameters, pseudo parameters such as ``AWS::Region``,
    and resources whose physical ids the caller knows, e.g. ``StageBucket`` -> bucket name);
    a CommaDelimitedList parameter is a list. ``attributes`` answers ``Fn::GetAtt`` and
    ``${Resource.Attribute}`` in ``Fn::Sub`` (``"StageBucket.Arn"``). ``conditions`` are the
    template's ``Conditions``, evaluated on demand for ``Fn::If``; ``mappings`` its ``Mappings``,
    for ``Fn::FindInMap``.
    """

    def __init__(
        self,
        references: Mapping[str, Any],
        *,
        attributes: Mapping[str, str] | None = None,
        conditions: Mapping[str, Any] | None = None,
        mappings: Mapping[str, Any] | None = None,
    ) -> None:
        self.references = references
        self.attributes = attributes or {}
        self.conditions = conditions or {}
        self.mappings = mappings or {}

    def text(self, value: Any) -> str | None:
        """``value`` as text, or None when it cannot be resolved to one."""
        try:
            resolved = self.resolve(value)
        except Unresolvable:
            return None
        if isinstance(resolved, bool):
            return "true" if resolved else "false"
        return str(resolved) if isinstance(resolved, str | int | float) else None

    def resolve(self, value: Any) -> Any:
        """``value`` with every intrinsic replaced; ``NO_VALUE`` items are removed from lists and maps."""
        if isinstance(value, list):
            items = [self.resolve(item) for item in value]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(value, Mapping):
            return value
        if len(value) == 1:
            ((function, argument),) = value.items()
            if function == "Ref" or str(function).startswith("Fn::") or function == "Condition":
                return self._intrinsic(str(function), argument)
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def condition(self, name: str) -> bool:
        if name not in self.conditions:
            raise Unresolvable(f"no condition {name}")
        return bool(self.resolve(self.conditions[name]))

    def _intrinsic(self, function: str, argument: Any) -> Any:
        if function == "Ref":
            if argument == "AWS::NoValue":
                return NO_VALUE
            if argument not in self.references:
                raise Unresolvable(f"Ref {argument}")
            return self.references[argument]
        if function == "Fn::GetAtt":
            name = ".".join(argument) if isinstance(argument, list) else str(argument)
            if name not in self.attributes:
                raise Unresolvable(f"GetAtt {name}")
            return self.attributes[name]
        if function == "Fn::Sub":
            return self._sub(argument)
        if function == "Fn::Join":
            separator, parts = argument
            resolved = self.resolve(parts)
            return str(separator).join(str(part) for part in resolved)
        if function == "Fn::Split":
            separator, text = argument
            return str(self.resolve(text)).split(str(separator))
        if function == "Fn::Select":
            index, items = argument
            return self.resolve(items)[int(self.resolve(index))]
        if function == "Fn::FindInMap":
            mapping, key, attribute = (str(self.resolve(part)) for part in argument)
            try:
                return self.mappings[mapping][key][attribute]
            except (KeyError, TypeError):
                raise Unresolvable(f"FindInMap {mapping}.{key}.{attribute}") from None
        if function == "Fn::If":
            name, if_true, if_false = argument
            return self.resolve(if_true if self.condition(str(name)) else if_false)
        if function == "Condition":
            return self.condition(str(argument))
        if function == "Fn::Equals":
            left, right = (self.resolve(item) for item in argument)
            return _comparable(left) == _comparable(right)
        if function == "Fn::Not":
            return not self.resolve(argument[0])
        if function == "Fn::And":
            return all(self.resolve(item) for item in argument)
        if function == "Fn::Or":
            return any(self.resolve(item) for item in argument)
        raise Unresolvable(function)

    def _sub(self, argument: Any) -> str:
        text, variables = (argument, {}) if isinstance(argument, str) else (argument[0], argument[1])
        local = {name: self.resolve(item) for name, item in variables.items()}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in local:
                return str(local[name])
            if name in self.references:
                return str(self.references[name])
            if name in self.attributes:
                return self.attributes[name]
            raise Unresolvable(f"Sub ${{{name}}}")

        return _SUB_PLACEHOLDER.sub(replace, str(text))


def _comparable(value: Any) -> Any:
    # CloudFormation compares a CommaDelimitedList's joined text with a string in Fn::Equals.
    return ",".join(str(item) for item in value) if isinstance(value, list) else str(value)


def template_references(template: Mapping[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
    """Every parameter's value: ``values`` first, then the template's ``Default``.

    A CommaDelimitedList parameter becomes a list, as ``Ref`` gives it in CloudFormation.
    A parameter with neither is left out (a ``Ref`` to it is Unresolvable).
    """
    references: dict[str, Any] = {}
    for name, spec in (template.get("Parameters") or {}).items():
        if not isinstance(spec, Mapping):
            continue
        if name in values:
            raw: Any = values[name]
        elif "Default" in spec:
            raw = spec["Default"]
        else:
            continue
        if spec.get("Type") == "CommaDelimitedList":
            references[str(name)] = [item.strip() for item in str(raw).split(",")]
        else:
            references[str(name)] = str(raw)
    return references
