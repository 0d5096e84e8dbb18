"""``pgsnow verify`` against real servers: the local PostgreSQL, moto over HTTP, the local Snowflake.

Tables are replicated by the real pipeline (extractor -> S3 -> SQS -> loader handler); each
fault is then made in Snowflake inside a transaction that the test rolls back, so every case
starts from the same faithful copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection

from pgsnow.config import Component
from pgsnow.demo.pipeline import replicate_table
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef, quote_ident, quote_qualified
from pgsnow.keys import FileFormat
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import SNOWFLAKE_DATABASE, LocalStack, load_function_handler
from pgsnow.postgres import connect
from pgsnow.verify import LEAF_ROWS, ROOT_BUCKETS, verify_table

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

BIG_ROWS = 1_000_000

THINGS_DDL = """
CREATE TABLE {} (
    id integer PRIMARY KEY,
    name text,
    note text,
    amount numeric(12, 2),
    big numeric,
    ratio double precision,
    flag boolean,
    born date,
    at_time time,
    created timestamp,
    updated timestamptz,
    payload jsonb,
    tags text[],
    blob bytea
)
"""

# 60 rows: NULL and '' in both text columns, '|' and '~' (the canonical form's own characters),
# NaN and infinities, JSON null vs SQL NULL, bytes with 0x00.
THINGS_ROWS = """
INSERT INTO {} SELECT
    i,
    CASE i % 5 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN 'a|b~N' ELSE 'name ' || i END,
    CASE WHEN i = 3 THEN NULL WHEN i = 4 THEN '' ELSE 'Zoë "quoted", ' || chr(10) || 'line ' || i END,
    (i * 1.25)::numeric(12, 2),
    CASE WHEN i % 7 = 0 THEN NULL ELSE i * 1000000 + 0.5 END,
    CASE i % 6 WHEN 0 THEN 'NaN'::float8 WHEN 1 THEN 'Infinity' WHEN 2 THEN '-Infinity'
               WHEN 3 THEN NULL ELSE i / 3.0 END,
    CASE i % 3 WHEN 0 THEN NULL ELSE i % 2 = 0 END,
    date '2000-02-28' + i,
    time '23:59:59.999999' - i * interval '1 minute 0.5 second',
    timestamp '2024-03-10 01:59:59.5' + i * interval '17 minutes',
    timestamptz '2024-10-27 00:30:00+00' + i * interval '13 minutes',
    CASE i % 4 WHEN 0 THEN NULL WHEN 1 THEN 'null'::jsonb
               ELSE jsonb_build_object('a', i, 'longer key', jsonb_build_array(i, 'x|y', NULL)) END,
    CASE WHEN i % 5 = 0 THEN NULL ELSE ARRAY['t' || i, NULL, ''] END,
    CASE WHEN i % 4 = 0 THEN NULL ELSE decode('00ff' || lpad(to_hex(i), 4, '0'), 'hex') END
FROM generate_series(1, 60) AS i
"""


# --------------------------------------------------------------------------- fixtures
# The module's stack and schema are conftest's ``pipeline``; these are its parts, by the names used here.


@pytest.fixture(scope="module")
def source_schema(pipeline: PipelineHarness) -> tuple[str, str]:
    """(DSN of database ``test``, the schema only this module uses)."""
    return pipeline.source_dsn, pipeline.schema


@pytest.fixture(scope="module")
def setup_conn(pipeline: PipelineHarness) -> PgConnection:
    """Autocommit, for DDL and source writes."""
    return pipeline.setup_conn


@pytest.fixture
def pg_conn(source_schema: tuple[str, str]) -> Iterator[PgConnection]:
    """The connection verify reads with: not autocommit, so it reads one snapshot."""
    conn = connect(source_schema[0])
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def stack(pipeline: PipelineHarness) -> LocalStack:
    """The module's stack, its environment in place for the loader handler."""
    return pipeline.stack


@pytest.fixture(scope="module")
def sf_conn(pipeline: PipelineHarness) -> Any:
    return pipeline.sf_conn


@pytest.fixture(scope="module")
def replicate(stack: LocalStack) -> Callable[[TableRef, FileFormat], None]:
    dispatcher = SqsDispatcher(stack.aws, stack.resources.queue_url, load_function_handler("loader"))

    def run(table: TableRef, file_format: FileFormat) -> None:
        replicate_table(stack, table, file_format, dispatcher)

    return run


