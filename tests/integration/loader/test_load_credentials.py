"""The credentials method (no storage integration): Snowflake reads S3 with the loader's own
temporary AWS credentials, through a temporary stage of the loader's session and in the key
list's COPY. Against moto and the local Snowflake over HTTP, through the real connector.

The statements sent are recorded by a thin wrapper around the real connection, so each test
checks both what Snowflake was told and that the load worked. The local Snowflake may or may
not read S3 with exactly the stage's credentials; the credentials used here are moto's own
temporary credentials (STS GetSessionToken), so the loads work either way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.credentials import Credentials
from load_support import (
    ORDERS,
    RUN_1,
    RUN_2,
    orders_sql,
    query,
    stage_run,
)

from pgsnow.config import Settings
from pgsnow.errors import PgSnowError
from pgsnow.keys import key_list_key, parse_data_key
from pgsnow.load.batch import load_staged_files
from pgsnow.load.outcomes import LoadStatus, RunOutcome
from pgsnow.local.aws import LocalAws

pytestmark = pytest.mark.integration

RUN_3 = "20261127T120000000000Z"
# The local Snowflake runs in this process; its own logs are the server's, which receives the
# credentials by design. Everything else (pgsnow, the connector, the root logger) is the client.
SERVER_LOGGERS = ("pgsnow.local", "fakesnow", "uvicorn", "sqlglot", "moto", "werkzeug")


class RecordingConnection:
    """The real connection, with every statement's text recorded (and optionally failed)."""

    def __init__(self, conn: Any, fail_when: Callable[[str], bool] | None = None) -> None:
        self._conn = conn
        self._fail_when = fail_when
        self.statements: list[str] = []

    def cursor(self) -> Any:
        return _RecordingCursor(self, self._conn.cursor())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _RecordingCursor:
    def __init__(self, owner: RecordingConnection, cursor: Any) -> None:
        self._owner = owner
        self._cursor = cursor

    def execute(self, sql: str, params: Any = None) -> Any:
        self._owner.statements.append(sql)
        if self._owner._fail_when is not None and self._owner._fail_when(sql):
            # What a server that quotes the failed statement back would answer.
            from snowflake.connector.errors import ProgrammingError

            raise ProgrammingError(
                msg=f"SQL compilation error: cannot use\n{sql}", errno=2003, sqlstate="42S02", query=sql
            )
        return self._cursor.execute(sql, params)

    def __enter__(self) -> _RecordingCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cursor.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class LoaderSession:
    """Stands in for the loader's boto3.Session: ``get_credentials()``, rotated on demand."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def get_credentials(self) -> Credentials:
        return self.credentials


def temporary_credentials(aws: LocalAws) -> Credentials:
    """Real temporary credentials from the local STS (key id, secret key and session token),
    new ones on each call, as a refresh of the loader role's session gives."""
    issued = aws.client("sts").assume_role(
        RoleArn="arn:aws:iam::123456789012:role/pgsnow-test-loader",
        RoleSessionName=f"loader-{uuid.uuid4().hex[:12]}",
        DurationSeconds=900,
    )["Credentials"]
    return Credentials(issued["AccessKeyId"], issued["SecretAccessKey"], issued["SessionToken"])


@pytest.fixture
def loader_session(aws: LocalAws) -> LoaderSession:
    return LoaderSession(temporary_credentials(aws))


def order_ids(sf_conn: Any, settings: Settings) -> list[int]:
    return [int(r[0]) for r in query(sf_conn, f'SELECT "ORDER_ID" FROM {orders_sql(settings)} ORDER BY 1')]


def temporary_stages(statements: list[str]) -> list[str]:
    return [s for s in statements if s.startswith("CREATE OR REPLACE TEMPORARY STAGE")]


def credentials_clause(credentials: Credentials) -> str:
    return (
        f"CREDENTIALS = (AWS_KEY_ID = '{credentials.access_key}' AWS_SECRET_KEY = '{credentials.secret_key}' "
        f"AWS_TOKEN = '{credentials.token}')"
    )


