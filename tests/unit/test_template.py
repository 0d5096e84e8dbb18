"""template.yaml, translated offline by the SAM translator, and linted by cfn-lint.

The translator runs with a fixed region and an empty managed-policy map, so it needs no
AWS credentials or network. Assertions read the translated CloudFormation, i.e. what
would actually be deployed, and cross-check the template against pgsnow's own contracts
(config env var names and enums, key layout).
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote_plus

import boto3
import pytest
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator
from samtranslator.yaml_helper import yaml_parse

from pgsnow.config import (
    FUNCTION_TIMEOUT_VARIABLES,
    MAX_TARGET_FILE_MB,
    CleanupMode,
    Component,
    LoadMethod,
    OnError,
    Settings,
    StagedFormat,
)
from pgsnow.extract.parquet_stager import PARQUET_GROUP_BYTES
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, key_list_key, manifest_key
from pgsnow.load.work_tables import WORK_TABLE_MAX_AGE
from pgsnow.local.aws import StagingResources
from pgsnow.local.change_capture import CHANGE_CAPTURE_MEMORY_MB, CHANGE_CAPTURE_TIMEOUT_S
from pgsnow.local.dispatcher import (
    MAX_BATCH_SIZE,
    MAX_BATCHING_WINDOW_S,
    MAX_PAYLOAD_BYTES,
    check_batching,
    lambda_sqs_record,
)
from pgsnow.local.function_env import template_environments
from pgsnow.local.iam import FUNCTION_RESOURCES, stack_parameters
from pgsnow.local.stack import LOADER_BATCH_SIZE, LOADER_BATCHING_WINDOW_S, LOADER_TIMEOUT_S
from pgsnow.snowflake.session_sql import session_setup_sql

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO / "template.yaml"
REGION = "us-east-1"
ACCOUNT = "123456789012"
PARAMETERS = {
    "AppName": "pgsnow",
    "Environment": "dev",
    "S3StagePrefix": "staging",
    "ReplicatedTables": "public.customers,public.orders",
    "ExtractSchedules": "public.customers,public.orders@rate(15 minutes)",
    "DefaultExtractSchedule": "rate(1 day)",
    "PostgresSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:pgsnow/dev/postgres-AbCdEf",
    "SnowflakeSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:pgsnow/dev/snowflake-AbCdEf",
    "SnowflakeDatabase": "PGSNOW_DEV",
    "SnowflakeStorageIntegration": "PGSNOW_DEV_S3",
    "SnowflakeIamUserArn": f"arn:aws:iam::{ACCOUNT}:user/abc1-s-v2st1234",
    "SnowflakeExternalId": "AB12345_SFCRole=2_abcdefghijklmnopqrstuvwxyz0=",
}
FUNCTIONS = ("ExtractorFunction", "LoaderFunction", "CleanupFunction")
CHANGE_CAPTURE = "ChangeCaptureFunction"  # conditional (ChangeCaptureEnabled); tested on its own below
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
    "SNOWFLAKE_CONTROL_SCHEMA",
    "SNOWFLAKE_STAGE",
    "PGSNOW_TABLE_OPTIONS",
    "S3_STAGE_RETENTION_DAYS",
}
# What each function reads beyond the shared variables (pgsnow.config.Settings.from_env).
FUNCTION_ENV_VAR_NAMES = {
    "ExtractorFunction": {
        "EXTRACT_TARGET_FILE_MB",
        "EXTRACT_BATCH_ROWS",
        "EXTRACT_CHUNK_ROWS",
        "EXTRACT_DEADLINE_MARGIN_S",
        "EXTRACT_MAX_WORKERS",
        "EXTRACT_RANGE_ROWS",
        "EXTRACT_RANGE_QUEUE_URL",
    },
    "LoaderFunction": {"LOAD_METHOD", "LOAD_ON_ERROR", "SNOWPIPE_NAME", "LOADER_TIMEOUT_S"},
    "CleanupFunction": {
        "CLEANUP_TIMEOUT_S",
        "CLEANUP_ARCHIVE_PREFIX",
        "CLEANUP_ORPHAN_AGE_MINUTES",
        "LOADER_QUEUE_URL",
        "LOADER_DLQ_URL",
    },
}
FUNCTION_RESOURCES_BY_ID = {logical_id: component for component, logical_id in FUNCTION_RESOURCES.items()}
STACK_ID = f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/pgsnow-dev/4f9d2c1a-7b3e-11ef-9c2d-0a1b2c3d4e5f"
BUCKET_NAME = "pgsnow-snowflake-stage-dev-4f9d2c1a"
CUSTOMERS_TABLE = TableRef("public", "customers")


@functools.cache
def template_mappings() -> dict[str, Any]:
    """template.yaml's Mappings (what Fn::FindInMap reads)."""
    mappings: dict[str, Any] = yaml_parse(TEMPLATE_PATH.read_text(encoding="utf-8"))["Mappings"]
    return mappings


def function_timeout(cfn: dict[str, Any], function: str) -> int:
    """A function's Timeout in seconds, as CloudFormation resolves it."""
    return int(evaluate(properties(cfn, function)["Timeout"]))


@pytest.fixture(scope="module")
def sam_template() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml_parse(TEMPLATE_PATH.read_text(encoding="utf-8"))
    return parsed


def substitute_loop_variable(node: Any, name: str, item: str) -> Any:
    """One Fn::ForEach iteration: ``${name}``/``&{name}`` in strings and ``Ref: name`` become the item."""
    safe_item = re.sub(r"[^A-Za-z0-9]", "", item)  # what &{} means: a logical-ID-safe form

    def text(value: str) -> str:
        return value.replace("${" + name + "}", item).replace("&{" + name + "}", safe_item)

    if isinstance(node, dict):
        if node == {"Ref": name}:
            return item
        if set(node) == {"Fn::Sub"} and isinstance(node["Fn::Sub"], str):
            substituted = text(node["Fn::Sub"])
            return substituted if "${" not in substituted else {"Fn::Sub": substituted}
        return {text(k): substitute_loop_variable(v, name, item) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_loop_variable(v, name, item) for v in node]
    return text(node) if isinstance(node, str) else node


def expand_for_each(template: dict[str, Any], parameters: dict[str, str]) -> dict[str, Any]:
    """What AWS::LanguageExtensions does to Fn::ForEach in Resources, for the shapes this template uses."""
    expanded = copy.deepcopy(template)
    resources: dict[str, Any] = {}
    for key, value in expanded["Resources"].items():
        if not key.startswith("Fn::ForEach::"):
            resources[key] = value
            continue
        name, collection, fragment = value
        items = parameters[collection["Ref"]].split(",") if isinstance(collection, dict) else collection
        for item in items:
            for logical_id, resource in substitute_loop_variable(fragment, name, item).items():
                assert logical_id not in resources, f"duplicate logical ID {logical_id}"
                resources[logical_id] = resource
    expanded["Resources"] = resources
    expanded["Transform"] = [t for t in as_list(template["Transform"]) if t != "AWS::LanguageExtensions"]
    return expanded


def evaluate(
    node: Any, parameters: dict[str, str] = PARAMETERS, conditions: dict[str, bool] | None = None
) -> Any:
    """Evaluate the intrinsic functions this template uses, as CloudFormation would at deploy time.

    Resources evaluate to stand-ins: a bucket's Ref is BUCKET_NAME, any other Ref is the
    logical ID, a GetAtt is ``arn:<logical id>``. ``Fn::If`` takes the branch ``conditions``
    (``condition_values``) says, and is left as it is without them.
    """
    pseudo = {
        "AWS::AccountId": ACCOUNT,
        "AWS::Region": REGION,
        "AWS::Partition": "aws",
        "AWS::StackId": STACK_ID,
    }

    def ref(name: str) -> Any:
        if name in pseudo:
            return pseudo[name]
        if name in parameters:
            return parameters[name]
        return BUCKET_NAME if name == "StageBucket" else name

    if isinstance(node, list):
        return [evaluate(v, parameters, conditions) for v in node]
    if not isinstance(node, dict) or len(node) != 1:
        return node
    ((function, argument),) = node.items()
    if function == "Ref":
        return ref(argument)
    if function == "Fn::GetAtt":
        target, attribute = argument.split(".", 1) if isinstance(argument, str) else argument
        return BUCKET_NAME if (target, attribute) == ("StageBucket", "Arn") else f"arn:{target}:{attribute}"
    if function == "Fn::If" and conditions is not None:  # without conditions: left as it is
        name, when_true, when_false = argument
        return evaluate(when_true if conditions[name] else when_false, parameters, conditions)
    if function == "Fn::Join":
        separator, values = argument
        return separator.join(as_list(evaluate(values, parameters, conditions)))
    if function == "Fn::Split":
        separator, value = argument
        return str(evaluate(value, parameters, conditions)).split(separator)
    if function == "Fn::Select":
        index, values = argument
        return evaluate(values, parameters, conditions)[int(index)]
    if function == "Fn::FindInMap":
        mapping, key, attribute = (evaluate(part, parameters, conditions) for part in argument)
        return template_mappings()[mapping][key][attribute]
    if function == "Fn::Sub":
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        values = {name: str(evaluate(v, parameters, conditions)) for name, v in variables.items()}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in values:
                return values[name]
            if name == "StageBucket.Arn":
                return f"arn:aws:s3:::{BUCKET_NAME}"
            return str(ref(name))

        return re.sub(r"\$\{([^}]+)\}", replace, text)
    return node


