"""The local stack: every server the pipeline needs, on loopback, wired as the template declares.

``start_stack`` brings up PostgreSQL (the given DSN, the local server or the
embedded fallback), a moto server with the staging bucket, queue, dead-letter
queue and bucket notification, and the local Snowflake reading that bucket; it
then creates the Snowflake database, control schema and external stage. The
functions' handlers read their configuration through ``Settings.from_env``,
so ``LocalStack.env`` holds the variables that point them at these servers.
Used by ``pgsnow local up``, ``pgsnow demo`` and the integration tests.

IAM is enforced by the moto server, and each function runs as its own role, created from the
template's policies (``pgsnow.local.iam``): ``LocalStack.handlers()`` gives each function's
handler its role's session; ``function_client`` is that role's client for code that calls core
functions directly. ``LocalStack.aws.client`` is the local administrator's, for setting up and
inspecting only.

Each function also runs with its own environment: the variables the template gives it
(``pgsnow.local.function_env``), with this stack's values. ``LocalStack.env`` is the stack's
values for every variable (and what the CLI tools read); a handler invoked inside
``handlers()`` sees in ``os.environ`` only its function's share of it
(``pgsnow.local.scoped_environ``), so a variable the template does not give a function is
missing locally as it is deployed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pgsnow.config import Component, Settings
from pgsnow.errors import ConfigError
from pgsnow.identifiers import quote_ident, quote_qualified

if TYPE_CHECKING:  # the servers' modules are imported when a stack starts
    from pgsnow.local.aws import LocalAws, StagingResources
    from pgsnow.local.change_capture import LocalChangeCapture
    from pgsnow.local.dispatcher import SqsDispatcher
    from pgsnow.local.iam import FunctionRole
    from pgsnow.local.snowflake import LocalSnowflake
    from pgsnow.local.snowpipe import LocalSnowpipe

ProgressCallback = Callable[[str], None]

DEFAULT_BUCKET = "pgsnow-local"
DEFAULT_PREFIX = "staging"
SNOWFLAKE_DATABASE = "PGSNOW_DEMO"
# The loader's event source and timeout as the template deploys them by default (its
# LoaderBatchSize, LoaderBatchingWindowSeconds and the loader's Timeout;
# tests/unit/test_template.py checks they agree).
LOADER_BATCH_SIZE = 900
LOADER_BATCHING_WINDOW_S = 60
LOADER_TIMEOUT_S = 900
REPO_ROOT = Path(__file__).resolve().parents[3]
# Concurrent extractor invocations for parallel backfill (the template's ExtractMaxWorkers).
LOCAL_EXTRACT_WORKERS = 2


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
    # Each function's variables as the template sets them, resolved with this stack's parameters
    # (pgsnow.local.function_env.template_environment); ``function_environment`` adds ``env``'s values.
    template_environments: dict[Component, dict[str, str]] = field(default_factory=dict)

    def function_session(self, component: Component) -> Any:
        """The boto3 session of ``component``'s role (temporary, refreshing credentials)."""
        if component not in self.sessions:
            raise ConfigError([f"the local stack has no role for {component.value}"])
        return self.sessions[component]

    def function_client(self, component: Component, service: str) -> Any:
        """A client of ``component``'s role, for code that calls a core function directly."""
        return self.function_session(component).client(service)

    def function_environment(self, component: Component) -> dict[str, str]:
        """The environment ``component``'s function runs with: the variables the template gives
        it, with this stack's values (``pgsnow.local.function_env.function_environment``)."""
        from pgsnow.local.function_env import function_environment

        if component not in self.template_environments:
            raise ConfigError([f"the local stack has no template environment for {component.value}"])
        return function_environment(self.template_environments[component], self.env)

    @contextmanager
    def invocation(self, component: Component) -> Iterator[None]:
        """On this thread, ``os.environ`` is ``component``'s function environment for the duration
        (inside ``handlers()``): what one invocation of its handler sees."""
        from pgsnow.local.scoped_environ import function_scope

        with function_scope(self.function_environment(component)):
            yield

    @contextmanager
    def handlers(self) -> Iterator[None]:
        """The functions' handlers, run in this process, see this stack: a handler loaded with
        ``load_function_handler`` sees only its function's environment in ``os.environ`` while it
        runs (``invocation``), and each function builds its AWS clients from its own role's
        session. Cached handler state is reset on the way in and out, so each function's settings
        are built from its own environment by its first invocation; code that needs a function's
        runtime outside an invocation asks ``function_runtime``. This process's own environment
        is left as it is: setting a variable there does not reach the handlers (set it in
        ``env``)."""
        from pgsnow.local.scoped_environ import installed
        from pgsnow.runtime import reset_runtime, use_aws_session

        with installed(), _handlers_of(self):
            for component, session in self.sessions.items():
                use_aws_session(component, session)
            reset_runtime()
            try:
                yield
            finally:
                for component in self.sessions:
                    use_aws_session(component, None)
                reset_runtime()

    def function_runtime(self, component: Component) -> Any:
        """``component``'s cached handler runtime (``pgsnow.runtime``), built from its function
        environment if this is its first use, for code outside an invocation (inside ``handlers()``)."""
        from pgsnow import runtime

        accessors = {
            Component.EXTRACTOR: runtime.extractor_runtime,
            Component.LOADER: runtime.loader_runtime,
            Component.CLEANUP: runtime.cleanup_runtime,
            Component.CHANGE_CAPTURE: runtime.change_capture_runtime,
        }
        with self.invocation(component):
            return accessors[component]()

    def settings(self, component: Component = Component.LOCAL) -> Settings:
        """A function's settings as its handler builds them (from its function environment), or,
        for ``Component.LOCAL``, the CLI tools' (from the whole ``env``)."""
        if component is Component.LOCAL:
            return Settings.from_env(self.env, component=component)
        return Settings.from_env(self.function_environment(component), component=component)

    def snowflake_connection(self) -> Any:
        """A connection to the local Snowflake with the stack's own settings (a person's session,
        for setting up and inspecting), not a function's."""
        from pgsnow.snowflake.connection import connect

        return connect(self.settings().snowflake)

    def loader_dispatcher(
        self,
        *,
        batch_size: int = LOADER_BATCH_SIZE,
        batching_window_s: int = LOADER_BATCHING_WINDOW_S,
        handler: Callable[[dict[str, Any], Any], Any] | None = None,
    ) -> SqsDispatcher:
        """Lambda's SQS poller for the loader (default: this repository's loader handler), batching
        as the template's event source does unless told otherwise."""
        from pgsnow.local.dispatcher import SqsDispatcher

        return SqsDispatcher(
            self.aws,
            self.resources.queue_url,
            handler or load_function_handler("loader"),
            batch_size=batch_size,
            batching_window_s=batching_window_s,
            function_timeout_s=LOADER_TIMEOUT_S,
        )

    def change_capture(self, *, interval_s: float = 60.0, **options: Any) -> LocalChangeCapture:
        """The change-capture function's schedule (``pgsnow.local.change_capture``): ``run_once()``
        on demand or ``start()`` every ``interval_s``, as ``ChangeCaptureFunction`` with its role."""
        from pgsnow.local.change_capture import LocalChangeCapture

        return LocalChangeCapture(self, interval_s=interval_s, **options)

    def stop(self) -> None:
        while self._stoppers:
            self._stoppers.pop()()


