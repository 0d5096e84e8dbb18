"""The local stack: every server the pipeline needs, on loopback, wired as the template declares.

``start_stack`` brings up PostgreSQL (the given DSN, the local server or the
embedded fallback), a moto server with the staging bucket, queue, dead-letter
queue and bucket notification, and the local Snowflake reading that bucket; it
then creates the Snowflake database, control schema and external stage. The
functions' handlers read their configuration through ``Settings.from_env``,
so ``LocalStack.env`` holds the variables that point them at these servers.
Used by ``pgsnow local up``, ``pgsnow demo`` and the integration tests.

IAM is enforced by the moto server, and each function runs as its own role, created from the
template's policies (``pgsnow.local.iam``): ``LocalStack.handlers()`` puts the environment in
place and gives each function's handler its role's session; ``function_client`` is that
role's client for code that calls core functions directly. ``LocalStack.aws.client`` is the
local administrator's, for setting up and inspecting only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pgsnow.config import Component, Settings
from pgsnow.errors import ConfigError
from pgsnow.identifiers import quote_ident, quote_qualified

ProgressCallback = Callable[[str], None]

DEFAULT_BUCKET = "pgsnow-local"
DEFAULT_PREFIX = "staging"
SNOWFLAKE_DATABASE = "PGSNOW_DEMO"
REPO_ROOT = Path(__file__).resolve().parents[3]


def _quiet(_message: str) -> None:
    return None


@dataclass
class LocalStack:
    """Every local server the pipeline needs, and the environment the handlers read."""

    pg_dsn: str
    aws: Any  # pgsnow.local.aws.LocalAws
    resources: Any  # pgsnow.local.aws.StagingResources
    snowflake: Any  # pgsnow.local.snowflake.LocalSnowflake
    env: dict[str, str]
    _stoppers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    snowpipe: Any = None  # pgsnow.local.snowpipe.LocalSnowpipe (its url is SNOWPIPE_HOST)
    roles: dict[Component, Any] = field(default_factory=dict)  # pgsnow.local.iam.FunctionRole
    sessions: dict[Component, Any] = field(default_factory=dict, repr=False)  # the roles' boto3 sessions

    def function_session(self, component: Component) -> Any:
        """The boto3 session of ``component``'s role (temporary, refreshing credentials)."""
        if component not in self.sessions:
            raise ConfigError([f"the local stack has no role for {component.value}"])
        return self.sessions[component]

    def function_client(self, component: Component, service: str) -> Any:
        """A client of ``component``'s role, for code that calls a core function directly."""
        return self.function_session(component).client(service)

    @contextmanager
    def handlers(self) -> Iterator[None]:
        """The functions' handlers, run in this process, see this stack: its environment is in
        ``os.environ`` and each function builds its AWS clients from its own role's session.
        Cached handler state is reset on the way in and out."""
        from pgsnow.runtime import reset_runtime, use_aws_session

        with process_environment(self.env):
            for component, session in self.sessions.items():
                use_aws_session(component, session)
            reset_runtime()
            try:
                yield
            finally:
                for component in self.sessions:
                    use_aws_session(component, None)
                reset_runtime()

    def settings(self, component: Component = Component.LOCAL) -> Settings:
        return Settings.from_env(self.env, component=component)

    def snowflake_connection(self) -> Any:
        from pgsnow.snowflake import connect

        return connect(self.settings(Component.LOADER).snowflake)

    def stop(self) -> None:
        while self._stoppers:
            self._stoppers.pop()()


