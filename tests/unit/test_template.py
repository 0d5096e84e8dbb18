"""template.yaml, translated offline by the SAM translator, and linted by cfn-lint.

The translator runs with a fixed region and an empty managed-policy map, so it needs no
AWS credentials or network. Assertions read the translated CloudFormation, i.e. what
would actually be deployed, and cross-check the template against pgsnow's own contracts
(config env var names and enums, key layout).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator
from samtranslator.yaml_helper import yaml_parse

from pgsnow.config import CleanupMode, Component, Settings, StagedFormat
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, manifest_key

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO / "template.yaml"
REGION = "us-east-1"
ACCOUNT = "123456789012"
PARAMETERS = {
    "Environment": "dev",
    "S3StagePrefix": "staging",
    "ReplicatedTables": "public.customers,public.orders",
    "PostgresSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:pgsnow/dev/postgres-AbCdEf",
    "SnowflakeSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:pgsnow/dev/snowflake-AbCdEf",
    "SnowflakeDatabase": "PGSNOW_DEV",
    "SnowflakeStorageIntegration": "PGSNOW_DEV_S3",
    "SnowflakeIamUserArn": f"arn:aws:iam::{ACCOUNT}:user/abc1-s-v2st1234",
    "SnowflakeExternalId": "AB12345_SFCRole=2_abcdefghijklmnopqrstuvwxyz0=",
}
FUNCTIONS = ("ExtractorFunction", "LoaderFunction", "CleanupFunction")
ENV_VAR_NAMES = {
    "S3_STAGE_BUCKET",
    "S3_STAGE_PREFIX",
    "S3_FILE_FORMAT",
    "SNOWFLAKE_STORAGE_INTEGRATION",
    "CLEANUP_S3_FILES",
    "PGSNOW_TABLES",
    "SNOWFLAKE_SECRET_ARN",
    "PGSNOW_PG_SECRET_ARN",
    "SNOWFLAKE_DATABASE",
}
DATA_SUFFIXES = {".csv.gz", ".csv", ".parquet"}


@pytest.fixture(scope="module")
def sam_template() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml_parse(TEMPLATE_PATH.read_text(encoding="utf-8"))
    return parsed


@pytest.fixture(scope="module")
def cfn(sam_template: dict[str, Any]) -> dict[str, Any]:
    """The CloudFormation the SAM transform produces, computed offline."""
    # Like `sam package`: local CodeUri folders become S3 locations before the transform.
    packaged = copy.deepcopy(sam_template)
    for function in FUNCTIONS:
        code_uri = packaged["Resources"][function]["Properties"]["CodeUri"]
        packaged["Resources"][function]["Properties"]["CodeUri"] = f"s3://artifacts/{code_uri.strip('/')}.zip"
    translator = Translator(
        managed_policy_map={},  # no iam:ListPolicies call
        sam_parser=Parser(),
        boto_session=boto3.Session(region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"),
    )
    translated: dict[str, Any] = translator.translate(
        sam_template=packaged,
        parameter_values=dict(PARAMETERS),
        get_managed_policy_map=lambda: {},
    )
    return translated


def resources_of_type(cfn: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in cfn["Resources"].items() if r["Type"] == resource_type}


def properties(cfn: dict[str, Any], logical_id: str) -> dict[str, Any]:
    props: dict[str, Any] = cfn["Resources"][logical_id]["Properties"]
    return props


def resolve_sub(value: Any, variables: dict[str, str]) -> str:
    """Resolve the simple ``Fn::Sub`` strings this template uses, with the given variables."""
    if isinstance(value, str):
        return value
    text = value["Fn::Sub"]
    for name, replacement in variables.items():
        text = text.replace("${" + name + "}", replacement)
    assert "${" not in text, f"unresolved variable in {text!r}"
    return str(text)


def iam_statements(cfn: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every inline IAM policy statement of every role the stack creates."""
    for role_name, role in resources_of_type(cfn, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                yield role_name, statement


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------- staging bucket


def test_bucket_is_encrypted_with_aes256(cfn: dict[str, Any]) -> None:
    rules = properties(cfn, "StageBucket")["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert [r["ServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in rules] == ["AES256"]


def test_bucket_versioning_is_enabled(cfn: dict[str, Any]) -> None:
    assert properties(cfn, "StageBucket")["VersioningConfiguration"] == {"Status": "Enabled"}


@pytest.mark.parametrize(
    "setting", ["BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"]
)
def test_bucket_blocks_public_access(cfn: dict[str, Any], setting: str) -> None:
    assert properties(cfn, "StageBucket")["PublicAccessBlockConfiguration"][setting] is True


def test_bucket_policy_denies_requests_without_tls(cfn: dict[str, Any]) -> None:
    (policy,) = resources_of_type(cfn, "AWS::S3::BucketPolicy").values()
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    denials = [
        s
        for s in statements
        if s["Effect"] == "Deny"
        and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
    ]
    assert len(denials) == 1
    (deny,) = denials
    assert deny["Principal"] == "*"
    assert deny["Action"] == "s3:*"
    assert deny["Resource"] == [
        {"Fn::GetAtt": ["StageBucket", "Arn"]},
        {"Fn::Sub": "${StageBucket.Arn}/*"},
    ]


def test_lifecycle_expires_objects_noncurrent_versions_and_uploads(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    (rule,) = properties(cfn, "StageBucket")["LifecycleConfiguration"]["Rules"]
    assert rule["Status"] == "Enabled"
    assert "Prefix" not in rule
    assert "Filter" not in rule  # applies to the whole bucket, manifests included
    assert rule["ExpirationInDays"] == {"Ref": "S3StageRetentionDays"}
    assert sam_template["Parameters"]["S3StageRetentionDays"]["Default"] == 7
    assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] >= 1
    assert rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1


def queue_notification_filters(cfn: dict[str, Any]) -> list[tuple[str, str]]:
    """(prefix, suffix) of each QueueConfiguration, with the prefix parameter resolved."""
    configurations = properties(cfn, "StageBucket")["NotificationConfiguration"]["QueueConfigurations"]
    filters = []
    for configuration in configurations:
        assert configuration["Event"] == "s3:ObjectCreated:*"
        assert configuration["Queue"] == {"Fn::GetAtt": ["StageQueue", "Arn"]}
        rules = {r["Name"]: r["Value"] for r in configuration["Filter"]["S3Key"]["Rules"]}
        assert set(rules) == {"prefix", "suffix"}
        prefix = resolve_sub(rules["prefix"], {"S3StagePrefix": PARAMETERS["S3StagePrefix"]})
        filters.append((prefix, rules["suffix"]))
    return filters


def test_notification_has_one_configuration_per_data_suffix(cfn: dict[str, Any]) -> None:
    filters = queue_notification_filters(cfn)
    assert sorted(suffix for _, suffix in filters) == sorted(DATA_SUFFIXES)
    assert {prefix for prefix, _ in filters} == {"staging/"}


def notifies(cfn: dict[str, Any], key: str) -> bool:
    return any(
        key.startswith(prefix) and key.endswith(suffix) for prefix, suffix in queue_notification_filters(cfn)
    )


CUSTOMERS = TableRef("public", "customers")
RUN_ID = "20261125T120000000000Z"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param(data_key("staging", CUSTOMERS, 1, RUN_ID, FileFormat.CSV), True, id="extractor-csv-gz"),
        pytest.param(
            data_key("staging", CUSTOMERS, 2, RUN_ID, FileFormat.PARQUET), True, id="extractor-parquet"
        ),
        pytest.param("staging/public/customers/dropped by hand.csv", True, id="hand-dropped-plain-csv"),
        pytest.param(manifest_key(CUSTOMERS, RUN_ID), False, id="manifest-json"),
        pytest.param("staging/public/customers/notes.txt", False, id="other-suffix"),
        pytest.param("elsewhere/public/customers/x.csv.gz", False, id="outside-prefix"),
    ],
)
def test_notification_covers_data_files_only(cfn: dict[str, Any], key: str, expected: bool) -> None:
    assert notifies(cfn, key) is expected


