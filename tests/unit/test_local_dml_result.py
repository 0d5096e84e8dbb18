"""The local Snowflake's DML answers: NULL row counts become zeros, nothing else changes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fakesnow.statement_type import DELETE, MERGE, SELECT

from pgsnow.local.sf_dml_result import zero_null_row_counts

pytestmark = pytest.mark.unit


def answer(
    type_id: int, names: list[str], rows: list[list[Any]], result_format: str = "json"
) -> dict[str, Any]:
    return {
        "data": {
            "statementTypeId": type_id,
            "rowtype": [{"name": n, "type": "fixed", "nullable": True} for n in names],
            "queryResultFormat": result_format,
            "rowset": rows,
        },
        "success": True,
    }


def test_an_empty_merge_reports_zeros() -> None:
    given = answer(MERGE, ["number of rows inserted", "number of rows updated"], [[None, None]])

    assert zero_null_row_counts(given) is True
    assert given["data"]["rowset"] == [["0", "0"]]


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(answer(MERGE, ["number of rows inserted"], [["3"]]), id="counted-merge"),
        pytest.param(answer(DELETE, ["number of rows deleted"], [["0"]]), id="delete"),
        pytest.param(answer(SELECT, ["number of rows inserted"], [[None]]), id="a-select-aliased-so"),
        pytest.param(answer(MERGE, ["number of rows inserted"], [], result_format="arrow"), id="arrow"),
        pytest.param({"data": None, "success": False, "message": "number of rows"}, id="an-error"),
    ],
)
def test_other_answers_are_untouched(given: dict[str, Any]) -> None:
    before = copy.deepcopy(given)

    assert zero_null_row_counts(given) is False
    assert given == before
