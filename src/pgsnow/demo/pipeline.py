"""The demo: the whole pipeline on loopback servers, table by table, checked cell by cell.

``start_stack`` brings up PostgreSQL (the given DSN, the local server or the
embedded fallback), a moto server with the staging bucket, queue and bucket
notification, and the local Snowflake reading that bucket; it then creates
the Snowflake database, control schema and external stage. ``run_demo``
replicates each table the way the deployed functions do: the real extractor
stages files, the bucket notification puts S3 events on SQS, the dispatcher
delivers them to the real loader handler, the real cleanup handler runs, and
``compare_table`` checks the result.

The handlers read their configuration through ``Settings.from_env``, so the
stack's settings are put into this process's environment while it runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pgsnow.config import Component, Settings
from pgsnow.demo.compare import TableComparison, compare_table
from pgsnow.demo.dataset import SAMPLE_TABLES, create_sample_shop
from pgsnow.errors import ConfigError
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.keys import FileFormat

ProgressCallback = Callable[[str], None]

DEMO_DATABASE = "pgsnow_demo"  # the PostgreSQL database the sample shop goes into
DEMO_SCHEMA = "shop"
DEMO_BUCKET = "pgsnow-demo"
DEMO_PREFIX = "staging"
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
    progress: ProgressCallback = _quiet,
) -> LocalStack:
    """Start every local server and create the AWS and Snowflake objects; ``stop()`` ends them."""
    from pgsnow.local.aws import create_staging_resources, start_local_aws
    from pgsnow.local.postgres import start_local_postgres
    from pgsnow.local.snowflake import start_local_snowflake

    stoppers: list[Callable[[], None]] = []
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        progress("starting PostgreSQL")
        postgres = start_local_postgres(pg_dsn, data_dir / "pgdata")
        stoppers.append(postgres.stop)
        progress("starting the moto server (S3, SQS)")
        aws = start_local_aws()
        stoppers.append(aws.stop)
        resources = create_staging_resources(aws, bucket=DEMO_BUCKET, prefix=DEMO_PREFIX)
        progress("starting the local Snowflake")
        snowflake = start_local_snowflake(
            s3_endpoint_url=aws.endpoint_url,
            aws_access_key_id=aws.access_key_id,
            aws_secret_access_key=aws.secret_access_key,
            region=aws.region,
            data_dir=data_dir / "snowflake",
        )
        stoppers.append(snowflake.stop)
        env = stack_environment(
            pg_dsn=postgres.dsn,
            aws=aws,
            bucket=resources.bucket,
            prefix=resources.prefix,
            snowflake=snowflake,
            file_format=file_format,
            tables=tables,
        )
        stack = LocalStack(postgres.dsn, aws, resources, snowflake, env, stoppers)
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


def list_schema_tables(dsn: str, schema: str) -> list[TableRef]:
    """The ordinary and partitioned tables of ``schema``, by name."""
    from pgsnow.postgres import connect

    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                ORDER BY c.relname
                """,
                (schema,),
            )
            return [TableRef(schema, name) for (name,) in cur.fetchall()]
    finally:
        conn.close()


def _prepare_source(
    *,
    admin_dsn: str,
    tables: list[TableRef] | None,
    schema: str | None,
    use_sample: bool,
    scale: float,
    progress: ProgressCallback,
) -> tuple[str, list[TableRef]]:
    """The DSN and tables to replicate, creating the sample shop when nothing was named."""
    if use_sample:
        from pgsnow.local.postgres import create_database

        dsn = create_database(admin_dsn, DEMO_DATABASE)
        progress(f"creating the sample shop (scale {scale}) in database {DEMO_DATABASE}")
        create_sample_shop(dsn, DEMO_SCHEMA, scale=scale, progress=progress)
        return dsn, [TableRef(DEMO_SCHEMA, name) for name in SAMPLE_TABLES]
    if tables:
        return admin_dsn, tables
    found = list_schema_tables(admin_dsn, schema or "public")
    if not found:
        raise ConfigError([f"schema {schema or 'public'!r} has no tables to replicate"])
    return admin_dsn, found


def replicate_table(stack: LocalStack, table: TableRef, file_format: FileFormat, dispatcher: Any) -> None:
    """Extract ``table``, let the queue deliver its files to the loader, then run cleanup."""
    from pgsnow.extract import extract_table
    from pgsnow.local.dispatcher import LambdaContext
    from pgsnow.postgres import connect

    pg_conn = connect(stack.pg_dsn)
    try:
        extract_table(
            settings=stack.settings(Component.EXTRACTOR),
            pg_conn=pg_conn,
            s3=stack.aws.client("s3"),
            table=table,
            file_format=file_format,
        )
    finally:
        pg_conn.close()
    dispatcher.run_until_idle()
    cleanup = load_function_handler("cleanup")
    context = LambdaContext(
        function_name="pgsnow-cleanup",
        invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:pgsnow-cleanup",
        memory_limit_in_mb=512,
        deadline_monotonic=time.monotonic() + 300,
    )
    cleanup({"schema_name": table.schema, "table_name": table.table}, context)


def run_demo(
    *,
    pg_dsn: str | None,
    tables: list[TableRef] | None,
    schema: str | None,
    file_format: str,
    data_dir: Path,
    progress: ProgressCallback | None = None,
    scale: float = 1.0,
) -> list[TableComparison]:
    """Replicate each table through the local pipeline and compare it with its source."""
    from pgsnow.local.dispatcher import SqsDispatcher
    from pgsnow.postgres import connect
    from pgsnow.runtime import reset_runtime

    report = progress or _quiet
    chosen_format = FileFormat(file_format)
    use_sample = pg_dsn is None and not tables and schema is None
    stack = start_stack(pg_dsn=pg_dsn, data_dir=data_dir, file_format=chosen_format.value, progress=report)
    try:
        source_dsn, chosen = _prepare_source(
            admin_dsn=stack.pg_dsn,
            tables=tables,
            schema=schema,
            use_sample=use_sample,
            scale=scale,
            progress=report,
        )
        stack.pg_dsn = source_dsn
        stack.env["PGSNOW_PG_DSN"] = source_dsn
        stack.env["PGSNOW_TABLES"] = ",".join(t.qualified for t in chosen)
        results: list[TableComparison] = []
        with process_environment(stack.env):
            reset_runtime()  # the handlers cache settings; make them read this stack's
            dispatcher = SqsDispatcher(stack.aws, stack.resources.queue_url, load_function_handler("loader"))
            sf_conn = stack.snowflake_connection()
            pg_conn = connect(source_dsn)
            try:
                for table in chosen:
                    started = time.monotonic()
                    report(f"replicating {table.qualified} ({chosen_format.value})")
                    replicate_table(stack, table, chosen_format, dispatcher)
                    report(f"comparing {table.qualified}")
                    results.append(compare_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE))
                    report(f"{table.qualified} done in {time.monotonic() - started:.1f}s")
            finally:
                pg_conn.close()
                sf_conn.close()
                reset_runtime()
        return results
    finally:
        stack.stop()
