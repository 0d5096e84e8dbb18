"""COPY INTO as text: parse Snowflake's statement and translate it to DuckDB SQL (pure functions).

The local Snowflake (``pgsnow.local.snowflake``) runs ``COPY INTO`` itself instead of
fakesnow, so that loading keeps Snowflake's semantics: every CSV field read as text and
converted to the target column's type like Snowflake converts it, ``NULL_IF`` and
``EMPTY_FIELD_AS_NULL`` honoured, a bad value reported with its file and column. This
module only turns text into plans and plans into DuckDB SQL text; ``sf_copy_run`` runs
them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

import sqlglot
import sqlglot.errors
from sqlglot import exp

from pgsnow.local.sf_credentials_sql import AccessSyntaxError, AwsCredentials, split_credentials


class CopySyntaxError(ValueError):
    """A COPY statement pgsnow's local Snowflake recognises but cannot run as written."""


class FileType(StrEnum):
    CSV = "CSV"
    PARQUET = "PARQUET"


class OnError(StrEnum):
    ABORT_STATEMENT = "ABORT_STATEMENT"
    SKIP_FILE = "SKIP_FILE"
    CONTINUE = "CONTINUE"


class MatchByColumnName(StrEnum):
    NONE = "NONE"
    CASE_SENSITIVE = "CASE_SENSITIVE"
    CASE_INSENSITIVE = "CASE_INSENSITIVE"


# Snowflake's default NULL_IF for CSV is the two characters backslash and N.
DEFAULT_NULL_IF = ("\\N",)


@dataclass(frozen=True)
class CsvOptions:
    """The CSV file format options, with Snowflake's defaults."""

    compression: str = "AUTO"
    field_delimiter: str = ","
    skip_header: int = 0
    field_optionally_enclosed_by: str | None = None
    escape_unenclosed_field: str | None = "\\"
    null_if: tuple[str, ...] = DEFAULT_NULL_IF
    empty_field_as_null: bool = True
    error_on_column_count_mismatch: bool = True


@dataclass(frozen=True)
class ObjectName:
    """A possibly qualified Snowflake object name; each part already resolved to its stored case."""

    parts: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.parts[-1]


@dataclass(frozen=True)
class StageSource:
    """``@stage[/sub/path/]``: the sub-path is appended to the stage's URL."""

    stage: ObjectName
    sub_path: str = ""


@dataclass(frozen=True)
class UrlSource:
    """``'s3://bucket/path/'`` given directly in the statement."""

    url: str


# The SELECT list of a transforming COPY, as a small tree we can type-check and compile.
@dataclass(frozen=True)
class FieldRef:
    """``$n``: the n-th field of a CSV row (1-based)."""

    position: int


@dataclass(frozen=True)
class ParquetFieldRef:
    """``$1:"name"``: a Parquet column by exact name."""

    name: str


@dataclass(frozen=True)
class CastTo:
    """``<expr>::<TYPE>`` with the Snowflake type as written (e.g. ``NUMBER(38,0)``)."""

    operand: SelectExpr
    target: SqlType


@dataclass(frozen=True)
class ParseJson:
    operand: SelectExpr


@dataclass(frozen=True)
class ToBinaryHex:
    operand: SelectExpr


SelectExpr = FieldRef | ParquetFieldRef | CastTo | ParseJson | ToBinaryHex


class TypeFamily(StrEnum):
    """How a value converts; the same family covers a Snowflake type and the DuckDB type fakesnow stores it as."""

    TEXT = "TEXT"
    NUMBER = "NUMBER"
    FLOAT = "FLOAT"
    BOOLEAN = "BOOLEAN"
    DATE = "DATE"
    TIME = "TIME"
    TIMESTAMP_NTZ = "TIMESTAMP_NTZ"
    TIMESTAMP_TZ = "TIMESTAMP_TZ"
    VARIANT = "VARIANT"
    BINARY = "BINARY"
    VECTOR = "VECTOR"  # VECTOR(FLOAT|INT, n), stored by DuckDB as FLOAT[n] / INTEGER[n]
    GEOMETRY = "GEOMETRY"  # stored as GEOMETRY_STORAGE: the SRID and the 2D WKB
    GEOGRAPHY = "GEOGRAPHY"  # stored as GEOGRAPHY_STORAGE: SRID 4326 and the 2D WKB


# DuckDB's GEOMETRY keeps no per-value SRID, and Snowflake's GEOMETRY does (ST_SRID): the local
# Snowflake stores a geospatial value as its SRID and its plain 2D WKB. The first field's name says
# which Snowflake type the column is (INFORMATION_SCHEMA, sf_extension_types).
GEOMETRY_STORAGE = "STRUCT(geometry_srid INTEGER, wkb BLOB)"
GEOGRAPHY_STORAGE = "STRUCT(geography_srid INTEGER, wkb BLOB)"


@dataclass(frozen=True)
class SqlType:
    """A column or cast type: its family and the DuckDB type text that stores it."""

    family: TypeFamily
    duck: str


