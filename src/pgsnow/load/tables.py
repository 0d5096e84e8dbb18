"""Target tables: create them from a run's columns, evolve them, and remember what was prepared.

``Tables`` lives as long as the loader (one per container): a table it has prepared for a run's
columns is not prepared again, so a steady batch sends no DDL and no column look-up. A failure
that may mean someone changed the table underneath makes the loader ``forget`` it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, snowflake_name
from pgsnow.keys import FileFormat, StagedObject
from pgsnow.ledger import Ledgers
from pgsnow.load.objects import read_csv_header
from pgsnow.load.session import execute
from pgsnow.manifest import Column
from pgsnow.observability import logger
from pgsnow.schema_evolution import ExistingColumn, plan_table_changes
from pgsnow.snowflake.load_sql import LoadColumn, load_columns_from_table
from pgsnow.snowflake.table_sql import (
    build_add_column,
    build_add_run_id_column,
    build_create_schema,
    build_create_shadow_table,
    build_create_table,
    build_drop_not_null,
    build_select_column_types,
    build_widen_column,
)
from pgsnow.typemap import ValueKind

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from snowflake.connector import SnowflakeConnection

PGSNOW_COLUMN_PREFIX = "_PGSNOW_"  # pgsnow's own target columns (run id, soft delete): never a source's
Target = tuple[str, str, str]  # database, schema, table (Snowflake names)


def read_columns(sf_conn: SnowflakeConnection, target: Target) -> list[ExistingColumn]:
    """The table's columns as INFORMATION_SCHEMA has them now; empty when it does not exist."""
    rows = execute(sf_conn, *build_select_column_types(*target))
    return [
        ExistingColumn(
            str(name),
            str(data_type),
            None if precision is None else int(precision),
            None if scale is None else int(scale),
            None if length is None else int(length),
            str(is_nullable).upper() != "NO",
        )
        for name, data_type, precision, scale, length, is_nullable in rows
    ]


class Tables:
    """The loader's target tables and what it has already done to them."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._prepared_for: dict[Target, tuple[Column, ...]] = {}  # the run columns each was made to take
        self._columns: dict[Target, list[ExistingColumn]] = {}  # as last read (dropped after any DDL)
        self._run_id_columns: set[Target] = set()
        # Tables with a column the run does not send (the source dropped it): a pipe's COPY lists the
        # table's columns by position, so their files load with COPY (``prepare`` fills this).
        self.with_unsent_columns: set[Target] = set()
        self.ledgers = Ledgers()  # the tables' load ledgers this loader created

    def target(self, table: TableRef) -> Target:
        return (self.database, table.snowflake_schema, table.snowflake_table)

    def shadow(self, table: TableRef, run_id: str) -> Target:
        """The table a replace run loads into; same schema as the target (SWAP WITH needs no move)."""
        return (self.database, table.snowflake_schema, f"{table.snowflake_table}__PGSNOW_REPLACE_{run_id}")

    def forget(self, *targets: Target) -> None:
        """Prepare these tables again next time (they were swapped, dropped, or may have changed)."""
        for target in targets:
            self._prepared_for.pop(target, None)
            self._columns.pop(target, None)
            self._run_id_columns.discard(target)
            self.with_unsent_columns.discard(target)

    def columns(self, sf_conn: SnowflakeConnection, target: Target) -> list[ExistingColumn]:
        """The table's columns, read once while nothing changes them."""
        if target not in self._columns:
            existing = read_columns(sf_conn, target)
            if not existing:
                return existing  # no table (yet): nothing to remember
            self._columns[target] = existing
        return self._columns[target]

    def prepare(
        self, sf_conn: SnowflakeConnection, table: TableRef, columns: Sequence[Column], target: Target
    ) -> bool:
        """Create the target from the manifest's columns, or evolve it: add new columns, widen types.

        Every change is checked before any ALTER runs, so an incompatible change alters nothing.
        True when an existing table was altered (a pipe over it must be redefined).
        """
        if self._prepared_for.get(target) == tuple(columns):
            return False
        existing = self.columns(sf_conn, target)
        altered = False
        if not existing:
            execute(sf_conn, build_create_schema(target[0], target[1]))
            if target == self.target(table):
                execute(sf_conn, build_create_table(self.database, columns, table))
            else:
                execute(sf_conn, build_create_shadow_table(target, columns))
            self._columns.pop(target, None)
        else:
            altered = self._evolve(sf_conn, table, columns, target, existing)
        self._prepared_for[target] = tuple(columns)
        return altered

    def _evolve(
        self,
        sf_conn: SnowflakeConnection,
        table: TableRef,
        columns: Sequence[Column],
        target: Target,
        existing: Sequence[ExistingColumn],
    ) -> bool:
        try:
            changes = plan_table_changes(table.qualified, existing, columns)
        except PermanentError as exc:
            exc.message += "; nothing was loaded"
            raise
        context = {"table": table.qualified}
        for column in changes.added:
            logger.info("adding a new source column", extra={**context, "column": column.snowflake_name})
            execute(sf_conn, build_add_column(target, column))
        for column in changes.widened:
            logger.info(
                "widening a column",
                extra={**context, "column": column.snowflake_name, "type": column.snowflake_type},
            )
            execute(sf_conn, build_widen_column(target, column))
        for name in changes.relaxed:
            # NOT NULL in the table, but the run sends no value (the source dropped the column) or
            # a nullable one (the source dropped NOT NULL): every load would fail otherwise.
            logger.info("making a column nullable (DROP NOT NULL)", extra={**context, "column": name})
            execute(sf_conn, build_drop_not_null(target, name))
        if not changes.empty:
            self._columns.pop(target, None)
        if any(not name.startswith(PGSNOW_COLUMN_PREFIX) for name in changes.dropped):
            self.with_unsent_columns.add(target)
        else:
            self.with_unsent_columns.discard(target)
        return not changes.empty

    def ensure_run_id_column(self, sf_conn: SnowflakeConnection, target: Target) -> None:
        """Merge without a cursor column orders rows by the run that wrote them (build_merge_from).
        DDL commits in Snowflake, so this runs before the group's transaction, once per table."""
        if target in self._run_id_columns:
            return
        execute(sf_conn, build_add_run_id_column(target))
        self._run_id_columns.add(target)

    def dropped_file_columns(
        self,
        sf_conn: SnowflakeConnection,
        s3: S3Client,
        bucket: str,
        staged: StagedObject,
        *,
        allow_create: bool,
    ) -> list[LoadColumn]:
        """A file without a run: the existing table's columns (a CSV's matched by its header's names),
        or a new all-VARCHAR table from a CSV header."""
        table = staged.table
        existing = self.columns(sf_conn, self.target(table))
        if existing:
            if staged.file_format is FileFormat.PARQUET:
                # COPY reads Parquet columns by name ($1:"name"); the loader ships no Parquet reader.
                return table_load_columns(existing)
            return columns_for_csv_header(staged, read_csv_header(s3, bucket, staged), existing)
        if not allow_create:
            raise PermanentError(
                "a file without a pgsnow run id can only load into an existing table, and "
                f"{self.database}.{table.snowflake_schema}.{table.snowflake_table} does not exist "
                "(set LOAD_CREATE_TABLES_FOR_DROPPED_FILES=true to create it)",
                table=table.qualified,
                s3_key=staged.key,
            )
        if staged.file_format is not FileFormat.CSV:
            raise PermanentError(
                "only a CSV file can create its table (the loader reads its header; it ships no Parquet reader)",
                table=table.qualified,
                s3_key=staged.key,
            )
        header = read_csv_header(s3, bucket, staged)
        columns = [Column(name, "text", "text", ValueKind.TEXT, "VARCHAR", True) for name in header]
        self.prepare(sf_conn, table, columns, self.target(table))
        return [LoadColumn.from_manifest(c) for c in columns]


