"""Run a parsed COPY INTO on DuckDB with Snowflake's semantics.

Two phases, so that ``ON_ERROR = ABORT_STATEMENT`` leaves nothing behind even inside an open
transaction (DuckDB has no savepoints):

1. ``prepare_copy`` reads and converts every file on a *separate* DuckDB cursor, outside the
   session's transaction, and decides each file's outcome. A bad value found here fails the
   statement before anything was written.
2. ``apply_copy`` inserts the converted rows and the load history on the *session's* cursor,
   inside the session's transaction, so a later ROLLBACK removes both.
"""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from snowflake.connector.errors import ProgrammingError

from pgsnow.local.sf_access import access_denied
from pgsnow.local.sf_copy_sql import (
    CopyStatement,
    CopySyntaxError,
    FieldRef,
    FileType,
    MatchByColumnName,
    OnError,
    ParquetFieldRef,
    SelectExpr,
    SqlType,
    StageSource,
    TypeFamily,
    compile_select_expr,
    convert_to_column_sql,
    csv_reader_sql,
    duck_ident,
    duck_type,
    parquet_reader_sql,
)

STAGES_TABLE = "_fs_global._fs_information_schema._fs_stages"
ROW_NUMBER = "__pgsnow_row"
BAD_COLUMN = "__pgsnow_bad_column"
BAD_VALUE = "__pgsnow_bad_value"

# Snowflake's error numbers and SQLSTATEs for the failures a COPY reports.
_CONVERSION_ERRNO, _CONVERSION_SQLSTATE = 100038, "22018"
_NOT_FOUND_ERRNO, _NOT_FOUND_SQLSTATE = 2003, "02000"
_REMOTE_FILE_ERRNO, _REMOTE_FILE_SQLSTATE = 91016, "22000"
_COMPILE_ERRNO, _COMPILE_SQLSTATE = 2020, "21S01"


def syntax_error(error: Exception) -> ProgrammingError:
    """Snowflake's error for a statement it cannot compile (errno 1003), with the parser's reason."""
    return ProgrammingError(msg=f"SQL compilation error:\n{error}", errno=1003, sqlstate="42000")


_UNSUPPORTED_ERRNO, _UNSUPPORTED_SQLSTATE = 2019, "0A000"

COPY_RESULT_COLUMNS = (
    "file",
    "status",
    "rows_parsed",
    "rows_loaded",
    "error_limit",
    "errors_seen",
    "first_error",
    "first_error_line",
    "first_error_character",
    "first_error_column_name",
)


@dataclass(frozen=True)
class TargetColumn:
    name: str
    type: SqlType
    nullable: bool
    max_chars: int | None = None  # a VARCHAR column's declared length (fakesnow's record of it)


@dataclass(frozen=True)
class TargetTable:
    catalog: str
    schema: str
    name: str
    columns: tuple[TargetColumn, ...]

    @property
    def duck_name(self) -> str:
        return ".".join(duck_ident(p) for p in (self.catalog, self.schema, self.name))


@dataclass
class FileOutcome:
    """One row of the COPY result, plus the converted rows to insert."""

    url: str
    status: str
    rows_parsed: int = 0
    rows_loaded: int = 0
    error_limit: int | None = 1
    errors_seen: int = 0
    first_error: str | None = None
    first_error_line: int | None = None
    first_error_character: int | None = None
    first_error_column_name: str | None = None
    first_error_row: int | None = None
    rows: pa.Table | None = None

    def result_row(self) -> tuple[Any, ...]:
        return (
            self.url,
            self.status,
            self.rows_parsed,
            self.rows_loaded,
            self.error_limit,
            self.errors_seen,
            self.first_error,
            self.first_error_line,
            self.first_error_character,
            self.first_error_column_name,
        )


@dataclass
class PreparedCopy:
    table: TargetTable
    columns: tuple[TargetColumn, ...]
    outcomes: list[FileOutcome] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# resolving names


def _qualify(
    parts: tuple[str, ...], database: str | None, schema: str | None, what: str
) -> tuple[str, str, str]:
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2 and database:
        return database, parts[0], parts[1]
    if len(parts) == 1 and database and schema:
        return database, schema, parts[0]
    raise ProgrammingError(
        msg=f"Cannot perform COPY. This session does not have a current database or schema for {what}.",
        errno=90105,
        sqlstate="22000",
    )