@dataclass(frozen=True)
class CopyStatement:
    """Everything pgsnow needs from one ``COPY INTO <table>`` statement."""

    table: ObjectName
    columns: tuple[str, ...] | None
    source: StageSource | UrlSource
    select: tuple[SelectExpr, ...] | None
    files: tuple[str, ...] | None
    pattern: str | None
    file_type: FileType
    csv: CsvOptions = field(default_factory=CsvOptions)
    on_error: OnError = OnError.ABORT_STATEMENT
    force: bool = False
    match_by_column_name: MatchByColumnName = MatchByColumnName.NONE
    # How a direct 's3://' URL is read (a stage carries its own): checked by ``sf_access``.
    storage_integration: str | None = None
    credentials: AwsCredentials | None = None


# ---------------------------------------------------------------------------------------------
# names


_NAME_PART = re.compile(r'"((?:[^"]|"")*)"|([^."/\s]+)')


def resolve_identifier(text: str, *, quoted: bool) -> str:
    """Snowflake's identifier resolution: unquoted names are stored upper case, quoted ones as written."""
    return text if quoted else text.upper()


def parse_stage_reference(text: str) -> StageSource:
    """Split ``@db.schema."Stage"/sub/path/`` into the stage name and the sub-path after it."""
    if not text.startswith("@"):
        raise CopySyntaxError(f"not a stage reference: {text!r}")
    position = 1
    parts: list[str] = []
    while True:
        match = _NAME_PART.match(text, position)
        if not match:
            raise CopySyntaxError(f"invalid stage name in {text!r}")
        quoted_part, plain_part = match.groups()
        if quoted_part is not None:
            parts.append(quoted_part.replace('""', '"'))
        else:
            parts.append(resolve_identifier(plain_part, quoted=False))
        position = match.end()
        if position < len(text) and text[position] == ".":
            position += 1
            continue
        break
    rest = text[position:]
    if rest and not rest.startswith("/"):
        raise CopySyntaxError(f"invalid stage reference {text!r}")
    if len(parts) > 3:
        raise CopySyntaxError(f"stage name has more than three parts: {text!r}")
    return StageSource(ObjectName(tuple(parts)), rest.lstrip("/"))


def _object_name(table: exp.Table) -> ObjectName:
    parts: list[str] = []
    for part in (table.args.get("catalog"), table.args.get("db"), table.this):
        if part is None:
            continue
        if not isinstance(part, exp.Identifier):
            raise CopySyntaxError(f"unsupported table name part {part.sql(dialect='snowflake')}")
        parts.append(resolve_identifier(part.this, quoted=bool(part.args.get("quoted"))))
    return ObjectName(tuple(parts))


# ---------------------------------------------------------------------------------------------
# types

_DUCK_TIMESTAMP_TZ = "TIMESTAMP WITH TIME ZONE"


def snowflake_type(data_type: exp.DataType) -> SqlType:
    """The family and DuckDB storage of a Snowflake type as sqlglot parsed it from ``::TYPE``."""
    kind = data_type.this
    t = exp.DataType.Type
    if kind in {t.DECIMAL, t.BIGDECIMAL}:
        params = [p.this.this for p in data_type.expressions if isinstance(p, exp.DataTypeParam)]
        precision = int(params[0]) if params else 38
        scale = int(params[1]) if len(params) > 1 else 0
        return SqlType(TypeFamily.NUMBER, f"DECIMAL({precision},{scale})")
    if kind in {t.INT, t.BIGINT, t.SMALLINT, t.TINYINT}:
        return SqlType(TypeFamily.NUMBER, "DECIMAL(38,0)")
    if kind in {t.DOUBLE, t.FLOAT}:
        return SqlType(TypeFamily.FLOAT, "DOUBLE")
    if kind in {t.VARCHAR, t.TEXT, t.CHAR, t.NCHAR, t.NVARCHAR}:
        return SqlType(TypeFamily.TEXT, "VARCHAR")
    if kind == t.BOOLEAN:
        return SqlType(TypeFamily.BOOLEAN, "BOOLEAN")
    if kind == t.DATE:
        return SqlType(TypeFamily.DATE, "DATE")
    if kind == t.TIME:
        return SqlType(TypeFamily.TIME, "TIME")
    if kind in {t.TIMESTAMP, t.TIMESTAMPNTZ, t.DATETIME}:
        return SqlType(TypeFamily.TIMESTAMP_NTZ, "TIMESTAMP")
    if kind in {t.TIMESTAMPTZ, t.TIMESTAMPLTZ}:
        return SqlType(TypeFamily.TIMESTAMP_TZ, _DUCK_TIMESTAMP_TZ)
    if kind in {t.VARIANT, t.OBJECT, t.ARRAY, t.JSON}:
        return SqlType(TypeFamily.VARIANT, "JSON")
    if kind in {t.BINARY, t.VARBINARY}:
        return SqlType(TypeFamily.BINARY, "BLOB")
    if kind == t.VECTOR:
        return vector_type(data_type)
    if kind == t.GEOMETRY:
        return SqlType(TypeFamily.GEOMETRY, GEOMETRY_STORAGE)
    if kind == t.GEOGRAPHY:
        return SqlType(TypeFamily.GEOGRAPHY, GEOGRAPHY_STORAGE)
    raise CopySyntaxError(f"cast to {data_type.sql(dialect='snowflake')} is not supported in a local COPY")


