"""Parsing and translation of the SQL the local Snowflake runs itself, asserted as text."""

from __future__ import annotations

import duckdb
import pytest

from pgsnow.local.sf_copy_sql import (
    CastTo,
    CopySyntaxError,
    CsvOptions,
    FieldRef,
    FileType,
    MatchByColumnName,
    ObjectName,
    OnError,
    ParquetFieldRef,
    ParseJson,
    SqlType,
    StageSource,
    ToBinaryHex,
    TypeFamily,
    UrlSource,
    compile_select_expr,
    convert_to_column_sql,
    csv_field_sql,
    csv_reader_sql,
    duck_type,
    parse_copy,
    parse_stage_reference,
    text_to_type_sql,
)
from pgsnow.local.sf_session_sql import (
    DropStage,
    SessionParameterChange,
    ShowStages,
    parse_alter_session,
    parse_create_stage,
    parse_drop_stage,
    parse_show_parameters,
    parse_show_stages,
)
from pgsnow.local.sf_table_sql import TableDdl, parse_table_ddl

pytestmark = pytest.mark.unit

LOADER_COPY = """COPY INTO "DB"."PUBLIC"."ORDERS" ("ORDER_ID", "PAYLOAD", "RAW")
  FROM (SELECT $1, PARSE_JSON($2), TO_BINARY($3, 'HEX') FROM @"DB"."PGSNOW"."PGSNOW_STAGE"/public/orders/)
  FILES = ('public_orders_batch1_20261125T120000000000Z.csv.gz')
  FILE_FORMAT = (TYPE = CSV COMPRESSION = GZIP FIELD_DELIMITER = ',' SKIP_HEADER = 1
                 FIELD_OPTIONALLY_ENCLOSED_BY = '"' ESCAPE_UNENCLOSED_FIELD = NONE
                 NULL_IF = () EMPTY_FIELD_AS_NULL = TRUE)
  ON_ERROR = ABORT_STATEMENT FORCE = TRUE"""

NUMBER_38_0 = SqlType(TypeFamily.NUMBER, "DECIMAL(38,0)")


def test_the_loaders_csv_copy_parses_completely() -> None:
    statement = parse_copy(LOADER_COPY)

    assert statement is not None
    assert statement.table == ObjectName(("DB", "PUBLIC", "ORDERS"))
    assert statement.columns == ("ORDER_ID", "PAYLOAD", "RAW")
    assert statement.source == StageSource(ObjectName(("DB", "PGSNOW", "PGSNOW_STAGE")), "public/orders/")
    assert statement.select == (FieldRef(1), ParseJson(FieldRef(2)), ToBinaryHex(FieldRef(3)))
    assert statement.files == ("public_orders_batch1_20261125T120000000000Z.csv.gz",)
    assert statement.file_type == FileType.CSV
    assert statement.csv == CsvOptions(
        compression="GZIP",
        field_delimiter=",",
        skip_header=1,
        field_optionally_enclosed_by='"',
        escape_unenclosed_field=None,
        null_if=(),
        empty_field_as_null=True,
    )
    assert statement.on_error == OnError.ABORT_STATEMENT
    assert statement.force is True


def test_the_loaders_parquet_copy_parses_casts_and_field_names() -> None:
    statement = parse_copy(
        'COPY INTO t FROM (SELECT $1:"order_id"::NUMBER(38,0), PARSE_JSON($1:"payload"::VARCHAR), '
        "$1:\"Mixed Name\" FROM @st/sub/) FILES = ('a.parquet') FILE_FORMAT = (TYPE = PARQUET)"
    )

    assert statement is not None
    assert statement.table == ObjectName(("T",))
    assert statement.file_type == FileType.PARQUET
    assert statement.select == (
        CastTo(ParquetFieldRef("order_id"), NUMBER_38_0),
        ParseJson(CastTo(ParquetFieldRef("payload"), SqlType(TypeFamily.TEXT, "VARCHAR"))),
        ParquetFieldRef("Mixed Name"),
    )


