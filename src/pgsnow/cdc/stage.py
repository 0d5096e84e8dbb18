"""One table's spilled changes → staged change files, in the type contract.

A run's staged files must hold exactly what a full run would stage for the same values (the type
contract, docs/type-mapping.md). Two ways get there:

* **As spilled.** The reader writes the values of tables whose every column is of a common
  built-in type in the staged encoding as they arrive (``pgsnow.cdc.staged_text``, which refuses
  any value the contract would not stage as it is). When every segment of the table's run is such
  a spill, in one column list, and the run stages CSV without a row cap, the files are the spill
  itself behind the header, compressed, cut at the row boundaries the reader recorded once a file
  reaches EXTRACT_TARGET_FILE_MB (``pgsnow.cdc.spilled_csv``, which can start compressing while
  the slot is still being read: ``early``). No value is converted twice.
* **The round trip through PostgreSQL**, for everything else (Parquet, EXTRACT_BATCH_ROWS, other
  types, a refused value, a column list that changed mid-run): the segments are COPYed into a
  TEMP table of the newest relation's column types (``format_type(type_oid, type_modifier)``, as
  pgoutput described them), after the change columns (``pgsnow.changes.CHANGE_COLUMNS``), and read
  back out with the extractor's own select builders (``csv_select`` / ``arrow_csv_select``
  through ``TableReader``), the table's value policy and ``check_values_fit``, in
  ``(_pgsnow_lsn, _pgsnow_seq)`` order (the order they were COPYed in: one sequential scan of the
  temp heap, no sort). Values spilled in staged text are PostgreSQL input as they are, except
  bytea's bare hex, which is read as text and decoded (``_insert_segment``).

Either way the temp table is created, so the columns are described (``describe_table``) the same
way, and the files are written locally (all of them, so every key, row count and checksum is
known before the manifest is written) and uploaded afterwards by ``upload_files``, except those
whose parts went up while they were compressed early, which ``upload_files`` only completes. The tests
compare the two ways on a real slot (tests/integration/cdc/test_staged_text.py).

The temp table lives in one transaction of a read-write connection (``connect_for_staging``) and
is dropped at its end (``ON COMMIT DROP``, and the transaction is rolled back): nothing is written
to the source database but a temp table's pages.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from pgsnow.cdc.spilled_csv import EarlyCompression, write_spilled_csv
from pgsnow.cdc.staged_text import header_line, is_bytea, kinds_agree
from pgsnow.changes import (
    CHANGE_COLUMN_TYPES,
    CHANGE_COLUMNS,
    LSN_COLUMN,
    OP_COLUMN,
    SEQ_COLUMN,
    UNCHANGED_COLUMN,
    unchanged_text,
)
from pgsnow.config import ValuePolicy
from pgsnow.errors import PermanentError
from pgsnow.formats import CsvBatchSplitter, ParquetWriter, WrittenFile, open_arrow_csv
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key
from pgsnow.manifest import Column, StagedFile
from pgsnow.observability import logger
from pgsnow.postgres import (
    Connection,
    RowRange,
    TableReader,
    TableSchema,
    check_values_fit,
    choose_numeric_scales,
    classify_pg_error,
    connect,
    describe_table,
)
from pgsnow.streamed_upload import StreamedUpload

# Parquet row groups: rows and Arrow bytes held before a group is written (as the full runs' path).
PARQUET_GROUP_ROWS = 20_000
PARQUET_GROUP_BYTES = 64 * 1024 * 1024
# Without EXTRACT_BATCH_ROWS a file is cut by size alone.
NO_ROW_CAP = 2**62
ORDER_KEY = (LSN_COLUMN, SEQ_COLUMN)
STAGING_TEMP_BUFFERS = "64MB"  # the staging session's local buffers (``connect_for_staging``)


class SpilledColumn(Protocol):
    """A relation column as pgoutput described it (``pgsnow.cdc.protocol.RelationColumn``)."""

    @property
    def name(self) -> str: ...
    @property
    def type_oid(self) -> int: ...
    @property
    def type_modifier(self) -> int: ...
    @property
    def is_key(self) -> bool: ...


class SpilledRelation(Protocol):
    @property
    def columns(self) -> Sequence[SpilledColumn]: ...


class SpilledSegment(Protocol):
    """What staging needs of a ``pgsnow.cdc.reader.SpilledChanges`` (one table, one relation shape)."""

    @property
    def table(self) -> TableRef: ...
    @property
    def relation(self) -> SpilledRelation: ...
    @property
    def path(self) -> Path: ...
    @property
    def rows(self) -> int: ...
    @property
    def staged_text(self) -> bool: ...
    @property
    def cuts(self) -> Sequence[tuple[int, int]]: ...


@dataclass(frozen=True)
class LocalChangeFile:
    """A finished local change file and the key it is uploaded to."""

    key: str
    written: WrittenFile
    file_format: FileFormat
    # Its parts already uploaded while it was compressed (``pgsnow.streamed_upload``): completed,
    # not uploaded, by ``upload_files``; S3's checksum over the parts identifies it.
    upload: StreamedUpload | None = None

    def staged_file(self) -> StagedFile:
        w = self.written
        checksum = self.upload.checksum if self.upload is not None and self.upload.checksum else w.sha256
        return StagedFile(self.key, w.batch, w.rows, w.bytes, checksum, self.file_format)


@dataclass(frozen=True)
class StagedSegment:
    """One table's local change files of a run and what its manifest says about them."""

    table: TableRef
    columns: tuple[Column, ...]  # the table's data columns (the files carry CHANGE_COLUMNS first)
    primary_key: tuple[str, ...]  # the relation's key columns (replica identity)
    file_format: FileFormat
    files: tuple[LocalChangeFile, ...]
    warnings: tuple[str, ...] = ()
    # Whether the values took the round trip through a temp table (False: spilled in staged text).
    round_trip: bool = True

    @property
    def rows(self) -> int:
        return sum(f.written.rows for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.written.bytes for f in self.files)


