"""Hand-dropped files (no pgsnow run): matched to the table by column name, any extension case.

Each case replicates a table with pgsnow (so the Snowflake table exists, NOT NULL where the
source is), then uploads a file by hand under the table's prefix through the local stack: the
real S3 notification reaches the queue and the loader handler. A CSV loads by its header's
names (any order, any case the naming policy maps to the column); a name the table does not
have, or a NOT NULL column left out, is refused naming it, dead-lettered, and loads nothing.
"""

from __future__ import annotations

import gzip
import io
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgsnow.config import Component
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import parse_data_key
from pgsnow.load.batch import load_staged_files

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

COLUMNS = "id integer PRIMARY KEY, note text, amount numeric(10,2), code text NOT NULL"
FIRST_ROWS = [(1, "one", "1.50", "c1")]


def replicated_table(pipeline: PipelineHarness, name: str) -> TableRef:
    table = pipeline.table(f"{name}_{uuid.uuid4().hex[:6]}")
    pipeline.create_table(table, COLUMNS, "VALUES (1, 'one', 1.5, 'c1')")
    pipeline.extract(table)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    assert [d for d in recorder.deliveries if d.failed] == []
    return table


def rows(pipeline: PipelineHarness, table: TableRef) -> list[tuple[Any, ...]]:
    return [
        (row[0], row[1], None if row[2] is None else str(row[2]), row[3])
        for row in pipeline.target_rows(table, '"ID"')
    ]


def drop_file(pipeline: PipelineHarness, table: TableRef, file_name: str, body: bytes) -> tuple[str, Any]:
    """Upload ``body`` by hand under the table's prefix and deliver the notifications S3 sends."""
    key = f"{pipeline.prefix}/{table.schema}/{table.table}/{file_name}"
    pipeline.s3().put_object(Bucket=pipeline.bucket, Key=key, Body=body)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    return key, recorder


@pytest.mark.parametrize(
    ("file_name", "text", "loaded"),
    [
        pytest.param(
            "reordered.csv.gz",
            "code,amount,id,note\nc2,2.25,2,two\n",
            [(2, "two", "2.25", "c2")],
            id="header-in-another-order",
        ),
        pytest.param(
            "UPPER CASE NAMES.CSV.GZ",
            "NOTE,ID,CODE,AMOUNT\ntwo,2,c2,2.25\n",
            [(2, "two", "2.25", "c2")],
            id="upper-case-header-and-extension",
        ),
        pytest.param(
            "Mixed.Csv",
            "\ufeffid,code\n2,c2\n",
            [(2, None, None, "c2")],
            id="nullable-columns-left-out-load-as-null-byte-order-mark-ignored",
        ),
    ],
)
def test_a_csv_loads_by_its_header_names(
    pipeline: PipelineHarness, file_name: str, text: str, loaded: list[tuple[Any, ...]]
) -> None:
    # Given a replicated table
    table = replicated_table(pipeline, "by_name")

    # When a CSV is dropped by hand under its prefix
    body = gzip.compress(text.encode(), mtime=0) if file_name.lower().endswith(".gz") else text.encode()
    key, recorder = drop_file(pipeline, table, file_name, body)

    # Then the S3 notification reached the loader, and each value is in the column its header names
    assert [(d.receive_count, d.failed) for d in recorder.for_key(key)] == [(1, False)]
    assert rows(pipeline, table) == [*FIRST_ROWS, *loaded]
    assert key in pipeline.ledger_keys(table)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param("id,note,amount,code,extra\n2,two,2.25,c2,x\n", "'extra'", id="unknown-column"),
        pytest.param("id,note,Amount,code\n2,two,2.25,c2\n", "'Amount'", id="name-the-policy-does-not-map"),
        pytest.param("id,note,amount\n2,two,2.25\n", "NOT NULL columns CODE", id="not-null-column-left-out"),
    ],
)
def test_a_csv_whose_header_does_not_fit_is_refused_naming_the_columns(
    pipeline: PipelineHarness, text: str, named: str
) -> None:
    # Given a replicated table
    table = replicated_table(pipeline, "refused")

    # When a CSV whose header does not fit the table is dropped by hand
    key, recorder = drop_file(pipeline, table, "bad header.csv.gz", gzip.compress(text.encode(), mtime=0))

    # Then every delivery failed and it was dead-lettered; nothing loaded, nothing recorded
    deliveries = recorder.for_key(key)
    assert deliveries and all(d.failed for d in deliveries)
    assert key in pipeline.dead_letter_keys()
    assert rows(pipeline, table) == FIRST_ROWS
    assert key not in pipeline.ledger_keys(table)


def test_the_refusal_names_the_unknown_columns(pipeline: PipelineHarness) -> None:
    """The error the loader reports (and logs) names what is wrong, not a COPY failure."""
    table = replicated_table(pipeline, "message")
    key = f"{pipeline.prefix}/{table.schema}/{table.table}/extra.csv"
    pipeline.s3().put_object(Bucket=pipeline.bucket, Key=key, Body=b"ID,colour,size,code\n2,red,L,c2\n")
    pipeline.receive_notifications(table, 1)
    with pytest.raises(PermanentError) as refused:
        load_staged_files(
            settings=pipeline.settings(Component.LOADER),
            sf_conn=pipeline.sf_conn,
            s3=pipeline.function_s3(Component.LOADER),
            objects=[parse_data_key(key, pipeline.prefix)],
        )
    assert "'colour', 'size'" in refused.value.message
    assert "nothing was loaded" in refused.value.message
    assert refused.value.s3_key == key


def test_a_parquet_file_with_an_upper_case_extension_loads_by_name(pipeline: PipelineHarness) -> None:
    # Given a replicated table, and a Parquet file whose columns are in another order
    table = replicated_table(pipeline, "parquet")
    data = pa.table(
        {
            "code": ["c2"],
            "id": pa.array([2], pa.int32()),
            "amount": pa.array([Decimal("2.25")], pa.decimal128(10, 2)),
            "note": ["two"],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(data, buffer)

    # When it is dropped by hand as PART-0.PARQUET
    key, recorder = drop_file(pipeline, table, "PART-0.PARQUET", buffer.getvalue())

    # Then it loaded once, each value in its column
    assert [(d.receive_count, d.failed) for d in recorder.for_key(key)] == [(1, False)]
    assert rows(pipeline, table) == [*FIRST_ROWS, (2, "two", "2.25", "c2")]


def test_an_object_that_is_not_a_data_file_is_ignored(pipeline: PipelineHarness) -> None:
    # Given a replicated table
    table = replicated_table(pipeline, "ignored")

    # When a file that is not a data file lands under its prefix (the notification covers it)
    key, recorder = drop_file(pipeline, table, "README.txt", b"exported by hand\n")

    # Then the loader acknowledged it without loading anything or dead-lettering it
    assert [(d.receive_count, d.failed) for d in recorder.for_key(key)] == [(1, False)]
    assert key not in pipeline.dead_letter_keys()
    assert rows(pipeline, table) == FIRST_ROWS