def condition_values(template: dict[str, Any], parameters: dict[str, str]) -> dict[str, bool]:
    """Every condition of the template for a deploy with these parameters (defaults included)."""

    def truth(node: dict[str, Any]) -> bool:
        ((function, argument),) = node.items()
        if function == "Fn::Equals":
            left, right = argument
            return str(evaluate(left, parameters)) == str(evaluate(right, parameters))
        if function == "Fn::Not":
            return not truth(argument[0])
        if function == "Fn::And":
            return all(truth(c) for c in argument)
        if function == "Fn::Or":
            return any(truth(c) for c in argument)
        assert function == "Condition", node
        return truth(template["Conditions"][argument])

    return {name: truth(node) for name, node in template["Conditions"].items()}


@pytest.fixture(scope="module")
def expanded_template(sam_template: dict[str, Any]) -> dict[str, Any]:
    return expand_for_each(sam_template, PARAMETERS)


@pytest.fixture(scope="module")
def cfn(expanded_template: dict[str, Any]) -> dict[str, Any]:
    """The CloudFormation the SAM transform produces, computed offline."""
    # Like `sam package`: local CodeUri folders become S3 locations before the transform.
    packaged = copy.deepcopy(expanded_template)
    for function in (*FUNCTIONS, CHANGE_CAPTURE):
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
    """Every inline IAM policy statement of every role the stack creates (both arms of an Fn::If)."""
    for role_name, role in resources_of_type(cfn, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                if "Fn::If" in statement:
                    _, when_true, when_false = statement["Fn::If"]
                    arms = [arm for arm in (when_true, when_false) if arm != {"Ref": "AWS::NoValue"}]
                else:
                    arms = [statement]
                for arm in arms:
                    yield role_name, arm


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


def lifecycle_rules(cfn: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Lifecycle rules by Id, the archive rule's Fn::If taken as configured."""
    rules = {}
    for raw_rule in properties(cfn, "StageBucket")["LifecycleConfiguration"]["Rules"]:
        rule = raw_rule["Fn::If"][1] if "Fn::If" in raw_rule else raw_rule
        rules[rule["Id"]] = rule
    return rules


@pytest.mark.parametrize(
    ("key", "expiry_parameter"),
    [
        pytest.param(
            data_key("staging", CUSTOMERS_TABLE, 1, "20261125T120000000000Z", FileFormat.CSV),
            "S3StageRetentionDays",
            id="data-file",
        ),
        pytest.param(
            manifest_key(CUSTOMERS_TABLE, "20261125T120000000000Z"), "S3MetadataRetentionDays", id="manifest"
        ),
        pytest.param(
            "_pgsnow/keys/public/customers/20261125T120000000000Z.json",
            "S3MetadataRetentionDays",
            id="key-list",
        ),
        pytest.param(
            "_pgsnow/reports/public/customers/20261125T120000000000Z.json",
            "S3MetadataRetentionDays",
            id="report",
        ),
        pytest.param("_pgsnow/state/public/customers.json", None, id="extractor-state-never-expires"),
    ],
)
def test_lifecycle_expires_each_kind_of_object_after_its_retention(
    cfn: dict[str, Any], key: str, expiry_parameter: str | None
) -> None:
    # Given the rules that expire current versions, with their prefixes resolved
    expiring = [
        (evaluate(rule["Prefix"]), rule["ExpirationInDays"])
        for rule in lifecycle_rules(cfn).values()
        if "ExpirationInDays" in rule
    ]
    assert all(prefix for prefix, _ in expiring)  # no current-version expiry on the whole bucket
    # When the key is matched against them
    matching = [days for prefix, days in expiring if key.startswith(prefix)]
    # Then exactly the expected retention applies (state: none at all)
    assert matching == ([] if expiry_parameter is None else [{"Ref": expiry_parameter}])


def test_lifecycle_defaults_keep_run_records_longer_than_data(sam_template: dict[str, Any]) -> None:
    parameters = sam_template["Parameters"]
    assert parameters["S3StageRetentionDays"]["Default"] == 7
    assert parameters["S3MetadataRetentionDays"]["Default"] >= parameters["S3StageRetentionDays"]["Default"]


def test_lifecycle_expires_noncurrent_versions_and_uploads_bucket_wide(cfn: dict[str, Any]) -> None:
    (rule,) = [r for r in lifecycle_rules(cfn).values() if "NoncurrentVersionExpiration" in r]
    assert rule["Status"] == "Enabled"
    assert "Prefix" not in rule
    assert "Filter" not in rule
    assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] >= 1
    assert rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1


def test_archived_files_expire_only_when_archiving_is_on(sam_template: dict[str, Any]) -> None:
    rules = sam_template["Resources"]["StageBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    (conditional,) = [r for r in rules if "Fn::If" in r]
    condition, rule, otherwise = conditional["Fn::If"]
    assert condition == "HasArchivePrefix"
    assert rule["Prefix"] == {"Fn::Sub": "${CleanupArchivePrefix}/"}
    assert otherwise == {"Ref": "AWS::NoValue"}


def queue_notification_filters(cfn: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(prefix, suffix or None) of each QueueConfiguration, with the prefix parameter resolved."""
    configurations = properties(cfn, "StageBucket")["NotificationConfiguration"]["QueueConfigurations"]
    filters = []
    for configuration in configurations:
        assert configuration["Event"] == "s3:ObjectCreated:*"
        assert configuration["Queue"] == {"Fn::GetAtt": ["StageQueue", "Arn"]}
        rules = {r["Name"]: r["Value"] for r in configuration["Filter"]["S3Key"]["Rules"]}
        assert set(rules) <= {"prefix", "suffix"}
        prefix = resolve_sub(rules["prefix"], {"S3StagePrefix": PARAMETERS["S3StagePrefix"]})
        filters.append((prefix, rules.get("suffix")))
    return filters


def test_notification_covers_the_staging_prefix_without_a_case_sensitive_suffix(cfn: dict[str, Any]) -> None:
    # S3 matches suffix filters case-sensitively: FILE.CSV.GZ must reach the loader, which decides
    assert queue_notification_filters(cfn) == [("staging/", None)]


def notifies(cfn: dict[str, Any], key: str) -> bool:
    return any(
        key.startswith(prefix) and (suffix is None or key.endswith(suffix))
        for prefix, suffix in queue_notification_filters(cfn)
    )


CUSTOMERS = CUSTOMERS_TABLE
RUN_ID = "20261125T120000000000Z"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param(data_key("staging", CUSTOMERS, 1, RUN_ID, FileFormat.CSV), True, id="extractor-csv-gz"),
        pytest.param(
            data_key("staging", CUSTOMERS, 2, RUN_ID, FileFormat.PARQUET), True, id="extractor-parquet"
        ),
        pytest.param("staging/public/customers/dropped by hand.csv", True, id="hand-dropped-plain-csv"),
        pytest.param("staging/public/customers/EXPORT.CSV.GZ", True, id="upper-case-extension"),
        pytest.param("staging/public/customers/part-0.Parquet", True, id="mixed-case-extension"),
        pytest.param(manifest_key(CUSTOMERS, RUN_ID), False, id="manifest-json"),
        pytest.param("elsewhere/public/customers/x.csv.gz", False, id="outside-prefix"),
    ],
)
def test_notification_covers_data_files_under_the_prefix(
    cfn: dict[str, Any], key: str, expected: bool
) -> None:
    assert notifies(cfn, key) is expected


def test_bucket_is_named_from_the_app_environment_and_stack_hash(cfn: dict[str, Any]) -> None:
    # The hash is the first 8 hex digits of the stack's UUID, the last part of AWS::StackId
    assert evaluate(properties(cfn, "StageBucket")["BucketName"]) == BUCKET_NAME


def test_longest_bucket_name_fits_s3s_limit(sam_template: dict[str, Any]) -> None:
    # Given the longest AppName and Environment the parameters accept
    parameters = sam_template["Parameters"]
    longest = {
        name: "a" * int(re.search(r"\{0,(\d+)\}", parameters[name]["AllowedPattern"]).group(1)) + "aa"
        for name in ("AppName", "Environment")
    }
    for name, value in longest.items():
        assert re.fullmatch(parameters[name]["AllowedPattern"], value), name
        assert not re.fullmatch(parameters[name]["AllowedPattern"], value + "a"), name
    # When the bucket name is built from them
    name = evaluate(
        sam_template["Resources"]["StageBucket"]["Properties"]["BucketName"], {**PARAMETERS, **longest}
    )
    # Then it is a valid S3 bucket name
    assert len(name) <= 63
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", name)


def test_queue_policy_names_the_bucket_without_a_reference_cycle(cfn: dict[str, Any]) -> None:
    # Given the queue policy's statement that lets S3 send
    (statement,) = [
        s
        for s in properties(cfn, "StageQueuePolicy")["PolicyDocument"]["Statement"]
        if s["Effect"] == "Allow"
    ]
    # Then it lets exactly the bucket's computed name send, and the bucket waits for the policy
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    source_arn = evaluate(statement["Condition"]["ArnEquals"]["aws:SourceArn"])
    assert source_arn == f"arn:aws:s3:::{BUCKET_NAME}"
    assert statement["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert "StageQueuePolicy" in as_list(cfn["Resources"]["StageBucket"]["DependsOn"])


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


def test_visibility_timeout_is_six_loader_timeouts_plus_the_longest_batching_window(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    # Lambda's advice: six function timeouts, plus the batching window a message may spend
    # received (invisible) while its batch fills - the longest window the parameter allows.
    loader_timeout = function_timeout(cfn, "LoaderFunction")
    longest_window = sam_template["Parameters"]["LoaderBatchingWindowSeconds"]["MaxValue"]
    assert properties(cfn, "StageQueue")["VisibilityTimeout"] >= 6 * loader_timeout + longest_window
    assert loader_timeout <= 900  # Lambda's maximum


def loader_event_source(cfn: dict[str, Any]) -> dict[str, Any]:
    mappings = resources_of_type(cfn, "AWS::Lambda::EventSourceMapping").values()
    (mapping,) = [m for m in mappings if m["Properties"]["FunctionName"] == {"Ref": "LoaderFunction"}]
    properties: dict[str, Any] = mapping["Properties"]
    return properties


def test_loader_batching_comes_from_its_parameters(cfn: dict[str, Any]) -> None:
    event_source = loader_event_source(cfn)
    assert event_source["BatchSize"] == {"Ref": "LoaderBatchSize"}
    assert event_source["MaximumBatchingWindowInSeconds"] == {"Ref": "LoaderBatchingWindowSeconds"}


def test_loader_batching_parameters_stay_within_lambdas_limits(sam_template: dict[str, Any]) -> None:
    # Lambda, standard queue: BatchSize 1..10,000, above 10 only with a window of at least 1 s;
    # MaximumBatchingWindowInSeconds 0..300. A window of at least 1 s makes every size valid.
    batch = sam_template["Parameters"]["LoaderBatchSize"]
    window = sam_template["Parameters"]["LoaderBatchingWindowSeconds"]
    assert (batch["Type"], batch["MinValue"], batch["MaxValue"]) == ("Number", 1, MAX_BATCH_SIZE)
    assert (window["Type"], window["MinValue"], window["MaxValue"]) == ("Number", 1, MAX_BATCHING_WINDOW_S)
    for size in (batch["MinValue"], batch["Default"], batch["MaxValue"]):
        check_batching(size, window["MinValue"])
        check_batching(size, window["MaxValue"])


def test_local_stack_batches_as_the_template_deploys(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    parameters = sam_template["Parameters"]
    assert parameters["LoaderBatchSize"]["Default"] == LOADER_BATCH_SIZE
    assert parameters["LoaderBatchingWindowSeconds"]["Default"] == LOADER_BATCHING_WINDOW_S
    assert function_timeout(cfn, "LoaderFunction") == LOADER_TIMEOUT_S


@pytest.mark.parametrize("function", ["LoaderFunction", "CleanupFunction"])
def test_no_load_outlives_the_age_at_which_its_work_table_is_swept(
    cfn: dict[str, Any], function: str
) -> None:
    # The functions that make work tables end long before the cleanup's sweep may take one for
    # abandoned (pgsnow.load.work_tables): four times over, for clock differences.
    assert 4 * function_timeout(cfn, function) <= WORK_TABLE_MAX_AGE.total_seconds()


@pytest.mark.parametrize(
    ("function", "variable"),
    [("LoaderFunction", "LOADER_TIMEOUT_S"), ("CleanupFunction", "CLEANUP_TIMEOUT_S")],
)
def test_a_snowflake_sessions_lock_timeout_is_a_third_of_its_functions_timeout(
    cfn: dict[str, Any], sam_template: dict[str, Any], function: str, variable: str
) -> None:
    # Given the function's Timeout and the variable that tells its code, both read from the one
    # FunctionTimeouts mapping (never written twice)
    props = properties(cfn, function)
    assert props["Environment"]["Variables"][variable] == props["Timeout"]
    assert set(props["Timeout"]) == {"Fn::FindInMap"}
    assert FUNCTION_TIMEOUT_VARIABLES[COMPONENTS[function]] == variable
    # When the function builds its settings from its environment
    environment = {
        name: str(evaluate(raw, deployed_parameters(sam_template)))
        for name, raw in props["Environment"]["Variables"].items()
    }
    settings = Settings.from_env(environment, component=COMPONENTS[function])
    # Then its session gives up on a lock after a third of the function's time
    timeout = function_timeout(cfn, function)
    assert settings.snowflake.lock_timeout_s == timeout // 3
    assert session_setup_sql(settings.snowflake) == [f"ALTER SESSION SET LOCK_TIMEOUT = {timeout // 3}"]


def largest_notification_record() -> dict[str, Any]:
    """The largest record of the loader's event one staged file's notification can make, as Lambda
    delivers it: an S3 ObjectCreated event (a 1,024-byte key of 3-byte characters, URL-encoded to
    3,072 characters, and every other field at its longest) in an SQS record."""
    key = quote_plus("\u20ac" * 341 + "x")  # 1,024 bytes of UTF-8
    bucket = "b" * 63
    s3_event = {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "ap-southeast-4",
                "eventTime": "2026-12-07T04:36:10.123Z",
                "eventName": "ObjectCreated:CompleteMultipartUpload",
                "userIdentity": {"principalId": "AWS:AROA" + "X" * 17 + ":" + "s" * 64},
                "requestParameters": {"sourceIPAddress": "f" * 39},
                "responseElements": {"x-amz-request-id": "R" * 16, "x-amz-id-2": "i" * 128},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "c" * 255,
                    "bucket": {
                        "name": bucket,
                        "ownerIdentity": {"principalId": "A" * 14},
                        "arn": f"arn:aws-us-gov:s3:::{bucket}",
                    },
                    "object": {
                        "key": key,
                        "size": 5 * 1024**4,
                        "eTag": "e" * 32 + "-10000",
                        "versionId": "v" * 32,
                        "sequencer": "0" * 18,
                    },
                },
            }
        ]
    }
    assert len(unquote_plus(key).encode()) == 1024
    queue_name = f"{'a' * 20}-{'e' * 12}-stage"
    message = {
        "MessageId": str(uuid.UUID(int=0)),
        "ReceiptHandle": "h" * 1024,
        "Body": json.dumps(s3_event, separators=(",", ":")),  # S3 sends compact JSON
        "MD5OfBody": "0" * 32,
        "Attributes": {
            "ApproximateReceiveCount": "5",
            "SentTimestamp": "1" * 13,
            "SenderId": "AROA" + "X" * 17 + ":" + "s" * 64,
            "ApproximateFirstReceiveTimestamp": "1" * 13,
            "AWSTraceHeader": "t" * 256,
        },
    }
    arn = f"arn:aws-us-gov:sqs:ap-southeast-4:{ACCOUNT}:{queue_name}"
    return lambda_sqs_record(message, queue_arn=arn, region="ap-southeast-4")


def test_default_batch_fits_lambdas_payload_with_the_largest_records(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    # Given the largest record a staged file's notification makes
    record = largest_notification_record()
    record_bytes = len(json.dumps(record).encode())
    # When the default batch is made of such records
    batch = sam_template["Parameters"]["LoaderBatchSize"]["Default"]
    event_bytes = len(json.dumps({"Records": [record] * batch}).encode())
    # Then it stays under the 6 MB invocation payload, so the default is never cut short by size
    assert 6_000 < record_bytes < 7_000  # about 6.3 KB: 3 KB of key, 1 KB of receipt handle
    assert event_bytes <= MAX_PAYLOAD_BYTES


def test_loader_reports_partial_batch_failures_from_the_stage_queue(cfn: dict[str, Any]) -> None:
    event_source = loader_event_source(cfn)
    assert event_source["EventSourceArn"] == {"Fn::GetAtt": ["StageQueue", "Arn"]}
    assert event_source["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


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
    assert set(variables) >= ENV_VAR_NAMES | FUNCTION_ENV_VAR_NAMES[function]


@pytest.mark.parametrize("function", (*FUNCTIONS, CHANGE_CAPTURE))
def test_the_local_stack_gives_each_function_the_variables_sam_deploys(
    cfn: dict[str, Any], function: str
) -> None:
    # Given the variables the local stack reads for the function from template.yaml
    # (pgsnow.local.function_env: Globals and the function's own, resolved with its parameters)
    resources = StagingResources(
        bucket="b",
        queue_url="q",
        queue_arn="arn:q",
        dlq_url="d",
        dlq_arn="arn:d",
        prefix="staging",
        range_queue_url="r",
        range_queue_arn="arn:r",
    )
    component = FUNCTION_RESOURCES_BY_ID[function]
    local = template_environments(resources, stack_parameters(resources))[component]
    # Then they are the ones SAM's transform gives the deployed function
    assert set(local) == set(properties(cfn, function)["Environment"]["Variables"])


COMPONENTS = {
    "ExtractorFunction": Component.EXTRACTOR,
    "LoaderFunction": Component.LOADER,
    "CleanupFunction": Component.CLEANUP,
}


def deployed_parameters(sam_template: dict[str, Any]) -> dict[str, str]:
    """Every parameter's value for a deploy with PARAMETERS: the given ones, else the defaults."""
    defaults = {
        name: str(spec["Default"]) for name, spec in sam_template["Parameters"].items() if "Default" in spec
    }
    return {**defaults, **PARAMETERS}


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_environment_satisfies_settings(
    cfn: dict[str, Any], sam_template: dict[str, Any], function: str
) -> None:
    # Given the function's environment as CloudFormation would fill it in
    parameters = deployed_parameters(sam_template)
    environment = {
        name: str(evaluate(raw, parameters))
        for name, raw in properties(cfn, function)["Environment"]["Variables"].items()
    }
    # When the function's settings are built from it
    settings = Settings.from_env(environment, component=COMPONENTS[function])
    # Then the names mean what pgsnow.config reads
    assert settings.bucket == BUCKET_NAME
    assert settings.prefix == "staging"
    assert settings.postgres.secret_arn == PARAMETERS["PostgresSecretArn"]
    assert settings.snowflake.secret_arn == PARAMETERS["SnowflakeSecretArn"]
    assert settings.snowflake.database == "PGSNOW_DEV"
    assert (settings.snowflake.control_schema, settings.snowflake.stage) == ("PGSNOW", "PGSNOW_STAGE")
    assert settings.tables.tables == {CUSTOMERS, TableRef("public", "orders")}
    assert settings.cleanup.retention_days == 7
    if function == "CleanupFunction":
        assert (settings.cleanup.queue_url, settings.cleanup.dlq_url) == (
            "StageQueue",
            "StageDeadLetterQueue",
        )
    if function == "LoaderFunction":
        assert (settings.load.method.value, settings.load.on_error.value) == ("copy", "ABORT_STATEMENT")
    if function == "ExtractorFunction":
        # Files cut by size at 128 MB, no row cap, chunks sized by bytes: what the defaults say
        assert settings.extract.target_file_mb == 128
        assert settings.batch_rows is None
        assert settings.extract.chunk_rows is None


@pytest.mark.parametrize(
    ("parameter", "variable"),
    [
        pytest.param("ExtractTargetFileMb", "EXTRACT_TARGET_FILE_MB", id="target-file-mb"),
        pytest.param("ExtractBatchRows", "EXTRACT_BATCH_ROWS", id="row-cap"),
        pytest.param("ExtractChunkRows", "EXTRACT_CHUNK_ROWS", id="chunk-rows"),
    ],
)
def test_extract_sizes_are_parameters(cfn: dict[str, Any], parameter: str, variable: str) -> None:
    variables = properties(cfn, "ExtractorFunction")["Environment"]["Variables"]
    assert variables[variable] == {"Ref": parameter}


def test_extractor_disk_holds_two_of_the_largest_files(sam_template: dict[str, Any]) -> None:
    # Given the largest target the template allows, and a file's overshoot past it (one Parquet
    # row group at most: a CSV block is 1 MB)
    largest_mb = int(sam_template["Parameters"]["ExtractTargetFileMb"]["MaxValue"])
    overshoot_mb = PARQUET_GROUP_BYTES // 2**20
    # Then /tmp holds the file being uploaded and the one being written, and the limit is one
    # pgsnow.config accepts too
    storage = sam_template["Resources"]["ExtractorFunction"]["Properties"]["EphemeralStorage"]["Size"]
    assert storage >= 2 * (largest_mb + overshoot_mb)
    assert largest_mb <= MAX_TARGET_FILE_MB


@pytest.mark.parametrize(
    ("parameter", "accepted"),
    [
        pytest.param("S3FileFormat", {f.value for f in StagedFormat}, id="file-format"),
        pytest.param("CleanupS3Files", {m.value for m in CleanupMode} | {"true", "false"}, id="cleanup-mode"),
        pytest.param("LoadMethod", {m.value for m in LoadMethod}, id="load-method"),
        pytest.param("LoadOnError", {m.value for m in OnError}, id="on-error"),
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


def extractor_schedules(cfn: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """Rule logical ID -> (schedule expression, input event) of each rule targeting the extractor."""
    schedules = {}
    for name, rule in resources_of_type(cfn, "AWS::Events::Rule").items():
        for target in rule["Properties"]["Targets"]:
            if target["Arn"] == {"Fn::GetAtt": ["ExtractorFunction", "Arn"]}:
                expression = evaluate(rule["Properties"]["ScheduleExpression"])
                schedules[name] = (expression, json.loads(evaluate(target["Input"])))
    return schedules


def test_each_scheduled_table_gets_its_own_rule_and_input(cfn: dict[str, Any]) -> None:
    # Given ExtractSchedules "public.customers,public.orders@rate(15 minutes)"
    schedules = extractor_schedules(cfn)
    # Then one rule per entry, the bare entry on the default schedule, each event naming its table
    assert schedules == {
        "ExtractSchedulepubliccustomers": (
            "rate(1 day)",
            {"schema_name": "public", "table_name": "customers"},
        ),
        "ExtractSchedulepublicordersrate15minutes": (
            "rate(15 minutes)",
            {"schema_name": "public", "table_name": "orders"},
        ),
    }


def test_each_schedule_may_invoke_the_extractor(cfn: dict[str, Any]) -> None:
    permissions = [
        p["Properties"]
        for p in resources_of_type(cfn, "AWS::Lambda::Permission").values()
        if p["Properties"]["Principal"] == "events.amazonaws.com"
        and p["Properties"]["FunctionName"] == {"Ref": "ExtractorFunction"}
    ]
    sources = sorted(evaluate(p["SourceArn"]) for p in permissions)
    assert sources == sorted(f"arn:{rule}:Arn" for rule in extractor_schedules(cfn))


@pytest.mark.parametrize(
    ("entry", "valid"),
    [
        pytest.param("public.orders", True, id="bare-table"),
        pytest.param("public.orders@rate(15 minutes)", True, id="rate"),
        pytest.param("sales.line_items@cron(0 3 * * ? *)", True, id="cron"),
        pytest.param("orders", False, id="no-schema"),
        pytest.param("public.orders@every hour", False, id="not-an-expression"),
    ],
)
def test_extract_schedule_entries_are_validated(
    sam_template: dict[str, Any], entry: str, valid: bool
) -> None:
    pattern = sam_template["Parameters"]["ExtractSchedules"]["AllowedPattern"]
    assert (re.fullmatch(pattern, entry) is not None) is valid


def test_extractor_may_reinvoke_only_itself(cfn: dict[str, Any]) -> None:
    # Given the extractor's fixed function name and its invoke statement
    function_name = evaluate(properties(cfn, "ExtractorFunction")["FunctionName"])
    (statement,) = [s for role, s in iam_statements(cfn) if "lambda:InvokeFunction" in as_list(s["Action"])]
    # Then the resource is its own ARN, spelled without a reference to itself
    assert evaluate(statement["Resource"]) == f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function_name}"
    assert "ExtractorFunction" not in json.dumps(statement["Resource"])
    invoke_config = resources_of_type(cfn, "AWS::Lambda::EventInvokeConfig")
    assert any(c["Properties"]["MaximumRetryAttempts"] <= 2 for c in invoke_config.values())


@pytest.mark.parametrize("function", ["ExtractorFunction", "CleanupFunction"])
def test_failed_async_invocations_are_dead_lettered(cfn: dict[str, Any], function: str) -> None:
    dead_letter = properties(cfn, function)["DeadLetterConfig"]
    assert dead_letter == {"TargetArn": {"Fn::GetAtt": ["FailedInvocationQueue", "Arn"]}}
    assert properties(cfn, "FailedInvocationQueue")["SqsManagedSseEnabled"] is True


def test_extractor_joins_the_vpc_only_when_subnets_are_given(sam_template: dict[str, Any]) -> None:
    vpc_config = sam_template["Resources"]["ExtractorFunction"]["Properties"]["VpcConfig"]
    condition, config, otherwise = vpc_config["Fn::If"]
    assert condition == "ExtractorInVpc"
    assert config == {
        "SubnetIds": {"Ref": "ExtractorSubnetIds"},
        "SecurityGroupIds": {"Ref": "ExtractorSecurityGroupIds"},
    }
    assert otherwise == {"Ref": "AWS::NoValue"}
    for function in ("LoaderFunction", "CleanupFunction"):
        assert "VpcConfig" not in sam_template["Resources"][function]["Properties"]


def test_cleanup_reenqueues_to_the_loader_queue_and_reads_the_dead_letter_queue(cfn: dict[str, Any]) -> None:
    sqs = {
        str(evaluate(s["Resource"])): set(as_list(s["Action"]))
        for role, s in iam_statements(cfn)
        if role == "CleanupFunctionRole" and any(a.startswith("sqs:") for a in as_list(s["Action"]))
    }
    assert sqs == {
        "arn:StageQueue:Arn": {"sqs:SendMessage", "sqs:GetQueueAttributes"},
        "arn:StageDeadLetterQueue:Arn": {"sqs:GetQueueAttributes", "sqs:ReceiveMessage"},
        "arn:FailedInvocationQueue:Arn": {"sqs:SendMessage"},  # SAM's grant for DeadLetterQueue
    }


# ---------------------------------------------------------------- parallel backfill


RANGE_RESOURCES = (
    "ExtractRangeQueue",
    "ExtractRangeDeadLetterQueue",
    "ExtractRangeEventSource",
    "ExtractRangeDeadLetterQueueDepthAlarm",
)


def test_parallel_backfill_exists_only_above_one_worker(sam_template: dict[str, Any]) -> None:
    # Given the condition that creates the range queue and the extractor's event source
    condition = sam_template["Conditions"]["ParallelExtraction"]
    assert condition == {"Fn::Not": [{"Fn::Equals": [{"Ref": "ExtractMaxWorkers"}, 1]}]}
    # Then every range resource is created under it (one worker creates none), and by default a
    # large table is read by at most four workers at once
    for name in RANGE_RESOURCES:
        assert sam_template["Resources"][name]["Condition"] == "ParallelExtraction"
    spec = sam_template["Parameters"]["ExtractMaxWorkers"]
    assert spec["Default"] == 4
    # MaximumConcurrency accepts 2..1000: 1 never reaches the mapping, and 1000 is the ceiling
    assert (spec["MinValue"], spec["MaxValue"]) == (1, 1000)


def test_range_workers_are_bounded_by_the_parameter(cfn: dict[str, Any]) -> None:
    mapping = properties(cfn, "ExtractRangeEventSource")
    assert mapping["FunctionName"] == {"Ref": "ExtractorFunction"}
    assert mapping["EventSourceArn"] == {"Fn::GetAtt": ["ExtractRangeQueue", "Arn"]}
    assert mapping["BatchSize"] == 1  # one range per invocation: each has its deadline to itself
    assert mapping["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "ExtractMaxWorkers"}}


def test_range_queue_outlives_an_extractor_invocation_and_dead_letters(cfn: dict[str, Any]) -> None:
    queue = properties(cfn, "ExtractRangeQueue")
    timeout = properties(cfn, "ExtractorFunction")["Timeout"]
    # Lambda's advice for SQS sources: a visibility timeout of at least six function timeouts
    assert queue["VisibilityTimeout"] >= 6 * timeout
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["ExtractRangeDeadLetterQueue", "Arn"]
    }
    assert queue["SqsManagedSseEnabled"] is True
    assert properties(cfn, "ExtractRangeDeadLetterQueue")["SqsManagedSseEnabled"] is True
    env = properties(cfn, "ExtractorFunction")["Environment"]["Variables"]
    assert env["EXTRACT_RANGE_QUEUE_URL"] == {
        "Fn::If": ["ParallelExtraction", {"Ref": "ExtractRangeQueue"}, ""]
    }
    assert env["EXTRACT_MAX_WORKERS"] == {"Ref": "ExtractMaxWorkers"}


def test_extractor_may_send_and_consume_only_the_range_queue(cfn: dict[str, Any]) -> None:
    # Given every SQS statement of the extractor's role, by resource
    sqs: dict[str, set[str]] = {}
    for role, statement in iam_statements(cfn):
        actions = as_list(statement["Action"])
        if role == "ExtractorFunctionRole" and any(a.startswith("sqs:") for a in actions):
            sqs.setdefault(str(evaluate(statement["Resource"])), set()).update(actions)
    # Then it sends range messages and its event source consumes them, on that queue only
    assert sqs == {
        "arn:ExtractRangeQueue:Arn": {"sqs:SendMessage"}
        | {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"},
        "arn:FailedInvocationQueue:Arn": {"sqs:SendMessage"},  # SAM's grant for DeadLetterQueue
    }
    # And only when the range queue exists
    role = properties(cfn, "ExtractorFunctionRole")
    conditional = [
        s["Fn::If"][0]
        for p in role["Policies"]
        for s in p["PolicyDocument"]["Statement"]
        if "Fn::If" in s and "ExtractRangeQueue" in json.dumps(s)
    ]
    assert conditional == ["ParallelExtraction", "ParallelExtraction"]


# ---------------------------------------------------------------- alarms


@pytest.mark.parametrize(
    ("namespace", "metric", "dimension"),
    [
        pytest.param("AWS/S3", "NumberOfObjects", {"Ref": "StageBucket"}, id="bucket-objects"),
        pytest.param("AWS/S3", "BucketSizeBytes", {"Ref": "StageBucket"}, id="bucket-bytes"),
        pytest.param(
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            {"Fn::GetAtt": ["StageDeadLetterQueue", "QueueName"]},
            id="dlq-depth",
        ),
        pytest.param(
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            {"Fn::GetAtt": ["ExtractRangeDeadLetterQueue", "QueueName"]},
            id="range-dlq-depth",
        ),
        pytest.param(
            "AWS/SQS",
            "ApproximateAgeOfOldestMessage",
            {"Fn::GetAtt": ["StageQueue", "QueueName"]},
            id="oldest-message",
        ),
        *[
            pytest.param("AWS/Lambda", metric, {"Ref": function}, id=f"{function}-{metric}")
            for function in FUNCTIONS
            for metric in ("Errors", "Throttles")
        ],
    ],
)
def test_alarm_exists_and_notifies_the_optional_topic(
    cfn: dict[str, Any], namespace: str, metric: str, dimension: Any
) -> None:
    alarms = [
        a["Properties"]
        for a in resources_of_type(cfn, "AWS::CloudWatch::Alarm").values()
        if a["Properties"]["Namespace"] == namespace
        and a["Properties"]["MetricName"] == metric
        and dimension in [d["Value"] for d in a["Properties"]["Dimensions"]]
    ]
    assert len(alarms) == 1
    (alarm,) = alarms
    assert alarm["AlarmActions"] == {
        "Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopic"}], {"Ref": "AWS::NoValue"}]
    }


def test_alarm_topic_is_encrypted_with_a_key_cloudwatch_may_use(cfn: dict[str, Any]) -> None:
    topic = cfn["Resources"]["AlarmTopic"]
    assert topic["Condition"] == "HasAlarmTopic"
    assert topic["Properties"]["KmsMasterKeyId"] == {"Ref": "AlarmTopicKey"}
    key = cfn["Resources"]["AlarmTopicKey"]["Properties"]
    assert key["EnableKeyRotation"] is True
    principals = [s["Principal"] for s in key["KeyPolicy"]["Statement"]]
    assert {"Service": "cloudwatch.amazonaws.com"} in principals


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
        pytest.param("ChangeCaptureFunctionRole", "PostgresSecretArn", id="change-capture-postgres"),
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


@pytest.mark.parametrize(
    ("role", "allowed_resources"),
    [
        pytest.param(
            "CleanupFunctionRole",
            [["${StageBucket.Arn}/${S3StagePrefix}/*", "${StageBucket.Arn}/_pgsnow/*"]],
            id="cleanup-deletes-loaded-files-and-run-records",
        ),
        pytest.param(
            "ExtractorFunctionRole", ["${StageBucket.Arn}/_pgsnow/state/*"], id="extractor-clears-its-state"
        ),
    ],
)
def test_deletes_are_scoped(cfn: dict[str, Any], role: str, allowed_resources: list[Any]) -> None:
    # This test changed with issue 6: the extractor now deletes its finished checkpoint state.
    deleting = [
        s["Resource"]
        for role_name, s in iam_statements(cfn)
        if role_name == role and "s3:DeleteObject" in as_list(s["Action"])
    ]
    as_text = [
        [r["Fn::Sub"] for r in resource] if isinstance(resource, list) else resource["Fn::Sub"]
        for resource in deleting
    ]
    assert as_text == allowed_resources


def test_only_cleanup_and_extractor_delete(cfn: dict[str, Any]) -> None:
    deleters = {role for role, s in iam_statements(cfn) if "s3:DeleteObject" in as_list(s["Action"])}
    assert deleters == {"CleanupFunctionRole", "ExtractorFunctionRole"}


def test_snowflake_role_trusts_the_integration_user_with_external_id(cfn: dict[str, Any]) -> None:
    role = cfn["Resources"]["SnowflakeStorageRole"]
    assert role["Condition"] == "HasSnowflakeTrust"
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"AWS": {"Ref": "SnowflakeIamUserArn"}}
    assert trust["Action"] == "sts:AssumeRole"
    assert trust["Condition"] == {"StringEquals": {"sts:ExternalId": {"Ref": "SnowflakeExternalId"}}}


def test_snowflake_role_is_read_only_on_the_staging_prefix_and_the_key_lists(cfn: dict[str, Any]) -> None:
    statements = [s for role, s in iam_statements(cfn) if role == "SnowflakeStorageRole"]
    actions = {a for s in statements for a in as_list(s["Action"])}
    assert actions == {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:GetBucketLocation"}
    (read,) = [s for s in statements if "s3:GetObject" in as_list(s["Action"])]
    assert read["Resource"] == [
        {"Fn::Sub": "${StageBucket.Arn}/${S3StagePrefix}/*"},
        {"Fn::Sub": "${StageBucket.Arn}/_pgsnow/keys/*"},
    ]


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(key_list_key(TableRef("public", "orders"), "20260101T000000000000Z"), id="key-list"),
        pytest.param(
            data_key("staging", TableRef("public", "orders"), 1, "20260101T000000000000Z", FileFormat.CSV),
            id="data-file",
        ),
    ],
)
def test_snowflake_role_may_read_and_list_every_object_the_loader_copies(
    cfn: dict[str, Any], key: str
) -> None:
    """The deletes key list is COPYed by URL through the integration's role, like the data files."""
    bucket_arn = "arn:aws:s3:::the-bucket"
    variables = {"StageBucket.Arn": bucket_arn, "S3StagePrefix": PARAMETERS["S3StagePrefix"]}
    statements = [s for role, s in iam_statements(cfn) if role == "SnowflakeStorageRole"]
    (read,) = [s for s in statements if "s3:GetObject" in as_list(s["Action"])]
    (listing,) = [s for s in statements if "s3:ListBucket" in as_list(s["Action"])]
    readable = [resolve_sub(r, variables) for r in as_list(read["Resource"])]
    listable = [resolve_sub(p, variables) for p in as_list(listing["Condition"]["StringLike"]["s3:prefix"])]
    assert any(fnmatch.fnmatchcase(f"{bucket_arn}/{key}", pattern) for pattern in readable)
    folder = key.rsplit("/", 1)[0] + "/"  # what Snowflake lists: the COPY's location
    assert any(fnmatch.fnmatchcase(folder, pattern) for pattern in listable)


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
        "SnowflakeStorageRoleArnToTrust",
        "StageUrl",
        "StagePrefix",
        "StageDeadLetterQueueUrl",
        "FailedInvocationQueueUrl",
        "ExtractorFunctionName",
        "LoaderFunctionName",
        "CleanupFunctionName",
        "SnowflakeDatabase",
        "SnowflakeControlSchema",
        "SnowflakeStage",
        "AlarmTopicArn",
    ],
)
def test_outputs(cfn: dict[str, Any], output: str) -> None:
    assert "Value" in cfn["Outputs"][output]


