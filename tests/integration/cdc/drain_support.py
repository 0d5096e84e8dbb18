"""Helpers of the drain suites (test_drain, test_drain_faults): hand-made stand-ins for the reader's
spilled segments, spill files, and staged CSV read back with NULL apart from ''."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from csv_support import parse_csv_keeping_nulls
from psycopg2 import sql

from pgsnow.changes import parse_lsn
from pgsnow.config import Component, Settings
from pgsnow.identifiers import TableRef
from pgsnow.manifest import RunManifest
from pgsnow.runs import RunStore


def run_sql(
    admin: psycopg2.extensions.connection, statement: sql.Composable | str, params: Any = None
) -> None:
    with admin.cursor() as cur:
        cur.execute(statement, params)


@dataclass(frozen=True)
class HandColumn:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True)
class HandRelation:
    columns: tuple[HandColumn, ...]


@dataclass(frozen=True)
class HandSegment:
    """A spilled segment written by hand, shaped like ``pgsnow.cdc.reader.SpilledChanges``."""

    table: TableRef
    relation: HandRelation
    path: Path
    rows: int
    first_commit_lsn: int
    last_commit_lsn: int
    staged_text: bool = False  # written in pgoutput's text, as the reader does for other types
    cuts: tuple[tuple[int, int], ...] = ()


def relation_of(admin: psycopg2.extensions.connection, table: TableRef) -> HandRelation:
    """The table's columns as pgoutput would describe them (type oid, typmod, primary key flags)."""
    with admin.cursor() as cur:
        cur.execute(
            """SELECT a.attname, a.atttypid, a.atttypmod,
                      coalesce(a.attnum = ANY(i.indkey), false)
               FROM pg_attribute a
               LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
               WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
               ORDER BY a.attnum""",
            (sql.Identifier(table.schema, table.table).as_string(admin),),
        )
        return HandRelation(
            tuple(HandColumn(str(n), int(o), int(m), bool(k)) for n, o, m, k in cur.fetchall())
        )


def write_spill(path: Path, rows: list[list[str | None]]) -> None:
    """PostgreSQL COPY CSV: NULL as an unquoted empty field, every value quoted (so "" is the empty string)."""
    with path.open("w", encoding="utf-8", newline="") as out:
        for row in rows:
            out.write(",".join("" if v is None else '"' + v.replace('"', '""') + '"' for v in row) + "\n")


def read_csv_object(s3: Any, bucket: str, key: str) -> list[list[str | None]]:
    """A staged CSV.gz object's records, header first."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return parse_csv_keeping_nulls(gzip.decompress(body).decode("utf-8"))


def cdc_settings(
    bucket: str, dsn: str, source: Any, tables: list[TableRef], *, fmt: str = "csv", **env: str
) -> Settings:
    """Extractor settings for change capture of ``tables`` through ``source`` (cdc_support)."""
    options = {t.qualified: {"mode": "cdc"} for t in tables}
    return Settings.from_env(
        {
            "S3_STAGE_BUCKET": bucket,
            "S3_STAGE_PREFIX": "staging",
            "PGSNOW_TABLES": ",".join(t.qualified for t in tables),
            "PGSNOW_TABLE_OPTIONS": json.dumps(options),
            "PGSNOW_PG_DSN": dsn,
            "S3_FILE_FORMAT": fmt,
            "CDC_SLOT": source.slot,
            "CDC_PUBLICATION": source.publication,
            **env,
        },
        Component.EXTRACTOR,
    )


def slot_position(admin: psycopg2.extensions.connection, slot: str) -> tuple[int, int]:
    """(confirmed_flush_lsn, retained WAL bytes) of the slot."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT confirmed_flush_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        confirmed, retained = cur.fetchone()
    return parse_lsn(confirmed), int(retained)


def cdc_manifests(store: RunStore, table: TableRef) -> list[RunManifest]:
    """The table's manifests, oldest first."""
    return [store.get_manifest(table, run_id) for run_id in store.run_ids(table)]
