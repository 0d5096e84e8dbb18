"""The load ledger: the only code that reads or writes it.

One ledger table per target table (``LOAD_LEDGER__<SCHEMA>__<TABLE>`` in the control schema), so
loads into different tables never wait on a common lock (docs/loading.md, "Locks"). One row per
S3 key pgsnow loaded into that table (and one per complete run whose swap or deletes it decided,
under ``keys.applied_mark_key``). A group's rows are claimed and recorded in the same Snowflake
transaction as its COPY, so a key is either loaded and recorded, or neither. This module never
commits: every statement runs in the caller's transaction (or autocommits outside one).

A group of files costs a fixed number of statements, whatever its size: one claim (a MERGE over
a ``VALUES`` list of every key), one look-up, one record (an UPDATE from a ``VALUES`` list).

Before pgsnow kept one ledger per table, every table shared ``LOAD_LEDGER``. A table's ledger
adopts that table's rows from it when the ledger is created (``Ledger.create``), and readers
that must not create anything (status, the sweeper, cleanup) read the old ledger while a
table's own does not exist yet, so a key loaded before the upgrade is still known as loaded.

A change-capture table's ledger also holds its **applied position** (``AppliedPosition``): the
commit LSN its change runs are applied through and the run that put it there, one row under the
reserved key ``applied_position_key(table)`` (LSN in ``ROWS_LOADED``, run in ``RUN_ID``, STATUS
``POSITION`` after a change run or ``SNAPSHOT`` after a snapshot). It is advanced by a
compare-and-set in the same transaction as the MERGE that applies the run (``advance``), so two
loaders applying one table never both apply a run.

``Ledger`` runs the statements on a connection; the ``build_*`` functions are the SQL, pure and
unit-tested as text. Values are always bound; an IN list or a VALUES list gets one placeholder
per value, at most ``LOOKUP_CHUNK`` keys (``VALUES_CHUNK`` rows) per statement.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pgsnow.config import Settings
from pgsnow.errors import ConfigError, PermanentError
from pgsnow.identifiers import MAX_IDENTIFIER_LENGTH, TableRef, quote_ident, quote_qualified
from pgsnow.keys import CONTROL_PREFIX, parse_data_key
from pgsnow.manifest import RunManifest, StagedFile
from pgsnow.snowflake.sql_text import PLACEHOLDER, Statement, placeholder_list

LEDGER_PREFIX = "LOAD_LEDGER__"
# The one ledger every table shared before pgsnow kept one per table: read only, to adopt its rows.
LEGACY_LEDGER_TABLE = "LOAD_LEDGER"
# Snowflake caps the number of expressions in an IN list; stay well below it.
LOOKUP_CHUNK = 500
# Rows per claim or record statement: a COPY's group (MAX_FILES_PER_COPY) in one statement;
# Snowflake's VALUES clause takes up to 16,384 rows.
VALUES_CHUNK = 1000

# Every column of a table's ledger (the legacy ledger gained the last five by ALTER TABLE).
LEDGER_COLUMNS = (
    "S3_KEY",
    "ETAG",
    "SHA256",
    "RUN_ID",
    "SCHEMA_NAME",
    "TABLE_NAME",
    "ROWS_LOADED",
    "LOADED_AT",
    "STATUS",
    "ERRORS_SEEN",
    "FIRST_ERROR",
    "SUBMITTED_AT",
)


@dataclass(frozen=True)
class LedgerRow:
    """What the ledger recorded for one loaded key (a file, or a run's outcome mark)."""

    s3_key: str
    etag: str | None
    sha256: str | None
    rows_loaded: int | None
    status: str | None = None  # LOADED, PARTIALLY_LOADED; a run's mark: APPLIED or SUPERSEDED

    def matches(self, *, sha256: str | None, etag: str | None) -> bool:
        """Is this the content that was loaded? SHA-256 when both sides have one, else the ETag."""
        if self.sha256 and sha256:
            return self.sha256 == sha256
        if self.etag and etag:
            return self.etag == etag.strip('"')
        # A ledger row without either checksum is from a loader that did not record them: trust the key.
        return not self.sha256 and not self.etag


@dataclass(frozen=True)
class LedgerClaim:
    s3_key: str
    etag: str | None
    sha256: str | None
    run_id: str | None
    schema_name: str
    table_name: str


@dataclass(frozen=True)
class LedgerRecord:
    """A loaded key's result. ``status`` is LOADED, or PARTIALLY_LOADED (ON_ERROR = CONTINUE
    rejected some rows: the file is done, and the ledger says what was left out); a run's mark
    records APPLIED or SUPERSEDED."""

    s3_key: str
    rows_loaded: int
    status: str = "LOADED"
    errors_seen: int = 0
    first_error: str | None = None


# --------------------------------------------------------------------------- SQL


def ledger_table(table: TableRef) -> str:
    """The name of ``table``'s ledger: its source schema and name (as the S3 key has them) in upper
    case, capped at Snowflake's identifier length.

    Two tables whose names meet here (``public.Orders`` and ``public.orders``, ``a__b.c`` and
    ``a.b__c``, or two very long names) share one ledger: still correct (a row is found by its
    S3 key, a run's by its source schema and table), they only share its lock.
    """
    return f"{LEDGER_PREFIX}{table.schema.upper()}__{table.table.upper()}"[:MAX_IDENTIFIER_LENGTH]


def ledger_name(database: str, control_schema: str, table: TableRef) -> str:
    return quote_qualified(database, control_schema, ledger_table(table))


def legacy_ledger_name(database: str, control_schema: str) -> str:
    return quote_qualified(database, control_schema, LEGACY_LEDGER_TABLE)


def _in_list(keys: Sequence[str]) -> str:
    """``%s, %s, ...``: one bound placeholder per key (never an empty list)."""
    return placeholder_list(keys, empty_error="no keys to look up")


def _values_rows(count: int, width: int, *, empty_error: str) -> str:
    """``(%s, %s), (%s, %s)``: a VALUES list of ``count`` rows of ``width`` bound placeholders."""
    if count == 0:
        raise PermanentError(empty_error)
    row = "(" + ", ".join([PLACEHOLDER] * width) + ")"
    return ", ".join([row] * count)


def _column_list(names: Iterable[str], alias: str | None = None) -> str:
    prefix = "" if alias is None else f"{quote_ident(alias)}."
    return ", ".join(f"{prefix}{quote_ident(name)}" for name in names)


def build_create_ledger(database: str, control_schema: str, table: TableRef) -> str:
    """A table's load ledger: one row per S3 key loaded, written in the same transaction as its COPY.

    schema_name/table_name are the PostgreSQL (source) names, as in the key.
    """
    return (
        f"CREATE TABLE IF NOT EXISTS {ledger_name(database, control_schema, table)} (\n"
        '  "S3_KEY" VARCHAR NOT NULL,\n'
        '  "ETAG" VARCHAR,\n'
        '  "SHA256" VARCHAR,\n'
        '  "RUN_ID" VARCHAR,\n'
        '  "SCHEMA_NAME" VARCHAR NOT NULL,\n'
        '  "TABLE_NAME" VARCHAR NOT NULL,\n'
        '  "ROWS_LOADED" NUMBER(38,0),\n'
        '  "LOADED_AT" TIMESTAMP_TZ(6),\n'
        '  "STATUS" VARCHAR,\n'
        '  "ERRORS_SEEN" NUMBER(38,0),\n'
        '  "FIRST_ERROR" VARCHAR,\n'
        # LOAD_METHOD=snowpipe: when the file was first submitted (insertFiles), so a later
        # attempt can find an earlier submission's outcome with loadHistoryScan.
        '  "SUBMITTED_AT" TIMESTAMP_TZ(6),\n'
        '  PRIMARY KEY ("S3_KEY")\n'
        ")"
    )


def build_select_ledger_tables(database: str, control_schema: str) -> Statement:
    """The control schema's ledger tables (a table's own and the legacy one) with their columns."""
    sql = (
        'SELECT "TABLE_NAME", "COLUMN_NAME"\n'
        f"FROM {quote_ident(database)}.INFORMATION_SCHEMA.COLUMNS\n"
        """WHERE "TABLE_SCHEMA" = %s AND ("TABLE_NAME" = %s OR STARTSWITH("TABLE_NAME", %s))"""
    )
    return sql, (control_schema, LEGACY_LEDGER_TABLE, LEDGER_PREFIX)


def build_adopt_legacy_rows(
    database: str, control_schema: str, table: TableRef, columns: Sequence[str]
) -> Statement:
    """Copy ``table``'s rows from the legacy shared ledger into its own, each key once (idempotent:
    a key the table's ledger already has is left as it is). ``columns``: those both ledgers have."""
    names = _column_list(columns)
    sql = (
        f"INSERT INTO {ledger_name(database, control_schema, table)} ({names})\n"
        f'SELECT {_column_list(columns, "OLD")} FROM {legacy_ledger_name(database, control_schema)} AS "OLD"\n'
        'WHERE "OLD"."SCHEMA_NAME" = %s AND "OLD"."TABLE_NAME" = %s\n'
        f'AND NOT EXISTS (SELECT 1 FROM {ledger_name(database, control_schema, table)} AS "NEW" '
        'WHERE "NEW"."S3_KEY" = "OLD"."S3_KEY")'
    )
    return sql, (table.schema, table.table)


def build_claim_files(
    database: str, control_schema: str, table: TableRef, claims: Sequence[LedgerClaim]
) -> Statement:
    """Insert each key's ledger row unless it exists: ONE statement for a group's keys.

    The MERGE writes the table's ledger, which holds its lock until the transaction ends, so a
    concurrent delivery of any of these keys waits for this transaction and then finds the rows.
    WHEN MATCHED rewrites the row unchanged, so the statement writes even when every key exists.
    """
    sql = (
        f'MERGE INTO {ledger_name(database, control_schema, table)} AS "LEDGER"\n'
        'USING (SELECT "S3_KEY", "ETAG", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME"\n'
        f"  FROM (VALUES {_values_rows(len(claims), 6, empty_error='no keys to claim')})\n"
        '  AS "CLAIM" ("S3_KEY", "ETAG", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME")) AS "CLAIM"\n'
        'ON "LEDGER"."S3_KEY" = "CLAIM"."S3_KEY"\n'
        'WHEN MATCHED THEN UPDATE SET "S3_KEY" = "LEDGER"."S3_KEY"\n'
        'WHEN NOT MATCHED THEN INSERT ("S3_KEY", "ETAG", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME")\n'
        'VALUES ("CLAIM"."S3_KEY", "CLAIM"."ETAG", "CLAIM"."SHA256", "CLAIM"."RUN_ID", '
        '"CLAIM"."SCHEMA_NAME", "CLAIM"."TABLE_NAME")'
    )
    params = tuple(
        value
        for claim in claims
        for value in (
            claim.s3_key,
            claim.etag,
            claim.sha256,
            claim.run_id,
            claim.schema_name,
            claim.table_name,
        )
    )
    return sql, params


def build_select_loaded(ledger: str, keys: Sequence[str]) -> Statement:
    """The loaded rows of these keys (the one look-up: a group's, a run's files', cleanup's).

    Only rows with LOADED_AT set count: a claimed row is loaded only once its load recorded it.
    ``ledger``: the ledger to read, quoted (``ledger_name``, or the legacy one's).
    """
    sql = (
        'SELECT "S3_KEY", "ETAG", "SHA256", "ROWS_LOADED", "STATUS"\n'
        f"FROM {ledger}\n"
        f'WHERE "S3_KEY" IN ({_in_list(keys)}) AND "LOADED_AT" IS NOT NULL'
    )
    return sql, tuple(keys)


def build_select_newer_runs(
    database: str,
    control_schema: str,
    table: TableRef,
    *,
    run_id: str,
    applied_only: bool,
) -> Statement:
    """Runs of the table newer than ``run_id`` that the ledger holds as loaded (or, with
    ``applied_only``, as applied: a replace run's swap, a run's deletes).

    Run ids are UTC start times of one fixed width, so comparing the text compares the times.
    The source schema and table are compared too: two tables may share a ledger (``ledger_table``).
    """
    applied = " AND \"STATUS\" = 'APPLIED'" if applied_only else ""
    sql = (
        f'SELECT DISTINCT "RUN_ID" FROM {ledger_name(database, control_schema, table)}\n'
        'WHERE "SCHEMA_NAME" = %s AND "TABLE_NAME" = %s AND "RUN_ID" > %s AND "LOADED_AT" IS NOT NULL'
        f"{applied}"
    )
    return sql, (table.schema, table.table, run_id)


def build_mark_submitted(
    database: str, control_schema: str, table: TableRef, keys: Sequence[str]
) -> Statement:
    """Record that these keys were (or are about to be) submitted to Snowpipe; the first time is kept."""
    sql = (
        f"UPDATE {ledger_name(database, control_schema, table)}\n"
        'SET "SUBMITTED_AT" = COALESCE("SUBMITTED_AT", CURRENT_TIMESTAMP()), "STATUS" = \'SUBMITTED\'\n'
        f'WHERE "LOADED_AT" IS NULL AND "S3_KEY" IN ({_in_list(keys)})'
    )
    return sql, tuple(keys)


def build_select_earliest_submission(
    database: str, control_schema: str, table: TableRef, keys: Sequence[str]
) -> Statement:
    """The earliest submission time of these keys (NULL when none was submitted before)."""
    sql = (
        'SELECT MIN("SUBMITTED_AT")\n'
        f'FROM {ledger_name(database, control_schema, table)} WHERE "S3_KEY" IN ({_in_list(keys)})'
    )
    return sql, tuple(keys)


def build_record_loads(
    database: str, control_schema: str, table: TableRef, records: Sequence[LedgerRecord]
) -> Statement:
    """Mark these keys loaded, each with its own result: ONE statement for a group's files.

    The VALUES columns are cast, so a list whose rows are all NULL in a column still has its type.
    """
    sql = (
        f'UPDATE {ledger_name(database, control_schema, table)} AS "LEDGER"\n'
        'SET "ROWS_LOADED" = "DONE"."ROWS_LOADED", "LOADED_AT" = CURRENT_TIMESTAMP(), '
        '"STATUS" = "DONE"."STATUS", "ERRORS_SEEN" = "DONE"."ERRORS_SEEN", "FIRST_ERROR" = "DONE"."FIRST_ERROR"\n'
        'FROM (SELECT CAST("S3_KEY" AS VARCHAR) AS "S3_KEY", CAST("ROWS_LOADED" AS NUMBER(38,0)) AS "ROWS_LOADED", '
        'CAST("STATUS" AS VARCHAR) AS "STATUS", CAST("ERRORS_SEEN" AS NUMBER(38,0)) AS "ERRORS_SEEN", '
        'CAST("FIRST_ERROR" AS VARCHAR) AS "FIRST_ERROR"\n'
        f"  FROM (VALUES {_values_rows(len(records), 5, empty_error='no loads to record')})\n"
        '  AS "DONE" ("S3_KEY", "ROWS_LOADED", "STATUS", "ERRORS_SEEN", "FIRST_ERROR")) AS "DONE"\n'
        'WHERE "LEDGER"."S3_KEY" = "DONE"."S3_KEY"'
    )
    params = tuple(
        value
        for record in records
        for value in (
            record.s3_key,
            record.rows_loaded,
            record.status,
            record.errors_seen,
            record.first_error,
        )
    )
    return sql, params


# --------------------------------------------------------------------------- the applied position (change capture)

POSITION_AFTER_CHANGES = "POSITION"  # set by applying a change run
POSITION_AFTER_SNAPSHOT = "SNAPSHOT"  # set by loading the table's snapshot


@dataclass(frozen=True)
class AppliedPosition:
    """The commit LSN a change-capture table is applied through, and the run that set it.

    ``from_snapshot``: the run is the table's snapshot (change runs drained before the snapshot
    run started may still hold changes after its LSN), not a change run.
    """

    lsn: int
    run_id: str
    from_snapshot: bool = False


def applied_position_key(table: TableRef) -> str:
    """The reserved ledger key of the table's applied position (no S3 object has it)."""
    return f"{CONTROL_PREFIX}/cdc/applied/{table.schema}/{table.table}"


def build_select_applied_position(database: str, control_schema: str, table: TableRef) -> Statement:
    sql = (
        'SELECT "ROWS_LOADED", "RUN_ID", "STATUS"\n'
        f"FROM {ledger_name(database, control_schema, table)}\n"
        'WHERE "S3_KEY" = %s'
    )
    return sql, (applied_position_key(table),)


def build_insert_applied_position(
    database: str, control_schema: str, table: TableRef, new: AppliedPosition
) -> Statement:
    """The first applied position: inserted only if the table has none (0 rows when it has one).

    A MERGE, not an INSERT ... WHERE NOT EXISTS: Snowflake runs concurrent INSERTs side by side
    and does not enforce the PRIMARY KEY, so two completions of a snapshot could each insert a
    position row (and every compare-and-set after that would match 2 rows and lose). A MERGE
    takes the ledger's lock like the claim and the compare-and-set, so the second one waits and
    then finds the row.
    """
    sql = (
        f'MERGE INTO {ledger_name(database, control_schema, table)} AS "LEDGER"\n'
        'USING (SELECT %s AS "S3_KEY") AS "POSITION"\n'
        'ON "LEDGER"."S3_KEY" = "POSITION"."S3_KEY"\n'
        'WHEN NOT MATCHED THEN INSERT ("S3_KEY", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME", "ROWS_LOADED", "LOADED_AT", "STATUS")\n'
        'VALUES ("POSITION"."S3_KEY", %s, %s, %s, %s, CURRENT_TIMESTAMP(), %s)'
    )
    return sql, (
        applied_position_key(table),
        new.run_id,
        table.schema,
        table.table,
        new.lsn,
        _position_status(new),
    )


def build_advance_applied_position(
    database: str, control_schema: str, table: TableRef, expected: AppliedPosition, new: AppliedPosition
) -> Statement:
    """Compare-and-set: move the position from ``expected`` to ``new`` (1 row when it won, 0 when not)."""
    sql = (
        f"UPDATE {ledger_name(database, control_schema, table)}\n"
        'SET "ROWS_LOADED" = %s, "RUN_ID" = %s, "STATUS" = %s, "LOADED_AT" = CURRENT_TIMESTAMP()\n'
        'WHERE "S3_KEY" = %s AND "ROWS_LOADED" = %s AND "RUN_ID" = %s'
    )
    return sql, (
        new.lsn,
        new.run_id,
        _position_status(new),
        applied_position_key(table),
        expected.lsn,
        expected.run_id,
    )


def build_forget_applied_position(database: str, control_schema: str, table: TableRef) -> Statement:
    sql = f'DELETE FROM {ledger_name(database, control_schema, table)} WHERE "S3_KEY" = %s'
    return sql, (applied_position_key(table),)


def _position_status(position: AppliedPosition) -> str:
    return POSITION_AFTER_SNAPSHOT if position.from_snapshot else POSITION_AFTER_CHANGES


# --------------------------------------------------------------------------- executing


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    return (items[start : start + size] for start in range(0, len(items), size))


def _execute(sf_conn: Any, statement: Statement | str) -> list[tuple[Any, ...]]:
    sql, params = (statement, None) if isinstance(statement, str) else statement
    with sf_conn.cursor() as cursor:
        cursor.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()]


