"""Locating PostgreSQL for the local stack, and the embedded fallback, against real servers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from pgsnow.errors import ConfigError
from pgsnow.local.postgres import (
    DEFAULT_DSN,
    LocalPostgres,
    create_database,
    start_embedded_postgres,
    start_local_postgres,
)

pytestmark = pytest.mark.integration

UNREACHABLE_DSN = "host=127.0.0.1 port=1 user=postgres dbname=postgres"


def select_one(dsn: str) -> int:
    with psycopg2.connect(dsn, connect_timeout=5) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        row = cursor.fetchone()
    connection.close()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module")
def admin_dsn() -> str:
    """The server the tests use: the auto-detected one (the loopback server, or the embedded fallback)."""
    found = start_local_postgres(environ={})
    return found.dsn


@pytest.fixture(scope="module")
def embedded_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded") / "pgdata"


@pytest.fixture(scope="module")
def embedded(embedded_data_dir: Path) -> Iterator[LocalPostgres]:
    server = start_embedded_postgres(embedded_data_dir)
    yield server
    server.stop()


def test_the_built_in_default_is_used_when_it_answers() -> None:
    # Given no configuration, and a server on 127.0.0.1:5432 (the default for this machine)
    # When we look for PostgreSQL
    found = start_local_postgres(environ={})

    # Then the default is chosen (the embedded path is only a fallback) and it answers
    if found.embedded:
        pytest.fail("no PostgreSQL on 127.0.0.1:5432: this test needs the loopback server the suite expects")
    assert found.dsn == DEFAULT_DSN
    assert select_one(found.dsn) == 1


@pytest.mark.parametrize(
    ("dsn", "environ", "source"),
    [
        pytest.param(UNREACHABLE_DSN, {}, "the dsn argument", id="dsn-argument"),
        pytest.param(None, {"PGSNOW_PG_DSN": UNREACHABLE_DSN}, "PGSNOW_PG_DSN", id="pgsnow-env"),
        pytest.param(None, {"PGHOST": "127.0.0.1", "PGPORT": "1"}, "PGHOST, PGPORT", id="libpq-env"),
    ],
)
def test_a_configured_server_that_does_not_answer_is_an_error(
    dsn: str | None, environ: dict[str, str], source: str, tmp_path: Path
) -> None:
    # A configured server never silently becomes the embedded one.
    with pytest.raises(ConfigError, match=source) as raised:
        start_local_postgres(dsn, tmp_path / "pgdata", environ=environ)
    assert "port=1" in str(raised.value)
    assert not (tmp_path / "pgdata").exists()


def test_configured_sources_win_in_order(admin_dsn: str) -> None:
    # Given PGSNOW_PG_DSN pointing at a real server and libpq vars pointing nowhere
    environ = {"PGSNOW_PG_DSN": admin_dsn, "PGHOST": "127.0.0.1", "PGPORT": "1"}

    # When / Then: PGSNOW_PG_DSN wins over the PG* variables
    found = start_local_postgres(environ=environ)
    assert (found.dsn, found.embedded) == (admin_dsn, False)

    # and the argument wins over both
    with pytest.raises(ConfigError, match="the dsn argument"):
        start_local_postgres(UNREACHABLE_DSN, environ=environ)


def test_libpq_variables_become_a_dsn() -> None:
    found = start_local_postgres(
        environ={"PGHOST": "127.0.0.1", "PGPORT": "5432", "PGUSER": "postgres", "PGDATABASE": "postgres"}
    )
    assert psycopg2.extensions.parse_dsn(found.dsn) == {
        "host": "127.0.0.1",
        "port": "5432",
        "user": "postgres",
        "dbname": "postgres",
    }
    assert select_one(found.dsn) == 1


@pytest.mark.slow
def test_embedded_server_starts_and_answers(embedded: LocalPostgres) -> None:
    assert embedded.embedded
    assert select_one(embedded.dsn) == 1
    with psycopg2.connect(embedded.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('data_directory')")
        row = cursor.fetchone()
    connection.close()
    assert row is not None
    assert row[0].endswith("pgdata")


@pytest.mark.slow
def test_embedded_server_runs_with_logical_decoding(embedded: LocalPostgres) -> None:
    # Given the embedded server (a new data directory: pgserver's initdb defaults to wal_level replica)
    slot = f"pgsnow_test_slot_{uuid.uuid4().hex[:8]}"
    publication = f"pgsnow_test_pub_{uuid.uuid4().hex[:8]}"
    connection = psycopg2.connect(embedded.dsn)
    connection.autocommit = True  # a slot cannot be created in a transaction that wrote
    with connection.cursor() as cursor:
        cursor.execute("SHOW wal_level")
        level = cursor.fetchone()
        # Then a pgoutput slot can be created and decoded from (both dropped again)
        cursor.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(sql.Identifier(publication)))
        cursor.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            cursor.execute(
                "SELECT pg_logical_emit_message(true, 'pgsnow.heartbeat', 'x')"
            )  # committed: flushed
            cursor.execute(
                "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
                "'publication_names', %s, 'messages', 'true')",
                (slot, publication),
            )
            decoded = [bytes(row[0]) for row in cursor.fetchall()]
        finally:
            cursor.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            cursor.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
    connection.close()
    assert level == ("logical",)
    assert any(b"pgsnow.heartbeat" in message for message in decoded)


@pytest.mark.slow
def test_embedded_server_stays_logical_when_started_again(
    embedded: LocalPostgres, embedded_data_dir: Path
) -> None:
    # When the running embedded server's data directory is started again (reused, not restarted)
    again = start_embedded_postgres(embedded_data_dir)
    with psycopg2.connect(again.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SHOW wal_level")
        level = cursor.fetchone()
        cursor.execute("SELECT pg_postmaster_start_time() < now()")
    connection.close()
    assert level == ("logical",)
    assert again.dsn == embedded.dsn


@pytest.mark.slow
def test_unreachable_default_falls_back_to_the_embedded_server(
    embedded: LocalPostgres, embedded_data_dir: Path
) -> None:
    # Given nothing configured and a built-in default that does not answer
    # When we look for PostgreSQL with the embedded server's data dir
    found = start_local_postgres(environ={}, default_dsn=UNREACHABLE_DSN, data_dir=embedded_data_dir)

    # Then the embedded server is used and answers
    assert found.embedded
    assert select_one(found.dsn) == 1


@pytest.mark.slow
def test_create_database_on_the_embedded_server(embedded: LocalPostgres) -> None:
    name = f"pgsnow Test {uuid.uuid4().hex[:8]}"
    dsn = create_database(embedded.dsn, name)
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        row = cursor.fetchone()
    connection.close()
    assert row == (name,)
    drop_database(embedded.dsn, name)


def test_create_database_keeps_or_drops_an_existing_one(admin_dsn: str) -> None:
    # Given a new database with one table in it (the name needs quoting)
    name = f"pgsnow_local_{uuid.uuid4().hex[:8]}-X"
    dsn = create_database(admin_dsn, name)
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE kept (id int)")
    connection.close()

    def has_table(database_dsn: str) -> bool:
        with psycopg2.connect(database_dsn) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT to_regclass('public.kept') IS NOT NULL")
            row = cursor.fetchone()
        conn.close()
        return bool(row and row[0])

    # When it is created again without drop_existing, Then it is kept
    assert create_database(admin_dsn, name) == dsn
    assert has_table(dsn)

    # When it is created with drop_existing, Then it is new and empty
    assert create_database(admin_dsn, name, drop_existing=True) == dsn
    assert not has_table(dsn)

    drop_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    connection = psycopg2.connect(admin_dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    connection.close()