def qualify_stage(source: StageSource, database: str | None, schema: str | None) -> tuple[str, str, str]:
    """The stage's (database, schema, name) as the stage catalog keys it."""
    return _qualify(source.stage.parts, database, schema, "the stage")


def stage_url(
    duck: duckdb.DuckDBPyConnection, source: StageSource, database: str | None, schema: str | None
) -> str:
    """The stage's URL; empty for an internal stage."""
    catalog, stage_schema, name = qualify_stage(source, database, schema)
    row = duck.execute(
        f"SELECT url FROM {STAGES_TABLE} WHERE database_name = ? AND schema_name = ? AND name = ?",
        [catalog, stage_schema, name],
    ).fetchone()
    if row is None:
        raise ProgrammingError(
            msg=f"SQL compilation error:\nStage '{catalog}.{stage_schema}.{name}' does not exist or not authorized.",
            errno=_NOT_FOUND_ERRNO,
            sqlstate=_NOT_FOUND_SQLSTATE,
        )
    return str(row[0] or "")


def stage_storage_integration(
    duck: duckdb.DuckDBPyConnection, source: StageSource, database: str | None, schema: str | None
) -> str | None:
    """The storage integration a stage was created with, if any."""
    row = duck.execute(
        f"SELECT storage_integration FROM {STAGES_TABLE} WHERE database_name = ? AND schema_name = ? AND name = ?",
        list(qualify_stage(source, database, schema)),
    ).fetchone()
    return str(row[0]) if row is not None and row[0] else None


def source_prefix(base_url: str, sub_path: str) -> str:
    """The stage URL with the statement's sub-path appended (Snowflake joins them as a prefix)."""
    if not sub_path:
        return base_url
    return (base_url if base_url.endswith("/") else base_url + "/") + sub_path


def describe_target(
    duck: duckdb.DuckDBPyConnection, parts: tuple[str, ...], database: str | None, schema: str | None
) -> TargetTable:
    catalog, table_schema, name = _qualify(parts, database, schema, "the table")
    rows = duck.execute(
        "SELECT column_name, data_type, is_nullable FROM duckdb_columns() "
        "WHERE database_name = ? AND schema_name = ? AND table_name = ? ORDER BY column_index",
        [catalog, table_schema, name],
    ).fetchall()
    if not rows:
        raise ProgrammingError(
            msg=f"SQL compilation error:\nTable '{catalog}.{table_schema}.{name}' does not exist or not authorized.",
            errno=_NOT_FOUND_ERRNO,
            sqlstate="42S02",
        )
    lengths = dict(
        duck.execute(
            "SELECT ext_column_name, ext_character_maximum_length "
            "FROM _fs_global._fs_information_schema._fs_columns_ext "
            "WHERE ext_table_catalog = ? AND ext_table_schema = ? AND ext_table_name = ?",
            [catalog, table_schema, name],
        ).fetchall()
    )
    columns = tuple(
        TargetColumn(str(r[0]), duck_type(str(r[1])), bool(r[2]), lengths.get(str(r[0]))) for r in rows
    )
    return TargetTable(catalog, table_schema, name, columns)


# Snowflake's largest values ("New maximum size limits for database objects", bundle 2025_03):
# VARCHAR and VARIANT 128 MB; BINARY 64 MB when declared so, 8 MB for a BINARY column declared
# without a length. A VARCHAR without a length holds 16,777,216 characters.
MAX_VALUE_BYTES = 134_217_728
DEFAULT_VARCHAR_CHARS = 16_777_216
# The length of a BINARY column is not recorded here: every one is held to the default's 8 MB,
# stricter than Snowflake for one declared longer, never looser.
MAX_BINARY_BYTES = 8_388_608


