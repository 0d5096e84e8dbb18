"""pgsnow.load.columns_for_csv_header: a hand-dropped CSV's header matched to the table by name."""

from __future__ import annotations

import pytest

from pgsnow.errors import PermanentError
from pgsnow.keys import parse_data_key
from pgsnow.load.tables import columns_for_csv_header
from pgsnow.schema_evolution import ExistingColumn
from pgsnow.typemap import ValueKind

pytestmark = pytest.mark.unit

STAGED = parse_data_key("staging/public/orders/by hand.CSV.GZ", "staging")
TABLE = [
    ExistingColumn("ID", "NUMBER", 38, 0, None, nullable=False),
    ExistingColumn("NOTE", "TEXT", None, None, 16_777_216),
    ExistingColumn("AMOUNT", "NUMBER", 10, 2, None),
    ExistingColumn("Mixed Case", "VARIANT", None, None, None),
]


@pytest.mark.parametrize(
    ("header", "loaded"),
    [
        pytest.param(
            ["id", "note", "amount", "Mixed Case"], ["ID", "NOTE", "AMOUNT", "Mixed Case"], id="table-order"
        ),
        pytest.param(
            ["amount", "Mixed Case", "id"], ["AMOUNT", "Mixed Case", "ID"], id="another-order-some-left-out"
        ),
        pytest.param(["ID", "NOTE"], ["ID", "NOTE"], id="upper-case-names"),
    ],
)
def test_header_names_pick_the_columns_in_the_files_order(header: list[str], loaded: list[str]) -> None:
    columns = columns_for_csv_header(STAGED, header, TABLE)
    assert [c.snowflake_name for c in columns] == loaded
    assert [c.source_name for c in columns] == header
    by_name = {c.snowflake_name: c for c in columns}
    if "AMOUNT" in by_name:
        assert by_name["AMOUNT"].snowflake_type == "NUMBER(10,2)"  # not bare NUMBER: scale 0 would round
    if "Mixed Case" in by_name:
        assert by_name["Mixed Case"].kind is ValueKind.JSON


@pytest.mark.parametrize(
    ("header", "message"),
    [
        pytest.param(["id", "note", "colour"], "columns the table does not have: 'colour'", id="unknown"),
        pytest.param(["id", "mixed case"], "'mixed case'", id="case-the-policy-keeps-apart"),
        pytest.param(["id", "Note"], "'Note'", id="mixed-case-is-its-own-name"),
        pytest.param(["id", "note", "NOTE"], "column NOTE twice", id="named-twice"),
        pytest.param(["note", "amount"], "NOT NULL columns ID", id="not-null-left-out"),
    ],
)
def test_a_header_that_does_not_fit_is_refused_naming_the_columns(header: list[str], message: str) -> None:
    with pytest.raises(PermanentError) as refused:
        columns_for_csv_header(STAGED, header, TABLE)
    assert message in refused.value.message
    assert "nothing was loaded" in refused.value.message
    assert refused.value.s3_key == STAGED.key