def _execute_count(sf_conn: Any, statement: Statement) -> int:
    """Run a DML statement; the number of rows it changed (the connector's rowcount)."""
    sql, params = statement
    with sf_conn.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount or 0)


def _select_loaded(sf_conn: Any, statement: Statement) -> dict[str, LedgerRow]:
    return {
        str(s3_key): LedgerRow(
            str(s3_key),
            etag,
            sha256,
            None if rows_loaded is None else int(rows_loaded),
            None if status is None else str(status),
        )
        for s3_key, etag, sha256, rows_loaded, status in _execute(sf_conn, statement)
    }


def _ledger_columns(sf_conn: Any, database: str, control_schema: str) -> dict[str, set[str]]:
    """Each ledger table of the control schema (legacy included) with its columns."""
    found: dict[str, set[str]] = {}
    for table_name, column_name in _execute(sf_conn, build_select_ledger_tables(database, control_schema)):
        found.setdefault(str(table_name), set()).add(str(column_name))
    return found


@dataclass(frozen=True)
class Ledger:
    """One table's ledger, read and written on ``sf_conn`` in the caller's transaction."""

    sf_conn: Any
    database: str
    control_schema: str
    table: TableRef

    @classmethod
    def of(cls, sf_conn: Any, settings: Settings, table: TableRef) -> Ledger:
        return cls(sf_conn, _database(settings), settings.snowflake.control_schema, table)

    @property
    def name(self) -> str:
        return ledger_name(self.database, self.control_schema, self.table)

    def _execute(self, statement: Statement | str) -> list[tuple[Any, ...]]:
        return _execute(self.sf_conn, statement)

    def create(self) -> None:
        """The table's ledger (DDL: commits), holding every row the legacy shared ledger has for the
        table. Copying is idempotent: a key the table's ledger already has keeps its row."""
        self._execute(build_create_ledger(self.database, self.control_schema, self.table))
        legacy = _ledger_columns(self.sf_conn, self.database, self.control_schema).get(LEGACY_LEDGER_TABLE)
        if legacy:
            shared = [name for name in LEDGER_COLUMNS if name in legacy]
            self._execute(build_adopt_legacy_rows(self.database, self.control_schema, self.table, shared))

    def claim(self, claims: Sequence[LedgerClaim]) -> None:
        for chunk in _chunks(claims, VALUES_CHUNK):
            self._execute(build_claim_files(self.database, self.control_schema, self.table, chunk))

    def record_loads(self, records: Sequence[LedgerRecord]) -> None:
        for chunk in _chunks(records, VALUES_CHUNK):
            self._execute(build_record_loads(self.database, self.control_schema, self.table, chunk))

    def loaded_rows(self, keys: Sequence[str]) -> dict[str, LedgerRow]:
        """The loaded row of each of ``keys`` the ledger has one for."""
        found: dict[str, LedgerRow] = {}
        for chunk in _chunks(keys, LOOKUP_CHUNK):
            found.update(_select_loaded(self.sf_conn, build_select_loaded(self.name, chunk)))
        return found

    def loaded_row(self, key: str) -> LedgerRow | None:
        return self.loaded_rows([key]).get(key)

    def newer_runs(self, *, run_id: str, applied_only: bool) -> list[str]:
        rows = self._execute(
            build_select_newer_runs(
                self.database, self.control_schema, self.table, run_id=run_id, applied_only=applied_only
            )
        )
        return [str(row[0]) for row in rows if row[0] is not None]

    def applied_position(self) -> AppliedPosition | None:
        """The table's applied position (change capture), or None before its snapshot is loaded."""
        rows = self._execute(build_select_applied_position(self.database, self.control_schema, self.table))
        if not rows or rows[0][0] is None:
            return None
        lsn, run_id, status = rows[0]
        return AppliedPosition(int(lsn), str(run_id), str(status) == POSITION_AFTER_SNAPSHOT)

    def advance(self, expected: AppliedPosition | None, new: AppliedPosition) -> bool:
        """Compare-and-set the applied position, in the caller's transaction: True when it moved
        from ``expected`` (None: there was none) to ``new``; False when another loader moved it
        first (the caller rolls back: that loader applied the run)."""
        if expected is None:
            statement = build_insert_applied_position(self.database, self.control_schema, self.table, new)
        else:
            statement = build_advance_applied_position(
                self.database, self.control_schema, self.table, expected, new
            )
        return _execute_count(self.sf_conn, statement) == 1

    def forget_applied_position(self) -> None:
        """Remove the applied position (``pgsnow cdc resnapshot``): nothing is applied until the
        table's next snapshot is loaded and sets it again."""
        self._execute(build_forget_applied_position(self.database, self.control_schema, self.table))

    def mark_submitted(self, keys: Sequence[str]) -> None:
        for chunk in _chunks(keys, LOOKUP_CHUNK):
            self._execute(build_mark_submitted(self.database, self.control_schema, self.table, chunk))

    def earliest_submission(self, keys: Sequence[str]) -> dt.datetime | None:
        times = [
            first
            for chunk in _chunks(keys, LOOKUP_CHUNK)
            for (first,) in self._execute(
                build_select_earliest_submission(self.database, self.control_schema, self.table, chunk)
            )
            if isinstance(first, dt.datetime)
        ]
        return min(times) if times else None