def _too_long_sql(column: TargetColumn, value_sql: str) -> str | None:
    """The condition under which a converted value is longer than ``column`` holds in Snowflake."""
    family = column.type.family
    if family == TypeFamily.TEXT:
        chars = column.max_chars or DEFAULT_VARCHAR_CHARS
        return f"(length({value_sql}) > {chars} OR strlen({value_sql}) > {MAX_VALUE_BYTES})"
    if family == TypeFamily.VARIANT:
        return f"strlen(CAST({value_sql} AS VARCHAR)) > {MAX_VALUE_BYTES}"
    if family == TypeFamily.BINARY:
        return f"octet_length({value_sql}) > {MAX_BINARY_BYTES}"
    return None


def _pick_columns(table: TargetTable, names: tuple[str, ...] | None) -> tuple[TargetColumn, ...]:
    if names is None:
        return table.columns
    by_name = {c.name: c for c in table.columns}
    picked = []
    for name in names:
        if name not in by_name:
            raise ProgrammingError(
                msg=f"SQL compilation error:\nerror line 0 at position -1\ninvalid identifier '{name}'",
                errno=904,
                sqlstate="42000",
            )
        picked.append(by_name[name])
    return tuple(picked)


# ---------------------------------------------------------------------------------------------
# listing files


def list_source_files(reader: duckdb.DuckDBPyConnection, statement: CopyStatement, prefix: str) -> list[str]:
    """The URLs to load: FILES relative to the prefix, else every object under it (filtered by PATTERN)."""
    if statement.files is not None:
        base = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        return [base + name for name in statement.files]
    directory = prefix[: prefix.rfind("/") + 1] if "/" in prefix else prefix
    try:
        rows = reader.execute("SELECT file FROM glob(?) ORDER BY file", [directory + "**"]).fetchall()
    except duckdb.Error as error:
        raise _remote_error(directory, error) from None
    urls = [str(r[0]) for r in rows if str(r[0]).startswith(prefix) and not str(r[0]).endswith("/")]
    if statement.pattern is not None:
        regex = re.compile(statement.pattern)
        urls = [u for u in urls if regex.fullmatch(u[len(directory) :]) or regex.fullmatch(u)]
    return urls


# ---------------------------------------------------------------------------------------------
# reading and converting one file


def _source_sql(statement: CopyStatement, url: str) -> str:
    if statement.file_type == FileType.CSV:
        return csv_reader_sql(url, statement.csv)
    return parquet_reader_sql(url)


def _remote_error(url: str, error: duckdb.Error) -> ProgrammingError:
    text = str(error)
    if "403" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        # S3 refused the stage's credentials: Snowflake reports the stage area, not the file.
        return access_denied()
    if "404" in text or "No files found" in text or "does not exist" in text:
        return ProgrammingError(
            msg=f"Remote file '{url}' was not found. There are several potential causes. "
            "The file might not exist. The required credentials may be missing or invalid.",
            errno=_REMOTE_FILE_ERRNO,
            sqlstate=_REMOTE_FILE_SQLSTATE,
        )
    return ProgrammingError(
        msg=f"Error reading '{url}': {text.splitlines()[0]}", errno=100069, sqlstate="22000"
    )


def _select_items(
    statement: CopyStatement,
    columns: tuple[TargetColumn, ...],
    file_columns: dict[str, SqlType],
) -> list[SelectExpr | None]:
    """The expression feeding each target column; None means the column gets NULL."""
    if statement.select is not None:
        return list(statement.select)
    if statement.file_type == FileType.CSV:
        return [FieldRef(i + 1) for i in range(len(columns))]
    if statement.match_by_column_name == MatchByColumnName.NONE:
        raise ProgrammingError(
            msg="SQL compilation error:\nPARQUET file format can produce one and only one column of type variant, "
            "object, or array. Load data into separate columns using the MATCH_BY_COLUMN_NAME copy option or "
            "copy with transformation.",
            errno=_UNSUPPORTED_ERRNO,
            sqlstate=_UNSUPPORTED_SQLSTATE,
        )
    items: list[SelectExpr | None] = []
    for column in columns:
        if statement.match_by_column_name == MatchByColumnName.CASE_SENSITIVE:
            match = column.name if column.name in file_columns else None
        else:
            match = next((n for n in file_columns if n.lower() == column.name.lower()), None)
        items.append(ParquetFieldRef(match) if match is not None else None)
    return items