# Snowflake's VECTOR: 32-bit INT or FLOAT elements, dimension 1..4096 (docs: "Vector data types").
MAX_VECTOR_DIMENSION = 4096
_DUCK_VECTOR = re.compile(r"^(FLOAT|INTEGER)\[(\d+)\]$", re.IGNORECASE)


def vector_type(data_type: exp.DataType) -> SqlType:
    """``VECTOR(FLOAT, n)`` / ``VECTOR(INT, n)`` as sqlglot parsed it; DuckDB stores FLOAT[n] / INTEGER[n]."""
    element = next((p for p in data_type.expressions if isinstance(p, exp.DataType)), None)
    size = next((p for p in data_type.expressions if isinstance(p, exp.DataTypeParam)), None)
    if element is None or size is None or not str(size.this.this).isdigit():
        raise CopySyntaxError("VECTOR needs an element type and a dimension: VECTOR(FLOAT, n)")
    dimension = int(str(size.this.this))
    if not 1 <= dimension <= MAX_VECTOR_DIMENSION:
        raise CopySyntaxError(f"VECTOR dimension {dimension} is outside 1..{MAX_VECTOR_DIMENSION}")
    t = exp.DataType.Type
    # Snowflake's FLOAT parses as DOUBLE; inside VECTOR it means 32-bit floats.
    if element.this in {t.DOUBLE, t.FLOAT}:
        return SqlType(TypeFamily.VECTOR, f"FLOAT[{dimension}]")
    if element.this in {t.INT, t.BIGINT}:
        return SqlType(TypeFamily.VECTOR, f"INTEGER[{dimension}]")
    raise CopySyntaxError(f"VECTOR elements are INT or FLOAT, not {element.sql(dialect='snowflake')}")


def vector_dimension(duck: str) -> int:
    match = _DUCK_VECTOR.match(duck)
    if match is None:
        raise ValueError(f"not a vector storage type: {duck!r}")
    return int(match.group(2))


_DUCK_FAMILIES: tuple[tuple[str, TypeFamily], ...] = (
    ("DECIMAL", TypeFamily.NUMBER),
    ("HUGEINT", TypeFamily.NUMBER),
    ("BIGINT", TypeFamily.NUMBER),
    ("INTEGER", TypeFamily.NUMBER),
    ("SMALLINT", TypeFamily.NUMBER),
    ("TINYINT", TypeFamily.NUMBER),
    ("UBIGINT", TypeFamily.NUMBER),
    ("UINTEGER", TypeFamily.NUMBER),
    ("USMALLINT", TypeFamily.NUMBER),
    ("UTINYINT", TypeFamily.NUMBER),
    ("DOUBLE", TypeFamily.FLOAT),
    ("FLOAT", TypeFamily.FLOAT),
    ("REAL", TypeFamily.FLOAT),
    ("VARCHAR", TypeFamily.TEXT),
    ("BOOLEAN", TypeFamily.BOOLEAN),
    ("DATE", TypeFamily.DATE),
    ("TIMESTAMP WITH TIME ZONE", TypeFamily.TIMESTAMP_TZ),
    ("TIMESTAMP", TypeFamily.TIMESTAMP_NTZ),
    ("TIME", TypeFamily.TIME),
    ("JSON", TypeFamily.VARIANT),
    ("BLOB", TypeFamily.BINARY),
)


def duck_type(type_text: str) -> SqlType:
    """The family of a DuckDB column type as ``DESCRIBE``/``duckdb_columns()`` prints it."""
    upper = type_text.upper()
    if _DUCK_VECTOR.match(upper):
        return SqlType(TypeFamily.VECTOR, upper)
    if upper == GEOMETRY_STORAGE.upper():
        return SqlType(TypeFamily.GEOMETRY, GEOMETRY_STORAGE)
    if upper == GEOGRAPHY_STORAGE.upper():
        return SqlType(TypeFamily.GEOGRAPHY, GEOGRAPHY_STORAGE)
    for prefix, family in _DUCK_FAMILIES:
        if upper == prefix or upper.startswith((prefix + "(", prefix + "_")):
            return SqlType(family, type_text)
    # Lists, structs, maps...: Snowflake would hold them in a VARIANT.
    return SqlType(TypeFamily.VARIANT, type_text)


# ---------------------------------------------------------------------------------------------
# parsing


def _option_text(value: exp.Expression) -> str:
    if isinstance(value, exp.Literal | exp.Var):
        return str(value.this)
    if isinstance(value, exp.Boolean):
        return "TRUE" if value.this else "FALSE"
    if isinstance(value, exp.Identifier | exp.Column):
        return value.name
    if isinstance(value, exp.Null):
        return "NONE"
    return value.sql(dialect="snowflake")


def _option_bool(name: str, value: exp.Expression) -> bool:
    text = _option_text(value).upper()
    if text in {"TRUE", "1"}:
        return True
    if text in {"FALSE", "0"}:
        return False
    raise CopySyntaxError(f"{name} must be TRUE or FALSE, not {text}")


def _option_char(value: exp.Expression) -> str | None:
    """A single-character option; ``NONE`` means the feature is off."""
    if isinstance(value, exp.Var | exp.Null) and _option_text(value).upper() == "NONE":
        return None
    text = _option_text(value)
    return text or None


