"""LOAD_METHOD=snowpipe end to end: the real snowflake-ingest SDK against the local Snowpipe
REST endpoint (JWT verified), which runs the pipe's COPY on the local Snowflake over moto."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from load_support import (
    ORDER_COLUMNS,
    ORDER_ROWS,
    ORDERS,
    csv_gz_bytes,
    ledger_rows,
    order_count,
    orders_sql,
    put_run_manifest,
    put_staged_file,
    query,
)
from snowflake.ingest import SimpleIngestManager
from snowflake.ingest.error import IngestResponseError
from snowflake.ingest.simple_ingest_manager import StagedFile

from pgsnow.config import LoadMethod, Settings
from pgsnow.errors import PermanentError, RetryableError
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat, data_key, parse_data_key
from pgsnow.load.batch import load_staged_files
from pgsnow.load.outcomes import LoadStatus
from pgsnow.local.aws import LocalAws
from pgsnow.local.snowflake import LocalSnowflake
from pgsnow.local.snowpipe import LocalSnowpipe, start_local_snowpipe
from pgsnow.manifest import Column, RunManifest, RunState
from pgsnow.runs import RunStore
from pgsnow.snowpipe import (
    SnowpipeClient,
    private_key_pem,
    qualified_pipe_name,
    snowpipe_client_from_settings,
    snowpipe_endpoint,
)
from pgsnow.typemap import map_pg_type

pytestmark = pytest.mark.integration

RUN = "20261125T120000000000Z"
PIPE_PREFIX = "PGSNOW_PIPE"
ACCOUNT = "local"  # test_load's settings use SNOWFLAKE_ACCOUNT=local
USER = "pgsnow"


@pytest.fixture(scope="module")
def local_snowpipe(local_snowflake: LocalSnowflake) -> Iterator[LocalSnowpipe]:
    endpoint = start_local_snowpipe(local_snowflake, account=ACCOUNT)
    yield endpoint
    endpoint.stop()


def new_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def registered_key(local_snowpipe: LocalSnowpipe) -> rsa.RSAPrivateKey:
    """The loader user's key pair; its public key registered as ALTER USER ... SET RSA_PUBLIC_KEY does."""
    key = new_private_key()
    local_snowpipe.register_public_key(USER, public_pem(key))
    return key


@pytest.fixture
def pipe_settings(
    settings: Settings, aws: LocalAws, local_snowpipe: LocalSnowpipe, registered_key: rsa.RSAPrivateKey
) -> Settings:
    """LOAD_METHOD=snowpipe against the local endpoint, the private key in a Secrets Manager secret."""
    secret = {"account": ACCOUNT, "user": USER, "private_key": private_key_pem(registered_key)}
    arn = aws.client("secretsmanager").create_secret(
        Name=f"pgsnow/snowflake-{uuid.uuid4().hex[:8]}", SecretString=json.dumps(secret)
    )["ARN"]
    load = dataclasses.replace(
        settings.load, method=LoadMethod.SNOWPIPE, snowpipe_name=PIPE_PREFIX, snowpipe_host=local_snowpipe.url
    )
    return dataclasses.replace(
        settings, load=load, snowflake=dataclasses.replace(settings.snowflake, secret_arn=arn)
    )


def client_for(settings: Settings, aws: LocalAws, confirm_timeout_s: float = 30.0) -> SnowpipeClient:
    client = snowpipe_client_from_settings(
        settings.snowflake,
        settings.load.snowpipe_host,
        secrets_client=aws.client("secretsmanager"),
        confirm_timeout_s=confirm_timeout_s,
    )
    client.poll_interval_s = 0.1
    return client


def stage_orders(s3: Any, settings: Settings, rows: list[tuple[Any, ...]], batch: int = 1) -> str:
    key = data_key(settings.prefix, ORDERS, batch, RUN, FileFormat.CSV)
    put_staged_file(s3, settings, key, csv_gz_bytes(rows), rows=len(rows))
    return key


def pipe_events(local_snowpipe: LocalSnowpipe, settings: Settings) -> list[Any]:
    assert settings.snowflake.database and settings.load.snowpipe_name
    name = qualified_pipe_name(
        settings.snowflake.database, settings.snowflake.control_schema, settings.load.snowpipe_name, ORDERS
    )
    database, schema, pipe = name.split(".")
    return list(local_snowpipe.state.events.get((database, schema, pipe), []))