def test_role_arn_to_trust_is_the_roles_arn(cfn: dict[str, Any]) -> None:
    role_name = evaluate(properties(cfn, "SnowflakeStorageRole")["RoleName"])
    expected = f"arn:aws:iam::{ACCOUNT}:role/{role_name}"
    assert evaluate(cfn["Outputs"]["SnowflakeStorageRoleArnToTrust"]["Value"]) == expected
    assert evaluate(cfn["Outputs"]["SnowflakeStorageRoleName"]["Value"]) == role_name
    assert len(role_name) <= 64


# ---------------------------------------------------------------- linters


def test_every_checkov_skip_carries_a_reason(sam_template: dict[str, Any]) -> None:
    skips = [
        (name, skip)
        for name, resource in sam_template["Resources"].items()
        if isinstance(resource, dict)
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", [])
    ]
    assert skips  # the template does skip some checks: each must say why
    for name, skip in skips:
        assert re.fullmatch(r"CKV2?_AWS_\d+", skip["id"]), name
        assert len(skip.get("comment", "").split()) >= 6, f"{name} skips {skip['id']} without a reason"


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
    overrides = config[environment]["global"]["parameters"]["parameter_overrides"]
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
            # A list parameter's pattern applies to each element.
            elements = value.split(",") if spec["Type"] == "CommaDelimitedList" and value else [value]
            for element in elements:
                assert re.fullmatch(spec["AllowedPattern"], element), name
        if spec["Type"] == "Number":
            assert spec.get("MinValue", 0) <= int(value) <= spec.get("MaxValue", int(value)), name


