"""S3 object keys: where staged files and manifests live, and how keys are parsed back.

Data files: ``{prefix}/{schema}/{table}/{schema}_{table}_batch{N}_{run_id}.{ext}``.
``run_id`` is the run's UTC start timestamp, so a (run, batch) pair always maps
to the same key and a retried upload overwrites identical content.

Manifests and other control objects live under ``_pgsnow/`` at the bucket root,
outside the staging prefix, so the loader's notification never sees them. This module is the
only one that builds their keys; ``pgsnow.runs`` is the only one that reads and writes them:

* ``_pgsnow/manifests/{schema}/{table}/{run_id}.json``: a run's manifest;
* ``_pgsnow/state/{schema}/{table}/``: ``lease.json``, ``runs/{run_id}.json`` (checkpoints),
  ``watermark.json``, ``columns.json``; a parallel run's ranges under ``runs/{run_id}/ranges/``
  (``{n}.json`` checkpoints, ``{n}.lease.json`` leases); ``cdc.json``: a change-capture table's
  enrollment (its slot, snapshot LSN and snapshot run);
* ``_pgsnow/keys/{schema}/{table}/{run_id}.csv.gz``: a run's full primary-key list (deletes);
* ``_pgsnow/cdc/{slot}/state.json``: a replication slot's drain state (the change-capture runs:
  confirmed position, last run, each table's last change-run end; ``pgsnow.runs.DrainState``);
* ``_pgsnow/reports/orphans/{timestamp}.json``: the orphan sweeper's reports;
* ``_pgsnow/pending/{schema}/{table}/{run_id}``: the pending-run index, one marker per run that
  may still have cleanup work (the cleanup pass lists these, never every manifest), and
  ``_pgsnow/pending-index.json``: when the index was first built from the manifests (outside
  ``_pgsnow/pending/``, so listing the markers never returns it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from urllib.parse import unquote_plus

from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef

CONTROL_PREFIX = "_pgsnow"
MANIFESTS_PREFIX = f"{CONTROL_PREFIX}/manifests/"
# A run's full primary-key list (deletes): a control object, read by Snowflake through its URL.
KEY_LISTS_PREFIX = f"{CONTROL_PREFIX}/keys"
ORPHAN_REPORTS_PREFIX = f"{CONTROL_PREFIX}/reports/orphans/"
PENDING_PREFIX = f"{CONTROL_PREFIX}/pending/"
PENDING_INDEX_KEY = f"{CONTROL_PREFIX}/pending-index.json"
_RUN_ID = re.compile(r"^\d{8}T\d{12}Z$")
_RUN_ID_FORMAT = "%Y%m%dT%H%M%S%fZ"


class FileFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"

    @property
    def extension(self) -> str:
        return "csv.gz" if self is FileFormat.CSV else "parquet"


class NotADataFileError(PermanentError):
    """A key under the staging prefix whose extension is not a data file's (the notification
    covers the whole prefix, because S3's suffix filters are case-sensitive)."""


# Extensions the loader accepts, including hand-dropped files (plain CSV too), in any case
# (FILE.CSV.GZ is a .csv.gz file).
_EXTENSIONS: dict[str, tuple[FileFormat, bool]] = {
    ".csv.gz": (FileFormat.CSV, True),
    ".csv": (FileFormat.CSV, False),
    ".parquet": (FileFormat.PARQUET, False),
}


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique-per-table run id: the UTC start time to the microsecond."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime(_RUN_ID_FORMAT)


def run_started_at(run_id: str) -> datetime:
    """When the run started: its id read back."""
    return datetime.strptime(run_id, _RUN_ID_FORMAT).replace(tzinfo=UTC)


def is_run_id(text: str) -> bool:
    return bool(_RUN_ID.match(text))


def normalise_prefix(prefix: str) -> str:
    cleaned = prefix.strip().strip("/")
    if not cleaned or ".." in cleaned.split("/"):
        raise PermanentError(f"invalid S3 stage prefix {prefix!r}")
    return cleaned


def data_key(prefix: str, table: TableRef, batch: int, run_id: str, file_format: FileFormat) -> str:
    name = f"{table.schema}_{table.table}_batch{batch}_{run_id}.{file_format.extension}"
    return f"{normalise_prefix(prefix)}/{table.schema}/{table.table}/{name}"


def table_prefix(prefix: str, table: TableRef) -> str:
    return f"{normalise_prefix(prefix)}/{table.schema}/{table.table}/"


def manifests_prefix(table: TableRef) -> str:
    return f"{MANIFESTS_PREFIX}{table.schema}/{table.table}/"


def manifest_key(table: TableRef, run_id: str) -> str:
    return f"{manifests_prefix(table)}{run_id}.json"


def state_prefix(table: TableRef) -> str:
    return f"{CONTROL_PREFIX}/state/{table.schema}/{table.table}/"


def lease_key(table: TableRef) -> str:
    return state_prefix(table) + "lease.json"


def checkpoint_key(table: TableRef, run_id: str) -> str:
    return state_prefix(table) + f"runs/{run_id}.json"


