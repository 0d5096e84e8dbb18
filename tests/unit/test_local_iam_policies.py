"""pgsnow.local.iam reads the functions' policies from template.yaml and resolves them as a deployment would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from local_resources import RESOURCES

from pgsnow.config import Component
from pgsnow.errors import ConfigError
from pgsnow.local.aws import REPO_TEMPLATE, TemplateResolver, load_template
from pgsnow.local.iam import function_statements, stack_parameters, storage_role_name, template_resolver

pytestmark = pytest.mark.unit

BUCKET_ARN = "arn:aws:s3:::pgsnow-local-bucket"


def statements(component: Component, **overrides: str) -> tuple[dict[str, Any], ...]:
    template = load_template(REPO_TEMPLATE)
    resolver = template_resolver(template, stack_parameters(RESOURCES, **overrides), resources=RESOURCES)
    return function_statements(template, component, resolver)


def by_sid(found: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {str(s["Sid"]): s for s in found}


@pytest.mark.parametrize(
    "component", [Component.EXTRACTOR, Component.LOADER, Component.CLEANUP, Component.CHANGE_CAPTURE]
)
def test_every_intrinsic_is_resolved(component: Component) -> None:
    text = json.dumps(statements(component))
    for leftover in ("Fn::", '"Ref"', "${", "AWS::"):
        assert leftover not in text


def test_resources_name_the_stacks_bucket_prefix_and_queues() -> None:
    loader = by_sid(statements(Component.LOADER))
    assert loader["ReadStagedFilesAndRunRecords"]["Resource"] == [
        f"{BUCKET_ARN}/landing/*",
        f"{BUCKET_ARN}/_pgsnow/*",
    ]
    assert loader["ListStage"]["Resource"] == BUCKET_ARN
    assert loader["ListStage"]["Condition"] == {"StringLike": {"s3:prefix": ["landing/*", "_pgsnow/*"]}}
    cleanup = by_sid(statements(Component.CLEANUP))
    assert cleanup["ReenqueueOrphans"]["Resource"] == RESOURCES.queue_arn
    assert cleanup["ReportDeadLetters"]["Resource"] == RESOURCES.dlq_arn
    extractor = by_sid(statements(Component.EXTRACTOR))
    assert extractor["ContinuePastTheDeadline"]["Resource"] == (
        "arn:aws:lambda:us-east-1:123456789012:function:pgsnow-local-extractor"
    )
    range_statements = [s for s in extractor.values() if RESOURCES.range_queue_arn in json.dumps(s)]
    assert range_statements, "the extractor sends and consumes its range queue (parallel backfill)"
    assert all(s["Resource"] == RESOURCES.range_queue_arn for s in range_statements)


@pytest.mark.parametrize(
    ("archive_prefix", "archives"),
    [pytest.param("", False, id="no-archive-prefix"), pytest.param("archive", True, id="archive-prefix")],
)
def test_the_archive_statement_follows_the_templates_condition(archive_prefix: str, archives: bool) -> None:
    cleanup = by_sid(statements(Component.CLEANUP, CleanupArchivePrefix=archive_prefix))
    assert ("ArchiveLoadedFiles" in cleanup) is archives
    if archives:
        assert cleanup["ArchiveLoadedFiles"]["Resource"] == f"{BUCKET_ARN}/archive/*"


def test_storage_role_name_follows_the_template() -> None:
    template = load_template(REPO_TEMPLATE)
    resolver = template_resolver(
        template, stack_parameters(RESOURCES), resources=RESOURCES, region="eu-west-1"
    )
    assert storage_role_name(template, resolver) == "pgsnow-local-snowflake-eu-west-1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param({"Fn::Equals": [{"Ref": "List"}, ""]}, False, id="list-joined-for-equals"),
        pytest.param({"Fn::Join": ["-", {"Ref": "List"}]}, "a-b", id="join-a-list"),
        pytest.param({"Fn::Select": [1, {"Fn::Split": [",", "x,y"]}]}, "y", id="select-split"),
        pytest.param({"Fn::Sub": ["${A}-${B}", {"B": "two"}]}, "one-two", id="sub-with-variables"),
        pytest.param({"Fn::If": ["Never", "a", {"Ref": "AWS::NoValue"}]}, None, id="if-to-no-value"),
        pytest.param([1, {"Ref": "AWS::NoValue"}, 2], [1, 2], id="no-value-dropped-from-lists"),
    ],
)
def test_resolver_intrinsics(value: Any, expected: Any) -> None:
    resolver = TemplateResolver(
        {"List": ["a", "b"], "A": "one"}, conditions={"Never": {"Fn::Equals": ["x", "y"]}}
    )
    resolved = resolver.resolve({"v": value})
    assert resolved.get("v") == expected


def test_a_policy_the_local_stack_cannot_reproduce_is_refused(tmp_path: Path) -> None:
    # A SAM policy template (here S3ReadPolicy) would need SAM's expansion: refused, never guessed.
    text = REPO_TEMPLATE.read_text(encoding="utf-8")
    start = text.index("\n  LoaderFunction:\n")
    heading = "      Policies:\n"
    policies = text.index(heading, start) + len(heading)
    edited = text[:policies] + "        - S3ReadPolicy: {BucketName: x}\n" + text[policies:]
    path = tmp_path / "template.yaml"
    path.write_text(edited, encoding="utf-8")
    template = load_template(path)
    resolver = template_resolver(template, stack_parameters(RESOURCES), resources=RESOURCES)
    with pytest.raises(ConfigError, match="LoaderFunction"):
        function_statements(template, Component.LOADER, resolver)