def table_load_columns(existing: Sequence[ExistingColumn]) -> list[LoadColumn]:
    """The table's columns as COPY loads them. A NUMBER keeps its precision and scale: a Parquet
    value is cast to the column's own type (``::NUMBER`` alone would be scale 0 and round)."""
    columns = load_columns_from_table([(c.name, c.data_type) for c in existing])
    return [
        replace(loaded, snowflake_type=column.type_text) if loaded.kind is ValueKind.DECIMAL else loaded
        for column, loaded in zip(existing, columns, strict=True)
    ]


def columns_for_csv_header(
    staged: StagedObject, header: Sequence[str], existing: Sequence[ExistingColumn]
) -> list[LoadColumn]:
    """The table's columns in the order a hand-dropped CSV's header names them.

    A header name matches the column it names under the naming policy (``order_id`` and
    ``ORDER_ID`` both name ``ORDER_ID``; ``Note`` names only ``"Note"``), in any order. A name the
    table does not have is refused (nothing is loaded, rather than a value silently dropped or
    put in the wrong column); a column the header leaves out loads as NULL, unless it is NOT NULL.
    """
    context = {"table": staged.table.qualified, "s3_key": staged.key}
    loadable = dict(zip((c.name for c in existing), table_load_columns(existing), strict=True))
    chosen: list[LoadColumn] = []
    unknown: list[str] = []
    named: dict[str, str] = {}
    for field_name in header:
        target = snowflake_name(field_name)
        if target not in loadable:
            unknown.append(field_name)
            continue
        if target in named:
            raise PermanentError(
                f"the CSV header names column {target} twice ({named[target]!r} and {field_name!r}); "
                "nothing was loaded",
                **context,
            )
        named[target] = field_name
        chosen.append(replace(loadable[target], source_name=field_name))
    if unknown:
        raise PermanentError(
            "the CSV header names columns the table does not have: "
            + ", ".join(repr(name) for name in unknown)
            + f" (the table has {', '.join(loadable)}); nothing was loaded",
            **context,
        )
    required = [c.name for c in existing if c.name not in named and not c.nullable]
    if required:
        raise PermanentError(
            f"the CSV header leaves out NOT NULL columns {', '.join(required)}; nothing was loaded",
            **context,
        )
    return chosen