def create_things(setup_conn: PgConnection, table: TableRef) -> None:
    target = sql.Identifier(table.schema, table.table)
    with setup_conn.cursor() as cur:
        cur.execute(sql.SQL(THINGS_DDL).format(target))
        cur.execute(sql.SQL(THINGS_ROWS).format(target))


@pytest.fixture(scope="module")
def things(
    source_schema: tuple[str, str],
    setup_conn: PgConnection,
    replicate: Callable[[TableRef, FileFormat], None],
) -> dict[FileFormat, TableRef]:
    """The edge-value table, replicated once as CSV and once as Parquet."""
    tables = {}
    for file_format in (FileFormat.CSV, FileFormat.PARQUET):
        table = TableRef(source_schema[1], f"things_{file_format.value}")
        create_things(setup_conn, table)
        replicate(table, file_format)
        tables[file_format] = table
    return tables


def sf_name(table: TableRef) -> str:
    return quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)


# --------------------------------------------------------------------------- identical tables


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_identical_tables_pass(
    things: dict[FileFormat, TableRef], pg_conn: PgConnection, sf_conn: Any, file_format: FileFormat
) -> None:
    result = verify_table(pg_conn, sf_conn, things[file_format], SNOWFLAKE_DATABASE)

    assert result.error is None
    assert result.ok, result.to_dict()
    assert (result.source_rows, result.target_rows) == (60, 60)
    assert result.missing == result.extra == result.different == []
    # one count and one bucket query per side: nothing drilled into
    assert result.queries == 4
    assert result.rows_fetched == 2 + 2 * 60  # bucket width 1: one bucket line per row at this size


# --------------------------------------------------------------------------- faults, one each

FAULTS = [
    pytest.param('UPDATE {t} SET "AMOUNT" = 999.99 WHERE "ID" = 7', ([], [], ["7"]), id="changed-decimal"),
    pytest.param('UPDATE {t} SET "NAME" = \'name 8 \' WHERE "ID" = 8', ([], [], ["8"]), id="changed-text"),
    pytest.param(
        'UPDATE {t} SET "RATIO" = 10 / 3.0 + 0.000001 WHERE "ID" = 10', ([], [], ["10"]), id="changed-float"
    ),
    pytest.param(
        'UPDATE {t} SET "UPDATED" = DATEADD(SECOND, 1, "UPDATED") WHERE "ID" = 9',
        ([], [], ["9"]),
        id="changed-timestamptz",
    ),
    pytest.param('DELETE FROM {t} WHERE "ID" = 11', (["11"], [], []), id="missing-row"),
    pytest.param(
        'INSERT INTO {t} ("ID", "NAME") VALUES (100000, \'ghost\')', ([], ["100000"], []), id="extra-row"
    ),
    pytest.param(
        'UPDATE {t} SET "NOTE" = CASE "ID" WHEN 3 THEN \'\' ELSE NULL END WHERE "ID" IN (3, 4)',
        ([], [], ["3", "4"]),
        id="null-and-empty-swapped",
    ),
    pytest.param(
        'UPDATE {t} SET "PAYLOAD" = PARSE_JSON(\'{{"a": 7, "longer key": [7, "x|z", null]}}\') WHERE "ID" = 6',
        ([], [], ["6"]),
        id="changed-json-value",
    ),
    pytest.param(
        'UPDATE {t} SET "PAYLOAD" = NULL WHERE "ID" = 5', ([], [], ["5"]), id="json-null-became-sql-null"
    ),
    pytest.param(
        "UPDATE {t} SET \"BLOB\" = TO_BINARY('00fe0001', 'HEX') WHERE \"ID\" = 1",
        ([], [], ["1"]),
        id="changed-bytes",
    ),
]


