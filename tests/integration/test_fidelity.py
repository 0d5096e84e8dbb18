"""Data fidelity: edge values round-trip cell-exact through the whole pipeline, or fail per policy.

extract -> S3 -> SQS -> loader handler -> Snowflake, then ``pgsnow verify``. The policies are
docs/type-mapping.md's: values Snowflake cannot hold fail the run under ``value_policy=fail``
(before anything is staged) and arrive as NULL under ``null``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from dataset_support import dataset_script, load_sql_file

from pgsnow.config import Component
from pgsnow.demo.compare import TableComparison, compare_table
from pgsnow.demo.pipeline import list_schema_tables
from pgsnow.errors import PermanentError
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import FileFormat
from pgsnow.local.postgres import create_database, start_local_postgres
from pgsnow.local.stack import SNOWFLAKE_DATABASE
from pgsnow.manifest import RunManifest
from pgsnow.postgres import connect
from pgsnow.verify import TableVerification, verify_table

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest.py
    from pipeline_support import PipelineHarness

pytestmark = pytest.mark.integration

# Reserved words and mixed case as column names; every kind of the type contract.
EDGE_COLUMNS = """
    "select" integer PRIMARY KEY,
    "MixedCase" text,
    "order" text,
    wide numeric(38, 6),
    unbounded numeric,
    ratio double precision,
    real_ratio real,
    flag boolean,
    born date,
    at_time time,
    local_ts timestamp,
    utc_ts timestamptz,
    doc jsonb,
    plain_json json,
    nested integer[][],
    labels text[],
    blob bytea
"""

# Text: NULL vs '' vs the text \\N, quotes, delimiters, newlines, CR, trailing backslashes,
# U+2028/U+2029, tabs, non-BMP. Numbers: 38 digits, NaN and infinities (float only).
# Times: the DST edges of Europe/Berlin and America/New_York in UTC, year 1 and 9999.
EDGE_ROWS = r"""
VALUES
 (1, NULL, '', 1.5, 0.25, 'NaN', 'Infinity', true, '0001-01-01', '00:00:00', '2024-03-31 01:59:59.999999',
  '2024-03-31 00:59:59.999999+00', 'null', 'null', '{{1,2},{3,4}}', '{"a,b","c\"d",NULL,""}', '\x00ff00'),
 (2, '', NULL, -1.5, -0.000001, '-Infinity', '-Infinity', false, '9999-12-31', '23:59:59.999999',
  '2024-03-31 03:00:00', '2024-11-03 05:59:59.999999+00', '{"k": null}', '[1, "two", null]',
  '{{NULL,2},{3,NULL}}', '{}', '\x'),
 (3, E'\\N', E'trailing backslash\\', 12345678901234567890123456789012.123456, 1234567890123456.0123456789,
  1e308, 3.4e38, NULL, '2000-02-29', '12:30:00.5', '1970-01-01 00:00:00', '1969-12-31 23:59:59.999999+00',
  '{"nested": {"deep": [1, [2, [3]]]}, "unicode": "Zoë 🚀"}', '{"dup": 1}', NULL, '{"\\N",""}', '\x00'),
 (4, E'line1\nline2\r\nline3', E'tab\there, comma, "quote" ''single''', NULL, NULL, 5e-324, 1.17549435e-38,
  true, NULL, NULL, NULL, NULL, NULL, NULL, '{{1},{2}}', NULL, NULL),
 (5, E'sep\u2028line\u2029para', E'pipes | tildes ~N ~ and \\N', 0.000001, 99999999999999999999999999.9999999999,
  -0.0, -0.0, false, '2024-10-27', '01:02:03', '2024-10-27 02:30:00', '2024-10-27 01:00:00+00',
  '"just a string"', '"just a string"', '{{7,8},{9,10}}', '{"ünï","名前","🚀"}', '\x5c4e')
"""

# Values Snowflake cannot hold (docs/type-mapping.md): 40-digit numerics, numeric NaN,
# infinity timestamps, BC dates.
UNREPRESENTABLE_COLUMNS = "id integer PRIMARY KEY, big numeric, born date, at timestamptz, note text"
UNREPRESENTABLE_ROWS = """
VALUES
 (1, 1234567890123456789012345678901234567890, '2000-01-01', '2000-01-01 00:00:00+00', 'forty digits'),
 (2, 'NaN', '2000-01-01', '2000-01-01 00:00:00+00', 'numeric NaN'),
 (3, 1.25, '0044-03-15 BC', '2000-01-01 00:00:00+00', 'BC date'),
 (4, 1.25, '2000-01-01', 'infinity', 'infinity timestamp'),
 (5, 1.25, '2000-01-01', '2000-01-01 00:00:00+00', 'fine')