def connect_for_staging(dsn: str, *, statement_timeout_ms: int = 0) -> Connection:
    """The extractor's session settings (UTC, ISO dates...) on a read-write READ COMMITTED connection:
    the temp tables need writes, which the extractor's read-only snapshot transactions refuse."""
    conn = connect(dsn, statement_timeout_ms=statement_timeout_ms)
    try:
        conn.set_session(
            isolation_level=psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED,
            readonly=False,
            autocommit=False,
        )
        with conn.cursor() as cur:
            # A run's changes pass through a temp table once: room for them in the session's local
            # buffers (settable only before the session's first temp table), and lz4 where the server
            # has it, which TOASTs large values several times faster than the default pglz. Measured on
            # the CDC benchmark's workload (10 KB values): the COPY into the temp table was 3.5 s of a
            # 8.7 s drain with pglz.
            cur.execute(sql.SQL("SET temp_buffers = {}").format(sql.Literal(STAGING_TEMP_BUFFERS)))
            cur.execute(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_catalog.pg_settings"
                " WHERE name = 'default_toast_compression'"
            )
            found = cur.fetchone()
            if found is not None and found[0]:
                cur.execute("SET default_toast_compression = 'lz4'")
        conn.commit()
    except BaseException:
        conn.close()  # a failed set-up must not leave the connection open (a warm Lambda keeps it)
        raise
    return conn


