"""``pgsnow postgres-sql --dsn``: the printed script runs on the real server and does what it says.

Everything it creates has a name of this test's own (schema, publication, slot, role) and is
dropped afterwards; the slot through cdc_support's drop, since slots pin WAL.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg2
import psycopg2.extras
import pytest
from cdc_support import drop_change_capture_source
from psycopg2 import sql
from stack_support import PG_DSN_DEFAULT, autocommit_connection, unique_name

from pgsnow.cdc.slot import slot_health
from pgsnow.cli import main
from pgsnow.config import postgres_env

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Names:
    dsn: str
    schema: str
    publication: str
    slot: str
    user: str


@pytest.fixture
def names() -> Iterator[Names]:
    dsn = postgres_env().get("PGSNOW_PG_DSN") or PG_DSN_DEFAULT
    names = Names(
        dsn=dsn,
        schema=unique_name("pgsnow_pgsetup_"),
        publication=unique_name("pgsnow_test_pub_"),
        slot=unique_name("pgsnow_test_slot_"),
        user=unique_name("pgsnow_test_user_"),
    )
    with autocommit_connection(dsn) as conn, conn.cursor() as cur:
        schema = sql.Identifier(names.schema)
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        cur.execute(sql.SQL("CREATE TABLE {}.keyed (id int PRIMARY KEY, v text)").format(schema))
        cur.execute(sql.SQL("CREATE TABLE {}.keyless (v text)").format(schema))
        cur.execute(sql.SQL("CREATE TABLE {}.parted (d date, v text) PARTITION BY RANGE (d)").format(schema))
        cur.execute(
            sql.SQL(
                "CREATE TABLE {}.parted_2026 PARTITION OF {}.parted FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
            ).format(schema, schema)
        )
        cur.execute(sql.SQL("INSERT INTO {}.keyless VALUES ('a')").format(schema))
    try:
        yield names
    finally:
        drop_change_capture_source(dsn, publication=names.publication, slot=names.slot)
        with autocommit_connection(dsn) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(names.schema)))
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (names.user,))
            if cur.fetchone():
                cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(names.user)))
                cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(names.user)))


def script_statements(text: str) -> list[str]:
    """The statements of a printed script (comment lines dropped; each ends with ``;``)."""
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    return [s.strip() for s in body.split(";\n") if s.strip().rstrip(";")]


def test_printed_setup_runs_and_a_replication_user_can_do_its_job(
    names: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    tables = ",".join(f"{names.schema}.{t}" for t in ("keyed", "keyless", "parted"))
    # Given the script printed for three tables: one keyed, one without a key, one partitioned
    exit_code = main(
        [
            "postgres-sql",
            "--dsn", names.dsn,
            "--tables", tables,
            "--publication", names.publication,
            "--slot", names.slot,
            "--user", names.user,
        ]
    )  # fmt: skip
    assert exit_code == 0
    text = capsys.readouterr().out
    assert f"{names.schema}.keyed: primary key (default)" in text
    assert f"{names.schema}.keyless: no primary key: FULL" in text
    assert f"partition {names.schema}.parted_2026 has no primary key" in text

    # When each statement runs, as psql would run them (each on its own)
    with autocommit_connection(names.dsn) as conn, conn.cursor() as cur:
        for statement in script_statements(text):
            cur.execute(statement)
            if statement == "SHOW wal_level":
                assert cur.fetchone() == ("logical",)

        # Then the publication covers the tables through the partition root
        cur.execute(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = %s",
            (names.publication,),
        )
        assert cur.fetchone() == (True,)
        cur.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 2",
            (names.publication,),
        )
        assert cur.fetchall() == [
            (names.schema, "keyed"),
            (names.schema, "keyless"),
            (names.schema, "parted"),
        ]
        # and the keyless tables have FULL identity, so updates and deletes still work once published
        cur.execute(
            "SELECT c.relname, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY 1",
            (names.schema,),
        )
        assert cur.fetchall() == [("keyed", "d"), ("keyless", "f"), ("parted_2026", "f")]
        cur.execute(sql.SQL("UPDATE {}.keyless SET v = 'b'").format(sql.Identifier(names.schema)))

    # and the slot exists, as pgoutput
    with autocommit_connection(names.dsn) as conn:
        health = slot_health(conn, names.slot)
    assert health.exists and health.plugin == "pgoutput" and not health.lost

    # and the replication user can read the tables, use a temporary table and emit a heartbeat
    user_dsn = psycopg2.extensions.make_dsn(names.dsn, user=names.user)
    with autocommit_connection(user_dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {}.keyless").format(sql.Identifier(names.schema)))
        assert cur.fetchone() == (1,)
        cur.execute("CREATE TEMPORARY TABLE pgsnow_convert (v text)")
        cur.execute("SELECT pg_logical_emit_message(false, 'pgsnow.heartbeat', 'test')")
        # but not write them
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute(sql.SQL("DELETE FROM {}.keyed").format(sql.Identifier(names.schema)))
    # and open a replication connection and stream the slot as the drain does (pgoutput over the
    # publication), then leave without confirming anything
    replication = psycopg2.connect(user_dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        with replication.cursor() as cur:
            cur.execute("IDENTIFY_SYSTEM")
            assert cur.fetchone() is not None
            cur.start_replication(
                slot_name=names.slot,
                decode=False,
                options={"proto_version": "1", "publication_names": names.publication},
            )
            # The keyless table's update above is in the slot: its transaction's Begin comes first
            message = None
            for _ in range(600):  # a bound so a broken stream fails instead of hanging
                message = cur.read_message()
                if message is not None:
                    break
                select.select([replication], [], [], 0.1)
            assert message is not None and message.payload[:1] == b"B"
    finally:
        replication.close()