# The function each handler in this repository is: the template's CodeUri folder and Handler
# (tests/unit/test_function_env_from_template.py checks them against template.yaml).
FUNCTION_HANDLERS: Mapping[tuple[str, str], Component] = {
    ("extractor", "handler"): Component.EXTRACTOR,
    ("extractor", "change_capture_handler"): Component.CHANGE_CAPTURE,
    ("loader", "handler"): Component.LOADER,
    ("cleanup", "handler"): Component.CLEANUP,
}

# The stacks whose handlers() are in place, innermost last: invocations see the last one's.
_handler_stacks: list[LocalStack] = []
_handler_stacks_lock = threading.Lock()


@contextmanager
def _handlers_of(stack: LocalStack) -> Iterator[None]:
    with _handler_stacks_lock:
        _handler_stacks.append(stack)
    try:
        yield
    finally:
        with _handler_stacks_lock:
            _handler_stacks.remove(stack)


@dataclass(frozen=True)
class FunctionHandler:
    """A function's handler as the local stack invokes it: inside a stack's ``handlers()``, each
    call runs with that function's environment (``LocalStack.invocation``); outside, as it is
    (tests that set up the process environment themselves)."""

    component: Component
    handler: Callable[[dict[str, Any], Any], Any]

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        with _handler_stacks_lock:
            stack = _handler_stacks[-1] if _handler_stacks else None
        if stack is None:
            return self.handler(event, context)
        with stack.invocation(self.component):
            return self.handler(event, context)