def load_function_handler(function: str) -> Callable[[dict[str, Any], Any], Any]:
    """The ``handler`` of a SAM function's ``{function}/app.py`` in this repository."""
    path = REPO_ROOT / function / "app.py"
    if not path.is_file():
        raise ConfigError(
            [f"the {function} function's handler {path} is missing (run from a pgsnow checkout)"]
        )
    module_name = f"pgsnow_function_{function}_app"
    module: ModuleType | None = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError([f"cannot import {path}"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    handler: Callable[[dict[str, Any], Any], Any] = module.handler
    return handler


@contextmanager
def process_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration, then restore what was there before."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def stack_environment(
    *, pg_dsn: str, aws: Any, bucket: str, prefix: str, snowflake: Any, file_format: str, tables: str
) -> dict[str, str]:
    """The variables the extractor, loader and cleanup read, pointing at the local servers."""
    connect_kwargs = snowflake.connect_kwargs(database=SNOWFLAKE_DATABASE)
    return {
        **aws.env(),
        "S3_STAGE_BUCKET": bucket,
        "S3_STAGE_PREFIX": prefix,
        "S3_FILE_FORMAT": file_format,
        "PGSNOW_TABLES": tables,
        "PGSNOW_PG_DSN": pg_dsn,
        "CLEANUP_S3_FILES": "after_all",
        "SNOWFLAKE_ACCOUNT": str(connect_kwargs.get("account", "fakesnow")),
        "SNOWFLAKE_USER": str(connect_kwargs.get("user", "fake")),
        "SNOWFLAKE_PASSWORD": str(connect_kwargs.get("password", "snow")),
        "SNOWFLAKE_DATABASE": SNOWFLAKE_DATABASE,
        "SNOWFLAKE_HOST": str(snowflake.host),
        "SNOWFLAKE_PORT": str(snowflake.port),
        "SNOWFLAKE_PROTOCOL": "http",
        "POWERTOOLS_METRICS_NAMESPACE": "pgsnow",
        # EMF lines are for CloudWatch; locally they would only bury the report.
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_SERVICE_NAME": "pgsnow",
    }


def create_snowflake_objects(sf_conn: Any, settings: Settings) -> None:
    """The target database, the control schema and the external stage over the staging prefix."""
    database = settings.snowflake.database or SNOWFLAKE_DATABASE
    control = settings.snowflake.control_schema
    # The stage URL cannot be bound; it is built from our validated bucket name and prefix.
    url = f"s3://{settings.bucket}/{settings.prefix}/".replace("'", "''")
    cur = sf_conn.cursor()
    try:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)}")
        cur.execute(f"USE DATABASE {quote_ident(database)}")
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_qualified(database, control)}")
        cur.execute(
            f"CREATE STAGE IF NOT EXISTS {quote_qualified(database, control, settings.snowflake.stage)} URL='{url}'"
        )
    finally:
        cur.close()


def start_stack(
    *,
    pg_dsn: str | None,
    data_dir: Path,
    file_format: str = "csv",
    tables: str = "*",
    bucket: str = DEFAULT_BUCKET,
    visibility_timeout: int = 30,
    max_receive_count: int = 3,
    progress: ProgressCallback = _quiet,
    template_path: Path | None = None,
    template_parameters: Mapping[str, str] | None = None,
) -> LocalStack:
    """Start every local server and create the AWS and Snowflake objects; ``stop()`` ends them.

    The bucket notification and the functions' roles come from ``template_path`` (default: the
    repository's ``template.yaml``); ``template_parameters`` are deploy-time parameter values
    the roles depend on (e.g. ``CleanupArchivePrefix``), over the stack's own
    (``pgsnow.local.iam.stack_parameters``).
    """
    from pgsnow.local.aws import create_staging_resources, start_local_aws
    from pgsnow.local.iam import create_function_roles, role_session, stack_parameters
    from pgsnow.local.postgres import start_local_postgres
    from pgsnow.local.snowflake import start_local_snowflake
    from pgsnow.local.snowpipe import start_local_snowpipe

    stoppers: list[Callable[[], None]] = []
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        progress("starting PostgreSQL")
        postgres = start_local_postgres(pg_dsn, data_dir / "pgdata")
        stoppers.append(postgres.stop)
        progress("starting the moto server (S3, SQS, IAM enforced)")
        aws = start_local_aws()
        stoppers.append(aws.stop)
        resources = create_staging_resources(
            aws,
            bucket=bucket,
            prefix=DEFAULT_PREFIX,
            visibility_timeout=visibility_timeout,
            max_receive_count=max_receive_count,
            template_path=template_path,
        )
        progress("creating the functions' roles from the template")
        roles = create_function_roles(
            aws,
            resources,
            template_path=template_path,
            parameters=stack_parameters(resources, **(template_parameters or {})),
        )
        sessions = {
            component: role_session(aws, role.arn, f"pgsnow-local-{component.value}")
            for component, role in roles.items()
        }
        progress("starting the local Snowflake")
        snowflake = start_local_snowflake(
            s3_endpoint_url=aws.endpoint_url,
            aws_access_key_id=aws.access_key_id,
            aws_secret_access_key=aws.secret_access_key,
            region=aws.region,
            data_dir=data_dir / "snowflake",
        )
        stoppers.append(snowflake.stop)
        progress("starting the local Snowpipe REST endpoint")
        snowpipe = start_local_snowpipe(snowflake)
        stoppers.append(snowpipe.stop)
        env = stack_environment(
            pg_dsn=postgres.dsn,
            aws=aws,
            bucket=resources.bucket,
            prefix=resources.prefix,
            snowflake=snowflake,
            file_format=file_format,
            tables=tables,
        )
        # LOAD_METHOD=snowpipe reaches the local endpoint here (it also needs SNOWPIPE_NAME and a key).
        env["SNOWPIPE_HOST"] = snowpipe.url
        stack = LocalStack(postgres.dsn, aws, resources, snowflake, env, stoppers, snowpipe, roles, sessions)
        sf_conn = stack.snowflake_connection()
        try:
            create_snowflake_objects(sf_conn, stack.settings(Component.LOADER))
        finally:
            sf_conn.close()
        return stack
    except BaseException:
        for stop in reversed(stoppers):
            stop()
        raise