def _string_list(value: exp.Expression) -> tuple[str, ...]:
    if isinstance(value, exp.Tuple):
        return tuple(_option_text(e) for e in value.expressions)
    if isinstance(value, exp.Paren):
        return (_option_text(value.this),)
    return (_option_text(value),)


def _file_format(
    options: list[exp.Expression],
) -> tuple[FileType, CsvOptions]:
    file_type = FileType.CSV
    csv: dict[str, object] = {}
    for option in options:
        if not isinstance(option, exp.Property):
            raise CopySyntaxError(f"unsupported FILE_FORMAT option {option.sql(dialect='snowflake')}")
        name = option.name.upper()
        value = option.args["value"]
        if name == "TYPE":
            text = _option_text(value).upper()
            if text not in FileType.__members__:
                raise CopySyntaxError(f"FILE_FORMAT TYPE = {text} is not supported locally")
            file_type = FileType(text)
        elif name == "FORMAT_NAME":
            raise CopySyntaxError("named file formats are not supported locally; give the options inline")
        elif name == "COMPRESSION":
            csv["compression"] = _option_text(value).upper()
        elif name == "FIELD_DELIMITER":
            delimiter = _option_char(value)
            if delimiter is None:
                raise CopySyntaxError("FIELD_DELIMITER = NONE is not supported locally")
            csv["field_delimiter"] = delimiter
        elif name == "SKIP_HEADER":
            csv["skip_header"] = int(_option_text(value))
        elif name == "FIELD_OPTIONALLY_ENCLOSED_BY":
            csv["field_optionally_enclosed_by"] = _option_char(value)
        elif name == "ESCAPE_UNENCLOSED_FIELD":
            csv["escape_unenclosed_field"] = _option_char(value)
        elif name == "NULL_IF":
            csv["null_if"] = _string_list(value)
        elif name == "EMPTY_FIELD_AS_NULL":
            csv["empty_field_as_null"] = _option_bool(name, value)
        elif name == "ERROR_ON_COLUMN_COUNT_MISMATCH":
            csv["error_on_column_count_mismatch"] = _option_bool(name, value)
        elif name in {"BINARY_AS_TEXT", "USE_LOGICAL_TYPE", "TRIM_SPACE", "ENCODING", "RECORD_DELIMITER"}:
            # Accepted with their defaults only; anything else would change results silently.
            _check_default_option(name, value)
        else:
            raise CopySyntaxError(f"FILE_FORMAT option {name} is not supported locally")
    return file_type, CsvOptions(**csv)  # type: ignore[arg-type]


_ACCEPTED_DEFAULTS = {
    "BINARY_AS_TEXT": {"TRUE"},
    "USE_LOGICAL_TYPE": {"TRUE"},
    "TRIM_SPACE": {"FALSE"},
    "ENCODING": {"UTF8", "UTF-8"},
    "RECORD_DELIMITER": {"\n", "\\n"},
}


def _check_default_option(name: str, value: exp.Expression) -> None:
    text = _option_text(value).upper()
    if text not in _ACCEPTED_DEFAULTS[name]:
        raise CopySyntaxError(f"FILE_FORMAT option {name} = {text} is not supported locally")


def _select_expr(node: exp.Expression) -> SelectExpr:
    if isinstance(node, exp.Parameter) and isinstance(node.this, exp.Literal) and not node.this.is_string:
        return FieldRef(int(node.this.this))
    if isinstance(node, exp.JSONExtract):
        base, path = node.this, node.expression
        if (
            isinstance(base, exp.Parameter)
            and str(base.this.this) == "1"
            and isinstance(path, exp.JSONPath)
            and len(path.expressions) == 2
            and isinstance(path.expressions[1], exp.JSONPathKey)
        ):
            return ParquetFieldRef(str(path.expressions[1].this))
    if isinstance(node, exp.Cast):
        return CastTo(_select_expr(node.this), snowflake_type(node.to))
    if isinstance(node, exp.ParseJSON):
        return ParseJson(_select_expr(node.this))
    if isinstance(node, exp.ToBinary):
        fmt = node.args.get("format")
        if fmt is not None and _option_text(fmt).upper() != "HEX":
            raise CopySyntaxError("only TO_BINARY(<expr>, 'HEX') is supported locally")
        return ToBinaryHex(_select_expr(node.this))
    if isinstance(node, exp.Alias):
        return _select_expr(node.this)
    raise CopySyntaxError(f"COPY transformation {node.sql(dialect='snowflake')} is not supported locally")


def _source(node: exp.Expression) -> tuple[StageSource | UrlSource, tuple[SelectExpr, ...] | None]:
    if isinstance(node, exp.Subquery) and isinstance(node.this, exp.Select):
        select = node.this
        from_ = select.args.get("from_") or select.args.get("from")
        if from_ is None:
            raise CopySyntaxError("a COPY transformation needs FROM @stage")
        source, _ = _source(from_.this)
        return source, tuple(_select_expr(e) for e in select.expressions)
    if isinstance(node, exp.Table):
        location = node.this
        if isinstance(location, exp.Var) and str(location.this).startswith("@"):
            return parse_stage_reference(str(location.this)), None
        if isinstance(location, exp.Literal) and location.is_string:
            text = str(location.this)
            if text.startswith("@"):
                return parse_stage_reference(text), None
            return UrlSource(text), None
    raise CopySyntaxError(f"COPY source {node.sql(dialect='snowflake')} is not supported locally")