def test_samconfig_environments_get_separate_stacks() -> None:
    config = tomllib.loads((REPO / "samconfig.toml").read_text(encoding="utf-8"))
    stacks = {env: config[env]["global"]["parameters"]["stack_name"] for env in ("default", "prod")}
    assert len(set(stacks.values())) == 2
    assert samconfig_overrides("default")["Environment"] != samconfig_overrides("prod")["Environment"]


@pytest.mark.parametrize(
    ("role", "action"),
    [
        # what pgsnow.cleanup / pgsnow.sweeper call: versions removed by VersionId, orphans tagged
        pytest.param("CleanupFunctionRole", "s3:DeleteObjectVersion", id="cleanup-delete-version"),
        pytest.param("CleanupFunctionRole", "s3:GetObjectVersion", id="cleanup-head-version"),
        pytest.param("CleanupFunctionRole", "s3:ListBucketVersions", id="cleanup-list-versions"),
        pytest.param("CleanupFunctionRole", "s3:GetBucketVersioning", id="cleanup-versioning"),
        pytest.param("CleanupFunctionRole", "s3:PutObjectTagging", id="sweeper-tags"),
        # pgsnow.checkpoint: conditional writes and the lease's delete
        pytest.param("ExtractorFunctionRole", "s3:PutObject", id="extractor-put"),
        pytest.param("ExtractorFunctionRole", "s3:AbortMultipartUpload", id="extractor-multipart"),
        pytest.param("LoaderFunctionRole", "s3:GetObject", id="loader-get"),
    ],
)
def test_each_function_may_do_what_its_code_calls(cfn: dict[str, Any], role: str, action: str) -> None:
    granted = {a for name, s in iam_statements(cfn) if name == role for a in as_list(s["Action"])}
    assert action in granted