def test_a_file_loads_through_snowpipe_once_and_cell_exact(
    pipe_settings: Settings, s3: Any, sf_conn: Any, aws: LocalAws, local_snowpipe: LocalSnowpipe
) -> None:
    # Given a staged file of a run
    put_run_manifest(s3, pipe_settings)
    key = stage_orders(s3, pipe_settings, ORDER_ROWS)
    staged = parse_data_key(key, pipe_settings.prefix)
    client = client_for(pipe_settings, aws)

    # When the loader submits it to the table's pipe, and the same notification arrives again
    first = load_staged_files(
        settings=pipe_settings, sf_conn=sf_conn, s3=s3, objects=[staged], snowpipe=client
    )
    second = load_staged_files(
        settings=pipe_settings, sf_conn=sf_conn, s3=s3, objects=[staged], snowpipe=client
    )

    # Then Snowpipe loaded it once, the ledger records it, the redelivery was never submitted
    assert [(r.status, r.rows) for r in first + second] == [
        (LoadStatus.LOADED, len(ORDER_ROWS)),
        (LoadStatus.ALREADY_LOADED, len(ORDER_ROWS)),
    ]
    assert [(e.path, e.status, e.rows_inserted) for e in pipe_events(local_snowpipe, pipe_settings)] == [
        (staged.file_name, "LOADED", len(ORDER_ROWS))
    ]
    assert [row[6:] for row in ledger_rows(sf_conn, pipe_settings)] == [(len(ORDER_ROWS), True)]
    names = ", ".join(f'"{n.upper()}"' for n, _, _ in ORDER_COLUMNS[:8])
    loaded = query(sf_conn, f'SELECT {names} FROM {orders_sql(pipe_settings)} ORDER BY "ORDER_ID"')
    assert [row[:7] for row in loaded] == [row[:7] for row in ORDER_ROWS]
    payloads = query(
        sf_conn, f'SELECT "PAYLOAD", "BLOB" FROM {orders_sql(pipe_settings)} ORDER BY "ORDER_ID"'
    )
    assert [(None if p is None else json.loads(p), None if b is None else bytes(b)) for p, b in payloads] == [
        (row[9], row[10]) for row in ORDER_ROWS
    ]


def test_a_wrong_key_is_refused_with_401_and_nothing_loads(
    pipe_settings: Settings, s3: Any, sf_conn: Any, aws: LocalAws, local_snowpipe: LocalSnowpipe
) -> None:
    # Given a pipe that exists (a first file loaded with the registered key) and a second file
    put_run_manifest(s3, pipe_settings)
    first_key = stage_orders(s3, pipe_settings, ORDER_ROWS[:1], batch=1)
    load_staged_files(
        settings=pipe_settings,
        sf_conn=sf_conn,
        s3=s3,
        objects=[parse_data_key(first_key, pipe_settings.prefix)],
        snowpipe=client_for(pipe_settings, aws),
    )
    second = parse_data_key(stage_orders(s3, pipe_settings, ORDER_ROWS[1:], batch=2), pipe_settings.prefix)
    assert pipe_settings.snowflake.database
    pipe = qualified_pipe_name(
        pipe_settings.snowflake.database, pipe_settings.snowflake.control_schema, PIPE_PREFIX, ORDERS
    )
    endpoint = snowpipe_endpoint(local_snowpipe.url, ACCOUNT)
    other_key = private_key_pem(new_private_key())

    # When the SDK signs with a key that is not the user's
    manager = SimpleIngestManager(
        account=ACCOUNT,
        user=USER,
        pipe=pipe,
        private_key=other_key,
        scheme=endpoint.scheme,
        host=endpoint.host,
        port=endpoint.port,
    )
    with pytest.raises(IngestResponseError) as refused:
        manager.ingest_files([StagedFile(second.file_name, 1)])
    impostor = SnowpipeClient(account=ACCOUNT, user=USER, private_key_pem=other_key, endpoint=endpoint)
    with pytest.raises(PermanentError, match="401"):
        load_staged_files(settings=pipe_settings, sf_conn=sf_conn, s3=s3, objects=[second], snowpipe=impostor)

    # Then Snowflake's answer is HTTP 401, and only the first file's row is in the table
    assert refused.value.http_error_code == 401
    assert order_count(sf_conn, pipe_settings) == 1
    assert len(pipe_events(local_snowpipe, pipe_settings)) == 1