def load_function_handler(function: str, name: str = "handler") -> FunctionHandler:
    """The handler ``name`` of a SAM function's ``{function}/app.py`` in this repository (the
    change-capture function's is ``change_capture_handler`` in the extractor's code), invoked
    with its function's environment inside a stack's ``handlers()``."""
    component = FUNCTION_HANDLERS.get((function, name))
    if component is None:
        raise ConfigError([f"{function}/app.py:{name} is not one of the template's functions"])
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
    handler: Callable[[dict[str, Any], Any], Any] | None = getattr(module, name, None)
    if handler is None:
        raise ConfigError([f"{path} has no {name}"])
    return FunctionHandler(component, handler)


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
    """The stack's values of the variables the functions and the CLI tools read, pointing at the
    local servers (each function gets its share: ``LocalStack.function_environment``)."""
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


class StorageAccess(StrEnum):
    """How the local Snowflake is allowed to read the staging bucket, as a deployment chooses."""

    # A storage integration: Snowflake's IAM user assumes the template's storage role (with the
    # integration's external ID) and may read only the integration's allowed locations.
    INTEGRATION = "integration"
    # The credentials method (no integration): the loader hands Snowflake its own role's
    # temporary credentials in a temporary stage (docs/deploy.md).
    CREDENTIALS = "credentials"


LOCAL_STORAGE_INTEGRATION = "PGSNOW_S3"


def create_snowflake_objects(sf_conn: Any, settings: Settings) -> None:
    """The target database and the control schema, and the external stage when an integration is
    configured, created with the statement ``pgsnow snowflake-sql`` prints.

    The stage is replaced on every start: one kept in ``data_dir`` from an earlier start may name
    another bucket or no integration. The credentials method needs no permanent stage: the
    loader's temporary stage hides any left from an earlier start, in its own session."""
    from pgsnow.snowflake.load_sql import build_create_stage

    database = settings.snowflake.database or SNOWFLAKE_DATABASE
    control = settings.snowflake.control_schema
    cur = sf_conn.cursor()
    try:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)}")
        cur.execute(f"USE DATABASE {quote_ident(database)}")
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_qualified(database, control)}")
        if settings.snowflake.storage_integration:
            cur.execute(
                build_create_stage(
                    database,
                    control,
                    settings.snowflake.stage,
                    bucket=settings.bucket,
                    prefix=settings.prefix,
                    storage_integration=settings.snowflake.storage_integration,
                    replace=True,
                )
            )
    finally:
        cur.close()