def parse_copy_source(sql_text: str) -> StageSource | UrlSource | None:
    """Only the source of a ``COPY INTO <table>``, for statements ``parse_copy`` rejects."""
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if not isinstance(statement, exp.Copy) or len(statement.args.get("files") or []) != 1:
        return None
    try:
        source, _ = _source(statement.args["files"][0])
    except CopySyntaxError:
        return None
    return source


def parse_copy(sql_text: str) -> CopyStatement | None:
    """Parse ``COPY INTO <table>``; None for any other statement (including COPY INTO @stage)."""
    try:
        sql_text, credentials = split_credentials(sql_text)
    except AccessSyntaxError as error:
        raise CopySyntaxError(str(error)) from None
    try:
        statement = sqlglot.parse_one(sql_text, read="snowflake")
    except sqlglot.errors.ParseError:
        return None
    if not isinstance(statement, exp.Copy) or not statement.args.get("kind"):
        return None
    target = statement.this
    columns: tuple[str, ...] | None = None
    if isinstance(target, exp.Schema):
        columns = tuple(
            resolve_identifier(c.this, quoted=bool(c.args.get("quoted")))
            for c in target.expressions
            if isinstance(c, exp.Identifier)
        )
        target = target.this
    if not isinstance(target, exp.Table) or not isinstance(target.this, exp.Identifier):
        return None  # COPY INTO @stage / 's3://...' unloads: not ours
    sources = statement.args.get("files") or []
    if len(sources) != 1:
        raise CopySyntaxError("COPY INTO needs exactly one source")
    source, select = _source(sources[0])
    options = _CopyOptions(storage_integration=_credentials_integration(statement))
    for param in statement.args.get("params") or []:
        options.apply(param)
    if select is not None and options.match_by != MatchByColumnName.NONE:
        raise CopySyntaxError("MATCH_BY_COLUMN_NAME cannot be used with a COPY transformation")
    return CopyStatement(
        table=_object_name(target),
        columns=columns,
        source=source,
        select=select,
        files=options.files,
        pattern=options.pattern,
        file_type=options.file_type,
        csv=options.csv,
        on_error=options.on_error,
        force=options.force,
        match_by_column_name=options.match_by,
        storage_integration=options.storage_integration,
        credentials=credentials,
    )


def _credentials_integration(statement: exp.Copy) -> str | None:
    """STORAGE_INTEGRATION right after the source: sqlglot takes it into the COPY's Credentials node."""
    given_credentials = statement.args.get("credentials")
    storage_integration: str | None = None
    if isinstance(given_credentials, exp.Credentials):
        for arg, value in given_credentials.args.items():
            if value is None or value == []:
                continue
            if arg != "storage" or not isinstance(value, exp.Identifier | exp.Var):
                raise CopySyntaxError(f"COPY option {arg.upper()} is not supported locally")
            storage_integration = resolve_identifier(value.name, quoted=bool(value.args.get("quoted")))
    return storage_integration


@dataclass
class _CopyOptions:
    """A COPY's options as parsed so far: Snowflake's defaults until the statement gives one."""

    files: tuple[str, ...] | None = None
    pattern: str | None = None
    file_type: FileType = FileType.CSV
    csv: CsvOptions = field(default_factory=CsvOptions)
    on_error: OnError = OnError.ABORT_STATEMENT
    force: bool = False
    match_by: MatchByColumnName = MatchByColumnName.NONE
    storage_integration: str | None = None

    def apply(self, param: exp.Expression) -> None:
        name = param.name.upper()
        value = param.args.get("expression")
        if name == "FILE_FORMAT":
            self.file_type, self.csv = _file_format(list(param.expressions))
        elif name == "STORAGE_INTEGRATION":
            self.storage_integration = _integration_name(value)
        elif name not in _VALUED_OPTIONS:
            raise CopySyntaxError(f"COPY option {name} is not supported locally")
        elif value is None:
            raise AssertionError(f"COPY option {name} without a value")
        elif name == "FILES":
            self.files = _string_list(value)
        elif name == "PATTERN":
            self.pattern = _option_text(value)
        elif name == "ON_ERROR":
            text = _option_text(value).upper()
            if text not in OnError.__members__:
                raise CopySyntaxError(f"ON_ERROR = {text} is not supported locally")
            self.on_error = OnError(text)
        elif name == "FORCE":
            self.force = _option_bool(name, value)
        elif name == "MATCH_BY_COLUMN_NAME":
            self.match_by = MatchByColumnName(_option_text(value).upper())
        elif _option_bool(name, value):  # PURGE, RETURN_FAILED_ONLY, LOAD_UNCERTAIN_FILES
            raise CopySyntaxError(f"{name} = TRUE is not supported locally")