def test_an_unconfirmed_file_is_retried_and_loads_once(
    pipe_settings: Settings, s3: Any, sf_conn: Any, aws: LocalAws, local_snowpipe: LocalSnowpipe
) -> None:
    # Given a Snowpipe that accepts files but has not loaded them yet
    put_run_manifest(s3, pipe_settings)
    staged = parse_data_key(stage_orders(s3, pipe_settings, ORDER_ROWS), pipe_settings.prefix)
    local_snowpipe.hold()
    try:
        # When the loader's bounded wait ends before Snowpipe confirms
        with pytest.raises(RetryableError, match="did not confirm"):
            load_staged_files(
                settings=pipe_settings,
                sf_conn=sf_conn,
                s3=s3,
                objects=[staged],
                snowpipe=client_for(pipe_settings, aws, confirm_timeout_s=0.5),
            )
        # Then nothing is recorded as loaded (the message returns to the queue)
        assert [row[6:] for row in ledger_rows(sf_conn, pipe_settings)] == [(None, False)]
    finally:
        local_snowpipe.release()
    deadline = time.monotonic() + 30
    while not pipe_events(local_snowpipe, pipe_settings) and time.monotonic() < deadline:
        time.sleep(0.05)

    # When the message is delivered again (the file is submitted again)
    results = load_staged_files(
        settings=pipe_settings,
        sf_conn=sf_conn,
        s3=s3,
        objects=[staged],
        snowpipe=client_for(pipe_settings, aws),
    )

    # Then the earlier submission's load is confirmed and recorded; the rows are there once
    assert [(r.status, r.rows) for r in results] == [(LoadStatus.LOADED, len(ORDER_ROWS))]
    assert order_count(sf_conn, pipe_settings) == len(ORDER_ROWS)
    assert [e.status for e in pipe_events(local_snowpipe, pipe_settings)] == ["LOADED"]
    assert [row[6:] for row in ledger_rows(sf_conn, pipe_settings)] == [(len(ORDER_ROWS), True)]


def test_a_file_snowpipe_fails_is_a_permanent_error_naming_the_reason(
    pipe_settings: Settings, s3: Any, sf_conn: Any, aws: LocalAws
) -> None:
    # Given a staged file whose order_id is not a number
    put_run_manifest(s3, pipe_settings)
    bad = ("not-a-number", *ORDER_ROWS[0][1:])
    staged = parse_data_key(stage_orders(s3, pipe_settings, [bad]), pipe_settings.prefix)

    # When it goes through Snowpipe
    with pytest.raises(PermanentError, match="Snowpipe failed to load the file") as failed:
        load_staged_files(
            settings=pipe_settings,
            sf_conn=sf_conn,
            s3=s3,
            objects=[staged],
            snowpipe=client_for(pipe_settings, aws),
        )

    # Then the error names the file and Snowflake's reason, and the ledger does not hold it as loaded
    assert failed.value.s3_key == staged.key
    assert "not-a-number" in failed.value.message or "ORDER_ID" in failed.value.message.upper()
    assert [row[7] for row in ledger_rows(sf_conn, pipe_settings)] == [False]
    assert order_count(sf_conn, pipe_settings) == 0


def test_a_run_without_a_column_the_source_dropped_loads_its_values_into_their_own_columns(
    pipe_settings: Settings, s3: Any, sf_conn: Any, aws: LocalAws
) -> None:
    """The table's pipe was made when the source still had a column; its COPY lists the table's
    columns by position. A later run without that column loads with COPY (the ledger's
    transaction, exactly once) so each value lands in its own column, not the next one's."""
    # Given a table loaded through its pipe while the source had id, gone, note
    table = TableRef("public", f"pipe_drift_{uuid.uuid4().hex[:6]}")
    client = client_for(pipe_settings, aws)

    def stage_run(run_id: str, names: list[str], rows: list[tuple[Any, ...]]) -> Any:
        types = {"id": "bigint", "gone": "text", "note": "text"}
        columns = tuple(
            Column.from_types(n, types[n], types[n], map_pg_type(types[n]), n != "id") for n in names
        )
        manifest = RunManifest(
            run_id=run_id,
            table=table,
            mode="full",
            file_format=FileFormat.CSV,
            columns=columns,
            primary_key=("id",),
            state=RunState.EXTRACTING,
            started_at="2026-11-25T12:00:00Z",
        )
        RunStore(s3, pipe_settings.bucket).put_manifest(manifest)
        key = data_key(pipe_settings.prefix, table, 1, run_id, FileFormat.CSV)
        put_staged_file(
            s3, pipe_settings, key, csv_gz_bytes(rows, header=names), rows=len(rows), run_id=run_id
        )
        return parse_data_key(key, pipe_settings.prefix)

    first = stage_run("20261125T120000000000Z", ["id", "gone", "note"], [(1, "g1", "one")])
    load_staged_files(settings=pipe_settings, sf_conn=sf_conn, s3=s3, objects=[first], snowpipe=client)

    # When a run of the source without "gone" is loaded
    second = stage_run("20261126T120000000000Z", ["id", "note"], [(2, "two")])
    results = load_staged_files(
        settings=pipe_settings, sf_conn=sf_conn, s3=s3, objects=[second], snowpipe=client
    )

    # Then "two" is in NOTE, and GONE is NULL for the new row
    assert [(r.status, r.rows) for r in results] == [(LoadStatus.LOADED, 1)]
    target = quote_qualified(pipe_settings.snowflake.database or "", "PUBLIC", table.snowflake_table)
    assert query(sf_conn, f'SELECT "ID", "GONE", "NOTE" FROM {target} ORDER BY "ID"') == [
        (1, "g1", "one"),
        (2, None, "two"),
    ]
