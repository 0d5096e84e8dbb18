"""``pgsnow status``: where each table's replication stands, from the manifests, the ledger and the DLQ.

Per table: the last run, its state, its files staged / loaded / failed, rows staged and
loaded, the watermark Snowflake has reached, and the lag (how old the newest fully loaded
run's data is). The state shown is the manifest's, except that a ``staged`` run with a
file in the dead-letter queue shows ``failed`` (it will not finish on its own) and one whose
files are all in the ledger shows ``loaded`` even before cleanup has rewritten its manifest.
The dead-letter queue is read without consuming it (messages received with visibility 0).

When a table has ``mode: cdc``, the report also has the change-capture slot (``CDC_SLOT``): the
WAL it retains, the position confirmed to it, how long ago that was and how far behind the
staged changes are (from the drain's state object, ``_pgsnow/cdc/{slot}/state.json``), whether a
drain holds it now, and its ``wal_status``. A lost slot shows ``LOST`` and the command that
re-snapshots its tables (docs/change-capture.md, "Status and alarms").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any
from urllib.parse import unquote_plus

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.cdc.slot import SlotHealth, resnapshot_command, slot_health
from pgsnow.changes import format_lsn, parse_lsn
from pgsnow.config import Settings
from pgsnow.errors import PgSnowError
from pgsnow.identifiers import TableRef
from pgsnow.keys import run_started_at, table_prefix
from pgsnow.ledger import ledger_rows, loaded_files
from pgsnow.manifest import RunManifest, RunState
from pgsnow.postgres_setup import cdc_tables
from pgsnow.runs import RunStore
from pgsnow.staging import raise_unless_missing

_DLQ_PEEK_LIMIT = 200  # messages: enough to name what is stuck without draining a flooded queue
_LOADED_RUN_LOOKBACK = 50  # runs read back from the newest to find the last fully loaded one


@dataclass(frozen=True)
class DeadLetters:
    count: int  # the queue's ApproximateNumberOfMessages
    keys: list[str]  # S3 keys named by the messages read (at most _DLQ_PEEK_LIMIT messages)

    def keys_for(self, table: TableRef, prefix: str) -> set[str]:
        root = table_prefix(prefix, table)
        return {k for k in self.keys if k.startswith(root)}


@dataclass(frozen=True)
class TableStatus:
    table: str
    last_run_id: str | None
    state: str
    files_staged: int
    files_loaded: int
    files_failed: int
    rows_staged: int
    rows_loaded: int
    watermark: str | None
    last_loaded_run_id: str | None
    lag_seconds: int | None
    error: str | None = None


@dataclass(frozen=True)
class SlotStatus:
    """A change-capture slot: the server's view and the drain's state object's."""

    slot: str
    state: str  # OK | INACTIVE (no drain holds it now: normal between runs) | AT RISK | LOST | UNKNOWN
    active: bool
    wal_status: str | None
    retained_wal_bytes: int | None
    confirmed_lsn: str | None  # the slot's confirmed_flush_lsn (X/Y)
    confirmed_at: str | None  # when the drain last confirmed (its state object), ISO 8601
    seconds_since_confirmation: int | None
    lag_seconds: int | None  # age of the newest heartbeat the drain staged through
    tables: list[str]
    resnapshot_command: str | None = None  # set when LOST
    error: str | None = None


@dataclass
class StatusReport:
    tables: list[TableStatus] = field(default_factory=list)
    dead_letters: DeadLetters | None = None
    slots: list[SlotStatus] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tables": [asdict(t) for t in self.tables],
            "dead_letter_queue": asdict(self.dead_letters) if self.dead_letters else None,
            "slots": [asdict(s) for s in self.slots],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def format_lines(self) -> list[str]:
        header = ("TABLE", "LAST RUN", "STATE", "STAGED", "LOADED", "FAILED", "ROWS", "WATERMARK", "LAG")
        rows = [
            (
                t.table,
                t.last_run_id or "-",
                t.state,
                str(t.files_staged),
                str(t.files_loaded),
                str(t.files_failed),
                f"{t.rows_loaded}/{t.rows_staged}",
                t.watermark or "-",
                format_lag(t.lag_seconds),
            )
            for t in self.tables
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]
        ]
        if self.dead_letters is not None:
            lines.append("")
            lines.append(f"dead-letter queue: {self.dead_letters.count} message(s)")
            lines.extend(f"  {key}" for key in self.dead_letters.keys)
        for slot in self.slots:
            lines.append("")
            lines.extend(format_slot_lines(slot))
        return lines