@pytest.mark.parametrize("fault, expected", FAULTS)
def test_each_fault_is_found_with_its_key(
    things: dict[FileFormat, TableRef],
    pg_conn: PgConnection,
    in_rolled_back_transaction: Any,
    fault: str,
    expected: tuple[list[str], list[str], list[str]],
) -> None:
    # Given a faithful copy, with one fault made in Snowflake
    table = things[FileFormat.CSV]
    cur = in_rolled_back_transaction.cursor()
    cur.execute(fault.format(t=sf_name(table)))

    # When verify compares the table
    result = verify_table(pg_conn, in_rolled_back_transaction, table, SNOWFLAKE_DATABASE)

    # Then it fails and names exactly the affected keys
    assert result.error is None
    assert not result.ok
    assert (result.missing, result.extra, result.different) == expected
    assert not result.truncated


def test_listed_keys_are_bounded(
    things: dict[FileFormat, TableRef], pg_conn: PgConnection, in_rolled_back_transaction: Any
) -> None:
    # Given every row changed in Snowflake
    table = things[FileFormat.CSV]
    in_rolled_back_transaction.cursor().execute(f'UPDATE {sf_name(table)} SET "FLAG" = NULL')
    flagged = 40  # rows whose flag was not NULL already (i % 3 != 0)

    # When verify lists at most 5 keys
    result = verify_table(pg_conn, in_rolled_back_transaction, table, SNOWFLAKE_DATABASE, max_keys=5)

    # Then it reports 5, says there are more, and still counts the differing buckets
    assert result.different == ["1", "2", "4", "5", "7"]
    assert result.truncated
    assert result.buckets_differing == flagged


# --------------------------------------------------------------------------- other key shapes


@pytest.fixture(scope="module")
def keyed_by_text(
    source_schema: tuple[str, str],
    setup_conn: PgConnection,
    replicate: Callable[[TableRef, FileFormat], None],
) -> TableRef:
    table = TableRef(source_schema[1], "Region Codes")
    target = sql.Identifier(table.schema, table.table)
    with setup_conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                'CREATE TABLE {} (region text, "Code" integer, label text, PRIMARY KEY (region, "Code"))'
            ).format(target)
        )
        cur.execute(
            sql.SQL(
                "INSERT INTO {} SELECT r, c, r || '-' || c FROM unnest(ARRAY['eu', 'us', 'a|b']) AS r, "
                "generate_series(1, 400) AS c"
            ).format(target)
        )
    replicate(table, FileFormat.PARQUET)
    return table


def test_composite_text_key_is_bucketed_by_hash_and_keys_listed(
    keyed_by_text: TableRef, pg_conn: PgConnection, in_rolled_back_transaction: Any
) -> None:
    # Given a composite key with text, one row deleted and one changed in Snowflake
    sf_table = sf_name(keyed_by_text)
    cur = in_rolled_back_transaction.cursor()
    cur.execute(f'DELETE FROM {sf_table} WHERE "REGION" = \'a|b\' AND "Code" = 17')
    cur.execute(f'UPDATE {sf_table} SET "LABEL" = \'x\' WHERE "REGION" = \'eu\' AND "Code" = 300')

    # When verified
    result = verify_table(pg_conn, in_rolled_back_transaction, keyed_by_text, SNOWFLAKE_DATABASE)

    # Then both keys are named, with their column values decoded
    assert (result.source_rows, result.target_rows) == (1200, 1199)
    assert result.missing == ["(a|b, 17)"]
    assert result.different == ["(eu, 300)"]
    assert result.extra == []


def test_composite_text_key_identical_passes(
    keyed_by_text: TableRef, pg_conn: PgConnection, sf_conn: Any
) -> None:
    result = verify_table(pg_conn, sf_conn, keyed_by_text, SNOWFLAKE_DATABASE)
    assert result.ok, result.to_dict()
    assert result.queries == 4


