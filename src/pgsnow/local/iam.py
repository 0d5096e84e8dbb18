"""The functions' IAM roles, read from ``template.yaml`` and created in the local moto server.

The template is the only source: each function's SAM inline ``Policies: - Statement: [...]``
and the ``SnowflakeStorageRole``'s policies are resolved the way CloudFormation would (``!Ref``
to parameters and to the staging bucket and queues, ``!GetAtt StageBucket.Arn``, ``!Sub``,
pseudo parameters, ``!If`` on the template's Conditions, ``AWS::NoValue``) with the values the
local stack passes, and put into moto as one role per function. A handler then runs with
temporary credentials of its role (``role_session``), which botocore refreshes before they
expire, so locally a call the template does not allow is refused as it would be deployed.

Trust: deployed, a function's role trusts ``lambda.amazonaws.com``. moto's AssumeRole checks
the trust policy's ``Principal.AWS`` against the caller, and nothing local can call as the
Lambda service, so locally each function role trusts the local administrator, which stands in
for the Lambda service when it assumes the role. The roles' *permissions* are the template's.

Why not deploy the SAM-transformed template into moto's CloudFormation (the strongest form):
see docs/local-fidelity.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.credentials import RefreshableCredentials
from botocore.session import get_session

from pgsnow.config import Component
from pgsnow.errors import ConfigError
from pgsnow.local.aws import (
    REPO_TEMPLATE,
    LocalAws,
    LocalSession,
    StagingResources,
    TemplateResolver,
    Unresolvable,
    load_template,
    template_references,
)

FUNCTION_RESOURCES: Mapping[Component, str] = {
    Component.EXTRACTOR: "ExtractorFunction",
    Component.LOADER: "LoaderFunction",
    Component.CLEANUP: "CleanupFunction",
    # Conditional in the template (ChangeCaptureEnabled); locally its role always exists, so the
    # drain runs under the template's permissions whenever a test or `pgsnow demo --cdc` runs it.
    Component.CHANGE_CAPTURE: "ChangeCaptureFunction",
}
STORAGE_ROLE_RESOURCE = "SnowflakeStorageRole"
# moto's one account; a deployment's AWS::AccountId.
LOCAL_ACCOUNT_ID = "123456789012"
LOCAL_PARTITION = "aws"
# Placeholders for the template's required parameters the local stack has no real value for
# (the functions locally read PGSNOW_PG_DSN and SNOWFLAKE_PASSWORD, not secrets).
LOCAL_SECRET_ARN = f"arn:aws:secretsmanager:us-east-1:{LOCAL_ACCOUNT_ID}:secret:pgsnow-local-unused-AbCdEf"
ROLE_SESSION_SECONDS = 3600


@dataclass(frozen=True)
class FunctionRole:
    """One function's local role: its name, ARN and the statements the template gives it."""

    component: Component
    name: str
    arn: str
    statements: tuple[dict[str, Any], ...]


def stack_parameters(resources: StagingResources, **overrides: str) -> dict[str, str]:
    """Template parameter values matching a local stack's staging resources."""
    return {
        "AppName": "pgsnow",
        "Environment": "local",
        "S3StagePrefix": resources.prefix,
        "PostgresSecretArn": LOCAL_SECRET_ARN,
        "SnowflakeSecretArn": LOCAL_SECRET_ARN,
        "SnowflakeDatabase": "PGSNOW_DEMO",
        "ReplicatedTables": "*.*",
        "ExtractSchedules": "",
        **overrides,
    }


def template_resolver(
    template: Mapping[str, Any],
    parameters: Mapping[str, str],
    *,
    resources: StagingResources | None = None,
    region: str = "us-east-1",
) -> TemplateResolver:
    """A resolver for ``template`` with these parameter values and the stack's bucket and queues."""
    references: dict[str, Any] = {
        **template_references(template, parameters),
        "AWS::Region": region,
        "AWS::AccountId": LOCAL_ACCOUNT_ID,
        "AWS::Partition": LOCAL_PARTITION,
        "AWS::StackName": "pgsnow-local",
    }
    attributes: dict[str, str] = {}
    if resources is not None:
        bucket_arn = f"arn:{LOCAL_PARTITION}:s3:::{resources.bucket}"
        references.update(
            StageBucket=resources.bucket,
            StageQueue=resources.queue_url,
            StageDeadLetterQueue=resources.dlq_url,
        )
        attributes.update(
            {
                "StageBucket.Arn": bucket_arn,
                "StageQueue.Arn": resources.queue_arn,
                "StageQueue.QueueName": resources.queue_url.rsplit("/", 1)[-1],
                "StageDeadLetterQueue.Arn": resources.dlq_arn,
                "StageDeadLetterQueue.QueueName": resources.dlq_url.rsplit("/", 1)[-1],
            }
        )
        if resources.range_queue_url:
            references.update(
                ExtractRangeQueue=resources.range_queue_url,
                ExtractRangeDeadLetterQueue=resources.range_dlq_url,
            )
            attributes.update(
                {
                    "ExtractRangeQueue.Arn": resources.range_queue_arn,
                    "ExtractRangeQueue.QueueName": resources.range_queue_url.rsplit("/", 1)[-1],
                    "ExtractRangeDeadLetterQueue.Arn": resources.range_dlq_arn,
                }
            )
    return TemplateResolver(
        references,
        attributes=attributes,
        conditions=template.get("Conditions") or {},
        mappings=template.get("Mappings") or {},
    )