def _failure_message(family: TypeFamily, value: str | None, kind: str) -> str:
    if kind == "null":
        return "NULL result in a non-nullable column"
    shown = "" if value is None else value
    if kind == "length":
        return f"String '{shown}...' is too long and would be truncated"
    messages = {
        TypeFamily.NUMBER: f"Numeric value '{shown}' is not recognized",
        TypeFamily.FLOAT: f"Numeric value '{shown}' is not recognized",
        TypeFamily.BOOLEAN: f"Boolean value '{shown}' is not recognized",
        TypeFamily.DATE: f"Date '{shown}' is not recognized",
        TypeFamily.TIME: f"Time '{shown}' is not recognized",
        TypeFamily.TIMESTAMP_NTZ: f"Timestamp '{shown}' is not recognized",
        TypeFamily.TIMESTAMP_TZ: f"Timestamp '{shown}' is not recognized",
        TypeFamily.VARIANT: f"Error parsing JSON: {shown}",
        TypeFamily.BINARY: f"The following string is not a legal hex-encoded value: '{shown}'",
    }
    return messages.get(family, f"Value '{shown}' cannot be converted")


# One check per converted value: (failure condition, failed value, reason).
_ValueCheck = tuple[str, str, str]


def _read_file(
    reader: duckdb.DuckDBPyConnection,
    statement: CopyStatement,
    table: TargetTable,
    columns: tuple[TargetColumn, ...],
    url: str,
) -> FileOutcome:
    source = _source_sql(statement, url)
    try:
        described = reader.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
    except duckdb.Error as error:
        raise _remote_error(url, error) from None
    file_columns = {str(r[0]): duck_type(str(r[1])) for r in described}
    csv_columns = tuple(file_columns) if statement.file_type == FileType.CSV else ()
    if (mismatch := _column_count_mismatch(statement, columns, csv_columns, url)) is not None:
        return mismatch
    items = _select_items(statement, columns, file_columns)
    if len(items) != len(columns):
        raise ProgrammingError(
            msg=f"SQL compilation error:\nInsert value list does not match column list expecting {len(columns)} "
            f"but got {len(items)}",
            errno=_COMPILE_ERRNO,
            sqlstate=_COMPILE_SQLSTATE,
        )
    converted, checks, families = _convert_columns(statement, columns, items, csv_columns, file_columns)
    try:
        rows = reader.execute(_checked_rows_query(source, columns, converted, checks)).to_arrow_table()
    except duckdb.Error as error:
        raise _remote_error(url, error) from None
    return _file_outcome(
        rows, statement=statement, table=table, columns=columns, checks=checks, families=families, url=url
    )


def _column_count_mismatch(
    statement: CopyStatement, columns: tuple[TargetColumn, ...], csv_columns: tuple[str, ...], url: str
) -> FileOutcome | None:
    """Snowflake's failure for a CSV file whose column count is not the table's, unless allowed."""
    if (
        statement.file_type != FileType.CSV
        or statement.select is not None
        or not statement.csv.error_on_column_count_mismatch
        or len(csv_columns) == len(columns)
    ):
        return None
    return FileOutcome(
        url=url,
        status="LOAD_FAILED",
        errors_seen=1,
        first_error=f"Number of columns in file ({len(csv_columns)}) does not match that of the corresponding "
        f"table ({len(columns)}), use file format option error_on_column_count_mismatch=false to ignore "
        "this error",
        first_error_line=statement.csv.skip_header + 1,
        first_error_character=1,
    )