def range_checkpoint_key(table: TableRef, run_id: str, index: int) -> str:
    """The checkpoint of range ``index`` of a parallel run (written by that range's lease holder)."""
    return state_prefix(table) + f"runs/{run_id}/ranges/{index}.json"


def range_lease_key(table: TableRef, run_id: str, index: int) -> str:
    """Who extracts range ``index`` of a parallel run now (one worker per range)."""
    return state_prefix(table) + f"runs/{run_id}/ranges/{index}.lease.json"


def watermark_key(table: TableRef) -> str:
    return state_prefix(table) + "watermark.json"


def published_columns_key(table: TableRef) -> str:
    return state_prefix(table) + "columns.json"


def enrollment_key(table: TableRef) -> str:
    """A change-capture table's enrollment (``pgsnow.cdc.enroll``): where its snapshot hands off to the slot."""
    return state_prefix(table) + "cdc.json"


def key_list_key(table: TableRef, run_id: str) -> str:
    """Where a run's full primary-key list goes (outside the staging prefix: never loaded as data).

    Snowflake reads it by URL, so the storage integration's allowed locations
    (``setup_sql.allowed_locations``) and the template's SnowflakeStorageRole cover
    ``KEY_LISTS_PREFIX`` too.
    """
    return f"{KEY_LISTS_PREFIX}/{table.schema}/{table.table}/{run_id}.csv.gz"


CDC_PREFIX = f"{CONTROL_PREFIX}/cdc/"
# PostgreSQL's own rule for replication slot names: lower-case letters, digits and underscores.
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


def drain_state_key(slot: str) -> str:
    """Where the change-capture runs of ``slot`` keep their state (one object per slot)."""
    if not _SLOT_NAME.match(slot):
        raise PermanentError(f"{slot!r} is not a replication slot name (lower-case letters, digits, _)")
    return f"{CDC_PREFIX}{slot}/state.json"


def orphan_report_key(report_id: str) -> str:
    return f"{ORPHAN_REPORTS_PREFIX}{report_id}.json"


def pending_prefix(table: TableRef) -> str:
    return f"{PENDING_PREFIX}{table.schema}/{table.table}/"


def pending_key(table: TableRef, run_id: str) -> str:
    """The pending-run marker of a run that may still have cleanup work."""
    return f"{pending_prefix(table)}{run_id}"


def parse_pending_key(key: str) -> tuple[TableRef, str] | None:
    """(table, run id) of a pending-run marker key; None for any other key."""
    parts = key.removeprefix(PENDING_PREFIX).split("/") if key.startswith(PENDING_PREFIX) else []
    if len(parts) != 3 or not is_run_id(parts[2]):
        return None
    try:
        return TableRef(parts[0], parts[1]), parts[2]
    except PermanentError:
        return None


def applied_mark_key(table: TableRef, run_id: str) -> str:
    """The ledger key that records what became of a complete run's swap or deletes (no S3 object)."""
    return f"{CONTROL_PREFIX}/applied/{table.schema}/{table.table}/{run_id}"


@dataclass(frozen=True)
class StagedObject:
    """A data file key, parsed. ``run_id``/``batch`` are None for hand-dropped files."""

    key: str
    table: TableRef
    file_name: str
    file_format: FileFormat
    gzip: bool
    run_id: str | None
    batch: int | None


def decode_event_key(raw_key: str) -> str:
    """S3 event keys are URL-encoded with '+' for spaces."""
    return unquote_plus(raw_key)


def parse_data_key(key: str, prefix: str) -> StagedObject:
    """Parse a staged data file key, refusing anything outside ``{prefix}/{schema}/{table}/``."""
    root = normalise_prefix(prefix) + "/"
    if not key.startswith(root):
        raise PermanentError(f"object key is outside the staging prefix {root!r}", s3_key=key)
    parts = key[len(root) :].split("/")
    if len(parts) != 3 or any(p in {"", ".", ".."} for p in parts):
        raise PermanentError(
            "object key must be {prefix}/{schema}/{table}/{file}, with no empty or '..' parts", s3_key=key
        )
    schema, table_name, file_name = parts
    table = TableRef(schema, table_name)
    lowered = file_name.lower()
    ext = next((e for e in _EXTENSIONS if lowered.endswith(e) and len(file_name) > len(e)), None)
    if ext is None:
        raise NotADataFileError(
            "unsupported file type: staged files must end in .csv.gz, .csv or .parquet (in any case)",
            s3_key=key,
        )
    file_format, gz = _EXTENSIONS[ext]
    stem = file_name[: -len(ext)]
    run_id, batch = _parse_pgsnow_stem(stem, table)
    return StagedObject(key, table, file_name, file_format, gz, run_id, batch)


def _parse_pgsnow_stem(stem: str, table: TableRef) -> tuple[str | None, int | None]:
    expected = f"{table.schema}_{table.table}_batch"
    if not stem.startswith(expected):
        return None, None
    batch_text, _, run_id = stem[len(expected) :].partition("_")
    if batch_text.isdigit() and is_run_id(run_id):
        return run_id, int(batch_text)
    return None, None