def function_statements(
    template: Mapping[str, Any], component: Component, resolver: TemplateResolver
) -> tuple[dict[str, Any], ...]:
    """The resolved inline policy statements of ``component``'s function in ``template``.

    Only SAM's inline form (``Policies: - Statement: [...]``) is understood; a policy template,
    a managed policy name or an unresolvable value is a ConfigError naming the function, so the
    local role can never be quietly wider or narrower than the deployed one.
    """
    logical_id = FUNCTION_RESOURCES[component]
    resource = (template.get("Resources") or {}).get(logical_id)
    if not isinstance(resource, Mapping):
        raise ConfigError([f"the template has no {logical_id}"])
    policies = (resource.get("Properties") or {}).get("Policies") or []
    statements: list[dict[str, Any]] = []
    for policy in policies if isinstance(policies, list) else [policies]:
        if not isinstance(policy, Mapping) or set(policy) - {"Statement", "Version"}:
            raise ConfigError(
                [f"{logical_id}: only inline policy statements are supported locally, got {policy!r}"]
            )
        try:
            resolved = resolver.resolve(policy["Statement"])
        except (Unresolvable, KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError([f"{logical_id}: cannot resolve its policy locally ({exc})"]) from exc
        statements += resolved if isinstance(resolved, list) else [resolved]
    if not statements:
        raise ConfigError([f"{logical_id} has no policy statements"])
    return tuple(statements)


def storage_role_policies(
    template: Mapping[str, Any], resolver: TemplateResolver
) -> dict[str, dict[str, Any]]:
    """The resolved ``Policies`` of the template's ``SnowflakeStorageRole``, by policy name."""
    resource = (template.get("Resources") or {}).get(STORAGE_ROLE_RESOURCE)
    if not isinstance(resource, Mapping):
        raise ConfigError([f"the template has no {STORAGE_ROLE_RESOURCE}"])
    try:
        policies = resolver.resolve((resource.get("Properties") or {}).get("Policies") or [])
    except (Unresolvable, TypeError, ValueError, IndexError) as exc:
        raise ConfigError([f"{STORAGE_ROLE_RESOURCE}: cannot resolve its policies locally ({exc})"]) from exc
    return {str(policy["PolicyName"]): dict(policy["PolicyDocument"]) for policy in policies}


def storage_role_name(template: Mapping[str, Any], resolver: TemplateResolver) -> str:
    resource = (template.get("Resources") or {}).get(STORAGE_ROLE_RESOURCE) or {}
    name = resolver.text((resource.get("Properties") or {}).get("RoleName"))
    if not name:
        raise ConfigError([f"{STORAGE_ROLE_RESOURCE}: cannot resolve its RoleName locally"])
    return name


def create_function_roles(
    admin_aws: LocalAws,
    resources: StagingResources,
    *,
    template_path: Path | None = None,
    parameters: Mapping[str, str] | None = None,
) -> dict[Component, FunctionRole]:
    """One role per function with the template's statements, trusted by the local administrator."""
    template = load_template(template_path or REPO_TEMPLATE)
    resolver = template_resolver(
        template, parameters or stack_parameters(resources), resources=resources, region=admin_aws.region
    )
    iam = admin_aws.client("iam")
    trust = _trust_policy(admin_aws.admin_user_arn)
    roles: dict[Component, FunctionRole] = {}
    for component in FUNCTION_RESOURCES:
        statements = function_statements(template, component, resolver)
        # Bucket-scoped names: several stacks share one moto server in the tests.
        name = f"{resources.bucket}-{component.value}"[:64]
        arn = str(iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"])
        iam.put_role_policy(
            RoleName=name,
            PolicyName="template-inline",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": list(statements)}),
        )
        roles[component] = FunctionRole(component, name, arn, statements)
    return roles


def role_session(admin_aws: LocalAws, role_arn: str, session_name: str) -> LocalSession:
    """A session with the role's temporary credentials, refreshed by botocore before they expire.

    The handlers run in this process for a long time (``pgsnow local up``), longer than one
    set of temporary credentials lasts, so the credentials refresh themselves by assuming the
    role again as the local administrator.
    """
    sts = admin_aws.client("sts")

    def assume() -> dict[str, str]:
        credentials = sts.assume_role(
            RoleArn=role_arn, RoleSessionName=session_name, DurationSeconds=ROLE_SESSION_SECONDS
        )["Credentials"]
        return {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": credentials["Expiration"].isoformat(),
        }

    refreshing = RefreshableCredentials.create_from_metadata(
        metadata=assume(), refresh_using=assume, method="sts-assume-role"
    )
    botocore_session = get_session()
    # botocore has no public setter for a session's credentials object; this is the attribute
    # its own credential resolver fills, and boto3's documented way to share refreshing ones.
    botocore_session._credentials = refreshing  # type: ignore[attr-defined]
    return LocalSession(
        admin_aws.endpoint_url, botocore_session=botocore_session, region_name=admin_aws.region
    )


# --------------------------------------------------------------------------- Snowflake's side


@dataclass(frozen=True)
class IamUser:
    """An IAM user with an access key (the local stand-in for Snowflake's STORAGE_AWS_IAM_USER_ARN)."""

    name: str
    arn: str
    access_key_id: str
    secret_access_key: str

    def session(self, admin_aws: LocalAws) -> boto3.Session:
        return LocalSession(
            admin_aws.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=admin_aws.region,
        )


def create_snowflake_user(admin_aws: LocalAws, name: str = "pgsnow-local-snowflake") -> IamUser:
    """The IAM user Snowflake's storage integration acts as: it may only ``sts:AssumeRole``."""
    iam = admin_aws.client("iam")
    arn = str(iam.create_user(UserName=name)["User"]["Arn"])
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}],
    }
    iam.put_user_policy(UserName=name, PolicyName="assume-storage-roles", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return IamUser(name, arn, str(key["AccessKeyId"]), str(key["SecretAccessKey"]))


def expected_storage_role_arn(
    admin_aws: LocalAws,
    resources: StagingResources,
    *,
    params: Mapping[str, str],
    template_path: Path | None = None,
) -> str:
    """The ARN ``create_storage_role`` will give the template's storage role (its name is fixed by
    the template, so the integration can name it before the role exists, as deployed)."""
    template = load_template(template_path or REPO_TEMPLATE)
    resolver = template_resolver(
        template, {**stack_parameters(resources), **params}, resources=resources, region=admin_aws.region
    )
    return f"arn:{LOCAL_PARTITION}:iam::{LOCAL_ACCOUNT_ID}:role/{storage_role_name(template, resolver)}"


def create_storage_role(
    admin_aws: LocalAws,
    *,
    iam_user_arn: str,
    external_id: str,
    params: Mapping[str, str],
    resources: StagingResources | None = None,
    template_path: Path | None = None,
) -> str:
    """The template's ``SnowflakeStorageRole`` in moto; its ARN.

    ``params`` are template parameter values (with ``resources``, they override the local stack's,
    ``stack_parameters``; without, the staging bucket's name is ``params["StageBucketName"]``). The trust
    policy is the template's, resolved with ``SnowflakeIamUserArn=iam_user_arn`` and
    ``SnowflakeExternalId=external_id``: moto checks both the principal and, when the caller
    sends one, the ``sts:ExternalId`` (StringEquals).
    """
    template = load_template(template_path or REPO_TEMPLATE)
    defaults = stack_parameters(resources) if resources is not None else {}
    values = {**defaults, **params, "SnowflakeIamUserArn": iam_user_arn, "SnowflakeExternalId": external_id}
    resolver = template_resolver(template, values, resources=resources, region=admin_aws.region)
    if resources is None:
        bucket = params.get("StageBucketName")
        if not bucket:
            raise ConfigError(["create_storage_role needs resources or params['StageBucketName']"])
        resolver.references = {**resolver.references, "StageBucket": bucket}
        resolver.attributes = {"StageBucket.Arn": f"arn:{LOCAL_PARTITION}:s3:::{bucket}"}
    resource = (template.get("Resources") or {}).get(STORAGE_ROLE_RESOURCE)
    if not isinstance(resource, Mapping):
        raise ConfigError([f"the template has no {STORAGE_ROLE_RESOURCE}"])
    # The template creates the role only under its condition (both trust parameters set).
    condition = resource.get("Condition")
    if condition is not None and not resolver.condition(str(condition)):
        raise ConfigError([f"{STORAGE_ROLE_RESOURCE}'s condition {condition} is false for these parameters"])
    try:
        trust = resolver.resolve(resource["Properties"]["AssumeRolePolicyDocument"])
    except Unresolvable as exc:
        raise ConfigError([f"{STORAGE_ROLE_RESOURCE}: cannot resolve its trust policy ({exc})"]) from exc
    name = storage_role_name(template, resolver)
    iam = admin_aws.client("iam")
    arn = str(iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"])
    for policy_name, document in storage_role_policies(template, resolver).items():
        iam.put_role_policy(RoleName=name, PolicyName=policy_name, PolicyDocument=json.dumps(document))
    return arn


def _trust_policy(principal_arn: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": principal_arn}, "Action": "sts:AssumeRole"}],
    }
