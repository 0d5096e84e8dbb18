"""``pgsnow status``: where each table's replication stands, from the manifests, the ledger and the DLQ.

Per table: the last run, its state, its files staged / loaded / failed, rows staged and
loaded, the watermark Snowflake has reached, and the lag (how old the newest fully loaded
run's data is). The state shown is the manifest's, except that a ``staged`` run with a
file in the dead-letter queue shows ``failed`` (it will not finish on its own) and one whose
files are all in the ledger shows ``loaded`` even before cleanup has rewritten its manifest.
The dead-letter queue is read without consuming it (messages received with visibility 0).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any
from urllib.parse import unquote_plus

from pgsnow.config import Settings
from pgsnow.identifiers import TableRef
from pgsnow.keys import run_started_at, table_prefix
from pgsnow.ledger import ledger_rows, loaded_files
from pgsnow.manifest import RunManifest, RunState
from pgsnow.runs import RunStore

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


@dataclass
class StatusReport:
    tables: list[TableStatus] = field(default_factory=list)
    dead_letters: DeadLetters | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tables": [asdict(t) for t in self.tables],
            "dead_letter_queue": asdict(self.dead_letters) if self.dead_letters else None,
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
        return lines


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


def collect_status(
    *,
    settings: Settings,
    s3: Any,
    sqs: Any | None,
    sf_conn: Any,
    table: TableRef | None = None,
    now: datetime | None = None,
) -> StatusReport:
    """The status of one table, or of every table with a manifest, plus the dead-letter queue."""
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
    )