# The options (besides FILE_FORMAT and STORAGE_INTEGRATION) the local COPY accepts; the last
# three only as FALSE.
_VALUED_OPTIONS = frozenset(
    {
        "FILES",
        "PATTERN",
        "ON_ERROR",
        "FORCE",
        "MATCH_BY_COLUMN_NAME",
        "PURGE",
        "RETURN_FAILED_ONLY",
        "LOAD_UNCERTAIN_FILES",
    }
)


def _integration_name(value: exp.Expression | None) -> str:
    if isinstance(value, exp.Identifier):
        return resolve_identifier(value.this, quoted=bool(value.args.get("quoted")))
    if isinstance(value, exp.Var | exp.Column):
        return resolve_identifier(value.name, quoted=False)
    raise CopySyntaxError("STORAGE_INTEGRATION takes an integration name")


# ---------------------------------------------------------------------------------------------
# translation to DuckDB


def duck_ident(name: str) -> str:
    """Quote a DuckDB identifier (DuckDB, like Snowflake, doubles an embedded quote)."""
    return '"' + name.replace('"', '""') + '"'


def duck_string(text: str) -> str:
    """A DuckDB string literal, for the few places DuckDB cannot bind a parameter (table function options)."""
    return "'" + text.replace("'", "''") + "'"


_DUCK_COMPRESSION = {"AUTO": "auto", "GZIP": "gzip", "NONE": "none", "ZSTD": "zstd"}
# Fields DuckDB must never turn into NULL by itself: we decide NULL from Snowflake's rules.
NEVER_NULL_MARKER = "\x01pgsnow-not-null\x01"


CSV_MAX_LINE_BYTES = 260 * 1024 * 1024


def csv_reader_sql(url: str, options: CsvOptions) -> str:
    """``read_csv(...)`` reading every field as VARCHAR, so no value passes through a guessed type.

    An unquoted empty field comes back NULL (when EMPTY_FIELD_AS_NULL) and a quoted ``""``
    comes back as the empty string (``allow_quoted_nulls = false``): Snowflake's distinction.
    NULL_IF is applied afterwards by ``csv_field_sql``.
    """
    if options.compression not in _DUCK_COMPRESSION:
        raise CopySyntaxError(f"COMPRESSION = {options.compression} is not supported locally")
    if options.escape_unenclosed_field not in (None, "\\"):
        raise CopySyntaxError("ESCAPE_UNENCLOSED_FIELD other than NONE or '\\\\' is not supported locally")
    quote = options.field_optionally_enclosed_by
    arguments = [
        duck_string(url),
        "all_varchar = true",
        "header = false",
        f"skip = {int(options.skip_header)}",
        f"delim = {duck_string(options.field_delimiter)}",
        # With no enclosing character, a quote is ordinary data.
        f"quote = {duck_string(quote) if quote else duck_string('')}",
        f"escape = {duck_string(quote) if quote else duck_string('')}",
        "allow_quoted_nulls = false",
        "nullstr = " + (duck_string("") if options.empty_field_as_null else duck_string(NEVER_NULL_MARKER)),
        f"compression = {duck_string(_DUCK_COMPRESSION[options.compression])}",
        "new_line = '\\n'",
        # DuckDB refuses a line over 2 MB by default; Snowflake takes values up to 128 MB. A line
        # may hold two of them here (stricter than Snowflake for more, never looser).
        f"max_line_size = {CSV_MAX_LINE_BYTES}",
        f"buffer_size = {CSV_MAX_LINE_BYTES}",
        # No null_padding: DuckDB then rejects newlines inside quoted fields. A row with a
        # different number of fields is reported as a parse error of its file.
    ]
    return f"read_csv({', '.join(arguments)})"


def parquet_reader_sql(url: str) -> str:
    return f"read_parquet({duck_string(url)})"


def csv_field_sql(column: str, options: CsvOptions) -> str:
    """A raw CSV field with NULL_IF applied (Snowflake compares the field text after unquoting)."""
    ref = duck_ident(column)
    if not options.null_if:
        return ref
    listed = ", ".join(duck_string(v) for v in options.null_if)
    return f"(CASE WHEN {ref} IN ({listed}) THEN NULL ELSE {ref} END)"


_TRUE_WORDS = ("true", "t", "yes", "y", "on", "1")
_FALSE_WORDS = ("false", "f", "no", "n", "off", "0")