def format_slot_lines(slot: SlotStatus) -> list[str]:
    """The slot's section of the text report."""
    lines = [f"slot {slot.slot}: {slot.state}"]
    if slot.state == "UNKNOWN":
        lines.append(f"  {slot.error}")
        lines.append(f"  confirmed LSN (drain state)  {slot.confirmed_lsn or '-'}")
        lines.append(f"  since confirmation           {format_lag(slot.seconds_since_confirmation)}")
        return lines
    if slot.state == "LOST":
        lines.append(f"  {slot.error}")
        lines.append(f"  re-snapshot its tables: {slot.resnapshot_command}")
        return lines
    lines += [
        f"  retained WAL          {format_bytes(slot.retained_wal_bytes)}",
        f"  confirmed LSN         {slot.confirmed_lsn or '-'}",
        f"  since confirmation    {format_lag(slot.seconds_since_confirmation)}",
        f"  lag                   {format_lag(slot.lag_seconds)}",
        f"  active                {'yes' if slot.active else 'no'}",
        f"  wal_status            {slot.wal_status or '-'}",
        f"  tables                {', '.join(slot.tables) or '-'}",
    ]
    if slot.error:
        lines.append(f"  {slot.error}")
    return lines


def format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def format_lag(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def keys_in_message(body: str) -> list[str]:
    """The S3 keys an S3 notification body names; ``[]`` for anything else."""
    try:
        document = json.loads(body)
    except ValueError:
        return []
    records = document.get("Records") if isinstance(document, dict) else None
    keys = []
    for record in records if isinstance(records, list) else []:
        try:
            keys.append(unquote_plus(str(record["s3"]["object"]["key"])))
        except (KeyError, TypeError):
            continue
    return keys


def read_dead_letters(sqs: Any, dlq_url: str) -> DeadLetters:
    """Count the dead-letter queue and name the keys in it, leaving every message in place."""
    attributes = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
    count = int(attributes["Attributes"].get("ApproximateNumberOfMessages", 0))
    seen: dict[str, list[str]] = {}
    empty_polls = 0
    while empty_polls < 2 and len(seen) < _DLQ_PEEK_LIMIT:
        messages = sqs.receive_message(
            QueueUrl=dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        ).get("Messages", [])
        new = [m for m in messages if m["MessageId"] not in seen]
        for message in new:
            seen[message["MessageId"]] = keys_in_message(message.get("Body", ""))
        empty_polls = 0 if new else empty_polls + 1
    keys = sorted({key for keys in seen.values() for key in keys})
    return DeadLetters(count=max(count, len(seen)), keys=keys)


def table_status(
    *,
    settings: Settings,
    s3: Any,
    sf_conn: Any,
    table: TableRef,
    dead_letters: DeadLetters | None,
    now: datetime,
) -> TableStatus:
    runs = RunStore(s3, settings.bucket).manifests_newest_first(table)
    last = next(runs, None)
    if last is None:
        return TableStatus(table.qualified, None, "never run", 0, 0, 0, 0, 0, None, None, None)
    ledger = ledger_rows(sf_conn, settings, {table: [f.key for f in last.files]})
    loaded = loaded_files(last, ledger)
    dead = dead_letters.keys_for(table, settings.prefix) if dead_letters else set()
    failed = [f for f in last.files if f.key in dead and f not in loaded]
    state = last.state.value
    if last.state is RunState.STAGED and failed:
        state = RunState.FAILED.value
    elif last.state is RunState.STAGED and len(loaded) == len(last.files):
        state = RunState.LOADED.value

    last_loaded: RunManifest | None = last if state == RunState.LOADED.value else None
    if last_loaded is None:
        earlier = islice(runs, _LOADED_RUN_LOOKBACK - 1)
        last_loaded = next((m for m in earlier if m.state is RunState.LOADED), None)
    lag = None if last_loaded is None else int((now - run_started_at(last_loaded.run_id)).total_seconds())
    watermark = None
    if last_loaded is not None:
        watermark = last_loaded.watermark_after or last_loaded.watermark_before
    error = last.error
    if failed and not error:
        error = f"{len(failed)} file(s) in the dead-letter queue"
    return TableStatus(
        table=table.qualified,
        last_run_id=last.run_id,
        state=state,
        files_staged=len(last.files),
        files_loaded=len(loaded),
        files_failed=len(failed),
        rows_staged=last.total_rows,
        rows_loaded=sum(ledger[f.key].rows_loaded or 0 for f in loaded),
        watermark=watermark,
        last_loaded_run_id=None if last_loaded is None else last_loaded.run_id,
        lag_seconds=lag,
        error=error,
    )


def drain_state_key(slot: str) -> str:
    """The drain's state object of ``slot`` (written by the drain through RunStore)."""
    return f"_pgsnow/cdc/{slot}/state.json"


def read_drain_state(s3: Any, bucket: str, slot: str) -> dict[str, Any] | None:
    """The drain's state object, or None when there is none (no run yet) or it is not an object.

    Read tolerantly: status must show what it can while the drain's format grows."""
    key = drain_state_key(slot)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise_unless_missing(exc, s3_key=key)
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def slot_status(
    *, health: SlotHealth, state: dict[str, Any] | None, tables: list[TableRef], now: datetime
) -> SlotStatus:
    """Combine the server's view of the slot with the drain's state object."""
    names = [t.qualified for t in tables]
    if health.lost:
        return SlotStatus(
            slot=health.slot,
            state="LOST",
            active=health.active,
            wal_status=health.wal_status,
            retained_wal_bytes=health.retained_wal_bytes,
            confirmed_lsn=None
            if health.confirmed_flush_lsn is None
            else format_lsn(health.confirmed_flush_lsn),
            confirmed_at=_text(state, "confirmed_at"),
            seconds_since_confirmation=_age(_text(state, "confirmed_at"), now),
            lag_seconds=None,
            tables=names,
            resnapshot_command=resnapshot_command(health.slot, tables),
            error=health.problem,
        )
    confirmed_at = _text(state, "confirmed_at")
    heartbeat = state.get("last_heartbeat") if state else None
    heartbeat_at = heartbeat.get("at") if isinstance(heartbeat, dict) else None
    error = None
    state_lsn = _text(state, "confirmed_lsn")
    if state_lsn and health.confirmed_flush_lsn is not None:
        try:
            if parse_lsn(state_lsn) > health.confirmed_flush_lsn:
                error = (
                    f"the drain staged through {state_lsn} but has not confirmed it yet (the next run will)"
                )
        except PgSnowError:
            error = f"the drain state's confirmed_lsn {state_lsn!r} is not an LSN"
    if health.wal_status == "unreserved":
        label = "AT RISK"
        error = (
            "the slot retains more WAL than max_wal_size/max_slot_wal_keep_size keep: it will be invalidated"
        )
    else:
        label = "OK" if health.active else "INACTIVE"
    return SlotStatus(
        slot=health.slot,
        state=label,
        active=health.active,
        wal_status=health.wal_status,
        retained_wal_bytes=health.retained_wal_bytes,
        confirmed_lsn=None if health.confirmed_flush_lsn is None else format_lsn(health.confirmed_flush_lsn),
        confirmed_at=confirmed_at,
        seconds_since_confirmation=_age(confirmed_at, now),
        lag_seconds=_age(heartbeat_at if isinstance(heartbeat_at, str) else None, now),
        tables=names,
        error=error,
    )


def _text(state: dict[str, Any] | None, name: str) -> str | None:
    value = state.get(name) if state else None
    return value if isinstance(value, str) and value else None


def _age(iso: str | None, now: datetime) -> int | None:
    """Whole seconds from an ISO 8601 time to ``now`` (None when absent or unreadable)."""
    if iso is None:
        return None
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0, int((now - then).total_seconds()))