def stage_table(
    pg_conn: Connection,
    segments: Sequence[SpilledSegment],
    *,
    run_id: str,
    prefix: str,
    file_format: FileFormat,
    value_policy: ValuePolicy,
    target_file_mb: int,
    work_dir: Path,
    batch_rows: int | None = None,
    kept_scales: Mapping[str, int] | None = None,
    source_nullable: Mapping[str, bool] | None = None,
    early: EarlyCompression | None = None,
) -> StagedSegment:
    """Stage one table's segments of a run (in stream order) as local files; nothing is uploaded.

    All of them are staged in the newest relation's columns, so one manifest describes the run's
    files: a segment spilled under an older column list (a column was added, dropped or retyped
    mid-run) is COPYed into a temp table of its own types first and then inserted into the newest
    shape: a column it lacks is NULL and, on its updates, listed in ``_pgsnow_unchanged`` (the
    change did not touch it: the target keeps its value); a column since dropped is left out; a
    retyped column is cast by PostgreSQL (a value the new type cannot take is a PermanentError).

    ``kept_scales``: NUMBER scales the Snowflake table already has for unbounded numeric columns.
    ``source_nullable``: the columns' nullability in the source table (the temp table's columns
    are all nullable; a column the source no longer has is nullable). ``early``: what was
    compressed while the slot was read (``pgsnow.cdc.spilled_csv``). Raises PermanentError
    naming the table when a value cannot be staged under the value policy.
    """
    if not segments:
        raise ValueError("stage_table needs at least one segment")
    table = segments[-1].table
    relation_columns = list(segments[-1].relation.columns)
    clash = sorted({c.name for s in segments for c in s.relation.columns} & set(CHANGE_COLUMNS))
    if clash:
        raise PermanentError(
            f"{table.qualified} has columns named like pgsnow's change columns ({', '.join(clash)}): "
            "rename them to capture the table's changes",
            table=table.qualified,
        )
    temp_name = f"pgsnow_changes_{uuid.uuid4().hex[:16]}"
    out_dir = work_dir / temp_name  # tables of one run stage side by side: batch numbers repeat
    out_dir.mkdir(parents=True)
    started = time.monotonic()
    # Every value spilled in its staged form, in one shape, for a CSV run without a row cap: the
    # spill is the files' content (module docstring). The temp table is still created, empty, so
    # that the columns are described exactly as the round trip would describe them.
    as_spilled = (
        file_format is FileFormat.CSV
        and batch_rows is None
        and all(s.staged_text and _shape(s.relation.columns) == _shape(relation_columns) for s in segments)
    )
    key = tuple(c.name for c in relation_columns if c.is_key)
    max_bytes = target_file_mb * 1024 * 1024
    early_files: list[WrittenFile] | None = None
    try:
        with pg_conn.cursor() as cur:
            temp_schema = _create_temp_table(cur, temp_name, relation_columns)
        temp = TableRef(temp_schema, temp_name)
        schema = describe_table(pg_conn, temp)
        round_trip = not (as_spilled and kinds_agree(relation_columns, schema.columns[len(CHANGE_COLUMNS) :]))
        if not round_trip:
            header = header_line([c.name for c in schema.columns])
            early_files = (
                early.files_for(segments[0], header) if early is not None and len(segments) == 1 else None
            )
            written = (
                early_files
                if early_files is not None
                else write_spilled_csv(segments, header, work_dir=out_dir, max_bytes=max_bytes)
            )
        else:
            with pg_conn.cursor() as cur:
                for segment in segments:
                    if not segment.staged_text and _shape(segment.relation.columns) == _shape(
                        relation_columns
                    ):
                        _copy_spill(cur, sql.Identifier(temp_schema, temp_name), segment.path)
                    else:
                        _insert_segment(
                            cur, sql.Identifier(temp_schema, temp_name), segment, relation_columns
                        )
            schema = choose_numeric_scales(pg_conn, schema, kept=kept_scales)
            _check_values(pg_conn, schema, key, value_policy, temp=temp, table=table, run_id=run_id)
            written = _read_out(
                pg_conn,
                schema,
                file_format,
                value_policy,
                work_dir=out_dir,
                max_bytes=max_bytes,
                cap=batch_rows or NO_ROW_CAP,
            )
    except psycopg2.Error as exc:
        raise classify_pg_error(exc, table=table.qualified) from exc
    finally:
        if not pg_conn.closed:
            pg_conn.rollback()  # drops the temp tables (ON COMMIT DROP applies at rollback too)
    nullable = source_nullable or {}
    data_columns = tuple(
        replace(c, nullable=nullable.get(c.name, True))
        for c in schema.columns
        if c.name not in CHANGE_COLUMNS
    )
    local_files = []
    for w in written:
        s3_key = data_key(prefix, table, w.batch, run_id, file_format)
        streamed = _streamed(early, w, s3_key) if early is not None and early_files is not None else None
        local_files.append(LocalChangeFile(s3_key, w, file_format, streamed))
    files = tuple(local_files)
    staged = StagedSegment(
        table=table,
        columns=data_columns,
        primary_key=key,
        file_format=file_format,
        files=files,
        warnings=tuple(w.replace(f"{temp_schema}.{temp_name}", table.qualified) for w in schema.warnings),
        round_trip=round_trip,
    )
    logger.info(
        "staged change files locally",
        extra={
            "run_id": run_id,
            "table": table.qualified,
            "rows": staged.rows,
            "bytes": staged.bytes,
            "files": len(files),
            "round_trip": round_trip,
            "duration_ms": round((time.monotonic() - started) * 1000),
        },
    )
    return staged