def test_queue_policy_names_the_bucket_without_a_reference_cycle(cfn: dict[str, Any]) -> None:
    # Given the bucket's fixed name and the queue policy's source ARN condition
    variables = {
        "Environment": PARAMETERS["Environment"],
        "AWS::AccountId": ACCOUNT,
        "AWS::Region": REGION,
        "AWS::Partition": "aws",
    }
    bucket_name = resolve_sub(properties(cfn, "StageBucket")["BucketName"], variables)
    (statement,) = [
        s
        for s in properties(cfn, "StageQueuePolicy")["PolicyDocument"]["Statement"]
        if s["Effect"] == "Allow"
    ]
    # Then the policy lets exactly that bucket send, and the bucket waits for the policy
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    source_arn = resolve_sub(statement["Condition"]["ArnEquals"]["aws:SourceArn"], variables)
    assert source_arn == f"arn:aws:s3:::{bucket_name}"
    assert "StageQueuePolicy" in as_list(cfn["Resources"]["StageBucket"]["DependsOn"])
    assert len(bucket_name) <= 63


# ---------------------------------------------------------------- queues


def test_queue_redrives_to_the_dead_letter_queue_after_five_receives(cfn: dict[str, Any]) -> None:
    redrive = properties(cfn, "StageQueue")["RedrivePolicy"]
    assert redrive == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["StageDeadLetterQueue", "Arn"]},
        "maxReceiveCount": 5,
    }


