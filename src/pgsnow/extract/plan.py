"""What a new run chooses before anything is staged: its file format and its write mode.

A change-capture table's (mode ``cdc``) only run is its snapshot (``pgsnow.cdc.enroll``), planned
as a full run with write mode ``replace`` (``run_options``); its changes come from the slot.

S3_FILE_FORMAT=auto: CSV up to AUTO_PARQUET_ABOVE_ROWS estimated rows (the planner's estimate
of the run's range), Parquet above; a never-analysed table (no estimate) gets CSV.
"""

from __future__ import annotations

from dataclasses import replace

from pgsnow.config import DeleteMode, ExtractMode, StagedFormat, TableOptions, WriteMode
from pgsnow.errors import PermanentError
from pgsnow.keys import FileFormat
from pgsnow.postgres import TableSchema

AUTO_PARQUET_ABOVE_ROWS = 100_000
RELATION_KINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
}
KEYLESS_RELATIONS = {"v", "m", "f"}  # PostgreSQL cannot declare a primary key on these


def run_options(options: TableOptions) -> TableOptions:
    """The options a run of the table is planned with: a change-capture table's run is its snapshot,
    a full run that replaces the table whatever the table's options say (its deletes are the
    changes' to apply: a replace already drops the rows deleted before the snapshot, so no key
    list is staged)."""
    if options.mode is not ExtractMode.CDC:
        return options
    return replace(options, mode=ExtractMode.FULL, write_mode=WriteMode.REPLACE, deletes=DeleteMode.NONE)


def choose_file_format(configured: StagedFormat, estimated_rows: int | None) -> FileFormat:
    """Resolve S3_FILE_FORMAT, including ``auto``, to the format of this run's files."""
    if configured is StagedFormat.PARQUET:
        return FileFormat.PARQUET
    if configured is StagedFormat.CSV:
        return FileFormat.CSV
    if estimated_rows is not None and estimated_rows > AUTO_PARQUET_ABOVE_ROWS:
        return FileFormat.PARQUET
    return FileFormat.CSV


def resolve_write_mode(schema: TableSchema, options: TableOptions) -> WriteMode:
    """The run's write mode (the table's choice, or its mode's default), refused before anything is
    staged when it cannot work on this table: merge and deletes match rows by the primary key."""
    write_mode = options.effective_write_mode
    table = schema.table.qualified
    kind = RELATION_KINDS.get(schema.relkind, "relation")
    if write_mode is WriteMode.MERGE and not schema.primary_key:
        chosen = "chosen" if options.write_mode is not None else "the default of incremental mode"
        raise PermanentError(
            f"write_mode merge ({chosen}) needs a primary key to match rows by, and the {kind} {table} "
            'has none: use write_mode "replace" (the default of mode full), or add a primary key',
            table=table,
        )
    if options.deletes is not DeleteMode.NONE and not schema.primary_key:
        raise PermanentError(
            f"deletes={options.deletes.value} needs a primary key to find deleted rows, and the {kind} "
            f'{table} has none: use write_mode "replace" (a full run then reflects deleted rows)',
            table=table,
        )
    return write_mode
