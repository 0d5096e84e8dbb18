"""Northwind and Chinook replicate through the whole local pipeline, cell for cell.

The datasets are read from ``../shared/datasets`` next to the repository, or from
``PGSNOW_DATASETS_DIR``. Each is loaded with ``psql -v ON_ERROR_STOP=1`` into a
fresh database; chinook.sql creates and switches to its own database, so those
lines are removed from a temporary copy first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dataset_support import dataset_script, load_sql_file

from pgsnow.demo.pipeline import list_schema_tables, run_demo
from pgsnow.local.postgres import create_database, start_local_postgres

pytestmark = pytest.mark.integration


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "file_format"),
    [
        pytest.param("northwind", "csv", id="northwind-csv"),
        pytest.param("chinook", "parquet", id="chinook-parquet"),
    ],
)
def test_dataset_replicates_cell_for_cell(name: str, file_format: str, tmp_path: Path) -> None:
    # Given the dataset loaded into a fresh database
    script = dataset_script(name)
    admin = start_local_postgres(environ={})
    dsn = create_database(admin.dsn, f"pgsnow_test_{name}", drop_existing=True)
    load_sql_file(dsn, script, tmp_path)
    tables = list_schema_tables(dsn, "public")
    assert tables, f"{name} created no tables in schema public"

    # When every table of the schema goes through extractor -> S3 -> SQS -> loader -> cleanup
    results = run_demo(
        pg_dsn=dsn,
        tables=None,
        schema="public",
        file_format=file_format,
        data_dir=tmp_path / "stack",
        progress=None,
    )

    # Then every table arrives complete and identical
    assert [r.table for r in results] == tables
    failures = [f"{r.table}: {r.detail}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert all(r.source_rows == r.snowflake_rows for r in results)
    assert sum(r.snowflake_rows for r in results) > 0
