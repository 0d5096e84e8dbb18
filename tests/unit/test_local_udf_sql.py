"""The local Snowflake's CREATE FUNCTION parsing and call rewriting (pgsnow.local.sf_udf), as text.

tests/integration/test_verify_json.py runs these through the real connector; here each shape
the local Snowflake accepts or refuses is pinned down without a server.
"""

from __future__ import annotations

import pytest

from pgsnow.local.sf_udf import SessionFunctions, UdfError, parse_create_function
from pgsnow.verify import sf_create_json_function

pytestmark = pytest.mark.unit


def test_verify_s_udf_statement_parses_as_a_temporary_strict_python_function() -> None:
    statement = parse_create_function(sf_create_json_function("DB", "PGSNOW"))
    assert statement is not None
    assert statement.parts == ("DB", "PGSNOW", "PGSNOW_CANONICAL_JSON")
    assert statement.argument_types == ("VARCHAR",)
    assert statement.return_type == "VARCHAR"
    assert (statement.language, statement.handler) == ("PYTHON", "canonical_json")
    assert statement.temporary and statement.replace and statement.strict and statement.immutable
    assert "def canonical_json(" in statement.body


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("SELECT 1", id="select"),
        pytest.param("CREATE TABLE f (x VARCHAR)", id="create-table"),
        pytest.param("CREATE STAGE s URL = 's3://b/p'", id="create-stage"),
    ],
)
def test_other_statements_are_not_functions(text: str) -> None:
    assert parse_create_function(text) is None


def test_called_on_null_input_and_quoted_names() -> None:
    statement = parse_create_function(
        'CREATE TEMP FUNCTION "My Db".s."f x"(A NUMBER(38, 0), B VARCHAR(10)) RETURNS FLOAT '
        "LANGUAGE PYTHON CALLED ON NULL INPUT RUNTIME_VERSION = '3.11' HANDLER = 'h' AS $$def h(a, b): return 1.0$$"
    )
    assert statement is not None
    assert statement.parts == ("My Db", "S", "f x")
    assert statement.argument_types == ("NUMBER", "VARCHAR")
    assert not statement.strict and not statement.replace


def test_packages_are_refused_rather_than_ignored() -> None:
    with pytest.raises(UdfError, match="PACKAGES"):
        parse_create_function(
            "CREATE TEMPORARY FUNCTION f(x VARCHAR) RETURNS VARCHAR LANGUAGE PYTHON RUNTIME_VERSION = '3.11' "
            "PACKAGES = ('numpy') HANDLER = 'f' AS $$def f(x): return x$$"
        )


def test_calls_to_a_session_function_are_rewritten_by_any_spelling_of_its_name() -> None:
    functions = SessionFunctions(names={("DB", "PGSNOW", "F"): "PGSNOW_UDF_1_F"})
    rewritten = functions.rewrite_calls(
        'SELECT "DB"."PGSNOW"."F"(a), db.pgsnow.f (b), PGSNOW.F(c), F(d), G(e), "DB"."OTHER"."F"(f) FROM t',
        "DB",
        "PGSNOW",
    )
    assert rewritten == (
        'SELECT PGSNOW_UDF_1_F(a), PGSNOW_UDF_1_F(b), PGSNOW_UDF_1_F(c), PGSNOW_UDF_1_F(d), G(e), "DB"."OTHER"."F"(f) FROM t'
    )


def test_without_a_current_schema_only_qualified_calls_are_rewritten() -> None:
    functions = SessionFunctions(names={("DB", "PGSNOW", "F"): "PGSNOW_UDF_1_F"})
    assert (
        functions.rewrite_calls("SELECT F(x), DB.PGSNOW.F(y)", None, None) == "SELECT F(x), PGSNOW_UDF_1_F(y)"
    )