@pytest.mark.parametrize(
    ("sql", "source", "match_by"),
    [
        pytest.param(
            "COPY INTO t FROM 's3://bkt/p/' FILE_FORMAT = (TYPE = PARQUET) MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE",
            UrlSource("s3://bkt/p/"),
            MatchByColumnName.CASE_INSENSITIVE,
            id="url-parquet-match-by-name",
        ),
        pytest.param(
            "COPY INTO t FROM @s.st/a/b/ FILES = ('x.csv') FILE_FORMAT = (TYPE = CSV)",
            StageSource(ObjectName(("S", "ST")), "a/b/"),
            MatchByColumnName.NONE,
            id="stage-sub-path-csv",
        ),
    ],
)
def test_plain_copy_forms(sql: str, source: object, match_by: MatchByColumnName) -> None:
    statement = parse_copy(sql)

    assert statement is not None
    assert statement.source == source
    assert statement.select is None
    assert statement.match_by_column_name == match_by


@pytest.mark.parametrize(
    ("sql", "expected_null_if"),
    [
        pytest.param("FILE_FORMAT = (TYPE = CSV)", ("\\N",), id="default-is-backslash-n"),
        pytest.param("FILE_FORMAT = (TYPE = CSV NULL_IF = ())", (), id="empty"),
        pytest.param("FILE_FORMAT = (TYPE = CSV NULL_IF = ('NULL', ''))", ("NULL", ""), id="list"),
    ],
)
def test_null_if(sql: str, expected_null_if: tuple[str, ...]) -> None:
    statement = parse_copy(f"COPY INTO t FROM @st {sql}")

    assert statement is not None
    assert statement.csv.null_if == expected_null_if


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("COPY INTO t FROM @st FILE_FORMAT = (FORMAT_NAME = 'f')", id="named-file-format"),
        pytest.param("COPY INTO t FROM @st PURGE = TRUE", id="purge"),
        pytest.param("COPY INTO t FROM (SELECT UPPER($1) FROM @st)", id="unsupported-transformation"),
        pytest.param("COPY INTO t FROM @st FILE_FORMAT = (TYPE = JSON)", id="json-files"),
    ],
)
def test_shapes_we_cannot_run_faithfully_are_rejected(sql: str) -> None:
    with pytest.raises(CopySyntaxError):
        parse_copy(sql)


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("SELECT 1", id="select"),
        pytest.param("COPY INTO @st FROM t", id="unload"),
        pytest.param("INSERT INTO t VALUES (1)", id="insert"),
    ],
)
def test_other_statements_are_not_ours(sql: str) -> None:
    assert parse_copy(sql) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("@st", StageSource(ObjectName(("ST",)), ""), id="bare"),
        pytest.param('@"My Stage"/x/', StageSource(ObjectName(("My Stage",)), "x/"), id="quoted-with-space"),
        pytest.param(
            '@db."S.x"."a""b"/p/q.csv',
            StageSource(ObjectName(("DB", "S.x", 'a"b')), "p/q.csv"),
            id="dots-and-quotes",
        ),
    ],
)
def test_stage_references(text: str, expected: StageSource) -> None:
    assert parse_stage_reference(text) == expected


def test_csv_reader_reads_text_only_and_keeps_quoted_empty_strings() -> None:
    sql = csv_reader_sql(
        "s3://b/k.csv.gz", CsvOptions(compression="GZIP", skip_header=1, field_optionally_enclosed_by='"')
    )

    assert sql == (
        "read_csv('s3://b/k.csv.gz', all_varchar = true, header = false, skip = 1, delim = ',', quote = '\"', "
        "escape = '\"', allow_quoted_nulls = false, nullstr = '', compression = 'gzip', new_line = '\\n', "
        "max_line_size = 272629760, buffer_size = 272629760)"
    )


def test_csv_reader_without_empty_field_as_null_never_makes_nulls() -> None:
    sql = csv_reader_sql("s3://b/k'1.csv", CsvOptions(empty_field_as_null=False))

    assert "'s3://b/k''1.csv'" in sql
    assert "nullstr = '\x01pgsnow-not-null\x01'" in sql
    assert "quote = ''" in sql


@pytest.mark.parametrize(
    ("null_if", "expected"),
    [
        pytest.param((), '"column1"', id="none"),
        pytest.param(
            ("\\N", "x'y"),
            "(CASE WHEN \"column1\" IN ('\\N', 'x''y') THEN NULL ELSE \"column1\" END)",
            id="two",
        ),
    ],
)
def test_null_if_applies_to_the_field_text(null_if: tuple[str, ...], expected: str) -> None:
    assert csv_field_sql("column1", CsvOptions(null_if=null_if)) == expected