def _convert_columns(
    statement: CopyStatement,
    columns: tuple[TargetColumn, ...],
    items: list[SelectExpr | None],
    csv_columns: tuple[str, ...],
    file_columns: dict[str, SqlType],
) -> tuple[list[str], list[_ValueCheck], list[TypeFamily]]:
    """Each column's value converted to its type, the conversion and length checks (conversion
    checks first: a check's index minus len(columns) is its column), and the type family a
    conversion failure is reported in."""
    converted: list[str] = []
    checks: list[_ValueCheck] = []
    families: list[TypeFamily] = []
    for column, item in zip(columns, items, strict=True):
        if item is None:
            converted.append(f"CAST(NULL AS {column.type.duck})")
            families.append(column.type.family)
            checks.append(("FALSE", "NULL", "conversion"))
            continue
        try:
            compiled = compile_select_expr(
                item,
                file_type=statement.file_type,
                csv_columns=csv_columns,
                csv=statement.csv,
                parquet_columns=file_columns,
            )
        except CopySyntaxError as error:
            raise syntax_error(error) from None
        value_sql = convert_to_column_sql(compiled, column.type)
        converted.append(value_sql)
        families.append(
            compiled.type.family if compiled.type.family != TypeFamily.TEXT else column.type.family
        )
        checks.append(
            (
                f"({compiled.leaf_sql}) IS NOT NULL AND ({value_sql}) IS NULL",
                f"CAST(({compiled.leaf_sql}) AS VARCHAR)",
                "conversion",
            )
        )
    for column, value_sql in zip(columns, converted, strict=True):
        too_long = _too_long_sql(column, value_sql)
        checks.append(
            ("FALSE", "NULL", "length")
            if too_long is None
            else (
                f"({value_sql}) IS NOT NULL AND {too_long}",
                f"left(CAST(({value_sql}) AS VARCHAR), 20)",
                "length",
            )
        )
    return converted, checks, families


def _checked_rows_query(
    source: str, columns: tuple[TargetColumn, ...], converted: list[str], checks: list[_ValueCheck]
) -> str:
    """The file's rows converted, each with its row number and its first failed check (a check's
    index, or -(column + 1) for a NULL in a NOT NULL column) and failed value."""
    null_checks = [
        (i, f"({sql}) IS NULL")
        for i, (column, sql) in enumerate(zip(columns, converted, strict=True))
        if not column.nullable
    ]
    bad_column_cases = " ".join(f"WHEN {cond} THEN {i}" for i, (cond, _, _) in enumerate(checks))
    bad_column_cases += " " + " ".join(f"WHEN {cond} THEN {-(i + 1)}" for i, cond in null_checks)
    bad_value_cases = " ".join(f"WHEN {cond} THEN {value}" for cond, value, _ in checks)
    select_list = ", ".join(f"{sql} AS {duck_ident(f'c{i}')}" for i, sql in enumerate(converted))
    return (
        f"WITH src AS (SELECT *, row_number() OVER () AS {ROW_NUMBER} FROM {source} AS file_rows) "
        f"SELECT {select_list}, {ROW_NUMBER}, "
        f"CASE {bad_column_cases} END AS {BAD_COLUMN}, "
        f"CASE {bad_value_cases} END AS {BAD_VALUE} "
        f"FROM src ORDER BY {ROW_NUMBER}"
    )


def _file_outcome(
    rows: pa.Table,
    *,
    statement: CopyStatement,
    table: TargetTable,
    columns: tuple[TargetColumn, ...],
    checks: list[_ValueCheck],
    families: list[TypeFamily],
    url: str,
) -> FileOutcome:
    """The rows that passed every check, and the first failure as Snowflake reports it."""
    bad_mask = pc.is_valid(rows.column(BAD_COLUMN))
    bad_rows = rows.filter(bad_mask)
    good_rows = rows.filter(pc.invert(bad_mask)).select([f"c{i}" for i in range(len(columns))])
    outcome = FileOutcome(url=url, status="LOADED", rows_parsed=rows.num_rows, rows_loaded=good_rows.num_rows)
    if bad_rows.num_rows:
        first = bad_rows.slice(0, 1).to_pylist()[0]
        index = int(first[BAD_COLUMN])
        kind = "null" if index < 0 else checks[index][2]
        column_index = -index - 1 if index < 0 else index % len(columns)
        row_number = int(first[ROW_NUMBER])
        line = row_number + (statement.csv.skip_header if statement.file_type == FileType.CSV else 0)
        outcome.errors_seen = bad_rows.num_rows
        outcome.first_error = _failure_message(families[column_index], first[BAD_VALUE], kind)
        outcome.first_error_line = line
        outcome.first_error_row = row_number
        outcome.first_error_character = 1
        outcome.first_error_column_name = f'"{table.name}"["{columns[column_index].name}":{column_index + 1}]'
        outcome.rows_loaded = good_rows.num_rows
    outcome.rows = good_rows
    return outcome