@pytest.mark.parametrize("environment", ["default", "prod"])
def test_samconfig_schedules_only_allowlisted_tables(environment: str) -> None:
    # CloudFormation cannot compare two list parameters; the extractor would refuse the table.
    overrides = samconfig_overrides(environment)
    allowlisted = set(overrides["ReplicatedTables"].split(","))
    scheduled = {entry.split("@", 1)[0] for entry in overrides["ExtractSchedules"].split(",")}
    assert scheduled <= allowlisted


# ---------------------------------------------------------------- what the local stack cannot check
# The local stack runs each function under its template policy, but moto evaluates only part of
# IAM (docs/local-fidelity.md). Each gap it leaves is checked here, on the template itself.


def test_loader_writes_only_run_manifests(cfn: dict[str, Any]) -> None:
    # The loader marks a run loaded (pgsnow.load.completion.complete_run); nothing else it may write.
    writes = [
        s["Resource"]
        for role, s in iam_statements(cfn)
        if role == "LoaderFunctionRole" and "s3:PutObject" in as_list(s["Action"])
    ]
    assert writes == [{"Fn::Sub": "${StageBucket.Arn}/_pgsnow/manifests/*"}]


@pytest.mark.parametrize(
    ("role", "prefixes"),
    [
        pytest.param("ExtractorFunctionRole", ["${S3StagePrefix}/*", "_pgsnow/*"], id="extractor"),
        pytest.param("ChangeCaptureFunctionRole", ["${S3StagePrefix}/*", "_pgsnow/*"], id="change-capture"),
        pytest.param("LoaderFunctionRole", ["${S3StagePrefix}/*", "_pgsnow/*"], id="loader"),
        pytest.param("CleanupFunctionRole", ["${S3StagePrefix}/*", "_pgsnow/*"], id="cleanup"),
        pytest.param("SnowflakeStorageRole", ["${S3StagePrefix}/*", "_pgsnow/keys/*"], id="snowflake"),
    ],
)
def test_every_listing_is_limited_to_pgsnows_prefixes(
    cfn: dict[str, Any], role: str, prefixes: list[str]
) -> None:
    # moto ignores StringLike, so locally a listing outside these prefixes would be allowed.
    listings = [
        s
        for name, s in iam_statements(cfn)
        if name == role and {"s3:ListBucket", "s3:ListBucketVersions"} & set(as_list(s["Action"]))
    ]
    assert listings, f"{role} lists nothing"
    for statement in listings:
        assert statement["Resource"] == {"Fn::GetAtt": ["StageBucket", "Arn"]}
        (operator,) = statement["Condition"]
        assert operator == "StringLike"
        allowed = [
            p["Fn::Sub"] if isinstance(p, dict) else p
            for p in statement["Condition"]["StringLike"]["s3:prefix"]
        ]
        assert allowed == prefixes