@pytest.mark.parametrize("queue", ["StageQueue", "StageDeadLetterQueue"])
def test_queues_are_encrypted(cfn: dict[str, Any], queue: str) -> None:
    assert properties(cfn, queue)["SqsManagedSseEnabled"] is True


def test_visibility_timeout_is_at_least_six_loader_timeouts(cfn: dict[str, Any]) -> None:
    loader_timeout = properties(cfn, "LoaderFunction")["Timeout"]
    assert properties(cfn, "StageQueue")["VisibilityTimeout"] >= 6 * loader_timeout


def test_loader_reports_partial_batch_failures_from_the_stage_queue(cfn: dict[str, Any]) -> None:
    mappings = resources_of_type(cfn, "AWS::Lambda::EventSourceMapping").values()
    (mapping,) = [m for m in mappings if m["Properties"]["FunctionName"] == {"Ref": "LoaderFunction"}]
    assert mapping["Properties"]["EventSourceArn"] == {"Fn::GetAtt": ["StageQueue", "Arn"]}
    assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


# ---------------------------------------------------------------- functions


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_runtime_and_build(cfn: dict[str, Any], sam_template: dict[str, Any], function: str) -> None:
    props = properties(cfn, function)
    assert props["Runtime"] == "python3.12"
    assert props["Architectures"] == ["x86_64"]
    assert props["Handler"] == "app.handler"
    metadata = sam_template["Resources"][function]["Metadata"]
    assert metadata["BuildMethod"] == "makefile"
    code_uri = sam_template["Resources"][function]["Properties"]["CodeUri"]
    assert (REPO / code_uri).resolve() != REPO  # never the repo root: SAM would copy .venv


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_environment_names(cfn: dict[str, Any], function: str) -> None:
    variables = properties(cfn, function)["Environment"]["Variables"]
    assert set(variables) >= ENV_VAR_NAMES


