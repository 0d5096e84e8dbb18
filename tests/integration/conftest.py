"""Shared fixtures for the suites that run the whole pipeline: test_faults, test_bad_input,
test_fidelity, test_pipeline, test_verify and test_verify_from_env, among others.

``pipeline`` is one local stack per test process (the local PostgreSQL, a moto server over
HTTP, the local Snowflake spoken to by the real connector), ``pipeline_stack``, seen by each
module through a source schema of its own in database ``test`` (dropped afterwards) and with its
queues drained of what earlier modules left. Its queue has a one-second visibility timeout and a
maxReceiveCount of two, so a failing message reaches the dead-letter queue within seconds
through SQS's own redrive. The harness is in pipeline_support.py; the building blocks (schema,
stack, connections) are in stack_support.py, for modules that need a stack set up differently.

``aws`` is the one moto server of a test process for the modules that need moto alone (the
loader and extractor suites, test_dispatcher, test_local_aws, test_local_iam, test_runs, ...).

The loader, extractor and lifecycle suites have their own conftest.py in their directories;
other modules keep their own fixtures. The names here are distinct from theirs so nothing is
overridden by accident.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import PipelineHarness, harness_on_stack, pipeline_harness
from stack_support import MAX_RECEIVE_COUNT, VISIBILITY_TIMEOUT_S, running_stack, source_database

from pgsnow.local.aws import LocalAws, start_local_aws
from pgsnow.local.stack import SNOWFLAKE_DATABASE, LocalStack, StorageAccess
from pgsnow.observability import SERVICE
from pgsnow.verify import prepare_snowflake_session


def pytest_configure(config: pytest.Config) -> None:
    """Change capture needs wal_level = logical: switch the machine's cluster over (and restart it)
    once, in the controlling process, before any worker connects (the embedded server starts with it)."""
    if hasattr(config, "workerinput"):
        return
    from stack_support import PG_DSN_DEFAULT

    from pgsnow.local.postgres import ensure_logical_decoding, server_answers

    if server_answers(PG_DSN_DEFAULT):
        ensure_logical_decoding(PG_DSN_DEFAULT)


@pytest.fixture(scope="session")
def aws() -> Iterator[LocalAws]:
    """One moto server per test process (one per xdist worker) for every module that needs moto
    alone: starting one takes a second or two, and each test keeps to buckets, queues and users
    of its own (``new_bucket``, unique names)."""
    local = start_local_aws()
    yield local
    local.stop()


@pytest.fixture(scope="session")
def pipeline_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The local stack of every module's ``pipeline`` in this test process (one per xdist worker):
    starting one takes seconds, and modules keep apart by their own source schema."""
    with (
        source_database() as source_dsn,
        running_stack(
            source_dsn,
            tmp_path_factory.mktemp("proof"),
            "pgsnow-proof",
            visibility_timeout=VISIBILITY_TIMEOUT_S,
            max_receive_count=MAX_RECEIVE_COUNT,
        ) as local,
    ):
        yield local


@pytest.fixture(scope="module")
def pipeline(pipeline_stack: LocalStack) -> Iterator[PipelineHarness]:
    """The shared stack with one source schema per module; the handlers read the stack's environment."""
    with harness_on_stack(pipeline_stack, "pgsnow_proof") as harness:
        yield harness


@pytest.fixture(scope="module", params=list(StorageAccess), ids=[access.value for access in StorageAccess])
def pipeline_by_storage_access(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineHarness]:
    """``pipeline``, once with a storage integration (Snowflake reads S3 as the template's storage
    role, within the integration's allowed locations: the shared stack is started so) and once
    with the credentials method (the loader's own temporary credentials in a temporary stage)."""
    access: StorageAccess = request.param
    if access is StorageAccess.INTEGRATION:
        with harness_on_stack(request.getfixturevalue("pipeline_stack"), "pgsnow_integration") as harness:
            yield harness
        return
    with pipeline_harness(
        f"pgsnow_{access.value}", tmp_path_factory.mktemp(access.value), storage_access=access
    ) as harness:
        yield harness


@pytest.fixture
def narrowed_pipeline(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PipelineHarness]:
    """``pipeline`` for one test, its stack started with the options that ``request.param`` (a
    function of the test's ``tmp_path``) returns: indirect parametrization narrows one boundary."""
    stack_options: Callable[[Path], dict[str, Any]] = request.param
    with pipeline_harness("pgsnow_narrowed", tmp_path / "stack", **stack_options(tmp_path)) as harness:
        yield harness


@pytest.fixture
def every_log_record(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record at DEBUG: the functions' Powertools logger (which does not propagate to the
    root logger) and the Snowflake connector's own included."""
    connector = logging.getLogger("snowflake.connector")
    functions = logging.getLogger(SERVICE)
    level = connector.level
    connector.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    functions.addHandler(caplog.handler)
    yield caplog
    functions.removeHandler(caplog.handler)
    connector.setLevel(level)


@pytest.fixture
def in_rolled_back_transaction(sf_conn: Any) -> Iterator[Any]:
    """The module's ``sf_conn`` in a transaction rolled back after the test: faults made in
    Snowflake through it are undone, so every case starts from the same faithful copy.

    verify creates its canonical-JSON UDF once per session, and that DDL would commit the fault,
    so the session gets it before the transaction opens.
    """
    prepare_snowflake_session(sf_conn, SNOWFLAKE_DATABASE)
    sf_conn.autocommit(False)
    try:
        yield sf_conn
    finally:
        sf_conn.rollback()
        sf_conn.autocommit(True)