# The conversions are DuckDB SQL text; running them on an in-memory DuckDB checks what the text means.
@pytest.mark.parametrize(
    ("text", "duck", "expected"),
    [
        pytest.param(
            "12345678901234567890.0123456789",
            "DECIMAL(38,10)",
            "12345678901234567890.0123456789",
            id="decimal-exact",
        ),
        pytest.param("abc", "DECIMAL(38,10)", None, id="decimal-bad"),
        pytest.param("-inf", "DOUBLE", "-inf", id="float-inf"),
        pytest.param("yes", "BOOLEAN", "true", id="boolean-yes"),
        pytest.param("maybe", "BOOLEAN", None, id="boolean-bad"),
        pytest.param('{"a": 1}', "JSON", '{"a": 1}', id="json"),
        pytest.param("{bad", "JSON", None, id="json-bad"),
        pytest.param("00ff", "BLOB", "\\x00\\xFF", id="hex"),
        pytest.param("0g", "BLOB", None, id="hex-bad"),
        pytest.param(
            "2024-01-01T10:00:00+02:00",
            "TIMESTAMP WITH TIME ZONE",
            "2024-01-01 08:00:00+00",
            id="timestamptz-offset",
        ),
    ],
)
def test_text_conversions(text: str, duck: str, expected: str | None) -> None:
    sql = text_to_type_sql("v", duck_type(duck))
    with duckdb.connect() as db:
        db.execute("SET TimeZone = 'UTC'")
        row = db.execute(f"SELECT CAST({sql} AS VARCHAR) FROM (SELECT ? AS v)", [text]).fetchone()

    assert row is not None
    assert row[0] == expected


def test_a_raw_csv_field_into_a_variant_column_is_parsed() -> None:
    compiled = compile_select_expr(
        FieldRef(1), file_type=FileType.CSV, csv_columns=("column0",), csv=CsvOptions(null_if=())
    )

    assert convert_to_column_sql(compiled, SqlType(TypeFamily.VARIANT, "JSON")) == (
        '(CASE WHEN json_valid("column0") THEN CAST("column0" AS JSON) END)'
    )


def test_a_parquet_string_into_a_variant_column_stays_a_string() -> None:
    compiled = compile_select_expr(
        ParquetFieldRef("p"),
        file_type=FileType.PARQUET,
        parquet_columns={"p": SqlType(TypeFamily.TEXT, "VARCHAR")},
    )

    assert convert_to_column_sql(compiled, SqlType(TypeFamily.VARIANT, "JSON")) == 'to_json("p")'


def test_a_field_past_the_end_of_the_row_is_null() -> None:
    compiled = compile_select_expr(FieldRef(3), file_type=FileType.CSV, csv_columns=("column0",))

    assert compiled.sql == "CAST(NULL AS VARCHAR)"


def test_create_stage_with_integration_and_credentials() -> None:
    stage = parse_create_stage(
        "CREATE OR REPLACE STAGE IF NOT EXISTS db.s.\"St\" URL = 's3://b/p/' STORAGE_INTEGRATION = si "
        "CREDENTIALS = (AWS_KEY_ID = 'a' AWS_SECRET_KEY = 'b') FILE_FORMAT = (TYPE = CSV)"
    )

    assert stage is not None
    assert stage.parts == ("DB", "S", "St")
    assert stage.url == "s3://b/p/"
    assert stage.replace and stage.if_not_exists
    # An unquoted integration name resolves to upper case, as Snowflake stores it (the
    # integration catalog is looked up by that name).
    assert stage.storage_integration == "SI"
    assert stage.credentials is not None
    assert (stage.credentials.key_id, stage.credentials.secret_key) == ("a", "b")
    assert repr(stage.credentials) == "AwsCredentials(key_id='a')"  # the secret is never printed