def _streamed(early: EarlyCompression, written: WrittenFile, key: str) -> StreamedUpload | None:
    """The file's streamed upload, if it was streamed to ``key`` (anything else is aborted)."""
    upload = early.upload_of(written)
    if upload is not None and upload.key != key:
        upload.abort()
        return None
    return upload


def _shape(columns: Sequence[SpilledColumn]) -> list[tuple[str, int, int]]:
    return [(c.name, c.type_oid, c.type_modifier) for c in columns]


def _check_values(
    pg_conn: Connection,
    schema: TableSchema,
    key: tuple[str, ...],
    value_policy: ValuePolicy,
    *,
    temp: TableRef,
    table: TableRef,
    run_id: str,
) -> None:
    """``check_values_fit`` over the temp table, the error naming the source table and the change."""
    try:
        # Key values must stage unchanged whatever the policy: they are what the loader matches on.
        check_values_fit(
            pg_conn,
            _without_pk(schema),
            columns=None if value_policy is ValuePolicy.FAIL else key,
            policy=value_policy,
        )
    except PermanentError as exc:
        message = exc.message.replace(temp.qualified, table.qualified)
        message = message.replace(f"primary key ({LSN_COLUMN}, {SEQ_COLUMN})", "the change (commit LSN, seq)")
        raise PermanentError(message, table=table.qualified, run_id=run_id) from None


def _read_out(
    pg_conn: Connection,
    schema: TableSchema,
    file_format: FileFormat,
    value_policy: ValuePolicy,
    *,
    work_dir: Path,
    max_bytes: int,
    cap: int,
) -> list[WrittenFile]:
    """The temp table's rows through the extractor's select builders, as local files."""
    # The rows were COPYed in stream order ((_pgsnow_lsn, _pgsnow_seq) order) into a heap of this
    # session's own, so a sequential scan from its first block returns them in that order without
    # a sort (the sort was 2.8x the read-out at 300 MB). A synchronized scan could start
    # mid-table, so it is off for this transaction. The apply orders by (lsn, seq) itself and
    # never relies on the file's order.
    with pg_conn.cursor() as cur:
        cur.execute("SET LOCAL synchronize_seqscans = off")
    rows = RowRange()
    reader = TableReader(pg_conn, schema, policy=value_policy)
    if file_format is FileFormat.PARQUET:
        return _write_parquet(
            reader, rows, schema, work_dir=work_dir, first_batch=1, max_bytes=max_bytes, cap=cap
        )
    return _write_csv(reader, rows, work_dir=work_dir, first_batch=1, max_bytes=max_bytes, cap=cap)


def _copy_spill(cur: Any, target: sql.Identifier, path: Path) -> None:
    with path.open("rb") as spill:
        cur.copy_expert(
            sql.SQL("COPY {} FROM STDIN WITH (FORMAT csv, ENCODING 'UTF8')").format(target), spill
        )


