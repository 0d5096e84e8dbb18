"""The run manifest: what an extraction run staged, and the table's schema.

The extractor writes the manifest twice: once with state ``extracting`` before
the first data file (so the loader can create the target table from the schema
as soon as any file arrives), and again with state ``staged`` and the complete
file list after the last file. Loading and cleanup move it to ``loaded``.
Each data file also carries its own row count and checksum as S3 object
metadata, so the loader can check a file without waiting for the manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from pgsnow.changes import ChangeRange
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef, check_no_collisions, snowflake_name
from pgsnow.keys import FileFormat
from pgsnow.typemap import SnowflakeType, TypeShape, ValueKind, scale_from_data

MANIFEST_VERSION = 1

# S3 user-metadata names on every staged data file (boto3 lower-cases them).
META_RUN_ID = "pgsnow-run-id"
META_BATCH = "pgsnow-batch"
META_ROWS = "pgsnow-rows"
META_SHA256 = "pgsnow-sha256"


class RunState(StrEnum):
    EXTRACTING = "extracting"
    STAGED = "staged"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass(frozen=True)
class Column:
    name: str  # PostgreSQL name, exact case
    pg_type: str  # format_type() of the column as declared
    base_type: str  # format_type() after resolving domains/enums
    kind: ValueKind
    snowflake_type: str
    nullable: bool
    precision: int | None = None
    scale: int | None = None
    shape: TypeShape = TypeShape.SCALAR  # how PostgreSQL builds the staged value (typemap.TypeShape)

    @property
    def snowflake_name(self) -> str:
        return snowflake_name(self.name)

    @property
    def is_unbounded_numeric(self) -> bool:
        """An unbounded ``numeric`` (or one wider than 38 digits): its scale is chosen from the data
        (docs/type-mapping.md)."""
        return self.kind is ValueKind.DECIMAL and scale_from_data(self.base_type)

    @classmethod
    def from_types(cls, name: str, pg_type: str, base_type: str, sf: SnowflakeType, nullable: bool) -> Column:
        return cls(name, pg_type, base_type, sf.kind, sf.sql, nullable, sf.precision, sf.scale, sf.shape)


@dataclass(frozen=True)
class StagedFile:
    key: str
    batch: int
    rows: int
    bytes: int
    sha256: str
    file_format: FileFormat
    chunk: int | None = None  # the primary-key chunk this file belongs to (resumable runs)
    key_range: tuple[str, str] | None = None  # first and last primary key in the file, as text
    cursor_range: tuple[str, str] | None = None  # incremental: lowest and highest cursor value, as text


@dataclass(frozen=True)
class RunManifest:
    run_id: str
    table: TableRef
    mode: str
    file_format: FileFormat
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    state: RunState
    started_at: str
    finished_at: str | None = None
    files: tuple[StagedFile, ...] = field(default_factory=tuple)
    # Incremental runs: the cursor column and the watermark the run started from / may advance to.
    cursor_column: str | None = None
    watermark_before: str | None = None
    watermark_after: str | None = None
    # How the loader applies the run (from the table's options at extraction time).
    write_mode: str = "append"
    deletes: str = "none"
    # The full primary-key list, staged when deletes are requested (outside the notification filter).
    key_list: StagedFile | None = None
    error: str | None = None  # why a run is `failed`
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    # Keys cleanup has claimed for removal (written before it deletes, so two cleanups never both do).
    cleaned: tuple[str, ...] = ()
    # What the run staged in a way the user should know about, e.g. a column whose type is not in
    # the type contract, staged as its text output (absent in manifests written before it existed).
    warnings: tuple[str, ...] = ()
    # Change capture (pgsnow.changes): a change run's place in the slot's stream, or the position a
    # change-capture table's snapshot is complete through. None for other runs.
    changes: ChangeRange | None = None

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def file_for_key(self, key: str) -> StagedFile | None:
        return next((f for f in self.files if f.key == key), None)

    def with_state(self, state: RunState, **changes: Any) -> RunManifest:
        return replace(self, state=state, **changes)

    def to_json(self) -> str:
        body = {
            "format_version": MANIFEST_VERSION,
            "run_id": self.run_id,
            "table": {"schema": self.table.schema, "name": self.table.table},
            "snowflake": {"schema": self.table.snowflake_schema, "table": self.table.snowflake_table},
            "mode": self.mode,
            "file_format": self.file_format.value,
            "state": self.state.value,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "primary_key": list(self.primary_key),
            "columns": [column_to_json(c) for c in self.columns],
            "files": [_file_to_json(f) for f in self.files],
            "total_rows": self.total_rows,
            "cursor_column": self.cursor_column,
            "watermark_before": self.watermark_before,
            "watermark_after": self.watermark_after,
            "write_mode": self.write_mode,
            "deletes": self.deletes,
            "key_list": _file_to_json(self.key_list) if self.key_list else None,
            "error": self.error,
            "timings": self.timings,
            "cleaned": list(self.cleaned),
            "warnings": list(self.warnings),
        }
        if self.changes is not None:
            body["changes"] = self.changes.to_json()
        return json.dumps(body, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes, *, s3_key: str | None = None) -> RunManifest:
        try:
            body = json.loads(text)
            if body.get("format_version") != MANIFEST_VERSION:
                raise PermanentError(f"unsupported manifest format_version {body.get('format_version')!r}")
            table = TableRef(body["table"]["schema"], body["table"]["name"])
            columns = tuple(column_from_json(c) for c in body["columns"])
            check_no_collisions((c.name for c in columns), what="column", table=table.qualified)
            files = tuple(_file_from_json(f) for f in body.get("files", []))
            return cls(
                run_id=body["run_id"],
                table=table,
                mode=body["mode"],
                file_format=FileFormat(body["file_format"]),
                columns=columns,
                primary_key=tuple(body.get("primary_key", [])),
                state=RunState(body["state"]),
                started_at=body["started_at"],
                finished_at=body.get("finished_at"),
                files=files,
                cursor_column=body.get("cursor_column"),
                watermark_before=body.get("watermark_before"),
                watermark_after=body.get("watermark_after"),
                write_mode=body.get("write_mode", "append"),
                deletes=body.get("deletes", "none"),
                key_list=_file_from_json(body["key_list"]) if body.get("key_list") else None,
                error=body.get("error"),
                timings={str(k): float(v) for k, v in (body.get("timings") or {}).items()},
                cleaned=tuple(str(k) for k in body.get("cleaned") or ()),
                warnings=tuple(str(w) for w in body.get("warnings") or ()),
                changes=ChangeRange.from_json(body["changes"]) if body.get("changes") else None,
            )
        except PermanentError as exc:
            exc.s3_key = exc.s3_key or s3_key
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"malformed manifest: {exc!r}", s3_key=s3_key) from exc


def column_to_json(column: Column) -> dict[str, Any]:
    """A column as the manifest (and the table's published-columns state) writes it.

    ``shape`` is written only when it is not ``scalar``, so older readers' columns stay as they were.
    """
    body = {**asdict(column), "kind": column.kind.value, "snowflake_name": column.snowflake_name}
    if column.shape is TypeShape.SCALAR:
        del body["shape"]
    else:
        body["shape"] = column.shape.value
    return body


def column_from_json(body: dict[str, Any]) -> Column:
    return Column(
        name=body["name"],
        pg_type=body["pg_type"],
        base_type=body["base_type"],
        kind=ValueKind(body["kind"]),
        snowflake_type=body["snowflake_type"],
        nullable=bool(body["nullable"]),
        precision=body.get("precision"),
        scale=body.get("scale"),
        shape=TypeShape(body.get("shape") or TypeShape.SCALAR),
    )


def _file_to_json(staged: StagedFile) -> dict[str, Any]:
    body = {**asdict(staged), "file_format": staged.file_format.value}
    for name in ("key_range", "cursor_range"):
        if body[name] is not None:
            body[name] = list(body[name])
    return body


def _file_from_json(body: dict[str, Any]) -> StagedFile:
    def pair(value: Any) -> tuple[str, str] | None:
        return (str(value[0]), str(value[1])) if value else None

    return StagedFile(
        key=body["key"],
        batch=int(body["batch"]),
        rows=int(body["rows"]),
        bytes=int(body["bytes"]),
        sha256=body["sha256"],
        file_format=FileFormat(body["file_format"]),
        chunk=int(body["chunk"]) if body.get("chunk") is not None else None,
        key_range=pair(body.get("key_range")),
        cursor_range=pair(body.get("cursor_range")),
    )
