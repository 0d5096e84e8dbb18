"""The local stack enforces IAM: each function runs with exactly its template permissions.

* the moto server refuses anything but a known IAM identity's signature;
* each function role allows what template.yaml gives that function, and refuses the rest;
* a template with one permission removed makes the pipeline fail with AccessDenied naming the
  action (issue 11 item 3), and a template without the loader's manifest write leaves runs
  ``staged`` - the bug IAM enforcement exposed;
* conditional writes to the local S3 are atomic: one writer wins per base ETag;
* the Snowflake storage role is the template's, assumable only with the external id.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from psycopg2 import sql
from stack_support import autocommit_connection, new_source_schema, running_stack

from pgsnow.config import Component, Settings
from pgsnow.errors import PermanentError, PgSnowError
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat
from pgsnow.local.aws import (
    REPO_TEMPLATE,
    LocalAws,
    StagingResources,
    create_staging_resources,
)
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.iam import (
    FunctionRole,
    create_function_roles,
    create_snowflake_user,
    create_storage_role,
    role_session,
    stack_parameters,
)
from pgsnow.local.stack import LocalStack, load_function_handler
from pgsnow.manifest import RunState
from pgsnow.postgres import connect
from pgsnow.runs import RunStore
from pgsnow.runtime import Runtime

pytestmark = pytest.mark.integration

STAGED_KEY = "staging/public/orders/public_orders_batch1_20261206T000000000000Z.csv.gz"
MANIFEST_KEY = "_pgsnow/manifests/public/orders/20261206T000000000000Z.json"
STATE_KEY = "_pgsnow/state/public/orders/lease.json"


# --------------------------------------------------------------------------- moto and roles only


@pytest.fixture(scope="module")
def staging(aws: LocalAws) -> StagingResources:
    return create_staging_resources(aws, bucket="pgsnow-iam-roles")


@pytest.fixture(scope="module")
def roles(aws: LocalAws, staging: StagingResources) -> dict[Component, FunctionRole]:
    return create_function_roles(aws, staging)


@pytest.fixture(scope="module")
def role_s3(aws: LocalAws, roles: dict[Component, FunctionRole]) -> dict[Component, Any]:
    return {
        component: role_session(aws, role.arn, f"test-{component.value}").client("s3")
        for component, role in roles.items()
    }


def refusal(call: Any) -> str:
    """The error code and message of a call expected to be refused."""
    with pytest.raises(ClientError) as caught:
        call()
    error = caught.value.response["Error"]
    return f"{error.get('Code')}: {error.get('Message')}"


def test_only_known_iam_identities_are_let_in(aws: LocalAws) -> None:
    # Given clients with moto's conventional fake keys and with the local administrator's keys
    fake = boto3.client(
        "s3",
        endpoint_url=aws.endpoint_url,
        region_name=aws.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    # Then the fake keys are refused and the administrator's are not
    assert refusal(fake.list_buckets).startswith("InvalidAccessKeyId")
    assert aws.access_key_id.startswith("AKIA")
    assert aws.admin_user_arn.endswith(":user/pgsnow-local-admin")
    assert "Buckets" in aws.client("s3").list_buckets()


def test_roles_carry_the_templates_statements(roles: dict[Component, FunctionRole], aws: LocalAws) -> None:
    iam = aws.client("iam")
    for role in roles.values():
        stored = iam.get_role_policy(RoleName=role.name, PolicyName="template-inline")["PolicyDocument"]
        stored = json.loads(stored) if isinstance(stored, str) else stored
        assert stored["Statement"] == list(role.statements)
        trust = iam.get_role(RoleName=role.name)["Role"]["AssumeRolePolicyDocument"]
        trust = json.loads(trust) if isinstance(trust, str) else trust
        # locally the administrator stands in for lambda.amazonaws.com
        assert trust["Statement"][0]["Principal"] == {"AWS": aws.admin_user_arn}
    sids = {s.get("Sid") for s in roles[Component.LOADER].statements}
    assert {"ReadStagedFilesAndRunRecords", "ListStage", "MarkRunsLoaded"} <= sids


@pytest.mark.parametrize(
    ("component", "operation", "key", "allowed"),
    [
        pytest.param(Component.LOADER, "get", STAGED_KEY, True, id="loader-reads-staged"),
        pytest.param(Component.LOADER, "head", STAGED_KEY, True, id="loader-heads-staged"),
        pytest.param(Component.LOADER, "put", MANIFEST_KEY, True, id="loader-writes-manifest"),
        pytest.param(Component.LOADER, "delete", STAGED_KEY, False, id="loader-cannot-delete"),
        pytest.param(Component.LOADER, "put", STAGED_KEY, False, id="loader-cannot-stage"),
        pytest.param(Component.LOADER, "put", STATE_KEY, False, id="loader-cannot-write-state"),
        pytest.param(Component.EXTRACTOR, "put", STAGED_KEY, True, id="extractor-stages"),
        pytest.param(Component.EXTRACTOR, "put", STATE_KEY, True, id="extractor-writes-state"),
        pytest.param(Component.EXTRACTOR, "delete", STATE_KEY, True, id="extractor-clears-state"),
        pytest.param(Component.EXTRACTOR, "delete", STAGED_KEY, False, id="extractor-cannot-delete"),
        pytest.param(Component.EXTRACTOR, "put", "elsewhere/x.csv", False, id="extractor-only-its-prefixes"),
        pytest.param(Component.CLEANUP, "delete", STAGED_KEY, True, id="cleanup-deletes"),
        pytest.param(Component.CLEANUP, "get-version", STAGED_KEY, True, id="cleanup-reads-versions"),
        pytest.param(Component.CLEANUP, "delete-objects", STAGED_KEY, True, id="cleanup-deletes-in-bulk"),
        pytest.param(Component.LOADER, "delete-objects", STAGED_KEY, False, id="loader-cannot-bulk-delete"),
        pytest.param(Component.CHANGE_CAPTURE, "put", STAGED_KEY, True, id="change-capture-stages"),
        pytest.param(
            Component.CHANGE_CAPTURE,
            "put",
            "_pgsnow/cdc/pgsnow/state.json",
            True,
            id="change-capture-drain-state",
        ),
        pytest.param(
            Component.CHANGE_CAPTURE, "put", MANIFEST_KEY, True, id="change-capture-writes-manifest"
        ),
        pytest.param(
            Component.CHANGE_CAPTURE, "delete", STAGED_KEY, False, id="change-capture-cannot-delete"
        ),
        pytest.param(
            Component.CHANGE_CAPTURE, "put", "elsewhere/x.csv", False, id="change-capture-only-its-prefixes"
        ),
    ],
)
def test_each_role_may_do_what_the_template_allows_and_nothing_else(
    aws: LocalAws,
    staging: StagingResources,
    role_s3: dict[Component, Any],
    component: Component,
    operation: str,
    key: str,
    allowed: bool,
) -> None:
    # Given the object in place (written by the administrator)
    bucket = staging.bucket
    version = aws.client("s3").put_object(Bucket=bucket, Key=key, Body=b"x")["VersionId"]
    s3 = role_s3[component]
    calls = {
        "get": lambda: s3.get_object(Bucket=bucket, Key=key),
        "head": lambda: s3.head_object(Bucket=bucket, Key=key),
        "put": lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"y"),
        "delete": lambda: s3.delete_object(Bucket=bucket, Key=key),
        "get-version": lambda: s3.get_object(Bucket=bucket, Key=key, VersionId=version),
        "delete-objects": lambda: _delete_objects_or_raise(s3, bucket, key, version),
    }
    # When the role makes the call / Then the template decides
    if allowed:
        calls[operation]()
    else:
        message = refusal(calls[operation])
        assert message.startswith("AccessDenied")


def _delete_objects_or_raise(s3: Any, bucket: str, key: str, version: str) -> None:
    errors = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key, "VersionId": version}]}).get(
        "Errors", []
    )
    if errors:
        raise ClientError(
            {"Error": {"Code": errors[0]["Code"], "Message": errors[0]["Message"]}}, "DeleteObjects"
        )


def test_a_refusal_names_the_action_and_the_resource(
    staging: StagingResources, role_s3: dict[Component, Any]
) -> None:
    message = refusal(lambda: role_s3[Component.LOADER].delete_object(Bucket=staging.bucket, Key=STAGED_KEY))
    assert "s3:DeleteObject" in message
    assert f"arn:aws:s3:::{staging.bucket}/{STAGED_KEY}" in message
    assert "assumed-role/" in message


def test_role_credentials_refresh_before_they_expire(
    aws: LocalAws, roles: dict[Component, FunctionRole]
) -> None:
    # Given a role session whose credentials are about to expire
    session = role_session(aws, roles[Component.LOADER].arn, "test-refresh")
    credentials = session.get_credentials()
    assert credentials is not None
    first_key = credentials.get_frozen_credentials().access_key
    credentials._expiry_time = credentials._expiry_time.replace(year=2000)  # type: ignore[attr-defined]
    # When it is used again
    session.client("sts").get_caller_identity()
    # Then it assumed the role anew
    assert credentials.get_frozen_credentials().access_key != first_key


def test_only_the_extractor_reads_the_postgres_secret(aws: LocalAws) -> None:
    # Given the PostgreSQL secret in Secrets Manager and roles whose template parameters name it
    secret_arn = aws.client("secretsmanager").create_secret(
        Name="pgsnow/local/postgres",
        SecretString=json.dumps(
            {"host": "127.0.0.1", "username": "pgsnow", "password": "x", "sslmode": "disable"}
        ),
    )["ARN"]
    resources = create_staging_resources(aws, bucket="pgsnow-iam-secrets")
    roles = create_function_roles(
        aws, resources, parameters=stack_parameters(resources, PostgresSecretArn=secret_arn)
    )
    settings = Settings.from_env(
        {
            "S3_STAGE_BUCKET": resources.bucket,
            "PGSNOW_TABLES": "public.orders",
            "PGSNOW_PG_SECRET_ARN": secret_arn,
        },
        component=Component.EXTRACTOR,
    )

    def runtime_as(component: Component) -> Runtime:
        return Runtime(
            settings=settings, session=role_session(aws, roles[component].arn, f"secret-{component.value}")
        )

    # When the extractor's runtime builds its DSN / Then it reads the secret through its role
    assert "user=pgsnow" in runtime_as(Component.EXTRACTOR).postgres_dsn()
    # And the loader's role, whose statement names only the Snowflake secret, is refused
    with pytest.raises(PermanentError, match="AccessDenied"):
        runtime_as(Component.LOADER).postgres_dsn()


def test_one_conditional_writer_wins_per_base_etag(aws: LocalAws, staging: StagingResources) -> None:
    # Given a manifest and many writers holding its ETag, started together
    s3 = aws.client("s3")
    key = "_pgsnow/manifests/public/race/20261206T000000000000Z.json"
    for round_number in range(3):
        base = s3.put_object(Bucket=staging.bucket, Key=key, Body=f"base {round_number}".encode())["ETag"]
        start = threading.Barrier(12)
        outcomes: list[str] = []

        def write(
            writer: int, etag: str = base, start: threading.Barrier = start, outcomes: list[str] = outcomes
        ) -> None:
            client = aws.client("s3")
            start.wait()
            try:
                client.put_object(
                    Bucket=staging.bucket, Key=key, Body=f"writer {writer}".encode(), IfMatch=etag
                )
                outcomes.append("won")
            except ClientError as exc:
                outcomes.append(exc.response["Error"]["Code"])

        threads = [threading.Thread(target=write, args=(n,)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Then exactly one wins; every other is refused by the precondition
        assert sorted(outcomes) == ["PreconditionFailed"] * 11 + ["won"]


def test_snowflake_storage_role_needs_the_external_id(aws: LocalAws, staging: StagingResources) -> None:
    # Given the template's storage role, trusted by a user standing in for Snowflake's
    user = create_snowflake_user(aws)
    role_arn = create_storage_role(
        aws,
        iam_user_arn=user.arn,
        external_id="SF_EXTERNAL_1",
        params={"S3StagePrefix": "staging"},
        resources=staging,
    )
    assert role_arn.endswith(":role/pgsnow-local-snowflake-us-east-1")
    sts = user.session(aws).client("sts")
    aws.client("s3").put_object(Bucket=staging.bucket, Key=STAGED_KEY, Body=b"x")
    aws.client("s3").put_object(Bucket=staging.bucket, Key=MANIFEST_KEY, Body=b"{}")
    # When Snowflake assumes it with the wrong external id / Then it is refused
    wrong = refusal(lambda: sts.assume_role(RoleArn=role_arn, RoleSessionName="sf", ExternalId="WRONG"))
    assert wrong.startswith("AccessDenied")
    # And with the right one it reads staged files, and nothing under _pgsnow/
    credentials = sts.assume_role(RoleArn=role_arn, RoleSessionName="sf", ExternalId="SF_EXTERNAL_1")[
        "Credentials"
    ]
    s3 = boto3.client(
        "s3",
        endpoint_url=aws.endpoint_url,
        region_name=aws.region,
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
    )
    assert s3.get_object(Bucket=staging.bucket, Key=STAGED_KEY)["Body"].read() == b"x"
    assert refusal(lambda: s3.get_object(Bucket=staging.bucket, Key=MANIFEST_KEY)).startswith("AccessDenied")


# --------------------------------------------------------------------------- the pipeline under an edited template


def template_without(tmp_path: Path, function: str, removed: str, replacement: str = "") -> Path:
    """A copy of template.yaml where ``removed`` (text within ``function``'s resource) is replaced."""
    text = REPO_TEMPLATE.read_text(encoding="utf-8")
    start = text.index(f"\n  {function}:\n")
    end = text.index("\n  # ----", start) if function == "CleanupFunction" else _next_resource(text, start)
    section = text[start:end]
    assert section.count(removed) == 1, f"{removed!r} is not once in {function}"
    path = tmp_path / "template.yaml"
    path.write_text(text[:start] + section.replace(removed, replacement) + text[end:], encoding="utf-8")
    return path


def _next_resource(text: str, start: int) -> int:
    for name in ("ExtractorFunction", "LoaderFunction", "CleanupFunction"):
        position = text.find(f"\n  {name}:\n", start + 1)
        if position > start:
            return position
    raise AssertionError("no function after this one")


@contextmanager
def stack_with_orders(tmp_path: Path, template_path: Path) -> Iterator[tuple[LocalStack, str, TableRef]]:
    """A stack started from ``template_path`` and a source table of three orders."""
    with (
        new_source_schema("pgsnow_iam") as (source_dsn, schema),
        running_stack(
            source_dsn,
            tmp_path / "stack",
            "pgsnow-iam",
            for_handlers=True,
            template_path=template_path,
            visibility_timeout=1,
            max_receive_count=1,
        ) as stack,
    ):
        table = TableRef(schema, "orders")
        with autocommit_connection(source_dsn) as conn, conn.cursor() as cur:
            target = sql.Identifier(schema, "orders")
            cur.execute(sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, label text)").format(target))
            cur.execute(sql.SQL("INSERT INTO {} VALUES (1, 'a'), (2, 'b'), (3, 'c')").format(target))
        yield stack, source_dsn, table


def extract_as_extractor(stack: LocalStack, source_dsn: str, table: TableRef) -> Any:
    pg_conn = connect(source_dsn)
    try:
        return extract_table(
            settings=stack.settings(Component.EXTRACTOR),
            pg_conn=pg_conn,
            s3=stack.function_client(Component.EXTRACTOR, "s3"),
            table=table,
            file_format=FileFormat.CSV,
        )
    finally:
        pg_conn.close()


def deliver_to_loader(stack: LocalStack) -> Any:
    dispatcher = SqsDispatcher(
        stack.aws, stack.resources.queue_url, load_function_handler("loader"), wait_seconds=1
    )
    return dispatcher.run_until_idle(max_seconds=60)


def test_extractor_without_its_run_record_permission_is_refused(tmp_path: Path) -> None:
    # Given a template whose extractor may no longer write under _pgsnow/
    edited = template_without(
        tmp_path, "ExtractorFunction", '                - !Sub "${StageBucket.Arn}/_pgsnow/*"\n'
    )
    with stack_with_orders(tmp_path, edited) as (stack, source_dsn, table):
        # When the extractor runs / Then it fails with AccessDenied naming the action and the key
        with pytest.raises(PgSnowError) as caught:
            extract_as_extractor(stack, source_dsn, table)
        message = str(caught.value)
        assert "AccessDenied" in message
        assert "s3:PutObject" in message
        assert f"{stack.resources.bucket}/_pgsnow/" in message


def test_loader_without_read_on_the_staging_prefix_loads_nothing(tmp_path: Path) -> None:
    # Given a template whose loader may no longer read the staging prefix
    edited = template_without(
        tmp_path,
        "LoaderFunction",
        "              Action: s3:GetObject\n              Resource:\n"
        '                - !Sub "${StageBucket.Arn}/${S3StagePrefix}/*"\n',
        "              Action: s3:GetObject\n              Resource:\n",
    )
    with stack_with_orders(tmp_path, edited) as (stack, source_dsn, table):
        manifest = extract_as_extractor(stack, source_dsn, table)
        # When its file is delivered to the loader
        stats = deliver_to_loader(stack)
        # Then the loader fails it (S3 answers a refused HEAD with a bare 403) and the run stays
        # staged; the one message that succeeds is the s3:TestEvent sent when the notification was set
        assert (stats.delivered, stats.failed) == (2, 1)
        settled = RunStore(stack.aws.client("s3"), stack.resources.bucket).get_manifest(
            table, manifest.run_id
        )
        assert settled.state is RunState.STAGED


@pytest.mark.parametrize(
    ("edit", "expected_state"),
    [
        pytest.param(None, RunState.LOADED, id="template-as-is"),
        pytest.param("MarkRunsLoaded", RunState.STAGED, id="without-the-loaders-manifest-write"),
    ],
)
def test_loader_marks_the_run_loaded_only_with_its_manifest_write(
    tmp_path: Path, edit: str | None, expected_state: RunState
) -> None:
    # Given the template as it is, or without the loader's MarkRunsLoaded statement (as before the fix)
    path = REPO_TEMPLATE
    if edit is not None:
        statement = (
            "            - Sid: MarkRunsLoaded\n              Effect: Allow\n              Action: s3:PutObject\n"
            '              Resource: !Sub "${StageBucket.Arn}/_pgsnow/manifests/*"\n'
        )
        path = template_without(tmp_path, "LoaderFunction", statement)
    with stack_with_orders(tmp_path, path) as (stack, source_dsn, table):
        manifest = extract_as_extractor(stack, source_dsn, table)
        # When the loader gets the run's only file
        stats = deliver_to_loader(stack)
        # Then the file loads either way, and the manifest says loaded only when the loader may write it
        assert (stats.delivered, stats.failed) == (2, 0)  # the file and the s3:TestEvent
        settled = RunStore(stack.aws.client("s3"), stack.resources.bucket).get_manifest(
            table, manifest.run_id
        )
        assert settled.state is expected_state


def test_the_stacks_handlers_run_each_as_its_own_role(tmp_path: Path) -> None:
    from pgsnow.cli import describe_stack

    with stack_with_orders(tmp_path, REPO_TEMPLATE) as (stack, _source_dsn, _table):
        # When each function's handler runtime asks STS who it is (inside LocalStack.handlers())
        runtimes = {
            component: stack.function_runtime(component)
            for component in (Component.EXTRACTOR, Component.LOADER, Component.CLEANUP)
        }
        identities = {c: r.client("sts").get_caller_identity()["Arn"] for c, r in runtimes.items()}
        # Then each is its own role, and function_client is the same role
        for component, arn in identities.items():
            assert f":assumed-role/{stack.roles[component].name}/" in arn
        direct = stack.function_client(Component.EXTRACTOR, "sts").get_caller_identity()["Arn"]
        assert f":assumed-role/{stack.roles[Component.EXTRACTOR].name}/" in direct
        # And what `pgsnow local up` prints is the administrator's key and the roles
        printed = "\n".join(describe_stack(stack))
        assert f"access key {stack.aws.access_key_id}" in printed
        assert all(role.arn in printed for role in stack.roles.values())