"""


@pytest.mark.slow
@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_edge_values_round_trip_cell_exact(pipeline: PipelineHarness, file_format: FileFormat) -> None:
    """Expected: every edge value arrives exactly (verify passes, five rows; the client-side
    cell-by-cell comparison agrees) and no delivery fails."""
    # Given the edge-values table
    table = pipeline.table(f"Edge Values {file_format.value}".replace(" ", "_"))
    pipeline.create_table(table, EDGE_COLUMNS, EDGE_ROWS.replace("{", "{{").replace("}", "}}"))

    # When it goes through the whole pipeline
    manifest = pipeline.extract(table, file_format)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()

    # Then every file loaded on its first delivery and verify finds the copy identical
    assert [f.file_format for f in manifest.files] == [file_format] * len(manifest.files)
    assert [d for d in recorder.deliveries if d.failed] == []
    result = pipeline.verify(table)
    assert result.ok, result.summary()
    assert (result.source_rows, result.target_rows) == (5, 5)
    # and every cell compares equal read back through the connector (exact floats, parsed JSON)
    cells = pipeline.compare_cells(table)
    assert cells.ok, cells.detail
    assert (cells.source_rows, cells.snowflake_rows) == (5, 5)


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_unrepresentable_values_fail_under_the_fail_policy_before_staging(
    pipeline: PipelineHarness, file_format: FileFormat
) -> None:
    """Expected (value_policy=fail, the default): the run fails with a PermanentError naming a
    column, and no data file is staged."""
    table = pipeline.table(f"unrepresentable_fail_{file_format.value}")
    pipeline.create_table(table, UNREPRESENTABLE_COLUMNS, UNREPRESENTABLE_ROWS)

    with pytest.raises(PermanentError) as refused:
        pipeline.extract(table, file_format)

    assert refused.value.table == table.qualified
    listed = pipeline.s3().list_objects_v2(
        Bucket=pipeline.bucket, Prefix=f"{pipeline.prefix}/{table.schema}/{table.table}/"
    )
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
def test_unrepresentable_values_arrive_as_null_under_the_null_policy(
    pipeline: PipelineHarness, file_format: FileFormat
) -> None:
    """Expected (value_policy=null): the run loads; the rows holding an unrepresentable value hold
    NULL in that cell, and verify names each of them as different, key by key (the ``infinity``
    timestamp too: verify gives values outside Snowflake's calendar a text of their own)."""
    table = pipeline.table(f"unrepresentable_null_{file_format.value}")
    pipeline.create_table(table, UNREPRESENTABLE_COLUMNS, UNREPRESENTABLE_ROWS)
    options = json.dumps({table.qualified: {"value_policy": "null"}})

    pipeline.extract(table, file_format, PGSNOW_TABLE_OPTIONS=options)
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()

    assert [d for d in recorder.deliveries if d.failed] == []
    nulls = {row[0]: row[1:4] for row in pipeline.target_rows(table)}
    assert nulls[1][0] is None and nulls[2][0] is None
    result = pipeline.verify(table)
    assert not result.ok
    assert nulls[4][2] is None
    assert sorted(result.different) == ["1", "2", "3", "4"]
    assert result.missing == result.extra == []


# ----------------------------------------------------------------------------- third-party datasets
#
# Northwind and Chinook (read from ../shared/datasets or PGSNOW_DATASETS_DIR; not shipped with
# pgsnow) are loaded once per module into their own databases, then every table of each goes
# through the pipeline in both formats and in the merge and replace write modes. The targets are
# dropped before each case, so each case is a first load of its own. Each copy is checked by
# ``pgsnow verify``; the copies the demo itself makes of these datasets (a full run of a keyed
# table replaces by default) are checked by its cell-by-cell comparison too, on the same
# replication (they were once a module of their own that replicated the datasets again).

DATASET_SCHEMA = "public"
# (dataset, format, write mode) of the copies also compared cell by cell, as ``pgsnow demo
# --schema public`` compares them: Northwind in CSV, Chinook in Parquet. The comparison reads every
# cell back (a few seconds a dataset), so the other copies are left to verify.
COMPARED_CELL_BY_CELL = {("northwind", FileFormat.CSV, "replace"), ("chinook", FileFormat.PARQUET, "replace")}


@dataclass(frozen=True)
class LoadedDataset:
    dsn: str
    tables: list[TableRef]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LoadedDataset]]:
    """Each dataset loaded (once, lazily) into a fresh database ``pgsnow_fidelity_<name>``."""
    admin = start_local_postgres(environ={})

    class _Loader(dict[str, LoadedDataset]):
        def __missing__(self, name: str) -> LoadedDataset:
            script = dataset_script(name)  # skips with a clear message when the directory is absent
            dsn = create_database(admin.dsn, f"pgsnow_fidelity_{name}", drop_existing=True)
            load_sql_file(dsn, script, tmp_path_factory.mktemp(name))
            tables = list_schema_tables(dsn, DATASET_SCHEMA)
            assert tables, f"{name} created no tables in schema {DATASET_SCHEMA}"
            dataset = LoadedDataset(dsn, tables)
            self[name] = dataset
            return dataset

    try:
        yield _Loader()
    finally:
        admin.stop()