def text_to_type_sql(text_sql: str, target: SqlType) -> str:
    """Convert text to a type with Snowflake's parsing rules; NULL when the text does not convert.

    The caller treats "text not NULL, result NULL" as a conversion error.
    """
    family = target.family
    if family == TypeFamily.TEXT:
        return text_sql
    if family == TypeFamily.BOOLEAN:
        lowered = f"lower(trim({text_sql}))"
        trues = ", ".join(duck_string(w) for w in _TRUE_WORDS)
        falses = ", ".join(duck_string(w) for w in _FALSE_WORDS)
        return f"(CASE WHEN {lowered} IN ({trues}) THEN TRUE WHEN {lowered} IN ({falses}) THEN FALSE END)"
    if family == TypeFamily.VARIANT:
        return f"(CASE WHEN json_valid({text_sql}) THEN CAST({text_sql} AS JSON) END)"
    if family == TypeFamily.BINARY:
        return f"(CASE WHEN regexp_full_match({text_sql}, '([0-9A-Fa-f]{{2}})*') THEN unhex({text_sql}) END)"
    if family in {TypeFamily.GEOMETRY, TypeFamily.GEOGRAPHY}:
        return geospatial_from_ewkb_hex_sql(text_sql, geography=family == TypeFamily.GEOGRAPHY)
    if family == TypeFamily.VECTOR:
        # Snowflake loads no VECTOR from a file field directly ("Vector data types": load an
        # ARRAY, then cast): every such value is a conversion error.
        return f"CAST(NULL AS {target.duck})"
    if family == TypeFamily.NUMBER:
        return f"TRY_CAST(trim({text_sql}) AS {target.duck})"
    if family == TypeFamily.FLOAT:
        return f"TRY_CAST(trim({text_sql}) AS {target.duck})"
    # Dates, times and timestamps: DuckDB accepts the ISO forms Snowflake's AUTO format reads,
    # including 'T' and a 'Z' or +hh:mm offset for TIMESTAMP_TZ.
    return f"TRY_CAST({text_sql} AS {target.duck})"


def value_to_type_sql(value_sql: str, source: SqlType, target: SqlType) -> str:
    """Convert a typed value (a Parquet column, a cast result) to another type like Snowflake."""
    if source.family == TypeFamily.TEXT and target.family != TypeFamily.VARIANT:
        return text_to_type_sql(value_sql, target)
    if target.family == TypeFamily.VARIANT:
        if source.family == TypeFamily.VARIANT:
            return value_sql
        # A typed value becomes a VARIANT holding that value (a string stays a JSON string).
        return f"to_json({value_sql})"
    if source.family == TypeFamily.VARIANT and target.family == TypeFamily.TEXT:
        # VARIANT::VARCHAR of a JSON string is the string itself, not its JSON text.
        return (
            f"(CASE WHEN json_type({value_sql}) = 'VARCHAR' THEN json_extract_string({value_sql}, '$') "
            f"ELSE CAST({value_sql} AS VARCHAR) END)"
        )
    if target.family == TypeFamily.VECTOR:
        return _to_vector_sql(value_sql, source, target)
    if source.duck == target.duck:
        return value_sql
    return f"TRY_CAST({value_sql} AS {target.duck})"


def _to_vector_sql(value_sql: str, source: SqlType, target: SqlType) -> str:
    """An ARRAY (VARIANT) cast to VECTOR as Snowflake casts it: exactly ``n`` numbers, none NULL,
    each fitting the element type; anything else is NULL here, reported as a conversion error
    (a wrong length is never truncated or padded)."""
    if source.family == TypeFamily.VECTOR:
        return value_sql if source.duck == target.duck else "NULL"
    if source.family != TypeFamily.VARIANT:
        return "NULL"  # Snowflake casts only an ARRAY (or a VECTOR) to a VECTOR
    dimension = vector_dimension(target.duck)
    element = target.duck.split("[")[0]
    numbers = f"TRY_CAST({value_sql} AS DOUBLE[])"
    elements = f"TRY_CAST({numbers} AS {element}[])"  # NULL elements where a number does not fit
    # DuckDB's CASE cannot return a fixed-size ARRAY: the checked LIST is cast after it.
    return (
        f"CAST((CASE WHEN json_type({value_sql}) = 'ARRAY' AND json_array_length({value_sql}) = {dimension} "
        f"AND len(list_filter(json_extract({value_sql}, '$[*]'), e -> json_type(e) NOT IN ('UBIGINT', 'BIGINT', 'DOUBLE'))) = 0 "
        f"AND list_count({elements}) = {dimension} "
        f"THEN {elements} END) AS {target.duck})"
    )


# Snowflake stores coordinates with 14 decimal places and rounds longer ones; the local Snowflake
# refuses them instead (stricter): a coordinate whose shortest text has more decimals, or an exponent.
_TOO_PRECISE_COORDINATE = r"\.[0-9]{15,}|[eE]-"


