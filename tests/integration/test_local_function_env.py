"""Locally, each function runs with exactly the environment template.yaml gives it.

* every handler, invoked the way the local stack invokes it, sees in ``os.environ`` the variables
  the template gives its function (Globals and its own), the local stand-ins of the secrets it is
  given, and the named local plumbing (pgsnow.local.function_env) - nothing of another function,
  of the local administrator or of the process that runs the stack;
* a copy of template.yaml without a variable a function requires makes that function fail
  locally with the configuration error naming it, as it would deployed, though the stack itself
  still has the value.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pipeline_support import pipeline_harness

from pgsnow.config import Component
from pgsnow.errors import ConfigError
from pgsnow.local.aws import REPO_TEMPLATE, load_template
from pgsnow.local.dispatcher import LambdaContext, SqsDispatcher
from pgsnow.local.function_env import LOCAL_PLUMBING, SECRET_STAND_INS
from pgsnow.local.iam import FUNCTION_RESOURCES
from pgsnow.local.stack import LocalStack, load_function_handler
from pgsnow.manifest import RunState
from pgsnow.runs import RunStore

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

# Each handler's app module, and the runtime it asks for first (pgsnow.runtime), by function.
HANDLER_RUNTIMES = {
    Component.EXTRACTOR: ("extractor", "handler", "extractor_runtime"),
    Component.CHANGE_CAPTURE: ("extractor", "change_capture_handler", "change_capture_runtime"),
    Component.LOADER: ("loader", "handler", "loader_runtime"),
    Component.CLEANUP: ("cleanup", "handler", "cleanup_runtime"),
}


class Observed(Exception):
    """Raised by a handler once its environment is written down: the invocation ends there."""


def context(function: str) -> LambdaContext:
    return LambdaContext.for_invocation(f"pgsnow-{function}", memory_mb=1024, timeout_s=900)


Seen = dict[Component, dict[str, str]]


def invoke_extractor(_stack: LocalStack, _seen: Seen) -> None:
    load_function_handler("extractor")(
        {"schema_name": "public", "table_name": "orders"}, context("extractor")
    )


def invoke_loader(_stack: LocalStack, _seen: Seen) -> None:
    load_function_handler("loader")({"Records": []}, context("loader"))


def invoke_cleanup(_stack: LocalStack, _seen: Seen) -> None:
    load_function_handler("cleanup")({}, context("cleanup"))


def run_change_capture_schedule(stack: LocalStack, seen: Seen) -> None:
    """The change-capture schedule's first tick, on the schedule's own thread."""
    schedule = stack.change_capture(interval_s=0.05)
    schedule.start()
    deadline = time.monotonic() + 30
    while Component.CHANGE_CAPTURE not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    schedule.stop()  # re-raises the run's failure


INVOCATIONS: dict[Component, Callable[[LocalStack, Seen], None]] = {
    Component.EXTRACTOR: invoke_extractor,
    Component.LOADER: invoke_loader,
    Component.CLEANUP: invoke_cleanup,
    Component.CHANGE_CAPTURE: run_change_capture_schedule,
}


@pytest.fixture
def seen_by_handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Seen]:
    """What each handler finds in ``os.environ`` when it asks for its runtime (then it stops)."""
    seen: Seen = {}
    for component, (folder, name, runtime_accessor) in HANDLER_RUNTIMES.items():
        load_function_handler(folder, name)
        module = sys.modules[f"pgsnow_function_{folder}_app"]

        def write_down(component: Component = component) -> Any:
            seen[component] = dict(os.environ)
            raise Observed(component.value)

        monkeypatch.setattr(module, runtime_accessor, write_down)
    yield seen


def expected_names(component: Component) -> set[str]:
    """The template's variable names for the function as written in template.yaml, the secrets'
    ARNs replaced by their local stand-ins, and the local plumbing."""
    template = load_template(REPO_TEMPLATE)
    declared = set(template["Globals"]["Function"]["Environment"]["Variables"]) | set(
        template["Resources"][FUNCTION_RESOURCES[component]]["Properties"]["Environment"]["Variables"]
    )
    names = declared - set(SECRET_STAND_INS)
    for secret, stand_ins in SECRET_STAND_INS.items():
        if secret in declared:
            names |= set(stand_ins)
    return names | set(LOCAL_PLUMBING)


@pytest.mark.parametrize("component", list(INVOCATIONS), ids=lambda c: c.value)
def test_each_handler_sees_only_its_template_environment(
    pipeline: PipelineHarness,
    seen_by_handlers: Seen,
    monkeypatch: pytest.MonkeyPatch,
    component: Component,
) -> None:
    # Given a variable of the process that runs the stack, and one the stack sets for the extractor
    stack = pipeline.stack
    monkeypatch.setenv("PGSNOW_PROCESS_ONLY", "process")
    assert stack.env["EXTRACT_MAX_WORKERS"]
    # When the function's handler is invoked as the local stack invokes it
    with pytest.raises(Observed):
        INVOCATIONS[component](stack, seen_by_handlers)
    seen = seen_by_handlers[component]
    # Then it saw exactly its template's variables, secret stand-ins and the local plumbing
    assert set(seen) == expected_names(component)
    # With the stack's values (its bucket, its servers) or the template's resolved ones
    assert seen["S3_STAGE_BUCKET"] == stack.resources.bucket
    assert seen["AWS_ENDPOINT_URL"] == stack.aws.endpoint_url
    if component is Component.CLEANUP:
        assert seen["LOADER_QUEUE_URL"] == stack.resources.queue_url
    # And nothing else: not the administrator's keys, not the process's own variables
    assert "AWS_ACCESS_KEY_ID" not in seen and "PGSNOW_PROCESS_ONLY" not in seen
    assert ("EXTRACT_MAX_WORKERS" in seen) is (component is Component.EXTRACTOR)
    # While this thread still sees the process's environment
    assert os.environ["PGSNOW_PROCESS_ONLY"] == "process"
    assert "S3_STAGE_BUCKET" not in os.environ or os.environ["S3_STAGE_BUCKET"] != stack.resources.bucket


# --------------------------------------------------------------------------- a variable the template forgets


def template_without_global(tmp_path: Path, line: str) -> Path:
    """A copy of template.yaml without ``line`` in ``Globals.Function.Environment.Variables``."""
    text = REPO_TEMPLATE.read_text(encoding="utf-8")
    start = text.index("\nGlobals:\n")
    end = text.index("\nResources:\n", start)
    assert text[start:end].count(line) == 1, f"{line!r} is not once in Globals"
    path = tmp_path / "template.yaml"
    path.write_text(text[:start] + text[start:end].replace(line, "") + text[end:], encoding="utf-8")
    return path


def test_a_loader_the_template_gives_no_database_fails_locally_naming_it(tmp_path: Path) -> None:
    # Given a template whose Globals no longer give the functions SNOWFLAKE_DATABASE
    edited = template_without_global(tmp_path, "        SNOWFLAKE_DATABASE: !Ref SnowflakeDatabase\n")
    with pipeline_harness("pgsnow_fenv_db", tmp_path / "stack", template_path=edited) as harness:
        stack = harness.stack
        # (the stack itself has the value: it created the database with it)
        assert stack.env["SNOWFLAKE_DATABASE"]
        table = harness.table("orders")
        harness.create_table(table, "id integer PRIMARY KEY, label text", "VALUES (1, 'a'), (2, 'b')")
        # When the extractor's handler stages the table (it needs no database) and the queue
        # delivers its file to the loader's handler
        extracted = load_function_handler("extractor")(
            {"schema_name": table.schema, "table_name": table.table}, context("extractor")
        )
        failures: list[BaseException] = []
        loader = load_function_handler("loader")

        def recording_loader(event: dict[str, Any], lambda_context: Any) -> Any:
            try:
                return loader(event, lambda_context)
            except Exception as exc:
                failures.append(exc)
                raise

        stats = SqsDispatcher(
            stack.aws, stack.resources.queue_url, recording_loader, wait_seconds=1
        ).run_until_idle(max_seconds=60)
        # Then every invocation fails with the configuration error naming the variable, as deployed
        assert extracted["state"] == RunState.STAGED.value
        assert stats.invocations >= 1 and stats.succeeded == 0
        assert failures and all(isinstance(exc, ConfigError) for exc in failures)
        assert all("SNOWFLAKE_DATABASE is required for the loader" in str(exc) for exc in failures)
        # And the run is not loaded
        manifest = RunStore(stack.aws.client("s3"), stack.resources.bucket).get_manifest(
            table, extracted["run_id"]
        )
        assert manifest.state is RunState.STAGED


def test_an_extractor_the_template_gives_no_postgres_secret_fails_locally_naming_it(tmp_path: Path) -> None:
    # Given a template whose Globals no longer give the functions the PostgreSQL secret's ARN
    edited = template_without_global(tmp_path, "        PGSNOW_PG_SECRET_ARN: !Ref PostgresSecretArn\n")
    with pipeline_harness("pgsnow_fenv_pg", tmp_path / "stack", template_path=edited) as harness:
        # (the stack has its local stand-in, the DSN: the template's secret is what decides)
        assert harness.stack.env["PGSNOW_PG_DSN"]
        table = harness.table("orders")
        harness.create_table(table, "id integer PRIMARY KEY", "VALUES (1)")
        # When the extractor's handler is invoked / Then it fails naming the variable it lacks
        with pytest.raises(ConfigError, match=r"PGSNOW_PG_SECRET_ARN \(or PGSNOW_PG_DSN for local runs\)"):
            load_function_handler("extractor")(
                {"schema_name": table.schema, "table_name": table.table}, context("extractor")
            )