def test_table_without_primary_key_compares_rows_as_a_multiset(
    source_schema: tuple[str, str],
    setup_conn: PgConnection,
    replicate: Callable[[TableRef, FileFormat], None],
    pg_conn: PgConnection,
    in_rolled_back_transaction: Any,
) -> None:
    # Given a keyless table with duplicate rows, replicated, then one duplicate added in Snowflake
    table = TableRef(source_schema[1], "events_log")
    with setup_conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE {} (kind text, n integer)").format(
                sql.Identifier(table.schema, table.table)
            )
        )
        cur.execute(
            sql.SQL("INSERT INTO {} SELECT 'k' || (i % 3), i % 5 FROM generate_series(1, 30) AS i").format(
                sql.Identifier(table.schema, table.table)
            )
        )
    replicate(table, FileFormat.CSV)
    assert verify_table(pg_conn, in_rolled_back_transaction, table, SNOWFLAKE_DATABASE).ok
    in_rolled_back_transaction.cursor().execute(f"INSERT INTO {sf_name(table)} VALUES ('k0', 0)")

    # When verified
    result = verify_table(pg_conn, in_rolled_back_transaction, table, SNOWFLAKE_DATABASE)

    # Then the extra copy is reported by its row hash
    assert not result.keyed
    assert (result.source_rows, result.target_rows) == (30, 31)
    assert len(result.extra) == 1 and result.extra[0].startswith("row md5 ")
    assert result.missing == result.different == []


# --------------------------------------------------------------------------- incremental watermark


def test_rows_marked_deleted_are_not_compared(
    source_schema: tuple[str, str],
    setup_conn: PgConnection,
    replicate: Callable[[TableRef, FileFormat], None],
    pg_conn: PgConnection,
    sf_conn: Any,
) -> None:
    # Given a table with soft deletes in Snowflake (the deletion mark a soft-delete load adds): a row
    # PostgreSQL deleted is still there, marked
    table = TableRef(source_schema[1], "things_soft")
    create_things(setup_conn, table)
    replicate(table, FileFormat.CSV)
    with sf_conn.cursor() as cur:
        cur.execute(f'ALTER TABLE {sf_name(table)} ADD COLUMN "_PGSNOW_DELETED_AT" TIMESTAMP_TZ')
        cur.execute(
            f'INSERT INTO {sf_name(table)} ("ID", "NAME", "_PGSNOW_DELETED_AT") '
            "VALUES (100001, 'deleted in PostgreSQL', CURRENT_TIMESTAMP())"
        )
    # When verify compares it (no manifest: as `pgsnow verify` does for any non-incremental table)
    result = verify_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
    # Then the marked row is not a row of the copy
    assert result.ok, result.to_dict()
    assert (result.source_rows, result.target_rows) == (60, 60)
    # And once the mark is gone, the same row is an extra one
    with sf_conn.cursor() as cur:
        cur.execute(f'UPDATE {sf_name(table)} SET "_PGSNOW_DELETED_AT" = NULL WHERE "ID" = 100001')
    result = verify_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)
    assert not result.ok and result.extra == ["100001"]


def test_incremental_table_is_verified_up_to_the_watermark(
    stack: LocalStack,
    source_schema: tuple[str, str],
    setup_conn: PgConnection,
    pg_conn: PgConnection,
    sf_conn: Any,
) -> None:
    # Given a table replicated up to a watermark, and a row committed after it
    table = TableRef(source_schema[1], "orders_incremental")
    target = sql.Identifier(table.schema, table.table)
    with setup_conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, changed_at timestamptz)").format(target))
        cur.execute(
            sql.SQL(
                "INSERT INTO {} SELECT i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 hour' "
                "FROM generate_series(1, 20) AS i"
            ).format(target)
        )
    extract_conn = connect(source_schema[0])
    try:
        manifest = extract_table(
            settings=stack.settings(Component.EXTRACTOR),
            pg_conn=extract_conn,
            s3=stack.function_client(Component.EXTRACTOR, "s3"),
            table=table,
            file_format=FileFormat.CSV,
        )
    finally:
        extract_conn.close()
    SqsDispatcher(stack.aws, stack.resources.queue_url, load_function_handler("loader")).run_until_idle()
    incremental = dataclasses.replace(
        manifest,
        mode="incremental",
        cursor_column="changed_at",
        watermark_after="2024-01-01T20:00:00.000000Z",
    )
    with setup_conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} VALUES (21, '2024-01-01 21:00:00+00')").format(target))

    # When verified with and without the run's watermark
    bounded = verify_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE, manifest=incremental)
    unbounded = verify_table(pg_conn, sf_conn, table, SNOWFLAKE_DATABASE)

    # Then the late row is outside the comparison only when the watermark applies
    assert bounded.ok, bounded.to_dict()
    assert bounded.source_rows == 20 and bounded.watermark is not None
    assert not unbounded.ok
    assert unbounded.missing == ["21"]


