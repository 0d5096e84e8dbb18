"""The local Snowflake enforcing stage access and key-pair logins, against moto with IAM enforced."""

from __future__ import annotations

import base64
import gzip
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import snowflake.connector
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from moto_iam_support import AccessKey, IamMoto, read_prefix_statements, start_iam_moto
from snowflake.connector.errors import DatabaseError, ProgrammingError
from snowflake.ingest import SimpleIngestManager
from snowflake.ingest.simple_ingest_manager import StagedFile

from pgsnow.local.sf_access import SnowflakeAwsIdentity
from pgsnow.local.snowflake import LOCAL_ACCOUNT, LocalSnowflake, start_local_snowflake
from pgsnow.local.snowpipe import LocalSnowpipe, start_local_snowpipe
from pgsnow.setup_sql import SetupOptions, build_setup_steps

pytestmark = pytest.mark.integration

BUCKET = "pgsnow-access"
ALLOWED = "staging"
CSV_FORMAT = "FILE_FORMAT = (TYPE = CSV COMPRESSION = GZIP SKIP_HEADER = 1)"
_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_names)}"


@pytest.fixture(scope="module")
def moto() -> Iterator[IamMoto]:
    server = start_iam_moto()
    server.client("s3").create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def snowflake_identity(moto: IamMoto) -> SnowflakeAwsIdentity:
    """Snowflake's AWS user: it may call sts:AssumeRole, and nothing else."""
    arn, key = moto.create_user(
        "snowflake-local", [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]
    )
    return SnowflakeAwsIdentity(arn, key.key_id, key.secret)


@pytest.fixture(scope="module")
def local(moto: IamMoto, snowflake_identity: SnowflakeAwsIdentity) -> Iterator[LocalSnowflake]:
    # The admin's keys are given too: enforcement must not fall back to them.
    server = start_local_snowflake(
        s3_endpoint_url=moto.endpoint_url,
        aws_access_key_id=moto.admin.key_id,
        aws_secret_access_key=moto.admin.secret,
        snowflake_aws_identity=snowflake_identity,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def conn(local: LocalSnowflake) -> Iterator[snowflake.connector.SnowflakeConnection]:
    connection = snowflake.connector.connect(**local.connect_kwargs(database="DB", schema="PUBLIC"))
    connection.cursor().execute("CREATE DATABASE IF NOT EXISTS DB")
    connection.cursor().execute("CREATE SCHEMA IF NOT EXISTS DB.PGSNOW")
    yield connection
    connection.close()


def put_csv(moto: IamMoto, key: str, text: str) -> None:
    moto.client("s3").put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(text.encode()))