def _insert_segment(
    cur: Any, target: sql.Identifier, segment: SpilledSegment, newest: Sequence[SpilledColumn]
) -> None:
    """A segment that is not COPYed into the temp table as it is: one spilled under an older column
    list, brought into the newest shape (``stage_table``), or one in staged text (its bytea values
    are bare hex: read as text and decoded; every other staged value is PostgreSQL input as it is)."""
    older = list(segment.relation.columns)
    older_name = f"pgsnow_changes_{uuid.uuid4().hex[:16]}"
    hex_text = {c.name for c in older if segment.staged_text and is_bytea(c)}
    _create_temp_table(cur, older_name, older, text_columns=hex_text)
    source = sql.Identifier(older_name)
    _copy_spill(cur, source, segment.path)
    older_names = {c.name for c in older}
    common = [c.name for c in newest if c.name in older_names]
    missing = [c.name for c in newest if c.name not in older_names]
    unchanged: sql.Composable = sql.Identifier(UNCHANGED_COLUMN)
    if missing:
        # jsonb || keeps the listed names and appends the missing ones (their text is pgsnow's JSON array).
        unchanged = sql.SQL(
            "CASE WHEN {op} = 'U' THEN (coalesce({u}::jsonb, '[]'::jsonb) || {missing}::jsonb)::text ELSE {u} END"
        ).format(
            op=sql.Identifier(OP_COLUMN),
            u=sql.Identifier(UNCHANGED_COLUMN),
            missing=sql.Literal(unchanged_text(missing)),
        )
    selected = [unchanged if name == UNCHANGED_COLUMN else sql.Identifier(name) for name in CHANGE_COLUMNS]
    selected += [
        sql.SQL("decode({}, 'hex')").format(sql.Identifier(name))
        if name in hex_text
        else sql.Identifier(name)
        for name in common
    ]
    cur.execute(
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
            target,
            sql.SQL(", ").join(sql.Identifier(n) for n in (*CHANGE_COLUMNS, *common)),
            sql.SQL(", ").join(selected),
            source,
        )
    )
    cur.execute(sql.SQL("DROP TABLE {}").format(source))


def _without_pk(schema: TableSchema) -> TableSchema:
    """The temp table has no primary key: ``check_values_fit`` then names the row by ctid. Name it by
    its change position instead, which the user can find in the spill (LSN, seq)."""
    return replace(schema, primary_key=ORDER_KEY)


def _create_temp_table(
    cur: Any, temp_name: str, relation_columns: Sequence[SpilledColumn], *, text_columns: Collection[str] = ()
) -> str:
    """CREATE the temp table (change columns, then the relation's, typed as pgoutput said, or ``text``
    for ``text_columns``) and return the session's temp schema name (``describe_table`` looks a table
    up by schema name)."""
    oids = [c.type_oid for c in relation_columns]
    modifiers = [c.type_modifier for c in relation_columns]
    cur.execute(
        "SELECT pg_catalog.format_type(t.oid, t.modifier) "
        "FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS t(oid, modifier, ord) ORDER BY t.ord",
        (oids, modifiers),
    )
    types = [r[0] for r in cur.fetchall()]
    definitions = [
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(CHANGE_COLUMN_TYPES[name]))
        for name in CHANGE_COLUMNS
    ]
    # format_type() output is PostgreSQL's own, already-quoted type name: safe to splice as SQL.
    definitions += [
        sql.SQL("{} {}").format(
            sql.Identifier(c.name), sql.SQL("text" if c.name in text_columns else type_name)
        )
        for c, type_name in zip(relation_columns, types, strict=True)
    ]
    cur.execute(
        sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(
            sql.Identifier(temp_name), sql.SQL(", ").join(definitions)
        )
    )
    cur.execute("SELECT nspname FROM pg_catalog.pg_namespace WHERE oid = pg_catalog.pg_my_temp_schema()")
    return str(cur.fetchone()[0])


def _write_csv(
    reader: TableReader, rows: RowRange, *, work_dir: Path, first_batch: int, max_bytes: int, cap: int
) -> list[WrittenFile]:
    written: list[WrittenFile] = []
    splitter = CsvBatchSplitter(
        batch_rows=cap,
        path_for_batch=lambda batch: work_dir / f"batch{batch}.csv.gz",
        on_file=written.append,
        first_batch=first_batch,
        max_bytes=max_bytes,
        record_key=lambda _header, _record: None,  # no key ranges: a change file's rows are in LSN order
    )
    reader.copy_csv(splitter, rows)
    splitter.finish()  # a segment always has rows; an empty one would still stage its header
    return written