def collect_slot_statuses(
    *, settings: Settings, s3: Any, pg_conn: Any, now: datetime, pg_error: str | None = None
) -> list[SlotStatus]:
    """The change-capture slot (CDC_SLOT) when any table has mode cdc; [] otherwise. With
    ``pg_error`` (PostgreSQL could not be reached) the slot is shown UNKNOWN with that reason."""
    tables = cdc_tables(settings)
    if not tables:
        return []
    slot = settings.cdc.slot
    if pg_error is not None:
        state = read_drain_state(s3, settings.bucket, slot)
        confirmed_at = _text(state, "confirmed_at")
        return [
            SlotStatus(
                slot=slot,
                state="UNKNOWN",
                active=False,
                wal_status=None,
                retained_wal_bytes=None,
                confirmed_lsn=_text(state, "confirmed_lsn"),
                confirmed_at=confirmed_at,
                seconds_since_confirmation=_age(confirmed_at, now),
                lag_seconds=None,
                tables=[t.qualified for t in tables],
                error=f"PostgreSQL not reachable: {pg_error}",
            )
        ]
    return [
        slot_status(
            health=slot_health(pg_conn, slot),
            state=read_drain_state(s3, settings.bucket, slot),
            tables=tables,
            now=now,
        )
    ]


def collect_status(
    *,
    settings: Settings,
    s3: Any,
    sqs: Any | None,
    sf_conn: Any,
    table: TableRef | None = None,
    now: datetime | None = None,
    pg_conn: Any | None = None,
    pg_error: str | None = None,
) -> StatusReport:
    """The status of one table, or of every table with a manifest, plus the dead-letter queue and,
    given a PostgreSQL connection, the change-capture slot."""
    now = now or datetime.now(UTC)
    dead_letters = None
    if sqs is not None and settings.cleanup.dlq_url:
        dead_letters = read_dead_letters(sqs, settings.cleanup.dlq_url)
    tables = [table] if table is not None else RunStore(s3, settings.bucket).tables_with_manifests()
    return StatusReport(
        tables=[
            table_status(
                settings=settings, s3=s3, sf_conn=sf_conn, table=t, dead_letters=dead_letters, now=now
            )
            for t in tables
        ],
        dead_letters=dead_letters,
        slots=[]
        if pg_conn is None and pg_error is None
        else collect_slot_statuses(settings=settings, s3=s3, pg_conn=pg_conn, now=now, pg_error=pg_error),
    )