# --------------------------------------------------------------------------- a million rows


@pytest.fixture(scope="module")
def big_table(source_schema: tuple[str, str], setup_conn: PgConnection, sf_conn: Any) -> TableRef:
    """1M rows made on both sides by the same formula (replicating them would test the loader, not verify)."""
    table = TableRef(source_schema[1], "big")
    with setup_conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, name text, amount numeric(12, 2), at timestamptz)"
            ).format(sql.Identifier(table.schema, table.table))
        )
        cur.execute(
            sql.SQL(
                "INSERT INTO {} SELECT i, 'n' || i, mod(i, 10000) / 100.0, "
                "timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second' "
                "FROM generate_series(1, %s) AS i"
            ).format(sql.Identifier(table.schema, table.table)),
            (BIG_ROWS,),
        )
        cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table.schema, table.table)))
    cur = sf_conn.cursor()
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema)}")
    cur.execute(
        f"CREATE TABLE {sf_name(table)} ({quote_ident('ID')} NUMBER(38,0), {quote_ident('NAME')} VARCHAR, "
        f"{quote_ident('AMOUNT')} NUMBER(12,2), {quote_ident('AT')} TIMESTAMP_TZ(6))"
    )
    cur.execute(
        f"INSERT INTO {sf_name(table)} SELECT I, 'n' || I, MOD(I, 10000) / 100, "
        "DATEADD(SECOND, I, '2024-01-01 00:00:00 +00:00'::TIMESTAMP_TZ) "
        f"FROM (SELECT SEQ8() + 1 AS I FROM TABLE(GENERATOR(ROWCOUNT => {BIG_ROWS})))"
    )
    return table


def test_a_million_rows_are_compared_without_fetching_them(
    big_table: TableRef, pg_conn: PgConnection, in_rolled_back_transaction: Any
) -> None:
    # Given 1M identical rows, then one changed and one deleted in Snowflake
    sf_table = sf_name(big_table)
    matching = verify_table(pg_conn, in_rolled_back_transaction, big_table, SNOWFLAKE_DATABASE)
    assert matching.ok, matching.to_dict()
    assert matching.rows_fetched <= 2 + 2 * ROOT_BUCKETS
    cur = in_rolled_back_transaction.cursor()
    cur.execute(f'UPDATE {sf_table} SET "NAME" = \'changed\' WHERE "ID" = 654321')
    cur.execute(f'DELETE FROM {sf_table} WHERE "ID" = 1000000')

    # When verified
    result = verify_table(pg_conn, in_rolled_back_transaction, big_table, SNOWFLAKE_DATABASE)

    # Then both keys are found by drilling into two buckets only, fetching a few thousand rows at most
    assert result.different == ["654321"]
    assert result.missing == ["1000000"]
    assert result.buckets_differing >= 2
    assert result.rows_fetched < 2 * ROOT_BUCKETS + 4 * 64 + 4 * LEAF_ROWS + 10
    assert result.queries <= 12


def test_extreme_integer_keys_are_bucketed_by_hash(
    source_schema: tuple[str, str],
    setup_conn: PgConnection,
    replicate: Callable[[TableRef, FileFormat], None],
    pg_conn: PgConnection,
    in_rolled_back_transaction: Any,
) -> None:
    # Given bigint keys at both ends of the range (a key range would not balance, nor stay exact)
    table = TableRef(source_schema[1], "extreme_keys")
    target = sql.Identifier(table.schema, table.table)
    with setup_conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, label text)").format(target))
        cur.execute(
            sql.SQL(
                "INSERT INTO {} VALUES (-9223372036854775808, 'min'), (0, 'zero'), (9223372036854775807, 'max')"
            ).format(target)
        )
    replicate(table, FileFormat.CSV)
    assert verify_table(pg_conn, in_rolled_back_transaction, table, SNOWFLAKE_DATABASE).ok
    in_rolled_back_transaction.cursor().execute(
        f'UPDATE {sf_name(table)} SET "LABEL" = \'MIN\' WHERE "ID" = -9223372036854775808'
    )

    # When verified
    result = verify_table(pg_conn, in_rolled_back_transaction, table, SNOWFLAKE_DATABASE)

    # Then the changed row is named by its key
    assert result.different == ["-9223372036854775808"]