COMPONENTS = {
    "ExtractorFunction": Component.EXTRACTOR,
    "LoaderFunction": Component.LOADER,
    "CleanupFunction": Component.CLEANUP,
}


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_environment_satisfies_settings(cfn: dict[str, Any], function: str) -> None:
    # Given the function's environment with parameters and the bucket name filled in
    def value(raw: Any) -> str:
        if isinstance(raw, str):
            return raw
        ref = raw["Ref"]
        return (
            "pgsnow-dev-stage-123456789012-us-east-1"
            if ref == "StageBucket"
            else str(PARAMETERS.get(ref, ""))
        )

    defaults = {"S3FileFormat": "csv", "CleanupS3Files": "after_all"}
    environment = {
        name: (defaults[raw["Ref"]] if isinstance(raw, dict) and raw["Ref"] in defaults else value(raw))
        for name, raw in properties(cfn, function)["Environment"]["Variables"].items()
    }
    # When the function's settings are built from it
    settings = Settings.from_env(environment, component=COMPONENTS[function])
    # Then the names mean what pgsnow.config reads
    assert settings.bucket == "pgsnow-dev-stage-123456789012-us-east-1"
    assert settings.prefix == "staging"
    assert settings.postgres.secret_arn == PARAMETERS["PostgresSecretArn"]
    assert settings.snowflake.secret_arn == PARAMETERS["SnowflakeSecretArn"]
    assert settings.snowflake.database == "PGSNOW_DEV"
    assert settings.tables.tables == {CUSTOMERS, TableRef("public", "orders")}


@pytest.mark.parametrize(
    ("parameter", "accepted"),
    [
        pytest.param("S3FileFormat", {f.value for f in StagedFormat}, id="file-format"),
        pytest.param("CleanupS3Files", {m.value for m in CleanupMode} | {"true", "false"}, id="cleanup-mode"),
    ],
)
def test_parameter_choices_match_settings(
    sam_template: dict[str, Any], parameter: str, accepted: set[str]
) -> None:
    assert set(sam_template["Parameters"][parameter]["AllowedValues"]) == accepted


def test_cleanup_runs_on_a_schedule(cfn: dict[str, Any]) -> None:
    rules = resources_of_type(cfn, "AWS::Events::Rule").values()
    targets = [t for r in rules for t in r["Properties"]["Targets"]]
    assert {"Fn::GetAtt": ["CleanupFunction", "Arn"]} in [t["Arn"] for t in targets]


# ---------------------------------------------------------------- IAM


def test_no_wildcard_resource_in_inline_policies(cfn: dict[str, Any]) -> None:
    offenders = [
        (role, statement.get("Sid"))
        for role, statement in iam_statements(cfn)
        if "*" in as_list(statement.get("Resource"))
    ]
    assert offenders == []
    assert len(list(iam_statements(cfn))) >= 10


@pytest.mark.parametrize(
    ("role", "secret_parameter"),
    [
        pytest.param("ExtractorFunctionRole", "PostgresSecretArn", id="extractor-postgres"),
        pytest.param("LoaderFunctionRole", "SnowflakeSecretArn", id="loader-snowflake"),
        pytest.param("CleanupFunctionRole", "SnowflakeSecretArn", id="cleanup-snowflake"),
    ],
)
def test_each_function_reads_only_its_secret(cfn: dict[str, Any], role: str, secret_parameter: str) -> None:
    secret_resources = [
        statement["Resource"]
        for role_name, statement in iam_statements(cfn)
        if role_name == role and "secretsmanager:GetSecretValue" in as_list(statement["Action"])
    ]
    assert secret_resources == [{"Ref": secret_parameter}]


def test_only_the_extractor_gets_postgres_and_no_function_deletes_outside_stage(cfn: dict[str, Any]) -> None:
    for role, statement in iam_statements(cfn):
        actions = as_list(statement["Action"])
        if "s3:DeleteObject" in actions:
            assert role == "CleanupFunctionRole"
            assert statement["Resource"] == [
                {"Fn::Sub": "${StageBucket.Arn}/${S3StagePrefix}/*"},
                {"Fn::Sub": "${StageBucket.Arn}/_pgsnow/*"},
            ]