def test_loads_through_a_temporary_stage_with_the_loaders_credentials(
    settings: Settings, s3: Any, sf_conn: Any, loader_session: LoaderSession, aws: LocalAws
) -> None:
    # Given no storage integration, a first run with orders 1, 2 and 3, and the loader's credentials
    assert not settings.snowflake.storage_integration
    recording = RecordingConnection(sf_conn)
    first = parse_data_key(stage_run(s3, settings, RUN_1, [1, 2, 3], "hard"), settings.prefix)
    database, stage = settings.snowflake.database, settings.snowflake.stage
    stage_name = f'"{database}"."PGSNOW"."{stage}"'

    # When the run loads
    results = load_staged_files(
        settings=settings, sf_conn=recording, s3=s3, objects=[first], aws_credentials=loader_session
    )

    # Then the session's temporary stage, named like the permanent one, carries the credentials,
    # it is created before the data COPY, which reads that stage by name; and the rows load
    assert [r.status for r in results] == [LoadStatus.LOADED]
    assert temporary_stages(recording.statements) == [
        f"CREATE OR REPLACE TEMPORARY STAGE {stage_name} URL = 's3://{settings.bucket}/staging/' "
        + credentials_clause(loader_session.credentials)
    ]
    data_copy = next(i for i, s in enumerate(recording.statements) if s.startswith('COPY INTO "'))
    assert recording.statements.index(temporary_stages(recording.statements)[0]) < data_copy
    assert f"FROM @{stage_name}/public/orders/" in recording.statements[data_copy]
    assert "CREDENTIALS" not in recording.statements[data_copy]
    assert order_ids(sf_conn, settings) == [1, 2, 3]

    # When the next run (without order 2) loads with the same credentials
    recording.statements.clear()
    second = parse_data_key(stage_run(s3, settings, RUN_2, [1, 3], "hard"), settings.prefix)
    results = load_staged_files(
        settings=settings, sf_conn=recording, s3=s3, objects=[second], aws_credentials=loader_session
    )

    # Then the stage is not created again; the key list's COPY reads its URL with the same
    # credentials; order 2 is deleted
    assert [r.run_outcome for r in results] == [RunOutcome.APPLIED]
    assert temporary_stages(recording.statements) == []
    key_list_folder = key_list_key(ORDERS, RUN_2).rsplit("/", 1)[0]
    (key_copy,) = [
        s for s in recording.statements if f"FROM 's3://{settings.bucket}/{key_list_folder}/'" in s
    ]
    assert credentials_clause(loader_session.credentials) in key_copy
    assert order_ids(sf_conn, settings) == [1, 3]

    # When the loader's credentials are refreshed and a third run loads
    recording.statements.clear()
    loader_session.credentials = temporary_credentials(aws)
    third = parse_data_key(stage_run(s3, settings, RUN_3, [1, 2, 3], "hard"), settings.prefix)
    load_staged_files(
        settings=settings, sf_conn=recording, s3=s3, objects=[third], aws_credentials=loader_session
    )

    # Then the temporary stage is re-created with the new credentials before the COPY
    (recreated,) = temporary_stages(recording.statements)
    assert recreated.endswith(credentials_clause(loader_session.credentials))
    assert order_ids(sf_conn, settings) == [1, 2, 3]


def secret_values(credentials: Credentials) -> list[str]:
    return [credentials.secret_key, credentials.token]


def assert_no_secret_in_logs(caplog: pytest.LogCaptureFixture, printed: str, secrets: list[str]) -> None:
    client_records = [r for r in caplog.records if not r.name.startswith(SERVER_LOGGERS)]
    assert any(r.name.startswith("snowflake.connector") for r in client_records)  # debug logs were on
    for record in client_records:
        text = f"{record.getMessage()} {record.args!r} {record.__dict__!r} {record.exc_text or ''}"
        for secret in secrets:
            assert secret not in text, f"{record.name}: {record.getMessage()[:200]}"
    for secret in secrets:
        assert secret not in printed  # Powertools' JSON log lines go to stdout


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def assert_no_secret_in_error(error: BaseException, secrets: list[str]) -> None:
    for link in error_chain(error):
        for secret in secrets:
            assert secret not in f"{link} {link!r} {vars(link)!r}", type(link).__name__


def test_credentials_never_reach_a_log_record_or_an_error(
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    loader_session: LoaderSession,
    every_log_record: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secrets = secret_values(loader_session.credentials)
    every_log_record.clear()
    # Given a loaded first run, loaded with the credentials method at DEBUG level everywhere
    first = parse_data_key(stage_run(s3, settings, RUN_1, [1, 2, 3], "hard"), settings.prefix)
    load_staged_files(
        settings=settings, sf_conn=sf_conn, s3=s3, objects=[first], aws_credentials=loader_session
    )

    # When the next run's key list is gone, so the COPY that carries the credentials fails
    second = parse_data_key(stage_run(s3, settings, RUN_2, [1, 3], "hard"), settings.prefix)
    s3.delete_object(Bucket=settings.bucket, Key=key_list_key(ORDERS, RUN_2))
    with pytest.raises(PgSnowError) as failed_copy:
        load_staged_files(
            settings=settings, sf_conn=sf_conn, s3=s3, objects=[second], aws_credentials=loader_session
        )

    # And a server that quotes the failed statement back refuses the temporary stage
    quoting = RecordingConnection(sf_conn, fail_when=lambda sql: "TEMPORARY STAGE" in sql)
    refreshed = LoaderSession(
        Credentials("ASIAREFRESHEDKEY0001", "c2VjcmV0LWtleS1yZWZyZXNoZWQ=", "dG9rZW4tcmVmcmVzaGVk")
    )
    secrets += secret_values(refreshed.credentials)
    third = parse_data_key(stage_run(s3, settings, RUN_3, [1, 2, 3], "hard"), settings.prefix)
    with pytest.raises(PgSnowError) as failed_stage:
        load_staged_files(
            settings=settings, sf_conn=quoting, s3=s3, objects=[third], aws_credentials=refreshed
        )

    # Then both failures say what failed, but no error, no log record and no printed line holds
    # the secret key or the session token
    assert "CREDENTIALS = (<redacted>)" in failed_stage.value.message
    assert failed_copy.value.run_id == RUN_2
    for error in (failed_copy.value, failed_stage.value):
        assert_no_secret_in_error(error, secrets)
    assert_no_secret_in_logs(every_log_record, capsys.readouterr().out, secrets)
    # and the data did not change: the deletes were not applied
    assert order_ids(sf_conn, settings) == [1, 2, 3]