def geospatial_from_ewkb_hex_sql(text_sql: str, *, geography: bool) -> str:
    """TO_GEOMETRY / TO_GEOGRAPHY of (E)WKB hex text, as the local Snowflake's stored value.

    NULL (a conversion error) for anything Snowflake would refuse, or that the local Snowflake
    cannot read: not little-endian (E)WKB hex (WKT and GeoJSON are not read locally), Z or M
    coordinates (Snowflake's types are 2D), an invalid shape (ST_IsValid), a coordinate with more
    than 14 decimal places; for GEOGRAPHY also an SRID other than 4326 (WKB without one is 4326)
    and a longitude/latitude outside -180..180/-90..90. Needs DuckDB's spatial extension.
    """
    h = f"upper({text_sql})"
    # The type word's high byte (hex digits 9-10) holds EWKB's flags: 0x20 SRID, 0x40 M, 0x80 Z.
    flags = f"CAST('0x' || substr({h}, 9, 2) AS INTEGER)"
    # Its low bytes: the OGC type 1..7 (ISO Z/M codes such as 1001 are refused too).
    code = f"CAST('0x' || substr({h}, 7, 2) || substr({h}, 5, 2) || substr({h}, 3, 2) AS INTEGER)"
    srid_word = f"CAST('0x' || substr({h}, 17, 2) || substr({h}, 15, 2) || substr({h}, 13, 2) || substr({h}, 11, 2) AS BIGINT)"
    srid = f"(CASE WHEN {flags} = 32 THEN {srid_word} ELSE {4326 if geography else 0} END)"
    plain_hex = (
        f"(CASE WHEN {flags} = 32 THEN '01' || substr({h}, 3, 6) || '00' || substr({h}, 19) ELSE {h} END)"
    )
    shape = f"TRY(ST_GeomFromWKB(unhex({plain_hex})))"
    checks = [
        f"regexp_full_match({h}, '01([0-9A-F]{{2}}){{4,}}')",
        f"{flags} IN (0, 32)",
        f"{code} BETWEEN 1 AND 7",
        f"{srid} BETWEEN 0 AND 2147483647",
        f"{shape} IS NOT NULL",
        f"ST_IsValid({shape})",
        f"NOT regexp_matches(ST_AsText({shape}), '{_TOO_PRECISE_COORDINATE}')",
    ]
    if geography:
        checks += [
            f"{srid} = 4326",
            f"COALESCE(ST_XMin({shape}) >= -180 AND ST_XMax({shape}) <= 180 "
            f"AND ST_YMin({shape}) >= -90 AND ST_YMax({shape}) <= 90, TRUE)",
        ]
    field = "geography_srid" if geography else "geometry_srid"
    # Each check only runs when the ones before it held (CASE, not AND: DuckDB may reorder an AND).
    condition = "TRUE"
    for check in reversed(checks):
        condition = f"(CASE WHEN {check} THEN {condition} ELSE FALSE END)"
    return (
        f"(CASE WHEN {condition} THEN "
        f"struct_pack({field} := CAST({srid} AS INTEGER), wkb := unhex({plain_hex})) END)"
    )


@dataclass(frozen=True)
class CompiledExpr:
    """DuckDB SQL for one SELECT item, its result type, and the leaf it reads (for error checks)."""

    sql: str
    type: SqlType
    leaf_sql: str
    # A CSV field as read: text that still converts with the text rules, even into a VARIANT.
    is_raw_field: bool = False


TEXT = SqlType(TypeFamily.TEXT, "VARCHAR")


def compile_select_expr(
    node: SelectExpr,
    *,
    file_type: FileType,
    csv_columns: tuple[str, ...] = (),
    csv: CsvOptions | None = None,
    parquet_columns: dict[str, SqlType] | None = None,
) -> CompiledExpr:
    """Compile one SELECT item of a transforming COPY against the file's columns."""
    if isinstance(node, FieldRef):
        if file_type != FileType.CSV:
            raise CopySyntaxError(f'${node.position} needs a CSV file; read Parquet fields as $1:"name"')
        if node.position < 1:
            raise CopySyntaxError(f"${node.position} is not a field position")
        if node.position > len(csv_columns):
            # Snowflake reads a field past the end of the row as NULL.
            return CompiledExpr("CAST(NULL AS VARCHAR)", TEXT, "CAST(NULL AS VARCHAR)")
        field_sql = csv_field_sql(csv_columns[node.position - 1], csv or CsvOptions())
        return CompiledExpr(field_sql, TEXT, field_sql, is_raw_field=True)
    if isinstance(node, ParquetFieldRef):
        if file_type != FileType.PARQUET:
            raise CopySyntaxError(f'$1:"{node.name}" needs a Parquet file')
        columns = parquet_columns or {}
        if node.name not in columns:
            # Snowflake: a missing key of the VARIANT row is NULL.
            return CompiledExpr("CAST(NULL AS JSON)", SqlType(TypeFamily.VARIANT, "JSON"), "NULL")
        ref = duck_ident(node.name)
        return CompiledExpr(ref, columns[node.name], ref)
    inner = compile_select_expr(
        node.operand, file_type=file_type, csv_columns=csv_columns, csv=csv, parquet_columns=parquet_columns
    )
    if isinstance(node, CastTo):
        return CompiledExpr(
            value_to_type_sql(inner.sql, inner.type, node.target), node.target, inner.leaf_sql
        )
    if isinstance(node, ParseJson):
        variant = SqlType(TypeFamily.VARIANT, "JSON")
        text_sql = value_to_type_sql(inner.sql, inner.type, TEXT)
        return CompiledExpr(text_to_type_sql(text_sql, variant), variant, inner.leaf_sql)
    binary = SqlType(TypeFamily.BINARY, "BLOB")
    if inner.type.family == TypeFamily.BINARY:
        return CompiledExpr(inner.sql, binary, inner.leaf_sql)
    text_sql = value_to_type_sql(inner.sql, inner.type, TEXT)
    return CompiledExpr(text_to_type_sql(text_sql, binary), binary, inner.leaf_sql)


def convert_to_column_sql(compiled: CompiledExpr, column_type: SqlType) -> str:
    """The final, implicit conversion Snowflake applies when a value lands in a column."""
    if compiled.is_raw_field:
        # A raw CSV field converts with the text rules, into a VARIANT too.
        return text_to_type_sql(compiled.sql, column_type)
    return value_to_type_sql(compiled.sql, compiled.type, column_type)