def _abort_error(outcome: FileOutcome) -> ProgrammingError:
    where = f"\n  File '{outcome.url}', line {outcome.first_error_line}, character {outcome.first_error_character}"
    if outcome.first_error_column_name:
        where += f"\n  Row {outcome.first_error_row}, column {outcome.first_error_column_name}"
    return ProgrammingError(
        msg=f"{outcome.first_error}{where}\n  If you would like to continue loading when an error is encountered, "
        "use other values such as 'SKIP_FILE' or 'CONTINUE' for the ON_ERROR option. For more information on "
        "loading options, please run 'info loading_data' in a SQL client.",
        errno=_CONVERSION_ERRNO,
        sqlstate=_CONVERSION_SQLSTATE,
    )


def _already_loaded(duck: duckdb.DuckDBPyConnection, table: TargetTable, url: str) -> bool:
    row = duck.execute(
        f"SELECT 1 FROM {duck_ident(table.catalog)}._fs_information_schema._fs_load_history "
        "WHERE SCHEMA_NAME = ? AND TABLE_NAME = ? AND FILE_NAME = ? AND STATUS IN ('LOADED', 'PARTIALLY_LOADED') "
        "LIMIT 1",
        [table.schema, table.name, url],
    ).fetchone()
    return row is not None


def prepare_copy(
    statement: CopyStatement,
    *,
    session: duckdb.DuckDBPyConnection,
    reader: duckdb.DuckDBPyConnection,
    prefix: str,
    database: str | None,
    schema: str | None,
    check_url: Callable[[str], None] | None = None,
) -> PreparedCopy:
    """Phase 1: read and convert every file; raise when the statement must abort.

    ``check_url`` may refuse a file before it is read (an integration's blocked locations).
    """
    table = describe_target(session, statement.table.parts, database, schema)
    columns = _pick_columns(table, statement.columns)
    prepared = PreparedCopy(table, columns)
    urls = list_source_files(reader, statement, prefix)
    if check_url is not None:
        for url in urls:
            check_url(url)
    for url in urls:
        if not statement.force and _already_loaded(session, table, url):
            prepared.outcomes.append(
                FileOutcome(
                    url=url,
                    status="LOAD_SKIPPED",
                    error_limit=None,
                    errors_seen=1,
                    first_error="File was loaded before.",
                )
            )
            continue
        outcome = _read_file(reader, statement, table, columns, url)
        if outcome.errors_seen:
            if statement.on_error == OnError.ABORT_STATEMENT:
                raise _abort_error(outcome)
            if statement.on_error == OnError.SKIP_FILE or outcome.rows_loaded == 0:
                outcome.status = "LOAD_FAILED"
                outcome.rows_loaded = 0
                outcome.rows = None
            else:
                outcome.status = "PARTIALLY_LOADED"
                outcome.error_limit = outcome.rows_parsed
        prepared.outcomes.append(outcome)
    return prepared


# ---------------------------------------------------------------------------------------------
# writing


_counter = itertools.count()


def apply_copy(prepared: PreparedCopy, session: duckdb.DuckDBPyConnection) -> None:
    """Phase 2: insert the rows and the load history on the session's cursor (its transaction)."""
    table = prepared.table
    column_list = ", ".join(duck_ident(c.name) for c in prepared.columns)
    now = datetime.datetime.now(datetime.UTC)
    for outcome in prepared.outcomes:
        if outcome.status == "LOAD_SKIPPED":
            continue
        if outcome.rows is not None and outcome.rows.num_rows:
            view = f"__pgsnow_copy_rows_{next(_counter)}"
            session.register(view, outcome.rows)
            try:
                session.execute(
                    f"INSERT INTO {table.duck_name} ({column_list}) SELECT * FROM {duck_ident(view)}"
                )
            finally:
                session.unregister(view)
        session.execute(
            f"INSERT INTO {duck_ident(table.catalog)}._fs_information_schema._fs_load_history "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                table.schema,
                outcome.url,
                table.name,
                now,
                outcome.status,
                outcome.rows_loaded,
                outcome.rows_parsed,
                outcome.first_error,
                outcome.first_error_line,
                outcome.first_error_character,
                outcome.first_error_column_name,
                outcome.errors_seen,
                outcome.error_limit,
            ],
        )