def _drop_targets(pipeline: PipelineHarness, tables: list[TableRef]) -> None:
    with pipeline.sf_conn.cursor() as cur:
        for table in tables:
            target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
            cur.execute(f"DROP TABLE IF EXISTS {target}")


def _replicate(
    pipeline: PipelineHarness, dataset: LoadedDataset, file_format: FileFormat, write_mode: str
) -> list[RunManifest]:
    """Extract every table of ``dataset`` with ``write_mode``, then let the loader drain the queue."""
    options = json.dumps({t.qualified: {"write_mode": write_mode} for t in dataset.tables})
    settings = pipeline.settings(Component.EXTRACTOR, PGSNOW_TABLE_OPTIONS=options)
    manifests: list[RunManifest] = []
    pg_conn = connect(dataset.dsn)
    try:
        for table in dataset.tables:
            manifests.append(
                extract_table(
                    settings=settings,
                    pg_conn=pg_conn,
                    s3=pipeline.function_s3(Component.EXTRACTOR),
                    table=table,
                    file_format=file_format,
                )
            )
    finally:
        pg_conn.close()
    recorder, dispatcher = pipeline.loader()
    dispatcher.run_until_idle()
    assert [d.s3_keys() for d in recorder.deliveries if d.failed] == []
    return manifests


def _verify_all(pipeline: PipelineHarness, dataset: LoadedDataset) -> list[TableVerification]:
    pg_conn = connect(dataset.dsn)
    try:
        return [verify_table(pg_conn, pipeline.sf_conn, t, SNOWFLAKE_DATABASE) for t in dataset.tables]
    finally:
        pg_conn.close()


def _compare_all(pipeline: PipelineHarness, dataset: LoadedDataset) -> list[TableComparison]:
    """The demo's cell-by-cell comparison of every table (exact floats, the first differing cell)."""
    pg_conn = connect(dataset.dsn)
    try:
        return [compare_table(pg_conn, pipeline.sf_conn, t, SNOWFLAKE_DATABASE) for t in dataset.tables]
    finally:
        pg_conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("write_mode", ["merge", "replace"])
@pytest.mark.parametrize("file_format", [FileFormat.CSV, FileFormat.PARQUET], ids=["csv", "parquet"])
@pytest.mark.parametrize(
    "name",
    [
        "northwind",
        "chinook",
    ],
)
def test_dataset_replicates_and_verify_passes_for_every_table(
    pipeline: PipelineHarness,
    datasets: dict[str, LoadedDataset],
    name: str,
    file_format: FileFormat,
    write_mode: str,
) -> None:
    """Expected: every table of the dataset arrives with every row (verify passes per table; in
    the demo's copies every cell compares equal read back through the connector too), in the
    format and write mode asked for, with no failed delivery."""
    # Given the dataset in PostgreSQL and none of its tables in Snowflake
    dataset = datasets[name]
    _drop_targets(pipeline, dataset.tables)

    # When every table is extracted with the write mode and the loader drains the queue
    manifests = _replicate(pipeline, dataset, file_format, write_mode)

    # Then each run used that format and mode, and verify finds every table identical
    assert {m.write_mode for m in manifests} == {write_mode}
    assert {f.file_format for m in manifests for f in m.files} == {file_format}
    results = _verify_all(pipeline, dataset)
    failures = [r.summary() for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert all(r.keyed for r in results), "every table of these datasets has a primary key"
    assert sum(r.source_rows for r in results) > 0
    if (name, file_format, write_mode) not in COMPARED_CELL_BY_CELL:
        return
    # and in the demo's copies every cell of every table compares equal read back through the connector
    cells = _compare_all(pipeline, dataset)
    assert [c.table for c in cells] == dataset.tables
    mismatches = [f"{c.table}: {c.detail}" for c in cells if not c.ok]
    assert not mismatches, "\n".join(mismatches)
    assert (
        [c.source_rows for c in cells]
        == [c.snowflake_rows for c in cells]
        == [r.source_rows for r in results]
    )