def run(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    return list(conn.cursor().execute(sql).fetchall())


def describe(conn: Any, integration: str) -> dict[str, str]:
    return {row[0]: row[2] for row in run(conn, f"DESC INTEGRATION {integration}")}


def integration_with_role(
    conn: Any, moto: IamMoto, *, prefix: str = ALLOWED, extra: str = "", role_external_id: str | None = None
) -> str:
    """An integration over ``s3://BUCKET/<prefix>/`` and the storage role it assumes, made in the
    deployed order: CREATE INTEGRATION, DESC it, then the role trusting the reported user/external id."""
    name = unique("INT")
    role_arn = f"arn:aws:iam::123456789012:role/{name.lower()}"
    run(
        conn,
        f"CREATE STORAGE INTEGRATION {name} TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' ENABLED = TRUE "
        f"STORAGE_AWS_ROLE_ARN = '{role_arn}' STORAGE_ALLOWED_LOCATIONS = ('s3://{BUCKET}/{prefix}/') {extra}",
    )
    shown = describe(conn, name)
    created = moto.create_storage_role(
        name.lower(),
        trusted_arn=shown["STORAGE_AWS_IAM_USER_ARN"],
        external_id=role_external_id or shown["STORAGE_AWS_EXTERNAL_ID"],
        bucket=BUCKET,
        prefix=f"{prefix}/",
    )
    assert created == role_arn
    return name


def new_table(conn: Any) -> str:
    table = unique("T")
    run(conn, f'CREATE TABLE DB.PUBLIC."{table}" ("ID" NUMBER(38,0), "V" VARCHAR)')
    return table


def test_setup_sql_integration_statement_runs_and_desc_reports_the_identity(
    conn: Any, snowflake_identity: SnowflakeAwsIdentity
) -> None:
    # Given the exact CREATE STORAGE INTEGRATION that `pgsnow setup-sql` prints
    options = SetupOptions(
        database="DB",
        schema="PGSNOW",
        role="PGSNOW_ROLE",
        bucket=BUCKET,
        integration="SETUP_INT",
        aws_role_arn="arn:aws:iam::123456789012:role/setup",
    )
    statements = [s for step in build_setup_steps(options) for s in step.statements]
    create = next(s for s in statements if s.startswith("CREATE STORAGE INTEGRATION"))
    desc = next(s for s in statements if s.startswith("DESC INTEGRATION"))

    # When it and its DESC INTEGRATION run, twice (IF NOT EXISTS)
    first = run(conn, create)
    again = run(conn, create)
    shown = {row[0]: row[1:] for row in run(conn, desc)}

    # Then the integration is reported as Snowflake reports one
    assert first == [("Integration SETUP_INT successfully created.",)]
    assert again == [("SETUP_INT already exists, statement succeeded.",)]
    assert shown["ENABLED"] == ("Boolean", "true", "false")
    assert shown["STORAGE_AWS_IAM_USER_ARN"][1] == snowflake_identity.user_arn
    assert shown["STORAGE_AWS_ROLE_ARN"][1] == "arn:aws:iam::123456789012:role/setup"
    assert shown["STORAGE_ALLOWED_LOCATIONS"][1] == f"s3://{BUCKET}/staging/,s3://{BUCKET}/_pgsnow/keys/"
    assert "_SFCRole=" in shown["STORAGE_AWS_EXTERNAL_ID"][1]


def test_integration_stage_reads_its_allowed_prefix(conn: Any, moto: IamMoto) -> None:
    # Given a stage over the allowed prefix through an integration, and a staged file
    integration = integration_with_role(conn, moto)
    stage = unique("ST")
    run(
        conn,
        f"CREATE STAGE DB.PGSNOW.{stage} URL = 's3://{BUCKET}/{ALLOWED}/' STORAGE_INTEGRATION = {integration}",
    )
    table = new_table(conn)
    put_csv(moto, f"{ALLOWED}/{table}/a.csv.gz", "id,v\n1,x\n2,y\n")

    # When it is copied, by FILES and by listing the prefix
    by_files = run(
        conn,
        f"COPY INTO DB.PUBLIC.\"{table}\" FROM @DB.PGSNOW.{stage}/{table}/ FILES = ('a.csv.gz') {CSV_FORMAT}",
    )
    by_listing = run(
        conn, f'COPY INTO DB.PUBLIC."{table}" FROM @DB.PGSNOW.{stage}/{table}/ {CSV_FORMAT} FORCE = TRUE'
    )

    # Then both read it with the role's credentials
    assert [r[1:3] for r in by_files] == [("LOADED", 2)]
    assert [r[1:3] for r in by_listing] == [("LOADED", 2)]
    assert run(conn, f'SELECT COUNT(*) FROM DB.PUBLIC."{table}"') == [(4,)]


def test_locations_outside_the_integration_are_refused(conn: Any, moto: IamMoto) -> None:
    integration = integration_with_role(
        conn, moto, extra=f"STORAGE_BLOCKED_LOCATIONS = ('s3://{BUCKET}/{ALLOWED}/secret/')"
    )
    table = new_table(conn)
    put_csv(moto, "elsewhere/a.csv.gz", "id,v\n1,x\n")
    put_csv(moto, f"{ALLOWED}/secret/a.csv.gz", "id,v\n1,x\n")

    # A stage URL outside the allowed locations is refused when the stage is created
    with pytest.raises(
        ProgrammingError, match=r"Location 's3://pgsnow-access/elsewhere/' is not allowed by integration"
    ):
        run(
            conn,
            f"CREATE STAGE DB.PGSNOW.{unique('ST')} URL = 's3://{BUCKET}/elsewhere/' STORAGE_INTEGRATION = {integration}",
        )
    # A COPY from a URL outside them, or inside a blocked one, is refused before anything is read
    for url in (f"s3://{BUCKET}/elsewhere/", f"s3://{BUCKET}/{ALLOWED}/secret/"):
        with pytest.raises(ProgrammingError, match="is not allowed by integration") as refused:
            run(
                conn,
                f"COPY INTO DB.PUBLIC.\"{table}\" FROM '{url}' FILES = ('a.csv.gz') "
                f"STORAGE_INTEGRATION = {integration} {CSV_FORMAT}",
            )
        assert url in refused.value.msg
    # A COPY listing the allowed prefix refuses the blocked file it finds under it
    with pytest.raises(ProgrammingError, match=r"secret/a\.csv\.gz' is not allowed"):
        run(
            conn,
            f"COPY INTO DB.PUBLIC.\"{table}\" FROM 's3://{BUCKET}/{ALLOWED}/' STORAGE_INTEGRATION = {integration} {CSV_FORMAT}",
        )
    assert run(conn, f'SELECT COUNT(*) FROM DB.PUBLIC."{table}"') == [(0,)]


def test_missing_or_disabled_integration_is_refused(conn: Any, moto: IamMoto) -> None:
    disabled = unique("INT")
    run(
        conn,
        f"CREATE STORAGE INTEGRATION {disabled} TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' ENABLED = FALSE "
        f"STORAGE_AWS_ROLE_ARN = 'arn:aws:iam::123456789012:role/x' STORAGE_ALLOWED_LOCATIONS = ('*')",
    )
    url = f"s3://{BUCKET}/{ALLOWED}/"

    with pytest.raises(ProgrammingError, match="Integration 'NO_SUCH_INT' does not exist or not authorized"):
        run(conn, f"CREATE STAGE DB.PGSNOW.{unique('ST')} URL = '{url}' STORAGE_INTEGRATION = NO_SUCH_INT")
    with pytest.raises(ProgrammingError, match=f"Integration '{disabled}' is disabled"):
        run(conn, f"CREATE STAGE DB.PGSNOW.{unique('ST')} URL = '{url}' STORAGE_INTEGRATION = {disabled}")


def test_stage_with_neither_integration_nor_credentials_is_refused(conn: Any, moto: IamMoto) -> None:
    # Given a stage Snowflake lets you create, but that can only read anonymously
    stage = unique("ST")
    run(conn, f"CREATE STAGE DB.PGSNOW.{stage} URL = 's3://{BUCKET}/{ALLOWED}/'")
    table = new_table(conn)
    put_csv(moto, f"{ALLOWED}/{table}/a.csv.gz", "id,v\n1,x\n")

    # When it is read, the private bucket refuses it
    with pytest.raises(ProgrammingError, match=r"Failure using stage area\. Cause: \[Access Denied"):
        run(
            conn,
            f"COPY INTO DB.PUBLIC.\"{table}\" FROM @DB.PGSNOW.{stage}/{table}/ FILES = ('a.csv.gz') {CSV_FORMAT}",
        )
    # and a COPY from a URL with neither is refused the same way
    with pytest.raises(ProgrammingError, match="Failure using stage area"):
        run(
            conn,
            f"COPY INTO DB.PUBLIC.\"{table}\" FROM 's3://{BUCKET}/{ALLOWED}/{table}/' FILES = ('a.csv.gz') {CSV_FORMAT}",
        )


def test_credentials_stage_reads_with_its_keys_and_a_narrow_role_is_denied(conn: Any, moto: IamMoto) -> None:
    # Given a user who may read the allowed prefix, and temporary credentials of a role that may not
    _, reader = moto.create_user(unique("reader"), read_prefix_statements(BUCKET, f"{ALLOWED}/"))
    narrow = moto.create_storage_role(
        unique("narrow"),
        trusted_arn="arn:aws:iam::123456789012:user/admin",
        external_id=None,
        bucket=BUCKET,
        prefix="other/",
    )
    assumed = moto.client("sts").assume_role(RoleArn=narrow, RoleSessionName="narrow-test")["Credentials"]
    narrow_key = AccessKey(assumed["AccessKeyId"], assumed["SecretAccessKey"], assumed["SessionToken"])
    table = new_table(conn)
    put_csv(moto, f"{ALLOWED}/{table}/a.csv.gz", "id,v\n1,x\n")
    good, bad = unique("ST"), unique("ST")
    run(
        conn,
        f"CREATE STAGE DB.PGSNOW.{good} URL = 's3://{BUCKET}/{ALLOWED}/' "
        f"CREDENTIALS = (AWS_KEY_ID = '{reader.key_id}' AWS_SECRET_KEY = '{reader.secret}')",
    )
    run(
        conn,
        f"CREATE STAGE DB.PGSNOW.{bad} URL = 's3://{BUCKET}/{ALLOWED}/' CREDENTIALS = (AWS_KEY_ID = "
        f"'{narrow_key.key_id}' AWS_SECRET_KEY = '{narrow_key.secret}' AWS_TOKEN = '{narrow_key.token}')",
    )

    # When each stage is read, and the URL is read with the reader's credentials in the COPY
    loaded = run(
        conn,
        f"COPY INTO DB.PUBLIC.\"{table}\" FROM @DB.PGSNOW.{good}/{table}/ FILES = ('a.csv.gz') {CSV_FORMAT}",
    )
    by_url = run(
        conn,
        f"COPY INTO DB.PUBLIC.\"{table}\" FROM 's3://{BUCKET}/{ALLOWED}/{table}/' FILES = ('a.csv.gz') "
        f"CREDENTIALS = (AWS_KEY_ID = '{reader.key_id}' AWS_SECRET_KEY = '{reader.secret}') {CSV_FORMAT} FORCE = TRUE",
    )
    # (FORCE: the file is already loaded into this table, and a skipped file is never read.)
    with pytest.raises(
        ProgrammingError, match=r"Access Denied \(Status Code: 403; Error Code: AccessDenied\)"
    ) as denied:
        run(
            conn,
            f"COPY INTO DB.PUBLIC.\"{table}\" FROM @DB.PGSNOW.{bad}/{table}/ FILES = ('a.csv.gz') {CSV_FORMAT} FORCE = TRUE",
        )

    # Then the reader's keys load, the narrow role is denied by S3, and no secret is ever shown
    assert [r[1:3] for r in loaded] == [("LOADED", 1)]
    assert [r[1:3] for r in by_url] == [("LOADED", 1)]
    shown = str(run(conn, "SHOW STAGES IN SCHEMA DB.PGSNOW"))
    for secret in (reader.secret, narrow_key.secret, str(narrow_key.token)):
        assert secret not in shown
        assert secret not in denied.value.msg


def test_credentials_with_an_integration_are_refused(conn: Any) -> None:
    with pytest.raises(
        ProgrammingError, match="CREDENTIALS property is not allowed on stages that use a storage integration"
    ):
        run(
            conn,
            f"CREATE STAGE DB.PGSNOW.{unique('ST')} URL = 's3://{BUCKET}/{ALLOWED}/' STORAGE_INTEGRATION = SETUP_INT "
            "CREDENTIALS = (AWS_KEY_ID = 'k' AWS_SECRET_KEY = 's')",
        )


def test_storage_role_with_another_external_id_cannot_be_assumed(conn: Any, moto: IamMoto) -> None:
    # Given a role that trusts Snowflake's user only with an external id the integration does not send
    integration = integration_with_role(conn, moto, role_external_id="not-the-integrations-id")
    stage = unique("ST")
    run(
        conn,
        f"CREATE STAGE DB.PGSNOW.{stage} URL = 's3://{BUCKET}/{ALLOWED}/' STORAGE_INTEGRATION = {integration}",
    )
    table = new_table(conn)
    put_csv(moto, f"{ALLOWED}/{table}/a.csv.gz", "id,v\n1,x\n")

    # When the stage is read, AssumeRole fails, as Snowflake reports it
    with pytest.raises(
        ProgrammingError, match=r"Error assuming AWS_ROLE\.\nPlease verify the role and externalId"
    ):
        run(
            conn,
            f"COPY INTO DB.PUBLIC.\"{table}\" FROM @DB.PGSNOW.{stage}/{table}/ FILES = ('a.csv.gz') {CSV_FORMAT}",
        )


# ---------------------------------------------------------------------------------------------
# key-pair logins


def private_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_body(key: rsa.RSAPrivateKey) -> str:
    """The public key as ALTER USER ... SET RSA_PUBLIC_KEY takes it: base64 DER, no PEM armour."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


@pytest.fixture(scope="module")
def loader_key(conn: Any) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert run(conn, f"ALTER USER PGSNOW_LOADER SET RSA_PUBLIC_KEY = '{public_body(key)}'") == [
        ("Statement executed successfully.",)
    ]
    return key


@pytest.mark.parametrize("account", [None, "local"], ids=["local-account", "stack-account-name"])
def test_key_pair_login_with_the_registered_key_is_accepted(
    local: LocalSnowflake, loader_key: rsa.RSAPrivateKey, account: str | None
) -> None:
    kwargs = local.connect_kwargs(user="pgsnow_loader", private_key=private_der(loader_key))
    if account is not None:
        kwargs["account"] = account  # the stack's SNOWFLAKE_ACCOUNT
    with snowflake.connector.connect(**kwargs) as connection:
        assert run(connection, "SELECT 1") == [(1,)]


def test_key_pair_login_with_another_key_is_refused(
    local: LocalSnowflake, loader_key: rsa.RSAPrivateKey
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for user in ("PGSNOW_LOADER", "USER_WITHOUT_KEY"):
        with pytest.raises(DatabaseError, match="JWT token is invalid") as refused:
            snowflake.connector.connect(**local.connect_kwargs(user=user, private_key=private_der(other)))
        assert refused.value.errno == 390144


def test_password_login_still_works_for_a_user_without_a_key(local: LocalSnowflake) -> None:
    with snowflake.connector.connect(**local.connect_kwargs(user="SOMEONE_ELSE")) as connection:
        assert run(connection, "SELECT 2") == [(2,)]


# ---------------------------------------------------------------------------------------------
# the local Snowpipe reads as a COPY does


def wait_for_events(endpoint: LocalSnowpipe, pipe: tuple[str, str, str], count: int) -> list[Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = list(endpoint.state.events.get(pipe, []))
        if len(events) >= count:
            return events
        time.sleep(0.1)
    raise AssertionError(f"no {count} events for {pipe} within 30 s")


def test_snowpipe_reads_with_the_stage_integration_and_refuses_a_stage_without(
    conn: Any, moto: IamMoto, local: LocalSnowflake
) -> None:
    # Given pipes over an integration stage and over a stage with neither integration nor credentials,
    # and the user's key registered through SQL (one registry for logins and Snowpipe)
    integration = integration_with_role(conn, moto)
    good, bare = unique("ST"), unique("ST")
    run(
        conn,
        f"CREATE STAGE DB.PGSNOW.{good} URL = 's3://{BUCKET}/{ALLOWED}/' STORAGE_INTEGRATION = {integration}",
    )
    run(conn, f"CREATE STAGE DB.PGSNOW.{bare} URL = 's3://{BUCKET}/{ALLOWED}/'")
    table = new_table(conn)
    put_csv(moto, f"{ALLOWED}/{table}/a.csv.gz", "id,v\n1,x\n2,y\n")
    pipes = {}
    for stage in (good, bare):
        pipe = unique("PIPE")
        run(
            conn,
            f'CREATE PIPE DB.PGSNOW.{pipe} AS COPY INTO DB.PUBLIC."{table}" FROM @DB.PGSNOW.{stage}/{table}/ {CSV_FORMAT}',
        )
        pipes[stage] = pipe
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    run(conn, f"ALTER USER PIPE_USER SET RSA_PUBLIC_KEY = '{public_body(key)}'")
    endpoint = start_local_snowpipe(local)
    try:
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        # When the file is submitted to both pipes
        for pipe in pipes.values():
            SimpleIngestManager(
                account=LOCAL_ACCOUNT,
                user="PIPE_USER",
                pipe=f"DB.PGSNOW.{pipe}",
                private_key=pem,
                scheme="http",
                host=endpoint.host,
                port=endpoint.port,
            ).ingest_files([StagedFile("a.csv.gz", None)])
        loaded = wait_for_events(endpoint, ("DB", "PGSNOW", pipes[good]), 1)
        refused = wait_for_events(endpoint, ("DB", "PGSNOW", pipes[bare]), 1)
    finally:
        endpoint.stop()

    # Then the integration stage's pipe loads it and the bare stage's pipe is denied
    assert [(e.status, e.rows_inserted) for e in loaded] == [("LOADED", 2)]
    assert refused[0].status == "LOAD_FAILED"
    assert refused[0].first_error is not None and "Access Denied" in refused[0].first_error
    assert run(conn, f'SELECT COUNT(*) FROM DB.PUBLIC."{table}"') == [(2,)]


def test_integrations_and_stage_credentials_survive_a_restart(
    moto: IamMoto, snowflake_identity: SnowflakeAwsIdentity, tmp_path: Path
) -> None:
    # Given an integration and a credentials stage created on a local Snowflake with a data_dir
    _, reader = moto.create_user(unique("reader"), read_prefix_statements(BUCKET, f"{ALLOWED}/"))
    put_csv(moto, f"{ALLOWED}/restart/a.csv.gz", "id,v\n1,x\n")

    def start() -> LocalSnowflake:
        return start_local_snowflake(
            s3_endpoint_url=moto.endpoint_url, data_dir=tmp_path, snowflake_aws_identity=snowflake_identity
        )

    first = start()
    try:
        with snowflake.connector.connect(**first.connect_kwargs()) as before:
            run(before, "CREATE DATABASE KEPT")
            run(before, "CREATE SCHEMA KEPT.S")
            run(
                before,
                "CREATE STORAGE INTEGRATION KEPT_INT TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' ENABLED = TRUE "
                "STORAGE_AWS_ROLE_ARN = 'arn:aws:iam::123456789012:role/kept' STORAGE_ALLOWED_LOCATIONS = ('*')",
            )
            run(before, "ALTER STORAGE INTEGRATION KEPT_INT SET COMMENT = 'altered before the restart'")
            described = describe(before, "KEPT_INT")
            run(
                before,
                f"CREATE STAGE KEPT.S.ST URL = 's3://{BUCKET}/{ALLOWED}/' "
                f"CREDENTIALS = (AWS_KEY_ID = '{reader.key_id}' AWS_SECRET_KEY = '{reader.secret}')",
            )
    finally:
        first.stop()

    # When the server is started again on the same data_dir
    second = start()
    try:
        with snowflake.connector.connect(**second.connect_kwargs()) as after:
            run(after, 'CREATE TABLE KEPT.S."T" ("ID" NUMBER(38,0), "V" VARCHAR)')
            loaded = run(
                after, f"COPY INTO KEPT.S.\"T\" FROM @KEPT.S.ST/restart/ FILES = ('a.csv.gz') {CSV_FORMAT}"
            )
            described_again = describe(after, "KEPT_INT")
    finally:
        second.stop()

    # Then the integration (with its generated external id) and the stage's credentials are still there
    assert described_again == described
    assert described_again["COMMENT"] == "altered before the restart"
    assert [r[1:3] for r in loaded] == [("LOADED", 1)]


def test_concurrent_reads_use_each_stage_own_credentials(
    conn: Any, moto: IamMoto, local: LocalSnowflake
) -> None:
    # Given one stage whose keys may read the prefix and one whose keys may not, over the same file
    _, reader = moto.create_user(unique("reader"), read_prefix_statements(BUCKET, f"{ALLOWED}/"))
    _, outsider = moto.create_user(unique("outsider"), read_prefix_statements(BUCKET, "other/"))
    table = new_table(conn)
    put_csv(moto, f"{ALLOWED}/{table}/a.csv.gz", "id,v\n1,x\n")
    stages = {}
    for label, key in (("reader", reader), ("outsider", outsider)):
        stages[label] = unique("ST")
        run(
            conn,
            f"CREATE STAGE DB.PGSNOW.{stages[label]} URL = 's3://{BUCKET}/{ALLOWED}/' "
            f"CREDENTIALS = (AWS_KEY_ID = '{key.key_id}' AWS_SECRET_KEY = '{key.secret}')",
        )
    outcomes: dict[str, list[str]] = {"reader": [], "outsider": []}

    def copy_repeatedly(label: str) -> None:
        with snowflake.connector.connect(**local.connect_kwargs(database="DB", schema="PUBLIC")) as session:
            for _ in range(4):
                try:
                    result = run(
                        session,
                        f'COPY INTO DB.PUBLIC."{table}" FROM @DB.PGSNOW.{stages[label]}/{table}/ '
                        f"FILES = ('a.csv.gz') {CSV_FORMAT} FORCE = TRUE",
                    )
                    outcomes[label].append(str(result[0][1]))
                except ProgrammingError as error:
                    outcomes[label].append("denied" if "Access Denied" in error.msg else error.msg)

    # When both sessions copy at the same time, repeatedly
    threads = [threading.Thread(target=copy_repeatedly, args=(label,)) for label in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    # Then each read used its own stage's credentials every time
    assert outcomes == {"reader": ["LOADED"] * 4, "outsider": ["denied"] * 4}


def stage_rows(conn: Any, scope: str) -> dict[str, tuple[str, str, str]]:
    """SHOW STAGES by name: (url, has_credentials, type)."""
    return {
        str(r[1]): (str(r[4]), str(r[5]), str(r[10])) for r in run(conn, f"SHOW STAGES IN SCHEMA {scope}")
    }


def test_a_temporary_stage_belongs_to_its_session_and_hides_the_permanent_one(
    conn: Any, moto: IamMoto, local: LocalSnowflake
) -> None:
    # Given a permanent stage whose keys may not read the prefix, and a file under the prefix
    _, reader = moto.create_user(unique("reader"), read_prefix_statements(BUCKET, f"{ALLOWED}/"))
    _, outsider = moto.create_user(unique("outsider"), read_prefix_statements(BUCKET, "other/"))
    table = new_table(conn)
    put_csv(moto, f"{ALLOWED}/{table}/a.csv.gz", "id,v\n1,x\n")
    stage = unique("ST")
    url = f"s3://{BUCKET}/{ALLOWED}/"
    run(
        conn,
        f"CREATE STAGE DB.PGSNOW.{stage} URL = '{url}' "
        f"CREDENTIALS = (AWS_KEY_ID = '{outsider.key_id}' AWS_SECRET_KEY = '{outsider.secret}')",
    )
    copy = f"COPY INTO DB.PUBLIC.\"{table}\" FROM @DB.PGSNOW.{stage}/{table}/ FILES = ('a.csv.gz') {CSV_FORMAT} FORCE = TRUE"

    # When another session creates a temporary stage of that name with keys that may read it
    # (the loader's credentials method, as pgsnow.snowflake builds it), and both sessions COPY
    with snowflake.connector.connect(**local.connect_kwargs(database="DB", schema="PUBLIC")) as session:
        created = run(
            session,
            f"CREATE OR REPLACE TEMPORARY STAGE DB.PGSNOW.{stage} URL = '{url}' CREDENTIALS = "
            f"(AWS_KEY_ID = '{reader.key_id}' AWS_SECRET_KEY = '{reader.secret}' AWS_TOKEN = '')",
        )
        in_session = run(session, copy)
        with pytest.raises(ProgrammingError, match="Access Denied") as elsewhere:
            run(conn, copy)
        shown_in_session = stage_rows(session, "DB.PGSNOW")
        shown_elsewhere = stage_rows(conn, "DB.PGSNOW")
        listed = str(run(session, "SHOW STAGES IN ACCOUNT"))

    # Then each COPY read with its own session's stage: the temporary one's keys load, the
    # permanent one's are refused by S3; only the creating session sees the temporary stage
    assert created == [(f"Stage area {stage} successfully created.",)]
    assert [r[1:3] for r in in_session] == [("LOADED", 1)]
    assert reader.secret not in elsewhere.value.msg
    assert shown_in_session[stage] == (url, "Y", "EXTERNAL TEMPORARY")
    assert shown_elsewhere[stage] == (url, "Y", "EXTERNAL")
    assert reader.secret not in listed and outsider.secret not in listed

    # And once that session has ended, a new session finds the permanent stage again
    with snowflake.connector.connect(**local.connect_kwargs(database="DB", schema="PUBLIC")) as later:
        assert stage_rows(later, "DB.PGSNOW")[stage] == (url, "Y", "EXTERNAL")
        with pytest.raises(ProgrammingError, match="Access Denied"):
            run(later, copy)


def test_a_temporary_stage_without_a_permanent_one_is_unknown_to_other_sessions(
    conn: Any, moto: IamMoto, local: LocalSnowflake
) -> None:
    # Given a temporary stage (no permanent stage of that name) created twice in one session
    _, reader = moto.create_user(unique("reader"), read_prefix_statements(BUCKET, f"{ALLOWED}/"))
    stage = unique("ST")
    create = (
        f"CREATE TEMPORARY STAGE DB.PGSNOW.{stage} URL = 's3://{BUCKET}/{ALLOWED}/' "
        f"CREDENTIALS = (AWS_KEY_ID = '{reader.key_id}' AWS_SECRET_KEY = '{reader.secret}')"
    )
    with snowflake.connector.connect(**local.connect_kwargs(database="DB", schema="PUBLIC")) as session:
        run(session, create)
        with pytest.raises(ProgrammingError, match="already exists"):
            run(session, create)
        again = run(session, create.replace("TEMPORARY STAGE", "TEMPORARY STAGE IF NOT EXISTS"))

        # When another session looks for it
        elsewhere = stage_rows(conn, "DB.PGSNOW")
        with pytest.raises(ProgrammingError, match="does not exist"):
            run(conn, f'COPY INTO DB.PUBLIC."{new_table(conn)}" FROM @DB.PGSNOW.{stage}/ {CSV_FORMAT}')

        # Then it is not there; in its own session DROP STAGE removes it
        dropped = run(session, f"DROP STAGE DB.PGSNOW.{stage}")
        after_drop = stage_rows(session, "DB.PGSNOW")
    assert again == [(f"{stage} already exists, statement succeeded.",)]
    assert stage not in elsewhere
    assert dropped == [(f"{stage} successfully dropped.",)]
    assert stage not in after_drop


def test_a_temporary_stage_is_not_kept_in_the_data_dir(
    moto: IamMoto, snowflake_identity: SnowflakeAwsIdentity, tmp_path: Path
) -> None:
    # Given a local Snowflake with a data_dir and a session that created a temporary stage
    first = start_local_snowflake(
        s3_endpoint_url=moto.endpoint_url, data_dir=tmp_path, snowflake_aws_identity=snowflake_identity
    )
    try:
        with snowflake.connector.connect(**first.connect_kwargs()) as before:
            run(before, "CREATE DATABASE TEMPDB")
            run(before, "CREATE SCHEMA TEMPDB.S")
            run(
                before,
                f"CREATE TEMPORARY STAGE TEMPDB.S.ST URL = 's3://{BUCKET}/{ALLOWED}/' "
                "CREDENTIALS = (AWS_KEY_ID = 'temp-key' AWS_SECRET_KEY = 'temp-secret-never-stored')",
            )
    finally:
        first.stop()

    # When the server is started again on the same data_dir
    second = start_local_snowflake(
        s3_endpoint_url=moto.endpoint_url, data_dir=tmp_path, snowflake_aws_identity=snowflake_identity
    )
    try:
        with snowflake.connector.connect(**second.connect_kwargs()) as after:
            shown = run(after, "SHOW STAGES IN ACCOUNT")
            stored = run(
                after,
                "SELECT COUNT(*) FROM _fs_global._fs_information_schema._pgsnow_stage_credentials "
                "WHERE aws_secret_key = 'temp-secret-never-stored'",
            )
    finally:
        second.stop()

    # Then neither the stage nor its credentials were written
    assert [r for r in shown if r[2] == "TEMPDB"] == []
    assert stored == [(0,)]


def test_setup_steps_1_and_2_run_in_order_twice_and_the_alter_keeps_the_identity(
    conn: Any, snowflake_identity: SnowflakeAwsIdentity
) -> None:
    # Given an integration an older pgsnow created, allowing only the staging prefix
    name = unique("OLD_INT")
    run(
        conn,
        f"CREATE STORAGE INTEGRATION \"{name}\" TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' ENABLED = TRUE "
        f"STORAGE_AWS_ROLE_ARN = 'arn:aws:iam::123456789012:role/setup' "
        f"STORAGE_ALLOWED_LOCATIONS = ('s3://{BUCKET}/{ALLOWED}/')",
    )
    before = describe(conn, f'"{name}"')
    options = SetupOptions(
        database="DB",
        schema="PGSNOW",
        role="PGSNOW_ROLE",
        bucket=BUCKET,
        integration=name,
        aws_role_arn="arn:aws:iam::123456789012:role/setup",
    )
    statements = [s for step in build_setup_steps(options)[:2] for s in step.statements]
    assert [s.split()[0] for s in statements] == ["CREATE", "ALTER", "DESC"]

    # When every statement of setup steps 1 and 2 runs, in order, twice
    replies = [[run(conn, statement) for statement in statements] for _ in range(2)]

    # Then the CREATE leaves the existing integration alone, the ALTER brings its locations up
    # to date, and the IAM user and external ID (the storage role's trust) never change
    for create, alter, desc in replies:
        assert create == [(f"{name} already exists, statement succeeded.",)]
        assert alter == [("Statement executed successfully.",)]
        shown = {row[0]: row[2] for row in desc}
        assert shown["STORAGE_ALLOWED_LOCATIONS"] == f"s3://{BUCKET}/staging/,s3://{BUCKET}/_pgsnow/keys/"
        assert shown["STORAGE_AWS_EXTERNAL_ID"] == before["STORAGE_AWS_EXTERNAL_ID"]
        assert shown["STORAGE_AWS_IAM_USER_ARN"] == snowflake_identity.user_arn
        assert shown["ENABLED"] == "true"


def test_alter_storage_integration_changes_what_the_integration_allows(conn: Any, moto: IamMoto) -> None:
    # Given an integration and a stage over its allowed prefix, which loads
    integration = integration_with_role(conn, moto)
    table = new_table(conn)
    put_csv(moto, f"{ALLOWED}/{table}/a.csv.gz", "id,v\n1,x\n")
    stage = unique("ST")
    run(
        conn,
        f"CREATE STAGE DB.PGSNOW.{stage} URL = 's3://{BUCKET}/{ALLOWED}/' STORAGE_INTEGRATION = {integration}",
    )
    copy = f"COPY INTO DB.PUBLIC.\"{table}\" FROM @DB.PGSNOW.{stage}/{table}/ FILES = ('a.csv.gz') {CSV_FORMAT} FORCE = TRUE"
    assert [r[1] for r in run(conn, copy)] == ["LOADED"]

    # When the integration is disabled, then re-enabled with the prefix blocked
    run(conn, f"ALTER STORAGE INTEGRATION {integration} SET ENABLED = FALSE COMMENT = 'paused'")
    with pytest.raises(ProgrammingError, match="is disabled"):
        run(conn, copy)
    run(
        conn,
        f"ALTER INTEGRATION {integration} SET ENABLED = TRUE, STORAGE_BLOCKED_LOCATIONS = ('s3://{BUCKET}/{ALLOWED}/')",
    )

    # Then each change applies to the next read, and DESC INTEGRATION reports it
    with pytest.raises(ProgrammingError, match="is not allowed by integration"):
        run(conn, copy)
    shown = describe(conn, integration)
    assert (shown["ENABLED"], shown["COMMENT"]) == ("true", "paused")
    assert shown["STORAGE_BLOCKED_LOCATIONS"] == f"s3://{BUCKET}/{ALLOWED}/"


def test_alter_storage_integration_errors(conn: Any) -> None:
    # A missing integration is an error, unless IF EXISTS; a property not modelled is refused
    with pytest.raises(ProgrammingError, match="does not exist or not authorized"):
        run(conn, "ALTER STORAGE INTEGRATION NO_SUCH_INT SET ENABLED = FALSE")
    assert run(conn, "ALTER STORAGE INTEGRATION IF EXISTS NO_SUCH_INT SET ENABLED = FALSE") == [
        ("Statement executed successfully.",)
    ]
    with pytest.raises(ProgrammingError, match="STORAGE_AWS_OBJECT_ACL is not supported locally"):
        run(
            conn,
            "ALTER STORAGE INTEGRATION NO_SUCH_INT SET STORAGE_AWS_OBJECT_ACL = 'bucket-owner-full-control'",
        )