def create_storage_integration(
    sf_conn: Any,
    aws: Any,
    resources: Any,
    *,
    template_path: Path | None,
    parameters: Mapping[str, str],
    allowed_locations: Sequence[str] | None = None,
) -> str:
    """The storage integration and the role it assumes, as docs/deploy.md sets them up.

    Runs ``pgsnow snowflake-sql``'s own statements (CREATE STORAGE INTEGRATION, its ALTER, DESC
    INTEGRATION) on the local Snowflake, then creates the template's ``SnowflakeStorageRole`` in moto
    with the IAM user and external ID that DESC reported - the template's second deploy.
    ``allowed_locations`` replaces the integration's locations (tests narrow them on purpose).
    Returns the integration's name."""
    from pgsnow.local.iam import create_storage_role, expected_storage_role_arn
    from pgsnow.setup_sql import SetupOptions, build_setup_steps
    from pgsnow.snowflake.sql_text import string_literal

    role_arn = expected_storage_role_arn(aws, resources, template_path=template_path, params=parameters)
    options = SetupOptions(
        database=SNOWFLAKE_DATABASE,
        schema="PGSNOW",
        role="PGSNOW_LOADER",
        bucket=resources.bucket,
        prefix=resources.prefix,
        integration=LOCAL_STORAGE_INTEGRATION,
        aws_role_arn=role_arn,
    )
    integration_statements = [
        statement
        for step in build_setup_steps(options)
        for statement in step.statements
        if "STORAGE INTEGRATION" in statement or statement.startswith("DESC INTEGRATION")
    ]
    if allowed_locations is not None:
        integration_statements.insert(
            -1,
            f"ALTER STORAGE INTEGRATION {quote_ident(LOCAL_STORAGE_INTEGRATION)} SET STORAGE_ALLOWED_LOCATIONS = "
            f"({', '.join(string_literal(url) for url in allowed_locations)})",
        )
    cur = sf_conn.cursor()
    try:
        for statement in integration_statements:
            cur.execute(statement)
        described = {str(row[0]): str(row[2]) for row in cur.fetchall()}
    finally:
        cur.close()
    create_storage_role(
        aws,
        iam_user_arn=described["STORAGE_AWS_IAM_USER_ARN"],
        external_id=described["STORAGE_AWS_EXTERNAL_ID"],
        params=parameters,
        resources=resources,
        template_path=template_path,
    )
    return LOCAL_STORAGE_INTEGRATION


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
    storage_access: StorageAccess = StorageAccess.INTEGRATION,
    storage_allowed_prefixes: Sequence[str] | None = None,
    extract_workers: int = LOCAL_EXTRACT_WORKERS,
) -> LocalStack:
    """Start every local server and create the AWS and Snowflake objects; ``stop()`` ends them.

    The local Snowflake reads S3 only as Snowflake would: through the storage integration and
    the template's storage role (``storage_access=INTEGRATION``, allowed locations as ``pgsnow
    snowflake-sql`` prints them unless ``storage_allowed_prefixes`` in the bucket replace them),
    or with the loader's own temporary credentials (``CREDENTIALS``, no integration).

    The bucket notification and the functions' roles come from ``template_path`` (default: the
    repository's ``template.yaml``); ``template_parameters`` are deploy-time parameter values the
    roles depend on (e.g. ``CleanupArchivePrefix``), over ``pgsnow.local.iam.stack_parameters``.
    ``extract_workers`` is the template's ExtractMaxWorkers: above 1, large runs are split into
    ranges sent to the range queue, which ``pgsnow.local.range_workers`` delivers to that many
    concurrent extractor invocations.
    """
    from pgsnow.local.function_env import template_environments
    from pgsnow.local.postgres import start_local_postgres

    stoppers: list[Callable[[], None]] = []
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        progress("starting PostgreSQL")
        postgres = start_local_postgres(pg_dsn, data_dir / "pgdata")
        stoppers.append(postgres.stop)
        aws_side = _start_aws_side(
            stoppers,
            progress,
            bucket=bucket,
            visibility_timeout=visibility_timeout,
            max_receive_count=max_receive_count,
            template_path=template_path,
            template_parameters={"ExtractMaxWorkers": str(extract_workers), **(template_parameters or {})},
        )
        aws, resources = aws_side.aws, aws_side.resources
        snowflake, snowpipe = _start_snowflake_side(stoppers, progress, aws, data_dir)
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
        # As the template sets them: the range queue exists (and the role may use it) above one worker.
        workers = int(aws_side.parameters.get("ExtractMaxWorkers", "1"))
        env["EXTRACT_MAX_WORKERS"] = str(workers)
        env["EXTRACT_RANGE_QUEUE_URL"] = resources.range_queue_url if workers > 1 else ""
        stack = LocalStack(
            postgres.dsn,
            aws,
            resources,
            snowflake,
            env,
            stoppers,
            snowpipe,
            aws_side.roles,
            aws_side.sessions,
            template_environments(
                resources, aws_side.parameters, template_path=template_path, region=aws.region
            ),
        )
        _prepare_snowflake(
            stack,
            progress,
            storage_access=storage_access,
            storage_allowed_prefixes=storage_allowed_prefixes,
            template_path=template_path,
            parameters=aws_side.parameters,
        )
        return stack
    except BaseException:
        for stop in reversed(stoppers):
            stop()
        raise


