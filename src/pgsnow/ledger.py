"""The load ledger (``LOAD_LEDGER``): the only code that reads or writes it.

One row per S3 key pgsnow loaded (and one per complete run whose swap or deletes it decided,
under ``keys.applied_mark_key``). A file's row is claimed and recorded in the same Snowflake
transaction as its COPY, so a key is either loaded and recorded, or neither. This module never
commits: every statement runs in the caller's transaction (or autocommits outside one).

``Ledger`` runs the statements on a connection; the ``build_*`` functions are the SQL, pure and
unit-tested as text. Values are always bound; an IN list gets one placeholder per key
(``_in_list``), at most ``LOOKUP_CHUNK`` keys per statement.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pgsnow.config import Settings
from pgsnow.errors import ConfigError
from pgsnow.identifiers import quote_qualified
from pgsnow.manifest import RunManifest, StagedFile
from pgsnow.snowflake.sql_text import Statement, placeholder_list

LEDGER_TABLE = "LOAD_LEDGER"
# Snowflake caps the number of expressions in an IN list; stay well below it.
LOOKUP_CHUNK = 500


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


# --------------------------------------------------------------------------- SQL


def ledger_name(database: str, control_schema: str) -> str:
    return quote_qualified(database, control_schema, LEDGER_TABLE)


def _in_list(keys: Sequence[str]) -> str:
    """``%s, %s, ...``: one bound placeholder per key (never an empty list)."""
    return placeholder_list(keys, empty_error="no keys to look up")


def build_create_ledger(database: str, control_schema: str) -> str:
    """The load ledger: one row per S3 key loaded, written in the same transaction as its COPY.

    schema_name/table_name are the PostgreSQL (source) names, as in the key.
    """
    return (
        f"CREATE TABLE IF NOT EXISTS {ledger_name(database, control_schema)} (\n"
        '  "S3_KEY" VARCHAR NOT NULL,\n'
        '  "ETAG" VARCHAR,\n'
        '  "SHA256" VARCHAR,\n'
        '  "RUN_ID" VARCHAR,\n'
        '  "SCHEMA_NAME" VARCHAR NOT NULL,\n'
        '  "TABLE_NAME" VARCHAR NOT NULL,\n'
        '  "ROWS_LOADED" NUMBER(38,0),\n'
        '  "LOADED_AT" TIMESTAMP_TZ(6),\n'
        '  PRIMARY KEY ("S3_KEY")\n'
        ")"
    )


def build_upgrade_ledger(database: str, control_schema: str) -> list[str]:
    """Columns added to the ledger after its first version (a ledger created earlier gains them)."""
    ledger = ledger_name(database, control_schema)
    return [
        f'ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS "STATUS" VARCHAR',
        f'ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS "ERRORS_SEEN" NUMBER(38,0)',
        f'ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS "FIRST_ERROR" VARCHAR',
        # LOAD_METHOD=snowpipe: when the file was first submitted (insertFiles), so a later
        # attempt can find an earlier submission's outcome with loadHistoryScan.
        f'ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS "SUBMITTED_AT" TIMESTAMP_TZ(6)',
    ]


def build_claim_file(database: str, control_schema: str, claim: LedgerClaim) -> Statement:
    """Insert the key's ledger row unless it exists. The MERGE locks the ledger, so a concurrent
    delivery of the same key waits for this transaction and then finds the row.

    WHEN MATCHED rewrites the row unchanged: it takes the existing row's lock too.
    """
    sql = (
        f'MERGE INTO {ledger_name(database, control_schema)} AS "LEDGER"\n'
        'USING (SELECT %s AS "S3_KEY", %s AS "ETAG", %s AS "SHA256", %s AS "RUN_ID", '
        '%s AS "SCHEMA_NAME", %s AS "TABLE_NAME") AS "CLAIM"\n'
        'ON "LEDGER"."S3_KEY" = "CLAIM"."S3_KEY"\n'
        'WHEN MATCHED THEN UPDATE SET "S3_KEY" = "LEDGER"."S3_KEY"\n'
        'WHEN NOT MATCHED THEN INSERT ("S3_KEY", "ETAG", "SHA256", "RUN_ID", "SCHEMA_NAME", "TABLE_NAME")\n'
        'VALUES ("CLAIM"."S3_KEY", "CLAIM"."ETAG", "CLAIM"."SHA256", "CLAIM"."RUN_ID", '
        '"CLAIM"."SCHEMA_NAME", "CLAIM"."TABLE_NAME")'
    )
    params = (claim.s3_key, claim.etag, claim.sha256, claim.run_id, claim.schema_name, claim.table_name)
    return sql, params


def build_select_loaded(database: str, control_schema: str, keys: Sequence[str]) -> Statement:
    """The loaded rows of these keys (the one look-up: a file's, a run's files', cleanup's).

    Only rows with LOADED_AT set count: a claimed row is loaded only once its load recorded it.
    """
    sql = (
        'SELECT "S3_KEY", "ETAG", "SHA256", "ROWS_LOADED", "STATUS"\n'
        f"FROM {ledger_name(database, control_schema)}\n"
        f'WHERE "S3_KEY" IN ({_in_list(keys)}) AND "LOADED_AT" IS NOT NULL'
    )
    return sql, tuple(keys)


def build_select_newer_runs(
    database: str,
    control_schema: str,
    *,
    schema_name: str,
    table_name: str,
    run_id: str,
    applied_only: bool,
) -> Statement:
    """Runs of the table newer than ``run_id`` that the ledger holds as loaded (or, with
    ``applied_only``, as applied: a replace run's swap, a run's deletes).

    Run ids are UTC start times of one fixed width, so comparing the text compares the times.
    schema_name/table_name are the PostgreSQL (source) names, as the ledger keeps them.
    """
    applied = " AND \"STATUS\" = 'APPLIED'" if applied_only else ""
    sql = (
        f'SELECT DISTINCT "RUN_ID" FROM {ledger_name(database, control_schema)}\n'
        'WHERE "SCHEMA_NAME" = %s AND "TABLE_NAME" = %s AND "RUN_ID" > %s AND "LOADED_AT" IS NOT NULL'
        f"{applied}"
    )
    return sql, (schema_name, table_name, run_id)


def build_mark_submitted(database: str, control_schema: str, keys: Sequence[str]) -> Statement:
    """Record that these keys were (or are about to be) submitted to Snowpipe; the first time is kept."""
    sql = (
        f"UPDATE {ledger_name(database, control_schema)}\n"
        'SET "SUBMITTED_AT" = COALESCE("SUBMITTED_AT", CURRENT_TIMESTAMP()), "STATUS" = \'SUBMITTED\'\n'
        f'WHERE "LOADED_AT" IS NULL AND "S3_KEY" IN ({_in_list(keys)})'
    )
    return sql, tuple(keys)


def build_select_earliest_submission(database: str, control_schema: str, keys: Sequence[str]) -> Statement:
    """The earliest submission time of these keys (NULL when none was submitted before)."""
    sql = (
        'SELECT MIN("SUBMITTED_AT")\n'
        f'FROM {ledger_name(database, control_schema)} WHERE "S3_KEY" IN ({_in_list(keys)})'
    )
    return sql, tuple(keys)


def build_record_load(
    database: str,
    control_schema: str,
    s3_key: str,
    rows_loaded: int,
    *,
    status: str = "LOADED",
    errors_seen: int = 0,
    first_error: str | None = None,
) -> Statement:
    """Mark the key loaded. ``status`` is LOADED, or PARTIALLY_LOADED (ON_ERROR = CONTINUE
    rejected some rows: the file is done, and the ledger says what was left out)."""
    sql = (
        f"UPDATE {ledger_name(database, control_schema)}\n"
        'SET "ROWS_LOADED" = %s, "LOADED_AT" = CURRENT_TIMESTAMP(), "STATUS" = %s, '
        '"ERRORS_SEEN" = %s, "FIRST_ERROR" = %s\n'
        'WHERE "S3_KEY" = %s'
    )
    return sql, (rows_loaded, status, errors_seen, first_error, s3_key)


# --------------------------------------------------------------------------- executing


@dataclass(frozen=True)
class Ledger:
    """The ledger of one database, read and written on ``sf_conn`` in the caller's transaction."""

    sf_conn: Any
    database: str
    control_schema: str

    @classmethod
    def of(cls, sf_conn: Any, settings: Settings) -> Ledger:
        database = settings.snowflake.database
        if database is None:
            raise ConfigError(["SNOWFLAKE_DATABASE is needed to read the load ledger"])
        return cls(sf_conn, database, settings.snowflake.control_schema)

    def _execute(self, statement: Statement | str) -> list[tuple[Any, ...]]:
        sql, params = (statement, None) if isinstance(statement, str) else statement
        with self.sf_conn.cursor() as cursor:
            cursor.execute(sql, params)
            return [tuple(row) for row in cursor.fetchall()]

    def create(self) -> None:
        """The ledger table, with every column a later pgsnow added (DDL: commits)."""
        self._execute(build_create_ledger(self.database, self.control_schema))
        for statement in build_upgrade_ledger(self.database, self.control_schema):
            self._execute(statement)

    def claim(self, claim: LedgerClaim) -> None:
        self._execute(build_claim_file(self.database, self.control_schema, claim))

    def record_load(
        self,
        s3_key: str,
        rows_loaded: int,
        *,
        status: str = "LOADED",
        errors_seen: int = 0,
        first_error: str | None = None,
    ) -> None:
        self._execute(
            build_record_load(
                self.database,
                self.control_schema,
                s3_key,
                rows_loaded,
                status=status,
                errors_seen=errors_seen,
                first_error=first_error,
            )
        )

    def loaded_rows(self, keys: Sequence[str]) -> dict[str, LedgerRow]:
        """The loaded row of each of ``keys`` the ledger has one for."""
        found: dict[str, LedgerRow] = {}
        for start in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[start : start + LOOKUP_CHUNK]
            for s3_key, etag, sha256, rows_loaded, status in self._execute(
                build_select_loaded(self.database, self.control_schema, chunk)
            ):
                found[str(s3_key)] = LedgerRow(
                    str(s3_key),
                    etag,
                    sha256,
                    None if rows_loaded is None else int(rows_loaded),
                    None if status is None else str(status),
                )
        return found

    def loaded_row(self, key: str) -> LedgerRow | None:
        return self.loaded_rows([key]).get(key)

    def newer_runs(self, *, schema_name: str, table_name: str, run_id: str, applied_only: bool) -> list[str]:
        rows = self._execute(
            build_select_newer_runs(
                self.database,
                self.control_schema,
                schema_name=schema_name,
                table_name=table_name,
                run_id=run_id,
                applied_only=applied_only,
            )
        )
        return [str(row[0]) for row in rows if row[0] is not None]

    def mark_submitted(self, keys: Sequence[str]) -> None:
        self._execute(build_mark_submitted(self.database, self.control_schema, keys))

    def earliest_submission(self, keys: Sequence[str]) -> dt.datetime | None:
        (first,) = self._execute(build_select_earliest_submission(self.database, self.control_schema, keys))[
            0
        ]
        return first if isinstance(first, dt.datetime) else None


def ledger_rows(sf_conn: Any, settings: Settings, keys: Sequence[str]) -> dict[str, LedgerRow]:
    """The ledger's loaded row for each of ``keys`` it has one for."""
    return Ledger.of(sf_conn, settings).loaded_rows(keys)


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