@dataclass
class Ledgers:
    """The table ledgers this process created (one per target table): created once per
    container, like the prepared tables, so a steady batch sends no DDL for them."""

    ready: set[tuple[str, str, TableRef]] = field(default_factory=set)

    def ensure(self, ledger: Ledger) -> Ledger:
        key = (ledger.database, ledger.control_schema, ledger.table)
        if key not in self.ready:
            ledger.create()
            self.ready.add(key)
        return ledger

    def forget(self, table: TableRef) -> None:
        """Create the table's ledger again when next used (a failure may mean it was dropped)."""
        self.ready = {key for key in self.ready if key[2] != table}


def _database(settings: Settings) -> str:
    database = settings.snowflake.database
    if database is None:
        raise ConfigError(["SNOWFLAKE_DATABASE is needed to read the load ledger"])
    return database


def ledger_rows(
    sf_conn: Any, settings: Settings, keys_by_table: Mapping[TableRef, Sequence[str]]
) -> dict[str, LedgerRow]:
    """The loaded row of each key the ledger of its table has one for; creates nothing.

    For readers outside the loader (cleanup, the sweeper, ``pgsnow status``): a table whose own
    ledger does not exist yet (no load since the upgrade to per-table ledgers) is read from the
    legacy shared ledger, if that exists.
    """
    database, control_schema = _database(settings), settings.snowflake.control_schema
    wanted = {table: list(keys) for table, keys in keys_by_table.items() if keys}
    if not wanted:
        return {}
    existing = _ledger_columns(sf_conn, database, control_schema)
    found: dict[str, LedgerRow] = {}
    for table, keys in wanted.items():
        if ledger_table(table) in existing:
            source = ledger_name(database, control_schema, table)
        elif LEGACY_LEDGER_TABLE in existing:
            source = legacy_ledger_name(database, control_schema)
        else:
            continue
        for chunk in _chunks(keys, LOOKUP_CHUNK):
            found.update(_select_loaded(sf_conn, build_select_loaded(source, chunk)))
    return found