def test_an_internal_stage_is_left_to_fakesnow() -> None:
    assert parse_create_stage("CREATE STAGE st") is None


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param(
            "ALTER SESSION SET QUERY_TAG = 'x''y'", SessionParameterChange("QUERY_TAG", "x'y"), id="set"
        ),
        pytest.param("alter session unset query_tag", SessionParameterChange("QUERY_TAG", None), id="unset"),
        pytest.param("ALTER SESSION SET TIMEZONE = 'UTC'", None, id="other-parameter"),
        pytest.param("ALTER SESSION SET AUTOCOMMIT = FALSE", None, id="autocommit-stays-with-fakesnow"),
    ],
)
def test_alter_session(sql: str, expected: SessionParameterChange | None) -> None:
    assert parse_alter_session(sql) == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param(
            'CREATE OR REPLACE TRANSIENT TABLE "DB"."PGSNOW"."_PGSNOW_CHANGES_AB" ("A" NUMBER(38,0))',
            TableDdl(("DB", "PGSNOW", "_PGSNOW_CHANGES_AB"), created=True),
            id="work-table",
        ),
        pytest.param(
            "create table if not exists s.t (a int)",
            TableDdl(("S", "T"), created=True, if_not_exists=True),
            id="if-not-exists",
        ),
        pytest.param('CREATE TABLE "a""b" AS SELECT 1 AS x', TableDdl(('a"b',), created=True), id="ctas"),
        pytest.param(
            'DROP TABLE IF EXISTS "DB"."P"."T"', TableDdl(("DB", "P", "T"), created=False), id="drop"
        ),
        pytest.param("CREATE STAGE st", None, id="not-a-table"),
        pytest.param("SELECT * FROM t", None, id="not-ddl"),
    ],
)
def test_table_ddl(sql: str, expected: TableDdl | None) -> None:
    assert parse_table_ddl(sql) == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param(
            "ALTER SESSION SET LOCK_TIMEOUT = 300", SessionParameterChange("LOCK_TIMEOUT", "300"), id="set"
        ),
        pytest.param(
            "alter session unset lock_timeout", SessionParameterChange("LOCK_TIMEOUT", None), id="unset"
        ),
        pytest.param("ALTER SESSION SET LOCK_TIMEOUT = 1.5", None, id="not-whole-seconds"),
    ],
)
def test_alter_session_lock_timeout(sql: str, expected: SessionParameterChange | None) -> None:
    assert parse_alter_session(sql) == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param("SHOW PARAMETERS LIKE 'QUERY_TAG' IN SESSION", "QUERY_TAG", id="exact"),
        pytest.param("SHOW PARAMETERS LIKE 'LOCK_TIMEOUT' IN SESSION", "LOCK_TIMEOUT", id="lock-timeout"),
        pytest.param("show parameters like 'query%'", "query%", id="pattern"),
        pytest.param("SHOW PARAMETERS LIKE 'TIMEZONE'", None, id="not-ours"),
    ],
)
def test_show_parameters(sql: str, expected: str | None) -> None:
    assert parse_show_parameters(sql) == expected


def test_the_loaders_temporary_stage_parses_as_temporary() -> None:
    stage = parse_create_stage(
        'CREATE OR REPLACE TEMPORARY STAGE "DB"."PGSNOW"."PGSNOW_STAGE" URL = \'s3://b/staging/\' '
        "CREDENTIALS = (AWS_KEY_ID = 'a' AWS_SECRET_KEY = 'b' AWS_TOKEN = 't')"
    )

    assert stage is not None
    assert (stage.parts, stage.temporary, stage.replace) == (("DB", "PGSNOW", "PGSNOW_STAGE"), True, True)
    assert stage.credentials is not None and stage.credentials.token == "t"


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param("SHOW STAGES", ShowStages(None, None, ()), id="current-schema"),
        pytest.param("show stages in account", ShowStages(None, "ACCOUNT", ()), id="account"),
        pytest.param(
            "SHOW STAGES LIKE 'pg%' IN DATABASE db", ShowStages("pg%", "DATABASE", ("DB",)), id="database"
        ),
        pytest.param(
            'SHOW STAGES IN SCHEMA db."Ctl"', ShowStages(None, "SCHEMA", ("DB", "Ctl")), id="schema-quoted"
        ),
        pytest.param(
            "SHOW STAGES IN db.ctl", ShowStages(None, "SCHEMA", ("DB", "CTL")), id="schema-no-keyword"
        ),
        pytest.param("SHOW TABLES", None, id="other-objects"),
    ],
)
def test_show_stages(sql: str, expected: ShowStages | None) -> None:
    assert parse_show_stages(sql) == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param("DROP STAGE IF EXISTS db.s.st", DropStage(("DB", "S", "ST"), True), id="qualified"),
        pytest.param('drop stage "St"', DropStage(("St",), False), id="quoted"),
        pytest.param("DROP TABLE db.s.st", None, id="a-table"),
    ],
)
def test_drop_stage(sql: str, expected: DropStage | None) -> None:
    assert parse_drop_stage(sql) == expected