def test_queue_policy_denies_requests_without_tls(cfn: dict[str, Any]) -> None:
    # moto does not evaluate queue policies (resource-based); the deployed queue refuses plain HTTP.
    statements = properties(cfn, "StageQueuePolicy")["PolicyDocument"]["Statement"]
    (deny,) = [s for s in statements if s["Effect"] == "Deny"]
    assert (deny["Principal"], deny["Action"]) == ("*", "sqs:*")
    assert deny["Resource"] == {"Fn::GetAtt": ["StageQueue", "Arn"]}
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_roles_are_assumable_only_by_lambda(cfn: dict[str, Any], function: str) -> None:
    # Locally the administrator assumes the roles in Lambda's place; deployed, only Lambda may.
    trust = properties(cfn, f"{function}Role")["AssumeRolePolicyDocument"]["Statement"]
    assert [(s["Effect"], s["Principal"], as_list(s["Action"])) for s in trust] == [
        ("Allow", {"Service": ["lambda.amazonaws.com"]}, ["sts:AssumeRole"])
    ]


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_roles_have_only_the_templates_own_and_aws_managed_policies(
    cfn: dict[str, Any], function: str
) -> None:
    # The local roles get the template's inline statements only. SAM adds AWS managed policies:
    # logs and X-Ray (nothing local writes them) and, for the loader, the SQS poller policy
    # Lambda's event source mapping uses - locally the dispatcher polls in its place, as the
    # administrator, so that policy is not exercised locally either.
    role = properties(cfn, f"{function}Role")
    managed = {str(arn).rsplit("/", 1)[-1] for arn in role.get("ManagedPolicyArns", [])}
    assert managed <= {
        "AWSLambdaBasicExecutionRole",
        "AWSXrayWriteOnlyAccess",
        "AWSLambdaVPCAccessExecutionRole",
        "AWSLambdaSQSQueueExecutionRole",
    }


# --------------------------------------------------------------------------- the dashboard

SEARCH = re.compile(
    r"^SEARCH\('\{(?P<dimensions>[^}]*)\} MetricName=\"(?P<name>[A-Za-z]+)\"', '(?P<stat>[A-Za-z]+)', 300\)$"
)


def emitted_metrics() -> dict[str, set[bool]]:
    """Every metric the functions record, by name, and whether it carries the ``table`` dimension
    (True; False: an invocation total; a name may be recorded both ways): each ``record_table_metric("Name", table, ...)`` call in src/
    and the handlers, and each call of a handler's wrapper of it (``record_nonzero_metric``)."""
    sources = [
        *(REPO / "src").rglob("*.py"),
        *(REPO / name / "app.py" for name in ("extractor", "loader", "cleanup")),
    ]
    emitted: dict[str, set[bool]] = {}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in ("record_table_metric", "record_nonzero_metric")
                and isinstance(node.args[0], ast.Constant)  # a wrapper forwarding its own name is skipped
            ):
                continue
            table = node.args[1]
            with_table = not (isinstance(table, ast.Constant) and table.value is None)
            emitted.setdefault(node.args[0].value, set()).add(with_table)
    assert {"RowsExtracted", "RowsLoaded", "FilesDeleted"} <= set(emitted)  # the scan finds the calls
    return emitted


def recorded_metrics(path: Path) -> dict[str, set[bool]]:
    """The metrics one source file records (``record_table_metric("Name", table, ...)``), by name,
    with whether each carries the ``table`` dimension (as ``emitted_metrics`` reads them)."""
    recorded: dict[str, set[bool]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "record_table_metric"
            and isinstance(node.args[0], ast.Constant)
        ):
            table = node.args[1]
            with_table = not (isinstance(table, ast.Constant) and table.value is None)
            recorded.setdefault(node.args[0].value, set()).add(with_table)
    return recorded


