"""The primary-key list of a run that tracks deletes: every key the source holds, for the
loader's delete detection (a control object under ``_pgsnow/keys``)."""

from __future__ import annotations

from psycopg2 import sql

from pgsnow.errors import PermanentError
from pgsnow.extract.state import ExtractionRun
from pgsnow.formats import CsvBatchSplitter, WrittenFile
from pgsnow.keys import FileFormat
from pgsnow.manifest import StagedFile
from pgsnow.postgres import TableSchema, csv_select


def stage_key_list(run: ExtractionRun) -> StagedFile:
    """Stage every primary key (CSV gzip, header) for the loader's delete detection."""
    schema = run.schema
    if not schema.primary_key:
        raise PermanentError(
            f"deletes={run.options.deletes.value} needs a primary key on {schema.table.qualified}",
            table=schema.table.qualified,
        )
    key_schema = TableSchema(
        schema.table, tuple(schema.column(k) for k in schema.primary_key), schema.primary_key, None
    )
    select, params = csv_select(key_schema)
    path = run.work_dir / "keys.csv.gz"
    writer: list[WrittenFile] = []
    splitter = CsvBatchSplitter(
        batch_rows=2**62, path_for_batch=lambda _: path, on_file=writer.append, first_batch=0
    )
    with run.pg_conn.cursor() as cur:
        inner = cur.mogrify(select, params or None).decode("utf-8")
        cur.copy_expert(
            sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true, ENCODING 'UTF8')").format(
                sql.SQL(inner)
            ),
            splitter,
        )
    splitter.finish()
    written = writer[0]
    key = run.store.put_key_list(run.table, run.run_id, path, rows=written.rows, sha256=written.sha256)
    path.unlink(missing_ok=True)
    return StagedFile(key, 0, written.rows, written.bytes, written.sha256, FileFormat.CSV)