def test_snowflake_role_trusts_the_integration_user_with_external_id(cfn: dict[str, Any]) -> None:
    role = cfn["Resources"]["SnowflakeStorageRole"]
    assert role["Condition"] == "HasSnowflakeTrust"
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"AWS": {"Ref": "SnowflakeIamUserArn"}}
    assert trust["Action"] == "sts:AssumeRole"
    assert trust["Condition"] == {"StringEquals": {"sts:ExternalId": {"Ref": "SnowflakeExternalId"}}}


def test_snowflake_role_is_read_only_on_the_staging_prefix(cfn: dict[str, Any]) -> None:
    statements = [s for role, s in iam_statements(cfn) if role == "SnowflakeStorageRole"]
    actions = {a for s in statements for a in as_list(s["Action"])}
    assert actions == {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:GetBucketLocation"}
    (read,) = [s for s in statements if "s3:GetObject" in as_list(s["Action"])]
    assert read["Resource"] == {"Fn::Sub": "${StageBucket.Arn}/${S3StagePrefix}/*"}


def test_snowflake_trust_condition_needs_both_parameters(sam_template: dict[str, Any]) -> None:
    condition = sam_template["Conditions"]["HasSnowflakeTrust"]["Fn::And"]
    referenced = {c["Fn::Not"][0]["Fn::Equals"][0]["Ref"] for c in condition}
    assert referenced == {"SnowflakeIamUserArn", "SnowflakeExternalId"}


@pytest.mark.parametrize(
    "output",
    [
        "StageBucketName",
        "StageQueueUrl",
        "StageQueueArn",
        "StageDeadLetterQueueArn",
        "ExtractorFunctionArn",
        "LoaderFunctionArn",
        "CleanupFunctionArn",
        "SnowflakeStorageRoleArn",
    ],
)
def test_outputs(cfn: dict[str, Any], output: str) -> None:
    assert "Value" in cfn["Outputs"][output]


# ---------------------------------------------------------------- linters


def test_cfn_lint_is_clean() -> None:
    cfn_lint = shutil.which("cfn-lint", path=str(Path(sys.executable).parent)) or shutil.which("cfn-lint")
    assert cfn_lint is not None, "cfn-lint is a dev dependency"
    result = subprocess.run(
        [cfn_lint, "--", str(TEMPLATE_PATH)], capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- samconfig.toml


def samconfig_overrides(environment: str) -> dict[str, str]:
    config = tomllib.loads((REPO / "samconfig.toml").read_text(encoding="utf-8"))
    overrides = config[environment]["deploy"]["parameters"]["parameter_overrides"]
    return dict(override.split("=", 1) for override in overrides)


@pytest.mark.parametrize("environment", ["default", "prod"])
def test_samconfig_overrides_are_valid_template_parameters(
    sam_template: dict[str, Any], environment: str
) -> None:
    # Given one environment's deploy parameters
    overrides = samconfig_overrides(environment)
    parameters = sam_template["Parameters"]
    # Then every override is a parameter, every parameter without a default is set,
    # and each value passes the parameter's own constraints
    assert set(overrides) <= set(parameters)
    assert {name for name, spec in parameters.items() if "Default" not in spec} <= set(overrides)
    for name, value in overrides.items():
        spec = parameters[name]
        if "AllowedValues" in spec:
            assert value in spec["AllowedValues"], name
        if "AllowedPattern" in spec:
            assert re.fullmatch(spec["AllowedPattern"], value), name
        if spec["Type"] == "Number":
            assert spec.get("MinValue", 0) <= int(value) <= spec.get("MaxValue", int(value)), name


def test_samconfig_environments_get_separate_stacks() -> None:
    config = tomllib.loads((REPO / "samconfig.toml").read_text(encoding="utf-8"))
    stacks = {env: config[env]["global"]["parameters"]["stack_name"] for env in ("default", "prod")}
    assert len(set(stacks.values())) == 2
    assert samconfig_overrides("default")["Environment"] != samconfig_overrides("prod")["Environment"]