def dashboard_body(
    cfn: dict[str, Any],
    sam_template: dict[str, Any],
    *,
    change_capture: bool,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The dashboard as CloudFormation fills its body in, with change capture on or off (and
    ``overrides`` of the deployed parameters)."""
    parameters = {
        **deployed_parameters(sam_template),
        **(overrides or {}),
        "ChangeCaptureEnabled": str(change_capture).lower(),
    }
    (dashboard,) = resources_of_type(cfn, "AWS::CloudWatch::Dashboard").values()
    text = evaluate(
        dashboard["Properties"]["DashboardBody"], parameters, condition_values(sam_template, parameters)
    )
    body: dict[str, Any] = json.loads(text)
    return body


def dashboard_metrics(body: dict[str, Any]) -> list[list[Any]]:
    return [metric for widget in body["widgets"] for metric in widget["properties"]["metrics"]]


def widget_metric_names(widget: dict[str, Any]) -> set[str]:
    """The metric names a widget shows: its SEARCH expressions' and its AWS metrics'."""
    names = set()
    for metric in widget["properties"]["metrics"]:
        if isinstance(metric[0], dict):
            match = SEARCH.match(metric[0]["expression"])
            assert match is not None, metric
            names.add(match["name"])
        else:
            names.add(metric[1])
    return names


@pytest.fixture(scope="module", params=[False, True], ids=["without-change-capture", "with-change-capture"])
def dashboard(
    request: pytest.FixtureRequest, cfn: dict[str, Any], sam_template: dict[str, Any]
) -> dict[str, Any]:
    return dashboard_body(cfn, sam_template, change_capture=request.param)


def change_capture_widgets(cfn: dict[str, Any], sam_template: dict[str, Any]) -> list[dict[str, Any]]:
    """The widgets only a stack with change capture has (the rest are the same in both)."""
    without = dashboard_body(cfn, sam_template, change_capture=False)["widgets"]
    with_cdc = dashboard_body(cfn, sam_template, change_capture=True)["widgets"]
    assert with_cdc[: len(without)] == without
    return with_cdc[len(without) :]


def test_every_dashboard_search_names_a_metric_the_code_emits_with_its_dimensions(
    dashboard: dict[str, Any],
) -> None:
    emitted = emitted_metrics()
    searches = [m[0]["expression"] for m in dashboard_metrics(dashboard) if isinstance(m[0], dict)]
    assert searches
    for expression in searches:
        match = SEARCH.match(expression)
        assert match is not None, expression
        namespace, *dimensions = match["dimensions"].split(",")
        # Powertools' namespace and service are the template's AppName (POWERTOOLS_* in Globals).
        assert namespace == PARAMETERS["AppName"]
        assert match["name"] in emitted, f"the code never records {match['name']}"
        assert (dimensions == ["service", "table"]) in emitted[match["name"]], expression
        assert dimensions in (["service", "table"], ["service"]), expression


def test_dashboard_aws_metrics_name_this_stacks_function_and_queues(dashboard: dict[str, Any]) -> None:
    aws_metrics = [m for m in dashboard_metrics(dashboard) if not isinstance(m[0], dict)]
    own = {
        ("AWS/Lambda", "FunctionName"): {
            evaluate({"Ref": "ExtractorFunction"}),
            evaluate({"Ref": CHANGE_CAPTURE}),
        },
        ("AWS/SQS", "QueueName"): {
            evaluate({"Fn::GetAtt": ["StageQueue", "QueueName"]}),
            evaluate({"Fn::GetAtt": ["StageDeadLetterQueue", "QueueName"]}),
        },
    }
    assert {(m[0], m[1]) for m in aws_metrics} - {("AWS/Lambda", "Errors")} == {
        ("AWS/Lambda", "Duration"),
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
        ("AWS/SQS", "ApproximateAgeOfOldestMessage"),
    }
    for namespace, _name, dimension, value, *_options in aws_metrics:
        assert value in own[(namespace, dimension)]


def test_dashboard_shows_what_operations_needs(dashboard: dict[str, Any]) -> None:
    names = {name for widget in dashboard["widgets"] for name in widget_metric_names(widget)}
    assert {
        "RowsExtracted",
        "RowsLoaded",
        "FilesStaged",
        "FilesLoaded",
        "FilesFailed",
        "ReplicationLag",
        "CopyDuration",
        "RowsRejected",
    } <= names


def test_dashboard_widgets_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells = [
        (column, row)
        for w in dashboard["widgets"]
        for column in range(w["x"], w["x"] + w["width"])
        for row in range(w["y"], w["y"] + w["height"])
    ]
    assert len(cells) == len(set(cells))
    assert all(w["x"] + w["width"] <= 24 for w in dashboard["widgets"])  # CloudWatch's grid is 24 wide


def test_change_capture_widgets_show_every_metric_the_drain_records_and_only_with_change_capture(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    # Given the metrics the drain records (read from its code), each with or without its table
    drain = recorded_metrics(REPO / "src" / "pgsnow" / "cdc" / "drain.py")
    assert drain
    without = dashboard_body(cfn, sam_template, change_capture=False)
    added = change_capture_widgets(cfn, sam_template)
    # Then a stack without change capture shows none of them, and one with it shows each, with
    # the dimensions it is recorded with (per table, or per invocation: service only)
    assert not {n for w in without["widgets"] for n in widget_metric_names(w)} & set(drain)
    searched: dict[str, list[str]] = {}
    for metric in (m for w in added for m in w["properties"]["metrics"] if isinstance(m[0], dict)):
        match = SEARCH.match(metric[0]["expression"])
        assert match is not None
        _namespace, *dimensions = match["dimensions"].split(",")
        searched[match["name"]] = dimensions
    assert set(searched) == set(drain)
    for name, dimensions in searched.items():
        assert dimensions == (["service", "table"] if drain[name] == {True} else ["service"]), name


def test_change_capture_widgets_search_the_namespace_the_drain_records_in(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    # Given the environment variable the code takes its metrics namespace from (pgsnow.observability)
    observability = ast.parse((REPO / "src" / "pgsnow" / "observability.py").read_text())
    (variable,) = [
        node.value.args[0].value
        for node in ast.walk(observability)
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["NAMESPACE"]
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.args[0], ast.Constant)
    ]
    # When the change-capture function is deployed: its value there (Globals)
    parameters = deployed_parameters(sam_template)
    namespace = evaluate(properties(cfn, CHANGE_CAPTURE)["Environment"]["Variables"][variable], parameters)
    # Then every change-capture widget searches that namespace
    for widget in change_capture_widgets(cfn, sam_template):
        for metric in widget["properties"]["metrics"]:
            if isinstance(metric[0], dict):
                match = SEARCH.match(metric[0]["expression"])
                assert match is not None and match["dimensions"].split(",")[0] == namespace


def test_change_capture_widgets_draw_each_change_capture_alarms_threshold(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    parameters = deployed_parameters(sam_template)
    alarms = {
        name: alarm
        for name, alarm in resources_of_type(cfn, "AWS::CloudWatch::Alarm").items()
        if alarm.get("Condition") == "ChangeCaptureOn"
    }
    drawn = {}
    for widget in change_capture_widgets(cfn, sam_template):
        for line in widget["properties"].get("annotations", {}).get("horizontal", []):
            if line["label"] in alarms:
                alarm = alarms[line["label"]]["Properties"]
                # the line is at the alarm's threshold, on a widget that shows the alarm's metric
                assert line["value"] == int(evaluate(alarm["Threshold"], parameters)), line
                assert alarm["MetricName"] in widget_metric_names(widget), line
                drawn[line["label"]] = widget["properties"]["title"]
    assert set(drawn) == set(alarms)


# --------------------------------------------------------------------------- change capture


def test_change_capture_function_is_the_extractors_artifact_with_its_own_handler(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    source = sam_template["Resources"][CHANGE_CAPTURE]
    extractor = sam_template["Resources"]["ExtractorFunction"]
    # Same code and build (one artifact, `make build-ChangeCaptureFunction` builds the extractor's)
    assert source["Properties"]["CodeUri"] == extractor["Properties"]["CodeUri"]
    assert source["Metadata"]["BuildMethod"] == "makefile"
    makefile = (REPO / "build" / "lambda.mk").read_text()
    assert "build-ChangeCaptureFunction:\n\t$(call build_lambda_artifact,extractor)" in makefile
    props = properties(cfn, CHANGE_CAPTURE)
    assert props["Handler"] == "app.change_capture_handler"
    # The slot has one consumer
    assert props["ReservedConcurrentExecutions"] == 1
    assert props["Timeout"] == 900
    # The local schedule invokes it with the same deadline and memory (pgsnow.local.change_capture)
    assert (props["Timeout"], props["MemorySize"]) == (CHANGE_CAPTURE_TIMEOUT_S, CHANGE_CAPTURE_MEMORY_MB)
    # Same network and secret as the extractor
    assert props["VpcConfig"] == properties(cfn, "ExtractorFunction")["VpcConfig"]
    assert cfn["Resources"][CHANGE_CAPTURE]["Condition"] == "ChangeCaptureOn"


def test_change_capture_disk_holds_twice_the_largest_budget(sam_template: dict[str, Any]) -> None:
    # Given the largest change budget the template allows (raw changes spilled, then staged files)
    largest_mb = int(sam_template["Parameters"]["CdcMaxMb"]["MaxValue"])
    storage = sam_template["Resources"][CHANGE_CAPTURE]["Properties"]["EphemeralStorage"]["Size"]
    # Then /tmp holds both, and Lambda allows that much
    assert 2 * largest_mb <= storage <= 10240


def test_change_capture_environment_satisfies_settings(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    parameters = {
        **deployed_parameters(sam_template),
        "CdcSlot": "shop_slot",
        "CdcPublication": "shop_pub",
        "CdcMaxMb": "256",
        "ExtractTargetFileMb": "64",
        "ExtractBatchRows": "5000",
        "ExtractDeadlineMarginSeconds": "90",
    }
    environment = {
        name: str(evaluate(raw, parameters))
        for name, raw in properties(cfn, CHANGE_CAPTURE)["Environment"]["Variables"].items()
    }
    settings = Settings.from_env(environment, component=Component.CHANGE_CAPTURE)
    assert (settings.cdc.slot, settings.cdc.publication) == ("shop_slot", "shop_pub")
    assert settings.cdc.max_bytes == 256 * 2**20
    # The drain cuts its staged files and keeps its deadline margin by the extractor's parameters
    # (pgsnow.cdc.drain reads settings.extract and settings.batch_rows); deployed and locally
    # alike, a function sees only the variables its own template environment gives it.
    assert settings.extract.target_file_mb == 64
    assert settings.batch_rows == 5000
    assert settings.extract.deadline_margin_s == 90
    assert settings.postgres.secret_arn == PARAMETERS["PostgresSecretArn"]
    assert settings.bucket == BUCKET_NAME


def test_change_capture_runs_on_its_schedule_only_when_enabled(cfn: dict[str, Any]) -> None:
    rules = {
        name: rule
        for name, rule in resources_of_type(cfn, "AWS::Events::Rule").items()
        if rule["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [CHANGE_CAPTURE, "Arn"]}
    }
    (rule,) = rules.values()
    assert rule["Properties"]["ScheduleExpression"] == {"Ref": "ChangeCaptureSchedule"}
    assert rule["Condition"] == "ChangeCaptureOn"


@pytest.mark.parametrize(
    ("metric", "threshold", "operator"),
    [
        pytest.param("RetainedWalBytes", {"Ref": "RetainedWalAlarmBytes"}, "GreaterThanThreshold", id="wal"),
        pytest.param("SlotLost", 1, "GreaterThanOrEqualToThreshold", id="slot-lost"),
        pytest.param(
            "ReplicationLagSeconds", {"Ref": "ChangeCaptureLagAlarmSeconds"}, "GreaterThanThreshold", id="lag"
        ),
    ],
)
def test_change_capture_alarms_watch_what_the_drain_emits(
    cfn: dict[str, Any], metric: str, threshold: Any, operator: str
) -> None:
    (alarm,) = [
        a
        for a in resources_of_type(cfn, "AWS::CloudWatch::Alarm").values()
        if a["Properties"]["MetricName"] == metric
    ]
    props = alarm["Properties"]
    # Powertools' namespace and service dimension are the AppName (POWERTOOLS_* in Globals); the
    # drain records these per invocation (record_table_metric with table None)
    assert props["Namespace"] == {"Ref": "AppName"}
    assert props["Dimensions"] == [{"Name": "service", "Value": {"Ref": "AppName"}}]
    assert (props["Threshold"], props["ComparisonOperator"]) == (threshold, operator)
    assert alarm["Condition"] == "ChangeCaptureOn"
    assert props["AlarmActions"] == {
        "Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopic"}], {"Ref": "AWS::NoValue"}]
    }


def emf_documents(environment: dict[str, str], metrics: list[str]) -> list[dict[str, Any]]:
    """The EMF documents ``pgsnow.observability.record_table_metric`` prints for an invocation total
    (table None) of each of ``metrics``, in a process with ``environment``'s POWERTOOLS_* variables:
    the module reads its namespace at import, as a deployed function does, hence its own process."""
    powertools = {name: value for name, value in environment.items() if name.startswith("POWERTOOLS_")}
    script = (
        "import sys\n"
        "from pgsnow.observability import record_table_metric\n"
        "for name in sys.argv[1:]:\n"
        "    record_table_metric(name, None, 1.0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *metrics],
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(REPO / "src"),
            **powertools,
            "POWERTOOLS_METRICS_DISABLED": "false",
        },
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    documents: list[dict[str, Any]] = [json.loads(line) for line in result.stdout.splitlines()]
    return documents


def test_each_change_capture_alarm_watches_the_metric_the_drain_writes_as_it_writes_it(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    # Given the change-capture alarms on pgsnow's own metrics, and the metrics the drain records
    # (read from its code)
    parameters = deployed_parameters(sam_template)
    alarms = {
        name: alarm["Properties"]
        for name, alarm in resources_of_type(cfn, "AWS::CloudWatch::Alarm").items()
        if alarm.get("Condition") == "ChangeCaptureOn" and alarm["Properties"]["Namespace"] != "AWS/Lambda"
    }
    assert {"RetainedWalAlarm", "SlotLostAlarm", "ReplicationLagAlarm"} <= set(alarms)
    drain = recorded_metrics(REPO / "src" / "pgsnow" / "cdc" / "drain.py")
    # When the deployed change-capture function records each alarm's metric (its template environment)
    environment = {
        name: str(evaluate(value, parameters))
        for name, value in properties(cfn, CHANGE_CAPTURE)["Environment"]["Variables"].items()
    }
    names = [alarm["MetricName"] for alarm in alarms.values()]
    written = dict(zip(names, emf_documents(environment, names), strict=True))
    # Then each alarm watches a metric the drain records per invocation, in the namespace and with
    # exactly the dimensions (names and values) the function writes it with
    for name, alarm in alarms.items():
        metric = alarm["MetricName"]
        assert drain.get(metric) == {False}, f"{name}: the drain records {metric} {drain.get(metric)}"
        document = written[metric]
        (directive,) = document["_aws"]["CloudWatchMetrics"]
        assert [m["Name"] for m in directive["Metrics"]] == [metric]
        assert evaluate(alarm["Namespace"], parameters) == directive["Namespace"], name
        (dimension_names,) = directive["Dimensions"]
        assert {d["Name"]: evaluate(d["Value"], parameters) for d in alarm["Dimensions"]} == {
            dimension: document[dimension] for dimension in dimension_names
        }, name


def test_replication_lag_alarm_exists_only_with_change_capture_and_its_line_follows_the_parameter(
    cfn: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    alarm = cfn["Resources"]["ReplicationLagAlarm"]
    props = alarm["Properties"]
    # Only with change capture
    assert alarm["Condition"] == "ChangeCaptureOn"
    for enabled in (False, True):
        parameters = {**deployed_parameters(sam_template), "ChangeCaptureEnabled": str(enabled).lower()}
        assert condition_values(sam_template, parameters)["ChangeCaptureOn"] is enabled
    # The worst run of each period, sustained for three periods; silence keeps the state (other
    # alarms report a drain that does not run: RetainedWalAlarm counts silence as breaching)
    assert (props["Statistic"], props["Period"], props["EvaluationPeriods"]) == ("Maximum", 300, 3)
    assert props["DatapointsToAlarm"] == 3
    assert props["TreatMissingData"] == "ignore"
    assert properties(cfn, "RetainedWalAlarm")["TreatMissingData"] == "breaching"
    # The parameter's default is fifteen one-minute schedules, within its own range
    spec = sam_template["Parameters"]["ChangeCaptureLagAlarmSeconds"]
    assert spec["MinValue"] <= spec["Default"] == 900 <= spec["MaxValue"]
    # When a stack sets its own tolerance, the alarm and the dashboard's line both follow it
    overrides = {"ChangeCaptureLagAlarmSeconds": "1800"}
    assert int(evaluate(props["Threshold"], {**deployed_parameters(sam_template), **overrides})) == 1800
    with_cdc = dashboard_body(cfn, sam_template, change_capture=True, overrides=overrides)
    lines = [
        (line["value"], widget_metric_names(widget))
        for widget in with_cdc["widgets"]
        for line in widget["properties"].get("annotations", {}).get("horizontal", [])
        if line["label"] == "ReplicationLagAlarm"
    ]
    assert lines == [(1800, {"ReplicationLagSeconds"})]


def test_change_capture_errors_alarm(cfn: dict[str, Any]) -> None:
    (alarm,) = [
        a
        for a in resources_of_type(cfn, "AWS::CloudWatch::Alarm").values()
        if a["Properties"]["MetricName"] == "Errors"
        and a["Properties"]["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": CHANGE_CAPTURE}}]
    ]
    assert alarm["Condition"] == "ChangeCaptureOn"


def test_change_capture_writes_like_the_extractor_and_deletes_nothing(cfn: dict[str, Any]) -> None:
    role = f"{CHANGE_CAPTURE}Role"
    granted = {a for name, s in iam_statements(cfn) if name == role for a in as_list(s["Action"])}
    assert {"s3:PutObject", "s3:GetObject", "s3:ListBucket", "secretsmanager:GetSecretValue"} <= granted
    assert not {a for a in granted if "Delete" in a}
    writes = [
        [r["Fn::Sub"] for r in s["Resource"]]
        for name, s in iam_statements(cfn)
        if name == role and "s3:PutObject" in as_list(s["Action"])
    ]
    assert writes == [["${StageBucket.Arn}/${S3StagePrefix}/*", "${StageBucket.Arn}/_pgsnow/*"]]


def test_slot_parameter_follows_postgresqls_slot_name_rule(sam_template: dict[str, Any]) -> None:
    pattern = sam_template["Parameters"]["CdcSlot"]["AllowedPattern"]
    assert re.fullmatch(pattern, "pgsnow_prod_1")
    assert not re.fullmatch(pattern, "Pgsnow-prod")


def test_the_drain_state_never_expires(cfn: dict[str, Any]) -> None:
    # _pgsnow/cdc/{slot}/state.json chains each table's change runs (after_lsn = its last end):
    # no lifecycle rule may expire it, whatever the retention parameters say.
    rules = properties(cfn, "StageBucket")["LifecycleConfiguration"]["Rules"]
    prefixes = []
    for rule in rules:
        arms = rule["Fn::If"][1:] if "Fn::If" in rule else [rule]
        prefixes += [arm.get("Prefix") for arm in arms if isinstance(arm, dict) and "ExpirationInDays" in arm]
    as_text = [p["Fn::Sub"] if isinstance(p, dict) else p for p in prefixes if p is not None]
    assert as_text and not [p for p in as_text if "_pgsnow/cdc/".startswith(p) or p.startswith("_pgsnow/cdc")]
