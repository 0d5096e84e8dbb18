"""Each local function runs with the environment template.yaml gives it (pgsnow.local.function_env),
and sees only that in os.environ while its handler runs (pgsnow.local.scoped_environ)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from local_resources import RESOURCES

from pgsnow.config import Component, Settings
from pgsnow.errors import ConfigError
from pgsnow.local.aws import REPO_TEMPLATE, load_template
from pgsnow.local.function_env import (
    LOCAL_PLUMBING,
    SECRET_STAND_INS,
    function_environment,
    template_environment,
    template_environments,
)
from pgsnow.local.iam import FUNCTION_RESOURCES, stack_parameters, template_resolver
from pgsnow.local.scoped_environ import ScopedEnviron, function_scope, installed
from pgsnow.local.stack import FUNCTION_HANDLERS, FunctionHandler, LocalStack

pytestmark = pytest.mark.unit

# What a local stack's env holds (pgsnow.local.stack.stack_environment), abridged: its servers,
# the local administrator's keys, and variables the template gives only some functions.
STACK_ENV = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
    "AWS_ACCESS_KEY_ID": "AKIAADMIN",
    "AWS_SECRET_ACCESS_KEY": "admin-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "S3_STAGE_BUCKET": "pgsnow-local-bucket",
    "S3_STAGE_PREFIX": "landing",
    "S3_FILE_FORMAT": "parquet",
    "PGSNOW_TABLES": "*",
    "PGSNOW_PG_DSN": "host=127.0.0.1 dbname=test",
    "SNOWFLAKE_ACCOUNT": "fakesnow",
    "SNOWFLAKE_USER": "fake",
    "SNOWFLAKE_PASSWORD": "snow",
    "SNOWFLAKE_DATABASE": "PGSNOW_DEMO",
    "SNOWFLAKE_HOST": "127.0.0.1",
    "SNOWFLAKE_PORT": "5001",
    "SNOWFLAKE_PROTOCOL": "http",
    "SNOWPIPE_HOST": "127.0.0.1:5002",
    "POWERTOOLS_METRICS_DISABLED": "true",
    "EXTRACT_MAX_WORKERS": "2",
    "EXTRACT_RANGE_QUEUE_URL": RESOURCES.range_queue_url,
}
COMPONENTS = list(FUNCTION_RESOURCES)


def repo_environments(**parameters: str) -> dict[Component, dict[str, str]]:
    return template_environments(RESOURCES, stack_parameters(RESOURCES, **parameters))


def declared_names(component: Component) -> set[str]:
    """The variable names template.yaml lists for the function (Globals and its own), as written."""
    template = load_template(REPO_TEMPLATE)
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    own = template["Resources"][FUNCTION_RESOURCES[component]]["Properties"]["Environment"]["Variables"]
    return set(shared) | set(own)


# --------------------------------------------------------------------------- from the template


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.value)
def test_each_function_gets_its_declared_variables_resolved(component: Component) -> None:
    environment = repo_environments()[component]
    assert set(environment) == declared_names(component)
    for value in environment.values():
        assert not any(leftover in value for leftover in ("Fn::", "Ref", "${", "AWS::"))


def test_values_are_resolved_with_the_stacks_parameters_and_resources() -> None:
    environments = repo_environments(ExtractMaxWorkers="2")
    extractor, cleanup = environments[Component.EXTRACTOR], environments[Component.CLEANUP]
    assert extractor["S3_STAGE_BUCKET"] == RESOURCES.bucket  # !Ref StageBucket
    assert extractor["S3_STAGE_PREFIX"] == "landing"  # !Ref S3StagePrefix
    assert extractor["PGSNOW_TABLES"] == "*.*"  # !Join of a CommaDelimitedList
    assert extractor["POWERTOOLS_SERVICE_NAME"] == "pgsnow"
    assert extractor["EXTRACT_RANGE_QUEUE_URL"] == RESOURCES.range_queue_url  # !If ParallelExtraction
    assert (cleanup["LOADER_QUEUE_URL"], cleanup["LOADER_DLQ_URL"]) == (
        RESOURCES.queue_url,
        RESOURCES.dlq_url,
    )
    # One worker: the !If gives the empty string (no range queue)
    single = repo_environments(ExtractMaxWorkers="1")[Component.EXTRACTOR]
    assert single["EXTRACT_RANGE_QUEUE_URL"] == ""
    # !FindInMap: each Snowflake function's timeout, from the mapping its Timeout reads too
    assert environments[Component.LOADER]["LOADER_TIMEOUT_S"] == "900"
    assert cleanup["CLEANUP_TIMEOUT_S"] == "300"


@pytest.mark.parametrize(
    ("variable", "has_it"),
    [
        pytest.param("EXTRACT_RANGE_QUEUE_URL", {Component.EXTRACTOR}, id="range-queue"),
        pytest.param("LOAD_METHOD", {Component.LOADER}, id="load-method"),
        pytest.param("LOADER_QUEUE_URL", {Component.CLEANUP}, id="loader-queue"),
        pytest.param(
            "EXTRACT_TARGET_FILE_MB", {Component.EXTRACTOR, Component.CHANGE_CAPTURE}, id="target-file-mb"
        ),
        pytest.param("S3_STAGE_BUCKET", set(COMPONENTS), id="globals"),
    ],
)
def test_a_variable_reaches_only_the_functions_the_template_gives_it(
    variable: str, has_it: set[Component]
) -> None:
    environments = repo_environments(ExtractMaxWorkers="2")
    stack_env = {**STACK_ENV, variable: "from-the-stack"}
    for component in COMPONENTS:
        seen = function_environment(environments[component], stack_env)
        assert (variable in seen) is (component in has_it), component


def write_template(tmp_path: Path, globals_variables: str, loader_variables: str) -> Path:
    """A minimal template: Globals and a LoaderFunction with these variables (YAML lines, indented
    for their place: 8 spaces in Globals, 10 in the function)."""
    text = (
        "Parameters:\n  Method: {Type: String, Default: copy}\n  Archive: {Type: String, Default: ''}\n"
        "Conditions:\n  HasArchive: !Not [!Equals [!Ref Archive, '']]\n"
        "Globals:\n  Function:\n    Environment:\n      Variables:\n"
        + globals_variables
        + "Resources:\n  LoaderFunction:\n    Type: AWS::Serverless::Function\n    Properties:\n"
        "      Environment:\n        Variables:\n" + loader_variables
    )
    path = tmp_path / "template.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def loader_environment(path: Path) -> dict[str, str]:
    template = load_template(path)
    return template_environment(template, Component.LOADER, template_resolver(template, {}))


def test_the_functions_own_value_wins_and_no_value_drops_a_variable(tmp_path: Path) -> None:
    path = write_template(
        tmp_path,
        "        LOAD_METHOD: insert\n        SHARED: 7\n        ENABLED: true\n",
        "          LOAD_METHOD: !Ref Method\n"
        "          ARCHIVE: !If [HasArchive, !Ref Archive, !Ref AWS::NoValue]\n",
    )
    assert loader_environment(path) == {"LOAD_METHOD": "copy", "SHARED": "7", "ENABLED": "true"}


def test_a_variable_the_local_stack_cannot_resolve_is_refused(tmp_path: Path) -> None:
    path = write_template(tmp_path, "", "          QUEUE: !GetAtt SomeQueue.Arn\n")
    with pytest.raises(ConfigError, match="LoaderFunction: cannot resolve its variable QUEUE"):
        loader_environment(path)


# --------------------------------------------------------------------------- with the stack's values


def test_the_stacks_values_win_and_nothing_else_of_the_stack_reaches_a_function() -> None:
    loader = function_environment(repo_environments(ExtractMaxWorkers="2")[Component.LOADER], STACK_ENV)
    # The stack's value where it has one, the template's where it has none
    assert loader["S3_FILE_FORMAT"] == "parquet"
    assert loader["LOAD_ON_ERROR"] == "ABORT_STATEMENT"
    # The secret ARNs are replaced by their local stand-ins
    assert "SNOWFLAKE_SECRET_ARN" not in loader and "PGSNOW_PG_SECRET_ARN" not in loader
    assert (loader["SNOWFLAKE_PASSWORD"], loader["PGSNOW_PG_DSN"]) == ("snow", STACK_ENV["PGSNOW_PG_DSN"])
    # Neither the administrator's keys nor another function's variables
    for absent in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "EXTRACT_MAX_WORKERS",
        "EXTRACT_RANGE_QUEUE_URL",
    ):
        assert absent not in loader
    # And exactly the names the template gives it, stand-ins for secrets, and the plumbing list
    expected = declared_names(Component.LOADER) - set(SECRET_STAND_INS)
    expected |= {name for stand_ins in SECRET_STAND_INS.values() for name in stand_ins} | set(LOCAL_PLUMBING)
    assert set(loader) == expected
    # Which builds the loader's settings as the template's environment would deployed
    settings = Settings.from_env(loader, component=Component.LOADER)
    assert (settings.bucket, settings.snowflake.database) == ("pgsnow-local-bucket", "PGSNOW_DEMO")


def test_a_function_the_template_gives_no_secret_gets_no_stand_in() -> None:
    # Given a template environment without the Snowflake secret (forgotten for this function)
    template_env = {"S3_STAGE_BUCKET": "b", "PGSNOW_PG_SECRET_ARN": "arn:unused"}
    seen = function_environment(template_env, STACK_ENV)
    # Then the local Snowflake's account and password do not reach it either
    assert not set(SECRET_STAND_INS["SNOWFLAKE_SECRET_ARN"]) & set(seen)
    assert seen["PGSNOW_PG_DSN"] == STACK_ENV["PGSNOW_PG_DSN"]
    # And a secret a stack (a test) created and named is passed on as deployed
    real_secret = {**STACK_ENV, "PGSNOW_PG_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:1:secret:pg"}
    assert function_environment(template_env, real_secret)["PGSNOW_PG_SECRET_ARN"].endswith(":pg")


# --------------------------------------------------------------------------- what a handler sees


def test_a_scope_is_the_only_environment_its_thread_sees_while_other_threads_see_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGSNOW_PROCESS_ONLY", "process")
    monkeypatch.delenv("S3_STAGE_BUCKET", raising=False)
    inside = threading.Event()
    release = threading.Event()
    seen: dict[str, Any] = {}

    def invocation() -> None:
        with function_scope({"S3_STAGE_BUCKET": "function-bucket"}):
            seen["environ"] = dict(os.environ)
            seen["getenv"] = os.getenv("PGSNOW_PROCESS_ONLY")
            os.environ["WRITTEN_BY_THE_FUNCTION"] = "x"
            inside.set()
            release.wait(10)

    with installed():
        # Given a function's invocation in its scope on another thread
        thread = threading.Thread(target=invocation)
        thread.start()
        assert inside.wait(10)
        # Then that thread sees only its variables (and its own writes)
        assert seen["environ"] == {"S3_STAGE_BUCKET": "function-bucket"}
        assert seen["getenv"] is None
        # While this thread, meanwhile, sees the process's environment, without the function's
        assert os.environ["PGSNOW_PROCESS_ONLY"] == "process"
        assert "S3_STAGE_BUCKET" not in os.environ
        assert "WRITTEN_BY_THE_FUNCTION" not in os.environ
        release.set()
        thread.join(10)
    # And afterwards os.environ is the process's own mapping again
    assert not isinstance(os.environ, ScopedEnviron)
    assert os.environ["PGSNOW_PROCESS_ONLY"] == "process"


def test_process_writes_outside_a_scope_reach_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with installed(), installed():  # nested: one stand-in
        monkeypatch.setenv("PGSNOW_SET_DURING_HANDLERS", "yes")
        assert isinstance(os.environ, ScopedEnviron)
    assert os.environ["PGSNOW_SET_DURING_HANDLERS"] == "yes"
    monkeypatch.undo()
    assert "PGSNOW_SET_DURING_HANDLERS" not in os.environ


def test_a_handler_inside_a_stacks_handlers_sees_its_functions_environment() -> None:
    # Given a stack (no servers needed) whose template gives the loader and the extractor their own
    stack = LocalStack(
        pg_dsn="",
        aws=None,
        resources=RESOURCES,
        snowflake=None,
        env=dict(STACK_ENV),
        template_environments=repo_environments(ExtractMaxWorkers="2"),
    )
    seen: list[dict[str, str]] = []

    def probe(_event: dict[str, Any], _context: Any) -> None:
        seen.append(dict(os.environ))

    loader = FunctionHandler(Component.LOADER, probe)
    # When the loader's handler is invoked inside and outside the stack's handlers()
    with stack.handlers():
        loader({}, None)
    loader({}, None)
    # Then inside it saw exactly the loader's environment, outside the process's
    assert seen[0] == stack.function_environment(Component.LOADER)
    assert "EXTRACT_RANGE_QUEUE_URL" not in seen[0]
    assert seen[1] == dict(os.environ)


def test_each_handler_is_the_templates_function() -> None:
    # The folder and handler name load_function_handler maps to a function are its CodeUri and Handler
    template = load_template(REPO_TEMPLATE)
    default_handler = template["Globals"]["Function"]["Handler"]
    for (folder, name), component in FUNCTION_HANDLERS.items():
        properties = template["Resources"][FUNCTION_RESOURCES[component]]["Properties"]
        assert properties["CodeUri"].rstrip("/") == folder
        assert properties.get("Handler", default_handler) == f"app.{name}"
    assert set(FUNCTION_HANDLERS.values()) == set(FUNCTION_RESOURCES)
