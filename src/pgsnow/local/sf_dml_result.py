"""DML results of the local Snowflake: an affected-row count is a number, zero when nothing changed.

fakesnow 0.11.14 counts a MERGE's rows with ``COUNT_IF`` over the join of target and source,
which DuckDB answers with NULL when that join is empty (a MERGE whose source is empty). Snowflake
answers ``number of rows inserted = 0`` (and so on), and the Python connector adds the counts of
a DML result up with ``int(...)``, so NULL made it raise ``TypeError`` in ``execute``. The local
server puts zeros in such a result before it is sent (``zero_null_row_counts``); every other
answer is sent untouched.
"""

from __future__ import annotations

from typing import Any

from fakesnow.statement_type import DML_TYPE_IDS

ROW_COUNT_PREFIX = "number of "  # "number of rows inserted", "number of multi-joined rows updated"
# What a JSON answer must contain to be a DML count at all (cheap test before parsing the body).
ROW_COUNT_MARKER = ROW_COUNT_PREFIX.encode()


def zero_null_row_counts(answer: dict[str, Any]) -> bool:
    """Replace NULL affected-row counts of a DML answer by ``"0"``; whether anything changed."""
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("statementTypeId") not in DML_TYPE_IDS:
        return False
    rowtype = data.get("rowtype") or []
    rowset = data.get("rowset")
    if data.get("queryResultFormat") != "json" or not isinstance(rowset, list):
        return False
    counts = [
        i for i, column in enumerate(rowtype) if str(column.get("name", "")).startswith(ROW_COUNT_PREFIX)
    ]
    changed = False
    for row in rowset:
        for i in counts:
            if i < len(row) and row[i] is None:
                row[i] = "0"
                changed = True
    return changed