def read_applied_position(sf_conn: Any, settings: Settings, table: TableRef) -> AppliedPosition | None:
    """The table's applied position for readers that must create nothing (``pgsnow status``):
    None when it has none, or when the table's ledger does not exist yet (nothing was loaded into
    it; the position never lived in the legacy shared ledger)."""
    database, control_schema = _database(settings), settings.snowflake.control_schema
    if ledger_table(table) not in _ledger_columns(sf_conn, database, control_schema):
        return None
    return Ledger(sf_conn, database, control_schema, table).applied_position()


def keys_by_table(keys: Iterable[str], prefix: str) -> dict[TableRef, list[str]]:
    """Staged data file keys grouped by the table whose ledger would hold them. A key that is no
    data key of the prefix is left out: the loader never loads one, so no ledger has it."""
    grouped: dict[TableRef, list[str]] = {}
    for key in keys:
        try:
            table = parse_data_key(key, prefix).table
        except PermanentError:
            continue
        grouped.setdefault(table, []).append(key)
    return grouped


def loaded_files(manifest: RunManifest, ledger: dict[str, LedgerRow]) -> list[StagedFile]:
    """The manifest's files the ledger shows loaded with the checksum the manifest lists.

    A ledger row with another checksum means the object under that key is not the file we
    listed: not ours to delete, and not proof that this run's file was loaded.
    """
    return [
        f
        for f in manifest.files
        if f.key in ledger and (ledger[f.key].sha256 is None or ledger[f.key].sha256 == f.sha256)
    ]