def _write_parquet(
    reader: TableReader,
    rows: RowRange,
    schema: TableSchema,
    *,
    work_dir: Path,
    first_batch: int,
    max_bytes: int,
    cap: int,
) -> list[WrittenFile]:
    """COPY the Arrow-parsable CSV to a local file first (bounded memory, and the connection is free
    again before parsing), then parse it in row groups and cut files by size like the full runs."""
    import pyarrow as pa

    from pgsnow.extract.parquet_stager import use_jemalloc

    use_jemalloc()
    source = work_dir / f"parquet-source-{first_batch}.csv"
    with source.open("wb") as sink:
        reader.copy_arrow_csv(sink, rows)
    written: list[WrittenFile] = []
    batch = first_batch
    writer: ParquetWriter | None = None

    def write_group(group: pa.Table) -> None:
        nonlocal writer, batch
        if writer is None:
            writer = ParquetWriter(work_dir / f"batch{batch}.parquet", batch, schema.columns)
            batch += 1
        writer.write_arrow(group)
        if writer.rows >= cap or writer.compressed_bytes >= max_bytes:
            written.append(writer.close())
            writer = None

    try:
        with source.open("rb") as stream:
            batches = open_arrow_csv(stream, schema.columns)
            pending: list[pa.RecordBatch] = []
            pending_rows = pending_bytes = 0
            for record_batch in batches or ():
                pending.append(record_batch)
                pending_rows += record_batch.num_rows
                pending_bytes += record_batch.nbytes
                room = cap - (writer.rows if writer is not None else 0)
                if pending_rows >= min(PARQUET_GROUP_ROWS, room) or pending_bytes >= PARQUET_GROUP_BYTES:
                    table = pa.Table.from_batches(pending)
                    take = min(table.num_rows, room)
                    write_group(table.slice(0, take))
                    rest = table.slice(take)
                    pending = rest.to_batches()
                    pending_rows, pending_bytes = rest.num_rows, rest.nbytes
            while pending_rows:
                table = pa.Table.from_batches(pending)
                room = cap - (writer.rows if writer is not None else 0)
                write_group(table.slice(0, room))
                rest = table.slice(room)
                pending, pending_rows = rest.to_batches(), rest.num_rows
    finally:
        source.unlink(missing_ok=True)
    if writer is not None:
        written.append(writer.close())
    if not written:  # no rows at all: one row-less file, as a full run of an empty table stages
        written.append(ParquetWriter(work_dir / f"batch{batch}.parquet", batch, schema.columns).close())
    return written


def upload_files(
    s3: Any,
    bucket: str,
    files: Sequence[LocalChangeFile],
    *,
    run_id: str,
    keep_alive: Callable[[], None] | None = None,
    keep_alive_every_s: float = 10.0,
) -> None:
    """Upload the files in order (with their pgsnow metadata), deleting each local copy once it is
    up; ``keep_alive`` is called between files at most every ``keep_alive_every_s`` seconds (the
    replication connection must answer the server while staging takes long)."""
    from pgsnow.staging import put_data_file

    last = time.monotonic()
    for local in files:
        if keep_alive is not None and time.monotonic() - last >= keep_alive_every_s:
            keep_alive()
            last = time.monotonic()
        w = local.written
        if local.upload is not None:
            local.upload.complete()
        else:
            put_data_file(
                s3, bucket, local.key, w.path, run_id=run_id, batch=w.batch, rows=w.rows, sha256=w.sha256
            )
        w.path.unlink(missing_ok=True)
        logger.info(
            "uploaded change file",
            extra={
                "run_id": run_id,
                "s3_key": local.key,
                "rows": w.rows,
                "bytes": w.bytes,
                "streamed": local.upload is not None,
            },
        )