@dataclass(frozen=True)
class _AwsSide:
    aws: LocalAws
    resources: StagingResources
    parameters: dict[str, str]
    roles: dict[Component, FunctionRole]
    sessions: dict[Component, Any]


def _start_aws_side(
    stoppers: list[Callable[[], None]],
    progress: ProgressCallback,
    *,
    bucket: str,
    visibility_timeout: int,
    max_receive_count: int,
    template_path: Path | None,
    template_parameters: Mapping[str, str] | None,
) -> _AwsSide:
    """The moto server, the staging resources the template declares, and the functions' roles."""
    from pgsnow.local.aws import create_staging_resources, start_local_aws
    from pgsnow.local.iam import create_function_roles, role_session, stack_parameters

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
    parameters = stack_parameters(resources, **(template_parameters or {}))
    roles = create_function_roles(aws, resources, template_path=template_path, parameters=parameters)
    sessions = {
        component: role_session(aws, role.arn, f"pgsnow-local-{component.value}")
        for component, role in roles.items()
    }
    return _AwsSide(aws, resources, parameters, roles, sessions)


def _start_snowflake_side(
    stoppers: list[Callable[[], None]], progress: ProgressCallback, aws: LocalAws, data_dir: Path
) -> tuple[LocalSnowflake, LocalSnowpipe]:
    """The local Snowflake, reading S3 as Snowflake's own AWS principal, and its Snowpipe endpoint."""
    from pgsnow.local.iam import create_snowflake_user
    from pgsnow.local.sf_access import SnowflakeAwsIdentity
    from pgsnow.local.snowflake import start_local_snowflake
    from pgsnow.local.snowpipe import start_local_snowpipe

    progress("starting the local Snowflake (it reads S3 only as its stages allow)")
    # Snowflake's own AWS principal: the IAM user a storage integration reports, which may
    # only assume roles that trust it.
    snowflake_user = create_snowflake_user(aws)
    snowflake = start_local_snowflake(
        s3_endpoint_url=aws.endpoint_url,
        region=aws.region,
        data_dir=data_dir / "snowflake",
        snowflake_aws_identity=SnowflakeAwsIdentity(
            snowflake_user.arn, snowflake_user.access_key_id, snowflake_user.secret_access_key
        ),
    )
    stoppers.append(snowflake.stop)
    progress("starting the local Snowpipe REST endpoint")
    snowpipe = start_local_snowpipe(snowflake)
    stoppers.append(snowpipe.stop)
    return snowflake, snowpipe


def _prepare_snowflake(
    stack: LocalStack,
    progress: ProgressCallback,
    *,
    storage_access: StorageAccess,
    storage_allowed_prefixes: Sequence[str] | None,
    template_path: Path | None,
    parameters: dict[str, str],
) -> None:
    """The storage integration (or none, for the credentials method) and the loader's objects."""
    env, aws, resources = stack.env, stack.aws, stack.resources
    sf_conn = stack.snowflake_connection()
    try:
        if storage_access is StorageAccess.INTEGRATION:
            progress("creating the storage integration and the role it assumes")
            env["SNOWFLAKE_STORAGE_INTEGRATION"] = create_storage_integration(
                sf_conn,
                aws,
                resources,
                template_path=template_path,
                parameters=parameters,
                allowed_locations=None
                if storage_allowed_prefixes is None
                else [f"s3://{resources.bucket}/{prefix}" for prefix in storage_allowed_prefixes],
            )
        else:
            env["SNOWFLAKE_STORAGE_INTEGRATION"] = ""
        # The stack's own values, as a person runs `pgsnow snowflake-sql`: a template that forgets
        # a loader variable must fail the loader, not the set-up.
        create_snowflake_objects(sf_conn, stack.settings())
    finally:
        sf_conn.close()
